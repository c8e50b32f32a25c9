"""``vlalign finetune <task>`` and ``vlalign evaluate <task>``: the downstream tasks of :mod:`vlalign.tasks.registry`.

Both run the task's LightningModule and data module through :class:`TaskCLI`, the training CLI
(:class:`~vlalign.cli.train.VlalignCLI`) with the task's classes: the same run folders, forced run machinery
(``last.ckpt``, preemption checkpoints, atomic writes, skipped-sample counts), safe checkpoint loading and
``error:`` messages.

- ``vlalign finetune <task> --config FILE [overrides]``: LightningCLI ``fit``, then ``test`` of the best checkpoint
  (the monitored ModelCheckpoint's; ``last.ckpt`` when nothing is monitored), and ``results.json`` in the run's
  log folder. ``--ckpt_path`` resumes a fine-tuning run (``last``: the newest of the configured run).
- ``vlalign evaluate <task> --model PATH --config FILE [--split val|test] [--out DIR] [overrides]``: LightningCLI
  ``test`` (``validate`` for ``--split val``) of the model ``PATH`` (anything :func:`vlalign.load` accepts, passed
  as ``--model.init_from``), and ``results.json`` in the run folder or ``DIR``.

Without ``--config`` the task's default config (``configs/finetune/``) is used. ``results.json`` holds the task,
the command, the split, the model, the checkpoint tested, the metrics logged under ``<split>/``, the module's own
``results`` (when it keeps any) and the resolved config.

Contract for a task module (see :class:`~vlalign.tasks.registry.TaskSpec`): ``__init__`` takes ``init_from``; when
module and data module both take ``image_size``, ``data.image_size`` is linked into ``model.image_size``; an
optional classmethod ``config_errors(config: dict, subcommand: str) -> list[str]`` checks the parsed config before
anything is built; an optional ``zero_shot`` attribute makes ``finetune`` skip training; an optional ``results``
dict and ``output_dir`` attribute (where the module writes pictures) are used as described above.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_info

from vlalign.cli.train import VlalignCLI
from vlalign.errors import ConfigError
from vlalign.tasks.registry import TaskSpec, get_task, tasks
from vlalign.training.run_folder import output_folder
from vlalign.utils.classes import resolve_class

__all__ = [
    "RESULTS_FILE",
    "TaskCLI",
    "best_checkpoint",
    "evaluate",
    "expand_base_configs",
    "finetune",
    "run_task_command",
]

RESULTS_FILE = "results.json"
SPLITS = {"test": "test", "val": "validate"}


class TaskCLI(VlalignCLI):
    """The training CLI for one downstream task: its module and data module (no ``class_path`` needed in configs),
    the task's own config checks instead of the pretraining ones, and ``results.json`` after testing.

    Args:
        task: the registered task.
        args: LightningCLI arguments, the subcommand first (``fit``, ``test``, ``validate``).
        command: ``finetune`` or ``evaluate`` (recorded in ``results.json``).
        output_dir: folder of ``results.json`` (and the module's pictures); None: the run's log folder.
    """

    def __init__(self, task: TaskSpec, args: list[str], command: str, output_dir: Path | None = None) -> None:
        self.task = task
        self.command = command
        self.output_dir = output_dir
        self.results_file: Path | None = None
        self.results: dict[str, Any] | None = None
        module_class, datamodule_class = resolve_class(task.module), resolve_class(task.datamodule)
        if module_class is None or datamodule_class is None:
            missing = task.module if module_class is None else task.datamodule
            raise ConfigError(f"task {task.name!r}: cannot import {missing}")
        super().__init__(
            module_class,
            datamodule_class,
            subclass_mode_model=False,
            subclass_mode_data=False,
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": f"vlalign {command} {task.name}"},
            args=args,
            auto_configure_optimizers=False,
        )

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - LightningArgumentParser
        """One image size: ``data.image_size`` feeds ``model.image_size`` when both classes take one."""
        model_args = inspect.signature(self.model_class.__init__).parameters
        data_args = inspect.signature(self.datamodule_class.__init__).parameters
        if "image_size" in model_args and "image_size" in data_args:
            parser.link_arguments("data.image_size", "model.image_size")

    def check(self, config: Namespace, subcommand: str) -> None:
        """The task module's own checks (``config_errors(config, subcommand)``), as one :class:`ConfigError`."""
        check = getattr(self.model_class, "config_errors", None)
        errors = check(config.as_dict(), subcommand) if callable(check) else []
        if errors:
            listing = "\n".join(f"  - {error}" for error in errors)
            raise ConfigError(
                f"invalid {self.task.name} configuration ({len(errors)} problem{'s' * (len(errors) > 1)}):\n{listing}"
            )

    # -- subcommands ----------------------------------------------------------------------------------------------
    def _point_module_at_output(self) -> None:
        if hasattr(self.model, "output_dir"):
            self.model.output_dir = self.results_dir()

    def before_fit(self) -> None:
        self._point_module_at_output()

    def before_test(self) -> None:
        self._point_module_at_output()

    def before_validate(self) -> None:
        self._point_module_at_output()

    def fit(self, model: Any, **kwargs: Any) -> None:
        """Train, unless the module is set to evaluate its starting weights as they are (``model.zero_shot``)."""
        if getattr(model, "zero_shot", False):
            rank_zero_info("model.zero_shot is true: no fine-tuning; testing model.init_from as it is")
            return
        self.trainer.fit(model, **kwargs)

    def after_fit(self) -> None:
        """Test the best checkpoint (or ``last.ckpt``; the starting weights under ``zero_shot``), write results.

        Nothing is tested after an interrupted fit (Ctrl-C): resume it with ``--ckpt_path last``.
        """
        if self.trainer.interrupted:
            return
        checkpoint = None if getattr(self.model, "zero_shot", False) else best_checkpoint(self.trainer)
        if checkpoint is not None:
            rank_zero_info(f"testing {checkpoint}")
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=checkpoint, verbose=False)
        self.write_results("test", checkpoint)

    def after_test(self) -> None:
        self.write_results("test", self.config["test"].get("ckpt_path"))

    def after_validate(self) -> None:
        self.write_results("val", self.config["validate"].get("ckpt_path"))

    # -- results ----------------------------------------------------------------------------------------------------
    def results_dir(self) -> Path:
        """``output_dir``, else the run's log folder (``runs/<name>/version_N``), else ``default_root_dir``."""
        return output_folder(self.trainer, self.output_dir)

    def write_results(self, split: str, checkpoint: str | None) -> None:
        """``results.json``: task, command, split, model, checkpoint, metrics, the module's results, config."""
        trainer = self.trainer
        prefix = f"{split}/"
        metrics = {
            key: _number(value) for key, value in sorted(trainer.callback_metrics.items()) if key.startswith(prefix)
        }
        subcommand = self.subcommand or "fit"
        config = self.config[subcommand].as_dict()
        config.pop("config", None)  # the files given (YAML text after base_config expansion): the values follow
        model_config = config.get("model") or {}
        self.results = {
            "task": self.task.name,
            "command": self.command,
            "split": split,
            "model": model_config.get("init_from"),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "zero_shot": bool(getattr(self.model, "zero_shot", False)),
            "metrics": metrics,
        }
        details = getattr(self.model, "results", None)
        if isinstance(details, dict) and details:
            self.results["details"] = details
        self.results["config"] = config
        if not trainer.is_global_zero:
            return
        folder = self.results_dir()
        folder.mkdir(parents=True, exist_ok=True)
        self.results_file = folder / RESULTS_FILE
        tmp = self.results_file.with_name(f".{RESULTS_FILE}.tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        os.replace(tmp, self.results_file)
        rank_zero_info(f"results: {self.results_file}")


def _number(value: Any) -> float | None:
    number = float(value.item() if hasattr(value, "item") else value)
    return number if math.isfinite(number) else None


def best_checkpoint(trainer: Any) -> str | None:
    """The monitored ModelCheckpoint's best file, else the run's ``last.ckpt``, else None (nothing was saved)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from vlalign.training.run_folder import LastCheckpoint

    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor and callback.best_model_path:
            if Path(callback.best_model_path).is_file():
                return str(callback.best_model_path)
    for callback in trainer.callbacks:
        if isinstance(callback, LastCheckpoint) and callback.path and Path(callback.path).is_file():
            return str(callback.path)
    return None


# -- the commands ---------------------------------------------------------------------------------------------------
def _split_task(command: str, args: Sequence[str]) -> tuple[TaskSpec, list[str]]:
    if not args or args[0].startswith("-"):
        listing = ", ".join(tasks()) or "(none)"
        raise ConfigError(
            f"`vlalign {command}` needs a task name first: vlalign {command} <task> ...; tasks: {listing}"
        )
    return get_task(args[0]), list(args[1:])


def _with_default_config(task: TaskSpec, rest: list[str]) -> list[str]:
    """Prepend the task's default config unless a ``--config`` is given (or help is asked for); expand
    ``base_config`` (:func:`expand_base_configs`)."""
    if any(a == "--config" or a.startswith("--config=") for a in rest) or any(a in ("-h", "--help") for a in rest):
        return expand_base_configs(rest)
    default = task.config_path
    if not default.is_file():
        raise ConfigError(f"task {task.name!r}: no --config given and its default config {default} does not exist")
    return expand_base_configs(["--config", str(default), *rest])


def expand_base_configs(args: Sequence[str]) -> list[str]:
    """Compose task configs: ``--config FILE`` whose top level has ``base_config: OTHER`` becomes
    ``--config OTHER --config <FILE's other keys>`` (``OTHER`` relative to FILE's folder, itself expanded).

    Consecutive ``--config`` options merge key by key (a later one sets only what it names), which a config file's
    own ``config:`` key does not do for the model and data sections, so the shipped variants (COCO, Flickr30k,
    tiny) keep only what differs from ``retrieval_base.yaml``.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args):
            out += _expanded_config(args[i + 1], seen=())
            i += 2
            continue
        if arg.startswith("--config="):
            out += _expanded_config(arg.split("=", 1)[1], seen=())
        else:
            out.append(arg)
        i += 1
    return out


def _expanded_config(value: str, seen: tuple[Path, ...]) -> list[str]:
    import yaml

    path = Path(value).expanduser()
    if not path.is_file():
        return ["--config", value]
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return ["--config", value]  # jsonargparse reports what is wrong with it
    if not isinstance(content, dict) or "base_config" not in content:
        return ["--config", value]
    base = content.pop("base_config")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base_config must name a config file, got {base!r}")
    base_path = Path(base).expanduser()
    base_path = base_path if base_path.is_absolute() else path.parent / base_path
    if not base_path.is_file():
        raise ConfigError(f"{path}: base_config {base_path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: base_config files include each other in a circle")
    expanded = _expanded_config(str(base_path), (*seen, path.resolve()))
    return expanded + (["--config", yaml.safe_dump(content, sort_keys=False)] if content else [])


def _take_option(args: list[str], name: str) -> tuple[str | None, list[str]]:
    """Remove ``--name VALUE`` / ``--name=VALUE`` (exactly this name; ``--name.key`` stays) from ``args``."""
    value, rest, i = None, [], 0
    while i < len(args):
        arg = args[i]
        if arg == name:
            if i + 1 >= len(args):
                raise ConfigError(f"{name} needs a value")
            value = args[i + 1]
            i += 2
            continue
        if arg.startswith(f"{name}="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return value, rest


def finetune(args: Sequence[str]) -> TaskCLI:
    """``vlalign finetune <task> [--config FILE] [overrides]``: fit, test the best checkpoint, write results."""
    task, rest = _split_task("finetune", args)
    if not task.trains:
        raise ConfigError(
            f"task {task.name!r} trains nothing: evaluate a model with `vlalign evaluate {task.name} --model PATH`"
        )
    return TaskCLI(task, ["fit", *_with_default_config(task, rest)], command="finetune")


def evaluate(args: Sequence[str]) -> TaskCLI:
    """``vlalign evaluate <task> --model PATH [--config FILE] [--split val|test] [--out DIR] [overrides]``."""
    task, rest = _split_task("evaluate", args)
    model, rest = _take_option(rest, "--model")
    split, rest = _take_option(rest, "--split")
    out, rest = _take_option(rest, "--out")
    split = split or "test"
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "val" and not _has_validation(task):
        raise ConfigError(f"task {task.name!r} has no validation split: evaluate its test split (--split test)")
    rest = _with_default_config(task, rest)
    if model is not None:  # after the config, so it wins over the config's model.init_from
        rest += ["--model.init_from", model]
    output_dir = Path(out).expanduser() if out else None
    return TaskCLI(task, [SPLITS[split], *rest], command="evaluate", output_dir=output_dir)


def _has_validation(task: TaskSpec) -> bool:
    from lightning.pytorch import LightningDataModule

    datamodule = resolve_class(task.datamodule)
    return datamodule is None or datamodule.val_dataloader is not LightningDataModule.val_dataloader


def run_task_command(command: str, args: Sequence[str]) -> TaskCLI:
    """Entry point of :mod:`vlalign.cli.main` for ``finetune`` / ``evaluate``."""
    if command == "finetune":
        return finetune(args)
    if command == "evaluate":
        return evaluate(args)
    raise ValueError(f"not a task command: {command!r}")
