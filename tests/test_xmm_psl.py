"""XMM (both sides) and PSL against independent hand computations on small tensors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vlalign.data.tokenization import VocabInfo
from vlalign.models.stream import SingleStreamTransformer, StreamConfig
from vlalign.objectives.base import BuildSpec
from vlalign.objectives.functional import keyword_loss, keyword_targets, mask_tokens
from vlalign.objectives.image_targets import PixelTargets
from vlalign.objectives.xmm import XMM

VOCAB = VocabInfo(vocab_size=30, pad_token_id=0, unk_token_id=1, cls_token_id=2, sep_token_id=3, mask_token_id=4)
HIDDEN = 8


def _softmax(xs):
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    return [e / sum(exps) for e in exps]


def _log_softmax(xs):
    top = max(xs)
    log_total = math.log(sum(math.exp(x - top) for x in xs)) + top
    return [x - log_total for x in xs]


def _hand_distilled_ce(logits, labels, teacher, alpha):
    hard = soft = 0.0
    for row, label in enumerate(labels):
        log_p = _log_softmax(logits[row])
        hard -= log_p[label]
        if teacher is not None:
            q = _softmax(teacher[row])
            soft -= sum(qv * lp for qv, lp in zip(q, log_p, strict=True))
    n = len(labels)
    return (1 - alpha) * hard / n + alpha * soft / n if teacher is not None else hard / n


# -- masking -----------------------------------------------------------------------------------------------------
def test_mask_tokens_respects_protection_and_80_10_10() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 30, (400, 50), generator=g)
    protected = torch.zeros_like(ids, dtype=torch.bool)
    protected[:, 0] = True  # [CLS]
    protected[:, 40:] = True  # padding
    corrupted, labels = mask_tokens(ids, 0.15, VOCAB.mask_token_id, VOCAB.vocab_size, protected, generator=g)
    picked = labels != -100
    assert not picked[protected].any()
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(corrupted[~picked], ids[~picked])
    assert picked[~protected].float().mean().item() == pytest.approx(0.15, abs=0.01)
    to_mask = (corrupted[picked] == VOCAB.mask_token_id).float().mean().item()
    kept = (corrupted[picked] == ids[picked]).float().mean().item()
    assert to_mask == pytest.approx(0.8, abs=0.03)
    assert kept == pytest.approx(0.1 + 0.1 / 30, abs=0.03)  # 10% kept + random draws that hit the same id


# -- text side ---------------------------------------------------------------------------------------------------
def _stream() -> SingleStreamTransformer:
    return SingleStreamTransformer(
        StreamConfig(
            vocab_size=30, hidden_size=HIDDEN, num_layers=1, num_heads=2, intermediate_size=16, encoder_width=HIDDEN
        )
    )


def _xmm(text: bool, image: bool, distill: bool, targets=None) -> XMM:
    stream, stream_m = _stream(), _stream()
    # the hand-built 2x2 masks below mask 2 patches of a row; the data pipeline's bound for 2x2 would be 1
    xmm = XMM(text=text, image=image, distill=distill, image_targets=targets, max_masked_patches=4)
    spec = BuildSpec(HIDDEN, HIDDEN, VOCAB, (2, 2), 4, momentum=distill, stream=stream, stream_m=stream_m)
    xmm.build(spec)
    return xmm


class _FakeFusion:
    def __init__(self) -> None:
        self.outputs: dict[bool, torch.Tensor] = {}
        self.ids: list[torch.Tensor] = []

    def __call__(self, input_ids, attention_mask, image_tokens, *, momentum=False, **kwargs):
        self.ids.append(input_ids)
        out = torch.randn(*input_ids.shape, HIDDEN)
        self.outputs[momentum] = out
        return SimpleNamespace(last_hidden_state=out)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_text_side_matches_hand_computation(alpha: float) -> None:
    xmm = _xmm(text=True, image=False, distill=True)
    ids = torch.randint(5, 30, (3, 12))
    ids[:, 0] = VOCAB.cls_token_id
    ids[2, 8:] = VOCAB.pad_token_id
    fusion = _FakeFusion()
    ctx = SimpleNamespace(
        input_ids=ids, attention_mask=(ids != 0).long(), image_tokens=torch.randn(3, 5, HIDDEN),
        image_tokens_m=torch.randn(3, 5, HIDDEN), alpha=alpha, fuse=fusion,
    )  # fmt: skip
    torch.manual_seed(0)
    loss = xmm.text_loss(ctx)

    with torch.no_grad():
        all_logits = xmm.mlm_head(fusion.outputs[False])
        all_teacher = xmm.mlm_head_m(fusion.outputs[True]) if alpha > 0 else None
    # the same seed re-draws the same masking: the picked positions and their labels
    torch.manual_seed(0)
    protected = ~(ids != 0) | (ids == VOCAB.cls_token_id)
    _, labels = mask_tokens(ids, 0.15, VOCAB.mask_token_id, VOCAB.vocab_size, protected)
    picked = labels != -100
    assert picked.any() and not picked[:, 0].any() and not picked[2, 8:].any()
    logits = all_logits[picked].tolist()
    teacher = all_teacher[picked].tolist() if all_teacher is not None else None
    expected = _hand_distilled_ce(logits, labels[picked].tolist(), teacher, alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_text_side_distillation_is_over_the_vocabulary_axis() -> None:
    """The soft term must sum over the vocabulary: permuting sequence positions leaves it unchanged."""
    from vlalign.objectives.functional import distilled_cross_entropy

    g = torch.Generator().manual_seed(3)
    logits, teacher = torch.randn(4, 30, generator=g), torch.randn(4, 30, generator=g)
    labels = torch.randint(30, (4,), generator=g)
    perm = torch.tensor([2, 0, 3, 1])
    a = distilled_cross_entropy(logits, labels, teacher, 0.4)
    b = distilled_cross_entropy(logits[perm], labels[perm], teacher[perm], 0.4)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    expected = _hand_distilled_ce(logits.tolist(), labels.tolist(), teacher.tolist(), 0.4)
    assert a.item() == pytest.approx(expected, rel=1e-5)


# -- image side --------------------------------------------------------------------------------------------------
def test_pixel_targets_are_standardised_raster_patches() -> None:
    targets = PixelTargets()
    targets.setup(patch_size=2, grid=(2, 3))
    images = torch.randn(2, 3, 4, 6)
    out = targets.targets({"image": images})
    assert out.shape == (2, 6, 12)
    for b in range(2):
        for row in range(2):
            for col in range(3):
                patch = images[b, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2].reshape(-1)  # channel-major
                values = patch.tolist()
                mean = sum(values) / len(values)
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values) + 1e-6)
                expected = torch.tensor([(v - mean) / std for v in values])
                torch.testing.assert_close(out[b, row * 3 + col], expected, atol=1e-5, rtol=1e-5)


class _ConstantTokenTargets(PixelTargets):
    """Token targets for the test: fixed code ids, 7 classes."""

    num_classes = 7

    def targets(self, batch):
        return batch["codes"]


def _image_ctx(xmm: XMM, alpha: float, batch: dict) -> SimpleNamespace:
    stream, stream_m = _stream(), _stream()
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    ids, text_mask = torch.tensor([[2, 7, 9], [2, 5, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])

    def image_side(tokens: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        encoder = stream_m if momentum else stream
        return encoder.encode_image_side(tokens, encoder.embed_ids(ids), text_mask).last_hidden_state

    return SimpleNamespace(
        batch=batch, patch_mask=mask, input_ids=ids, attention_mask=text_mask, image_side=image_side,
        masked_image_tokens=torch.randn(2, 5, HIDDEN), masked_image_tokens_m=torch.randn(2, 5, HIDDEN), alpha=alpha,
        streams=(stream, stream_m),
    )  # fmt: skip


def _hand_mse(pred: list[list[float]], target: list[list[float]]) -> float:
    squares = [(p - t) ** 2 for pr, tr in zip(pred, target, strict=True) for p, t in zip(pr, tr, strict=True)]
    return sum(squares) / len(squares)


def _capture_head(head):
    captured = {}

    def hook(module, inputs, output):
        captured["out"] = output.detach()

    head.register_forward_hook(hook)
    return captured


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_image_side_token_targets_match_hand_computation(alpha: float) -> None:
    xmm = _xmm(text=False, image=True, distill=True, targets=_ConstantTokenTargets())
    codes = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 1]])
    ctx = _image_ctx(xmm, alpha, {"codes": codes})
    student, teacher = _capture_head(xmm.mim_head), _capture_head(xmm.mim_head_m)
    loss = xmm.image_loss(ctx)
    assert student["out"].shape == (3, 7)  # only the 3 masked patches are predicted
    labels = codes[ctx.patch_mask].tolist()
    assert labels == [1, 3, 1]
    t = teacher["out"].tolist() if alpha > 0 else None
    expected = _hand_distilled_ce(student["out"].tolist(), labels, t, alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_image_side_pixel_targets_match_hand_computation(alpha: float) -> None:
    targets = PixelTargets()
    xmm = _xmm(text=False, image=True, distill=True, targets=targets)
    images = torch.randn(2, 3, 8, 8)  # grid 2x2 of 4-pixel patches → 48 values per patch
    ctx = _image_ctx(xmm, alpha, {"image": images})
    student, teacher = _capture_head(xmm.mim_head), _capture_head(xmm.mim_head_m)
    loss = xmm.image_loss(ctx)
    pred = student["out"].tolist()
    target = targets.targets({"image": images})[ctx.patch_mask].tolist()
    expected = _hand_mse(pred, target)
    if alpha > 0:
        expected = (1 - alpha) * expected + alpha * _hand_mse(pred, teacher["out"].tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_xmm_rejects_both_sides_disabled() -> None:
    with pytest.raises(ValueError, match="model.xmm: null"):
        XMM(text=False, image=False)


# -- PSL ---------------------------------------------------------------------------------------------------------
def _cls_attention(rows: list[list[list[float]]]) -> torch.Tensor:
    return torch.tensor(rows)


def test_keyword_targets_on_hand_built_attention() -> None:
    # one caption, 3 heads, 6 positions: [CLS] 10 11 12 13 [PAD]
    ids = torch.tensor([[2, 10, 11, 12, 13, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    attn = _cls_attention([[
        [0.5, 0.2, 0.1, 0.1, 0.1, 0.0],   # head 0, picks 2: CLS, pos1
        [0.1, 0.1, 0.6, 0.1, 0.1, 0.0],   # head 1: pos2, then a 4-way tie at 0.1 → lowest index pos0
        [0.0, 0.0, 0.3, 0.3, 0.4, 0.0],   # head 2: pos4, then tie pos2/pos3 → pos2
    ]])  # fmt: skip
    targets = keyword_targets(attn, ids, mask, 20, VOCAB.special_ids, picks_per_head=2, num_keywords=2)
    # votes: pos0=2, pos1=1, pos2=2, pos4=1 → top-2 with ties to lower index: pos0, pos2 → ids 2 (CLS, removed), 11
    assert targets.nonzero().tolist() == [[0, 11]]
    targets3 = keyword_targets(attn, ids, mask, 20, VOCAB.special_ids, picks_per_head=2, num_keywords=3)
    assert targets3.nonzero().tolist() == [[0, 10], [0, 11]]  # pos1 (1 vote) wins the tie with pos4


def test_keyword_targets_short_caption_never_yields_padding_or_specials() -> None:
    ids = torch.tensor([[2, 15, 0, 0, 0], [2, 3, 4, 16, 0]])  # second caption holds [SEP] and [MASK]
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    attn = torch.rand(2, 4, 5)
    targets = keyword_targets(attn, ids, mask, 20, VOCAB.special_ids, picks_per_head=4, num_keywords=5)
    assert targets[0].nonzero().flatten().tolist() == [15]
    assert targets[1].nonzero().flatten().tolist() == [16]
    assert targets[:, list(VOCAB.special_ids)].sum() == 0


def test_keyword_targets_repeated_token_stays_positive() -> None:
    ids = torch.tensor([[2, 9, 9, 7]])
    mask = torch.ones(1, 4, dtype=torch.long)
    attn = torch.tensor([[[0.1, 0.5, 0.3, 0.1]]])
    targets = keyword_targets(attn, ids, mask, 12, VOCAB.special_ids, picks_per_head=2, num_keywords=2)
    assert targets.nonzero().tolist() == [[0, 9]]


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_keyword_loss_matches_hand_bce(alpha: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, generator=g)
    hard = torch.tensor([[0, 1, 0, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.float)
    soft = torch.rand(2, 5, generator=g)

    def bce(x, y):
        p = 1 / (1 + math.exp(-x))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    flat = list(zip(logits.flatten().tolist(), hard.flatten().tolist(), soft.flatten().tolist(), strict=True))
    hard_term = sum(bce(x, y) for x, y, _ in flat) / len(flat)
    soft_term = sum(bce(x, s) for x, _, s in flat) / len(flat)
    expected = (1 - alpha) * hard_term + alpha * soft_term
    assert keyword_loss(logits, hard, soft, alpha).item() == pytest.approx(expected, rel=1e-6)
