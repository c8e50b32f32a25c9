"""The backbone: the ViT, the shared stream, their momentum (EMA) twins when asked for, and the passes every consumer
needs. Pretraining, the downstream tasks, retrieval evaluation and the inference API all use this one object.

State-dict keys are ``vision.*``, ``stream.*`` and, for the twins, ``vision_m.*`` / ``stream_m.*`` (the layout
converted reference checkpoints use too). A module that holds the backbone as ``backbone`` prefixes them; weight
files in the backbone-relative layout are mapped with :func:`with_prefix`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from vlalign.models.stream import SingleStreamTransformer, StreamConfig, StreamOutput, load_hf_bert
from vlalign.models.vision import VisionConfig, VisionEncoder

log = logging.getLogger(__name__)

Encoder = Literal["vision", "stream"]
ENCODERS: tuple[Encoder, ...] = ("vision", "stream")
#: The suffix that marks a momentum twin: ``vision_m`` is the twin of ``vision``, ``itc.text_proj_m`` of ``text_proj``.
MOMENTUM_SUFFIX = "_m"


def online_name(key: str) -> str | None:
    """The online parameter a momentum-twin key shadows (``stream_m.x`` -> ``stream.x``), or None for online keys.

    The one place that parses the twin suffix: weight loading and config checks use it.
    """
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.endswith(MOMENTUM_SUFFIX) and len(part) > len(MOMENTUM_SUFFIX):
            return ".".join([*parts[:i], part[: -len(MOMENTUM_SUFFIX)], *parts[i + 1 :]])
    return None


def make_twin(module: nn.Module, tied: Mapping[int, nn.Parameter] | None = None) -> nn.Module:
    """A frozen deep copy of ``module`` for EMA updates.

    ``tied`` maps ``id(online parameter)`` to the twin parameter that must stand in for it: a head whose weight is
    tied to an encoder's (the MLM decoder shares the word embeddings) gets a twin tied to the momentum encoder's
    weight instead of a private copy. This is the one twin mechanism of encoders and objective heads.
    """
    memo: dict[int, object] = dict(tied or {})
    twin = copy.deepcopy(module, memo)
    twin.requires_grad_(False)
    return twin


def with_prefix(state: Mapping[str, Tensor], prefix: str = "backbone.") -> dict[str, Tensor]:
    """Prefix backbone-relative keys (``vision.*``, ``stream.*``, ``vision_m.*``, ``stream_m.*``) with ``prefix``;
    other keys (objective heads) are kept as they are."""
    roots = {*ENCODERS, *(f"{name}{MOMENTUM_SUFFIX}" for name in ENCODERS)}
    return {(prefix + key if key.split(".", 1)[0] in roots else key): value for key, value in state.items()}


class Backbone(nn.Module):
    """Image encoder, text/fusion stream and, when ``momentum`` names them, their EMA twins.

    Args:
        vision: the timm ViT and its optional local weights (``vision.weights``).
        stream: the BERT-compatible stream (single stream, or an ALBEF split with ``fusion_layer``).
        momentum: encoders that get an EMA twin (``{"vision", "stream"}`` or a subset).
        text_weights: local Hugging Face BERT directory (or file) to initialise the stream from.
    """

    def __init__(
        self,
        vision: VisionConfig,
        stream: StreamConfig,
        momentum: Iterable[str] = (),
        text_weights: str | None = None,
    ) -> None:
        super().__init__()
        momentum = frozenset(momentum)
        unknown = momentum - set(ENCODERS)
        if unknown:
            raise ValueError(f"momentum twins can be made of {ENCODERS}, got {sorted(unknown)}")
        self.vision = VisionEncoder(vision)
        if stream.encoder_width != self.vision.width:
            raise ValueError(
                f"model.stream.encoder_width ({stream.encoder_width}) must equal the width of the ViT "
                f"model.vision.name={vision.name!r} ({self.vision.width}): set model.stream.encoder_width "
                f"{self.vision.width}"
            )
        self.stream = SingleStreamTransformer(stream)
        if text_weights:
            log.info("stream weights from %s: %s", text_weights, load_hf_bert(self.stream, text_weights))
        self.vision_m: VisionEncoder | None = make_twin(self.vision) if "vision" in momentum else None  # type: ignore[assignment]
        self.stream_m: SingleStreamTransformer | None = (
            make_twin(self.stream) if "stream" in momentum else None  # type: ignore[assignment]
        )

    # -- structure ---------------------------------------------------------------------------------------------
    @property
    def single_stream(self) -> bool:
        return self.stream.single_stream

    @property
    def vision_width(self) -> int:
        return self.vision.width

    @property
    def text_width(self) -> int:
        return self.stream.config.hidden_size

    def encoder(self, name: Encoder, momentum: bool = False) -> nn.Module:
        """The online encoder ``name``, or its twin (an error naming the fix when no objective asked for one)."""
        if not momentum:
            return getattr(self, name)
        twin = getattr(self, f"{name}{MOMENTUM_SUFFIX}")
        if twin is None:
            raise RuntimeError(f"no momentum {name} encoder: no enabled objective declared it in momentum_encoders()")
        return twin

    def twin_map(self) -> dict[int, nn.Parameter]:
        """``id(online parameter) -> twin parameter`` over the encoders that have twins (for :func:`make_twin`)."""
        mapping: dict[int, nn.Parameter] = {}
        for name in ENCODERS:
            twin = getattr(self, f"{name}{MOMENTUM_SUFFIX}")
            if twin is not None:
                for p, p_m in zip(getattr(self, name).parameters(), twin.parameters(), strict=True):
                    mapping[id(p)] = p_m
        return mapping

    def momentum_pairs(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        for name in ENCODERS:
            twin = getattr(self, f"{name}{MOMENTUM_SUFFIX}")
            if twin is not None:
                yield getattr(self, name), twin

    def train(self, mode: bool = True) -> Backbone:
        """Twins stay in eval mode: the teacher runs without dropout (docs/differences.md row 11)."""
        super().train(mode)
        for twin in (self.vision_m, self.stream_m):
            if twin is not None:
                twin.eval()
        return self

    # -- passes ------------------------------------------------------------------------------------------------
    def encode_images(
        self, images: Tensor, patch_mask: Tensor | None = None, *, momentum: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Image tokens ``[B, 1+N, width]``; with ``patch_mask`` [B, N] also the masked view, both in ONE ViT batch.

        Returns ``(clean, masked)``; ``masked`` is None without a mask.
        """
        encoder = self.encoder("vision", momentum)
        if patch_mask is None:
            return encoder(images), None
        mask = patch_mask.flatten(1).bool()
        both = encoder(torch.cat([images, images]), torch.cat([torch.zeros_like(mask), mask]))
        clean, masked = both.chunk(2)
        return clean, masked

    def encode_text(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        *,
        momentum: bool = False,
        word_embeds: Tensor | None = None,
    ) -> Tensor:
        """Text-mode states ``[B, L, H]`` (no cross-attention). ``word_embeds``: the ids' rows of this stream's word
        embeddings, looked up once for several passes (:meth:`SingleStreamTransformer.embed_ids`)."""
        stream = self.encoder("stream", momentum)
        return stream.encode_text(input_ids, attention_mask, word_embeds=word_embeds).last_hidden_state

    def fuse(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_tokens: Tensor,
        *,
        text_states: Tensor | None = None,
        image_mask: Tensor | None = None,
        momentum: bool = False,
        attention_probs_layer: int | None = None,
        word_embeds: Tensor | None = None,
    ) -> StreamOutput:
        """Text queries attending to image tokens, in whichever layout the stream has.

        Under an ALBEF split, ``text_states`` (text-mode outputs of these ids, e.g. cached) skip the text layers;
        in single stream, or without them, the ids are encoded from scratch (from ``word_embeds``, their word-
        embedding rows, when given).
        """
        stream = self.encoder("stream", momentum)
        use_states = text_states is not None and not stream.single_stream
        return stream.fuse(
            attention_mask,
            image_tokens,
            image_mask,
            input_ids=None if use_states else input_ids,
            text_states=text_states if use_states else None,
            attention_probs_layer=attention_probs_layer,
            word_embeds=None if use_states else word_embeds,
        )

    def image_side(
        self,
        image_tokens: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        *,
        momentum: bool = False,
        word_embeds: Tensor | None = None,
    ) -> Tensor:
        """SIMLA's image side: image tokens as the stream's inputs, cross-attending to the caption's embeddings
        (``word_embeds`` as in :meth:`encode_text`)."""
        stream = self.encoder("stream", momentum)
        text_embeds = stream.embed_ids(input_ids, word_embeds)
        return stream.encode_image_side(image_tokens, text_embeds, attention_mask).last_hidden_state
