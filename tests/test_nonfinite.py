"""Non-finite losses: such steps are skipped (no update, no EMA, no queue write), counted, and a run of them stops."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from vlalign.cli.train import run_training_cli
from vlalign.objectives.itc import ITC
from vlalign.training.fault_tolerance import NONFINITE_CHECKPOINT, NonFiniteGuard, NonFiniteLossError

TINY = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml"
NAN_STEPS = {2, 4, 5, 6}  # global steps whose ITC loss is made NaN; 4, 5, 6 hit the limit of 3 in a row
SNAPSHOTS: list[Snapshot] = []


CURRENT_STEP = [0]  # the global step of the batch in progress, set by Snapshot


class Snapshot(Callback):
    """Training state before and after every step, and the logged skip count."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, Any]] = {}
        self.after: dict[int, dict[str, Any]] = {}
        self.logged: dict[int, float] = {}
        SNAPSHOTS.append(self)

    @staticmethod
    def state(module: Any) -> dict[str, Any]:
        return {
            "vision": module.backbone.vision.vit.blocks[0].attn.qkv.weight.detach().clone(),
            "stream": next(module.backbone.stream.parameters()).detach().clone(),
            "vision_m": module.backbone.vision_m.vit.blocks[0].attn.qkv.weight.detach().clone(),
            "stream_m": next(module.backbone.stream_m.parameters()).detach().clone(),
            "proj_m": module.itc.vision_proj_m.weight.detach().clone(),
            "image_queue": module.itc.image_queue.clone(),
            "queue_ptr": int(module.itc.queue_ptr),
            "pending": len(module.itc._pending),
        }

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        CURRENT_STEP[0] = trainer.global_step
        self.before[trainer.global_step] = self.state(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step - 1  # the optimizer step counter advances on skipped steps too
        self.after[step] = self.state(pl_module)
        self.logged[step] = float(trainer.callback_metrics["train/nonfinite_steps"])


def test_nonfinite_steps_are_skipped_counted_and_a_run_of_them_stops_training(
    cli_data_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forward = ITC.forward

    def nan_on_chosen_steps(self: ITC, ctx: Any) -> Any:
        out = forward(self, ctx)
        if CURRENT_STEP[0] in NAN_STEPS:
            out = dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(ITC, "forward", nan_on_chosen_steps)
    checkpoints = tmp_path / "checkpoints"
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(checkpoints)}},
        {"class_path": "test_nonfinite.Snapshot"},
    ]
    SNAPSHOTS.clear()
    with pytest.raises(NonFiniteLossError) as stopped:
        run_training_cli(
            ["fit", "--config", str(TINY), *cli_data_args, "--trainer.callbacks", json.dumps(callbacks),
             "--model.max_consecutive_nonfinite", "3", "--model.stream.num_layers", "2",
             "--trainer.max_steps", "20", "--trainer.limit_val_batches", "0"]
        )  # fmt: skip
    message = str(stopped.value)
    assert "3 consecutive training steps" in message and "itc (3 steps)" in message and "itm" not in message
    assert NONFINITE_CHECKPOINT in message

    [snapshot] = SNAPSHOTS
    assert sorted(snapshot.after) == list(range(7))  # stopped at the end of step 6
    for step, after in snapshot.after.items():
        before = snapshot.before[step]
        assert after["pending"] == 0, step
        if step in NAN_STEPS:  # no optimizer update, no EMA update, no queue write
            for key in ("vision", "stream", "vision_m", "stream_m", "proj_m", "image_queue"):
                assert torch.equal(after[key], before[key]), (step, key)
            assert after["queue_ptr"] == before["queue_ptr"], step
        else:
            for key in ("vision", "stream", "vision_m", "stream_m", "proj_m", "image_queue"):
                assert not torch.equal(after[key], before[key]), (step, key)
            assert after["queue_ptr"] == before["queue_ptr"] + 8, step
    assert snapshot.logged == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 3, 6: 4}

    saved = torch.load(checkpoints / NONFINITE_CHECKPOINT, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 7 and saved["vlalign_nonfinite_steps"] == 4
    assert torch.equal(saved["state_dict"]["itc.queue_ptr"], torch.tensor([3 * 8]))


BLOW_UP_STEP = 4  # the ITM head's gradient is made infinite before this step's optimizer update
BLOW_UPS: list[BlowUp] = []


class BlowUp(Callback):
    """Makes one optimizer update explode, as a too-high learning rate does: the loss of step ``BLOW_UP_STEP`` is
    finite, but its update writes NaN into the ITM head (AdamW of an infinite gradient), so later losses are NaN.
    Keeps the full model state from before that update."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        BLOW_UPS.append(self)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == BLOW_UP_STEP:
            self.before = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_step == BLOW_UP_STEP:
            pl_module.itm.itm_head.weight.grad.fill_(float("inf"))


def _all_finite(checkpoint: dict[str, Any]) -> bool:
    tensors = [v for v in checkpoint["state_dict"].values() if v.is_floating_point()]
    for optimizer in checkpoint["optimizer_states"]:
        tensors += [v for state in optimizer["state"].values() for v in state.values() if v.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_the_nonfinite_stop_keeps_the_last_good_checkpoint_and_names_it(
    cli_data_args: list[str], tmp_path: Path
) -> None:
    """Checkpoints every step; the weights blow up at step 4 and losses are NaN from step 5, so the run stops after
    step 7. ``last.ckpt`` (and every other file but the forensic one) must hold the state before the blow-up."""
    from vlalign.training.fault_tolerance import _host_tag
    from vlalign.weights.safe_loading import check_resume_checkpoint

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    stale = checkpoints / f".last.ckpt.atomic-{_host_tag()}-999999999-deadbeef.tmp"  # a killed save's leftover
    stale.write_bytes(b"PK\x03\x04 half a checkpoint")
    every_step = {"dirpath": str(checkpoints), "every_n_train_steps": 1, "save_last": True, "save_top_k": 1,
                  "monitor": None, "filename": None}  # fmt: skip
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": every_step},
        {"class_path": "test_nonfinite.BlowUp"},
    ]
    BLOW_UPS.clear()
    with pytest.raises(NonFiniteLossError) as stopped:
        run_training_cli(
            ["fit", "--config", str(TINY), *cli_data_args, "--trainer.callbacks", json.dumps(callbacks),
             "--model.max_consecutive_nonfinite", "3", "--model.stream.num_layers", "2",
             "--trainer.max_steps", "20", "--trainer.limit_val_batches", "0"]
        )  # fmt: skip
    message = str(stopped.value)
    last = checkpoints / "last.ckpt"
    assert "itm (3 steps)" in message and "Stopped at global step 8" in message
    assert (
        f"The last good checkpoint (finite loss, finite weights and optimizer state, outside a non-finite streak) "
        f"is {last} (global step {BLOW_UP_STEP}): resume from it with --ckpt_path {last}" in message
    )
    assert f"{checkpoints / NONFINITE_CHECKPOINT}" in message

    [blow_up] = BLOW_UPS
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == BLOW_UP_STEP and _all_finite(saved)
    assert saved["state_dict"].keys() == blow_up.before.keys()
    for key, value in blow_up.before.items():  # exactly the state before the exploding update
        assert torch.equal(saved["state_dict"][key], value), key
    check_resume_checkpoint(last)

    files = {p.name for p in checkpoints.iterdir()}
    assert files == {"last.ckpt", f"epoch=0-step={BLOW_UP_STEP}.ckpt", NONFINITE_CHECKPOINT}, files
    for name in files - {NONFINITE_CHECKPOINT}:
        kept = torch.load(checkpoints / name, map_location="cpu", weights_only=True)
        assert kept["global_step"] == BLOW_UP_STEP and _all_finite(kept), name
    forensic = torch.load(checkpoints / NONFINITE_CHECKPOINT, map_location="cpu", weights_only=True)
    assert forensic["global_step"] == 8 and torch.isnan(forensic["state_dict"]["itm.itm_head.weight"]).all()


def test_rollback_drops_only_the_skipped_micro_batch_features() -> None:
    """Under gradient accumulation the finite micro-batches' features stay queued for the optimizer step."""
    itc = ITC(queue_size=8)
    itc.begin_step()
    itc._pending.append((torch.zeros(1), torch.zeros(1)))
    itc.begin_step()
    itc._pending.append((torch.ones(1), torch.ones(1)))
    itc.rollback_step()
    assert len(itc._pending) == 1 and torch.equal(itc._pending[0][0], torch.zeros(1))


def test_the_guard_counts_skips_and_names_the_non_finite_objectives() -> None:
    guard = NonFiniteGuard(max_consecutive=2)
    guard.finite_step()
    guard.skip({"itc": torch.tensor(float("inf"))})
    assert guard.total == 1 and not guard.exceeded
    guard.skip({"itc": torch.tensor(1.0)})  # finite parts, non-finite sum (or another rank's NaN)
    assert guard.exceeded and guard.objectives == {"itc": 1, "the weighted sum": 1}
    with pytest.raises(ValueError, match="max_consecutive_nonfinite"):
        NonFiniteGuard(0)
