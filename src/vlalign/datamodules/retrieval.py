"""Image-text retrieval evaluation data: Karpathy-split JSON (one entry per image, several captions).

Every caption gets a global index and every image a global index, and batches carry both, so the model can
assemble the full image x text score matrix however the loader was sharded (Lightning's distributed sampler
pads evaluation shards with repeats; global indices let the model drop them).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from vlalign.data.annotations import (
    LAYOUT,
    check_images_exist,
    entry_captions,
    json_kind,
    load_annotations,
)
from vlalign.data.text import pre_caption
from vlalign.data.tokenization import tokenize_captions
from vlalign.data.transforms import BadSampleError, load_rgb
from vlalign.errors import InputFileError

__all__ = ["RetrievalCollate", "RetrievalEvalDataset", "load_annotations"]


class RetrievalEvalDataset(Dataset):
    """One item per image with all of its captions (``pre_caption``'d), for retrieval evaluation.

    Relative image paths are resolved against ``image_root``. The file is checked when the dataset is built: every
    entry needs an image path and at least one caption, and every image file must exist, so a wrong
    ``data.image_root`` fails at setup with one message instead of in a data worker. Unlike training, an unreadable
    image raises: silently dropping test images would change the reported recall.

    Raises:
        InputFileError: the file is not a usable caption list, an entry lacks its image or captions, or images are
            not found (the message names the file, the entry and the fix).
    """

    def __init__(
        self,
        json_file: str | Path,
        image_root: str | Path,
        transform: Callable[[Image.Image], Tensor],
        max_words: int = 30,
        check_images: bool = True,
    ) -> None:
        entries = load_annotations(json_file)
        self.json_file = Path(json_file)
        self.transform = transform
        self.images: list[Path] = []
        self.captions: list[str] = []
        self.text_image_index: list[int] = []
        self.image_text_index: list[list[int]] = []
        for image_index, entry in enumerate(entries):
            image = entry.get("image") if isinstance(entry, dict) else None
            if not isinstance(image, str) or not image:
                raise InputFileError(
                    f"{json_file}: entry {image_index} has no image path ('image': a non-empty string), got "
                    f"{_describe(entry, 'image')}; retrieval entries look like {LAYOUT}"
                )
            captions = entry_captions(entry)
            if captions is None:
                raise InputFileError(
                    f"{json_file}: entry {image_index} ({image}) has no caption ('caption': a string or a non-empty "
                    f"list of strings), got {_describe(entry, 'caption')}; every evaluation image needs a caption"
                )
            self.images.append(Path(image_root) / image)
            first = len(self.captions)
            self.captions.extend(pre_caption(c, max_words) for c in captions)
            self.text_image_index.extend([image_index] * len(captions))
            self.image_text_index.append(list(range(first, len(self.captions))))
        if check_images:
            check_images_exist(json_file, list(enumerate(self.images)), Path(image_root))

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_texts(self) -> int:
        return len(self.captions)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.images[index]
        try:
            image = load_rgb(path)
        except BadSampleError as err:
            raise InputFileError(
                f"{self.json_file}: entry {index}: image {path}: {err.message} ({err.reason}); evaluation needs every "
                "image: fix or remove the entry"
            ) from err
        text_index = self.image_text_index[index]
        return {
            "image": self.transform(image),
            "image_index": index,
            "captions": [self.captions[t] for t in text_index],
            "text_index": text_index,
        }


def _describe(entry: Any, key: str) -> str:
    """What an entry holds under ``key``, briefly, for error messages."""
    if not isinstance(entry, dict):
        return f"a JSON {json_kind(entry)} instead of an object"
    if key not in entry:
        return f"no {key!r} key"
    value = entry[key]
    if isinstance(value, list) and not value:
        return "an empty list"
    return f"a JSON {json_kind(value)} {json.dumps(value)[:60]}"


class RetrievalCollate:
    """Batch images and flatten all their captions, tokenised as the reference evaluates (pad/truncate to L)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        captions = [c for item in items for c in item["captions"]]
        input_ids, attention_mask = tokenize_captions(self.tokenizer, captions, self.max_length, padding="max_length")
        return {
            "image": torch.stack([item["image"] for item in items]),
            "image_index": torch.tensor([item["image_index"] for item in items], dtype=torch.long),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "text_image_index": torch.tensor(
                [item["image_index"] for item in items for _ in item["captions"]], dtype=torch.long
            ),
            "text_index": torch.tensor([t for item in items for t in item["text_index"]], dtype=torch.long),
        }
