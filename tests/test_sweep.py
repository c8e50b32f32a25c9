"""`vlalign sweep`: the spec checks, the dry run, a two-variant one-step sweep on tiny models (results.csv,
results.md, plots, TensorBoard hparams; a second invocation skips the finished runs), interrupt and resume of one run,
the metric flattening and table maths, and the submitit job array on submitit's local executor (a failing run
recorded while the other finishes)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlalign.cli.main import main
from vlalign.errors import ConfigError
from vlalign.sweep import runner
from vlalign.sweep.launchers import pending_runs
from vlalign.sweep.plan import RunPlan, build_plan, data_paths
from vlalign.sweep.results import flatten_task_metrics, lower_is_better, summarize
from vlalign.sweep.spec import Evaluation, load_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PNG = b"\x89PNG\r\n\x1a\n"
TINY_OVERRIDES = {  # tiny and quick: 2 stream layers, batches of 8, no worker processes, a train log every step
    "data.init_args.batch_size": 8,
    "data.init_args.eval_batch_size": 8,
    "data.init_args.num_workers": 0,
    "data.init_args.shuffle_buffer": 16,
    "model.stream.num_layers": 2,
    "trainer.log_every_n_steps": 1,
}
RETRIEVAL = {"retrieval": {"config": str(CONFIGS / "finetune" / "retrieval_tiny.yaml"),
                           "overrides": {"data.num_workers": 0, "data.eval_batch_size": 16}}}  # fmt: skip


def data_section(synth_data: Path) -> dict[str, str]:
    return {
        "tokenizer": str(synth_data / "tokenizer"),
        "train_shards": str(synth_data / "shards" / "train" / "{000000..000001}.tar"),
        "val_retrieval": str(synth_data / "retrieval_val.json"),
        "test_retrieval": str(synth_data / "retrieval_test.json"),
        "hardneg_test": str(synth_data / "hardneg_test.json"),
    }


def write_spec(path: Path, **sections: Any) -> Path:
    spec = {"base": str(CONFIGS / "pretrain" / "tiny.yaml"), "seeds": [0], "steps": 1, "overrides": TINY_OVERRIDES}
    spec.update(sections)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class Recorder:
    """Stands in for runner.run_process: records every command, then runs it."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []
        self.real = runner.run_process

    def __call__(self, command: list[str], log: Path, env: dict[str, str]) -> runner.ProcessResult:
        self.commands.append(list(command))
        return self.real(command, log, env)


# -- the spec ------------------------------------------------------------------------------------------------------------
def test_unknown_objective_fails_listing_the_registered_ones(
    synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path / "spec.yaml", data=data_section(synth_data),
                      variants={"a": {"objectives": {"itcc": "on", "psl": "off"}}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"variants\.a\.objectives\.itcc: unknown objective \(did you mean 'itc'\?\)"):
        load_spec(spec)
    out = tmp_path / "out"
    assert main(["sweep", "--config", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid sweep spec") and "the objectives are: itc, itm, xmm, psl" in err
    assert "Traceback" not in err and not out.exists(), "nothing runs"


def test_spec_reports_every_mistake_with_its_key(tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path / "spec.yaml",
        seeds=[0, 0],
        steps=0,
        reference="nope",
        evaluate=[{"retreival": {}}, {"fit": {"average_last": 0}}],
        variants={
            "a": {"overlays": ["no_pls"], "overrides": ["--trainer.max_steps 5"], "objectivs": {}},
            "bad name": {},
        },
        colour="red",
    )
    with pytest.raises(ConfigError) as caught:
        load_spec(spec)
    message = str(caught.value)
    for expected in (
        "colour: unknown key",
        "seeds: seeds repeat",
        "steps: expected the number of optimizer steps",
        "reference: 'nope' is not a variant",
        "evaluate[0]: unknown measurement 'retreival' (did you mean 'retrieval'?)",
        "evaluate[1].fit.average_last: expected an integer >= 1",
        "variants.a.overlays[0]: no overlay named 'no_pls' in configs/ablations/ (did you mean 'no_psl'?)",
        "variants.a.overrides: --trainer.max_steps is set by the sweep",
        "variants.a.objectivs: unknown key (did you mean 'objectives'?)",
        "variants.bad name: a variant name is a folder name",
    ):
        assert expected in message, expected
    assert "(10 problems)" in message


def test_overrides_in_every_form_become_the_same_arguments(synth_data: Path, tmp_path: Path) -> None:
    forms = {
        "a": {"overrides": ["--model.itc.queue_size 64", "--model.momentum=0.9", "--model.optim.lr", "0.001"]},
        "b": {"overrides": {"--model.itc.queue_size": 64, "model.momentum": 0.9, "model.optim.lr": 0.001}},
    }
    spec = load_spec(write_spec(tmp_path / "spec.yaml", data=data_section(synth_data), variants=forms))
    assert spec.variants["a"].overrides == spec.variants["b"].overrides == (
        ("model.itc.queue_size", "64"), ("model.momentum", "0.9"), ("model.optim.lr", "0.001"))  # fmt: skip
    a, b = build_plan(spec, tmp_path / "out")
    assert [arg.replace("/runs/a/", "/runs/b/") for arg in a.fit_args] == list(b.fit_args)  # only the folder differs
    assert a.fit_args[a.fit_args.index("--model.momentum") + 1] == "0.9"


def test_quick_section_merges_over_the_spec(tmp_path: Path) -> None:
    spec_file = write_spec(
        tmp_path / "spec.yaml",
        seeds=[0, 1, 2],
        steps=40,
        data={"synth": {"num_train": 100, "num_val": 10, "num_test": 10, "samples_per_shard": 30}},
        quick={"steps": 4, "seeds": [7], "data": {"synth": {"num_train": 20}}},
        variants={"a": None},
    )
    full, quick = load_spec(spec_file), load_spec(spec_file, quick=True)
    assert (full.steps, full.seeds, quick.steps, quick.seeds) == (40, (0, 1, 2), 4, (7,))
    assert quick.data.synth == {"num_train": 20, "num_val": 10, "num_test": 10, "samples_per_shard": 30}
    assert full.default_out() == Path("sweeps/spec") and quick.default_out() == Path("sweeps/spec_quick")
    # the synthetic shards are computed, not read: 100 / 30 -> 4 shards, 20 / 30 -> 1
    assert data_paths(full, tmp_path)["train_shards"].endswith("train/{000000..000003}.tar")
    assert data_paths(quick, tmp_path)["train_shards"].endswith("train/000000.tar")
    (plan,) = build_plan(quick, tmp_path / "out")
    assert plan.run_dir == (tmp_path / "out" / "runs" / "a" / "seed7").resolve()
    assert plan.fit_args[plan.fit_args.index("--trainer.max_steps") + 1] == "4"


def test_unknown_override_key_fails_naming_it_before_anything_runs(
    synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path / "spec.yaml", data=data_section(synth_data),
                      variants={"fine": None, "typo": {"overrides": ["--model.itc.queue_sise 64"]}})  # fmt: skip
    out = tmp_path / "out"
    assert main(["sweep", "--config", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sweep") and "variant 'typo'" in err and "queue_sise" in err
    assert "variant 'fine'" not in err and not out.exists()


def test_dry_run_prints_every_run_and_writes_nothing(
    synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path / "spec.yaml", seeds=[3, 4], data=data_section(synth_data),
                      variants={"itc_itm": None, "itc": {"objectives": {"itm": False}}},
                      evaluate=[{"fit": None}, RETRIEVAL, {"hardneg": None}])  # fmt: skip
    out = tmp_path / "out"
    assert main(["sweep", "--config", str(spec), "--out", str(out), "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert "4 runs" in printed and not out.exists()
    for variant in ("itc_itm", "itc"):
        for seed in (3, 4):
            assert f"# {variant} seed {seed} [pending]" in printed
            run_dir = out.resolve() / "runs" / variant / f"seed{seed}"
            (fit,) = [line for line in printed.splitlines() if line.startswith("vlalign fit") and str(run_dir) in line]
            assert f"--seed_everything {seed} " in fit and "--trainer.max_steps 1 " in fit
            assert ('--config \'{"model": {"itm": null}}\'' in fit) == (variant == "itc")
            for task in ("retrieval", "hardneg"):
                assert f"vlalign evaluate {task} " in printed and f"--out {run_dir}/eval/{task} " in printed
    assert printed.count("vlalign fit ") == 4 and printed.count("vlalign evaluate ") == 8
    assert main(["sweep", "--config", str(spec), "--out", str(out), "--dry_run", "--only", "itc"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("vlalign fit ") == 2 and "# itc seed 3" in printed and "itc_itm" not in printed


# -- a sweep end to end ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two variants, one seed, one step each: ITC + ITM (the reference) and ITC only; training metrics and zero-shot
    retrieval measured."""
    root = tmp_path_factory.mktemp("sweep")
    spec = write_spec(
        root / "spec.yaml",
        data=data_section(synth_data),
        variants={"itc_itm": {"description": "the tiny recipe as it is"}, "itc": {"objectives": {"itm": "off"}}},
        evaluate=[{"fit": {"tags": ["train/*_loss", "train/itc_*"]}}, RETRIEVAL],
    )
    out = root / "out"
    recorder = Recorder()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "run_process", recorder)
        code = main(["sweep", "--config", str(spec), "--out", str(out)])
    return {"spec": spec, "out": out, "code": code, "commands": recorder.commands}


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def test_sweep_runs_each_run_in_its_own_process_and_folder(finished: dict[str, Any]) -> None:
    out, commands = finished["out"], finished["commands"]
    assert finished["code"] == 0
    assert [c[:4] for c in commands] == [[sys.executable, "-m", "vlalign", verb] for verb in ["fit", "evaluate"] * 2]
    for variant in ("itc_itm", "itc"):
        status = json.loads((out / "runs" / variant / "seed0" / "status.json").read_text())
        assert status["status"] == "done" and status["train"]["step"] == 1 and status["attempts"] == 1
        checkpoint = Path(status["train"]["checkpoint"])
        assert checkpoint.is_file() and checkpoint.is_relative_to(out / "runs" / variant / "seed0" / "train")
        assert status["train"]["peak_rss_mb"] > 50 and status["train"]["wall_s"] > 0
        results = json.loads((out / "runs" / variant / "seed0" / "eval" / "retrieval" / "results.json").read_text())
        assert results["model"] == str(checkpoint) and results["command"] == "evaluate"


def test_results_csv_has_a_row_per_run_with_metrics_and_costs(finished: dict[str, Any]) -> None:
    rows = read_rows(finished["out"])
    assert [(row["variant"], row["seed"], row["status"]) for row in rows] == [("itc_itm", "0", "done"),
                                                                             ("itc", "0", "done")]  # fmt: skip
    both, itc = rows
    assert both["objectives"] == "itc+itm" and itc["objectives"] == "itc"
    for key in ("retrieval/itc/r_mean", "retrieval/itc/txt_r1", "fit/train/itc_loss", "train_s", "peak_rss_mb"):
        assert math.isfinite(float(both[key])) and math.isfinite(float(itc[key])), key
    assert 0 <= float(both["retrieval/itm/r_mean"]) <= 100 and itc["retrieval/itm/r_mean"] == ""  # no ITM head
    assert math.isfinite(float(both["fit/train/itm_loss"])) and itc["fit/train/itm_loss"] == ""
    status = json.loads((finished["out"] / "runs" / "itc" / "seed0" / "status.json").read_text())
    results = json.loads(Path(status["evaluations"]["retrieval"]["results"]).read_text())
    assert float(itc["retrieval/itc/r_mean"]) == pytest.approx(results["metrics"]["test/itc_r_mean"])
    assert float(itc["train_s_per_step"]) == pytest.approx(status["train"]["wall_s"])  # one step


def test_results_markdown_has_mean_best_and_delta_to_the_reference(finished: dict[str, Any]) -> None:
    text = (finished["out"] / "results.md").read_text()
    both, itc = read_rows(finished["out"])
    assert "## Headline" in text and "`retrieval/itc/r_mean`" in text and "reference variant `itc_itm`" in text
    (line,) = [row for row in text.splitlines() if row.startswith("| `retrieval/itc/r_mean` |")]
    cells = [cell.strip() for cell in line.strip("|").split("|")][1:]
    mean_both, mean_itc = float(both["retrieval/itc/r_mean"]), float(itc["retrieval/itc/r_mean"])
    assert cells[0].strip("*") == f"{mean_both:.1f}", "one seed: the mean, no std"
    assert cells[1].strip("*") == f"{mean_itc:.1f} ({mean_itc - mean_both:+.1f})", "delta to the reference"
    if round(mean_both, 1) == round(mean_itc, 1):
        assert not any(cell.startswith("**") for cell in cells), "a tie of every variant: nothing is the best"
    else:
        assert [cell.startswith("**") for cell in cells] == [mean_both > mean_itc, mean_itc > mean_both, False]
    (line,) = [row for row in text.splitlines() if row.startswith("| `retrieval/itm/r_mean` |")]
    assert line.endswith("| – |"), "no ITM head, no ITM re-ranking"
    assert "- `itc_itm`: the tiny recipe as it is" in text and "## Runs not done" not in text


def test_plots_and_tensorboard_hparams_are_written(finished: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = finished["out"]
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots == ["cost_vs_accuracy.png", "fit.png", "retrieval.png"]
    for name in plots:
        data = (out / "plots" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["itc", "itc_itm"]
    board = EventAccumulator(str(out / "tensorboard" / "itc" / "seed0"))
    board.Reload()
    assert board.PluginTagToContent("hparams"), "an hparams entry"
    assert "retrieval/itc/r_mean" in board.Tags()["scalars"]


def test_second_invocation_skips_finished_runs(finished: dict[str, Any]) -> None:
    out = finished["out"]
    runs = {v: out / "runs" / v / "seed0" for v in ("itc_itm", "itc")}
    before = {v: (d / "status.json").stat().st_mtime_ns for v, d in runs.items()}
    checkpoints = {v: sorted((p, p.stat().st_mtime_ns) for p in d.rglob("*.ckpt")) for v, d in runs.items()}
    recorder = Recorder()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "run_process", recorder)
        assert main(["sweep", "--config", str(finished["spec"]), "--out", str(out)]) == 0
    assert recorder.commands == [], "no process started"
    for variant, folder in runs.items():
        assert (folder / "status.json").stat().st_mtime_ns == before[variant]
        assert sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*.ckpt")) == checkpoints[variant]
    assert [row["status"] for row in read_rows(out)] == ["done", "done"]


# -- interrupt and resume -------------------------------------------------------------------------------------------------
def test_ctrl_c_stops_the_process_with_sigterm_and_reraises(tmp_path: Path) -> None:
    """The training process gets SIGTERM (it saves last.ckpt on it) and the interrupt reaches the caller."""
    ready, stopped = tmp_path / "ready", tmp_path / "stopped"
    child = (
        "import pathlib, signal, sys, time\n"
        f"def stop(*_):\n    pathlib.Path({str(stopped)!r}).write_text('SIGTERM'); sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"pathlib.Path({str(ready)!r}).write_text('ok')\n"
        "time.sleep(120)\n"
    )

    def interrupt() -> None:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    # Python's own SIGINT handler even when the test process inherited SIGINT ignored (a background `make test`)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=interrupt, daemon=True).start()
    start = time.time()
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.run_process([sys.executable, "-c", child], tmp_path / "log.txt", {})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped.read_text() == "SIGTERM" and time.time() - start < 60
    assert "=== " in (tmp_path / "log.txt").read_text(), "the command heads its log"


def test_interrupted_run_resumes_from_last_ckpt_and_a_changed_run_starts_over(
    finished: dict[str, Any], tmp_path: Path
) -> None:
    (source,) = (finished["out"] / "runs" / "itc" / "seed0" / "train").rglob("last.ckpt")  # holds step 1
    plan = RunPlan(variant="v", seed=0, steps=1, out=tmp_path, run_dir=tmp_path / "runs" / "v" / "seed0",
                   fit_args=("fit", "--config", "x.yaml"), evaluations=(), fingerprint="first")  # fmt: skip
    saved = plan.train_dir / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    commands: list[list[str]] = []

    def interrupted(command: list[str], log: Path, env: dict[str, str]) -> runner.ProcessResult:
        commands.append(command)
        saved.parent.mkdir(parents=True)
        shutil.copy(source, saved)  # what the training process does on SIGTERM
        raise KeyboardInterrupt

    def succeeds(command: list[str], log: Path, env: dict[str, str]) -> runner.ProcessResult:
        commands.append(command)
        return runner.ProcessResult(0, 2.0, 100.0)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "run_process", interrupted)
        with pytest.raises(KeyboardInterrupt):
            runner.execute_run(plan, echo=lambda text: None)
        status = runner.read_status(plan)
        assert status["status"] == "interrupted" and status["train"]["status"] == "interrupted"
        patch.setattr(runner, "run_process", succeeds)
        assert runner.execute_run(plan, echo=lambda text: None) == "done"
    assert "--ckpt_path" not in commands[0] and commands[1][-2:] == ["--ckpt_path", "last"]
    status = runner.read_status(plan)
    assert status["attempts"] == 2 and status["train"]["resumed"] and status["train"]["checkpoint"] == str(saved)
    assert runner.execute_run(plan, echo=lambda text: None) == "done" and len(commands) == 2, "done: skipped"
    changed = RunPlan(**{**plan.__dict__, "fingerprint": "second"})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "run_process", succeeds)
        assert runner.execute_run(changed, echo=lambda text: None) == "failed"
    assert "--ckpt_path" not in commands[2] and not saved.exists(), "the old training was removed, not resumed"
    assert "no last.ckpt" in runner.read_status(changed)["error"]


# -- the table maths --------------------------------------------------------------------------------------------------------
def test_task_metrics_flatten_to_measurement_scorer_and_metric() -> None:
    retrieval = Evaluation("retrieval", "retrieval")
    metrics = {"test/itc_r_mean": 31.5, "test/itm_txt_r1": 6.25, "test/r_mean": 32.0, "test/other": "x"}
    assert flatten_task_metrics(retrieval, metrics) == {"retrieval/itc/r_mean": 31.5, "retrieval/itm/txt_r1": 6.25}
    hardneg = Evaluation("hn_val", "hardneg", metrics=("*/itm/*",))
    metrics = {"test/hardneg_itm_acc": 0.4, "test/hardneg_itm_acc/relation_swap": 0.5,
               "test/hardneg_itc_acc": 0.6, "test/hardneg_count/relation_swap": 12.0}  # fmt: skip
    assert flatten_task_metrics(hardneg, metrics) == {"hn_val/itm/all": 0.4, "hn_val/itm/relation_swap": 0.5}


def test_mean_and_sample_std_over_seeds_by_hand() -> None:
    rows = [{"variant": "a", "m": 1.0}, {"variant": "a", "m": 2.0}, {"variant": "a", "m": 6.0},
            {"variant": "b", "m": 4.0}, {"variant": "b", "m": float("nan")}, {"variant": "c", "m": None}]  # fmt: skip
    stats = summarize(rows, "m", ["a", "b", "c"])
    # a: mean 3, squared deviations 4 + 1 + 9 = 14 over n - 1 = 2 -> std sqrt(7)
    assert stats["a"] == (pytest.approx(3.0), pytest.approx(math.sqrt(7.0)), 3)
    assert stats["b"] == (4.0, None, 1) and "c" not in stats
    assert lower_is_better("fit/train/itm_loss") and lower_is_better("cost/itc/forward_ms")
    assert not lower_is_better("cost/samples_per_s") and not lower_is_better("retrieval/itc/r_mean")


# -- slurm through submitit ------------------------------------------------------------------------------------------------
def test_slurm_launcher_runs_a_job_array_and_records_a_failed_run(tmp_path: Path) -> None:
    """One job array of two runs on submitit's local executor, same folders as the local launcher, on synthetic data
    the sweep writes itself; one run's override passes the config checks but fails when the model is built (hidden
    size 128 is not divisible by 3 heads): it is recorded as failed and the other finishes."""
    submitit = pytest.importorskip("submitit")
    spec = write_spec(
        tmp_path / "spec.yaml",
        data={"synth": {"num_train": 24, "num_val": 8, "num_test": 8, "image_size": 32, "samples_per_shard": 16}},
        variants={"itc_itm": None, "broken": {"overrides": {"model.stream.num_heads": 3}}},
        evaluate=[{"fit": {"tags": ["train/itc_loss"]}}],
        slurm={"cluster": "local", "timeout_min": 10, "cpus_per_task": 1},
    )
    out = tmp_path / "out"
    arrays: list[int] = []
    map_array = submitit.AutoExecutor.map_array

    def spy(self: Any, fn: Any, *iterables: Any) -> Any:
        arrays.append(len(iterables[0]))
        return map_array(self, fn, *iterables)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(submitit.AutoExecutor, "map_array", spy)
        assert main(["sweep", "--config", str(spec), "--out", str(out), "--launcher", "slurm"]) == 1
    assert arrays == [2], "one job array of two runs"
    assert json.loads((out / "data" / "synth.json").read_text())["num_train"] == 24
    statuses = {v: json.loads((out / "runs" / v / "seed0" / "status.json").read_text()) for v in ("itc_itm", "broken")}
    jobs = {status["job_id"] for status in statuses.values()}
    assert len(jobs) == 2 and all((out / "slurm" / job).is_dir() for job in jobs), "submitit's folder per job"
    assert all(status["launcher"] == "submitit-local" for status in statuses.values())
    assert statuses["itc_itm"]["status"] == "done" and statuses["broken"]["status"] == "failed"
    error = statuses["broken"]["error"]
    assert error.startswith("training failed: exit status 2") and "num_heads (3)" in error
    rows = read_rows(out)
    assert [(row["variant"], row["status"]) for row in rows] == [("itc_itm", "done"), ("broken", "failed")]
    assert float(rows[0]["fit/train/itc_loss"]) > 0 and rows[1]["fit/train/itc_loss"] == ""
    assert "| broken | 0 | failed | training failed: exit status 2" in (out / "results.md").read_text()
    plans = build_plan(load_spec(spec), out)
    todo, done, live = pending_runs(plans)
    assert [p.variant for p in todo] == ["broken"] and [p.variant for p in done] == ["itc_itm"] and not live
    (out / "results.csv").unlink()
    assert main(["sweep", "--config", str(spec), "--out", str(out), "--collect"]) == 1, "collect runs nothing"
    assert [row["status"] for row in read_rows(out)] == ["done", "failed"]


# -- the warm-start stage ---------------------------------------------------------------------------------------------------
#: A learning rate too small to move any weight of a float32 model that has trained (1e-30 is far below the spacing of
#: float32 numbers near the weights' values): a run at this rate ends with the weights it started from.
FROZEN = {"model.optim.lr": 1e-30, "model.optim.warmup_lr": 1e-30, "model.optim.min_lr": 1e-30}
WARM_START = {"steps": 2, "objectives": {"itc": "on", "itm": "off"}}


@pytest.fixture(scope="module")
def warm_finished(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One seed: an ITC-only warm start of 2 steps, then two one-step variants from its last.ckpt: ITC + ITM at a
    learning rate that moves nothing (``frozen``: its weights stay the warm start's) and ITC only."""
    root = tmp_path_factory.mktemp("warm")
    spec = write_spec(
        root / "spec.yaml",
        data=data_section(synth_data),
        warm_start=WARM_START,
        variants={"frozen": {"overrides": FROZEN}, "itc": {"objectives": {"itm": "off"}}},
        evaluate=[{"fit": {"tags": ["train/itc_loss"]}}],
    )
    out = root / "out"
    recorder = Recorder()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "run_process", recorder)
        code = main(["sweep", "--config", str(spec), "--out", str(out)])
    return {"spec": spec, "out": out, "code": code, "commands": recorder.commands}


def _option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_warm_start_trains_once_and_each_variant_starts_from_its_last_ckpt(warm_finished: dict[str, Any]) -> None:
    out, commands = warm_finished["out"], warm_finished["commands"]
    assert warm_finished["code"] == 0
    runs = out.resolve() / "runs"
    folders = [_option(c, "--trainer.default_root_dir") for c in commands]
    assert folders == [str(runs / "_warm_start" / "seed0"), str(runs / "frozen" / "seed0"), str(runs / "itc" / "seed0")]
    warm = json.loads((runs / "_warm_start" / "seed0" / "status.json").read_text())
    assert warm["status"] == "done" and warm["variant"] == "_warm_start" and warm["train"]["step"] == 2
    checkpoint = warm["train"]["checkpoint"]
    assert _option(commands[0], "--trainer.max_steps") == "2" and "--model.init_from" not in commands[0]
    for command, variant in zip(commands[1:], ("frozen", "itc"), strict=True):
        assert _option(command, "--model.init_from") == checkpoint and _option(command, "--trainer.max_steps") == "1"
        status = json.loads((runs / variant / "seed0" / "status.json").read_text())
        assert status["status"] == "done" and status["train"]["init_from"] == checkpoint
        assert f"--model.init_from {checkpoint}" in status["train"]["command"]
    config = yaml.safe_load(next((runs / "_warm_start" / "seed0" / "train").rglob("config.yaml")).read_text())
    assert config["model"]["itm"] is None and config["model"]["itc"] is not None, "the warm start's objectives"


def test_variant_starts_from_the_warm_starts_weights(warm_finished: dict[str, Any]) -> None:
    """The frozen variant (ITC + ITM, nothing moves) ends with the warm start's online encoder and ITC weights; its ITM
    head, which the ITC-only warm start has not, is its own."""
    import torch

    from vlalign.models.backbone import online_name
    from vlalign.weights.safe_loading import allow_config_classes_in_checkpoints, load_state_dict_file

    allow_config_classes_in_checkpoints()
    runs = warm_finished["out"] / "runs"

    def weights(folder: Path) -> dict[str, torch.Tensor]:
        (path,) = folder.rglob("last.ckpt")
        return load_state_dict_file(path)

    warm, frozen, itc = (weights(runs / name / "seed0") for name in ("_warm_start", "frozen", "itc"))
    parts = ("backbone.vision.", "backbone.stream.", "itc.")
    online = [k for k in warm if k.startswith(parts) and online_name(k) is None and warm[k].is_floating_point()]
    online = [k for k in online if "queue" not in k]  # the ITC queues are buffers, written on every step
    assert len(online) > 50 and any(k.startswith("itc.") for k in online)
    for key in online:
        torch.testing.assert_close(frozen[key], warm[key], rtol=0, atol=1e-12, msg=key)
    assert any(k.startswith("itm.") for k in frozen) and not any(k.startswith("itm.") for k in warm)
    # the ITC-only variant trained one step at the base learning rate from the same weights: they moved
    moved = max((itc[k] - warm[k]).abs().max().item() for k in online if k.startswith("backbone.vision."))
    assert moved > 1e-7


def test_warm_start_rows_are_in_the_csv_and_out_of_the_tables(warm_finished: dict[str, Any]) -> None:
    out = warm_finished["out"]
    rows = read_rows(out)
    assert [(r["variant"], r["steps"], r["status"]) for r in rows] == [
        ("_warm_start", "2", "done"), ("frozen", "1", "done"), ("itc", "1", "done")]  # fmt: skip
    warm = rows[0]
    assert warm["objectives"] == "itc" and float(warm["train_s"]) > 0 and float(warm["peak_rss_mb"]) > 50
    assert float(warm["train_s_per_step"]) == pytest.approx(float(warm["train_s"]) / 2)
    text = (out / "results.md").read_text()
    (line,) = [line for line in text.splitlines() if line.startswith("Warm start:")]
    minutes = float(warm["train_s"]) / 60
    assert "objectives `itc` for 2 optimizer steps" in line and f"mean wall time {minutes:.1f} min; 1/1 done" in line
    tables = [line for line in text.splitlines() if line.startswith("|")]
    assert tables and not any("_warm_start" in line for line in tables), "no table row or column for the warm start"
    assert any(line.startswith("| `train_s` |") for line in tables) and "## Runs not done" not in text
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["frozen", "itc"]


def test_second_invocation_skips_the_warm_start_and_the_variants(warm_finished: dict[str, Any]) -> None:
    out = warm_finished["out"]
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.suffix in (".ckpt", ".json")}
    recorder = Recorder()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "run_process", recorder)
        assert main(["sweep", "--config", str(warm_finished["spec"]), "--out", str(out)]) == 0
    assert recorder.commands == [], "no process started"
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_warm_start_mistakes_name_their_key(tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path / "spec.yaml",
        warm_start={"steps": 0, "objectives": {"itcc": "on"}, "overides": ["--model.momentum 0.9"]},
        variants={"a": {"overrides": {"model.init_from": "x.ckpt"}}},
        quick={"warm_start": {"step": 5}},
    )
    with pytest.raises(ConfigError) as caught:
        load_spec(spec)
    message = str(caught.value)
    for expected in (
        "warm_start.objectives.itcc: unknown objective (did you mean 'itc'?); the objectives are: itc, itm, xmm, psl",
        "warm_start.steps: expected the number of optimizer steps per run (an integer >= 1), got int 0",
        "warm_start.overides: unknown key (did you mean 'overrides'?); the keys are: steps, objectives, overlays",
        "variants.a.overrides: --model.init_from is set by the sweep when it has a warm_start:",
        "quick.warm_start.step: unknown key (did you mean 'steps'?)",
    ):
        assert expected in message, expected
    assert "(5 problems)" in message
    spec = write_spec(tmp_path / "missing.yaml", warm_start={"objectives": {"itm": "off"}}, variants={"a": None},
                      quick={"seeds": [1]})  # fmt: skip
    with pytest.raises(ConfigError, match=r"warm_start\.steps: missing"):
        load_spec(spec)
    spec = write_spec(tmp_path / "orphan.yaml", variants={"a": None}, quick={"warm_start": {"steps": 3}})
    with pytest.raises(ConfigError, match=r"quick\.warm_start: the spec has no warm_start: section"):
        load_spec(spec)


def test_unknown_objective_in_warm_start_is_rejected_before_anything_runs(
    synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path / "spec.yaml", data=data_section(synth_data), variants={"a": None},
                      warm_start={"steps": 2, "objectives": {"itx": "on"}})  # fmt: skip
    out = tmp_path / "out"
    assert main(["sweep", "--config", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "warm_start.objectives.itx: unknown objective" in err and "the objectives are: itc, itm, xmm, psl" in err
    assert not out.exists()


def test_quick_warm_start_steps_and_the_fingerprint_chain(synth_data: Path, tmp_path: Path) -> None:
    sections = {
        "data": data_section(synth_data),
        "seeds": [0, 1],
        "variants": {"a": None, "b": {"objectives": {"itm": "off"}}},
    }
    spec_file = write_spec(tmp_path / "spec.yaml", warm_start={"steps": 6, "objectives": {"itm": "off"}},
                           quick={"warm_start": {"steps": 3}}, **sections)  # fmt: skip
    full, quick = load_spec(spec_file), load_spec(spec_file, quick=True)
    assert (full.warm_start.steps, quick.warm_start.steps) == (6, 3)
    assert quick.warm_start.objectives == full.warm_start.objectives == {"itm": None}, "quick merges, keeps the rest"
    out = tmp_path / "out"
    plans = build_plan(full, out)
    assert [(p.variant, p.seed) for p in plans] == [("_warm_start", 0), ("_warm_start", 1), ("a", 0), ("a", 1),
                                                    ("b", 0), ("b", 1)]  # fmt: skip
    warm = {p.seed: p for p in plans[:2]}
    assert all(_option(list(p.fit_args), "--trainer.max_steps") == "6" and not p.evaluations for p in warm.values())
    for plan in plans[2:]:
        assert (
            plan.warm_start == warm[plan.seed]
            and plan.warm_start.run_dir == out.resolve() / "runs" / "_warm_start" / f"seed{plan.seed}"
        )
        assert _option(plan.fit_command(init_from="w.ckpt"), "--model.init_from") == "w.ckpt"
        with pytest.raises(ValueError, match="give its checkpoint"):
            plan.fit_command()
    quick_plans = build_plan(quick, out)
    assert _option(list(quick_plans[0].fit_args), "--trainer.max_steps") == "3"
    # a variant's own command is the same in both specs (quick changed only the warm start) but its fingerprint is not
    assert plans[2].fit_args == quick_plans[2].fit_args and plans[2].fingerprint != quick_plans[2].fingerprint
    plain = build_plan(load_spec(write_spec(tmp_path / "plain.yaml", **sections)), out)
    assert plain[0].fit_args == plans[2].fit_args and plain[0].fingerprint != plans[2].fingerprint
    assert all(p.warm_start is None for p in plain)


def test_dry_run_prints_the_warm_start_commands(
    synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path / "spec.yaml", seeds=[0, 1], data=data_section(synth_data), warm_start=WARM_START,
                      variants={"a": None, "b": {"objectives": {"itm": "off"}}})  # fmt: skip
    out = tmp_path / "out"
    assert main(["sweep", "--config", str(spec), "--out", str(out), "--dry_run", "--only", "b"]) == 0
    printed = capsys.readouterr().out
    assert "4 runs (2 warm starts)" in printed and "warm start: 2 steps per seed" in printed and not out.exists()
    fits = [line for line in printed.splitlines() if line.startswith("vlalign fit")]
    assert len(fits) == 4 and "runs/a/" not in printed
    for seed in (0, 1):
        assert f"# warm start seed {seed} [pending]" in printed
        (warm,) = [f for f in fits if f"/runs/_warm_start/seed{seed} " in f]
        assert "--trainer.max_steps 2 " in warm and "init_from" not in warm
        (variant,) = [f for f in fits if f"/runs/b/seed{seed} " in f]
        assert variant.endswith(f"--model.init_from '<warm start seed {seed} last.ckpt>'")


def _fake_result(returncode: int) -> Any:
    def run(command: list[str], log: Path, env: dict[str, str]) -> runner.ProcessResult:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("error: the warm start broke\n" if returncode else "")
        return runner.ProcessResult(returncode, 1.0, 100.0)

    return run


def test_failed_warm_start_fails_its_variants_without_training_them(synth_data: Path, tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path / "spec.yaml", data=data_section(synth_data), warm_start=WARM_START,
                                variants={"a": None}))  # fmt: skip
    warm, variant = build_plan(spec, tmp_path / "out")
    calls: list[list[str]] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "run_process", lambda c, log, env: calls.append(c) or _fake_result(2)(c, log, env))
        assert runner.execute_run(warm, echo=lambda text: None) == "failed"
        assert runner.execute_run(variant, echo=lambda text: None) == "failed"
    assert len(calls) == 1, "the variant was not trained"
    status = runner.read_status(variant)
    assert status["status"] == "failed" and status["error"].startswith("not trained: its warm start (warm start seed 0")
    assert "is failed: training failed: exit status 2" in status["error"] and "run the sweep again" in status["error"]
    never = RunPlan(**{**variant.__dict__, "run_dir": tmp_path / "other", "warm_start": RunPlan(
        **{**warm.__dict__, "run_dir": tmp_path / "never"})})  # fmt: skip
    assert runner.execute_run(never, echo=lambda text: None) == "failed"
    assert "is pending" in runner.read_status(never)["error"]


class FakeJob:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id

    def done(self) -> bool:
        return True

    def result(self) -> str:
        return "done"


class FakeExecutor:
    """Records what submit_slurm asks of a submitit executor; jobs end at once without running anything."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.arrays = 0

    def update_parameters(self, **parameters: Any) -> None:
        self.calls.append(("update", parameters))

    def map_array(self, fn: Any, plans: list[RunPlan]) -> list[FakeJob]:
        self.arrays += 1
        self.calls.append(("array", [p.label for p in plans]))
        return [FakeJob(f"{100 + self.arrays}_{i}") for i in range(len(plans))]


@pytest.mark.parametrize("cluster", ["slurm", "local"])
def test_slurm_launcher_submits_warm_starts_first_and_variants_after_them(
    synth_data: Path, tmp_path: Path, cluster: str
) -> None:
    from vlalign.sweep import launchers

    spec = load_spec(write_spec(
        tmp_path / "spec.yaml", seeds=[0, 1], data=data_section(synth_data), warm_start=WARM_START,
        variants={"a": None}, slurm={"cluster": cluster, "additional_parameters": {"reservation": "r1"}},
    ))  # fmt: skip
    plans = build_plan(spec, tmp_path / "out")
    executor = FakeExecutor()
    waited: list[list[str]] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launchers, "_executor", lambda folder, slurm, name: executor)
        patch.setattr(launchers, "wait_for", lambda jobs, plans: waited.append([p.label for p in plans]))
        jobs = launchers.submit_slurm(plans, spec.slurm, spec.name, tmp_path / "out", wait=False)
    assert [j.job_id for j in jobs] == ["101_0", "101_1", "102_0", "102_1"]
    first = ("array", ["warm start seed 0", "warm start seed 1"])
    second = ("array", ["a seed 0", "a seed 1"])
    if cluster == "slurm":  # the variants' array waits in SLURM for every warm-start job
        dependency = {"slurm_additional_parameters": {"reservation": "r1", "dependency": "afterany:101_0:101_1"}}
        assert executor.calls == [first, ("update", dependency), second] and waited == []
    else:  # no dependencies off SLURM: the sweep waits for the warm starts itself
        assert executor.calls == [first, second] and waited == [["warm start seed 0", "warm start seed 1"]]
    assert [runner.read_status(p)["job_id"] for p in plans] == ["101_0", "101_1", "102_0", "102_1"]
