"""Synthetic VQA files for the synthetic scenes, in the VQA v2 layout ALBEF / SIMLA read (``vlalign finetune vqa``).

:func:`write_task_files` (called by :func:`vlalign.data.synth.write_synthetic` for every split) writes

- ``vqa_train.json``, ``vqa_val.json``, ``vqa_test.json``: ``[{"question_id", "question", "answer": [10 human
  answers], "image": "images/<split>/KEY.jpg", "dataset": "vqa", "question_type", "answer_type"}, ...]``, three
  questions per image (every split has answers, so accuracy is computed locally; a real VQA v2 test file has none);
- ``answer_list.json``: every answer a question can have (all colours, shapes, counts, yes / no, positions and the
  answer variants the simulated annotators use), most frequent in the training answers first.

Questions, one kind per question, three different kinds per image (``answer_type`` as VQA v2 names them):

======================================  =============================================  ============
question                                 answer                                         answer_type
======================================  =============================================  ============
``what colour is the circle?``           the colour of the only circle of the scene     other
``what shape is the red thing?``         the shape of the red object                    other
``how many shapes are there?``           ``1``, ``2`` or ``3`` (digits, as VQA v2)      number
``is there a blue star?``                ``yes`` / ``no`` (half each)                   yes/no
``where is the red circle?``             ``left``, ``right``, ``top``, ``bottom``,       other
                                         ``middle``
======================================  =============================================  ============

Ten simulated annotators answer each question. Most questions are easy (every annotator gives the true answer);
on the others each annotator errs with a probability drawn per question: a synonym (``center`` / ``centre`` for
``middle``, ``up`` for ``top``), a confusable colour (orange for red), a count off by one, or the other of yes / no.
So the official accuracy rule (a match needs three annotators) matters as on real data.

Words: questions and answers use the caption vocabulary (colours, shapes, positions, ``one``..``three``, ``there``,
``is``, ``the``) plus a few words the captions lack (``what``, ``how``, ``many``, ``where``, ``yes``, ``no``), which
the caption-trained WordPiece tokenizer spells with sub-word pieces of letters it knows (never ``[UNK]``). Digits do
not occur in captions, so the tokenizer has none: the tiny config sets ``data.spell_out_numbers`` (``2`` is read as
``two``; the answer written and scored stays ``2``).

Drawn from its own random stream per image (``numpy.random.default_rng([seed, 0x5651, int(key)])``), so the other
files of the synthetic data are unchanged and the same seed writes the same bytes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from vlalign.data.synth import COLOURS, POSITIONS, SHAPES, Scene, SceneRecord, Shape, TaskFilesInput

__all__ = [
    "ANSWER_LIST_FILE",
    "QUESTIONS_PER_IMAGE",
    "VQA_FILES",
    "VQA_STREAM",
    "answer_vocabulary",
    "human_answers",
    "scene_questions",
    "write_task_files",
]

#: Second entropy word of the VQA generator: a stream apart from the scenes' and the other task writers'.
VQA_STREAM = 0x5651
QUESTIONS_PER_IMAGE = 3
ANNOTATORS = 10
VQA_FILES = {split: f"vqa_{split}.json" for split in ("train", "val", "test")}
ANSWER_LIST_FILE = "answer_list.json"
KINDS: tuple[str, ...] = ("colour", "shape", "count", "exists", "where")
#: The answer written for each position, and the variants annotators also use for it.
POSITION_ANSWERS: dict[str, str] = {
    "left": "left",
    "right": "right",
    "top": "top",
    "bottom": "bottom",
    "centre": "middle",
}
SYNONYMS: dict[str, tuple[str, ...]] = {
    "middle": ("center", "centre"),
    "top": ("up",),
    "bottom": ("down",),
    "left": ("on left",),
    "right": ("on right",),
}
#: Colours an annotator may name instead (neighbours in hue or lightness).
CONFUSABLE: dict[str, tuple[str, ...]] = {
    "red": ("orange", "pink"),
    "green": ("blue", "yellow"),
    "blue": ("purple", "green"),
    "yellow": ("orange", "green"),
    "orange": ("red", "yellow"),
    "purple": ("blue", "pink"),
    "pink": ("purple", "red"),
    "black": ("blue", "purple"),
}
_SHAPE_CONFUSION: dict[str, tuple[str, ...]] = {
    "circle": ("square",),
    "square": ("circle",),
    "triangle": ("star",),
    "star": ("triangle",),
}
_ANSWER_TYPE = {"colour": "other", "shape": "other", "count": "number", "exists": "yes/no", "where": "other"}
_QUESTION_TYPE = {
    "colour": "what colour is the",
    "shape": "what shape is the",
    "count": "how many",
    "exists": "is there a",
    "where": "where is the",
}
# Per-question chance that an annotator errs: most questions are unambiguous.
_ERROR_RATES = np.array([0.0, 0.1, 0.2, 0.35])
_ERROR_RATE_P = np.array([0.55, 0.2, 0.15, 0.1])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _unique_shapes(scene: Scene) -> list[Shape]:
    counts = Counter(item.shape for item in scene.shapes)
    return [item for item in scene.shapes if counts[item.shape] == 1]


def _available(scene: Scene) -> list[str]:
    return [kind for kind in KINDS if kind != "colour" or _unique_shapes(scene)]


def _question(kind: str, scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """One question of ``kind`` about ``scene`` and its true answer."""
    items = list(scene.shapes)
    if kind == "colour":
        candidates = _unique_shapes(scene)
        item = candidates[int(rng.integers(len(candidates)))]
        return f"what colour is the {item.shape}?", item.colour
    if kind == "shape":
        item = items[int(rng.integers(len(items)))]
        return f"what shape is the {item.colour} thing?", item.shape
    if kind == "count":
        return "how many shapes are there?", str(len(items))
    if kind == "exists":
        present = {(item.colour, item.shape) for item in items}
        if rng.random() < 0.5:
            colour, shape = sorted(present)[int(rng.integers(len(present)))]
            return f"is there {_article(colour)} {colour} {shape}?", "yes"
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = absent[int(rng.integers(len(absent)))]
        return f"is there {_article(colour)} {colour} {shape}?", "no"
    if kind == "where":
        item = items[int(rng.integers(len(items)))]
        return f"where is the {item.colour} {item.shape}?", POSITION_ANSWERS[item.position]
    raise ValueError(f"unknown question kind {kind!r}")


def _wrong(kind: str, truth: str, rng: np.random.Generator) -> str:
    """What an annotator who errs says instead of ``truth``."""
    if kind == "colour":
        options: tuple[str, ...] = CONFUSABLE[truth]
    elif kind == "shape":
        options = _SHAPE_CONFUSION[truth]
    elif kind == "count":
        value = int(truth)
        options = tuple(str(v) for v in (value - 1, value + 1) if v >= 1)
    elif kind == "exists":
        options = ("no",) if truth == "yes" else ("yes",)
    else:
        options = SYNONYMS[truth]
    return options[int(rng.integers(len(options)))]


def human_answers(kind: str, truth: str, rng: np.random.Generator) -> list[str]:
    """Ten annotators' answers: all ``truth`` on an easy question, else each errs with the question's error rate."""
    rate = float(rng.choice(_ERROR_RATES, p=_ERROR_RATE_P))
    errs = rng.random(ANNOTATORS) < rate
    return [_wrong(kind, truth, rng) if err else truth for err in errs]


def scene_questions(record: SceneRecord, seed: int) -> list[dict]:
    """The VQA entries of one image (:data:`QUESTIONS_PER_IMAGE` questions of different kinds)."""
    rng = np.random.default_rng([seed, VQA_STREAM, int(record.key)])
    available = _available(record.scene)
    kinds = rng.choice(len(available), size=min(QUESTIONS_PER_IMAGE, len(available)), replace=False)
    entries = []
    for n, index in enumerate(kinds):
        kind = available[int(index)]
        question, truth = _question(kind, record.scene, rng)
        entries.append(
            {
                "question_id": int(record.key) * 10 + n,
                "question": question,
                "answer": human_answers(kind, truth, rng),
                "image": record.image,
                "dataset": "vqa",
                "question_type": _QUESTION_TYPE[kind],
                "answer_type": _ANSWER_TYPE[kind],
            }
        )
    return entries


def answer_vocabulary() -> list[str]:
    """Every answer a synthetic question or annotator can give (sorted)."""
    answers = {*COLOURS, *SHAPES, "1", "2", "3", "4", "yes", "no", *POSITION_ANSWERS.values()}
    answers.update(variant for variants in SYNONYMS.values() for variant in variants)
    missing = set(POSITIONS) - set(POSITION_ANSWERS)
    if missing:  # a position the scenes gained without an answer here
        raise RuntimeError(f"no VQA answer for the positions {sorted(missing)}")
    return sorted(answers)


def write_task_files(inp: TaskFilesInput) -> dict[str, Path]:
    """Write the VQA files of every split and the answer list under ``inp.root``; returns ``{file name: path}``."""
    written: dict[str, Path] = {}
    train_answers: Counter[str] = Counter()
    for split, name in VQA_FILES.items():
        entries = [entry for record in inp.records.get(split, []) for entry in scene_questions(record, inp.seed)]
        if split == "train":
            train_answers.update(answer for entry in entries for answer in entry["answer"])
        path = inp.root / name
        path.write_text(json.dumps(entries, indent=1))
        written[name] = path
    answers = sorted(answer_vocabulary(), key=lambda answer: (-train_answers[answer], answer))
    path = inp.root / ANSWER_LIST_FILE
    path.write_text(json.dumps(answers, indent=1))
    written[ANSWER_LIST_FILE] = path
    return written
