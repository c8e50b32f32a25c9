"""Speed II code paths give the same results as the code paths they replaced (fp32, small tensors)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from vlalign.data.tokenization import VocabInfo
from vlalign.objectives.base import BuildSpec
from vlalign.objectives.itc import ITC
from vlalign.tasks.pretrain import PretrainRecipe
from vlalign.training.fault_tolerance import NONFINITE_CHECKPOINT, NonFiniteGuard, NonFiniteLossError

WIDTH, EMBED = 5, 6


def _spec() -> BuildSpec:
    return BuildSpec(WIDTH, WIDTH, VocabInfo(vocab_size=50), (2, 2), 8, momentum=True)


def _itc_ctx(batch: int, alpha: float, seed: int, image_ids: torch.Tensor | None) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        image_tokens=torch.randn(batch, 3, WIDTH, generator=g),
        text_states=torch.randn(batch, 4, WIDTH, generator=g),
        image_tokens_m=torch.randn(batch, 3, WIDTH, generator=g),
        text_states_m=torch.randn(batch, 4, WIDTH, generator=g),
        attention_mask=torch.ones(batch, 4, dtype=torch.long),
        batch={} if image_ids is None else {"image_ids": image_ids},
        alpha=alpha,
        published={},
    )


def _old_itc_loss(itc: ITC, ctx: SimpleNamespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The formulation before Speed II, written out: the transposed queues are concatenated under this step's
    momentum features into one [B + Q, D] candidate matrix per modality, then one product per direction.
    Returns the loss and the momentum features to enqueue."""
    with torch.no_grad():
        itc.temp.clamp_(0.001, 0.5)
    image = F.normalize(itc.vision_proj(ctx.image_tokens[:, 0]), dim=-1)
    text = F.normalize(itc.text_proj(ctx.text_states[:, 0]), dim=-1)
    with torch.no_grad():
        image_m = F.normalize(itc.vision_proj_m(ctx.image_tokens_m[:, 0]), dim=-1)
        text_m = F.normalize(itc.text_proj_m(ctx.text_states_m[:, 0]), dim=-1)
        image_cands = torch.cat([image_m, itc.image_queue.t()], dim=0)
        text_cands = torch.cat([text_m, itc.text_queue.t()], dim=0)
    batch, candidates = image.shape[0], image_cands.shape[0]
    if "image_ids" in ctx.batch:
        ids = torch.cat([ctx.batch["image_ids"], itc.image_id_queue])
        same = (ctx.batch["image_ids"][:, None] == ids[None, :]).float()
        hard = same / same.sum(dim=1, keepdim=True)
    else:
        hard = torch.zeros(batch, candidates)
        hard[range(batch), range(batch)] = 1.0
    losses = []
    for query, query_m, cands in ((image, image_m, text_cands), (text, text_m, image_cands)):
        logits = query @ cands.t() / itc.temp
        targets = hard
        if ctx.alpha > 0:
            with torch.no_grad():  # targets are constants: no gradient into the temperature through them
                teacher = torch.softmax(query_m @ cands.t() / itc.temp, dim=1)
            targets = ctx.alpha * teacher + (1 - ctx.alpha) * hard
        losses.append(-(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean())
    return (losses[0] + losses[1]) / 2, image_m, text_m


@pytest.mark.parametrize(("alpha", "same_image"), [(0.0, False), (0.4, False), (0.4, True)])
def test_itc_queue_logits_equal_the_concatenated_candidates_path(alpha: float, same_image: bool) -> None:
    """Losses and gradients equal the old path's over 4 steps of 3 samples into a ring of 7 (writes wrap around),
    with momentum distillation and, for retrieval fine-tuning, same-image positives from the image-id queue."""
    torch.manual_seed(0)
    new = ITC(embed_dim=EMBED, temperature=0.1, queue_size=7, distill=True, same_image_positives=same_image)
    new.build(_spec())
    old = copy.deepcopy(new)
    for step in range(4):
        ids = torch.tensor([step % 2, 5, step % 2]) if same_image else None  # a repeated image in the batch
        ctx = _itc_ctx(batch=3, alpha=alpha, seed=step, image_ids=ids)
        new_loss = new(ctx).loss
        new_loss.backward()
        old_loss, image_m, text_m = _old_itc_loss(old, ctx)
        old_loss.backward()
        torch.testing.assert_close(new_loss, old_loss, rtol=1e-5, atol=1e-6)
        for name, parameter in new.named_parameters():
            if parameter.requires_grad:
                torch.testing.assert_close(parameter.grad, dict(old.named_parameters())[name].grad, msg=name)
        new.after_optimizer_step()
        old.enqueue(image_m, text_m, ids)
        for buffer in ("image_queue", "text_queue", "queue_ptr", *(["image_id_queue"] if same_image else [])):
            assert torch.equal(getattr(new, buffer), getattr(old, buffer)), (step, buffer)
        new.zero_grad(set_to_none=True)
        old.zero_grad(set_to_none=True)
    assert int(new.queue_ptr) == 4 * 3 % 7  # wrapped around once


def test_itc_queue_buffers_keep_their_checkpoint_names_and_shapes() -> None:
    """Checkpoints written before the change load unchanged: same buffer names, shapes and [embed, queue] layout."""
    itc = ITC(embed_dim=EMBED, queue_size=7, same_image_positives=True)
    itc.build(_spec())
    shapes = {k: tuple(v.shape) for k, v in itc.state_dict().items() if "queue" in k}
    assert shapes == {
        "image_queue": (EMBED, 7),
        "text_queue": (EMBED, 7),
        "queue_ptr": (1,),
        "image_id_queue": (7,),
    }
    saved = {k: v.clone() for k, v in itc.state_dict().items()}
    saved["image_queue"] = F.normalize(torch.randn(EMBED, 7), dim=0)  # columns are features
    fresh = ITC(embed_dim=EMBED, queue_size=7, same_image_positives=True)
    fresh.build(_spec())
    fresh.load_state_dict(saved)
    logits = ITC.candidate_logits(torch.eye(EMBED)[:2], torch.zeros(3, EMBED), fresh.image_queue)
    assert torch.equal(logits[:, 3:], saved["image_queue"][:2])  # feature row d · column q = queue[d, q]


# -- non-finite steps skipped on the device ----------------------------------------------------------------------------
def _guard_step(guard: NonFiniteGuard, losses: dict[str, float], device: bool) -> None:
    tensors = {name: torch.tensor(value) for name, value in losses.items()}
    total = sum(tensors.values(), torch.tensor(0.0))
    if device:
        applied = guard.record_on_device(total, tensors, None)
        assert applied.dtype == torch.bool and applied.dim() == 0
        assert bool(applied) == math.isfinite(float(total))
    elif guard.is_finite(total, None):
        guard.finite_step()
    else:
        guard.skip(tensors)


def test_device_guard_counts_like_the_host_guard() -> None:
    """Totals, streaks, the objectives named in a streak and the stop decision agree step by step."""
    nan, inf = float("nan"), float("inf")
    steps = [
        {"itc": 1.0, "itm": 2.0},
        {"itc": nan, "itm": 2.0},
        {"itc": 1.0, "itm": 2.0},  # ends the streak
        {"itc": 1.0, "itm": inf},
        {"itc": nan, "itm": nan},
        {"itc": 3e38, "itm": 3e38},  # finite parts, infinite sum: "the weighted sum"
        {"itc": 1.0, "itm": 2.0},
    ]
    host, device = NonFiniteGuard(max_consecutive=3), NonFiniteGuard(max_consecutive=3)
    for index, losses in enumerate(steps):
        _guard_step(host, losses, device=False)
        _guard_step(device, losses, device=True)
        assert (device.total, device.consecutive, device.objectives) == (
            host.total,
            host.consecutive,
            host.objectives,
        ), index
        assert device.exceeded == host.exceeded or index == len(steps) - 1, index
        if index == 5:
            assert device.exceeded and device.objectives == {"itm": 2, "itc": 1, "the weighted sum": 1}
    assert device.exceeded and not host.exceeded  # the limit was reached at step 5: a device stop stays decided
    assert device.total == 4 and float(device.logged_total()) == 4.0
    device.total = 9  # a resumed run's count: back on the host until the next step
    assert device.total == 9 and device.consecutive == 0


def test_gated_queue_write_is_the_write_or_nothing() -> None:
    """``applied`` true: the same queues, ids and pointer as an ungated write (wrapping around); false: unchanged."""
    torch.manual_seed(0)
    itc = ITC(embed_dim=EMBED, queue_size=5, same_image_positives=True)
    itc.build(_spec())
    itc.queue_ptr.fill_(3)
    reference = copy.deepcopy(itc)
    image, text, ids = torch.randn(4, EMBED), torch.randn(4, EMBED), torch.tensor([7, 8, 9, 10])
    itc.enqueue(image, text, ids, applied=torch.tensor(False))
    for name, value in reference.state_dict().items():
        assert torch.equal(itc.state_dict()[name], value), name
    reference.enqueue(image, text, ids)
    itc.enqueue(image, text, ids, applied=torch.tensor(True))
    for name, value in reference.state_dict().items():
        assert torch.equal(itc.state_dict()[name], value), name
    assert int(itc.queue_ptr) == 2 and itc.image_id_queue.tolist() == [9, 10, -1, 7, 8]


def test_gated_ema_and_objective_hooks_change_nothing_when_not_applied() -> None:
    from vlalign.objectives.base import ema_update
    from vlalign.objectives.itm import ITM
    from vlalign.tasks.pretrain import gated_after_optimizer_step

    online, twin = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in twin.parameters()]
    ema_update([(online, twin)], 0.9, gate=torch.tensor(False))
    assert all(torch.equal(p, b) for p, b in zip(twin.parameters(), before, strict=True))
    expected = [0.9 * b + 0.1 * p.detach() for p, b in zip(online.parameters(), before, strict=True)]
    ema_update([(online, twin)], 0.9, gate=torch.tensor(True))
    for p, e in zip(twin.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e)

    itm = ITM(hard_negatives_warmup_steps=10)  # its hook counts curriculum steps in a buffer
    gated_after_optimizer_step(itm, torch.tensor(False))
    assert int(itm.negatives_step) == 0
    gated_after_optimizer_step(itm, torch.tensor(True))
    assert int(itm.negatives_step) == 1


def test_fused_adamw_fit_skips_nonfinite_steps_on_the_device(
    cli_data_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/test_nonfinite.py's run with fused AdamW: the skip is decided on the device (the host check is never
    called), and skipped steps change nothing, are counted, 3 in a row stop the run, no checkpoint is written
    during a streak."""
    import test_nonfinite as nonfinite
    from vlalign.cli.train import run_training_cli

    forward = ITC.forward

    def nan_on_chosen_steps(self: ITC, ctx: Any) -> Any:
        out = forward(self, ctx)
        if nonfinite.CURRENT_STEP[0] in nonfinite.NAN_STEPS:
            out = dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    def no_host_check(*args: Any, **kwargs: Any) -> bool:
        raise AssertionError("the non-finite check ran on the host")

    monkeypatch.setattr(ITC, "forward", nan_on_chosen_steps)
    monkeypatch.setattr(NonFiniteGuard, "is_finite", no_host_check)
    monkeypatch.setattr(PretrainRecipe, "device_gate_on_cpu", True)
    checkpoints = tmp_path / "checkpoints"
    every_step = {"dirpath": str(checkpoints), "every_n_train_steps": 1, "save_last": True, "save_top_k": -1,
                  "filename": None, "monitor": None}  # fmt: skip
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": every_step},
        {"class_path": "test_nonfinite.Snapshot"},
    ]
    nonfinite.SNAPSHOTS.clear()
    with pytest.raises(NonFiniteLossError) as stopped:
        run_training_cli(
            ["fit", "--config", str(nonfinite.TINY), *cli_data_args, "--trainer.callbacks", json.dumps(callbacks),
             "--model.max_consecutive_nonfinite", "3", "--model.stream.num_layers", "2", "--model.optim.fused",
             "true", "--trainer.max_steps", "20", "--trainer.limit_val_batches", "0"]
        )  # fmt: skip
    message = str(stopped.value)
    assert "3 consecutive training steps" in message and "itc (3 steps)" in message and "itm" not in message

    [snapshot] = nonfinite.SNAPSHOTS
    assert sorted(snapshot.after) == list(range(7))
    for step, after in snapshot.after.items():
        before = snapshot.before[step]
        assert after["pending"] == 0, step
        changed = {key: not torch.equal(after[key], before[key]) for key in ("vision", "stream", "vision_m",
                   "stream_m", "proj_m", "image_queue")}  # fmt: skip
        assert set(changed.values()) == {step not in nonfinite.NAN_STEPS}, (step, changed)
        assert after["queue_ptr"] == before["queue_ptr"] + (0 if step in nonfinite.NAN_STEPS else 8), step
    assert snapshot.logged == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 3, 6: 4}

    forensic = torch.load(checkpoints / NONFINITE_CHECKPOINT, map_location="cpu", weights_only=True)
    assert forensic["global_step"] == 7 and forensic["vlalign_nonfinite_steps"] == 4
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4  # after step 3, the last finite step: saves during both streaks were refused
    saved_steps = sorted(int(p.stem.split("step=")[1]) for p in checkpoints.glob("epoch=*.ckpt"))
    assert saved_steps == [1, 2, 4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_gated_cuda_steps_never_sync() -> None:
    """The device-side guard's steps (fused AdamW with ``found_inf``, gated EMA and queue writes, device counters,
    the stop check) run under ``set_sync_debug_mode("error")``, as in a fused-AdamW fit on a GPU."""
    from vlalign.tasks.optim import OptimConfig, build_optimizer
    from vlalign.testing import tiny_batch, tiny_recipe

    device = torch.device("cuda")
    recipe = tiny_recipe("simla", queue_size=64, optim=OptimConfig(warmup_steps=0)).to(device).train()
    optimizer = build_optimizer(recipe, OptimConfig(fused=True, warmup_steps=0), total_steps=10)["optimizer"]
    recipe._device_gate, recipe._gated_optimizer = True, optimizer  # what _use_device_gate decides in such a fit
    batch = tiny_batch(batch_size=6, device=device)

    def step() -> None:
        loss = recipe.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recipe.after_real_optimizer_step(recipe._step_applied)
        assert not recipe._nonfinite.exceeded

    step()  # warm-up: lazy initialisation (pinned buffers, the counters' first copy to the device) may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert recipe._nonfinite.total == 0 and int(recipe.itc.queue_ptr) == 4 * 6 % 64


@pytest.mark.parametrize("kind", ["simla", "albef"])
def test_shared_word_embedding_lookup_keeps_losses_and_gradients(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One word-embedding lookup of the batch's ids per step (text encoder, image side, ITM pairs read it) gives
    the losses and gradients of one lookup per pass, and the online lookups drop to one per distinct id tensor."""
    from vlalign.models.stream import SingleStreamTransformer
    from vlalign.testing import tiny_batch, tiny_recipe

    def step(recipe: PretrainRecipe) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
        lookups = []
        embedding = recipe.backbone.stream.embeddings.word_embeddings
        handle = embedding.register_forward_hook(lambda *args: lookups.append(torch.is_grad_enabled()))
        torch.manual_seed(3)  # the same dropout masks in both runs
        recipe.train()
        losses = {}
        original_log = recipe.log
        recipe.log = lambda name, value, **kwargs: losses.__setitem__(name, torch.as_tensor(value).detach().clone())
        try:
            recipe.training_step(tiny_batch(seed=5), 0).backward()
        finally:
            recipe.log = original_log
            handle.remove()
        grads = {name: p.grad.clone() for name, p in recipe.named_parameters() if p.grad is not None}
        return losses, grads, sum(lookups)

    shared_losses, shared_grads, shared_lookups = step(tiny_recipe(kind, seed=1))

    def lookup_per_pass(self: SingleStreamTransformer, input_ids: torch.Tensor, word_embeds: Any = None) -> Any:
        return self.embeddings(self.embeddings.word_embeddings(input_ids))  # the previous embed_ids

    monkeypatch.setattr(SingleStreamTransformer, "embed_ids", lookup_per_pass)
    old_losses, old_grads, old_lookups = step(tiny_recipe(kind, seed=1))
    assert {k for k in shared_losses if k.endswith("_loss")} == {k for k in old_losses if k.endswith("_loss")}
    for key in old_losses:
        if key.endswith("_loss"):
            torch.testing.assert_close(shared_losses[key], old_losses[key], rtol=1e-5, atol=1e-6, msg=key)
    assert shared_grads.keys() == old_grads.keys()
    for name, grad in old_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # simla: text encoder + ITM pairs + image side share one lookup, MLM's corrupted ids have their own; before, one
    # per pass (4 in simla, 2 in albef), plus the context's lookup the patched passes leave unread
    expected = {"simla": (2, 5), "albef": (2, 3)}[kind]
    assert (shared_lookups, old_lookups) == expected
