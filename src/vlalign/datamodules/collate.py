"""Turning raw pre-training records into samples, and samples into the training batch the model consumes.

Both pre-training data modules (WebDataset shards and JSON caption lists) share this code, so a record is
decoded, skipped and counted the same way whatever the storage format.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from vlalign.data.masking import BlockMaskGenerator
from vlalign.data.text import pre_caption
from vlalign.data.transforms import BadSampleError, PretrainTransform, load_rgb
from vlalign.tokenization import tokenize_captions

#: Skip reasons produced here (``load_rgb`` adds its own, e.g. "decompression_bomb").
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
DECODE_ERROR = "decode_error"
MISSING_FILE = "missing_file"
SHARD_ERROR = "shard_error"


@dataclass
class Sample:
    """One decoded, augmented training pair (everything but tokenisation, which is done per batch)."""

    key: str
    image: Tensor
    caption: str
    tokenizer_view: Tensor | None = None
    patch_mask: Tensor | None = None


class SkippedSample(NamedTuple):
    """Marker for a record that cannot be trained on; ``reason`` is the tag it is counted under."""

    key: str
    reason: str


class SampleProcessor:
    """Decode one record (image file + raw caption) into a :class:`Sample`, or a :class:`SkippedSample`.

    Returning a marker instead of raising keeps one bad file in a billion from stopping a run, while the
    counts by reason make a systematic problem (a broken shard, an empty caption column) visible in the logs.
    """

    def __init__(
        self, transform: PretrainTransform, max_words: int, mask_generator: BlockMaskGenerator | None = None
    ) -> None:
        self.transform = transform
        self.max_words = max_words
        self.mask_generator = mask_generator

    def __call__(
        self, key: str, image: bytes | str | Path | None, caption: str | None, rng: random.Random | None = None
    ) -> Sample | SkippedSample:
        """``rng`` drives the block mask; None uses Python's global generator (re-seeded per worker by torch)."""
        if image is None:
            return SkippedSample(key, MISSING_IMAGE)
        if caption is None:
            return SkippedSample(key, MISSING_CAPTION)
        text = pre_caption(caption, self.max_words)
        if not text.strip():
            return SkippedSample(key, EMPTY_CAPTION)
        try:
            pil = load_rgb(image)
        except BadSampleError as err:
            return SkippedSample(key, err.reason)
        except Exception:  # noqa: BLE001 - any decoder failure is a bad file, not a bug in the pipeline
            return SkippedSample(key, DECODE_ERROR)
        pixels, text, tokenizer_view = self.transform(pil, text)
        patch_mask = None
        if self.mask_generator is not None:
            patch_mask = torch.from_numpy(self.mask_generator(rng).reshape(-1).copy())
        return Sample(key, pixels, text, tokenizer_view, patch_mask)


class PretrainCollate:
    """Stack samples and tokenise their captions into the training batch.

    Markers in ``items`` are dropped and counted, so a map-style loader's batch can be a little smaller than
    ``batch_size``; ``skipped`` adds counts from records dropped before batching (the shard pipeline's case).
    Output keys: ``image``, ``input_ids``, ``attention_mask``, ``skipped``, ``keys`` and, when configured,
    ``tokenizer_view`` and ``patch_mask``.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(
        self, items: Sequence[Sample | SkippedSample], skipped: Mapping[str, int] | None = None
    ) -> dict[str, Any]:
        counts: Counter[str] = Counter(skipped or {})
        samples: list[Sample] = []
        for item in items:
            if isinstance(item, SkippedSample):
                counts[item.reason] += 1
            else:
                samples.append(item)
        if not samples:
            raise RuntimeError(f"every sample of a batch was unusable (skipped: {dict(counts)}); check the data files")
        input_ids, attention_mask = tokenize_captions(
            self.tokenizer, [s.caption for s in samples], self.max_length, padding="longest"
        )
        batch: dict[str, Any] = {
            "image": torch.stack([s.image for s in samples]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "skipped": dict(counts),
            "keys": [s.key for s in samples],
        }
        if samples[0].tokenizer_view is not None:
            batch["tokenizer_view"] = torch.stack([s.tokenizer_view for s in samples])  # type: ignore[misc]
        if samples[0].patch_mask is not None:
            batch["patch_mask"] = torch.stack([s.patch_mask for s in samples])  # type: ignore[misc]
        return batch
