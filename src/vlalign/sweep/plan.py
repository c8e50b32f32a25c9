"""From a spec to runs: each run's folder, its ``vlalign fit`` and ``vlalign evaluate`` command lines, fingerprints
that tell a finished run from a changed one, the synthetic data, and the dry parse of every variant's config.

A run is ``OUT/runs/<variant>/seed<S>``; its training writes under ``train/`` (the TensorBoard logger's
``save_dir``: ``train/<logger name>/version_N`` with checkpoints, config.yaml and objective_cost.json) and each
evaluation under ``eval/<name>/``. The fingerprint covers what decides the trained weights (the fit command with the
sweep folder written as ``<out>``, the content of every config file it reads, the environment, the synthetic data
settings, and the warm start's fingerprint when the run starts from one); an evaluation's covers its command, its
config file and the run's fingerprint.

With a ``warm_start:`` the plan begins with one warm-start run per seed (``OUT/runs/_warm_start/seed<S>``, no
evaluations); each variant run of that seed names it in :attr:`RunPlan.warm_start` and is started with
``--model.init_from`` its final ``last.ckpt``, whose path is known once it is trained (:meth:`RunPlan.fit_command`).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlalign.errors import ConfigError
from vlalign.sweep.spec import INIT_FROM, WARM_START, Evaluation, SweepSpec, Variant

__all__ = [
    "EvalPlan",
    "RunPlan",
    "build_plan",
    "check_configs",
    "data_paths",
    "prepare_data",
    "synth_settings",
]

SYNTH_MARKER = "synth.json"  # written into OUT/data after the synthetic data is complete: its settings


@dataclass(frozen=True)
class EvalPlan:
    """One evaluation of a run: ``args`` is the ``vlalign evaluate`` command line without ``--model`` (the run's
    final checkpoint, known once it is trained)."""

    name: str
    kind: str
    out_dir: Path
    args: tuple[str, ...]
    fingerprint: str


@dataclass(frozen=True)
class RunPlan:
    """One training run (a variant and a seed) and its evaluations; ``warm_start``: the run whose final weights this
    one starts from (``--model.init_from``), or None."""

    variant: str
    seed: int
    steps: int
    out: Path
    run_dir: Path
    fit_args: tuple[str, ...]
    evaluations: tuple[EvalPlan, ...]
    env: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    warm_start: RunPlan | None = None

    @property
    def label(self) -> str:
        return f"{'warm start' if self.is_warm_start else self.variant} seed {self.seed}"

    @property
    def is_warm_start(self) -> bool:
        return self.variant == WARM_START

    @property
    def train_dir(self) -> Path:
        return self.run_dir / "train"

    @property
    def status_file(self) -> Path:
        return self.run_dir / "status.json"

    def fit_command(self, resume: bool = False, init_from: str | Path | None = None) -> list[str]:
        """``python -m vlalign fit ...`` (``--model.init_from`` the warm start's checkpoint when the run has one,
        ``--ckpt_path last`` to continue an interrupted run)."""
        if self.warm_start is not None and init_from is None:
            raise ValueError(f"{self.label} starts from a warm start: give its checkpoint as init_from")
        init = [f"--{INIT_FROM}", str(init_from)] if init_from is not None else []
        return [sys.executable, "-m", "vlalign", *self.fit_args, *init, *(["--ckpt_path", "last"] if resume else [])]

    def eval_command(self, evaluation: EvalPlan, checkpoint: str | Path) -> list[str]:
        return [sys.executable, "-m", "vlalign", *evaluation.args, "--model", str(checkpoint)]


# -- data --------------------------------------------------------------------------------------------------------------
def synth_settings(spec: SweepSpec) -> dict[str, Any] | None:
    """The full ``write_synthetic`` settings of the spec's synthetic data (defaults filled in), or None."""
    if spec.data.synth is None:
        return None
    import inspect

    from vlalign.data.synth import write_synthetic

    defaults = {
        name: p.default
        for name, p in inspect.signature(write_synthetic).parameters.items()
        if name not in ("out", "progress") and p.default is not inspect.Parameter.empty
    }
    return {**defaults, **spec.data.synth}


def data_paths(spec: SweepSpec, out: Path) -> dict[str, str]:
    """The data files every run and evaluation uses (``DATA_PATH_KEYS``): the synthetic data's under ``OUT/data``
    (computed, not read: they need not exist yet), or the spec's explicit paths."""
    settings = synth_settings(spec)
    if settings is None:
        return dict(spec.data.paths)
    root = out / "data"
    shards = max(1, math.ceil(settings["num_train"] / settings["samples_per_shard"]))
    train = root / "shards" / "train"
    pattern = train / "000000.tar" if shards == 1 else train / f"{{000000..{shards - 1:06d}}}.tar"
    paths = {"tokenizer": root / "tokenizer", "train_shards": pattern}
    for split in ("val", "test"):
        paths[f"{split}_retrieval"] = root / f"retrieval_{split}.json"
        paths[f"hardneg_{split}"] = root / f"hardneg_{split}.json"
    return {key: str(value) for key, value in paths.items()}


def synth_ready(spec: SweepSpec, out: Path) -> bool:
    """The synthetic data of ``spec`` is complete under ``OUT/data`` (its marker holds the same settings)."""
    marker = out / "data" / SYNTH_MARKER
    settings = synth_settings(spec)
    if settings is None or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == settings
    except (OSError, json.JSONDecodeError):
        return False


def prepare_data(spec: SweepSpec, out: Path, progress: bool = True) -> None:
    """Write the spec's synthetic data into ``OUT/data`` unless it is there with the same settings."""
    settings = synth_settings(spec)
    if settings is None or synth_ready(spec, out):
        return
    from vlalign.data.synth import write_synthetic

    root = out / "data"
    marker = root / SYNTH_MARKER
    marker.unlink(missing_ok=True)
    write_synthetic(root, progress=progress, **settings)
    marker.write_text(json.dumps(settings, indent=2))


# -- commands ------------------------------------------------------------------------------------------------------------
def _objectives_overlay(variant: Variant) -> list[str]:
    """The variant's objective toggles as one inline config (merged over the base like an overlay file)."""
    if not variant.objectives:
        return []
    return ["--config", json.dumps({"model": variant.objectives}, sort_keys=True)]


def _pairs(overrides: tuple[tuple[str, str], ...]) -> list[str]:
    return [arg for key, value in overrides for arg in (f"--{key}", value)]


def _fit_args(
    spec: SweepSpec, variant: Variant, seed: int, steps: int, run_dir: Path, data: dict[str, str]
) -> list[str]:
    args = ["fit"]
    for path in (*spec.base, *variant.overlays):
        args += ["--config", str(path)]
    args += _objectives_overlay(variant)
    for key in ("tokenizer", "train_shards", "val_retrieval", "test_retrieval"):
        if key in data:
            args += [f"--data.init_args.{key}", data[key]]
    args += ["--trainer.enable_progress_bar", "false"]  # the log is a file; the sweep shows the progress
    args += _pairs(spec.overrides) + _pairs(variant.overrides)
    args += [
        "--seed_everything", str(seed),
        "--data.init_args.seed", str(seed),
        "--trainer.max_steps", str(steps),  # the LR schedule follows: it spans max_steps
        "--trainer.max_epochs", "-1",  # the step count alone ends training, never an epoch count or the clock
        "--trainer.max_time", "null",
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger.init_args.save_dir", str(run_dir / "train"),
    ]  # fmt: skip
    return args


def _eval_data_args(evaluation: Evaluation, data: dict[str, str]) -> tuple[list[str], str]:
    """Data-path arguments the sweep adds for the built-in evaluation tasks, and the split to ask the task for."""
    split = evaluation.split
    if evaluation.kind == "retrieval":
        args = ["--data.train_files", "[]"]  # zero-shot: nothing is trained
        for key, option in (("val_retrieval", "--data.val_file"), ("test_retrieval", "--data.test_file")):
            if key in data:
                args += [option, data[key]]
        return args, split
    if evaluation.kind == "hardneg":  # the file is the split: hardneg_val.json or hardneg_test.json, tested
        key = f"hardneg_{split}"
        return (["--data.json_file", data[key]] if key in data else []), "test"
    return [], split


def _eval_args(evaluation: Evaluation, run_dir: Path, data: dict[str, str]) -> list[str]:
    folder = run_dir / "eval" / evaluation.name
    data_args, split = _eval_data_args(evaluation, data)
    args = ["evaluate", evaluation.kind, "--config", str(evaluation.config), "--split", split, "--out", str(folder)]
    args += data_args + ["--trainer.enable_progress_bar", "false"] + _pairs(evaluation.overrides)
    args += ["--trainer.default_root_dir", str(folder), "--trainer.logger.init_args.save_dir", str(folder / "tb")]
    return args


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return "missing"


def _relative(args: list[str], out: Path) -> list[str]:
    root = str(out)
    return [arg.replace(root, "<out>") for arg in args]


def build_plan(spec: SweepSpec, out: Path) -> list[RunPlan]:
    """Every run of the sweep with its commands and fingerprints: the warm-start runs (one per seed) first, then the
    variants in spec order, each over the seeds."""
    out = Path(out).expanduser().resolve()
    data = data_paths(spec, out)
    synth = synth_settings(spec)
    warm: dict[int, RunPlan] = {}
    if spec.warm_start is not None:
        variant = spec.warm_start.as_variant()
        configs = {str(p): _file_digest(p) for p in (*spec.base, *variant.overlays)}
        for seed in spec.seeds:
            run_dir = out / "runs" / WARM_START / f"seed{seed}"
            fit_args = _fit_args(spec, variant, seed, spec.warm_start.steps, run_dir, data)
            fingerprint = _digest(
                {"fit": _relative(fit_args, out), "configs": configs, "env": spec.env, "synth": synth}
            )
            warm[seed] = RunPlan(
                variant=WARM_START,
                seed=seed,
                steps=spec.warm_start.steps,
                out=out,
                run_dir=run_dir,
                fit_args=tuple(fit_args),
                evaluations=(),
                env=dict(spec.env),
                fingerprint=fingerprint,
            )
    plans = list(warm.values())
    for variant in spec.variants.values():
        configs = {str(p): _file_digest(p) for p in (*spec.base, *variant.overlays)}
        for seed in spec.seeds:
            run_dir = out / "runs" / variant.name / f"seed{seed}"
            fit_args = _fit_args(spec, variant, seed, spec.steps, run_dir, data)
            start = warm.get(seed)
            fingerprint = _digest(
                {"fit": _relative(fit_args, out), "configs": configs, "env": spec.env, "synth": synth}
                | ({"warm_start": start.fingerprint} if start is not None else {})
            )
            evaluations = []
            for evaluation in spec.evaluate:
                if evaluation.kind == "fit":
                    continue
                args = _eval_args(evaluation, run_dir, data)
                eval_fp = _digest(
                    {"args": _relative(args, out), "config": _file_digest(evaluation.config), "run": fingerprint}
                )
                evaluations.append(
                    EvalPlan(evaluation.name, evaluation.kind, run_dir / "eval" / evaluation.name, tuple(args), eval_fp)
                )
            plans.append(
                RunPlan(
                    variant=variant.name,
                    seed=seed,
                    steps=spec.steps,
                    out=out,
                    run_dir=run_dir,
                    fit_args=tuple(fit_args),
                    evaluations=tuple(evaluations),
                    env=dict(spec.env),
                    fingerprint=fingerprint,
                    warm_start=start,
                )
            )
    return plans


# -- the dry parse -------------------------------------------------------------------------------------------------------
def check_configs(spec: SweepSpec, plans: list[RunPlan], out: Path) -> dict[str, list[str]]:
    """Parse every variant's ``vlalign fit`` command line (first seed; the warm start's too) and every evaluation
    command line with the real CLIs, building nothing: unknown keys, wrong types and the training config checks fail
    here, each naming the variant. Returns ``variant -> enabled objectives``.

    While the sweep's synthetic data is not written yet, the tokenizer check is left to the run. A variant's
    ``--model.init_from`` (its warm start's checkpoint) is not part of the parse: that file exists once the warm start
    has run, and whether it fits is checked when the variant's model is built.

    Raises:
        ConfigError: every variant's problems together.
    """
    from argparse import ArgumentError

    from vlalign.errors import UserError

    skip_tokenizer = spec.data.synth is not None and not synth_ready(spec, Path(out))
    enabled: dict[str, list[str]] = {}
    errors: list[str] = []
    seen: set[str] = set()
    for plan in plans:
        if plan.variant in seen:
            continue
        seen.add(plan.variant)
        try:
            enabled[plan.variant] = _dry_parse_fit(list(plan.fit_args), skip_tokenizer)
        except (ArgumentError, UserError) as err:
            errors.append(f"{_what(plan)}: {_indent(str(err))}")
        except SystemExit as err:  # jsonargparse's own exit on a malformed command line
            errors.append(f"{_what(plan)}: the training CLI refused its command line (exit {err.code})")
        if plan is next((p for p in plans if p.evaluations), None):
            for evaluation in plan.evaluations:
                try:
                    _dry_parse_eval(evaluation)
                except (ArgumentError, UserError) as err:
                    errors.append(f"evaluate {evaluation.name!r}: {_indent(str(err))}")
    if errors:
        listing = "\n".join(f"  - {error}" for error in errors)
        raise ConfigError(f"sweep {spec.path}: {len(errors)} run configuration(s) do not parse:\n{listing}")
    return enabled


def _what(plan: RunPlan) -> str:
    return "warm_start" if plan.is_warm_start else f"variant {plan.variant!r}"


def _indent(text: str) -> str:
    return text.strip().replace("\n", "\n    ")


def _dry_parse_fit(args: list[str], skip_tokenizer: bool) -> list[str]:
    from lightning.pytorch import LightningDataModule

    from vlalign.cli.config_checks import check_config, configured_objectives
    from vlalign.cli.train import VlalignCLI
    from vlalign.tasks.pretrain import PretrainRecipe

    class DryFit(VlalignCLI):
        """The training CLI up to the checked config: no seeding, no model, data module or trainer is built."""

        def init_parser(self, **kwargs: Any) -> Any:
            return super().init_parser(**kwargs, exit_on_error=False)  # raise ArgumentError, do not exit

        def _set_seed(self) -> None:
            pass

        def check(self, config: Any, subcommand: str) -> None:
            if skip_tokenizer:
                config = config.clone()
                data = config.get("data")
                if data is not None and data.get("init_args") is not None:
                    data.init_args.tokenizer = None
            check_config(config, subcommand)

        def instantiate_classes(self) -> None:
            pass

        def _run_subcommand(self, subcommand: str | None) -> None:
            pass

    cli = DryFit(
        PretrainRecipe,
        LightningDataModule,
        subclass_mode_data=True,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )
    return list(configured_objectives(cli.config["fit"].model))


def _dry_parse_eval(evaluation: EvalPlan) -> None:
    from vlalign.cli.tasks import SPLITS, TaskCLI, expand_base_configs
    from vlalign.tasks.registry import get_task

    task = get_task(evaluation.kind)
    args = list(evaluation.args[2:])
    split, rest = "test", []
    i = 0
    while i < len(args):  # --split and --out belong to `vlalign evaluate`, not to the task's CLI
        if args[i] in ("--split", "--out"):
            split = args[i + 1] if args[i] == "--split" else split
            i += 2
            continue
        rest.append(args[i])
        i += 1

    class DryTask(TaskCLI):
        """The task CLI's parse only: its file checks (the model is not trained yet) run with the evaluation."""

        def init_parser(self, **kwargs: Any) -> Any:
            return super().init_parser(**kwargs, exit_on_error=False)

        def _set_seed(self) -> None:
            pass

        def check(self, config: Any, subcommand: str) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

        def _run_subcommand(self, subcommand: str | None) -> None:
            pass

    stand_in = str(evaluation.out_dir / "model.ckpt")
    DryTask(task, [SPLITS[split], *expand_base_configs(rest), "--model.init_from", stand_in], command="evaluate")
