"""Interruption and resume: SIGKILL mid-epoch then ``--ckpt_path last``, SIGTERM preemption, atomic checkpoint files.

The runs are real ``vlalign fit`` processes on the tiny config and the session's synthetic shards (80 training
samples in 2 shards, batch 8: 10 batches per epoch). :class:`StepRecorder` (imported by the child processes from
this file) writes every training step's sample keys (and losses) to JSON-lines files and can kill its own process,
at a step given in its settings or in the environment (:data:`KILL_AT_STEP_ENV`, so that the command line of a
killed run and of its resumes is the same).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from vlalign.cli.train import run_training_cli
from vlalign.training.fault_tolerance import RNG_STATE_KEY, AtomicCheckpointIO

TESTS = Path(__file__).resolve().parent
TINY = TESTS.parent / "configs" / "pretrain" / "tiny.yaml"
STEPS_PER_EPOCH = 10
KILL_AT_STEP_ENV = "VLALIGN_TEST_KILL_AT_STEP"


class StepRecorder(Callback):
    """Appends ``{"epoch", "step", "batch_idx", "keys"}`` per training step to ``path`` (and ``{"step", "loss"}``,
    the step count after it, to ``losses`` if given); optionally SIGKILLs its own process once ``kill_at_step`` (or
    else ``$VLALIGN_TEST_KILL_AT_STEP``) optimizer steps are done, before any checkpoint callback saves that step."""

    def __init__(self, path: str, kill_at_step: int = -1, losses: str | None = None) -> None:
        self.path = path
        self.kill_at_step = kill_at_step
        self.losses = losses

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        record = {"epoch": trainer.current_epoch, "step": trainer.global_step, "batch_idx": batch_idx}
        with open(self.path, "a") as handle:
            handle.write(json.dumps({**record, "keys": list(batch["keys"])}) + "\n")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.losses is not None:
            with open(self.losses, "a") as handle:
                handle.write(json.dumps({"step": trainer.global_step, "loss": float(outputs["loss"])}) + "\n")
        kill_at_step = self.kill_at_step if self.kill_at_step >= 0 else int(os.environ.get(KILL_AT_STEP_ENV, "-1"))
        if trainer.global_step == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def fit_args(cli_data_args: list[str], callbacks: list[dict[str, Any]], *extra: str) -> list[str]:
    """A short tiny-config fit: no validation, the given callbacks, smaller text stack."""
    return [
        "fit", "--config", str(TINY), *cli_data_args,
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_model_summary", "false",
        "--model.stream.num_layers", "2",
        "--trainer.callbacks", json.dumps(callbacks),
        *extra,
    ]  # fmt: skip


def every_step_checkpoint(dirpath: Path) -> dict[str, Any]:
    return {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(dirpath), "save_last": True, "save_top_k": 0, "every_n_train_steps": 1},
    }


def recorder(path: Path, kill_at_step: int = -1, losses: Path | None = None) -> dict[str, Any]:
    init_args = {"path": str(path), "kill_at_step": kill_at_step, "losses": str(losses) if losses else None}
    return {"class_path": "test_resume.StepRecorder", "init_args": init_args}


def child_env() -> dict[str, str]:
    """Single-threaded children: multi-threaded CPU kernels are not bitwise reproducible from run to run (the
    gradient of an attention key bias is pure rounding noise, which Adam scales up to learning-rate-sized steps)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    return env


def start(args: list[str], **env: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "vlalign", *args]
    environment = {**child_env(), **env}
    return subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(*children: subprocess.Popen[str]) -> list[tuple[int, str]]:
    """Wait for children started together (they share the cores); (exit status, end of stderr) of each."""
    results = []
    for child in children:
        try:
            _, stderr = child.communicate(timeout=300)
        finally:
            if child.poll() is None:
                child.kill()
        results.append((child.returncode, stderr[-3000:]))
    return results


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_tensors(actual: Any, expected: Any, where: str) -> None:
    """Nested dicts / lists / tuples of tensors and plain values are equal (floats to 1e-5)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.shape == expected.shape, where
        if expected.is_floating_point():
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0, msg=lambda m: f"{where}: {m}")
        else:
            assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            assert_same_tensors(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_tensors(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, where


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(cli_data_args: list[str], tmp_path: Path) -> None:
    """With 0 and 2 data workers: kill after step 4 (a checkpoint follows each step, the 4th not yet written), resume
    with ``--ckpt_path last``: the run re-runs step 4, reads the rest of the epoch once, in the uninterrupted run's
    order, and ends with its exact training state (parameters, EMA twins, queues, optimizer, scheduler, RNG)."""
    layouts = (0, 2)
    dirs = {w: tmp_path / f"workers{w}" for w in layouts}
    for path in dirs.values():
        path.mkdir()

    def args(w: int, name: str, kill_at_step: int = -1, *extra: str) -> list[str]:
        callbacks = [every_step_checkpoint(dirs[w] / f"{name}_ckpt"), recorder(dirs[w] / f"{name}.jsonl", kill_at_step)]
        layout = ["--data.init_args.num_workers", str(w), "--trainer.max_steps", str(STEPS_PER_EPOCH)]
        version = ["--trainer.logger.init_args.version", f"w{w}-{name}-{len(extra)}"]
        return fit_args(cli_data_args, callbacks, *layout, *version, *extra)

    first = finish(*[start(args(w, "reference")) for w in layouts], *[start(args(w, "run", 4)) for w in layouts])
    for (status, stderr), expected in zip(first, [0, 0, -signal.SIGKILL, -signal.SIGKILL], strict=True):
        assert status == expected, stderr
    killed_records = {w: read_records(dirs[w] / "run.jsonl") for w in layouts}
    for w in layouts:
        interrupted = load(dirs[w] / "run_ckpt" / "last.ckpt")
        assert interrupted["global_step"] == 3 and interrupted["epoch"] == 0
        assert [r["step"] for r in killed_records[w]] == [0, 1, 2, 3]  # step 3 ran (4 optimizer steps), unsaved
        (dirs[w] / "run.jsonl").unlink()

    second = finish(*[start(args(w, "run", -1, "--ckpt_path", "last")) for w in layouts])
    for status, stderr in second:
        assert status == 0, stderr

    for w in layouts:
        resumed_records = read_records(dirs[w] / "run.jsonl")
        # The global step and the batch index continue where the checkpoint left off.
        assert [(r["step"], r["batch_idx"], r["epoch"]) for r in resumed_records] == [(s, s, 0) for s in range(3, 10)]

        # Exact-epoch mode: the checkpointed steps' samples plus the resumed run's are the epoch, each sample once,
        # in the uninterrupted run's order; the unsaved step 3 is re-run on the same batch.
        reference_records = read_records(dirs[w] / "reference.jsonl")
        assert len(reference_records) == STEPS_PER_EPOCH
        epoch_keys = [key for r in reference_records for key in r["keys"]]
        assert len(set(epoch_keys)) == len(epoch_keys) == 80
        assert [key for r in killed_records[w][:3] + resumed_records for key in r["keys"]] == epoch_keys
        assert killed_records[w][3]["keys"] == resumed_records[0]["keys"]

        # Optimizer, scheduler, parameters, EMA twins, queues and RNG states equal the uninterrupted run's.
        expected, actual = load(dirs[w] / "reference_ckpt" / "last.ckpt"), load(dirs[w] / "run_ckpt" / "last.ckpt")
        assert actual["global_step"] == expected["global_step"] == STEPS_PER_EPOCH
        state = expected["state_dict"]
        assert any("vision_m." in k for k in state) and any("stream_m." in k for k in state)  # the momentum twins
        assert {"itc.image_queue", "itc.text_queue", "itc.queue_ptr"} <= set(state)
        assert int(state["itc.queue_ptr"]) == STEPS_PER_EPOCH * 8
        assert_same_tensors(actual["state_dict"], state, f"workers={w} state_dict")
        assert_same_tensors(actual["optimizer_states"], expected["optimizer_states"], f"workers={w} optimizer")
        assert_same_tensors(actual["lr_schedulers"], expected["lr_schedulers"], f"workers={w} lr_schedulers")
        assert_same_tensors(actual[RNG_STATE_KEY], expected[RNG_STATE_KEY], f"workers={w} rng")


def test_sigterm_saves_last_checkpoint_and_resumes_at_that_step(cli_data_args: list[str], tmp_path: Path) -> None:
    """PreemptionCheckpoint (in the tiny config): SIGTERM mid-run -> last.ckpt at the end of the running batch and
    exit status 143; ``--ckpt_path last`` then resumes at that step."""
    run_log = tmp_path / "run.jsonl"
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
        {"class_path": "vlalign.training.fault_tolerance.PreemptionCheckpoint"},
        recorder(run_log),
    ]
    version = ["--trainer.logger.init_args.version", "v"]
    child = start(fit_args(cli_data_args, callbacks, "--trainer.max_steps", "500", *version))
    try:
        deadline = time.monotonic() + 240
        while len(read_records(run_log)) < 3 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
    finally:
        [(status, stderr)] = finish(child)
    assert status == 128 + signal.SIGTERM, stderr
    assert "SIGTERM: saved" in stderr
    saved = load(tmp_path / "runs" / "tiny" / "v" / "checkpoints" / "last.ckpt")
    step = saved["global_step"]
    assert step == len(read_records(run_log)) >= 3  # saved at the end of the batch that was running

    run_log.unlink()
    resume = fit_args(cli_data_args, [callbacks[0], recorder(run_log)], "--trainer.max_steps", str(step + 1), *version)
    cli = run_training_cli([*resume, "--ckpt_path", "last"])
    assert [(r["step"], r["batch_idx"]) for r in read_records(run_log)] == [(step, step)]
    assert cli.trainer.global_step == step + 1


def test_atomic_checkpoint_io_keeps_the_previous_file_when_a_save_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "weight": torch.arange(4.0)}, path)

    def dies_mid_write(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "weight": torch.zeros(4)}, path)
    monkeypatch.undo()

    previous = io.load_checkpoint(path)
    assert previous["step"] == 1 and torch.equal(previous["weight"], torch.arange(4.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left behind

    io.save_checkpoint({"step": 3}, path)
    assert io.load_checkpoint(path)["step"] == 3 and oct(path.stat().st_mode & 0o777) != oct(0o600)


def losses_by_step(path: Path) -> dict[int, float]:
    """The loss of each step; a step run again after a resume counts with its last value."""
    return {record["step"]: record["loss"] for record in read_records(path)}


def test_documented_resume_after_two_sigkills_continues_the_run_in_its_folder(
    cli_data_args: list[str], tmp_path: Path
) -> None:
    """The shipped tiny config (logger without a version, ModelCheckpoint without dirpath, validation each epoch),
    killed with SIGKILL at steps 13 and 25 and resumed twice with the README's command (the same command plus
    ``--ckpt_path last``): every step's loss and the final training state equal an uninterrupted run's, and all
    logs and checkpoints are in one version folder."""
    steps = 3 * STEPS_PER_EPOCH

    def command(name: str) -> list[str]:
        extra = [recorder(tmp_path / f"{name}.jsonl", losses=tmp_path / f"{name}-losses.jsonl")]
        return [
            "fit", "--config", str(TINY), *cli_data_args,
            "--trainer.logger.init_args.name", name,
            "--trainer.max_epochs", "3",
            "--trainer.enable_model_summary", "false",
            "--model.stream.num_layers", "1",
            "--trainer.callbacks+", json.dumps(extra[0]),
        ]  # fmt: skip

    resume = [*command("run"), "--ckpt_path", "last"]
    outcomes = finish(start(command("reference")), start(command("run"), **{KILL_AT_STEP_ENV: "13"}))
    outcomes += finish(start(resume, **{KILL_AT_STEP_ENV: "25"}))
    outcomes += finish(start(resume))
    for (status, stderr), expected in zip(outcomes, [0, -signal.SIGKILL, -signal.SIGKILL, 0], strict=True):
        assert status == expected, stderr

    # Each resume started from the last.ckpt of the epoch end before its kill (steps 10 and 20), not from scratch.
    ran = [r["step"] for r in read_records(tmp_path / "run.jsonl")]
    assert ran == [*range(13), *range(10, 25), *range(20, steps)], ran
    run_folders = sorted(p.name for p in (tmp_path / "runs" / "run").iterdir())
    assert run_folders == ["version_0"], run_folders
    folder = tmp_path / "runs" / "run" / "version_0"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 3  # one log file per process, all in this folder
    assert (folder / "config.yaml").is_file()
    checkpoints = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and all(n == "last.ckpt" or n.startswith("best-") for n in checkpoints)

    reference_losses = losses_by_step(tmp_path / "reference-losses.jsonl")
    run_losses = losses_by_step(tmp_path / "run-losses.jsonl")
    assert sorted(run_losses) == sorted(reference_losses) == list(range(1, steps + 1))
    for step, loss in reference_losses.items():
        assert run_losses[step] == pytest.approx(loss, abs=1e-6), f"step {step}"
    expected = load(tmp_path / "runs" / "reference" / "version_0" / "checkpoints" / "last.ckpt")
    actual = load(folder / "checkpoints" / "last.ckpt")
    assert actual["global_step"] == expected["global_step"] == steps
    assert_same_tensors(actual["state_dict"], expected["state_dict"], "state_dict")
    assert_same_tensors(actual["optimizer_states"], expected["optimizer_states"], "optimizer")


def test_resume_last_with_nothing_to_resume_is_an_error(
    cli_data_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--ckpt_path last`` in a run folder without checkpoints: exit status 2 and where it looked, no fresh start."""
    from vlalign.cli.main import main

    args = ["fit", "--config", str(TINY), *cli_data_args, "--trainer.max_steps", "1", "--ckpt_path", "last"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --ckpt_path last: nothing to resume")
    assert str(tmp_path / "runs" / "tiny" / "*" / "checkpoints" / "last.ckpt") in err
    assert "leave out --ckpt_path" in err
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


class Built(Exception):
    """Raised once the trainer is built: the test needs the trainer only."""


@pytest.mark.parametrize("config", sorted(TINY.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_pretrain_config_gets_the_preemption_last_and_atomic_checkpoint_machinery(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No config lists the machinery; the trainer the CLI builds from each has PreemptionCheckpoint (saving
    last.ckpt), LastCheckpoint and AtomicCheckpointIO, once each."""
    import yaml
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningArgumentParser

    import vlalign.cli.train as train
    from vlalign.training.fault_tolerance import PreemptionCheckpoint
    from vlalign.training.run_folder import LastCheckpoint

    assert "fault_tolerance" not in config.read_text() and "LastCheckpoint" not in config.read_text()
    built: dict[str, Trainer] = {}

    def build_only_the_trainer(self: train.VlalignCLI) -> None:
        settings = self.config.fit.trainer.as_dict()  # full recipes ask for GPUs and DDP: build it for one CPU
        settings.update(accelerator="cpu", devices=1, strategy="auto", precision="32-true")
        parser = LightningArgumentParser()
        parser.add_lightning_class_args(Trainer, "trainer")
        arguments = parser.instantiate_classes(parser.parse_object({"trainer": settings})).trainer
        built["trainer"] = Trainer(**vars(arguments))
        raise Built

    monkeypatch.chdir(tmp_path)  # the configs' relative log folders
    monkeypatch.setattr(train, "check_config", lambda *args, **kwargs: None)  # full recipes name absent weights
    monkeypatch.setattr(train.VlalignCLI, "instantiate_classes", build_only_the_trainer)
    with pytest.raises(Built):
        run_training_cli(["fit", "--config", str(config)])
    trainer = built["trainer"]
    preemption = [c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)]
    assert len(preemption) == 1 and preemption[0].filename == "last"
    [last] = [c for c in trainer.callbacks if isinstance(c, LastCheckpoint)]
    assert not [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.save_last]  # one last.ckpt writer
    configured = yaml.safe_load(config.read_text())["trainer"].get("callbacks") or []
    every = [c["init_args"].get("every_n_train_steps") for c in configured if c["init_args"].get("save_last")]
    assert last.every_n_train_steps == ((every[0] or 0) if every else 0)  # taken over from save_last
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
