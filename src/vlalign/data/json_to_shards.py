"""Convert ALBEF-style JSON caption lists into WebDataset shards in the img2dataset layout (``vlalign data convert``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from vlalign.data.annotations import LAYOUT, entry_captions, image_root_hint, load_annotations
from vlalign.errors import InputFileError

log = logging.getLogger(__name__)

#: Skipped entries reported one by one before the rest are only counted (in a last warning and the summary).
MAX_ENTRY_WARNINGS = 5


@dataclass
class ConvertSummary:
    """What :func:`json_to_shards` wrote and skipped; printed by ``vlalign data convert``."""

    written: int
    skipped_missing_file: int
    skipped_empty_caption: int
    shards: list[str]
    entries: int = 0
    skipped_bad_entry: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def skipped_entries(self) -> int:
        """Entries that gave no sample: image not found, or no image path / no caption."""
        return self.skipped_missing_file + self.skipped_bad_entry

    def __str__(self) -> str:
        where = f" in {len(self.shards)} shard(s) ({self.shards[0]} ...)" if self.shards else ""
        lines = [f"wrote {self.written} samples from {self.entries - self.skipped_entries} entries{where}"]
        if self.skipped_entries or self.skipped_empty_caption:
            lines.append(
                f"skipped {self.skipped_entries} of {self.entries} entries ({self.skipped_missing_file} image not "
                f"found, {self.skipped_bad_entry} without an image path or caption) and {self.skipped_empty_caption} "
                "empty captions"
            )
        return "\n".join(lines)


class _SkipLog:
    """Warns about the first :data:`MAX_ENTRY_WARNINGS` skipped entries, then only counts them."""

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def skip(self, message: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_ENTRY_WARNINGS:
            self.examples.append(message)
            log.warning("%s; skipped", message)

    def finish(self) -> None:
        if self.count > len(self.examples):
            log.warning("... and %d more skipped entries (counted in the summary)", self.count - len(self.examples))


def json_to_shards(
    json_files: list[str],
    out: str,
    image_root: str | None = None,
    samples_per_shard: int = 10000,
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertSummary:
    """Write every (image, caption) of ALBEF JSON lists into ``out/NNNNNN.tar`` as ``KEY.jpg|png``, ``.txt``, ``.json``.

    Image bytes are copied as they are (no re-encoding). A caption list becomes one sample per caption sharing the
    image bytes. Entries whose image file is missing, or that have no image path or caption, and empty captions are
    skipped and counted (the first few are named in warnings, the summary gives the counts); when nothing at all
    can be written, nothing is written and the command fails with an example path and the ``--image_root`` hint.

    Args:
        json_files: ALBEF/SIMLA caption lists (``[{"image": path, "caption": str or [str, ...]}]``).
        out: output directory for the shards.
        image_root: prefix for relative image paths (default: each JSON file's directory).
        samples_per_shard: samples per tar file.
        overwrite: replace the ``*.tar`` files ``out`` already holds (otherwise such a directory is refused, so
            shards of an earlier conversion never mix with these).
        progress: show a progress bar.

    Raises:
        InputFileError: a JSON file is not a non-empty caption list, ``out`` already holds shards, or no sample
            could be written (the message names an example missing image and the fix).
    """
    if samples_per_shard < 1:
        raise InputFileError(f"--samples_per_shard must be >= 1, got {samples_per_shard}")
    if not json_files:
        raise InputFileError(f"--json_files lists no file; give JSON caption lists {LAYOUT}")
    out_dir = Path(out).expanduser()
    stale = sorted(out_dir.glob("*.tar")) if out_dir.is_dir() else []
    if stale and not overwrite:
        raise InputFileError(
            f"--out {out_dir} already holds {len(stale)} shard(s) ({stale[0].name} ...): choose an empty directory, "
            "or pass --overwrite true to replace them"
        )
    lists = [(Path(json_file), load_annotations(json_file)) for json_file in json_files]  # every file checked first
    root_of = {path: Path(image_root).expanduser() if image_root else path.parent for path, _ in lists}

    skips = _SkipLog()
    missing = empty = bad = written = entries_seen = 0
    first_missing: tuple[Path, int, Path] | None = None
    sink: wds.ShardWriter | None = None  # opened with the first sample, so a failed conversion writes no file
    try:
        for json_file, entries in lists:
            root = root_of[json_file]
            for entry_index, entry in enumerate(tqdm(entries, desc=f"convert {json_file}", disable=not progress)):
                entries_seen += 1
                image = entry.get("image") if isinstance(entry, dict) else None
                captions = entry_captions(entry)
                if not isinstance(image, str) or not image or captions is None:
                    bad += 1
                    skips.skip(
                        f"{json_file} entry {entry_index}: needs 'image' (a path) and 'caption' (a string or list)"
                    )
                    continue
                image_path = root / image
                if not image_path.is_file():
                    missing += 1
                    first_missing = first_missing or (json_file, entry_index, image_path)
                    skips.skip(f"{json_file} entry {entry_index}: image {image_path} not found")
                    continue
                data = image_path.read_bytes()
                ext = image_path.suffix.lower().lstrip(".").replace("jpeg", "jpg") or "jpg"
                for caption in captions:
                    if not caption.strip():
                        empty += 1
                        continue
                    if sink is None:
                        if stale:
                            for old in stale:
                                old.unlink()
                        out_dir.mkdir(parents=True, exist_ok=True)
                        sink = wds.ShardWriter(str(out_dir / "%06d.tar"), maxcount=samples_per_shard, verbose=0)
                    key = f"{written:09d}"
                    meta = {"key": key, "caption": caption, "image": image, "source": str(json_file)}
                    sink.write({"__key__": key, ext: data, "txt": caption, "json": meta})
                    written += 1
    finally:
        if sink is not None:
            sink.close()
    skips.finish()
    if written == 0:
        names = ", ".join(str(path) for path, _ in lists)
        if first_missing is not None:
            json_file, entry_index, example = first_missing
            raise InputFileError(
                f"{names}: nothing to convert: {missing} of {entries_seen} entries have no image file, e.g. "
                f"{json_file} entry {entry_index}: {example.absolute()} (resolved against "
                f"{root_of[json_file].absolute()}); {image_root_hint('--image_root DIR')}. No shard was written"
            )
        raise InputFileError(
            f"{names}: nothing to convert: no entry has an image path and a non-empty caption ({bad} without one, "
            f"{empty} empty captions); expected {LAYOUT}. No shard was written"
        )
    shards = sorted(str(p) for p in out_dir.glob("*.tar"))
    summary = ConvertSummary(
        written=written,
        skipped_missing_file=missing,
        skipped_empty_caption=empty,
        shards=shards,
        entries=entries_seen,
        skipped_bad_entry=bad,
        examples=skips.examples,
    )
    log.info("%s", summary)
    return summary
