"""Retrieval fine-tuning data in the layout ALBEF / SIMLA ship for COCO and Flickr30k (Karpathy splits).

- training: ``[{"image": path, "caption": str, "image_id": any}, ...]``, one entry per caption; captions of one
  image share its ``image_id`` (any JSON value; mapped to integers here), which the ITC targets and the ITM hard
  negatives read as ``batch["image_ids"]`` (docs/method.md §2.1, §2.2);
- evaluation: ``[{"image": path, "caption": [str, ...]}, ...]``, one entry per image
  (:class:`~vlalign.datamodules.retrieval.RetrievalEvalDataset`: a missing image or an empty caption list is an
  error naming the file and the entry).

Decoding, augmentation, batching, skip counting and the evaluation loaders are the pre-training modules' own
(:class:`~vlalign.datamodules.base.PretrainDataModule`): a bad training entry (no image, missing or undecodable file,
no or empty caption) is skipped and counted by reason, never fatal unless more than ``max_skip_fraction`` are bad.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from vlalign.data.annotations import DEFAULT_IMAGE_CHECKS, check_images_exist, load_annotations
from vlalign.data.tokenization import load_tokenizer
from vlalign.data.transforms import DEFAULT_MAX_PIXELS, AugmentConfig
from vlalign.datamodules.base import PretrainDataModule, require_path, require_positive
from vlalign.datamodules.collate import (
    MISSING_CAPTION,
    MISSING_FILE,
    MISSING_IMAGE,
    PretrainCollate,
    Sample,
    SampleProcessor,
    SkipGuard,
    SkippedSample,
)
from vlalign.errors import ConfigError, InputFileError

__all__ = [
    "FINETUNE_AUGMENT",
    "RetrievalFinetuneDataModule",
    "RetrievalSample",
    "RetrievalTrainCollate",
    "RetrievalTrainDataset",
]

#: The reference fine-tuning view: random resized crop with scale (0.5, 1), flip, RandAugment(2, 7).
FINETUNE_AUGMENT = AugmentConfig(scale=(0.5, 1.0))


@dataclass
class RetrievalSample(Sample):
    """A training :class:`~vlalign.datamodules.collate.Sample` and the integer id of the image it shows."""

    image_id: int = -1


class RetrievalTrainDataset(Dataset):
    """One item per training entry: the decoded, augmented image, its caption and its image id.

    ``entries`` are ``(image path, caption, image id)``; an entry without a usable image path has a ``str`` key
    naming it (``file.json#position``) instead of the path and is always skipped as ``missing_image``.
    """

    def __init__(self, entries: list[tuple[Path | str, Any, int]], processor: SampleProcessor) -> None:
        self.entries = entries
        self.processor = processor

    @classmethod
    def from_files(
        cls,
        files: Sequence[str | Path],
        processor: SampleProcessor,
        roots: Sequence[Path],
        image_checks: int | None = DEFAULT_IMAGE_CHECKS,
    ) -> RetrievalTrainDataset:
        """Read every file; relative image paths of ``files[i]`` resolve against ``roots[i]``.

        ``image_id`` values are mapped to consecutive integers in order of first appearance, over all files (an
        entry without one uses its image path, so the captions of one file still group). A file that is not a
        non-empty JSON list, or none of whose checked images exists (a wrong image root), raises
        :class:`~vlalign.errors.InputFileError`.
        """
        ids: dict[str, int] = {}
        entries: list[tuple[Path | str, Any, int]] = []
        for json_file, root in zip(files, roots, strict=True):
            images: list[tuple[int, Path]] = []
            for position, entry in enumerate(load_annotations(json_file)):
                record = entry if isinstance(entry, dict) else {}
                image, caption = record.get("image"), record.get("caption")
                has_image = isinstance(image, str) and bool(image)
                raw_id = record.get("image_id")
                key = json.dumps(raw_id, sort_keys=True) if raw_id is not None else f"path:{image}"
                image_id = ids.setdefault(key, len(ids))
                if has_image:
                    entries.append((root / image, caption, image_id))
                    images.append((position, root / image))
                else:  # counted when drawn, like every other bad sample
                    entries.append((f"{json_file}#{position}", caption, image_id))
            if image_checks is not None:
                check_images_exist(json_file, images, root, limit=image_checks)
        return cls(entries, processor)

    @property
    def num_image_ids(self) -> int:
        return len({image_id for _, _, image_id in self.entries})

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> RetrievalSample | SkippedSample:
        path, caption, image_id = self.entries[index]
        key = str(path)
        if not isinstance(path, Path):
            return SkippedSample(key, MISSING_IMAGE)
        if isinstance(caption, list):  # tolerated: one of the captions, as the pre-training lists do
            caption = random.choice(caption) if caption else None
        if caption is not None and not isinstance(caption, str):
            return SkippedSample(key, MISSING_CAPTION)
        if not path.is_file():
            return SkippedSample(key, MISSING_FILE)
        sample = self.processor(key, path, caption)
        if isinstance(sample, SkippedSample):
            return sample
        return RetrievalSample(**{f.name: getattr(sample, f.name) for f in fields(Sample)}, image_id=image_id)


class RetrievalTrainCollate(PretrainCollate):
    """The pre-training batch plus ``image_ids`` (long [B]) of the samples kept."""

    def __call__(self, items: Sequence[Any], skipped: Any = None) -> dict[str, Any]:
        batch = super().__call__(items, skipped)
        kept = [item for item in items if not isinstance(item, SkippedSample)]  # the samples the batch holds
        batch["image_ids"] = torch.tensor([item.image_id for item in kept], dtype=torch.long)
        return batch


class RetrievalFinetuneDataModule(PretrainDataModule):
    """Image-text retrieval fine-tuning and evaluation data (COCO / Flickr30k Karpathy JSON, ALBEF layout).

    The tokenizer and image size default to the model's: under ``vlalign finetune`` / ``vlalign evaluate`` the
    task module records the tokenizer of the model it loaded (``model.init_from``) and its image size, and this
    module adopts them at setup, so captions are tokenised exactly as the model was trained.

    Args:
        train_files: training JSON files ``[{image, caption, image_id}]`` (concatenated); needed by ``finetune``.
        val_file: evaluation JSON ``[{image, caption: [..]}]`` evaluated at validation (best checkpoint).
        test_file: the same layout, evaluated by ``test`` (and by ``finetune`` after training).
        image_root: directory relative image paths resolve against; by default each JSON file's own directory.
        tokenizer: tokenizer directory (``save_pretrained`` layout); None: the model's (see above).
        image_size: side of the square images; None: the model's (linked into ``model.image_size`` by the CLI).
        batch_size: training batch per process (reference: 32).
        eval_batch_size: images per evaluation batch (their captions come along).
        num_workers: DataLoader worker processes.
        max_words: captions are cut to this many words by ``pre_caption`` (reference: 30).
        max_length: training token length including [CLS]; batches pad to the longest caption.
        eval_max_length: evaluation captions are padded and cut to exactly this length (reference: 30).
        augment: training augmentation (reference fine-tuning: crop scale (0.5, 1), flip, RandAugment(2, 7)).
        pin_memory: pin host memory of batches.
        persistent_workers: keep workers alive between epochs (with ``num_workers > 0``).
        seed: base seed of the data order.
        max_skip_fraction: stop when more than this fraction of the training entries read was unusable.
        skip_check_after: entries a data worker must have read before ``max_skip_fraction`` applies.
        max_image_pixels: images declaring more pixels are skipped as decompression bombs.
    """

    def __init__(
        self,
        train_files: list[str] | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        image_root: str | None = None,
        tokenizer: str | None = None,
        image_size: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 4,
        max_words: int = 30,
        max_length: int = 30,
        eval_max_length: int = 30,
        augment: AugmentConfig = FINETUNE_AUGMENT,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
        max_skip_fraction: float = 0.1,
        skip_check_after: int = 1000,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if image_size is not None:
            require_positive(image_size, "image_size")
        # The base module needs a tokenizer directory and an image size now; both may come from the model at
        # setup instead, so it is given stand-ins that the lines after it reset.
        super().__init__(
            tokenizer=tokenizer if tokenizer is not None else ".",
            val_retrieval=val_file,
            test_retrieval=test_file,
            image_root=image_root,
            image_size=image_size or 1,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            max_words=max_words,
            max_length=max_length,
            eval_max_length=eval_max_length,
            augment=augment,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            seed=seed,
            max_skip_fraction=max_skip_fraction,
            skip_check_after=skip_check_after,
            max_image_pixels=max_image_pixels,
        )
        self.tokenizer_path = require_path(tokenizer, "tokenizer") if tokenizer is not None else None
        self.image_size = image_size  # type: ignore[assignment]  # None until adopted from the model
        self.train_files = [require_path(path, "train_files") for path in train_files or []]
        self.train_dataset: RetrievalTrainDataset | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None

    # -- tokenizer and image size: given, or the model's --------------------------------------------------------
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:  # type: ignore[override]
        if self._tokenizer is None:
            if self.tokenizer_path is None:
                raise ConfigError(
                    "data.tokenizer is not set and no model provided one: set data.tokenizer to a tokenizer "
                    "directory, or run the module under `vlalign finetune` / `vlalign evaluate`, where the model's "
                    "recorded tokenizer is used"
                )
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def adopt_model_preprocessing(self, tokenizer: PreTrainedTokenizerBase | None, image_size: int | None) -> None:
        """Use the model's tokenizer and image size where this module has none of its own."""
        if self._tokenizer is None and self.tokenizer_path is None and tokenizer is not None:
            self._tokenizer = tokenizer
        if self.image_size is None and image_size is not None:
            self.image_size = int(image_size)

    @property
    def data_source(self) -> str:
        root = f" (images under {self.image_root})" if self.image_root is not None else ""
        return "data.train_files " + ", ".join(str(path) for path in self.train_files) + root

    def setup(self, stage: str | None = None) -> None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None:
            preprocessing = getattr(module, "preprocessing", None)
            self.adopt_model_preprocessing(
                getattr(module, "tokenizer", None), getattr(preprocessing, "image_size", None)
            )
        if self.image_size is None:
            raise ConfigError(
                "data.image_size is not set and no model provided one: set data.image_size (e.g. 384 for the "
                "reference COCO / Flickr30k fine-tuning)"
            )
        super().setup(stage)
        if stage in (None, "fit") and self.train_dataset is None:
            if not self.train_files:
                raise ConfigError(
                    "data.train_files is empty: fine-tuning needs at least one training JSON "
                    '[{"image": ..., "caption": ..., "image_id": ...}] (e.g. coco_train.json of the ALBEF data)'
                )
            roots = [self.resolve_root(path) for path in self.train_files]
            self.train_dataset = RetrievalTrainDataset.from_files(self.train_files, self.build_processor(), roots)

    def build_collate(self, guard: SkipGuard | None = None) -> PretrainCollate:
        return RetrievalTrainCollate(self.tokenizer, self.max_length, guard)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        _, world_size = self.process_group()
        if len(self.train_dataset) < self.batch_size * world_size:
            raise InputFileError(
                f"{self.data_source}: {len(self.train_dataset)} entries, fewer than one batch of data.batch_size "
                f"{self.batch_size} x {world_size} process(es) (the last incomplete batch is dropped, so no training "
                "step would run): add entries or lower data.batch_size"
            )
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=self.build_collate(self.build_skip_guard()),
            **self.loader_kwargs(),
        )
