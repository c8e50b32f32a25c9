"""Synthetic NLVR2 files for the synthetic scenes, in the layout ALBEF / SIMLA read (``vlalign finetune nlvr2``).

:func:`write_task_files` (called by :func:`vlalign.data.synth.write_synthetic` for every split) writes
``nlvr2_train.json``, ``nlvr2_dev.json`` (the val images) and ``nlvr2_test.json`` (the test images, test-P's role):
``[{"images": ["images/<split>/KEY.jpg", "images/<split>/KEY.jpg"], "sentence": ..., "label": "True" | "False"}]``.

Every image of a split is the left image of one pair, its right image another image of the same split drawn at
random; each pair gets two statements, one true of it and one false, so the labels are balanced and a statement's
words alone cannot tell its label. A statement is one of four templates over noun phrases of four kinds:

======================================================================  ===========================================
statement                                                               true when
======================================================================  ===========================================
``there is a red circle in the left picture``                           the left scene has it
``there are two shapes in both pictures``                               both scenes have it
``there is a circle in the left picture and a red shape in the right``  each side has its phrase
``picture``
``there is a blue star in only one picture``                            exactly one scene has it
======================================================================  ===========================================

Noun phrases: ``a red circle`` (a shape of that colour and kind), ``a red shape`` (any shape of that colour),
``a circle`` (any circle), ``one shape`` / ``two shapes`` / ``three shapes`` (exactly that many). For each statement
the template and the kind of every phrase are drawn first, then a phrase of that kind that gives the wanted label,
so templates and kinds are equally frequent among true and false statements. Words: the caption vocabulary plus
``pictures``, ``both``, ``only``, ``are`` (sub-word pieces of the caption-trained tokenizer, never ``[UNK]``).
"left" and "right" name the images of the pair, never positions inside one image.

Drawn from its own random stream per split (``numpy.random.default_rng([seed, 0x4E32, split index])``), so the
other files of the synthetic data are unchanged and the same seed writes the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlalign.data.synth import COLOURS, SHAPES, SPLITS, Scene, SceneRecord, TaskFilesInput

__all__ = ["NLVR2_FILES", "NLVR2_STREAM", "NounPhrase", "has", "pair_statements", "write_task_files"]

#: Second entropy word of the NLVR2 generator: a stream apart from the scenes' and the other task writers'.
NLVR2_STREAM = 0x4E32
#: File written for each split (dev and test-P in the NLVR2 sense).
NLVR2_FILES: dict[str, str] = {"train": "nlvr2_train.json", "val": "nlvr2_dev.json", "test": "nlvr2_test.json"}
TEMPLATES: tuple[str, ...] = ("side", "both", "each", "only_one")
KINDS: tuple[str, ...] = ("colour_shape", "colour", "shape", "count")
_COUNT_WORDS = {1: "one shape", 2: "two shapes", 3: "three shapes"}
_MAX_TRIES = 100

#: ``(kind, value)``: ``("colour_shape", ("red", "circle"))``, ``("colour", "red")``, ``("shape", "circle")``,
#: ``("count", 2)``.
NounPhrase = tuple[str, object]


def noun_phrases(kind: str) -> list[NounPhrase]:
    """Every phrase of ``kind``."""
    if kind == "colour_shape":
        return [(kind, (colour, shape)) for colour in COLOURS for shape in SHAPES]
    if kind == "colour":
        return [(kind, colour) for colour in COLOURS]
    if kind == "shape":
        return [(kind, shape) for shape in SHAPES]
    if kind == "count":
        return [(kind, count) for count in _COUNT_WORDS]
    raise ValueError(f"unknown noun phrase kind {kind!r}")


def has(scene: Scene, phrase: NounPhrase) -> bool:
    """Whether ``scene`` shows what ``phrase`` names (counts are exact)."""
    kind, value = phrase
    if kind == "colour_shape":
        colour, shape = value  # type: ignore[misc]
        return any(s.colour == colour and s.shape == shape for s in scene.shapes)
    if kind == "colour":
        return any(s.colour == value for s in scene.shapes)
    if kind == "shape":
        return any(s.shape == value for s in scene.shapes)
    return len(scene.shapes) == value


def words(phrase: NounPhrase) -> tuple[str, str]:
    """``(verb, noun phrase)``: ``("is", "a red circle")``, ``("are", "two shapes")``."""
    kind, value = phrase
    if kind == "count":
        return ("is" if value == 1 else "are"), _COUNT_WORDS[value]  # type: ignore[index]
    if kind == "colour_shape":
        colour, shape = value  # type: ignore[misc]
        text = f"{colour} {shape}"
    elif kind == "colour":
        text = f"{value} shape"
    else:
        text = str(value)
    return "is", f"{'an' if text[0] in 'aeiou' else 'a'} {text}"


def truth(template: str, phrases: list[NounPhrase], left: Scene, right: Scene, side: str = "left") -> bool:
    """Whether a statement of ``template`` with ``phrases`` is true of the pair."""
    if template == "side":
        return has(left if side == "left" else right, phrases[0])
    if template == "both":
        return has(left, phrases[0]) and has(right, phrases[0])
    if template == "each":
        return has(left, phrases[0]) and has(right, phrases[1])
    if template == "only_one":
        return has(left, phrases[0]) != has(right, phrases[0])
    raise ValueError(f"unknown template {template!r}")


def render(template: str, phrases: list[NounPhrase], side: str = "left") -> str:
    verb, noun = words(phrases[0])
    if template == "side":
        return f"there {verb} {noun} in the {side} picture"
    if template == "both":
        return f"there {verb} {noun} in both pictures"
    if template == "only_one":
        return f"there {verb} {noun} in only one picture"
    _, second = words(phrases[1])
    return f"there {verb} {noun} in the left picture and {second} in the right picture"


def _pick(candidates: list[NounPhrase], rng: np.random.Generator) -> NounPhrase | None:
    return candidates[int(rng.integers(len(candidates)))] if candidates else None


def statement(left: Scene, right: Scene, wanted: bool, rng: np.random.Generator) -> tuple[str, bool]:
    """A statement about the pair whose truth is ``wanted`` (see the module docstring for how it is drawn)."""
    for _ in range(_MAX_TRIES):
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        side = "left" if rng.random() < 0.5 else "right"
        if template == "each":
            parts = (True, True) if wanted else [(False, True), (True, False), (False, False)][int(rng.integers(3))]
            phrases = []
            for scene, present in zip((left, right), parts, strict=True):
                kind = KINDS[int(rng.integers(len(KINDS)))]
                phrases.append(_pick([p for p in noun_phrases(kind) if has(scene, p) == present], rng))
            if None in phrases:
                continue
            chosen = [p for p in phrases if p is not None]
        else:
            kind = KINDS[int(rng.integers(len(KINDS)))]
            found = _pick([p for p in noun_phrases(kind) if truth(template, [p], left, right, side) == wanted], rng)
            if found is None:
                continue
            chosen = [found]
        label = truth(template, chosen, left, right, side)
        assert label == wanted
        return render(template, chosen, side), label
    raise RuntimeError("no statement with the wanted label found")  # unreachable: "side" always has both


def pair_statements(records: list[SceneRecord], rng: np.random.Generator) -> list[dict[str, object]]:
    """The entries of one split: each image is the left image of one pair with a random other image, and each pair
    gets a true and a false statement (in random order)."""
    entries: list[dict[str, object]] = []
    count = len(records)
    if count < 2:
        return entries
    for index, record in enumerate(records):
        other = int(rng.integers(count - 1))
        partner = records[other + (other >= index)]
        order = (True, False) if rng.random() < 0.5 else (False, True)
        for wanted in order:
            sentence, label = statement(record.scene, partner.scene, wanted, rng)
            entries.append({"images": [record.image, partner.image], "sentence": sentence, "label": str(label)})
    return entries


def write_task_files(inp: TaskFilesInput) -> dict[str, Path]:
    """Write the NLVR2 files of every split with at least two images; returns ``{file name: path}``."""
    written: dict[str, Path] = {}
    for split, records in inp.records.items():
        if split not in NLVR2_FILES or len(records) < 2:
            continue
        rng = np.random.default_rng([inp.seed, NLVR2_STREAM, SPLITS.index(split)])
        path = inp.root / NLVR2_FILES[split]
        path.write_text(json.dumps(pair_statements(records, rng), indent=1))
        written[path.name] = path
    return written
