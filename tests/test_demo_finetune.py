"""`make demo-finetune --tasks`: task selection, the files each task needs, the SNLI-VE hypothesis-only baseline,
and the downstream tasks end to end on a stand-in `make demo` folder (tiny model, two steps each). Retrieval's own
end-to-end run is tests/test_finetune_retrieval.py::test_demo_finetune_reuses_the_demo_checkpoint_and_prints_both_tables.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vlalign.cli import demo_finetune
from vlalign.cli.demo_finetune import TASKS, cli, ensure_task_files, hypothesis_only_rule, parse_tasks, task_files
from vlalign.data.preprocessing import Preprocessing, tokenizer_files
from vlalign.data.tokenization import load_tokenizer, vocab_info


# -- --tasks --------------------------------------------------------------------------------------------------------
def test_parse_tasks_keeps_the_run_order_drops_repeats_and_expands_all() -> None:
    assert parse_tasks("grounding, vqa,retrieval,vqa") == ("retrieval", "vqa", "grounding")
    assert parse_tasks("all") == TASKS == ("retrieval", "vqa", "nlvr2", "snli_ve", "grounding")
    assert parse_tasks("snli_ve") == ("snli_ve",)


def test_unknown_task_is_a_usage_error_listing_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(["--tasks", "retrieval,captioning"])
    message = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "unknown task captioning" in message
    assert "retrieval, vqa, nlvr2, snli_ve, grounding" in message and "or all" in message
    with pytest.raises(ValueError, match="no task given"):
        parse_tasks(" , ")


def test_steps_below_one_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(["--steps", "0", "--tasks", "vqa"])
    assert exit_info.value.code == 2 and "--steps must be >= 1" in capsys.readouterr().err


# -- the data files ---------------------------------------------------------------------------------------------------
def test_every_task_file_is_one_the_synthetic_writer_writes(synth_data: Path) -> None:
    expected = {
        "vqa": {"vqa_train.json", "vqa_val.json", "vqa_test.json", "answer_list.json"},
        "nlvr2": {"nlvr2_train.json", "nlvr2_dev.json", "nlvr2_test.json"},
        "snli_ve": {"snli_ve_train.json", "snli_ve_dev.json", "snli_ve_test.json"},
        "grounding": {f"grounding_{s}.json" for s in ("train", "val", "testA", "testB", "dets")},
    }
    for task, names in expected.items():
        assert set(task_files(task)) == names, task
    for task in TASKS:
        assert all((synth_data / name).is_file() for name in task_files(task)), task


def test_missing_task_files_are_written_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_finetune, "DEMO_DATA", {"num_train": 6, "num_val": 3, "num_test": 3})
    data = tmp_path / "data"
    data.mkdir()
    (data / "retrieval_train.json").write_text("[]")  # an older demo folder: retrieval files only
    ensure_task_files(data, progress=False, tasks=["vqa", "grounding"])
    for name in task_files("vqa") + task_files("grounding"):
        assert (data / name).is_file(), name
    assert len(json.loads((data / "vqa_test.json").read_text())) == 3 * 3  # three questions per test image


# -- the SNLI-VE baseline -------------------------------------------------------------------------------------------
def test_hypothesis_only_rule_answers_each_made_of_group_with_its_training_majority(tmp_path: Path) -> None:
    def rows(*pairs: tuple[str, str]) -> list[dict[str, str]]:
        return [{"image": "images/x/0", "sentence": sentence, "label": label} for sentence, label in pairs]

    train = rows(
        ("there is a red circle made of wood", "neutral"),
        ("there is a blue star made of glass", "neutral"),
        ("there is a green star made of wood", "contradiction"),
        ("there is a red circle", "entailment"),
        ("there is a blue star", "entailment"),
        ("there is a pink square", "contradiction"),
    )
    test = rows(
        ("there is a black circle made of metal", "neutral"),  # rule: neutral -> right
        ("there is a red star made of paper", "contradiction"),  # rule: neutral -> wrong
        ("there are two shapes", "entailment"),  # rule: entailment -> right
        ("there is a blue circle", "contradiction"),  # rule: entailment -> wrong
        ("a made-up hypothesis", "entailment"),  # no "made of": entailment -> right
    )
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    scores = hypothesis_only_rule(tmp_path / "train.json", tmp_path / "test.json")
    assert scores == pytest.approx(
        {"acc": 100.0 * 3 / 5, "acc_contradiction": 0.0, "acc_entailment": 100.0, "acc_neutral": 100.0}
    )


# -- end to end -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_folder(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in `make demo` folder: a tiny untrained ITC + ITM checkpoint (4 stream layers, 32 px, the synthetic
    tokenizer) where `make demo` leaves its last.ckpt, its test result, and the synthetic data."""
    from vlalign.testing import tiny_recipe

    out = tmp_path_factory.mktemp("demo_run")
    tokenizer = load_tokenizer(synth_data / "tokenizer")
    recipe = tiny_recipe("itc_itm", vocab=vocab_info(tokenizer), stream={"num_layers": 4}).eval()
    spec = recipe.model_spec()
    spec["preprocessing"] = Preprocessing(image_size=32, tokenizer_files=tokenizer_files(tokenizer)).to_dict()
    checkpoints = out / "runs" / "tiny" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"state_dict": recipe.state_dict(), "vlalign_model": spec}, checkpoints / "last.ckpt")
    (out / "test_retrieval.json").write_text("{}")
    shutil.copytree(synth_data, out / "data")
    return out


def test_downstream_tasks_end_to_end_print_one_table_each_next_to_chance(
    demo_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = ["--data.batch_size", "8", "--data.eval_batch_size", "16", "--data.num_workers", "0"]
    task_args = {
        "vqa": [*small, "--model.k_test", "6"],
        "nlvr2": small,
        "snli_ve": small,
        "grounding": [*small, "--model.queue_size", "16", "--model.picture_expressions", "0"],
    }
    summary = demo_finetune.run_demo_finetune(
        demo_folder, steps=2, threads=None, tasks="vqa,nlvr2,snli_ve,grounding", task_args=task_args, progress=False
    )
    printed = capsys.readouterr().out
    assert summary["tasks"] == ["vqa", "nlvr2", "snli_ve", "grounding"] and set(summary["steps"].values()) == {2}
    assert "retrieval" not in summary and "Retrieval on" not in printed
    assert all(Path(summary["checkpoints"][task]).is_file() for task in summary["tasks"])
    assert all(summary["minutes"][task] > 0 for task in summary["tasks"])
    assert json.loads((demo_folder / demo_finetune.SUMMARY_FILE).read_text())["tasks"] == summary["tasks"]

    vqa = summary["vqa"]
    assert {"test/acc", "test/acc_yes_no", "test/acc_number", "test/acc_other"} <= set(vqa["metrics"])
    assert sum(vqa["questions_per_type"].values()) == 16 * 3  # three questions per test image
    assert 0.0 < vqa["baselines"]["majority"]["acc"] < vqa["baselines"]["prior"]["acc"] <= 100.0
    assert "| answer type | questions | fine-tuned | majority answer (chance) | question-only prior |" in printed

    assert summary["nlvr2"]["details"]["chance"] == pytest.approx(50.0)
    assert summary["snli_ve"]["details"]["chance"] == pytest.approx(100.0 / 3)
    assert 50.0 < summary["snli_ve"]["hypothesis_only"]["acc"] < 80.0  # 66.7 by design, 48 hypotheses here
    assert "| all | 32 | " in printed and "| 50.0 | 50.0 |" in printed  # NLVR2: 16 pairs x 2 statements, balanced
    assert "hypothesis-only rule |" in printed

    grounding = summary["grounding"]
    for label in ("zero-shot", "fine-tuned"):
        assert {"test/acc", "test/acc_testA", "test/acc_testB"} <= set(grounding[label]["metrics"]), label
    assert 0.0 < grounding["fine-tuned"]["details"]["chance"] < 100.0
    assert "| testA |" in printed and "| testB |" in printed and "chance (random proposal)" in printed
