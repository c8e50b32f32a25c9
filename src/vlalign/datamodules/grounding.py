"""Weakly-supervised grounding data: RefCOCO+ referring expressions as ALBEF / SIMLA read them (refer toolkit splits).

Files (image paths relative to ``data.image_root``, by default each JSON file's own folder):

- training (``data.train_files``): ``[{"image": path, "text": expression, ...}, ...]``, one entry per expression
  (``caption`` is read when ``text`` is absent; other keys such as ``ref_id`` are ignored). Fine-tuning is
  retrieval-style on (expression, whole image): the expressions of one image file are each other's positives, the
  image id being the file name as in the reference. A bad entry (no image, missing or undecodable file, no or empty
  text) is skipped and counted by reason (``data/skipped_<reason>``), as in retrieval fine-tuning.
- evaluation (``data.val_file``; ``data.test_files`` maps split names to files, e.g. ``{testA: ..., testB: ...}``
  or ``{test: refcoco+_test.json}``): ``[{"ref_id", "image", "text", "bbox": [x, y, w, h]}, ...]``, one entry per
  expression. ``bbox`` is the referred object's true box in original image pixels; ``image_id`` (the key of its
  proposals in ``dets.json``; default: the trailing digits of the image file name, ``COCO_train2014_000000581857.jpg``
  -> ``581857``) and ``split`` (default: the split name the file is given under) are optional. Entries without
  ``bbox`` take ``bbox``, ``image_id`` and ``split`` from ``data.refs_file`` by ``ref_id``: a JSON list
  ``[{"ref_id", "bbox", "image_id", "split"}]`` exported from the refer toolkit (docs/tasks.md shows how).
- proposals (``data.dets_file``): ``{"<image_id>": [[x, y, w, h, ...], ...]}``, the detections of every evaluated
  image (extra numbers after the box, e.g. a score, are ignored).

An evaluation entry that cannot be used (no image path, text or box, a malformed box, an image not found or not
decodable, no proposals for its image) is an error naming the file, the entry and the fix: dropping test
expressions would change the reported accuracy.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
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
from vlalign.data.tokenization import tokenize_captions
from vlalign.data.transforms import DEFAULT_MAX_PIXELS, AugmentConfig, BadSampleError, EvalTransform, load_rgb
from vlalign.datamodules.base import require_path, require_positive
from vlalign.datamodules.retrieval_finetune import (
    FINETUNE_AUGMENT,
    RetrievalFinetuneDataModule,
    RetrievalTrainDataset,
)
from vlalign.errors import ConfigError, InputFileError

__all__ = [
    "EVAL_LAYOUT",
    "GroundingCollate",
    "GroundingDataModule",
    "GroundingEntry",
    "GroundingEvalDataset",
    "read_dets",
    "read_eval_entries",
    "read_refs",
    "read_train_entries",
]

#: How an evaluation entry looks, for error messages.
EVAL_LAYOUT = '[{"ref_id": 1, "image": "path.jpg", "text": "the red circle", "bbox": [x, y, w, h]}, ...]'
TRAIN_LAYOUT = '[{"image": "path.jpg", "text": "the red circle"}, ...]'
_TRAILING_DIGITS = re.compile(r"(\d+)$")


@dataclass(frozen=True)
class GroundingEntry:
    """One evaluation expression: where it comes from, its image, its text, its true box and its proposals."""

    source: str  # "file.json#position", for error messages
    ref_id: Any
    image: Path
    text: str
    box: tuple[float, float, float, float]
    image_id: str
    split: str
    proposals: Tensor  # [P, 4] float32, (x, y, w, h)


# -- reading -----------------------------------------------------------------------------------------------------------
def _image_key(value: Any) -> str:
    """An image id as ``dets.json`` keys it: integers (and digit strings) without leading zeros, else the string."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    text = str(value).strip()
    return str(int(text)) if text.isdigit() else text


def image_id_from_path(image: str) -> str | None:
    """The trailing digits of an image file's name (``COCO_train2014_000000581857.jpg`` -> ``"581857"``), if any."""
    match = _TRAILING_DIGITS.search(Path(image).stem)
    return _image_key(match.group(1)) if match else None


def _box(value: Any) -> tuple[float, float, float, float] | None:
    """``[x, y, w, h]`` (extra numbers ignored) as floats with ``w, h > 0``, or None."""
    if not isinstance(value, (list, tuple)) or len(value) < 4:
        return None
    numbers = value[:4]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        return None
    x, y, w, h = (float(v) for v in numbers)
    return (x, y, w, h) if w > 0 and h > 0 else None


def _load_json(path: Path, what: str, expected: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputFileError(f"{path}: {what} does not exist; expected {expected}") from None
    except UnicodeDecodeError as err:
        raise InputFileError(f"{path}: {what} is not UTF-8 text (byte {err.start}); expected {expected}") from None
    except json.JSONDecodeError as err:
        raise InputFileError(
            f"{path}: {what} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); expected {expected}"
        ) from None


def read_dets(path: str | Path) -> dict[str, Tensor]:
    """``dets.json``: image id -> proposals ``[P, 4]`` (float32 ``x, y, w, h``).

    Raises:
        InputFileError: not a JSON object of lists of boxes; the message names the file and the image id.
    """
    path = Path(path).expanduser()
    expected = '{"<image_id>": [[x, y, w, h], ...], ...} (detection proposals per image)'
    raw = _load_json(path, "the proposals file (data.dets_file)", expected)
    if not isinstance(raw, dict):
        raise InputFileError(f"{path}: expected a JSON object {expected}, got a JSON {json_kind(raw)}")
    dets: dict[str, Tensor] = {}
    for image_id, boxes in raw.items():
        if not isinstance(boxes, list):
            raise InputFileError(
                f"{path}: image {image_id!r}: expected a list of [x, y, w, h] boxes, got a JSON {json_kind(boxes)}"
            )
        rows = []
        for position, box in enumerate(boxes):
            if (
                not isinstance(box, (list, tuple))
                or len(box) < 4
                or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box[:4]
                )
            ):
                raise InputFileError(
                    f"{path}: image {image_id!r}, box {position}: expected [x, y, w, h] (finite numbers), got "
                    f"{json.dumps(box)[:60]}"
                )
            rows.append([float(v) for v in box[:4]])
        dets[_image_key(image_id)] = torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)
    return dets


def read_refs(path: str | Path) -> dict[str, dict[str, Any]]:
    """A refer-toolkit export: ``ref_id`` (as a string) -> ``{"bbox", "image_id", "split"}`` (the latter two
    optional). Accepts a JSON list of objects with ``ref_id`` or an object keyed by ref id.

    Raises:
        InputFileError: naming the file and the entry.
    """
    path = Path(path).expanduser()
    expected = '[{"ref_id": 1, "bbox": [x, y, w, h], "image_id": 581857, "split": "testA"}, ...]'
    raw = _load_json(path, "the refs file (data.refs_file)", expected)
    if isinstance(raw, dict):
        raw = [{"ref_id": key, **value} if isinstance(value, dict) else value for key, value in raw.items()]
    if not isinstance(raw, list):
        raise InputFileError(f"{path}: expected a JSON list {expected}, got a JSON {json_kind(raw)}")
    refs: dict[str, dict[str, Any]] = {}
    for position, ref in enumerate(raw):
        if not isinstance(ref, dict) or "ref_id" not in ref:
            raise InputFileError(f"{path}: entry {position} is not an object with a 'ref_id'; expected {expected}")
        refs[str(ref["ref_id"])] = ref
    return refs


def read_train_entries(
    files: Sequence[Path], roots: Sequence[Path], image_checks: int | None = DEFAULT_IMAGE_CHECKS
) -> list[tuple[Path | str, Any, int]]:
    """Training ``(image path, text, image id)`` entries for :class:`RetrievalTrainDataset`.

    The image id is the image file's name (the reference's ``idx``), mapped to consecutive integers over all files.
    An entry without a usable image path gets the ``file.json#position`` key instead (skipped as
    ``missing_image``); a missing text is skipped when drawn (``missing_caption``). A file none of whose checked
    images exists (a wrong image root) is an :class:`InputFileError`.
    """
    ids: dict[str, int] = {}
    entries: list[tuple[Path | str, Any, int]] = []
    for json_file, root in zip(files, roots, strict=True):
        images: list[tuple[int, Path]] = []
        for position, entry in enumerate(load_annotations(json_file)):
            record = entry if isinstance(entry, dict) else {}
            image = record.get("image")
            text = record.get("text", record.get("caption"))
            if isinstance(image, str) and image:
                image_id = ids.setdefault(Path(image).name, len(ids))
                entries.append((root / image, text, image_id))
                images.append((position, root / image))
            else:
                entries.append((f"{json_file}#{position}", text, ids.setdefault(f"{json_file}#{position}", len(ids))))
        if image_checks is not None:
            check_images_exist(json_file, images, root, limit=image_checks)
    return entries


def read_eval_entries(
    files: Sequence[tuple[str, Path, Path]],
    dets: Mapping[str, Tensor],
    refs: Mapping[str, Mapping[str, Any]] | None = None,
    max_words: int = 30,
    check_images: bool = True,
    dets_file: str | Path = "data.dets_file",
) -> list[GroundingEntry]:
    """Evaluation expressions of ``files`` (``(split name, JSON file, image root)``), checked entry by entry.

    Raises:
        InputFileError: an entry without image, text or a usable box (inline or in ``refs``), an image without
            proposals in ``dets``, or image files not found; the message names the file, the entry and the fix.
    """
    out: list[GroundingEntry] = []
    for split, json_file, root in files:
        images: list[tuple[int, Path]] = []
        for position, entry in enumerate(load_annotations(json_file)):
            where = f"{json_file}: entry {position}"
            if not isinstance(entry, dict):
                raise InputFileError(f"{where} is a JSON {json_kind(entry)}, not an object; expected {EVAL_LAYOUT}")
            image, ref_id = entry.get("image"), entry.get("ref_id")
            where += f" (ref_id {ref_id})" if ref_id is not None else ""
            if not isinstance(image, str) or not image:
                raise InputFileError(f"{where} has no image path ('image': a non-empty string); expected {EVAL_LAYOUT}")
            raw_text = entry.get("text", entry.get("caption"))
            text = pre_caption(raw_text, max_words) if isinstance(raw_text, str) else ""
            if not text.strip():
                raise InputFileError(f"{where} ({image}) has no expression ('text': a non-empty string)")
            ref = (refs or {}).get(str(ref_id), {}) if ref_id is not None else {}
            raw_box = entry.get("bbox", ref.get("bbox"))
            if raw_box is None:
                hint = (
                    f"and ref_id {ref_id} is not in data.refs_file"
                    if refs is not None
                    else "and no data.refs_file is set to look its ref_id up in"
                )
                raise InputFileError(
                    f"{where} ({image}) has no true box: no 'bbox': [x, y, w, h] in the entry {hint}; add the boxes "
                    "or set data.refs_file (docs/tasks.md, Grounding)"
                )
            box = _box(raw_box)
            if box is None:
                raise InputFileError(
                    f"{where} ({image}): bbox must be [x, y, w, h] with finite numbers and w, h > 0, got "
                    f"{json.dumps(raw_box)[:60]}"
                )
            raw_id = entry.get("image_id", ref.get("image_id"))
            image_id = _image_key(raw_id) if raw_id is not None else image_id_from_path(image)
            proposals = dets.get(image_id) if image_id is not None else None
            if proposals is None or proposals.shape[0] == 0:
                raise InputFileError(
                    f"{where} ({image}): no proposals for image id {image_id!r} in {dets_file}; every evaluated image "
                    "needs its detections there (set 'image_id' in the entry when the file name does not end in it)"
                )
            path = root / image
            images.append((position, path))
            out.append(
                GroundingEntry(
                    source=f"{json_file}#{position}",
                    ref_id=ref_id if ref_id is not None else position,
                    image=path,
                    text=text,
                    box=box,
                    image_id=image_id or "",
                    split=str(entry.get("split", ref.get("split", split))),
                    proposals=proposals,
                )
            )
        if check_images:
            check_images_exist(json_file, images, root)
    return out


# -- datasets ----------------------------------------------------------------------------------------------------------
class GroundingEvalDataset(Dataset):
    """One item per expression: the evaluation view of its image, the original size, the boxes and the split id.

    ``splits`` lists the split names in order of first appearance; items carry the index into it.
    """

    def __init__(self, entries: Sequence[GroundingEntry], image_size: int) -> None:
        if not entries:
            raise ValueError("a grounding evaluation dataset needs at least one expression")
        self.entries = list(entries)
        self.transform = EvalTransform(image_size)
        self.splits: list[str] = list(dict.fromkeys(entry.split for entry in self.entries))
        self._split_index = {name: index for index, name in enumerate(self.splits)}

    @property
    def images(self) -> list[Path]:
        return [entry.image for entry in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        try:
            image = load_rgb(entry.image)
        except BadSampleError as err:
            raise InputFileError(
                f"{entry.source.replace('#', ': entry ')}: image {entry.image}: {err.message} ({err.reason}); "
                "evaluation needs every image: fix or remove the entry"
            ) from err
        return {
            "image": self.transform(image),
            "text": entry.text,
            "index": index,
            "split": self._split_index[entry.split],
            "size": (image.height, image.width),
            "box": entry.box,
            "proposals": entry.proposals,
        }

    def open_image(self, index: int) -> Image.Image:
        return load_rgb(self.entries[index].image)


class GroundingCollate:
    """Stack images, tokenise expressions (``[CLS] word-pieces``, padded to the longest, cut to ``max_length``) and
    pad proposals: ``proposals`` ``[B, P, 4]`` with ``proposal_mask`` ``[B, P]``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        input_ids, attention_mask = tokenize_captions(
            self.tokenizer, [item["text"] for item in items], self.max_length, padding="longest"
        )
        most = max(item["proposals"].shape[0] for item in items)
        proposals = torch.zeros(len(items), most, 4)
        mask = torch.zeros(len(items), most, dtype=torch.bool)
        for row, item in enumerate(items):
            count = item["proposals"].shape[0]
            proposals[row, :count] = item["proposals"]
            mask[row, :count] = True
        return {
            "image": torch.stack([item["image"] for item in items]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
            "split": torch.tensor([item["split"] for item in items], dtype=torch.long),
            "size": torch.tensor([item["size"] for item in items], dtype=torch.long),
            "box": torch.tensor([item["box"] for item in items], dtype=torch.float32),
            "proposals": proposals,
            "proposal_mask": mask,
        }


# -- the data module ---------------------------------------------------------------------------------------------------
class GroundingDataModule(RetrievalFinetuneDataModule):
    """RefCOCO+ weakly-supervised grounding: retrieval-style training on (expression, whole image), evaluation of
    expressions with true boxes and proposals (the layouts are in this module's docstring).

    The tokenizer and image size default to the model's, as in retrieval fine-tuning.

    Args:
        train_files: training JSON files ``[{image, text}]`` (concatenated); needed by ``finetune``.
        val_file: evaluation JSON of the ``val`` split (the best checkpoint is picked on it).
        test_files: split name -> evaluation JSON, tested by ``test`` (and by ``finetune`` after training); an
            entry's own ``split`` (or its ref's) wins over the name, so one file may hold ``testA`` and ``testB``.
        dets_file: ``dets.json``, the proposals of every evaluated image; needed for evaluation.
        refs_file: refer-toolkit export ``[{ref_id, bbox, image_id, split}]`` for evaluation entries without
            ``bbox``.
        image_root: directory relative image paths resolve against; by default each JSON file's own directory.
        tokenizer: tokenizer directory; None: the model's.
        image_size: side of the square images the model sees; None: the model's (reference: 384).
        batch_size: training batch per process (reference: 32).
        eval_batch_size: expressions per evaluation batch (each needs a backward pass for Grad-CAM).
        num_workers: DataLoader worker processes.
        max_words: expressions are cut to this many words by ``pre_caption`` (reference: 30).
        max_length: training token length including [CLS].
        eval_max_length: evaluation token length including [CLS] (batches pad to the longest expression).
        augment: training augmentation (reference: crop scale (0.5, 1), flip, RandAugment(2, 7); vlalign swaps
            left / right in the expression when it flips).
        pin_memory, persistent_workers, seed, max_skip_fraction, skip_check_after, max_image_pixels: as for
            retrieval fine-tuning.
    """

    def __init__(
        self,
        train_files: list[str] | None = None,
        val_file: str | None = None,
        test_files: dict[str, str] | None = None,
        dets_file: str | None = None,
        refs_file: str | None = None,
        image_root: str | None = None,
        tokenizer: str | None = None,
        image_size: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 32,
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
        super().__init__(
            train_files=train_files,
            val_file=None,
            test_file=None,
            image_root=image_root,
            tokenizer=tokenizer,
            image_size=image_size,
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
        require_positive(eval_batch_size, "eval_batch_size")
        self.val_file = require_path(val_file, "val_file") if val_file else None
        self.test_files = {
            str(name): require_path(path, f"test_files.{name}") for name, path in (test_files or {}).items()
        }
        self.dets_file = require_path(dets_file, "dets_file") if dets_file else None
        self.refs_file = require_path(refs_file, "refs_file") if refs_file else None
        self.val_dataset: GroundingEvalDataset | None = None  # type: ignore[assignment]
        self.test_dataset: GroundingEvalDataset | None = None  # type: ignore[assignment]
        self._dets: dict[str, Tensor] | None = None
        self._refs: dict[str, dict[str, Any]] | None = None

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
                "reference RefCOCO+ fine-tuning)"
            )
        if stage in (None, "fit") and self.train_dataset is None:
            if not self.train_files:
                raise ConfigError(
                    f"data.train_files is empty: fine-tuning needs at least one training JSON {TRAIN_LAYOUT} "
                    "(e.g. refcoco+_train.json of the ALBEF data)"
                )
            roots = [self.resolve_root(path) for path in self.train_files]
            self.train_dataset = RetrievalTrainDataset(
                read_train_entries(self.train_files, roots), self.build_processor()
            )
        if stage in (None, "fit", "validate") and self.val_file is not None and self.val_dataset is None:
            self.val_dataset = self._eval_dataset({"val": self.val_file})
        if stage in (None, "test") and self.test_files and self.test_dataset is None:
            self.test_dataset = self._eval_dataset(self.test_files)
        if stage == "test" and not self.test_files:
            raise ConfigError(
                "data.test_files is empty: testing needs split name -> evaluation JSON, e.g. "
                "{testA: refcoco+_testA.json, testB: refcoco+_testB.json}"
            )
        if stage == "validate" and self.val_file is None:
            raise ConfigError("data.val_file is not set: validation needs the val split's evaluation JSON")

    def _eval_dataset(self, files: Mapping[str, Path]) -> GroundingEvalDataset:
        if self.dets_file is None:
            raise ConfigError(
                "data.dets_file is not set: evaluation ranks detection proposals, "
                '{"<image_id>": [[x, y, w, h], ...]} (dets.json of the ALBEF grounding data)'
            )
        if self._dets is None:
            self._dets = read_dets(self.dets_file)
        if self.refs_file is not None and self._refs is None:
            self._refs = read_refs(self.refs_file)
        entries = read_eval_entries(
            [(name, path, self.resolve_root(path)) for name, path in files.items()],
            self._dets,
            self._refs,
            max_words=self.max_words,
            dets_file=self.dets_file,
        )
        assert self.image_size is not None
        return GroundingEvalDataset(entries, self.image_size)

    def _eval_loader(self, dataset: GroundingEvalDataset | None) -> DataLoader | list:
        if dataset is None:
            return []
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=GroundingCollate(self.tokenizer, self.eval_max_length),
            **self.loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader | list:
        """Expressions of ``val_file``; an empty list (no validation) when it is not set."""
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader | list:
        """Expressions of every ``test_files`` split, in one loader (items carry their split id)."""
        return self._eval_loader(self.test_dataset)
