"""Mid-epoch resume with several data workers, after the first epoch: the run continues exactly where it stopped.

Real ``vlalign fit`` processes on the tiny config, 2 data workers, exact epochs of 10 batches (80 synthetic samples in
2 shards, batch 8) and ``max_epochs 2``, so a resume that replays the epoch's first batches also runs too many steps.
An in-process test checks the data state a checkpoint records at each place checkpoints are taken.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch

from test_resume import every_step_checkpoint, finish, fit_args, read_records, recorder, start
from vlalign.datamodules.webdataset import ShardDataModule

STEPS_PER_EPOCH = 10
EPOCHS = 2
KILL_AT_STEP = 13  # 3 batches into the second epoch; the last checkpoint holds step 12 (2 batches into it)


def test_two_worker_resume_in_the_second_epoch_continues_with_the_same_batches(
    cli_data_args: list[str], tmp_path: Path
) -> None:
    """Uninterrupted run vs. a run SIGKILLed in epoch 1 and resumed with ``--ckpt_path <dir>/last.ckpt``: the same
    sample keys at every step, each sample once per epoch, and the same final step count (no replayed batches)."""

    def args(name: str, kill_at_step: int = -1, *extra: str) -> list[str]:
        callbacks = [
            every_step_checkpoint(tmp_path / f"{name}_ckpt"),
            recorder(tmp_path / f"{name}.jsonl", kill_at_step),
        ]
        layout = ["--data.init_args.num_workers", "2", "--trainer.max_epochs", str(EPOCHS), "--trainer.max_steps", "-1"]
        version = ["--trainer.logger.init_args.version", f"{name}-{len(extra)}"]
        return fit_args(cli_data_args, callbacks, *layout, *version, *extra)

    (reference_status, reference_err), (killed_status, killed_err) = finish(
        start(args("reference")), start(args("run", KILL_AT_STEP))
    )
    assert reference_status == 0, reference_err
    assert killed_status == -signal.SIGKILL, killed_err
    killed = read_records(tmp_path / "run.jsonl")
    assert [r["step"] for r in killed] == list(range(KILL_AT_STEP))
    (tmp_path / "run.jsonl").unlink()

    [(status, stderr)] = finish(start(args("run", -1, "--ckpt_path", str(tmp_path / "run_ckpt" / "last.ckpt"))))
    assert status == 0, stderr
    resumed = read_records(tmp_path / "run.jsonl")
    reference = read_records(tmp_path / "reference.jsonl")

    assert len(reference) == STEPS_PER_EPOCH * EPOCHS
    for epoch in range(EPOCHS):  # each sample once per epoch, and the epochs in different orders
        keys = [key for r in reference if r["epoch"] == epoch for key in r["keys"]]
        assert len(keys) == len(set(keys)) == 80
    assert reference[0]["keys"] != reference[STEPS_PER_EPOCH]["keys"]

    # The resumed run re-runs the unsaved step 12 and stops after the second epoch, like the uninterrupted run.
    first_resumed = KILL_AT_STEP - 1
    assert [(r["step"], r["epoch"], r["batch_idx"]) for r in resumed] == [
        (s, s // STEPS_PER_EPOCH, s % STEPS_PER_EPOCH) for s in range(first_resumed, STEPS_PER_EPOCH * EPOCHS)
    ]
    steps = killed[:first_resumed] + resumed
    assert [r["keys"] for r in steps] == [r["keys"] for r in reference]
    assert killed[first_resumed]["keys"] == resumed[0]["keys"]


class _Mean(L.LightningModule):
    """The smallest module that consumes shard batches."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.layer(batch["image"].mean().reshape(1, 1)).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _DataStates(L.Callback):
    """Keeps the data module's checkpoint state where checkpoints are taken: after given steps and at epoch ends."""

    def __init__(self, steps: tuple[int, ...]) -> None:
        self.steps = steps
        self.states: dict[str, dict[str, Any]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step in self.steps:
            self.states[f"step {trainer.global_step}"] = trainer.datamodule.state_dict()["shard_stream"]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.states[f"end of epoch {trainer.current_epoch}"] = trainer.datamodule.state_dict()["shard_stream"]


def _shard_module(synth_data: Path) -> ShardDataModule:
    return ShardDataModule(
        train_shards=str(synth_data / "shards" / "train" / "{000000..000001}.tar"), tokenizer=str(synth_data / "tokenizer"),
        image_size=32, batch_size=8, num_workers=0, shuffle_buffer=0,
    )  # fmt: skip


def test_checkpointed_data_state_names_the_epoch_a_resumed_run_trains_in(synth_data: Path, tmp_path: Path) -> None:
    """The data state says which epoch a resume continues in (Lightning builds the loader before it restores its
    loops, while ``current_epoch`` still reads 0) and carries the stream position only for an unfinished epoch; a
    loader built from it, before any trainer exists, starts in that epoch at that position."""
    states = _DataStates(steps=(10, 13))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, max_epochs=2, callbacks=[states])  # fmt: skip
    trainer.fit(_Mean(), datamodule=_shard_module(synth_data))
    assert {name: state["next_epoch"] for name, state in states.states.items()} == {
        "step 10": 1,  # after the last batch of epoch 0: Lightning resumes in epoch 1
        "end of epoch 0": 1,
        "step 13": 1,  # 3 batches into epoch 1
        "end of epoch 1": 2,
    }
    assert [name for name, state in states.states.items() if "ranks" in state] == ["step 13"]
    mid = states.states["step 13"]
    assert mid["epoch"] == 1 and sum(made for _, made in mid["ranks"][0]["roles"]) == 3

    for name, batches in (("step 13", 10 - 3), ("step 10", 10)):
        resumed = _shard_module(synth_data)
        resumed.load_state_dict({"shard_stream": states.states[name]})
        loader = resumed.train_dataloader()
        assert loader.next_epoch == 1, name
        assert len(list(loader)) == batches, name
