"""Safe weight loading: ``weights_only=True`` or safetensors, never arbitrary pickles.

- :func:`load_state_dict_file`: the tensors of any weight file vlalign accepts, unwrapped.
- :func:`load_init_weights`: ``model.init_from``; fails when the file does not fit the model.
- :func:`check_resume_checkpoint`: what ``--ckpt_path`` may name (a local Lightning ``.ckpt``), checked before
  Lightning loads it.

Unusable files raise :class:`~vlalign.errors.InputFileError` naming the file and the fix.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from vlalign.errors import InputFileError
from vlalign.weights.reading import read_state_dict, torch_load_weights_only

log = logging.getLogger(__name__)

#: Default of ``model.init_min_match``; see :func:`load_init_weights`.
DEFAULT_INIT_MIN_MATCH = 0.5
#: ``--ckpt_path`` values Lightning resolves itself among the run's local checkpoint folders.
LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc")
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")


def allow_config_classes_in_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read vlalign checkpoints, whose hyper-parameters hold config dataclasses.

    Only these plain data classes are allow-listed (no code runs when they are rebuilt), so Lightning's resume
    (``--ckpt_path``, which loads with torch's default ``weights_only=True``) and ``init_from`` stay safe.
    """
    from vlalign.data.tokenization import VocabInfo
    from vlalign.data.transforms import AugmentConfig
    from vlalign.models.stream import StreamConfig
    from vlalign.models.vision import VisionConfig
    from vlalign.tasks.optim import OptimConfig

    torch.serialization.add_safe_globals([VisionConfig, StreamConfig, OptimConfig, VocabInfo, AugmentConfig])


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Tensors from a ``.safetensors`` file or a torch file loaded with ``weights_only=True``.

    Reading is :func:`vlalign.weights.reading.read_state_dict` (the one reader of weight files); Lightning
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
        raise InputFileError(f"{source}: expected a state dict (a dict of tensors), found a {type(obj).__name__}")
    return obj


# -- init_from -------------------------------------------------------------------------------------------------------
@dataclass
class InitMatch:
    """How well a weight file fits a model, measured on the model's online (non-momentum) tensors.

    A *part* is one top-level module of the model (``backbone.vision``, ``backbone.stream``, ``itc``, ``itm``,
    ``xmm``, ``psl``); the file *provides* a part when it holds at least one tensor named like that part's
    (momentum twins count for their online part).

    Attributes:
        parts: the parts the file provides.
        considered: the online tensors of those parts.
        matched: the considered tensors found in the file with the model's shape.
        online: how many online tensors the whole model has.
        mismatched: ``key: file shape vs model shape`` for keys in both whose shapes differ.
        unexpected: file keys the model has no tensor for.
    """

    parts: list[str]
    considered: list[str]
    matched: list[str]
    online: int
    mismatched: list[str]
    unexpected: list[str]

    @property
    def fraction(self) -> float:
        """matched / considered: 0.0 when the file provides no part of the model."""
        return len(self.matched) / len(self.considered) if self.considered else 0.0


def _part(key: str) -> str:
    """The top-level module a state-dict key belongs to (``backbone.vision``, ``itc``, ...)."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "backbone" and len(parts) > 2 else parts[0]


def match_init_state(own: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> InitMatch:
    """Compare a weight file's tensors (already in the model's key layout) with the model's state dict."""
    from vlalign.models.backbone import online_name

    online = [key for key in own if online_name(key) is None]
    model_parts = {_part(key) for key in online}
    parts = sorted({_part(online_name(key) or key) for key in state} & model_parts)
    considered = [key for key in online if _part(key) in parts]
    matched = [key for key in considered if key in state and tuple(state[key].shape) == tuple(own[key].shape)]
    mismatched = [
        f"{key}: file {tuple(value.shape)}, model {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and tuple(value.shape) != tuple(own[key].shape)
    ]
    unexpected = [key for key in state if key not in own]
    return InitMatch(parts, considered, matched, len(online), mismatched, unexpected)


def load_init_weights(
    model: nn.Module, path: str | Path, min_match: float = DEFAULT_INIT_MIN_MATCH
) -> tuple[list[str], list[str]]:
    """Initialise ``model`` from a weight file; momentum twins missing from it start as copies of the online weights.

    The file must fit the model: of the model's online (non-momentum) tensors in the parts the file provides
    (top-level modules such as ``backbone.vision``, ``backbone.stream``, ``itc``; see :class:`InitMatch`), at least
    ``min_match`` must be in the file with the model's shapes, and it must provide at least one part. So a full
    vlalign or converted reference checkpoint passes, an encoder-only file (``vlalign convert bert`` / ``timm``)
    passes for its encoder, and a file that matches nothing, or names the right tensors with other shapes, fails
    instead of training from random weights. Shapes that differ only by the vision position-embedding grid are
    interpolated (e.g. 256 px -> 384 px); any other shape difference is an error.

    Args:
        model: the recipe (or any module; a ``backbone`` attribute maps backbone-relative file keys).
        path: the weight file (see :func:`load_state_dict_file`).
        min_match: the fraction described above, in [0, 1] (``model.init_min_match``); 0 accepts any file.

    Returns:
        (missing, unexpected) keys: model tensors the file did not fill, file tensors the model has no slot for;
        both are logged.

    Raises:
        InputFileError: the file is unreadable, or does not fit the model (names the file, the fraction, a few
            missing keys and the fix).
    """
    from vlalign.models.backbone import online_name
    from vlalign.models.vision import interpolate_pos_embed

    if not 0.0 <= min_match <= 1.0:
        raise ValueError(f"model.init_min_match must be in [0, 1], got {min_match}")
    state = {key: value for key, value in load_state_dict_file(path).items() if isinstance(value, Tensor)}
    if isinstance(getattr(model, "backbone", None), nn.Module):
        from vlalign.models.backbone import with_prefix

        state = with_prefix(state)  # converted reference files use the backbone-relative layout (vision.*, stream.*)
    own = model.state_dict()
    for key, value in list(state.items()):
        if key.endswith("pos_embed") and key in own and own[key].shape != value.shape and value.ndim == 3:
            side = math.isqrt(own[key].shape[1] - 1)  # one class token, square grid (timm ViT layout)
            state[key] = interpolate_pos_embed(value, (side, side))
    match = match_init_state(own, state)
    _check_init_match(match, path, min_match, own, state)

    result = model.load_state_dict(state, strict=False)
    missing = list(result.missing_keys)
    # The reference copies online -> momentum before loading a checkpoint without teachers (docs/differences.md row 18),
    # leaving a random teacher; here a missing twin tensor is filled from its online counterpart after loading.
    online = model.state_dict()
    with torch.no_grad():
        for key in list(missing):
            source = online_name(key)
            if source and source in online and source not in missing:
                online[key].copy_(online[source])
                missing.remove(key)
    log.info(
        "init_from %s: %d of %d online tensors of %s found (%.0f%%)",
        path,
        len(match.matched),
        len(match.considered),
        ", ".join(match.parts),
        100 * match.fraction,
    )
    if missing:
        log.warning("init_from %s: %d tensors not in the checkpoint: %s", path, len(missing), missing[:20])
    if result.unexpected_keys:
        log.warning(
            "init_from %s: %d unused tensors: %s", path, len(result.unexpected_keys), result.unexpected_keys[:20]
        )
    return missing, list(result.unexpected_keys)


def _check_init_match(
    match: InitMatch, path: str | Path, min_match: float, own: Mapping[str, Tensor], state: Mapping[str, Tensor]
) -> None:
    fix = (
        "Use a vlalign checkpoint or a file written by `vlalign convert ...` for this model configuration "
        "(`vlalign convert` prints the model settings a file implies)"
    )
    if match.fraction < min_match or not match.parts:
        if not match.parts:
            found = (
                f"none of its {len(state)} tensors belongs to the model (the file's keys look like "
                f"{_examples(list(state))}; the model's look like {_examples(list(own))})"
            )
        else:
            absent = [key for key in match.considered if key not in match.matched]
            found = (
                f"only {len(match.matched)} of the model's {len(match.considered)} online (non-momentum) tensors "
                f"in the parts it provides ({', '.join(match.parts)}) are in it with the model's shapes "
                f"({match.fraction:.0%}, below model.init_min_match = {min_match:g}); missing or reshaped: "
                f"{_examples(absent)}"
            )
        shapes = f"; shape mismatches: {_examples(match.mismatched)}" if match.mismatched else ""
        raise InputFileError(
            f"model.init_from {path}: the file does not fit the model: {found}{shapes}. {fix}, or lower "
            "model.init_min_match (0 accepts any file)"
        )
    if match.mismatched:
        queues = any(".image_queue" in m or ".text_queue" in m for m in match.mismatched)
        hint = "; for ITC queues of another size convert with `--queues false`" if queues else ""
        raise InputFileError(
            f"model.init_from {path}: {len(match.mismatched)} tensor(s) have other shapes than the model's: "
            f"{_examples(match.mismatched)}. The file was made for another model configuration: set the model "
            f"settings it was trained with, or use another file{hint}"
        )


def _examples(keys: Sequence[str], limit: int = 5) -> str:
    if not keys:
        return "(none)"
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# -- --ckpt_path -----------------------------------------------------------------------------------------------------
def check_resume_checkpoint(path: str | Path) -> None:
    """Refuse a ``--ckpt_path`` that is not a safe, local, readable Lightning checkpoint, before Lightning loads it.

    - ``last``, ``best`` and ``hpc`` are left to Lightning, which resolves them among the run's local checkpoint
      folders (check the resolved path too when the caller resolves it itself);
    - any ``scheme://`` other than ``file://`` (``http``, ``s3`` ...) and Lightning's ``registry`` are refused:
      download the file and pass its local path, which is then loaded with ``weights_only=True``;
    - a ``.safetensors`` file is refused: ``--ckpt_path`` resumes training state, weights go to
      ``--model.init_from``;
    - a missing path, a directory, an empty, truncated or non-zip file, one holding pickled objects other than
      tensors, and a torch file without Lightning's ``state_dict`` are refused with the file named.

    The check loads the checkpoint with ``torch.load(weights_only=True, mmap=True)``: the pickled structure is
    read, tensor data is mapped, not copied.

    Raises:
        InputFileError: what is wrong and the fix.
    """
    text = str(path)
    if text in LIGHTNING_CKPT_KEYWORDS:
        return
    scheme = _SCHEME.match(text)
    if text == "registry" or text.startswith("registry:") or (scheme and scheme["scheme"].lower() != "file"):
        raise InputFileError(
            f"--ckpt_path {text}: remote checkpoints are not loaded (a checkpoint is a pickle, and remote ones "
            "would be unpickled without weights_only=True). Download it first (e.g. `curl -o run.ckpt URL`, "
            "`aws s3 cp URL run.ckpt`) and pass the local path: --ckpt_path run.ckpt"
        )
    if scheme:
        text = text[len(scheme.group(0)) :]
        if text.startswith("localhost/"):
            text = text[len("localhost") :]
    file = Path(text).expanduser()
    if file.suffix == ".safetensors":
        raise InputFileError(
            f"--ckpt_path {file}: a .safetensors file holds weights only; --ckpt_path resumes a Lightning .ckpt "
            f"(weights, optimizer, step, data position). To start a new run from these weights use "
            f"--model.init_from {file}"
        )
    if not file.exists():
        raise InputFileError(f"--ckpt_path {file}: does not exist; give the path of a Lightning .ckpt file")
    if file.is_dir():
        inside = sorted(p.name for p in file.glob("*.ckpt"))
        hint = f" (it holds {', '.join(inside[:5])})" if inside else ""
        raise InputFileError(f"--ckpt_path {file}: is a directory{hint}; give the .ckpt file in it")
    allow_config_classes_in_checkpoints()
    try:
        checkpoint = torch_load_weights_only(file, mmap=True)
    except InputFileError as err:
        raise InputFileError(f"--ckpt_path {err}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise InputFileError(
            f"--ckpt_path {file}: not a Lightning checkpoint (no 'state_dict' entry: it holds weights, not a "
            f"training state). To start a new run from these weights use --model.init_from {file}"
        )
