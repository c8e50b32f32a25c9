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
from torch import nn

from vlalign.callbacks import NONFINITE_CHECKPOINT, NonFiniteGuard, NonFiniteLossError
from vlalign.cli.train import run_training_cli
from vlalign.objectives.itc import ITC

TINY = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml"
NAN_STEPS = {2, 4, 5, 6}  # global steps whose ITC loss is made NaN; 4, 5, 6 hit the limit of 3 in a row
SNAPSHOTS: list[Snapshot] = []


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
            "vision": module.vision.vit.blocks[0].attn.qkv.weight.detach().clone(),
            "stream": next(module.stream.parameters()).detach().clone(),
            "vision_m": module.vision_m.vit.blocks[0].attn.qkv.weight.detach().clone(),
            "stream_m": next(module.stream_m.parameters()).detach().clone(),
            "proj_m": module.itc.vision_proj_m.weight.detach().clone(),
            "image_queue": module.itc.image_queue.clone(),
            "queue_ptr": int(module.itc.queue_ptr),
            "pending": len(module.itc._pending),
        }

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
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
        if ctx.recipe.global_step in NAN_STEPS:
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


class _Queued(nn.Module):
    """Stand-in objective with ITC's pending-feature list."""

    name = "itc"

    def __init__(self) -> None:
        super().__init__()
        self._pending: list[int] = []


def test_skip_drops_only_the_skipped_micro_batch_features() -> None:
    """Under gradient accumulation the finite micro-batches' features stay queued for the optimizer step."""
    guard = NonFiniteGuard(max_consecutive=2)
    objective = _Queued()
    guard.begin_step([objective])
    objective._pending.append(1)
    guard.finite_step()
    guard.begin_step([objective])
    objective._pending.append(2)
    guard.skip({"itc": torch.tensor(float("inf"))}, [objective])
    assert objective._pending == [1] and guard.total == 1 and not guard.exceeded
    guard.begin_step([objective])
    guard.skip({"itc": torch.tensor(1.0)}, [objective])  # finite parts, non-finite sum (or another rank's NaN)
    assert guard.exceeded and guard.objectives == {"itc": 1, "the weighted sum": 1}
    with pytest.raises(ValueError, match="max_consecutive_nonfinite"):
        NonFiniteGuard(0)
