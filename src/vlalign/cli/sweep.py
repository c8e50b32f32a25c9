"""``vlalign sweep``: train the variants of a sweep spec over its seeds, measure every run, write one table.

    vlalign sweep --config configs/sweeps/toy_ablation.yaml [--quick] [--out DIR] [--only VARIANT ...]
                  [--dry_run] [--launcher local|slurm] [--no_wait] [--collect]

The spec is checked whole first (its format, then every variant's full `vlalign fit` command line through the
training CLI); nothing runs when anything is wrong. Runs execute one after another, each in its own process and
folder (OUT/runs/<variant>/seed<S>; a spec with warm_start: first trains one shared warm-start run per seed in
OUT/runs/_warm_start/seed<S>, from whose last.ckpt that seed's variants start); a finished run is skipped when the sweep runs again, a failed one is recorded
and the others go on, and Ctrl-C leaves the sweep resumable (run the same command again). `--launcher slurm`
submits the runs that are not done as one submitit job array with the spec's `slurm:` settings (same folders;
warm starts as a first array the variants' array depends on) and follows the jobs (`--no_wait`: submit and return; `--collect` later). Results: OUT/results.csv, OUT/results.md,
OUT/plots/*.png, OUT/tensorboard (hparams view). The spec format: `python -c "import vlalign.sweep; help(vlalign.sweep)"`
or the README section "Ablation sweeps".

Exit status: 0 when every selected run is done, 1 when some failed, 2 for a spec or configuration mistake, 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlalign.errors import ConfigError

__all__ = ["sweep_command"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlalign sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, type=Path, help="the sweep spec (YAML)")
    parser.add_argument("--out", type=Path, default=None, help="sweep folder (default: sweeps/<name>[_quick])")
    parser.add_argument("--quick", action="store_true", help="merge the spec's quick: section (fewer steps / seeds)")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="check the spec, print the runs, exit")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local", help="where the runs execute")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", default=None, help="run only these variants")
    parser.add_argument("--collect", action="store_true", help="run nothing: (re)write the results from the folder")
    parser.add_argument("--no_wait", "--no-wait", action="store_true", help="slurm: submit and return")
    return parser


def sweep_command(argv: list[str]) -> int:
    """Entry point of ``vlalign sweep`` (see the module docstring); returns the exit status."""
    from vlalign.sweep.plan import build_plan
    from vlalign.sweep.spec import load_spec

    args = _parser().parse_args(argv)
    spec = load_spec(args.config, quick=args.quick)
    only = args.only or list(spec.variants)
    unknown = [name for name in only if name not in spec.variants]
    if unknown:
        raise ConfigError(
            f"--only: no variant {', '.join(map(repr, unknown))}; the variants are: {', '.join(spec.variants)}"
        )
    out = (args.out or spec.default_out()).expanduser().resolve()
    plans = build_plan(spec, out)
    selected = [plan for plan in plans if plan.variant in only or plan.is_warm_start]  # warm starts: every variant's
    if args.collect:
        return _collect(spec, plans, selected, out)
    from vlalign.sweep.plan import check_configs

    check_configs(spec, selected, out)
    if args.dry_run:
        _print_plan(spec, selected, out)
        return 0
    return _run(spec, plans, selected, out, args.launcher, wait=not args.no_wait)


def _warm_count(plans) -> str:  # noqa: ANN001 - list[RunPlan]
    count = sum(plan.is_warm_start for plan in plans)
    return f" ({count} warm start{'s' * (count != 1)})" if count else ""


def _print_plan(spec, selected, out: Path) -> None:  # noqa: ANN001 - SweepSpec, list[RunPlan]
    from vlalign.sweep.launchers import pending_runs
    from vlalign.sweep.runner import find_last_checkpoint, read_status, show_command, warm_start_checkpoint

    todo, done, live = pending_runs(selected)
    print(f"sweep {spec.name}: {len(selected)} runs{_warm_count(selected)} in {out} ({len(done)} done, "
          f"{len(live)} in live jobs, {len(todo)} to run); {spec.steps} steps each")  # fmt: skip
    if spec.warm_start is not None:
        print(f"warm start: {spec.warm_start.steps} steps per seed; each variant starts from its seed's last.ckpt")
    if spec.data.synth is not None:
        print(f"data: vlalign data synth into {out / 'data'} with {json.dumps(spec.data.synth)}")
    for plan in selected:
        state = "done" if plan in done else "in a live job" if plan in live else read_status(plan).get("status")
        print(f"\n# {plan.label} [{state}]  {plan.run_dir}")
        resume = plan in todo and find_last_checkpoint(plan) is not None
        init_from = None
        if plan.warm_start is not None:
            init_from = warm_start_checkpoint(plan)[0] or f"<{plan.warm_start.label} last.ckpt>"
        print(show_command(plan.fit_command(resume=resume, init_from=init_from)))
        for evaluation in plan.evaluations:
            print(show_command(plan.eval_command(evaluation, "<last.ckpt>")))


def _run(spec, plans, selected, out: Path, launcher: str, wait: bool) -> int:  # noqa: ANN001
    import yaml

    from vlalign.sweep.launchers import pending_runs, run_local, submit_slurm, sweep_lock
    from vlalign.sweep.plan import prepare_data

    with sweep_lock(out):
        todo, done, live = pending_runs(selected)
        print(f"sweep {spec.name}: {len(selected)} runs{_warm_count(selected)} in {out}: {len(done)} done, "
              f"{len(todo)} to run"
              + (f", {len(live)} still in SLURM jobs" if live else ""))  # fmt: skip
        record = {"spec": spec.raw, "spec_file": str(spec.path), "quick": spec.quick, "launcher": launcher}
        (out / "sweep.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
        prepare_data(spec, out)
        try:
            if launcher == "local":
                run_local(todo)
            else:
                submit_slurm(todo, spec.slurm, spec.name, out, wait=wait)
                if not wait:
                    print(
                        f"submitted; when the jobs are done: vlalign sweep --config {spec.path} --out {out} --collect"
                    )
                    return 0
        except KeyboardInterrupt:
            if launcher == "local":
                print(f"\ninterrupted: finished runs are kept; run the same command again to resume ({out})")
            else:
                print(f"\nstopped following the jobs (they keep running); later: vlalign sweep --config {spec.path} "
                      f"--out {out} --collect")  # fmt: skip
            return 130
    return _collect(spec, plans, selected, out)


def _collect(spec, plans, selected, out: Path) -> int:  # noqa: ANN001
    from vlalign.sweep.results import collect
    from vlalign.sweep.runner import read_status

    collected = collect(spec, plans, out)
    print(f"\nresults: {collected.markdown}\n         {collected.csv}")
    for plot in collected.plots:
        print(f"plot:    {plot}")
    if collected.tensorboard is not None:
        print(f"TensorBoard: tensorboard --logdir {collected.tensorboard}")
    states = {plan.label: read_status(plan).get("status", "pending") for plan in selected}
    failed = [label for label, state in states.items() if state != "done"]
    if failed:
        print(f"not done: {', '.join(f'{label} ({states[label]})' for label in failed)}")
        return 1
    return 0
