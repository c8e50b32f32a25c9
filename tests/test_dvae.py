"""The dVAE image tokenizer path: OpenAI-style pickle -> safetensors (opt-in) -> loaded without unpickling -> codes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

dall_e = pytest.importorskip("dall_e", reason="optional dependency: pip install 'vlalign[dvae]'")

from vlalign.objectives.image_targets import (  # noqa: E402
    LOGIT_LAPLACE_EPS,
    DVAETargets,
    convert_dvae_pickle,
    load_dvae_encoder,
)


@pytest.fixture()
def pickled_encoder(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A randomly initialised DALL-E encoder pickled whole, as OpenAI ships ``encoder.pkl``."""
    torch.manual_seed(0)
    encoder = dall_e.Encoder(n_hid=16, n_blk_per_group=1, vocab_size=32, requires_grad=False, use_mixed_precision=False)
    path = tmp_path / "encoder.pkl"
    torch.save(encoder, path)
    return path, encoder


def test_pickle_converts_to_safetensors_and_loads_identically(pickled_encoder, tmp_path: Path) -> None:
    pickle_path, original = pickled_encoder
    with pytest.raises(PermissionError, match="pickle"):
        convert_dvae_pickle(pickle_path, tmp_path / "dvae.safetensors")
    out = convert_dvae_pickle(pickle_path, tmp_path / "dvae.safetensors", allow_pickle=True)
    loaded = load_dvae_encoder(out)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), original(x))


def test_dvae_targets_are_argmax_codes_of_the_mapped_tokenizer_view(pickled_encoder, tmp_path: Path) -> None:
    pickle_path, original = pickled_encoder
    out = convert_dvae_pickle(pickle_path, tmp_path / "dvae.safetensors", allow_pickle=True)
    targets = DVAETargets(weights=str(out))
    targets.setup(patch_size=16, grid=(4, 4))  # a 64 px ViT with 16 px patches; the 32 px view gives 4x4 codes
    assert targets.num_classes == 32
    view = torch.rand(3, 3, 32, 32)
    codes = targets.targets({"tokenizer_view": view})
    mapped = (1 - 2 * LOGIT_LAPLACE_EPS) * view + LOGIT_LAPLACE_EPS
    expected = original(mapped).argmax(dim=1).flatten(1)
    assert codes.shape == (3, 16) and torch.equal(codes, expected)

    targets.setup(patch_size=8, grid=(8, 8))  # the view no longer matches the patch grid
    with pytest.raises(ValueError, match="tokenizer_view_size"):
        targets.targets({"tokenizer_view": view})
