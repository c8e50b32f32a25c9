"""NLVR2 data in the reference's layout: ``[{"images": [left, right], "sentence": str, "label": "True" | "False"}]``.

Image paths are relative to ``data.image_root`` (by default the JSON file's folder); the label may also be a JSON
boolean or 0 / 1. ``train_files`` hold the training split, ``val_file`` dev (the best checkpoint is picked by its
accuracy) and ``test_file`` test-P. Both images of an entry are decoded and augmented independently; the sentence
is never changed by a flip ("left" and "right" name the images). Bad entries: docs of
:mod:`vlalign.datamodules.classification` (skipped and counted in training, an error naming the file and the entry in
evaluation).

The optional text-assignment pre-stage (``model.stage: text_assignment``, docs/tasks.md) trains on image-caption
lists instead: ``ta_files`` in the ALBEF pre-training or retrieval layout (``[{"image", "caption", "image_id"?}]``),
read as retrieval fine-tuning reads them; the stage has no validation or test split.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import DataLoader

from vlalign.data.transforms import DEFAULT_MAX_PIXELS, AugmentConfig, PretrainTransform
from vlalign.datamodules.base import require_path
from vlalign.datamodules.classification import (
    BAD_LABEL,
    CLASSIFY_AUGMENT,
    ClassificationDataModule,
    EntryProblem,
    describe,
    image_path,
    read_sentence,
)
from vlalign.datamodules.collate import MISSING_IMAGE, SampleProcessor
from vlalign.datamodules.retrieval_finetune import RetrievalTrainCollate, RetrievalTrainDataset
from vlalign.errors import ConfigError, InputFileError

__all__ = ["NLVR2_LAYOUT", "NLVR2DataModule", "Stage", "nlvr2_label"]

NLVR2_LAYOUT = '[{"images": ["left.png", "right.png"], "sentence": "...", "label": "True" or "False"}, ...]'
Stage = Literal["nlvr2", "text_assignment"]
_TRUE = ("true", "1")
_FALSE = ("false", "0")


def nlvr2_label(value: Any) -> int:
    """1 for ``"True"`` / ``true`` / 1, 0 for ``"False"`` / ``false`` / 0 (strings case-insensitive), else
    :class:`EntryProblem`."""
    text = str(value).strip().lower() if isinstance(value, (str, bool, int)) else None
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    raise EntryProblem(BAD_LABEL, f'has no usable label ("label": "True" or "False"), got {value!r}')


class NLVR2DataModule(ClassificationDataModule):
    """NLVR2 training, dev and test-P files (or, in the text-assignment stage, image-caption lists).

    Args:
        train_files: NLVR2 training JSON files (concatenated).
        val_file: dev: evaluated at validation, picks the best checkpoint.
        test_file: test-P: evaluated by ``test`` (and after fine-tuning, on the best-by-dev checkpoint).
        ta_files: image-caption JSON lists of the text-assignment pre-stage (``model.stage: text_assignment``).
        image_root: directory relative image paths resolve against; by default each JSON file's own directory.
        tokenizer: tokenizer directory; None: the model's.
        image_size: side of the square images; None: the model's (reference: 384; 256 in the pre-stage).
        batch_size: training batch per process (reference: 8 per GPU for SIMLA, 16 for ALBEF; 64 in the pre-stage).
        eval_batch_size: evaluation batch per process.
        num_workers: DataLoader worker processes.
        max_words: sentences are cut to this many words by ``pre_caption`` (reference: 30).
        max_length: token limit including [CLS] (reference: none in fine-tuning, 25 in the pre-stage).
        augment: training augmentation of each image (reference: crop scale (0.5, 1), flip, RandAugment(2, 7)).
        pin_memory: pin host memory of batches.
        persistent_workers: keep workers alive between epochs (with ``num_workers > 0``).
        seed: base seed of the data order.
        max_skip_fraction: stop when more than this fraction of the training entries read was unusable.
        skip_check_after: entries a data worker must have read before ``max_skip_fraction`` applies.
        max_image_pixels: images declaring more pixels are skipped (training) or refused (evaluation).
    """

    layout = NLVR2_LAYOUT

    def __init__(
        self,
        train_files: list[str] | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        ta_files: list[str] | None = None,
        image_root: str | None = None,
        tokenizer: str | None = None,
        image_size: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 64,
        num_workers: int = 4,
        max_words: int = 30,
        max_length: int = 64,
        augment: AugmentConfig = CLASSIFY_AUGMENT,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
        max_skip_fraction: float = 0.1,
        skip_check_after: int = 1000,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(
            train_files=train_files,
            val_file=val_file,
            test_file=test_file,
            image_root=image_root,
            tokenizer=tokenizer,
            image_size=image_size,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            max_words=max_words,
            max_length=max_length,
            augment=augment,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            seed=seed,
            max_skip_fraction=max_skip_fraction,
            skip_check_after=skip_check_after,
            max_image_pixels=max_image_pixels,
        )
        self.ta_files = [require_path(path, "ta_files") for path in ta_files or []]
        #: Which training data the model wants; the task module's ``stage`` replaces it at setup.
        self.stage: Stage = "nlvr2"

    def parse_entry(self, entry: Mapping[str, Any], root: Path) -> tuple[list[Path], str, int]:
        images = entry.get("images")
        if not isinstance(images, list) or len(images) != 2:
            raise EntryProblem(
                MISSING_IMAGE, f'has no image pair ("images": a list of two paths), got {describe(entry, "images")}'
            )
        paths = [image_path(value, root, f'"images"[{i}]') for i, value in enumerate(images)]
        return paths, read_sentence(entry), nlvr2_label(entry.get("label"))

    @property
    def data_source(self) -> str:
        if self.stage == "text_assignment":
            root = f" (images under {self.image_root})" if self.image_root is not None else ""
            return "data.ta_files " + ", ".join(str(path) for path in self.ta_files) + root
        return super().data_source

    def setup(self, stage: str | None = None) -> None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        self.stage = getattr(module, "stage", self.stage)
        if self.stage != "text_assignment":
            super().setup(stage)
            return
        self.adopt_from_module()
        if stage in (None, "fit") and self.train_dataset is None:
            if not self.ta_files:
                raise ConfigError(
                    "data.ta_files is empty: the text-assignment stage (model.stage: text_assignment) trains on "
                    'image-caption JSON lists [{"image": ..., "caption": ...}], e.g. the pre-training lists'
                )
            processor = SampleProcessor(PretrainTransform(int(self.image_size), self.augment), self.max_words)
            roots = [self.resolve_root(path) for path in self.ta_files]
            self.train_dataset = RetrievalTrainDataset.from_files(self.ta_files, processor, roots)

    def train_dataloader(self) -> DataLoader:
        if self.stage != "text_assignment":
            return super().train_dataloader()
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        _, world_size = self.process_group()
        if len(self.train_dataset) < self.batch_size * world_size:  # type: ignore[arg-type]
            raise InputFileError(
                f"{self.data_source}: {len(self.train_dataset)} entries, fewer than one batch of data.batch_size "  # type: ignore[arg-type]
                f"{self.batch_size} x {world_size} process(es): add entries or lower data.batch_size"
            )
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=RetrievalTrainCollate(self.tokenizer, self.max_length, self.build_skip_guard()),
            **self.loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader | list:
        """dev (none in the text-assignment stage)."""
        return [] if self.stage == "text_assignment" else super().val_dataloader()

    def test_dataloader(self) -> DataLoader | list:
        """test-P (none in the text-assignment stage)."""
        return [] if self.stage == "text_assignment" else super().test_dataloader()
