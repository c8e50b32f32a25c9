"""Checkpoint import: synthetic ALBEF / SIMLA checkpoints in the reference key layout round-trip into a recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from vlalign.cli.main import main
from vlalign.models.backbone import with_prefix
from vlalign.models.stream import SingleStreamTransformer, StreamConfig
from vlalign.tasks.pretrain import PretrainRecipe
from vlalign.testing import TINY_POSITIONS, TINY_VOCAB, tiny_batch, tiny_recipe
from vlalign.weights.published import (
    ConversionError,
    convert_bert,
    convert_dvae,
    convert_reference,
    convert_reference_state,
    convert_timm,
    reference_key,
)
from vlalign.weights.safe_loading import load_init_weights

VOCAB = TINY_VOCAB
POSITIONS = TINY_POSITIONS
QUEUE = 8


def _recipe(kind: str = "simla", seed: int = 0, init_from: str | None = None) -> PretrainRecipe:
    """Tiny recipes: SIMLA (all four objectives), ALBEF (2 layers, fusion from layer 1, token types), retrieval."""
    return tiny_recipe(
        "itc_itm" if kind == "retrieval" else kind,
        seed=seed,
        queue_size=QUEUE,
        init_from=init_from,  # type: ignore[arg-type]
    )


def _batch() -> dict[str, Tensor]:
    return tiny_batch(batch_size=4, length=9, seed=7)


def _step_loss(model: PretrainRecipe) -> Tensor:
    """One training step in train mode (dropout on) from a fixed RNG state: equal weights give equal losses."""
    model.train()
    torch.manual_seed(123)
    return model.training_step(_batch(), 0).detach()


# The reference names, written out rule by rule (not derived from vlalign.weights.published), vlalign prefix -> reference.
def _reference_name(key: str, bert_prefix: bool) -> str:
    text = "text_encoder{}.bert." if bert_prefix else "text_encoder{}."
    rules = (
        ("vision.mask_token", "visual_encoder.mask_token"),
        ("vision_m.mask_token", "visual_encoder_m.mask_token"),
        ("vision.vit.", "visual_encoder."),
        ("vision_m.vit.", "visual_encoder_m."),
        ("stream.", text.format("")),
        ("stream_m.", text.format("_m")),
        ("xmm.mlm_head.", "text_encoder.cls.predictions."),
        ("xmm.mlm_head_m.", "text_encoder_m.cls.predictions."),
        ("xmm.mim_head.", "mim_head."),
        ("xmm.mim_head_m.", "mim_head_m."),
        ("psl.concept_head.", "concept_head."),
        ("psl.concept_head_m.", "concept_head_m."),
        ("itm.itm_head.", "itm_head."),
        ("itc.", ""),
    )
    for ours, theirs in rules:
        if key == ours or key.startswith(ours):
            return theirs + key[len(ours) :]
    raise AssertionError(f"no reference name for {key}")


def _reference_state(model: PretrainRecipe, retrieval: bool = False) -> dict[str, Tensor]:
    """A checkpoint as the reference code saves it: its names, its [1, 1, C] mask token, its extra buffers."""
    state = {
        _reference_name(k.removeprefix("backbone."), bert_prefix=not retrieval): v.clone()
        for k, v in model.state_dict().items()
    }
    for twin in ("", "_m"):
        encoder = f"text_encoder{twin}." if retrieval else f"text_encoder{twin}.bert."
        state[encoder + "embeddings.position_ids"] = torch.arange(POSITIONS).expand(1, -1)
        head = f"text_encoder{twin}.cls.predictions."
        if head + "bias" in state:
            state[head + "decoder.bias"] = state[head + "bias"].clone()
        if f"visual_encoder{twin}.mask_token" in state:
            state[f"visual_encoder{twin}.mask_token"] = state[f"visual_encoder{twin}.mask_token"].reshape(1, 1, -1)
    if retrieval:
        state["idx_queue"] = torch.full((1, QUEUE), -100)
    return state


def _save_reference(state: dict[str, Tensor], path: Path) -> Path:
    torch.save({"model": state, "epoch": 3, "config": {"embed_dim": 16, "queue_size": QUEUE}}, path)
    return path


def _assert_same_weights(a: PretrainRecipe, b: PretrainRecipe) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# -- key mapping ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reference", "ours"),
    [
        ("visual_encoder.blocks.3.attn.qkv.weight", "vision.vit.blocks.3.attn.qkv.weight"),
        ("visual_encoder_m.pos_embed", "vision_m.vit.pos_embed"),
        ("visual_encoder.mask_token", "vision.mask_token"),
        ("text_encoder.bert.embeddings.word_embeddings.weight", "stream.embeddings.word_embeddings.weight"),
        ("text_encoder.embeddings.LayerNorm.bias", "stream.embeddings.LayerNorm.bias"),
        (
            "text_encoder_m.bert.encoder.layer.11.crossattention.output.dense.weight",
            "stream_m.encoder.layer.11.crossattention.output.dense.weight",
        ),
        ("text_encoder.cls.predictions.transform.LayerNorm.weight", "xmm.mlm_head.transform.LayerNorm.weight"),
        ("text_encoder_m.cls.predictions.bias", "xmm.mlm_head_m.bias"),
        ("text_encoder.cls.predictions.decoder.weight", "xmm.mlm_head.decoder.weight"),
        ("vision_proj_m.bias", "itc.vision_proj_m.bias"),
        ("temp", "itc.temp"),
        ("queue_ptr", "itc.queue_ptr"),
        ("itm_head.weight", "itm.itm_head.weight"),
        ("mim_head_m.weight", "xmm.mim_head_m.weight"),
        ("concept_head.bias", "psl.concept_head.bias"),
        ("idx_queue", None),
        ("text_encoder.bert.pooler.dense.weight", None),
        ("text_encoder.bert.embeddings.token_type_embeddings.weight", None),
    ],
)
def test_reference_key(reference: str, ours: str | None) -> None:
    assert reference_key(reference, "simla") == ours


def test_token_types_are_kept_in_the_albef_layout() -> None:
    key = "text_encoder.bert.embeddings.token_type_embeddings.weight"
    assert reference_key(key, "albef") == "stream.embeddings.token_type_embeddings.weight"


# -- SIMLA pre-training checkpoint ------------------------------------------------------------------------------------
def test_simla_pretrain_checkpoint_round_trip(tmp_path: Path) -> None:
    original = _recipe(seed=0)
    state = _reference_state(original)
    for key in (
        "text_encoder.bert.encoder.layer.0.crossattention.self.key.weight",
        "text_encoder.cls.predictions.decoder.weight",
        "text_encoder.cls.predictions.decoder.bias",
        "text_encoder_m.bert.embeddings.position_ids",
        "visual_encoder_m.pos_embed",
        "image_queue",
        "concept_head_m.weight",
        "mim_head.weight",
        "vision_proj.weight",
        "temp",
    ):
        assert key in state, key
    assert state["visual_encoder.mask_token"].shape == (1, 1, 64)
    ckpt = _save_reference(state, tmp_path / "simla.pth")

    report = convert_reference(str(ckpt), str(tmp_path / "simla.safetensors"))
    assert report.layout == "simla"
    assert report.unused == [] and report.missing == [] and report.warnings == []
    assert set(report.consumed) == {
        "text_encoder.bert.embeddings.position_ids",
        "text_encoder_m.bert.embeddings.position_ids",
        "text_encoder.cls.predictions.decoder.bias",
        "text_encoder_m.cls.predictions.decoder.bias",
    }
    assert set(report.mapped) | set(report.consumed) == set(state)
    assert report.mapped["text_encoder.bert.encoder.layer.0.crossattention.self.key.weight"] == (
        "stream.encoder.layer.0.crossattention.self.key.weight"
    )
    assert report.mapped["concept_head_m.weight"] == "psl.concept_head_m.weight"
    assert report.hints["stream.fusion_layer"] is None and report.hints["vision.img_size"] == 32

    converted = with_prefix(load_file(report.out))  # files use the backbone-relative layout (vision.*, stream.*)
    own = original.state_dict()
    assert converted.keys() == own.keys()
    for key, value in own.items():
        assert torch.equal(converted[key], value), key

    _, target_report = convert_reference_state(state, target=_recipe(seed=5))
    assert target_report.missing == [] and target_report.extra == [] and target_report.mismatched == []

    assert load_init_weights(_recipe(seed=2), report.out) == ([], [])
    restored = _recipe(seed=1, init_from=report.out)
    _assert_same_weights(original, restored)
    loss = _step_loss(original)
    torch.testing.assert_close(_step_loss(restored), loss, rtol=0, atol=0)
    assert not torch.equal(_step_loss(_recipe(seed=1)), loss)  # the loss does depend on the weights


def test_untied_decoder_is_reported_and_the_word_embeddings_win() -> None:
    state = _reference_state(_recipe())
    state["text_encoder.cls.predictions.decoder.weight"] = torch.randn(VOCAB.vocab_size, 64)
    tensors, report = convert_reference_state(state)
    assert any("decoder.weight differs" in w for w in report.warnings)
    words = state["text_encoder.bert.embeddings.word_embeddings.weight"]
    assert torch.equal(tensors["xmm.mlm_head.decoder.weight"], words)


def test_missing_momentum_twins_are_reported_without_a_target() -> None:
    state = {k: v for k, v in _reference_state(_recipe()).items() if not k.startswith("visual_encoder_m.")}
    _, report = convert_reference_state(state)
    assert "vision_m.vit.pos_embed" in report.missing and "vision_m.mask_token" in report.missing


# -- retrieval checkpoint -------------------------------------------------------------------------------------------
def test_retrieval_checkpoint_needs_allow_unused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original = _recipe("retrieval", seed=0)
    state = _reference_state(original, retrieval=True)
    assert "text_encoder.encoder.layer.1.attention.self.query.weight" in state
    assert not any(k.startswith("text_encoder.bert.") for k in state)
    ckpt = _save_reference(state, tmp_path / "retrieval.pth")
    out = tmp_path / "retrieval.safetensors"

    with pytest.raises(ConversionError, match="idx_queue") as info:
        convert_reference(str(ckpt), str(out))
    assert info.value.report.unused == ["idx_queue"]
    assert not out.exists()

    args = ["convert", "reference", "--checkpoint", str(ckpt), "--out", str(out)]
    assert main(args) == 2  # an expected mistake: one error block, status 2
    assert "allow_unused" in capsys.readouterr().err and not out.exists()

    assert main([*args, "--allow_unused", "true"]) == 0
    printed = capsys.readouterr().out
    assert "unused source tensors: 1" in printed and "idx_queue" in printed
    assert load_init_weights(_recipe("retrieval", seed=2), out) == ([], [])
    restored = _recipe("retrieval", seed=1, init_from=str(out))
    _assert_same_weights(original, restored)
    torch.testing.assert_close(_step_loss(restored), _step_loss(original), rtol=0, atol=0)


def test_queues_can_be_dropped() -> None:
    tensors, report = convert_reference_state(_reference_state(_recipe()), queues=False)
    assert not {"itc.image_queue", "itc.text_queue", "itc.queue_ptr"} & tensors.keys()
    assert "image_queue" in report.consumed and "itc.temp" in tensors


# -- ALBEF layout ---------------------------------------------------------------------------------------------------
def test_albef_checkpoint_round_trip(tmp_path: Path) -> None:
    original = _recipe("albef", seed=0)
    state = _reference_state(original)
    assert "text_encoder.bert.embeddings.token_type_embeddings.weight" in state
    assert "text_encoder.bert.encoder.layer.1.crossattention.self.key.weight" in state
    assert not any(".layer.0.crossattention." in k for k in state)
    assert not any(k.startswith(("mim_head", "concept_head")) or "mask_token" in k for k in state)
    ckpt = _save_reference(state, tmp_path / "albef.pth")

    for layout in ("auto", "albef"):
        report = convert_reference(str(ckpt), str(tmp_path / f"albef_{layout}.safetensors"), layout=layout)
        assert report.layout == "albef" and report.unused == [] and report.missing == []
        assert report.hints["stream.fusion_layer"] == 1 and report.hints["stream.type_vocab_size"] == 2

    # Read as SIMLA, the token types have no slot and the missing cross-attention is flagged.
    _, as_simla = convert_reference_state(state, layout="simla")
    assert as_simla.unused == [
        "text_encoder.bert.embeddings.token_type_embeddings.weight",
        "text_encoder_m.bert.embeddings.token_type_embeddings.weight",
    ]
    assert any("ALBEF" in w for w in as_simla.warnings)

    assert load_init_weights(_recipe("albef", seed=2), report.out) == ([], [])
    restored = _recipe("albef", seed=1, init_from=report.out)
    _assert_same_weights(original, restored)
    torch.testing.assert_close(_step_loss(restored), _step_loss(original), rtol=0, atol=0)


# -- encoder initialisations ----------------------------------------------------------------------------------------
def test_convert_bert_writes_stream_and_mlm_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bert = SingleStreamTransformer(
        StreamConfig(
            vocab_size=VOCAB.vocab_size,
            hidden_size=64,
            num_layers=2,
            num_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
            type_vocab_size=2,
        )
    )
    weights = {f"bert.{k}": v.clone() for k, v in bert.state_dict().items() if ".crossattention." not in k}
    weights["bert.pooler.dense.weight"] = torch.randn(64, 64)
    weights["cls.predictions.transform.dense.weight"] = torch.randn(64, 64)
    weights["cls.predictions.transform.dense.bias"] = torch.randn(64)
    weights["cls.predictions.transform.LayerNorm.gamma"] = torch.randn(64)  # legacy TF names
    weights["cls.predictions.transform.LayerNorm.beta"] = torch.randn(64)
    weights["cls.predictions.bias"] = torch.randn(VOCAB.vocab_size)
    weights["cls.predictions.decoder.weight"] = weights["bert.embeddings.word_embeddings.weight"].clone()
    weights["cls.seq_relationship.weight"] = torch.randn(2, 64)
    directory = tmp_path / "bert"
    directory.mkdir()
    save_file(weights, str(directory / "model.safetensors"))
    config = {
        "vocab_size": VOCAB.vocab_size,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
    }
    (directory / "config.json").write_text(json.dumps(config))

    report = convert_bert(str(directory), str(tmp_path / "stream.safetensors"), max_position_embeddings=POSITIONS)
    tensors = load_file(report.out)
    assert not any(".crossattention." in k or "token_type" in k for k in tensors)
    assert tensors["stream.embeddings.position_embeddings.weight"].shape == (POSITIONS, 64)
    assert torch.equal(
        tensors["stream.encoder.layer.1.output.dense.weight"], weights["bert.encoder.layer.1.output.dense.weight"]
    )
    assert torch.equal(
        tensors["xmm.mlm_head.transform.LayerNorm.weight"], weights["cls.predictions.transform.LayerNorm.gamma"]
    )
    assert set(report.unused) == {
        "bert.pooler.dense.weight",
        "bert.embeddings.token_type_embeddings.weight",
        "cls.seq_relationship.weight",
    }
    assert any(".crossattention." in k for k in report.missing)

    model = _recipe(seed=3)
    missing, unexpected = load_init_weights(model, report.out)
    assert unexpected == []
    assert all(
        ".crossattention." in k or k.startswith(("backbone.vision", "itc.", "itm.", "psl.", "xmm.mim_head"))
        for k in missing
    )
    assert torch.equal(
        model.backbone.stream_m.embeddings.word_embeddings.weight, weights["bert.embeddings.word_embeddings.weight"]
    )
    assert torch.equal(model.xmm.mlm_head.bias, weights["cls.predictions.bias"])


def test_convert_timm_resizes_positions(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_vlalign_tiny_patch8", num_classes=10)  # 64 px, 8x8 grid, classifier head
    ckpt = tmp_path / "deit.pth"
    torch.save({"model": vit.state_dict()}, ckpt)

    report = convert_timm(str(ckpt), str(tmp_path / "vision.safetensors"), name="vit_vlalign_tiny_patch8", img_size=32)
    tensors = load_file(report.out)
    assert tensors["vision.vit.pos_embed"].shape == (1, 1 + 16, 64)
    assert torch.equal(tensors["vision.vit.blocks.1.mlp.fc2.weight"], vit.state_dict()["blocks.1.mlp.fc2.weight"])
    assert {"head.weight", "head.bias"} <= set(report.unused) and report.missing == ["vision.mask_token"]

    model = _recipe(seed=3)
    load_init_weights(model, report.out)
    assert torch.equal(model.backbone.vision_m.vit.patch_embed.proj.weight, vit.state_dict()["patch_embed.proj.weight"])


# -- command line ---------------------------------------------------------------------------------------------------
def test_convert_help_lists_the_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for kind in ("reference", "bert", "timm", "dvae"):
        assert kind in out


def test_convert_dvae_refuses_pickles_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["convert", "dvae", "--pickle", str(tmp_path / "encoder.pkl"), "--out", str(tmp_path / "dvae.safetensors")]
    assert main(args) == 2
    assert "pickle" in capsys.readouterr().err
    with pytest.raises(PermissionError, match="pickle"):
        convert_dvae(str(tmp_path / "encoder.pkl"), str(tmp_path / "dvae.safetensors"))
