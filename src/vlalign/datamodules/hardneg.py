"""Hard-negative evaluation data: one image, its positive caption and edited captions that are false of it.

The file is a JSON list in the layout ``vlalign data synth`` writes (``hardneg_test.json``)::

    [{"image": "images/test/000000123.jpg",
      "positive": "a red circle to the left of a blue square",
      "negatives": [{"type": "attribute_binding_swap", "caption": "a blue circle to the left of a red square"},
                    {"type": "relation_swap", "caption": "a red circle to the right of a blue square"}, ...]},
     ...]

Batches carry images (already in the model's evaluation view) and raw captions: the task module
(:class:`vlalign.tasks.hardneg.HardNegativeEvaluation`) tokenises them with the model's own tokenizer and caption
limits, so no tokenizer is configured here. Every example and every negative has a global index, so scores can be
gathered across processes and placed by index (Lightning's distributed sampler pads shards with repeats).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vlalign.data.annotations import check_images_exist, json_kind, load_annotations
from vlalign.data.transforms import BadSampleError, EvalTransform, load_rgb
from vlalign.datamodules.base import WorkerInit, require_path, require_positive
from vlalign.errors import ConfigError, InputFileError

__all__ = ["HARDNEG_LAYOUT", "HardNegativeCollate", "HardNegativeDataModule", "HardNegativeDataset"]

#: How a hard-negative file looks, for error messages.
HARDNEG_LAYOUT = (
    '[{"image": "path.jpg", "positive": "a caption", "negatives": [{"type": "colour_swap", "caption": "an edited '
    'caption"}, ...]}, ...]'
)


@dataclass(frozen=True)
class HardNegativeExample:
    """One entry of the file: the image path (resolved), the positive and the negatives with their types."""

    image: Path
    positive: str
    negatives: tuple[str, ...]
    types: tuple[str, ...]


def _shown(value: Any) -> str:
    """A decoded JSON value, briefly, for error messages."""
    if isinstance(value, list) and not value:
        return "an empty list"
    if isinstance(value, str) and not value.strip():
        return "an empty string"
    return f"a JSON {json_kind(value)} {json.dumps(value)[:60]}"


def parse_hardneg_entries(entries: Sequence[Any], json_file: str | Path, image_root: Path) -> list[HardNegativeExample]:
    """Validate the entries of a hard-negative file and resolve their image paths against ``image_root``.

    Raises:
        InputFileError: an entry that is not an object, lacks a non-empty ``image`` or ``positive`` string, or whose
            ``negatives`` is not a non-empty list of ``{"type": str, "caption": str}`` objects; the message names
            the file, the entry (and the negative) and the expected layout.
    """
    examples = []
    for index, entry in enumerate(entries):
        where = f"{json_file}: entry {index}"
        if not isinstance(entry, dict):
            raise InputFileError(
                f"{where} is {_shown(entry)}, not an object; hard-negative files look like {HARDNEG_LAYOUT}"
            )
        image = entry.get("image")
        if not isinstance(image, str) or not image.strip():
            got = _shown(image) if "image" in entry else "no 'image' key"
            raise InputFileError(
                f"{where} has no image path ('image': a non-empty string), got {got}; entries look like {HARDNEG_LAYOUT}"
            )
        where = f"{where} ({image})"
        positive = entry.get("positive")
        if not isinstance(positive, str) or not positive.strip():
            got = _shown(positive) if "positive" in entry else "no 'positive' key"
            raise InputFileError(
                f"{where} has no positive caption ('positive': a non-empty string), got {got}; entries look like "
                f"{HARDNEG_LAYOUT}"
            )
        negatives = entry.get("negatives")
        if not isinstance(negatives, list) or not negatives:
            got = _shown(negatives) if "negatives" in entry else "no 'negatives' key"
            raise InputFileError(
                f'{where} has no negatives (\'negatives\': a non-empty list of {{"type", "caption"}} objects), got '
                f"{got}; every entry needs at least one negative to compare the positive with (remove the entry)"
            )
        captions, types = [], []
        for k, negative in enumerate(negatives):
            if not isinstance(negative, dict):
                raise InputFileError(
                    f"{where}: negative {k} is {_shown(negative)}, not an object "
                    '{"type": "colour_swap", "caption": "an edited caption"}'
                )
            for key in ("type", "caption"):
                value = negative.get(key)
                if not isinstance(value, str) or not value.strip():
                    got = _shown(value) if key in negative else f"no {key!r} key"
                    raise InputFileError(
                        f"{where}: negative {k} needs {key!r} as a non-empty string, got {got}; negatives look like "
                        '{"type": "colour_swap", "caption": "an edited caption"}'
                    )
            captions.append(negative["caption"])
            types.append(negative["type"])
        examples.append(HardNegativeExample(image_root / image, positive, tuple(captions), tuple(types)))
    return examples


class HardNegativeDataset(Dataset):
    """The examples of a hard-negative file, with flat views of all negatives for scoring and reporting.

    Attributes:
        examples: one :class:`HardNegativeExample` per entry, in file order.
        negative_example: for every negative (global index, file order), the index of its example.
        negative_type: for every negative, its edit type.
        negative_caption: for every negative, its caption.
        negative_offset: for every example, the global index of its first negative.
        types: the distinct edit types, in order of first appearance.

    Raises:
        InputFileError: the file is not a usable hard-negative list or an entry is malformed (see
            :func:`parse_hardneg_entries`); with ``check_images``, image files are missing (the message names the
            file, an entry and the ``data.image_root`` fix).
    """

    def __init__(
        self,
        json_file: str | Path,
        image_root: str | Path,
        transform: Callable[[Image.Image], Tensor],
        check_images: bool = True,
    ) -> None:
        self.json_file = Path(json_file)
        self.image_root = Path(image_root)
        self.transform = transform
        self.examples = parse_hardneg_entries(load_annotations(json_file), json_file, self.image_root)
        self.negative_example: list[int] = []
        self.negative_type: list[str] = []
        self.negative_caption: list[str] = []
        self.negative_offset: list[int] = []
        for index, example in enumerate(self.examples):
            self.negative_offset.append(len(self.negative_example))
            self.negative_example.extend([index] * len(example.negatives))
            self.negative_type.extend(example.types)
            self.negative_caption.extend(example.negatives)
        self.types = list(dict.fromkeys(self.negative_type))
        if check_images:
            check_images_exist(json_file, [(i, e.image) for i, e in enumerate(self.examples)], self.image_root)

    @property
    def images(self) -> list[Path]:
        return [example.image for example in self.examples]

    @property
    def num_negatives(self) -> int:
        return len(self.negative_example)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        try:
            image = load_rgb(example.image)
        except BadSampleError as err:
            raise InputFileError(
                f"{self.json_file}: entry {index}: image {example.image}: {err.message} ({err.reason}); evaluation "
                "needs every image: fix or remove the entry"
            ) from err
        first = self.negative_offset[index]
        return {
            "image": self.transform(image),
            "index": index,
            "positive": example.positive,
            "negatives": list(example.negatives),
            "negative_index": list(range(first, first + len(example.negatives))),
        }


class HardNegativeCollate:
    """Stack images; keep captions as lists of strings (tokenised by the task module with the model's tokenizer).

    A batch holds ``image`` ``[B, 3, S, S]``, ``index`` ``[B]`` (example indices), ``positive`` (B strings),
    ``negatives`` (B lists of strings) and ``negative_index`` ``[M]`` (global negative indices, example-major).
    """

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {
            "image": torch.stack([item["image"] for item in items]),
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
            "positive": [item["positive"] for item in items],
            "negatives": [item["negatives"] for item in items],
            "negative_index": torch.tensor([k for item in items for k in item["negative_index"]], dtype=torch.long),
        }


class HardNegativeDataModule(L.LightningDataModule):
    """Test data for hard-negative evaluation (``vlalign evaluate hardneg``).

    Args:
        json_file: The hard-negative list (layout in the module docstring; ``vlalign data synth`` writes
            ``hardneg_test.json``).
        image_root: Directory relative image paths are resolved against; by default the JSON file's own directory.
            Absolute paths are used as they are.
        image_size: Side of the square evaluation images. None (the default): the model's own, which the task
            module reports. ``vlalign evaluate`` passes a value on to ``model.image_size`` (the model's position
            embeddings are interpolated to it).
        batch_size: Examples (images) per batch; each brings its positive and all its negatives.
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory of batches (only with a GPU).
        check_images: Check at setup that every image file exists (one error with the ``data.image_root`` hint
            instead of a failure in a data worker).
    """

    def __init__(
        self,
        json_file: str,
        image_root: str | None = None,
        image_size: int | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool = True,
        check_images: bool = True,
    ) -> None:
        super().__init__()
        require_positive(batch_size, "batch_size")
        require_positive(num_workers, "num_workers", minimum=0)
        if image_size is not None:
            require_positive(image_size, "image_size")
        self.json_file = require_path(json_file, "json_file")
        self.image_root = require_path(image_root, "image_root") if image_root else self.json_file.parent
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.check_images = check_images
        self.test_dataset: HardNegativeDataset | None = None

    def eval_transform(self) -> Callable[[Image.Image], Tensor]:
        """The model's evaluation transform when a task module with one is attached, else ``EvalTransform``.

        Raises:
            ConfigError: ``image_size`` differs from the model's, or neither is known.
        """
        module = None
        if self.trainer is not None:
            try:
                module = self.trainer.lightning_module
            except (AttributeError, RuntimeError):
                module = None
        transform = getattr(module, "image_transform", None)
        model_size = getattr(module, "image_size", None)
        if transform is not None and isinstance(model_size, int):
            if self.image_size is not None and self.image_size != model_size:
                raise ConfigError(
                    f"data.image_size={self.image_size} but the model evaluates {model_size}x{model_size} images "
                    f"(model.image_size): give both the same value ({self.image_size} evaluates the model at that size, "
                    "its position embeddings interpolated), or leave data.image_size unset to use the model's"
                )
            return transform
        if self.image_size is None:
            raise ConfigError(
                "data.image_size is not set and no model reports its image size: run the data module with "
                "vlalign.tasks.hardneg.HardNegativeEvaluation, or set data.image_size"
            )
        return EvalTransform(self.image_size)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "test") and self.test_dataset is None:
            self.test_dataset = HardNegativeDataset(
                self.json_file, self.image_root, self.eval_transform(), check_images=self.check_images
            )

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            self.setup("test")
        assert self.test_dataset is not None
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return DataLoader(
            self.test_dataset,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=HardNegativeCollate(),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            worker_init_fn=WorkerInit(rank=rank) if self.num_workers > 0 else None,
        )
