"""`make demo` (vlalign.cli.demo): a fixed step count, a final checkpoint, a result, and nothing outside --out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vlalign.cli import demo


def test_demo_trains_fixed_steps_and_writes_only_under_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    steps = 10  # 64 pairs / batch 8 = 8 steps per epoch: one validation, then a stop mid-epoch
    small = [
        "--data.init_args.batch_size", "8",
        "--data.init_args.eval_batch_size", "16",
        "--data.init_args.num_workers", "0",
        "--data.init_args.shuffle_buffer", "16",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    recalls = demo.run_demo(
        out, steps=steps, seed=7, num_train=64, num_val=16, num_test=16, val_every=1, extra_args=small, progress=False
    )

    result = json.loads((out / "test_retrieval.json").read_text())
    assert result == recalls
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
        assert 0.0 <= result[key] <= 100.0
    lasts = list((out / "runs").rglob("last.ckpt"))
    assert len(lasts) == 1
    assert demo._checkpoint_step(lasts[0]) == steps  # the final weights, not those of the last validation
    printed = capsys.readouterr().out
    assert f"{steps} steps, seed 7" in printed and "| image → text (chance) |" in printed
    assert os.listdir(cwd) == []  # logs, checkpoints, config.yaml: all under --out


def test_demo_exits_nonzero_without_result(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_checkpoint(*args: object, **kwargs: object) -> None:
        raise demo.DemoError("training wrote no checkpoint")

    monkeypatch.setattr(demo, "run_demo", no_checkpoint)
    assert demo.cli(["--out", str(tmp_path / "out")]) == 1
