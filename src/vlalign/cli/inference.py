"""``vlalign export`` (a checkpoint → a portable model folder) and ``vlalign embed`` (images / captions → ``.npy``).

Both write nothing half-way: ``export`` builds the folder under a temporary sibling name and renames it when it is
complete (and loads it back first); ``embed`` computes everything, writes each file under a temporary name inside
``--out`` and renames them at the end. Mistakes raise :class:`~vlalign.errors.InputFileError` (``error:``, exit 2).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlalign.errors import InputFileError

if TYPE_CHECKING:
    import numpy as np

    from vlalign.api import VisionLanguageModel

#: Image files ``vlalign embed --images DIR`` picks up (case-insensitive), recursively.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: What ``vlalign embed`` writes into ``--out``.
IMAGE_EMBEDDINGS = "image_embeddings.npy"
IMAGE_KEYS = "image_keys.txt"
TEXT_EMBEDDINGS = "text_embeddings.npy"
TEXT_KEYS = "text_keys.txt"
SKIPPED = "skipped.txt"
EMBED_OUTPUTS = (IMAGE_EMBEDDINGS, IMAGE_KEYS, TEXT_EMBEDDINGS, TEXT_KEYS, SKIPPED)


# -- export ------------------------------------------------------------------------------------------------------------
@dataclass
class ExportSummary:
    """What ``vlalign export`` wrote."""

    out: Path
    checkpoint: Path
    tensors: int
    parameters: int
    left_out: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        left = (
            f"; left out {len(self.left_out)} momentum-twin / queue tensors (--with_momentum true keeps them)"
            if self.left_out
            else ""
        )
        return (
            f"exported {self.tensors} tensors ({self.parameters:,} values) from {self.checkpoint} to {self.out}{left}. "
            f'Load it with vlalign.load("{self.out}")'
        )


def is_training_only(key: str) -> bool:
    """Momentum twins (a key component ending in ``_m``) and the ITC feature queues: state only training reads."""
    from vlalign.api import QUEUE_KEYS
    from vlalign.models.backbone import online_name

    return online_name(key) is not None or key in QUEUE_KEYS


def export(ckpt_path: str, out: str, with_momentum: bool = False, tokenizer: str | None = None) -> ExportSummary:
    """Write a portable model folder (weights, config, tokenizer, model card) from a vlalign checkpoint.

    The folder holds ``model.safetensors`` (the weights, keyed as the recipe's state dict), ``config.json`` (how to
    rebuild the model, and its preprocessing), ``tokenizer/`` and a ``README.md`` model card. Load it with
    ``vlalign.load(OUT)``, or start training from it with ``--model.init_from OUT``.

    Args:
        ckpt_path: a Lightning checkpoint written by ``vlalign fit`` (read with ``weights_only=True``).
        out: the folder to create; it must not exist or be empty. It appears only once complete.
        with_momentum: also keep the momentum twins (``*_m``) and the ITC queues, which only training reads.
        tokenizer: a tokenizer directory, for a checkpoint that records none (written without a data module).
    """
    from vlalign.api import read_checkpoint

    target = Path(out).expanduser()
    _refuse_non_empty(target)
    source = Path(ckpt_path).expanduser()
    if not source.is_file():
        what = "is a directory" if source.is_dir() else "does not exist"
        raise InputFileError(f"--ckpt_path {source}: {what}; give the .ckpt file written by `vlalign fit`")
    checkpoint = read_checkpoint(source)
    spec, preprocessing = _export_spec(checkpoint, source, tokenizer)
    state = checkpoint["state_dict"]
    kept = {key: value for key, value in state.items() if with_momentum or not is_training_only(key)}
    left_out = [key for key in state if key not in kept]

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        summary = _write_export(staging, spec, preprocessing, kept, checkpoint, source, target, with_momentum)
        summary.left_out = left_out
        _verify_export(staging)
        _share(staging)
        if target.exists():  # an empty folder: replaced by the complete one
            target.rmdir()
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _refuse_non_empty(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise InputFileError(f"--out {target}: exists and is a file; give the path of a new folder")
    if target.is_dir() and any(target.iterdir()):
        raise InputFileError(
            f"--out {target}: the folder exists and is not empty; give a new folder (export never overwrites), "
            "or remove this one first"
        )


def _share(folder: Path) -> None:
    """Give the staged folder and its files the permissions a plain ``mkdir`` / ``open`` would (``mkdtemp`` and
    safetensors create them private)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _export_spec(checkpoint: dict[str, Any], source: Path, tokenizer: str | None) -> tuple[dict[str, Any], Any]:
    """The checkpoint's model spec and its preprocessing (tokenizer files included; ``tokenizer`` replaces them)."""
    from vlalign.api import SPEC_KEY
    from vlalign.data.preprocessing import Preprocessing, tokenizer_files
    from vlalign.data.tokenization import load_tokenizer

    spec = copy.deepcopy(dict(checkpoint[SPEC_KEY]))
    recorded = spec.get("preprocessing")
    image_size = int(spec["init_args"]["vision"]["img_size"])
    preprocessing = Preprocessing.from_dict(recorded) if recorded else Preprocessing(image_size=image_size)
    if tokenizer is not None:
        preprocessing.tokenizer_files = tokenizer_files(load_tokenizer(tokenizer))
    if not preprocessing.tokenizer_files:
        raise InputFileError(
            f"--ckpt_path {source}: the checkpoint records no tokenizer (it was trained without a vlalign data "
            "module); pass the one it was trained with: --tokenizer DIR"
        )
    return spec, preprocessing


def _write_export(
    folder: Path,
    spec: dict[str, Any],
    preprocessing: Any,
    state: dict[str, Any],
    checkpoint: dict[str, Any],
    source: Path,
    target: Path,
    with_momentum: bool,
) -> ExportSummary:
    from vlalign.api import CONFIG_FILE, README_FILE, TOKENIZER_DIR, WEIGHTS_FILE, save_weights

    step, epoch = checkpoint.get("global_step"), checkpoint.get("epoch")
    aliases = save_weights(
        state,
        folder / WEIGHTS_FILE,
        {"source": source.name, "with_momentum": str(bool(with_momentum)).lower()},
    )
    preprocessing.write_tokenizer(folder / TOKENIZER_DIR)
    recorded = preprocessing.to_dict()
    recorded.pop("tokenizer_files")
    config = {
        **spec,
        "preprocessing": recorded,
        "tokenizer": TOKENIZER_DIR,
        "exported_from": {
            "checkpoint": str(source),
            "global_step": step,
            "epoch": epoch,
            "with_momentum": with_momentum,
        },
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n")
    written = {key: value for key, value in state.items() if key not in aliases}
    parameters = sum(int(value.numel()) for value in written.values())
    card = model_card(config, preprocessing, target, len(written), parameters, aliases)
    (folder / README_FILE).write_text(card)
    return ExportSummary(out=target, checkpoint=source, tensors=len(written), parameters=parameters, aliases=aliases)


def _verify_export(folder: Path) -> None:
    """The folder must load as a model (all tensors present with the right shapes) before it gets its name."""
    from vlalign.api import load

    try:
        load(folder)
    except InputFileError as err:
        raise InputFileError(f"export check failed, nothing written: {err}") from None


def model_card(
    config: dict[str, Any], preprocessing: Any, out: Path, tensors: int, parameters: int, aliases: dict[str, str]
) -> str:
    """The ``README.md`` of an exported folder: what the model is, how it was trained, how to load it."""
    args = config["init_args"]
    vision, stream, optim = args["vision"], args["stream"], args.get("optim") or {}
    origin = config.get("exported_from", {})
    layout = (
        "single stream (every layer cross-attends to the image)"
        if stream.get("fusion_layer") is None
        else f"ALBEF split: text layers 0-{stream['fusion_layer'] - 1}, fusion from layer {stream['fusion_layer']}"
    )
    lines = [
        f"# vlalign model `{out.name}`",
        "",
        f"Exported by `vlalign export` from `{origin.get('checkpoint')}` (global step {origin.get('global_step')}, "
        f"epoch {origin.get('epoch')}): {tensors} tensors, {parameters:,} values"
        + (
            ", momentum twins and queues included."
            if origin.get("with_momentum")
            else " (momentum twins and queues left out: `vlalign export --with_momentum true` keeps them)."
        ),
        "",
        "## Load",
        "",
        "```python",
        "import vlalign",
        "",
        f'm = vlalign.load("{out}")  # device="cuda", dtype=torch.bfloat16 also work',
        'image_emb, text_emb = m.encode_image(["photo.jpg"]), m.encode_text(["a caption"])',
        'm.similarity(image_emb, text_emb), m.itm_scores(["photo.jpg"], ["a caption", "another caption"])',
        "```",
        "",
        f"Embeddings of a folder of images: `vlalign embed --model {out} --images DIR --out EMB_DIR`. "
        f"To train from these weights: `vlalign fit --config ... --model.init_from {out}`.",
        "",
        "## Architecture",
        "",
        "| part | settings |",
        "|---|---|",
        f"| vision | `{vision['name']}`, {vision['img_size']} px, mask token: {vision.get('mask_token')} |",
        f"| stream | {stream['num_layers']} layers, width {stream['hidden_size']}, {stream['num_heads']} heads, "
        f"FFN {stream['intermediate_size']}, {stream['max_position_embeddings']} positions; {layout} |",
        f"| vocabulary | {stream['vocab_size']} tokens (tokenizer in `tokenizer/`) |",
        "",
        "## Objectives (as trained)",
        "",
    ]
    for objective in args.get("objectives") or []:
        settings = ", ".join(f"{k}={_short(v)}" for k, v in (objective.get("init_args") or {}).items())
        lines.append(f"- `{objective['class_path']}`: {settings}")
    lines += [
        "",
        "Inference keeps the encoders, ITC's projections and temperature, and the ITM head.",
        "",
        "## Training settings",
        "",
        f"- momentum {args.get('momentum')}, alpha {args.get('alpha')} (warm-up {args.get('alpha_warmup_steps')} steps)",
        f"- optimiser: lr {optim.get('lr')}, weight decay {optim.get('weight_decay')}, warm-up "
        f"{optim.get('warmup_steps')} steps, min lr {optim.get('min_lr')}",
        "",
        "## Preprocessing",
        "",
        f"- images: squash-resized to {preprocessing.image_size} x {preprocessing.image_size} (bicubic), normalised "
        f"with mean {list(preprocessing.mean)}, std {list(preprocessing.std)}",
        f"- captions: `pre_caption` (lower-case, punctuation removed, first {preprocessing.max_words} words), "
        f"tokenised as `[CLS] word-pieces`, at most {preprocessing.max_length} tokens",
        "",
        "## Files",
        "",
        "- `model.safetensors`: weights, keyed as the training recipe's state dict"
        + (f" (tied tensors written once: {', '.join(f'{k} = {v}' for k, v in aliases.items())})" if aliases else ""),
        "- `config.json`: the model spec (`vlalign.load` rebuilds the model from it) and the preprocessing",
        "- `tokenizer/`: the Hugging Face tokenizer files",
        "",
    ]
    return "\n".join(lines)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def export_command(args: list[str]) -> None:
    """``vlalign export --ckpt_path X --out DIR [--with_momentum true] [--tokenizer DIR]``."""
    from jsonargparse import auto_cli

    print(auto_cli(export, args=args, as_positional=False))


# -- embed ------------------------------------------------------------------------------------------------------------
@dataclass
class EmbedSummary:
    """What ``vlalign embed`` wrote."""

    out: Path
    images: int = 0
    texts: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    dim: int = 0
    written: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = []
        if IMAGE_EMBEDDINGS in self.written:
            parts.append(f"{self.images} images")
        if TEXT_EMBEDDINGS in self.written:
            parts.append(f"{self.texts} captions")
        skipped = f", {len(self.skipped)} skipped (listed in {SKIPPED})" if self.skipped else ""
        return f"embedded {' and '.join(parts)} (dim {self.dim}){skipped} -> {self.out}"


def embed(
    model: str | Path | VisionLanguageModel,
    out: str | Path,
    images: str | None = None,
    captions: str | None = None,
    image_root: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    tokenizer: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> EmbedSummary:
    """Embed images and/or captions with a trained model into ``.npy`` files plus key files, one key per row.

    Writes into ``out``: ``image_embeddings.npy`` (float32 ``[N, D]``, L2-normalised) with ``image_keys.txt``;
    ``text_embeddings.npy`` with ``text_keys.txt``; ``skipped.txt`` (``key<TAB>reason`` per unusable image or
    entry). Files are written under temporary names and renamed at the end: a failed run leaves no output.

    Args:
        model: a vlalign ``.ckpt``, an exported folder or a converted ``.safetensors`` file (see ``vlalign.load``).
        out: output folder (created).
        images: a folder (searched recursively for .jpg/.jpeg/.png/.webp/.bmp, sorted; keys are paths relative to
            it), a JSON caption list (``[{"image": path, ...}]``; keys are the ``image`` values, each image once), or
            WebDataset shards (``shards/{000000..000009}.tar``; keys are the samples' ``__key__``).
        captions: a JSON caption list (``caption``: a string or a list; keys ``<entry index>:<caption index>``,
            from 0) or a text file with one caption per line (keys: line numbers from 1; blank lines are skipped).
        image_root: the folder relative image paths of a JSON list point into (default: the JSON file's folder).
        batch_size: images or captions per forward pass.
        device: where the model runs (``cpu``, ``cuda``).
        tokenizer: a tokenizer directory, for a converted reference file (which records none).
        overwrite: replace earlier ``vlalign embed`` outputs in ``out`` (otherwise an error).
        progress: show progress bars.
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from vlalign.api import VisionLanguageModel, load

    if images is None and captions is None:
        raise InputFileError("vlalign embed: nothing to embed: give --images and/or --captions")
    if batch_size < 1:
        raise InputFileError(f"--batch_size must be >= 1, got {batch_size}")
    target = Path(out).expanduser()
    if target.exists() and not target.is_dir():
        raise InputFileError(f"--out {target}: exists and is a file; give a folder")
    existing = [name for name in EMBED_OUTPUTS if (target / name).exists()]
    if existing and not overwrite:
        raise InputFileError(
            f"--out {target}: already holds {', '.join(existing)} from an earlier run; give another folder or "
            "pass --overwrite true"
        )
    image_items = _image_items(images, image_root) if images is not None else None
    text_items = _caption_items(captions) if captions is not None else None
    if not isinstance(model, VisionLanguageModel):
        model = load(model, tokenizer=tokenizer, device=device)
    elif device != "cpu":
        model = model.to(device)

    summary = EmbedSummary(out=target, dim=model.embed_dim)
    results: dict[str, Any] = {}
    if image_items is not None:
        source, total, skipped = image_items
        summary.skipped.extend(skipped)
        keys: list[str] = []
        chunks: list[np.ndarray] = []
        batch_keys: list[str] = []
        pixels: list[Any] = []

        def flush() -> None:
            if pixels:
                chunks.append(model.encode_image(torch.stack(pixels), batch_size=batch_size, progress=False).numpy())
                keys.extend(batch_keys)
                batch_keys.clear()
                pixels.clear()

        with tqdm(total=total, desc="embed images", unit="img", disable=not progress) as bar:
            for key, data in source:
                image = _decode(data, key, summary.skipped)
                if image is not None:
                    pixels.append(model.image_transform(image))
                    batch_keys.append(key)
                    if len(pixels) == batch_size:
                        flush()
                bar.update(1)
            flush()
        summary.skipped.extend(getattr(source, "skipped", []))
        if not keys:
            raise InputFileError(
                f"--images {images}: no image could be embedded{_reasons(summary.skipped)}; nothing written"
            )
        results[IMAGE_EMBEDDINGS] = np.concatenate(chunks).astype(np.float32)
        results[IMAGE_KEYS] = keys
        summary.images = len(keys)
    if text_items is not None:
        text_keys, texts, skipped = text_items
        summary.skipped.extend(skipped)
        if not texts:
            raise InputFileError(f"--captions {captions}: holds no caption{_reasons(skipped)}; nothing written")
        chunks = []
        with tqdm(total=len(texts), desc="embed captions", unit="caption", disable=not progress) as bar:
            for start in range(0, len(texts), batch_size):
                batch = texts[start : start + batch_size]
                chunks.append(model.encode_text(batch, batch_size=batch_size, progress=False).numpy())
                bar.update(len(batch))
        results[TEXT_EMBEDDINGS] = np.concatenate(chunks).astype(np.float32)
        results[TEXT_KEYS] = text_keys
        summary.texts = len(text_keys)
    results[SKIPPED] = [f"{key}\t{reason}" for key, reason in summary.skipped]
    summary.written = _commit(target, results, replace=overwrite)
    return summary


def _decode(data: Path | bytes, key: str, skipped: list[tuple[str, str]]) -> Any:
    """The RGB image, or None after recording why it cannot be used."""
    from vlalign.data.transforms import BadSampleError, load_rgb

    try:
        return load_rgb(data)
    except BadSampleError as err:
        skipped.append((key, _one_line(str(err))))
        return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _reasons(skipped: Sequence[tuple[str, str]], limit: int = 3) -> str:
    if not skipped:
        return ""
    shown = "; ".join(f"{key}: {reason}" for key, reason in skipped[:limit])
    more = f"; ... ({len(skipped) - limit} more)" if len(skipped) > limit else ""
    return f" (skipped {len(skipped)}: {shown}{more})"


def _commit(target: Path, results: dict[str, Any], replace: bool) -> list[str]:
    """Write every result under a temporary name in ``target``, then rename them all; on failure remove the temps."""
    import numpy as np

    target.mkdir(parents=True, exist_ok=True)
    temps: dict[str, Path] = {}
    try:
        for name, value in results.items():
            temp = target / f".{name}.tmp-{os.getpid()}"
            temps[name] = temp
            if name.endswith(".npy"):
                with open(temp, "wb") as handle:
                    np.save(handle, value)
            else:
                temp.write_text("".join(f"{line}\n" for line in value), encoding="utf-8")
        if replace:  # outputs of an earlier run that this one does not write would no longer match
            for name in EMBED_OUTPUTS:
                if name not in results and (target / name).exists():
                    (target / name).unlink()
        for name, temp in temps.items():
            os.replace(temp, target / name)
    except BaseException:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
        raise
    return list(results)


# -- inputs ------------------------------------------------------------------------------------------------------------
#: ``(items, count or None, skipped)``: ``(key, path or encoded bytes)`` per image, and entries skipped up front.
ImageItems = tuple[Iterable[tuple[str, Path | bytes]], int | None, list[tuple[str, str]]]


def _image_items(images: str, image_root: str | None) -> ImageItems:
    """``(items, count or None, skipped)``: ``(key, path or bytes)`` per image, in a stable order."""
    path = Path(images).expanduser()
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise InputFileError(
                f"--images {path}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)}, searched recursively)"
            )
        return iter([(p.relative_to(path).as_posix(), p) for p in files]), len(files), []
    if path.suffix == ".json" and path.is_file():
        return _json_images(path, image_root)
    if ".tar" in images:
        return _shard_images(images)
    raise InputFileError(
        f"--images {images}: does not exist or is not an image source; give a folder of images, a JSON caption "
        "list ([{\"image\": path, ...}]) or WebDataset shards (e.g. 'shards/{000000..000009}.tar')"
    )


def _json_images(file: Path, image_root: str | None) -> ImageItems:
    from vlalign.data.annotations import load_annotations

    root = Path(image_root).expanduser() if image_root else file.parent
    seen: set[str] = set()
    items: list[tuple[str, Path]] = []
    skipped: list[tuple[str, str]] = []
    for index, entry in enumerate(load_annotations(file)):
        image = entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(image, str) or not image:
            skipped.append((f"{file.name} entry {index}", "no 'image' path"))
            continue
        if image in seen:
            continue
        seen.add(image)
        resolved = Path(image).expanduser()
        items.append((image, resolved if resolved.is_absolute() else root / resolved))
    if items and not any(p.is_file() for _, p in items[:: max(1, len(items) // 64)]):
        raise InputFileError(
            f"--images {file}: none of its images is found, e.g. {items[0][1]}; relative paths are resolved against "
            f"{root}: set --image_root to the folder they are relative to"
        )
    return iter(items), len(items), skipped


class _ShardSamples:
    """``(__key__, image bytes)`` of every sample in local WebDataset shards; unreadable shards and samples without
    an image are recorded in ``skipped`` and the rest go on."""

    def __init__(self, pattern: str) -> None:
        from webdataset.shardlists import expand_urls

        self.urls = expand_urls(pattern)
        missing = [url for url in self.urls if not Path(url).is_file()]
        if missing:
            raise InputFileError(
                f"--images {pattern}: {len(missing)} of {len(self.urls)} shard(s) not found, e.g. {missing[0]}; "
                "give local .tar files (a brace pattern like shards/{000000..000009}.tar)"
            )
        self.skipped: list[tuple[str, str]] = []

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        from webdataset.tariterators import base_plus_ext

        image_exts = {suffix.lstrip(".") for suffix in IMAGE_SUFFIXES}
        for url in self.urls:
            current: str | None = None
            image: bytes | None = None
            try:
                with tarfile.open(url, "r|*") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        key, ext = base_plus_ext(member.name)
                        if key is None:
                            continue
                        if key != current:
                            if current is not None:
                                yield from self._finish(current, image, url)
                            current, image = key, None
                        if image is None and ext.lower() in image_exts:
                            handle = tar.extractfile(member)
                            image = handle.read() if handle is not None else None
                if current is not None:
                    yield from self._finish(current, image, url)
            except (tarfile.TarError, OSError, EOFError) as err:
                self.skipped.append((url, _one_line(f"unreadable shard: {err}")))

    def _finish(self, key: str, image: bytes | None, url: str) -> Iterator[tuple[str, bytes]]:
        if image is None:
            self.skipped.append((key, f"no image in the sample ({url})"))
        else:
            yield key, image


def _shard_images(pattern: str) -> ImageItems:
    return _ShardSamples(pattern), None, []


def _caption_items(captions: str) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """``(keys, captions, skipped)`` from a JSON caption list or a text file (one caption per line)."""
    from vlalign.data.annotations import entry_captions, load_annotations

    path = Path(captions).expanduser()
    if not path.is_file():
        raise InputFileError(
            f"--captions {path}: does not exist; give a JSON caption list or a text file with one caption per line"
        )
    keys: list[str] = []
    texts: list[str] = []
    skipped: list[tuple[str, str]] = []
    if path.suffix == ".json":
        for index, entry in enumerate(load_annotations(path)):
            found = entry_captions(entry)
            if found is None:
                skipped.append((f"{path.name} entry {index}", "no caption (a string or a list of strings)"))
                continue
            for number, text in enumerate(found):
                keys.append(f"{index}:{number}")
                texts.append(text)
        return keys, texts, skipped
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputFileError(f"--captions {path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    for number, line in enumerate(lines, start=1):
        if line.strip():
            keys.append(str(number))
            texts.append(line)
    return keys, texts, skipped


def _embed_cli(
    model: str,
    out: str,
    images: str | None = None,
    captions: str | None = None,
    image_root: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    tokenizer: str | None = None,
    overwrite: bool = False,
) -> EmbedSummary:
    """Embed images and/or captions into .npy files (+ key files, one key per row) under --out.

    Args:
        model: a vlalign .ckpt, a folder written by `vlalign export`, or a converted .safetensors file.
        out: output folder: image_embeddings.npy + image_keys.txt, text_embeddings.npy + text_keys.txt,
            skipped.txt (key<TAB>reason); written only once everything is embedded.
        images: a folder of images (recursive; keys: relative paths), a JSON caption list (keys: its "image"
            values) or WebDataset shards such as 'shards/{000000..000009}.tar' (keys: __key__).
        captions: a JSON caption list (keys: entry:caption index) or a text file, one caption per line (keys: line
            numbers from 1).
        image_root: folder the relative image paths of a JSON list point into (default: the JSON file's folder).
        batch_size: images or captions per forward pass.
        device: cpu, cuda, cuda:1, ...
        tokenizer: tokenizer directory, for a converted reference file (it records none).
        overwrite: replace the outputs of an earlier run in --out.
    """
    return embed(model, out, images, captions, image_root, batch_size, device, tokenizer, overwrite)


def embed_command(args: list[str]) -> None:
    """``vlalign embed --model M --out DIR [--images SRC] [--captions FILE] ...``."""
    from jsonargparse import auto_cli

    print(auto_cli(_embed_cli, args=args, as_positional=False))
