"""Caption normalisation as the reference does it, plus the left/right swap that keeps flipped captions true."""

from __future__ import annotations

import re

_DELETED = re.compile(r"[,.'!?\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")
_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def pre_caption(text: str, max_words: int = 30) -> str:
    """Normalise a caption exactly like ALBEF/SIMLA's ``pre_caption`` (docs/method.md §4.1).

    Lower-case; delete ``, . ' ! ? " ( ) * # : ; ~``; ``-`` and ``/`` become spaces; ``<person>`` becomes
    ``person``; runs of two or more whitespace characters become one space; surrounding spaces are stripped;
    only the first ``max_words`` space-separated words are kept. Matching it keeps imported checkpoints and
    reported numbers comparable (a lone tab or newline survives, as in the reference; the tokenizer treats it
    as a space anyway).
    """
    caption = _DELETED.sub("", text.lower())
    caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person")
    caption = _WHITESPACE_RUN.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def _swap_word(match: re.Match[str]) -> str:
    word = match.group(0)
    swapped = "right" if word.lower() == "left" else "left"
    if word.isupper() and len(word) > 1:
        return swapped.upper()
    if word[0].isupper():
        return swapped.capitalize()
    return swapped


def swap_left_right(text: str) -> str:
    """Swap the whole words "left" and "right", keeping their capitalisation.

    Applied when the image is flipped horizontally, so "a dog on the left" still describes the picture
    (the reference flips without it, docs/differences.md row 19).
    """
    return _LEFT_RIGHT.sub(_swap_word, text)
