"""The folder a training run writes into, the checkpoint it resumes from, and the checkpoint of its final step.

A run is ``<save_dir>/<name>/<version>/`` of its logger (``runs/tiny/version_0/``): TensorBoard logs, ``config.yaml``
and ``checkpoints/``. ``vlalign fit --config X --ckpt_path last`` resumes the newest ``last.ckpt`` among the run
folders of that logger and keeps writing logs and checkpoints into the same folder, so after any number of
interruptions the same command continues the same run. The functions here are pure (config dicts and paths in,
decisions out); :mod:`vlalign.cli.train` applies them to the parsed configuration.

- :func:`run_folder_from_config` / :func:`find_resume`: where a configured run writes, and what ``last`` means.
- :class:`LastCheckpoint`: ``last.ckpt`` always holds the newest training step (validation, epoch end, end of fit).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from vlalign.errors import ConfigError
from vlalign.utils.classes import resolve_class

__all__ = [
    "LAST_CHECKPOINT",
    "LastCheckpoint",
    "Resume",
    "RunFolder",
    "find_resume",
    "last_checkpoints",
    "read_global_step",
    "run_checkpoint_dir",
    "run_folder_from_config",
    "version_folder_name",
]

LAST_CHECKPOINT = "last.ckpt"
DEFAULT_LOGGER_NAME = "lightning_logs"  # Lightning's default TensorBoardLogger / CSVLogger name
_LAST_PATTERN = re.compile(r"^last(-v\d+)?\.ckpt$")  # ModelCheckpoint writes last-v1.ckpt next to a foreign last.ckpt


# -- where a run writes -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunFolder:
    """Where a configured fit writes, read from the trainer settings before anything is built.

    Attributes:
        logs: ``<save_dir>/<name>`` of the first logger, holding one folder per version; None without a logger.
        version: the logger's fixed version (``version_3`` for 3, a string as is); None: a new folder per run.
        checkpoint_dir: a fixed checkpoint folder (a checkpoint callback's ``dirpath``); None: ``<run>/checkpoints``.
        default_root_dir: ``trainer.default_root_dir`` (checkpoints go to ``<it>/checkpoints`` without a logger).
        logger: the logger's class path, for messages.
    """

    logs: Path | None
    version: int | str | None
    checkpoint_dir: Path | None
    default_root_dir: Path
    logger: str = ""

    def checkpoint_dirs(self) -> list[Path]:
        """The folders whose ``last.ckpt`` this run may resume from (existing ones, for an unfixed version)."""
        if self.checkpoint_dir is not None:
            return [self.checkpoint_dir]
        if self.logs is None:
            return [self.default_root_dir / "checkpoints"]
        if self.version is not None:
            return [self.logs / version_folder_name(self.version) / "checkpoints"]
        if not self.logs.is_dir():
            return []
        return sorted(path / "checkpoints" for path in self.logs.iterdir() if path.is_dir())

    def where(self) -> str:
        """The checkpoint files looked at, as a glob pattern for messages."""
        if self.checkpoint_dir is not None or self.logs is None or self.version is not None:
            return str(self.checkpoint_dirs()[0] / LAST_CHECKPOINT)
        return str(self.logs / "*" / "checkpoints" / LAST_CHECKPOINT)


@dataclass(frozen=True)
class Resume:
    """The checkpoint ``--ckpt_path last`` stands for, and the logger version that continues its run folder."""

    checkpoint: Path
    version: int | str | None  # None: keep the logger's configured version (fixed, or no versioned logger)
    global_step: int | None


def version_folder_name(version: int | str) -> str:
    """The folder of a logger version, as Lightning names it: ``version_3`` for 3, a string as is."""
    return version if isinstance(version, str) else f"version_{version}"


def _version_of_folder(name: str) -> int | str:
    match = re.fullmatch(r"version_(\d+)", name)
    return int(match.group(1)) if match else name


def _is_subclass(entry: Any, base: type) -> bool:
    cls = resolve_class(entry.get("class_path")) if isinstance(entry, Mapping) else None
    return cls is not None and issubclass(cls, base)


def _init_args(entry: Any) -> Mapping[str, Any]:
    init_args = entry.get("init_args") if isinstance(entry, Mapping) else None
    return init_args if isinstance(init_args, Mapping) else {}


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, Sequence) and not isinstance(value, (str, Mapping)) else [value]


def last_checkpoint_dirpath(callbacks: Any) -> str | None:
    """The configured folder of ``last.ckpt``, by the rule :class:`LastCheckpoint` applies when training starts:
    its own ``dirpath``, else the first ModelCheckpoint's; None: the logger's run folder decides."""
    entries = _as_list(callbacks)
    for entry in entries:
        if _is_subclass(entry, LastCheckpoint) and _init_args(entry).get("dirpath"):
            return str(_init_args(entry)["dirpath"])
    first = next((entry for entry in entries if _is_subclass(entry, ModelCheckpoint)), None)
    dirpath = _init_args(first).get("dirpath") if first is not None else None
    return str(dirpath) if dirpath else None


def run_folder_from_config(trainer: Mapping[str, Any]) -> RunFolder:
    """The run folder of parsed trainer settings (``config.trainer`` as a dict), as Lightning will lay it out."""
    root = Path(str(trainer.get("default_root_dir") or ".")).expanduser()
    dirpath = last_checkpoint_dirpath(trainer.get("callbacks"))
    checkpoint_dir = Path(dirpath).expanduser() if dirpath else None
    loggers = _as_list(trainer.get("logger"))
    logger = loggers[0] if loggers else False
    if logger is False:
        return RunFolder(None, None, checkpoint_dir, root, "no logger")
    if logger is True or logger is None:  # Lightning's default: TensorBoardLogger(default_root_dir, "lightning_logs")
        return RunFolder(root / DEFAULT_LOGGER_NAME, None, checkpoint_dir, root, "the default logger")
    init_args = _init_args(logger)
    save_dir = init_args.get("save_dir") or root
    name = init_args.get("name", DEFAULT_LOGGER_NAME)
    logs = Path(str(save_dir)).expanduser() / ("" if name is None else str(name))
    class_path = str(logger.get("class_path", "")) if isinstance(logger, Mapping) else type(logger).__name__
    return RunFolder(logs, init_args.get("version"), checkpoint_dir, root, class_path)


# -- what `--ckpt_path last` resumes ----------------------------------------------------------------------------------
def last_checkpoints(directory: Path) -> list[Path]:
    """``last.ckpt`` (and ``last-vN.ckpt``) files in ``directory``; none if it does not exist."""
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.iterdir() if _LAST_PATTERN.match(path.name) and path.is_file())


def read_global_step(path: Path) -> int | None:
    """The global step saved in a Lightning checkpoint (``weights_only=True``, memory-mapped); None if unreadable."""
    import torch

    from vlalign.weights.safe_loading import allow_config_classes_in_checkpoints

    allow_config_classes_in_checkpoints()
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - ranked last; loading it for real reports the problem with its path
        return None
    step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    return int(step) if isinstance(step, int) else None


def find_resume(folder: RunFolder) -> Resume:
    """The newest ``last.ckpt`` of the run (latest written; the higher global step on a tie).

    Raises:
        ConfigError: there is nothing to resume; the message says where it looked and how to start afresh.
    """
    candidates = [path for directory in folder.checkpoint_dirs() for path in last_checkpoints(directory)]
    if not candidates:
        raise ConfigError(
            f"--ckpt_path last: nothing to resume, no checkpoint matches {folder.where()} "
            f"(trainer.logger: {folder.logger}). To start a new run, leave out --ckpt_path; to resume another run, "
            "give its checkpoint: --ckpt_path <run folder>/checkpoints/last.ckpt"
        )
    steps = {path: read_global_step(path) for path in candidates}
    newest = max(candidates, key=lambda path: (path.stat().st_mtime_ns, steps[path] if steps[path] is not None else -1))
    scanned = folder.checkpoint_dir is None and folder.logs is not None and folder.version is None
    version = _version_of_folder(newest.parent.parent.name) if scanned else None
    return Resume(newest, version, steps[newest])


# -- which files --ckpt_path may load ---------------------------------------------------------------------------------
def run_checkpoint_dir(trainer: L.Trainer) -> str:
    """The run's checkpoint folder as ModelCheckpoint resolves it: the first ModelCheckpoint's ``dirpath``, else
    ``<save_dir>/<name>/<version>/checkpoints`` of the first logger, else ``<default_root_dir>/checkpoints``."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return str(callback.dirpath)
    if trainer.loggers:
        logger = trainer.loggers[0]
        version = logger.version
        name = version if isinstance(version, str) else f"version_{version}"
        return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), name, "checkpoints")
    return os.path.join(trainer.default_root_dir, "checkpoints")


class LastCheckpoint(Checkpoint):
    """Keeps ``last.ckpt`` at the newest training step, whatever the other checkpoint callbacks decide.

    ``ModelCheckpoint(save_last=True)`` only rewrites ``last.ckpt`` when it saves another checkpoint, so with a
    monitored metric ``last.ckpt`` is the best one and the final weights exist nowhere. This callback saves
    ``last.ckpt`` after every validation during fit (a validation at an epoch's end: at that epoch's end, so that a
    resume starts the next epoch as an uninterrupted run does), at the end of every training epoch, at the end of
    fit, and every ``every_n_train_steps`` optimizer steps, through the trainer (its checkpoint IO, atomic with
    :class:`~vlalign.training.fault_tolerance.AtomicCheckpointIO`), once per step at most. Best checkpoints stay
    the ModelCheckpoint's own files. The ``vlalign`` command adds it to every run that checkpoints, taking over a
    ModelCheckpoint's ``save_last`` (its ``dirpath`` and ``every_n_train_steps``).

    It is a :class:`~lightning.pytorch.callbacks.Checkpoint`, so Lightning runs it after the other callbacks and
    after the ModelCheckpoints it follows: ``last.ckpt`` holds their state of the same step (the best so far).

    Args:
        dirpath: folder of ``last.ckpt``; default the run's checkpoint folder (:func:`run_checkpoint_dir`).
        every_n_train_steps: also save every this many optimizer steps (kill -9 then loses fewer); 0/None: never.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ValueError(f"LastCheckpoint.every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps or 0
        self.path: str | None = None  # set when training starts
        self._saved_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        directory = os.path.expanduser(self.dirpath) if self.dirpath else run_checkpoint_dir(trainer)
        self.path = trainer.strategy.broadcast(os.path.join(directory, LAST_CHECKPOINT))
        self._saved_step = trainer.global_step  # a resumed run has nothing new to save yet

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self.save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # the epoch's end follows: saved there, with the epoch counted as done (resumes the next one)
        self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        """Save ``last.ckpt`` unless this step is saved already (every rank calls it: the save is collective)."""
        if self.path is None or trainer.fast_dev_run or trainer.global_step == self._saved_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the full training state, to resume from
        self._saved_step = trainer.global_step


def output_folder(trainer: L.Trainer, output_dir: str | Path | None = None) -> Path:
    """Where a task writes its files: ``output_dir``, else the run's log folder (``runs/<name>/version_N``), else
    ``default_root_dir``. Unlike ``trainer.log_dir`` it broadcasts nothing, so it is safe in code that runs on rank
    0 only (there ``trainer.log_dir`` waits for the other ranks' broadcast, which never comes)."""
    if output_dir is not None:
        return Path(output_dir)
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    folder = logger.log_dir if isinstance(logger, TensorBoardLogger | CSVLogger) else logger.save_dir
    return Path(folder or trainer.default_root_dir)
