"""The command line, in-process on tiny configs, plus one subprocess test of the installed entry point."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vlalign.cli.main import main
from vlalign.cli.train import run_training_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SLOTS = ("itc", "itm", "xmm", "psl")

RECIPES = sorted(p for p in (CONFIGS / "pretrain").glob("*.yaml"))
ABLATIONS = sorted((CONFIGS / "ablations").glob("*.yaml"))


def test_installed_entry_point_lists_every_command() -> None:
    exe = shutil.which("vlalign") or str(Path(sys.executable).with_name("vlalign"))
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120, check=True).stdout
    for command in ("fit", "validate", "test", "data synth", "data convert", "convert"):
        assert command in out


def test_unknown_command_fails_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fitt"]) == 2
    assert "unknown command 'fitt'" in capsys.readouterr().err


@pytest.mark.parametrize("config", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["vision"]["name"] and printed["data"]["class_path"].startswith("vlalign.datamodules")


@pytest.mark.parametrize("overlay", ABLATIONS, ids=lambda p: p.name)
def test_every_ablation_overlay_parses(overlay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "pretrain" / "simla.yaml"), "--config", str(overlay), "--print_config"])
    assert exit_info.value.code == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    overlay_model = yaml.safe_load(overlay.read_text())["model"]
    for slot in SLOTS:
        if slot not in overlay_model:
            assert model[slot] is not None, f"{overlay.name} must leave {slot} enabled"
        elif overlay_model[slot] is None:
            assert model[slot] is None
        else:
            for key, value in overlay_model[slot].items():
                assert model[slot]["init_args"][key] == value


def test_fit_fast_dev_run_itc_itm(cli_data_args: list[str]) -> None:
    cli = run_training_cli(
        ["fit", "--config", str(CONFIGS / "pretrain" / "tiny.yaml"), *cli_data_args, "--trainer.fast_dev_run", "1"]
    )
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/itc_loss"]) and torch.isfinite(metrics["train/itm_loss"])
    assert "val/r_mean" in metrics  # fast_dev_run also runs one validation batch


def test_validate_reports_recall_with_chance_level_bounds(cli_data_args: list[str]) -> None:
    cli = run_training_cli(["validate", "--config", str(CONFIGS / "pretrain" / "tiny.yaml"), *cli_data_args])
    recalls = cli.model.last_retrieval["val"]
    assert set(recalls) >= {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}
    assert all(0.0 <= v <= 100.0 for v in recalls.values())


@pytest.mark.parametrize("command", ["validate", "test"])
def test_validate_and_test_write_nothing_into_the_current_directory(
    command: str, cli_data_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evaluation writes no config.yaml anywhere, and nothing at all into the working directory (here without a
    logger and without default_root_dir, where Lightning's log folder is the working directory)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = cli_data_args.index("--trainer.default_root_dir")
    data_args = cli_data_args[:root] + cli_data_args[root + 2 :]
    args = [command, "--config", str(CONFIGS / "pretrain" / "tiny.yaml"), *data_args, "--model.stream.num_layers", "1"]
    run_training_cli([*args, "--trainer.logger", "false"])
    run_training_cli(args)  # with the config's TensorBoard logger (its save_dir is under tmp_path/runs)
    assert sorted(p.name for p in cwd.iterdir()) == []
    assert not list(tmp_path.rglob("config.yaml"))
