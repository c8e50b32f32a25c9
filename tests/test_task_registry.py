"""The downstream task registry and the `finetune` / `evaluate` commands' routing: help text equals the registry,
unknown tasks fail with the valid ones listed (exit 2), and the shipped task configs parse with the reference values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlalign.cli.main import main, usage
from vlalign.tasks.registry import TASK_SUMMARIES, TaskSpec, help_tasks, register_task, tasks

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"


def test_help_lists_exactly_the_registered_tasks() -> None:
    registry = tasks()
    assert "retrieval" in registry
    assert help_tasks() == {name: (spec.description, spec.trains) for name, spec in registry.items()}
    text = usage()
    for name, spec in registry.items():
        assert spec.description in text and name in text
    for name, (module, _, _) in TASK_SUMMARIES.items():  # the static table names where each task lives
        if name in registry:
            assert registry[name].module.startswith(module + ".")


def test_help_imports_no_torch() -> None:
    code = "import sys; from vlalign.cli.main import main; main(['--help']); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_unknown_task_fails_listing_the_valid_ones(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "retreival", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown task 'retreival'")
    for name in tasks():
        assert name in err


def test_a_task_command_needs_a_task(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--model", "m.ckpt"]) == 2
    assert "needs a task name" in capsys.readouterr().err
    assert main(["finetune", "--help"]) == 0
    assert "finetune" in capsys.readouterr().out


def test_evaluation_only_task_cannot_be_finetuned(capsys: pytest.CaptureFixture[str]) -> None:
    evaluation_only = [name for name, spec in tasks().items() if not spec.trains]
    if not evaluation_only:
        pytest.skip("no evaluation-only task is registered")
    assert main(["finetune", evaluation_only[0]]) == 2
    assert f"vlalign evaluate {evaluation_only[0]}" in capsys.readouterr().err


def test_registry_refuses_a_second_task_under_a_taken_name() -> None:
    spec = tasks()["retrieval"]
    assert register_task(spec) is spec  # the same spec again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_task(TaskSpec("retrieval", "my.Module", "my.Data", "x.yaml", "another"))
    with pytest.raises(ValueError, match="class path"):
        TaskSpec("other", "Module", "my.Data", "x.yaml", "no module path")


# -- the shipped configs -------------------------------------------------------------------------------------------
def _printed(config: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    with pytest.raises(SystemExit) as info:
        main(["finetune", "retrieval", "--config", str(config), "--print_config"])
    assert info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize(("name", "k_test", "epochs"), [("retrieval_coco", 256, 5), ("retrieval_flickr", 128, 10)])
def test_full_size_configs_carry_the_reference_settings(
    name: str, k_test: int, epochs: int, capsys: pytest.CaptureFixture[str]
) -> None:
    printed = _printed(CONFIGS / f"{name}.yaml", capsys)
    model, data, trainer = printed["model"], printed["data"], printed["trainer"]
    assert model["k_test"] == k_test and trainer["max_epochs"] == epochs
    assert (model["queue_size"], model["momentum"], model["alpha"], model["distill"]) == (65536, 0.995, 0.4, True)
    assert model["optim"]["lr"] == 1e-5 and model["optim"]["weight_decay"] == 0.02 and model["optim"]["min_lr"] == 1e-6
    assert (data["batch_size"], data["image_size"], data["max_words"]) == (32, 384, 30)
    assert trainer["callbacks"][0]["init_args"]["monitor"] == "val/itm_r_mean"
    assert trainer["logger"]["init_args"]["name"] == name


def test_tiny_config_keeps_the_base_and_changes_only_what_it_names(capsys: pytest.CaptureFixture[str]) -> None:
    printed = _printed(CONFIGS / "retrieval_tiny.yaml", capsys)
    assert printed["trainer"]["accelerator"] == "cpu" and printed["model"]["queue_size"] == 256
    assert printed["model"]["alpha"] == 0.4 and printed["data"]["max_words"] == 30  # from retrieval_base.yaml
    assert printed["trainer"]["callbacks"][0]["init_args"]["monitor"] == "val/itm_r_mean"
    assert printed["data"]["train_files"] == ["demo_run/data/retrieval_train.json"]
