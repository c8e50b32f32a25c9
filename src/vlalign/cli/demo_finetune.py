"""`make demo-finetune`: downstream fine-tuning of the `make demo` model on the synthetic data, on CPU.

1. the pretrained model: ``make demo``'s checkpoint when that demo finished in ``--out`` (reused), else the demo's
   pretraining is run first (:func:`vlalign.cli.demo.run_demo`);
2. the annotation files of the selected tasks (``--tasks``) in the demo's data folder; a folder written before a
   task's files existed is written again (deterministic: the same images, captions and tokenizer);
3. per task, ``vlalign finetune TASK`` for a fixed number of optimizer steps (the cosine schedule spans exactly those
   steps, so a busy machine gives the same result, only later), then the test of its ``last.ckpt``:

   - ``retrieval`` (the default): zero-shot and fine-tuned recall (ITC similarities and ITM re-ranked), and, when
     the hard-negative task is registered, hard-negative accuracy per edit type of both models;
   - ``vqa``: official VQA accuracy per answer type, next to the most frequent training answer and the question-only
     prior (each question type's most frequent training answer);
   - ``nlvr2`` and ``snli_ve``: accuracy per class next to chance and the majority class; SNLI-VE also next to the
     hypothesis-only rule of the synthetic design (``made of`` decides neutral vs contradiction, its absence
     entailment vs contradiction: 66.7% at best, :mod:`vlalign.data.synth_snli_ve`);
   - ``grounding``: zero-shot and fine-tuned box accuracy (IoU >= 0.5) on testA / testB next to a random proposal;
4. one table per task, each metric next to its chance level.

Everything it writes (logs, checkpoints, ``results.json`` files, the summary ``finetune_demo.json``) goes under
``--out``, next to what ``make demo`` wrote there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlalign.cli.demo import DATA_SEED, DEFAULT_SEED, REPO_CONFIGS, DemoError, run_demo
from vlalign.evaluation.metrics import RECALL_KS, chance_recalls

#: Every task the demo can run, in the order it runs them.
TASKS: tuple[str, ...] = ("retrieval", "vqa", "nlvr2", "snli_ve", "grounding")
#: What fits the 15-minute budget of `make demo` + `make demo-finetune` on 2 CPU cores (README, "make demo-finetune").
DEFAULT_TASKS: tuple[str, ...] = ("retrieval",)
#: Fine-tuning optimizer steps per task (``--steps`` sets one number for all).
TASK_STEPS: dict[str, int] = {"retrieval": 200, "vqa": 300, "nlvr2": 300, "snli_ve": 300, "grounding": 200}
DEFAULT_THREADS = 1  # as `make demo`: the data worker has the other core
DEMO_DATA = {"num_train": 2000, "num_val": 200, "num_test": 200}  # the sizes `make demo` writes
RETRIEVAL_CONFIG = REPO_CONFIGS / "finetune" / "retrieval_tiny.yaml"
HARDNEG_CONFIG = REPO_CONFIGS / "finetune" / "hardneg_tiny.yaml"
CLASSIFICATION_PREFIX = {"nlvr2": "nlvr2", "snli_ve": "snli_ve"}  # config and file prefix of the classifiers
SUMMARY_FILE = "finetune_demo.json"


def parse_tasks(text: str) -> tuple[str, ...]:
    """``"vqa,retrieval"`` -> ``("retrieval", "vqa")`` (run order); ``"all"`` -> :data:`TASKS`.

    Raises ValueError naming the unknown tasks and the valid ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if "all" in names:
        return TASKS
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        what = f"unknown task{'s' * (len(unknown) > 1)} {', '.join(unknown)}" if unknown else "no task given"
        raise ValueError(f"--tasks: {what}; choose from {', '.join(TASKS)} (comma-separated) or all")
    return tuple(task for task in TASKS if task in names)


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


def task_files(task: str) -> list[str]:
    """The file names (in the synthetic data folder) ``task`` reads; retrieval's include the hard-negative list
    when that task is registered."""
    if task == "retrieval":
        names = ["retrieval_train.json", "retrieval_val.json", "retrieval_test.json"]
        return [*names, "hardneg_test.json"] if _hardneg_registered() else names
    if task == "vqa":
        from vlalign.data.synth_vqa import ANSWER_LIST_FILE, VQA_FILES

        return [*VQA_FILES.values(), ANSWER_LIST_FILE]
    if task == "nlvr2":
        from vlalign.data.synth_nlvr2 import NLVR2_FILES

        return list(NLVR2_FILES.values())
    if task == "snli_ve":
        from vlalign.data.synth_snli_ve import SNLI_VE_FILES

        return list(SNLI_VE_FILES.values())
    if task == "grounding":
        from vlalign.data.synth_grounding import GROUNDING_FILES

        return list(GROUNDING_FILES.values())
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def ensure_task_files(data: Path, progress: bool, tasks: Sequence[str] = DEFAULT_TASKS) -> None:
    """The annotation files of ``tasks`` under ``data``; a data folder written before they existed is written
    again (deterministic: the same images, captions and tokenizer)."""
    needed = [data / name for task in tasks for name in task_files(task)]
    if all(path.is_file() for path in needed):
        return
    from vlalign.data.synth import write_synthetic

    print(f"writing the synthetic data again in {data} (files of {', '.join(tasks)} missing) ...", flush=True)
    write_synthetic(data, seed=DATA_SEED, progress=progress, **DEMO_DATA)
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        sizes = " ".join(f"--{key} {value}" for key, value in DEMO_DATA.items())
        raise DemoError(
            f"the synthetic data writer left out {', '.join(missing)}; write the folder with "
            f"`vlalign data synth --out {data} {sizes} --seed {DATA_SEED}` or leave those tasks out of --tasks"
        )


def _hardneg_registered() -> bool:
    from vlalign.tasks.registry import tasks

    return "hardneg" in tasks()


def _run_args(out: Path, seed: int) -> list[str]:
    return [
        "--seed_everything", str(seed),
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out / "runs"),
    ]  # fmt: skip


def _fixed_steps(steps: int) -> list[str]:
    return [
        "--trainer.max_steps", str(steps),  # the schedule spans exactly these steps
        "--trainer.max_epochs", "-1",
        "--trainer.max_time", "null",
        "--trainer.limit_val_batches", "0",  # the test of last.ckpt is the result; no best-by-validation pick
    ]  # fmt: skip


def _retrieval_data_args(data: Path) -> list[str]:
    return [
        "--data.train_files", f"[{data / 'retrieval_train.json'}]",
        "--data.val_file", str(data / "retrieval_val.json"),
        "--data.test_file", str(data / "retrieval_test.json"),
    ]  # fmt: skip


def _without(args: Sequence[str], options: set[str]) -> list[str]:
    """``args`` without the ``--option value`` pairs of ``options``."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        else:
            kept.append(arg)
    return kept


@dataclass(frozen=True)
class _Context:
    """What every task runner needs."""

    out: Path
    data: Path
    checkpoint: Path
    seed: int
    quiet: list[str]  # progress bars off when not wanted
    extra: Mapping[str, Sequence[str]]  # per-task overrides

    @property
    def evaluations(self) -> Path:
        return self.out / "evaluations"

    def overrides(self, task: str) -> list[str]:
        return list(self.extra.get(task, ()))


def _check_steps(task: str, cli: Any, steps: int) -> dict[str, Any]:
    """The fine-tuning run's results; an error when it did not train exactly ``steps`` steps or wrote none."""
    if not cli.results or cli.trainer.global_step != steps:
        raise DemoError(f"{task} fine-tuning stopped at step {cli.trainer.global_step}, not at {steps}")
    return cli.results


def run_demo_finetune(
    out: Path,
    steps: int | None = None,
    seed: int = DEFAULT_SEED,
    threads: int | None = DEFAULT_THREADS,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    task_args: Mapping[str, Sequence[str]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns the summary it also writes to ``finetune_demo.json``.

    Args:
        out: the ``make demo`` folder (its checkpoint is reused; without one the demo's pretraining runs first).
        steps: optimizer steps of every fine-tuning; None: each task's own (:data:`TASK_STEPS`).
        seed: ``seed_everything`` and the data-order seed.
        threads: torch intra-op threads while it runs; None: leave them as they are.
        tasks: which of :data:`TASKS` to run (they run in that order), or a ``--tasks`` string (``"all"``).
        task_args: extra ``vlalign finetune`` / ``evaluate`` overrides per task name (e.g. smaller batches).
        progress: progress bars.
    """
    import torch

    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    selected = parse_tasks(tasks if isinstance(tasks, str) else ",".join(tasks))
    per_task = {task: steps or TASK_STEPS[task] for task in selected}
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(Path(out).expanduser().resolve(), per_task, seed, dict(task_args or {}), progress)
    finally:
        torch.set_num_threads(previous)


def _run(out: Path, steps: dict[str, int], seed: int, extra: dict[str, Sequence[str]], progress: bool) -> dict:
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint, reused = pretrained_checkpoint(out, seed, progress)
    minutes: dict[str, float] = {"pretraining": (time.time() - start) / 60}
    print(f"pretrained model: {checkpoint}" + (" (reused from `make demo`)" if reused else ""), flush=True)
    data = out / "data"
    ensure_task_files(data, progress, list(steps))
    quiet = [] if progress else ["--trainer.enable_progress_bar", "false"]
    ctx = _Context(out=out, data=data, checkpoint=checkpoint, seed=seed, quiet=quiet, extra=extra)
    summary: dict[str, Any] = {
        "out": str(out),
        "pretrained_checkpoint": str(checkpoint),
        "pretrained_reused": reused,
        "tasks": list(steps),
        "steps": dict(steps),
        "seed": seed,
        "minutes": minutes,
        "checkpoints": {},
        "results_files": {},
    }
    runners = {
        "retrieval": _run_retrieval,
        "vqa": _run_vqa,
        "nlvr2": _run_classification,
        "snli_ve": _run_classification,
        "grounding": _run_grounding,
    }
    for task, task_steps in steps.items():
        began = time.time()
        result = runners[task](ctx, task, task_steps)
        summary["checkpoints"][task] = result.pop("checkpoint")
        summary["results_files"].update(result.pop("results_files"))
        summary.update(result)
        minutes[task] = (time.time() - began) / 60
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))  # what finished so far, should a later task fail
    minutes["total"] = (time.time() - start) / 60
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    print(_report(summary))
    return summary


# -- the tasks ------------------------------------------------------------------------------------------------------
def _run_retrieval(ctx: _Context, task: str, steps: int) -> dict[str, Any]:
    """Zero-shot and fine-tuned recall; hard-negative accuracy of both models when that task is registered."""
    from vlalign.cli.tasks import evaluate, finetune

    out, data, extra = ctx.out, ctx.data, ctx.overrides(task)
    base = _run_args(out, ctx.seed) + _retrieval_data_args(data) + ctx.quiet
    print("\nzero-shot retrieval of the pretrained model (ITC, then ITM re-ranking) ...", flush=True)
    zero = evaluate(
        ["retrieval", "--config", str(RETRIEVAL_CONFIG), "--model", str(ctx.checkpoint), "--out"]
        + [str(ctx.evaluations / "retrieval_zero_shot"), *base, *extra]
    ).results
    print(f"\nfine-tuning retrieval for {steps} steps ...", flush=True)
    tuned_cli = finetune(
        ["retrieval", "--config", str(RETRIEVAL_CONFIG), "--model.init_from", str(ctx.checkpoint), *base]
        + ["--data.seed", str(ctx.seed), *_fixed_steps(steps), *extra]
    )
    tuned = _check_steps(task, tuned_cli, steps)
    if not zero:
        raise DemoError("the zero-shot retrieval evaluation wrote no results")
    finetuned_checkpoint = tuned["checkpoint"]

    hardneg: dict[str, dict[str, Any]] = {}
    if _hardneg_registered():
        for label, model in (("zero-shot", ctx.checkpoint), ("fine-tuned", finetuned_checkpoint)):
            print(f"\nhard negatives, {label} model ...", flush=True)
            name = "hardneg_zero_shot" if label == "zero-shot" else "hardneg_finetuned"
            hardneg[label] = (
                evaluate(
                    ["hardneg", "--config", str(HARDNEG_CONFIG), "--model", str(model), "--out"]
                    + [str(ctx.evaluations / name), *_run_args(out, ctx.seed)]
                    + ["--data.json_file", str(data / "hardneg_test.json"), *ctx.quiet]
                ).results
                or {}
            )

    test = json.loads((data / "retrieval_test.json").read_text())
    per_image = sum(len(entry["caption"]) for entry in test) / len(test)
    return {
        "checkpoint": finetuned_checkpoint,
        "finetuned_checkpoint": finetuned_checkpoint,
        "test_images": len(test),
        "test_captions": int(round(per_image * len(test))),
        "chance": chance_recalls(len(test), per_image),
        "retrieval": {"zero-shot": zero["metrics"], "fine-tuned": tuned["metrics"]},
        "hardneg": {label: result.get("metrics", {}) for label, result in hardneg.items()},
        "results_files": {
            "retrieval zero-shot": str(ctx.evaluations / "retrieval_zero_shot" / "results.json"),
            "retrieval fine-tuned": str(tuned_cli.results_file),
        },
    }


def _run_vqa(ctx: _Context, task: str, steps: int) -> dict[str, Any]:
    """Fine-tuned VQA accuracy and the baselines of :func:`vlalign.tasks.vqa.chance_levels` on the test split."""
    from vlalign.cli.tasks import finetune
    from vlalign.tasks.vqa import chance_levels, demo_finetune_args

    print(f"\nfine-tuning VQA for {steps} steps ...", flush=True)
    args = demo_finetune_args(ctx.data, ctx.checkpoint, steps)
    cli = finetune([task, *args, *_run_args(ctx.out, ctx.seed), *ctx.quiet, *ctx.overrides(task)])
    results = _check_steps(task, cli, steps)
    test = json.loads((ctx.data / "vqa_test.json").read_text())
    return {
        "checkpoint": results["checkpoint"],
        "vqa": {
            "metrics": results["metrics"],
            "details": results.get("details", {}),
            "baselines": chance_levels(ctx.data / "vqa_train.json", ctx.data / "vqa_test.json"),
            "questions_per_type": dict(Counter(str(entry.get("answer_type")) for entry in test)),
        },
        "results_files": {"vqa fine-tuned": str(cli.results_file)},
    }


def _run_classification(ctx: _Context, task: str, steps: int) -> dict[str, Any]:
    """NLVR2 or SNLI-VE: fine-tuned accuracy per class; chance and majority class from the task's results."""
    from vlalign.cli.tasks import finetune

    prefix = CLASSIFICATION_PREFIX[task]
    data = ctx.data
    print(f"\nfine-tuning {TASK_TITLES[task]} for {steps} steps ...", flush=True)
    cli = finetune(
        [task, "--config", str(REPO_CONFIGS / "finetune" / f"{prefix}_tiny.yaml")]
        + ["--model.init_from", str(ctx.checkpoint), *_run_args(ctx.out, ctx.seed)]
        + ["--data.train_files", f"[{data / f'{prefix}_train.json'}]"]
        + ["--data.val_file", str(data / f"{prefix}_dev.json"), "--data.test_file", str(data / f"{prefix}_test.json")]
        + ["--data.seed", str(ctx.seed), *_fixed_steps(steps), *ctx.quiet, *ctx.overrides(task)]
    )
    results = _check_steps(task, cli, steps)
    entry: dict[str, Any] = {"metrics": results["metrics"], "details": results.get("details", {})}
    if task == "snli_ve":
        entry["hypothesis_only"] = hypothesis_only_rule(data / "snli_ve_train.json", data / "snli_ve_test.json")
    return {
        "checkpoint": results["checkpoint"],
        task: entry,
        "results_files": {f"{task} fine-tuned": str(cli.results_file)},
    }


def _run_grounding(ctx: _Context, task: str, steps: int) -> dict[str, Any]:
    """Zero-shot and fine-tuned grounding accuracy on testA / testB (chance: a random proposal)."""
    from vlalign.cli.tasks import evaluate, finetune
    from vlalign.tasks.grounding import demo_finetune_args

    args = demo_finetune_args(ctx.data, ctx.checkpoint, ctx.out, steps, ctx.seed)
    extra = [*ctx.quiet, *ctx.overrides(task)]
    print("\nzero-shot grounding of the pretrained model (Grad-CAM on cross-attention) ...", flush=True)
    zero_args = _without(args[: args.index("--trainer.max_steps")], {"--model.init_from", "--seed_everything"})
    out_dir = ctx.evaluations / "grounding_zero_shot"
    zero = evaluate([task, *zero_args, "--model", str(ctx.checkpoint), "--out", str(out_dir)] + extra).results
    if not zero:
        raise DemoError("the zero-shot grounding evaluation wrote no results")
    print(f"\nfine-tuning grounding for {steps} steps ...", flush=True)
    cli = finetune([task, *args, *extra])
    tuned = _check_steps(task, cli, steps)
    return {
        "checkpoint": tuned["checkpoint"],
        "grounding": {
            label: {"metrics": result["metrics"], "details": result.get("details", {})}
            for label, result in (("zero-shot", zero), ("fine-tuned", tuned))
        },
        "results_files": {
            "grounding zero-shot": str(out_dir / "results.json"),
            "grounding fine-tuned": str(cli.results_file),
        },
    }


def hypothesis_only_rule(train_file: Path, test_file: Path) -> dict[str, float]:
    """The hypothesis-only baseline the synthetic SNLI-VE design allows (:mod:`vlalign.data.synth_snli_ve`): a
    hypothesis with ``made of`` and one without, each answered with its group's most frequent training class.

    Returns accuracy in % on ``test_file``: ``acc`` and ``acc_<class>`` (66.7 / 100 / 100 / 0 by design)."""

    def group(sentence: str) -> bool:
        return " made of " in f" {sentence} "

    counts: dict[bool, Counter[str]] = {True: Counter(), False: Counter()}
    for entry in json.loads(Path(train_file).read_text()):
        counts[group(entry["sentence"])][entry["label"]] += 1
    rule = {flag: counter.most_common(1)[0][0] for flag, counter in counts.items() if counter}
    test = json.loads(Path(test_file).read_text())
    hits = [rule.get(group(entry["sentence"])) == entry["label"] for entry in test]
    if not hits:
        raise DemoError(f"{test_file} holds no hypotheses")
    scores = {"acc": 100.0 * sum(hits) / len(hits)}
    for name in sorted({entry["label"] for entry in test}):
        members = [hit for hit, entry in zip(hits, test, strict=True) if entry["label"] == name]
        scores[f"acc_{name}"] = 100.0 * sum(members) / len(members)
    return scores


# -- the printed tables -------------------------------------------------------------------------------------------
TASK_TITLES = {"retrieval": "retrieval", "vqa": "VQA", "nlvr2": "NLVR2", "snli_ve": "SNLI-VE", "grounding": "grounding"}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _recall_row(label: str, metrics: dict[str, float], prefix: str) -> str:
    values = [metrics.get(f"test/{prefix}{d}_r{k}") for d in ("txt", "img") for k in RECALL_KS]
    mean = metrics.get(f"test/{prefix}r_mean")
    cells = " | ".join(_cell(v) for v in [*values, mean])
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


def vqa_table(summary: dict[str, Any]) -> str:
    """Official VQA accuracy (%) per answer type: fine-tuned, the most frequent training answer (chance) and the
    question-only prior (each question type's most frequent training answer)."""
    from vlalign.tasks.vqa import _metric_word

    vqa = summary["vqa"]
    metrics, baselines, counts = vqa["metrics"], vqa["baselines"], vqa["questions_per_type"]
    rows = [
        "| answer type | questions | fine-tuned | majority answer (chance) | question-only prior |",
        "|---|---|---|---|---|",
    ]
    for kind in [*sorted(counts), None]:
        key = f"acc_{_metric_word(kind)}" if kind else "acc"
        count = counts[kind] if kind else sum(counts.values())
        cells = [metrics.get(f"test/{key}"), baselines["majority"].get(key), baselines["prior"].get(key)]
        rows.append(f"| {kind or 'all'} | {count} | {' | '.join(_cell(v) for v in cells)} |")
    return "\n".join(rows)


def classification_table(summary: dict[str, Any], task: str) -> str:
    """Accuracy (%) per class and overall, next to chance (a uniform guess), the majority class and, for SNLI-VE,
    the hypothesis-only rule."""
    entry = summary[task]
    details = entry["details"]
    rule = entry.get("hypothesis_only")
    columns = ["fine-tuned", "chance", "majority class"] + (["hypothesis-only rule"] if rule else [])
    rows = [f"| class | examples | {' | '.join(columns)} |", "|---|" + "---|" * (len(columns) + 1)]
    chance = details.get("chance")
    for name, scores in details.get("per_class", {}).items():
        cells = [scores.get("accuracy"), chance, None] + ([rule.get(f"acc_{name}")] if rule else [])
        rows.append(f"| {name} | {scores.get('count', '-')} | {' | '.join(_cell(v) for v in cells)} |")
    overall = [entry["metrics"].get("test/acc"), chance, details.get("majority")] + ([rule["acc"]] if rule else [])
    rows.append(f"| all | {details.get('num_examples', '-')} | {' | '.join(_cell(v) for v in overall)} |")
    return "\n".join(rows)


def grounding_table(summary: dict[str, Any]) -> str:
    """Box accuracy (%, IoU >= 0.5) per test split: zero-shot, fine-tuned and a random proposal (chance)."""
    grounding = summary["grounding"]
    zero, tuned = grounding["zero-shot"], grounding["fine-tuned"]
    splits = tuned["details"].get("splits", {})
    rows = [
        "| split | expressions | mean proposals | zero-shot | fine-tuned | chance (random proposal) |",
        "|---|---|---|---|---|---|",
    ]
    for name, split in splits.items():
        key = f"test/acc_{name}"
        cells = [zero["metrics"].get(key), tuned["metrics"].get(key), split.get("chance")]
        shown = " | ".join(_cell(v) for v in cells)
        rows.append(f"| {name} | {split.get('expressions')} | {split.get('mean_proposals', 0):.1f} | {shown} |")
    overall = [zero["metrics"].get("test/acc"), tuned["metrics"].get("test/acc"), tuned["details"].get("chance")]
    count = tuned["details"].get("expressions", "-")
    rows.append(f"| all | {count} | - | {' | '.join(_cell(v) for v in overall)} |")
    return "\n".join(rows)


def _minutes(summary: dict[str, Any], task: str) -> str:
    value = summary["minutes"].get(task)
    return "" if value is None else f", {value:.1f} min"


def _report(summary: dict[str, Any]) -> str:
    lines: list[str] = []
    steps = summary["steps"]
    if "retrieval" in steps:
        lines += [
            "",
            f"Retrieval on the held-out synthetic test split ({summary['test_images']} images, "
            f"{summary['test_captions']} captions), recall in %: zero-shot (the pretrained model) vs fine-tuned "
            f"({steps['retrieval']} steps{_minutes(summary, 'retrieval')}); ITM re-ranks each query's top k_test "
            "ITC candidates",
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
    if "vqa" in steps:
        lines += [
            "",
            f"VQA on the synthetic test split, official VQA accuracy in % (fine-tuned {steps['vqa']} steps"
            f"{_minutes(summary, 'vqa')}); baselines: always the most frequent training answer, and each question "
            "type's most frequent training answer (the question without the image)",
            "",
            vqa_table(summary),
        ]
    if "nlvr2" in steps:
        lines += [
            "",
            f"NLVR2 on the synthetic test split (is the statement true of the image pair?), accuracy in % "
            f"(fine-tuned {steps['nlvr2']} steps{_minutes(summary, 'nlvr2')}); by design a statement alone cannot "
            "tell its label",
            "",
            classification_table(summary, "nlvr2"),
        ]
    if "snli_ve" in steps:
        lines += [
            "",
            f"SNLI-VE on the synthetic test split, accuracy in % (fine-tuned {steps['snli_ve']} steps"
            f"{_minutes(summary, 'snli_ve')}); the hypothesis-only rule (`made of` or not, each its more frequent "
            "training class) is the best a model blind to the image can do by design (66.7%)",
            "",
            classification_table(summary, "snli_ve"),
        ]
    if "grounding" in steps:
        lines += [
            "",
            f"Weakly-supervised grounding on the synthetic testA / testB (box accuracy in %, IoU >= 0.5): zero-shot vs"
            f" fine-tuned ({steps['grounding']} steps{_minutes(summary, 'grounding')}); testB has three shapes per "
            "image",
            "",
            grounding_table(summary),
        ]
    minutes = summary["minutes"]
    lines += [
        "",
        f"wall time {minutes['total']:.1f} min"
        + ("" if summary["pretrained_reused"] else f" (pretraining {minutes['pretraining']:.1f} min)"),
        "fine-tuned checkpoints: " + ", ".join(f"{task} {path}" for task, path in summary["checkpoints"].items()),
        f"summary: {Path(summary['out']) / SUMMARY_FILE}; TensorBoard: tensorboard --logdir {Path(summary['out']) / 'runs'}",
    ]
    return "\n".join(lines)


def _tasks_option(text: str) -> tuple[str, ...]:
    try:
        return parse_tasks(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--tasks: ")) from err


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlalign.cli.demo_finetune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("demo_run"), help="the `make demo` folder (reused / written)")
    parser.add_argument(
        "--tasks",
        type=_tasks_option,
        default=DEFAULT_TASKS,
        help=f"comma-separated, from {', '.join(TASKS)}; or all (default: {','.join(DEFAULT_TASKS)})",
    )
    steps_help = ", ".join(f"{task} {n}" for task, n in TASK_STEPS.items())
    parser.add_argument(
        "--steps", type=int, default=None, help=f"fine-tuning optimizer steps of every task ({steps_help})"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed_everything and the data-order seed")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    from vlalign.errors import UserError

    argv0 = sys.argv
    sys.argv = sys.argv[:1]  # the task CLI gets its arguments explicitly, not from our command line
    try:
        run_demo_finetune(args.out, steps=args.steps, seed=args.seed, threads=args.threads, tasks=args.tasks)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        sys.argv = argv0
    return 0


if __name__ == "__main__":
    sys.exit(cli())
