"""Synthetic dataset: every layout is written, in the documented format, deterministically."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlalign.data.synth import SynthSummary, write_synthetic
from vlalign.data.tokenization import load_tokenizer, tokenize_captions, vocab_info

SMALL = dict(num_train=40, num_val=10, num_test=10, image_size=32, samples_per_shard=20, progress=False)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    return write_synthetic(tmp_path_factory.mktemp("synth"), seed=3, **SMALL)


def _digest(root: Path) -> dict[str, str]:
    """Content hashes of every file, the tokenizer included, but pretrain.json (it holds absolute paths)."""
    files = [p for p in root.rglob("*") if p.is_file() and p.name != "pretrain.json"]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_writes_every_layout(synth: SynthSummary) -> None:
    root = synth.root
    assert synth.num_images == {"train": 40, "val": 10, "test": 10}
    assert synth.num_captions == {"train": 120, "val": 30, "test": 30}
    for split, count in synth.num_images.items():
        images = sorted((root / "images" / split).glob("*.jpg"))
        assert len(images) == count
        with Image.open(images[0]) as image:
            assert image.format == "JPEG" and image.size == (32, 32) and image.mode == "RGB"
    assert [p.name for p in synth.shards["train"]] == ["000000.tar", "000001.tar"]
    assert [p.name for p in synth.shards["val"]] == ["000000.tar"]
    assert all(p.is_file() for paths in synth.shards.values() for p in paths)
    assert synth.shard_urls("train").endswith("train/{000000..000001}.tar")
    assert (root / "README.txt").read_text().count("retrieval_train.json") == 1
    assert synth.hardneg_json == {split: root / f"hardneg_{split}.json" for split in ("val", "test")}
    tokenizer = load_tokenizer(synth.tokenizer_dir)
    assert vocab_info(tokenizer).cls_token_id == 2


def test_shard_members_follow_img2dataset_layout(synth: SynthSummary) -> None:
    keys = []
    for shard in synth.shards["train"]:
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            assert len(names) == 3 * 20
            by_key: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                handle = tar.extractfile(member)
                assert handle is not None
                by_key.setdefault(key, {})[ext] = handle.read()
        for key, parts in by_key.items():
            assert set(parts) == {"jpg", "txt", "json"}
            assert len(key) == 9 and key.isdigit()
            meta = json.loads(parts["json"])
            assert meta["key"] == key and meta["split"] == "train"
            assert (meta["width"], meta["height"]) == (32, 32)
            assert meta["caption"] == parts["txt"].decode() == meta["captions"][0]
            assert Image.open(io.BytesIO(parts["jpg"])).size == (32, 32)
            assert parts["jpg"] == (synth.image_root / "train" / f"{key}.jpg").read_bytes()
            keys.append(key)
    assert len(set(keys)) == 40


def test_json_layouts(synth: SynthSummary) -> None:
    pretrain = json.loads(synth.pretrain_json.read_text())
    assert len(pretrain) == 40
    for entry in pretrain:
        assert set(entry) == {"image", "caption"}
        assert Path(entry["image"]).is_absolute() and Path(entry["image"]).is_file()
        assert isinstance(entry["caption"], list) and len(entry["caption"]) == 3
        assert len(set(entry["caption"])) == 3

    train = json.loads(synth.retrieval_json["train"].read_text())
    assert len(train) == 120
    for entry in train:
        assert set(entry) == {"image", "caption", "image_id"}
        assert not Path(entry["image"]).is_absolute() and (synth.root / entry["image"]).is_file()
        assert isinstance(entry["caption"], str) and entry["image"] == f"images/train/{entry['image_id']}.jpg"

    for split in ("val", "test"):
        entries = json.loads(synth.retrieval_json[split].read_text())
        assert len(entries) == 10
        for entry in entries:
            assert set(entry) == {"image", "caption"}
            assert entry["image"].startswith(f"images/{split}/") and (synth.root / entry["image"]).is_file()
            assert len(entry["caption"]) == 3
        hardneg = json.loads(synth.hardneg_json[split].read_text())
        assert [e["image"] for e in hardneg] == [e["image"] for e in entries]
        for entry in hardneg:
            assert set(entry) == {"image", "positive", "negatives"} and isinstance(entry["positive"], str)
            assert entry["negatives"] and all(set(n) == {"type", "caption"} for n in entry["negatives"])


def test_captions_describe_the_scene_and_tokenize(synth: SynthSummary) -> None:
    captions = [c for entry in json.loads(synth.pretrain_json.read_text()) for c in entry["caption"]]
    colours = {"red", "green", "blue", "yellow", "orange", "purple", "pink", "black"}
    shapes = {"circle", "square", "triangle", "star"}
    for caption in captions:
        words = set(caption.replace(",", "").split())
        assert words & colours and words & shapes, caption
    assert len(set(captions)) > 0.7 * len(captions), "captions must tell images apart"
    tokenizer = load_tokenizer(synth.tokenizer_dir)
    ids, _ = tokenize_captions(tokenizer, captions, max_length=40)
    assert not (ids == vocab_info(tokenizer).unk_token_id).any()


def test_deterministic_under_seed_byte_for_byte_tokenizer_included(tmp_path: Path, synth: SynthSummary) -> None:
    """The same seed writes the same bytes, the tokenizer's files included (its vocabulary used to be numbered
    differently on every run, so a checkpoint could be evaluated with another run's token ids)."""
    again = write_synthetic(tmp_path / "again", seed=3, **SMALL)
    different = write_synthetic(tmp_path / "other", seed=4, **SMALL)
    reference = _digest(synth.root)
    tokenizer_files = [name for name in reference if name.startswith("tokenizer/")]
    assert "tokenizer/tokenizer.json" in tokenizer_files
    # images, shards, retrieval JSONs, hard-negative JSONs, README, downstream-task files
    task_files = {str(path.relative_to(synth.root)) for path in synth.task_files.values()}
    assert task_files <= reference.keys()
    assert len(reference) == 60 + 4 + 3 + 2 + 1 + len(tokenizer_files) + len(task_files)
    assert {"hardneg_val.json", "hardneg_test.json"} <= reference.keys()
    assert _digest(again.root) == reference

    # Every file, pretrain.json included: a second run into the same directory rewrites identical bytes.
    first = {p: p.read_bytes() for p in again.root.rglob("*") if p.is_file()}
    write_synthetic(again.root, seed=3, **SMALL)
    second = {p: p.read_bytes() for p in again.root.rglob("*") if p.is_file()}
    assert second.keys() == first.keys()
    assert [p.name for p in first if first[p] != second[p]] == []

    def relative(summary: SynthSummary) -> list[dict]:
        entries = json.loads(summary.pretrain_json.read_text())
        return [{**e, "image": str(Path(e["image"]).relative_to(summary.root))} for e in entries]

    assert relative(again) == relative(synth)
    assert _digest(different.root)["retrieval_test.json"] != reference["retrieval_test.json"]
    assert _digest(different.root)["hardneg_test.json"] != reference["hardneg_test.json"]
    reference_pixels = np.asarray(Image.open(synth.image_root / "train" / "000000000.jpg"))
    assert np.array_equal(reference_pixels, np.asarray(Image.open(again.image_root / "train" / "000000000.jpg")))
