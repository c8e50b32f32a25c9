"""Retrieval fine-tuning and evaluation: the data module on files in the ALBEF layout (bad entries skipped and counted
in training, named in evaluation), the task module built from a pretrained model, and `vlalign finetune retrieval` /
`vlalign evaluate retrieval` end to end on a tiny model (a few steps; results.json with the metric keys)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from vlalign.cli.main import main
from vlalign.data.preprocessing import Preprocessing, tokenizer_files
from vlalign.data.tokenization import load_tokenizer, vocab_info
from vlalign.datamodules.retrieval_finetune import RetrievalFinetuneDataModule
from vlalign.errors import InputFileError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = CONFIGS / "finetune" / "retrieval_tiny.yaml"
DIRECTIONS = ("txt", "img")
METRIC_KEYS = [
    f"test/{scorer}_{key}"
    for scorer in ("itm", "itc")
    for key in [f"{d}_r{k}" for d in DIRECTIONS for k in (1, 5, 10)] + ["txt_r_mean", "img_r_mean", "r_mean"]
] + ["test/r_mean"]


# -- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ITC + ITM pretraining checkpoint (self-describing, 32 px, the synthetic tokenizer), no training."""
    from vlalign.testing import tiny_recipe

    tokenizer = load_tokenizer(synth_data / "tokenizer")
    recipe = tiny_recipe("itc_itm", vocab=vocab_info(tokenizer)).eval()
    spec = recipe.model_spec()
    spec["preprocessing"] = Preprocessing(image_size=32, tokenizer_files=tokenizer_files(tokenizer)).to_dict()
    ckpt = tmp_path_factory.mktemp("pretrained") / "pretrain.ckpt"
    torch.save({"state_dict": recipe.state_dict(), "vlalign_model": spec, "global_step": 0, "epoch": 0}, ckpt)
    return ckpt


@pytest.fixture(scope="module")
def public_layout(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The synthetic split in ALBEF's files: train entries per caption with string image ids, images under a root."""
    root = tmp_path_factory.mktemp("public")
    images = root / "images"
    shutil.copytree(synth_data / "images", images)
    train = json.loads((synth_data / "retrieval_train.json").read_text())
    entries = [
        {"image": e["image"].removeprefix("images/"), "caption": e["caption"], "image_id": f"synth_{e['image_id']}"}
        for e in train
    ]
    files = {"train": root / "train.json", "val": root / "val.json", "test": root / "test.json", "root": images}
    files["train"].write_text(json.dumps(entries))
    for split in ("val", "test"):
        evaluation = json.loads((synth_data / f"retrieval_{split}.json").read_text())
        rows = [{"image": e["image"].removeprefix("images/"), "caption": e["caption"]} for e in evaluation]
        files[split].write_text(json.dumps(rows))
    return files


def _data_args(files: dict[str, Path]) -> list[str]:
    return [
        "--data.train_files", f"[{files['train']}]",
        "--data.val_file", str(files["val"]),
        "--data.test_file", str(files["test"]),
        "--data.image_root", str(files["root"]),
        "--data.batch_size", "8",
        "--data.eval_batch_size", "8",
        "--data.num_workers", "0",
    ]  # fmt: skip


def _run_args(root: Path) -> list[str]:
    return [
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--trainer.enable_progress_bar", "false",
        "--model.queue_size", "16",
        "--model.k_test", "8",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finetuned(pretrained: Path, public_layout: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`vlalign finetune retrieval` for 4 steps with a validation every 2: best checkpoint, then test."""
    root = tmp_path_factory.mktemp("finetune")
    args = ["finetune", "retrieval", "--config", str(TINY), "--model.init_from", str(pretrained)]
    args += _data_args(public_layout) + _run_args(root)
    args += ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2"]
    assert main(args) == 0
    (results_file,) = sorted(root.rglob("results.json"))
    return {"root": root, "results_file": results_file, "results": json.loads(results_file.read_text())}


# -- data --------------------------------------------------------------------------------------------------------------
def _module(files: dict[str, Path], **overrides: Any) -> RetrievalFinetuneDataModule:
    settings: dict[str, Any] = {
        "train_files": [str(files["train"])],
        "val_file": str(files["val"]),
        "test_file": str(files["test"]),
        "image_root": str(files["root"]),
        "tokenizer": str(files["tokenizer"]),
        "image_size": 32,
        "batch_size": 4,
        "eval_batch_size": 4,
        "num_workers": 0,
        "augment": {"scale": (0.6, 1.0), "randaugment": None},
        **overrides,
    }
    from vlalign.data.transforms import AugmentConfig

    settings["augment"] = AugmentConfig(**settings["augment"])
    return RetrievalFinetuneDataModule(**settings)


def test_training_entries_map_image_ids_and_bad_ones_are_skipped_and_counted(synth_data: Path, tmp_path: Path) -> None:
    images = sorted((synth_data / "images" / "train").glob("*.jpg"))[:3]
    entries = [
        {"image": str(images[0]), "caption": "a red circle", "image_id": "coco_1"},
        {"image": str(images[0]), "caption": "a circle that is red", "image_id": "coco_1"},
        {"image": str(images[1]), "caption": "a blue square", "image_id": 7},
        {"image": str(images[2]), "caption": "a green star"},  # no image_id: its path groups it
        {"image": str(tmp_path / "gone.jpg"), "caption": "a missing file", "image_id": "coco_3"},
        {"image": str(images[1]), "caption": "   ", "image_id": 7},  # empty after cleaning
        {"caption": "no image at all", "image_id": 9},
        {"image": str(images[2]), "caption": "a star on the right", "image_id": "coco_4"},
    ]
    train = tmp_path / "train.json"
    train.write_text(json.dumps(entries))
    files = {"train": train, "val": synth_data / "retrieval_val.json", "test": synth_data / "retrieval_test.json"}
    module = _module(
        {**files, "root": synth_data, "tokenizer": synth_data / "tokenizer"}, batch_size=8, max_skip_fraction=1.0
    )
    module.setup("fit")
    ids = [image_id for _, _, image_id in module.train_dataset.entries]
    assert ids[0] == ids[1] and len({ids[0], ids[2], ids[3], ids[7]}) == 4  # equal ids, equal ints
    (batch,) = list(module.train_dataloader())  # all 8 entries in one batch: 3 bad ones dropped and counted
    assert batch["skipped"] == {"missing_file": 1, "empty_caption": 1, "missing_image": 1}
    assert batch["image"].shape == (5, 3, 32, 32) and batch["input_ids"].shape[0] == 5
    assert sorted(batch["image_ids"].tolist()) == sorted([ids[0], ids[1], ids[2], ids[3], ids[7]])


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"image": "images/test/missing.jpg", "caption": ["a caption"]}, r"entry 1: .*missing\.jpg"),
        ({"image": None, "caption": ["a caption"]}, r"entry 1 has no image path"),
    ],
)
def test_eval_file_with_missing_image_is_an_error_naming_file_and_entry(
    synth_data: Path, tmp_path: Path, entry: dict, expected: str
) -> None:
    good = json.loads((synth_data / "retrieval_test.json").read_text())[0]
    bad = tmp_path / "bad_test.json"
    bad.write_text(json.dumps([good, entry]))
    module = _module(
        {"train": synth_data / "retrieval_train.json", "val": bad, "test": bad, "root": synth_data,
         "tokenizer": synth_data / "tokenizer"}
    )  # fmt: skip
    with pytest.raises(InputFileError, match=expected) as info:
        module.setup("test")
    assert str(bad) in str(info.value)


def test_eval_file_with_empty_caption_list_is_an_error_naming_file_and_entry(synth_data: Path, tmp_path: Path) -> None:
    rows = json.loads((synth_data / "retrieval_test.json").read_text())[:3]
    rows[2]["caption"] = []
    bad = tmp_path / "empty_caption.json"
    bad.write_text(json.dumps(rows))
    module = _module(
        {"train": synth_data / "retrieval_train.json", "val": bad, "test": bad, "root": synth_data,
         "tokenizer": synth_data / "tokenizer"}
    )  # fmt: skip
    with pytest.raises(InputFileError, match=r"entry 2 .*no caption.*an empty list") as info:
        module.setup("test")
    assert str(bad) in str(info.value)


def test_eval_file_error_reaches_the_command_line_as_one_error(
    pretrained: Path, public_layout: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = json.loads(public_layout["test"].read_text())[:2]
    rows[1]["caption"] = []
    bad = tmp_path / "test.json"
    bad.write_text(json.dumps(rows))
    args = ["evaluate", "retrieval", "--model", str(pretrained), "--config", str(TINY)]
    args += _data_args(public_layout) + _run_args(tmp_path) + ["--data.test_file", str(bad)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(bad) in err and "entry 1" in err and "Traceback" not in err


# -- the task module -------------------------------------------------------------------------------------------------
def test_task_builds_twins_from_the_loaded_weights(pretrained: Path) -> None:
    from vlalign.tasks.retrieval import RetrievalTask

    task = RetrievalTask(init_from=str(pretrained), queue_size=16)
    state = torch.load(pretrained, weights_only=True)["state_dict"]
    torch.testing.assert_close(
        task.backbone.vision.vit.patch_embed.proj.weight, state["backbone.vision.vit.patch_embed.proj.weight"]
    )
    for online, twin in task.momentum_pairs():
        for p, p_m in zip(online.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p, p_m) and not p_m.requires_grad and p.requires_grad
    assert task.itc.same_image_positives and task.itc.image_id_queue.shape == (16,)
    assert task.itc.temp.item() == pytest.approx(state["itc.temp"].item())
    assert task.training and not task.backbone.vision_m.training  # teacher without dropout


def test_task_range_errors_name_the_key(pretrained: Path) -> None:
    from vlalign.errors import ConfigError
    from vlalign.tasks.retrieval import RetrievalTask

    with pytest.raises(ConfigError, match="model.k_test must be >= 1"):
        RetrievalTask(init_from=str(pretrained), k_test=0)
    with pytest.raises(ConfigError, match=r"model.momentum must be in \[0, 1\)"):
        RetrievalTask(init_from=str(pretrained), momentum=1.0)
    with pytest.raises(ConfigError, match="model.init_from is required"):
        RetrievalTask()


# -- end to end ---------------------------------------------------------------------------------------------------------
def test_finetune_writes_results_of_the_best_checkpoint(finetuned: dict) -> None:
    results = finetuned["results"]
    assert results["task"] == "retrieval" and results["command"] == "finetune" and results["split"] == "test"
    assert Path(results["checkpoint"]).name.startswith("best-"), "the monitored best checkpoint is tested"
    assert set(METRIC_KEYS) <= set(results["metrics"])
    assert all(0.0 <= value <= 100.0 for value in results["metrics"].values())
    assert results["config"]["model"]["k_test"] == 8 and results["config"]["trainer"]["max_steps"] == 4
    run = finetuned["results_file"].parent
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert list(run.glob("events.out.tfevents.*")), "metrics go to TensorBoard"
    assert results["details"]["num_images"] == 16 and results["details"]["k_test"] == 8


def test_finetuned_checkpoint_is_a_model_vlalign_load_reads(finetuned: dict) -> None:
    import vlalign

    model = vlalign.load(finetuned["results"]["checkpoint"])
    assert model.itc is not None and model.itm is not None
    assert model.config["finetuned"]["task"] == "retrieval" and model.image_size == 32


def test_evaluate_the_finetuned_checkpoint_reproduces_its_test_metrics(
    finetuned: dict, public_layout: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    args = ["evaluate", "retrieval", "--model", finetuned["results"]["checkpoint"], "--config", str(TINY), "--out"]
    args += [str(out)] + _data_args(public_layout) + _run_args(tmp_path)
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == "evaluate" and results["model"] == finetuned["results"]["checkpoint"]
    for key in METRIC_KEYS:
        assert results["metrics"][key] == pytest.approx(finetuned["results"]["metrics"][key], abs=1e-4), key


def test_zero_shot_evaluate_from_a_pretraining_checkpoint(
    pretrained: Path, public_layout: dict[str, Path], tmp_path: Path
) -> None:
    args = ["evaluate", "retrieval", "--model", str(pretrained), "--config", str(TINY), "--split", "val"]
    args += _data_args(public_layout) + _run_args(tmp_path)
    assert main(args) == 0
    (results_file,) = sorted((tmp_path / "runs").rglob("results.json"))
    results = json.loads(results_file.read_text())
    assert results["split"] == "val" and results["model"] == str(pretrained) and results["checkpoint"] is None
    assert {key.replace("test/", "val/") for key in METRIC_KEYS} <= set(results["metrics"])
    assert not list((tmp_path / "runs").rglob("*.ckpt")), "evaluation writes no checkpoint"


def test_training_step_of_an_albef_split_model_keeps_same_image_captions_out_of_the_negatives(
    synth_data: Path, tmp_path: Path
) -> None:
    """From an ALBEF-layout pretraining checkpoint (XMM dropped): ITM never draws a caption or image of the same
    image as a negative, and the step's loss back-propagates into the encoders."""
    from vlalign.objectives.context import StepContext
    from vlalign.tasks.retrieval import RetrievalTask
    from vlalign.testing import tiny_recipe

    tokenizer = load_tokenizer(synth_data / "tokenizer")
    recipe = tiny_recipe("albef", vocab=vocab_info(tokenizer)).eval()
    spec = recipe.model_spec()
    spec["preprocessing"] = Preprocessing(image_size=32, tokenizer_files=tokenizer_files(tokenizer)).to_dict()
    ckpt = tmp_path / "albef.ckpt"
    torch.save({"state_dict": recipe.state_dict(), "vlalign_model": spec}, ckpt)
    task = RetrievalTask(init_from=str(ckpt), queue_size=8)
    objectives = [o["class_path"].rsplit(".", 1)[1] for o in task.model_spec()["init_args"]["objectives"]]
    assert objectives == ["ITC", "ITM"] and not task.backbone.single_stream

    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([5, 5, 6, 7])
    batch = {
        "image": torch.randn(4, 3, 32, 32, generator=g),
        "input_ids": torch.randint(5, len(tokenizer), (4, 6), generator=g),
        "attention_mask": torch.ones(4, 6, dtype=torch.long),
        "image_ids": ids,
    }
    ctx = StepContext(task.backbone, batch, alpha=0.4)
    ctx.published["itc"] = task.itc(ctx).publish
    for _ in range(30):
        drawn = task.itm(ctx).publish
        assert (ids[drawn["negative_image"]] != ids).all() and (ids[drawn["negative_text"]] != ids).all()
    loss = task.training_step(batch, 0)
    assert loss is not None and torch.isfinite(loss)
    loss.backward()
    assert task.backbone.vision.vit.patch_embed.proj.weight.grad is not None
    assert task.backbone.vision_m.vit.patch_embed.proj.weight.grad is None


def test_demo_finetune_reuses_the_demo_checkpoint_and_prints_both_tables(
    pretrained: Path, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make demo-finetune` wiring on a stand-in `make demo` folder (its checkpoint is reused: no pretraining)."""
    from vlalign.cli.demo_finetune import SUMMARY_FILE, run_demo_finetune
    from vlalign.tasks.registry import tasks

    out = tmp_path / "demo_run"
    checkpoints = out / "runs" / "tiny" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(pretrained, checkpoints / "last.ckpt")
    (out / "test_retrieval.json").write_text("{}")  # what a finished `make demo` leaves
    shutil.copytree(synth_data, out / "data")
    small = ["--data.batch_size", "8", "--data.eval_batch_size", "8", "--data.num_workers", "0"]
    small += ["--model.queue_size", "16", "--model.k_test", "8"]
    summary = run_demo_finetune(out, steps=2, threads=None, task_args={"retrieval": small}, progress=False)
    printed = capsys.readouterr().out
    assert summary["pretrained_reused"] and summary["steps"] == {"retrieval": 2}
    assert Path(summary["finetuned_checkpoint"]).is_file()
    assert (out / SUMMARY_FILE).is_file() and (out / "evaluations" / "retrieval_zero_shot" / "results.json").is_file()
    assert "fine-tuned, ITM re-ranked" in printed and "| chance |" in printed
    for label in ("zero-shot", "fine-tuned"):
        assert "test/itm_r_mean" in summary["retrieval"][label] and "test/itc_r_mean" in summary["retrieval"][label]
    if "hardneg" in tasks():
        assert "Hard negatives" in printed and summary["hardneg"]["fine-tuned"]
