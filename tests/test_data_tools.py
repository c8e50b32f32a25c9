"""``vlalign data convert`` and ``vlalign data tokenizer``: clear failures with the fix, honest summaries, and a
deterministic tokenizer for one's own captions that ``data.tokenizer`` can load."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from vlalign.cli.main import main
from vlalign.data.captions import read_captions
from vlalign.data.json_to_shards import MAX_ENTRY_WARNINGS, json_to_shards
from vlalign.data.text import pre_caption
from vlalign.data.tokenization import (
    caption_coverage,
    learn_wordpiece_vocab,
    load_tokenizer,
    tokenize_captions,
    train_caption_tokenizer,
    vocab_info,
)
from vlalign.errors import InputFileError


def _moved_list(synth_data: Path, tmp_path: Path, count: int | None = None) -> Path:
    """The synthetic val retrieval list copied away from its images (relative paths now resolve to nothing)."""
    entries = json.loads((synth_data / "retrieval_val.json").read_text())[:count]
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(entries))
    return moved


# -- data convert ----------------------------------------------------------------------------------------------------
def test_convert_with_no_image_found_fails_with_one_message_and_writes_nothing(
    synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Images not found under the default root: exit status 2, one ``error:`` naming an example path and
    ``--image_root``, a few per-entry warnings then a count, and no output directory or empty shard left behind."""
    moved = _moved_list(synth_data, tmp_path)
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING, logger="vlalign.data.json_to_shards"):
        status = main(["data", "convert", "--json_files", f"[{moved}]", "--out", str(out), "--progress", "false"])
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert f"e.g. {moved} entry 0: {tmp_path}/images/val/" in err and "--image_root DIR" in err
    assert "16 of 16 entries have no image file" in err and "No shard was written" in err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == MAX_ENTRY_WARNINGS + 1
    assert warnings[-1].startswith(f"... and {16 - MAX_ENTRY_WARNINGS} more skipped entries")
    assert not out.exists()

    summary = json_to_shards([str(moved)], str(out), image_root=str(synth_data), progress=False)
    assert summary.written == 48 and summary.skipped_entries == 0 and len(summary.shards) == 1


def test_convert_counts_skipped_entries_in_its_summary(synth_data: Path, tmp_path: Path) -> None:
    entries = json.loads((synth_data / "retrieval_val.json").read_text())[:6]
    entries[1]["image"] = "images/val/gone.jpg"
    entries[2]["caption"] = []
    entries[3] = {"caption": "no image"}
    entries[4]["caption"] = ["a caption", "   "]
    source = synth_data / "partly_broken.json"  # next to the images, so relative paths resolve
    source.write_text(json.dumps(entries))
    try:
        summary = json_to_shards([str(source)], str(tmp_path / "out"), progress=False)
    finally:
        source.unlink()
    assert (summary.skipped_missing_file, summary.skipped_bad_entry, summary.skipped_empty_caption) == (1, 2, 1)
    assert summary.written == 3 + 1 + 3  # entries 0 and 5 with three captions, entry 4 with one non-empty
    text = str(summary)
    assert "wrote 7 samples from 3 entries" in text
    assert "skipped 3 of 6 entries (1 image not found, 2 without an image path or caption) and 1 empty captions" in text
    keys = [sample["__key__"] for sample in wds.WebDataset(summary.shards[0], shardshuffle=False)]
    assert len(keys) == 7


def test_convert_refuses_an_output_directory_with_shards_unless_overwriting(synth_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = json_to_shards([str(synth_data / "retrieval_test.json")], str(out), samples_per_shard=20, progress=False)
    assert len(first.shards) == 3  # 48 samples
    with pytest.raises(InputFileError, match=r"already holds 3 shard\(s\).*--overwrite true"):
        json_to_shards([str(synth_data / "retrieval_val.json")], str(out), progress=False)
    second = json_to_shards([str(synth_data / "retrieval_val.json")], str(out), overwrite=True, progress=False)
    assert [Path(s).name for s in second.shards] == ["000000.tar"]  # no stale shard of the first run is left


def test_convert_names_a_malformed_json_list(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image": "a.jpg", "caption": "x"},\n{"image": ]')
    with pytest.raises(InputFileError, match=rf"{broken}: invalid JSON at line 2, column 11"):
        json_to_shards([str(broken)], str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


# -- data tokenizer --------------------------------------------------------------------------------------------------
FOREIGN = [
    "Ein Hund läuft über die Wiese",
    "A cyclist rides past a café on a rainy boulevard.",
    "Two children build a sandcastle near the pier",
    "un gato duerme sobre el sofá",
    "a jazz quartet plays in København",  # j, z and ø are in no synthetic caption
] * 5


def test_tokenizer_command_trains_on_json_shards_and_text_and_reports_coverage(
    synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text_file = tmp_path / "captions.txt"
    text_file.write_text("\n".join(FOREIGN) + "\n\n")
    shards = str(synth_data / "shards" / "train" / "{000000..000001}.tar")
    out = tmp_path / "tok"
    sources = f"[{synth_data / 'retrieval_val.json'}, '{shards}', {text_file}]"
    status = main(["data", "tokenizer", "--captions", sources, "--out", str(out), "--vocab_size", "400",
                   "--max_length", "8", "--compare", str(synth_data / "tokenizer")])  # fmt: skip
    assert status == 0
    report = capsys.readouterr().out
    corpus = read_captions([str(synth_data / "retrieval_val.json"), shards, str(text_file)])
    assert len(corpus.files) == 4 and corpus.skipped == 1  # the blank line
    assert len(corpus.captions) == 48 + 80 + len(FOREIGN)
    assert f"trained on {len(corpus.captions)} captions from 4 file(s)" in report
    assert "on these captions: [UNK] 0.00% of" in report
    assert f"{synth_data / 'tokenizer'} on the same captions: [UNK] " in report
    assert f"--data.init_args.tokenizer {out}" in report

    tokenizer = load_tokenizer(out)  # what data.tokenizer loads
    info = vocab_info(tokenizer)
    assert (info.pad_token_id, info.unk_token_id, info.cls_token_id, info.sep_token_id, info.mask_token_id) == (
        0, 1, 2, 3, 4,
    )  # fmt: skip
    ids, _ = tokenize_captions(tokenizer, [pre_caption(c) for c in FOREIGN], max_length=40)
    assert not (ids == info.unk_token_id).any()
    # The synthetic tokenizer has never seen "j", "z" or "ø": the comparison shows its [UNK]s.
    assert caption_coverage(load_tokenizer(synth_data / "tokenizer"), FOREIGN, 25).unk_tokens == 3 * 5


def test_tokenizer_coverage_counts_unknown_pieces_and_truncated_captions(synth_data: Path) -> None:
    tokenizer = load_tokenizer(synth_data / "tokenizer")
    coverage = caption_coverage(tokenizer, ["a red circle", "a red circle on the left " * 3, "ø ø"], max_length=6)
    assert (coverage.captions, coverage.unk_tokens, coverage.truncated) == (3, 2, 1)
    assert coverage.tokens == 3 + 18 + 2 and coverage.longest == 18
    assert "[UNK] 8.70% of 23 tokens; 33.33% of 3 captions truncated at max_length 6" in str(coverage)


def test_tokenizer_command_is_deterministic_byte_for_byte(synth_data: Path, tmp_path: Path) -> None:
    sources = [str(synth_data / "pretrain.json")]
    first = train_caption_tokenizer(sources, str(tmp_path / "a"), vocab_size=300, min_frequency=1)
    second = train_caption_tokenizer(sources, str(tmp_path / "b"), vocab_size=300, min_frequency=1)
    files = sorted(p.name for p in first.out.iterdir())
    assert "tokenizer.json" in files and files == sorted(p.name for p in second.out.iterdir())
    for name in files:
        assert (first.out / name).read_bytes() == (second.out / name).read_bytes(), name


def test_wordpiece_vocabulary_breaks_ties_by_text_not_by_hash_order() -> None:
    """Equal counts everywhere: the order is by frequency, then text, whatever order the words come in."""
    counts = {"ab": 2, "ba": 2, "cd": 2, "dc": 2}
    vocab = learn_wordpiece_vocab(counts, vocab_size=30, special_tokens=["[UNK]"])
    assert vocab == learn_wordpiece_vocab(dict(reversed(list(counts.items()))), 30, special_tokens=["[UNK]"])
    assert vocab[:5] == ["[UNK]", "a", "b", "c", "d"]
    assert vocab[5:9] == ["##a", "##b", "##c", "##d"]
    assert vocab[9:] == ["ab", "ba", "cd", "dc"]  # four merges of count 2, in text order
    assert learn_wordpiece_vocab(counts, vocab_size=30, min_frequency=3, special_tokens=["[UNK]"]) == vocab[:9]


def test_tokenizer_command_refuses_to_replace_a_tokenizer_and_names_unusable_sources(
    synth_data: Path, tmp_path: Path
) -> None:
    with pytest.raises(InputFileError, match=r"already holds a tokenizer.*--overwrite true"):
        train_caption_tokenizer([str(synth_data / "pretrain.json")], str(synth_data / "tokenizer"))
    with pytest.raises(InputFileError, match=r"--captions: .*absent\.txt does not exist"):
        train_caption_tokenizer([str(tmp_path / "absent.txt")], str(tmp_path / "tok"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(InputFileError, match=rf"{empty}: no caption found \(2 empty or unusable\)"):
        train_caption_tokenizer([str(empty)], str(tmp_path / "tok"))
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(InputFileError, match=rf"{broken}: not a readable tar shard"):
        train_caption_tokenizer([str(broken)], str(tmp_path / "tok"))
    assert not (tmp_path / "tok").exists()


def test_shard_captions_fall_back_to_the_json_caption(tmp_path: Path) -> None:
    path = tmp_path / "meta.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "a", "jpg": b"x", "txt": "from the txt"})
        sink.write({"__key__": "b", "jpg": b"x", "json": {"caption": "from the json"}})
        sink.write({"__key__": "c", "jpg": b"x"})
    with tarfile.open(path) as tar:
        assert len(tar.getnames()) == 5
    corpus = read_captions(str(path))
    assert corpus.captions == ["from the txt", "from the json"] and corpus.skipped == 0
