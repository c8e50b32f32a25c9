"""The downstream task registry: what ``vlalign finetune <task>`` and ``vlalign evaluate <task>`` can run.

A task is a LightningModule (typed ``__init__``: its config schema; it takes ``init_from``, the model to start from
or to evaluate), a LightningDataModule for the public annotation layout, and a default config under
``configs/finetune/``. A task module registers itself when it is imported::

    register_task(TaskSpec(name="retrieval", module="vlalign.tasks.retrieval.RetrievalTask", ...))

:func:`tasks` imports the built-in task modules (:data:`BUILTIN_TASK_MODULES`) and returns the registry: the single
source of truth for the commands, their error messages and the tests. This module imports neither torch nor
Lightning, so ``vlalign --help`` stays fast: it lists the built-in tasks from :data:`TASK_SUMMARIES`, a static table
that a test keeps equal to the registry.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BUILTIN_TASK_MODULES",
    "CONFIG_DIR",
    "TASK_SUMMARIES",
    "TaskSpec",
    "get_task",
    "help_tasks",
    "register_task",
    "tasks",
]

#: Modules that register vlalign's own tasks; one that does not exist (yet) is skipped.
BUILTIN_TASK_MODULES: tuple[str, ...] = (
    "vlalign.tasks.retrieval",
    "vlalign.tasks.hardneg",
    "vlalign.tasks.vqa",
    "vlalign.tasks.nlvr2",
    "vlalign.tasks.snli_ve",
    "vlalign.tasks.grounding",
)
#: Where default task configs live (a source checkout's ``configs/finetune``).
CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs" / "finetune"
#: ``name -> (module that registers it, description, trains)`` of the built-in tasks, for ``vlalign --help`` without
#: importing torch. Must equal the registry (``tests/test_task_registry.py`` checks it).
TASK_SUMMARIES: dict[str, tuple[str, str, bool]] = {
    "retrieval": (
        "vlalign.tasks.retrieval",
        "image-text retrieval (COCO / Flickr30k Karpathy splits): ITC + ITM fine-tuning, ITM re-ranked recall",
        True,
    ),
    "hardneg": (
        "vlalign.tasks.hardneg",
        "hard-negative captions (colour, shape, relation, binding swaps): ITM / ITC accuracy per edit type",
        False,
    ),
    "vqa": (
        "vlalign.tasks.vqa",
        "visual question answering (VQA v2 layout): answer decoder, answer-list ranking, official VQA accuracy",
        True,
    ),
    "nlvr2": (
        "vlalign.tasks.nlvr2",
        "NLVR2: is a statement true of a pair of images; two-image fusion, accuracy on dev / test-P",
        True,
    ),
    "snli_ve": (
        "vlalign.tasks.snli_ve",
        "SNLI-VE visual entailment: entailment / neutral / contradiction from an image premise; accuracy",
        True,
    ),
    "grounding": (
        "vlalign.tasks.grounding",
        "weakly-supervised grounding (RefCOCO+ with proposals): Grad-CAM on cross-attention, accuracy at IoU >= 0.5",
        True,
    ),
}


@dataclass(frozen=True)
class TaskSpec:
    """One downstream task.

    Attributes:
        name: the word after ``vlalign finetune`` / ``vlalign evaluate``.
        module: class path of the LightningModule; its ``__init__`` takes ``init_from`` (what ``evaluate --model``
            sets).
        datamodule: class path of the LightningDataModule.
        config: default config file, relative to ``configs/finetune/`` (or absolute); used when no ``--config`` is
            given.
        description: one line for ``vlalign --help``.
        trains: whether ``vlalign finetune`` applies (False: evaluation only).
    """

    name: str
    module: str
    datamodule: str
    config: str
    description: str
    trains: bool = True

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"task name must be a non-empty word (letters, digits, - and _), got {self.name!r}")
        for key in ("module", "datamodule"):
            if "." not in getattr(self, key):
                raise ValueError(f"TaskSpec({self.name!r}).{key} must be a class path 'package.module.Class'")

    @property
    def config_path(self) -> Path:
        """The default config file as a path (relative names resolve under :data:`CONFIG_DIR`)."""
        path = Path(self.config)
        return path if path.is_absolute() else CONFIG_DIR / path


_REGISTRY: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Make ``spec`` known to the commands; registering the same spec again is a no-op, another under a taken
    name an error."""
    known = _REGISTRY.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(f"task {spec.name!r} is already registered (by {known.module})")
    _REGISTRY[spec.name] = spec
    return spec


def tasks() -> dict[str, TaskSpec]:
    """The registry, after importing every built-in task module that exists (a copy, sorted by name)."""
    for module in BUILTIN_TASK_MODULES:
        if _module_exists(module):
            importlib.import_module(module)
    return dict(sorted(_REGISTRY.items()))


def get_task(name: str) -> TaskSpec:
    """The task called ``name``.

    Raises:
        ConfigError: no such task (the message lists the registered ones).
    """
    from vlalign.errors import ConfigError

    known = tasks()
    if name not in known:
        listing = ", ".join(known) or "(none)"
        raise ConfigError(f"unknown task {name!r}; the registered tasks are: {listing}")
    return known[name]


def help_tasks() -> dict[str, tuple[str, bool]]:
    """``name -> (description, trains)`` of the built-in tasks whose module exists, without importing them."""
    return {name: (text, trains) for name, (module, text, trains) in TASK_SUMMARIES.items() if _module_exists(module)}


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
