"""Checkpoint import: official ALBEF / SIMLA checkpoints, Hugging Face BERT, timm/DeiT ViTs and the DALL-E dVAE.

Every converter writes a safetensors file keyed like :meth:`PretrainRecipe.state_dict` (``vision.*``, ``stream.*``,
``itc.*``, ...), which ``PretrainRecipe(init_from=...)`` (``fit --model.init_from``) reads. Files are read with
``weights_only=True`` or as safetensors; only ``convert_dvae`` unpickles, and only when told to.

Reference key layout (ALBEF ``models/model_pretrain.py``, SIMLA ``models/simla/pretrain.py``, both repositories'
retrieval models) and where each key goes:

================================================  ==========================================================
reference                                         vlalign
================================================  ==========================================================
``visual_encoder[_m].mask_token`` [1, 1, C]       ``vision[_m].mask_token`` [C]
``visual_encoder[_m].*`` (timm names)             ``vision[_m].vit.*``
``text_encoder[_m].bert.{embeddings,encoder}.*``  ``stream[_m].{embeddings,encoder}.*``
``text_encoder[_m].{embeddings,encoder}.*``       same (retrieval checkpoints: ``BertModel``, no ``bert.``)
``...embeddings.position_ids``                    derived buffer: checked, not stored
``...embeddings.token_type_embeddings``           kept in the ALBEF layout (``type_vocab_size: 2``)
``text_encoder[_m].cls.predictions.transform.*``  ``xmm.mlm_head[_m].transform.*``
``text_encoder[_m].cls.predictions.bias``         ``xmm.mlm_head[_m].bias``
``...predictions.decoder.weight``                 ``xmm.mlm_head[_m].decoder.weight`` (tied to word embeddings)
``...predictions.decoder.bias``                   tied to ``predictions.bias``: checked, not stored
``vision_proj[_m]``, ``text_proj[_m]``            ``itc.vision_proj[_m]``, ``itc.text_proj[_m]``
``temp``, ``image_queue``, ``text_queue``,        ``itc.temp``, ``itc.image_queue``, ``itc.text_queue``,
``queue_ptr``                                     ``itc.queue_ptr``
``itm_head``                                      ``itm.itm_head``
``mim_head[_m]`` (SIMLA)                          ``xmm.mim_head[_m]``
``concept_head[_m]`` (SIMLA)                      ``psl.concept_head[_m]``
``idx_queue`` (retrieval), ``...pooler.*``        no slot: reported unused
================================================  ==========================================================
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vlalign.errors import UserError
from vlalign.weights.safe_loading import load_state_dict_file

log = logging.getLogger(__name__)

Layout = Literal["auto", "simla", "albef"]

__all__ = [
    "ConversionError",
    "ConversionReport",
    "convert_bert",
    "convert_dvae",
    "convert_reference",
    "convert_reference_state",
    "convert_timm",
    "infer_config",
    "reference_key",
    "save_tensors",
]

# Online vlalign modules whose EMA twin is ``<first component>_m`` (vision_m, stream_m) or ``<head>_m``.
_TWIN_PATTERNS = (
    (re.compile(r"^(vision|stream)\.(.*)$"), r"\1_m.\2"),
    (
        re.compile(r"^(itc\.vision_proj|itc\.text_proj|xmm\.mlm_head|xmm\.mim_head|psl\.concept_head)\.(.*)$"),
        r"\1_m.\2",
    ),
)

# Reference top-level modules (heads and ITC state) -> vlalign prefixes; "_m" twins follow the same rule.
_HEADS = {
    "vision_proj": "itc.vision_proj",
    "text_proj": "itc.text_proj",
    "itm_head": "itm.itm_head",
    "mim_head": "xmm.mim_head",
    "concept_head": "psl.concept_head",
}
_ITC_STATE = ("temp", "image_queue", "text_queue", "queue_ptr")

_TEXT = re.compile(r"^text_encoder(?P<m>_m)?\.(?:bert\.)?(?P<rest>(?:embeddings|encoder|pooler)\..*)$")
_MLM = re.compile(r"^text_encoder(?P<m>_m)?\.cls\.predictions\.(?P<rest>.*)$")
_VISION = re.compile(r"^visual_encoder(?P<m>_m)?\.(?P<rest>.*)$")
_LAYER = re.compile(r"^stream(?:_m)?\.encoder\.layer\.(\d+)\.(crossattention\.)?")


class ConversionError(UserError, ValueError):
    """A conversion that would lose or misplace weights; carries the report."""

    def __init__(self, message: str, report: ConversionReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class ConversionReport:
    """What a conversion did with every tensor.

    Attributes:
        mapped: source key -> vlalign key, for every tensor written.
        unused: source keys with no vlalign slot (dropped; the conversion fails on them unless allowed).
        consumed: source keys checked and dropped on purpose (tied or derived tensors) -> why.
        missing: vlalign keys not filled: of the target when one was given, otherwise the momentum twins the
            checkpoint lacks for online tensors it has (``init_from`` copies those from the online weights).
        extra: converted keys the target has no slot for (only with a target).
        mismatched: converted keys whose shape differs from the target's (only with a target).
        warnings: inconsistencies worth a look (tied tensors that differ, layout doubts).
        hints: model settings the converted tensors imply (``model.stream.num_layers: 12``, ...).
        layout: the key layout used (``simla`` or ``albef``).
        out: the file written, when one was.
    """

    mapped: dict[str, str] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    consumed: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    hints: dict[str, Any] = field(default_factory=dict)
    layout: str | None = None
    out: str | None = None
    verbose: bool = field(default=False, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return not self.unused and not self.mismatched

    def format(self, verbose: bool = False) -> str:
        layout = f" ({self.layout} layout)" if self.layout else ""
        lines = [f"converted {len(self.mapped)} tensors{layout}" + (f" -> {self.out}" if self.out else "")]
        if verbose:
            lines += [f"  {src} -> {dst}" for src, dst in self.mapped.items()]
        if self.consumed:
            lines.append(f"checked and dropped {len(self.consumed)} tied/derived tensors:")
            lines += [f"  {key}: {why}" for key, why in self.consumed.items()]
        lines.append(f"unused source tensors: {len(self.unused)}")
        lines += [f"  {key}" for key in self.unused]
        lines.append(f"vlalign tensors not filled: {len(self.missing)}")
        lines += [f"  {key}" for key in self.missing]
        for title, items in (("converted tensors the target lacks", self.extra), ("shape mismatches", self.mismatched)):
            if items:
                lines.append(f"{title}: {len(items)}")
                lines += [f"  {key}" for key in items]
        lines += [f"warning: {w}" for w in self.warnings]
        if self.hints:
            lines.append("implied model settings:")
            lines += [f"  model.{key}: {json.dumps(value)}" for key, value in self.hints.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format(self.verbose)


# -- reference checkpoints -------------------------------------------------------------------------------------------
def reference_key(key: str, layout: Literal["simla", "albef"] = "simla") -> str | None:
    """The vlalign key of one reference (ALBEF / SIMLA) key, or None when vlalign has no slot for it.

    Tied and derived tensors (``position_ids``, ``predictions.decoder.bias``) also give None; the state-level
    :func:`convert_reference_state` checks and consumes them.
    """
    if layout not in ("simla", "albef"):
        raise ValueError(f"layout must be 'simla' or 'albef', got {layout!r}")
    if match := _VISION.match(key):
        twin, rest = match["m"] or "", match["rest"]
        return f"vision{twin}.mask_token" if rest == "mask_token" else f"vision{twin}.vit.{rest}"
    if match := _TEXT.match(key):
        twin, rest = match["m"] or "", match["rest"]
        if rest.startswith("pooler.") or rest == "embeddings.position_ids":
            return None
        if rest.startswith("embeddings.token_type_embeddings.") and layout != "albef":
            return None  # SIMLA's med.py stack has no token types
        return f"stream{twin}.{rest}"
    if match := _MLM.match(key):
        twin, rest = match["m"] or "", match["rest"]
        if rest == "decoder.bias":
            return None
        if rest == "bias" or rest == "decoder.weight" or rest.startswith("transform."):
            return f"xmm.mlm_head{twin}.{rest}"
        return None
    if key in _ITC_STATE:
        return f"itc.{key}"
    head, _, rest = key.partition(".")
    twin = "_m" if head.endswith("_m") else ""
    base = head[: -len(twin)] if twin else head
    if base in _HEADS and rest and not (twin and base == "itm_head"):
        return f"{_HEADS[base]}{twin}.{rest}"
    return None


def detect_layout(state: Mapping[str, Any]) -> Literal["simla", "albef"]:
    """ALBEF (xbert) has token-type embeddings and cross-attention only from ``fusion_layer`` on; SIMLA has neither."""
    if any(_TEXT.match(k) and ".token_type_embeddings." in k for k in state):
        return "albef"
    layers, cross = _layer_structure(state)
    return "albef" if layers and cross != layers else "simla"


def _layer_structure(state: Mapping[str, Any]) -> tuple[set[int], set[int]]:
    """Online text-encoder layer indices present, and those with cross-attention (reference key names)."""
    layers: set[int] = set()
    cross: set[int] = set()
    for key in state:
        match = _TEXT.match(key)
        if match is None or match["m"]:
            continue
        parts = match["rest"].split(".")
        if parts[0] == "encoder" and len(parts) > 3 and parts[1] == "layer":
            layers.add(int(parts[2]))
            if parts[3] == "crossattention":
                cross.add(int(parts[2]))
    return layers, cross


def convert_reference_state(
    state: Mapping[str, Any],
    layout: Layout = "auto",
    target: Mapping[str, Tensor] | nn.Module | None = None,
    queues: bool = True,
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Rename a reference ``model`` state dict to vlalign keys; never raises on leftovers, it reports them.

    Args:
        state: the reference model's state dict (the ``model`` entry of an ALBEF / SIMLA checkpoint).
        layout: ``simla`` (no token types), ``albef`` (token types kept), or ``auto`` (detected from the keys).
        target: a vlalign model (or its state dict) to check the result against: keys not filled, keys it has no
            slot for, shapes. Without one, ``missing`` lists the momentum twins the checkpoint lacks.
        queues: keep the ITC queues and pointer; ``False`` drops them (a recipe with another ``queue_size``).
    """
    state = _strip_prefix(dict(state), "module.")
    resolved = detect_layout(state) if layout == "auto" else layout
    if resolved not in ("simla", "albef"):
        raise ValueError(f"layout must be 'auto', 'simla' or 'albef', got {layout!r}")
    report = ConversionReport(layout=resolved)
    tensors: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            report.unused.append(key)
            continue
        name = reference_key(key, resolved)
        if name is None:
            why = _consumed_reason(key, value, state)
            if why is None:
                report.unused.append(key)
            else:
                report.consumed[key] = why
            continue
        if not queues and name in {f"itc.{k}" for k in _ITC_STATE if k != "temp"}:
            report.consumed[key] = "ITC queue dropped (queues=False)"
            continue
        if name.endswith(".mask_token"):
            value = value.reshape(-1)
        tensors[name] = value
        report.mapped[key] = name

    _tie_decoders(tensors, report)
    _check_layout(state, resolved, report)
    if target is not None:
        _check_target(tensors, target, report)
    else:
        report.missing = _missing_twins(tensors)
    report.hints = infer_config(tensors, resolved)
    return tensors, report


def _strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _consumed_reason(key: str, value: Tensor, state: Mapping[str, Any]) -> str | None:
    """Why a tensor without a slot may be dropped silently, or None when dropping it loses information."""
    if key.endswith("embeddings.position_ids") and _TEXT.match(key):
        expected = torch.arange(value.shape[-1]).expand_as(value)
        if value.dtype in (torch.int64, torch.int32) and torch.equal(value.long(), expected):
            return "derived buffer (arange)"
        return None
    if _MLM.match(key) and key.endswith("predictions.decoder.bias"):
        bias = state.get(key[: -len("decoder.bias")] + "bias")
        if isinstance(bias, Tensor) and bias.shape == value.shape and torch.equal(bias, value):
            return "tied to predictions.bias"
        return None
    return None


def _tie_decoders(tensors: dict[str, Tensor], report: ConversionReport) -> None:
    """The MLM decoder weight is the word-embedding matrix in both codebases; keep exactly one value for it."""
    for twin in ("", "_m"):
        decoder = f"xmm.mlm_head{twin}.decoder.weight"
        words = f"stream{twin}.embeddings.word_embeddings.weight"
        if decoder not in tensors or words not in tensors:
            continue
        if tensors[decoder].shape != tensors[words].shape or not torch.equal(tensors[decoder], tensors[words]):
            report.warnings.append(
                f"{decoder} differs from {words}; vlalign ties them, so the word embeddings are kept for both"
            )
            log.warning(report.warnings[-1])
        tensors[decoder] = tensors[words]


def _check_layout(state: Mapping[str, Any], layout: str, report: ConversionReport) -> None:
    layers, cross = _layer_structure(state)
    if not layers:
        return
    if layout == "simla" and cross != layers:
        plain = sorted(layers - cross)
        report.warnings.append(
            f"layers {plain} have no cross-attention, which the SIMLA layout needs in every layer: "
            "this looks like an ALBEF checkpoint (--layout albef)"
        )
    if layout == "albef" and cross:
        first = min(cross)
        if cross != set(range(first, max(layers) + 1)):
            report.warnings.append(f"cross-attention layers {sorted(cross)} are not a contiguous suffix of the stack")


def _twin_of(key: str) -> str | None:
    for pattern, replacement in _TWIN_PATTERNS:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return None


def _missing_twins(tensors: Mapping[str, Tensor]) -> list[str]:
    missing = [twin for key in tensors if (twin := _twin_of(key)) is not None and twin not in tensors]
    if any(k.startswith("xmm.mlm_head.") for k in tensors) and "xmm.mlm_head.decoder.weight" not in tensors:
        missing.append("xmm.mlm_head.decoder.weight")
    return missing


def _check_target(
    tensors: Mapping[str, Tensor], target: Mapping[str, Tensor] | nn.Module, report: ConversionReport
) -> None:
    from vlalign.models.backbone import with_prefix

    own = target.state_dict() if isinstance(target, nn.Module) else target
    if any(key.startswith("backbone.") for key in own):  # a recipe: compare in its layout
        tensors = with_prefix(tensors)
    report.missing = [key for key in own if key not in tensors]
    report.extra = [key for key in tensors if key not in own]
    for key, value in tensors.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            if key.endswith("pos_embed") and value.ndim == 3 and value.shape[-1] == own[key].shape[-1]:
                report.warnings.append(
                    f"{key}: {tuple(value.shape)} -> {tuple(own[key].shape)} is interpolated at load"
                )
                continue
            report.mismatched.append(f"{key}: converted {tuple(value.shape)}, target {tuple(own[key].shape)}")


# timm ViTs by (width, depth, patch): what ``model.vision.name`` must be for the converted vision tensors.
_KNOWN_VITS = {
    (192, 12, 16): "vit_tiny_patch16_224",
    (384, 12, 16): "vit_small_patch16_224",
    (768, 12, 16): "vit_base_patch16_224",
    (1024, 24, 16): "vit_large_patch16_224",
    (64, 2, 8): "vit_vlalign_tiny_patch8",
    (128, 4, 8): "vit_vlalign_small_patch8",
}


def infer_config(tensors: Mapping[str, Tensor], layout: str | None = None) -> dict[str, Any]:
    """Recipe settings (``model.<key>``) a vlalign-keyed state dict implies: what the config must say to load it.

    ``layout`` decides ``stream.fusion_layer`` when every layer has cross-attention: ``albef`` means an ALBEF split
    at layer 0 (SIMLA's NLVR models), anything else the single-stream layout.
    """
    hints: dict[str, Any] = {}
    if (patch := tensors.get("vision.vit.patch_embed.proj.weight")) is not None:
        width, size = int(patch.shape[0]), int(patch.shape[-1])
        depth = len({int(m[1]) for k in tensors if (m := re.match(r"^vision\.vit\.blocks\.(\d+)\.", k))})
        hints["vision.name"] = _KNOWN_VITS.get(
            (width, depth, size), f"<a timm ViT with width {width}, depth {depth}, patch {size}>"
        )
        if (pos := tensors.get("vision.vit.pos_embed")) is not None:
            hints["vision.img_size"] = round((pos.shape[1] - 1) ** 0.5) * size
        hints["vision.mask_token"] = "vision.mask_token" in tensors
    if (words := tensors.get("stream.embeddings.word_embeddings.weight")) is not None:
        hints["stream.vocab_size"] = int(words.shape[0])
        hints["stream.hidden_size"] = int(words.shape[1])
    if (positions := tensors.get("stream.embeddings.position_embeddings.weight")) is not None:
        hints["stream.max_position_embeddings"] = int(positions.shape[0])
    layers: set[int] = set()
    cross: set[int] = set()
    for key in tensors:
        if (match := _LAYER.match(key)) and key.startswith("stream."):
            layers.add(int(match[1]))
            if match[2]:
                cross.add(int(match[1]))
    if layers:
        hints["stream.num_layers"] = len(layers)
        if (ffn := tensors.get("stream.encoder.layer.0.intermediate.dense.weight")) is not None:
            hints["stream.intermediate_size"] = int(ffn.shape[0])
        if cross:
            first = min(cross)
            key_weight = tensors.get(f"stream.encoder.layer.{first}.crossattention.self.key.weight")
            if key_weight is not None:
                hints["stream.encoder_width"] = int(key_weight.shape[1])
            hints["stream.fusion_layer"] = first if layout == "albef" or cross != layers else None
    if (types := tensors.get("stream.embeddings.token_type_embeddings.weight")) is not None:
        hints["stream.type_vocab_size"] = int(types.shape[0])
    if (proj := tensors.get("itc.vision_proj.weight")) is not None:
        hints["itc.embed_dim"] = int(proj.shape[0])
    if (queue := tensors.get("itc.image_queue")) is not None:
        hints["itc.queue_size"] = int(queue.shape[1])
    if (mim := tensors.get("xmm.mim_head.weight")) is not None:
        hints["xmm.image_targets"] = f"<targets with {int(mim.shape[0])} outputs (8192: DVAETargets)>"
    return hints


def convert_reference(
    checkpoint: str,
    out: str,
    layout: Layout = "auto",
    allow_unused: bool = False,
    queues: bool = True,
    verbose: bool = False,
) -> ConversionReport:
    """Convert an official ALBEF or SIMLA pre-training / retrieval checkpoint into a vlalign ``init_from`` file.

    Args:
        checkpoint: the reference ``.pth`` (its ``model`` state dict is used; read with ``weights_only=True``).
        out: the ``.safetensors`` file to write (vlalign keys, as ``PretrainRecipe.state_dict()``).
        layout: ``simla`` (single stream, no token types), ``albef`` (token types kept; set ``stream.fusion_layer``
            and ``stream.type_vocab_size: 2``), or ``auto`` to detect it from the keys.
        allow_unused: write the file even when some source tensors have no vlalign slot (e.g. the retrieval
            checkpoints' ``idx_queue``); otherwise that is an error.
        queues: keep the ITC queues; ``false`` drops them (for a recipe with another ``itc.queue_size``).
        verbose: list every key mapping when the report is printed.
    """
    state = load_state_dict_file(checkpoint)
    tensors, report = convert_reference_state(state, layout=layout, queues=queues)
    if report.unused and not allow_unused:
        raise ConversionError(
            f"{report.format(verbose)}\n{checkpoint}: {len(report.unused)} tensor(s) have no vlalign slot: "
            f"{', '.join(report.unused)}. Nothing written; pass --allow_unused true to drop them.",
            report,
        )
    report.out = str(save_tensors(tensors, out, {"source": str(checkpoint), "layout": report.layout or ""}))
    report.verbose = verbose
    return report


# -- encoder initialisations: thin wrappers over the encoders' own loaders -------------------------------------------
def convert_bert(
    path: str,
    out: str,
    type_vocab_size: int = 0,
    max_position_embeddings: int | None = None,
    mlm_head: bool = True,
) -> ConversionReport:
    """Convert a local Hugging Face BERT (directory with ``config.json``) into ``stream.*`` tensors.

    Cross-attention does not exist in BERT, so it is not written (``init_from`` keeps the model's fresh init). Like
    the reference's ``BertForMaskedLM.from_pretrained``, BERT's MLM head initialises ``xmm.mlm_head``.

    Args:
        path: Hugging Face BERT directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``).
        out: the ``.safetensors`` file to write.
        type_vocab_size: keep BERT's token-type table (ALBEF layout: 2); 0 drops it (SIMLA).
        max_position_embeddings: truncate the position table (default: the BERT config's).
        mlm_head: also write BERT's MLM head (``cls.predictions``) as ``xmm.mlm_head.*``.
    """
    from vlalign.models.stream import SingleStreamTransformer, StreamConfig, hf_key, load_hf_bert
    from vlalign.weights.reading import read_state_dict

    overrides: dict[str, Any] = {"type_vocab_size": type_vocab_size}
    if max_position_embeddings is not None:
        overrides["max_position_embeddings"] = max_position_embeddings
    stream = SingleStreamTransformer(StreamConfig.from_hf_config(path, **overrides))
    loaded = load_hf_bert(stream, path)
    report, tensors = _encoder_tensors("stream", stream, loaded)
    if mlm_head:
        words = tensors.get("stream.embeddings.word_embeddings.weight")
        raw = read_state_dict(path)
        for key in list(report.unused):
            if not key.startswith("cls.predictions."):
                continue
            rest = hf_key(key)[len("cls.predictions.") :]
            if rest == "decoder.bias":
                report.consumed[key] = "tied to cls.predictions.bias"
            elif rest == "decoder.weight" and words is not None:
                if not torch.equal(raw[key], words):
                    report.warnings.append(f"{key} differs from the word embeddings; vlalign ties them")
                report.consumed[key] = "tied to the word embeddings"
                tensors["xmm.mlm_head.decoder.weight"] = words
            elif rest == "bias" or rest.startswith("transform."):
                tensors[f"xmm.mlm_head.{rest}"] = raw[key]
                report.mapped[key] = f"xmm.mlm_head.{rest}"
            else:
                continue
            report.unused.remove(key)
    report.hints = infer_config(tensors)
    report.out = str(save_tensors(tensors, out, {"source": str(path)}))
    return report


def convert_timm(
    path: str,
    out: str,
    name: str = "vit_base_patch16_224",
    img_size: int = 256,
) -> ConversionReport:
    """Convert a local DeiT / timm ViT checkpoint into ``vision.*`` tensors, position table resized to ``img_size``.

    Args:
        path: the ViT weights (``.pth`` / ``.bin`` / ``.safetensors``; DeiT's ``{"model": ...}`` is unwrapped).
        out: the ``.safetensors`` file to write.
        name: the timm architecture the weights belong to (as ``model.vision.name``).
        img_size: the training resolution (as ``model.vision.img_size``).
    """
    from vlalign.models.vision import VisionConfig, VisionEncoder, load_vision_weights

    encoder = VisionEncoder(VisionConfig(name=name, img_size=img_size, mask_token=True))
    report, tensors = _encoder_tensors("vision", encoder, load_vision_weights(encoder, path))
    report.hints = infer_config(tensors)
    report.out = str(save_tensors(tensors, out, {"source": str(path)}))
    return report


def _encoder_tensors(prefix: str, module: nn.Module, loaded: Any) -> tuple[ConversionReport, dict[str, Tensor]]:
    """The tensors an encoder loader filled, keyed for the recipe, and a report (source names as the loader's)."""
    own = module.state_dict()
    report = ConversionReport(
        mapped={key: f"{prefix}.{key}" for key in loaded.loaded},
        unused=list(loaded.unexpected),
        missing=[f"{prefix}.{key}" for key in loaded.missing],
    )
    return report, {f"{prefix}.{key}": own[key] for key in loaded.loaded}


def convert_dvae(pickle: str, out: str, allow_pickle: bool = False) -> str:
    """Convert OpenAI's DALL-E ``encoder.pkl`` into safetensors for ``DVAETargets`` (unpickles: trusted files only).

    Args:
        pickle: the pickled encoder (``encoder.pkl``).
        out: the ``.safetensors`` file to write.
        allow_pickle: confirm that the file is trusted; unpickling can run arbitrary code.
    """
    from vlalign.objectives.image_targets import convert_dvae_pickle

    return str(convert_dvae_pickle(pickle, out, allow_pickle=allow_pickle))


# -- output ----------------------------------------------------------------------------------------------------------
def save_tensors(tensors: Mapping[str, Tensor], out: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write tensors as safetensors; tensors sharing memory (tied weights) are written as separate copies."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"output must be a .safetensors file, got {out}")
    seen: set[int] = set()
    flat: dict[str, Tensor] = {}
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        flat[key] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(out), metadata={"format": "vlalign", **(metadata or {})})
    return out
