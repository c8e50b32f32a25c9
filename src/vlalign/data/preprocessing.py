"""What a trained model needs from its data pipeline at inference: the tokenizer's files and the evaluation settings.

A checkpoint records this (the recipe stores it next to the model spec), so ``vlalign.load`` tokenises captions and
prepares images exactly as evaluation did, without the training config or the tokenizer folder.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from vlalign.data.transforms import CLIP_MEAN, CLIP_STD


@dataclass
class Preprocessing:
    """Evaluation-time preprocessing: squash-resize to ``image_size`` and normalise; captions cleaned with
    ``pre_caption(max_words)`` and tokenised as ``[CLS] word-pieces`` cut to ``max_length`` tokens."""

    image_size: int
    max_words: int = 30
    max_length: int = 30
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    tokenizer_files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    def write_tokenizer(self, directory: str | Path) -> Path:
        """Write the recorded tokenizer files into ``directory`` (created); returns it."""
        if not self.tokenizer_files:
            raise ValueError("this model records no tokenizer: pass one with tokenizer=PATH")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in self.tokenizer_files.items():
            (out / Path(name).name).write_text(text)
        return out


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """The text files ``save_pretrained`` writes for ``tokenizer`` (a few hundred kB for a BERT vocabulary)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {path.name: path.read_text() for path in sorted(Path(tmp).iterdir()) if path.is_file()}


def preprocessing_of(datamodule: Any) -> Preprocessing | None:
    """The evaluation preprocessing of a vlalign data module (None for data modules without a tokenizer)."""
    tokenizer = getattr(datamodule, "tokenizer", None)
    image_size = getattr(datamodule, "image_size", None)
    if tokenizer is None or not isinstance(image_size, int):
        return None
    return Preprocessing(
        image_size=image_size,
        max_words=int(getattr(datamodule, "max_words", 30)),
        max_length=int(getattr(datamodule, "eval_max_length", 30)),
        tokenizer_files=tokenizer_files(tokenizer),
    )
