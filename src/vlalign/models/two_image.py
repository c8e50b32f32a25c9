"""Two-image fusion (NLVR2): the stream with its upper fusion layers duplicated, attending to two images in turn.

A statement about a *pair* of images is fused as the reference's NLVR2 model does (docs/tasks.md, "NLVR2"): text
queries cross-attend to one image per layer, the two images alternating, and every fusion layer from
``duplicate_from`` on is duplicated so that each image gets its own copy of it.

The weight mapping from a pretrained stream of ``N`` layers whose fusion starts at layer ``F`` (``F = 0`` in single
stream, ``F = fusion_layer`` under the ALBEF split), with ``D = duplicate_from`` (``F <= D <= N``):

- layers ``0 .. D-1`` are copied as they are (layer ``j`` <- pretrained layer ``j``);
- pretrained layer ``k`` in ``D .. N-1`` becomes layers ``D + 2(k-D)`` and ``D + 2(k-D) + 1``: two copies with the
  same initial weights, whose cross-attention **key and value projections are shared** (one module, one parameter);
  their queries, cross-attention outputs, self-attention and feed-forward blocks are separate copies that fine-tune
  apart;
- embeddings (and token types when the stream has them) are copied unchanged.

The expanded stream has ``D + 2(N - D)`` layers; fusion layer ``j`` (``j >= F``) attends to image ``(j - F) mod 2``
(0: the left image, 1: the right one). ALBEF (6 text + 6 fusion layers) gives ``D = F = 6``: 18 layers, fusion layers
6..17 alternate, pairs (6, 7) ... (16, 17) share K/V. SIMLA (12 layers, all fusing) uses ``D = 6``: layers 0..5 keep
their own cross-attention and alternate images, pretrained layers 6..11 are duplicated into 6..17 (SIMLA's own code
runs this through ALBEF's stack with ``fusion_layer = 0`` and adds BERT's token-type vector, which its pretraining
never used; here the stream keeps the pretrained embeddings).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from vlalign.models.stream import SingleStreamTransformer, StreamConfig, StreamOutput

__all__ = ["NUM_IMAGES", "TwoImageStream", "default_duplicate_from", "expanded_layer_sources"]

#: Images a statement is fused with.
NUM_IMAGES = 2
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.*)$")


def default_duplicate_from(config: StreamConfig) -> int:
    """The reference's choice: the ALBEF split duplicates every fusion layer (``D = fusion_layer``); a single stream
    keeps its lower half and duplicates the upper half (SIMLA: 6 of 12)."""
    return config.fusion_layer if config.fusion_layer is not None else config.num_layers // 2


def expanded_layer_sources(num_layers: int, duplicate_from: int) -> list[int]:
    """For each layer of the expanded stream, the pretrained layer it starts from (see the module docstring)."""
    if not 0 <= duplicate_from <= num_layers:
        raise ValueError(f"duplicate_from must be in [0, {num_layers}], got {duplicate_from}")
    upper = [k for k in range(duplicate_from, num_layers) for _ in range(NUM_IMAGES)]
    return list(range(duplicate_from)) + upper


class TwoImageStream(SingleStreamTransformer):
    """The stream expanded for two images: same embeddings, text layers and parameter names as the pretrained
    stream (``encoder.layer.N.*``), ``D + 2(N - D)`` layers, K/V shared within each duplicated pair.

    Build it from a pretrained stream with :meth:`from_stream`, or empty (to load a fine-tuned state) with the
    pretrained stream's config. Text mode (:meth:`encode_text`) is unchanged; :meth:`fuse_pair` is the two-image
    fusion. A deep copy (the momentum twin) keeps the sharing.

    Args:
        base: the config of the pretrained stream (``N`` layers).
        duplicate_from: ``D``; None: :func:`default_duplicate_from`.
    """

    def __init__(self, base: StreamConfig, duplicate_from: int | None = None) -> None:
        first_fusion = 0 if base.fusion_layer is None else base.fusion_layer
        start = default_duplicate_from(base) if duplicate_from is None else duplicate_from
        if not first_fusion <= start <= base.num_layers:
            raise ValueError(
                f"model.duplicate_from must be in [{first_fusion}, {base.num_layers}] (from the first fusion layer "
                f"to the number of stream layers), got {start}"
            )
        sources = expanded_layer_sources(base.num_layers, start)
        super().__init__(dataclasses.replace(base, num_layers=len(sources)))
        self.base_config = base
        self.duplicate_from = start
        self.layer_sources = sources
        for first in self.shared_pairs:
            a, b = self.encoder.layer[first].crossattention, self.encoder.layer[first + 1].crossattention
            b.self.key = a.self.key  # one module under both names: the pair projects the images identically
            b.self.value = a.self.value

    # -- structure -------------------------------------------------------------------------------------------------
    @property
    def shared_pairs(self) -> list[int]:
        """The first layer of every duplicated pair (its partner is the next layer)."""
        return list(range(self.duplicate_from, len(self.layer_sources), NUM_IMAGES))

    def image_of_layer(self, index: int) -> int:
        """Which image fusion layer ``index`` attends to: ``(index - first fusion layer) mod 2``."""
        if index not in self.fusion_layers:
            raise ValueError(f"layer {index} does not fuse; the fusion layers are {self.fusion_layers}")
        return (index - self.fusion_layers.start) % NUM_IMAGES

    def source_key(self, key: str) -> str:
        """The pretrained state-dict key a key of this stream is initialised from."""
        match = _LAYER_KEY.match(key)
        if match is None:
            return key
        return f"encoder.layer.{self.layer_sources[int(match.group(1))]}.{match.group(2)}"

    @classmethod
    def from_stream(cls, stream: SingleStreamTransformer, duplicate_from: int | None = None) -> TwoImageStream:
        """The expanded stream initialised from ``stream`` by the mapping of the module docstring."""
        if isinstance(stream, TwoImageStream):
            raise ValueError("the stream is already a two-image stream; load it as it is")
        expanded = cls(copy.deepcopy(stream.config), duplicate_from)
        source = stream.state_dict()
        state = {key: source[expanded.source_key(key)] for key in expanded.state_dict()}
        expanded.load_state_dict(state, strict=True)
        return expanded.to(device=next(stream.parameters()).device)

    # -- the pass ----------------------------------------------------------------------------------------------------
    def fuse_pair(
        self,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        images: Sequence[Tensor],
        image_masks: Sequence[Tensor | None] | None = None,
        *,
        text_states: Tensor | None = None,
    ) -> StreamOutput:
        """Text queries ``[B, L]`` fused with two images ``[B, P, encoder_width]`` each, one per fusion layer.

        Starts like :meth:`fuse` (embedded ids in single stream; under the ALBEF split the text layers' output of the
        ids, or the given ``text_states``); ``image_masks`` (optional ``[B, P]`` keep-masks) follow ``images``.
        """
        if len(images) != NUM_IMAGES:
            raise ValueError(f"fuse_pair takes {NUM_IMAGES} image token tensors, got {len(images)}")
        masks = list(image_masks) if image_masks is not None else [None] * NUM_IMAGES
        hidden = self._fusion_start(attention_mask, input_ids, text_states)
        batch, length, _ = hidden.shape
        mask = _keep_mask(attention_mask, batch, length)
        contexts = [(tokens, _keep_mask(m, batch, tokens.shape[1])) for tokens, m in zip(images, masks, strict=True)]
        for tokens, _ in contexts:
            if tokens.shape[0] != batch or tokens.shape[-1] != self.config.encoder_width:
                raise ValueError(
                    f"each image must be [B={batch}, P, encoder_width={self.config.encoder_width}], "
                    f"got {tuple(tokens.shape)}"
                )
        checkpointing = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for index in self.fusion_layers:
            tokens, token_mask = contexts[self.image_of_layer(index)]
            layer = self.encoder.layer[index]
            args = (hidden, mask, tokens, token_mask, False)
            hidden, _ = checkpoint(layer, *args, use_reentrant=False) if checkpointing else layer(*args)
        return StreamOutput(last_hidden_state=hidden)


def _keep_mask(mask: Tensor | None, batch: int, length: int) -> Tensor | None:
    """[B, L] keep-mask -> boolean SDPA mask [B, 1, 1, L] (True = attend)."""
    if mask is None:
        return None
    if mask.shape != (batch, length):
        raise ValueError(f"mask must have shape {(batch, length)}, got {tuple(mask.shape)}")
    return mask.bool()[:, None, None, :]
