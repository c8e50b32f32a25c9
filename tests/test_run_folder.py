"""The run folder: what ``--ckpt_path last`` resumes, what ``--ckpt_path`` may load, and ``last.ckpt`` at the end.

The resolution functions are pure (trainer settings and files in, a decision out) and tested on fake checkpoint
files; one short real fit checks that ``last.ckpt`` holds the final step when the best validation came early.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from vlalign.cli.train import run_training_cli
from vlalign.errors import ConfigError
from vlalign.training.run_folder import find_resume, run_folder_from_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"


def checkpoint(path: Path, global_step: int, mtime: float) -> Path:
    """A minimal Lightning-like checkpoint file with the given step and modification time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": global_step, "epoch": 0}, path)
    os.utime(path, (mtime, mtime))
    return path


def trainer_settings(save_dir: Path, version: int | str | None = None, callbacks: list[Any] | None = None) -> dict:
    """Parsed trainer settings (as a dict) with the shipped configs' logger layout: ``<save_dir>/tiny/<version>``."""
    logger = {"class_path": TENSORBOARD, "init_args": {"save_dir": str(save_dir), "name": "tiny", "version": version}}
    return {"logger": logger, "callbacks": callbacks or [], "default_root_dir": None}


def test_last_resumes_the_newest_last_checkpoint_across_version_folders(tmp_path: Path) -> None:
    """Each old-style resume made a new version folder; a crashed start left one without checkpoints: ``last`` is
    the most recently written ``last.ckpt``, and the run continues in its folder (its logger version)."""
    runs = tmp_path / "runs"
    checkpoint(runs / "tiny" / "version_0" / "checkpoints" / "last.ckpt", global_step=40, mtime=1_000)
    checkpoint(runs / "tiny" / "version_1" / "checkpoints" / "last.ckpt", global_step=90, mtime=3_000)
    checkpoint(runs / "tiny" / "version_1" / "checkpoints" / "best-epoch=2.ckpt", global_step=30, mtime=4_000)
    (runs / "tiny" / "version_2").mkdir()  # a start killed before its first checkpoint
    checkpoint(runs / "other" / "version_0" / "checkpoints" / "last.ckpt", global_step=500, mtime=9_000)

    resume = find_resume(run_folder_from_config(trainer_settings(runs)))
    assert resume.checkpoint == runs / "tiny" / "version_1" / "checkpoints" / "last.ckpt"
    assert resume.version == 1 and resume.global_step == 90


def test_last_prefers_the_higher_step_when_written_at_the_same_time(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    checkpoint(runs / "tiny" / "version_0" / "checkpoints" / "last.ckpt", global_step=40, mtime=1_000)
    checkpoint(runs / "tiny" / "named" / "checkpoints" / "last.ckpt", global_step=41, mtime=1_000)
    resume = find_resume(run_folder_from_config(trainer_settings(runs)))
    assert resume.version == "named" and resume.global_step == 41


def test_last_with_a_fixed_version_or_checkpoint_folder_looks_only_there(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    checkpoint(runs / "tiny" / "version_0" / "checkpoints" / "last.ckpt", global_step=40, mtime=1_000)
    newer = checkpoint(runs / "tiny" / "version_1" / "checkpoints" / "last.ckpt", global_step=90, mtime=3_000)

    fixed = find_resume(run_folder_from_config(trainer_settings(runs, version=0)))
    assert fixed.checkpoint == runs / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert fixed.version is None  # the configured version stays

    own = checkpoint(tmp_path / "ckpts" / "last.ckpt", global_step=7, mtime=500)
    model_checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(own.parent), "save_last": False},
    }
    explicit = find_resume(run_folder_from_config(trainer_settings(runs, callbacks=[model_checkpoint])))
    assert explicit.checkpoint == own and explicit.version is None and explicit.checkpoint != newer


def test_last_without_a_logger_looks_in_the_default_root_dir(tmp_path: Path) -> None:
    saved = checkpoint(tmp_path / "root" / "checkpoints" / "last.ckpt", global_step=3, mtime=100)
    settings = {"logger": False, "callbacks": None, "default_root_dir": str(tmp_path / "root")}
    assert find_resume(run_folder_from_config(settings)).checkpoint == saved


def test_nothing_to_resume_says_where_it_looked_and_how_to_start_fresh(tmp_path: Path) -> None:
    (tmp_path / "runs" / "tiny" / "version_0" / "checkpoints").mkdir(parents=True)  # a run killed before saving
    with pytest.raises(ConfigError) as info:
        find_resume(run_folder_from_config(trainer_settings(tmp_path / "runs")))
    message = str(info.value)
    assert str(tmp_path / "runs" / "tiny" / "*" / "checkpoints" / "last.ckpt") in message
    assert "leave out --ckpt_path" in message and "nothing to resume" in message


def test_last_checkpoint_holds_the_final_step_when_the_best_validation_is_early(
    cli_data_args: list[str], tmp_path: Path
) -> None:
    """ModelCheckpoint monitoring ``epoch`` in mode min (the best is always epoch 0) with ``save_last``: last.ckpt
    is still the final step (6, after 3 epochs of 2 batches), the best stays its own file, and nothing else."""
    best_early = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"monitor": "epoch", "mode": "min", "save_last": True, "filename": "best-{epoch}"},
    }
    run_training_cli(
        ["fit", "--config", str(CONFIGS / "tiny.yaml"), *cli_data_args,
         "--trainer.callbacks", json.dumps([best_early]),
         "--trainer.logger.init_args.version", "v",
         "--trainer.max_epochs", "3",
         "--trainer.limit_train_batches", "2",
         "--trainer.limit_val_batches", "1",
         "--trainer.enable_model_summary", "false",
         "--model.stream.num_layers", "1"]
    )  # fmt: skip
    folder = tmp_path / "runs" / "tiny" / "v" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best-epoch=0.ckpt", "last.ckpt"]
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)
    best = torch.load(folder / "best-epoch=0.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 6 and best["global_step"] == 2


def test_output_folder_is_the_log_folder_without_a_broadcast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks write their files on rank 0 only, where ``trainer.log_dir`` would wait for a broadcast the other ranks
    never join: ``output_folder`` names the same folder without one."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from vlalign.training.run_folder import output_folder

    logger = TensorBoardLogger(save_dir=str(tmp_path / "runs"), name="demo")
    trainer = L.Trainer(logger=logger, default_root_dir=str(tmp_path), accelerator="cpu", devices=1)
    expected = Path(trainer.log_dir)

    def no_broadcast(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("output_folder broadcast")

    monkeypatch.setattr(trainer.strategy, "broadcast", no_broadcast)
    assert output_folder(trainer) == expected == tmp_path / "runs" / "demo" / "version_0"
    assert output_folder(trainer, tmp_path / "out") == tmp_path / "out"
    assert output_folder(L.Trainer(logger=False, default_root_dir=str(tmp_path / "root"))) == tmp_path / "root"


def test_losses_go_to_the_progress_bar_on_the_cpu_only() -> None:
    """Off the CPU a prog_bar value is a host sync per step (docs/benchmarks.md): the tasks log losses there only."""
    import lightning as L

    from vlalign.training.progress import losses_on_progress_bar

    module = L.LightningModule()
    assert losses_on_progress_bar(module)
    module._device = torch.device("cuda", 0)  # what Lightning sets when it moves the module (no GPU needed)
    assert not losses_on_progress_bar(module)
