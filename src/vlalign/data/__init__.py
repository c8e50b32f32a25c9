"""Data primitives: caption text handling, image decoding and transforms, patch masking, synthetic data."""

from vlalign.data.masking import BlockMaskGenerator
from vlalign.data.synth import SynthSummary, write_synthetic
from vlalign.data.text import pre_caption, swap_left_right
from vlalign.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    AugmentConfig,
    BadSampleError,
    EvalTransform,
    PretrainTransform,
    load_rgb,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "AugmentConfig",
    "BadSampleError",
    "BlockMaskGenerator",
    "EvalTransform",
    "PretrainTransform",
    "SynthSummary",
    "load_rgb",
    "pre_caption",
    "swap_left_right",
    "write_synthetic",
]
