"""One run of a sweep: train (or resume) in its own process, check the final checkpoint, evaluate it, and keep
``status.json`` up to date at every stage.

``status.json`` (written atomically) holds ``status`` (``pending``, ``queued``, ``running``, ``done``, ``failed``,
``interrupted``), the run's ``fingerprint``, ``train`` (``status``, ``returncode``, ``wall_s``, ``peak_rss_mb``,
``checkpoint``, ``version_dir``, ``resumed``), ``evaluations`` (per name: ``status``, ``fingerprint``,
``returncode``, ``wall_s``, ``results``), ``error`` (the failing command's ``error:`` block or the last lines of its
log), ``attempts``, ``started`` / ``finished``, ``launcher`` and ``job_id``.

A variant run with a warm start (:attr:`~vlalign.sweep.plan.RunPlan.warm_start`) trains only once that warm start is
done: it is started with ``--model.init_from`` the warm start's final ``last.ckpt`` (recorded as ``train.init_from``);
while the warm start is failed or not done, the run is recorded ``failed`` with an error naming the warm start.

Re-running the sweep skips a run that is done with the same fingerprint, re-evaluates only evaluations that are
missing, failed or changed, resumes a run whose training left a ``last.ckpt`` (``--ckpt_path last``), and retrains
from scratch a run whose fingerprint changed. An interrupt (Ctrl-C, SIGTERM) stops the training process with SIGTERM,
which saves ``last.ckpt`` before it exits, and marks the run ``interrupted``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlalign.sweep.plan import EvalPlan, RunPlan

__all__ = [
    "RESULTS_FILE",
    "execute_run",
    "find_last_checkpoint",
    "read_status",
    "run_is_done",
    "show_command",
    "warm_start_checkpoint",
    "write_status",
]

RESULTS_FILE = "results.json"
STOP_GRACE_S = 300.0  # how long a stopped training process may take to write last.ckpt before it is killed
ERROR_LINES = 25


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def show_command(command: list[str]) -> str:
    """A command as a shell line, ``python -m vlalign`` shown as ``vlalign``."""
    shown = ["vlalign", *command[3:]] if command[1:3] == ["-m", "vlalign"] else command
    return shlex.join(shown)


# -- status ------------------------------------------------------------------------------------------------------------
def read_status(plan: RunPlan) -> dict[str, Any]:
    """The run's ``status.json`` (``{"status": "pending"}`` when it has none or it is unreadable)."""
    try:
        status = json.loads(plan.status_file.read_text())
    except (OSError, json.JSONDecodeError):
        return {"status": "pending", "variant": plan.variant, "seed": plan.seed}
    return status if isinstance(status, dict) else {"status": "pending", "variant": plan.variant, "seed": plan.seed}


def write_status(plan: RunPlan, status: dict[str, Any]) -> None:
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = plan.status_file.with_name(f".{plan.status_file.name}.tmp")
    tmp.write_text(json.dumps(status, indent=2, default=str))
    os.replace(tmp, plan.status_file)


def run_is_done(plan: RunPlan, status: dict[str, Any] | None = None) -> bool:
    """Trained with the current fingerprint and every evaluation done with its current fingerprint."""
    status = read_status(plan) if status is None else status
    if status.get("status") != "done" or status.get("fingerprint") != plan.fingerprint:
        return False
    done = status.get("evaluations") or {}
    return all(
        (done.get(e.name) or {}).get("status") == "done" and done[e.name].get("fingerprint") == e.fingerprint
        for e in plan.evaluations
    )


# -- processes ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcessResult:
    returncode: int
    wall_s: float
    peak_rss_mb: float | None


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (a training process saves last.ckpt and exits), then SIGKILL of its group after the grace period or a
    second interrupt."""
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=STOP_GRACE_S)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        pass
    finally:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                process.kill()
            process.wait()


def run_process(command: list[str], log: Path, env: dict[str, str]) -> ProcessResult:
    """Run ``command`` with its output appended to ``log``; its wall time and peak resident memory (of the process
    and its waited-for children, from ``wait4``). The process gets its own session, so a Ctrl-C at the terminal
    reaches only the sweep, which stops the process with SIGTERM (:func:`_stop`) and re-raises."""
    log.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    start = time.perf_counter()
    with open(log, "ab") as stream:
        stream.write(f"\n=== {_now()} {show_command(command)}\n".encode())
        stream.flush()
        process = subprocess.Popen(
            command, stdout=stream, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
        try:
            _, wait_status, usage = os.wait4(process.pid, 0)
        except BaseException:
            _stop(process)
            raise
    process.returncode = os.waitstatus_to_exitcode(wait_status)
    rss_mb = usage.ru_maxrss / 1024 if usage.ru_maxrss else None  # Linux: kilobytes
    return ProcessResult(process.returncode, time.perf_counter() - start, rss_mb)


def error_text(log: Path, returncode: int) -> str:
    """What went wrong: the log's ``error:`` block when the command printed one, else its last lines."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    start = max((i for i, line in enumerate(lines) if line.startswith("=== ")), default=-1) + 1
    lines = lines[start:]
    first_error = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
    tail = lines[first_error:][:ERROR_LINES] if first_error is not None else lines[-ERROR_LINES:]
    how = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
    return f"{how}; {log}:\n" + "\n".join(tail)


# -- checkpoints -------------------------------------------------------------------------------------------------------
def find_last_checkpoint(plan: RunPlan) -> Path | None:
    """The newest ``last.ckpt`` of the run's training (``train/<name>/version_N/checkpoints/last.ckpt``)."""
    candidates = [p for p in plan.train_dir.rglob("last.ckpt") if p.is_file()] if plan.train_dir.is_dir() else []
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def checkpoint_step(path: Path) -> int | None:
    """``global_step`` of a Lightning checkpoint (read with ``weights_only=True``), None if unreadable."""
    import torch

    from vlalign.weights.safe_loading import allow_config_classes_in_checkpoints

    allow_config_classes_in_checkpoints()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is reported as such by the caller
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    return int(step) if step is not None else None


def warm_start_checkpoint(plan: RunPlan) -> tuple[Path | None, str]:
    """The final ``last.ckpt`` of ``plan``'s warm start, or None and why it cannot be used yet."""
    warm = plan.warm_start
    if warm is None:
        return None, f"{plan.label} has no warm start"
    status = read_status(warm)
    checkpoint = (status.get("train") or {}).get("checkpoint")
    if run_is_done(warm, status) and checkpoint and Path(checkpoint).is_file():
        return Path(checkpoint), ""
    state = status.get("status", "pending")
    if state == "done":
        state = (
            "done with other settings" if status.get("fingerprint") != warm.fingerprint else "missing its checkpoint"
        )
    elif state in ("queued", "running"):
        state = f"{state} (or its job ended without recording a result)"
    error = str(status.get("error") or "").strip()
    cause = f": {error.splitlines()[0]}" if error else ""
    return None, (
        f"its warm start ({warm.label}, {warm.run_dir}) is {state}{cause}; this run starts from the warm start's "
        f"last.ckpt, so it was not trained. Fix the warm start (see {warm.run_dir / 'train.log'} and its status.json) "
        "and run the sweep again"
    )


# -- one run -------------------------------------------------------------------------------------------------------------
def _wipe(plan: RunPlan) -> None:
    for folder in (plan.train_dir, plan.run_dir / "eval"):
        if folder.is_dir():
            shutil.rmtree(folder)


def execute_run(
    plan: RunPlan, launcher: str = "local", job_id: str | None = None, echo: Callable[[str], None] = print
) -> str:
    """Train and evaluate one run as far as it is not done yet; returns its final status (``done`` or ``failed``).

    Raises KeyboardInterrupt after recording the run as ``interrupted`` (the training process saved last.ckpt).
    """
    status = read_status(plan)
    if run_is_done(plan, status):
        return "done"
    if status.get("fingerprint") not in (None, plan.fingerprint):
        echo(f"{plan.label}: its settings changed since it ran; training it again from scratch")
        _wipe(plan)
        status = {}
    train = status.get("train") or {}
    if train.get("status") == "done" and not Path(str(train.get("checkpoint"))).is_file():
        train = {}  # its checkpoint is gone: train again
    status.update(
        variant=plan.variant,
        seed=plan.seed,
        steps=plan.steps,
        fingerprint=plan.fingerprint,
        status="running",
        error=None,
        started=_now(),
        finished=None,
        launcher=launcher,
        job_id=job_id,
        attempts=int(status.get("attempts") or 0) + 1,
        run_dir=str(plan.run_dir),
        train=train,
        evaluations=status.get("evaluations") or {},
    )
    write_status(plan, status)
    try:
        if train.get("status") != "done":
            init_from = None
            if plan.warm_start is not None:
                init_from, why = warm_start_checkpoint(plan)
                if init_from is None:
                    status["error"] = f"not trained: {why}"
                    echo(f"{plan.label}: FAILED, {why}")
                    return _finish(plan, status, "failed")
            if not _train(plan, status, echo, init_from):
                return _finish(plan, status, "failed")
        for evaluation in plan.evaluations:
            done = status["evaluations"].get(evaluation.name) or {}
            if done.get("status") == "done" and done.get("fingerprint") == evaluation.fingerprint:
                continue
            _evaluate(plan, evaluation, status, echo)
    except KeyboardInterrupt:
        status["error"] = "interrupted: run the sweep again to resume (training continues from its last.ckpt)"
        _finish(plan, status, "interrupted")
        raise
    except Exception as err:
        status["error"] = f"the sweep failed while running it: {type(err).__name__}: {err}"
        _finish(plan, status, "failed")
        raise
    failed = [name for name, e in status["evaluations"].items() if e.get("status") != "done"]
    if failed:
        status["error"] = "\n".join(f"evaluation {n}: {status['evaluations'][n].get('error')}" for n in failed)
    return _finish(plan, status, "failed" if failed else "done")


def _finish(plan: RunPlan, status: dict[str, Any], outcome: str) -> str:
    status["status"] = outcome
    status["finished"] = _now()
    training = status.get("train", {}).get("wall_s") or 0.0
    evals = sum(e.get("wall_s") or 0.0 for e in status.get("evaluations", {}).values())
    status["wall_s"] = training + evals
    write_status(plan, status)
    return outcome


def _train(plan: RunPlan, status: dict[str, Any], echo: Callable[[str], None], init_from: Path | None = None) -> bool:
    checkpoint = find_last_checkpoint(plan)
    resume = checkpoint is not None
    if not resume and plan.train_dir.is_dir():
        shutil.rmtree(plan.train_dir)  # a failed start left no checkpoint: start clean (one version folder)
    command = plan.fit_command(resume=resume, init_from=init_from)
    log = plan.run_dir / "train.log"
    start_from = f" from {plan.warm_start.label}" if plan.warm_start is not None else ""
    echo(f"{plan.label}: {'resuming' if resume else 'training'} {plan.steps} steps{start_from} (log: {log})")
    train = status["train"] = {"status": "running", "command": show_command(command), "resumed": resume}
    if init_from is not None:
        train["init_from"] = str(init_from)
    previous = float(status.get("train_wall_s_before") or 0.0)  # earlier attempts (interrupted, failed)
    write_status(plan, status)
    start = time.perf_counter()
    try:
        result = run_process(command, log, plan.env)
    except BaseException:
        train["status"] = "interrupted"
        status["train_wall_s_before"] = previous + time.perf_counter() - start
        raise
    train.update(returncode=result.returncode, peak_rss_mb=result.peak_rss_mb, wall_s=previous + result.wall_s)
    if result.returncode != 0:
        status["train_wall_s_before"] = train["wall_s"]
        train["status"] = "failed"
        status["error"] = f"training failed: {error_text(log, result.returncode)}"
        echo(f"{plan.label}: training FAILED ({status['error'].splitlines()[0]})")
        return False
    checkpoint = find_last_checkpoint(plan)
    step = checkpoint_step(checkpoint) if checkpoint is not None else None
    if checkpoint is None or step != plan.steps:
        train["status"] = "failed"
        where = f"{checkpoint} holds step {step}" if checkpoint else f"no last.ckpt under {plan.train_dir}"
        status["error"] = f"training ended without the final weights: {where}, not step {plan.steps}"
        echo(f"{plan.label}: {status['error']}")
        return False
    status.pop("train_wall_s_before", None)
    train.update(status="done", checkpoint=str(checkpoint), version_dir=str(checkpoint.parent.parent), step=step)
    write_status(plan, status)
    echo(f"{plan.label}: trained in {train['wall_s'] / 60:.1f} min")
    return True


def _evaluate(plan: RunPlan, evaluation: EvalPlan, status: dict[str, Any], echo: Callable[[str], None]) -> None:
    checkpoint = status["train"]["checkpoint"]
    command = plan.eval_command(evaluation, checkpoint)
    results = evaluation.out_dir / RESULTS_FILE
    results.unlink(missing_ok=True)
    log = evaluation.out_dir / "evaluate.log"
    entry = status["evaluations"][evaluation.name] = {
        "status": "running",
        "kind": evaluation.kind,
        "fingerprint": evaluation.fingerprint,
        "command": show_command(command),
    }
    write_status(plan, status)
    echo(f"{plan.label}: evaluating {evaluation.name}")
    try:
        result = run_process(command, log, plan.env)
    except BaseException:
        entry["status"] = "interrupted"
        raise
    entry.update(returncode=result.returncode, wall_s=result.wall_s)
    if result.returncode == 0 and results.is_file():
        entry.update(status="done", results=str(results))
    else:
        entry.update(status="failed", error=error_text(log, result.returncode))
        echo(f"{plan.label}: evaluation {evaluation.name} FAILED ({entry['error'].splitlines()[0]})")
    write_status(plan, status)
