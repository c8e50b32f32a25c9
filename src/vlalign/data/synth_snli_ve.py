"""Synthetic SNLI-VE files for the synthetic scenes, in the layout ALBEF / SIMLA read (``vlalign finetune snli_ve``).

:func:`write_task_files` (called by :func:`vlalign.data.synth.write_synthetic` for every split) writes
``snli_ve_train.json``, ``snli_ve_dev.json`` (the val images) and ``snli_ve_test.json``:
``[{"image": "images/<split>/KEY", "sentence": hypothesis, "label": "entailment" | "neutral" | "contradiction"}]``.
As in the reference files, ``image`` names the image without its ``.jpg`` suffix (the data module appends
``data.image_suffix``), relative to the data folder.

Every image (the premise) gets three hypotheses, one of each class, in random order, so the classes are balanced:

- **entailment**, true of the scene: ``there is a small red circle`` / ``a red shape`` / ``a circle``, ``a red circle
  on the left`` (its position), ``there are two shapes`` (the exact count), ``a red circle to the left of a blue
  square`` (the relation of two shapes, as the captions state it);
- **contradiction**, false of the scene: half of them the same templates with a shape the scene does not have, a
  wrong position, a wrong count or the reversed relation; the other half ``there is a green star made of wood``
  about a shape the scene does not have;
- **neutral**, undecidable from the scene: ``there is a red circle made of wood`` about a shape it has (the generator
  draws no material, so the picture cannot tell).

So the ``made of`` phrase alone does not give the class (it is neutral or a contradiction depending on the picture);
a model reading only the hypothesis can reach 66.7% at best (neutral vs contradiction for ``made of``, entailment vs
contradiction otherwise, each decided by its more frequent class), chance is 33.3%. Words: the caption vocabulary
plus ``made``, ``wood``, ``paper``, ``glass``, ``metal``, ``are`` (sub-word pieces of the caption-trained tokenizer).

Drawn from its own random stream per image (``numpy.random.default_rng([seed, 0x5645, int(key)])``), so the other
files of the synthetic data are unchanged and the same seed writes the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlalign.data.synth import COLOURS, POSITIONS, SHAPES, SIZES, Scene, SceneRecord, Shape, TaskFilesInput

__all__ = ["CLASSES", "MATERIALS", "SNLI_VE_FILES", "SNLI_VE_STREAM", "hypotheses", "write_task_files"]

#: Second entropy word of the SNLI-VE generator: a stream apart from the scenes' and the other task writers'.
SNLI_VE_STREAM = 0x5645
SNLI_VE_FILES: dict[str, str] = {"train": "snli_ve_train.json", "val": "snli_ve_dev.json", "test": "snli_ve_test.json"}
CLASSES: tuple[str, ...] = ("entailment", "neutral", "contradiction")
MATERIALS: tuple[str, ...] = ("wood", "paper", "glass", "metal")
_WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
_COUNTS = {1: "there is one shape", 2: "there are two shapes", 3: "there are three shapes"}
_REVERSED = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
#: ``(size or None, colour or None, shape or None)``: what a phrase names.
Thing = tuple[str | None, str | None, str | None]


def _article(text: str) -> str:
    return f"{'an' if text[0] in 'aeiou' else 'a'} {text}"


def phrase(thing: Thing) -> str:
    """``a small red circle``, ``a red circle``, ``a red shape``, ``a circle``."""
    size, colour, shape = thing
    return _article(" ".join(w for w in (size, colour, shape or "shape") if w))


def matches(item: Shape, thing: Thing) -> bool:
    size, colour, shape = thing
    return (size in (None, item.size)) and (colour in (None, item.colour)) and (shape in (None, item.shape))


def present(scene: Scene, thing: Thing) -> bool:
    return any(matches(item, thing) for item in scene.shapes)


def _things(rng: np.random.Generator) -> list[Thing]:
    """All phrases of one kind, the kind drawn at random: size+colour+shape, colour+shape, colour, shape."""
    kind = int(rng.integers(4))
    sizes, colours, shapes = list(SIZES), list(COLOURS), list(SHAPES)
    if kind == 0:
        return [(s, c, h) for s in sizes for c in colours for h in shapes]
    if kind == 1:
        return [(None, c, h) for c in colours for h in shapes]
    if kind == 2:
        return [(None, c, None) for c in colours]
    return [(None, None, h) for h in shapes]


def _pick(options: list, rng: np.random.Generator):  # noqa: ANN202 - any element type
    return options[int(rng.integers(len(options)))]


def relation(a: Shape, b: Shape) -> str:
    """How ``a`` sits relative to ``b`` along the axis on which they are further apart (the captions' rule)."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _there(scene: Scene, wanted: bool, rng: np.random.Generator, suffix: str = "") -> str:
    while True:
        options = [t for t in _things(rng) if present(scene, t) == wanted]
        if options:
            return f"there is {phrase(_pick(options, rng))}{suffix}"


def entailment(scene: Scene, rng: np.random.Generator) -> str:
    items = list(scene.shapes)
    template = int(rng.integers(4 if len(items) > 1 else 3))
    if template == 0:
        return _there(scene, True, rng)
    if template == 1:
        item = _pick(items, rng)
        return f"{phrase((None, item.colour, item.shape))} {_WHERE[item.position]}"
    if template == 2:
        return _COUNTS[len(items)]
    a, b = (items[int(i)] for i in rng.choice(len(items), size=2, replace=False))
    return f"{phrase((None, a.colour, a.shape))} {relation(a, b)} {phrase((None, b.colour, b.shape))}"


def contradiction(scene: Scene, rng: np.random.Generator) -> str:
    items = list(scene.shapes)
    if rng.random() < 0.5:
        return _there(scene, False, rng, f" made of {_pick(list(MATERIALS), rng)}")
    template = int(rng.integers(4 if len(items) > 1 else 3))
    if template == 0:
        return _there(scene, False, rng)
    if template == 1:
        item = _pick(items, rng)
        wrong = _pick([p for p in POSITIONS if p != item.position], rng)
        return f"{phrase((None, item.colour, item.shape))} {_WHERE[wrong]}"
    if template == 2:
        return _COUNTS[_pick([n for n in _COUNTS if n != len(items)], rng)]
    a, b = (items[int(i)] for i in rng.choice(len(items), size=2, replace=False))
    reversed_relation = _REVERSED[relation(a, b)]
    return f"{phrase((None, a.colour, a.shape))} {reversed_relation} {phrase((None, b.colour, b.shape))}"


def neutral(scene: Scene, rng: np.random.Generator) -> str:
    return _there(scene, True, rng, f" made of {_pick(list(MATERIALS), rng)}")


def hypotheses(record: SceneRecord, seed: int) -> list[dict[str, str]]:
    """The three entries of one image, one per class, in random order."""
    rng = np.random.default_rng([seed, SNLI_VE_STREAM, int(record.key)])
    writers = {"entailment": entailment, "neutral": neutral, "contradiction": contradiction}
    image = record.image.removesuffix(".jpg")
    return [
        {"image": image, "sentence": writers[CLASSES[int(k)]](record.scene, rng), "label": CLASSES[int(k)]}
        for k in rng.permutation(len(CLASSES))
    ]


def write_task_files(inp: TaskFilesInput) -> dict[str, Path]:
    """Write the SNLI-VE files of every split that has images; returns ``{file name: path}``."""
    written: dict[str, Path] = {}
    for split, records in inp.records.items():
        if split not in SNLI_VE_FILES or not records:
            continue
        path = inp.root / SNLI_VE_FILES[split]
        entries = [entry for record in records for entry in hypotheses(record, inp.seed)]
        path.write_text(json.dumps(entries, indent=1))
        written[path.name] = path
    return written
