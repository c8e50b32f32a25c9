"""Benchmark driver: ``python -m benchmarks.run --device cpu`` (``make bench``) or ``--device cuda --recipe full``.

Measures, per objective set and fast-step switch, training samples/s (median step after warm-up), peak memory,
FLOPs per sample (``FlopCounterMode``, forward + backward) and MFU; then one data worker's throughput and the time
of a 1k-image / 5k-caption retrieval evaluation with ITM re-ranking. Prints markdown tables; ``--out`` also writes
JSON (and the tables next to it as ``.md``).

On the CPU every model row runs in a fresh process, so the peak RSS of one row is not inflated by the previous
ones; on CUDA the rows share one process and ``torch.cuda.max_memory_allocated`` is reset per row.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import multiprocessing
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from benchmarks.model import OBJECTIVE_SETS, RECIPES, Case, run_case, standard_cases

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment; the first match wins.
KNOWN_PEAKS: tuple[tuple[str, float], ...] = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0))


def detect_peak(device: str) -> tuple[float | None, str]:
    if device != "cuda" or not torch.cuda.is_available():
        return None, "none (pass --peak-tflops)"
    name = torch.cuda.get_device_name()
    for fragment, peak in KNOWN_PEAKS:
        if fragment in name:
            return peak, f"{name}: dense bf16 {peak:g} TFLOP/s"
    return None, f"{name}: unknown (pass --peak-tflops)"


def describe_device(device: str) -> str:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def select_cases(args: argparse.Namespace) -> list[Case]:
    cases = standard_cases(args.recipe, args.device, args.variants)
    if args.cases:
        wanted = [name.strip() for name in args.cases.split(",")]
        by_name = {case.name: case for case in cases}
        unknown = [name for name in wanted if name not in by_name]
        if unknown:
            raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(by_name)}")
        cases = [by_name[name] for name in wanted]
    if args.batch_size:
        cases = [dataclasses.replace(case, batch_size=args.batch_size) for case in cases]
    return cases


def run_models(args: argparse.Namespace, peak: float | None, report: dict) -> list[dict]:
    """Every case in order; FLOPs are counted once per (recipe, objective set) and reused by its variants.

    With ``--out`` the JSON is rewritten after every row, so a run cut short keeps the rows it finished.
    """
    results: list[dict] = report.setdefault("model", [])
    flops_of: dict[tuple[str, str, int | None], float] = {}
    isolate = args.device == "cpu"
    started = time.perf_counter()
    for case in select_cases(args):
        if args.time_budget_s and time.perf_counter() - started > args.time_budget_s:
            results.append({"case": dataclasses.asdict(case), "status": "skipped (time budget)"})
            continue
        key = (case.recipe, case.objectives, case.batch_size)
        known = flops_of.get(key)
        call = (case, args.device, args.steps, args.warmup, peak, known)
        if isolate:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                result = pool.submit(run_case, *call).result()
        else:
            result = run_case(*call)
        if result["status"] == "ok" and known is None:
            flops_of[key] = result["gflop_per_sample"] * 1e9 * result["batch_size"]
        results.append(result)
        print(_model_line(result), flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    return results


def _fmt(value: float | None, spec: str) -> str:
    if value is None or value != value:  # None or NaN
        return "–"
    return format(value, spec)


def _model_line(result: dict) -> str:
    case = result["case"]
    return (
        f"  {case['name']:<22} {result['status']:<6} {_fmt(result.get('samples_per_s'), '8.1f')} samples/s  "
        f"{_fmt(result.get('peak_memory_mb'), '8.0f')} MB"
    )


def model_table(results: list[dict]) -> str:
    lines = [
        "| row | objectives | options | targets | batch | samples/s | step ms | peak memory | GFLOP/sample "
        "| TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        case = Case(**r["case"])
        memory = r.get("peak_memory_mb")
        memory_text = "–" if memory is None or memory != memory else f"{memory / 1024:.1f} GiB"
        if r["status"] != "ok":
            lines.append(
                f"| {case.name} | {'+'.join(OBJECTIVE_SETS[case.objectives])} | {case.options} | | | "
                f"{r['status']} | | {memory_text} | | | |"
            )
            continue
        mfu = r.get("mfu")
        lines.append(
            f"| {case.name} | {'+'.join(OBJECTIVE_SETS[case.objectives])} | {case.options} | {r['targets']} "
            f"| {r['batch_size']} | {r['samples_per_s']:.1f} | {r['step_ms']:.0f} | {memory_text} "
            f"| {r['gflop_per_sample']:.1f} | {r['achieved_tflops']:.2f} | {_fmt(None if mfu is None else 100 * mfu, '.1f')}"
            + ("%" if mfu is not None else "")
            + " |"
        )
    return "\n".join(lines)


def data_table(results: list[dict]) -> str:
    lines = ["| pipeline | image px | JPEG px | samples/s per worker |", "|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['recipe']} | {r['image_size']} | {r['source_jpeg_size']} | {r['samples_per_s_per_worker']:.1f} |"
        )
    return "\n".join(lines)


def retrieval_table(r: dict) -> str:
    phases = r["phases_s"]
    return "\n".join(
        [
            "| images × captions | precision | k | encode images s | encode texts s | ITC sim + recall s "
            "| ITM re-rank s | pairs fused | pairs/s | total s |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| {r['num_images']} × {r['num_texts']} | {r['precision']} | {r['k']} | {phases['encode_images']:.2f} "
            f"| {phases['encode_texts']:.2f} | {phases['itc_similarity_and_recall']:.3f} | {phases['itm_rerank']:.2f} "
            f"| {r['pairs_fused']} | {r['pairs_per_s']:.0f} | {r['total_s']:.2f} |",
        ]
    )


def speed2_table(rows: list[dict]) -> str:
    lines = ["| reduced config, ITC queue | samples/s | step ms |", "|---|---|---|"]
    lines += [f"| {r['queue']:,} | {r['samples_per_s']:.1f} | {r['step_ms']:.0f} |" for r in rows]
    return "\n".join(lines)


def run_speed2(args: argparse.Namespace) -> list[dict]:
    """The Speed II reduced-config rows (``benchmarks/speed2.py``), in a fresh process on the CPU."""
    from benchmarks.speed2 import bench_rows

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(bench_rows, args.steps, args.warmup).result()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None, help="default: tiny on cpu, full on cuda")
    parser.add_argument("--cases", default="", help="comma-separated row names (default: all standard rows)")
    parser.add_argument("--variants", choices=("default", "all"), default="default", help="all: also compile on cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 5 cpu, 10 cuda)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per row (default 2 cpu, 3 cuda)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the recipe's batch size")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: known GPU's bf16)")
    parser.add_argument("--rerank-k", type=int, default=None, help="ITM re-ranking depth (default 16 cpu, 128 cuda)")
    parser.add_argument("--rerank-batch", type=int, default=256, help="(image, caption) pairs per fusion pass")
    parser.add_argument("--retrieval-images", type=int, default=1000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--skip-data", action="store_true", help="skip the data pipeline (needs webdataset)")
    parser.add_argument("--skip-retrieval", action="store_true")
    parser.add_argument("--skip-speed2", action="store_true", help="skip the Speed II reduced-config rows (CPU)")
    parser.add_argument("--time-budget-s", type=float, default=None, help="skip model rows started after this")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (tables go next to it as .md)")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.recipe = args.recipe or ("tiny" if cpu else "full")
    args.steps = args.steps or (5 if cpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (2 if cpu else 3)
    args.rerank_k = args.rerank_k or (16 if cpu else 128)
    if args.time_budget_s is None and cpu:
        args.time_budget_s = 330.0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    peak, peak_source = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else detect_peak(args.device)
    started = time.perf_counter()
    report: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "device": describe_device(args.device),
        "threads": torch.get_num_threads(),
        "recipe": args.recipe,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "steps": args.steps,
        "warmup": args.warmup,
        "timing": "direct LightningModule calls, no Trainer: training_step + backward + AdamW + EMA + queue",
    }
    print(f"# vlalign benchmarks — {report['device']} — recipe {args.recipe}", flush=True)
    sections: list[str] = []
    if not args.skip_models:
        run_models(args, peak, report)
        sections.append("## Training step\n\n" + model_table(report["model"]))
    if not args.skip_speed2 and args.device == "cpu":
        report["speed2"] = run_speed2(args)
        sections.append(
            "## Speed II reduced config (ViT 192×2 at 128 px, stream 2×192, vocab 30,522, batch 8, fp32, SIMLA)\n\n"
            + speed2_table(report["speed2"])
        )
    if not args.skip_data:
        from benchmarks.pipeline import run_pipeline

        report["data"] = [run_pipeline(args.recipe)]
        sections.append("## Data pipeline (one worker)\n\n" + data_table(report["data"]))
    if not args.skip_retrieval:
        from benchmarks.evaluation import run_retrieval

        precision = "bf16" if args.device == "cuda" else "fp32"
        report["retrieval"] = run_retrieval(
            args.recipe,
            args.device,
            precision,
            num_images=args.retrieval_images,
            captions_per_image=args.captions_per_image,
            k=args.rerank_k,
            rerank_batch=args.rerank_batch,
        )
        sections.append("## Retrieval evaluation\n\n" + retrieval_table(report["retrieval"]))
    report["wall_s"] = time.perf_counter() - started
    header = (
        f"{report['date']} · {report['device']} · `{report['command']}` · peak: {peak_source} · "
        f"wall {report['wall_s']:.0f} s"
    )
    text = header + "\n\n" + "\n\n".join(sections) + "\n"
    print("\n" + text, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(text)
    return report


if __name__ == "__main__":
    main()
