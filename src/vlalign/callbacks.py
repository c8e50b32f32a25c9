"""Fault tolerance for long runs: non-finite losses, RNG state in checkpoints, atomic checkpoint files, preemption.

- :class:`NonFiniteGuard` (used by the recipe): steps with a NaN / infinite loss are skipped and counted; a run of
  them stops training with a checkpoint (``nonfinite-stop.ckpt``) and :class:`NonFiniteLossError`.
- :func:`capture_rng_states` / :func:`restore_rng_states`: the global generators travel with checkpoints, so a
  resumed run draws the same random numbers (dropout, ITM negatives) as an uninterrupted one.
- :class:`AtomicCheckpointIO`: a checkpoint file is either the previous one or the new one, never half written.
- :class:`PreemptionCheckpoint`: SIGTERM (and SIGUSR1) checkpoints at the next batch end, then exits.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

if TYPE_CHECKING:
    from vlalign.objectives.base import Objective

log = logging.getLogger(__name__)

NONFINITE_CHECKPOINT = "nonfinite-stop.ckpt"
RNG_STATE_KEY = "vlalign_rng_states"


def checkpoint_dir(trainer: L.Trainer) -> str:
    """The run's checkpoint directory: the first ModelCheckpoint's, else ``<log dir>/checkpoints``."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return str(callback.dirpath)
    return os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")


# -- non-finite losses -----------------------------------------------------------------------------------------------
class NonFiniteLossError(RuntimeError):
    """Training stopped after too many consecutive steps with a non-finite loss."""


class NonFiniteGuard:
    """Decides, once per training step, whether the total loss is finite, and keeps the counts.

    A non-finite step is skipped by the recipe: ``training_step`` returns None, so Lightning runs no backward and
    the optimizer finds no gradient (parameters unchanged); the EMA update and the queue writes are skipped too.
    The step counter and the learning-rate schedule still advance, as with a mixed-precision overflow step.
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive_nonfinite must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.total = 0  # skipped steps over the run (checkpointed)
        self.consecutive = 0
        self.objectives: Counter[str] = Counter()  # objectives with a non-finite loss in the current streak
        self._marks: dict[str, int] = {}

    def begin_step(self, objectives: Iterable[Objective]) -> None:
        """Remember how many features each objective has pending for its queue, to drop this step's on a skip."""
        self._marks = {o.name: len(o._pending) for o in objectives if isinstance(getattr(o, "_pending", None), list)}

    def is_finite(self, total: Tensor, trainer: L.Trainer | None) -> bool:
        """One host sync per step; under DDP all ranks agree, so they all skip together (no hanging all-reduce)."""
        finite = torch.isfinite(total.detach()).all()
        if trainer is not None and trainer.world_size > 1:
            finite = trainer.strategy.reduce(finite.float(), reduce_op="min")
        return bool(finite.item())

    def skip(self, losses: dict[str, Tensor], objectives: Iterable[Objective]) -> None:
        """Count a skipped step, note which objectives went non-finite and drop its pending queue features."""
        self.total += 1
        self.consecutive += 1
        bad = [name for name, loss in losses.items() if not bool(torch.isfinite(loss.detach()).all())]
        self.objectives.update(bad or (["the weighted sum"] if losses else []) or ["another rank"])
        for objective in objectives:
            if objective.name in self._marks:
                del objective._pending[self._marks[objective.name] :]  # type: ignore[attr-defined]

    def finite_step(self) -> None:
        self.consecutive = 0
        self.objectives.clear()

    @property
    def exceeded(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def stop(self, trainer: L.Trainer) -> NoReturn:
        """Checkpoint (collectively, every rank calls this) and raise :class:`NonFiniteLossError`."""
        path = os.path.join(checkpoint_dir(trainer), NONFINITE_CHECKPOINT)
        trainer.save_checkpoint(path)
        names = ", ".join(f"{name} ({count} steps)" for name, count in self.objectives.most_common())
        raise NonFiniteLossError(
            f"{self.consecutive} consecutive training steps had a non-finite (NaN or infinite) loss, the limit set by "
            f"model.max_consecutive_nonfinite; non-finite objective losses: {names}. Skipped steps so far: "
            f"{self.total}. Stopped at global step {trainer.global_step}; checkpoint: {path}. Lower the learning rate, "
            "check the data, or use bf16 / fp32 precision, then resume from the last good checkpoint."
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


# -- atomic checkpoint files -------------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    with suppress(OSError):  # not every filesystem lets a directory be opened and synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file next to its target, syncs it to disk, then renames it into place.

    A crash or kill at any moment leaves the previous file (``last.ckpt``) intact. Lightning's default writer
    stages through ``/tmp`` and moves the file, which degrades to a non-atomic copy when ``/tmp`` is another
    filesystem (the usual case on clusters) and never syncs; it also holds the whole checkpoint in memory twice.
    Remote paths (``s3://`` ...) use Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
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
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
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
        _fsync_dir(final.parent)


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
