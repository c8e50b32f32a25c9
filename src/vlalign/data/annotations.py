"""Reading ALBEF / Karpathy-style JSON caption lists, with errors that name the file, the entry and the fix.

Shared by the training and evaluation data modules, ``vlalign data convert`` and ``vlalign data tokenizer``. Every
problem a user can fix raises :class:`~vlalign.errors.InputFileError` (printed by ``vlalign`` as one ``error:``
block, exit status 2).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlalign.errors import InputFileError

#: How a caption list looks, for error messages.
LAYOUT = '[{"image": "relative/or/absolute/path.jpg", "caption": "a caption" or ["a caption", ...]}, ...]'
#: How the data modules' image root is set, for error messages.
DATA_IMAGE_ROOT = "data.image_root (--data.init_args.image_root DIR)"


def image_root_hint(option: str = DATA_IMAGE_ROOT) -> str:
    """The fix for image paths that resolve to nothing, naming the ``option`` that sets the root."""
    return (
        f"relative image paths are resolved against {option}, by default the JSON file's own directory: set it to "
        "the folder the paths are relative to (absolute paths are used as they are)"
    )


#: Entries whose image existence :func:`check_images_exist` checks at most (spread evenly over the list).
DEFAULT_IMAGE_CHECKS = 256


class InputFileNotFound(InputFileError, FileNotFoundError):
    """An input file or directory named in the configuration does not exist (also a ``FileNotFoundError``)."""


_JSON_KINDS = {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean"}


def json_kind(value: Any) -> str:
    """The JSON name of a decoded value's type (``object``, ``string``, ...), for error messages."""
    return "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)


def load_annotations(json_file: str | Path, allow_empty: bool = False) -> list[Any]:
    """Read a JSON list of annotation entries.

    Raises:
        InputFileNotFound: the file does not exist.
        InputFileError: it is not UTF-8, not valid JSON (with line and column), not a list, or an empty list
            (unless ``allow_empty``); the message names the file and the expected layout.
    """
    path = Path(json_file).expanduser()
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise InputFileNotFound(f"{path}: annotation file {problem}; expected a JSON caption list {LAYOUT}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputFileError(f"{path}: not UTF-8 text (byte {err.start}); expected a JSON caption list") from None
    except OSError as err:
        raise InputFileError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputFileError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}; expected a JSON caption "
            f"list {LAYOUT}"
        ) from None
    if not isinstance(entries, list):
        raise InputFileError(f"{path}: expected a JSON list of entries, got a JSON {json_kind(entries)}: {LAYOUT}")
    if not entries and not allow_empty:
        raise InputFileError(f"{path}: the caption list is empty (`[]`); expected at least one entry: {LAYOUT}")
    return entries


def entry_captions(entry: Any) -> list[str] | None:
    """The captions of one entry (``caption`` as a string or a list of strings); None when it has none usable."""
    caption = entry.get("caption") if isinstance(entry, dict) else None
    if isinstance(caption, str):
        return [caption]
    if isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption):
        return list(caption)
    return None


def check_images_exist(
    json_file: str | Path, images: Sequence[tuple[int, Path]], root: Path, limit: int | None = None
) -> None:
    """Fail with one message when image files of ``json_file`` are missing.

    Args:
        json_file: The caption list, named in the message.
        images: ``(entry index, resolved image path)`` pairs.
        root: The directory relative paths were resolved against, named in the message.
        limit: Check only this many, spread evenly over ``images``, and fail only when none of them exists (the
            training modules skip and count a few missing files); ``None``: check all and fail on any missing.

    Raises:
        InputFileError: naming the file, how many are missing, one example path and the ``image_root`` hint.
    """
    if not images:
        return
    if limit is not None and len(images) > limit:
        step = len(images) / limit
        checked = [images[int(i * step)] for i in range(limit)]
    else:
        checked = list(images)
    missing = [(index, path) for index, path in checked if not path.is_file()]
    if not missing or (limit is not None and len(missing) < len(checked)):
        return
    index, example = missing[0]
    if limit is None:
        count = f"{len(missing)} of its {len(checked)} images {'is' if len(missing) == 1 else 'are'} not found"
    elif len(checked) < len(images):
        count = f"none of {len(checked)} images checked (of {len(images)}) is found"
    else:
        count = f"none of its {len(checked)} images is found"
    raise InputFileError(
        f"{json_file}: {count}, e.g. entry {index}: {example.absolute()} (resolved against {root.absolute()}); "
        f"{image_root_hint()}"
    )
