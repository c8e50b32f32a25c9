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


def test_validate_recall_equals_an_independent_computation_from_the_features(
    cli_data_args: list[str], synth_data: Path
) -> None:
    """`validate` assembles the score matrix from sharded batches by global index: recompute the recalls from
    features encoded here one image and one caption at a time, ranked with plain Python, and compare."""
    import json

    from vlalign.data.text import pre_caption
    from vlalign.data.tokenization import load_tokenizer, tokenize_captions
    from vlalign.data.transforms import EvalTransform, load_rgb

    cli = run_training_cli(["validate", "--config", str(CONFIGS / "pretrain" / "tiny.yaml"), *cli_data_args])
    recalls = cli.model.last_retrieval["val"]
    model, data = cli.model.eval(), cli.datamodule
    entries = json.loads((synth_data / "retrieval_val.json").read_text())
    tokenizer = load_tokenizer(synth_data / "tokenizer")
    transform = EvalTransform(data.image_size)
    with torch.no_grad():
        images = [transform(load_rgb(synth_data / e["image"])) for e in entries]
        image_feat = model.itc.image_features(model.backbone.vision(torch.stack(images)))
        captions = [(i, pre_caption(c, data.max_words)) for i, e in enumerate(entries) for c in e["caption"]]
        ids, mask = tokenize_captions(tokenizer, [c for _, c in captions], data.eval_max_length, "max_length")
        text_feat = model.itc.text_features(model.backbone.encode_text(ids, mask), mask)
    scores = (image_feat @ text_feat.t()).tolist()
    owner = [i for i, _ in captions]

    def rank_of_best(row: list[float], good: set[int]) -> int:
        return min(sum(other > row[j] for other in row) for j in good)

    expected = {}
    for k in (1, 5, 10):
        i2t = [rank_of_best(scores[i], {j for j, o in enumerate(owner) if o == i}) < k for i in range(len(entries))]
        t2i = [rank_of_best([scores[i][j] for i in range(len(entries))], {owner[j]}) < k for j in range(len(owner))]
        expected[f"txt_r{k}"], expected[f"img_r{k}"] = 100 * sum(i2t) / len(i2t), 100 * sum(t2i) / len(t2i)
    for key, value in expected.items():
        assert recalls[key] == pytest.approx(value, abs=1e-6), key


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
