"""The shared BERT-compatible stack: HF parity, modes, attention probabilities, checkpoint loading, MLM head."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

import vlalign.models.stream as stream_module
from vlalign.models import LoadReport, MaskedLMHead, SingleStreamTransformer, StreamConfig, load_hf_bert

HF_TINY = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
    type_vocab_size=2,
)


def tiny_config(**overrides) -> StreamConfig:
    base = dict(
        vocab_size=100,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        encoder_width=24,
    )
    return StreamConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def hf_bert_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = BertModel(BertConfig(**HF_TINY))
    # Random LayerNorm affine parameters so a name mix-up between LayerNorms cannot go unnoticed.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name:
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    path = tmp_path_factory.mktemp("hf_bert")
    model.save_pretrained(path)
    return path


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


def test_text_mode_matches_hf_bert(hf_bert_dir: Path) -> None:
    hf = BertModel.from_pretrained(hf_bert_dir).eval()
    config = StreamConfig.from_hf_config(hf_bert_dir, type_vocab_size=2)
    assert (config.num_layers, config.num_heads, config.hidden_size) == (2, 4, 32)
    ours = SingleStreamTransformer(config).eval()
    report = load_hf_bert(ours, hf_bert_dir)

    cross = [k for k in ours.state_dict() if ".crossattention." in k]
    assert len(cross) == 2 * 10
    assert sorted(report.missing) == sorted(cross)
    assert sorted(report.unexpected) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert "embeddings.token_type_embeddings.weight" in report.loaded
    assert "missing 20" in str(report) and "unexpected 2" in str(report)

    ids, mask = padded_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        got = ours.encode_text(ids, mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_default_hf_config_drops_token_types_and_truncates_positions(hf_bert_dir: Path) -> None:
    config = StreamConfig.from_hf_config(hf_bert_dir / "config.json", max_position_embeddings=16)
    assert config.type_vocab_size == 0 and config.fusion_layer is None
    ours = SingleStreamTransformer(config)
    report = load_hf_bert(ours, hf_bert_dir)
    assert "embeddings.token_type_embeddings.weight" in report.unexpected
    assert ours.embeddings.token_type_embeddings is None
    hf_positions = BertModel.from_pretrained(hf_bert_dir).embeddings.position_embeddings.weight
    torch.testing.assert_close(ours.embeddings.position_embeddings.weight, hf_positions[:16].detach())


def test_load_hf_bert_from_bin_with_prefix_and_legacy_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = BertForMaskedLM(BertConfig(**HF_TINY))
    state = hf.state_dict()
    state = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in state.items()
    }
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = SingleStreamTransformer(tiny_config(max_position_embeddings=40, type_vocab_size=2, encoder_width=32))
    report = load_hf_bert(ours, tmp_path)
    assert all(k.startswith("cls.") for k in report.unexpected) and report.unexpected
    assert all(".crossattention." in k for k in report.missing)
    torch.testing.assert_close(
        ours.encoder.layer[1].output.LayerNorm.weight, hf.bert.encoder.layer[1].output.LayerNorm.weight.detach()
    )
    assert isinstance(report, LoadReport)


def test_load_hf_bert_errors(tmp_path: Path) -> None:
    ours = SingleStreamTransformer(tiny_config())
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_hf_bert(ours, tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_hf_bert(ours, tmp_path / "nowhere")
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(7, 32)}, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="word_embeddings"):
        load_hf_bert(ours, tmp_path / "bad.bin")


def manual_probs(layer, hidden: torch.Tensor, mask: torch.Tensor | None, num_heads: int) -> torch.Tensor:
    core = layer.attention.self
    b, n, h = hidden.shape
    q = core.query(hidden).view(b, n, num_heads, -1).transpose(1, 2)
    k = core.key(hidden).view(b, n, num_heads, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(h // num_heads)
    if mask is not None:
        scores = scores + (1.0 - mask[:, None, None, :].float()) * -1e9
    return scores.softmax(-1)


@pytest.mark.parametrize("layer_index", [0, 1, -1])
def test_attention_probs_layer_matches_manual_softmax(layer_index: int) -> None:
    torch.manual_seed(0)
    model = SingleStreamTransformer(tiny_config()).eval()
    ids, mask = padded_batch()
    absolute = layer_index % model.config.num_layers
    captured = {}
    handle = model.encoder.layer[absolute].register_forward_pre_hook(
        lambda mod, args: captured.__setitem__("hidden", args[0])
    )
    with torch.no_grad():
        plain = model.encode_text(ids, mask)
        embedded = model.embed_ids(ids)
        with_probs = model(embedded, mask, mode="text", attention_probs_layer=layer_index)
    handle.remove()

    assert plain.attention_probs is None
    torch.testing.assert_close(with_probs.last_hidden_state, plain.last_hidden_state, atol=1e-6, rtol=0)
    probs = with_probs.attention_probs
    assert probs.shape == (3, 4, 9, 9)
    expected = manual_probs(model.encoder.layer[absolute], captured["hidden"], mask, 4)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)
    keep = mask.bool()[:, None, None, :]
    torch.testing.assert_close(probs.masked_fill(~keep, 0).sum(-1), torch.ones(3, 4, 9))
    assert probs.masked_select(~keep.expand_as(probs)).abs().max() == 0


def test_attention_probs_in_fusion_and_out_of_range() -> None:
    torch.manual_seed(0)
    model = SingleStreamTransformer(tiny_config()).eval()
    ids, mask = padded_batch()
    image = torch.randn(3, 5, 24)
    with torch.no_grad():
        plain = model.fuse(mask, image, input_ids=ids)
        out = model.fuse(mask, image, input_ids=ids, attention_probs_layer=-1)
    torch.testing.assert_close(out.last_hidden_state, plain.last_hidden_state, atol=1e-6, rtol=0)
    assert out.attention_probs.shape == (3, 4, 9, 9)
    with pytest.raises(ValueError, match="attention_probs_layer"):
        model(model.embed_ids(ids), mask, attention_probs_layer=2)


def test_single_stream_modes_and_masks() -> None:
    torch.manual_seed(0)
    model = SingleStreamTransformer(tiny_config(encoder_width=32)).eval()
    assert model.single_stream and model.text_layers == range(2) and model.fusion_layers == range(2)
    assert all(layer.crossattention is not None for layer in model.encoder.layer)
    ids, mask = padded_batch()
    image = torch.randn(3, 5, 32)
    with torch.no_grad():
        text = model.encode_text(ids, mask).last_hidden_state
        fused = model.fuse(mask, image, input_ids=ids).last_hidden_state
        # Text mode never touches cross-attention weights; fusion does.
        model.encoder.layer[0].crossattention.self.value.weight.add_(1.0)
        assert torch.equal(model.encode_text(ids, mask).last_hidden_state, text)
        assert not torch.allclose(model.fuse(mask, image, input_ids=ids).last_hidden_state, fused)

        # Image side: keys are text embeddings; masked text positions must not influence the result.
        text_embeds = model.embed_ids(ids)
        side = model.encode_image_side(image, text_embeds, mask).last_hidden_state
        assert side.shape == (3, 5, 32)
        noisy = torch.where(mask.bool()[..., None], text_embeds, torch.randn_like(text_embeds))
        torch.testing.assert_close(model.encode_image_side(image, noisy, mask).last_hidden_state, side)
        unmasked = model.encode_image_side(image, noisy, None).last_hidden_state
        assert not torch.allclose(unmasked[2], side[2])

    with pytest.raises(ValueError, match="exactly one"):
        model.fuse(mask, image)
    with pytest.raises(ValueError, match="text_states"):
        model.fuse(mask, image, text_states=text)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(model.embed_ids(ids), mask, mode="multimodal")
    with pytest.raises(ValueError, match="attention_mask"):
        model.encode_text(ids, mask[:, :4])
    with pytest.raises(ValueError, match="hidden_size"):
        model.encode_image_side(torch.randn(3, 5, 16), text_embeds, mask)


def test_albef_split_runs_text_then_fusion_layers() -> None:
    torch.manual_seed(0)
    config = tiny_config(num_layers=3, fusion_layer=1, type_vocab_size=2)
    model = SingleStreamTransformer(config).eval()
    assert not model.single_stream
    assert model.text_layers == range(1) and model.fusion_layers == range(1, 3)
    assert model.encoder.layer[0].crossattention is None
    assert all(model.encoder.layer[i].crossattention is not None for i in (1, 2))
    ids, mask = padded_batch()
    image = torch.randn(3, 6, 24)
    sdpa_mask = mask.bool()[:, None, None, :]
    with torch.no_grad():
        embedded = model.embed_ids(ids)
        torch.testing.assert_close(
            embedded,
            model.embeddings.LayerNorm(
                model.embeddings.word_embeddings(ids)
                + model.embeddings.position_embeddings.weight[:9]
                + model.embeddings.token_type_embeddings.weight[0]
            ),
        )
        text = model.encode_text(ids, mask).last_hidden_state
        manual_text, _ = model.encoder.layer[0](embedded, sdpa_mask, None, None, False)
        torch.testing.assert_close(text, manual_text)

        fused = model.fuse(mask, image, text_states=text).last_hidden_state
        manual = text
        for i in (1, 2):
            manual, _ = model.encoder.layer[i](manual, sdpa_mask, image, None, False)
        torch.testing.assert_close(fused, manual)
        torch.testing.assert_close(model.fuse(mask, image, input_ids=ids).last_hidden_state, fused)

    with pytest.raises(ValueError, match="ALBEF split"):
        model.encode_image_side(torch.randn(3, 6, 32), embedded, mask)
    with pytest.raises(ValueError, match="not run in mode 'text'"):
        model(embedded, mask, mode="text", attention_probs_layer=1)
    with pytest.raises(ValueError, match="not run in mode 'multimodal'"):
        model.fuse(mask, image, text_states=text, attention_probs_layer=0)


def test_gradient_checkpointing_matches_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    plain = SingleStreamTransformer(tiny_config()).train()
    ckpt = SingleStreamTransformer(tiny_config(gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    real = stream_module.checkpoint
    monkeypatch.setattr(stream_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, mask = padded_batch()
    image = torch.randn(3, 5, 24)

    results = []
    for model in (plain, ckpt):
        torch.manual_seed(123)  # dropout active: both must draw the same masks
        out = model.fuse(mask, image, input_ids=ids, attention_probs_layer=-1)
        loss = out.last_hidden_state.square().mean() + out.attention_probs.mean()
        loss.backward()
        results.append((out.last_hidden_state.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert len(calls) == 2
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)


def test_config_validation_and_overrides(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        StreamConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="fusion_layer"):
        StreamConfig(num_layers=4, fusion_layer=4)
    with pytest.raises(ValueError, match="fusion_layer"):
        StreamConfig(fusion_layer=-1)
    with pytest.raises(ValueError, match="hidden_dropout"):
        StreamConfig(hidden_dropout=1.5)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "hidden_size": 48,
                "num_hidden_layers": 3,
                "num_attention_heads": 6,
                "intermediate_size": 96,
                "vocab_size": 50,
                "fusion_layer": 2,
                "encoder_width": 40,
                "hidden_act": "gelu",
                "type_vocab_size": 2,
            }
        )
    )
    config = StreamConfig.from_hf_config(tmp_path, num_layers=4)
    assert (config.hidden_size, config.num_layers, config.num_heads, config.fusion_layer) == (48, 4, 6, 2)
    assert (config.encoder_width, config.vocab_size, config.type_vocab_size) == (40, 50, 0)
    with pytest.raises(TypeError, match="bogus"):
        StreamConfig.from_hf_config(tmp_path, bogus=1)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_act": "relu"}))
    with pytest.raises(ValueError, match="hidden_act"):
        StreamConfig.from_hf_config(tmp_path)
    with pytest.raises(FileNotFoundError):
        StreamConfig.from_hf_config(tmp_path / "missing")


def test_init_follows_bert() -> None:
    torch.manual_seed(0)
    model = SingleStreamTransformer(
        StreamConfig(
            vocab_size=2000, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128, encoder_width=48
        )
    )
    weight = model.encoder.layer[0].crossattention.self.key.weight
    assert weight.shape == (64, 48)
    assert abs(weight.std().item() - 0.02) < 0.003
    assert model.encoder.layer[0].crossattention.self.key.bias.abs().max() == 0
    assert abs(model.embeddings.word_embeddings.weight.std().item() - 0.02) < 0.002
    assert model.embeddings.word_embeddings.weight[0].abs().max() == 0  # pad row, as in HF
    assert torch.equal(model.encoder.layer[0].output.LayerNorm.weight, torch.ones(64))


def test_masked_lm_head_is_tied_and_matches_hf(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = BertForMaskedLM(BertConfig(**HF_TINY)).eval()
    with torch.no_grad():
        hf.cls.predictions.bias.normal_()
    hf.save_pretrained(tmp_path)
    config = StreamConfig.from_hf_config(tmp_path, type_vocab_size=2)
    stream = SingleStreamTransformer(config).eval()
    load_hf_bert(stream, tmp_path)
    head = MaskedLMHead(config, stream.embeddings.word_embeddings).eval()
    assert head.decoder.weight is stream.embeddings.word_embeddings.weight
    assert head.decoder.bias is None and torch.equal(head.bias.detach(), torch.zeros(100))
    prefix = "cls.predictions."
    head_state = {k[len(prefix) :]: v for k, v in hf.state_dict().items() if k.startswith(prefix)}
    result = head.load_state_dict({k: v for k, v in head_state.items() if k in head.state_dict()}, strict=False)
    assert result.missing_keys == []

    ids, mask = padded_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).logits
        got = head(stream.encode_text(ids, mask).last_hidden_state)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    head(stream.encode_text(ids, mask).last_hidden_state).sum().backward()
    assert stream.embeddings.word_embeddings.weight.grad is not None
    with pytest.raises(ValueError, match="word_embeddings"):
        MaskedLMHead(config, torch.nn.Embedding(10, 32))


@pytest.mark.parametrize("fusion_layer", [None, 1])
def test_fuse_cached_equals_fuse(fusion_layer: int | None) -> None:
    """K/V reuse (docs/method.md §5.2): keys/values projected once per image, gathered per text row, == plain fuse."""
    torch.manual_seed(0)
    extra = {} if fusion_layer is None else {"num_layers": 3, "fusion_layer": fusion_layer, "type_vocab_size": 2}
    model = SingleStreamTransformer(tiny_config(**extra)).eval()
    g = torch.Generator().manual_seed(3)
    images = torch.randn(4, 6, 24, generator=g)
    image_mask = torch.ones(4, 6, dtype=torch.long)
    image_mask[1, 4:] = 0
    ids = torch.randint(1, 100, (7, 9), generator=g)
    mask = (torch.arange(9)[None, :] < torch.tensor([9, 3, 5, 9, 2, 7, 4])[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    image_index = torch.tensor([2, 0, 2, 1, 3, 1, 2])  # repeats, out of order: pairs of several queries
    with torch.no_grad():
        kv = model.precompute_image_kv(images, image_mask)
        assert kv.num_images == 4 and kv.num_tokens == 6 and kv.first_layer == model.fusion_layers.start
        assert len(kv.keys) == len(model.fusion_layers) and kv.keys[0].shape == (4, 4, 6, 8)
        assert kv.nbytes == 2 * len(model.fusion_layers) * 4 * 6 * 32 * 4
        expected = model.fuse(mask, images[image_index], image_mask[image_index], input_ids=ids).last_hidden_state
        cached = model.fuse_cached(mask, kv, image_index, input_ids=ids).last_hidden_state
        torch.testing.assert_close(cached, expected, atol=1e-5, rtol=0)
        # one image per row without an index; the same through a selected copy of the cache
        in_order = model.fuse_cached(mask, kv.select(image_index), input_ids=ids).last_hidden_state
        torch.testing.assert_close(in_order, expected, atol=1e-5, rtol=0)
        # the mask matters (image 1 has masked tokens) and is applied per gathered row
        unmasked = model.fuse(mask, images[image_index], input_ids=ids).last_hidden_state
        assert not torch.allclose(unmasked[3], expected[3], atol=1e-4)
        # groups of rows sharing an image: K/V gathered once per group, queries stacked (rows 0-1, 2-3, 4-5 here)
        groups = torch.tensor([3, 1, 3])
        grouped = model.fuse_cached(mask[:6], kv, groups, input_ids=ids[:6], group_size=2).last_hidden_state
        per_row = model.fuse(
            mask[:6], images[groups.repeat_interleave(2)], image_mask[groups.repeat_interleave(2)], input_ids=ids[:6]
        ).last_hidden_state
        torch.testing.assert_close(grouped, per_row, atol=1e-5, rtol=0)
        if fusion_layer is not None:  # ALBEF split: text layers once per caption, their output reused
            text = model.encode_text(ids, mask).last_hidden_state
            from_states = model.fuse_cached(mask, kv, image_index, text_states=text).last_hidden_state
            torch.testing.assert_close(from_states, expected, atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="image_index must have shape"):
        model.fuse_cached(mask, kv, image_index[:3], input_ids=ids)
    with pytest.raises(ValueError, match="one image per text row"):
        model.fuse_cached(mask, kv, input_ids=ids)
    with pytest.raises(ValueError, match="group_size"):
        model.fuse_cached(mask, kv, image_index[:3], input_ids=ids, group_size=2)
    with pytest.raises(ValueError, match="encoder_width"):
        model.precompute_image_kv(torch.randn(2, 6, 16))
    other = SingleStreamTransformer(tiny_config(num_layers=3, fusion_layer=2, type_vocab_size=2)).eval()
    with pytest.raises(ValueError, match="recompute it"):
        other.fuse_cached(mask, kv, image_index, input_ids=ids)


def test_fuse_cached_under_autocast_matches_fuse() -> None:
    torch.manual_seed(0)
    model = SingleStreamTransformer(tiny_config()).eval()
    images, ids = torch.randn(3, 5, 24), torch.randint(1, 100, (4, 6))
    mask, index = torch.ones(4, 6, dtype=torch.long), torch.tensor([0, 2, 2, 1])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        kv = model.precompute_image_kv(images)
        assert kv.keys[0].dtype == torch.bfloat16
        cached = model.fuse_cached(mask, kv, index, input_ids=ids).last_hidden_state.float()
        plain = model.fuse(mask, images[index], input_ids=ids).last_hidden_state.float()
    torch.testing.assert_close(cached, plain, atol=5e-2, rtol=0)
