"""Turning raw pre-training records into samples, and samples into the training batch the model consumes.

Both pre-training data modules (WebDataset shards and JSON caption lists) share this code, so a record is
decoded, skipped and counted the same way whatever the storage format.
"""

from __future__ import annotations

import logging
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
from vlalign.data.tokenization import tokenize_captions
from vlalign.data.transforms import DEFAULT_MAX_PIXELS, BadSampleError, PretrainTransform, load_rgb

log = logging.getLogger(__name__)

#: Skip reasons produced here (``load_rgb`` adds its own, e.g. "decompression_bomb").
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
CAPTION_ENCODING = "caption_encoding"
DECODE_ERROR = "decode_error"
MISSING_FILE = "missing_file"
SHARD_ERROR = "shard_error"
TRANSFORM_ERROR = "transform_error"
# Warnings logged per worker for unexpected failures (transform errors) before going quiet; counts go on.
_MAX_LOGGED_FAILURES = 5


class TooManyBadSamples(RuntimeError):
    """Too large a share of the training records was unusable: the data (or its configuration) is broken.

    Raised inside the data pipeline, in a DataLoader worker when there are workers; a ``RuntimeError`` built
    from one message, so the DataLoader re-raises it in the main process under this same type.
    """


class SkipGuard:
    """Counts the records one pipeline copy (one DataLoader worker, or the main process) read and skipped, and
    raises :class:`TooManyBadSamples` once more than ``max_fraction`` of them were skipped.

    The check applies only after ``check_after`` records, so a few bad files at the start cannot stop a run.
    Counts accumulate for the lifetime of the pipeline copy: one epoch, or the whole run with persistent
    workers or ``num_workers=0``. ``source`` names the data in the error message.
    """

    def __init__(self, max_fraction: float, check_after: int, source: str) -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_fraction}")
        if check_after < 1:
            raise ValueError(f"skip_check_after must be >= 1, got {check_after}")
        self.max_fraction = max_fraction
        self.check_after = check_after
        self.source = source
        self.seen = 0
        self.skipped: Counter[str] = Counter()
        self.where: Counter[str] = Counter()  # skips per shard, when the pipeline knows it

    def good(self, count: int = 1) -> None:
        self.seen += count

    def bad(self, reason: str, count: int = 1, where: str | None = None) -> None:
        self.seen += count
        self.skipped[reason] += count
        if where:
            self.where[where] += count
        self.check()

    @property
    def fraction(self) -> float:
        return sum(self.skipped.values()) / self.seen if self.seen else 0.0

    def check(self, force: bool = False) -> None:
        """Raise when the skipped fraction is too high; ``force`` ignores ``check_after`` (nothing was usable)."""
        if (force or self.seen >= self.check_after) and self.fraction > self.max_fraction:
            raise TooManyBadSamples(self.describe())

    def describe(self) -> str:
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{reason}={count}" for reason, count in self.skipped.most_common())
        text = (
            f"{total} of {self.seen} training records ({self.fraction:.1%}) were unusable, more than "
            f"data.max_skip_fraction={self.max_fraction:g} allows; skip reasons: {reasons}; data source: {self.source}"
        )
        if self.where:
            text += "; most skips in: " + ", ".join(f"{where} ({n})" for where, n in self.where.most_common(3))
        return text + ". Fix or remove the broken data, or raise data.max_skip_fraction if this loss is expected."


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
        self,
        transform: PretrainTransform,
        max_words: int,
        mask_generator: BlockMaskGenerator | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.transform = transform
        self.max_words = max_words
        self.mask_generator = mask_generator
        self.max_pixels = max_pixels
        self._failures_logged = 0

    def __call__(
        self,
        key: str,
        image: bytes | str | Path | None,
        caption: str | bytes | None,
        rng: random.Random | None = None,
    ) -> Sample | SkippedSample:
        """``rng`` drives the block mask; None uses Python's global generator (re-seeded per worker by torch).

        A ``bytes`` caption (a shard's ``.txt`` member) must be UTF-8; a ``str`` caption must be encodable as
        UTF-8 (JSON can carry lone surrogates, which the tokenizer rejects).
        """
        if image is None:
            return SkippedSample(key, MISSING_IMAGE)
        if caption is None:
            return SkippedSample(key, MISSING_CAPTION)
        try:
            caption = caption.decode("utf-8") if isinstance(caption, bytes) else caption
            caption.encode("utf-8")
        except UnicodeError:
            return SkippedSample(key, CAPTION_ENCODING)
        text = pre_caption(caption, self.max_words)
        if not text.strip():
            return SkippedSample(key, EMPTY_CAPTION)
        try:
            pil = load_rgb(image, max_pixels=self.max_pixels)
        except BadSampleError as err:
            return SkippedSample(key, err.reason)
        except Exception:  # noqa: BLE001 - any decoder failure is a bad file, not a bug in the pipeline
            return SkippedSample(key, DECODE_ERROR)
        try:
            pixels, text, tokenizer_view = self.transform(pil, text)
        except Exception as err:  # noqa: BLE001 - odd images can trip augmentations; never kill the worker
            # A systematic failure here (a bug) skips everything and trips the skip-fraction guard by name.
            if self._failures_logged < _MAX_LOGGED_FAILURES:
                self._failures_logged += 1
                log.warning("skipping %s: transform failed on a %sx%s image: %r", key, *pil.size, err)
            return SkippedSample(key, TRANSFORM_ERROR)
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

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, guard: SkipGuard | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.guard = guard

    def __call__(
        self, items: Sequence[Sample | SkippedSample], skipped: Mapping[str, int] | None = None
    ) -> dict[str, Any]:
        """``guard``, when set, counts ``items`` (not ``skipped``: whoever passes those counted them already)."""
        counts: Counter[str] = Counter(skipped or {})
        samples = [item for item in items if not isinstance(item, SkippedSample)]
        if self.guard is not None:
            self.guard.good(len(samples))
        for item in items:
            if isinstance(item, SkippedSample):
                counts[item.reason] += 1
                if self.guard is not None:
                    self.guard.bad(item.reason)
        if not samples:
            message = f"every sample of a batch was unusable (skipped: {dict(counts)}); check the data files"
            if self.guard is not None:
                message += f" ({self.guard.describe()})"
            raise TooManyBadSamples(message)
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
