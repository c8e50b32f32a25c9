"""Offline synthetic image–caption data in every on-disk layout vlalign reads.

Scenes of one to three coloured shapes with captions naming colour, shape, size, position and relations, so a
tiny model can learn retrieval well above chance without any download. Output layouts: JPEG files, img2dataset-
style WebDataset shards, an ALBEF pre-training JSON, Karpathy-style retrieval JSONs, hard-negative JSONs and a
WordPiece tokenizer.

Hard negatives (``hardneg_val.json``, ``hardneg_test.json``; read by ``vlalign evaluate hardneg``): one entry per
val / test image, ``{"image", "positive", "negatives": [{"type", "caption"}, ...]}``. The positive and every
negative are written from the scene's structured description (:func:`hard_negatives`), never by editing caption
text. A scene with two or more shapes gets the relation template for one pair of them, ``"a red circle to the left
of a blue square"`` (the pair drawn among those of different shapes when there is one); a single shape gets ``"a
red circle on the left"``. Colours are unique within a scene, so a colour names one object and every edit below
makes a caption that is false of the image. Edit types, each written only where it is well defined:

- ``colour_swap``: one object's colour replaced by a colour no object in the scene has (always defined);
- ``shape_swap``: one object's shape replaced by another shape (always defined);
- ``relation_swap``: the relation between the pair reversed, left of <-> right of, above <-> below (two or more
  shapes);
- ``attribute_binding_swap``: the pair's colours exchanged, ``"a blue circle to the left of a red square"`` (two or
  more shapes, the pair of different shapes, so the edit tests which colour goes with which shape).

They come from their own random stream (seeded by the dataset seed and the image key), so adding them changed no
other file, and the same seed writes the same bytes.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from vlalign.data.tokenization import train_wordpiece

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "orange": (245, 130, 20),
    "purple": (130, 40, 170),
    "pink": (250, 120, 190),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: dict[str, float] = {"small": 0.085, "large": 0.14}  # radius as a fraction of the image side
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "centre": (0.5, 0.5),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "grey": (190, 190, 190),
    "cream": (245, 235, 205),
    "noisy": (200, 200, 200),
}
SPLITS: tuple[str, ...] = ("train", "val", "test")
_SUPERSAMPLE = 2
_JPEG_QUALITY = 90
_TAR_MTIME = 0.0  # fixed member timestamps keep shards byte-identical under a seed
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
#: Splits that get a hard-negative file, and the edit types it holds (see the module docstring).
HARDNEG_SPLITS: tuple[str, ...] = ("val", "test")
HARDNEG_TYPES: tuple[str, ...] = ("colour_swap", "shape_swap", "relation_swap", "attribute_binding_swap")
_HARDNEG_STREAM = 0x484E  # second entropy word of the hard-negative generator: a stream apart from the scenes'
_REVERSED_RELATION = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str
    position: str
    x: float  # centre, as a fraction of the image side
    y: float


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class SceneRecord:
    """One written image with the scene it shows: what the downstream-task writers build their files from."""

    key: str
    split: str
    image: str  # path relative to the dataset root, e.g. "images/test/000000042.jpg"
    scene: Scene
    captions: tuple[str, ...]


@dataclass(frozen=True)
class TaskFilesInput:
    """What :func:`write_synthetic` hands each downstream-task writer (:data:`TASK_WRITERS`)."""

    root: Path
    image_size: int
    seed: int
    records: dict[str, list[SceneRecord]]  # split -> the images of that split, in key order


#: Modules whose ``write_task_files(TaskFilesInput) -> dict[str, Path]`` add downstream-task annotation files
#: (VQA, NLVR2, SNLI-VE, grounding) in the public layouts; a module that does not exist is skipped. Each draws from
#: its own random stream, so adding one changes no other file.
TASK_WRITERS: tuple[str, ...] = (
    "vlalign.data.synth_vqa",
    "vlalign.data.synth_nlvr2",
    "vlalign.data.synth_snli_ve",
    "vlalign.data.synth_grounding",
)


@dataclass(frozen=True)
class SynthSummary:
    """Where :func:`write_synthetic` put everything, and how much of it there is."""

    root: Path
    image_root: Path
    shards: dict[str, list[Path]]
    pretrain_json: Path
    retrieval_json: dict[str, Path]
    hardneg_json: dict[str, Path]
    tokenizer_dir: Path
    readme: Path
    num_images: dict[str, int]
    num_captions: dict[str, int]
    image_size: int
    samples_per_shard: int
    task_files: dict[str, Path] = field(default_factory=dict)  # file name -> path, from :data:`TASK_WRITERS`

    def shard_urls(self, split: str) -> str:
        """Brace-expanded shard list for WebDataset, e.g. ``.../train/{000000..000003}.tar``."""
        paths = self.shards[split]
        if not paths:
            raise ValueError(f"split {split!r} has no shards")
        if len(paths) == 1:
            return str(paths[0])
        return str(paths[0].parent / f"{{{paths[0].stem}..{paths[-1].stem}}}.tar")


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw 1–3 shapes with distinct colours at distinct positions on one of four backgrounds."""
    count = int(rng.choice([1, 2, 3], p=[0.25, 0.4, 0.35]))
    colours = rng.choice(len(COLOURS), size=count, replace=False)
    positions = rng.choice(len(POSITIONS), size=count, replace=False)
    colour_names, position_names = list(COLOURS), list(POSITIONS)
    shapes = []
    for colour, position in zip(colours, positions, strict=True):
        cx, cy = POSITIONS[position_names[position]]
        jx, jy = rng.uniform(-0.03, 0.03, size=2)
        shapes.append(
            Shape(
                colour=colour_names[colour],
                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                size=list(SIZES)[int(rng.integers(len(SIZES)))],
                position=position_names[position],
                x=float(cx + jx),
                y=float(cy + jy),
            )
        )
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(background=background, shapes=tuple(shapes))


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the scene supersampled and downsample it, so edges are anti-aliased like a photo's."""
    side = image_size * _SUPERSAMPLE
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    if scene.background == "noisy":
        noise = rng.normal(0.0, 28.0, size=(side, side, 3)).astype(np.float32)
        canvas = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), mode="RGB")
    else:
        canvas = Image.new("RGB", (side, side), tuple(int(v) for v in base))
    draw = ImageDraw.Draw(canvas)
    for item in scene.shapes:
        cx, cy, r = item.x * side, item.y * side, SIZES[item.size] * side
        fill = COLOURS[item.colour]
        if item.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(item.shape, cx, cy, r), fill=fill)
    return canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(item: Shape, with_size: bool) -> str:
    words = [item.size, item.colour, item.shape] if with_size else [item.colour, item.shape]
    return f"{_article(words[0])} {' '.join(words)}"


def _where(item: Shape, rng: np.random.Generator) -> str:
    if item.position == "centre":
        return "in the centre" if rng.random() < 0.5 else "in the middle"
    if item.position in ("left", "right"):
        return f"on the {item.position}"
    return f"at the {item.position}"


def _relation(a: Shape, b: Shape) -> str:
    """How ``a`` sits relative to ``b``, along the axis on which they are further apart."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def caption_scene(scene: Scene, num_captions: int, rng: np.random.Generator) -> list[str]:
    """Up to ``num_captions`` different descriptions of the scene from several templates, in random order."""
    items = list(scene.shapes)
    background = f"on a {scene.background} background"

    def listing() -> str:
        return _join([f"{_noun_phrase(s, True)} {_where(s, rng)}" for s in items])

    def there_is() -> str:
        item = items[int(rng.integers(len(items)))]
        return f"there is {_noun_phrase(item, True)} {_where(item, rng)} {background}"

    def relation() -> str:
        if len(items) == 1:
            item = items[0]
            return f"a single {item.colour} {item.shape} {_where(item, rng)}"
        i, j = rng.choice(len(items), size=2, replace=False)
        a, b = items[int(i)], items[int(j)]
        return f"{_noun_phrase(a, bool(rng.random() < 0.5))} {_relation(a, b)} {_noun_phrase(b, False)}"

    def counting() -> str:
        noun = "shape" if len(items) == 1 else "shapes"
        return f"{_NUMBER_WORDS[len(items)]} {noun} {background} {_join([_noun_phrase(s, False) for s in items])}"

    def picture() -> str:
        return f"a picture of {_join([f'{_noun_phrase(s, False)} {_where(s, rng)}' for s in items])}"

    templates = [listing, there_is, relation, counting, picture]
    order = rng.permutation(len(templates))
    captions: list[str] = []
    for index in order:
        text = templates[int(index)]()
        if text not in captions:
            captions.append(text)
        if len(captions) == num_captions:
            break
    return captions


def hard_negatives(scene: Scene, rng: np.random.Generator) -> tuple[str, list[dict[str, str]]]:
    """A positive caption of ``scene`` and its hard negatives ``[{"type", "caption"}]`` in :data:`HARDNEG_TYPES`
    order, all written from the scene's structure (the module docstring lists the templates and the edit types).

    Every negative is false of the scene: colours are unique within a scene, so a caption that names a colour no
    object has, a colour with a shape its object does not have, or the reversed relation of two objects cannot
    describe it.
    """
    items = list(scene.shapes)
    if len(items) == 1:
        chosen = items
        relation = "in the centre" if items[0].position == "centre" else _where(items[0], rng)
    else:
        pairs = [(i, j) for i in range(len(items)) for j in range(len(items)) if i != j]
        candidates = [(i, j) for i, j in pairs if items[i].shape != items[j].shape] or pairs
        i, j = candidates[int(rng.integers(len(candidates)))]
        chosen = [items[i], items[j]]
        relation = _relation(chosen[0], chosen[1])
    objects = [(item.colour, item.shape) for item in chosen]  # the caption's (colour, shape) of each object

    def caption(described: list[tuple[str, str]], rel: str = relation) -> str:
        """``"a red circle on the left"`` (one object) or ``"a red circle <rel> a blue square"`` (two)."""
        first = f"{_article(described[0][0])} {described[0][0]} {described[0][1]} {rel}"
        if len(described) == 1:
            return first
        return f"{first} {_article(described[1][0])} {described[1][0]} {described[1][1]}"

    def replaced(index: int, colour: str | None = None, shape: str | None = None) -> list[tuple[str, str]]:
        out = list(objects)
        out[index] = (colour or out[index][0], shape or out[index][1])
        return out

    free_colours = [colour for colour in COLOURS if colour not in {item.colour for item in items}]
    target = int(rng.integers(len(objects)))
    colour = free_colours[int(rng.integers(len(free_colours)))]
    negatives = [{"type": "colour_swap", "caption": caption(replaced(target, colour=colour))}]
    target = int(rng.integers(len(objects)))
    other_shapes = [shape for shape in SHAPES if shape != objects[target][1]]
    shape = other_shapes[int(rng.integers(len(other_shapes)))]
    negatives.append({"type": "shape_swap", "caption": caption(replaced(target, shape=shape))})
    if len(objects) == 2:
        negatives.append({"type": "relation_swap", "caption": caption(objects, _REVERSED_RELATION[relation])})
        (colour_a, shape_a), (colour_b, shape_b) = objects
        if shape_a != shape_b:
            swapped = [(colour_b, shape_a), (colour_a, shape_b)]
            negatives.append({"type": "attribute_binding_swap", "caption": caption(swapped)})
    return caption(objects), negatives


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


def _clear(directory: Path, pattern: str) -> None:
    """Remove stale outputs of an earlier, larger run so the directory holds exactly this run's files."""
    for stale in directory.glob(pattern):
        stale.unlink()


_README = """Synthetic image-caption data written by vlalign.data.synth.write_synthetic (seed {seed}).

Scenes: 1-3 coloured shapes (circle, square, triangle, star; 8 colours; small/large) at left/right/top/bottom/centre
on a white, grey, cream or noisy background. Each image has {captions_per_image} captions from different templates.

Layout
  images/{{train,val,test}}/KEY.jpg   {image_size}x{image_size} JPEG files; KEY is a 9-digit id unique across splits
  shards/{{train,val,test}}/NNNNNN.tar WebDataset shards (img2dataset layout, <= {samples_per_shard} samples each):
                                      KEY.jpg, KEY.txt (first caption),
                                      KEY.json {{"key", "caption", "captions", "width", "height", "split"}}
  pretrain.json                       ALBEF pre-training list [{{"image": absolute path, "caption": [...]}}] (train)
  retrieval_train.json                one entry per caption {{"image": "images/train/KEY.jpg", "caption", "image_id": KEY}}
  retrieval_val.json, retrieval_test.json
                                      one entry per image {{"image": "images/val/KEY.jpg", "caption": [...]}}
                                      (image paths are relative to this directory, the data modules' default root)
  hardneg_val.json, hardneg_test.json one entry per image {{"image": "images/test/KEY.jpg", "positive": caption,
                                      "negatives": [{{"type", "caption"}}, ...]}}: captions edited from the scene
                                      (colour_swap, shape_swap, relation_swap, attribute_binding_swap), each false
                                      of the image (`vlalign evaluate hardneg` reads them)
  vqa_{{train,val,test}}.json           VQA v2 layout, 3 questions per image (`vlalign finetune vqa`):
                                      [{{"question_id", "question", "answer": [10 human answers], "image",
                                      "dataset": "vqa", "question_type", "answer_type"}}]; every split has answers
  answer_list.json                    every answer a question can have, the most frequent training answers first
  nlvr2_{{train,dev,test}}.json         (dev: val images) each image paired with another of its split, one true and
                                      one false statement per pair (`vlalign finetune nlvr2`):
                                      [{{"images": [left, right], "sentence", "label": "True" | "False"}}]
  snli_ve_{{train,dev,test}}.json       (dev: val images) one hypothesis of each class per image (`vlalign finetune
                                      snli_ve`): [{{"image": "images/<split>/KEY" (no .jpg), "sentence", "label":
                                      "entailment" | "neutral" | "contradiction"}}]
  grounding_train.json                one referring expression per shape, no boxes: [{{"image", "text", "ref_id"}}]
  grounding_{{val,testA,testB}}.json    [{{"ref_id", "image", "text", "bbox": [x, y, w, h] (pixels), "image_id",
                                      "split"}}]; testA: test images with 1-2 shapes, testB: with 3
  grounding_dets.json                 {{"<image_id>": [[x, y, w, h], ...]}}: 4-8 proposals per val / test image,
                                      the true boxes among them (`vlalign finetune grounding`)
  tokenizer/                          lower-casing WordPiece tokenizer trained on the train captions (HF format)

Counts: {counts}
"""


def write_synthetic(
    out: str | Path,
    num_train: int = 2000,
    num_val: int = 200,
    num_test: int = 200,
    image_size: int = 128,
    captions_per_image: int = 3,
    samples_per_shard: int = 500,
    tokenizer_vocab_size: int = 600,
    seed: int = 0,
    progress: bool = True,
) -> SynthSummary:
    """Write a deterministic synthetic dataset under ``out`` in all supported layouts (see README.txt there)."""
    if num_train < 1 or num_val < 0 or num_test < 0:
        raise ValueError("need num_train >= 1 and non-negative num_val / num_test")
    if not 1 <= captions_per_image <= 5:
        raise ValueError(f"captions_per_image must be in [1, 5] (five templates), got {captions_per_image}")
    if samples_per_shard < 1 or image_size < 8:
        raise ValueError("need samples_per_shard >= 1 and image_size >= 8")
    root = Path(out).expanduser().resolve()
    image_root = root / "images"
    rng = np.random.default_rng(seed)
    counts = dict(zip(SPLITS, (num_train, num_val, num_test), strict=True))
    shards: dict[str, list[Path]] = {}
    records: dict[str, list[tuple[str, list[str]]]] = {}
    scenes: dict[str, list[Scene]] = {split: [] for split in SPLITS}
    next_key = 0
    with tqdm(total=sum(counts.values()), desc="synthetic data", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            image_dir, shard_dir = image_root / split, root / "shards" / split
            image_dir.mkdir(parents=True, exist_ok=True)
            shard_dir.mkdir(parents=True, exist_ok=True)
            _clear(image_dir, "*.jpg")
            _clear(shard_dir, "*.tar")
            shards[split], records[split] = [], []
            tar: wds.TarWriter | None = None
            for index in range(counts[split]):
                if index % samples_per_shard == 0:
                    if tar is not None:
                        tar.close()
                    shards[split].append(shard_dir / f"{index // samples_per_shard:06d}.tar")
                    tar = wds.TarWriter(str(shards[split][-1]), encoder=False, mtime=_TAR_MTIME)
                assert tar is not None
                key = f"{next_key:09d}"
                next_key += 1
                scene = sample_scene(rng)
                captions = caption_scene(scene, captions_per_image, rng)
                jpeg = _jpeg_bytes(render_scene(scene, image_size, rng))
                (image_dir / f"{key}.jpg").write_bytes(jpeg)
                meta = {
                    "key": key,
                    "caption": captions[0],
                    "captions": captions,
                    "width": image_size,
                    "height": image_size,
                    "split": split,
                }
                tar.write(
                    {
                        "__key__": key,
                        "jpg": jpeg,
                        "txt": captions[0].encode("utf-8"),
                        "json": json.dumps(meta).encode("utf-8"),
                    }
                )
                records[split].append((key, captions))
                scenes[split].append(scene)
                bar.update(1)
            if tar is not None:
                tar.close()

    pretrain_json = root / "pretrain.json"
    pretrain = [{"image": str(image_root / "train" / f"{key}.jpg"), "caption": caps} for key, caps in records["train"]]
    pretrain_json.write_text(json.dumps(pretrain, indent=1))
    retrieval_json = {split: root / f"retrieval_{split}.json" for split in SPLITS}
    retrieval_train = [
        {"image": f"images/train/{key}.jpg", "caption": caption, "image_id": key}
        for key, caps in records["train"]
        for caption in caps
    ]
    retrieval_json["train"].write_text(json.dumps(retrieval_train, indent=1))
    for split in ("val", "test"):
        entries = [{"image": f"images/{split}/{key}.jpg", "caption": caps} for key, caps in records[split]]
        retrieval_json[split].write_text(json.dumps(entries, indent=1))
    hardneg_json = {split: root / f"hardneg_{split}.json" for split in HARDNEG_SPLITS}
    for split in HARDNEG_SPLITS:
        hardneg = []
        for (key, _), scene in zip(records[split], scenes[split], strict=True):
            positive, negatives = hard_negatives(scene, np.random.default_rng([seed, _HARDNEG_STREAM, int(key)]))
            hardneg.append({"image": f"images/{split}/{key}.jpg", "positive": positive, "negatives": negatives})
        hardneg_json[split].write_text(json.dumps(hardneg, indent=1))

    task_input = TaskFilesInput(
        root=root,
        image_size=image_size,
        seed=seed,
        records={
            split: [
                SceneRecord(key, split, f"images/{split}/{key}.jpg", scene, tuple(caps))
                for (key, caps), scene in zip(records[split], scenes[split], strict=True)
            ]
            for split in SPLITS
        },
    )
    task_files: dict[str, Path] = {}
    for module in TASK_WRITERS:
        if importlib.util.find_spec(module) is not None:
            task_files.update(importlib.import_module(module).write_task_files(task_input))

    train_captions = [caption for _, caps in records["train"] for caption in caps]
    tokenizer_dir = train_wordpiece(train_captions, root / "tokenizer", vocab_size=tokenizer_vocab_size)
    num_captions = {split: sum(len(caps) for _, caps in records[split]) for split in SPLITS}
    readme = root / "README.txt"
    readme.write_text(
        _README.format(
            seed=seed,
            captions_per_image=captions_per_image,
            image_size=image_size,
            samples_per_shard=samples_per_shard,
            counts=", ".join(f"{s} {counts[s]} images / {num_captions[s]} captions" for s in SPLITS),
        )
    )
    return SynthSummary(
        root=root,
        image_root=image_root,
        shards=shards,
        pretrain_json=pretrain_json,
        retrieval_json=retrieval_json,
        hardneg_json=hardneg_json,
        tokenizer_dir=tokenizer_dir,
        readme=readme,
        num_images=counts,
        num_captions=num_captions,
        image_size=image_size,
        samples_per_shard=samples_per_shard,
        task_files=task_files,
    )
