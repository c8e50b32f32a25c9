"""VQA data in the layout ALBEF / SIMLA read (VQA v2 and Visual Genome QA, one JSON list per file).

- training (``vqa_train.json``, ``vqa_val.json``, ``vg_qa.json``): ``[{"question_id", "question", "answer":
  [str, ...], "image", "dataset": "vqa"}, ...]`` (the human answers, usually 10); Visual Genome entries carry
  ``"dataset": "vg"`` and one ``"answer": str``. Each question trains on its distinct answers weighted by their
  share of the human answers (a VG answer weighs 0.5, as the reference). A bad entry (no image, a missing or
  undecodable file, no question, no answer) is skipped and counted by reason (``data/skipped_<reason>``);
- evaluation (``vqa_test.json``, or a split with answers such as ``vqa_val.json``): the same entries, ``answer``
  optional; every entry needs a ``question_id`` (unique), a question and an existing image, else the error names the
  file and the entry. A file whose entries all carry answers is scored locally; one without answers gets a
  submission file only (the task module's business);
- ``answer_list.json``: the candidate answers ``[str, ...]`` the model ranks at evaluation.

Image paths are relative to ``data.image_root`` (VG entries: ``data.vg_image_root``, default the same), by default
each JSON file's own folder. Questions are cleaned like the reference's ``pre_question`` (:func:`pre_question`) and
tokenised as ``[CLS] word-pieces``; answers as ``[CLS] word-pieces [SEP]`` (:func:`tokenize_answers`). A training
image flipped by the augmentation swaps "left" and "right" in the question and in every answer
(docs/differences.md row 19).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from vlalign.data.annotations import DEFAULT_IMAGE_CHECKS, check_images_exist, json_kind, load_annotations
from vlalign.data.tokenization import load_tokenizer, tokenize_captions
from vlalign.data.transforms import (
    DEFAULT_MAX_PIXELS,
    AugmentConfig,
    BadSampleError,
    EvalTransform,
    PretrainTransform,
    load_rgb,
)
from vlalign.datamodules.base import WorkerInit, require_path, require_positive
from vlalign.datamodules.collate import (
    DECODE_ERROR,
    MISSING_FILE,
    MISSING_IMAGE,
    TRANSFORM_ERROR,
    SkipGuard,
    SkippedSample,
    TooManyBadSamples,
)
from vlalign.errors import ConfigError, InputFileError
from vlalign.evaluation.vqa import answer_weights

log = logging.getLogger(__name__)

__all__ = [
    "ANSWER_LIST_LAYOUT",
    "MISSING_ANSWER",
    "MISSING_QUESTION",
    "VQA_LAYOUT",
    "VQADataModule",
    "VQAEvalCollate",
    "VQAEvalDataset",
    "VQATrainCollate",
    "VQATrainDataset",
    "load_answer_list",
    "pre_question",
    "spell_out_numbers",
    "tokenize_answers",
]

#: How a VQA entry looks, for error messages.
VQA_LAYOUT = (
    '[{"question_id": 1, "question": "what colour is the circle?", "answer": ["red", "red", ...], '
    '"image": "path.jpg", "dataset": "vqa"}, ...]'
)
ANSWER_LIST_LAYOUT = '["yes", "no", "2", "red", ...]'
#: Skip reasons of training entries, besides the image ones of :mod:`vlalign.datamodules.collate`.
MISSING_QUESTION = "missing_question"
MISSING_ANSWER = "missing_answer"
#: Weight of a Visual Genome answer (one per question), as the reference.
VG_ANSWER_WEIGHT = 0.5
#: Joins question and answers so one flip decision swaps left/right in all of them (never in user text).
_JOIN = "\x1f"

_QUESTION_DELETED = re.compile(r"[,.'!?\"()*#:;~]")
_NUMBERS = {str(n): word for n, word in enumerate("zero one two three four five six seven eight nine ten".split())}
_DIGITS = re.compile(r"\b(10|[0-9])\b")


def pre_question(text: str, max_words: int = 30) -> str:
    """Clean a question as the reference's ``pre_question``: lower case; delete ``, . ' ! ? " ( ) * # : ; ~``;
    ``-`` and ``/`` become spaces; trailing spaces stripped; the first ``max_words`` space-separated words kept."""
    question = _QUESTION_DELETED.sub("", text.lower()).replace("-", " ").replace("/", " ").rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question


def spell_out_numbers(text: str) -> str:
    """``"2 shapes"`` -> ``"two shapes"`` (whole numbers 0–10), for tokenizers without digits
    (``data.spell_out_numbers``)."""
    return _DIGITS.sub(lambda match: _NUMBERS[match.group(1)], text)


def tokenize_answers(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int = 30
) -> tuple[Tensor, Tensor]:
    """Answers as the decoder reads and predicts them: ``[CLS] word-pieces [SEP]`` (at most ``max_length`` tokens;
    a longer answer keeps its ``[SEP]``), right-padded to the longest. Returns ``(ids, mask)``, long ``[N, L]``."""
    if max_length < 3:
        raise ValueError(f"answer max_length must be >= 3 ([CLS], one piece, [SEP]), got {max_length}")
    cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    if cls_id is None or sep_id is None or pad_id is None:
        raise ValueError("the tokenizer needs [CLS], [SEP] and [PAD] tokens to encode answers")
    pieces = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    rows = [[cls_id, *p[: max_length - 2], sep_id] for p in pieces]
    width = max((len(r) for r in rows), default=2)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def load_answer_list(path: str | Path) -> list[str]:
    """The candidate answers of ``answer_list.json`` (duplicates dropped, first kept).

    Raises:
        InputFileError: not a non-empty JSON list of non-empty strings (the message names the file and the entry).
    """
    entries = load_annotations(path)
    answers: list[str] = []
    for index, answer in enumerate(entries):
        if not isinstance(answer, str) or not answer.strip():
            raise InputFileError(
                f"{path}: entry {index} is a JSON {json_kind(answer)} {json.dumps(answer)[:40]}, not a non-empty "
                f"answer string; an answer list looks like {ANSWER_LIST_LAYOUT}"
            )
        answers.append(answer)
    distinct = list(dict.fromkeys(answers))
    if len(distinct) < len(answers):
        log.warning("%s: %d duplicate answers dropped", path, len(answers) - len(distinct))
    return distinct


def _root_for(entry: dict, image_root: Path, vg_image_root: Path) -> Path:
    return vg_image_root if entry.get("dataset") == "vg" else image_root


def _entry_answers(entry: dict) -> tuple[list[str], list[float]] | None:
    """The training answers of an entry and their weights; None when it has no usable answer."""
    answer = entry.get("answer")
    if isinstance(answer, str):
        answer = [answer] if answer.strip() else []
    if not isinstance(answer, list):
        return None
    answers = [a for a in answer if isinstance(a, str) and a.strip()]
    if not answers:
        return None
    if entry.get("dataset") == "vg" and len(answers) == 1:
        return answers, [VG_ANSWER_WEIGHT]
    return answer_weights(answers)


# -- training ----------------------------------------------------------------------------------------------------------
@dataclass
class VQASample:
    """One decoded, augmented training question: image, cleaned question, its answers and their weights."""

    key: str
    image: Tensor
    question: str
    answers: list[str]
    weights: list[float]


@dataclass(frozen=True)
class _TrainEntry:
    key: str
    image: Path | None
    question: str
    answers: tuple[str, ...]
    weights: tuple[float, ...]
    reason: str | None  # why it is skipped when drawn; None: usable as far as the file says


class VQATrainDataset(Dataset):
    """One item per training question: a :class:`VQASample`, or a :class:`SkippedSample` naming why not.

    Built with :meth:`from_files`; an entry the file already shows to be unusable is kept and skipped (and counted)
    each time it is drawn, like any other bad sample.
    """

    def __init__(
        self,
        entries: list[_TrainEntry],
        transform: PretrainTransform,
        max_words: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.entries = entries
        self.transform = transform
        self.max_words = max_words
        self.max_pixels = max_pixels

    @classmethod
    def from_files(
        cls,
        files: Sequence[Path],
        image_roots: Sequence[tuple[Path, Path]],
        transform: PretrainTransform,
        max_words: int = 30,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        image_checks: int | None = DEFAULT_IMAGE_CHECKS,
    ) -> VQATrainDataset:
        """Read every file; ``image_roots[i]`` is ``(root, vg_root)`` for ``files[i]``.

        Raises:
            InputFileError: a file that is not a non-empty JSON list, or none of whose checked images exists.
        """
        entries: list[_TrainEntry] = []
        for json_file, (root, vg_root) in zip(files, image_roots, strict=True):
            images: list[tuple[int, Path]] = []
            for position, raw in enumerate(load_annotations(json_file)):
                entry = raw if isinstance(raw, dict) else {}
                key = f"{json_file}#{position}"
                image = entry.get("image")
                question = entry.get("question")
                targets = _entry_answers(entry)
                path = _root_for(entry, root, vg_root) / image if isinstance(image, str) and image else None
                reason = None
                if path is None:
                    reason = MISSING_IMAGE
                elif not isinstance(question, str) or not pre_question(question, max_words).strip():
                    reason = MISSING_QUESTION
                elif targets is None:
                    reason = MISSING_ANSWER
                if path is not None:
                    images.append((position, path))
                answers, weights = targets if targets is not None else ([], [])
                text = question if isinstance(question, str) else ""
                entries.append(_TrainEntry(key, path, text, tuple(answers), tuple(weights), reason))
            if image_checks is not None:
                check_images_exist(json_file, images, root, limit=image_checks)
        return cls(entries, transform, max_words, max_pixels)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> VQASample | SkippedSample:
        entry = self.entries[index]
        if entry.reason is not None or entry.image is None:
            return SkippedSample(entry.key, entry.reason or MISSING_IMAGE)
        if not entry.image.is_file():
            return SkippedSample(entry.key, MISSING_FILE)
        try:
            pil = load_rgb(entry.image, max_pixels=self.max_pixels)
        except BadSampleError as err:
            return SkippedSample(entry.key, err.reason)
        except Exception:  # noqa: BLE001 - any decoder failure is a bad file, not a bug in the pipeline
            return SkippedSample(entry.key, DECODE_ERROR)
        question = pre_question(entry.question, self.max_words)
        try:
            pixels, text, _ = self.transform(pil, _JOIN.join([question, *entry.answers]))
        except Exception:  # noqa: BLE001 - odd images can trip augmentations; never kill the worker
            return SkippedSample(entry.key, TRANSFORM_ERROR)
        question, *answers = text.split(_JOIN)
        return VQASample(entry.key, pixels, question, answers, list(entry.weights))


class VQATrainCollate:
    """Stack images, tokenise questions and flatten every question's answers into one answer batch.

    Output: ``image`` [B, 3, S, S], ``input_ids`` / ``attention_mask`` [B, Lq] (questions), ``answer_ids`` /
    ``answer_mask`` [N, La] (all answers), ``answer_question`` long [N] (the question row of each answer),
    ``answer_weight`` float [N], ``skipped`` ``{reason: count}`` and ``keys``. Markers of skipped entries are
    dropped and counted (``guard``, when set, raises when too many are bad).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        answer_max_length: int = 30,
        guard: SkipGuard | None = None,
        spell_numbers: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.answer_max_length = answer_max_length
        self.guard = guard
        self.spell_numbers = spell_numbers

    def __call__(self, items: Sequence[VQASample | SkippedSample]) -> dict[str, Any]:
        samples = [item for item in items if not isinstance(item, SkippedSample)]
        counts: Counter[str] = Counter()
        for item in items:
            if isinstance(item, SkippedSample):
                counts[item.reason] += 1
                if self.guard is not None:
                    self.guard.bad(item.reason)
        if self.guard is not None:
            self.guard.good(len(samples))
        if not samples:
            message = f"every sample of a batch was unusable (skipped: {dict(counts)}); check the data files"
            if self.guard is not None:
                message += f" ({self.guard.describe()})"
            raise TooManyBadSamples(message)
        spell = spell_out_numbers if self.spell_numbers else (lambda text: text)
        input_ids, attention_mask = tokenize_captions(
            self.tokenizer, [spell(s.question) for s in samples], self.max_length
        )
        answers = [spell(answer) for s in samples for answer in s.answers]
        answer_ids, answer_mask = tokenize_answers(self.tokenizer, answers, self.answer_max_length)
        owner = [row for row, s in enumerate(samples) for _ in s.answers]
        return {
            "image": torch.stack([s.image for s in samples]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "answer_ids": answer_ids,
            "answer_mask": answer_mask,
            "answer_question": torch.tensor(owner, dtype=torch.long),
            "answer_weight": torch.tensor([w for s in samples for w in s.weights], dtype=torch.float32),
            "skipped": dict(counts),
            "keys": [s.key for s in samples],
        }


# -- evaluation --------------------------------------------------------------------------------------------------------
def _shown(entry: dict, key: str) -> str:
    if key not in entry:
        return f"no {key!r} key"
    value = entry[key]
    return f"a JSON {json_kind(value)} {json.dumps(value)[:60]}"


class VQAEvalDataset(Dataset):
    """The questions of an evaluation file, its human answers when it has them, and the answer list to rank.

    Attributes:
        question_ids: each entry's ``question_id`` (as in the file), in file order.
        questions: cleaned questions (:func:`pre_question` with ``max_words``).
        images: resolved image paths.
        answers: the human answers per question, or None when the file has none (submission only).
        answer_types: each entry's ``answer_type`` when the file names them (VQA v2: ``yes/no``, ``number``,
            ``other``), else None.
        answer_list: the candidate answers (set by the data module), with ``answer_ids`` / ``answer_mask`` their
            tokenisation.

    Raises:
        InputFileError: an entry is not an object, lacks a ``question_id`` (or repeats one), a question or an image
            path, has answers when others have none (or the reverse), or images are missing; the message names the
            file and the entry.
    """

    def __init__(
        self,
        json_file: str | Path,
        image_root: Path,
        vg_image_root: Path,
        transform: Callable[[Image.Image], Tensor],
        max_words: int = 50,
        check_images: bool = True,
    ) -> None:
        self.json_file = Path(json_file)
        self.transform = transform
        self.question_ids: list[Any] = []
        self.questions: list[str] = []
        self.images: list[Path] = []
        answers: list[list[str] | None] = []
        types: list[str | None] = []
        seen: dict[str, int] = {}
        for index, entry in enumerate(load_annotations(json_file)):
            where = f"{json_file}: entry {index}"
            if not isinstance(entry, dict):
                raise InputFileError(
                    f"{where} is a JSON {json_kind(entry)}, not an object; entries look like {VQA_LAYOUT}"
                )
            qid = entry.get("question_id")
            if not isinstance(qid, (int, str)) or isinstance(qid, bool) or (isinstance(qid, str) and not qid.strip()):
                raise InputFileError(
                    f"{where} has no question_id (a number or a string), got {_shown(entry, 'question_id')}; the "
                    f"submission names every answer by it. Entries look like {VQA_LAYOUT}"
                )
            token = json.dumps(qid)
            if token in seen:
                raise InputFileError(
                    f"{where} repeats question_id {token} of entry {seen[token]}; every question needs its own id"
                )
            seen[token] = index
            question, image = entry.get("question"), entry.get("image")
            if not isinstance(question, str) or not pre_question(question, max_words).strip():
                raise InputFileError(
                    f"{where} (question_id {token}) has no question (a non-empty string), got "
                    f"{_shown(entry, 'question')}; fix or remove the entry"
                )
            if not isinstance(image, str) or not image.strip():
                raise InputFileError(
                    f"{where} (question_id {token}) has no image path ('image': a non-empty string), got "
                    f"{_shown(entry, 'image')}; fix or remove the entry"
                )
            targets = _entry_answers(entry) if "answer" in entry else None
            if "answer" in entry and targets is None:
                raise InputFileError(
                    f"{where} (question_id {token}) has an unusable answer ({_shown(entry, 'answer')}): give a "
                    "non-empty list of answer strings, or leave 'answer' out for a split without answers"
                )
            raw = entry.get("answer")
            answers.append(
                None if targets is None else ([raw] if isinstance(raw, str) else [a for a in raw if isinstance(a, str)])
            )
            kind = entry.get("answer_type")
            types.append(kind if isinstance(kind, str) else None)
            self.question_ids.append(qid)
            self.questions.append(pre_question(question, max_words))
            self.images.append(_root_for(entry, image_root, vg_image_root) / image)
        with_answers = [a is not None for a in answers]
        if any(with_answers) and not all(with_answers):
            odd = with_answers.index(not with_answers[0])
            raise InputFileError(
                f"{json_file}: entry {odd} {'has' if with_answers[odd] else 'has no'} 'answer' but entry 0 "
                f"{'has' if with_answers[0] else 'has none'}; a split is scored only when every question has its "
                "human answers, and gets a submission file only when none has"
            )
        self.answers: list[list[str]] | None = [a for a in answers if a is not None] if all(with_answers) else None
        self.answer_types: list[str | None] = types
        self.answer_list: list[str] = []
        self.answer_ids: Tensor | None = None
        self.answer_mask: Tensor | None = None
        if check_images:
            check_images_exist(json_file, list(enumerate(self.images)), image_root)

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.images[index]
        try:
            image = load_rgb(path)
        except BadSampleError as err:
            raise InputFileError(
                f"{self.json_file}: entry {index}: image {path}: {err.message} ({err.reason}); evaluation needs every "
                "image: fix or remove the entry"
            ) from err
        return {"image": self.transform(image), "question": self.questions[index], "index": index}


class VQAEvalCollate:
    """``image`` [B, 3, S, S], ``input_ids`` / ``attention_mask`` (questions) and ``index`` [B] (entry positions)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, spell_numbers: bool = False) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.spell_numbers = spell_numbers

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        questions = [item["question"] for item in items]
        if self.spell_numbers:
            questions = [spell_out_numbers(q) for q in questions]
        input_ids, attention_mask = tokenize_captions(self.tokenizer, questions, self.max_length)
        return {
            "image": torch.stack([item["image"] for item in items]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        }


# -- the data module ---------------------------------------------------------------------------------------------------
class VQADataModule(L.LightningDataModule):
    """VQA fine-tuning and evaluation data (VQA v2 / VG layout of ALBEF and SIMLA; see the module docstring).

    The tokenizer and image size default to the model's: under ``vlalign finetune vqa`` / ``vlalign evaluate vqa``
    the task module holds the model loaded from ``model.init_from``, and this module adopts them at setup.

    Args:
        train_files: training JSON files (concatenated; the reference: vqa_train, vqa_val and vg_qa); needed by
            ``finetune``.
        val_file: an evaluation file evaluated at validation (with answers: accuracy; the best checkpoint by it).
        test_file: the file ``test`` evaluates (and ``finetune`` after training).
        answer_list: ``answer_list.json``, the answers ranked at evaluation; needed with ``val_file`` / ``test_file``.
        image_root: folder relative image paths resolve against; by default each JSON file's own folder.
        vg_image_root: the same for entries with ``"dataset": "vg"``; by default ``image_root``.
        tokenizer: tokenizer directory; None: the model's.
        image_size: side of the square images; None: the model's (linked into ``model.image_size`` by the CLI).
        batch_size: training questions per batch and process (reference: 32).
        eval_batch_size: evaluation questions per batch (reference: 16).
        num_workers: DataLoader worker processes.
        max_words: training questions keep this many words (reference: 30).
        eval_max_words: evaluation questions keep this many words (reference: 50).
        max_length: training question tokens, ``[CLS]`` included (reference: 25).
        eval_max_length: evaluation question tokens, ``[CLS]`` included (the reference does not cut; keep it above
            the longest question).
        answer_max_length: answer tokens, ``[CLS]`` and ``[SEP]`` included (the reference does not cut).
        spell_out_numbers: tokenise the numbers 0–10 in questions and answers as words (``2`` -> ``two``), for
            tokenizers that have no digits (the synthetic data's, trained on captions); predictions and accuracy still
            use the answer-list strings.
        augment: training augmentation (reference: crop scale (0.5, 1), flip, RandAugment(2, 7)).
        pin_memory: pin host memory of batches (only with a GPU).
        persistent_workers: keep workers alive between epochs (with ``num_workers > 0``).
        max_skip_fraction: stop when more than this fraction of the training entries read was unusable.
        skip_check_after: entries a data worker must have read before ``max_skip_fraction`` applies.
        max_image_pixels: images declaring more pixels are skipped as decompression bombs.
    """

    def __init__(
        self,
        train_files: list[str] | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        answer_list: str | None = None,
        image_root: str | None = None,
        vg_image_root: str | None = None,
        tokenizer: str | None = None,
        image_size: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 16,
        num_workers: int = 4,
        max_words: int = 30,
        eval_max_words: int = 50,
        max_length: int = 25,
        eval_max_length: int = 64,
        answer_max_length: int = 30,
        spell_out_numbers: bool = False,
        augment: AugmentConfig = AugmentConfig(scale=(0.5, 1.0)),
        pin_memory: bool = True,
        persistent_workers: bool = True,
        max_skip_fraction: float = 0.1,
        skip_check_after: int = 1000,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__()
        for key, value in (
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("max_words", max_words),
            ("eval_max_words", eval_max_words),
            ("skip_check_after", skip_check_after),
            ("max_image_pixels", max_image_pixels),
        ):
            require_positive(value, key)
        require_positive(num_workers, "num_workers", minimum=0)
        require_positive(max_length, "max_length", minimum=2)
        require_positive(eval_max_length, "eval_max_length", minimum=2)
        require_positive(answer_max_length, "answer_max_length", minimum=3)
        if image_size is not None:
            require_positive(image_size, "image_size")
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self.train_files = [require_path(path, "train_files") for path in train_files or []]
        self.val_file = require_path(val_file, "val_file") if val_file else None
        self.test_file = require_path(test_file, "test_file") if test_file else None
        self.answer_list_file = require_path(answer_list, "answer_list") if answer_list else None
        self.image_root = require_path(image_root, "image_root") if image_root else None
        self.vg_image_root = require_path(vg_image_root, "vg_image_root") if vg_image_root else None
        self.tokenizer_path = require_path(tokenizer, "tokenizer") if tokenizer else None
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.max_words = max_words
        self.eval_max_words = eval_max_words
        self.max_length = max_length
        self.eval_max_length = eval_max_length
        self.answer_max_length = answer_max_length
        self.spell_out_numbers = spell_out_numbers
        self.augment = replace(augment)
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.max_skip_fraction = max_skip_fraction
        self.skip_check_after = skip_check_after
        self.max_image_pixels = max_image_pixels
        self.train_dataset: VQATrainDataset | None = None
        self.val_dataset: VQAEvalDataset | None = None
        self.test_dataset: VQAEvalDataset | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._answer_list: list[str] | None = None

    # -- tokenizer and image size: given, or the model's --------------------------------------------------------
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            if self.tokenizer_path is None:
                raise ConfigError(
                    "data.tokenizer is not set and no model provided one: set data.tokenizer to a tokenizer "
                    "directory, or run the module under `vlalign finetune vqa` / `vlalign evaluate vqa`"
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
    def answer_list(self) -> list[str]:
        if self._answer_list is None:
            if self.answer_list_file is None:
                raise ConfigError(
                    "data.answer_list is not set: evaluation ranks the candidate answers of answer_list.json "
                    f"({ANSWER_LIST_LAYOUT}); set data.answer_list"
                )
            self._answer_list = load_answer_list(self.answer_list_file)
        return self._answer_list

    def _roots(self, json_file: Path) -> tuple[Path, Path]:
        root = self.image_root if self.image_root is not None else json_file.parent
        return root, self.vg_image_root if self.vg_image_root is not None else root

    @property
    def data_source(self) -> str:
        root = f" (images under {self.image_root})" if self.image_root is not None else ""
        return "data.train_files " + ", ".join(str(path) for path in self.train_files) + root

    def setup(self, stage: str | None = None) -> None:
        module = None
        if self.trainer is not None:
            try:
                module = self.trainer.lightning_module
            except (AttributeError, RuntimeError):
                module = None
        if module is not None:
            preprocessing = getattr(module, "preprocessing", None)
            self.adopt_model_preprocessing(
                getattr(module, "tokenizer", None), getattr(preprocessing, "image_size", None)
            )
        if self.image_size is None:
            raise ConfigError(
                "data.image_size is not set and no model provided one: set data.image_size (384 in the reference "
                "VQA fine-tuning)"
            )
        if stage in (None, "fit") and self.train_dataset is None:
            if not self.train_files:
                raise ConfigError(
                    f"data.train_files is empty: fine-tuning needs at least one training JSON {VQA_LAYOUT} "
                    "(e.g. vqa_train.json of the ALBEF data)"
                )
            transform = PretrainTransform(self.image_size, self.augment)
            self.train_dataset = VQATrainDataset.from_files(
                self.train_files,
                [self._roots(path) for path in self.train_files],
                transform,
                self.max_words,
                self.max_image_pixels,
            )
        if stage in (None, "fit", "validate") and self.val_file is not None and self.val_dataset is None:
            self.val_dataset = self._eval_dataset(self.val_file)
        if stage in (None, "test") and self.test_file is not None and self.test_dataset is None:
            self.test_dataset = self._eval_dataset(self.test_file)

    def _eval_dataset(self, json_file: Path) -> VQAEvalDataset:
        root, vg_root = self._roots(json_file)
        assert self.image_size is not None
        dataset = VQAEvalDataset(json_file, root, vg_root, EvalTransform(self.image_size), self.eval_max_words)
        answers = self.answer_list
        texts = [spell_out_numbers(a) for a in answers] if self.spell_out_numbers else answers
        dataset.answer_list = answers
        dataset.answer_ids, dataset.answer_mask = tokenize_answers(self.tokenizer, texts, self.answer_max_length)
        _warn_identical_answers(answers, dataset.answer_ids, self.answer_list_file)
        return dataset

    # -- loaders -----------------------------------------------------------------------------------------------------
    def _rank(self) -> int:
        if self.trainer is not None:
            return self.trainer.global_rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def _world_size(self) -> int:
        if self.trainer is not None:
            return self.trainer.world_size
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.num_workers
        kwargs: dict[str, Any] = {
            "num_workers": workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.persistent_workers and workers > 0,
        }
        if workers > 0:
            kwargs["worker_init_fn"] = WorkerInit(rank=self._rank())
        return kwargs

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        if len(self.train_dataset) < self.batch_size * self._world_size():
            raise InputFileError(
                f"{self.data_source}: {len(self.train_dataset)} questions, fewer than one batch of data.batch_size "
                f"{self.batch_size} x {self._world_size()} process(es) (the last incomplete batch is dropped, so no "
                "training step would run): add entries or lower data.batch_size"
            )
        guard = SkipGuard(self.max_skip_fraction, self.skip_check_after, self.data_source)
        collate = VQATrainCollate(
            self.tokenizer, self.max_length, self.answer_max_length, guard, self.spell_out_numbers
        )
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=collate,
            **self._loader_kwargs(),
        )

    def _eval_loader(self, dataset: VQAEvalDataset | None) -> DataLoader | list:
        if dataset is None:
            return []
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=VQAEvalCollate(self.tokenizer, self.eval_max_length, self.spell_out_numbers),
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader | list:
        """Loader over ``val_file``; an empty list (no validation) when it is not set."""
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader | list:
        """Loader over ``test_file``; an empty list when it is not set."""
        return self._eval_loader(self.test_dataset)


def _warn_identical_answers(answers: Sequence[str], ids: Tensor, source: Path | None) -> None:
    """Answers that tokenise to the same ids cannot be told apart by the ranking: say which (once)."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for answer, row in zip(answers, ids.tolist(), strict=True):
        groups.setdefault(tuple(row), []).append(answer)
    clashes = [group for group in groups.values() if len(group) > 1]
    if clashes:
        shown = "; ".join(", ".join(repr(a) for a in group[:4]) for group in clashes[:3])
        log.warning(
            "%s: %d groups of answers tokenise identically and cannot be ranked apart (e.g. %s): the tokenizer lacks "
            "their characters ([UNK]); use the model's own tokenizer, or data.spell_out_numbers for digits",
            source,
            len(clashes),
            shown,
        )
