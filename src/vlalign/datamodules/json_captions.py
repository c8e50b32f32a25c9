"""Pre-training from ALBEF/SIMLA JSON caption lists (``[{"image": path, "caption": str | [str, ...]}, ...]``).

Lets users train on the annotation files the reference code ships, with no conversion to shards.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset

from vlalign.data.annotations import DEFAULT_IMAGE_CHECKS, check_images_exist, load_annotations
from vlalign.datamodules.base import PretrainDataModule, require_path
from vlalign.datamodules.collate import (
    MISSING_CAPTION,
    MISSING_FILE,
    MISSING_IMAGE,
    Sample,
    SampleProcessor,
    SkippedSample,
)
from vlalign.errors import InputFileError


class JsonCaptionDataset(Dataset):
    """Map-style dataset over the concatenated entries of one or more caption lists.

    A caption list yields one caption chosen uniformly at every access (as the reference does). A bad entry
    (no image, missing file, undecodable image, no or empty caption) yields a :class:`SkippedSample` marker
    that the collate drops and counts, because a map-style dataset cannot skip an index by itself.

    ``entries`` are ``(image path, caption)`` pairs; an entry without a usable image path is ``(key, caption)``
    with a ``str`` key naming the entry (``file.json#position``), and is always skipped as "missing_image".
    """

    def __init__(self, entries: list[tuple[Path | str, Any]], processor: SampleProcessor) -> None:
        self.entries = entries
        self.processor = processor

    @classmethod
    def from_files(
        cls,
        files: Sequence[str | Path],
        processor: SampleProcessor,
        roots: Sequence[Path],
        image_checks: int | None = DEFAULT_IMAGE_CHECKS,
    ) -> JsonCaptionDataset:
        """Read every file; relative image paths of ``files[i]`` are resolved against ``roots[i]``.

        A few missing images are skipped and counted like any bad sample, but a file none of whose images is found
        (checking up to ``image_checks`` entries spread over it; None: skip the check) is a wrong image root: it
        raises :class:`~vlalign.errors.InputFileError` with an example path and the ``data.image_root`` hint. So
        does a file that is not a non-empty JSON list.
        """
        entries: list[tuple[Path | str, Any]] = []
        for json_file, root in zip(files, roots, strict=True):
            images: list[tuple[int, Path]] = []
            for position, entry in enumerate(load_annotations(json_file)):
                image = entry.get("image") if isinstance(entry, dict) else None
                caption = entry.get("caption") if isinstance(entry, dict) else None
                if isinstance(image, str) and image:
                    entries.append((root / image, caption))
                    images.append((position, root / image))
                else:  # counted when drawn, like every other bad sample, rather than failing the whole file
                    entries.append((f"{json_file}#{position}", caption))
            if image_checks is not None:
                check_images_exist(json_file, images, root, limit=image_checks)
        return cls(entries, processor)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Sample | SkippedSample:
        path, caption = self.entries[index]
        key = str(path)
        if not isinstance(path, Path):
            return SkippedSample(key, MISSING_IMAGE)
        if isinstance(caption, list):
            caption = random.choice(caption) if caption else None
        if caption is not None and not isinstance(caption, str):
            return SkippedSample(key, MISSING_CAPTION)
        if not path.is_file():
            return SkippedSample(key, MISSING_FILE)
        return self.processor(key, path, caption)


class JsonCaptionDataModule(PretrainDataModule):
    """Pre-training from ALBEF-style JSON caption lists; see :class:`PretrainDataModule` for shared arguments.

    Bad samples are dropped from their batch and counted in ``batch["skipped"]``, so a batch can hold a few
    fewer than ``batch_size`` samples; the last incomplete batch of an epoch is dropped. Under DDP Lightning
    adds the distributed sampler.

    Args:
        train_files: ALBEF pre-training JSON files; their entries are concatenated.
    """

    def __init__(self, train_files: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not train_files:
            raise ValueError("train_files must list at least one JSON file")
        self.train_files = [require_path(path, "train_files") for path in train_files]
        self.train_dataset: JsonCaptionDataset | None = None

    @property
    def data_source(self) -> str:
        root = f" (images under {self.image_root})" if self.image_root is not None else ""
        return "train_files " + ", ".join(str(path) for path in self.train_files) + root

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in (None, "fit") and self.train_dataset is None:
            roots = [self.resolve_root(path) for path in self.train_files]
            self.train_dataset = JsonCaptionDataset.from_files(self.train_files, self.build_processor(), roots)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        rank, world_size = self.process_group()
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
