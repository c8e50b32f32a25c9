"""Evaluation pictures: sizes, the true image outlined in green, thin grey outlines elsewhere, paths and PIL inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlalign.evaluation.pictures import (
    BACKGROUND,
    GREEN,
    GREY,
    HEADER,
    PAD,
    TOP,
    failure_box,
    grid_box,
    hardneg_failures,
    retrieval_grid,
)

COLOURS = [(200, 40, 40), (40, 40, 200), (240, 200, 0), (120, 0, 120), (0, 120, 120), (90, 60, 30), (250, 130, 0)]


def _gallery(tmp_path: Path) -> list:
    images: list = [Image.new("RGB", (40, 30), colour) for colour in COLOURS]
    path = tmp_path / "six.png"
    images[6].save(path)
    images[6] = path  # a path works too
    return images


def test_retrieval_grid_size_and_outlines(tmp_path: Path) -> None:
    thumb, text_width = 48, 120
    queries = ["a red square", "a long query " * 8]  # the second wraps and is cut to the row height
    topk = torch.tensor([[1, 0, 2, 3, 4], [0, 1, 2, 3, 4]])
    true = torch.tensor([0, 6])  # row 0: retrieved at rank 2; row 1: missed (shown in the sixth column)
    grid = retrieval_grid(queries, _gallery(tmp_path), topk, true, thumb=thumb, text_width=text_width)
    assert grid.mode == "RGB"
    assert grid.size == (text_width + PAD + (TOP + 1) * (thumb + PAD), HEADER + PAD + 2 * (thumb + PAD))

    def border(box: tuple[int, int, int, int], offset: int) -> tuple[int, int, int]:
        """Pixel ``offset`` px left of the box, at half height."""
        return grid.getpixel((box[0] - offset, (box[1] + box[3]) // 2))

    hit = grid_box(0, 1, thumb, text_width)
    assert border(hit, 1) == GREEN and border(hit, 4) == GREEN  # 4 px green frame
    assert grid.getpixel(((hit[0] + hit[2]) // 2, (hit[1] + hit[3]) // 2)) == COLOURS[0]  # the true image inside
    assert grid.getpixel((hit[0] + thumb // 2, hit[1] - 3)) == GREEN  # top edge too
    for column in (0, 2, 3, 4):
        other = grid_box(0, column, thumb, text_width)
        assert border(other, 1) == GREY and border(other, 3) == BACKGROUND  # thin grey only
    assert grid.getpixel((grid_box(0, 0, thumb, text_width)[0] + thumb // 2, hit[1] + thumb // 2)) == COLOURS[1]
    assert border(grid_box(0, TOP, thumb, text_width), 2) == BACKGROUND  # retrieved: nothing in the sixth column
    missed = grid_box(1, TOP, thumb, text_width)
    assert border(missed, 2) == GREEN
    assert grid.getpixel(((missed[0] + missed[2]) // 2, (missed[1] + missed[3]) // 2)) == COLOURS[6]
    for column in range(TOP):
        assert border(grid_box(1, column, thumb, text_width), 1) == GREY


def test_retrieval_grid_rejects_bad_shapes(tmp_path: Path) -> None:
    gallery = _gallery(tmp_path)
    with pytest.raises(ValueError, match="topk_indices"):
        retrieval_grid(["q"], gallery, [[0, 1, 2]], [0])
    with pytest.raises(ValueError, match="gallery"):
        retrieval_grid(["q"], gallery, [[0, 1, 2, 3, 9]], [0])
    with pytest.raises(ValueError, match="at least one"):
        retrieval_grid([], gallery, [], [])


def test_hardneg_failures_picture() -> None:
    thumb, text_width = 40, 300
    images = [Image.new("RGB", (64, 64), COLOURS[0]), Image.new("RGB", (64, 32), COLOURS[1])]
    picture = hardneg_failures(
        images,
        ["a red circle left of a blue square", "a blue square"],
        ["a blue circle left of a red square", "a blue circle"],
        torch.tensor([[1.5, 2.0], [0.3, 0.3]]),
        types=["attribute_binding_swap", "shape_swap"],
        scorer="ITM",
        thumb=thumb,
        text_width=text_width,
    )
    assert picture.size == (PAD + thumb + PAD + text_width + PAD, HEADER + PAD + 2 * (thumb + PAD))
    box = failure_box(0, thumb)
    assert picture.getpixel(((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)) == COLOURS[0]
    assert picture.getpixel((box[0] - 1, (box[1] + box[3]) // 2)) == GREY
    text_area = picture.crop((box[2] + PAD, box[1], picture.size[0], box[3]))
    colours = {colour for _, colour in text_area.getcolors(maxcolors=100_000)}
    assert any(g > 120 and r < 60 for r, g, _ in colours)  # green text (the positive)
    assert any(r > 150 and g < 80 for r, g, _ in colours)  # red text (the preferred negative)
    with pytest.raises(ValueError, match="one entry per failure"):
        hardneg_failures(images, ["a"], ["b", "c"], [(0.0, 1.0), (0.0, 1.0)])
