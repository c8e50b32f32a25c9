"""Shared checkpoint-reading helpers: one report type and one reader for every local weight format we accept."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

# File names looked for, in order, when a checkpoint path is a directory (Hugging Face / timm layouts).
DIRECTORY_CANDIDATES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")


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
    """Read tensors on CPU: safetensors by extension, anything else through torch.load with weights_only."""
    file = resolve_checkpoint(path)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file), device="cpu")
    obj = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise TypeError(f"{file} holds a {type(obj).__name__}, expected a state dict")
    return obj
