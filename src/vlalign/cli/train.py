"""The training commands (fit, validate, test): one LightningCLI subclass using public hooks only.

Configuration mistakes that need both the data and the model settings are caught in
:meth:`VlalignCLI.before_instantiate_classes`, on the parsed config, before any model or data module is built.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from vlalign.tasks.pretrain import OBJECTIVE_SLOTS, PretrainRecipe

TRAINING_COMMANDS = ("fit", "validate", "test")

# How to satisfy a requirement other than enabling the required objective, when the requirement depends on settings.
_REQUIREMENT_HINTS = {("itm", "itc"): "or let model.itm draw random negatives (--model.itm.negatives random)"}


class ConfigError(ValueError):
    """A configuration mistake found before anything is built; the message names the keys and how to fix them."""


class VlalignCLI(LightningCLI):
    """Links the tokenizer's vocabulary and the image size between data and model, so each is set once."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - LightningArgumentParser
        parser.link_arguments("model.vision.img_size", "data.init_args.image_size")
        parser.link_arguments("data.vocab", "model.vocab", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Cross-check data, model and trainer settings on the parsed config; raises :class:`ConfigError`."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_config(config, self.subcommand or "fit")


# -- configuration checks ------------------------------------------------------------------------------------------
def check_config(config: Namespace, subcommand: str = "fit") -> None:
    """Every cross-setting mistake in a parsed training config, reported together as one :class:`ConfigError`.

    Cheap by design: reads the tokenizer and checkpoint headers (tensor shapes), never builds the model.
    """
    model = _get(config, "model") or Namespace()
    data = _get(config, "data")
    data_args = _get(data, "init_args") if isinstance(data, Namespace) and _get(data, "class_path") else data
    data_args = data_args if isinstance(data_args, Namespace) else Namespace()
    trainer = _get(config, "trainer") or Namespace()
    objectives = _enabled_objectives(model)
    errors: list[str] = []
    errors += _check_requirements(objectives)
    errors += _check_vision(model, data_args, objectives)
    if subcommand == "fit":  # only training writes the queue
        errors += _check_queue(objectives, data_args, trainer)
    errors += _check_vocabulary(model, data_args)
    if errors:
        listing = "\n".join(f"  - {error}" for error in errors)
        raise ConfigError(f"invalid configuration ({len(errors)} problem{'s' * (len(errors) > 1)}):\n{listing}")


def _get(namespace: Any, key: str, default: Any = None) -> Any:
    if isinstance(namespace, Namespace):
        return namespace.get(key, default)
    if isinstance(namespace, dict):
        return namespace.get(key, default)
    return default


class _Objective:
    """An enabled objective slot as configured: its class and settings (signature defaults + given init_args)."""

    def __init__(self, slot: str, cls: type | None, settings: dict[str, Any]) -> None:
        self.slot = slot
        self.cls = cls
        self.settings = settings

    def attribute(self, name: str, default: Any) -> Any:
        """A class attribute, or a property evaluated on the settings alone (no module is built)."""
        if self.cls is None:
            return default
        try:
            value = inspect.getattr_static(self.cls, name)
        except AttributeError:
            return default
        if isinstance(value, property):
            try:
                return value.fget(SimpleNamespace(**self.settings))
            except Exception:  # noqa: BLE001 - needs more than the settings: the recipe checks it when built
                return default
        return getattr(self.cls, name, default)


def _enabled_objectives(model: Namespace) -> dict[str, _Objective]:
    enabled = {}
    for slot in OBJECTIVE_SLOTS:
        value = _get(model, slot)
        if value is None:
            continue
        class_path = _get(value, "class_path")
        cls = None
        if isinstance(class_path, str) and "." in class_path:
            module, _, name = class_path.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                cls = None  # jsonargparse reports unknown classes itself
        settings: dict[str, Any] = {}
        if cls is not None:
            for parameter in inspect.signature(cls.__init__).parameters.values():
                if parameter.default is not inspect.Parameter.empty:
                    settings[parameter.name] = parameter.default
        init_args = _get(value, "init_args")
        if isinstance(init_args, Namespace):
            settings.update(init_args.as_dict())
        enabled[slot] = _Objective(slot, cls, settings)
    return enabled


def _check_requirements(objectives: dict[str, _Objective]) -> list[str]:
    if not objectives:
        slots = ", ".join(f"model.{slot}" for slot in OBJECTIVE_SLOTS)
        return [f"no objective enabled: set at least one of {slots} (e.g. --model.itc '{{}}')"]
    errors = []
    for slot, objective in objectives.items():
        for required in objective.attribute("requires", ()):
            if required not in objectives:
                hint = _REQUIREMENT_HINTS.get((slot, required))
                errors.append(
                    f"model.{slot} requires model.{required}, which is disabled (model.{required}: null). Fix: enable "
                    f"model.{required} (--model.{required} '{{}}', or `{required}: {{}}` under `model:` in the "
                    f"config), or disable model.{slot} (--model.{slot} null)" + (f", {hint}" if hint else "")
                )
    return errors


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


def _check_vision(model: Namespace, data: Namespace, objectives: dict[str, _Objective]) -> list[str]:
    import timm

    import vlalign.models.vision  # noqa: F401 - registers the tiny test ViTs with timm

    vision = _get(model, "vision")
    name, img_size = _get(vision, "name"), _get(vision, "img_size")
    if not isinstance(name, str):
        return []
    errors = []
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models("*vit*") + timm.list_models("*deit*"), n=5)
        suggestion = f"; did you mean one of: {', '.join(close)}" if close else "; see timm.list_models('*vit*')"
        return [f"model.vision.name: {name!r} is not a timm model{suggestion}"]
    patch = vit_patch_size(name)
    if patch is None:
        return []
    if isinstance(img_size, int) and img_size % patch:
        lower, upper = img_size - img_size % patch, img_size - img_size % patch + patch
        errors.append(
            f"model.vision.img_size ({img_size}) is not a multiple of the patch size {patch} of {name}: "
            f"use e.g. {lower or upper} or {upper} (data.image_size follows model.vision.img_size)"
        )
    masked = [slot for slot, o in objectives.items() if o.attribute("needs_masked_images", False)]
    mask_patch = _get(data, "mask_patch_size")
    if masked and mask_patch != patch and "mask_patch_size" in data:
        how = "is not set" if mask_patch is None else f"is {mask_patch}"
        errors.append(
            f"model.{masked[0]} masks image patches, so data.mask_patch_size must equal the ViT patch size {patch} "
            f"of {name}, but it {how}: set --data.init_args.mask_patch_size {patch}"
        )
    return errors


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


def _check_queue(objectives: dict[str, _Objective], data: Namespace, trainer: Namespace) -> list[str]:
    itc = objectives.get("itc")
    batch_size = _get(data, "batch_size")
    if itc is None or not isinstance(batch_size, int):
        return []
    queue_size = itc.settings.get("queue_size", 0)
    if not isinstance(queue_size, int) or queue_size <= 0:
        return []
    world = _world_size(trainer)
    accumulate = _get(trainer, "accumulate_grad_batches", 1) or 1
    written = batch_size * world * int(accumulate)
    if queue_size >= written:
        return []
    return [
        f"model.itc.queue_size ({queue_size}) is smaller than the features written to it per optimizer step: "
        f"data.batch_size ({batch_size}) x {world} process(es) x trainer.accumulate_grad_batches ({accumulate}) "
        f"= {written}, so the queue would never hold a full step of negatives. Raise model.itc.queue_size to at "
        f"least {written}, lower data.batch_size, or set model.itc.queue_size 0 to disable the queue"
    ]


def _word_embedding_rows(path: Path) -> int | None:
    """Rows of the (online) word-embedding table in a checkpoint, read from its header; None if it has none."""
    import torch

    from vlalign.models.loading import resolve_checkpoint

    file = resolve_checkpoint(path)

    def pick(keys: list[str]) -> str | None:
        candidates = [k for k in keys if k.endswith("word_embeddings.weight") and "_m." not in k]
        return min(candidates, key=len) if candidates else None

    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            key = pick(list(handle.keys()))
            return int(handle.get_slice(key).get_shape()[0]) if key else None
    from vlalign.checkpoints import allow_config_classes_in_checkpoints

    allow_config_classes_in_checkpoints()  # Lightning checkpoints carry the config dataclasses in hyper_parameters
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an unreadable file gets its own error from the loader, with its path
        return None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        return None
    key = pick([k for k in state if isinstance(k, str)])
    return int(state[key].shape[0]) if key else None


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
    from vlalign.tokenization import load_tokenizer

    vocab_size = len(load_tokenizer(tokenizer_dir))
    for key, path in sources.items():
        try:
            rows = _word_embedding_rows(path)
        except FileNotFoundError as err:
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


def run_training_cli(args: list[str]) -> VlalignCLI:
    from lightning.pytorch import LightningDataModule

    return VlalignCLI(
        PretrainRecipe,
        LightningDataModule,
        subclass_mode_data=True,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )
