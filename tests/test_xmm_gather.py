"""XMM's heads on a fixed-size gather of masked positions: the same losses and gradients as the boolean selection
and as the previous all-positions (weighted) path, the per-row caps and what happens beyond them, and no host
reads (meta tensors everywhere; CUDA's sync debug mode when a GPU is present). fp32 on the CPU."""

from __future__ import annotations

import math
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch

from vlalign.data.masking import BlockMaskGenerator
from vlalign.data.tokenization import VocabInfo
from vlalign.models.stream import SingleStreamTransformer, StreamConfig
from vlalign.objectives.base import BuildSpec
from vlalign.objectives.functional import distilled_cross_entropy, mask_tokens
from vlalign.objectives.image_targets import PixelTargets
from vlalign.objectives.xmm import TEXT_CAP_TAIL, XMM, MaskedRows, binomial_cap, keep_first

VOCAB = VocabInfo(vocab_size=30, pad_token_id=0, unk_token_id=1, cls_token_id=2, sep_token_id=3, mask_token_id=4)
HIDDEN = 8
GRID = (4, 4)  # 16 patches; the data pipeline's bound for this grid is 5


def _stream() -> SingleStreamTransformer:
    config = StreamConfig(
        vocab_size=30, hidden_size=HIDDEN, num_layers=1, num_heads=2, intermediate_size=16, encoder_width=HIDDEN
    )
    return SingleStreamTransformer(config)


def _xmm(text: bool = True, image: bool = False, distill: bool = True, **kwargs) -> XMM:
    torch.manual_seed(11)
    xmm = XMM(text=text, image=image, distill=distill, **kwargs)
    spec = BuildSpec(HIDDEN, HIDDEN, VOCAB, GRID, 2, momentum=distill, stream=_stream(), stream_m=_stream())
    xmm.build(spec)
    return xmm


def _hand_ce(logits: list[list[float]], labels: list[int], teacher: list[list[float]] | None, alpha: float) -> float:
    """Mean over rows of (1-α)·CE + α·soft CE, in plain Python."""
    total = 0.0
    for row, label in enumerate(labels):
        top = max(logits[row])
        log_z = math.log(sum(math.exp(v - top) for v in logits[row])) + top
        log_p = [v - log_z for v in logits[row]]
        hard = -log_p[label]
        if teacher is None:
            total += hard
            continue
        t_top = max(teacher[row])
        exps = [math.exp(v - t_top) for v in teacher[row]]
        q = [e / sum(exps) for e in exps]
        total += (1 - alpha) * hard + alpha * -sum(a * b for a, b in zip(q, log_p, strict=True))
    return total / len(labels)


# -- the pieces ---------------------------------------------------------------------------------------------------
def test_binomial_cap_is_the_smallest_bound_with_the_tail_below_the_threshold() -> None:
    """Against exact rational binomial tails: P(X > K) <= tail < P(X > K - 1)."""
    p = Fraction(3, 20)  # 0.15
    for n, tail in ((5, 1e-3), (11, 1e-6), (24, 1e-6), (24, 1e-9), (40, 1e-4)):
        pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
        above = [sum(pmf[k + 1 :], Fraction(0)) for k in range(n + 1)]  # above[k] = P(X > k)
        cap = binomial_cap(n, 0.15, tail)
        assert above[cap] <= tail < above[cap - 1], (n, tail, cap)
    assert binomial_cap(24, 0.15, TEXT_CAP_TAIL) == 14  # a 25-token batch with [CLS] protected
    assert binomial_cap(0, 0.15, 1e-6) == 0


def test_keep_first_clears_each_rows_picks_after_the_cap() -> None:
    picked = torch.tensor([[1, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(keep_first(picked, 2), expected)
    assert keep_first(picked, 6) is picked  # no row can exceed the length: nothing to do


def test_masked_rows_gather_puts_picks_first_in_order_and_pads_with_zero_weight() -> None:
    picked = torch.tensor([[False, True, False, True], [False, False, True, False]])
    x = torch.arange(2 * 4 * 3).view(2, 4, 3)
    rows = MaskedRows(picked, cap=3, gather=True)
    assert rows.index.tolist() == [[1, 3, 0], [2, 0, 1]]  # picks first (position order), then the rest
    assert rows.valid.tolist() == [True, True, False, True, False, False]
    assert torch.equal(rows(x), torch.stack([x[0, 1], x[0, 3], x[0, 0], x[1, 2], x[1, 0], x[1, 1]]))
    assert torch.equal(rows(x)[rows.valid], MaskedRows(picked, 3, gather=False)(x))  # the boolean selection
    labels = torch.tensor([[-100, 7, -100, 9], [-100, -100, 5, -100]])
    assert rows(labels).tolist() == [7, 9, -100, 5, -100, -100]


# -- text side ----------------------------------------------------------------------------------------------------
class _Fusion:
    """Stands in for ``ctx.fuse``: fixed hidden states (online ones a leaf with gradients), records input ids."""

    def __init__(self, batch: int, length: int, device: str = "cpu") -> None:
        g = torch.Generator().manual_seed(5)
        self.online = torch.randn(batch, length, HIDDEN, generator=g).to(device).requires_grad_()
        self.momentum = torch.randn(batch, length, HIDDEN, generator=g).to(device)
        self.ids: list[torch.Tensor] = []

    def __call__(self, input_ids, attention_mask, image_tokens, *, momentum=False, **kwargs):
        self.ids.append(input_ids)
        return SimpleNamespace(last_hidden_state=self.momentum if momentum else self.online)


def _text_batch(batch: int = 4, length: int = 12, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 30, (batch, length), generator=g)
    ids[:, 0] = VOCAB.cls_token_id
    ids[1, 7:] = VOCAB.pad_token_id
    ids[3, 4:] = VOCAB.pad_token_id
    return ids.to(device), (ids != VOCAB.pad_token_id).long().to(device)


def _text_ctx(alpha: float, fusion: _Fusion, ids: torch.Tensor, mask: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(
        input_ids=ids, attention_mask=mask, image_tokens=None, image_tokens_m=None, alpha=alpha, fuse=fusion
    )


def _run_text(xmm: XMM, alpha: float, sync_free: bool | None, seed: int = 3):
    """Loss, beyond-cap count, gradients (head dense weight, hidden states) and the fusion's input ids."""
    ids, mask = _text_batch()
    fusion = _Fusion(*ids.shape)
    xmm.zero_grad(set_to_none=True)
    xmm.sync_free = sync_free
    torch.manual_seed(seed)
    loss, beyond = xmm.text_loss_and_beyond(_text_ctx(alpha, fusion, ids, mask))
    loss.backward()
    xmm.sync_free = None
    return loss.detach(), beyond, xmm.mlm_head.transform.dense.weight.grad.clone(), fusion.online.grad, fusion.ids


def _dense_text_loss(xmm: XMM, alpha: float, seed: int = 3):
    """The previous accelerator path: heads on every position, the loss weighted by the picks (no cap)."""
    ids, mask = _text_batch()
    fusion = _Fusion(*ids.shape)
    xmm.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    protected = ~mask.bool() | (ids == VOCAB.cls_token_id)
    corrupted, labels = mask_tokens(ids, xmm.mask_probability, VOCAB.mask_token_id, VOCAB.vocab_size, protected)
    hidden = fusion(corrupted, mask, None).last_hidden_state
    logits = xmm.mlm_head(hidden.flatten(0, 1))
    teacher = None
    if xmm.distill and alpha > 0:
        with torch.no_grad():
            teacher = xmm.mlm_head_m(fusion(corrupted, mask, None, momentum=True).last_hidden_state.flatten(0, 1))
    picked = (labels != -100).flatten()
    loss = distilled_cross_entropy(logits, labels.flatten(), teacher, alpha, valid=picked)
    loss.backward()
    return loss.detach(), xmm.mlm_head.transform.dense.weight.grad.clone(), fusion.online.grad


@pytest.mark.parametrize(("distill", "alpha"), [(False, 0.0), (True, 0.0), (True, 0.4)])
def test_text_gather_equals_boolean_selection_and_the_all_positions_path(distill: bool, alpha: float) -> None:
    xmm = _xmm(text=True, distill=distill)
    gathered = _run_text(xmm, alpha, sync_free=True)
    selected = _run_text(xmm, alpha, sync_free=False)
    dense = _dense_text_loss(xmm, alpha)
    assert gathered[1].item() == selected[1].item() == 0.0  # no row beyond the cap: the exact regime
    assert xmm.text_cap(12) == 9 < 12  # the gather is smaller than the padded length
    for other in (selected, (dense[0], None, dense[1], dense[2])):
        torch.testing.assert_close(gathered[0], other[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gathered[2], other[2], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gathered[3], other[3], rtol=1e-5, atol=1e-7)
    assert gathered[3].abs().sum() > 0  # gradients reached the hidden states


def test_text_gather_runs_the_head_on_batch_times_cap_rows_and_selection_on_the_picks() -> None:
    xmm = _xmm(text=True, distill=False)
    shapes: list[tuple[int, ...]] = []
    xmm.mlm_head.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.shape)))
    _run_text(xmm, 0.0, sync_free=True)
    _run_text(xmm, 0.0, sync_free=None)  # CPU tensors: the boolean selection
    ids, mask = _text_batch()
    torch.manual_seed(3)
    _, labels = mask_tokens(ids, 0.15, 4, 30, ~mask.bool() | (ids == VOCAB.cls_token_id))
    assert shapes == [(4 * 9, 30), (int((labels != -100).sum()), 30)]


def test_text_rows_beyond_the_cap_keep_their_first_picks_uncorrupted_rest_and_match_a_hand_loss() -> None:
    xmm = _xmm(text=True, distill=True, mask_probability=0.9, max_masked_tokens=2)
    assert xmm.text_cap(12) == 2
    student: list[torch.Tensor] = []
    xmm.mlm_head.register_forward_hook(lambda module, inputs, output: student.append(output.detach()))
    loss, beyond, _, _, fused_ids = _run_text(xmm, 0.4, sync_free=True)
    selected = _run_text(xmm, 0.4, sync_free=False)
    torch.testing.assert_close(loss, selected[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(beyond, selected[1])

    ids, mask = _text_batch()
    torch.manual_seed(3)  # the same draws as inside the objective
    protected = ~mask.bool() | (ids == VOCAB.cls_token_id)
    corrupted, labels = mask_tokens(ids, 0.9, VOCAB.mask_token_id, VOCAB.vocab_size, protected)
    drawn = (labels != -100).tolist()
    kept = [[j for j in range(12) if drawn[i][j]][:2] for i in range(4)]
    dropped = [[j for j in range(12) if drawn[i][j]][2:] for i in range(4)]
    assert beyond.item() == sum(len(d) for d in dropped) > 0
    seen = fused_ids[0]
    for i in range(4):
        for j in range(12):  # picks beyond the cap reach the stream uncorrupted; kept picks as drawn
            assert seen[i, j].item() == (ids[i, j] if j in dropped[i] else corrupted[i, j]).item()
    # gather: rows i·2 + s are row i's s-th kept pick (each row here has at least 2 picks)
    assert all(len(k) == 2 for k in kept)
    fusion = _Fusion(4, 12)
    with torch.no_grad():
        teacher = xmm.mlm_head_m(fusion.momentum)
    logits = student[0].view(4, 2, 30)
    rows = [(i, s, kept[i][s]) for i in range(4) for s in range(2)]
    expected = _hand_ce(
        [logits[i, s].tolist() for i, s, _ in rows],
        [labels[i, j].item() for i, _, j in rows],
        [teacher[i, j].tolist() for i, _, j in rows],
        0.4,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# -- image side ---------------------------------------------------------------------------------------------------
class _Codes(PixelTargets):
    """Token targets: fixed code ids of 7 classes from the batch."""

    num_classes = 7

    def targets(self, batch):
        return batch["codes"]


def _patch_mask(per_row: list[int], device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    mask = torch.zeros(len(per_row), 16, dtype=torch.bool)
    for row, count in enumerate(per_row):
        mask[row, torch.randperm(16, generator=g)[:count]] = True
    return mask.to(device)


def _image_ctx(alpha: float, mask: torch.Tensor, device: str = "cpu") -> SimpleNamespace:
    g = torch.Generator().manual_seed(4)
    batch = len(mask)
    online = torch.randn(batch, 17, HIDDEN, generator=g).to(device).requires_grad_()
    momentum = torch.randn(batch, 17, HIDDEN, generator=g).to(device)
    data = {
        "codes": torch.randint(7, (batch, 16), generator=g).to(device),
        "image": torch.randn(batch, 3, 8, 8, generator=g).to(device),
    }

    def image_side(tokens, momentum=False):
        return tokens

    return SimpleNamespace(
        batch=data, patch_mask=mask, alpha=alpha, image_side=image_side,
        masked_image_tokens=online, masked_image_tokens_m=momentum,
    )  # fmt: skip


def _run_image(xmm: XMM, alpha: float, mask: torch.Tensor, sync_free: bool | None):
    ctx = _image_ctx(alpha, mask)
    xmm.zero_grad(set_to_none=True)
    xmm.sync_free = sync_free
    loss, beyond = xmm.image_loss_and_beyond(ctx)
    loss.backward()
    xmm.sync_free = None
    return loss.detach(), beyond, xmm.mim_head.weight.grad.clone(), ctx.masked_image_tokens.grad


def _dense_image_loss(xmm: XMM, alpha: float, mask: torch.Tensor):
    """The previous accelerator path: the MIM head on every patch, the loss weighted by the mask (no cap)."""
    ctx = _image_ctx(alpha, mask)
    xmm.zero_grad(set_to_none=True)
    prediction = xmm.mim_head(ctx.masked_image_tokens[:, 1:].flatten(0, 1))
    teacher = None
    if xmm.distill and alpha > 0:
        with torch.no_grad():
            teacher = xmm.mim_head_m(ctx.masked_image_tokens_m[:, 1:].flatten(0, 1))
    targets = xmm.image_targets.targets(ctx.batch).flatten(0, 1)
    loss = xmm.image_targets.loss(prediction, targets, teacher, alpha, valid=mask.flatten())
    loss.backward()
    return loss.detach(), None, xmm.mim_head.weight.grad.clone(), ctx.masked_image_tokens.grad


@pytest.mark.parametrize("targets", ["codes", "pixels"])
@pytest.mark.parametrize(("distill", "alpha"), [(False, 0.0), (True, 0.4)])
def test_image_gather_equals_boolean_selection_and_the_all_positions_path(
    targets: str, distill: bool, alpha: float
) -> None:
    xmm = _xmm(text=False, image=True, distill=distill, image_targets=_Codes() if targets == "codes" else None)
    assert xmm.patch_cap == 5 == BlockMaskGenerator(GRID).num_masking_patches
    mask = _patch_mask([5, 1, 3, 0, 4])  # within the bound, one row with nothing masked
    gathered = _run_image(xmm, alpha, mask, sync_free=True)
    selected = _run_image(xmm, alpha, mask, sync_free=False)
    dense = _dense_image_loss(xmm, alpha, mask)
    assert gathered[1].item() == selected[1].item() == 0.0
    for other in (selected, dense):
        torch.testing.assert_close(gathered[0], other[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gathered[2], other[2], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gathered[3], other[3], rtol=1e-5, atol=1e-7)
    assert gathered[3][:, 1:][~mask].abs().sum() == 0 < gathered[3][:, 1:][mask].abs().sum()


def test_image_patches_beyond_the_cap_are_not_predicted_first_ones_in_raster_order_are() -> None:
    xmm = _xmm(text=False, image=True, distill=False, image_targets=_Codes())
    mask = _patch_mask([8, 2])  # row 0: 3 beyond the data pipeline's bound of 5
    predicted: list[torch.Tensor] = []
    xmm.mim_head.register_forward_hook(lambda module, inputs, output: predicted.append(output.detach()))
    loss, beyond, _, _ = _run_image(xmm, 0.0, mask, sync_free=True)
    selected = _run_image(xmm, 0.0, mask, sync_free=False)
    torch.testing.assert_close(loss, selected[0], rtol=1e-6, atol=1e-7)
    assert beyond.item() == selected[1].item() == 3.0
    ctx = _image_ctx(0.0, mask)
    positions = [[j for j in range(16) if mask[i, j]] for i in range(2)]
    kept = [positions[0][:5], positions[1]]
    logits = predicted[0].view(2, 5, 7)
    rows = [(i, s, j) for i in range(2) for s, j in enumerate(kept[i])]
    expected = _hand_ce(
        [logits[i, s].tolist() for i, s, _ in rows], [ctx.batch["codes"][i, j].item() for i, _, j in rows], None, 0.0
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_block_masks_of_the_data_pipeline_stay_within_the_default_patch_cap() -> None:
    import random

    for side in (4, 16):
        generator = BlockMaskGenerator((side, side))
        cap = _xmm(text=False, image=True).patch_cap if side == 4 else generator.num_masking_patches
        rng = random.Random(0)
        assert max(int(generator(rng).sum()) for _ in range(50)) <= cap


# -- wiring -------------------------------------------------------------------------------------------------------
def test_forward_logs_the_counts_beyond_each_cap() -> None:
    xmm = _xmm(text=True, image=True, distill=False, image_targets=_Codes(), max_masked_tokens=1)
    ids, mask = _text_batch()
    ctx = _image_ctx(0.0, _patch_mask([7, 1, 0, 2]))
    ctx.input_ids, ctx.attention_mask, ctx.image_tokens, ctx.fuse = ids, mask, None, _Fusion(*ids.shape)
    torch.manual_seed(3)
    out = xmm(ctx)
    assert out.logs["image_beyond_cap"].item() == 2.0
    torch.manual_seed(3)
    _, labels = mask_tokens(ids, 0.15, 4, 30, ~mask.bool() | (ids == VOCAB.cls_token_id))
    picks = (labels != -100).sum(1)
    assert out.logs["text_beyond_cap"].item() == (picks - 1).clamp(min=0).sum().item() > 0
    assert set(out.logs) == {"text_loss", "text_beyond_cap", "image_loss", "image_beyond_cap"}


def test_caps_are_validated_naming_their_keys() -> None:
    with pytest.raises(ValueError, match="model.xmm.max_masked_tokens"):
        XMM(max_masked_tokens=0)
    with pytest.raises(ValueError, match=r"model.xmm.max_masked_patches \(17\) exceeds the ViT's 16 patches"):
        _xmm(text=False, image=True, max_masked_patches=17)
    assert _xmm(text=True, max_masked_tokens=40).text_cap(12) == 12  # never more than the padded length
    assert _xmm(text=True, protect_cls=False).text_cap(25) == binomial_cap(25, 0.15, TEXT_CAP_TAIL)


# -- no host reads ------------------------------------------------------------------------------------------------
def _meta_xmm(**kwargs) -> XMM:
    with torch.device("meta"):
        return _xmm(**kwargs)


def test_gather_path_needs_no_data_dependent_shape_on_meta_tensors() -> None:
    """Meta tensors have no values: any boolean indexing, nonzero or .item() fails on them, so a path that runs
    end to end there reads nothing from the device. The boolean selection fails there (the control)."""
    xmm = _meta_xmm(text=True, image=True, distill=True, image_targets=_Codes())
    xmm.sync_free = True
    with torch.device("meta"):
        ids = torch.randint(5, 30, (4, 25))
        mask = torch.ones(4, 25, dtype=torch.long)
        hidden, hidden_m = torch.randn(4, 25, HIDDEN, requires_grad=True), torch.randn(4, 25, HIDDEN)

        def fusion(*args, momentum=False, **kwargs):
            return SimpleNamespace(last_hidden_state=hidden_m if momentum else hidden)

        tokens = torch.randn(4, 17, HIDDEN, requires_grad=True)
        ctx = SimpleNamespace(
            input_ids=ids, attention_mask=mask, image_tokens=None, image_tokens_m=None, alpha=0.4, fuse=fusion,
            batch={"codes": torch.randint(7, (4, 16))}, patch_mask=torch.rand(4, 16) < 0.3,
            image_side=lambda t, momentum=False: t, masked_image_tokens=tokens,
            masked_image_tokens_m=torch.randn(4, 17, HIDDEN),
        )  # fmt: skip
        out = xmm(ctx)
        out.loss.backward()
    assert out.loss.is_meta and out.loss.shape == () and hidden.grad.shape == hidden.shape
    assert tokens.grad.shape == tokens.shape
    xmm.sync_free = False
    with pytest.raises(NotImplementedError):
        xmm(ctx)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_default_path_on_cuda_never_syncs() -> None:
    xmm = _xmm(text=True, image=True, distill=True, image_targets=_Codes()).cuda()
    ids, mask = _text_batch(device="cuda")
    ctx = _image_ctx(0.4, _patch_mask([5, 1, 3, 4], device="cuda"), device="cuda")
    ctx.input_ids, ctx.attention_mask, ctx.image_tokens, ctx.image_tokens_m = ids, mask, None, None
    ctx.fuse = _Fusion(*ids.shape, device="cuda")
    xmm(ctx).loss.backward()  # first call: lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = xmm(ctx)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss).item()
