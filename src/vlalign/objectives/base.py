"""The objective plug-in contract: an ``nn.Module`` owning its hyper-parameters, heads, loss and hooks.

Everything the rest of vlalign needs from an objective is declared here with a default, so the recipe, the
non-finite guard, the optimiser groups, the CLI checks and the weight tools never reach into an objective's private
state. See docs/architecture.md ("Adding an objective") and docs/method.md for what each built-in one computes.

- ``__init__`` takes plain typed values only: its signature is the config schema (jsonargparse reads it) and the
  values it was called with are recorded (:meth:`Configurable.config`), so checkpoints can rebuild the objective.
- :meth:`Objective.build` creates heads sized from the encoders and the tokenizer, once, so checkpoint keys are
  stable; momentum twins of heads come from one mechanism (:func:`~vlalign.models.backbone.make_twin`), which also
  ties a twin to the momentum encoder when the online head is tied to the online encoder.
- The registry (:data:`OBJECTIVES`, filled by :func:`register_objective`) is the single source of truth: recipe
  slots, their order (:func:`execution_order`, from ``requires``), CLI messages, contract tests and sweeps read it.
"""

from __future__ import annotations

import abc
import functools
import importlib
import inspect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from vlalign.data.tokenization import VocabInfo
from vlalign.models.backbone import MOMENTUM_SUFFIX, make_twin

if TYPE_CHECKING:
    from vlalign.models.stream import SingleStreamTransformer
    from vlalign.objectives.context import StepContext

OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective known to the recipe, contract tests, sweeps and error messages."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name` to be registered")
    known = OBJECTIVES.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"objective name {cls.name!r} is already registered by {known.__qualname__}")
    OBJECTIVES[cls.name] = cls
    return cls


def builtin_objectives() -> tuple[str, ...]:
    """Names of vlalign's own registered objectives, in registry order: the pretraining recipe's typed slots.

    Objectives registered from elsewhere (plug-ins) go into the recipe's ``extra_objectives``.
    """
    return tuple(name for name, cls in OBJECTIVES.items() if cls.__module__.startswith("vlalign.objectives."))


def execution_order(objectives: Iterable[Objective]) -> list[Objective]:
    """Objectives sorted so that each runs after the ones it ``requires`` or ``reads`` (registry order breaks ties).

    Raises ValueError naming the config keys when a requirement is missing or requirements form a cycle.
    """
    pending = {o.name: o for o in objectives}
    rank = {name: i for i, name in enumerate(OBJECTIVES)}
    ordered: list[Objective] = []
    done: set[str] = set()
    for objective in pending.values():
        for required in objective.requirements():
            if required not in pending:
                raise ValueError(
                    f"model.{objective.name} requires model.{required}, which is disabled: "
                    f"enable model.{required} or set model.{objective.name}: null"
                )
    after = {name: (set(o.requirements()) | set(o.reads)) & set(pending) for name, o in pending.items()}
    while pending:
        ready = [o for o in pending.values() if after[o.name] <= done]
        if not ready:
            raise ValueError(f"objectives require each other in a cycle: {sorted(pending)}")
        nxt = min(ready, key=lambda o: (rank.get(o.name, len(rank)), o.name))
        ordered.append(nxt)
        done.add(nxt.name)
        del pending[nxt.name]
    return ordered


# -- recorded configuration ---------------------------------------------------------------------------------------------
class Configurable:
    """Mixin: remembers the arguments of the outermost ``__init__`` call, so the object can be rebuilt from a file.

    :meth:`config` returns ``{"class_path": ..., "init_args": {...}}`` (nested configurables included), the same
    shape as a YAML config; :func:`from_config` builds the object again.
    """

    _init_args: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self: Any, *args: Any, **kw: Any) -> None:
            outermost = "_init_args" not in self.__dict__
            if outermost:
                object.__setattr__(self, "_init_args", {})
            init(self, *args, **kw)
            if outermost:
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                values = dict(bound.arguments)
                values.pop(next(iter(signature.parameters)))  # self
                for name, parameter in signature.parameters.items():
                    if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                        values.update(values.pop(name, {}))
                    elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                        values.pop(name, None)
                object.__setattr__(self, "_init_args", values)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    @property
    def init_args(self) -> dict[str, Any]:
        """The values ``__init__`` was called with (defaults filled in)."""
        return dict(self._init_args)

    def config(self) -> dict[str, Any]:
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": _plain(self._init_args)}


def _plain(value: Any) -> Any:
    if isinstance(value, Configurable):
        return value.config()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def from_config(spec: Mapping[str, Any]) -> Any:
    """Rebuild an object from :meth:`Configurable.config` output (nested ``class_path`` dicts included)."""
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    args = {
        key: from_config(value) if isinstance(value, Mapping) and "class_path" in value else value
        for key, value in (spec.get("init_args") or {}).items()
    }
    return cls(**args)


# -- what an objective is told and what it returns ------------------------------------------------------------------
@dataclass
class BuildSpec:
    """Sizes an objective needs to create its heads, known only once the encoders and tokenizer exist."""

    vision_width: int
    text_width: int
    vocab: VocabInfo
    patch_grid: tuple[int, int]
    patch_size: int
    momentum: bool
    stream: SingleStreamTransformer | None = None  # for heads tied to the word embeddings
    stream_m: SingleStreamTransformer | None = None  # the momentum stream, when one exists
    embed_dim: int | None = None  # ITC's joint embedding width, when ITC is enabled
    twin_map: dict[int, nn.Parameter] = field(default_factory=dict)  # id(online encoder param) -> its twin


@dataclass
class ObjectiveOutput:
    """An objective's unweighted loss, detached scalars to log, and tensors it publishes for other objectives."""

    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)
    publish: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class ConfigFacts:
    """What an objective's config check may look at besides its own settings (read from the parsed config)."""

    subcommand: str = "fit"
    enabled: frozenset[str] = frozenset()
    batch_size: int | None = None
    world_size: int = 1
    accumulate_grad_batches: int = 1
    vit_name: str | None = None
    vit_patch: int | None = None
    mask_patch_size: int | None = None
    data_masks_images: bool = False  # the data module has a ``mask_patch_size`` setting at all


class Objective(Configurable, nn.Module, abc.ABC):
    """Base class of every pretraining objective.

    Declarations (class attributes, each with a default):
      ``name`` — registry name and the recipe slot it fills;
      ``requires`` — objectives whose published outputs this one needs (settings-dependent: :meth:`required_for`);
      ``reads`` — objectives whose outputs it uses when they are enabled (order only, not a requirement);
      ``momentum_heads`` — own heads that get an EMA twin ``<head>_m`` when momentum is on;
      ``no_decay`` — own parameter names exempt from weight decay (besides biases, norms and 0-D/1-D tensors);
      ``trains_encoders`` — online encoders its loss back-propagates into (the contract test checks it).
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    reads: ClassVar[tuple[str, ...]] = ()
    momentum_heads: tuple[str, ...] = ()
    no_decay: ClassVar[tuple[str, ...]] = ()
    trains_encoders: ClassVar[frozenset[str]] = frozenset({"vision", "stream"})

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if not weight >= 0:
            raise ValueError(f"model.{self.name}.weight must be >= 0, got {weight}")
        self.weight = float(weight)

    # -- declarations, evaluated on settings alone (the CLI checks a config before building anything) ---------------
    @classmethod
    def required_for(cls, settings: Mapping[str, Any]) -> tuple[str, ...]:
        """Objectives this one needs under ``settings`` (its ``__init__`` arguments)."""
        return tuple(cls.requires)

    @classmethod
    def masks_images_for(cls, settings: Mapping[str, Any]) -> bool:
        """Whether this objective reads masked image tokens under ``settings``."""
        return False

    @classmethod
    def config_errors(cls, settings: Mapping[str, Any], facts: ConfigFacts) -> list[str]:
        """Mistakes in this objective's settings, alone or with the rest of the config; each names keys and fix.

        The default checks requirements and the patch grid of masked-image objectives; override and extend.
        """
        errors = []
        for required in cls.required_for(settings):
            if required not in facts.enabled:
                errors.append(
                    f"model.{cls.name} requires model.{required}, which is disabled (model.{required}: null). Fix: "
                    f"enable model.{required} (--model.{required} '{{}}', or `{required}: {{}}` under `model:` in "
                    f"the config), or disable model.{cls.name} (--model.{cls.name} null)"
                    + cls.requirement_hint(required)
                )
        if cls.masks_images_for(settings) and facts.vit_patch is not None and facts.data_masks_images:
            if facts.mask_patch_size != facts.vit_patch:
                how = "is not set" if facts.mask_patch_size is None else f"is {facts.mask_patch_size}"
                errors.append(
                    f"model.{cls.name} masks image patches, so data.mask_patch_size must equal the ViT patch size "
                    f"{facts.vit_patch} of {facts.vit_name}, but it {how}: set --data.init_args.mask_patch_size "
                    f"{facts.vit_patch}"
                )
        return errors

    @classmethod
    def requirement_hint(cls, required: str) -> str:
        """Another way to satisfy ``required`` than enabling it (appended to the error), e.g. a setting."""
        return ""

    def requirements(self) -> tuple[str, ...]:
        """Objectives this instance needs (:meth:`required_for` on its own settings)."""
        return type(self).required_for(self._init_args)

    @property
    def needs_masked_images(self) -> bool:
        return type(self).masks_images_for(self._init_args)

    def momentum_encoders(self) -> frozenset[str]:
        """Encoders ("vision", "stream") whose EMA twins this objective reads; empty means no momentum model."""
        return frozenset()

    def no_weight_decay(self) -> set[str]:
        """Own parameter names (relative to this module) that the optimiser must not decay."""
        return set(self.no_decay)

    # -- life cycle ---------------------------------------------------------------------------------------------
    def build(self, spec: BuildSpec) -> None:
        """Create heads sized from ``spec``; subclasses call ``super().build(spec)`` last to get momentum twins.

        A head tied to an encoder parameter (``spec.twin_map``) gets a twin tied to that encoder's twin.
        """
        if spec.momentum:
            for head in self.momentum_heads:
                setattr(self, f"{head}{MOMENTUM_SUFFIX}", make_twin(getattr(self, head), spec.twin_map))

    @abc.abstractmethod
    def forward(self, ctx: StepContext) -> ObjectiveOutput:
        """Unweighted loss, logs and published tensors for this step."""

    def momentum_pairs(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        """(online, momentum) module pairs of this objective's heads, for the EMA update."""
        for head in self.momentum_heads:
            twin = getattr(self, f"{head}{MOMENTUM_SUFFIX}", None)
            if twin is not None:
                yield getattr(self, head), twin

    @torch.no_grad()
    def reset_twins(self) -> None:
        """Copy every online head into its twin (after the online weights were loaded from a file)."""
        for online, twin in self.momentum_pairs():
            twin.load_state_dict(online.state_dict())

    # -- hooks --------------------------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """A training micro-batch starts: remember whatever :meth:`rollback_step` must undo. No-op by default."""

    def rollback_step(self) -> None:
        """The micro-batch since :meth:`begin_step` is skipped (non-finite loss): drop its deferred state (e.g.
        features waiting for the queue). No-op by default."""

    def after_optimizer_step(self) -> None:
        """Runs after each real optimizer step (queue updates); no-op by default."""

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


@torch.no_grad()
def ema_update(pairs: list[tuple[nn.Module, nn.Module]], momentum: float, gate: Tensor | None = None) -> None:
    """``θ_m ← m·θ_m + (1−m)·θ`` over all pairs as one fused foreach op (docs/method.md §1.3).

    ``gate`` (a 0-dim bool tensor on the device): update only where it is true, without reading it on the host
    (the recipe's device-side non-finite guard); three foreach ops instead of one."""
    online: list[Tensor] = []
    twins: list[Tensor] = []
    seen: set[int] = set()  # a tied weight (MLM decoder = word embeddings) is updated once
    for src, dst in pairs:
        for p, p_m in zip(src.parameters(), dst.parameters(), strict=True):
            if id(p_m) not in seen:
                seen.add(id(p_m))
                online.append(p.detach())
                twins.append(p_m)
    if twins and gate is None:
        torch._foreach_lerp_(twins, online, 1.0 - momentum)
    elif twins:
        steps = torch._foreach_sub(online, twins)
        torch._foreach_mul_(steps, gate.to(twins[0].dtype) * (1.0 - momentum))
        torch._foreach_add_(twins, steps)
