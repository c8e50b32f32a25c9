"""Captions from the files vlalign reads: JSON caption lists, WebDataset shards and plain text files.

Used by ``vlalign data tokenizer`` to train a tokenizer on one's own captions. The kind of a source is decided by its
name: ``*.json`` is a caption list (``[{"image": ..., "caption": str | [str, ...]}]``, Karpathy or ALBEF layout),
``*.tar`` a shard (``KEY.txt``, else ``KEY.json``'s "caption", as img2dataset writes them), anything else a text file
with one caption per line. Glob patterns (``data/*.json``) and brace patterns (``shards/{000000..000099}.tar``) are
expanded; files are read in the order given, each pattern's matches sorted.
"""

from __future__ import annotations

import glob
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from webdataset.shardlists import expand_urls

from vlalign.data.annotations import InputFileNotFound, entry_captions, load_annotations
from vlalign.errors import InputFileError


@dataclass
class CaptionCorpus:
    """Captions in file order, the files they came from and what was skipped."""

    captions: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    skipped: int = 0  # entries, samples or lines without a usable caption


def expand_sources(sources: Sequence[str] | str) -> list[Path]:
    """Files named by ``sources`` (paths, glob and brace patterns), in order, without repeats.

    Raises:
        InputFileNotFound: a path or pattern matches no file.
    """
    names = [sources] if isinstance(sources, str) else list(sources)
    if not names:
        raise InputFileError("--captions names no file: give JSON caption lists, shards (*.tar) or text files")
    files: list[Path] = []
    for name in names:
        matches: list[Path] = []
        for expanded in expand_urls(str(Path(name).expanduser())):
            if glob.has_magic(expanded):
                matches += [Path(p) for p in sorted(glob.glob(expanded)) if Path(p).is_file()]
            elif Path(expanded).is_file():
                matches.append(Path(expanded))
            else:
                problem = "is a directory" if Path(expanded).is_dir() else "does not exist"
                raise InputFileNotFound(f"--captions: {expanded} {problem}")
        if not matches:
            raise InputFileNotFound(f"--captions: {name} matches no file")
        files += [path for path in matches if path not in files]
    return files


def read_captions(sources: Sequence[str] | str) -> CaptionCorpus:
    """Every caption of ``sources`` (see the module docstring for the kinds of files).

    Raises:
        InputFileNotFound: a source does not exist.
        InputFileError: a file cannot be read as its kind, or holds no caption at all (naming it).
    """
    corpus = CaptionCorpus()
    for path in expand_sources(sources):
        before, skipped_before = len(corpus.captions), corpus.skipped
        if path.suffix.lower() == ".json":
            _json_captions(path, corpus)
        elif path.suffix.lower() == ".tar":
            _shard_captions(path, corpus)
        else:
            _text_captions(path, corpus)
        corpus.files.append(path)
        if len(corpus.captions) == before:
            raise InputFileError(
                f"{path}: no caption found ({corpus.skipped - skipped_before} empty or unusable); expected a JSON "
                "caption list (*.json), a WebDataset shard with KEY.txt captions (*.tar) or one caption per line"
            )
    return corpus


def _keep(caption: str, corpus: CaptionCorpus) -> None:
    if caption.strip():
        corpus.captions.append(caption)
    else:
        corpus.skipped += 1


def _json_captions(path: Path, corpus: CaptionCorpus) -> None:
    for entry in load_annotations(path):
        captions = entry_captions(entry)
        if captions is None:
            corpus.skipped += 1
            continue
        for caption in captions:
            _keep(caption, corpus)


def _shard_captions(path: Path, corpus: CaptionCorpus) -> None:
    """``KEY.txt`` of each sample, else the "caption" of its ``KEY.json``; samples without either are skipped."""
    texts: dict[str, bytes] = {}
    metas: dict[str, bytes] = {}
    keys: list[str] = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, name = member.name.rpartition("/")
                stem, dot, extension = name.partition(".")
                if not dot or extension not in ("txt", "json"):
                    continue
                key = f"{directory}/{stem}"
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                if key not in texts and key not in metas:
                    keys.append(key)
                (texts if extension == "txt" else metas)[key] = handle.read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise InputFileError(f"{path}: not a readable tar shard ({err})") from None
    for key in keys:
        caption: object = None
        try:
            if key in texts:
                caption = texts[key].decode("utf-8")
            else:
                meta = json.loads(metas[key])
                caption = meta.get("caption") if isinstance(meta, dict) else None
        except (UnicodeDecodeError, ValueError):
            caption = None
        if isinstance(caption, str):
            _keep(caption, corpus)
        else:
            corpus.skipped += 1


def _text_captions(path: Path, corpus: CaptionCorpus) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputFileError(f"{path}: not UTF-8 text (byte {err.start}); expected one caption per line") from None
    for line in text.splitlines():
        _keep(line, corpus)
