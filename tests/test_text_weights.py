"""`model.text_weights` initialises the stream and, like the reference's ``from_pretrained``, the MLM head."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM

from vlalign.data.tokenization import VocabInfo
from vlalign.models.stream import StreamConfig
from vlalign.models.vision import VisionConfig
from vlalign.objectives.itc import ITC
from vlalign.objectives.xmm import XMM
from vlalign.tasks.pretrain import PretrainRecipe


def test_text_weights_load_stream_and_mlm_head(tmp_path: Path) -> None:
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    bert = BertForMaskedLM(config)
    with torch.no_grad():
        bert.cls.predictions.bias.normal_()
    bert.save_pretrained(tmp_path / "bert")
    recipe = PretrainRecipe(
        vision=VisionConfig(name="vit_vlalign_tiny_patch8", img_size=32, mask_token=False),
        stream=StreamConfig.from_hf_config(tmp_path / "bert", encoder_width=64),
        text_weights=str(tmp_path / "bert"),
        vocab=VocabInfo(vocab_size=40),
        itc=ITC(embed_dim=8, queue_size=0, distill=False),
        xmm=XMM(image=False, distill=True),
    )
    head, hf = recipe.xmm.mlm_head, bert.cls.predictions
    torch.testing.assert_close(head.bias, hf.bias)
    torch.testing.assert_close(head.transform.dense.weight, hf.transform.dense.weight)
    torch.testing.assert_close(head.decoder.weight, bert.bert.embeddings.word_embeddings.weight)
    assert head.decoder.weight is recipe.backbone.stream.embeddings.word_embeddings.weight  # still tied
    torch.testing.assert_close(recipe.xmm.mlm_head_m.bias, hf.bias)  # the teacher starts equal
    assert recipe.xmm.mlm_head_m.decoder.weight is recipe.backbone.stream_m.embeddings.word_embeddings.weight
