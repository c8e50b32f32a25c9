"""SNLI-VE: accuracy against hand computation, label and image-name parsing of the reference layout, bad entries
(skipped and counted in training, named in evaluation), the synthetic hypotheses against an independent reading of
the scene, and `vlalign finetune snli_ve` / `vlalign evaluate snli_ve` end to end on a tiny model, from a pretraining
checkpoint, an exported folder and a checkpoint of the task."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from vlalign.cli.main import main
from vlalign.data.preprocessing import Preprocessing, tokenizer_files
from vlalign.data.synth import Scene, SceneRecord, Shape
from vlalign.data.synth_snli_ve import hypotheses
from vlalign.data.tokenization import load_tokenizer, vocab_info
from vlalign.data.transforms import AugmentConfig
from vlalign.datamodules.classification import EntryProblem
from vlalign.datamodules.snli_ve import SNLIVEDataModule, snli_ve_label
from vlalign.errors import InputFileError
from vlalign.tasks.classification import accuracy_by_index
from vlalign.tasks.snli_ve import SNLIVETask
from vlalign.testing import tiny_recipe

TINY = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "snli_ve_tiny.yaml"
CLASSES = ("contradiction", "neutral", "entailment")


# -- accuracy ----------------------------------------------------------------------------------------------------------
def test_accuracy_counts_each_example_once_and_matches_a_hand_computation() -> None:
    # examples 0..5 with labels [2, 1, 0, 2, 2, 0]; rows 6 and 7 repeat examples 0 and 3 (sampler padding)
    index = torch.tensor([0, 1, 2, 3, 4, 5, 0, 3])
    labels = torch.tensor([2, 1, 0, 2, 2, 0, 2, 2])
    predictions = torch.tensor([2, 0, 0, 1, 2, 0, 2, 1])
    scores = accuracy_by_index(predictions, labels, index, CLASSES)
    # correct: 0 (2=2), 2 (0=0), 4 (2=2), 5 (0=0); wrong: 1, 3 -> 4 of 6
    assert scores["count"] == 6 and scores["accuracy"] == pytest.approx(100 * 4 / 6)
    assert scores["per_class"]["entailment"] == {"accuracy": pytest.approx(100 * 2 / 3), "count": 3}
    assert scores["per_class"]["neutral"] == {"accuracy": 0.0, "count": 1}
    assert scores["per_class"]["contradiction"] == {"accuracy": 100.0, "count": 2}
    assert scores["majority"] == pytest.approx(50.0)
    none = accuracy_by_index(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), CLASSES)
    assert none["per_class"]["neutral"] == {"accuracy": None, "count": 0} and none["accuracy"] == 100.0


# -- data --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"), [("entailment", 2), ("Neutral", 1), (" CONTRADICTION", 0), (2, 2), (0, 0)]
)
def test_labels_read_as_the_reference_encodes_them(value: Any, expected: int) -> None:
    assert snli_ve_label(value) == expected


@pytest.mark.parametrize("value", ["entails", 3, -1, True, None, 1.0])
def test_unknown_labels_are_bad_entries(value: Any) -> None:
    with pytest.raises(EntryProblem) as info:
        snli_ve_label(value)
    assert info.value.reason == "bad_label"


def _module(tokenizer: Path, **overrides: Any) -> SNLIVEDataModule:
    settings: dict[str, Any] = {
        "tokenizer": str(tokenizer),
        "image_size": 32,
        "batch_size": 8,
        "eval_batch_size": 4,
        "num_workers": 0,
        "augment": AugmentConfig(scale=(0.6, 1.0), randaugment=None),
        **overrides,
    }
    return SNLIVEDataModule(**settings)


def test_training_entries_get_their_suffix_and_bad_ones_are_skipped_and_counted(
    synth_data: Path, tmp_path: Path
) -> None:
    keys = [path.stem for path in sorted((synth_data / "images" / "train").glob("*.jpg"))[:3]]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    entries = [
        {"image": keys[0], "sentence": "there is a red circle", "label": "entailment"},  # Flickr-style id, no suffix
        {"image": f"{keys[1]}.jpg", "sentence": "there is a star made of wood", "label": 1},
        {"image": keys[2], "sentence": "a blue square on the left", "label": "contradiction"},
        {"image": "gone", "sentence": "a missing file", "label": "neutral"},
        {"image": "", "sentence": "no image", "label": "neutral"},
        {"image": keys[0], "label": "neutral"},
        {"image": keys[0], "sentence": "an unknown label", "label": "maybe"},
        {"image": str(tmp_path / "broken"), "sentence": "undecodable", "label": 0},
    ]
    train = tmp_path / "ve_train.json"
    train.write_text(json.dumps(entries))
    module = _module(
        synth_data / "tokenizer", train_files=[str(train)], image_root=str(synth_data / "images" / "train")
    )
    module.max_skip_fraction = 1.0
    module.setup("fit")
    (batch,) = list(module.train_dataloader())
    assert batch["skipped"] == {
        "missing_file": 1,
        "missing_image": 1,
        "missing_caption": 1,
        "bad_label": 1,
        "decode_error": 1,
    }
    assert batch["image"].shape == (3, 3, 32, 32)
    assert sorted(batch["label"].tolist()) == [0, 1, 2] and sorted(batch["index"].tolist()) == [0, 1, 2]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"image": "images/test/missing", "sentence": "s", "label": "neutral"}, r"entry 1: .*missing\.jpg"),
        ({"image": 42, "sentence": "s", "label": "neutral"}, r"entry 1 has no image path"),
        ({"image": "images/test/000000096", "sentence": "s", "label": "unknown"}, r"entry 1 has no usable label"),
        ({"image": "images/test/000000096", "sentence": " ", "label": "neutral"}, r"entry 1 has an empty sentence"),
    ],
)
def test_a_bad_evaluation_entry_is_an_error_naming_file_and_entry(
    synth_data: Path, tmp_path: Path, entry: dict, expected: str
) -> None:
    good = json.loads((synth_data / "snli_ve_test.json").read_text())[0]
    bad = tmp_path / "bad_test.json"
    bad.write_text(json.dumps([good, entry]))
    module = _module(synth_data / "tokenizer", val_file=str(bad), image_root=str(synth_data))
    with pytest.raises(InputFileError, match=expected) as info:
        module.setup("validate")
    assert str(bad) in str(info.value)


# -- synthetic hypotheses ------------------------------------------------------------------------------------------
_WHERE = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom",
          "in the centre": "centre"}  # fmt: skip
_COUNT = {"one shape": 1, "two shapes": 2, "three shapes": 3}


def _thing_present(scene: Scene, words: list[str]) -> bool:
    """An independent reading of ``[size] [colour] shape|<kind>`` against the scene."""
    sizes, colours = (
        {"small", "large"},
        {s.colour for s in scene.shapes} | {"red", "green", "blue", "yellow", "orange", "purple", "pink", "black"},
    )
    size = words[0] if words[0] in sizes else None
    rest = words[1:] if size else words
    colour = rest[0] if rest[0] in colours else None
    kind = rest[-1]
    return any(
        (size is None or s.size == size)
        and (colour is None or s.colour == colour)
        and (kind == "shape" or s.shape == kind)
        for s in scene.shapes
    )


def _judge(scene: Scene, sentence: str) -> str:
    """entailment / contradiction / neutral of a synthetic hypothesis, read from the scene independently."""
    if m := re.fullmatch(r"there is an? ([\w ]+?) made of \w+", sentence):
        return "neutral" if _thing_present(scene, m[1].split()) else "contradiction"
    if m := re.fullmatch(r"there (?:is|are) (one shape|two shapes|three shapes)", sentence):
        return "entailment" if len(scene.shapes) == _COUNT[m[1]] else "contradiction"
    if m := re.fullmatch(r"there is an? ([\w ]+)", sentence):
        return "entailment" if _thing_present(scene, m[1].split()) else "contradiction"
    by_colour = {s.colour: s for s in scene.shapes}
    if m := re.fullmatch(r"an? (\w+) \w+ (on the \w+|at the \w+|in the centre)", sentence):
        return "entailment" if by_colour[m[1]].position == _WHERE[m[2]] else "contradiction"
    m = re.fullmatch(r"an? (\w+) \w+ (to the left of|to the right of|above|below) an? (\w+) \w+", sentence)
    assert m, sentence
    a, b = by_colour[m[1]], by_colour[m[3]]
    dx, dy = b.x - a.x, b.y - a.y
    holds = {
        "to the left of": dx > abs(dy),
        "to the right of": -dx > abs(dy),
        "above": dy > abs(dx),
        "below": -dy > abs(dx),
    }
    return "entailment" if holds[m[2]] else "contradiction"


def test_synthetic_hypotheses_have_the_class_the_scene_gives_them(synth_data: Path) -> None:
    scene = Scene("white", (
        Shape("red", "circle", "small", "left", 0.21, 0.5), Shape("blue", "star", "large", "top", 0.5, 0.19),
        Shape("green", "circle", "large", "bottom", 0.49, 0.8),
    ))  # fmt: skip
    for key in range(120):
        entries = hypotheses(SceneRecord(f"{key:09d}", "test", f"images/test/{key:09d}.jpg", scene, ()), seed=3)
        assert sorted(entry["label"] for entry in entries) == ["contradiction", "entailment", "neutral"]
        for entry in entries:
            assert entry["image"] == f"images/test/{key:09d}"  # the reference layout: no suffix
            assert _judge(scene, entry["sentence"]) == entry["label"], entry
    entries = json.loads((synth_data / "snli_ve_train.json").read_text())
    counts = {name: sum(entry["label"] == name for entry in entries) for name in CLASSES}
    assert set(counts.values()) == {80}


# -- the task -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ITC + ITM pretraining checkpoint (32 px, the synthetic tokenizer), no training."""
    tokenizer = load_tokenizer(synth_data / "tokenizer")
    recipe = tiny_recipe("itc_itm", vocab=vocab_info(tokenizer)).eval()
    spec = recipe.model_spec()
    spec["preprocessing"] = Preprocessing(image_size=32, tokenizer_files=tokenizer_files(tokenizer)).to_dict()
    ckpt = tmp_path_factory.mktemp("pretrained") / "pretrain.ckpt"
    torch.save({"state_dict": recipe.state_dict(), "vlalign_model": spec, "global_step": 0, "epoch": 0}, ckpt)
    return ckpt


@pytest.fixture(scope="module")
def public_layout(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The synthetic files as the public ones: Flickr-style image names in one image folder; dev / test cut to 12."""
    root = tmp_path_factory.mktemp("snli_ve_public")
    images = root / "flickr30k-images"
    images.mkdir()
    files = {"root": images}
    for split, name in (("train", "snli_ve_train"), ("dev", "snli_ve_dev"), ("test", "snli_ve_test")):
        entries = json.loads((synth_data / f"{name}.json").read_text())
        for entry in entries:
            shutil.copy(synth_data / f"{entry['image']}.jpg", images / f"{Path(entry['image']).name}.jpg")
            entry["image"] = Path(entry["image"]).name
        files[split] = root / f"ve_{split}.json"
        files[split].write_text(json.dumps(entries if split == "train" else entries[:12]))
    return files


def _args(files: dict[str, Path], root: Path) -> list[str]:
    return [
        "--data.train_files", f"[{files['train']}]", "--data.val_file", str(files["dev"]),
        "--data.test_file", str(files["test"]), "--data.image_root", str(files["root"]),
        "--data.batch_size", "8", "--data.eval_batch_size", "12", "--data.num_workers", "0",
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finetuned(pretrained: Path, public_layout: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`vlalign finetune snli_ve` for 4 steps, dev every 2: the best-by-dev checkpoint tested."""
    root = tmp_path_factory.mktemp("snli_ve_finetune")
    args = ["finetune", "snli_ve", "--config", str(TINY), "--model.init_from", str(pretrained)]
    assert (
        main([*args, *_args(public_layout, root), "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"]) == 0
    )
    (results_file,) = sorted(root.rglob("results.json"))
    return {"results_file": results_file, "results": json.loads(results_file.read_text())}


def test_finetune_writes_results_of_the_best_dev_checkpoint(finetuned: dict) -> None:
    results = finetuned["results"]
    assert results["task"] == "snli_ve" and results["split"] == "test"
    assert Path(results["checkpoint"]).name.startswith("best-")
    assert {f"test/acc{suffix}" for suffix in ("", "_entailment", "_neutral", "_contradiction")} <= set(
        results["metrics"]
    )
    details = results["details"]
    assert details["num_examples"] == 12 and details["chance"] == pytest.approx(100 / 3)
    assert sum(entry["count"] for entry in details["per_class"].values()) == 12
    assert details["accuracy"] == pytest.approx(results["metrics"]["test/acc"], abs=1e-4)
    assert list(finetuned["results_file"].parent.glob("events.out.tfevents.*")), "metrics go to TensorBoard"


def test_evaluate_dev_of_a_finetuned_checkpoint_and_its_head_is_kept(
    finetuned: dict, public_layout: dict[str, Path], tmp_path: Path
) -> None:
    checkpoint = finetuned["results"]["checkpoint"]
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    task = SNLIVETask(init_from=checkpoint)
    torch.testing.assert_close(task.head[0].weight, state["head.0.weight"])
    torch.testing.assert_close(task.head_m[0].weight, state["head.0.weight"])  # teacher = the loaded student
    out = tmp_path / "eval"
    args = ["evaluate", "snli_ve", "--model", checkpoint, "--config", str(TINY), "--split", "val", "--out", str(out)]
    assert main(args + _args(public_layout, tmp_path)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["split"] == "val" and 0.0 <= results["metrics"]["val/acc"] <= 100.0
    assert results["details"]["num_examples"] == 12


def test_starts_from_an_exported_folder(pretrained: Path, tmp_path: Path) -> None:
    from vlalign.cli.inference import export

    export(str(pretrained), str(tmp_path / "exported"))
    task = SNLIVETask(init_from=str(tmp_path / "exported"), distill=False)
    state = torch.load(pretrained, weights_only=True)["state_dict"]
    key = "backbone.stream.encoder.layer.1.crossattention.self.key.weight"
    torch.testing.assert_close(task.state_dict()[key], state[key])
    assert task.head_m is None and task.backbone.stream_m is None  # no teacher without distillation
    assert task.model_spec()["finetuned"]["task"] == "snli_ve" and task.model_spec()["init_args"]["objectives"] == []


def test_full_size_config_carries_the_reference_settings(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    with pytest.raises(SystemExit) as info:
        main(["finetune", "snli_ve", "--config", str(TINY.parent / "snli_ve.yaml"), "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    model, data, trainer = printed["model"], printed["data"], printed["trainer"]
    assert (model["momentum"], model["alpha"], model["alpha_warmup_steps"], model["distill"]) == (0.995, 0.4, 0, True)
    assert (model["optim"]["lr"], model["optim"]["min_lr"]) == (2e-5, 1e-6)
    assert (data["image_size"], data["batch_size"], data["eval_batch_size"], trainer["max_epochs"]) == (384, 32, 64, 5)
    assert trainer["callbacks"][0]["init_args"]["monitor"] == "val/acc"
