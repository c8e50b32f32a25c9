"""The end-to-end ``fit`` benchmark (``benchmarks/fit.py``): its window arithmetic by hand, its run configs, and one
smoke run of the real ``vlalign fit`` at a few steps (tiny recipe, batch 4, no data worker)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import fit  # noqa: E402


def test_summarise_window_leaves_periodic_intervals_out_of_the_rate() -> None:
    # intervals: 1.0 s, 2.0 s (a validation starts inside it), 1.5 s (the step after it), 1.0 s; 8 samples each
    stamps = [10.0, 11.0, 13.0, 14.5, 15.5]
    events = [("validation", 11.5, 12.5), ("checkpoint", 12.5, 12.75)]
    gpu = [(10.5, 80.0), (12.0, 10.0), (14.0, 40.0), (15.0, 60.0)]
    cpu_stamps = [0.0, 0.5, 1.5, 2.1, 2.7]
    end_stamps = [(10.8, 0.4), (12.9, 1.4), (14.2, 2.0), (15.3, 2.5)]  # (wall, CPU) at each batch's end
    syncs = [(10.2, "a"), (10.6, "a"), (12.2, "b"), (14.1, "b"), (15.1, "a")]
    report = fit.summarise_window(
        stamps, [8] * 4, [8, 20, 8, 4], events, gpu, cpu_stamps=cpu_stamps, end_stamps=end_stamps, syncs=syncs
    )

    assert report["steady_intervals"] == 2 and report["timed_intervals"] == 4  # intervals 0 and 3
    assert report["steady_s"] == pytest.approx(2.0)  # 1.0 + 1.0
    assert report["samples_per_s"] == pytest.approx(16 / 2.0)
    assert report["median_interval_ms"] == pytest.approx(1000.0)
    assert report["samples_per_s_median"] == pytest.approx(8.0)
    assert report["main_process_cpu_ms_per_step"] == pytest.approx(550.0)  # (0.5 + 0.6) / 2
    assert report["in_step_ms_median"] == pytest.approx(800.0)  # 0.8 and 0.8 s
    assert report["between_steps_ms_median"] == pytest.approx(200.0)  # 0.2 and 0.2 s
    assert report["in_step_cpu_ms"] == pytest.approx(400.0)  # (0.4 + 0.4) / 2
    assert report["between_steps_cpu_ms"] == pytest.approx(150.0)  # (0.1 + 0.2) / 2
    (periodic,) = report["periodic"]
    assert periodic["interval"] == 1 and periodic["seconds"] == pytest.approx(2.0)
    assert periodic["next_seconds"] == pytest.approx(1.5)
    assert periodic["validation_s"] == pytest.approx(1.0) and periodic["checkpoint_s"] == [pytest.approx(0.25)]
    assert periodic["extra_s"] == pytest.approx(1.5)  # (2.0 - 1.0) + (1.5 - 1.0)
    assert report["gpu_utilization"] == {"mean": pytest.approx(70.0), "samples": 2}  # 10% and 40% are periodic
    assert report["conversions_per_step"] == pytest.approx(6.0)  # (8 + 4) / 2: the validation's are left out
    assert report["syncs_per_step"] == pytest.approx(1.5)  # 3 syncs in the 2 steady intervals
    assert report["sync_sites"] == {"a": 3}


def test_summarise_window_needs_one_stamp_more_than_batches() -> None:
    with pytest.raises(ValueError, match="one stamp more"):
        fit.summarise_window([0.0, 1.0], [8, 8], [], [], [])


def test_workers_needed_rounds_up_and_refuses_a_zero_rate() -> None:
    assert fit.workers_needed(400.0, 172.0) == 3  # 2.33 workers
    assert fit.workers_needed(344.0, 172.0) == 2
    assert fit.workers_needed(10.0, 500.0) == 1
    assert fit.workers_needed(400.0, 0.0) is None


def test_overlay_switches_follow_the_ablation(tmp_path: Path) -> None:
    data = fit.BenchData("tok", "shards/{0..1}.tar", "val.json", 64, 16, 128, 177, 0.0)
    spec = fit.RunSpec("tiny", "cpu", "32-true", 8, warmup=2, steps=6, threads=1, workdir=tmp_path)
    on = fit.overlay(spec, data, 1, fit.DEFAULTS, tmp_path / "run", tmp_path / "t.json")
    names = [entry["class_path"].rsplit(".", 1)[-1] for entry in on["trainer"]["callbacks"]]
    assert names == ["ModelCheckpoint", "LearningRateMonitor", "StepTimer"]
    assert on["trainer"]["max_steps"] == 9  # warmup + steps + 1: the window closes at the last batch's start
    assert on["trainer"]["val_check_interval"] == 2 + 3  # one validation in the middle of the window, one after it
    assert on["data"]["init_args"]["samples_per_epoch"] == 8 * 2 * 9  # no epoch end during the run
    assert on["trainer"]["logger"]["init_args"]["save_dir"] == str(tmp_path / "run" / "runs")

    all_off = fit.overlay(spec, data, 1, fit.ABLATIONS[-1], tmp_path / "run", tmp_path / "t.json")
    trainer = all_off["trainer"]
    names = [entry["class_path"].rsplit(".", 1)[-1] for entry in trainer["callbacks"]]
    assert names == ["ObjectiveCostMonitor", "StepTimer"]
    assert trainer["callbacks"][0]["init_args"] == {"every_n_steps": 0}
    assert trainer["logger"] is False and trainer["enable_progress_bar"] is False
    assert trainer["enable_checkpointing"] is False and trainer["limit_val_batches"] == 0
    assert trainer["callbacks"][1]["init_args"]["progress_bar_losses"] is False


def test_pad_vocabulary_keeps_tokenisation(tmp_path: Path) -> None:
    from vlalign.data.synth import write_synthetic
    from vlalign.data.tokenization import load_tokenizer

    summary = write_synthetic(tmp_path, num_train=4, num_val=0, num_test=0, image_size=32, progress=False)
    caption = "a small red circle to the left of a blue square"
    before = load_tokenizer(summary.tokenizer_dir)(caption)["input_ids"]
    assert fit.pad_vocabulary(summary.tokenizer_dir, 1000) == 1000
    padded = load_tokenizer(summary.tokenizer_dir)
    assert len(padded) == 1000
    assert padded(caption)["input_ids"] == before


def test_fit_benchmark_smoke_run_reports_sane_figures(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    args = ["--steps", "3", "--warmup", "2", "--workers", "0", "--batch-size", "4", "--num-val", "8"]
    args += ["--pipeline-samples", "32", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    fit.main(args)

    report = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().count("| fit (defaults) | 0 |") == 2  # throughput and where-time tables
    bare, (row,) = report["bare"], report["fit"]
    assert bare["batch_size"] == 4 and bare["samples_per_s"] > 0 and len(bare["step_ms"]) == 3
    assert row["workers"] == 0 and row["timed_intervals"] == 3
    # the validation falls in the second interval, the third is the step after it: the first is steady
    assert row["steady_intervals"] == 1 and [entry["interval"] for entry in row["periodic"]] == [1]
    assert row["steady_samples"] == 4 * row["steady_intervals"]
    assert row["samples_per_s"] > 0 and 0.05 < row["fit_over_bare"] < 3.0
    assert row["fit_over_bare"] == pytest.approx(row["samples_per_s"] / bare["samples_per_s"])
    adjacent = row["adjacent_bare"]  # bare steps inside the fit process, right after its window
    assert adjacent["steps"] == 4 and adjacent["batch_size"] == 4 and adjacent["samples_per_s"] > 0
    assert row["fit_over_adjacent_bare"] == pytest.approx(row["samples_per_s"] / adjacent["samples_per_s"])
    # one validation inside the window: it and the checkpoints written after it are periodic work
    assert any(entry["validation_s"] > 0 for entry in row["periodic"])
    assert any(entry["checkpoint_s"] for entry in row["periodic"])
    # the four objectives' losses are logged with prog_bar=True: converted to Python numbers at every step
    assert row["conversions_per_step"] >= 4
    in_and_between = row["in_step_cpu_ms"] + row["between_steps_cpu_ms"]
    assert in_and_between == pytest.approx(row["main_process_cpu_ms_per_step"], rel=1e-6)
    assert row["torch_threads"] == 1 and row["num_workers"] == 0 and row["progress_bar"] is not None
    assert "ObjectiveCostMonitor" in row["callbacks"] and "LastCheckpoint" in row["callbacks"]
    assert row["gpu_utilization"].startswith("unavailable") and row["syncs_per_step"].startswith("unavailable")
    assert len(row["raw"]["stamps_s"]) == 4 and row["raw"]["stamps_s"][0] == 0.0
    per_worker = report["pipeline"]["samples_per_s_per_worker"]
    assert per_worker > 0
    assert report["workers_needed"]["bare step"] == math.ceil(bare["samples_per_s"] / per_worker)
    assert report["workers_needed"]["400 samples/s"] == math.ceil(400 / per_worker)
