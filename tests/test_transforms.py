"""Pre-training / evaluation transforms and robust image decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlalign.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    AugmentConfig,
    BadSampleError,
    EvalTransform,
    PretrainTransform,
    load_rgb,
)


def _asymmetric_image(width: int = 200, height: int = 160) -> Image.Image:
    """Smooth horizontal and vertical ramps: any crop or flip changes the pixels measurably."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return x * std + mean


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_flip_swaps_left_right_exactly_when_flipped(flip: float) -> None:
    image = _asymmetric_image()
    augment = AugmentConfig(scale=(1.0, 1.0), hflip=flip, randaugment=None)
    transform = PretrainTransform(64, augment)
    pixels, caption, view = transform(image, "a dog on the left of a cat")
    assert view is None
    assert pixels.shape == (3, 64, 64)
    red = _unnormalise(pixels)[0]
    flipped = bool(red[:, 0].mean() > red[:, -1].mean())  # the red ramp rises left to right before a flip
    assert flipped == (flip == 1.0)
    assert caption == ("a dog on the right of a cat" if flipped else "a dog on the left of a cat")


def test_flip_without_swap_keeps_caption() -> None:
    augment = AugmentConfig(hflip=1.0, randaugment=None, swap_left_right=False)
    _, caption, _ = PretrainTransform(32, augment)(_asymmetric_image(), "left")
    assert caption == "left"


def test_tokenizer_view_is_the_same_crop_and_flip() -> None:
    image = _asymmetric_image(320, 240)
    transform = PretrainTransform(64, AugmentConfig(scale=(0.2, 0.5), hflip=0.5), tokenizer_view_size=32)
    torch.manual_seed(0)
    for _ in range(8):
        pixels, _, view = transform(image, "x")
        assert view is not None and view.shape == (3, 32, 32)
        assert 0.0 <= float(view.min()) and float(view.max()) <= 1.0
        expected = F.interpolate(_unnormalise(pixels)[None], size=(32, 32), mode="area")[0]
        assert (view - expected).abs().mean() < 0.02
    # An independently drawn view (the reference) would not match: check the test can tell the difference.
    other_pixels, _, _ = transform(image, "x")
    other = F.interpolate(_unnormalise(other_pixels)[None], size=(32, 32), mode="area")[0]
    assert (view - other).abs().mean() > 0.02


def test_eval_transform_shape_and_normalisation() -> None:
    out = EvalTransform(48)(Image.new("RGB", (100, 30), (255, 255, 255)))
    assert out.shape == (3, 48, 48)
    expected = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out[:, 10, 10], expected, atol=1e-4)


def test_load_rgb_grayscale() -> None:
    out = load_rgb(_encode(Image.new("L", (5, 4), 77)))
    assert out.mode == "RGB" and out.size == (5, 4)
    assert np.asarray(out)[0, 0].tolist() == [77, 77, 77]


def test_load_rgb_palette_with_transparency_composites_on_white() -> None:
    palette = Image.new("P", (2, 1), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * (256 * 3 - 6))
    palette.putpixel((0, 0), 0)
    palette.info["transparency"] = 0
    out = np.asarray(load_rgb(_encode(palette)))
    assert out.shape == (1, 2, 3)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [200, 10, 10]


def test_load_rgb_rgba() -> None:
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    out = np.asarray(load_rgb(_encode(rgba)))
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[0, 1].tolist() == [255, 255, 255]


def test_load_rgb_cmyk() -> None:
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # pure red in CMYK
    for data in (_encode(cmyk, "TIFF"), _encode(cmyk, "JPEG", quality=100)):
        out = load_rgb(data)
        assert out.mode == "RGB"
        r, g, b = np.asarray(out)[1, 1].tolist()
        assert r > 240 and g < 15 and b < 15


def test_load_rgb_16_bit_is_scaled_not_clipped() -> None:
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    image16 = Image.fromarray(values)
    data = _encode(image16)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(load_rgb(data))
    assert out.dtype == np.uint8 and out.shape == (1, 3, 3)
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_load_rgb_one_pixel_and_path(tmp_path) -> None:
    path = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(path)
    for source in (path, str(path), path.read_bytes()):
        out = load_rgb(source)
        assert out.size == (1, 1) and np.asarray(out)[0, 0].tolist() == [1, 2, 3]


def test_load_rgb_rejects_truncated_and_corrupt() -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(160, 200, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), "JPEG")
    truncated = data[: len(data) // 2]
    assert Image.open(io.BytesIO(truncated)).size == (200, 160), "header intact: the failure must come from load()"
    with pytest.raises(BadSampleError) as info:
        load_rgb(truncated)
    assert info.value.reason == "decode_error"
    with pytest.raises(BadSampleError) as info:
        load_rgb(b"definitely not an image")
    assert info.value.reason == "decode_error"


def test_load_rgb_rejects_decompression_bomb_before_decoding() -> None:
    data = _encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(BadSampleError) as info:
        load_rgb(data, max_pixels=9_999)
    assert info.value.reason == "decompression_bomb"
    assert "100x100" in str(info.value)
    assert load_rgb(data, max_pixels=10_000).size == (100, 100)
