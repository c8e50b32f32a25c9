"""Tiny builders for tests, benchmarks and plug-in authors: a vocabulary, encoder configs, recipes, batches, and the
one training-step helper that runs a step exactly as Lightning does (loss, backward, optimizer, EMA and queues).

A third-party objective can be contract-tested with these, the way ``tests/test_objective_contract.py`` tests the
built-in ones. Everything here is CPU-sized (a 64-wide ViT and stream) and needs no downloaded file.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from vlalign.data.tokenization import VocabInfo
from vlalign.models.stream import StreamConfig
from vlalign.models.vision import VisionConfig
from vlalign.objectives.base import Objective
from vlalign.objectives.image_targets import PixelTargets
from vlalign.objectives.itc import ITC
from vlalign.objectives.itm import ITM
from vlalign.objectives.psl import PSL
from vlalign.objectives.xmm import XMM
from vlalign.tasks.pretrain import PretrainRecipe

#: Special ids 0-4, then ordinary tokens: small enough that a tied MLM decoder costs nothing.
TINY_VOCAB = VocabInfo(vocab_size=60, pad_token_id=0, unk_token_id=1, cls_token_id=2, sep_token_id=3, mask_token_id=4)
TINY_WIDTH = 64  # the width of ``vit_vlalign_tiny_patch8``; the stream matches it so the image side can run
TINY_IMAGE = 32  # 4 x 4 patches of 8 px
TINY_POSITIONS = 40

RecipeKind = Literal["simla", "albef", "itc_itm", "clip"]


def tiny_stream(**overrides: Any) -> StreamConfig:
    """A 2-layer, 64-wide single stream (``fusion_layer=1`` gives the ALBEF split)."""
    settings: dict[str, Any] = {
        "vocab_size": TINY_VOCAB.vocab_size,
        "hidden_size": TINY_WIDTH,
        "num_layers": 2,
        "num_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": TINY_POSITIONS,
        "encoder_width": TINY_WIDTH,
    }
    return StreamConfig(**{**settings, **overrides})


def tiny_vision(**overrides: Any) -> VisionConfig:
    return VisionConfig(**{"name": "vit_vlalign_tiny_patch8", "img_size": TINY_IMAGE, **overrides})


def tiny_objectives(kind: RecipeKind = "simla", queue_size: int = 8) -> dict[str, Objective | None]:
    """The objective slots of a tiny recipe of ``kind`` (fresh modules)."""
    momentum = kind != "clip"
    return {
        "itc": ITC(embed_dim=16, queue_size=queue_size if momentum else 0, distill=momentum),
        "itm": ITM() if kind != "clip" else None,
        "xmm": XMM(image=kind == "simla", image_targets=PixelTargets()) if kind in ("simla", "albef") else None,
        "psl": PSL(embed_dim=16) if kind == "simla" else None,
    }


def tiny_recipe(
    kind: RecipeKind = "simla",
    seed: int = 0,
    queue_size: int = 8,
    stream: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
    **overrides: Any,
) -> PretrainRecipe:
    """A tiny recipe: ``simla`` (all four objectives), ``albef`` (fusion from layer 1, text-side XMM), ``itc_itm``,
    ``clip`` (ITC in-batch only). ``overrides`` replace recipe arguments (objective slots included)."""
    torch.manual_seed(seed)
    stream_settings = {"fusion_layer": 1, "type_vocab_size": 2} if kind == "albef" else {}
    arguments: dict[str, Any] = {
        "vision": tiny_vision(mask_token=kind == "simla", **(vision or {})),
        "stream": tiny_stream(**{**stream_settings, **(stream or {})}),
        "vocab": TINY_VOCAB,
        **tiny_objectives(kind, queue_size),
    }
    arguments.update(overrides)
    return PretrainRecipe(**arguments)


def tiny_batch(
    batch_size: int = 4,
    length: int = 9,
    image_size: int = TINY_IMAGE,
    patch_size: int = 8,
    vocab: VocabInfo = TINY_VOCAB,
    seed: int = 7,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Random images and right-padded captions (``[CLS] ...``, the first one full length), with a patch mask and
    the half-resolution view image-side targets read."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab.vocab_size, (batch_size, length), generator=g)
    ids[:, 0] = vocab.cls_token_id
    lengths = torch.randint(3, length + 1, (batch_size,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    grid = image_size // patch_size
    batch = {
        "image": torch.randn(batch_size, 3, image_size, image_size, generator=g),
        "input_ids": ids.masked_fill(mask == 0, vocab.pad_token_id),
        "attention_mask": mask,
        "patch_mask": torch.rand(batch_size, grid * grid, generator=g) < 0.4,
        "tokenizer_view": torch.rand(batch_size, 3, image_size // 2, image_size // 2, generator=g),
    }
    return {key: value.to(device) for key, value in batch.items()}


def train_step(
    recipe: PretrainRecipe,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    batch_idx: int = 0,
) -> Tensor | None:
    """One training step outside a Trainer, as Lightning runs it: ``training_step`` (no update when it returns None,
    i.e. a non-finite loss), backward, optimizer (and scheduler) step, then EMA twins and queue writes.

    The caller chooses the mode (``recipe.train()``) and any autocast context. Returns the detached loss or None.
    Tests and ``benchmarks/`` both use this, so what is benchmarked is what is tested.
    """
    loss = recipe.training_step(batch, batch_idx)
    if loss is not None:
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    if loss is None:
        return None
    recipe.after_real_optimizer_step()
    return loss.detach()


def tiny_optimizer(recipe: PretrainRecipe, lr: float = 1e-3) -> torch.optim.Optimizer:
    """AdamW over the recipe's parameter groups (weight-decay exemptions included), no schedule."""
    from vlalign.tasks.optim import parameter_groups

    return torch.optim.AdamW(parameter_groups(recipe, 0.02), lr=lr)
