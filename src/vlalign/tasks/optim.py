"""AdamW with decay-aware parameter groups and a per-step linear warm-up + cosine schedule.

What it computes: docs/method.md §3.1–3.2. Deliberate differences from the reference (docs/differences.md rows
15–16): the temperature, position embeddings, class and mask tokens are not weight-decayed, and the learning rate
follows the schedule every step instead of being piecewise constant per epoch with "warm-up epochs" that are
really hundreds of iterations.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Encoder tensors that are never decayed (position tables and learned tokens); objectives declare their own
#: exemptions through :meth:`~vlalign.objectives.base.Objective.no_weight_decay`.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "position_embeddings")


@dataclass
class OptimConfig:
    """Optimiser and schedule; defaults are the SIMLA pretraining recipe (per-step)."""

    lr: float = 1e-4
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 2000
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5
    fused: bool | None = None  # None: fused AdamW where torch has the kernel (CUDA, CPU), the default elsewhere

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; skip biases, norms, 0-D/1-D tensors, embedding-like tokens and the full parameter names the
    model's ``no_weight_decay()`` returns (timm's convention; the recipe collects its objectives' declarations).
    Frozen parameters are left out."""
    exempt: Collection[str] = model.no_weight_decay() if callable(getattr(model, "no_weight_decay", None)) else ()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name.endswith(".bias") or name in exempt or any(key in name for key in NO_DECAY_NAMES)
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, cfg: OptimConfig, total_steps: int | None) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warm-up from ``warmup_lr``, then cosine down to ``min_lr``.

    With an unknown number of steps (``total_steps`` None: streaming data without a length and no
    ``trainer.max_steps``) the rate stays at ``lr`` after the warm-up.
    """
    if step < cfg.warmup_steps:
        return (cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps) / cfg.lr
    if total_steps is None:
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return (cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))) / cfg.lr


#: Devices whose parameters get fused AdamW when ``optim.fused`` is null. On the CPU the fused kernel takes 12 ms
#: per step where the foreach one takes 44 ms (17.7 M parameters, one thread; docs/benchmarks.md "Speed II (CPU)").
FUSED_DEVICES = frozenset({"cuda", "cpu"})


def _fused_by_default(model: nn.Module) -> bool:
    devices = {p.device.type for p in model.parameters() if p.requires_grad}
    return bool(devices) and devices <= FUSED_DEVICES and len(devices) == 1


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: float) -> dict:
    """The ``configure_optimizers`` return value of every vlalign task.

    ``total_steps`` is the trainer's estimate; Lightning reports ``-1`` or ``inf`` when it cannot know (an iterable
    dataset without a length and no ``max_steps``), and the schedule then keeps ``lr`` after the warm-up.
    """
    known = total_steps if 0 < total_steps < float("inf") else None
    if known is None:
        log.warning(
            "number of training steps unknown (streaming data without a length and no trainer.max_steps): "
            "the learning rate stays at optim.lr after the warm-up instead of following the cosine schedule"
        )
    fused = cfg.fused if cfg.fused is not None else _fused_by_default(model)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, int(known) if known is not None else None)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
