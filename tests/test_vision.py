"""The timm ViT encoder: tiny registered models, patch masking, checkpoint loading with position resizing."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vlalign.models import VisionConfig, VisionEncoder, interpolate_pos_embed, load_vision_weights

TINY = "vit_vlalign_tiny_patch8"


def tiny_encoder(**overrides) -> VisionEncoder:
    return VisionEncoder(VisionConfig(**{"name": TINY, "img_size": 64, **overrides}))


def images(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_tiny_models_are_registered_with_the_promised_shapes() -> None:
    assert {TINY, "vit_vlalign_small_patch8"} <= set(timm.list_models("vit_vlalign_*"))
    for name, width, depth, heads, hidden in [(TINY, 64, 2, 2, 128), ("vit_vlalign_small_patch8", 128, 4, 4, 512)]:
        vit = timm.create_model(name, num_classes=0)
        assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == (width, depth, heads)
        assert vit.blocks[0].mlp.fc1.out_features == hidden
        assert vit.blocks[0].attn.qkv.bias is not None
        assert vit.blocks[0].norm1.eps == 1e-6 and vit.norm.eps == 1e-6
        assert tuple(vit.patch_embed.grid_size) == (8, 8)  # default 64 px, patch 8
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(TINY, pretrained=True)


def test_forward_shapes_and_equivalence_to_timm() -> None:
    torch.manual_seed(0)
    encoder = tiny_encoder(img_size=96).eval()
    assert (encoder.width, encoder.patch_size, encoder.grid_size, encoder.num_patches) == (64, 8, (12, 12), 144)
    x = images(size=96)
    with torch.no_grad():
        out = encoder(x)
        assert out.shape == (2, 1 + 144, 64)
        torch.testing.assert_close(out, encoder.vit.forward_features(x))
    assert torch.equal(encoder.mask_token.detach(), torch.zeros(64))
    assert tiny_encoder(mask_token=False).mask_token is None


def test_mask_replaces_exactly_the_masked_patches() -> None:
    torch.manual_seed(0)
    encoder = tiny_encoder().eval()
    with torch.no_grad():
        encoder.mask_token.normal_()
    x = images()
    patch_mask = torch.rand(2, 64, generator=torch.Generator().manual_seed(3)) < 0.4
    patch_mask[0, 0] = True
    patch_mask[1, 5] = False

    seen: list[torch.Tensor] = []
    real_pos_embed = encoder.vit._pos_embed
    encoder.vit._pos_embed = lambda t: (seen.append(t), real_pos_embed(t))[1]
    with torch.no_grad():
        raw = encoder.vit.patch_embed(x)
        masked_out = encoder(x, patch_mask)
        plain_out = encoder(x)
        none_masked = encoder(x, torch.zeros(2, 64, dtype=torch.bool))
    masked_in, plain_in = seen[0], seen[1]
    assert masked_in.shape == (2, 64, 64)  # before the CLS token is prepended
    assert torch.equal(masked_in[patch_mask], encoder.mask_token.detach().expand(int(patch_mask.sum()), -1))
    assert torch.equal(masked_in[~patch_mask], raw[~patch_mask])
    assert torch.equal(plain_in, raw)
    assert torch.equal(none_masked, plain_out)
    assert not torch.allclose(masked_out, plain_out)


def test_mask_errors() -> None:
    x = images()
    with pytest.raises(ValueError, match="mask_token=False"):
        tiny_encoder(mask_token=False)(x, torch.zeros(2, 64, dtype=torch.bool))
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match="shape"):
        encoder(x, torch.zeros(2, 63, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        encoder(x, torch.zeros(2, 64, dtype=torch.long))


@pytest.fixture(scope="module")
def source_vit() -> torch.nn.Module:
    """A 64-px tiny ViT with a classifier head, as a DeiT checkpoint would have."""
    torch.manual_seed(7)
    return timm.create_model(TINY, num_classes=10, img_size=64)


def check_loaded(encoder: VisionEncoder, source: torch.nn.Module) -> None:
    src = source.state_dict()
    pos = encoder.vit.pos_embed.detach()
    assert pos.shape == (1, 1 + 12 * 12, 64)
    assert torch.equal(pos[:, :1], src["pos_embed"][:, :1])
    torch.testing.assert_close(pos, interpolate_pos_embed(src["pos_embed"], (12, 12)))
    for name, value in encoder.vit.state_dict().items():
        if name != "pos_embed":
            assert torch.equal(value, src[name]), name


def test_load_deit_layout_pth_with_pos_embed_interpolation(tmp_path: Path, source_vit: torch.nn.Module) -> None:
    torch.save({"model": source_vit.state_dict()}, tmp_path / "deit.pth")
    encoder = tiny_encoder(img_size=96)
    report = load_vision_weights(encoder, tmp_path / "deit.pth")
    check_loaded(encoder, source_vit)
    assert sorted(report.unexpected) == ["head.bias", "head.weight"]
    assert report.missing == ["mask_token"]
    assert "vit.pos_embed" in report.loaded and len(report.loaded) == len(encoder.vit.state_dict())


def test_load_safetensors_through_config(tmp_path: Path, source_vit: torch.nn.Module) -> None:
    save_file({k: v.contiguous() for k, v in source_vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    encoder = tiny_encoder(img_size=96, weights=str(tmp_path / "vit.safetensors"))
    check_loaded(encoder, source_vit)
    assert encoder.load_report is not None and "head.weight" in encoder.load_report.unexpected


def test_load_albef_layout_keeps_only_the_online_vit_and_its_mask_token(
    tmp_path: Path, source_vit: torch.nn.Module
) -> None:
    state = {f"visual_encoder.{k}": v for k, v in source_vit.state_dict().items() if not k.startswith("head")}
    state["visual_encoder.mask_token"] = torch.full((1, 1, 64), 0.5)
    state.update({f"visual_encoder_m.{k}": torch.zeros_like(v) for k, v in source_vit.state_dict().items()})
    state["text_encoder.bert.embeddings.word_embeddings.weight"] = torch.zeros(5, 4)
    torch.save({"model": state, "epoch": 3}, tmp_path / "albef.pth")

    encoder = tiny_encoder(img_size=96)
    report = load_vision_weights(encoder, tmp_path / "albef.pth")
    check_loaded(encoder, source_vit)
    assert torch.equal(encoder.mask_token.detach(), torch.full((64,), 0.5))
    assert "mask_token" in report.loaded and report.missing == [] and report.unexpected == []

    no_token = tiny_encoder(img_size=96, mask_token=False)
    assert load_vision_weights(no_token, tmp_path / "albef.pth").unexpected == ["mask_token"]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_vision_weights(tiny_encoder(), tmp_path / "missing.pth")


def test_interpolate_pos_embed() -> None:
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 16 * 16, 8)
    same = interpolate_pos_embed(pos, (16, 16))
    assert torch.equal(same, pos)
    resized = interpolate_pos_embed(pos, (24, 24))
    assert resized.shape == (1, 1 + 24 * 24, 8)
    assert torch.equal(resized[:, :1], pos[:, :1])
    grid = pos[:, 1:].reshape(1, 16, 16, 8).permute(0, 3, 1, 2)
    reference = F.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized[:, 1:], reference.permute(0, 2, 3, 1).reshape(1, -1, 8))
    rect = interpolate_pos_embed(torch.randn(1, 2 + 4 * 6, 8), (8, 12), num_prefix_tokens=2, old_grid=(4, 6))
    assert rect.shape == (1, 2 + 96, 8)
    with pytest.raises(ValueError, match="rows"):
        interpolate_pos_embed(torch.randn(1, 1 + 15, 8), (4, 4), old_grid=(4, 4))
    with pytest.raises(ValueError, match="shape"):
        interpolate_pos_embed(torch.randn(17, 8), (4, 4))


def test_gradient_checkpointing_matches_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    import vlalign.models.vision as vision_module

    torch.manual_seed(0)
    plain = tiny_encoder().train()
    ckpt = tiny_encoder(gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.vit.grad_checkpointing and not plain.vit.grad_checkpointing
    calls = []
    real = vision_module.checkpoint
    monkeypatch.setattr(vision_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = images()
    patch_mask = torch.zeros(2, 64, dtype=torch.bool)
    patch_mask[:, ::3] = True
    results = []
    for model in (plain, ckpt):
        out = model(x, patch_mask)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert len(calls) == 2  # one per block, only for the checkpointed encoder
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)
    assert results[0][1]["mask_token"].abs().sum() > 0
