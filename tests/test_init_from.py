"""``model.init_from`` fails when the file does not fit the model, instead of training from random weights.

The measure (see :func:`vlalign.weights.safe_loading.load_init_weights`): of the model's online (non-momentum)
tensors in the parts the file provides (``backbone.vision``, ``backbone.stream``, ``itc`` ...), the fraction found in
the file with the model's shapes must reach ``min_match`` (``model.init_min_match``, default 0.5).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import save_file

from test_convert import _recipe, _reference_state, _save_reference
from vlalign.errors import ConfigError, InputFileError
from vlalign.objectives.itc import ITC
from vlalign.tasks.pretrain import PretrainRecipe
from vlalign.weights.published import convert_reference, convert_timm
from vlalign.weights.safe_loading import load_init_weights


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _lightning_checkpoint(model: PretrainRecipe, path: Path) -> Path:
    """A real Lightning checkpoint of ``model``, written by ``Trainer.save_checkpoint``."""
    trainer = L.Trainer(
        logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


def test_a_file_that_matches_nothing_fails_naming_the_file(tmp_path: Path) -> None:
    """A plain timm / torchvision state dict given as init_from without conversion: no key is the model's."""
    path = tmp_path / "unrelated.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.randn(192, 64), "head.weight": torch.randn(10, 64)}, str(path))
    with pytest.raises(InputFileError) as refused:
        load_init_weights(_recipe(), path)
    message = str(refused.value)
    assert f"model.init_from {path}" in message and "does not fit the model" in message
    assert "none of its 2 tensors belongs to the model" in message and "blocks.0.attn.qkv.weight" in message
    assert "model.init_min_match" in message and "vlalign convert" in message
    with pytest.raises(InputFileError, match="does not fit the model"):  # the recipe's init_from reads it the same way
        _recipe(init_from=str(path))


def test_a_file_with_the_model_names_but_other_shapes_fails(tmp_path: Path) -> None:
    path = tmp_path / "other-size.safetensors"
    state = _recipe().state_dict()
    save_file({k: torch.zeros(3) for k in state if k.startswith("backbone.stream.")}, str(path))
    with pytest.raises(InputFileError) as refused:
        load_init_weights(_recipe(), path)
    message = str(refused.value)
    assert str(path) in message and "0 of the model's" in message and "(backbone.stream)" in message
    assert "shape mismatches: backbone.stream." in message and "file (3,), model" in message


def test_a_partial_file_fails_below_min_match_and_the_fraction_is_configurable(tmp_path: Path) -> None:
    state = _recipe(seed=4).state_dict()
    vision = [k for k in state if k.startswith("backbone.vision.")]
    kept = vision[: int(0.4 * len(vision))]
    path = tmp_path / "partial.safetensors"
    save_file({k: state[k].clone() for k in kept}, str(path))

    with pytest.raises(InputFileError) as refused:
        load_init_weights(_recipe(), path)
    message = str(refused.value)
    assert f"only {len(kept)} of the model's {len(vision)} online (non-momentum) tensors" in message
    assert "(backbone.vision)" in message and "below model.init_min_match = 0.5" in message
    assert vision[len(kept)] in message  # names the first missing keys

    model = _recipe()
    missing, unexpected = load_init_weights(model, path, min_match=0.3)
    assert unexpected == [] and vision[-1] in missing
    assert torch.equal(model.state_dict()[kept[0]], state[kept[0]])
    with pytest.raises(InputFileError, match="below model.init_min_match = 0.5"):
        PretrainRecipe(itc=ITC(embed_dim=16, queue_size=8), init_from=str(path))


def test_init_min_match_outside_zero_to_one_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model.init_min_match must be in \[0, 1\].*got 1.5"):
        PretrainRecipe(itc=ITC(), init_min_match=1.5)


def test_a_real_vlalign_checkpoint_passes(tmp_path: Path) -> None:
    original = _recipe(seed=0)
    path = _lightning_checkpoint(original, tmp_path / "run.ckpt")
    restored = _recipe(seed=1)
    assert load_init_weights(restored, path) == ([], [])
    _assert_same_weights(original, restored)


def test_a_converted_reference_checkpoint_passes(tmp_path: Path) -> None:
    original = _recipe(seed=0)
    reference = _save_reference(_reference_state(original), tmp_path / "simla.pth")
    report = convert_reference(str(reference), str(tmp_path / "simla.safetensors"))
    restored = _recipe(seed=1)
    assert load_init_weights(restored, report.out, min_match=1.0) == ([], [])
    _assert_same_weights(original, restored)


def test_an_encoder_only_file_passes_for_the_part_it_provides(tmp_path: Path) -> None:
    """``vlalign convert timm`` writes vision tensors only: measured on the vision part, it fits."""
    import timm

    vit = timm.create_model("vit_vlalign_tiny_patch8", num_classes=10)
    torch.save({"model": vit.state_dict()}, tmp_path / "deit.pth")
    report = convert_timm(
        str(tmp_path / "deit.pth"), str(tmp_path / "vision.safetensors"), name="vit_vlalign_tiny_patch8", img_size=32
    )
    model = _recipe()
    missing, _ = load_init_weights(model, report.out)
    assert any(k.startswith("backbone.stream.") for k in missing)  # the rest of the model keeps its fresh init
    assert torch.equal(model.backbone.vision.vit.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
