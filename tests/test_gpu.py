"""Fast-step checks: no host-device sync in a SIMLA step (GPU), and the CPU-side wiring of the fast paths.

The GPU tests are marked ``gpu`` and skipped without CUDA; the rest run on the CPU and never compile anything.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from vlalign.models.stream import StreamConfig
from vlalign.models.vision import VisionConfig
from vlalign.objectives.image_targets import PixelTargets
from vlalign.objectives.itc import ITC
from vlalign.objectives.itm import ITM
from vlalign.objectives.psl import PSL
from vlalign.objectives.xmm import XMM
from vlalign.tasks.context import StepContext
from vlalign.tasks.optim import OptimConfig, build_optimizer
from vlalign.tasks.pretrain import PretrainRecipe
from vlalign.tokenization import VocabInfo

VOCAB = VocabInfo(vocab_size=60, pad_token_id=0, unk_token_id=1, cls_token_id=2, sep_token_id=3, mask_token_id=4)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_simla(dropout: float = 0.1, **kwargs) -> PretrainRecipe:
    torch.manual_seed(0)
    return PretrainRecipe(
        vision=VisionConfig(name="vit_vlalign_tiny_patch8", img_size=32),
        stream=StreamConfig(
            hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, encoder_width=64,
            max_position_embeddings=24, hidden_dropout=dropout, attention_dropout=dropout,
        ),
        vocab=VOCAB,
        itc=ITC(embed_dim=16, queue_size=64),
        itm=ITM(),
        xmm=XMM(image_targets=PixelTargets()),
        psl=PSL(),
        optim=OptimConfig(warmup_steps=0),
        **kwargs,
    )  # fmt: skip


def tiny_batch(device: torch.device | str = "cpu", batch: int = 6, length: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB.vocab_size, (batch, length), generator=g)
    ids[:, 0] = VOCAB.cls_token_id
    lengths = torch.randint(4, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    patch_mask = torch.rand(batch, 4, 4, generator=g) < 0.3
    patch_mask[:, 0, 0] = True
    out = {
        "image": torch.randn(batch, 3, 32, 32, generator=g),
        "input_ids": ids.masked_fill(mask == 0, 0),
        "attention_mask": mask,
        "patch_mask": patch_mask,
    }
    return {key: value.to(device) for key, value in out.items()}


# -- GPU ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_simla_training_step_never_syncs_with_the_host(precision: str) -> None:
    """Forward, backward, fused AdamW, EMA and queue update under ``set_sync_debug_mode("error")``.

    Exempt: ``NonFiniteGuard.is_finite`` (robustness), which reads the loss's finiteness on the host by design.
    """
    device = torch.device("cuda")
    recipe = tiny_simla().to(device).train()
    optimizer = build_optimizer(recipe, OptimConfig(fused=True, warmup_steps=0), total_steps=10)["optimizer"]
    batch = tiny_batch(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> torch.Tensor:
        with autocast:
            loss = recipe.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recipe.after_real_optimizer_step()
        return loss.detach()

    guard = getattr(recipe, "_nonfinite", None)
    if guard is not None:  # the one deliberate sync: the non-finite-loss guard reads one flag per step
        exempt = guard.is_finite

        def is_finite(*args, **kwargs):
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("default")
            try:
                return exempt(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(previous)

        guard.is_finite = is_finite
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer warns and returns
        step()  # first step: lazy initialisation (cuBLAS handles, optimizer state) may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            losses = [step() for _ in range(2)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss) for loss in losses)


# -- CPU ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["text", "image"])
def test_sync_free_xmm_loss_equals_gathered_loss(side: str) -> None:
    """The GPU path (heads on all positions, weighted mean) and the gather path give the same loss and gradients."""
    recipe = tiny_simla(dropout=0.0).train()
    batch = tiny_batch()
    results = []
    for sync_free in (False, True):
        recipe.zero_grad(set_to_none=True)
        recipe.xmm.sync_free = sync_free
        ctx = StepContext(recipe, batch, alpha=0.4)
        torch.manual_seed(5)  # the same token masking in both runs
        loss = recipe.xmm.text_loss(ctx) if side == "text" else recipe.xmm.image_loss(ctx)
        loss.backward()
        head = recipe.xmm.mlm_head.transform.dense if side == "text" else recipe.xmm.mim_head
        results.append((loss.detach(), head.weight.grad.clone()))
    recipe.xmm.sync_free = None
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


def test_compile_encoders_is_off_by_default_and_compiles_lazily() -> None:
    """``configure_model`` wraps the encoders' forwards only when asked; nothing is compiled until a forward runs."""
    plain = tiny_simla()
    plain.configure_model()
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in (plain.vision, plain.stream))
    compiled = tiny_simla(compile_encoders=True)
    keys = set(compiled.state_dict())
    compiled.configure_model()
    compiled.configure_model()  # idempotent
    for module in (compiled.vision, compiled.stream, compiled.vision_m, compiled.stream_m):
        assert module._compiled_call_impl is not None
    assert set(compiled.state_dict()) == keys  # checkpoints are unchanged by compiling
