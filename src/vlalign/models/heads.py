"""Prediction heads that sit on the shared stack, named as in Hugging Face BERT so MLM checkpoints load by name."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from vlalign.models.stream import StreamConfig, hf_key
from vlalign.weights.reading import LoadReport, read_state_dict


class PredictionTransform(nn.Module):
    """dense -> GELU -> LayerNorm before the vocabulary projection (HF ``transform``)."""

    def __init__(self, config: StreamConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = nn.GELU()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.LayerNorm(self.act(self.dense(hidden)))


class MaskedLMHead(nn.Module):
    """Vocabulary logits whose projection shares its weight with the input word embeddings (BERT's tying)."""

    def __init__(self, config: StreamConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        if word_embeddings.weight.shape != (config.vocab_size, config.hidden_size):
            raise ValueError(
                f"word_embeddings weight {tuple(word_embeddings.weight.shape)} does not match "
                f"(vocab_size, hidden_size) = {(config.vocab_size, config.hidden_size)}"
            )
        self.transform = PredictionTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        nn.init.normal_(self.transform.dense.weight, std=0.02)
        nn.init.zeros_(self.transform.dense.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden)) + self.bias


MLM_PREFIX = "cls.predictions."


def load_hf_mlm_head(head: MaskedLMHead, path: str | Path) -> LoadReport:
    """Initialise the MLM head from a Hugging Face ``BertForMaskedLM`` checkpoint (``cls.predictions.*``), as the
    reference's ``from_pretrained`` does. The decoder stays tied to the word embeddings (loaded with the stream)."""
    state = read_state_dict(path)
    own = head.state_dict()
    report = LoadReport()
    values: dict[str, Tensor] = {}
    for key, value in state.items():
        name = hf_key(key)
        if not name.startswith(MLM_PREFIX):
            continue
        name = name[len(MLM_PREFIX) :]
        if name in own and name != "decoder.weight":
            values[name] = value
            report.loaded.append(name)
    report.missing = [k for k in own if k not in values and k != "decoder.weight"]
    head.load_state_dict({**own, **values})
    return report
