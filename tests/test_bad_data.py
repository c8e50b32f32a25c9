"""Bad inputs through the real data pipelines: every fault is skipped and counted by reason, never fatal to a worker,
odd-but-valid images are converted (not skipped), and mostly broken data stops the run with a clear error."""

from __future__ import annotations

import io
import json
import logging
import re
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image, ImageFile

from vlalign.data.transforms import CLIP_MEAN, CLIP_STD, AugmentConfig, PretrainTransform
from vlalign.datamodules import JsonCaptionDataModule, ShardDataModule
from vlalign.datamodules.collate import TooManyBadSamples

IMAGE_SIZE = 32
NO_RANDAUG = AugmentConfig(randaugment=None)


@pytest.fixture(scope="module")
def tokenizer(synth_data: Path) -> str:
    return str(synth_data / "tokenizer")


# -- encoded inputs ------------------------------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def noise_image(size: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` grey pixels, followed by a few bytes of junk pixel data:
    decoding it would fail, so being rejected as a bomb proves the size was checked before any decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


JPEG = encode(noise_image(), "JPEG")
PNG = encode(noise_image(), "PNG")
WEBP = encode(noise_image(), "WEBP")

# name -> (members of the bad sample besides __key__, the reason it must be counted under)
BAD_SHARD_SAMPLES: dict[str, tuple[dict[str, bytes], str]] = {
    "truncated-jpeg": ({"jpg": JPEG[: len(JPEG) // 2], "txt": b"a cut jpeg"}, "decode_error"),
    "truncated-png": ({"png": PNG[: len(PNG) // 2], "txt": b"a cut png"}, "decode_error"),
    "truncated-webp": ({"webp": WEBP[: len(WEBP) // 2], "txt": b"a cut webp"}, "decode_error"),
    "corrupt-jpeg": ({"jpg": JPEG[:4] + bytes(range(256)) * 4, "txt": b"a jpeg of junk"}, "decode_error"),
    "corrupt-png": ({"png": PNG[:16] + b"\xff" * 300, "txt": b"a png of junk"}, "decode_error"),
    "corrupt-webp": ({"webp": WEBP[:12] + b"\x00" * 300, "txt": b"a webp of junk"}, "decode_error"),
    "not-an-image": ({"jpg": b"<html>404 not found</html>", "txt": b"an error page"}, "decode_error"),
    "no-image": ({"txt": b"a caption without a picture"}, "missing_image"),
    "no-caption": ({"jpg": JPEG}, "missing_caption"),
    "empty-caption": ({"jpg": JPEG, "txt": b""}, "empty_caption"),
    "whitespace-caption": ({"jpg": JPEG, "txt": b"  \t \n "}, "empty_caption"),
    "punctuation-caption": ({"jpg": JPEG, "txt": b" ?!. "}, "empty_caption"),
    "non-utf8-caption": ({"jpg": JPEG, "txt": "caf\xe9 au lait".encode("latin-1")}, "caption_encoding"),
    "non-utf8-json-caption": ({"jpg": JPEG, "json": b'{"caption": "caf\xe9"}'}, "caption_encoding"),
    "decompression-bomb": ({"png": png_header_only(30_000, 30_000), "txt": b"a bomb"}, "decompression_bomb"),
    "bomb-over-max-pixels": ({"png": png_header_only(10_000, 9_000), "txt": b"a big one"}, "decompression_bomb"),
}


# -- pipelines -----------------------------------------------------------------------------------------------------
def write_shard(path: Path, samples: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def good(key: str, caption: str = "a picture of noise") -> dict[str, Any]:
    return {"__key__": key, "jpg": JPEG, "txt": caption.encode()}


def shard_module(tokenizer: str, urls: str, **overrides: Any) -> ShardDataModule:
    options: dict[str, Any] = dict(image_size=IMAGE_SIZE, batch_size=3, num_workers=0, shuffle_buffer=0)
    options.update(overrides)
    module = ShardDataModule(train_shards=urls, tokenizer=tokenizer, **options)
    module.setup("fit")
    return module


def json_module(tokenizer: str, train_file: str, **overrides: Any) -> JsonCaptionDataModule:
    options: dict[str, Any] = dict(image_size=IMAGE_SIZE, batch_size=4, num_workers=0)
    options.update(overrides)
    module = JsonCaptionDataModule(train_files=[train_file], tokenizer=tokenizer, **options)
    module.setup("fit")
    return module


def run_epoch(module: ShardDataModule | JsonCaptionDataModule) -> tuple[list[dict[str, Any]], Counter[str]]:
    iterator = iter(module.train_dataloader())
    try:
        batches = list(iterator)
    finally:
        # A worker error leaves the iterator in a reference cycle (through the traceback); collected later, its
        # workers would take seconds to time out. Shutting them down here keeps the tests fast.
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    skipped: Counter[str] = Counter()
    for batch in batches:
        skipped.update(batch["skipped"])
    return batches, skipped


# -- bad samples in shards -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(BAD_SHARD_SAMPLES))
def test_bad_shard_sample_is_skipped_and_counted(tokenizer: str, tmp_path: Path, case: str) -> None:
    members, reason = BAD_SHARD_SAMPLES[case]
    urls = write_shard(tmp_path / "bad.tar", [good("g0"), {"__key__": "bad", **members}, good("g1"), good("g2")])
    batches, skipped = run_epoch(shard_module(tokenizer, urls))
    assert skipped == {reason: 1}
    assert len(batches) == 1 and sorted(batches[0]["keys"]) == ["g0", "g1", "g2"]
    assert torch.isfinite(batches[0]["image"]).all()


def test_decompression_bomb_is_rejected_before_decoding(
    tokenizer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[tuple[int, int]] = []
    original_load = ImageFile.ImageFile.load

    def spy_load(self: ImageFile.ImageFile) -> Any:
        decoded.append(self.size)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    # A real, small image over the configured pixel limit: skipped on its header alone.
    big = {"__key__": "big", "png": encode(Image.new("RGB", (64, 64), (9, 9, 9)), "PNG"), "txt": b"too big"}
    urls = write_shard(tmp_path / "bomb.tar", [good("g0"), big, good("g1"), good("g2")])
    batches, skipped = run_epoch(shard_module(tokenizer, urls, max_image_pixels=48 * 48))
    assert skipped == {"decompression_bomb": 1}
    assert (64, 64) not in decoded, "the oversized image must never be decoded"
    assert (48, 48) in decoded, "the good images are decoded (the spy works)"


def test_truncated_tar_keeps_its_complete_samples(
    tokenizer: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cut.tar"
    write_shard(path, [good(f"c{i}") for i in range(6)])
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])  # cut in the middle of a member
    module = shard_module(tokenizer, str(path), batch_size=2)
    loader = module.train_dataloader()
    with caplog.at_level(logging.WARNING, logger="vlalign.datamodules.webdataset"):
        batches = list(loader)
    keys = [key for batch in batches for key in batch["keys"]]
    assert batches and set(keys) <= {f"c{i}" for i in range(6)} and len(keys) == len(set(keys))
    guard = loader.dataset.guard  # with num_workers=0 the pipeline's counters live in this process
    assert guard.skipped["shard_error"] >= 1  # webdataset reports a cut archive at two levels
    assert "skipping unreadable shard data" in caplog.text


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("L", (40, 30), 77), "PNG", (77, 77, 77)),
        (Image.new("P", (40, 30), 0), "PNG", (200, 10, 10)),  # palette entry 0 set below
        (Image.new("RGBA", (40, 30), (0, 0, 0, 0)), "PNG", (255, 255, 255)),  # transparent -> white, not black
        (Image.new("RGBA", (40, 30), (10, 200, 30, 255)), "WEBP", (10, 200, 30)),
        (Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
        (Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16)), "PNG", (255, 255, 255)),  # 16-bit: scaled
        (Image.fromarray(np.full((30, 40), 32896, dtype=np.uint16)), "PNG", (128, 128, 128)),
        (Image.new("RGB", (1, 1), (20, 120, 220)), "PNG", (20, 120, 220)),
        (Image.new("LA", (40, 30), (90, 255)), "PNG", (90, 90, 90)),
    ],
    ids=["grayscale", "palette", "rgba-transparent", "rgba-webp", "cmyk", "16-bit-white", "16-bit-mid", "1x1", "la"],
)
def test_unusual_image_modes_are_converted_not_skipped(
    tokenizer: str, tmp_path: Path, image: Image.Image, fmt: str, expected: tuple[int, int, int]
) -> None:
    if image.mode == "P":
        image.putpalette([200, 10, 10] + [0] * 765)
    ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
    options = {"quality": 100} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    samples = [{"__key__": f"m{i}", ext: encode(image, fmt, **options), "txt": b"one flat colour"} for i in range(2)]
    # Random crops and flips keep a flat colour flat; RandAugment would not, so it is off here.
    batches, skipped = run_epoch(shard_module(tokenizer, write_shard(tmp_path / "modes.tar", samples), batch_size=2,
                                              augment=NO_RANDAUG))  # fmt: skip
    assert skipped == {} and len(batches) == 1
    pixels = batches[0]["image"] * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    assert pixels.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    colour = (pixels.mean(dim=(2, 3)) * 255).round()
    assert torch.allclose(colour, torch.tensor(expected, dtype=torch.float32).expand(2, 3), atol=3)


def test_one_pixel_image_survives_full_augmentation(tokenizer: str, tmp_path: Path) -> None:
    tiny = encode(Image.new("RGB", (1, 1), (5, 6, 7)), "PNG")
    wide = encode(Image.new("RGB", (300, 1), (5, 6, 7)), "PNG")
    samples = [{"__key__": f"t{i}", "png": tiny if i % 2 else wide, "txt": b"a dot on the left"} for i in range(8)]
    urls = write_shard(tmp_path / "tiny.tar", samples)
    module = shard_module(tokenizer, urls, batch_size=4, tokenizer_view_size=16, mask_patch_size=8)  # RandAugment on
    batches, skipped = run_epoch(module)
    assert skipped == {} and len(batches) == 2
    assert batches[0]["image"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_a_failing_augmentation_skips_the_sample_not_the_worker(
    tokenizer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original = PretrainTransform.__call__

    def fragile(self: PretrainTransform, image: Image.Image, caption: str) -> Any:
        if image.size == (1, 1):
            raise ValueError("this augmentation cannot handle a single pixel")
        return original(self, image, caption)

    monkeypatch.setattr(PretrainTransform, "__call__", fragile)
    dot = {"__key__": "dot", "png": encode(Image.new("RGB", (1, 1)), "PNG"), "txt": b"a dot"}
    urls = write_shard(tmp_path / "fragile.tar", [good("g0"), dot, good("g1"), good("g2")])
    with caplog.at_level(logging.WARNING, logger="vlalign.datamodules.collate"):
        batches, skipped = run_epoch(shard_module(tokenizer, urls))
    assert skipped == {"transform_error": 1} and sorted(batches[0]["keys"]) == ["g0", "g1", "g2"]
    assert "single pixel" in caplog.text and "dot" in caplog.text


def test_two_workers_skip_and_count_without_crashing(tokenizer: str, tmp_path: Path) -> None:
    # Each shard ends on good samples and holds 4 of them: every skip rides on a batch of its worker.
    bad_kinds = ["truncated-jpeg", "no-caption", "non-utf8-caption", "decompression-bomb"]
    for shard in range(2):
        samples = []
        for i, kind in enumerate(bad_kinds):
            samples += [{"__key__": f"s{shard}b{i}", **BAD_SHARD_SAMPLES[kind][0]}, good(f"s{shard}g{i}")]
        write_shard(tmp_path / f"w-{shard:06d}.tar", samples)
    module = shard_module(tokenizer, str(tmp_path / "w-{000000..000001}.tar"), batch_size=2, num_workers=2)
    batches, skipped = run_epoch(module)
    assert skipped == {"decode_error": 2, "missing_caption": 2, "caption_encoding": 2, "decompression_bomb": 2}
    keys = sorted(key for batch in batches for key in batch["keys"])
    assert keys == sorted(f"s{s}g{i}" for s in range(2) for i in range(4))


# -- bad entries in JSON caption lists -----------------------------------------------------------------------------
def test_bad_json_entries_are_skipped_and_counted(tokenizer: str, synth_data: Path, tmp_path: Path) -> None:
    images = sorted((synth_data / "images" / "train").glob("*.jpg"))[:3]
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(JPEG[: len(JPEG) // 2])
    gray = tmp_path / "gray.png"
    Image.new("I;16", (20, 20)).save(gray)
    entries: list[Any] = [{"image": str(path), "caption": "a shape"} for path in images]
    entries += [
        {"image": str(gray), "caption": "a grey square"},  # converted, not skipped
        {"image": str(tmp_path / "gone.jpg"), "caption": "a missing file"},
        {"image": str(truncated), "caption": "a cut picture"},
        {"caption": "an entry without an image"},
        {"image": str(images[0])},
        {"image": str(images[1]), "caption": "   "},
        {"image": str(images[2]), "caption": [None]},
        "not even an object",
    ]
    train_file = tmp_path / "train.json"
    # A lone surrogate is valid JSON but not valid Unicode: the tokenizer would raise on it.
    text = json.dumps(entries)[:-1] + f', {{"image": "{images[0]}", "caption": "caf\\udce9"}}]'
    train_file.write_text(text)
    module = json_module(tokenizer, str(train_file), batch_size=len(entries) + 1)
    batches, skipped = run_epoch(module)
    assert skipped == {
        "missing_file": 1,
        "decode_error": 1,
        "missing_image": 2,
        "missing_caption": 2,
        "empty_caption": 1,
        "caption_encoding": 1,
    }
    assert len(batches) == 1 and sorted(batches[0]["keys"]) == sorted([*map(str, images), str(gray)])


# -- too many bad samples ------------------------------------------------------------------------------------------
def mostly_broken_shard(path: Path, total: int, bad_every: int) -> str:
    samples = [
        {"__key__": f"k{i}", "jpg": b"junk", "txt": b"broken"} if i % bad_every == 0 else good(f"k{i}")
        for i in range(total)
    ]
    return write_shard(path, samples)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mostly_broken_shards_stop_with_a_clear_error(tokenizer: str, tmp_path: Path, num_workers: int) -> None:
    urls = mostly_broken_shard(tmp_path / "broken.tar", total=40, bad_every=2)  # 50 % junk
    module = shard_module(tokenizer, urls, batch_size=2, max_skip_fraction=0.2, skip_check_after=10,
                          num_workers=num_workers)  # fmt: skip
    with pytest.raises(TooManyBadSamples) as info:
        run_epoch(module)
    message = str(info.value)
    assert "data.max_skip_fraction=0.2" in message
    assert "decode_error=" in message and "broken.tar" in message
    assert re.search(r"\d+ of \d+ training records \(\d+\.\d%\)", message), message


def test_skip_fraction_needs_enough_records_and_a_real_excess(tokenizer: str, tmp_path: Path) -> None:
    sparse = mostly_broken_shard(tmp_path / "sparse.tar", total=40, bad_every=20)  # 2 of 40 bad: 5 %
    _, skipped = run_epoch(shard_module(tokenizer, sparse, batch_size=2, skip_check_after=10))
    assert skipped == {"decode_error": 2}
    dense = mostly_broken_shard(tmp_path / "dense.tar", total=12, bad_every=2)  # 50 %, but only 12 records
    _, skipped = run_epoch(shard_module(tokenizer, dense, batch_size=2, skip_check_after=1000))
    assert skipped == {"decode_error": 6}
    with pytest.raises(ValueError, match="max_skip_fraction"):
        shard_module(tokenizer, sparse, max_skip_fraction=1.5)


def test_shards_without_a_single_usable_record_stop_the_run(tokenizer: str, tmp_path: Path) -> None:
    urls = write_shard(tmp_path / "dead.tar", [{"__key__": f"d{i}", "txt": b"no image"} for i in range(5)])
    with pytest.raises(TooManyBadSamples, match=r"missing_image=5.*dead\.tar"):
        run_epoch(shard_module(tokenizer, urls, skip_check_after=1000))


def test_mostly_missing_json_files_stop_with_a_clear_error(tokenizer: str, tmp_path: Path) -> None:
    real = tmp_path / "real.jpg"
    real.write_bytes(JPEG)
    entries = [{"image": str(real if i % 4 == 0 else tmp_path / f"gone{i}.jpg"), "caption": "x"} for i in range(40)]
    train_file = tmp_path / "lost.json"
    train_file.write_text(json.dumps(entries))
    module = json_module(tokenizer, str(train_file), batch_size=8, skip_check_after=16)
    with pytest.raises(TooManyBadSamples) as info:
        run_epoch(module)
    message = str(info.value)
    assert "missing_file=" in message and "lost.json" in message and "max_skip_fraction=0.1" in message


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.layer(batch["image"].mean().reshape(1, 1)).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fit_surfaces_too_many_bad_samples_from_a_worker(tokenizer: str, tmp_path: Path) -> None:
    urls = mostly_broken_shard(tmp_path / "fit.tar", total=40, bad_every=2)
    module = shard_module(tokenizer, urls, batch_size=2, num_workers=1, skip_check_after=10)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(TooManyBadSamples, match="fit.tar"):
        trainer.fit(_Recorder(), datamodule=module)


# -- per-epoch summary of skipped samples (the DataQualityMonitor callback) ------------------------------------------------------------
def test_data_quality_monitor_logs_skipped_samples_per_epoch(
    tokenizer: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from vlalign.testing import tiny_recipe
    from vlalign.training.data_quality import DataQualityMonitor

    samples = []
    for i in range(4):
        samples += [good(f"e{i}"), {"__key__": f"x{i}", **BAD_SHARD_SAMPLES["corrupt-png" if i % 2 else "no-image"][0]}]
    samples.append(good("e4"))
    urls = write_shard(tmp_path / "epoch.tar", samples)
    # One shard read from its start each epoch: the same two batches, carrying the same three skips (x3 comes
    # after the second batch's last sample).
    module = shard_module(tokenizer, urls, batch_size=2, resampled=True, samples_per_epoch=4)
    recipe = tiny_recipe("clip", vision={"img_size": IMAGE_SIZE}, stream={"num_layers": 1}, vocab=module.vocab)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[DataQualityMonitor()])  # fmt: skip
    with caplog.at_level(logging.INFO):
        trainer.fit(recipe, datamodule=module)
    lines = [record.getMessage() for record in caplog.records if "bad samples" in record.getMessage()]
    assert lines == [
        "epoch 0: skipped 3 bad samples (missing_image=2, decode_error=1)",
        "epoch 1: skipped 3 bad samples (missing_image=2, decode_error=1)",
    ]
    assert trainer.callback_metrics["data/skipped_decode_error"] == 2.0  # running total, as logged to TensorBoard
