"""Compile time and steady-state step time: ``python -m benchmarks.compile --recipe tiny|reduced|full --device cpu|cuda``.

Settings (``--settings``, comma-separated): ``eager``, and any ``model.compile_encoders`` value: ``whole`` (each
whole encoder), ``blocks`` (regional compilation of the repeated transformer blocks), ``blocks:<mode>`` ...
Each setting runs in a fresh Python process with an empty inductor cache in a temporary directory (FX graph and
AOT autograd caches off), so no compiled code leaks between settings and the first step pays the real compile
time. A process builds the recipe (``tiny``: ``benchmarks/model.py``'s tiny SIMLA row; ``reduced``:
``benchmarks/speed2.py``'s reduced config, queue 4,096; ``full``: ``benchmarks/model.py``'s full SIMLA row),
calls ``configure_model`` (what ``vlalign fit`` does), and times ``vlalign.testing.train_step`` (forward,
backward, AdamW, EMA and queue updates; no Trainer) on one fixed batch: the first step (compilation included), the
``--warmup`` steps after it, then ``--steps`` timed steps (median). Wall time and CPU time (the process and its
waited-for children: the C++ compiler runs) are recorded with the load average before and after each process;
``--compile-threads 1`` keeps inductor's compilation in the measured process; ``--threads 1`` avoids OpenMP
spinning on a shared machine (more threads than free cores inflate both wall and CPU time). ``--rounds N`` adds a
steady-state measurement robust to changing load: one more fresh process compiles every setting, then times them
in interleaved blocks of ``--block`` steps (``--skip-fresh``: only that). fp32 on the CPU, bf16 autocast on CUDA.
``--out`` writes JSON and the markdown next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SETTINGS = ("eager", "whole", "blocks")
CONFIGS = {
    "tiny": "simla_tiny.yaml sizes (ViT 128x4 at 64 px, stream 4x128), queue 1,024, batch 32, SIMLA, pixel targets",
    "reduced": "ViT 192x2 (16 px, 128 px), stream 2x192, embed 256, vocab 30,522, queue 4,096, batch 8, SIMLA, "
    "precomputed code targets (benchmarks/speed2.py)",
    "full": "simla.yaml sizes (ViT-B/16 at 256 px, BERT-base stream), queue 65,536, batch 64, SIMLA",
}


# -- one setting, in its own process ------------------------------------------------------------------------------------
def _cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (compiler runs), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def build(recipe_name: str, device: Any, workdir: Path) -> tuple[Any, dict[str, Any]]:
    """The benchmarked recipe (random weights, seed 0, training mode, on ``device``) and its fixed batch."""
    import torch

    from benchmarks import speed2
    from benchmarks.model import Case, build_recipe, make_batch

    torch.manual_seed(0)
    if recipe_name == "reduced":
        recipe = speed2.build_reduced(4096)
        batch = {key: value.to(device) for key, value in speed2.make_batch().items()}
    else:
        case = Case("compile", recipe_name)
        recipe = build_recipe(case, workdir)[0]
        batch = make_batch(case, device)
    return recipe.to(device).train(), batch


def dynamo_counts() -> dict[str, int]:
    """Graphs dynamo compiled and frames it recompiled, from its global counters."""
    from torch._dynamo.utils import counters

    stats = counters["stats"]
    return {"unique_graphs": int(stats.get("unique_graphs", 0)), "recompiles": sum(counters["recompiles"].values())}


class Prepared:
    """One setting's recipe (built, compiled as the setting says), optimizer and batch, and a timed step."""

    def __init__(self, args: argparse.Namespace, setting: str, workdir: Path) -> None:
        import torch

        from vlalign.tasks.optim import build_optimizer

        self.setting = setting
        self.device = torch.device(args.device)
        start = time.perf_counter()
        self.recipe, self.batch = build(args.recipe, self.device, workdir)
        self.recipe.compile_encoders = False if setting == "eager" else setting
        self.optimizer = build_optimizer(self.recipe, self.recipe.optim, total_steps=100_000)["optimizer"]
        self.recipe.configure_model()
        self.build_s = time.perf_counter() - start
        self.batch_size = int(self.batch["input_ids"].shape[0])

    def step(self) -> tuple[float, float, float]:
        """One ``train_step`` (bf16 autocast on CUDA): wall seconds, CPU seconds, loss (NaN when skipped)."""
        import torch

        from vlalign.testing import train_step

        cuda = self.device.type == "cuda"
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        if cuda:
            torch.cuda.synchronize(self.device)
        wall, cpu = time.perf_counter(), _cpu_seconds()
        with autocast:
            loss = train_step(self.recipe, self.batch, self.optimizer)
        if cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - wall, _cpu_seconds() - cpu, float(loss) if loss is not None else float("nan")


def _child_setup(args: argparse.Namespace) -> None:
    import torch

    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning.*")
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def run_setting(args: argparse.Namespace) -> dict[str, Any]:
    """Build, compile (as ``args.setting`` says), run and time one setting; returns the JSON row."""
    import torch
    from tqdm import tqdm

    _child_setup(args)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Prepared(args, args.setting, Path(tmp))
        steps = [prepared.step() for _ in tqdm(range(1 + args.warmup + args.steps), desc=args.setting, leave=False)]
    walls, cpus, losses = (list(column) for column in zip(*steps, strict=True))
    timed = slice(1 + args.warmup, None)
    steady_wall, steady_cpu = statistics.median(walls[timed]), statistics.median(cpus[timed])
    device = prepared.device
    return {
        "setting": args.setting,
        "build_s": prepared.build_s,
        "first_step_s": walls[0],
        "first_step_cpu_s": cpus[0],
        "warmup_step_s": walls[1 : 1 + args.warmup],
        "steady_step_ms": steady_wall * 1e3,
        "steady_cpu_ms": steady_cpu * 1e3,
        "samples_per_s": prepared.batch_size / steady_wall,
        "step_times_ms": [t * 1e3 for t in walls[timed]],
        "losses": losses,
        "batch_size": prepared.batch_size,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        **dynamo_counts(),
    }


def run_interleaved(args: argparse.Namespace) -> dict[str, Any]:
    """Steady state of every setting in one process: each setting's recipe (same weights) is compiled and warmed
    up, then ``--rounds`` rounds of ``--block`` steps per setting run in an order that rotates every round, so a
    change of machine load hits all settings alike. Per setting: median per-step wall and CPU time over rounds and
    the median over rounds of the per-round ratio to eager."""
    from tqdm import tqdm

    _child_setup(args)
    order = list(args.settings)
    wall: dict[str, list[float]] = {setting: [] for setting in order}
    cpu: dict[str, list[float]] = {setting: [] for setting in order}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = {setting: Prepared(args, setting, Path(tmp)) for setting in order}
        for item in tqdm(prepared.values(), desc="compile + warm-up", leave=False):
            for _ in range(1 + args.warmup):
                item.step()
        load_before = os.getloadavg()
        for index in tqdm(range(args.rounds), desc="rounds", leave=False):
            for setting in order[index % len(order) :] + order[: index % len(order)]:
                steps = [prepared[setting].step() for _ in range(args.block)]
                wall[setting].append(statistics.fmean(s[0] for s in steps) * 1e3)
                cpu[setting].append(statistics.fmean(s[1] for s in steps) * 1e3)
    rows = []
    for setting in order:
        row: dict[str, Any] = {
            "setting": setting,
            "step_ms_median": statistics.median(wall[setting]),
            "cpu_ms_median": statistics.median(cpu[setting]),
            "samples_per_s": prepared[setting].batch_size / statistics.median(wall[setting]) * 1e3,
            "block_step_ms": wall[setting],
            "block_cpu_ms": cpu[setting],
        }
        if "eager" in wall:
            row["speedup_wall"] = statistics.median(e / w for e, w in zip(wall["eager"], wall[setting], strict=True))
            row["speedup_cpu"] = statistics.median(e / c for e, c in zip(cpu["eager"], cpu[setting], strict=True))
        rows.append(row)
    return {
        "rounds": args.rounds,
        "block": args.block,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rows": rows,
    }


# -- the driver: one fresh process per setting ----------------------------------------------------------------------
def child_env(cache_dir: Path, compile_threads: int | None, threads: int | None) -> dict[str, str]:
    """The environment of a setting's process: empty inductor / Triton caches under ``cache_dir``, caches off;
    ``threads``: OpenMP threads of eager and compiled kernels alike."""
    env = dict(os.environ)
    env.update(
        TORCHINDUCTOR_CACHE_DIR=str(cache_dir / "inductor"),
        TRITON_CACHE_DIR=str(cache_dir / "triton"),
        TORCHINDUCTOR_FX_GRAPH_CACHE="0",
        TORCHINDUCTOR_AUTOGRAD_CACHE="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    if compile_threads is not None:
        env["TORCHINDUCTOR_COMPILE_THREADS"] = str(compile_threads)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def spawn(args: argparse.Namespace, extra: list[str]) -> dict[str, Any] | str:
    """Run this module as a child (``--child`` + ``extra``) with fresh caches; its JSON, or its log on failure."""
    with tempfile.TemporaryDirectory(prefix="vlalign-compile-") as tmp:
        command = [
            sys.executable, "-m", "benchmarks.compile", "--child", *extra,
            "--recipe", args.recipe, "--device", args.device,
            "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--rounds", str(args.rounds), "--block", str(args.block),
            *(["--threads", str(args.threads)] if args.threads is not None else []),
        ]  # fmt: skip
        env = child_env(Path(tmp), args.compile_threads, args.threads)
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return f"exit {done.returncode}: {done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    rows = []
    started = time.perf_counter()
    for setting in tqdm(() if args.skip_fresh else args.settings, desc="settings", file=sys.stderr):
        done = spawn(args, ["--setting", setting])
        if isinstance(done, str):
            rows.append({"setting": setting, "status": "failed", "log": done})
        else:
            rows.append({"status": "ok", **done})
    eager = next((r for r in rows if r["setting"] == "eager" and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] != "ok" or eager is None:
            continue
        row["speedup_wall"] = eager["steady_step_ms"] / row["steady_step_ms"]
        row["speedup_cpu"] = eager["steady_cpu_ms"] / row["steady_cpu_ms"]
        # First step beyond a steady eager step: what compiling costs once; the steps that pay it back.
        row["compile_overhead_s"] = row["first_step_s"] - eager["steady_step_ms"] / 1e3
        saved_ms = eager["steady_step_ms"] - row["steady_step_ms"]
        row["break_even_steps"] = row["compile_overhead_s"] * 1e3 / saved_ms if saved_ms > 0 else None
    if args.device == "cuda":
        device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    else:
        device = f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"
    interleaved = None
    if args.rounds > 0:
        interleaved = spawn(args, ["--interleaved", "--settings", ",".join(args.settings)])
        if isinstance(interleaved, str):
            interleaved = {"status": "failed", "log": interleaved}
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.compile " + " ".join(args.argv),
        "device": device,
        "recipe": args.recipe,
        "config": CONFIGS[args.recipe],
        "precision": "bf16 autocast" if args.device == "cuda" else "fp32",
        "warmup": args.warmup,
        "steps": args.steps,
        "compile_threads": args.compile_threads,
        "threads": args.threads,
        "caches": "fresh TORCHINDUCTOR_CACHE_DIR per setting, FX graph and AOT autograd caches off",
        "rows": rows,
        "interleaved": interleaved,
        "wall_s": time.perf_counter() - started,
    }


# -- reporting ----------------------------------------------------------------------------------------------------------
def _load(values: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in values)


def report(result: dict[str, Any]) -> str:
    threads = "default" if result["compile_threads"] is None else result["compile_threads"]
    kernels = "torch's default" if result.get("threads") is None else result["threads"]
    lines = [
        f"{result['date']} · {result['device']} · `{result['command']}` · wall {result['wall_s']:.0f} s",
        "",
        f"{result['config']}; {result['precision']}; one process per setting ({result['caches']}); inductor "
        f"compile threads: {threads}; kernel threads: {kernels}; {result['warmup']} warm-up steps after the first, "
        f"median of {result['steps']}.",
        "",
    ]
    if result["rows"]:
        lines += [
            "| setting | first step s (wall) | first step CPU s | compile overhead s | steady step ms (wall) "
            "| steady CPU ms | samples/s | vs eager, wall / CPU | break-even steps | graphs | load avg before → after |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for row in result["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['setting']} | {row['status']} |" + " |" * 9)
            continue
        speedup = f"{row['speedup_wall']:.2f}× / {row['speedup_cpu']:.2f}×" if "speedup_wall" in row else "–"
        overhead = f"{row['compile_overhead_s']:.1f}" if row["setting"] != "eager" else "–"
        even = row.get("break_even_steps")
        even_text = "–" if row["setting"] == "eager" else ("never" if even is None else f"{even:,.0f}")
        lines.append(
            f"| {row['setting']} | {row['first_step_s']:.1f} | {row['first_step_cpu_s']:.1f} | {overhead} "
            f"| {row['steady_step_ms']:.1f} | {row['steady_cpu_ms']:.1f} | {row['samples_per_s']:.1f} | {speedup} "
            f"| {even_text} | {row['unique_graphs']} | {_load(row['load_average_before'])} → "
            f"{_load(row['load_average_after'])} |"
        )
    inter = result.get("interleaved")
    if inter and inter.get("status") == "failed":
        lines += ["", f"Interleaved steady state: failed ({inter['log'][-300:]})"]
    elif inter:
        lines += [
            "",
            f"Steady state in one process, interleaved: {inter['rounds']} rounds × {inter['block']} steps per setting, "
            f"order rotating each round; load average {_load(inter['load_average_before'])} → "
            f"{_load(inter['load_average_after'])}",
            "",
            "| setting | step ms, wall (median) | CPU ms per step (median) | samples/s | vs eager, wall / CPU |",
            "|---|---|---|---|---|",
        ]
        for row in inter["rows"]:
            speedup = f"{row['speedup_wall']:.2f}× / {row['speedup_cpu']:.2f}×" if "speedup_wall" in row else "–"
            lines.append(
                f"| {row['setting']} | {row['step_ms_median']:.1f} | {row['cpu_ms_median']:.1f} "
                f"| {row['samples_per_s']:.1f} | {speedup} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=tuple(CONFIGS), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--settings",
        type=lambda text: tuple(s.strip() for s in text.split(",") if s.strip()),
        default=DEFAULT_SETTINGS,
        help="comma-separated: eager and model.compile_encoders values (default: eager,whole,blocks)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="steps after the first, before timing")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument(
        "--compile-threads", type=int, default=None, help="TORCHINDUCTOR_COMPILE_THREADS (default: inductor's)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch / OpenMP threads per setting (default: torch's)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file; the markdown is written next to it")
    parser.add_argument(
        "--rounds", type=int, default=0, help="also time the steady state in one process, interleaved (0: off)"
    )
    parser.add_argument("--block", type=int, default=2, help="steps per setting and round (with --rounds)")
    parser.add_argument("--skip-fresh", action="store_true", help="with --rounds: only the interleaved steady state")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--interleaved", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", default="eager", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.warmup < 0 or args.steps < 1 or args.rounds < 0 or args.block < 1:
        parser.error("--warmup and --rounds must be >= 0, --steps and --block >= 1")
    if args.skip_fresh and not args.rounds:
        parser.error("--skip-fresh needs --rounds N (N > 0)")
    from vlalign.errors import ConfigError
    from vlalign.models.compile import parse_compile_encoders

    for setting in args.settings if args.interleaved or not args.child else (args.setting,):
        if setting != "eager":
            try:
                parse_compile_encoders(setting)
            except ConfigError as err:
                parser.error(f"--settings: {setting!r} is neither eager nor a compile setting ({err})")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_interleaved(args) if args.interleaved else run_setting(args)))
        return
    result = measure(args)
    text = report(result)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
