"""`make demo-finetune`: retrieval fine-tuning of the `make demo` model on the synthetic data, on CPU.

1. the pretrained model: ``make demo``'s checkpoint when that demo finished in ``--out`` (reused), else the demo's
   pretraining is run first (:func:`vlalign.cli.demo.run_demo`);
2. zero-shot retrieval of the pretrained model on the held-out test split (``vlalign evaluate retrieval``);
3. ``vlalign finetune retrieval`` for a fixed number of optimizer steps (the cosine schedule spans exactly those
   steps, so a busy machine gives the same result, only later), then the test of its ``last.ckpt``;
4. when the hard-negative task is registered, ``vlalign evaluate hardneg`` on both models;
5. one table of recall (ITC similarities and ITM re-ranked) next to chance, and one of hard-negative accuracy per
   edit type next to chance.

Everything it writes (logs, checkpoints, ``results.json`` files, the summary ``finetune_demo.json``) goes under
``--out``, next to what ``make demo`` wrote there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from vlalign.cli.demo import DATA_SEED, DEFAULT_SEED, REPO_CONFIGS, DemoError, run_demo
from vlalign.evaluation.metrics import RECALL_KS, chance_recalls

DEFAULT_STEPS = 200  # about one epoch of the 6,000 training captions at batch 32
DEFAULT_THREADS = 1  # as `make demo`: the data worker has the other core
DEMO_DATA = {"num_train": 2000, "num_val": 200, "num_test": 200}  # the sizes `make demo` writes
RETRIEVAL_CONFIG = REPO_CONFIGS / "finetune" / "retrieval_tiny.yaml"
HARDNEG_CONFIG = REPO_CONFIGS / "finetune" / "hardneg_tiny.yaml"
SUMMARY_FILE = "finetune_demo.json"


def pretrained_checkpoint(out: Path, seed: int, progress: bool) -> tuple[Path, bool]:
    """``last.ckpt`` of a finished ``make demo`` run in ``out`` (its test result exists), else of a new one.

    Returns the checkpoint and whether it was reused.
    """
    found = _demo_checkpoint(out)
    if found is not None:
        return found, True
    print(f"no finished `make demo` run in {out}: running its pretraining first\n", flush=True)
    run_demo(out, seed=seed, progress=progress)
    found = _demo_checkpoint(out)
    if found is None:
        raise DemoError(f"the pretraining demo left no last.ckpt under {out / 'runs' / 'tiny'}")
    return found, False


def _demo_checkpoint(out: Path) -> Path | None:
    if not (out / "test_retrieval.json").is_file():
        return None
    checkpoints = sorted(out.glob("runs/tiny/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return checkpoints[-1] if checkpoints else None


def ensure_task_files(data: Path, progress: bool) -> None:
    """The retrieval training list and the hard-negative list; a data folder written before they existed is
    written again (deterministic: the same images, captions and tokenizer)."""
    needed = [data / "retrieval_train.json", data / "retrieval_val.json", data / "retrieval_test.json"]
    if _hardneg_registered():
        needed.append(data / "hardneg_test.json")
    if all(path.is_file() for path in needed):
        return
    from vlalign.data.synth import write_synthetic

    write_synthetic(data, seed=DATA_SEED, progress=progress, **DEMO_DATA)


def _hardneg_registered() -> bool:
    from vlalign.tasks.registry import tasks

    return "hardneg" in tasks()


def _run_args(out: Path, seed: int) -> list[str]:
    return [
        "--seed_everything", str(seed),
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out / "runs"),
    ]  # fmt: skip


def _retrieval_data_args(data: Path) -> list[str]:
    return [
        "--data.train_files", f"[{data / 'retrieval_train.json'}]",
        "--data.val_file", str(data / "retrieval_val.json"),
        "--data.test_file", str(data / "retrieval_test.json"),
    ]  # fmt: skip


def run_demo_finetune(
    out: Path,
    steps: int = DEFAULT_STEPS,
    seed: int = DEFAULT_SEED,
    threads: int | None = DEFAULT_THREADS,
    extra_args: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns the summary it also writes to ``finetune_demo.json``."""
    import torch

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(Path(out).expanduser().resolve(), steps, seed, list(extra_args or []), progress)
    finally:
        torch.set_num_threads(previous)


def _run(out: Path, steps: int, seed: int, extra: list[str], progress: bool) -> dict[str, Any]:
    from vlalign.cli.tasks import evaluate, finetune

    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint, reused = pretrained_checkpoint(out, seed, progress)
    pretrain_minutes = (time.time() - start) / 60
    print(f"pretrained model: {checkpoint}" + (" (reused from `make demo`)" if reused else ""), flush=True)
    data = out / "data"
    ensure_task_files(data, progress)
    quiet = [] if progress else ["--trainer.enable_progress_bar", "false"]
    evaluations = out / "evaluations"
    base = _run_args(out, seed) + _retrieval_data_args(data) + quiet

    print("\nzero-shot retrieval of the pretrained model (ITC, then ITM re-ranking) ...", flush=True)
    zero = evaluate(
        ["retrieval", "--config", str(RETRIEVAL_CONFIG), "--model", str(checkpoint), "--out"]
        + [str(evaluations / "retrieval_zero_shot"), *base, *extra]
    ).results
    print(f"\nfine-tuning retrieval for {steps} steps ...", flush=True)
    tuned_cli = finetune(
        ["retrieval", "--config", str(RETRIEVAL_CONFIG), "--model.init_from", str(checkpoint), *base]
        + [
            "--data.seed",
            str(seed),
            "--trainer.max_steps",
            str(steps),  # the schedule spans exactly these steps
            "--trainer.max_epochs",
            "-1",
            "--trainer.max_time",
            "null",
            "--trainer.limit_val_batches",
            "0",  # the test of last.ckpt is the result; no best-by-validation pick
            *extra,
        ]  # fmt: skip
    )
    tuned = tuned_cli.results
    if not zero or not tuned or tuned_cli.trainer.global_step != steps:
        raise DemoError(f"fine-tuning stopped at step {tuned_cli.trainer.global_step}, not at {steps}")
    finetuned_checkpoint = tuned["checkpoint"]

    hardneg: dict[str, dict[str, Any]] = {}
    if _hardneg_registered():
        for label, model in (("zero-shot", checkpoint), ("fine-tuned", finetuned_checkpoint)):
            print(f"\nhard negatives, {label} model ...", flush=True)
            name = "hardneg_zero_shot" if label == "zero-shot" else "hardneg_finetuned"
            hardneg[label] = (
                evaluate(
                    ["hardneg", "--config", str(HARDNEG_CONFIG), "--model", str(model), "--out"]
                    + [
                        str(evaluations / name),
                        *_run_args(out, seed),
                        "--data.json_file",
                        str(data / "hardneg_test.json"),
                    ]
                    + quiet
                ).results
                or {}
            )

    test = json.loads((data / "retrieval_test.json").read_text())
    per_image = sum(len(entry["caption"]) for entry in test) / len(test)
    summary = {
        "out": str(out),
        "pretrained_checkpoint": str(checkpoint),
        "pretrained_reused": reused,
        "finetuned_checkpoint": finetuned_checkpoint,
        "steps": steps,
        "seed": seed,
        "test_images": len(test),
        "test_captions": int(round(per_image * len(test))),
        "chance": chance_recalls(len(test), per_image),
        "retrieval": {"zero-shot": zero["metrics"], "fine-tuned": tuned["metrics"]},
        "hardneg": {label: result.get("metrics", {}) for label, result in hardneg.items()},
        "minutes": {"pretraining": pretrain_minutes, "total": (time.time() - start) / 60},
        "results_files": {
            "retrieval zero-shot": str(evaluations / "retrieval_zero_shot" / "results.json"),
            "retrieval fine-tuned": str(tuned_cli.results_file),
        },
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    print(_report(summary))
    return summary


# -- the printed tables -------------------------------------------------------------------------------------------
def _recall_row(label: str, metrics: dict[str, float], prefix: str) -> str:
    values = [metrics.get(f"test/{prefix}{d}_r{k}") for d in ("txt", "img") for k in RECALL_KS]
    mean = metrics.get(f"test/{prefix}r_mean")
    cells = " | ".join("-" if v is None else f"{v:.1f}" for v in [*values, mean])
    return f"| {label} | {cells} |"


def retrieval_table(summary: dict[str, Any]) -> str:
    chance = summary["chance"]
    header = " | ".join([f"i→t R@{k}" for k in RECALL_KS] + [f"t→i R@{k}" for k in RECALL_KS] + ["mean"])
    rows = [f"| model, scorer | {header} |", "|---|" + "---|" * (2 * len(RECALL_KS) + 1)]
    for label in ("zero-shot", "fine-tuned"):
        metrics = summary["retrieval"][label]
        rows.append(_recall_row(f"{label}, ITC", metrics, "itc_"))
        rows.append(_recall_row(f"{label}, ITM re-ranked", metrics, "itm_"))
    chance_values = [chance[f"{d}_r{k}"] for d in ("txt", "img") for k in RECALL_KS]
    chance_cells = " | ".join(f"{v:.1f}" for v in [*chance_values, sum(chance_values) / len(chance_values)])
    rows.append(f"| chance | {chance_cells} |")
    return "\n".join(rows)


def hardneg_table(summary: dict[str, Any]) -> str:
    """Accuracy (%) per edit type for each model and scorer; chance is 50% (one positive against one negative)."""
    labels = [label for label in ("zero-shot", "fine-tuned") if label in summary["hardneg"]]
    scorers = ("itm", "itc")
    types: list[str] = []
    for label in labels:
        for key in summary["hardneg"][label]:
            parts = key.split("/")
            if len(parts) == 3 and parts[1].endswith("_acc") and parts[2] not in types:
                types.append(parts[2])
    columns = [f"{label}, {scorer.upper()}" for scorer in scorers for label in labels]
    rows = [f"| edit type | negatives | {' | '.join(columns)} | chance |", "|---|" + "---|" * (len(columns) + 2)]
    first = summary["hardneg"][labels[0]] if labels else {}
    counts = {kind: first.get(f"test/hardneg_count/{kind}") for kind in types}
    for kind in [*types, None]:
        cells = []
        for scorer in scorers:
            for label in labels:
                key = f"test/hardneg_{scorer}_acc" + (f"/{kind}" if kind else "")
                value = summary["hardneg"][label].get(key)
                cells.append("-" if value is None else f"{_percent(value):.1f}")
        count = counts.get(kind) if kind else (sum(c for c in counts.values() if c) or None)
        shown = "-" if count is None else str(int(count))
        rows.append(f"| {kind or 'all'} | {shown} | {' | '.join(cells)} | 50.0 |")
    return "\n".join(rows)


def _percent(value: float) -> float:
    """Accuracies are fractions (vlalign.evaluation.hardneg); shown in percent."""
    return 100.0 * value if value <= 1.0 else value


def _report(summary: dict[str, Any]) -> str:
    lines = [
        "",
        f"Retrieval on the held-out synthetic test split ({summary['test_images']} images, "
        f"{summary['test_captions']} captions), recall in %: zero-shot (the pretrained model) vs fine-tuned "
        f"({summary['steps']} steps); ITM re-ranks each query's top k_test ITC candidates",
        "",
        retrieval_table(summary),
    ]
    if summary["hardneg"]:
        lines += [
            "",
            "Hard negatives (accuracy in %: the true caption scored above a minimally edited false one)",
            "",
            hardneg_table(summary),
        ]
    minutes = summary["minutes"]
    lines += [
        "",
        f"wall time {minutes['total']:.1f} min"
        + ("" if summary["pretrained_reused"] else f" (pretraining {minutes['pretraining']:.1f} min)"),
        f"fine-tuned checkpoint: {summary['finetuned_checkpoint']}",
        f"summary: {Path(summary['out']) / SUMMARY_FILE}; TensorBoard: tensorboard --logdir {Path(summary['out']) / 'runs'}",
    ]
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlalign.cli.demo_finetune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("demo_run"), help="the `make demo` folder (reused / written)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="fine-tuning optimizer steps")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed_everything and the data-order seed")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch intra-op threads")
    args = parser.parse_args(argv)
    from vlalign.errors import UserError

    argv0 = sys.argv
    sys.argv = sys.argv[:1]  # the task CLI gets its arguments explicitly, not from our command line
    try:
        run_demo_finetune(args.out, steps=args.steps, seed=args.seed, threads=args.threads)
    except (DemoError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        sys.argv = argv0
    return 0


if __name__ == "__main__":
    sys.exit(cli())
