"""Synthetic weakly-supervised grounding files (RefCOCO+ layout with proposals) for ``vlalign data synth``'s images.

One referring expression per shape of every image, written from the scene's structure, never from caption text,
with the words the captions use: ``"the red circle"``, ``"the small blue square"``, ``"the green star on the
left"``, ``"the large pink triangle at the top"``, ``"the red circle to the left of the blue square"``. Colours are
unique within a scene, so every template names exactly one shape. The true box is the shape's bounding box from the
scene geometry (the drawn circle or polygon), in image pixels ``[x, y, w, h]``.

Files (image paths relative to the dataset root, as the other lists):

- ``grounding_train.json``: ``[{"image", "text", "ref_id"}]``, the expressions of every train image (no boxes:
  training is weakly supervised);
- ``grounding_val.json``, ``grounding_testA.json``, ``grounding_testB.json``: ``[{"ref_id", "image", "text",
  "bbox", "image_id", "split"}]``. Split mapping: ``val`` holds the expressions of the synthetic val images;
  ``testA`` those of the test images with one or two shapes, ``testB`` those of the test images with three shapes
  (more distractors, as RefCOCO+'s testB holds the harder object images); the two hold about as many expressions;
- ``grounding_dets.json``: ``{"<image_id>": [[x, y, w, h], ...]}`` for every val and test image (``image_id``: the
  image key as an integer): the box of every shape, one jittered copy of each (shifted by up to 35% and scaled by
  0.6-1.6 per side, clipped to the image) and two random boxes, shuffled; so 4-8 proposals per image, and the true
  box is always among them.

Everything comes from its own random stream per image (seeded by the dataset seed, :data:`_GROUNDING_STREAM` and
the image key), so adding these files changed no other file and the same seed writes the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlalign.data.synth import SIZES, SceneRecord, Shape, TaskFilesInput, _polygon, _relation, _where

__all__ = [
    "GROUNDING_FILES",
    "JITTERED_PER_SHAPE",
    "RANDOM_BOXES",
    "expression",
    "proposals",
    "shape_box",
    "write_task_files",
]

_GROUNDING_STREAM = 0x4752  # second entropy word of the grounding generator: a stream apart from the scenes'
#: Proposals per image besides the shapes' own boxes.
JITTERED_PER_SHAPE = 1
RANDOM_BOXES = 2
#: The files written, by role.
GROUNDING_FILES = {
    "train": "grounding_train.json",
    "val": "grounding_val.json",
    "testA": "grounding_testA.json",
    "testB": "grounding_testB.json",
    "dets": "grounding_dets.json",
}


def shape_box(item: Shape, image_size: int) -> list[float]:
    """The drawn shape's bounding box ``[x, y, w, h]`` in pixels of an ``image_size`` image (2 decimals)."""
    cx, cy, r = item.x * image_size, item.y * image_size, SIZES[item.size] * image_size
    if item.shape == "circle":
        left, top, right, bottom = cx - r, cy - r, cx + r, cy + r
    else:
        xs, ys = zip(*_polygon(item.shape, cx, cy, r), strict=True)
        left, top, right, bottom = min(xs), min(ys), max(xs), max(ys)
    return [round(left, 2), round(top, 2), round(right - left, 2), round(bottom - top, 2)]


def expression(item: Shape, others: list[Shape], rng: np.random.Generator) -> str:
    """A referring expression for ``item`` among ``others`` (the rest of its scene), from one of five templates."""
    name = f"{item.colour} {item.shape}"
    templates = ["plain", "size", "where", "size_where"] + (["relation"] if others else [])
    kind = templates[int(rng.integers(len(templates)))]
    if kind == "plain":
        return f"the {name}"
    if kind == "size":
        return f"the {item.size} {name}"
    if kind == "where":
        return f"the {name} {_where(item, rng)}"
    if kind == "size_where":
        return f"the {item.size} {name} {_where(item, rng)}"
    other = others[int(rng.integers(len(others)))]
    return f"the {name} {_relation(item, other)} the {other.colour} {other.shape}"


def proposals(boxes: list[list[float]], image_size: int, rng: np.random.Generator) -> list[list[float]]:
    """The shapes' ``boxes``, a jittered copy of each and :data:`RANDOM_BOXES` random boxes, shuffled."""
    out = [list(box) for box in boxes]
    for x, y, w, h in boxes:
        for _ in range(JITTERED_PER_SHAPE):
            dx, dy = rng.uniform(-0.35, 0.35, size=2)
            sx, sy = rng.uniform(0.6, 1.6, size=2)
            nw, nh = w * sx, h * sy
            left = x + w / 2 + dx * w - nw / 2
            top = y + h / 2 + dy * h - nh / 2
            out.append(_clipped(left, top, nw, nh, image_size))
    for _ in range(RANDOM_BOXES):
        w, h = rng.uniform(0.1, 0.5, size=2) * image_size
        left, top = rng.uniform(0, image_size - w), rng.uniform(0, image_size - h)
        out.append(_clipped(left, top, w, h, image_size))
    order = rng.permutation(len(out))
    return [out[int(i)] for i in order]


def _clipped(left: float, top: float, width: float, height: float, side: int) -> list[float]:
    x0, y0 = max(0.0, left), max(0.0, top)
    x1, y1 = min(float(side), left + width), min(float(side), top + height)
    return [round(x0, 2), round(y0, 2), round(max(x1 - x0, 1.0), 2), round(max(y1 - y0, 1.0), 2)]


def _image_entries(record: SceneRecord, seed: int, image_size: int) -> tuple[list[dict], list[list[float]]]:
    """``(expression entries without ref ids, proposals)`` of one image."""
    rng = np.random.default_rng([seed, _GROUNDING_STREAM, int(record.key)])
    shapes = list(record.scene.shapes)
    boxes = [shape_box(item, image_size) for item in shapes]
    entries = []
    for position, (item, box) in enumerate(zip(shapes, boxes, strict=True)):
        others = shapes[:position] + shapes[position + 1 :]
        entries.append({"image": record.image, "text": expression(item, others, rng), "bbox": box})
    return entries, proposals(boxes, image_size, rng)


def _eval_split(record: SceneRecord) -> str:
    if record.split == "val":
        return "val"
    return "testA" if len(record.scene.shapes) <= 2 else "testB"


def write_task_files(inp: TaskFilesInput) -> dict[str, Path]:
    """Write the grounding files (module docstring) under ``inp.root``; returns file name -> path."""
    root = Path(inp.root)
    ref_id = 0
    train: list[dict] = []
    for record in inp.records.get("train", []):
        entries, _ = _image_entries(record, inp.seed, inp.image_size)
        for entry in entries:
            train.append({"image": entry["image"], "text": entry["text"], "ref_id": ref_id})
            ref_id += 1
    evaluation: dict[str, list[dict]] = {"val": [], "testA": [], "testB": []}
    dets: dict[str, list[list[float]]] = {}
    for split in ("val", "test"):
        for record in inp.records.get(split, []):
            entries, boxes = _image_entries(record, inp.seed, inp.image_size)
            image_id = int(record.key)
            name = _eval_split(record)
            dets[str(image_id)] = boxes
            for entry in entries:
                evaluation[name].append(
                    {
                        "ref_id": ref_id,
                        "image": entry["image"],
                        "text": entry["text"],
                        "bbox": entry["bbox"],
                        "image_id": image_id,
                        "split": name,
                    }
                )
                ref_id += 1
    written: dict[str, Path] = {}
    for role, content in (("train", train), *evaluation.items(), ("dets", dets)):
        path = root / GROUNDING_FILES[role]
        path.write_text(json.dumps(content, indent=1))
        written[path.name] = path
    return written
