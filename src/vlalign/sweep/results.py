"""A sweep's results: every run's measurements read from its folder, then ``results.csv`` (one row per run),
``results.md`` (mean ± std over seeds per variant, best in bold, delta to the reference variant), PNG plots and a
TensorBoard hparams view.

Metric keys: ``fit/<tag>`` (TensorBoard scalars of the training run), ``retrieval/<scorer>/<metric>``
(``retrieval/itc/r_mean``, ``retrieval/itm/txt_r1``; recall in %), ``hardneg/<scorer>/<edit type>`` and
``hardneg/<scorer>/all`` (accuracy as a fraction), ``<name>/<metric>`` for other tasks. Costs: ``train_s`` (wall time
of the training process, startup included), ``train_s_per_step``, ``eval_s``, ``peak_rss_mb`` (the training process),
and, when the run wrote ``objective_cost.json`` into its log folder, ``cost/step_ms``, ``cost/samples_per_s``,
``cost/<objective>/{forward_ms,backward_ms,peak_mem_mb}`` and ``cost/shared/{forward_ms,backward_ms}``.

Warm-start runs (``warm_start:``) are rows of ``results.csv`` with variant ``_warm_start`` (their times, costs and
training metrics); results.md states the stage in one line (objectives, steps, mean wall time) and lists a warm start
that is not done, but its tables, the plots and the hparams view compare the variants only.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlalign.sweep.plan import RunPlan
from vlalign.sweep.runner import read_status
from vlalign.sweep.spec import WARM_START, Evaluation, SweepSpec

__all__ = [
    "COST_FILE",
    "Collected",
    "collect",
    "flatten_task_metrics",
    "lower_is_better",
    "run_row",
    "summarize",
]

COST_FILE = "objective_cost.json"
FIXED_COLUMNS = (
    "variant", "seed", "status", "objectives", "steps", "wall_s", "train_s", "train_s_per_step", "eval_s",
    "peak_rss_mb", "error",
)  # fmt: skip
NUMERIC_FIXED = ("wall_s", "train_s", "train_s_per_step", "eval_s", "peak_rss_mb")


@dataclass
class Collected:
    """What :func:`collect` wrote, and the rows behind it."""

    rows: list[dict[str, Any]]
    metrics: list[str]
    costs: list[str]
    csv: Path
    markdown: Path
    plots: list[Path]
    tensorboard: Path | None


# -- measurements of one run -------------------------------------------------------------------------------------------
def flatten_task_metrics(evaluation: Evaluation, metrics: dict[str, Any]) -> dict[str, float]:
    """A task's ``results.json`` metrics under flat keys (see the module docstring); counts and the scorer-dependent
    plain ``r_mean`` are left out."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        rest = key.split("/", 1)[1] if "/" in key else key  # drop the split prefix (test/, val/)
        name = _flat_name(evaluation.kind, rest)
        if name is not None:
            flat[f"{evaluation.name}/{name}"] = float(value)
    if evaluation.metrics:
        flat = {k: v for k, v in flat.items() if any(fnmatch.fnmatchcase(k, p) for p in evaluation.metrics)}
    return flat


def _flat_name(kind: str, rest: str) -> str | None:
    if kind == "retrieval":
        scorer, _, metric = rest.partition("_")
        return f"{scorer}/{metric}" if scorer in ("itc", "itm") and metric else None
    if kind == "hardneg":
        if rest.startswith("hardneg_count"):
            return None
        head, _, edit = rest.partition("/")
        scorer = head.removeprefix("hardneg_").removesuffix("_acc")
        return f"{scorer}/{edit or 'all'}"
    return rest


def fit_metrics(evaluation: Evaluation, version_dir: Path | None) -> dict[str, float]:
    """TensorBoard scalars of the training run matching ``evaluation.tags``: the mean of the last ``average_last``
    logged values of each, as ``<name>/<tag>``."""
    if version_dir is None or not Path(version_dir).is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(version_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    flat = {}
    for tag in accumulator.Tags().get("scalars", []):
        if not any(fnmatch.fnmatchcase(tag, pattern) for pattern in evaluation.tags):
            continue
        events = sorted(accumulator.Scalars(tag), key=lambda e: (e.step, e.wall_time))
        by_step = {e.step: e.value for e in events}  # a resumed run may log a step twice: the later value
        values = [by_step[s] for s in sorted(by_step)][-evaluation.average_last :]
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            flat[f"{evaluation.name}/{tag}"] = sum(finite) / len(finite)
    if evaluation.metrics:
        flat = {k: v for k, v in flat.items() if any(fnmatch.fnmatchcase(k, p) for p in evaluation.metrics)}
    return flat


def cost_metrics(version_dir: Path | None) -> dict[str, float]:
    """``objective_cost.json`` of the run's log folder as ``cost/...`` columns (nothing when it is absent)."""
    if version_dir is None:
        return {}
    path = Path(version_dir) / COST_FILE
    try:
        cost = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    flat: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[prefix] = float(value)

    if isinstance(cost, dict):
        for key, value in cost.items():
            walk(f"cost/{key}" if key != "objectives" else "cost", value)
    return flat


def _objectives_of(version_dir: Path | None) -> list[str]:
    """The objectives the run trained with, from the config.yaml fit wrote (built-in slots in order, then extras)."""
    if version_dir is None:
        return []
    import yaml

    from vlalign.sweep.spec import objective_slots

    try:
        config = yaml.safe_load((Path(version_dir) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    model = (config or {}).get("model") or {}
    names = [slot for slot in objective_slots() if model.get(slot) is not None]
    for extra in model.get("extra_objectives") or []:
        path = extra.get("class_path", "") if isinstance(extra, dict) else ""
        names.append(path.rsplit(".", 1)[-1] or "extra")
    return names


def run_row(spec: SweepSpec, plan: RunPlan) -> dict[str, Any]:
    """One CSV row: the run's status, times, measurements and costs (what exists so far)."""
    status = read_status(plan)
    train = status.get("train") or {}
    version_dir = Path(train["version_dir"]) if train.get("version_dir") else None
    train_s = train.get("wall_s")
    evals = status.get("evaluations") or {}
    eval_s = sum(e.get("wall_s") or 0.0 for e in evals.values()) if evals else None
    error = status.get("error") or ""
    row: dict[str, Any] = {
        "variant": plan.variant,
        "seed": plan.seed,
        "status": status.get("status", "pending"),
        "objectives": "+".join(_objectives_of(version_dir)),
        "steps": plan.steps,
        "wall_s": status.get("wall_s"),
        "train_s": train_s,
        "train_s_per_step": train_s / plan.steps if train_s and train.get("status") == "done" else None,
        "eval_s": eval_s,
        "peak_rss_mb": train.get("peak_rss_mb"),
        "error": error.splitlines()[0] if error else "",
    }
    measured: dict[str, float] = {}
    for evaluation in spec.evaluate:
        if evaluation.kind == "fit":
            if train.get("status") == "done":
                measured.update(fit_metrics(evaluation, version_dir))
            continue
        entry = evals.get(evaluation.name) or {}
        if entry.get("status") != "done":
            continue
        try:
            results = json.loads(Path(entry["results"]).read_text())
        except (OSError, KeyError, json.JSONDecodeError):
            continue
        measured.update(flatten_task_metrics(evaluation, results.get("metrics") or {}))
    row.update(measured)
    row.update(cost_metrics(version_dir))
    return row


# -- aggregation -------------------------------------------------------------------------------------------------------
def lower_is_better(key: str) -> bool:
    """Losses, times, memory and other costs: the smaller the better; everything else: the larger."""
    name = key.lower()
    if "per_s" in name:
        return False
    return "loss" in name or name.startswith("cost/") or name in NUMERIC_FIXED or name.endswith(("_ms", "_mb"))


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def summarize(rows: list[dict[str, Any]], key: str, variants: list[str]) -> dict[str, tuple[float, float | None, int]]:
    """``variant -> (mean, sample std or None for one value, n)`` of column ``key`` over the runs that have it."""
    out = {}
    for variant in variants:
        values = _finite(row.get(key) for row in rows if row["variant"] == variant)
        if not values:
            continue
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        out[variant] = (mean, std, len(values))
    return out


def _decimals(values: list[float]) -> int:
    scale = max((abs(v) for v in values), default=0.0)
    return 0 if scale >= 100 else 1 if scale >= 10 else 2 if scale >= 1 else 3


def _cell(stats: tuple[float, float | None, int] | None, decimals: int, planned: int, delta: float | None) -> str:
    if stats is None:
        return "–"
    mean, std, n = stats
    text = f"{mean:.{decimals}f}" + (f" ± {std:.{decimals}f}" if std is not None else "")
    if n != planned:
        text += f" (n={n})"
    if delta is not None:
        text += f" ({delta:+.{decimals}f})"
    return text


def _table_cells(
    rows: list[dict[str, Any]], key: str, variants: list[str], reference: str, planned: int
) -> dict[str, str]:
    stats = summarize(rows, key, variants)
    if not stats:
        return dict.fromkeys(variants, "–")
    decimals = _decimals([s[0] for s in stats.values()])
    pick = min if lower_is_better(key) else max
    rounded = {round(s[0], decimals) for s in stats.values()}
    best = pick(s[0] for s in stats.values()) if len(rounded) > 1 else None  # a tie of every variant: no best
    cells = {}
    for variant in variants:
        entry = stats.get(variant)
        delta = entry[0] - stats[reference][0] if entry and variant != reference and reference in stats else None
        text = _cell(entry, decimals, planned, delta)
        if entry is not None and best is not None and round(entry[0], decimals) == round(best, decimals):
            text = f"**{text}**"
        cells[variant] = text
    return cells


def _headline(spec: SweepSpec, metrics: list[str]) -> list[str]:
    if spec.headline:
        return [key for key in spec.headline if key in metrics]
    chosen = [k for k in metrics if k.endswith("/r_mean") or (k.startswith("hardneg/") and k.endswith("/all"))]
    return chosen or metrics[:4]


def _cost_axis(rows: list[dict[str, Any]]) -> tuple[str, str]:
    if _finite(row.get("cost/step_ms") for row in rows):
        return "cost/step_ms", "ms per training step (objective_cost.json)"
    return "train_s_per_step", "s per step (training process wall time / steps)"


def _warm_start_line(spec: SweepSpec, warm_rows: list[dict[str, Any]]) -> list[str]:
    """results.md's statement of the warm-start stage (nothing without one)."""
    if spec.warm_start is None:
        return []
    trained = sorted({row["objectives"] for row in warm_rows if row.get("objectives")})
    if trained:
        objectives = " / ".join(f"`{names}`" for names in trained)
    else:  # not trained yet: the spec's toggles over the base config
        toggles = [f"{slot} {'off' if value is None else 'on'}" for slot, value in spec.warm_start.objectives.items()]
        objectives = f"`{', '.join(toggles)}` over the base config" if toggles else "the base config's"
    walls = _finite(row.get("train_s") for row in warm_rows if row["status"] == "done")
    done = len(walls)
    wall = f"mean wall time {sum(walls) / done / 60:.1f} min" if walls else "no warm start done yet"
    return [
        f"Warm start: each seed's variant runs start (`model.init_from`) from one shared run with objectives "
        f"{objectives} for {spec.warm_start.steps} optimizer steps ({wall}; {done}/{len(warm_rows)} done). Its rows "
        f"are in results.csv as variant `{WARM_START}`; the tables below compare the variants only, whose cost "
        "columns exclude it.",
        "",
    ]


def write_markdown(
    spec: SweepSpec,
    rows: list[dict[str, Any]],
    metrics: list[str],
    costs: list[str],
    path: Path,
    warm_rows: list[dict[str, Any]] | None = None,
) -> None:
    """``results.md`` from the variant ``rows`` (``warm_rows``: the warm-start runs, stated in one line)."""
    warm_rows = warm_rows or []
    variants = list(spec.variants)
    planned = len(spec.seeds)
    done = sum(row["status"] == "done" for row in rows)
    lines = [
        f"# Sweep `{spec.name}`" + (" (quick)" if spec.quick else ""),
        "",
        f"Spec `{spec.path}`; {spec.steps} optimizer steps per run; seeds {', '.join(map(str, spec.seeds))}; "
        f"{done}/{len(rows)} runs done; reference variant `{spec.reference}`.",
        "",
        *_warm_start_line(spec, warm_rows),
        "Cells: mean ± sample standard deviation over seeds (n= when fewer seeds have the value), then the "
        f"difference of the mean to `{spec.reference}` in parentheses; **bold**: the best variant of the row "
        "(lowest for losses, times and memory, highest otherwise). Recall in %, hard-negative accuracy as a fraction.",
        "",
    ]
    objectives = {row["variant"]: row["objectives"] for row in rows if row.get("objectives")}
    headline = _headline(spec, metrics)
    cost_key, cost_label = _cost_axis(rows)
    if headline:
        columns = [*headline, cost_key]
        cells = {key: _table_cells(rows, key, variants, spec.reference, planned) for key in columns}
        lines += ["## Headline", "", "| variant | objectives | " + " | ".join(f"`{c}`" for c in columns) + " |"]
        lines.append("|---|---|" + "---|" * len(columns))
        for variant in variants:
            shown = [cells[key][variant] for key in columns]
            lines.append(f"| {variant} | {objectives.get(variant, '')} | " + " | ".join(shown) + " |")
        lines += ["", f"`{cost_key}`: {cost_label}.", ""]
    for title, keys in (("All metrics", metrics), ("Cost", [*NUMERIC_FIXED, *costs])):
        keys = [k for k in keys if any(_finite([row.get(k)]) for row in rows)]
        if not keys:
            continue
        lines += [f"## {title}", "", "| | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
        for key in keys:
            cells = _table_cells(rows, key, variants, spec.reference, planned)
            lines.append(f"| `{key}` | " + " | ".join(cells[v] for v in variants) + " |")
        lines.append("")
    described = [v for v in spec.variants.values() if v.description]
    if described:
        lines += ["## Variants", ""] + [f"- `{v.name}`: {v.description}" for v in described] + [""]
    unfinished = [row for row in [*warm_rows, *rows] if row["status"] != "done"]
    if unfinished:
        lines += ["## Runs not done", "", "| variant | seed | status | error |", "|---|---|---|---|"]
        for row in unfinished:
            error = str(row.get("error") or "").replace("|", "\\|")
            lines.append(f"| {row['variant']} | {row['seed']} | {row['status']} | {error} |")
        lines.append("")
    path.write_text("\n".join(lines))


def write_csv(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


# -- plots ---------------------------------------------------------------------------------------------------------------
def _figure(count: int, width: float = 3.6, height: float = 3.0) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    cols = min(4, max(1, count))
    rows = math.ceil(count / cols)
    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel().tolist()
    for axis in axes[count:]:
        axis.set_visible(False)
    return figure, axes[:count]


def _metric_panel(axis: Any, rows: list[dict[str, Any]], key: str, variants: list[str]) -> None:
    for index, variant in enumerate(variants):
        values = _finite(row.get(key) for row in rows if row["variant"] == variant)
        if not values:
            continue
        mean = sum(values) / len(values)
        axis.bar(index, mean, width=0.6, color=f"C{index % 10}", alpha=0.35)
        offsets = [0.0] if len(values) == 1 else [0.2 * (i / (len(values) - 1) - 0.5) for i in range(len(values))]
        axis.scatter([index + o for o in offsets], values, color=f"C{index % 10}", s=18, zorder=3)
    axis.set_title(key, fontsize=8)
    axis.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=7)
    axis.tick_params(axis="y", labelsize=7)


def write_plots(
    spec: SweepSpec, rows: list[dict[str, Any]], metrics: list[str], costs: list[str], folder: Path
) -> list[Path]:
    """``<measurement>.png`` (each metric per variant: seed points over the mean bar), ``cost_vs_accuracy.png``
    (headline metrics against the cost per step, mean ± std per variant) and, with objective_cost.json,
    ``objective_cost.png`` (forward + backward time per objective)."""
    if folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    variants = list(spec.variants)
    written = []
    groups: dict[str, list[str]] = {}
    for key in metrics:
        groups.setdefault(key.split("/", 1)[0], []).append(key)
    for group, keys in groups.items():
        keys = [k for k in keys if _finite(row.get(k) for row in rows)]
        if not keys:
            continue
        figure, axes = _figure(len(keys))
        for axis, key in zip(axes, keys, strict=True):
            _metric_panel(axis, rows, key, variants)
        figure.suptitle(f"{spec.name}: {group} (bar: mean over seeds, points: seeds)", fontsize=10)
        written.append(folder / f"{group}.png")
        figure.savefig(written[-1], dpi=110)
    headline = [k for k in _headline(spec, metrics) if _finite(row.get(k) for row in rows)]
    cost_key, cost_label = _cost_axis(rows)
    if headline and _finite(row.get(cost_key) for row in rows):
        figure, axes = _figure(len(headline), width=4.2, height=3.4)
        for axis, key in zip(axes, headline, strict=True):
            for index, variant in enumerate(variants):
                mine = [r for r in rows if r["variant"] == variant]
                pairs = [(r.get(cost_key), r.get(key)) for r in mine]
                pairs = [(x, y) for x, y in pairs if _finite([x]) and _finite([y])]
                if not pairs:
                    continue
                xs, ys = zip(*pairs, strict=True)
                color = f"C{index % 10}"
                axis.scatter(xs, ys, color=color, alpha=0.35, s=14)
                x_stats, y_stats = summarize(mine, cost_key, [variant]), summarize(mine, key, [variant])
                (mx, sx, _), (my, sy, _) = x_stats[variant], y_stats[variant]
                axis.errorbar(mx, my, xerr=sx, yerr=sy, fmt="o", color=color, capsize=3, label=variant)
                axis.annotate(variant, (mx, my), textcoords="offset points", xytext=(4, 4), fontsize=7)
            axis.set_xlabel(cost_label, fontsize=7)
            axis.set_title(key, fontsize=8)
            axis.tick_params(labelsize=7)
        figure.suptitle(f"{spec.name}: accuracy against cost (mean ± std over seeds)", fontsize=10)
        written.append(folder / "cost_vs_accuracy.png")
        figure.savefig(written[-1], dpi=110)
    measured = {k.split("/")[1] for k in costs if k.endswith(("/forward_ms", "/backward_ms"))}
    if measured:
        from vlalign.sweep.spec import objective_slots

        order = ["shared", *objective_slots()]
        parts = [(p, phase) for p in sorted(measured, key=lambda p: (order.index(p) if p in order else len(order), p))
                 for phase in ("forward_ms", "backward_ms")]  # fmt: skip
        parts += [("other", None)] if "cost/other_ms" in costs else []
        figure, (axis,) = _figure(1, width=6.0, height=3.6)
        bottoms = [0.0] * len(variants)
        colours = {part: f"C{i % 10}" for i, part in enumerate(dict.fromkeys(p for p, _ in parts))}
        for part, phase in parts:
            key = f"cost/{part}/{phase}" if phase else "cost/other_ms"
            means = [summarize(rows, key, [v]).get(v, (0.0, None, 0))[0] for v in variants]
            label = f"{part} {phase.split('_')[0]}" if phase else "other"
            axis.bar(range(len(variants)), means, bottom=bottoms, color="0.7" if phase is None else colours[part],
                     hatch="//" if phase == "backward_ms" else "", label=label, alpha=0.8)  # fmt: skip
            bottoms = [b + m for b, m in zip(bottoms, means, strict=True)]
        axis.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=8)
        axis.set_ylabel("ms per step (mean over seeds)", fontsize=8)
        axis.legend(fontsize=6, ncols=2)
        figure.suptitle(f"{spec.name}: time per objective", fontsize=10)
        written.append(folder / "objective_cost.png")
        figure.savefig(written[-1], dpi=110)
    return written


# -- TensorBoard ---------------------------------------------------------------------------------------------------------
def write_tensorboard(
    spec: SweepSpec, rows: list[dict[str, Any]], metrics: list[str], columns: list[str], folder: Path
) -> Path:
    """One hparams entry per run with measurements, under ``folder/<variant>/seed<S>`` (rewritten on every
    collection): the variant, seed, steps and objectives as hyper-parameters, every measurement and cost as
    metrics."""
    from torch.utils.tensorboard import SummaryWriter

    from vlalign.sweep.spec import objective_slots

    if folder.is_dir():
        shutil.rmtree(folder)
    slots = objective_slots()
    for row in rows:
        if not any(_finite([row.get(k)]) for k in metrics):
            continue
        values = {k: float(row[k]) for k in columns if k not in ("seed", "steps") and _finite([row.get(k)])}
        enabled = set(str(row.get("objectives") or "").split("+"))
        hparams: dict[str, Any] = {"variant": row["variant"], "seed": int(row["seed"]), "steps": int(row["steps"])}
        hparams.update({f"objective/{slot}": slot in enabled for slot in slots})
        with SummaryWriter(log_dir=str(folder / row["variant"] / f"seed{row['seed']}")) as writer:
            writer.add_hparams(hparams, values, hparam_domain_discrete={"variant": list(spec.variants)}, run_name=".")
    return folder


# -- all of it -----------------------------------------------------------------------------------------------------------
def collect(spec: SweepSpec, plans: list[RunPlan], out: Path, tensorboard: bool = True) -> Collected:
    """Read every run of the sweep and write ``results.csv`` (warm starts included), ``results.md``, ``plots/`` and
    ``tensorboard/`` (the variants)."""
    rows = [run_row(spec, plan) for plan in plans]
    warm_rows = [row for row in rows if row["variant"] == WARM_START]
    variant_rows = [row for row in rows if row["variant"] != WARM_START]
    metrics: list[str] = []
    costs: list[str] = []
    for row in rows:
        for key in row:
            if key in FIXED_COLUMNS:
                continue
            target = costs if key.startswith("cost/") else metrics
            if key not in target:
                target.append(key)
    order = {e.name: i for i, e in enumerate(spec.evaluate)}
    metrics.sort(key=lambda k: order.get(k.split("/", 1)[0], len(order)))  # measurement order, stable within
    columns = [*FIXED_COLUMNS, *metrics, *costs]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, columns, out / "results.csv")
    write_markdown(spec, variant_rows, metrics, costs, out / "results.md", warm_rows)
    plots = write_plots(spec, variant_rows, metrics, costs, out / "plots")
    board = write_tensorboard(spec, variant_rows, metrics, columns, out / "tensorboard") if tensorboard else None
    return Collected(rows, metrics, costs, out / "results.csv", out / "results.md", plots, board)
