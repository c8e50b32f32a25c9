"""Image decoding and the pre-training / evaluation image transforms (docs/method.md §4.2)."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import rand_augment_transform
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from vlalign.data.text import swap_left_right

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# The reference RandomAugment's operations (docs/method.md §4.2) under timm's names. The reference's set has no
# colour-changing ops (Solarize, Posterize, Invert, Color), which matters when captions name colours.
REFERENCE_RANDAUG_OPS: tuple[str, ...] = (
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
# timm hyper-parameters that reproduce the reference magnitudes at m7: translate ±7 px, grey fill.
_RANDAUG_HPARAMS = {"translate_const": 10, "img_mean": (128, 128, 128)}

DEFAULT_MAX_PIXELS = 89_478_485


class BadSampleError(Exception):
    """A sample that cannot be used; ``reason`` is a short stable tag for counting skips (e.g. "decode_error")."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@dataclass
class AugmentConfig:
    """Pre-training augmentation knobs; defaults follow the reference pre-training view.

    ``randaugment`` is a timm ``rand_augment_transform`` config string (None disables it); ``randaugment_ops``
    restricts it to the reference's operation set (None uses timm's default set).
    """

    scale: tuple[float, float] = (0.2, 1.0)
    hflip: float = 0.5
    randaugment: str | None = "rand-m7-n2-mstd0.5"
    swap_left_right: bool = True
    randaugment_ops: tuple[str, ...] | None = REFERENCE_RANDAUG_OPS


class PretrainTransform:
    """Random crop, consistent flip of image and caption, RandAugment, normalisation; optional tokenizer view.

    The tokenizer view (SIMLA's MIM targets) is the augmented ViT view resized down to ``tokenizer_view_size``,
    so the code at patch p describes what the ViT sees at patch p. The reference instead draws this view with
    an independent crop, flip and RandAugment (docs/differences.md row 7), which misaligns targets and masked patches.
    It is returned un-normalised in [0, 1] because the image tokenizer applies its own input map.
    """

    def __init__(
        self, image_size: int, augment: AugmentConfig = AugmentConfig(), tokenizer_view_size: int | None = None
    ) -> None:
        augment = replace(augment)  # private copy: the default instance is shared between calls
        if not 0.0 <= augment.hflip <= 1.0:
            raise ValueError(f"hflip must be a probability, got {augment.hflip}")
        self.image_size = image_size
        self.augment = augment
        self.tokenizer_view_size = tokenizer_view_size
        self.crop = T.RandomResizedCrop(image_size, scale=augment.scale, interpolation=InterpolationMode.BICUBIC)
        self.randaugment = None
        if augment.randaugment is not None:
            ops = list(augment.randaugment_ops) if augment.randaugment_ops is not None else None
            self.randaugment = rand_augment_transform(augment.randaugment, dict(_RANDAUG_HPARAMS), transforms=ops)
        self.to_tensor = T.ToTensor()
        self.normalize = T.Normalize(CLIP_MEAN, CLIP_STD)

    def __call__(self, image: Image.Image, caption: str) -> tuple[Tensor, str, Tensor | None]:
        view = self.crop(image)
        if torch.rand(()).item() < self.augment.hflip:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if self.augment.swap_left_right:
                caption = swap_left_right(caption)
        if self.randaugment is not None:
            view = self.randaugment(view)
        tokenizer_view = None
        if self.tokenizer_view_size is not None:
            small = view.resize((self.tokenizer_view_size, self.tokenizer_view_size), Image.Resampling.BICUBIC)
            tokenizer_view = self.to_tensor(small)
        return self.normalize(self.to_tensor(view)), caption, tokenizer_view


class EvalTransform:
    """Deterministic evaluation view: squash-resize to S×S (no centre crop, as the reference) and normalise."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self.transform = T.Compose(
            [
                T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
                T.ToTensor(),
                T.Normalize(CLIP_MEAN, CLIP_STD),
            ]
        )

    def __call__(self, image: Image.Image) -> Tensor:
        return self.transform(image)


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite a transparent image on white: transparent pixels often hold arbitrary (usually black) colour."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit integer and float grayscale to 8 bits (PIL's own convert would clip, not scale)."""
    array = np.asarray(image)
    if image.mode == "F":
        values = array.astype(np.float64)
        peak = float(values.max()) if values.size else 0.0
        scaled = values * 255.0 if peak <= 1.0 else values
    elif image.mode.startswith("I;16"):
        scaled = array.astype(np.float64) / 257.0
    else:  # "I": 32-bit integers, in practice 16-bit data; 8-bit ranges are kept as they are
        values = array.astype(np.float64)
        peak = float(values.max()) if values.size else 0.0
        scaled = values / 257.0 if peak > 255 else values
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        return _flatten_alpha(image)
    if mode == "F" or mode == "I" or mode.startswith("I;16"):
        return _high_bit_depth_to_rgb(image)
    return image.convert("RGB")


def load_rgb(data: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file (bytes or path) into an 8-bit RGB PIL image, or raise :class:`BadSampleError`.

    The pixel count is checked from the header before any pixel is decoded, so a decompression bomb costs
    nothing; transparency is composited on white; 16-bit and float images are scaled rather than clipped.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data)
    except FileNotFoundError as err:
        raise BadSampleError("missing_file", str(err)) from err
    except Image.DecompressionBombError as err:
        raise BadSampleError("decompression_bomb", str(err)) from err
    except Exception as err:  # decoders raise many unrelated types on corrupt input
        raise BadSampleError("decode_error", f"cannot identify image: {err}") from err
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise BadSampleError("decompression_bomb", f"{width}x{height} exceeds {max_pixels} pixels")
    if width < 1 or height < 1:
        raise BadSampleError("decode_error", f"empty image {width}x{height}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            return _to_rgb(image)
    except Exception as err:  # truncated data surfaces only here, as OSError, SyntaxError, ValueError, ...
        raise BadSampleError("decode_error", f"cannot decode image: {err}") from err
