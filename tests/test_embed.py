"""``vlalign embed``: images (folder, JSON list, shards) and captions (JSON list, text file) → ``.npy`` + key files,
corrupt images skipped and listed, and no output at all when a run fails."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import vlalign
from vlalign.api import SPEC_KEY, VisionLanguageModel
from vlalign.cli.inference import EMBED_OUTPUTS, embed, embed_command
from vlalign.data.preprocessing import Preprocessing, tokenizer_files
from vlalign.data.tokenization import load_tokenizer, vocab_info
from vlalign.errors import InputFileError

TOL = 1e-6


@pytest.fixture(scope="module")
def model_ckpt(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ITC + ITM recipe (32 px) saved as a self-describing checkpoint, without a Trainer."""
    from vlalign.testing import tiny_recipe

    tokenizer = load_tokenizer(synth_data / "tokenizer")
    recipe = tiny_recipe("itc_itm", vocab=vocab_info(tokenizer))
    spec = recipe.model_spec()
    spec["preprocessing"] = Preprocessing(image_size=32, tokenizer_files=tokenizer_files(tokenizer)).to_dict()
    path = tmp_path_factory.mktemp("embed_model") / "model.ckpt"
    torch.save({"state_dict": recipe.state_dict(), SPEC_KEY: spec, "global_step": 0, "epoch": 0}, path)
    return path


@pytest.fixture(scope="module")
def model(model_ckpt: Path) -> VisionLanguageModel:
    return vlalign.load(model_ckpt)


@pytest.fixture()
def image_folder(synth_data: Path, tmp_path: Path) -> Path:
    """Five test images in a nested folder plus a corrupt JPEG and a non-image file."""
    folder = tmp_path / "photos"
    sources = sorted((synth_data / "images" / "test").glob("*.jpg"))[:5]
    for index, source in enumerate(sources):
        target = folder / ("b" if index % 2 else "a") / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    (folder / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def read_output(out: Path, kind: str) -> tuple[np.ndarray, list[str]]:
    rows = np.load(out / f"{kind}_embeddings.npy")
    keys = (out / f"{kind}_keys.txt").read_text().splitlines()
    assert rows.dtype == np.float32 and rows.shape[0] == len(keys)
    return rows, keys


def test_embed_folder_skips_a_corrupt_image_lists_it_and_writes_the_rest(
    model_ckpt: Path, model: VisionLanguageModel, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "emb"
    embed_command(["--model", str(model_ckpt), "--images", str(image_folder), "--out", str(out), "--batch_size", "2"])
    rows, keys = read_output(out, "image")
    expected_keys = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.jpg"))
    expected_keys.remove("a/broken.jpg")
    assert keys == expected_keys and rows.shape == (5, model.embed_dim)
    for row, key in zip(rows, keys, strict=True):  # each row is the embedding of the file its key names
        torch.testing.assert_close(torch.from_numpy(row), model.encode_image([image_folder / key])[0], atol=TOL, rtol=0)
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith("a/broken.jpg\tdecode_error")
    assert not (out / "text_embeddings.npy").exists()
    assert sorted(p.name for p in out.iterdir()) == ["image_embeddings.npy", "image_keys.txt", "skipped.txt"]
    assert "embedded 5 images (dim 16), 1 skipped" in capsys.readouterr().out


def test_embed_captions_from_a_json_list(model: VisionLanguageModel, synth_data: Path, tmp_path: Path) -> None:
    captions = tmp_path / "captions.json"
    entries = json.loads((synth_data / "retrieval_test.json").read_text())[:3]
    entries[1]["caption"] = "one caption as a string"
    entries.append({"image": "x.jpg"})  # no caption: skipped and listed
    captions.write_text(json.dumps(entries))
    summary = embed(model, tmp_path / "emb", captions=str(captions), progress=False)
    rows, keys = read_output(tmp_path / "emb", "text")
    texts = [*entries[0]["caption"], entries[1]["caption"], *entries[2]["caption"]]
    assert keys == [f"0:{j}" for j in range(len(entries[0]["caption"]))] + ["1:0"] + [
        f"2:{j}" for j in range(len(entries[2]["caption"]))
    ]
    torch.testing.assert_close(torch.from_numpy(rows), model.encode_text(texts), atol=TOL, rtol=0)
    assert summary.texts == len(texts)
    assert (tmp_path / "emb" / "skipped.txt").read_text().startswith("captions.json entry 3\tno caption")


def test_embed_captions_from_a_text_file(model: VisionLanguageModel, tmp_path: Path) -> None:
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\n\n  \ntwo blue squares, side by side\nA Yellow Star!\n")
    embed(model, tmp_path / "emb", captions=str(captions), batch_size=2, progress=False)
    rows, keys = read_output(tmp_path / "emb", "text")
    assert keys == ["1", "4", "5"]  # line numbers; blank lines are no captions
    expected = model.encode_text(["a red circle", "two blue squares, side by side", "A Yellow Star!"])
    torch.testing.assert_close(torch.from_numpy(rows), expected, atol=TOL, rtol=0)


def test_embed_images_from_a_json_list_and_from_shards_agree(
    model: VisionLanguageModel, synth_data: Path, tmp_path: Path
) -> None:
    listed = synth_data / "retrieval_test.json"
    embed(model, tmp_path / "json", images=str(listed), captions=str(listed), progress=False)
    json_rows, json_keys = read_output(tmp_path / "json", "image")
    entries = json.loads(listed.read_text())
    assert json_keys == [entry["image"] for entry in entries]  # keys: the list's image paths, each image once
    assert read_output(tmp_path / "json", "text")[0].shape[0] == sum(len(e["caption"]) for e in entries)

    shards = str(synth_data / "shards" / "test" / "{000000..000000}.tar")
    embed_command(["--model", str(model.source), "--images", shards, "--out", str(tmp_path / "shards")])
    shard_rows, shard_keys = read_output(tmp_path / "shards", "image")
    by_key = dict(zip(shard_keys, shard_rows, strict=True))
    assert sorted(by_key) == sorted(Path(key).stem for key in json_keys)
    for key, row in zip(json_keys, json_rows, strict=True):
        np.testing.assert_allclose(by_key[Path(key).stem], row, atol=TOL)


def test_embed_with_nothing_valid_exits_with_an_error(model_ckpt: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "one.jpg").write_bytes(b"garbage")
    (folder / "two.png").write_bytes(b"")
    out = tmp_path / "emb"
    with pytest.raises(InputFileError, match=r"no image could be embedded \(skipped 2: one.jpg: decode_error"):
        embed_command(["--model", str(model_ckpt), "--images", str(folder), "--out", str(out)])
    assert not out.exists() or not any(out.iterdir())
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="holds no images"):
        embed(model_ckpt, out, images=str(tmp_path / "empty"))
    with pytest.raises(InputFileError, match="does not exist or is not an image source"):
        embed(model_ckpt, out, images=str(tmp_path / "nowhere"))
    with pytest.raises(InputFileError, match="give --images and/or --captions"):
        embed(model_ckpt, out)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(InputFileError, match="holds no caption"):
        embed(model_ckpt, out, captions=str(tmp_path / "empty.txt"), progress=False)
    assert not out.exists() or not any(out.iterdir())


def test_a_run_failing_mid_way_leaves_no_output(
    model: VisionLanguageModel, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "emb"
    out.mkdir()
    original = VisionLanguageModel.encode_image
    calls = {"n": 0}

    def failing(self: VisionLanguageModel, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("simulated failure after the first batch")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VisionLanguageModel, "encode_image", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        embed(model, out, images=str(image_folder), batch_size=2, progress=False)
    assert calls["n"] == 2 and list(out.iterdir()) == []

    def failing_write(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(VisionLanguageModel, "encode_image", original)
    monkeypatch.setattr(np, "save", failing_write)  # fails while the outputs are being written
    with pytest.raises(OSError, match="disk full"):
        embed(model, out, images=str(image_folder), batch_size=2, progress=False)
    assert list(out.iterdir()) == []


def test_embed_refuses_earlier_outputs_unless_told_to_overwrite(
    model: VisionLanguageModel, image_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "emb"
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\n")
    embed(model, out, images=str(image_folder), captions=str(captions), progress=False)
    with pytest.raises(InputFileError, match="already holds image_embeddings.npy.*--overwrite true"):
        embed(model, out, captions=str(captions), progress=False)
    embed(model, out, captions=str(captions), overwrite=True, progress=False)
    # the images of the first run no longer belong with these outputs: removed, not left stale
    assert sorted(p.name for p in out.iterdir()) == sorted(n for n in EMBED_OUTPUTS if not n.startswith("image"))
