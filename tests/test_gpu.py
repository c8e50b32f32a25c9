"""Fast-step checks: no host-device sync in a SIMLA step (GPU), and the CPU-side wiring of the fast paths.

The GPU tests are marked ``gpu`` and skipped without CUDA; the rest run on the CPU and never compile anything.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from vlalign.objectives.context import StepContext
from vlalign.tasks.optim import OptimConfig, build_optimizer
from vlalign.tasks.pretrain import PretrainRecipe
from vlalign.testing import tiny_batch, tiny_recipe, train_step

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_simla(dropout: float = 0.1, **kwargs) -> PretrainRecipe:
    dropouts = {"hidden_dropout": dropout, "attention_dropout": dropout}
    return tiny_recipe("simla", queue_size=64, stream=dropouts, optim=OptimConfig(warmup_steps=0), **kwargs)


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
    batch = tiny_batch(batch_size=6, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> torch.Tensor:
        with autocast:
            return train_step(recipe, batch, optimizer)

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
    batch = tiny_batch(batch_size=6)
    results = []
    for sync_free in (False, True):
        recipe.zero_grad(set_to_none=True)
        recipe.xmm.sync_free = sync_free
        ctx = StepContext(recipe.backbone, batch, alpha=0.4, masked_images=recipe.needs_masked_images)
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
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in (plain.backbone.vision, plain.backbone.stream))
    compiled = tiny_simla(compile_encoders="whole")  # true compiles the blocks (tests/test_compile_blocks.py)
    keys = set(compiled.state_dict())
    compiled.configure_model()
    compiled.configure_model()  # idempotent
    backbone = compiled.backbone
    for module in (backbone.vision, backbone.stream, backbone.vision_m, backbone.stream_m):
        assert module._compiled_call_impl is not None
    assert set(compiled.state_dict()) == keys  # checkpoints are unchanged by compiling
