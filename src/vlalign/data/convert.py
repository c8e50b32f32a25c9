"""Convert ALBEF-style JSON caption lists into WebDataset shards in the img2dataset layout."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass
class ConvertSummary:
    written: int
    skipped_missing_file: int
    skipped_empty_caption: int
    shards: list[str]


def json_to_shards(
    json_files: list[str],
    out: str,
    image_root: str | None = None,
    samples_per_shard: int = 10000,
    progress: bool = True,
) -> ConvertSummary:
    """Write every (image, caption) of ALBEF JSON lists into ``out/NNNNNN.tar`` as ``KEY.jpg|png``, ``.txt``, ``.json``.

    Image bytes are copied as they are (no re-encoding). A caption list becomes one sample per caption sharing the
    image bytes. Entries whose image file is missing or whose caption is empty are skipped and counted, not fatal.

    Args:
        json_files: ALBEF/SIMLA caption lists (``[{"image": path, "caption": str or [str, ...]}]``).
        out: output directory for the shards.
        image_root: prefix for relative image paths (default: the JSON file's directory).
        samples_per_shard: samples per tar file.
        progress: show a progress bar.
    """
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = empty = written = 0
    with wds.ShardWriter(str(out_dir / "%06d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
        for json_file in json_files:
            entries = json.loads(Path(json_file).read_text())
            root = Path(image_root) if image_root else Path(json_file).parent
            for entry_index, entry in enumerate(tqdm(entries, desc=f"convert {json_file}", disable=not progress)):
                image_path = root / entry["image"]
                if not image_path.is_file():
                    log.warning("%s entry %d: image %s not found; skipped", json_file, entry_index, image_path)
                    missing += 1
                    continue
                captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
                data = image_path.read_bytes()
                ext = image_path.suffix.lower().lstrip(".").replace("jpeg", "jpg") or "jpg"
                for caption in captions:
                    if not str(caption).strip():
                        empty += 1
                        continue
                    key = f"{written:09d}"
                    meta = {"key": key, "caption": caption, "image": str(entry["image"]), "source": str(json_file)}
                    sink.write({"__key__": key, ext: data, "txt": caption, "json": meta})
                    written += 1
    shards = sorted(str(p) for p in out_dir.glob("*.tar"))
    summary = ConvertSummary(written, missing, empty, shards)
    log.info("%s", summary)
    return summary
