"""Preemption signals sent to the whole process group, as ``timeout``, container runtimes and SLURM's ``--signal``
without ``B:`` (through ``srun``) deliver them: the data workers must survive so the main process can save.

The runs are real ``vlalign fit`` processes on the tiny config with 2 data workers, started in their own session so
that ``os.killpg`` reaches the trainer and its workers together, exactly like a scheduler does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_resume import child_env, fit_args, read_records, recorder
from vlalign.datamodules.base import STOP_SIGNALS, WorkerInit
from vlalign.weights.safe_loading import allow_config_classes_in_checkpoints


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of the group exists (e.g. a zombie being reaped)
        return True
    return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_to_the_process_group_saves_a_loadable_checkpoint_with_workers_running(
    cli_data_args: list[str], tmp_path: Path, signum: signal.Signals
) -> None:
    """killpg(SIGTERM / SIGUSR1) with 2 data workers: exit status 128 + signal (143 / 138), a checkpoint that loads
    with ``weights_only=True`` at the step that was running, no ``DataLoader worker ... killed`` error and no worker
    left behind."""
    steps = tmp_path / "steps.jsonl"
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
        {"class_path": "vlalign.training.fault_tolerance.PreemptionCheckpoint"},
        recorder(steps),
    ]
    args = fit_args(
        cli_data_args, callbacks,
        "--data.init_args.num_workers", "2",
        "--trainer.max_steps", "500",
        "--trainer.logger.init_args.version", "v",
    )  # fmt: skip
    env = {k: v for k, v in child_env().items() if not k.startswith("SLURM_")}  # no SLURM auto-requeue here
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-m", "vlalign", *args],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 240
            while len(read_records(steps)) < 3 and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert child.poll() is None, stderr_path.read_text()[-3000:]
            os.killpg(child.pid, signum)  # the trainer and both data workers, as a scheduler does
            status = child.wait(timeout=240)
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    log = stderr_path.read_text()
    assert status == 128 + signum, log[-3000:]
    assert "killed by signal" not in log, log[-3000:]
    assert f"{signal.Signals(signum).name}: saved" in log, log[-3000:]

    saved = sorted(tmp_path.rglob("*.ckpt"))
    assert saved, f"no checkpoint under {tmp_path}"
    allow_config_classes_in_checkpoints()
    checkpoint = torch.load(saved[-1], map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == len(read_records(steps)) >= 3  # the batch that was running, then stopped
    assert checkpoint["state_dict"]

    deadline = time.monotonic() + 30  # the workers go with the trainer; none is orphaned by ignoring the signal
    while _group_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(child.pid), "a data worker outlived the trainer"


def test_worker_init_ignores_stop_signals_and_runs_the_seeding_function(
    monkeypatch: pytest.MonkeyPatch, synth_data: Path
) -> None:
    """The composed worker_init_fn: the stop signals are ignored, then Lightning's per-worker seeding still runs
    (``seed_everything(workers=True)``, as the CLI sets it); every loader of the module gets it when it has workers."""
    from vlalign.datamodules.webdataset import ShardDataModule

    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    calls: list[tuple[int, int]] = []
    monkeypatch.setenv("PL_SEED_WORKERS", "1")
    monkeypatch.setattr("vlalign.datamodules.base.pl_worker_init_function", lambda wid, rank: calls.append((wid, rank)))
    try:
        WorkerInit(rank=3)(1)
        assert all(signal.getsignal(signum) == signal.SIG_IGN for signum in STOP_SIGNALS)
        assert calls == [(1, 3)]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    module = ShardDataModule(
        train_shards=str(synth_data / "shards" / "train" / "000000.tar"),
        tokenizer=str(synth_data / "tokenizer"),
        test_retrieval=str(synth_data / "retrieval_test.json"),
        num_workers=2,
    )
    assert isinstance(module.train_dataloader().worker_init_fn, WorkerInit)
    module.setup("test")
    assert isinstance(module.test_dataloader().worker_init_fn, WorkerInit)
    in_process = ShardDataModule(
        train_shards=str(synth_data / "shards" / "train" / "000000.tar"), tokenizer=str(synth_data / "tokenizer"),
        num_workers=0,
    )  # fmt: skip
    assert "worker_init_fn" not in in_process.loader_kwargs()
