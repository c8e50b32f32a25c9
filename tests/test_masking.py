"""BEiT block masking: target counts, block sizes, determinism and scaling with the grid."""

from __future__ import annotations

import random

import numpy as np
import pytest

from vlalign.data.masking import BlockMaskGenerator


def _component_sizes(mask: np.ndarray) -> list[int]:
    """Sizes of 4-connected masked regions (flood fill; masks are tiny)."""
    seen = np.zeros_like(mask, dtype=bool)
    sizes = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            i, j = stack.pop()
            size += 1
            for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1] and mask[a, b] and not seen[a, b]:
                    seen[a, b] = True
                    stack.append((a, b))
        sizes.append(size)
    return sizes


def test_reference_defaults_on_16x16() -> None:
    generator = BlockMaskGenerator()
    assert generator.num_patches == 256
    assert (generator.num_masking_patches, generator.min_num_patches, generator.max_num_patches) == (75, 16, 75)
    counts = []
    for seed in range(50):
        mask = generator(random.Random(seed))
        assert mask.shape == (16, 16) and mask.dtype == np.bool_
        count = int(mask.sum())
        assert count <= 75
        assert count >= generator.min_num_patches
        # The first block alone has at least min_num_patches cells, so some connected region is that large.
        assert max(_component_sizes(mask)) >= generator.min_num_patches
        counts.append(count)
    assert np.mean(counts) >= 0.95 * 75
    assert sum(c == 75 for c in counts) >= 25


def test_deterministic_under_a_seed() -> None:
    generator = BlockMaskGenerator()
    a = generator(random.Random(123))
    b = generator(random.Random(123))
    c = generator(random.Random(124))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_global_random_is_the_default_source() -> None:
    generator = BlockMaskGenerator()
    random.seed(7)
    a = generator()
    random.seed(7)
    assert np.array_equal(a, generator())


@pytest.mark.parametrize(
    ("grid", "target", "min_block"),
    [((24, 24), 169, 36), ((8, 8), 19, 4), ((16, 8), 38, 8), ((14, 14), 57, 12)],
)
def test_other_grids_scale_with_area(grid: tuple[int, int], target: int, min_block: int) -> None:
    generator = BlockMaskGenerator(grid=grid)
    assert generator.num_masking_patches == target
    assert generator.min_num_patches == min_block
    counts = [int(generator(random.Random(seed)).sum()) for seed in range(50)]
    assert all(min_block <= c <= target for c in counts)
    assert np.mean(counts) >= 0.95 * target
    fraction = np.mean(counts) / generator.num_patches
    assert 0.26 < fraction < 0.31
    assert generator(random.Random(0)).shape == grid


def test_explicit_arguments_override_scaling() -> None:
    generator = BlockMaskGenerator(grid=(24, 24), num_masking_patches=75, min_num_patches=16)
    counts = [int(generator(random.Random(seed)).sum()) for seed in range(20)]
    assert max(counts) <= 75 and np.mean(counts) >= 0.9 * 75


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        BlockMaskGenerator(grid=(4, 4), num_masking_patches=17)
    with pytest.raises(ValueError):
        BlockMaskGenerator(min_num_patches=80, max_num_patches=75)
    with pytest.raises(ValueError):
        BlockMaskGenerator(min_aspect=0.0)
