"""NLVR2: the two-image stream (weight mapping from the pretrained stream, shared keys / values, alternating images),
the text-assignment draw, the data module on files in the reference layout (bad training entries skipped and
counted, bad evaluation entries named), the synthetic statements against an independent reading of the scenes, and
`vlalign finetune nlvr2` / `vlalign evaluate nlvr2` / the text-assignment pre-stage end to end on a tiny model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vlalign.cli.main import main
from vlalign.data.preprocessing import Preprocessing, tokenizer_files
from vlalign.data.synth import Scene, Shape
from vlalign.data.synth_nlvr2 import statement
from vlalign.data.tokenization import load_tokenizer, vocab_info
from vlalign.data.transforms import AugmentConfig
from vlalign.datamodules.nlvr2 import NLVR2DataModule
from vlalign.errors import InputFileError
from vlalign.models.backbone import make_twin
from vlalign.models.stream import SingleStreamTransformer
from vlalign.models.two_image import TwoImageStream
from vlalign.tasks.nlvr2 import NLVR2Task, text_assignment_pairs
from vlalign.testing import tiny_recipe, tiny_stream

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"
TINY = CONFIGS / "nlvr2_tiny.yaml"
TA_TINY = CONFIGS / "nlvr2_pretrain_ta_tiny.yaml"


# -- the two-image stream -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fusion_layer", "duplicate_from", "sources"),
    [
        (None, None, [0, 1, 2, 2, 3, 3]),  # single stream: lower half kept, upper half duplicated (SIMLA's 6 of 12)
        (2, None, [0, 1, 2, 2, 3, 3]),  # ALBEF split: every fusion layer duplicated
        (None, 1, [0, 1, 1, 2, 2, 3, 3]),
        (None, 4, [0, 1, 2, 3]),  # nothing duplicated: every layer alternates images
    ],
)
def test_expanded_stream_starts_from_the_mapped_pretrained_layers(
    fusion_layer: int | None, duplicate_from: int | None, sources: list[int]
) -> None:
    torch.manual_seed(0)
    base = SingleStreamTransformer(tiny_stream(num_layers=4, fusion_layer=fusion_layer))
    stream = TwoImageStream.from_stream(base, duplicate_from)
    assert stream.layer_sources == sources and stream.config.num_layers == len(sources)
    if fusion_layer is not None:
        assert stream.text_layers == base.text_layers  # the ALBEF text layers are untouched
    own, pretrained = stream.state_dict(), base.state_dict()
    for key, value in own.items():
        match = re.match(r"encoder\.layer\.(\d+)\.(.*)", key)
        source = f"encoder.layer.{sources[int(match[1])]}.{match[2]}" if match else key
        assert torch.equal(value, pretrained[source]), key
    first_fusion = 0 if fusion_layer is None else fusion_layer
    assert [stream.image_of_layer(j) for j in stream.fusion_layers] == [
        (j - first_fusion) % 2 for j in range(first_fusion, len(sources))
    ]


def test_duplicated_pairs_share_keys_and_values_and_nothing_else() -> None:
    base = SingleStreamTransformer(tiny_stream(num_layers=4))
    stream = TwoImageStream.from_stream(base)  # layers 2, 3 from pretrained 2; 4, 5 from pretrained 3
    assert stream.shared_pairs == [2, 4]
    for first in (2, 4):
        a, b = stream.encoder.layer[first], stream.encoder.layer[first + 1]
        assert a.crossattention.self.key is b.crossattention.self.key
        assert a.crossattention.self.value is b.crossattention.self.value
        assert a.crossattention.self.query is not b.crossattention.self.query
        assert a.attention is not b.attention and a.intermediate is not b.intermediate
    layers_0_1 = stream.encoder.layer[0].crossattention.self, stream.encoder.layer[1].crossattention.self
    assert layers_0_1[0].key is not layers_0_1[1].key  # unduplicated layers keep their own projections
    per_layer = sum(p.numel() for p in base.encoder.layer[2].parameters())
    kv = sum(p.numel() for m in (layers_0_1[0].key, layers_0_1[0].value) for p in m.parameters())
    extra = sum(p.numel() for p in stream.parameters()) - sum(p.numel() for p in base.parameters())
    assert extra == 2 * (per_layer - kv)  # two more layers, each without its own keys and values
    twin = make_twin(stream)  # the momentum twin keeps the sharing, in its own tensors
    assert twin.encoder.layer[2].crossattention.self.key is twin.encoder.layer[3].crossattention.self.key
    assert twin.encoder.layer[2].crossattention.self.key is not stream.encoder.layer[2].crossattention.self.key


def test_fuse_pair_is_each_layer_attending_to_its_image() -> None:
    """fuse_pair against a hand-written loop (layer j reads image (j - F) mod 2), with padded text; and with nothing
    duplicated and the same image twice it is the pretrained single-image fusion."""
    torch.manual_seed(1)
    base = SingleStreamTransformer(tiny_stream(num_layers=4, fusion_layer=1)).eval()
    stream = TwoImageStream.from_stream(base).eval()
    ids = torch.randint(5, 60, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    left, right = torch.randn(3, 17, 64), torch.randn(3, 17, 64)
    out = stream.fuse_pair(ids, mask, [left, right]).last_hidden_state
    assert out.shape == (3, 6, 64)
    hidden = stream.encode_text(ids, mask).last_hidden_state
    keep = mask.bool()[:, None, None, :]
    for j in range(1, stream.config.num_layers):
        hidden, _ = stream.encoder.layer[j](hidden, keep, left if (j - 1) % 2 == 0 else right, None, False)
    torch.testing.assert_close(out, hidden)
    swapped = stream.fuse_pair(ids, mask, [right, left]).last_hidden_state
    assert not torch.allclose(out, swapped, atol=1e-4)  # the order of the images matters

    plain = TwoImageStream.from_stream(base, duplicate_from=4).eval()
    same = plain.fuse_pair(ids, mask, [left, left]).last_hidden_state
    torch.testing.assert_close(same, base.fuse(mask, left, input_ids=ids).last_hidden_state)


# -- the text-assignment draw ------------------------------------------------------------------------------------------
def test_text_assignment_pairs_follow_their_labels_and_probabilities() -> None:
    rows = 3000
    g = torch.Generator().manual_seed(0)
    image_ids = torch.arange(rows) // 2  # captions 2k and 2k+1 show the same image
    left, right, label = text_assignment_pairs(torch.zeros(rows, rows), image_ids, generator=g)
    own = torch.arange(rows)
    assert (
        torch.equal(left[label == 0], own[label == 0]) and (image_ids[right[label == 0]] != image_ids[label == 0]).all()
    )
    assert (
        torch.equal(right[label == 1], own[label == 1]) and (image_ids[left[label == 1]] != image_ids[label == 1]).all()
    )
    neither = label == 2
    assert (image_ids[left[neither]] != image_ids[neither]).all() and (
        image_ids[right[neither]] != image_ids[neither]
    ).all()
    assert (left[neither] != right[neither]).all()
    shares = torch.bincount(label, minlength=3).float() / rows
    torch.testing.assert_close(shares, torch.full((3,), 1 / 3), atol=0.03, rtol=0)

    peaked = torch.full((4, 4), -1e4)  # row b prefers image (b + 1) mod 4 overwhelmingly
    peaked[torch.arange(4), (torch.arange(4) + 1) % 4] = 0.0
    left, right, label = text_assignment_pairs(peaked, generator=g)
    other = torch.where(label == 0, right, left)
    assert torch.equal(other[label < 2], ((torch.arange(4) + 1) % 4)[label < 2])


# -- data --------------------------------------------------------------------------------------------------------------
def _module(tokenizer: Path, **overrides: Any) -> NLVR2DataModule:
    settings: dict[str, Any] = {
        "tokenizer": str(tokenizer),
        "image_size": 32,
        "batch_size": 8,
        "eval_batch_size": 4,
        "num_workers": 0,
        "augment": AugmentConfig(scale=(0.6, 1.0), randaugment=None, swap_left_right=False),
        **overrides,
    }
    return NLVR2DataModule(**settings)


def test_training_entries_are_read_and_bad_ones_skipped_and_counted(synth_data: Path, tmp_path: Path) -> None:
    images = sorted((synth_data / "images" / "train").glob("*.jpg"))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    good = [images[0].name, images[1].name]
    entries = [
        {"images": good, "sentence": "there is a circle in the left picture", "label": "True"},
        {"images": good, "sentence": "there is a star in both pictures", "label": False},
        {"images": [images[2].name], "sentence": "one image only", "label": "True"},
        {"images": [images[2].name, "gone.jpg"], "sentence": "a missing file", "label": "True"},
        {"images": good, "sentence": "a label nobody knows", "label": "maybe"},
        {"images": good, "sentence": "  ?? ", "label": "False"},
        {"images": [images[3].name, str(tmp_path / "broken.png")], "sentence": "undecodable", "label": 1},
        {
            "images": [images[3].name, images[4].name],
            "sentence": "there are two shapes in the right picture",
            "label": 0,
        },
    ]
    train = tmp_path / "train.json"
    train.write_text(json.dumps(entries))
    module = _module(synth_data / "tokenizer", train_files=[str(train)], image_root=str(images[0].parent))
    module.max_skip_fraction = 1.0
    module.setup("fit")
    (batch,) = list(module.train_dataloader())
    assert batch["skipped"] == {
        "missing_image": 1,
        "missing_file": 1,
        "bad_label": 1,
        "empty_caption": 1,
        "decode_error": 1,
    }
    assert batch["images"].shape == (3, 2, 3, 32, 32)
    assert sorted(batch["label"].tolist()) == [0, 0, 1] and sorted(batch["index"].tolist()) == [0, 1, 7]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"images": ["images/test/000000096.jpg", "images/test/missing.jpg"], "sentence": "s", "label": "True"},
         r"entry 1: .*missing\.jpg"),
        ({"images": ["images/test/000000096.jpg"], "sentence": "s", "label": "True"}, r"entry 1 has no image pair"),
        ({"images": ["images/test/000000096.jpg"] * 2, "sentence": "s", "label": "yes"}, r"entry 1 has no usable label"),
        ({"images": ["images/test/000000096.jpg"] * 2, "label": "True"}, r"entry 1 has no sentence"),
    ],
)  # fmt: skip
def test_a_bad_evaluation_entry_is_an_error_naming_file_and_entry(
    synth_data: Path, tmp_path: Path, entry: dict, expected: str
) -> None:
    good = json.loads((synth_data / "nlvr2_test.json").read_text())[0]
    bad = tmp_path / "bad_test.json"
    bad.write_text(json.dumps([good, entry]))
    module = _module(synth_data / "tokenizer", test_file=str(bad), image_root=str(synth_data))
    with pytest.raises(InputFileError, match=expected) as info:
        module.setup("test")
    assert str(bad) in str(info.value)


# -- synthetic statements --------------------------------------------------------------------------------------------
_PHRASE = r"(one shape|two shapes|three shapes|an? \w+(?: \w+)?)"


def _has(scene: Scene, phrase: str) -> bool:
    """An independent reading of a noun phrase against a scene."""
    counts = {"one shape": 1, "two shapes": 2, "three shapes": 3}
    if phrase in counts:
        return len(scene.shapes) == counts[phrase]
    words = phrase.split()[1:]
    if words[-1] == "shape":
        return any(s.colour == words[0] for s in scene.shapes)
    if len(words) == 1:
        return any(s.shape == words[0] for s in scene.shapes)
    return any((s.colour, s.shape) == (words[0], words[1]) for s in scene.shapes)


def _read(sentence: str, left: Scene, right: Scene) -> bool:
    if m := re.fullmatch(
        rf"there (?:is|are) {_PHRASE} in the left picture and {_PHRASE} in the right picture", sentence
    ):
        return _has(left, m[1]) and _has(right, m[2])
    if m := re.fullmatch(rf"there (?:is|are) {_PHRASE} in the (left|right) picture", sentence):
        return _has(left if m[2] == "left" else right, m[1])
    if m := re.fullmatch(rf"there (?:is|are) {_PHRASE} in both pictures", sentence):
        return _has(left, m[1]) and _has(right, m[1])
    m = re.fullmatch(rf"there (?:is|are) {_PHRASE} in only one picture", sentence)
    assert m, sentence
    return _has(left, m[1]) != _has(right, m[1])


def test_synthetic_statements_are_true_or_false_of_the_pair_as_labelled(synth_data: Path) -> None:
    left = Scene(
        "white", (Shape("red", "circle", "small", "left", 0.2, 0.5), Shape("blue", "star", "large", "top", 0.5, 0.2))
    )
    right = Scene("grey", (Shape("red", "square", "large", "centre", 0.5, 0.5),))
    rng = np.random.default_rng(0)
    for wanted in [True, False] * 150:
        sentence, label = statement(left, right, wanted, rng)
        assert label == wanted and _read(sentence, left, right) == wanted, sentence
    for split, name in (("train", "nlvr2_train.json"), ("val", "nlvr2_dev.json"), ("test", "nlvr2_test.json")):
        entries = json.loads((synth_data / name).read_text())
        labels = [entry["label"] for entry in entries]
        assert labels.count("True") == labels.count("False") == len(entries) // 2 > 0, split
        assert all(entry["images"][0].startswith(f"images/{split}/") for entry in entries)


# -- the task -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny single-stream ITC + ITM pretraining checkpoint (32 px, the synthetic tokenizer), no training."""
    tokenizer = load_tokenizer(synth_data / "tokenizer")
    recipe = tiny_recipe("itc_itm", vocab=vocab_info(tokenizer), stream={"num_layers": 4}).eval()
    spec = recipe.model_spec()
    spec["preprocessing"] = Preprocessing(image_size=32, tokenizer_files=tokenizer_files(tokenizer)).to_dict()
    ckpt = tmp_path_factory.mktemp("pretrained") / "pretrain.ckpt"
    torch.save({"state_dict": recipe.state_dict(), "vlalign_model": spec}, ckpt)
    return ckpt


@pytest.fixture(scope="module")
def public_layout(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The synthetic NLVR2 files as the public ones: image paths relative to an image root elsewhere; dev and test-P
    cut to 16 entries."""
    root = tmp_path_factory.mktemp("nlvr2_public")
    shutil.copytree(synth_data / "images", root / "img")
    files = {"root": root / "img"}
    for split, name in (("train", "nlvr2_train"), ("dev", "nlvr2_dev"), ("test", "nlvr2_test")):
        entries = json.loads((synth_data / f"{name}.json").read_text())
        for entry in entries:
            entry["images"] = [path.removeprefix("images/") for path in entry["images"]]
        files[split] = root / f"nlvr_{split}.json"
        files[split].write_text(json.dumps(entries if split == "train" else entries[:16]))
    return files


def _args(files: dict[str, Path], root: Path) -> list[str]:
    return [
        "--data.train_files", f"[{files['train']}]", "--data.val_file", str(files["dev"]),
        "--data.test_file", str(files["test"]), "--data.image_root", str(files["root"]),
        "--data.batch_size", "8", "--data.eval_batch_size", "16", "--data.num_workers", "0",
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finetuned(pretrained: Path, public_layout: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`vlalign finetune nlvr2` for 4 steps, dev every 2: the best-by-dev checkpoint tested on test-P."""
    root = tmp_path_factory.mktemp("nlvr2_finetune")
    args = [
        "finetune",
        "nlvr2",
        "--config",
        str(TINY),
        "--model.init_from",
        str(pretrained),
        *_args(public_layout, root),
    ]
    assert main([*args, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"]) == 0
    (results_file,) = sorted(root.rglob("results.json"))
    return {"results_file": results_file, "results": json.loads(results_file.read_text())}


def test_teacher_starts_as_the_loaded_weights(pretrained: Path) -> None:
    task = NLVR2Task(init_from=str(pretrained))
    state = torch.load(pretrained, weights_only=True)["state_dict"]
    torch.testing.assert_close(
        task.backbone.vision.vit.patch_embed.proj.weight, state["backbone.vision.vit.patch_embed.proj.weight"]
    )
    torch.testing.assert_close(  # expanded layer 3 is pretrained layer 2
        task.backbone.stream.encoder.layer[3].attention.self.query.weight,
        state["backbone.stream.encoder.layer.2.attention.self.query.weight"],
    )
    for online, twin in task.momentum_pairs():
        for p, p_m in zip(online.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p, p_m) and not p_m.requires_grad and p.requires_grad
    assert task.backbone.stream.training and not task.backbone.stream_m.training and not task.head_m.training


def test_finetune_writes_results_of_the_best_dev_checkpoint_on_test_p(finetuned: dict) -> None:
    results = finetuned["results"]
    assert results["task"] == "nlvr2" and results["split"] == "test"
    assert Path(results["checkpoint"]).name.startswith("best-"), "the best checkpoint by dev accuracy is tested"
    assert {"test/acc", "test/acc_true", "test/acc_false"} <= set(results["metrics"])
    assert 0.0 <= results["metrics"]["test/acc"] <= 100.0
    details = results["details"]
    assert details["num_examples"] == 16 and details["chance"] == 50.0 and len(details["val_history"]) == 2
    assert list(finetuned["results_file"].parent.glob("events.out.tfevents.*")), "metrics go to TensorBoard"


def test_evaluate_a_finetuned_checkpoint_reproduces_its_test_accuracy(
    finetuned: dict, public_layout: dict[str, Path], tmp_path: Path
) -> None:
    checkpoint = finetuned["results"]["checkpoint"]
    task = NLVR2Task(init_from=checkpoint)  # a checkpoint of this task: stream as recorded, head and teacher loaded
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    torch.testing.assert_close(task.head[2].weight, state["head.2.weight"])
    torch.testing.assert_close(task.head_m[2].weight, state["head.2.weight"])
    out = tmp_path / "eval"
    args = ["evaluate", "nlvr2", "--model", checkpoint, "--config", str(TINY), "--out", str(out)]
    assert main(args + _args(public_layout, tmp_path)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["test/acc"] == pytest.approx(finetuned["results"]["metrics"]["test/acc"], abs=1e-4)


def test_text_assignment_stage_then_nlvr2_from_its_checkpoint(
    pretrained: Path, synth_data: Path, public_layout: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "ta"
    args = ["finetune", "nlvr2", "--config", str(TA_TINY), "--model.init_from", str(pretrained)]
    args += [
        "--data.ta_files", f"[{synth_data / 'pretrain.json'}]", "--data.batch_size", "8", "--data.num_workers", "0",
        "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root / "runs"), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    assert main(args) == 0
    (ta_checkpoint,) = sorted(root.rglob("last.ckpt"))
    saved = torch.load(ta_checkpoint, weights_only=True)
    assert (
        saved["vlalign_model"]["finetuned"]["stage"] == "text_assignment"
        and saved["state_dict"]["head.weight"].shape[0] == 3
    )
    task = NLVR2Task(init_from=str(ta_checkpoint))
    key = "backbone.stream.encoder.layer.5.crossattention.self.query.weight"
    torch.testing.assert_close(task.state_dict()[key], saved["state_dict"][key])
    assert task.head[2].out_features == 2 and task.stage == "nlvr2"


def test_a_bad_test_file_reaches_the_command_line_as_one_error(
    pretrained: Path, public_layout: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = json.loads(public_layout["test"].read_text())[:2]
    rows[1]["label"] = "perhaps"
    bad = tmp_path / "test.json"
    bad.write_text(json.dumps(rows))
    args = ["evaluate", "nlvr2", "--model", str(pretrained), "--config", str(TINY), *_args(public_layout, tmp_path)]
    assert main([*args, "--data.test_file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(bad) in err and "entry 1" in err and "Traceback" not in err


# -- configs ------------------------------------------------------------------------------------------------------------
def _printed(config: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    import yaml

    with pytest.raises(SystemExit) as info:
        main(["finetune", "nlvr2", "--config", str(config), "--print_config"])
    assert info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_full_size_configs_carry_the_reference_settings(capsys: pytest.CaptureFixture[str]) -> None:
    printed = _printed(CONFIGS / "nlvr2.yaml", capsys)
    model, data, trainer = printed["model"], printed["data"], printed["trainer"]
    assert (model["stage"], model["momentum"], model["alpha"], model["alpha_warmup_steps"]) == (
        "nlvr2",
        0.995,
        0.4,
        None,
    )
    assert (model["optim"]["lr"], model["optim"]["min_lr"], model["optim"]["warmup_lr"]) == (2e-5, 1e-6, 1e-5)
    assert (data["image_size"], data["batch_size"], trainer["max_epochs"]) == (384, 8, 10)
    assert trainer["callbacks"][0]["init_args"]["monitor"] == "val/acc" and not data["augment"]["swap_left_right"]
    ta = _printed(CONFIGS / "nlvr2_pretrain_ta.yaml", capsys)
    assert (ta["model"]["stage"], ta["model"]["distill"], ta["trainer"]["max_epochs"]) == ("text_assignment", False, 1)
    assert (ta["data"]["image_size"], ta["data"]["batch_size"], ta["data"]["train_files"]) == (256, 64, None)
    assert all("ModelCheckpoint" not in c["class_path"] for c in ta["trainer"]["callbacks"])
