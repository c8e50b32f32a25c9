"""Pictures of evaluation results, drawn with PIL (no display needed): retrieval top-5 grids and hard-negative failures.

Both functions return a ``PIL.Image`` in RGB; the caller saves it (``image.save("grid.png")``) or logs it to
TensorBoard (``np.asarray(image)`` with ``dataformats="HWC"``). Layout helpers (:func:`grid_box`) are public so a
test can find a thumbnail and its outline.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import Tensor

PictureInput = Image.Image | str | Path

PAD = 10  # space around every thumbnail; outlines are drawn inside it
HEADER = 22  # height of the column titles
TRUE_OUTLINE = 4  # px
OTHER_OUTLINE = 1  # px
GREEN = (0, 170, 0)
GREY = (160, 160, 160)
RED = (200, 30, 30)
TEXT = (20, 20, 20)
BACKGROUND = (255, 255, 255)
TOP = 5  # retrieved images per row
_FONT_SIZE = 13


@functools.lru_cache(maxsize=4)
def _font(size: int = _FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font has one size
        return ImageFont.load_default()


def _thumbnail(image: PictureInput, size: int) -> Image.Image:
    """``image`` (PIL, or a path) fitted into a ``size`` square, letterboxed on the background colour."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            picture = opened.convert("RGB")
    else:
        picture = image.convert("RGB")
    return ImageOps.pad(picture, (size, size), color=BACKGROUND)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word longer than the width gets a line of its own)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    return lines or [""]


def _text_block(
    draw: ImageDraw.ImageDraw,
    xy: tuple[int, int],
    text: str,
    width: int,
    height: int,
    fill: tuple[int, int, int] = TEXT,
) -> int:
    """Draw wrapped ``text`` from ``xy`` within ``width`` × ``height`` (lines that do not fit end in "…");
    returns the y below the last line."""
    font = _font()
    line_height = _FONT_SIZE + 4
    lines = _wrap(draw, text, font, width)
    fit = max(1, height // line_height)
    if len(lines) > fit:
        lines = [*lines[: fit - 1], lines[fit - 1] + " …"]
    x, y = xy
    for line in lines:
        draw.text((x, y), line, fill=fill, font=font)
        y += line_height
    return y


def grid_box(row: int, column: int, thumb: int = 128, text_width: int = 240) -> tuple[int, int, int, int]:
    """Pixel box ``(left, top, right, bottom)`` (right/bottom exclusive) of the thumbnail in ``row``, ``column`` of a
    :func:`retrieval_grid` (columns 0-4: the top 5; column 5: the true image when it was not retrieved)."""
    left = text_width + PAD + column * (thumb + PAD)
    top = HEADER + PAD + row * (thumb + PAD)
    return left, top, left + thumb, top + thumb


def _outline(
    draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], width: int, colour: tuple[int, int, int]
) -> None:
    """A ``width``-px frame just outside ``box``."""
    left, top, right, bottom = box
    draw.rectangle((left - width, top - width, right - 1 + width, bottom - 1 + width), outline=colour, width=width)


def retrieval_grid(
    queries: Sequence[str],
    images: Sequence[PictureInput],
    topk_indices: Tensor | Sequence[Sequence[int]],
    true_index: Tensor | Sequence[int],
    *,
    thumb: int = 128,
    text_width: int = 240,
) -> Image.Image:
    """Text-to-image retrieval results: one row per query, its text then its top-5 images, best first.

    Args:
        queries: [Q] caption texts.
        images: the gallery, PIL images or paths; ``topk_indices`` and ``true_index`` index it.
        topk_indices: [Q, 5] gallery indices of each query's five best images.
        true_index: [Q] gallery index of each query's true image.
        thumb: thumbnail side in pixels; text_width: width of the text column.

    The true image is outlined in green (4 px) where it was retrieved, the other images in thin grey (1 px); when
    it is not among the five it is shown in a sixth column ("true (missed)"), outlined in green. Image size: ``(text_width + PAD + 6 × (thumb + PAD), HEADER + PAD + Q × (thumb + PAD))``.
    """
    top = [list(map(int, row)) for row in (topk_indices.tolist() if isinstance(topk_indices, Tensor) else topk_indices)]
    truth = [int(i) for i in (true_index.tolist() if isinstance(true_index, Tensor) else true_index)]
    if not queries:
        raise ValueError("retrieval_grid needs at least one query")
    if len(top) != len(queries) or len(truth) != len(queries) or any(len(row) != TOP for row in top):
        raise ValueError(f"need topk_indices [{len(queries)}, {TOP}] and true_index [{len(queries)}]")
    used = {i for row in top for i in row} | set(truth)
    if min(used) < 0 or max(used) >= len(images):
        raise ValueError(f"topk_indices / true_index must index the {len(images)} gallery images")
    width = text_width + PAD + (TOP + 1) * (thumb + PAD)
    height = HEADER + PAD + len(queries) * (thumb + PAD)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    draw.text((PAD, 4), "query", fill=TEXT, font=font)
    for column in range(TOP):
        draw.text((grid_box(0, column, thumb, text_width)[0], 4), f"rank {column + 1}", fill=TEXT, font=font)
    draw.text((grid_box(0, TOP, thumb, text_width)[0], 4), "true (missed)", fill=GREEN, font=font)
    cache: dict[int, Image.Image] = {}

    def picture(index: int) -> Image.Image:
        if index not in cache:
            cache[index] = _thumbnail(images[index], thumb)
        return cache[index]

    for row, (query, retrieved, true) in enumerate(zip(queries, top, truth, strict=True)):
        _, row_top, _, _ = grid_box(row, 0, thumb, text_width)
        _text_block(draw, (PAD, row_top), query, text_width - PAD, thumb)
        for column, index in enumerate(retrieved):
            box = grid_box(row, column, thumb, text_width)
            canvas.paste(picture(index), box[:2])
            hit = index == true
            _outline(draw, box, TRUE_OUTLINE if hit else OTHER_OUTLINE, GREEN if hit else GREY)
        if true not in retrieved:
            box = grid_box(row, TOP, thumb, text_width)
            canvas.paste(picture(true), box[:2])
            _outline(draw, box, TRUE_OUTLINE, GREEN)
    return canvas


def failure_box(row: int, thumb: int = 128) -> tuple[int, int, int, int]:
    """Pixel box of the image in ``row`` of a :func:`hardneg_failures` picture."""
    top = HEADER + PAD + row * (thumb + PAD)
    return PAD, top, PAD + thumb, top + thumb


def hardneg_failures(
    images: Sequence[PictureInput],
    positives: Sequence[str],
    negatives_preferred: Sequence[str],
    scores: Tensor | Sequence[tuple[float, float]],
    *,
    types: Sequence[str] | None = None,
    scorer: str = "",
    thumb: int = 128,
    text_width: int = 420,
) -> Image.Image:
    """Hard-negative failures: one row per failure, the image, its positive caption and score (green) and the negative
    the model preferred and its score (red).

    Args:
        images: [F] the failing examples' images (PIL or paths).
        positives / negatives_preferred: [F] caption texts.
        scores: [F, 2] ``(positive score, preferred negative's score)``.
        types: [F] the preferred negative's edit type, shown next to it.
        scorer: a title word, e.g. ``"ITM"``.

    Image size: ``(PAD + thumb + PAD + text_width + PAD, HEADER + PAD + F × (thumb + PAD))``. Pick the failures with
    :func:`vlalign.evaluation.hardneg.select_failures`.
    """
    rows = [(float(p), float(n)) for p, n in (scores.tolist() if isinstance(scores, Tensor) else scores)]
    count = len(images)
    if count == 0:
        raise ValueError("hardneg_failures needs at least one failure")
    if not len(positives) == len(negatives_preferred) == len(rows) == count or (types and len(types) != count):
        raise ValueError("images, positives, negatives_preferred, scores (and types) must have one entry per failure")
    width = PAD + thumb + PAD + text_width + PAD
    height = HEADER + PAD + count * (thumb + PAD)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    title = f"{scorer} hard-negative failures" if scorer else "hard-negative failures"
    draw.text((PAD, 4), f"{title}: the model scored the red caption at or above the green one", fill=TEXT, font=_font())
    for row in range(count):
        box = failure_box(row, thumb)
        canvas.paste(_thumbnail(images[row], thumb), box[:2])
        _outline(draw, box, OTHER_OUTLINE, GREY)
        x, half = box[2] + PAD, thumb // 2
        positive, negative = rows[row]
        kind = f" [{types[row]}]" if types else ""
        y = _text_block(draw, (x, box[1]), f"positive ({positive:.3f}): {positives[row]}", text_width, half, GREEN)
        text = f"preferred negative{kind} ({negative:.3f}): {negatives_preferred[row]}"
        _text_block(draw, (x, max(y, box[1] + half)), text, text_width, half, RED)
    return canvas
