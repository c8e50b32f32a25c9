"""Fault tolerance for long runs: non-finite losses, RNG state in checkpoints, atomic checkpoint files, preemption.

- :class:`NonFiniteGuard` (used by the recipe): steps with a NaN / infinite loss are skipped and counted; a run of
  them stops training with a checkpoint (``nonfinite-stop.ckpt``) and :class:`NonFiniteLossError`.
- :class:`GoodCheckpoints`: only *good* checkpoints are written (see there): ``last.ckpt`` and every other save keep
  the last finite weights when training blows up; only the forensic ``nonfinite-stop.ckpt`` holds the bad state.
- :func:`capture_rng_states` / :func:`restore_rng_states`: the global generators travel with checkpoints, so a
  resumed run draws the same random numbers (dropout, ITM negatives) as an uninterrupted one.
- :class:`AtomicCheckpointIO`: a checkpoint file is either the previous one or the new one, never half written;
  temporary files that a killed save left behind are removed (:func:`remove_stale_temp_files`).
- :func:`prepare_checkpointing`: called by the recipe when fitting starts (good-checkpoint filter, stale temp files).
- :class:`PreemptionCheckpoint`: SIGTERM (and SIGUSR1) checkpoints at the next batch end, then exits.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import socket
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from contextlib import suppress
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from vlalign.errors import ConfigError

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

NONFINITE_CHECKPOINT = "nonfinite-stop.ckpt"
RNG_STATE_KEY = "vlalign_rng_states"
#: Checkpoint entry the recipe writes: ``{"streak": consecutive non-finite steps, "forensic": is nonfinite-stop}``.
NONFINITE_STATE_KEY = "vlalign_nonfinite_state"


def checkpoint_dir(trainer: L.Trainer) -> str:
    """The run's checkpoint directory: the first ModelCheckpoint's, else ``<log dir>/checkpoints``."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return str(callback.dirpath)
    return os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")


# -- non-finite losses -----------------------------------------------------------------------------------------------
class NonFiniteLossError(RuntimeError):
    """Training stopped after too many consecutive steps with a non-finite loss."""


class _HostMirror:
    """The latest value of a small device tensor that the host can read without waiting for the device.

    On the CPU a pushed tensor is read at once. On CUDA it is copied without blocking into pinned memory (a few
    buffers, reused) and becomes the latest value once the copy's event has completed, usually a step later; a
    push while every buffer is in flight is dropped (the next one carries a newer value).
    """

    def __init__(self, slots: int = 4) -> None:
        self.slots = slots
        self.latest: list[int] | None = None
        self._free: list[Tensor] = []
        self._in_flight: deque[tuple[Tensor, Any]] = deque()

    def push(self, value: Tensor) -> None:
        if value.device.type != "cuda":
            self.latest = value.tolist()
            return
        self.poll()
        if not self._free:
            if len(self._in_flight) >= self.slots:
                return
            self._free.append(torch.empty(value.shape, dtype=value.dtype, pin_memory=True))
        host = self._free.pop()
        host.copy_(value, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._in_flight.append((host, event))

    def poll(self) -> list[int] | None:
        while self._in_flight and self._in_flight[0][1].query():
            host, _ = self._in_flight.popleft()
            self.latest = host.tolist()
            self._free.append(host)
        return self.latest


class NonFiniteGuard:
    """Decides, once per training step, whether the total loss is finite, and keeps the counts.

    A non-finite step is skipped: no parameter update, no EMA update, no queue write. The step counter and the
    learning-rate schedule still advance, as with a mixed-precision overflow step. Two ways to skip:

    - **on the host** (:meth:`is_finite`, :meth:`skip`, :meth:`finite_step`): the flag is read on the host, one
      sync per step; ``training_step`` returns None, so Lightning runs no backward and the optimizer finds no
      gradient.
    - **on the device** (:meth:`record_on_device`): the flag stays a device tensor. The caller gates the update
      with it (fused AdamW's ``found_inf``, gated EMA and queue writes) and the counters are device tensors too,
      read on the host only when logged, checkpointed or when the run stops. :attr:`exceeded` reads a copy that
      arrives without waiting (on CUDA usually one step later, so a stop may come one or two steps after the
      limit; the message reports the streak as it was when the limit was reached).

    ``total``, ``consecutive`` and ``objectives`` are exact in both modes (a host read of the device counters).
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        if max_consecutive < 1:
            raise ConfigError(f"model.max_consecutive_nonfinite must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self._total = 0  # skipped steps over the run (checkpointed)
        self._consecutive = 0
        self._objectives: Counter[str] = Counter()  # objectives with a non-finite loss in the current streak
        self.saving_forensic = False  # True while stop() writes nonfinite-stop.ckpt
        # device mode: int64 [total, consecutive, limit reached, K streak counts, K counts when the limit was reached]
        self._state: Tensor | None = None
        self._names: tuple[str, ...] = ()
        self._mirror = _HostMirror()
        self._at_limit: Counter[str] | None = None  # the streak's objectives when the limit was reached (device)

    # -- counts, exact in both modes --------------------------------------------------------------------------------
    def _pull(self) -> None:
        """Copy the device counters into the host fields (a host read: logging / checkpoint / stop time only)."""
        if self._state is None:
            return
        values = self._state.tolist()
        k = len(self._names)
        self._total, self._consecutive = values[0], values[1]
        self._objectives = Counter({n: c for n, c in zip(self._names, values[3 : 3 + k], strict=True) if c})

    def _to_host_mode(self) -> None:
        if self._state is None:
            return
        self._pull()
        self._state = None
        self._mirror = _HostMirror()
        self._at_limit = None

    @property
    def total(self) -> int:
        self._pull()
        return self._total

    @total.setter
    def total(self, value: int) -> None:  # a resumed run's count (the device counters restart from the host's)
        self._to_host_mode()
        self._total = int(value)

    @property
    def consecutive(self) -> int:
        self._pull()
        return self._consecutive

    @property
    def objectives(self) -> Counter[str]:
        self._pull()
        return self._objectives

    # -- on the host ------------------------------------------------------------------------------------------------
    def is_finite(self, total: Tensor, trainer: L.Trainer | None) -> bool:
        """One host sync per step; under DDP all ranks agree, so they all skip together (no hanging all-reduce)."""
        return bool(self._finite_flag(total, trainer).item())

    @staticmethod
    def _finite_flag(total: Tensor, trainer: L.Trainer | None) -> Tensor:
        finite = torch.isfinite(total.detach()).all()
        if trainer is not None and trainer.world_size > 1:
            finite = trainer.strategy.reduce(finite.float(), reduce_op="min") > 0
        return finite

    def skip(self, losses: dict[str, Tensor]) -> None:
        """Count a skipped step and note which objectives went non-finite (the recipe rolls their state back)."""
        self._to_host_mode()
        self._total += 1
        self._consecutive += 1
        bad = [name for name, loss in losses.items() if not bool(torch.isfinite(loss.detach()).all())]
        self._objectives.update(bad or (["the weighted sum"] if losses else []) or ["another rank"])

    def finite_step(self) -> None:
        self._to_host_mode()
        self._consecutive = 0
        self._objectives.clear()

    # -- on the device ----------------------------------------------------------------------------------------------
    def record_on_device(self, total: Tensor, losses: dict[str, Tensor], trainer: L.Trainer | None) -> Tensor:
        """Count this step on the device and return whether it is applied (a 0-dim bool tensor: all ranks'
        totals finite). Nothing is read on the host; the caller gates the update with the flag."""
        finite = self._finite_flag(total, trainer)
        names = (*losses, "the weighted sum") if losses else ("another rank",)
        if self._state is None or names != self._names or self._state.device != finite.device:
            self._pull()
            counts = [self._objectives.get(n, 0) for n in names]
            at_limit = int(self._consecutive >= self.max_consecutive)
            host = [self._total, self._consecutive, at_limit, *counts, *counts]
            self._names, self._mirror, self._at_limit = names, _HostMirror(), None
            self._state = torch.tensor(host, dtype=torch.long).to(finite.device)
        state, k = self._state, len(names)
        skipped = (~finite).long()
        if losses:
            bad = torch.stack([~torch.isfinite(loss.detach()).all() for loss in losses.values()])
            flags = torch.cat([bad, ~bad.any().reshape(1)]).long()
        else:
            flags = torch.ones(1, dtype=torch.long, device=state.device)
        counts = (state[3 : 3 + k] + flags * skipped) * skipped  # a finite step ends the streak
        consecutive = (state[1] + 1) * skipped
        limit = state[2] | (consecutive >= self.max_consecutive).long()
        at_limit = torch.where(state[2] > 0, state[3 + k :], counts)  # frozen once the limit is reached
        state.copy_(torch.cat([(state[0] + skipped).reshape(1), consecutive.reshape(1), limit.reshape(1), counts,
                               at_limit]))  # fmt: skip
        self._mirror.push(state)
        return finite

    def logged_total(self) -> Tensor | float:
        """The skipped-step count to log: a device tensor in device mode (no host read), else a float."""
        return self._state[0].float() if self._state is not None else float(self._total)

    @property
    def exceeded(self) -> bool:
        """Whether the streak reached ``max_consecutive`` (device mode: as far as the host has seen, no wait)."""
        if self._state is None:
            return self._consecutive >= self.max_consecutive
        seen = self._mirror.poll()
        if seen is None or not seen[2]:
            return False
        k = len(self._names)
        self._at_limit = Counter({n: c for n, c in zip(self._names, seen[3 + k :], strict=True) if c})
        return True

    def checkpoint_state(self) -> dict[str, Any]:
        """The :data:`NONFINITE_STATE_KEY` entry of a checkpoint saved now (read by :class:`GoodCheckpoints`)."""
        return {"streak": self.consecutive, "forensic": self.saving_forensic}

    def stop(self, trainer: L.Trainer) -> NoReturn:
        """Checkpoint (collectively, every rank calls this) and raise :class:`NonFiniteLossError`.

        ``nonfinite-stop.ckpt`` holds the state at the stop, for inspection; the error names the last good
        checkpoint (see :class:`GoodCheckpoints`) as the one to resume from.
        """
        path = os.path.join(checkpoint_dir(trainer), NONFINITE_CHECKPOINT)
        self.saving_forensic = True
        try:
            trainer.save_checkpoint(path)
        finally:
            self.saving_forensic = False
        if self._at_limit is not None:  # device mode: the streak as it was when the limit was reached
            streak, objectives = self.max_consecutive, self._at_limit
        else:
            streak, objectives = self.consecutive, self.objectives
        names = ", ".join(f"{name} ({count} steps)" for name, count in objectives.most_common())
        good = trainer.strategy.broadcast(last_good_checkpoint(trainer))  # rank zero writes, so it knows
        if good is not None:
            where, step = good
            at = f" (global step {step})" if step is not None else ""
            resume = (
                f"The last good checkpoint (finite loss, finite weights and optimizer state, outside a non-finite "
                f"streak) is {where}{at}: resume from it with --ckpt_path {where} after lowering the learning rate, "
                "checking the data, or switching to bf16 / fp32 precision."
            )
        else:
            resume = (
                "No good checkpoint was saved before the non-finite steps: lower the learning rate, check the data, "
                "or switch to bf16 / fp32 precision, then start again."
            )
        raise NonFiniteLossError(
            f"{streak} consecutive training steps had a non-finite (NaN or infinite) loss, the limit set by "
            f"model.max_consecutive_nonfinite; non-finite objective losses: {names}. Skipped steps so far: "
            f"{self.total}. Stopped at global step {trainer.global_step}; the state at the stop, for inspection "
            f"only: {path}. {resume}"
        )


# -- RNG state ---------------------------------------------------------------------------------------------------------
def capture_rng_states() -> dict[str, Any]:
    """The global torch (CPU and current CUDA device), Python and NumPy generator states, checkpoint-safe types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # the current device only: the others belong to other ranks
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


# -- good checkpoints --------------------------------------------------------------------------------------------------
def nonfinite_tensors(checkpoint: Mapping[str, Any], limit: int = 5) -> list[str]:
    """Names of (up to ``limit``) floating-point tensors with a NaN / inf in the checkpoint's model state
    (``state_dict``) and optimizer states; one host sync per device, at save time only."""
    named: list[tuple[str, Tensor]] = []
    state = checkpoint.get("state_dict")
    if isinstance(state, Mapping):
        named += [(str(k), v) for k, v in state.items() if isinstance(v, Tensor)]
    for i, optimizer in enumerate(checkpoint.get("optimizer_states") or []):
        per_param = optimizer.get("state", {}) if isinstance(optimizer, Mapping) else {}
        for param, values in per_param.items():
            if isinstance(values, Mapping):
                named += [(f"optimizer {i} state of parameter {param}: {k}", v) for k, v in values.items()
                          if isinstance(v, Tensor)]  # fmt: skip
    named = [(name, t) for name, t in named if (t.is_floating_point() or t.is_complex()) and t.numel()]
    by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
    for name, tensor in named:
        by_device.setdefault(tensor.device, []).append((name, tensor))
    bad: list[str] = []
    for group in by_device.values():
        flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in group]).cpu()
        bad += [name for (name, _), ok in zip(group, flags.tolist(), strict=True) if not ok]
    return bad[:limit]


def checkpoint_problem(checkpoint: Mapping[str, Any]) -> str | None:
    """Why ``checkpoint`` is not good (see :class:`GoodCheckpoints`), or None when it is."""
    state = checkpoint.get(NONFINITE_STATE_KEY)
    streak = int(state.get("streak", 0)) if isinstance(state, Mapping) else 0
    if streak > 0:
        return f"the last {streak} training step(s) had a non-finite loss"
    bad = nonfinite_tensors(checkpoint)
    if bad:
        return f"non-finite values in {', '.join(bad)}"
    return None


class GoodCheckpoints:
    """Lets only *good* checkpoints be written, so a blow-up never overwrites ``last.ckpt`` (or any other file).

    A checkpoint is **good** when, at the moment it is saved, (1) the last training step had a finite loss: no
    streak of non-finite steps is in progress (the recipe's :data:`NONFINITE_STATE_KEY` entry), and (2) every
    floating-point tensor of the model state and of the optimizer states is finite. A save that is not good is
    skipped with a warning and the file on disk keeps the last good state; while saves are being skipped, the
    removals of older checkpoints that Lightning's ModelCheckpoint makes after a save are skipped too, so the good
    files stay. The forensic ``nonfinite-stop.ckpt`` (the recipe marks it) is always written and is never the good
    one. Weights that grew huge but stay finite after a finite-loss step are not detected here: the next step's
    non-finite loss starts a streak, so that step and later ones are not saved, but a save made in between is.

    Used by :class:`AtomicCheckpointIO` and :class:`GoodCheckpointIO` (which wraps any other checkpoint IO).

    Attributes:
        last_good: path of the newest good checkpoint written by this process, with its global step.
        last_refused: (path, reason) of the last save skipped, cleared by the next save that is written.
    """

    def __init__(self) -> None:
        self.last_good: tuple[str, int | None] | None = None
        self.last_refused: tuple[str, str] | None = None

    def admit(self, checkpoint: Mapping[str, Any], path: _PATH) -> bool:
        """True when ``checkpoint`` may be written to ``path``; records good saves and warns about skipped ones."""
        state = checkpoint.get(NONFINITE_STATE_KEY)
        if isinstance(state, Mapping) and state.get("forensic"):
            return True
        try:
            problem = checkpoint_problem(checkpoint)
        except Exception as err:  # noqa: BLE001 - e.g. sharded tensors: never lose a save to the check itself
            log.warning("could not check checkpoint %s for non-finite values (%s); saving it", path, err)
            problem = None
        if problem is not None:
            self.last_refused = (str(path), problem)
            kept = f"; the last good checkpoint is {self.last_good[0]}" if self.last_good else ""
            log.warning("not saving checkpoint %s: %s%s", path, problem, kept)
            return False
        self.last_refused = None
        step = checkpoint.get("global_step")
        self.last_good = (str(path), int(step) if isinstance(step, int) else None)
        return True

    def admit_removal(self, path: _PATH) -> bool:
        """Removals of older checkpoints wait until a good checkpoint has been written again."""
        if self.last_refused is None:
            return True
        log.info("keeping checkpoint %s: the newer one was not saved (%s)", path, self.last_refused[1])
        return False


class GoodCheckpointIO(CheckpointIO):
    """Wraps a checkpoint IO that does not filter saves itself, with :class:`GoodCheckpoints`."""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner
        self.good_checkpoints = GoodCheckpoints()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if self.good_checkpoints.admit(checkpoint, path):
            self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: _PATH) -> None:
        if self.good_checkpoints.admit_removal(path):
            self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def good_checkpoints(trainer: L.Trainer) -> GoodCheckpoints | None:
    """The filter of the trainer's checkpoint IO, if it has one."""
    return getattr(trainer.strategy.checkpoint_io, "good_checkpoints", None)


def last_good_checkpoint(trainer: L.Trainer) -> tuple[str, int | None] | None:
    """The newest good checkpoint: written by this process, else the one training resumed from (``ckpt_path``)."""
    gate = good_checkpoints(trainer)
    if gate is not None and gate.last_good is not None:
        return gate.last_good
    resumed = getattr(trainer, "ckpt_path", None)
    return (str(resumed), None) if resumed else None


def prepare_checkpointing(trainer: L.Trainer) -> None:
    """When fitting starts: filter saves with :class:`GoodCheckpoints` (wrapping the checkpoint IO unless it is
    :class:`AtomicCheckpointIO` or already filtered), and remove stale temporary files of the checkpoint folders."""
    if good_checkpoints(trainer) is None:
        trainer.strategy.checkpoint_io = GoodCheckpointIO(trainer.strategy.checkpoint_io)
    folders = checkpoint_dirs(trainer)  # on every rank: without a ModelCheckpoint it reads trainer.log_dir, a broadcast
    if trainer.is_global_zero:
        for directory in folders:
            remove_stale_temp_files(directory)


def checkpoint_dirs(trainer: L.Trainer) -> list[str]:
    """Every local folder the run's checkpoint callbacks write to, and :func:`checkpoint_dir`."""
    folders = [checkpoint_dir(trainer)]
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        dirpath = getattr(callback, "dirpath", None)
        if isinstance(dirpath, (str, os.PathLike)) and str(dirpath) not in folders:
            folders.append(str(dirpath))
    return [os.path.expanduser(f) for f in folders if "://" not in str(f)]


# -- atomic checkpoint files -------------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    with suppress(OSError):  # not every filesystem lets a directory be opened and synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"


#: ``.<target>.atomic-<host>-<pid>-<random>.tmp``: the temporary files of :class:`AtomicCheckpointIO`.
TEMP_FILE = re.compile(r"^\.(?P<target>.+)\.atomic-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)-(?P<random>[a-z0-9_]+)\.tmp$")
#: Temporary files of earlier versions (``.<name>.ckpt.<8 random>.tmp``), which carry no owner.
LEGACY_TEMP_FILE = re.compile(r"^\.(?P<target>.+\.ckpt)\.(?P<random>[a-z0-9_]{8})\.tmp$")
#: Allowance for clocks of other hosts (shared filesystems) when a temp file's owner cannot be checked.
CLOCK_SKEW_S = 120.0


def _boot_time() -> float | None:
    with suppress(OSError, ValueError), open("/proc/stat") as handle:
        for line in handle:
            if line.startswith("btime "):
                return float(line.split()[1])
    return None


def _pid_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch, about 1 s precision; Linux), or None if unknown."""
    boot = _boot_time()
    if boot is None:
        return None
    with suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5): starttime
    return None


_PROCESS_START = _pid_start_time(os.getpid()) or time.time()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return True  # unknown: keep the file
    return True


def is_stale_temp_file(path: Path, in_flight: Iterable[str] = ()) -> bool:
    """Whether ``path`` is a temporary file of :class:`AtomicCheckpointIO` that no live writer owns.

    Own-format names carry the writer's host and pid. On this host the file is stale when that process is gone,
    or when the process with that pid started after the file was last written (a reused pid, e.g. in a
    container). Files of other hosts, and the owner-less names of earlier versions, are stale when they were last
    written before this process started (less :data:`CLOCK_SKEW_S`): a live save keeps its file's time current.
    Files being written by this process (``in_flight``) are never stale; nothing else is ever matched.
    """
    name = path.name
    match = TEMP_FILE.match(name)
    if match is None and LEGACY_TEMP_FILE.match(name) is None:
        return False
    if str(path) in set(in_flight):
        return False
    try:
        modified = path.stat().st_mtime
    except OSError:
        return False
    if match is not None and match["host"] == _host_tag():
        pid = int(match["pid"])
        if not _pid_alive(pid):
            return True
        started = _pid_start_time(pid)
        return started is not None and started > modified + 2.0  # /proc times are precise to about a second
    return modified < _PROCESS_START - CLOCK_SKEW_S


def remove_stale_temp_files(directory: str | Path, in_flight: Iterable[str] = ()) -> list[Path]:
    """Delete the stale temporary files (:func:`is_stale_temp_file`) in ``directory``; returns what was removed."""
    directory = Path(directory)
    removed: list[Path] = []
    flying = {str(p) for p in in_flight}
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        if entry.name.endswith(".tmp") and entry.is_file(follow_symlinks=False) and is_stale_temp_file(path, flying):
            with suppress(FileNotFoundError):
                size = path.stat().st_size
                path.unlink()
                removed.append(path)
                log.info("removed %s (%.1f MB), left by an interrupted checkpoint save", path, size / 2**20)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file next to its target, syncs it to disk, then renames it into place.

    A crash or kill at any moment leaves the previous file (``last.ckpt``) intact. Lightning's default writer
    stages through ``/tmp`` and moves the file, which degrades to a non-atomic copy when ``/tmp`` is another
    filesystem (the usual case on clusters) and never syncs; it also holds the whole checkpoint in memory twice.
    Remote paths (``s3://`` ...) use Lightning's writer.

    The temporary file is ``.<name>.atomic-<host>-<pid>-<random>.tmp``; one that a killed save left behind is
    removed at the next save into the same folder and when training starts (:func:`remove_stale_temp_files`:
    only files of this pattern whose writer is gone). Saves are filtered by :class:`GoodCheckpoints`
    (``good_checkpoints``): only good checkpoints and the forensic ``nonfinite-stop.ckpt`` are written.
    """

    def __init__(self) -> None:
        super().__init__()
        self.good_checkpoints = GoodCheckpoints()
        self._in_flight: set[str] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if not self.good_checkpoints.admit(checkpoint, path):
            return
        target = str(path)
        if target.startswith("file://"):
            target = target[len("file://") :]
        elif "://" in target:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options for local paths")
        final = Path(target)
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(final.parent, self._in_flight)
        prefix = f".{final.name}.atomic-{_host_tag()}-{os.getpid()}-"
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=final.parent)
        self._in_flight.add(tmp)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
            os.replace(tmp, final)  # atomic on POSIX; replaces a symlink (save_last="link") rather than its target
        except BaseException:
            with suppress(OSError):
                os.remove(tmp)
            raise
        finally:
            self._in_flight.discard(tmp)
        _fsync_dir(final.parent)

    def remove_checkpoint(self, path: _PATH) -> None:
        if self.good_checkpoints.admit_removal(path):
            super().remove_checkpoint(path)


# -- preemption --------------------------------------------------------------------------------------------------------
class PreemptionCheckpoint(Callback):
    """Checkpoint and exit when the scheduler asks the job to stop (SIGTERM; also SIGUSR1 unless Lightning's SLURM
    auto-requeue handles it).

    The signal handler only sets a flag; at the end of the batch in progress the callback saves a checkpoint and
    leaves with ``SystemExit(exit_code)`` before validation or epoch-end hooks could run. The checkpoint is the
    ModelCheckpoint's ``last.ckpt`` when it has ``save_last``, so ``--ckpt_path last`` resumes from it; otherwise
    ``<checkpoint dir>/preempted.ckpt``. Under DDP every rank checks the flag of all ranks after each batch (one
    tiny all-reduce), so all of them save and stop at the same step.

    Args:
        filename: checkpoint file name without ``.ckpt``; default as described above.
        exit_code: the process's exit status after saving; default ``128 + signal number`` (143 for SIGTERM), the
            status of a process killed by that signal, so schedulers do not mistake the stop for a finished run.
    """

    def __init__(self, filename: str | None = None, exit_code: int | None = None) -> None:
        self.filename = filename
        self.exit_code = exit_code
        self.received: int | None = None
        self._trainer: L.Trainer | None = None
        self._previous: dict[int, Any] = {}

    # Installed when training starts: after Lightning's own handlers, which are replaced for the run (Lightning's
    # SIGTERM handler would raise at the next step without a checkpoint) and restored by its teardown.
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        if trainer.received_sigterm:
            self.received = signal.SIGTERM
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionCheckpoint: not in the main thread, signal handlers not installed")
            return
        signals = [signal.SIGTERM]
        environment = trainer._accelerator_connector.cluster_environment
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            signals.append(signal.SIGUSR1)
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        self.received = signum
        launcher = self._trainer.strategy.launcher if self._trainer is not None else None
        if first and launcher is not None:
            launcher.kill(signum)  # processes Lightning started itself (DDP ranks) get the signal too

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        requested = self.received is not None
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        signum = self.received or signal.SIGTERM
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        name = signal.Signals(signum).name
        gate = good_checkpoints(trainer)
        if gate is not None and gate.last_refused is not None and gate.last_refused[0] == str(path):
            good = last_good_checkpoint(trainer)
            resume = f"resume from the last good checkpoint: --ckpt_path {good[0]}" if good else "no good checkpoint"
            rank_zero_info(f"{name}: not saving {path} ({gate.last_refused[1]}); stopping ({resume})")
        else:
            rank_zero_info(f"{name}: saved {path} at global step {trainer.global_step}; stopping (resume: --ckpt_path)")
        self._restore_handlers()
        raise SIGTERMException(self.exit_code if self.exit_code is not None else 128 + signum)

    def checkpoint_path(self, trainer: L.Trainer) -> str:
        last = next(
            (c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.save_last and c.dirpath),
            None,
        )
        if self.filename is None and last is not None:
            return os.path.join(str(last.dirpath), last.CHECKPOINT_NAME_LAST + last.FILE_EXTENSION)
        return os.path.join(checkpoint_dir(trainer), (self.filename or "preempted") + ".ckpt")

    def _restore_handlers(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:  # Lightning's teardown may have restored it already
                signal.signal(signum, previous)
        self._previous = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()
