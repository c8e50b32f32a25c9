"""Where the runs execute: one after another in this process's children (``local``), or as a job array through
submitit (``slurm``), each array task running :func:`~vlalign.sweep.runner.execute_run` for one run in the same
folders. submitit is an optional dependency (``pip install 'vlalign[sweep]'``).

Each array task runs one ``vlalign fit`` process, so a run uses the GPUs of one node through a single process
(``gpus_per_node: 1`` is the tested layout). A run that is ``queued`` or ``running`` in a live SLURM job is not
submitted again; anything else that is not done is.

With a warm start, its runs (one per seed) go first: locally they are simply first in the plan; through submitit they
are one job array, and the variants a second array that starts after it (SLURM ``--dependency=afterany:`` on every
warm-start job, submitted now or still live from an earlier submission; ``afterany`` rather than ``afterok`` so that a
variant whose warm start failed still runs its task, which records it failed naming the warm start instead of staying
queued forever). submitit's ``local`` cluster has no dependencies: the sweep waits for the first array there.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vlalign.errors import UserError
from vlalign.sweep.plan import RunPlan
from vlalign.sweep.runner import _now, execute_run, read_status, run_is_done, write_status
from vlalign.sweep.spec import SlurmSpec

__all__ = ["pending_runs", "run_local", "run_slurm_job", "submit_slurm", "sweep_lock"]

LOCK_FILE = ".sweep.lock"


@contextlib.contextmanager
def sweep_lock(out: Path) -> Iterator[None]:
    """One sweep process per folder at a time (an advisory lock on ``OUT/.sweep.lock``)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another `vlalign sweep` is running in {out}; wait for it, or use another --out folder"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM to the sweep behaves like Ctrl-C: the running run is stopped (saving last.ckpt) and recorded."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _job_alive(status: dict[str, Any]) -> bool:
    """Whether the SLURM job a run was queued in is still pending or running (``squeue``)."""
    job_id = status.get("job_id")
    if status.get("status") not in ("queued", "running") or status.get("launcher") != "slurm" or not job_id:
        return False
    if shutil.which("squeue") is None:
        return False
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return bool(out.strip())


def pending_runs(plans: list[RunPlan]) -> tuple[list[RunPlan], list[RunPlan], list[RunPlan]]:
    """``(to run, done, in a live SLURM job)``."""
    todo, done, live = [], [], []
    for plan in plans:
        status = read_status(plan)
        if run_is_done(plan, status):
            done.append(plan)
        elif _job_alive(status):
            live.append(plan)
        else:
            todo.append(plan)
    return todo, done, live


def run_local(plans: list[RunPlan]) -> dict[str, str]:
    """Run ``plans`` one after another; a failed run is recorded and the next one starts. ``variant/seed -> status``.

    Ctrl-C (or SIGTERM) stops the current run, which is recorded as ``interrupted``, and re-raises KeyboardInterrupt.
    """
    outcomes: dict[str, str] = {}
    with _sigterm_interrupts(), tqdm(total=len(plans), desc="sweep", unit="run", dynamic_ncols=True) as bar:
        for index, plan in enumerate(plans, start=1):
            bar.set_postfix_str(plan.label)
            tqdm.write(f"[{index}/{len(plans)}] {plan.label}")
            outcomes[f"{plan.variant}/seed{plan.seed}"] = execute_run(plan, launcher="local", echo=tqdm.write)
            bar.update()
    return outcomes


# -- slurm ---------------------------------------------------------------------------------------------------------------
def run_slurm_job(plan: RunPlan, launcher: str = "slurm") -> str:
    """The function each array task runs (pickled by submitit): one run, recorded with its job id."""
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    if job_id and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{job_id}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    else:
        try:
            import submitit

            job_id = str(submitit.JobEnvironment().job_id)
        except (ImportError, RuntimeError):
            job_id = os.environ.get("SLURM_JOB_ID")
    return execute_run(plan, launcher=launcher, job_id=job_id, echo=lambda text: print(text, flush=True))


def _executor(folder: Path, slurm: SlurmSpec, name: str) -> Any:
    try:
        import submitit
    except ImportError:
        raise UserError(
            "--launcher slurm needs submitit: pip install 'vlalign[sweep]' (or pip install submitit)"
        ) from None
    if slurm.cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserError(
            "--launcher slurm: sbatch is not on this machine's PATH (no SLURM here); submit from a SLURM login node, "
            "or set slurm.cluster: local in the spec to run the job array as local processes"
        )
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=slurm.cluster)
    parameters = {"name": f"vlalign-sweep-{name}", "timeout_min": 240, **slurm.parameters}
    executor.update_parameters(**parameters)
    return executor


def submit_slurm(plans: list[RunPlan], slurm: SlurmSpec, name: str, out: Path, wait: bool = True) -> list[Any]:
    """Submit ``plans`` as one job array (submitit ``map_array``), record each run as ``queued`` with its job id,
    and (``wait``) follow the jobs until they end. Warm-start runs among ``plans`` go in a first array that the
    variants' array depends on (see the module docstring). Returns the submitit jobs."""
    if not plans:
        return []
    executor = _executor(out / "slurm", slurm, name)
    warm = [plan for plan in plans if plan.is_warm_start]
    variants = [plan for plan in plans if not plan.is_warm_start]
    first = _submit_array(executor, warm, slurm, out)
    followed: list[RunPlan] = []
    if warm and slurm.cluster != "slurm":  # no job dependencies off SLURM: the variants start once these are done
        wait_for(first, warm)
        depend = []
    else:
        followed = warm
        depend = [str(job.job_id) for job in first]
    for plan in {p.warm_start.run_dir: p.warm_start for p in variants if p.warm_start is not None}.values():
        status = read_status(plan)
        if _job_alive(status):  # queued or running in a SLURM job (this submission's, or an earlier --no_wait one)
            depend.append(str(status["job_id"]))
    if depend and variants:
        extra = dict(slurm.parameters.get("slurm_additional_parameters") or {})
        extra["dependency"] = "afterany:" + ":".join(dict.fromkeys(depend))
        executor.update_parameters(slurm_additional_parameters=extra)
    second = _submit_array(executor, variants, slurm, out)
    if wait:
        wait_for([*(first if followed else []), *second], [*followed, *variants])
    return [*first, *second]


def _submit_array(executor: Any, plans: list[RunPlan], slurm: SlurmSpec, out: Path) -> list[Any]:
    if not plans:
        return []
    launcher = "slurm" if slurm.cluster == "slurm" else f"submitit-{slurm.cluster}"
    for plan in plans:  # before submitting: a job may start (and finish) before map_array returns
        status = read_status(plan)
        status.update(variant=plan.variant, seed=plan.seed, status="queued", launcher=launcher, job_id=None,
                      queued=_now(), run_dir=str(plan.run_dir))  # fmt: skip
        write_status(plan, status)
    jobs = executor.map_array(functools.partial(run_slurm_job, launcher=launcher), plans)
    for plan, job in zip(plans, jobs, strict=True):
        status = read_status(plan)
        if status.get("status") == "queued" and not status.get("job_id"):
            status["job_id"] = str(job.job_id)
            write_status(plan, status)
    what = "warm-start runs" if plans[0].is_warm_start else "runs"
    tqdm.write(f"submitted {len(jobs)} {what} as job array {jobs[0].job_id.split('_')[0]} (logs: {out / 'slurm'})")
    return jobs


def wait_for(jobs: list[Any], plans: list[RunPlan], poll_s: float = 10.0) -> None:
    """Follow submitted jobs until every one has ended; a job that died without recording its run marks it failed.

    Ctrl-C stops following (the jobs keep running); collect their results later with ``vlalign sweep ... --collect``.
    """
    remaining = dict(enumerate(jobs))
    start = time.monotonic()
    with tqdm(total=len(jobs), desc="jobs", unit="run", dynamic_ncols=True) as bar:
        while remaining:
            for index, job in list(remaining.items()):
                if not job.done():
                    continue
                del remaining[index]
                bar.update()
                plan = plans[index]
                try:
                    outcome = job.result()
                except Exception as err:  # noqa: BLE001 - the job's own failure, recorded for its run
                    status = read_status(plan)
                    if status.get("status") not in ("done", "failed"):
                        status.update(status="failed", error=f"job {job.job_id} failed: {err}", finished=_now())
                        write_status(plan, status)
                    outcome = "failed"
                tqdm.write(f"{plan.label}: {outcome} (job {job.job_id})")
            if remaining:  # every second at first (short jobs), then every poll_s (squeue / sacct are shared)
                time.sleep(1.0 if time.monotonic() - start < 120 else poll_s)
