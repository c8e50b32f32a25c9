"""Safe weight loading: ``weights_only=True`` or safetensors, never arbitrary pickles."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from vlalign.models.loading import read_state_dict

log = logging.getLogger(__name__)


def allow_config_classes_in_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read vlalign checkpoints, whose hyper-parameters hold config dataclasses.

    Only these plain data classes are allow-listed (no code runs when they are rebuilt), so Lightning's resume
    (``--ckpt_path``, which loads with torch's default ``weights_only=True``) and ``init_from`` stay safe.
    """
    from vlalign.data.transforms import AugmentConfig
    from vlalign.models.stream import StreamConfig
    from vlalign.models.vision import VisionConfig
    from vlalign.tasks.optim import OptimConfig
    from vlalign.tokenization import VocabInfo

    torch.serialization.add_safe_globals([VisionConfig, StreamConfig, OptimConfig, VocabInfo, AugmentConfig])


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Tensors from a ``.safetensors`` file or a torch file loaded with ``weights_only=True``.

    Reading is :func:`vlalign.models.loading.read_state_dict` (the one reader of weight files); Lightning
    checkpoints (``state_dict``), reference checkpoints (``model``) and ``module`` wrappers are unwrapped here.
    """
    return unwrap_state_dict(read_state_dict(path), source=path)


def unwrap_state_dict(obj: object, source: str | Path = "state dict") -> dict[str, Tensor]:
    """The tensor dict inside a training checkpoint: the first of ``state_dict``, ``model``, ``module`` that is one."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a state dict, found {type(obj).__name__}")
    return obj


def load_init_weights(model: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Initialise ``model`` from a checkpoint; momentum twins missing from it start as copies of the online weights.

    Shapes that differ only by the vision position-embedding grid are interpolated (e.g. 256 px → 384 px).
    Returns (missing, unexpected) keys; both are logged.
    """
    from vlalign.models.vision import interpolate_pos_embed

    state = load_state_dict_file(path)
    own = model.state_dict()
    for key, value in list(state.items()):
        if key.endswith("pos_embed") and key in own and own[key].shape != value.shape:
            side = math.isqrt(own[key].shape[1] - 1)  # one class token, square grid (timm ViT layout)
            state[key] = interpolate_pos_embed(value, (side, side))
    result = model.load_state_dict(state, strict=False)
    missing = list(result.missing_keys)
    # The reference copies online -> momentum before loading a checkpoint without teachers (method note 8.2.5),
    # leaving a random teacher; here a missing twin tensor is filled from its online counterpart after loading.
    online = model.state_dict()
    with torch.no_grad():
        for key in list(missing):
            source = _online_key(key)
            if source and source in online and source not in missing:
                online[key].copy_(online[source])
                missing.remove(key)
    if missing:
        log.warning("init_from %s: %d tensors not in the checkpoint: %s", path, len(missing), missing[:20])
    if result.unexpected_keys:
        log.warning(
            "init_from %s: %d unused tensors: %s", path, len(result.unexpected_keys), result.unexpected_keys[:20]
        )
    return missing, list(result.unexpected_keys)


def _online_key(key: str) -> str | None:
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.endswith("_m"):
            return ".".join([*parts[:i], part[:-2], *parts[i + 1 :]])
    return None
