"""Overhead of per-objective cost accounting: ``python -m benchmarks.objective_cost [--recipe micro|tiny|full]``.

Times the same SIMLA training step (forward, backward, AdamW, EMA and queue updates; ``vlalign.testing.train_step``,
no Trainer, one fixed random batch) with accounting **off**, measuring **every 10th** step (the default of
``ObjectiveCostMonitor``) and measuring **every step**, in one process. The three settings are interleaved: each
round runs a block of ``--block`` steps of each (in rotating order), so a change of machine load hits all three
alike. Per setting it reports the median over rounds of the per-step wall time of a block, the per-step process
CPU time, and the ratio to *off* (median of the per-round ratios); the load average before and after; and the cost
table the every-step meter measured. ``--out`` writes all of it as JSON.

Recipes: ``micro`` = ``vlalign.testing.tiny_recipe("simla")`` (64-wide, 2 layers, batch 8: the most
accounting per unit of work), ``tiny`` = ``configs/pretrain/simla_tiny.yaml`` sizes, batch 32, and ``full`` =
``simla.yaml`` sizes, batch 64 (GPU). On CUDA each block is bracketed by ``torch.cuda.synchronize`` (never a step)
and the steps run under bf16 autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

SETTINGS = {"off": 0, "every 10": 10, "every 1": 1}
DEFAULT_ROUNDS = {"micro": 20, "tiny": 5, "full": 10}


def build(recipe_name: str, device: torch.device, workdir: Path) -> tuple[Any, dict, Any, int]:
    """The recipe, a batch, its optimizer (vlalign's parameter groups) and the batch size."""
    from vlalign.tasks.optim import build_optimizer

    if recipe_name == "micro":
        from vlalign.testing import tiny_batch, tiny_recipe

        recipe = tiny_recipe("simla", queue_size=64)
        batch = tiny_batch(batch_size=8, device=device)
    else:
        from benchmarks.model import Case, build_recipe, make_batch

        case = Case("objective-cost", recipe_name)
        recipe, _ = build_recipe(case, workdir)
        batch = make_batch(case, device)
    recipe = recipe.to(device).train()
    optimizer = build_optimizer(recipe, recipe.optim, total_steps=100_000)["optimizer"]
    return recipe, batch, optimizer, int(batch["input_ids"].shape[0])


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from vlalign.testing import train_step
    from vlalign.training.objective_cost import ObjectiveCostMeter, format_table

    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        recipe, batch, optimizer, batch_size = build(args.recipe, device, Path(tmp))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    meters = {name: ObjectiveCostMeter(every, warmup_steps=0) if every else None for name, every in SETTINGS.items()}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def block(meter: ObjectiveCostMeter | None) -> tuple[float, float]:
        recipe.cost_meter = meter
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.block):
            if meter is not None:
                meter.begin_step(batch_size, device)
            with autocast:
                train_step(recipe, batch, optimizer)
            if meter is not None:
                meter.end_step()
                meter.collect()
        sync()
        return (time.perf_counter() - wall) * 1e3 / args.block, (time.process_time() - cpu) * 1e3 / args.block

    for _ in range(args.warmup):
        with autocast:
            train_step(recipe, batch, optimizer)
    load_before = os.getloadavg()
    names = list(SETTINGS)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for index in range(args.rounds):
        for name in names[index % 3 :] + names[: index % 3]:  # rotate the order: no setting always runs first
            step_wall, step_cpu = block(meters[name])
            wall[name].append(step_wall)
            cpu[name].append(step_cpu)
    load_after = os.getloadavg()
    every_step = meters["every 1"]
    every_step.collect(wait=True)
    summary = every_step.summary()
    rows = {}
    for name in names:
        rows[name] = {
            "step_ms_median": statistics.median(wall[name]),
            "cpu_ms_median": statistics.median(cpu[name]),
            "ratio_wall": statistics.median(w / o for w, o in zip(wall[name], wall["off"], strict=True)),
            "ratio_cpu": statistics.median(c / o for c, o in zip(cpu[name], cpu["off"], strict=True)),
            "measured_steps": 0 if meters[name] is None else meters[name].totals.count,
            "block_step_ms": wall[name],
        }
    return {
        "recipe": args.recipe,
        "device": str(device),
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "block": args.block,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "settings": rows,
        "cost_summary": summary,
        "accounting_ms_per_measured_step": every_step.totals.mean_accounting_ms,
        "table": format_table(summary, every_step.totals.mean_accounting_ms) if summary else "",
        "torch": torch.__version__,
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"objective cost accounting overhead: recipe {result['recipe']}, {result['device']}, batch "
        f"{result['batch_size']}, {result['threads']} threads, {result['rounds']} rounds x {result['block']} steps "
        "per setting, interleaved",
        "load average (1/5/15 min) before "
        + "/".join(f"{x:.2f}" for x in result["load_average_before"])
        + ", after "
        + "/".join(f"{x:.2f}" for x in result["load_average_after"]),
        "",
        "| setting | step ms (median) | CPU ms per step (median) | wall vs off | CPU time vs off |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["settings"].items():
        lines.append(
            f"| {name} | {row['step_ms_median']:.2f} | {row['cpu_ms_median']:.2f} | {row['ratio_wall']:.3f} | "
            f"{row['ratio_cpu']:.3f} |"
        )
    lines += [
        "",
        f"accounting's own work per measured step: {result['accounting_ms_per_measured_step']:.2f} ms",
        "",
        result["table"],
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="micro", choices=("micro", "tiny", "full"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=None, help="blocks per setting (default: by recipe)")
    parser.add_argument("--block", type=int, default=10, help="steps per block (10: one measured step at 'every 10')")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps before the first block")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on the CPU)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    args = parser.parse_args()
    args.rounds = args.rounds or DEFAULT_ROUNDS[args.recipe]
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:  # one thread on the CPU: no OpenMP spinning that a busy machine turns into noise
        torch.set_num_threads(threads)
    result = measure(args)
    print(report(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
