"""JSON caption data module, retrieval evaluation batches and the shared base's configuration checks."""

from __future__ import annotations

import json
import re
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
from vlalign.errors import InputFileError, UserError

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
    """Relative paths resolve against data.image_root, by default the JSON file's directory; a file none of whose
    images is found there fails at setup with an example path and the image_root hint, while a file with a few
    missing images trains and counts them."""
    entries: list[dict[str, object]] = [{"image": "train/000000000.jpg", "caption": "a thing"}]
    train_file = write_json(tmp_path / "relative.json", entries)
    with pytest.raises(InputFileError, match=r"relative\.json: none of its 1 images is found, e\.g\. entry 0: .*"
                       r"train/000000000\.jpg.*data\.image_root"):  # fmt: skip
        json_module(synth, [train_file], batch_size=1)
    rooted = json_module(synth, [train_file], batch_size=1, image_root=str(synth.image_root))
    assert rooted.train_dataset is not None
    assert rooted.train_dataset[0].key == str(synth.image_root / "train/000000000.jpg")

    entries.append({"image": "train/gone.jpg", "caption": "a lost thing"})
    partly = json_module(synth, [write_json(tmp_path / "partly.json", entries)], image_root=str(synth.image_root))
    assert partly.train_dataset is not None
    assert partly.train_dataset[1] == SkippedSample(str(synth.image_root / "train/gone.jpg"), "missing_file")


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


# -- unusable caption lists fail at setup, naming the file -----------------------------------------------------------
BROKEN_LISTS = {
    "truncated": ('[{"image": "a.jpg", "caption": "x"}', r"invalid JSON at line 1, column \d+"),
    "trailing-comma": ('[\n {"image": "a.jpg", "caption": "x"},\n]', r"invalid JSON at line 3, column 1"),
    "empty-list": ("[]", r"the caption list is empty"),
    "object": ('{"image": "a.jpg"}', r"expected a JSON list of entries, got a JSON object"),
    "empty-file": ("", r"invalid JSON at line 1, column 1"),
}


@pytest.mark.parametrize("case", list(BROKEN_LISTS))
@pytest.mark.parametrize("role", ["train_files", "val_retrieval"])
def test_malformed_or_empty_caption_lists_name_the_file(
    synth: SynthSummary, tmp_path: Path, case: str, role: str
) -> None:
    text, expected = BROKEN_LISTS[case]
    broken = tmp_path / f"{case}.json"
    broken.write_text(text)
    train = str(broken) if role == "train_files" else str(synth.pretrain_json)
    module = JsonCaptionDataModule(
        train_files=[train], tokenizer=str(synth.tokenizer_dir), image_size=IMAGE_SIZE, num_workers=0,
        val_retrieval=str(broken) if role == "val_retrieval" else None,
    )  # fmt: skip
    with pytest.raises(InputFileError, match=re.escape(str(broken)) + ": " + expected) as info:
        module.setup("fit")
    assert isinstance(info.value, UserError) and "Traceback" not in str(info.value)


def test_retrieval_file_with_images_not_found_fails_at_setup_with_the_image_root_hint(
    synth: SynthSummary, tmp_path: Path
) -> None:
    """A Karpathy JSON copied away from its images: every image is checked at setup; one message names the file,
    how many are missing, an example path and data.image_root. With image_root set, the same file works."""
    moved = tmp_path / "retrieval_test.json"
    moved.write_text(synth.retrieval_json["test"].read_text())
    module = json_module(synth, [str(synth.pretrain_json)], test_retrieval=str(moved))
    with pytest.raises(InputFileError) as info:
        module.setup("test")
    message = str(info.value)
    assert message.startswith(f"{moved}: 4 of its 4 images are not found, e.g. entry 0: {tmp_path}/images/test/")
    assert "data.image_root" in message and "--data.init_args.image_root" in message

    rooted = json_module(synth, [str(synth.pretrain_json)], test_retrieval=str(moved), image_root=str(synth.root))
    rooted.setup("test")
    assert rooted.test_dataset is not None and rooted.test_dataset.num_images == 4

    entries = json.loads(moved.read_text())
    (synth.root / entries[2]["image"]).rename(tmp_path / "elsewhere.jpg")  # one image of four goes missing
    try:
        one_missing = JsonCaptionDataModule(
            train_files=[str(synth.pretrain_json)], tokenizer=str(synth.tokenizer_dir), image_size=IMAGE_SIZE,
            val_retrieval=str(moved), image_root=str(synth.root),
        )  # fmt: skip
        with pytest.raises(InputFileError, match=r"1 of its 4 images is not found, e\.g\. entry 2: "):
            one_missing.setup("validate")
    finally:
        (tmp_path / "elsewhere.jpg").rename(synth.root / entries[2]["image"])


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            {"image": "images/test/x.jpg", "caption": []},
            r"entry 1 \(images/test/x\.jpg\) has no caption .*an empty list",
        ),
        ({"image": "images/test/x.jpg"}, r"entry 1 \(images/test/x\.jpg\) has no caption .*no 'caption' key"),
        ({"image": "images/test/x.jpg", "caption": ["ok", 3]}, r"entry 1 .* has no caption"),
        ({"caption": ["a caption"]}, r"entry 1 has no image path .*no 'image' key"),
        ("just a string", r"entry 1 has no image path .*a JSON string instead of an object"),
    ],
)
def test_retrieval_entries_without_captions_or_image_name_the_file_and_entry(
    synth: SynthSummary, tmp_path: Path, entry: object, expected: str
) -> None:
    first = json.loads(synth.retrieval_json["test"].read_text())[0]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([first, entry]))
    module = json_module(synth, [str(synth.pretrain_json)], test_retrieval=str(path), image_root=str(synth.root))
    with pytest.raises(InputFileError, match=re.escape(str(path)) + ": " + expected):
        module.setup("test")


def test_caption_list_smaller_than_one_batch_names_the_files(synth: SynthSummary, tmp_path: Path) -> None:
    images = sorted((synth.image_root / "train").glob("*.jpg"))[:3]
    small = write_json(tmp_path / "small.json", [{"image": str(p), "caption": "a shape"} for p in images])
    module = json_module(synth, [small], batch_size=4)
    with pytest.raises(InputFileError, match=r"small\.json.*: 3 entries, fewer than one batch of data\.batch_size 4"):
        module.train_dataloader()


def test_undecodable_evaluation_image_names_the_file_and_entry(synth: SynthSummary, tmp_path: Path) -> None:
    """An evaluation image that exists but does not decode fails the evaluation (dropping it would change the
    recall), with an error naming the JSON file, the entry and the image."""
    (tmp_path / "images").mkdir()
    good = json.loads(synth.retrieval_json["test"].read_text())[0]
    (tmp_path / good["image"]).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / good["image"]).write_bytes((synth.root / good["image"]).read_bytes())
    (tmp_path / "images" / "junk.jpg").write_bytes(b"<html>not an image</html>")
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([good, {"image": "images/junk.jpg", "caption": ["a shape"]}]))
    module = json_module(synth, [str(synth.pretrain_json)], test_retrieval=str(path), eval_batch_size=1)
    module.setup("test")
    loader = iter(module.test_dataloader())
    assert next(loader)["image"].shape[0] == 1
    with pytest.raises(InputFileError, match=re.escape(f"{path}: entry 1: image {tmp_path}/images/junk.jpg: ")):
        next(loader)
