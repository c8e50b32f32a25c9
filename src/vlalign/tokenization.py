"""Tokenizer loading, on-the-fly WordPiece training and reference-style caption tokenisation.

The reference (ALBEF/SIMLA) encodes one caption as ``[CLS] word-pieces`` with no trailing ``[SEP]``
(method note 1.5); imported checkpoints expect exactly that, so it is what :func:`tokenize_captions` does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
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


def train_wordpiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1000, min_frequency: int = 1) -> Path:
    """Train a small lower-casing BERT WordPiece tokenizer and save it in Hugging Face format.

    Lets tests and synthetic runs work offline without ``bert-base-uncased``; special ids are fixed
    ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4) so padding id 0 matches BERT's convention.
    """
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(_WORDPIECE_SPECIALS),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    for index, token in enumerate(_WORDPIECE_SPECIALS):
        if backend.token_to_id(token) != index:
            raise RuntimeError(f"WordPiece trainer placed {token} at {backend.token_to_id(token)}, expected {index}")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=backend,
        do_lower_case=True,
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


def tokenize_captions(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    padding: Literal["longest", "max_length"] = "longest",
) -> tuple[Tensor, Tensor]:
    """Encode captions as ``[CLS] word-pieces`` (no ``[SEP]``), truncated to ``max_length``, right-padded.

    This is the reference encoding (method note 1.5) that imported ALBEF/SIMLA checkpoints expect.
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
