"""Tokenizer loading, on-the-fly WordPiece training and reference-style caption tokenisation.

The reference (ALBEF/SIMLA) encodes one caption as ``[CLS] word-pieces`` with no trailing ``[SEP]``
(docs/method.md §4.1); imported checkpoints expect exactly that, so it is what :func:`tokenize_captions` does.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from torch import Tensor
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase, PreTrainedTokenizerFast


@dataclass(frozen=True)
class VocabInfo:
    """What the model needs to know about the tokenizer: sizes and special ids.

    The data module owns the tokenizer and exposes this; the CLI links it into the model at instantiation.
    """

    vocab_size: int = 30522
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103
    unk_token_id: int = 100

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id)


_REQUIRED_SPECIALS = ("cls_token", "pad_token", "mask_token")
_WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _special_id(tokenizer: PreTrainedTokenizerBase, attr: str) -> int | None:
    """Id of the special token stored under ``attr``, or None when it is unset or maps to [UNK]."""
    token = getattr(tokenizer, attr, None)
    if token is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(str(token))
    if token_id is None:
        return None
    if attr != "unk_token" and tokenizer.unk_token is not None and token_id == tokenizer.unk_token_id:
        return None
    return int(token_id)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a Hugging Face tokenizer directory from local disk only.

    Never touches the network and never runs repository code, so a typo cannot silently fetch something else.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"tokenizer path {path} must be a directory saved with save_pretrained()")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    missing = [attr for attr in _REQUIRED_SPECIALS if _special_id(tokenizer, attr) is None]
    if missing:
        names = ", ".join(f"[{attr.removesuffix('_token').upper()}]" for attr in missing)
        raise ValueError(f"tokenizer at {path} lacks required special tokens: {names}")
    return tokenizer


def vocab_info(tokenizer: PreTrainedTokenizerBase) -> VocabInfo:
    """Sizes and special ids the model needs; ``vocab_size`` counts added tokens too (embedding rows)."""
    ids = {
        attr: _special_id(tokenizer, attr)
        for attr in ("pad_token", "cls_token", "sep_token", "mask_token", "unk_token")
    }
    missing = [attr for attr, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"tokenizer lacks special tokens needed by the model: {', '.join(missing)}")
    return VocabInfo(
        vocab_size=len(tokenizer),
        pad_token_id=ids["pad_token"],
        cls_token_id=ids["cls_token"],
        sep_token_id=ids["sep_token"],
        mask_token_id=ids["mask_token"],
        unk_token_id=ids["unk_token"],
    )


def _word_counts(backend: Tokenizer, texts: Iterable[str]) -> Counter[str]:
    """Words of ``texts`` after the tokenizer's own normaliser and pre-tokenizer, with their frequencies."""
    normalizer, pre_tokenizer = backend.normalizer, backend.pre_tokenizer
    counts: Counter[str] = Counter()
    for text in texts:
        normalized = normalizer.normalize_str(text) if normalizer is not None else text
        words = pre_tokenizer.pre_tokenize_str(normalized) if pre_tokenizer is not None else [(normalized, None)]
        counts.update(word for word, _ in words)
    return counts


def learn_wordpiece_vocab(
    word_counts: Mapping[str, int],
    vocab_size: int,
    min_frequency: int = 1,
    special_tokens: Sequence[str] = _WORDPIECE_SPECIALS,
    prefix: str = "##",
) -> list[str]:
    """A WordPiece vocabulary learnt from word frequencies, the same for the same counts on every run and machine.

    The algorithm of the Hugging Face ``WordPieceTrainer`` (BPE merges on words split into a first character and
    ``##``-prefixed continuation characters), with every order fixed: the special tokens, then the characters and
    the continuation characters by decreasing frequency, then one token per merge, always the most frequent pair
    and among equally frequent pairs the first in text order. The Hugging Face trainer breaks such ties (and orders
    the alphabet) by hash-map iteration order, which changes from process to process, so the same captions gave
    a different tokenizer on every run. Merging stops at ``vocab_size`` tokens or when the most frequent pair
    occurs fewer than ``min_frequency`` times; every character of the words stays in the vocabulary.
    """
    vocab: list[str] = []
    index: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in index:
            index[token] = len(vocab)
            vocab.append(token)

    for token in special_tokens:
        add(token)
    chars: Counter[str] = Counter()
    continuations: Counter[str] = Counter()
    words: list[list[str]] = []
    freqs: list[int] = []
    for word in sorted(word_counts):
        count = int(word_counts[word])
        if not word or count <= 0:
            continue
        symbols = [word[0], *(prefix + char for char in word[1:])]
        words.append(symbols)
        freqs.append(count)
        for char in word:
            chars[char] += count
        for symbol in symbols[1:]:
            continuations[symbol] += count
    for counter in (chars, continuations):
        for token in sorted(counter, key=lambda t: (-counter[t], t)):
            add(token)

    pair_counts: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}
    for position, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:], strict=False):
            pair_counts[pair] = pair_counts.get(pair, 0) + freqs[position]
            where.setdefault(pair, set()).add(position)
    heap = [(-count, a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        negative, a, b = heapq.heappop(heap)
        count = pair_counts.get((a, b), 0)
        if count != -negative or count <= 0:
            continue  # a stale entry: the pair's count changed and was pushed again
        if count < min_frequency:
            break
        merged = a + b.removeprefix(prefix)
        add(merged)
        touched: set[tuple[str, str]] = set()
        for position in sorted(where.pop((a, b), ())):
            symbols, freq = words[position], freqs[position]
            for pair in zip(symbols, symbols[1:], strict=False):
                pair_counts[pair] -= freq
                touched.add(pair)
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[position] = out
            for pair in zip(out, out[1:], strict=False):
                pair_counts[pair] = pair_counts.get(pair, 0) + freq
                where.setdefault(pair, set()).add(position)
                touched.add(pair)
        pair_counts.pop((a, b), None)
        for pair in touched:
            if pair_counts.get(pair, 0) > 0:
                heapq.heappush(heap, (-pair_counts[pair], *pair))
    return vocab


def train_wordpiece(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 1000,
    min_frequency: int = 1,
    lowercase: bool = True,
) -> Path:
    """Train a small BERT WordPiece tokenizer and save it in Hugging Face format (``save_pretrained``).

    Deterministic: the same texts give byte-identical files on every run (see :func:`learn_wordpiece_vocab`), so a
    checkpoint is never evaluated with a differently numbered vocabulary. Lets tests, synthetic runs and users'
    own captions work offline without ``bert-base-uncased``; special ids are fixed ([PAD]=0, [UNK]=1, [CLS]=2,
    [SEP]=3, [MASK]=4) so padding id 0 matches BERT's convention.

    Args:
        texts: Training texts (captions).
        out_dir: Directory to save into (created).
        vocab_size: Most tokens, special tokens and single characters included (all characters are kept).
        min_frequency: Stop merging when the most frequent pair of pieces occurs fewer times.
        lowercase: Lower-case and strip accents, as ``bert-base-uncased`` does.
    """
    if vocab_size < len(_WORDPIECE_SPECIALS):
        raise ValueError(f"vocab_size must be >= {len(_WORDPIECE_SPECIALS)} (the special tokens), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    analysis = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    analysis.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    analysis.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocab = learn_wordpiece_vocab(_word_counts(analysis, texts), vocab_size, min_frequency)
    backend = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens(list(_WORDPIECE_SPECIALS))
    for index, token in enumerate(_WORDPIECE_SPECIALS):
        if backend.token_to_id(token) != index:
            raise RuntimeError(f"WordPiece vocabulary placed {token} at {backend.token_to_id(token)}, expected {index}")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=backend,
        do_lower_case=lowercase,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return out


@dataclass(frozen=True)
class CaptionCoverage:
    """How a tokenizer encodes a set of captions as training does (``[CLS]`` + pieces, cut at ``max_length``)."""

    captions: int
    tokens: int  # word pieces, before truncation
    unk_tokens: int
    truncated: int  # captions with more than max_length - 1 pieces
    longest: int  # pieces of the longest caption
    max_length: int

    @property
    def unk_share(self) -> float:
        return self.unk_tokens / self.tokens if self.tokens else 0.0

    @property
    def truncated_share(self) -> float:
        return self.truncated / self.captions if self.captions else 0.0

    def __str__(self) -> str:
        return (
            f"[UNK] {100 * self.unk_share:.2f}% of {self.tokens} tokens; {100 * self.truncated_share:.2f}% of "
            f"{self.captions} captions truncated at max_length {self.max_length} (longest: {self.longest + 1} with "
            "[CLS])"
        )


def caption_coverage(
    tokenizer: PreTrainedTokenizerBase, captions: Sequence[str], max_length: int, chunk: int = 4096
) -> CaptionCoverage:
    """Share of ``[UNK]`` pieces and of captions longer than ``max_length`` (which counts ``[CLS]``)."""
    unk_id = tokenizer.unk_token_id
    tokens = unk = truncated = longest = 0
    for start in range(0, len(captions), chunk):
        encoded = tokenizer(list(captions[start : start + chunk]), add_special_tokens=False)["input_ids"]
        for ids in encoded:
            tokens += len(ids)
            unk += ids.count(unk_id) if unk_id is not None else 0
            truncated += len(ids) > max_length - 1
            longest = max(longest, len(ids))
    return CaptionCoverage(len(captions), tokens, unk, truncated, longest, max_length)


@dataclass(frozen=True)
class TokenizerSummary:
    """What ``vlalign data tokenizer`` trained, on what, and how well it covers those captions."""

    out: Path
    vocab_size: int
    captions: int
    files: int
    skipped: int
    coverage: CaptionCoverage
    compared: tuple[Path, CaptionCoverage] | None = None

    def __str__(self) -> str:
        lines = [
            f"tokenizer saved to {self.out}: {self.vocab_size} tokens ({len(_WORDPIECE_SPECIALS)} special), WordPiece",
            f"trained on {self.captions} captions from {self.files} file(s)"
            + (f"; {self.skipped} entries / samples / lines without a caption skipped" if self.skipped else ""),
            f"on these captions: {self.coverage}",
        ]
        if self.compared is not None:
            lines.append(f"{self.compared[0]} on the same captions: {self.compared[1]}")
        lines.append(f"use it with: --data.init_args.tokenizer {self.out} (data.tokenizer in a config)")
        return "\n".join(lines)


def train_caption_tokenizer(
    captions: list[str] | str,
    out: str,
    vocab_size: int = 8000,
    min_frequency: int = 2,
    lowercase: bool = True,
    max_words: int = 30,
    max_length: int = 25,
    compare: str | None = None,
    overwrite: bool = False,
) -> TokenizerSummary:
    """Train a WordPiece tokenizer on your own captions (``vlalign data tokenizer``); use it as ``data.tokenizer``.

    Captions are read from JSON caption lists (``*.json``), WebDataset shards (``*.tar``: ``KEY.txt``, else the
    caption of ``KEY.json``) and text files (one caption per line); glob and brace patterns are expanded. They are
    normalised with ``pre_caption`` as in training (lower-cased, punctuation removed, cut to ``max_words``). The
    result is deterministic (the same captions give byte-identical files) and reports the share of ``[UNK]``
    pieces and of captions longer than ``max_length`` on the captions it was trained on.

    Args:
        captions: Files or patterns: ``--captions data/train.json`` or ``--captions '[a.json, shards/{0..9}.tar]'``.
        out: Directory to save the tokenizer in (``save_pretrained`` layout).
        vocab_size: Most tokens, 5 special tokens and every character included (bert-base-uncased: 30522).
        min_frequency: Pieces that occur fewer times are not merged into longer tokens.
        lowercase: Lower-case and strip accents inside the tokenizer too (``pre_caption`` lower-cases anyway).
        max_words: Words kept per caption by ``pre_caption`` (data.max_words).
        max_length: Token length the report counts truncation at, ``[CLS]`` included (data.max_length).
        compare: Another tokenizer directory (e.g. the one you use now) to report on the same captions.
        overwrite: Replace a tokenizer already saved in ``out`` (refused otherwise: a checkpoint trained with it
            would silently be evaluated with the new one).

    Raises:
        InputFileError: a caption file is missing, unreadable or holds no caption; ``out`` holds a tokenizer.
    """
    from vlalign.data.captions import read_captions
    from vlalign.data.text import pre_caption
    from vlalign.errors import InputFileError

    out_dir = Path(out).expanduser()
    existing = [name for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json") if (out_dir / name).exists()]
    if existing and not overwrite:
        raise InputFileError(
            f"--out {out_dir} already holds a tokenizer ({', '.join(existing)}): choose another directory, or pass "
            "--overwrite true (checkpoints trained with the old one then no longer match it)"
        )
    if max_length < 2 or max_words < 1:
        raise InputFileError(f"need --max_length >= 2 and --max_words >= 1, got {max_length} and {max_words}")
    corpus = read_captions(captions)
    normalised = [pre_caption(caption, max_words) for caption in corpus.captions]
    kept = [caption for caption in normalised if caption.strip()]
    skipped = corpus.skipped + len(normalised) - len(kept)
    if not kept:
        raise InputFileError(f"{', '.join(map(str, corpus.files))}: no caption is left after pre_caption")
    train_wordpiece(kept, out_dir, vocab_size=vocab_size, min_frequency=min_frequency, lowercase=lowercase)
    tokenizer = load_tokenizer(out_dir)
    compared = None
    if compare is not None:
        compared = (Path(compare).expanduser(), caption_coverage(load_tokenizer(compare), kept, max_length))
    return TokenizerSummary(
        out=out_dir,
        vocab_size=len(tokenizer),
        captions=len(kept),
        files=len(corpus.files),
        skipped=skipped,
        coverage=caption_coverage(tokenizer, kept, max_length),
        compared=compared,
    )


def tokenize_captions(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    padding: Literal["longest", "max_length"] = "longest",
) -> tuple[Tensor, Tensor]:
    """Encode captions as ``[CLS] word-pieces`` (no ``[SEP]``), truncated to ``max_length``, right-padded.

    This is the reference encoding (docs/method.md §4.1) that imported ALBEF/SIMLA checkpoints expect.
    Returns ``(input_ids, attention_mask)``, both ``long [B, L]``.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1 (room for [CLS]), got {max_length}")
    if padding not in ("longest", "max_length"):
        raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
    cls_id = _special_id(tokenizer, "cls_token")
    pad_id = _special_id(tokenizer, "pad_token")
    if cls_id is None or pad_id is None:
        raise ValueError("tokenizer needs [CLS] and [PAD] tokens")
    if max_length == 1:
        pieces: list[list[int]] = [[] for _ in texts]
    else:
        encoded = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length - 1)
        pieces = encoded["input_ids"]
    lengths = torch.tensor([len(p) + 1 for p in pieces], dtype=torch.long)
    width = max_length if padding == "max_length" else int(lengths.max()) if len(pieces) else 1
    attention_mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    input_ids = torch.full((len(pieces), width), pad_id, dtype=torch.long)
    flat = torch.tensor(list(chain.from_iterable([cls_id, *p] for p in pieces)), dtype=torch.long)
    input_ids[attention_mask.bool()] = flat
    return input_ids, attention_mask
