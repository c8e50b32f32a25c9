"""Shared checkpoint-reading helpers: one report type and one reader for every local weight format we accept.

Every file that cannot be used raises :class:`~vlalign.errors.InputFileError` naming the file, what it was expected
to be and what to do; nothing is ever unpickled beyond ``torch.load(weights_only=True)``, and torch's advice to retry
with ``weights_only=False`` is never passed on (it would run any code the file holds).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlalign.errors import InputFileError

# File names looked for, in order, when a checkpoint path is a directory (Hugging Face / timm layouts).
DIRECTORY_CANDIDATES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")

#: What a weight file given to vlalign is expected to be, for error messages.
WEIGHT_FILE_KINDS = (
    "a .safetensors file, or a PyTorch file of tensors (torch.save of a state dict, a Lightning .ckpt, "
    "a .pth / .bin checkpoint)"
)
ZIP_MAGIC = b"PK\x03\x04"
# torch.save's pre-1.6 format: a pickle (protocol 2) that starts with this magic number (a 10-byte long).
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a"


@dataclass
class LoadReport:
    """What a checkpoint load did, so callers can log it and tests can assert on it instead of trusting silence."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors; "
            f"missing {len(self.missing)}{_preview(self.missing)}; "
            f"unexpected {len(self.unexpected)}{_preview(self.unexpected)}"
        )


def _preview(names: Sequence[str], limit: int = 4) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:limit])
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return f" ({shown}{more})"


def resolve_checkpoint(path: str | Path, candidates: Iterable[str] = DIRECTORY_CANDIDATES) -> Path:
    """A file path is used as is; a directory is searched for the first known weight file."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in candidates:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no checkpoint ({', '.join(candidates)}) in directory {path}")
    raise FileNotFoundError(f"checkpoint path does not exist: {path}")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read tensors on CPU: safetensors by extension, anything else through torch.load with weights_only.

    Raises:
        FileNotFoundError: the path (or a weight file in the directory) does not exist.
        InputFileError: the file is empty, truncated, not a weight file, or holds pickled Python objects other
            than tensors (refused: unpickling them could run code); the message names the file.
    """
    file = resolve_checkpoint(path)
    if file.suffix == ".safetensors":
        return read_safetensors(file)
    obj = torch_load_weights_only(file)
    if not isinstance(obj, dict):
        raise InputFileError(
            f"{file}: holds a {type(obj).__name__}, not a dict of tensors; expected {WEIGHT_FILE_KINDS}. "
            "Save the weights with torch.save(model.state_dict(), path) or as .safetensors"
        )
    return obj


def read_safetensors(file: str | Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file on CPU; an unreadable file raises :class:`InputFileError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(file)
    _refuse_empty(file, "a safetensors file")
    try:
        return load_file(str(file), device="cpu")
    except SafetensorError as err:
        raise _unreadable_safetensors(file, err) from None


def _unreadable_safetensors(file: Path, err: Exception) -> InputFileError:
    hint = " (it is a zip archive: a PyTorch file; rename it to .pt / .ckpt)" if _is_zip(file) else ""
    return InputFileError(
        f"{file}: not a readable safetensors file ({err}){hint}. The file is truncated, corrupt or not "
        "safetensors at all: download or convert it again (`vlalign convert ...` writes .safetensors)"
    )


def read_tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors of a weight file without reading their data (for config checks).

    Safetensors: from the header; torch files: a memory-mapped ``weights_only=True`` load. Lightning / reference
    wrappers (``state_dict``, ``model``, ``module``) are unwrapped; non-tensor entries are left out. Errors as
    :func:`read_state_dict`.
    """
    file = resolve_checkpoint(path)
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        _refuse_empty(file, "a safetensors file")
        try:
            with safe_open(str(file), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except SafetensorError as err:
            raise _unreadable_safetensors(file, err) from None
    obj = torch_load_weights_only(file, mmap=True)
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        return {}
    return {str(key): tuple(value.shape) for key, value in obj.items() if isinstance(value, Tensor)}


def torch_load_weights_only(file: str | Path, *, mmap: bool = False, map_location: Any = "cpu") -> object:
    """``torch.load(file, weights_only=True)`` (on CPU by default), every failure an error naming the file.

    A file holding Python objects other than tensors and plain containers is refused and the message says which
    object (``Unsupported global: ...``); torch's suggestion to load it with ``weights_only=False`` is not repeated.
    """
    file = Path(file)
    _refuse_empty(file, "a PyTorch checkpoint")
    head = _head(file, 16)
    try:
        return torch.load(file, map_location=map_location, weights_only=True, mmap=mmap and zipfile.is_zipfile(file))
    except pickle.UnpicklingError as err:
        detail = _unpickler_detail(str(err))
        if "Unsupported global" in detail:
            raise InputFileError(
                f"{file}: refused: the file holds pickled Python objects other than tensors ({detail}). vlalign "
                "loads checkpoints with torch.load(weights_only=True) only, because unpickling such objects can "
                f"run arbitrary code. Expected {WEIGHT_FILE_KINDS}; if the file is yours and trusted, re-save just "
                "its tensors (torch.save(model.state_dict(), path)) or convert it to .safetensors"
            ) from None
        raise _not_a_checkpoint(file, head, detail) from None
    except Exception as err:  # noqa: BLE001 - any failure to parse the bytes means the file is not usable
        raise _not_a_checkpoint(file, head, _first_sentence(err)) from None


def _not_a_checkpoint(file: Path, head: bytes, detail: str) -> InputFileError:
    """The error for a file torch cannot read, by what its first bytes say it is."""
    if head.startswith(ZIP_MAGIC):
        what = "a damaged or truncated PyTorch checkpoint (a zip archive torch cannot read)"
        fix = "copy or download it again, or use an earlier checkpoint"
    elif _looks_like_safetensors(file, head):
        return InputFileError(
            f"{file}: this is a safetensors file without the .safetensors extension; rename it to end in "
            ".safetensors so that it is read as one"
        )
    elif head[:1] == b"\x80" and not head.startswith(LEGACY_TORCH_MAGIC):
        return InputFileError(
            f"{file}: refused: a plain Python pickle, not a file written by torch.save; vlalign does not unpickle "
            f"it because unpickling can run arbitrary code. Expected {WEIGHT_FILE_KINDS}: re-save the tensors "
            "with torch.save(state_dict, path) or convert them to .safetensors"
        )
    else:
        what = "not a PyTorch checkpoint (neither the zip archive torch.save writes nor a legacy torch file)"
        fix = "check the path, or copy, download or convert the file again"
    reason = f" ({detail})" if detail and "weights_only" not in detail else ""
    return InputFileError(f"{file}: {what}{reason}; expected {WEIGHT_FILE_KINDS}: {fix}")


def _refuse_empty(file: Path, kind: str) -> None:
    try:
        size = file.stat().st_size
    except OSError as err:
        raise InputFileError(f"{file}: cannot be read ({err.strerror or err}); expected {kind}") from None
    if size == 0:
        raise InputFileError(
            f"{file}: the file is empty (0 bytes), expected {kind}; a copy or download was probably interrupted: "
            "copy or download it again"
        )


def _head(file: Path, size: int) -> bytes:
    try:
        with open(file, "rb") as handle:
            return handle.read(size)
    except OSError:
        return b""


def _is_zip(file: Path) -> bool:
    return _head(file, 4) == ZIP_MAGIC


def _looks_like_safetensors(file: Path, head: bytes) -> bool:
    """A little-endian u64 header length that fits in the file, then a JSON object."""
    try:
        size = file.stat().st_size
    except OSError:
        return False
    return len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size


_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*(.*?)(?:\s+was not an allowed global|\s+Please use|\n\n|$)", re.S)


def _unpickler_detail(message: str) -> str:
    """The cause torch names (``Unsupported global: GLOBAL os.system``), without its advice to drop weights_only."""
    match = _UNPICKLER.search(message)
    detail = " ".join(match.group(1).split()) if match else ""
    return "" if "weights_only" in detail else detail


def _first_sentence(err: BaseException) -> str:
    text = " ".join(str(err).split())
    sentence = text.split(". ")[0].rstrip(".")
    return f"{type(err).__name__}: {sentence}" if sentence else type(err).__name__
