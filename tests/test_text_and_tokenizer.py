"""Caption normalisation, left/right swapping, WordPiece training and reference-style tokenisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlalign.data.text import pre_caption, swap_left_right
from vlalign.data.tokenization import VocabInfo, load_tokenizer, tokenize_captions, train_wordpiece, vocab_info

CORPUS = [
    "a red circle to the left of a blue square",
    "there is a small green triangle at the top",
    "a large yellow star on the right",
    "two shapes on a white background a black circle and a pink square",
] * 10


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A Dog, Running!", "a dog running"),
        ('the man\'s hat (red) * # : ; ~ "ok"?', "the mans hat red ok"),
        ("well-known black/white photo", "well known black white photo"),
        ("<person> rides a horse", "person rides a horse"),
        ("<PERSON> waves", "person waves"),
        ("   lots    of   spaces  \n", "lots of spaces"),
        ("tab\t\tseparated", "tab separated"),
        ("a - b", "a b"),
    ],
)
def test_pre_caption_matches_reference_rules(raw: str, expected: str) -> None:
    assert pre_caption(raw) == expected


def test_pre_caption_keeps_first_max_words() -> None:
    words = [f"w{i}" for i in range(40)]
    assert pre_caption(" ".join(words)) == " ".join(words[:30])
    assert pre_caption(" ".join(words), max_words=5) == "w0 w1 w2 w3 w4"
    assert pre_caption("short caption", max_words=5) == "short caption"


def test_swap_left_right() -> None:
    assert swap_left_right("a cat on the left of a dog on the right") == "a cat on the right of a dog on the left"
    assert swap_left_right("Left hand and Right foot") == "Right hand and Left foot"
    assert swap_left_right("LEFT-handed, bright leftover") == "RIGHT-handed, bright leftover"
    assert swap_left_right(swap_left_right("left right left")) == "left right left"
    assert swap_left_right("nothing to swap") == "nothing to swap"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_wordpiece(CORPUS, tmp_path_factory.mktemp("tok"), vocab_size=120)


def test_train_and_load_round_trip(tokenizer_dir: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_dir)
    info = vocab_info(tokenizer)
    assert isinstance(info, VocabInfo)
    assert (info.pad_token_id, info.unk_token_id, info.cls_token_id, info.sep_token_id, info.mask_token_id) == (
        0,
        1,
        2,
        3,
        4,
    )
    assert 5 < info.vocab_size <= 120
    assert tokenizer.tokenize("A RED Circle") == ["a", "red", "circle"]
    assert tokenizer.convert_tokens_to_ids("[MASK]") == 4
    # Special tokens written in text are recognised (the VQA answers rely on "[SEP]").
    assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize("red [SEP]"))[-1] == 3


def test_train_wordpiece_is_deterministic_and_lowercase_is_an_option(tmp_path: Path) -> None:
    """Two trainings on the same texts write identical files (the Hugging Face trainer numbered the vocabulary by
    hash order, differently on every run); ``lowercase=False`` keeps case and accents."""
    first = train_wordpiece(CORPUS, tmp_path / "a", vocab_size=120)
    second = train_wordpiece(list(reversed(CORPUS)), tmp_path / "b", vocab_size=120)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    cased = load_tokenizer(train_wordpiece(["Red Circle", "Café"], tmp_path / "cased", vocab_size=60, lowercase=False))
    assert cased.tokenize("Red Café") == ["Red", "Café"]
    assert load_tokenizer(first).tokenize("Red") == ["red"]


def test_tokenize_captions_reference_encoding(tokenizer_dir: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_dir)
    texts = ["a red circle to the left of a blue square", "green", ""]
    ids, mask = tokenize_captions(tokenizer, texts, max_length=6)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.shape == mask.shape == (3, 6)
    assert torch.all(ids[:, 0] == 2)
    assert not torch.any(ids == 3), "no [SEP] in the reference encoding"
    assert mask.sum(1).tolist() == [6, 2, 1]
    assert torch.all(ids[mask == 0] == 0)
    pieces = tokenizer(["green"], add_special_tokens=False)["input_ids"][0]
    assert ids[1, 1 : 1 + len(pieces)].tolist() == pieces
    full = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    assert ids[0, 1:].tolist() == full[:5]


def test_tokenize_captions_padding_modes(tokenizer_dir: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_dir)
    ids, mask = tokenize_captions(tokenizer, ["a red circle", "star"], max_length=30)
    assert ids.shape[1] == int(mask.sum(1).max()) < 30
    ids, mask = tokenize_captions(tokenizer, ["a red circle", "star"], max_length=30, padding="max_length")
    assert ids.shape == (2, 30)
    assert mask[:, 0].tolist() == [1, 1] and mask[:, -1].tolist() == [0, 0]


def test_load_tokenizer_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_tokenizer(missing)


def test_load_tokenizer_rejects_tokenizer_without_specials(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        load_tokenizer(tmp_path)
