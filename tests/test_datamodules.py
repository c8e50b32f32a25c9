"""JSON caption data module, retrieval evaluation batches and the shared base's configuration checks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from jsonargparse import ArgumentParser

from vlalign.data.synth import SynthSummary, write_synthetic
from vlalign.data.text import pre_caption
from vlalign.datamodules import JsonCaptionDataModule, ShardDataModule, ShardSource
from vlalign.datamodules.collate import SkippedSample

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    return write_synthetic(
        tmp_path_factory.mktemp("synth"),
        num_train=12,
        num_val=5,
        num_test=4,
        image_size=24,
        captions_per_image=3,
        samples_per_shard=6,
        tokenizer_vocab_size=150,
        progress=False,
    )


def json_module(synth: SynthSummary, train_files: list[str], **overrides: Any) -> JsonCaptionDataModule:
    options: dict[str, Any] = dict(image_size=IMAGE_SIZE, batch_size=4, num_workers=0)
    options.update(overrides)
    module = JsonCaptionDataModule(train_files=train_files, tokenizer=str(synth.tokenizer_dir), **options)
    module.setup("fit")
    return module


def write_json(path: Path, entries: list[dict[str, object]]) -> str:
    path.write_text(json.dumps(entries))
    return str(path)


def test_json_captions_as_string_and_list(synth: SynthSummary, tmp_path: Path) -> None:
    images = sorted((synth.image_root / "train").glob("*.jpg"))
    listed = ["a red circle", "a blue square", "a green star"]
    entries: list[dict[str, object]] = [{"image": str(images[0]), "caption": "One Yellow Triangle."}]
    entries += [{"image": str(image), "caption": listed} for image in images[1:4]]
    module = json_module(synth, [write_json(tmp_path / "train.json", entries)], batch_size=4)
    dataset = module.train_dataset
    assert dataset is not None and len(dataset) == 4
    assert dataset[0].caption == "one yellow triangle"
    drawn = {dataset[1].caption for _ in range(40)}
    assert drawn == {pre_caption(c) for c in listed}, "a caption list should yield each of its captions"

    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 4
    assert batch["input_ids"].shape[1] <= module.max_length
    assert batch["skipped"] == {}
    assert sorted(batch["keys"]) == sorted(str(path) for path in images[:4])


def test_json_bad_entries_are_skipped_and_counted(synth: SynthSummary, tmp_path: Path) -> None:
    good = sorted((synth.image_root / "train").glob("*.jpg"))[:3]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image at all")
    entries: list[dict[str, object]] = [{"image": str(path), "caption": "a shape"} for path in good]
    entries += [
        {"image": str(tmp_path / "missing.jpg"), "caption": "a missing picture"},
        {"image": str(corrupt), "caption": "a corrupt picture"},
        {"image": str(good[0]), "caption": "?!"},
        {"image": str(good[1]), "caption": []},
    ]
    module = json_module(synth, [write_json(tmp_path / "bad.json", entries)], batch_size=len(entries))
    batches = list(module.train_dataloader())
    assert len(batches) == 1
    batch = batches[0]
    assert batch["skipped"] == {"missing_file": 1, "decode_error": 1, "empty_caption": 1, "missing_caption": 1}
    assert batch["image"].shape[0] == 3 and len(batch["keys"]) == 3
    assert sorted(batch["keys"]) == sorted(str(path) for path in good)


def test_relative_json_paths_resolve_against_image_root(synth: SynthSummary, tmp_path: Path) -> None:
    entries: list[dict[str, object]] = [{"image": "train/000000000.jpg", "caption": "a thing"}]
    train_file = write_json(tmp_path / "relative.json", entries)
    counted = json_module(synth, [train_file], batch_size=1)
    assert counted.train_dataset is not None
    assert counted.train_dataset[0] == SkippedSample(str(tmp_path / "train/000000000.jpg"), "missing_file")
    rooted = json_module(synth, [train_file], batch_size=1, image_root=str(synth.image_root))
    assert rooted.train_dataset is not None
    assert rooted.train_dataset[0].key == str(synth.image_root / "train/000000000.jpg")


def test_json_tokenizer_view_and_patch_mask(synth: SynthSummary) -> None:
    module = json_module(synth, [str(synth.pretrain_json)], tokenizer_view_size=8, mask_patch_size=4)
    batch = next(iter(module.train_dataloader()))
    assert batch["tokenizer_view"].shape == (4, 3, 8, 8)
    assert batch["patch_mask"].shape == (4, (IMAGE_SIZE // 4) ** 2) and batch["patch_mask"].dtype == torch.bool
    assert bool(batch["patch_mask"].any())


@pytest.mark.parametrize("split", ["val", "test"])
def test_retrieval_batches_map_captions_to_images(synth: SynthSummary, split: str) -> None:
    module = json_module(
        synth,
        [str(synth.pretrain_json)],
        eval_batch_size=2,
        eval_max_length=12,
        **{f"{split}_retrieval": str(synth.retrieval_json[split])},
    )
    module.setup(split if split == "test" else "validate")
    loader = module.val_dataloader() if split == "val" else module.test_dataloader()
    entries = json.loads(synth.retrieval_json[split].read_text())
    dataset = loader.dataset
    seen_images: list[int] = []
    seen_texts: list[int] = []
    for batch in loader:
        texts = batch["text_index"].tolist()
        owners = batch["text_image_index"].tolist()
        assert set(owners) <= set(batch["image_index"].tolist())
        for text, owner in zip(texts, owners, strict=True):
            position = dataset.image_text_index[owner].index(text)
            assert dataset.captions[text] == pre_caption(entries[owner]["caption"][position])
        assert batch["input_ids"].shape == (len(texts), 12) and batch["attention_mask"].shape == (len(texts), 12)
        assert batch["image"].shape == (batch["image_index"].shape[0], 3, IMAGE_SIZE, IMAGE_SIZE)
        seen_images += batch["image_index"].tolist()
        seen_texts += texts
    assert sorted(seen_images) == list(range(synth.num_images[split]))
    assert sorted(seen_texts) == list(range(synth.num_captions[split]))


def test_no_retrieval_file_means_no_evaluation_loader(synth: SynthSummary) -> None:
    module = json_module(synth, [str(synth.pretrain_json)])
    assert module.val_dataloader() == [] and module.test_dataloader() == []


def test_vocab_comes_from_the_tokenizer(synth: SynthSummary) -> None:
    module = json_module(synth, [str(synth.pretrain_json)])
    vocab = module.vocab
    assert vocab.vocab_size == len(module.tokenizer)
    assert module.tokenizer.convert_ids_to_tokens(vocab.cls_token_id) == "[CLS]"


def test_configuration_errors_name_the_key_or_path(synth: SynthSummary, tmp_path: Path) -> None:
    tokenizer = str(synth.tokenizer_dir)
    train = [str(synth.pretrain_json)]
    with pytest.raises(ValueError, match="mask_patch_size"):
        JsonCaptionDataModule(train_files=train, tokenizer=tokenizer, image_size=32, mask_patch_size=5)
    with pytest.raises(ValueError, match="batch_size"):
        JsonCaptionDataModule(train_files=train, tokenizer=tokenizer, batch_size=0)
    with pytest.raises(FileNotFoundError, match="no-tokenizer"):
        JsonCaptionDataModule(train_files=train, tokenizer=str(tmp_path / "no-tokenizer"))
    with pytest.raises(FileNotFoundError, match="train_files.*absent.json"):
        JsonCaptionDataModule(train_files=[str(tmp_path / "absent.json")], tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match="val_retrieval.*nope.json"):
        JsonCaptionDataModule(train_files=train, tokenizer=tokenizer, val_retrieval=str(tmp_path / "nope.json"))


def test_shard_sources_parse_from_config(synth: SynthSummary) -> None:
    parser = ArgumentParser()
    parser.add_class_arguments(ShardDataModule, "data")
    urls = synth.shard_urls("train")
    config = parser.parse_object(
        {
            "data": {
                "tokenizer": str(synth.tokenizer_dir),
                "train_shards": [{"urls": urls, "weight": 2.0}],
                "batch_size": 2,
                "image_size": IMAGE_SIZE,
                "mask_patch_size": 8,
                "num_workers": 0,
                "shuffle_buffer": 0,
            }
        }
    )
    module = parser.instantiate_classes(config).data
    assert isinstance(module, ShardDataModule)
    assert module.sources == [ShardSource(urls=urls, weight=2.0)]
    assert (module.batch_size, module.mask_patch_size) == (2, 8)
    keys = Counter(key for batch in module.train_dataloader() for key in batch["keys"])
    assert len(keys) == synth.num_images["train"] and set(keys.values()) == {1}
