"""``torch.compile`` of the encoders: the repeated transformer block (regional compilation) or the whole encoder.

Regional compilation compiles each block of the ViT (timm's ``blocks``) and of the stream (``encoder.layer``) in
place with :meth:`torch.nn.Module.compile`. Blocks of one class share one compiled graph (dynamo treats a module's
parameters as inputs), so the first step compiles one ViT block and a few stream-layer variants (text, fusion,
image side; with and without gradient) instead of the whole encoders' graphs: docs/benchmarks.md has the measured
compile times and steady-state step times.

``nn.Module.compile`` wraps ``__call__`` only: parameter names, ``state_dict`` keys and checkpoints are unchanged,
and methods called directly (``StreamLayer.forward_kv``, the K/V-reuse evaluation path) stay eager.

The recipe's key ``model.compile_encoders`` takes ``false``, ``true`` (= ``blocks``), a scope (``blocks`` /
``whole``) or a scope and an inductor mode as ``scope:mode``, e.g. ``blocks:max-autotune-no-cudagraphs``;
:func:`parse_compile_encoders` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vlalign.errors import ConfigError
from vlalign.models.stream import SingleStreamTransformer
from vlalign.models.vision import VisionEncoder

__all__ = [
    "COMPILE_CHOICES",
    "CompileChoice",
    "CompileSetting",
    "apply_compile",
    "compile_blocks",
    "compile_whole",
    "encoder_blocks",
    "is_compiled",
    "parse_compile_encoders",
    "raise_recompile_limit",
]

Scope = Literal["blocks", "whole"]
Mode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
SCOPES: tuple[str, ...] = get_args(Scope)
MODES: tuple[str, ...] = get_args(Mode)

#: Every string ``model.compile_encoders`` accepts (besides ``true`` / ``false``).
CompileChoice = Literal[
    "blocks",
    "whole",
    "blocks:reduce-overhead",
    "blocks:max-autotune",
    "blocks:max-autotune-no-cudagraphs",
    "whole:reduce-overhead",
    "whole:max-autotune",
    "whole:max-autotune-no-cudagraphs",
]
COMPILE_CHOICES: tuple[str, ...] = get_args(CompileChoice)
_KEY = "model.compile_encoders"
#: Dynamo's per-function recompile limit is raised to at least this: one SIMLA step calls a stream layer in 8
#: variants (text / fusion / image side, with and without gradient, one layer returning attention), the default
#: limit, past which dynamo silently runs further variants (another recipe, dynamic shapes) eagerly.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class CompileSetting:
    """What to compile (``scope``) and with which inductor ``mode`` (``default``: torch.compile's default)."""

    scope: Scope = "blocks"
    mode: Mode = "default"

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ConfigError(f"{_KEY}: scope {self.scope!r} is not one of {', '.join(SCOPES)}")
        if self.mode not in MODES:
            raise ConfigError(f"{_KEY}: mode {self.mode!r} is not one of {', '.join(MODES)}")

    @property
    def torch_mode(self) -> str | None:
        """The ``mode`` argument of ``torch.compile`` (None for the default)."""
        return None if self.mode == "default" else self.mode


def parse_compile_encoders(value: object) -> CompileSetting | None:
    """Read a ``model.compile_encoders`` value: ``False`` -> None (eager), ``True`` -> regional compilation with the
    default mode, ``"scope"`` or ``"scope:mode"`` -> that setting. Anything else raises :class:`ConfigError` naming
    the key and the accepted values."""
    if value is False or value is None:
        return None
    if value is True:
        return CompileSetting()
    if isinstance(value, str):
        if value in COMPILE_CHOICES:
            scope, _, mode = value.partition(":")
            return CompileSetting(scope, mode or "default")  # type: ignore[arg-type]
    raise ConfigError(
        f"{_KEY} must be true (regional compilation of the repeated blocks), false, or one of "
        f"{', '.join(COMPILE_CHOICES)}; got {value!r}"
    )


def encoder_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an encoder: a ViT's ``blocks`` or the stream's ``encoder.layer``."""
    if isinstance(module, VisionEncoder):
        module = module.vit
    if isinstance(module, VisionTransformer):
        return list(module.blocks)
    if isinstance(module, SingleStreamTransformer):
        return list(module.encoder.layer)
    raise TypeError(
        f"encoder_blocks: {type(module).__name__} is not a VisionEncoder, timm VisionTransformer or "
        "SingleStreamTransformer"
    )


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module.compile()`` has wrapped this module's ``__call__``."""
    return getattr(module, "_compiled_call_impl", None) is not None


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise dynamo's per-function recompile limit (a process-wide setting) to at least ``limit``."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def compile_blocks(module: nn.Module, mode: str | None = None, dynamic: bool | None = None) -> int:
    """Compile each repeated block of ``module`` (see :func:`encoder_blocks`) in place; returns how many blocks were
    newly compiled. Idempotent: a block compiled before keeps its first compilation (and its mode)."""
    raise_recompile_limit()
    count = 0
    for block in encoder_blocks(module):
        if not is_compiled(block):
            block.compile(mode=mode, dynamic=dynamic)
            count += 1
    return count


def compile_whole(module: nn.Module, mode: str | None = None, dynamic: bool | None = None) -> int:
    """Compile the whole ``module`` in place (one graph per call variant); 1 when newly compiled, else 0."""
    if is_compiled(module):
        return 0
    raise_recompile_limit()
    module.compile(mode=mode, dynamic=dynamic)
    return 1


def apply_compile(modules: list[nn.Module | None], setting: CompileSetting | None) -> int:
    """Compile each encoder in ``modules`` (None entries: absent twins are skipped) as ``setting`` says; returns how
    many modules were newly compiled (blocks for ``blocks``, encoders for ``whole``). None: nothing happens."""
    if setting is None:
        return 0
    apply = compile_blocks if setting.scope == "blocks" else compile_whole
    return sum(apply(module, mode=setting.torch_mode) for module in modules if module is not None)
