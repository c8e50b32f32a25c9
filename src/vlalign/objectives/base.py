"""The objective plug-in contract: an ``nn.Module`` owning its hyper-parameters, heads, loss and hooks.

The ``__init__`` signature is the config schema (jsonargparse reads it), so it takes plain typed values only.
Heads whose size depends on the encoders or the tokenizer are created in :meth:`Objective.build`, called once when
the recipe is constructed, so checkpoint keys are stable.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from vlalign.tokenization import VocabInfo

if TYPE_CHECKING:
    from vlalign.models.stream import SingleStreamTransformer
    from vlalign.tasks.context import StepContext

OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective known to contract tests, sweeps and error messages."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name` to be registered")
    if cls.name in OBJECTIVES and OBJECTIVES[cls.name] is not cls:
        raise ValueError(f"objective name {cls.name!r} is already registered by {OBJECTIVES[cls.name].__qualname__}")
    OBJECTIVES[cls.name] = cls
    return cls


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


@dataclass
class ObjectiveOutput:
    """An objective's unweighted loss, detached scalars to log, and tensors it publishes for other objectives."""

    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)
    publish: dict[str, Tensor] = field(default_factory=dict)


class Objective(nn.Module, abc.ABC):
    """Base class of every pretraining objective.

    Declarations (class attributes):
      ``name`` — registry name and the recipe slot it fills;
      ``requires`` — names of objectives whose published outputs this one reads;
      ``momentum_heads`` — attribute names of own heads that get an EMA twin ``<name>_m`` when momentum is on.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    momentum_heads: ClassVar[tuple[str, ...]] = ()

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if not weight >= 0:
            raise ValueError(f"{self.name}.weight must be >= 0, got {weight}")
        self.weight = float(weight)

    # -- declarations -------------------------------------------------------------------------------------------
    def momentum_encoders(self) -> frozenset[str]:
        """Encoders ("vision", "stream") whose EMA twins this objective reads; empty means no momentum model."""
        return frozenset()

    # -- life cycle ---------------------------------------------------------------------------------------------
    def build(self, spec: BuildSpec) -> None:
        """Create heads sized from ``spec``; subclasses call ``super().build(spec)`` last to get momentum twins."""
        if spec.momentum:
            for head in self.momentum_heads:
                twin = copy.deepcopy(getattr(self, head))
                twin.requires_grad_(False)
                setattr(self, f"{head}_m", twin)

    @abc.abstractmethod
    def forward(self, ctx: StepContext) -> ObjectiveOutput:
        """Unweighted loss, logs and published tensors for this step."""

    def momentum_pairs(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        """(online, momentum) module pairs of this objective's heads, for the EMA update."""
        for head in self.momentum_heads:
            twin = getattr(self, f"{head}_m", None)
            if twin is not None:
                yield getattr(self, head), twin

    # -- hooks --------------------------------------------------------------------------------------------------
    def after_optimizer_step(self) -> None:
        """Runs after each real optimizer step (queue updates); no-op by default."""

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


@torch.no_grad()
def ema_update(pairs: list[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """``θ_m ← m·θ_m + (1−m)·θ`` over all pairs as one fused foreach op."""
    online: list[Tensor] = []
    twins: list[Tensor] = []
    seen: set[int] = set()  # a tied weight (MLM decoder = word embeddings) is updated once
    for src, dst in pairs:
        for p, p_m in zip(src.parameters(), dst.parameters(), strict=True):
            if id(p_m) not in seen:
                seen.add(id(p_m))
                online.append(p.detach())
                twins.append(p_m)
    if twins:
        torch._foreach_lerp_(twins, online, 1.0 - momentum)
