"""Shared data machinery of the classification tasks (NLVR2, SNLI-VE): annotation entries of one or two images, a
sentence and a label, in the reference's JSON layouts.

A task's data module says how one entry is read (:class:`ClassificationDataModule.parse_entry`); everything else is
here once:

- training entries that cannot be used (no or an unusable image path, a missing or undecodable image file, no or an
  empty sentence, an unknown label) are skipped and counted by reason (``data/skipped_<reason>``), never fatal
  unless more than ``data.max_skip_fraction`` of them are bad; a training file none of whose checked images exists
  (a wrong ``data.image_root``) is an error at setup;
- an evaluation file is checked entry by entry at setup: a malformed entry or a missing image is an
  :class:`~vlalign.errors.InputFileError` naming the file, the entry and the fix (dropping test examples would
  change the reported accuracy); so is an image that does not decode when it is read;
- batches carry ``input_ids`` / ``attention_mask`` (``[CLS] word-pieces``, padded to the longest), ``label`` (long
  [B]), ``index`` (the entry's position in its file, so evaluation counts every example once however the loader
  was sharded), ``skipped`` (counts by reason) and ``image`` ``[B, 3, H, W]`` (one image per entry) or ``images``
  ``[B, 2, 3, H, W]`` (two).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from vlalign.data.annotations import (
    DEFAULT_IMAGE_CHECKS,
    check_images_exist,
    json_kind,
    load_annotations,
)
from vlalign.data.text import pre_caption
from vlalign.data.tokenization import load_tokenizer, tokenize_captions
from vlalign.data.transforms import (
    DEFAULT_MAX_PIXELS,
    AugmentConfig,
    BadSampleError,
    EvalTransform,
    PretrainTransform,
    load_rgb,
)
from vlalign.datamodules.base import PretrainDataModule, require_path, require_positive
from vlalign.datamodules.collate import (
    DECODE_ERROR,
    EMPTY_CAPTION,
    MISSING_CAPTION,
    MISSING_FILE,
    MISSING_IMAGE,
    TRANSFORM_ERROR,
    SkipGuard,
    SkippedSample,
    TooManyBadSamples,
)
from vlalign.errors import ConfigError, InputFileError

__all__ = [
    "BAD_LABEL",
    "ClassificationCollate",
    "ClassificationDataModule",
    "ClassificationEntry",
    "ClassificationEvalDataset",
    "ClassificationSample",
    "ClassificationTrainDataset",
    "EntryProblem",
    "read_entries",
]

#: Skip reason of a training entry whose label is missing or not one the task knows.
BAD_LABEL = "bad_label"
#: The reference's fine-tuning view: random resized crop with scale (0.5, 1), flip, RandAugment(2, 7).
CLASSIFY_AUGMENT = AugmentConfig(scale=(0.5, 1.0))


class EntryProblem(Exception):
    """Why one annotation entry cannot be used: ``reason`` (the skip tag) and ``message`` (for error messages)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ClassificationEntry:
    """One usable entry (``problem`` None) or a training entry that is skipped when drawn (``problem`` its reason)."""

    source: str
    position: int
    images: tuple[Path, ...] = ()
    sentence: str = ""
    label: int = -1
    problem: str | None = None


@dataclass
class ClassificationSample:
    """One decoded entry: its images ``[K, 3, H, W]``, cleaned sentence, label and position in its file."""

    key: str
    images: Tensor
    sentence: str
    label: int
    index: int


def describe(entry: Any, key: str) -> str:
    """What an entry holds under ``key``, briefly, for messages."""
    if not isinstance(entry, dict):
        return f"a JSON {json_kind(entry)} instead of an object"
    if key not in entry:
        return f"no {key!r} key"
    return f"a JSON {json_kind(entry[key])} {json.dumps(entry[key])[:60]}"


def read_sentence(entry: Mapping[str, Any], key: str = "sentence") -> str:
    """The entry's sentence, or :class:`EntryProblem` (``missing_caption``)."""
    sentence = entry.get(key)
    if not isinstance(sentence, str):
        raise EntryProblem(MISSING_CAPTION, f"has no sentence ({key!r}: a string), got {describe(entry, key)}")
    if not pre_caption(sentence).strip():
        raise EntryProblem(EMPTY_CAPTION, f"has an empty sentence ({key!r}: {json.dumps(sentence)[:60]})")
    return sentence


def read_entries(
    json_file: Path,
    root: Path,
    parse: Any,
    strict: bool,
    layout: str,
    image_checks: int | None = DEFAULT_IMAGE_CHECKS,
) -> list[ClassificationEntry]:
    """The entries of ``json_file`` read by ``parse(entry, root) -> (images, sentence, label)``.

    ``strict`` (evaluation): a malformed entry or a missing image is an :class:`InputFileError` naming the file and
    the entry. Otherwise (training) a malformed entry is kept with its problem (skipped and counted when drawn) and
    the images are checked only for being found at all (``image_checks`` spread over the file).
    """
    entries: list[ClassificationEntry] = []
    images: list[tuple[int, Path]] = []
    for position, raw in enumerate(load_annotations(json_file)):
        try:
            if not isinstance(raw, dict):
                raise EntryProblem(MISSING_IMAGE, f"is a JSON {json_kind(raw)} instead of an object")
            paths, sentence, label = parse(raw, root)
        except EntryProblem as problem:
            if strict:
                raise InputFileError(
                    f"{json_file}: entry {position} {problem.message}; entries look like {layout}. Evaluation needs "
                    "every entry: fix or remove it"
                ) from None
            entries.append(ClassificationEntry(str(json_file), position, problem=problem.reason))
            continue
        entries.append(ClassificationEntry(str(json_file), position, tuple(paths), sentence, label))
        images.extend((position, path) for path in paths)
    check_images_exist(json_file, images, root, limit=None if strict else image_checks)
    return entries


class ClassificationTrainDataset(Dataset):
    """Training entries: images decoded and augmented independently, the sentence cleaned; bad entries come back as
    :class:`~vlalign.datamodules.collate.SkippedSample` (the collate function counts them).

    With one image per entry a horizontal flip swaps "left" / "right" in the sentence (``augment.swap_left_right``);
    with two the sentence is never changed ("left" and "right" name the images of the pair).
    """

    def __init__(
        self,
        entries: Sequence[ClassificationEntry],
        transform: PretrainTransform,
        max_words: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.entries = list(entries)
        self.transform = transform
        self.max_words = max_words
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> ClassificationSample | SkippedSample:
        entry = self.entries[index]
        key = f"{entry.source}#{entry.position}"
        if entry.problem is not None:
            return SkippedSample(key, entry.problem)
        text = pre_caption(entry.sentence, self.max_words)
        if not text.strip():
            return SkippedSample(key, EMPTY_CAPTION)
        views = []
        for path in entry.images:
            if not path.is_file():
                return SkippedSample(key, MISSING_FILE)
            try:
                image = load_rgb(path, max_pixels=self.max_pixels)
            except BadSampleError as err:
                return SkippedSample(key, err.reason)
            except Exception:  # noqa: BLE001 - any decoder failure is a bad file
                return SkippedSample(key, DECODE_ERROR)
            try:
                pixels, swapped, _ = self.transform(image, text)
            except Exception:  # noqa: BLE001 - an odd image must not kill the worker; counted by reason
                return SkippedSample(key, TRANSFORM_ERROR)
            if len(entry.images) == 1:
                text = swapped
            views.append(pixels)
        return ClassificationSample(key, torch.stack(views), text, entry.label, entry.position)


class ClassificationEvalDataset(Dataset):
    """Evaluation entries (all usable: checked by :func:`read_entries`), deterministic view; an image that does not
    decode is an :class:`InputFileError` naming the file and the entry."""

    def __init__(
        self, entries: Sequence[ClassificationEntry], json_file: Path, image_size: int, max_words: int
    ) -> None:
        self.entries = list(entries)
        self.json_file = json_file
        self.transform = EvalTransform(image_size)
        self.max_words = max_words

    @property
    def labels(self) -> list[int]:
        return [entry.label for entry in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> ClassificationSample:
        entry = self.entries[index]
        views = []
        for path in entry.images:
            try:
                views.append(self.transform(load_rgb(path)))
            except BadSampleError as err:
                raise InputFileError(
                    f"{self.json_file}: entry {entry.position}: image {path}: {err.message} ({err.reason}); "
                    "evaluation needs every image: fix or remove the entry"
                ) from err
        key = f"{self.json_file}#{entry.position}"
        return ClassificationSample(
            key, torch.stack(views), pre_caption(entry.sentence, self.max_words), entry.label, index
        )


class ClassificationCollate:
    """Stack samples, tokenise their sentences; skipped entries are dropped and counted (by ``guard`` too)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, guard: SkipGuard | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.guard = guard

    def __call__(self, items: Sequence[ClassificationSample | SkippedSample]) -> dict[str, Any]:
        counts: Counter[str] = Counter()
        samples = [item for item in items if isinstance(item, ClassificationSample)]
        if self.guard is not None:
            self.guard.good(len(samples))
        for item in items:
            if isinstance(item, SkippedSample):
                counts[item.reason] += 1
                if self.guard is not None:
                    self.guard.bad(item.reason)
        if not samples:
            message = f"every entry of a batch was unusable (skipped: {dict(counts)}); check the annotation files"
            if self.guard is not None:
                message += f" ({self.guard.describe()})"
            raise TooManyBadSamples(message)
        input_ids, attention_mask = tokenize_captions(
            self.tokenizer, [s.sentence for s in samples], self.max_length, padding="longest"
        )
        pixels = torch.stack([s.images for s in samples])  # [B, K, 3, H, W]
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "label": torch.tensor([s.label for s in samples], dtype=torch.long),
            "index": torch.tensor([s.index for s in samples], dtype=torch.long),
            "skipped": dict(counts),
            "keys": [s.key for s in samples],
        }
        if pixels.shape[1] == 1:
            batch["image"] = pixels[:, 0]
        else:
            batch["images"] = pixels
        return batch


class ClassificationDataModule(PretrainDataModule, ABC):
    """Base of the NLVR2 and SNLI-VE data modules: training, validation and test files in one layout.

    The tokenizer, image size and text length limit default to the model's: under ``vlalign finetune`` /
    ``vlalign evaluate`` the task module holds the tokenizer of the model it loaded (``model.init_from``), its image
    size and its number of position embeddings, and this module adopts them at setup.

    Subclasses set :attr:`layout` (for messages) and implement :meth:`parse_entry`.

    Args:
        train_files: training JSON files (concatenated); needed by ``finetune``.
        val_file: evaluated at validation (the best checkpoint is picked by its accuracy).
        test_file: evaluated by ``test`` (and by ``finetune`` after training, on the best checkpoint).
        image_root: directory relative image paths resolve against; by default each JSON file's own directory.
        tokenizer: tokenizer directory; None: the model's.
        image_size: side of the square images; None: the model's (linked into ``model.image_size`` by the CLI).
        batch_size: training batch per process.
        eval_batch_size: evaluation batch per process.
        num_workers: DataLoader worker processes.
        max_words: sentences are cut to this many words by ``pre_caption`` (reference: 30).
        max_length: token limit including [CLS] (the reference does not truncate; cut to the model's position
            embeddings at most); batches pad to the longest sentence.
        augment: training augmentation (reference: crop scale (0.5, 1), flip, RandAugment(2, 7)).
        pin_memory: pin host memory of batches.
        persistent_workers: keep workers alive between epochs (with ``num_workers > 0``).
        seed: base seed of the data order.
        max_skip_fraction: stop when more than this fraction of the training entries read was unusable.
        skip_check_after: entries a data worker must have read before ``max_skip_fraction`` applies.
        max_image_pixels: images declaring more pixels are skipped (training) or refused (evaluation).
    """

    #: How an entry looks, for messages.
    layout: ClassVar[str] = ""

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
        max_length: int = 64,
        augment: AugmentConfig = CLASSIFY_AUGMENT,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
        max_skip_fraction: float = 0.1,
        skip_check_after: int = 1000,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if image_size is not None:
            require_positive(image_size, "image_size")
        # The base module wants a tokenizer directory and an image size now; both may come from the model at setup,
        # so it is given stand-ins that the lines after it reset (as the retrieval fine-tuning module does).
        super().__init__(
            tokenizer=tokenizer if tokenizer is not None else ".",
            image_root=image_root,
            image_size=image_size or 1,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            max_words=max_words,
            max_length=max_length,
            eval_max_length=max_length,
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
        self.val_file = require_path(val_file, "val_file") if val_file else None
        self.test_file = require_path(test_file, "test_file") if test_file else None
        self.train_dataset: Dataset | None = None  # type: ignore[assignment]
        self.val_dataset: ClassificationEvalDataset | None = None  # type: ignore[assignment]
        self.test_dataset: ClassificationEvalDataset | None = None  # type: ignore[assignment]
        self._tokenizer: PreTrainedTokenizerBase | None = None

    # -- the entry layout -------------------------------------------------------------------------------------------
    @abstractmethod
    def parse_entry(self, entry: Mapping[str, Any], root: Path) -> tuple[list[Path], str, int]:
        """``(image paths, sentence, label)`` of one entry, or :class:`EntryProblem`."""

    # -- tokenizer, image size, text length: given, or the model's ---------------------------------------------------
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

    def adopt_model_preprocessing(
        self, tokenizer: PreTrainedTokenizerBase | None, image_size: int | None, max_positions: int | None = None
    ) -> None:
        """Use the model's tokenizer and image size where this module has none; never exceed its positions."""
        if self._tokenizer is None and self.tokenizer_path is None and tokenizer is not None:
            self._tokenizer = tokenizer
        if self.image_size is None and image_size is not None:
            self.image_size = int(image_size)
        if max_positions is not None and self.max_length > max_positions:
            self.max_length = self.eval_max_length = int(max_positions)

    def adopt_from_module(self) -> None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None:
            preprocessing = getattr(module, "preprocessing", None)
            self.adopt_model_preprocessing(
                getattr(module, "tokenizer", None),
                getattr(preprocessing, "image_size", None),
                getattr(module, "max_text_length", None),
            )
        if self.image_size is None:
            raise ConfigError(
                "data.image_size is not set and no model provided one: set data.image_size (384 in the reference "
                "fine-tuning)"
            )

    @property
    def data_source(self) -> str:
        root = f" (images under {self.image_root})" if self.image_root is not None else ""
        return "data.train_files " + ", ".join(str(path) for path in self.train_files) + root

    # -- datasets ---------------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self.adopt_from_module()
        if stage in (None, "fit", "validate") and self.val_file is not None and self.val_dataset is None:
            self.val_dataset = self.eval_dataset(self.val_file)
        if stage in (None, "test") and self.test_file is not None and self.test_dataset is None:
            self.test_dataset = self.eval_dataset(self.test_file)
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self.build_train_dataset()

    def build_train_dataset(self) -> ClassificationTrainDataset:
        if not self.train_files:
            raise ConfigError(f"data.train_files is empty: fine-tuning needs at least one training JSON {self.layout}")
        entries = [
            entry
            for json_file in self.train_files
            for entry in read_entries(json_file, self.resolve_root(json_file), self.parse_entry, False, self.layout)
        ]
        transform = PretrainTransform(int(self.image_size), self.augment)
        return ClassificationTrainDataset(entries, transform, self.max_words, self.max_image_pixels)

    def eval_dataset(self, json_file: Path) -> ClassificationEvalDataset:
        entries = read_entries(json_file, self.resolve_root(json_file), self.parse_entry, True, self.layout)
        return ClassificationEvalDataset(entries, json_file, int(self.image_size), self.max_words)

    # -- loaders ----------------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        _, world_size = self.process_group()
        if len(self.train_dataset) < self.batch_size * world_size:  # type: ignore[arg-type]
            raise InputFileError(
                f"{self.data_source}: {len(self.train_dataset)} entries, fewer than one batch of data.batch_size "  # type: ignore[arg-type]
                f"{self.batch_size} x {world_size} process(es) (the last incomplete batch is dropped, so no training "
                "step would run): add entries or lower data.batch_size"
            )
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=ClassificationCollate(self.tokenizer, self.max_length, self.build_skip_guard()),
            **self.loader_kwargs(),
        )

    def _eval_loader(self, dataset: ClassificationEvalDataset | None) -> DataLoader | list:
        if dataset is None:
            return []
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=ClassificationCollate(self.tokenizer, self.max_length),
            **self.loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader | list:
        """Loader over ``val_file``; an empty list (no validation) when it is not set."""
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader | list:
        """Loader over ``test_file``; an empty list when it is not set."""
        return self._eval_loader(self.test_dataset)


def image_path(value: Any, root: Path, key: str, suffix: str = "") -> Path:
    """``root / value`` (``suffix`` appended when the name has none), or :class:`EntryProblem` naming ``key``."""
    if not isinstance(value, str) or not value.strip():
        raise EntryProblem(
            MISSING_IMAGE, f"has no image path ({key}: a non-empty string), got {json.dumps(value)[:60]}"
        )
    path = Path(value)
    if suffix and not path.suffix:
        path = path.with_name(path.name + suffix)
    return root / path
