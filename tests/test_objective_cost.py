"""Per-objective cost accounting (vlalign.training.objective_cost): the parts add up to the measured step, each part
gets the time of the work it created, accounting changes no number, and `vlalign fit` writes and logs the costs."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from jsonargparse import Namespace

from vlalign.cli.train import OBJECTIVE_COST_MONITOR, add_run_machinery, run_training_cli
from vlalign.errors import ConfigError
from vlalign.objectives.base import ObjectiveOutput
from vlalign.tasks.pretrain import PretrainRecipe
from vlalign.testing import tiny_batch, tiny_optimizer, tiny_recipe, train_step
from vlalign.training.objective_cost import (
    COST_FILE,
    ObjectiveCostMeter,
    ObjectiveCostMonitor,
    StepCost,
    format_table,
    split_timeline,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIMLA = ("itc", "itm", "xmm", "psl")
PART_KEYS = {"forward_ms", "backward_ms", "peak_mem_mb"}


@pytest.fixture(autouse=True)
def _quiet_log_without_trainer():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer
        yield


def measured_steps(recipe: PretrainRecipe, meter: ObjectiveCostMeter, steps: int, seed: int = 3) -> list[float]:
    """Run ``steps`` training steps as the callback brackets them; returns the host time of each, in ms."""
    optimizer = tiny_optimizer(recipe)
    batch = tiny_batch(batch_size=4)
    recipe.cost_meter = meter
    torch.manual_seed(seed)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        meter.begin_step(batch_size=4)
        train_step(recipe, batch, optimizer)
        meter.end_step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def parts_sum(cost: StepCost) -> float:
    parts = [*cost.objectives.values(), cost.shared]
    return sum(p.forward_ms + p.backward_ms for p in parts) + cost.other_ms


# -- the test: the accounting adds up to the measured step ------------------------------------------------------
def test_cost_parts_sum_to_within_ten_percent_of_the_measured_step_time_on_cpu() -> None:
    recipe = tiny_recipe("simla").train()
    meter = ObjectiveCostMeter(every_n_steps=1, warmup_steps=1)
    times = measured_steps(recipe, meter, steps=4)
    costs = meter.collect()
    assert [c.index for c in costs] == [1, 2, 3]  # the warm-up batch is not measured
    for cost, measured in zip(costs, times[1:], strict=True):
        assert parts_sum(cost) == pytest.approx(measured, rel=0.10)
        assert set(cost.objectives) == set(SIMLA)
        for name, part in [*cost.objectives.items(), ("shared", cost.shared)]:
            assert part.forward_ms > 0 and part.backward_ms > 0, name  # every part ran both passes
            assert part.peak_mem_mb is None  # memory is measured on CUDA only
        # the forward and backward of the model are most of the step; "other" is the optimizer and bookkeeping
        assert cost.other_ms < 0.6 * cost.step_ms
        assert 0 < cost.accounting_ms < cost.other_ms
    summary = meter.summary()
    assert summary["sampled_steps"] == 3
    assert summary["step_ms"] == pytest.approx(sum(times[1:]) / 3, rel=0.10)
    total = sum(p["forward_ms"] + p["backward_ms"] for p in [*summary["objectives"].values(), summary["shared"]])
    assert total + summary["other_ms"] == pytest.approx(summary["step_ms"], rel=1e-6)
    assert summary["samples_per_s"] == pytest.approx(4 * 3 / sum(c.step_ms for c in costs) * 1e3)


class Sleep(torch.autograd.Function):
    """Identity that sleeps in its forward and its backward: work of known length at a known place in the graph."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, forward_s: float, backward_s: float) -> torch.Tensor:
        ctx.backward_s = backward_s
        time.sleep(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        time.sleep(ctx.backward_s)
        return grad, None, None


def test_each_part_is_charged_for_the_work_it_created_not_the_objective_that_triggered_it() -> None:
    """A slow text encoder pass (triggered by ITC) lands in ``shared``; a slow ITM loss lands in ITM, forward and
    backward; ITC, which asked for the text states first, is not charged for them."""
    slow = 1.0  # seconds; far above what any tiny part takes on its own, even on a busy machine
    recipe = tiny_recipe("simla").train()
    encode_text = recipe.backbone.encode_text

    def slow_text(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = encode_text(*args, **kwargs)
        return Sleep.apply(out, slow / 2, slow) if torch.is_grad_enabled() else out

    itm_forward = recipe.itm.forward

    def slow_itm(ctx: Any) -> ObjectiveOutput:
        out = itm_forward(ctx)
        return dataclasses.replace(out, loss=Sleep.apply(out.loss, slow, slow))

    recipe.backbone.encode_text = slow_text
    recipe.itm.forward = slow_itm
    meter = ObjectiveCostMeter(every_n_steps=1, warmup_steps=1)
    measured_steps(recipe, meter, steps=2)
    (cost,) = meter.collect()
    ms = slow * 1e3
    assert cost.shared.forward_ms >= ms / 2 and cost.shared.backward_ms >= ms
    assert cost.objectives["itm"].forward_ms >= ms and cost.objectives["itm"].backward_ms >= ms
    # charged to ITC, the sleeps would make these at least ms / 2 and ms
    assert cost.objectives["itc"].forward_ms < ms / 2 and cost.objectives["itc"].backward_ms < ms


@pytest.mark.parametrize("kind", ["simla", "albef"])
def test_backward_runs_nodes_in_reverse_creation_order(kind: str) -> None:
    """The backward attribution assumes the engine runs nodes by decreasing sequence number; checked node by node."""
    recipe = tiny_recipe(kind).train()
    loss = recipe.training_step(tiny_batch(), 0)
    seen, stack, order = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ != "AccumulateGrad":
            node.register_prehook(lambda grads, s=node._sequence_nr(): order.append(s))
        stack.extend(nxt for nxt, _ in node.next_functions)
    loss.backward()
    assert len(order) > 200
    assert order == sorted(order, reverse=True)


# -- the bookkeeping, by hand ------------------------------------------------------------------------------------------
class FakeClock:
    """Milliseconds that move only when the test moves them; readable only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self.readable = True

    def stamp(self) -> float:
        return self.now

    def ready(self, stamps: Any) -> bool:
        return self.readable

    def elapsed_ms(self, start: float, end: float) -> float:
        return end - start

    def wait(self) -> None:
        self.readable = True


class FakeMemory:
    """Allocator counters in MiB units, moved by the test."""

    def __init__(self, allocated: int) -> None:
        self.now = allocated
        self.top = allocated

    def allocated(self) -> int:
        return self.now * 2**20

    def peak(self) -> int:
        return self.top * 2**20

    def reset(self) -> None:
        self.top = self.now

    def alloc(self, mib: int) -> None:
        self.now += mib
        self.top = max(self.top, self.now)


class Advance(torch.autograd.Function):
    """Identity whose backward moves the fake clock by a set number of milliseconds."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, clock: FakeClock, backward_ms: float) -> torch.Tensor:
        ctx.clock, ctx.backward_ms = clock, backward_ms
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.clock.now += ctx.backward_ms
        return grad, None, None


@dataclasses.dataclass
class Scripted:
    """An objective whose forward runs a script (moving the fake clock and memory) and returns its loss."""

    name: str
    script: Any

    def __call__(self, ctx: Any) -> ObjectiveOutput:
        return ObjectiveOutput(loss=self.script(), logs={}, publish={})


def test_step_split_and_peak_memory_match_a_hand_computed_timeline() -> None:
    clock, memory = FakeClock(), FakeMemory(allocated=100)
    meter = ObjectiveCostMeter(every_n_steps=1, warmup_steps=0, clock=clock, memory=memory)
    leaf = torch.ones(3, requires_grad=True)
    held: dict[str, torch.Tensor] = {}

    def shared_pass() -> torch.Tensor:  # 5 ms forward, 7 ms backward; peak 50 MiB, holds 20 MiB
        clock.now += 5
        memory.alloc(30)
        memory.alloc(20)
        memory.alloc(-30)
        return Advance.apply(leaf * 1.0, clock, 7.0)

    def objective_a() -> torch.Tensor:  # 2 + 3 ms of its own; 11 ms backward
        clock.now += 2
        memory.alloc(10)
        memory.alloc(-10)  # peak 10 before the shared pass
        held["shared"] = meter.shared(shared_pass)
        clock.now += 3
        memory.alloc(8)
        memory.alloc(4)
        memory.alloc(-4)  # peak 12 above its start, not counting the 20 the shared pass holds
        return Advance.apply(held["shared"].sum(), clock, 11.0)

    def objective_b() -> torch.Tensor:  # 4 ms forward (reads the cached shared feature), 13 ms backward
        clock.now += 4
        memory.alloc(6)
        return Advance.apply((held["shared"] * 2).sum(), clock, 13.0)

    assert meter.begin_step(batch_size=8)
    clock.now += 1  # the recipe's own work: other
    total = meter.objective(Scripted("a", objective_a), None).loss * 1.0
    clock.now += 1
    total = total + meter.objective(Scripted("b", objective_b), None).loss
    clock.now += 1
    meter.forward_done(total)
    clock.now += 2  # logging after the forward: other
    total.backward()
    clock.now += 6  # optimizer step: other
    clock.readable = False  # a CUDA step whose events have not completed yet
    meter.end_step()
    assert meter.collect() == []  # read later, never waited for
    clock.readable = True
    (cost,) = meter.collect()

    assert {n: (p.forward_ms, p.backward_ms) for n, p in cost.objectives.items()} == {"a": (5, 11), "b": (4, 13)}
    assert (cost.shared.forward_ms, cost.shared.backward_ms) == (5, 7)
    assert cost.other_ms == 1 + 1 + 1 + 2 + 6
    assert cost.step_ms == 56 and cost.batch_size == 8
    assert {n: p.peak_mem_mb for n, p in cost.objectives.items()} == {"a": 12, "b": 6}
    assert cost.shared.peak_mem_mb == 50
    assert leaf.grad.tolist() == [3.0, 3.0, 3.0]  # the hooks changed no gradient
    metrics = cost.metrics()
    assert metrics["cost/a_backward_ms"] == 11 and metrics["cost/shared_peak_mem_mb"] == 50
    assert metrics["cost/samples_per_s"] == pytest.approx(8 / 56 * 1e3)
    table = format_table(meter.summary())
    assert "a " in table and "shared" in table and "56.00" in table


def test_split_timeline_gives_each_mark_the_time_until_the_next() -> None:
    marks = [("x", "f", 0.0), ("y", "f", 2.0), ("x", "f", 3.5), ("x", "b", 7.0), ("end", "r", 10.0)]
    split = split_timeline(marks, lambda a, b: b - a)
    assert split == {("x", "f"): 2.0 + 3.5, ("y", "f"): 1.5, ("x", "b"): 3.0}


def test_collect_wait_reads_pending_steps_and_summary_keeps_the_highest_peak() -> None:
    clock, memory = FakeClock(), FakeMemory(allocated=0)
    meter = ObjectiveCostMeter(every_n_steps=1, warmup_steps=0, clock=clock, memory=memory)
    leaf = torch.ones(2, requires_grad=True)
    for peak in (3, 9, 5):
        meter.begin_step(batch_size=2)

        def script(peak: int = peak) -> torch.Tensor:
            clock.now += peak
            memory.alloc(peak)
            memory.alloc(-peak)
            return (leaf * 2).sum()

        total = meter.objective(Scripted("a", script), None).loss
        meter.forward_done(total)
        total.backward()
        clock.readable = False
        meter.end_step()
    assert meter.collect() == []
    assert [c.objectives["a"].forward_ms for c in meter.collect(wait=True)] == [3, 9, 5]
    summary = meter.summary()
    assert summary["objectives"]["a"] == {"forward_ms": 17 / 3, "backward_ms": 0.0, "peak_mem_mb": 9}
    assert summary["sampled_steps"] == 3 and summary["step_ms"] == 17 / 3


# -- off means off ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("every", "warmup", "measured"), [(3, 2, [2, 5, 8]), (1, 0, list(range(9))), (0, 0, [])])
def test_measured_batches_follow_every_n_steps_after_the_warmup(every: int, warmup: int, measured: list[int]) -> None:
    meter = ObjectiveCostMeter(every_n_steps=every, warmup_steps=warmup)
    assert [i for i in range(9) if meter.is_measured(i)] == measured


def test_unmeasured_and_disabled_steps_place_no_hook() -> None:
    recipe = tiny_recipe("simla").train()
    meter = ObjectiveCostMeter(every_n_steps=2, warmup_steps=0)
    optimizer = tiny_optimizer(recipe)
    batch = tiny_batch()
    recipe.cost_meter = meter
    hooks = []
    for _ in range(4):
        measured = meter.begin_step(batch_size=4)
        assert meter.active == measured
        train_step(recipe, batch, optimizer)
        meter.end_step()
        hooks.append(meter.hooks_registered)
    assert hooks[0] > 0 and hooks[1] == hooks[0] and hooks[2] > hooks[1] and hooks[3] == hooks[2]
    assert len(meter.collect()) == 2
    off = ObjectiveCostMeter(every_n_steps=0)
    recipe.cost_meter = off
    for _ in range(2):
        assert not off.begin_step(batch_size=4)
        train_step(recipe, batch, optimizer)
        off.end_step()
    assert off.hooks_registered == 0 and off.clock is None and off.collect() == [] and off.summary() is None


def test_losses_and_weights_are_bit_identical_with_accounting_on_and_off() -> None:
    results = []
    for meter in (None, ObjectiveCostMeter(every_n_steps=1, warmup_steps=0)):
        recipe = tiny_recipe("simla", stream={"hidden_dropout": 0.1}).train()  # dropout: the RNG stream must match
        optimizer = tiny_optimizer(recipe)
        recipe.cost_meter = meter
        torch.manual_seed(5)
        losses = []
        for step in range(3):
            if meter is not None:
                meter.begin_step(batch_size=4)
            losses.append(train_step(recipe, tiny_batch(seed=step), optimizer))
            if meter is not None:
                meter.end_step()
        results.append((torch.stack(losses), recipe.state_dict()))
    (losses_off, state_off), (losses_on, state_on) = results
    assert torch.equal(losses_off, losses_on)
    assert all(torch.equal(state_off[key], state_on[key]) for key in state_off)


# -- the callback and the command ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "key"), [({"every_n_steps": -1}, "every_n_steps"), ({"warmup_steps": -2}, "warmup_steps")]
)
def test_monitor_rejects_bad_settings_naming_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        ObjectiveCostMonitor(**kwargs)
    with pytest.raises(ConfigError, match="plain file name"):
        ObjectiveCostMonitor(filename="../cost.json")


def test_every_run_gets_one_cost_monitor_and_a_configured_one_is_kept() -> None:
    trainer = Namespace(callbacks=None, plugins=None, enable_checkpointing=False)
    add_run_machinery(trainer)
    assert [c.class_path for c in trainer.callbacks].count(OBJECTIVE_COST_MONITOR) == 1
    own = Namespace(class_path=OBJECTIVE_COST_MONITOR, init_args=Namespace(every_n_steps=0))
    trainer = Namespace(callbacks=[own], plugins=None, enable_checkpointing=False)
    add_run_machinery(trainer)
    monitors = [c for c in trainer.callbacks if c.class_path == OBJECTIVE_COST_MONITOR]
    assert monitors == [own] and monitors[0].init_args.every_n_steps == 0


def test_fit_writes_objective_cost_json_and_tensorboard_scalars(
    cli_data_args: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    caplog.set_level(logging.INFO)
    cli = run_training_cli([
        "fit", "--config", str(CONFIGS / "pretrain" / "simla_tiny.yaml"), *cli_data_args,
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--model.stream.num_layers", "2",
    ])  # fmt: skip
    log_dir = Path(cli.trainer.logger.log_dir)
    summary = json.loads((log_dir / COST_FILE).read_text())
    # the contract other tools read
    assert set(summary) == {"step_ms", "samples_per_s", "sampled_steps", "objectives", "shared", "other_ms"}
    assert summary["sampled_steps"] == 1  # the default: 1 in 10 after 1 unmeasured, so batch 2 of 3
    assert list(summary["objectives"]) == list(SIMLA)
    for part in [*summary["objectives"].values(), summary["shared"]]:
        assert set(part) == PART_KEYS and part["peak_mem_mb"] is None
        assert isinstance(part["forward_ms"], float) and isinstance(part["backward_ms"], float)
        assert part["forward_ms"] > 0 and part["backward_ms"] > 0
    assert all(isinstance(summary[k], float) and summary[k] > 0 for k in ("step_ms", "samples_per_s", "other_ms"))
    parts = sum(p["forward_ms"] + p["backward_ms"] for p in [*summary["objectives"].values(), summary["shared"]])
    assert parts + summary["other_ms"] == pytest.approx(summary["step_ms"], rel=1e-6)
    scalars = set(EventAccumulator(str(log_dir)).Reload().Tags()["scalars"])
    expected = {f"cost/{n}_{k}_ms" for n in (*SIMLA, "shared") for k in ("forward", "backward")}
    assert expected | {"cost/step_ms", "cost/other_ms", "cost/samples_per_s"} <= scalars
    assert "objective cost: mean of 1 measured batch" in caplog.text and "written to" in caplog.text
    assert cli.model.cost_meter is None  # detached after fit


# -- GPU: measured steps add no host sync --------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measured_cuda_steps_never_sync_and_report_peak_memory() -> None:
    """As ``tests/test_gpu.py`` checks an unmeasured step: measured steps (events, allocator counters, hooks) and
    reading completed events add no host-device sync; the summary then has every part's peak memory."""
    from vlalign.tasks.optim import OptimConfig, build_optimizer

    device = torch.device("cuda")
    recipe = tiny_recipe("simla", queue_size=64, optim=OptimConfig(warmup_steps=0)).to(device).train()
    optimizer = build_optimizer(recipe, OptimConfig(fused=True, warmup_steps=0), total_steps=10)["optimizer"]
    batch = tiny_batch(batch_size=6, device=device)
    meter = ObjectiveCostMeter(every_n_steps=1, warmup_steps=1)
    recipe.cost_meter = meter
    guard = recipe._nonfinite
    exempt = guard.is_finite

    def is_finite(*args: Any, **kwargs: Any) -> bool:  # the one deliberate sync of a step (robustness)
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            return exempt(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    guard.is_finite = is_finite
    meter.begin_step(6, device)
    train_step(recipe, batch, optimizer)  # unmeasured warm-up: lazy initialisation may sync
    meter.end_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            assert meter.begin_step(6, device)
            train_step(recipe, batch, optimizer)
            meter.end_step()
            meter.collect()  # reads only completed events
    finally:
        torch.cuda.set_sync_debug_mode("default")
    meter.collect(wait=True)
    summary = meter.summary()
    assert summary["sampled_steps"] == 3
    for part in [*summary["objectives"].values(), summary["shared"]]:
        assert part["forward_ms"] > 0 and part["backward_ms"] > 0 and part["peak_mem_mb"] > 0
