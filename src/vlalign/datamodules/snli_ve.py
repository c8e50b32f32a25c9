"""SNLI-VE data in the reference's layout: ``[{"image": Flickr30k id, "sentence": hypothesis, "label": class}]``.

``image`` is a path relative to ``data.image_root`` (by default the JSON file's folder); a name without a file
suffix gets ``data.image_suffix`` (``.jpg``: the reference files give the Flickr30k id, ``"2248275918"``). ``label``
is ``"entailment"``, ``"neutral"`` or ``"contradiction"`` (any case), or the reference's class index (contradiction
0, neutral 1, entailment 2). ``train_files`` hold the training split, ``val_file`` dev (the best checkpoint is
picked by its accuracy) and ``test_file`` test. A horizontal flip swaps "left" / "right" in the hypothesis
(``augment.swap_left_right``). Bad entries: docs of :mod:`vlalign.datamodules.classification`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlalign.data.transforms import DEFAULT_MAX_PIXELS, AugmentConfig
from vlalign.datamodules.classification import (
    BAD_LABEL,
    CLASSIFY_AUGMENT,
    ClassificationDataModule,
    EntryProblem,
    image_path,
    read_sentence,
)

__all__ = ["SNLI_VE_CLASSES", "SNLI_VE_LAYOUT", "SNLIVEDataModule", "snli_ve_label"]

#: Class names by index, the reference's encoding.
SNLI_VE_CLASSES: tuple[str, ...] = ("contradiction", "neutral", "entailment")
SNLI_VE_LAYOUT = (
    '[{"image": "2248275918", "sentence": "...", "label": "entailment" | "neutral" | "contradiction"}, ...]'
)


def snli_ve_label(value: Any) -> int:
    """The class index of a label name (any case) or of an index 0-2, else :class:`EntryProblem`."""
    if isinstance(value, str) and value.strip().lower() in SNLI_VE_CLASSES:
        return SNLI_VE_CLASSES.index(value.strip().lower())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(SNLI_VE_CLASSES):
        return value
    raise EntryProblem(BAD_LABEL, f'has no usable label ("label": one of {", ".join(SNLI_VE_CLASSES)}), got {value!r}')


class SNLIVEDataModule(ClassificationDataModule):
    """SNLI-VE training, dev and test files.

    Args:
        train_files: training JSON files (concatenated).
        val_file: dev: evaluated at validation, picks the best checkpoint.
        test_file: test: evaluated by ``test`` (and after fine-tuning, on the best-by-dev checkpoint).
        image_root: directory relative image paths resolve against (the Flickr30k images); by default each JSON
            file's own directory.
        image_suffix: appended to image names without a suffix (the reference gives Flickr30k ids).
        tokenizer: tokenizer directory; None: the model's.
        image_size: side of the square images; None: the model's (reference: 384).
        batch_size: training batch per process (reference: 32).
        eval_batch_size: evaluation batch per process (reference: 64).
        num_workers: DataLoader worker processes.
        max_words: hypotheses are cut to this many words by ``pre_caption`` (reference: 30).
        max_length: token limit including [CLS] (the reference does not truncate).
        augment: training augmentation (reference: crop scale (0.5, 1), flip, RandAugment(2, 7)).
        pin_memory: pin host memory of batches.
        persistent_workers: keep workers alive between epochs (with ``num_workers > 0``).
        seed: base seed of the data order.
        max_skip_fraction: stop when more than this fraction of the training entries read was unusable.
        skip_check_after: entries a data worker must have read before ``max_skip_fraction`` applies.
        max_image_pixels: images declaring more pixels are skipped (training) or refused (evaluation).
    """

    layout = SNLI_VE_LAYOUT

    def __init__(
        self,
        train_files: list[str] | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        image_root: str | None = None,
        image_suffix: str = ".jpg",
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
        self.image_suffix = image_suffix

    def parse_entry(self, entry: Mapping[str, Any], root: Path) -> tuple[list[Path], str, int]:
        path = image_path(entry.get("image"), root, '"image"', self.image_suffix)
        return [path], read_sentence(entry), snli_ve_label(entry.get("label"))
