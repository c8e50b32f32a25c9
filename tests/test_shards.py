"""WebDataset shard pipeline: worker split, skip-and-count, resampled epochs, source mixing, foreign layouts."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import webdataset as wds
from PIL import Image

from vlalign.data.synth import write_synthetic
from vlalign.datamodules import ShardDataModule, ShardSource

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny WordPiece tokenizer (trained on synthetic captions) shared by the tests of this file."""
    summary = write_synthetic(
        tmp_path_factory.mktemp("synth"),
        num_train=12,
        num_val=0,
        num_test=0,
        image_size=16,
        samples_per_shard=12,
        tokenizer_vocab_size=150,
        progress=False,
    )
    return str(summary.tokenizer_dir)


def image_bytes(colour: tuple[int, int, int] = (200, 30, 30), fmt: str = "JPEG", size: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def write_shard(path: Path, samples: list[dict[str, object]]) -> Path:
    """Write raw samples (``__key__`` plus extension -> bytes) with no encoding, as another tool would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def good_sample(key: str, caption: str = "a red square on the left") -> dict[str, object]:
    return {"__key__": key, "jpg": image_bytes(), "txt": caption.encode()}


def write_shards(root: Path, prefix: str, num_shards: int, per_shard: int) -> str:
    for shard in range(num_shards):
        samples = [good_sample(f"{prefix}{shard * per_shard + i:05d}") for i in range(per_shard)]
        write_shard(root / f"{prefix}-{shard:06d}.tar", samples)
    return str(root / f"{prefix}-{{000000..{num_shards - 1:06d}}}.tar")


def make_module(tokenizer_dir: str, train_shards: str | list[ShardSource], **overrides: Any) -> ShardDataModule:
    options: dict[str, Any] = dict(image_size=IMAGE_SIZE, batch_size=4, num_workers=0, shuffle_buffer=0)
    options.update(overrides)
    module = ShardDataModule(train_shards=train_shards, tokenizer=tokenizer_dir, **options)
    module.setup("fit")
    return module


def epoch_batches(module: ShardDataModule, loader: Iterable[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    return list(loader if loader is not None else module.train_dataloader())


@pytest.mark.parametrize("persistent_workers", [True, False])
def test_two_workers_cover_every_sample_exactly_once_per_epoch(
    tokenizer_dir: str, tmp_path: Path, persistent_workers: bool
) -> None:
    # 5 shards of 7: worker 0 reads 3 shards, worker 1 reads 2; batches of 7 leave no partial batch to drop.
    urls = write_shards(tmp_path, "s", num_shards=5, per_shard=7)
    module = make_module(
        tokenizer_dir, urls, batch_size=7, num_workers=2, shuffle_buffer=10, persistent_workers=persistent_workers
    )
    loader = module.train_dataloader()
    expected = {f"s{i:05d}" for i in range(35)}
    orders = []
    for _ in range(2):
        keys = [key for batch in epoch_batches(module, loader) for key in batch["keys"]]
        assert len(keys) == len(set(keys)) == 35
        assert set(keys) == expected
        orders.append(keys)
    assert orders[0] != orders[1], "each epoch should shuffle shards and samples anew"


def test_partial_batches_are_dropped(tokenizer_dir: str, tmp_path: Path) -> None:
    urls = write_shards(tmp_path, "p", num_shards=2, per_shard=5)
    batches = epoch_batches(make_module(tokenizer_dir, urls, batch_size=4))
    assert [batch["image"].shape[0] for batch in batches] == [4, 4]


def test_bad_samples_are_skipped_and_counted_by_reason(tokenizer_dir: str, tmp_path: Path) -> None:
    bad = [
        {"__key__": "corrupt", "jpg": b"definitely not a jpeg", "txt": b"a blue circle"},
        {"__key__": "empty", "jpg": image_bytes(), "txt": b" ?!. "},
        {"__key__": "nocaption", "jpg": image_bytes()},
        {"__key__": "noimage", "txt": b"a caption without a picture"},
        # img2dataset also writes the caption into KEY.json; it is the fallback when KEY.txt is absent.
        {"__key__": "jsononly", "jpg": image_bytes(), "json": json.dumps({"caption": "a green star"}).encode()},
    ]
    # Interleaved, ending on a good sample: skips after a worker's last full batch have no batch to ride on.
    samples = [sample for i, b in enumerate(bad) for sample in (good_sample(f"g{i}"), b)] + [
        good_sample("g5"),
        good_sample("g6"),
    ]
    urls = str(write_shard(tmp_path / "bad.tar", samples))
    batches = epoch_batches(make_module(tokenizer_dir, urls, batch_size=2))
    skipped: Counter[str] = Counter()
    for batch in batches:
        skipped.update(batch["skipped"])
    keys = {key for batch in batches for key in batch["keys"]}
    assert skipped == {"decode_error": 1, "empty_caption": 1, "missing_caption": 1, "missing_image": 1}
    assert keys == {f"g{i}" for i in range(7)} | {"jsononly"}
    assert all(batch["image"].shape[0] == 2 for batch in batches)


def test_unreadable_shard_is_counted_not_fatal(tokenizer_dir: str, tmp_path: Path) -> None:
    write_shard(tmp_path / "u-000000.tar", [good_sample(f"u{i}") for i in range(4)])
    (tmp_path / "u-000001.tar").write_bytes(b"this is not a tar archive" * 40)
    module = make_module(tokenizer_dir, str(tmp_path / "u-{000000..000001}.tar"), resampled=True, samples_per_epoch=40)
    batches = epoch_batches(module)
    assert len(batches) == 10 and all(len(batch["keys"]) == 4 for batch in batches)
    skipped: Counter[str] = Counter()
    for batch in batches:
        skipped.update(batch["skipped"])
    assert set(skipped) == {"shard_error"} and skipped["shard_error"] > 0


def test_resampled_mode_has_a_fixed_number_of_batches_per_epoch(tokenizer_dir: str, tmp_path: Path) -> None:
    urls = write_shards(tmp_path, "r", num_shards=3, per_shard=3)
    module = make_module(tokenizer_dir, urls, resampled=True, samples_per_epoch=22, num_workers=2)
    loader = module.train_dataloader()
    assert len(loader) == 22 // 4
    for _ in range(2):
        batches = epoch_batches(module, loader)
        assert len(batches) == 22 // 4
        assert all(batch["image"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) for batch in batches)


def test_weighted_sources_both_contribute(tokenizer_dir: str, tmp_path: Path) -> None:
    sources = [
        ShardSource(write_shards(tmp_path, "a", num_shards=2, per_shard=4), weight=3.0),
        ShardSource(write_shards(tmp_path, "b", num_shards=2, per_shard=4), weight=1.0),
    ]
    exact = epoch_batches(make_module(tokenizer_dir, sources, batch_size=2))
    exact_keys = [key for batch in exact for key in batch["keys"]]
    assert sorted(exact_keys) == sorted([f"a{i:05d}" for i in range(8)] + [f"b{i:05d}" for i in range(8)])

    random.seed(0)  # RandomMix draws the source from Python's global generator
    module = make_module(tokenizer_dir, sources, resampled=True, samples_per_epoch=400)
    origins = Counter(key[0] for batch in epoch_batches(module) for key in batch["keys"])
    assert origins["a"] + origins["b"] == 400
    assert 0.62 < origins["a"] / 400 < 0.88  # weight 3:1 -> 75 %


def test_img2dataset_style_shard_trains_without_conversion(tokenizer_dir: str, tmp_path: Path) -> None:
    samples = []
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("jpeg", "JPEG")]
    for index, (ext, fmt) in enumerate(formats):
        key = f"{index:09d}"
        meta = {
            "url": f"http://example.com/{key}",
            "key": key,
            "status": "success",
            "caption": f"photo {index}",
            "width": 24,
            "height": 24,
            "original_width": 640,
            "original_height": 480,
        }
        samples.append(
            {
                "__key__": key,
                ext: image_bytes(fmt=fmt),
                "txt": f"Photo {index}!".encode(),
                "json": json.dumps(meta).encode(),
            }
        )
    urls = str(write_shard(tmp_path / "00000.tar", samples))
    batches = epoch_batches(make_module(tokenizer_dir, urls, batch_size=4))
    assert len(batches) == 1
    batch = batches[0]
    assert sorted(batch["keys"]) == [f"{i:09d}" for i in range(4)]
    assert batch["skipped"] == {}
    assert batch["image"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].shape == batch["attention_mask"].shape


def test_tokenizer_view_and_patch_mask_shapes(tokenizer_dir: str, tmp_path: Path) -> None:
    urls = write_shards(tmp_path, "m", num_shards=1, per_shard=4)
    batch = epoch_batches(make_module(tokenizer_dir, urls, tokenizer_view_size=16, mask_patch_size=8))[0]
    assert batch["tokenizer_view"].shape == (4, 3, 16, 16)
    assert 0.0 <= float(batch["tokenizer_view"].min()) and float(batch["tokenizer_view"].max()) <= 1.0
    mask = batch["patch_mask"]
    assert mask.dtype == torch.bool and mask.shape == (4, (IMAGE_SIZE // 8) ** 2)
    assert bool(mask.any(dim=1).all()), "every sample should have some masked patches"

    plain = epoch_batches(make_module(tokenizer_dir, urls))[0]
    assert "tokenizer_view" not in plain and "patch_mask" not in plain


def test_trainer_runs_resampled_epochs_of_known_length(tokenizer_dir: str, tmp_path: Path) -> None:
    urls = write_shards(tmp_path, "t", num_shards=2, per_shard=4)
    module = make_module(tokenizer_dir, urls, resampled=True, samples_per_epoch=12)

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.sizes: list[int] = []

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            self.sizes.append(batch["image"].shape[0])
            return self.layer(batch["image"].mean().reshape(1, 1)).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=module)
    assert trainer.num_training_batches == 3
    assert model.sizes == [4] * 6


def test_configuration_errors_name_the_key(tokenizer_dir: str, tmp_path: Path) -> None:
    urls = write_shards(tmp_path, "e", num_shards=1, per_shard=2)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        ShardDataModule(train_shards=urls, tokenizer=tokenizer_dir, resampled=True)
    with pytest.raises(FileNotFoundError, match=r"train_shards.*e-000001\.tar"):
        ShardDataModule(train_shards=str(tmp_path / "e-{000000..000001}.tar"), tokenizer=tokenizer_dir)
    with pytest.raises(ValueError, match="weight"):
        ShardDataModule(train_shards=[ShardSource(urls, weight=0.0)], tokenizer=tokenizer_dir)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        ShardDataModule(train_shards=urls, tokenizer=tokenizer_dir, shuffle_buffer=-1)
