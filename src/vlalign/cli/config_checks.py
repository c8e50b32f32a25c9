"""Checks of a parsed training config, before anything is built: every mistake found is reported together.

Cheap by design: they read the tokenizer and checkpoint headers (tensor shapes) and build ViTs on the meta device,
never the model. Objective settings are checked by the objectives themselves
(:meth:`~vlalign.objectives.base.Objective.config_errors`); this module gathers the facts they need and the messages.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from vlalign.errors import ConfigError, UserError
from vlalign.objectives.base import OBJECTIVES, ConfigFacts, Objective, builtin_objectives
from vlalign.utils.classes import resolve_class

__all__ = ["check_config", "configured_objectives", "vit_patch_size", "vit_width"]

#: The recipe's typed objective slots (the built-in registered objectives); third-party ones go in extra_objectives.
SLOTS: tuple[str, ...] = builtin_objectives()


def check_config(config: Namespace, subcommand: str = "fit") -> None:
    """Every cross-setting mistake in a parsed training config, reported together as one :class:`ConfigError`."""
    model = _get(config, "model") or Namespace()
    data = _get(config, "data")
    data_args = _get(data, "init_args") if isinstance(data, Namespace) and _get(data, "class_path") else data
    data_args = data_args if isinstance(data_args, Namespace) else Namespace()
    trainer = _get(config, "trainer") or Namespace()
    objectives = configured_objectives(model)
    errors: list[str] = []
    if not objectives:
        slots = ", ".join(f"model.{slot}" for slot in SLOTS)
        errors.append(f"no objective enabled: set at least one of {slots} (e.g. --model.itc '{{}}')")
    vision_errors, vit_name, vit_patch = _check_vision(model)
    errors += vision_errors
    facts = ConfigFacts(
        subcommand=subcommand,
        enabled=frozenset(objectives),
        batch_size=_get(data_args, "batch_size"),
        world_size=_world_size(trainer),
        accumulate_grad_batches=int(_get(trainer, "accumulate_grad_batches", 1) or 1),
        vit_name=vit_name,
        vit_patch=vit_patch,
        mask_patch_size=_get(data_args, "mask_patch_size"),
        data_masks_images="mask_patch_size" in data_args,
    )
    for cls, settings in objectives.values():
        errors += cls.config_errors(settings, facts)
    errors += _check_vocabulary(model, data_args)
    errors += _check_strategy(trainer)
    if errors:
        listing = "\n".join(f"  - {error}" for error in errors)
        raise ConfigError(f"invalid configuration ({len(errors)} problem{'s' * (len(errors) > 1)}):\n{listing}")


def configured_objectives(model: Namespace) -> dict[str, tuple[type[Objective], dict[str, Any]]]:
    """Enabled objectives as configured (slots and ``model.extra_objectives``): ``name -> (class, settings)``, where
    settings are the ``__init__`` defaults updated with the given ``init_args``. Classes jsonargparse could not
    resolve are left out (it reports them itself)."""
    entries = [(slot, _get(model, slot)) for slot in SLOTS]
    entries += [(None, entry) for entry in (_get(model, "extra_objectives") or [])]
    enabled: dict[str, tuple[type[Objective], dict[str, Any]]] = {}
    for slot, value in entries:
        cls = _class(_get(value, "class_path")) if value is not None else None
        if cls is None:
            continue
        settings = {
            p.name: p.default
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.default is not inspect.Parameter.empty
        }
        init_args = _get(value, "init_args")
        if isinstance(init_args, Namespace):
            settings.update(init_args.as_dict())
        enabled[slot or cls.name] = (cls, settings)
    return enabled


def _class(class_path: Any) -> type[Objective] | None:
    """A registered objective class, or None (jsonargparse reports unknown classes itself)."""
    cls = resolve_class(class_path)
    return cls if cls is not None and issubclass(cls, Objective) and OBJECTIVES.get(cls.name) is cls else None


def _get(namespace: Any, key: str, default: Any = None) -> Any:
    if isinstance(namespace, Namespace):
        return namespace.get(key, default)
    if isinstance(namespace, dict):
        return namespace.get(key, default)
    return default


def vit_patch_size(name: str) -> int | None:
    """The patch side of timm model ``name``: from the name (``..._patch16_...``), else from a meta-device build."""
    import timm

    match = re.search(r"patch(\d+)", name)
    if match:
        return int(match.group(1))
    if not timm.is_model(name):
        return None
    import torch

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        vit = timm.create_model(name, pretrained=False, num_classes=0)
    patch = getattr(getattr(vit, "patch_embed", None), "patch_size", None)
    return int(patch[0]) if patch is not None else None


@functools.lru_cache(maxsize=32)
def vit_width(name: str) -> int | None:
    """The feature width (``embed_dim``) of timm model ``name``, from a meta-device build (no memory, no init)."""
    import timm
    import torch

    import vlalign.models.vision  # noqa: F401 - registers the tiny test ViTs with timm

    if not timm.is_model(name):
        return None
    with torch.device("meta"):
        vit = timm.create_model(name, pretrained=False, num_classes=0)
    width = getattr(vit, "embed_dim", None) or getattr(vit, "num_features", None)
    return int(width) if isinstance(width, int) else None


def _check_stream_width(model: Namespace, name: str) -> list[str]:
    encoder_width = _get(_get(model, "stream"), "encoder_width")
    width = vit_width(name)
    if not isinstance(encoder_width, int) or width is None or encoder_width == width:
        return []
    return [
        f"model.stream.encoder_width ({encoder_width}) must equal the width of the ViT model.vision.name {name!r} "
        f"({width}): the stream's cross-attention reads the ViT's features. Set --model.stream.encoder_width {width} "
        f"(`encoder_width: {width}` under model.stream in the config), or choose a ViT of width {encoder_width}"
    ]


def _check_vision(model: Namespace) -> tuple[list[str], str | None, int | None]:
    """Mistakes in ``model.vision`` and the stream's width against it; also the ViT name and patch size."""
    import timm

    import vlalign.models.vision  # noqa: F401 - registers the tiny test ViTs with timm

    vision = _get(model, "vision")
    name, img_size = _get(vision, "name"), _get(vision, "img_size")
    if not isinstance(name, str):
        return [], None, None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models("*vit*") + timm.list_models("*deit*"), n=5)
        suggestion = f"; did you mean one of: {', '.join(close)}" if close else "; see timm.list_models('*vit*')"
        return [f"model.vision.name: {name!r} is not a timm model{suggestion}"], name, None
    errors = _check_stream_width(model, name)
    patch = vit_patch_size(name)
    if patch is not None and isinstance(img_size, int) and img_size % patch:
        lower, upper = img_size - img_size % patch, img_size - img_size % patch + patch
        errors.append(
            f"model.vision.img_size ({img_size}) is not a multiple of the patch size {patch} of {name}: "
            f"use e.g. {lower or upper} or {upper} (data.image_size follows model.vision.img_size)"
        )
    return errors, name, patch


def _world_size(trainer: Namespace) -> int:
    """Processes the trainer settings will start (devices x nodes); 'auto' / -1 count the visible GPUs."""
    import torch

    devices, accelerator = _get(trainer, "devices", "auto"), str(_get(trainer, "accelerator", "auto"))
    nodes = _get(trainer, "num_nodes", 1) or 1
    count: int
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, str) and "," in devices:
        count = len([d for d in devices.split(",") if d.strip()])
    else:
        try:
            count = int(devices)
        except (TypeError, ValueError):
            count = -1  # "auto"
        if count < 0:
            gpus = torch.cuda.device_count() if accelerator in ("gpu", "cuda", "auto") else 0
            count = max(1, gpus)
    return max(1, count) * int(nodes)


#: Strategies under which vlalign's tasks would train wrongly without a word: Lightning's ModelParallelStrategy
#: neither wraps the model in DDP nor shards it (a task's ``configure_model`` must), so each rank would train its
#: own copy with no gradient exchange. FSDP2 itself works with vlalign's step (tests/test_fsdp_cpu.py); vlalign does
#: not apply it for you yet (docs/multi_node.md, FSDP).
UNSUPPORTED_STRATEGIES = {"model_parallel": "ModelParallelStrategy", "ModelParallelStrategy": "ModelParallelStrategy"}


def _check_strategy(trainer: Namespace) -> list[str]:
    strategy = _get(trainer, "strategy", "auto")
    name = strategy if isinstance(strategy, str) else str(_get(strategy, "class_path", type(strategy).__name__))
    short = name.rsplit(".", 1)[-1]
    if short not in UNSUPPORTED_STRATEGIES:
        return []
    return [
        f"trainer.strategy: {name} does not synchronise gradients unless the model shards itself, which vlalign "
        "does not do: each process would train its own copy. Use trainer.strategy: ddp (see docs/multi_node.md)"
    ]


def _word_embedding_rows(path: Path) -> int | None:
    """Rows of the (online) word-embedding table in a weight file, read from its header; None if it has none."""
    from vlalign.models.backbone import online_name
    from vlalign.weights.reading import read_tensor_shapes

    shapes = read_tensor_shapes(path)
    keys = [k for k in shapes if k.endswith("word_embeddings.weight") and online_name(k) is None]
    return int(shapes[min(keys, key=len)][0]) if keys else None


def _check_vocabulary(model: Namespace, data: Namespace) -> list[str]:
    errors = []
    tokenizer = _get(data, "tokenizer")
    tokenizer_dir = Path(tokenizer).expanduser() if isinstance(tokenizer, str) else None
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        problem = "does not exist" if not tokenizer_dir.exists() else "is not a directory"
        errors.append(
            f"data.tokenizer: {tokenizer_dir} {problem}; give a local tokenizer directory saved with "
            f"save_pretrained() (e.g. the bert-base-uncased folder, or `vlalign data synth` output's tokenizer/)"
        )
        tokenizer_dir = None
    checkpoints = {
        "model.text_weights": _get(model, "text_weights"),
        "model.init_from": _get(model, "init_from"),
        "model.vision.weights": _get(_get(model, "vision"), "weights"),
    }
    for key, value in checkpoints.items():
        if isinstance(value, str) and not Path(value).expanduser().exists():
            errors.append(f"{key}: {Path(value).expanduser()} does not exist")
    if tokenizer_dir is None or errors:
        return errors
    sources = {k: Path(v).expanduser() for k, v in checkpoints.items() if v and k != "model.vision.weights"}
    if not sources:
        return errors
    from vlalign.data.tokenization import load_tokenizer

    vocab_size = len(load_tokenizer(tokenizer_dir))
    for key, path in sources.items():
        try:
            rows = _word_embedding_rows(path)
        except (FileNotFoundError, UserError) as err:
            errors.append(f"{key}: {err}")
            continue
        if rows is None or rows == vocab_size:
            continue
        relation = "smaller" if rows < vocab_size else "larger"
        errors.append(
            f"{key} ({path}) has a word-embedding table of {rows} rows, {relation} than the {vocab_size} tokens of "
            f"data.tokenizer ({tokenizer_dir}); token ids would "
            + ("index past the table" if rows < vocab_size else "not match the trained rows")
            + ". Use the tokenizer these weights were trained with (data.tokenizer), or other weights"
        )
    return errors
