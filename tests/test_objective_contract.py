"""The objective contract, checked over the registry, and a third-party objective added without touching ``src/``.

Every registered objective: a finite scalar loss; gradients reach its own heads and the encoders it declares in
``trains_encoders``; a missing requirement is an error naming the config keys; state-dict keys are stable; a step
with a non-finite loss changes nothing (parameters, twins, queues). ``ToyAlign`` below is defined and registered in
this file and trained through the CLI with ``--model.extra_objectives``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from vlalign.cli.train import run_training_cli
from vlalign.objectives.base import (
    OBJECTIVES,
    BuildSpec,
    Objective,
    ObjectiveOutput,
    execution_order,
    register_objective,
)
from vlalign.objectives.context import StepContext
from vlalign.tasks.pretrain import OBJECTIVE_SLOTS, PretrainRecipe
from vlalign.testing import tiny_batch, tiny_objectives, tiny_optimizer, tiny_recipe, train_step

TINY = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml"
BUILTIN = [name for name in OBJECTIVES if name in OBJECTIVE_SLOTS]


@register_objective
class ToyAlign(Objective):
    """A third-party objective: pull the projected image [CLS] towards the mean text state (cosine loss)."""

    name = "toy_align"
    momentum_heads = ()

    def __init__(self, weight: float = 1.0, hidden: int = 8) -> None:
        super().__init__(weight)
        if hidden < 1:
            raise ValueError(f"model.extra_objectives: toy_align.hidden must be >= 1, got {hidden}")
        self.hidden = hidden

    def build(self, spec: BuildSpec) -> None:
        self.image_head = nn.Linear(spec.vision_width, self.hidden)
        self.text_head = nn.Linear(spec.text_width, self.hidden)
        super().build(spec)

    def forward(self, ctx: StepContext) -> ObjectiveOutput:
        image = self.image_head(ctx.image_tokens[:, 0])
        text = self.text_head(ctx.text_states.mean(dim=1))
        loss = 1.0 - torch.cosine_similarity(image, text, dim=-1).mean()
        return ObjectiveOutput(loss=loss, logs={"cosine": (1.0 - loss).detach()})


def test_the_recipe_has_one_typed_slot_per_builtin_registered_objective() -> None:
    import inspect

    assert BUILTIN == list(OBJECTIVE_SLOTS) == ["itc", "itm", "xmm", "psl"]
    parameters = inspect.signature(PretrainRecipe.__init__).parameters
    for name in BUILTIN:
        assert parameters[name].annotation.startswith(OBJECTIVES[name].__name__), name


def _recipe_with(name: str, **overrides: Any) -> PretrainRecipe:
    """A tiny recipe with objective ``name`` and what it requires under its default settings."""
    slots = tiny_objectives("simla")
    keep = {name, *type(slots[name]).required_for(slots[name].init_args)}
    return tiny_recipe("simla", **{slot: (o if slot in keep else None) for slot, o in slots.items()}, **overrides)


def _run(recipe: PretrainRecipe, batch: dict) -> dict[str, ObjectiveOutput]:
    ctx = StepContext(recipe.backbone, batch, alpha=0.4, masked_images=recipe.needs_masked_images)
    outputs = {}
    for objective in recipe.objectives:
        outputs[objective.name] = out = objective(ctx)
        ctx.published[objective.name] = out.publish
    return outputs


@pytest.mark.parametrize("name", BUILTIN)
def test_loss_is_a_finite_scalar_and_trains_its_heads_and_declared_encoders(name: str) -> None:
    recipe = _recipe_with(name).train()
    objective = getattr(recipe, name)
    loss = _run(recipe, tiny_batch())[name].loss
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()

    def reached(module: nn.Module) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters() if p.requires_grad)

    own = [m for n, m in objective.named_children() if not n.endswith("_m") and any(True for _ in m.parameters())]
    assert own and all(reached(head) for head in own), f"{name}: a head got no gradient"
    for encoder in ("vision", "stream"):
        trained = reached(getattr(recipe.backbone, encoder))
        assert trained == (encoder in objective.trains_encoders), f"{name} -> {encoder}: gradient {trained}"
    twins = [p for n, p in recipe.named_parameters() if "_m." in n or n.split(".")[-1].endswith("_m")]
    assert all(p.grad is None for p in twins)


@pytest.mark.parametrize("name", [n for n in BUILTIN if OBJECTIVES[n].required_for({})])
def test_a_disabled_requirement_is_an_error_naming_both_keys(name: str) -> None:
    slots = tiny_objectives("simla")
    required = OBJECTIVES[name].required_for({})[0]
    slots[required] = None
    with pytest.raises(ValueError, match=rf"model\.{name} requires model\.{required}"):
        tiny_recipe("simla", **slots)


@pytest.mark.parametrize("name", BUILTIN)
def test_state_dict_keys_are_stable_and_round_trip(name: str) -> None:
    first, second = _recipe_with(name, seed=0), _recipe_with(name, seed=1)
    keys = list(first.state_dict())
    assert keys == list(second.state_dict())
    assert any(key.startswith(f"{name}.") for key in keys)
    second.load_state_dict(first.state_dict(), strict=True)
    for key, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[key], value), key


@pytest.mark.parametrize("name", BUILTIN)
def test_a_non_finite_step_changes_no_weight_twin_or_queue(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = _recipe_with(name)
    optimizer = tiny_optimizer(recipe)
    assert train_step(recipe, tiny_batch(seed=1), optimizer) is not None  # one real step: Adam has state
    before = {k: v.clone() for k, v in recipe.state_dict().items()}
    cls = type(getattr(recipe, name))
    forward = cls.forward

    def poisoned(self: Objective, ctx: StepContext) -> ObjectiveOutput:
        out = forward(self, ctx)
        return dataclasses.replace(out, loss=out.loss * float("nan")) if self.name == name else out

    monkeypatch.setattr(cls, "forward", poisoned)
    assert train_step(recipe, tiny_batch(seed=2), optimizer) is None
    for key, value in recipe.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed on a skipped step"
    itc = recipe.itc
    assert itc is None or not itc._pending  # the skipped step's features never reach the queue


def test_execution_order_follows_requires_and_reads_not_the_slot_order() -> None:
    slots = tiny_objectives("simla")
    ordered = execution_order([slots["psl"], slots["xmm"], slots["itm"], slots["itc"]])
    names = [o.name for o in ordered]
    assert names.index("itc") < names.index("itm") and names.index("itc") < names.index("psl")
    assert names == ["itc", "itm", "xmm", "psl"]  # ties: registry order


def test_objective_config_rebuilds_an_equal_objective() -> None:
    from vlalign.objectives.base import from_config

    xmm = tiny_objectives("simla")["xmm"]
    spec = xmm.config()
    assert spec["class_path"] == "vlalign.objectives.xmm.XMM"
    assert spec["init_args"]["image_targets"]["class_path"] == "vlalign.objectives.image_targets.PixelTargets"
    json.dumps(spec)  # plain values only
    assert from_config(spec).config() == spec


def test_a_third_party_objective_trains_through_the_cli(cli_data_args: list[str], tmp_path: Path) -> None:
    extra = json.dumps([{"class_path": "test_objective_contract.ToyAlign", "init_args": {"weight": 0.5}}])
    cli = run_training_cli([
        "fit", "--config", str(TINY), *cli_data_args, "--model.extra_objectives", extra,
        "--model.stream.num_layers", "2", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
        "--trainer.enable_model_summary", "false",
    ])  # fmt: skip
    model = cli.model
    assert [o.name for o in model.objectives] == ["itc", "itm", "toy_align"]
    assert model.toy_align.weight == 0.5 and cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["train/toy_align_loss"])
    checkpoint = next(Path(tmp_path).rglob("last.ckpt"))
    restored = PretrainRecipe.load_from_checkpoint(checkpoint)
    assert [o.name for o in restored.objectives] == ["itc", "itm", "toy_align"]
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_load_from_checkpoint_rebuilds_every_simla_objective(cli_data_args: list[str], tmp_path: Path) -> None:
    """The recorded spec rebuilds XMM (with its nested image targets) and PSL too, with one vocabulary size."""
    simla = TINY.with_name("simla_tiny.yaml")
    cli = run_training_cli([
        "fit", "--config", str(simla), *cli_data_args, "--model.stream.num_layers", "2", "--trainer.max_steps", "2",
        "--trainer.limit_val_batches", "0", "--trainer.enable_model_summary", "false",
    ])  # fmt: skip
    checkpoint = next(Path(tmp_path).rglob("last.ckpt"))
    restored = PretrainRecipe.load_from_checkpoint(checkpoint)
    assert [o.config() for o in restored.objectives] == [o.config() for o in cli.model.objectives]
    assert restored.backbone.stream.config.vocab_size == cli.model.vocab.vocab_size == restored.vocab.vocab_size
    assert restored.preprocessing is not None and restored.preprocessing.tokenizer_files
    for key, value in cli.model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
