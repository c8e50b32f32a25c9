"""One BERT-compatible transformer stack that serves as text encoder, text->image fusion and image->text fusion.

Parameter names follow the Hugging Face BERT layout so BERT, ALBEF and SIMLA checkpoints map onto it by name.
Attention runs on ``scaled_dot_product_attention``; only the one layer whose probabilities are requested (PSL needs
them) computes the softmax explicitly. The three roles and the ALBEF split: docs/method.md §1.2.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlalign.weights.reading import LoadReport, read_state_dict

Mode = Literal["text", "multimodal", "image"]
_MODES = ("text", "multimodal", "image")

# Hugging Face BERT config.json key -> StreamConfig field. type_vocab_size is deliberately absent: every BERT config
# says 2, but SIMLA's stack has no token-type embedding, so it is opted into by an explicit override (ALBEF).
_HF_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "hidden_dropout_prob": "hidden_dropout",
    "attention_probs_dropout_prob": "attention_dropout",
    "layer_norm_eps": "layer_norm_eps",
    "encoder_width": "encoder_width",
    "fusion_layer": "fusion_layer",
    "pad_token_id": "pad_token_id",
}


@dataclass
class StreamConfig:
    """Shape and behaviour of the shared stack; defaults are BERT-base in SIMLA's single-stream layout."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    encoder_width: int = 768
    fusion_layer: int | None = None
    gradient_checkpointing: bool = False
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_position_embeddings",
            "encoder_width",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"StreamConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"StreamConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.type_vocab_size < 0:
            raise ValueError(f"StreamConfig.type_vocab_size must be >= 0, got {self.type_vocab_size}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"StreamConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.fusion_layer is not None and not 0 <= self.fusion_layer < self.num_layers:
            raise ValueError(
                f"StreamConfig.fusion_layer must satisfy 0 <= fusion_layer < num_layers ({self.num_layers}), "
                f"got {self.fusion_layer}; use None for the single-stream layout"
            )
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"StreamConfig.pad_token_id ({self.pad_token_id}) must index the vocabulary")

    @classmethod
    def from_hf_config(cls, path: str | Path, **overrides: Any) -> StreamConfig:
        """Read a local HF BERT ``config.json`` (file or its directory); keyword overrides win over the file."""
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"no BERT config.json at {path}")
        raw = json.loads(file.read_text())
        act = raw.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"{file}: hidden_act {act!r} is not supported; the stack implements erf GELU ('gelu')")
        values = {field: raw[key] for key, field in _HF_KEYS.items() if key in raw and raw[key] is not None}
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown StreamConfig field(s): {sorted(unknown)}")
        return cls(**{**values, **overrides})


@dataclass
class StreamOutput:
    """Final hidden states plus, when requested, one layer's self-attention probabilities (pre-dropout)."""

    last_hidden_state: Tensor
    attention_probs: Tensor | None = None


@dataclass(frozen=True)
class ImageKV:
    """Cross-attention keys and values of a set of images, computed once per fusion layer (K/V reuse).

    Re-ranking fuses every image with many captions (docs/method.md §5.2); the image side of each fusion layer's
    cross-attention (the key and value projections of ``1+P`` image tokens) does not depend on the caption, so it is
    computed once per image by :meth:`SingleStreamTransformer.precompute_image_kv` and gathered per pair (or per
    group of pairs of one image) by :meth:`SingleStreamTransformer.fuse_cached`.

    ``keys[n]`` / ``values[n]`` belong to layer ``first_layer + n`` and are ``[N_img, heads, P, head_dim]``;
    ``mask`` is the images' ``[N_img, P]`` keep-mask (None: every token is attended). The tensors are tied to the
    weights they were computed with: recompute after a weight update.
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    mask: Tensor | None
    first_layer: int

    def __post_init__(self) -> None:
        if not self.keys or len(self.keys) != len(self.values):
            raise ValueError(
                f"ImageKV needs one key and one value tensor per layer, got {len(self.keys)} and {len(self.values)}"
            )

    @property
    def num_images(self) -> int:
        return self.keys[0].shape[0]

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Memory held by the keys and values (the mask excluded)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def select(self, index: Tensor) -> ImageKV:
        """The images ``index`` [B] (repeats allowed), as a new cache (a copy)."""
        return ImageKV(
            tuple(k.index_select(0, index) for k in self.keys),
            tuple(v.index_select(0, index) for v in self.values),
            None if self.mask is None else self.mask.index_select(0, index),
            self.first_layer,
        )


def _key_mask(mask: Tensor | None, batch: int, length: int, what: str) -> Tensor | None:
    """[B, L] keep-mask -> boolean SDPA mask [B, 1, 1, L] (True = attend), built once per forward."""
    if mask is None:
        return None
    if mask.shape != (batch, length):
        raise ValueError(f"{what} must have shape {(batch, length)}, got {tuple(mask.shape)}")
    return mask.bool()[:, None, None, :]


class StreamEmbeddings(nn.Module):
    """Word + absolute position (+ token type 0) embeddings, LayerNorm, dropout."""

    def __init__(self, config: StreamConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        if config.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        else:
            self.token_type_embeddings = None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, inputs_embeds: Tensor) -> Tensor:
        length = inputs_embeds.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings ({self.position_embeddings.num_embeddings})"
            )
        x = inputs_embeds + self.position_embeddings.weight[:length]
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class AttentionCore(nn.Module):
    """Q/K/V projections and multi-head attention (HF's ``attention.self``); K/V may project from another width."""

    def __init__(self, config: StreamConfig, kv_width: int) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.dropout_p = config.attention_dropout
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of ``context`` [N, P, kv_width], each [N, heads, P, head_dim] (what K/V reuse caches)."""
        return self._heads(self.key(context)), self._heads(self.value(context))

    def forward(
        self, hidden: Tensor, context: Tensor, mask: Tensor | None, need_probs: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(context)), self._heads(self.value(context))
        return self._attend(q, k, v, mask, need_probs)

    def attend_kv(self, hidden: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, group_size: int = 1) -> Tensor:
        """Attention of ``hidden`` [B, L, H] to already projected keys and values [B / group_size, heads, P, head_dim].

        With ``group_size`` n > 1, rows ``g·n … g·n+n-1`` share key/value row ``g``: their queries are stacked into one
        sequence of ``n·L`` queries (each query attends independently, so this is the per-row attention), and the keys
        and values are read once per group instead of once per row.
        """
        q = self._heads(self.query(hidden))  # [B, heads, L, d]
        if group_size == 1:
            return self._attend(q, k, v, mask, False)[0]
        batch, heads, length, dim = q.shape
        groups = batch // group_size
        q = q.view(groups, group_size, heads, length, dim).transpose(1, 2).reshape(groups, heads, -1, dim)
        out = self._attend(q, k, v, mask, False)[0]  # [G, n·L, H]
        return out.view(groups, group_size, length, -1).flatten(0, 1)

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, need_probs: bool
    ) -> tuple[Tensor, Tensor | None]:
        dropout_p = self.dropout_p if self.training else 0.0
        probs = None
        if need_probs:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(dim=-1)
            out = F.dropout(probs, p=dropout_p, training=self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return out.transpose(1, 2).flatten(2), probs


class ResidualNorm(nn.Module):
    """dense -> dropout -> add residual -> LayerNorm: the post-LN sublayer output of BERT."""

    def __init__(self, config: StreamConfig, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    """Self- or cross-attention block: ``self`` (projections + attention) and ``output`` (dense + residual LN)."""

    def __init__(self, config: StreamConfig, kv_width: int) -> None:
        super().__init__()
        self.self = AttentionCore(config, kv_width)
        self.output = ResidualNorm(config, config.hidden_size)

    def forward(
        self, hidden: Tensor, context: Tensor, mask: Tensor | None, need_probs: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        attended, probs = self.self(hidden, context, mask, need_probs)
        return self.output(attended, hidden), probs

    def forward_kv(self, hidden: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, group_size: int = 1) -> Tensor:
        """The block with precomputed keys and values (cross-attention under K/V reuse)."""
        return self.output(self.self.attend_kv(hidden, k, v, mask, group_size), hidden)


class Intermediate(nn.Module):
    """FFN expansion with erf GELU."""

    def __init__(self, config: StreamConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class StreamLayer(nn.Module):
    """Self-attention -> optional cross-attention -> FFN, each post-LayerNorm."""

    def __init__(self, config: StreamConfig, has_cross_attention: bool) -> None:
        super().__init__()
        self.attention = Attention(config, config.hidden_size)
        self.crossattention = Attention(config, config.encoder_width) if has_cross_attention else None
        self.intermediate = Intermediate(config)
        self.output = ResidualNorm(config, config.intermediate_size)

    def forward(
        self,
        hidden: Tensor,
        mask: Tensor | None,
        encoder_hidden_states: Tensor | None,
        encoder_mask: Tensor | None,
        need_probs: bool,
    ) -> tuple[Tensor, Tensor | None]:
        hidden, probs = self.attention(hidden, hidden, mask, need_probs)
        if encoder_hidden_states is not None:
            if self.crossattention is None:
                raise RuntimeError("cross-attention requested in a layer that has no cross-attention block")
            hidden, _ = self.crossattention(hidden, encoder_hidden_states, encoder_mask)
        return self.output(self.intermediate(hidden), hidden), probs

    def forward_kv(
        self,
        hidden: Tensor,
        mask: Tensor | None,
        k: Tensor,
        v: Tensor,
        kv_mask: Tensor | None,
        group_size: int = 1,
    ) -> Tensor:
        """The layer with its cross-attention keys and values given (K/V reuse); numerically :meth:`forward`."""
        if self.crossattention is None:
            raise RuntimeError("cached image keys/values given to a layer that has no cross-attention block")
        hidden, _ = self.attention(hidden, hidden, mask)
        hidden = self.crossattention.forward_kv(hidden, k, v, kv_mask, group_size)
        return self.output(self.intermediate(hidden), hidden)


class StreamEncoder(nn.Module):
    """Holds the layers under HF's ``encoder.layer`` name."""

    def __init__(self, config: StreamConfig) -> None:
        super().__init__()
        first_cross = 0 if config.fusion_layer is None else config.fusion_layer
        self.layer = nn.ModuleList(StreamLayer(config, i >= first_cross) for i in range(config.num_layers))


class SingleStreamTransformer(nn.Module):
    """The shared BERT stack run as text encoder, text->image fusion, or (single stream only) image->text fusion."""

    def __init__(self, config: StreamConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = StreamEmbeddings(config)
        self.encoder = StreamEncoder(config)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def single_stream(self) -> bool:
        return self.config.fusion_layer is None

    @property
    def text_layers(self) -> range:
        """Layers run in text mode: all of them in single stream, the first ``fusion_layer`` under an ALBEF split."""
        return range(self.config.num_layers if self.single_stream else self.config.fusion_layer)

    @property
    def fusion_layers(self) -> range:
        """Layers run in multimodal mode (all of them in single stream)."""
        return range(0 if self.single_stream else self.config.fusion_layer, self.config.num_layers)

    def embed_ids(self, input_ids: Tensor, word_embeds: Tensor | None = None) -> Tensor:
        """Embedded ``input_ids``; ``word_embeds`` (their word-embedding rows, e.g. one lookup shared by several
        passes of a training step, so the [vocab, hidden] gradient is formed once) replaces the lookup."""
        return self.embeddings(self.embeddings.word_embeddings(input_ids) if word_embeds is None else word_embeds)

    def embed_inputs(self, inputs_embeds: Tensor) -> Tensor:
        """Embed already-vectorised tokens (image tokens on SIMLA's image side): positions, LayerNorm, dropout."""
        if inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds width {inputs_embeds.shape[-1]} != hidden_size {self.config.hidden_size}")
        return self.embeddings(inputs_embeds)

    def _layers_for(self, mode: str) -> range:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if mode == "text":
            return self.text_layers
        if mode == "image" and not self.single_stream:
            raise ValueError(
                "mode 'image' (SIMLA image-side fusion) needs the single-stream layout; "
                f"this stack has an ALBEF split at fusion_layer={self.config.fusion_layer}"
            )
        return self.fusion_layers

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        *,
        mode: Mode = "text",
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        attention_probs_layer: int | None = None,
    ) -> StreamOutput:
        """Run the layers the mode selects over already-embedded ``hidden_states`` [B, L, H]."""
        layers = self._layers_for(mode)
        if mode == "text" and encoder_hidden_states is not None:
            raise ValueError("encoder_hidden_states given in mode 'text', which skips cross-attention")
        if mode != "text" and encoder_hidden_states is None:
            raise ValueError(f"mode {mode!r} cross-attends and needs encoder_hidden_states")
        batch, length, _ = hidden_states.shape
        mask = _key_mask(attention_mask, batch, length, "attention_mask")
        encoder_mask = None
        if encoder_hidden_states is not None:
            encoder_mask = _key_mask(
                encoder_attention_mask, batch, encoder_hidden_states.shape[1], "encoder_attention_mask"
            )
        probs_layer = self._resolve_probs_layer(attention_probs_layer, layers, mode)

        probs = None
        checkpointing = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for index in layers:
            layer = self.encoder.layer[index]
            args = (hidden_states, mask, encoder_hidden_states, encoder_mask, index == probs_layer)
            if checkpointing:
                hidden_states, layer_probs = checkpoint(layer, *args, use_reentrant=False)
            else:
                hidden_states, layer_probs = layer(*args)
            if layer_probs is not None:
                probs = layer_probs
        return StreamOutput(last_hidden_state=hidden_states, attention_probs=probs)

    def _resolve_probs_layer(self, requested: int | None, layers: range, mode: str) -> int | None:
        if requested is None:
            return None
        n = self.config.num_layers
        index = requested + n if requested < 0 else requested
        if index not in layers:
            raise ValueError(
                f"attention_probs_layer={requested} (layer {index}) is not run in mode {mode!r}, "
                f"which runs layers [{layers.start}, {layers.stop})"
            )
        return index

    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor | None, *, word_embeds: Tensor | None = None
    ) -> StreamOutput:
        """Text encoder: embeddings + text-mode layers (no cross-attention); ``word_embeds`` as in :meth:`embed_ids`."""
        return self(self.embed_ids(input_ids, word_embeds), attention_mask, mode="text")

    def fuse(
        self,
        attention_mask: Tensor | None,
        image_tokens: Tensor,
        image_mask: Tensor | None = None,
        *,
        input_ids: Tensor | None = None,
        text_states: Tensor | None = None,
        attention_probs_layer: int | None = None,
        word_embeds: Tensor | None = None,
    ) -> StreamOutput:
        """Text queries attend to image keys in every fusion layer.

        Single stream starts from ``input_ids`` and runs all layers. Under an ALBEF split it continues from
        ``text_states`` (the text-mode output, e.g. cached for ITM negatives), or from ``input_ids`` by running the
        text layers first (MLM). ``word_embeds``: the ids' word-embedding rows (:meth:`embed_ids`).
        """
        hidden = self._fusion_start(attention_mask, input_ids, text_states, word_embeds)
        return self(
            hidden,
            attention_mask,
            mode="multimodal",
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=image_mask,
            attention_probs_layer=attention_probs_layer,
        )

    def _fusion_start(
        self,
        attention_mask: Tensor | None,
        input_ids: Tensor | None,
        text_states: Tensor | None,
        word_embeds: Tensor | None = None,
    ) -> Tensor:
        """The hidden states the first fusion layer reads: embedded ids (single stream), given text states, or the
        text layers' output of the ids (ALBEF split)."""
        if (input_ids is None) == (text_states is None):
            raise ValueError("fuse needs exactly one of input_ids or text_states")
        if self.single_stream:
            if input_ids is None:
                raise ValueError(
                    "single-stream fuse starts from input_ids; text_states are only meaningful under an ALBEF split"
                )
            return self.embed_ids(input_ids, word_embeds)
        if text_states is not None:
            return text_states
        return self.encode_text(input_ids, attention_mask, word_embeds=word_embeds).last_hidden_state

    def precompute_image_kv(self, image_tokens: Tensor, image_mask: Tensor | None = None) -> ImageKV:
        """Every fusion layer's cross-attention keys and values of ``image_tokens`` [N_img, P, encoder_width].

        One projection per image and layer, instead of one per (image, caption) pair as :meth:`fuse` does; pass the
        result to :meth:`fuse_cached`. ``image_mask`` [N_img, P] marks the tokens that may be attended (None: all).
        Memory: ``2 × fusion layers × N_img × P × hidden_size`` elements in the dtype of the projections (bf16
        under autocast).
        """
        if image_tokens.dim() != 3 or image_tokens.shape[-1] != self.config.encoder_width:
            raise ValueError(
                f"image_tokens must be [N_img, P, encoder_width={self.config.encoder_width}], "
                f"got {tuple(image_tokens.shape)}"
            )
        if image_mask is not None and image_mask.shape != image_tokens.shape[:2]:
            raise ValueError(
                f"image_mask must have shape {tuple(image_tokens.shape[:2])}, got {tuple(image_mask.shape)}"
            )
        keys, values = [], []
        for index in self.fusion_layers:
            k, v = self.encoder.layer[index].crossattention.self.project_kv(image_tokens)
            keys.append(k.contiguous())  # [N, heads, P, d] in memory: a gathered row is one contiguous block
            values.append(v.contiguous())
        mask = None if image_mask is None else image_mask.bool()
        return ImageKV(tuple(keys), tuple(values), mask, self.fusion_layers.start)

    def fuse_cached(
        self,
        attention_mask: Tensor | None,
        image_kv: ImageKV,
        image_index: Tensor | None = None,
        *,
        input_ids: Tensor | None = None,
        text_states: Tensor | None = None,
        group_size: int = 1,
    ) -> StreamOutput:
        """:meth:`fuse` with the images' keys and values precomputed: text row ``b`` attends image
        ``image_index[b // group_size]``.

        ``image_kv`` comes from :meth:`precompute_image_kv`; ``image_index`` [B / group_size] (long, on the cache's
        device) picks the image of each text row (group of rows), so one call mixes pairs of many queries and an
        image's K/V rows are gathered, never re-projected. None: row (group) ``g`` attends image ``g``. With
        ``group_size`` n > 1 every n consecutive rows share one image: its keys and values are gathered once for the
        n rows and their queries attend in one stacked sequence (docs/method.md §5.2). ``input_ids`` /
        ``text_states`` as in :meth:`fuse` (under an ALBEF split, text states computed once per caption skip the
        text layers). Equals :meth:`fuse` on ``image_tokens[image_index.repeat_interleave(group_size)]`` up to
        floating-point rounding; no attention probabilities, no gradient checkpointing (an evaluation path).
        """
        layers = self.fusion_layers
        if image_kv.first_layer != layers.start or len(image_kv.keys) != len(layers):
            raise ValueError(
                f"image_kv holds layers [{image_kv.first_layer}, {image_kv.first_layer + len(image_kv.keys)}), "
                f"this stack fuses in layers [{layers.start}, {layers.stop}): recompute it with this stack"
            )
        hidden = self._fusion_start(attention_mask, input_ids, text_states)
        batch, length, _ = hidden.shape
        if group_size < 1 or batch % group_size:
            raise ValueError(f"group_size must be >= 1 and divide the {batch} text rows, got {group_size}")
        groups = batch // group_size
        if image_index is None:
            if image_kv.num_images != groups:
                raise ValueError(
                    f"without image_index the cache must hold one image per text row (group): {image_kv.num_images} "
                    f"images, {groups} rows (groups)"
                )
        elif image_index.shape != (groups,):
            raise ValueError(f"image_index must have shape {(groups,)}, got {tuple(image_index.shape)}")
        mask = _key_mask(attention_mask, batch, length, "attention_mask")
        kv_mask = image_kv.mask
        if kv_mask is not None:
            kv_mask = (kv_mask if image_index is None else kv_mask.index_select(0, image_index))[:, None, None, :]
        for n, index in enumerate(layers):
            k, v = image_kv.keys[n], image_kv.values[n]
            if image_index is not None:  # one gather per layer: only one layer's rows are alive at a time
                k, v = k.index_select(0, image_index), v.index_select(0, image_index)
            hidden = self.encoder.layer[index].forward_kv(hidden, mask, k, v, kv_mask, group_size)
        return StreamOutput(last_hidden_state=hidden)

    def encode_image_side(self, image_tokens: Tensor, text_embeds: Tensor, text_mask: Tensor | None) -> StreamOutput:
        """SIMLA image side: image tokens as inputs self-attend and cross-attend to the caption's input embeddings."""
        return self(
            self.embed_inputs(image_tokens),
            None,
            mode="image",
            encoder_hidden_states=text_embeds,
            encoder_attention_mask=text_mask,
        )


def hf_key(key: str) -> str:
    """Map a BERT checkpoint key to ours: drop the ``bert.`` prefix, rename legacy TF LayerNorm gamma/beta."""
    if key.startswith("bert."):
        key = key[len("bert.") :]
    if key.endswith("LayerNorm.gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith("LayerNorm.beta"):
        key = key[: -len("beta")] + "bias"
    return key


def load_hf_bert(stream: SingleStreamTransformer, path: str | Path) -> LoadReport:
    """Load a local Hugging Face BERT checkpoint (directory or file) into the stack by parameter name.

    Cross-attention weights do not exist in BERT and stay freshly initialised (reported missing); pooler, MLM/NSP
    heads and, without a token-type table, ``token_type_embeddings`` are reported unexpected. A longer position
    table is truncated to ``max_position_embeddings``.
    """
    raw = read_state_dict(path)
    own = stream.state_dict()
    selected: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in raw.items():
        name = hf_key(key)
        if name not in own:
            unexpected.append(key)
            continue
        if name == "embeddings.position_embeddings.weight" and value.shape[0] > own[name].shape[0]:
            value = value[: own[name].shape[0]]
        if value.shape != own[name].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, model expects {tuple(own[name].shape)}")
        selected[name] = value
    stream.load_state_dict(selected, strict=False)
    missing = [name for name in own if name not in selected]
    return LoadReport(loaded=sorted(selected), missing=missing, unexpected=unexpected)
