"""Checkpoint IO: stale temp files of killed saves are removed (only those), and only good checkpoints are written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vlalign.training.fault_tolerance import (
    NONFINITE_STATE_KEY,
    AtomicCheckpointIO,
    GoodCheckpointIO,
    GoodCheckpoints,
    _host_tag,
    prepare_checkpointing,
)

HOUR = 3600.0


def _temp_name(target: str, pid: int, host: str | None = None, random: str = "k3x9_q2z") -> str:
    """A temp-file name as AtomicCheckpointIO makes it (``random`` stands for mkstemp's random part)."""
    return f".{target}.atomic-{host or _host_tag()}-{pid}-{random}.tmp"


def _touch(path: Path, age_s: float = 0.0, size: int = 1000) -> Path:
    path.write_bytes(b"PK\x03\x04" + b"\0" * size)
    if age_s:
        stamp = time.time() - age_s
        os.utime(path, (stamp, stamp))
    return path


@pytest.fixture()
def live_process() -> Iterator[subprocess.Popen[bytes]]:
    """A process that stays alive for the test (another writer)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    time.sleep(0.2)
    yield child
    child.kill()
    child.wait()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _stale_and_kept(folder: Path, live_pid: int) -> tuple[set[str], set[str]]:
    """Temp files no live writer owns (to be removed), and files that must stay, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    stale = {
        _touch(folder / _temp_name("last.ckpt", _dead_pid())).name,  # this host, writer gone
        _touch(folder / _temp_name("last.ckpt", live_pid, random="old0pid1"), age_s=HOUR).name,  # pid reused since
        _touch(folder / _temp_name("epoch=0-step=5.ckpt", 4242, host="other-node-07"), age_s=HOUR).name,  # old
        _touch(folder / ".last.ckpt.a1b2c3d4.tmp", age_s=HOUR).name,  # older vlalign versions: no owner in the name
    }
    kept = {
        _touch(folder / _temp_name("last.ckpt", live_pid)).name,  # a live writer, still writing
        _touch(folder / _temp_name("last.ckpt", os.getpid())).name,  # this process's own
        _touch(folder / _temp_name("last.ckpt", 4242, host="other-node-07")).name,  # another host, recent
        _touch(folder / ".last.ckpt.e5f6g7h8.tmp").name,  # owner unknown, recent
        _touch(folder / "notes.tmp", age_s=HOUR).name,
        _touch(folder / ".last.ckpt.swp", age_s=HOUR).name,
        _touch(folder / ".data.json.a1b2c3d4.tmp", age_s=HOUR).name,  # not a checkpoint's
        _touch(folder / "best.ckpt", age_s=HOUR).name,
    }
    return stale, kept


def test_a_save_removes_stale_temp_files_and_nothing_else(
    tmp_path: Path, live_process: subprocess.Popen[bytes]
) -> None:
    folder = tmp_path / "checkpoints"
    stale, kept = _stale_and_kept(folder, live_process.pid)
    assert len(stale) == 4 and len(kept) == 8
    AtomicCheckpointIO().save_checkpoint({"step": 1}, folder / "last.ckpt")
    assert {p.name for p in folder.iterdir()} == kept | {"last.ckpt"}


def test_training_start_removes_stale_temp_files_of_every_checkpoint_folder(
    tmp_path: Path, live_process: subprocess.Popen[bytes]
) -> None:
    folders = [tmp_path / "best", tmp_path / "last"]
    expected = [_stale_and_kept(folder, live_process.pid)[1] for folder in folders]
    trainer = L.Trainer(
        default_root_dir=tmp_path, logger=False, accelerator="cpu", enable_progress_bar=False,
        callbacks=[ModelCheckpoint(dirpath=folders[0], monitor="val"), ModelCheckpoint(dirpath=folders[1])],
    )  # fmt: skip
    prepare_checkpointing(trainer)
    for folder, kept in zip(folders, expected, strict=True):
        assert {p.name for p in folder.iterdir()} == kept


KILLED_SAVE = textwrap.dedent(
    """
    import sys, time
    import torch
    from vlalign.training.fault_tolerance import AtomicCheckpointIO

    def slow_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\\x03\\x04" + b"\\0" * 1_000_000)
        handle.flush()
        print("writing", flush=True)
        time.sleep(300)

    torch.save = slow_save
    AtomicCheckpointIO().save_checkpoint({"step": 2}, sys.argv[1])
    """
)


def test_a_save_killed_mid_write_leaves_a_temp_file_that_the_next_save_removes(tmp_path: Path) -> None:
    target = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)
    leftovers: list[set[str]] = []
    for _ in range(2):  # two kills mid-save: the second save removes what the first left, they do not pile up
        child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(target)], stdout=subprocess.PIPE)
        assert child.stdout is not None and child.stdout.readline() == b"writing\n"
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        leftovers.append({p.name for p in target.parent.iterdir() if p.name.endswith(".tmp")})
    assert len(leftovers[0]) == len(leftovers[1]) == 1 and leftovers[0] != leftovers[1]
    assert (target.parent / leftovers[1].pop()).stat().st_size > 1_000_000
    assert io.load_checkpoint(target)["step"] == 1  # the kills left the previous file intact

    io.save_checkpoint({"step": 3}, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    assert io.load_checkpoint(target)["step"] == 3


# -- good checkpoints --------------------------------------------------------------------------------------------------
def _checkpoint(step: int, weight: float = 1.0, streak: int = 0, forensic: bool = False, moment: float = 0.0) -> dict:
    return {
        "global_step": step,
        "state_dict": {"layer.weight": torch.full((2, 2), weight), "queue_ptr": torch.tensor([3])},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.full((2, 2), moment)}}}],
        NONFINITE_STATE_KEY: {"streak": streak, "forensic": forensic},
    }


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (_checkpoint(5, streak=2), "the last 2 training step(s) had a non-finite loss"),
        (_checkpoint(5, weight=float("nan")), "non-finite values in layer.weight"),
        (_checkpoint(5, moment=float("inf")), "non-finite values in optimizer 0 state of parameter 0: exp_avg"),
    ],
    ids=["nonfinite-streak", "nan-weights", "inf-optimizer-state"],
)
def test_atomic_io_writes_only_good_checkpoints_and_keeps_older_files(
    tmp_path: Path, bad: dict[str, Any], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    io = AtomicCheckpointIO()
    last, older = tmp_path / "last.ckpt", tmp_path / "step=4.ckpt"
    io.save_checkpoint(_checkpoint(4), older)
    io.save_checkpoint(_checkpoint(4), last)
    assert io.good_checkpoints.last_good == (str(last), 4)

    io.save_checkpoint(bad, last)
    io.save_checkpoint(bad, tmp_path / "step=5.ckpt")
    io.remove_checkpoint(older)  # what ModelCheckpoint does after saving a newer file: refused while saves are
    assert io.load_checkpoint(last)["global_step"] == 4
    assert not (tmp_path / "step=5.ckpt").exists() and older.exists()
    assert io.good_checkpoints.last_refused == (str(tmp_path / "step=5.ckpt"), reason)
    assert reason in caplog.text and f"the last good checkpoint is {last}" in caplog.text

    io.save_checkpoint(_checkpoint(7, forensic=True, streak=3, weight=float("nan")), tmp_path / "forensic.ckpt")
    assert (tmp_path / "forensic.ckpt").exists() and io.good_checkpoints.last_good == (str(last), 4)

    io.save_checkpoint(_checkpoint(8), last)  # finite again: saves and removals resume
    io.remove_checkpoint(older)
    assert io.load_checkpoint(last)["global_step"] == 8 and not older.exists()


def test_any_other_checkpoint_io_gets_the_good_checkpoint_filter(tmp_path: Path) -> None:
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, accelerator="cpu", enable_progress_bar=False)
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    prepare_checkpointing(trainer)
    io = trainer.strategy.checkpoint_io
    assert isinstance(io, GoodCheckpointIO) and isinstance(io.inner, TorchCheckpointIO)
    prepare_checkpointing(trainer)  # idempotent
    assert trainer.strategy.checkpoint_io is io
    io.save_checkpoint(_checkpoint(1), tmp_path / "a.ckpt")
    io.save_checkpoint(_checkpoint(2, weight=float("inf")), tmp_path / "b.ckpt")
    assert (tmp_path / "a.ckpt").exists() and not (tmp_path / "b.ckpt").exists()

    atomic = L.Trainer(default_root_dir=tmp_path, logger=False, accelerator="cpu", plugins=[AtomicCheckpointIO()])
    prepare_checkpointing(atomic)
    assert isinstance(atomic.strategy.checkpoint_io, AtomicCheckpointIO)  # filters itself: not wrapped


def test_checkpoints_without_tensors_or_markers_are_good() -> None:
    gate = GoodCheckpoints()
    assert gate.admit({"step": 1}, "x.ckpt") and gate.admit({"state_dict": {}}, "y.ckpt")


def test_preemption_during_a_nonfinite_streak_keeps_last_ckpt_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM while the model is blown up: the preemption save is skipped and the log names the good file."""
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from vlalign.training.fault_tolerance import PreemptionCheckpoint

    io = AtomicCheckpointIO()
    last = tmp_path / "checkpoints" / "last.ckpt"  # where PreemptionCheckpoint(filename="last") saves here
    io.save_checkpoint(_checkpoint(4), last)
    bad = _checkpoint(6, streak=2)
    trainer = SimpleNamespace(
        world_size=1, global_step=6, checkpoint_callbacks=[], log_dir=None, default_root_dir=str(tmp_path),
        ckpt_path=None, strategy=SimpleNamespace(checkpoint_io=io),
        save_checkpoint=lambda path: io.save_checkpoint(bad, path),
    )  # fmt: skip
    callback = PreemptionCheckpoint(filename="last")
    callback.received = signal.SIGTERM
    with caplog.at_level("INFO"), pytest.raises(SIGTERMException):
        callback.on_train_batch_end(trainer, None, None, None, 0)  # type: ignore[arg-type]
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert f"SIGTERM: not saving {last}" in caplog.text and f"--ckpt_path {last}" in caplog.text
