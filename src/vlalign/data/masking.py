"""BEiT block masking of image patches for SIMLA's image-side XMM (docs/method.md §4.3).

Runs in data workers on one sample at a time, so plain Python is fine here.
"""

from __future__ import annotations

import math
import random
from types import ModuleType

import numpy as np

# Reference values for a 16×16 grid (256 px images, 16 px patches).
_REFERENCE_AREA = 256
_REFERENCE_TARGET = 75
_REFERENCE_MIN_BLOCK = 16
_ATTEMPTS_PER_ROUND = 10


class BlockMaskGenerator:
    """Masks ≈``num_masking_patches`` patches as a union of random rectangular blocks.

    Defaults reproduce the reference on a 16×16 grid (75 patches, blocks of at least 16, aspect 0.3–1/0.3).
    For other grids the target and the block minimum scale with the grid area (``round(75·N/256)`` and
    ``max(1, round(16·N/256))``) so the masked fraction stays ≈29 % (the reference hard-codes 75/16, which
    at 384 px / 24×24 would mask only 13 %).
    """

    def __init__(
        self,
        grid: tuple[int, int] = (16, 16),
        num_masking_patches: int | None = None,
        min_num_patches: int | None = None,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        height, width = (int(g) for g in grid)
        if height < 1 or width < 1:
            raise ValueError(f"grid must be positive, got {grid}")
        if not min_aspect > 0 or (max_aspect is not None and max_aspect < min_aspect):
            raise ValueError(f"need 0 < min_aspect ({min_aspect}) <= max_aspect ({max_aspect})")
        area = height * width
        if num_masking_patches is None:
            num_masking_patches = round(_REFERENCE_TARGET * area / _REFERENCE_AREA)
        if min_num_patches is None:
            min_num_patches = max(1, round(_REFERENCE_MIN_BLOCK * area / _REFERENCE_AREA))
        if max_num_patches is None:
            max_num_patches = num_masking_patches
        if max_aspect is None:
            max_aspect = 1.0 / min_aspect
        if not 0 <= num_masking_patches <= area:
            raise ValueError(f"num_masking_patches={num_masking_patches} must lie in [0, {area}]")
        if num_masking_patches > 0 and not 1 <= min_num_patches <= max_num_patches:
            raise ValueError(f"need 1 <= min_num_patches ({min_num_patches}) <= max_num_patches ({max_num_patches})")
        self.height = height
        self.width = width
        self.num_masking_patches = int(num_masking_patches)
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = int(max_num_patches)
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(grid=({self.height}, {self.width}), num_masking_patches={self.num_masking_patches}, "
            f"min_num_patches={self.min_num_patches}, max_num_patches={self.max_num_patches}, "
            f"aspect=({math.exp(self.log_aspect[0]):.3g}, {math.exp(self.log_aspect[1]):.3g}))"
        )

    def _add_block(self, mask: np.ndarray, budget: int, rng: random.Random | ModuleType) -> int:
        """One round: up to 10 tries to place a block adding 1..budget new cells; returns the cells added."""
        for _ in range(_ATTEMPTS_PER_ROUND):
            area = rng.uniform(self.min_num_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h < self.height and w < self.width:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block[...] = True
                    return new
        return 0

    def __call__(self, rng: random.Random | None = None) -> np.ndarray:
        """Return a bool mask ``[H, W]`` (True = masked); ``rng`` defaults to Python's global generator.

        The global generator matches the reference and is re-seeded per DataLoader worker by PyTorch.
        """
        source: random.Random | ModuleType = rng if rng is not None else random
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, source)
            if added == 0:
                break
            count += added
        return mask
