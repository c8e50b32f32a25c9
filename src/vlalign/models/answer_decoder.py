"""The VQA answer decoder: a causal BERT-layout stack that cross-attends to the question encoder's states, with an
LM head, initialised from the upper layers of the pretrained stream as the reference does.

Layout (parameter names as the stream's, so the copy is by name): ``embeddings.*`` (word, position, optional token
type, LayerNorm), ``encoder.layer.{0..D-1}.*`` (causal self-attention, cross-attention to the question states, FFN,
each post-LayerNorm) and ``head.*`` (``transform`` dense + GELU + LayerNorm, ``decoder`` tied to the word
embeddings, ``bias``).

Initialisation from a pretrained stream of ``N`` layers (:func:`decoder_init_state`; docs/tasks.md, VQA):

=====================================================  ==================================================
pretrained tensor                                      decoder tensor
=====================================================  ==================================================
``stream.embeddings.*``                                ``answer_decoder.embeddings.*``
``stream.encoder.layer.{N-D+k}.*`` (k = 0..D-1)        ``answer_decoder.encoder.layer.{k}.*``
``xmm.mlm_head.transform.*``, ``xmm.mlm_head.bias``     ``answer_decoder.head.transform.*``, ``.head.bias``
(the MLM decoder weight is the word embeddings)        ``answer_decoder.head.decoder.weight`` (tied)
=====================================================  ==================================================

With BERT-base and ``D = 6`` that is the reference's mapping: stream layers 6–11, their cross-attention included,
become decoder layers 0–5. The cross-attention of those layers attended to image tokens; in the decoder it attends to
the question states, so its key/value projections are copied only when the widths agree (``encoder_width ==
hidden_size``, as in BERT-base with ViT-B); otherwise they keep their fresh initialisation (reported as missing).
A model pretrained without MLM has no head to copy: the head starts fresh (decoder tied to the copied embeddings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlalign.models.heads import MaskedLMHead
from vlalign.models.stream import SingleStreamTransformer, StreamConfig, StreamEmbeddings, StreamEncoder

__all__ = ["AnswerDecoder", "answer_loss", "decoder_config", "decoder_init_state", "decoder_layer_map"]


def decoder_config(stream: StreamConfig, num_layers: int) -> StreamConfig:
    """The decoder's config: the stream's widths with ``num_layers`` layers, every one cross-attending to states of
    the stream's own width (the question encoder's output)."""
    if num_layers < 1:
        raise ValueError(f"the answer decoder needs at least one layer, got {num_layers}")
    return dataclasses.replace(stream, num_layers=num_layers, encoder_width=stream.hidden_size, fusion_layer=None)


class AnswerDecoder(nn.Module):
    """Causal answer decoder over question states (see the module docstring for its layout and initialisation).

    Args:
        config: the decoder's config (:func:`decoder_config` of the stream's).
    """

    def __init__(self, config: StreamConfig) -> None:
        super().__init__()
        if config.fusion_layer is not None:
            raise ValueError("the answer decoder cross-attends in every layer: its config needs fusion_layer=None")
        self.config = config
        self.embeddings = StreamEmbeddings(config)
        self.encoder = StreamEncoder(config)
        self.apply(SingleStreamTransformer._init_weights)
        self.head = MaskedLMHead(config, self.embeddings.word_embeddings)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def forward(self, input_ids: Tensor, attention_mask: Tensor, states: Tensor, states_mask: Tensor | None) -> Tensor:
        """Vocabulary logits ``[N, L, V]`` of answers ``input_ids`` [N, L] (``[CLS] answer [SEP]``, right-padded,
        ``attention_mask`` [N, L]) given question states [N, S, H] (``states_mask`` [N, S]; None: all attended).

        Position ``t`` sees the tokens ``0..t`` only (causal self-attention), so its logits predict token ``t+1``.
        """
        batch, length = input_ids.shape
        if attention_mask.shape != (batch, length):
            raise ValueError(f"attention_mask must have shape {(batch, length)}, got {tuple(attention_mask.shape)}")
        if states.shape[0] != batch:
            raise ValueError(f"states hold {states.shape[0]} rows for {batch} answers")
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [N, 1, L, L]
        cross = None if states_mask is None else states_mask.bool()[:, None, None, :]
        hidden = self.embeddings(self.embeddings.word_embeddings(input_ids))
        checkpointing = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.encoder.layer:
            if checkpointing:
                hidden, _ = checkpoint(layer, hidden, mask, states, cross, False, use_reentrant=False)
            else:
                hidden, _ = layer(hidden, mask, states, cross, False)
        return self.head(hidden)


def decoder_layer_map(stream_layers: int, decoder_layers: int) -> dict[int, int]:
    """``decoder layer -> stream layer`` it starts from: the top ``decoder_layers`` layers, in order."""
    if not 1 <= decoder_layers <= stream_layers:
        raise ValueError(f"decoder_layers must be in [1, {stream_layers}] (the stream's layers), got {decoder_layers}")
    first = stream_layers - decoder_layers
    return {k: first + k for k in range(decoder_layers)}


def decoder_init_state(
    decoder: AnswerDecoder,
    stream_state: Mapping[str, Tensor],
    stream_layers: int,
    mlm_head_state: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], list[str]]:
    """The decoder's initial tensors from a pretrained stream (the module docstring's table).

    Args:
        decoder: the decoder to initialise (its shapes decide what can be copied).
        stream_state: the stream's state dict (keys ``embeddings.*``, ``encoder.layer.N.*``).
        stream_layers: the stream's number of layers.
        mlm_head_state: the pretrained MLM head's state (``transform.*``, ``bias``), if the model has one.

    Returns:
        ``(state, missing)``: the decoder keys with their source tensors, and the decoder keys left as initialised
        (a width mismatch, or no MLM head). ``head.decoder.weight`` is never listed: it is the word embeddings.
    """
    layer_map = decoder_layer_map(stream_layers, decoder.num_layers)
    own = decoder.state_dict()
    state: dict[str, Tensor] = {}
    for key in own:
        source: Tensor | None = None
        if key.startswith("embeddings."):
            source = stream_state.get(key)
        elif key.startswith("encoder.layer."):
            index, rest = key[len("encoder.layer.") :].split(".", 1)
            source = stream_state.get(f"encoder.layer.{layer_map[int(index)]}.{rest}")
        elif key.startswith("head.") and key != "head.decoder.weight" and mlm_head_state is not None:
            source = mlm_head_state.get(key[len("head.") :])
        if source is not None and tuple(source.shape) == tuple(own[key].shape):
            state[key] = source
    missing = [key for key in own if key not in state and key != "head.decoder.weight"]
    return state, missing


def answer_loss(
    logits: Tensor,
    ids: Tensor,
    mask: Tensor,
    weights: Tensor,
    num_questions: int,
    teacher_logits: Tensor | None = None,
    alpha: float = 0.0,
) -> Tensor:
    """The reference's answer-weighted teacher-forced loss, with momentum distillation.

    Per answer ``a`` (rows of ``logits`` [N, L, V] for inputs ``ids`` / ``mask`` [N, L]): ``NLL_a`` is the sum over its
    target tokens (first answer token … ``[SEP]``) of ``-log p``; with ``teacher_logits`` the distilled term
    ``D_a = Σ_t CE(student_t, softmax(teacher_t))`` (log-softmax over the vocabulary, docs/differences.md row 25)
    mixes in as ``(1 - α)·NLL_a + α·D_a``. The loss is ``Σ_a weights_a · loss_a / num_questions`` (weights: each
    answer's share of its question's human answers).
    """
    targets = ids[:, 1:]
    keep = mask[:, 1:].to(torch.float32)
    log_probs = logits[:, :-1].float().log_softmax(-1)
    nll = -(log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * keep).sum(-1)  # [N]
    per_answer = nll
    if teacher_logits is not None and alpha > 0:
        soft = teacher_logits[:, :-1].float().softmax(-1)
        distilled = (-(log_probs * soft).sum(-1) * keep).sum(-1)
        per_answer = (1.0 - alpha) * nll + alpha * distilled
    return (weights.to(per_answer.dtype) * per_answer).sum() / num_questions
