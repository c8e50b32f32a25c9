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

from vlalign.data.text import pre_caption
from vlalign.data.transforms import BadSampleError, load_rgb
from vlalign.tokenization import tokenize_captions


def load_annotations(json_file: str | Path) -> list[dict[str, Any]]:
    """Read a JSON list of annotation entries, with an error that names the file when it is not one."""
    path = Path(json_file)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        entries = json.load(handle)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    return entries


class RetrievalEvalDataset(Dataset):
    """One item per image with all of its captions (``pre_caption``'d), for retrieval evaluation.

    Relative image paths are resolved against ``image_root``. Unlike training, an unreadable image raises:
    silently dropping test images would change the reported recall.
    """

    def __init__(
        self,
        json_file: str | Path,
        image_root: str | Path,
        transform: Callable[[Image.Image], Tensor],
        max_words: int = 30,
    ) -> None:
        entries = load_annotations(json_file)
        self.json_file = Path(json_file)
        self.transform = transform
        self.images: list[Path] = []
        self.captions: list[str] = []
        self.text_image_index: list[int] = []
        self.image_text_index: list[list[int]] = []
        for image_index, entry in enumerate(entries):
            if "image" not in entry or "caption" not in entry:
                raise ValueError(f"{json_file}: entry {image_index} needs 'image' and 'caption' keys")
            captions = entry["caption"]
            captions = [captions] if isinstance(captions, str) else list(captions)
            self.images.append(Path(image_root) / entry["image"])
            first = len(self.captions)
            self.captions.extend(pre_caption(c, max_words) for c in captions)
            self.text_image_index.extend([image_index] * len(captions))
            self.image_text_index.append(list(range(first, len(self.captions))))

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
            raise BadSampleError(err.reason, f"{path}: {err.message}") from err
        text_index = self.image_text_index[index]
        return {
            "image": self.transform(image),
            "image_index": index,
            "captions": [self.captions[t] for t in text_index],
            "text_index": text_index,
        }


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
