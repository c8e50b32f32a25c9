"""Learning-rate schedule and parameter groups, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlalign.tasks.optim import OptimConfig, build_optimizer, lr_factor, parameter_groups

CFG = OptimConfig(lr=1e-3, warmup_steps=10, warmup_lr=1e-5, min_lr=1e-4)


def test_warmup_is_linear_from_warmup_lr() -> None:
    assert lr_factor(0, CFG, 100) * CFG.lr == pytest.approx(1e-5)
    assert lr_factor(5, CFG, 100) * CFG.lr == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))


def test_cosine_reaches_min_lr_at_the_last_step() -> None:
    assert lr_factor(10, CFG, 100) * CFG.lr == pytest.approx(1e-3)
    mid = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 0.5))
    assert lr_factor(55, CFG, 100) * CFG.lr == pytest.approx(mid)
    assert lr_factor(100, CFG, 100) * CFG.lr == pytest.approx(1e-4)


@pytest.mark.parametrize("unknown", [-1, float("inf")])
def test_unknown_length_keeps_lr_after_warmup(unknown: float) -> None:
    """Lightning reports -1 / inf steps for streaming data without a length: no premature decay to min_lr."""
    model = nn.Linear(2, 2)
    sched = build_optimizer(model, CFG, unknown)["lr_scheduler"]["scheduler"]
    for _ in range(500):
        sched.optimizer.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(1e-3)


def test_no_weight_decay_on_biases_norms_and_tokens() -> None:
    model = nn.Module()
    model.linear = nn.Linear(3, 3)
    model.norm = nn.LayerNorm(3)
    model.temp = nn.Parameter(torch.tensor(0.07))
    model.pos_embed = nn.Parameter(torch.zeros(1, 4, 3))
    decay, no_decay = parameter_groups(model, 0.02)
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 3])]
    assert len(no_decay["params"]) == 5 and no_decay["weight_decay"] == 0.0


def test_a_model_s_declared_exemptions_are_not_decayed() -> None:
    """``no_weight_decay()`` (the recipe gathers its objectives' declarations) exempts matrices too."""
    model = nn.Module()
    model.keep = nn.Linear(3, 3, bias=False)
    model.exempt = nn.Linear(3, 3, bias=False)
    model.no_weight_decay = lambda: {"exempt.weight"}
    decay, no_decay = parameter_groups(model, 0.02)
    assert decay["params"] == [model.keep.weight] and no_decay["params"] == [model.exempt.weight]


def test_the_recipe_exempts_what_its_objectives_declare() -> None:
    from vlalign.testing import tiny_recipe

    recipe = tiny_recipe("itc_itm")
    assert "itc.temp" in recipe.no_weight_decay()
    decay, no_decay = parameter_groups(recipe, 0.02)
    assert any(p is recipe.itc.temp for p in no_decay["params"])
    assert not any(p is recipe.itc.temp for p in decay["params"])


@pytest.mark.parametrize(("setting", "expected"), [(None, True), (False, False), (True, True)])
def test_adamw_is_fused_by_default_on_the_cpu(setting: bool | None, expected: bool) -> None:
    """``optim.fused: null`` picks the fused kernel for CPU parameters (docs/benchmarks.md: 3.6x faster there);
    an explicit setting wins, and the fused update equals the foreach one."""
    model = nn.Linear(4, 3)
    optimizer = build_optimizer(model, OptimConfig(fused=setting, warmup_steps=0), total_steps=10)["optimizer"]
    assert bool(optimizer.defaults["fused"]) is expected
    twin = nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    foreach = torch.optim.AdamW(twin.parameters(), lr=1e-4, weight_decay=0.02, foreach=True)
    for _ in range(3):
        for m in (model, twin):
            m.zero_grad()
            m(torch.ones(2, 4)).square().sum().backward()
        optimizer.step()
        foreach.step()
    torch.testing.assert_close(model.weight, twin.weight, rtol=1e-6, atol=1e-7)
