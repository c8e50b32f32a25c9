"""The training commands (fit, validate, test): one LightningCLI subclass using public hooks only.

Configuration mistakes that need both the data and the model settings are caught in
:meth:`VlalignCLI.before_instantiate_classes`, on the parsed config, before any model or data module is built.
The same hook adds the fault-tolerance machinery every run gets (:func:`add_run_machinery`) and turns
``--ckpt_path last`` into the newest checkpoint of the configured run, continuing in its folder
(:mod:`vlalign.training.run_folder`). ``--ckpt_path`` never loads a remote file, and checkpoints are always loaded
with ``weights_only=True``.
"""

from __future__ import annotations

import traceback
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from vlalign.cli.config_checks import check_config
from vlalign.cli.main import TRAINING_COMMANDS
from vlalign.errors import ConfigError, UserError
from vlalign.tasks.pretrain import PretrainRecipe
from vlalign.training.run_folder import find_resume, run_folder_from_config
from vlalign.utils.classes import resolve_class
from vlalign.weights.safe_loading import check_resume_checkpoint

__all__ = [
    "ConfigError",
    "TRAINING_COMMANDS",
    "VlalignCLI",
    "add_run_machinery",
    "check_config",
    "run_training_cli",
]

PREEMPTION_CHECKPOINT = "vlalign.training.fault_tolerance.PreemptionCheckpoint"
ATOMIC_CHECKPOINT_IO = "vlalign.training.fault_tolerance.AtomicCheckpointIO"
LAST_CHECKPOINT = "vlalign.training.run_folder.LastCheckpoint"
DATA_QUALITY_MONITOR = "vlalign.training.data_quality.DataQualityMonitor"
OBJECTIVE_COST_MONITOR = "vlalign.training.objective_cost.ObjectiveCostMonitor"


class VlalignCLI(LightningCLI):
    """Links the tokenizer's vocabulary and the image size between data and model, so each is set once."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - LightningArgumentParser
        parser.link_arguments("model.vision.img_size", "data.init_args.image_size")
        parser.link_arguments("data.vocab", "model.vocab", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001 - LightningArgumentParser, ArgsType
        """Parse ``args`` as given, then refuse checkpoint loading that could run code (before Lightning reads the
        checkpoint's hyper-parameters).

        `vlalign` always passes its command line as ``args``, so Lightning's warning about getting both ``args``
        and ``sys.argv`` does not apply and is not raised.
        """
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            enforce_safe_checkpoint_loading(self.config[subcommand])

    def _parse_ckpt_path(self) -> None:
        """Keep the command line's configuration as given when ``--ckpt_path`` names a file.

        Lightning would merge the checkpoint's hyper-parameters into the config (meant for modules that record
        nothing else). vlalign checkpoints describe their model themselves (``vlalign_model``) and the run's config
        is authoritative; merged, the recorded config objects also could not be written back to ``config.yaml``.
        """

    def check(self, config: Namespace, subcommand: str) -> None:
        """Every cross-setting mistake of the parsed config as one :class:`ConfigError` (pretraining checks here;
        a downstream task's CLI checks its own)."""
        check_config(config, subcommand)

    def before_instantiate_classes(self) -> None:
        """Cross-check data, model and trainer settings on the parsed config (raises :class:`ConfigError`), add the
        run machinery, resolve ``--ckpt_path last``; validate and test write no ``config.yaml``."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.check(config, self.subcommand or "fit")
        add_run_machinery(config.trainer)
        if self.subcommand and config.get("ckpt_path") == "last":
            resume_last(config, continue_run_folder=self.subcommand == "fit")
        if self.subcommand in ("validate", "test"):
            self.save_config_callback = None  # only fit writes config.yaml, into its run folder

    def instantiate_classes(self) -> None:
        """Build data, model and trainer; a range check or a missing file in their ``__init__`` becomes a
        :class:`ConfigError` naming the config section."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, MisconfigurationException) as error:
            user_error = instantiation_error(error)
            if user_error is None:
                raise
            raise user_error from error


# -- checkpoint loading ------------------------------------------------------------------------------------------------
def enforce_safe_checkpoint_loading(config: Namespace) -> None:
    """``--weights_only`` is forced to True (``false`` is refused); ``--ckpt_path`` must be a local checkpoint."""
    if "weights_only" in config:
        if config.weights_only is False:
            raise ConfigError(
                "--weights_only false would unpickle the checkpoint, running any code it carries; vlalign loads "
                "checkpoints with weights_only=True only. Leave out --weights_only (vlalign's checkpoints load with it)"
            )
        config.weights_only = True
    ckpt_path = config.get("ckpt_path")
    if ckpt_path is not None:
        check_resume_checkpoint(str(ckpt_path))


def resume_last(config: Namespace, continue_run_folder: bool) -> None:
    """``--ckpt_path last``: the newest ``last.ckpt`` of the configured run; fit continues in its run folder.

    Raises:
        ConfigError: nothing to resume (where it looked, how to start afresh).
    """
    folder = run_folder_from_config(config.trainer.as_dict())
    resume = find_resume(folder)
    check_resume_checkpoint(resume.checkpoint)
    config.ckpt_path = str(resume.checkpoint)
    if continue_run_folder and resume.version is not None:
        _set_logger_version(config.trainer, resume.version)
    step = "" if resume.global_step is None else f" (global step {resume.global_step})"
    where = (
        f"; logs and checkpoints continue in {resume.checkpoint.parent.parent}" if resume.version is not None else ""
    )
    rank_zero_info(f"--ckpt_path last: resuming {resume.checkpoint}{step}{where}")


def _set_logger_version(trainer: Namespace, version: int | str) -> None:
    """Point the (first) logger at an existing run folder; Lightning's default logger becomes explicit."""
    loggers = trainer.get("logger")
    logger = loggers[0] if isinstance(loggers, list) and loggers else loggers
    if logger is None or logger is True:
        trainer.logger = Namespace(
            class_path="lightning.pytorch.loggers.TensorBoardLogger",
            init_args=Namespace(save_dir=str(trainer.get("default_root_dir") or "."), name="lightning_logs"),
        )
        logger = trainer.logger
    init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
    if isinstance(init_args, Namespace):
        init_args.version = version


# -- the machinery every run gets ------------------------------------------------------------------------------------
def _entries(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _is_a(entry: Any, base: type) -> bool:
    class_path = entry.get("class_path") if isinstance(entry, Namespace) else None
    if class_path is None:
        return isinstance(entry, base)
    cls = resolve_class(class_path)
    return cls is not None and issubclass(cls, base)


def add_run_machinery(trainer: Namespace) -> None:
    """Add what every run needs unless configured already, so no config has to list it.

    - :class:`~vlalign.training.run_folder.LastCheckpoint` (when checkpointing is enabled): ``last.ckpt`` is the
      newest step. It takes over ``save_last`` of the configured ModelCheckpoints (which is turned off: with a
      monitored metric it only copied the best), with the ``dirpath`` and ``every_n_train_steps`` of the first.
    - :class:`~vlalign.training.fault_tolerance.PreemptionCheckpoint`: SIGTERM / SIGUSR1 save ``last.ckpt`` and
      exit 143 / 138 (a configured one without ``filename`` also saves ``last.ckpt``).
    - :class:`~vlalign.training.data_quality.DataQualityMonitor`: skipped samples logged per reason and per epoch.
    - :class:`~vlalign.training.objective_cost.ObjectiveCostMonitor`: per-objective time and memory, one batch in
      10 (list one with ``init_args: {every_n_steps: N}`` to change that; 0 turns it off).
    - :class:`~vlalign.training.fault_tolerance.AtomicCheckpointIO`, unless another checkpoint IO plugin is set.
    """
    from lightning.fabric.plugins import CheckpointIO
    from lightning.pytorch.callbacks import ModelCheckpoint

    from vlalign.training.data_quality import DataQualityMonitor
    from vlalign.training.fault_tolerance import PreemptionCheckpoint
    from vlalign.training.objective_cost import ObjectiveCostMonitor
    from vlalign.training.run_folder import LastCheckpoint

    callbacks = _entries(trainer.get("callbacks"))
    if trainer.get("enable_checkpointing") is not False and not any(_is_a(c, LastCheckpoint) for c in callbacks):
        takes_over = [c for c in callbacks if _is_a(c, ModelCheckpoint) and c.get("init_args.save_last")]
        dirpath = takes_over[0].init_args.get("dirpath") if takes_over else None
        every = takes_over[0].init_args.get("every_n_train_steps") if takes_over else None
        for entry in takes_over:
            entry.init_args.save_last = False
        callbacks.append(
            Namespace(class_path=LAST_CHECKPOINT, init_args=Namespace(dirpath=dirpath, every_n_train_steps=every))
        )
    preemption = [c for c in callbacks if _is_a(c, PreemptionCheckpoint)]
    for entry in preemption:
        if isinstance(entry, Namespace) and entry.get("init_args.filename") is None:
            entry.init_args = entry.get("init_args") or Namespace()
            entry.init_args.filename = "last"
    if not preemption:
        callbacks.append(Namespace(class_path=PREEMPTION_CHECKPOINT, init_args=Namespace(filename="last")))
    if not any(_is_a(c, DataQualityMonitor) for c in callbacks):
        callbacks.append(Namespace(class_path=DATA_QUALITY_MONITOR))
    if not any(_is_a(c, ObjectiveCostMonitor) for c in callbacks):
        callbacks.append(Namespace(class_path=OBJECTIVE_COST_MONITOR))
    trainer.callbacks = callbacks
    plugins = _entries(trainer.get("plugins"))
    if not any(_is_a(p, CheckpointIO) for p in plugins):
        plugins.append(Namespace(class_path=ATOMIC_CHECKPOINT_IO))
    trainer.plugins = plugins


# -- errors while building ---------------------------------------------------------------------------------------------
def instantiation_error(error: BaseException) -> UserError | None:
    """The user error behind an exception raised while building data, model or trainer, or None for a bug.

    jsonargparse wraps what an ``__init__`` raised (``__cause__``); the innermost exception decides: a
    :class:`UserError` as is, a ``ValueError`` / ``FileNotFoundError`` / Lightning misconfiguration as a
    :class:`ConfigError` naming the section (``model``, ``data``, ``trainer``) and the class that refused.
    """
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, UserError):
        return root
    if not isinstance(root, (ValueError, FileNotFoundError, MisconfigurationException)):
        return None
    section, cls = _raising_section(root)
    return ConfigError(f"{section} ({cls}): {root}")


def _raising_section(error: BaseException) -> tuple[str, str]:
    """The config section whose class raised ``error`` (from the ``__init__`` frames it passed), and that class."""
    from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
    from lightning.pytorch.loggers import Logger

    sections = (
        (LightningModule, "model"),
        (LightningDataModule, "data"),
        (Trainer, "trainer"),
        (Callback, "trainer.callbacks"),
        (Logger, "trainer.logger"),
    )
    first: type | None = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self") if frame.f_code.co_name in ("__init__", "__post_init__") else None
        if owner is None:
            continue
        first = first or type(owner)
        for base, section in sections:
            if isinstance(owner, base):
                return section, type(owner).__name__
    if first is None:
        return "configuration", type(error).__name__
    section = "model" if first.__module__.startswith(("vlalign.objectives", "vlalign.models")) else "configuration"
    return section, first.__name__


def run_training_cli(args: list[str]) -> VlalignCLI:
    from lightning.pytorch import LightningDataModule

    return VlalignCLI(
        PretrainRecipe,
        LightningDataModule,
        subclass_mode_data=True,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )
