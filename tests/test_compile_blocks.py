"""Regional compilation (``model.compile_encoders``): what is compiled, that checkpoints keep their keys, that the
config value is validated, and that a compiled recipe trains as the eager one does (CPU, tiny sizes)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from vlalign.errors import ConfigError
from vlalign.models.compile import (
    COMPILE_CHOICES,
    CompileSetting,
    apply_compile,
    compile_blocks,
    encoder_blocks,
    is_compiled,
    parse_compile_encoders,
)
from vlalign.tasks.pretrain import PretrainRecipe
from vlalign.testing import tiny_batch, tiny_recipe


def _encoders(recipe: PretrainRecipe) -> list[nn.Module]:
    backbone = recipe.backbone
    return [backbone.vision, backbone.stream, backbone.vision_m, backbone.stream_m]


def test_parse_compile_encoders_reads_bools_and_every_choice() -> None:
    assert parse_compile_encoders(False) is None
    assert parse_compile_encoders(True) == CompileSetting("blocks", "default")
    assert parse_compile_encoders("whole") == CompileSetting("whole", "default")
    assert parse_compile_encoders("blocks:max-autotune-no-cudagraphs") == CompileSetting(
        "blocks", "max-autotune-no-cudagraphs"
    )
    assert parse_compile_encoders("whole:reduce-overhead").torch_mode == "reduce-overhead"
    assert CompileSetting().torch_mode is None
    assert len({parse_compile_encoders(choice) for choice in COMPILE_CHOICES}) == len(COMPILE_CHOICES) == 8


@pytest.mark.parametrize("value", ["block", "blocks:fast", "blocks:default", "", 1])
def test_a_wrong_compile_encoders_value_fails_at_construction_naming_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r"model\.compile_encoders .*blocks:max-autotune-no-cudagraphs"):
        tiny_recipe("clip", compile_encoders=value)


def test_encoder_blocks_are_the_vit_blocks_and_the_stream_layers() -> None:
    recipe = tiny_recipe("simla")
    vision, stream = recipe.backbone.vision, recipe.backbone.stream
    assert encoder_blocks(vision) == list(vision.vit.blocks) == encoder_blocks(vision.vit)
    assert encoder_blocks(stream) == list(stream.encoder.layer)
    assert len(encoder_blocks(vision)) == 2 and len(encoder_blocks(stream)) == 2
    with pytest.raises(TypeError, match="Linear is not a VisionEncoder"):
        encoder_blocks(nn.Linear(2, 2))


def test_blocks_compile_every_block_and_twin_block_idempotently_and_keep_checkpoint_keys() -> None:
    eager = tiny_recipe("simla")
    recipe = tiny_recipe("simla", compile_encoders=True)
    names = list(recipe.state_dict())
    parameters = [name for name, _ in recipe.named_parameters()]
    recipe.configure_model()
    for encoder in _encoders(recipe):
        assert not is_compiled(encoder)  # the encoder runs eagerly, its blocks compiled
        assert all(is_compiled(block) for block in encoder_blocks(encoder))
    # Twins: 2 ViT blocks + 2 stream layers, each online and momentum; a second pass compiles nothing new.
    assert apply_compile(_encoders(tiny_recipe("simla")), CompileSetting()) == 8
    assert apply_compile(_encoders(recipe), CompileSetting()) == 0
    recipe.configure_model()
    assert compile_blocks(recipe.backbone.stream) == 0
    assert list(recipe.state_dict()) == names == list(eager.state_dict())
    assert [name for name, _ in recipe.named_parameters()] == parameters
    # EMA pairs still line up parameter for parameter; a compiled checkpoint loads strictly into an eager recipe.
    for online, twin in recipe.momentum_pairs():
        assert [p.shape for p in online.parameters()] == [p.shape for p in twin.parameters()]
    eager.load_state_dict(recipe.state_dict(), strict=True)


def test_whole_compiles_the_encoders_and_leaves_their_blocks_alone() -> None:
    recipe = tiny_recipe("albef", compile_encoders="whole")
    keys = list(recipe.state_dict())
    recipe.configure_model()
    recipe.configure_model()
    for encoder in _encoders(recipe):
        assert is_compiled(encoder)
        assert not any(is_compiled(block) for block in encoder_blocks(encoder))
    assert list(recipe.state_dict()) == keys


def test_compile_setting_survives_the_recorded_model_spec() -> None:
    recipe = tiny_recipe("clip", compile_encoders="blocks:max-autotune-no-cudagraphs")
    rebuilt = PretrainRecipe.from_spec(recipe.model_spec())
    assert rebuilt.compile_encoders == "blocks:max-autotune-no-cudagraphs"


def _train(recipe: PretrainRecipe, steps: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``steps`` updates on one batch (as ``vlalign.testing.train_step``, gradients kept): losses and gradients.

    Plain SGD: Adam would turn rounding noise in a gradient that is zero in exact arithmetic (the attention key
    bias) into full-size steps, and the weights could no longer be compared."""
    batch = tiny_batch()
    optimizer = torch.optim.SGD(recipe.parameters(), lr=0.1)
    torch.manual_seed(11)  # the same masking and hard-negative draws in both runs
    losses, grads = [], []
    for step in range(steps):
        loss = recipe.training_step(batch, step)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in recipe.named_parameters() if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recipe.after_real_optimizer_step()
    return losses, grads


@pytest.mark.slow
def test_regional_compile_trains_as_eager_within_fp32_tolerance() -> None:
    """Two ITC + ITM steps (momentum twins, queue, hard negatives): losses, every gradient and every weight after
    the updates (EMA twins included) equal eager's; no graph breaks inside the compiled blocks. Dropout is off:
    inductor draws dropout masks from its own generator."""
    from torch._dynamo.utils import counters

    no_dropout = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
    eager = tiny_recipe("itc_itm", stream=no_dropout).train()
    compiled = tiny_recipe("itc_itm", stream=no_dropout, compile_encoders="blocks").train()
    compiled.load_state_dict(eager.state_dict())
    compiled.configure_model()
    twin = "backbone.vision_m.vit.blocks.0.attn.qkv.weight"
    initial_twin = eager.state_dict()[twin].clone()
    counters.clear()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        eager_losses, eager_grads = _train(eager, 2)
        compiled_losses, compiled_grads = _train(compiled, 2)
    assert counters["stats"]["unique_graphs"] >= 2  # the ViT block and the stream layer did compile
    assert not counters["graph_break"], dict(counters["graph_break"])
    for step in range(2):
        torch.testing.assert_close(compiled_losses[step], eager_losses[step], rtol=1e-5, atol=1e-5)
        assert compiled_grads[step].keys() == eager_grads[step].keys()
        assert any(name.startswith("backbone.stream.encoder.layer.") for name in compiled_grads[step])
        for name, grad in eager_grads[step].items():
            torch.testing.assert_close(compiled_grads[step][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    after = compiled.state_dict()
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(after[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(after[twin], initial_twin)  # the EMA moved the twins, in both runs alike
