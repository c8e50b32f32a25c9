"""Weakly-supervised grounding: IoU, proposal ranking and Grad-CAM math against hand computations, the data module on
files in the RefCOCO+ layout (bad entries skipped and counted in training, named in evaluation), the synthetic
grounding files, `vlalign finetune grounding` / `vlalign evaluate grounding` end to end on a tiny model (results.json,
pictures) and `heatmap()` on a model `vlalign.load` returns."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vlalign.cli.main import main
from vlalign.data.preprocessing import Preprocessing, tokenizer_files
from vlalign.data.tokenization import load_tokenizer, vocab_info
from vlalign.datamodules.grounding import GroundingDataModule
from vlalign.errors import InputFileError
from vlalign.evaluation.grounding import (
    box_iou,
    box_scores,
    cross_attention_gradcam,
    predict_boxes,
    resolve_gradcam_layer,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = CONFIGS / "finetune" / "grounding_tiny.yaml"
SPLITS = ("testA", "testB")


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
    """The synthetic grounding files as the ALBEF data ships them: images under their own root, training entries
    ``{image, text, ref_id}``, one test file ``{ref_id, image, text}`` for testA and testB whose boxes, image ids and
    splits come from a refer-toolkit export (refs.json), a val file with inline boxes, and dets.json."""
    root = tmp_path_factory.mktemp("refcoco")
    images = root / "coco"
    shutil.copytree(synth_data / "images", images)

    def rebased(entry: dict) -> dict:
        return {**entry, "image": entry["image"].removeprefix("images/")}

    files = {"root": images, "dets": root / "dets.json", "refs": root / "refs.json"}
    train = json.loads((synth_data / "grounding_train.json").read_text())
    files["train"] = root / "refcoco+_train.json"
    files["train"].write_text(json.dumps([rebased(e) for e in train]))
    val = json.loads((synth_data / "grounding_val.json").read_text())
    files["val"] = root / "refcoco+_val.json"
    files["val"].write_text(json.dumps([{k: v for k, v in rebased(e).items() if k != "split"} for e in val]))
    test = [e for split in SPLITS for e in json.loads((synth_data / f"grounding_{split}.json").read_text())]
    files["test"] = root / "refcoco+_test.json"
    files["test"].write_text(json.dumps([{k: rebased(e)[k] for k in ("ref_id", "image", "text")} for e in test]))
    refs = [{k: e[k] for k in ("ref_id", "image_id", "split", "bbox")} for e in test]
    files["refs"].write_text(json.dumps(refs))
    shutil.copy(synth_data / "grounding_dets.json", files["dets"])
    files["expressions"] = {
        split: len(json.loads((synth_data / f"grounding_{split}.json").read_text())) for split in SPLITS
    }  # type: ignore[assignment]
    return files


def _data_args(files: dict[str, Any]) -> list[str]:
    return [
        "--data.train_files", f"[{files['train']}]",
        "--data.val_file", str(files["val"]),
        "--data.test_files", json.dumps({"test": str(files["test"])}),
        "--data.dets_file", str(files["dets"]),
        "--data.refs_file", str(files["refs"]),
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
        "--model.picture_expressions", "2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finetuned(pretrained: Path, public_layout: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`vlalign finetune grounding` for 4 steps with a validation every 2: best checkpoint, then test."""
    root = tmp_path_factory.mktemp("finetune")
    args = ["finetune", "grounding", "--config", str(TINY), "--model.init_from", str(pretrained)]
    args += _data_args(public_layout) + _run_args(root)
    args += ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2"]
    assert main(args) == 0
    (results_file,) = sorted(root.rglob("results.json"))
    return {"root": root, "results_file": results_file, "results": json.loads(results_file.read_text())}


# -- boxes and ranking -------------------------------------------------------------------------------------------------
def test_box_iou_matches_hand_computed_values() -> None:
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [1, 2, 3, 4]])
    b = torch.tensor([[0.0, 0, 10, 10], [5, 0, 10, 10], [2, 2, 4, 4], [10, 0, 5, 5], [2, 3, 3, 4]])
    # identical; half overlap 50 / (100 + 100 - 50); contained 16 / 100; touching edges; 2 x 3 of 12 + 12 - 6
    expected = torch.tensor([1.0, 50 / 150, 16 / 100, 0.0, 6 / 18])
    torch.testing.assert_close(box_iou(a, b), expected)
    torch.testing.assert_close(box_iou(b, a), expected)  # symmetric
    pairs = box_iou(a[:, None], b[None])  # broadcasts to every pair
    assert pairs.shape == (5, 5) and pairs[1, 1] == pytest.approx(50 / 150)


def test_box_scores_are_integer_slice_sums_over_sqrt_area() -> None:
    heat = torch.arange(48, dtype=torch.float32).reshape(6, 8) / 10
    boxes = torch.tensor(
        [
            [1.7, 2.2, 3.1, 2.9],  # rows int(2.2)=2 .. int(5.1)=5, columns 1 .. int(4.8)=4
            [0.0, 0.0, 8.0, 6.0],  # the whole map
            [6.5, 4.0, 5.0, 5.0],  # runs off the right and bottom edges: clipped, area as given
            [2.0, 1.0, 0.0, 3.0],  # zero width: never picked
        ]
    )
    numpy_heat = heat.numpy()
    by_hand = [
        numpy_heat[2:5, 1:4].sum() / math.sqrt(3.1 * 2.9),
        numpy_heat.sum() / math.sqrt(48.0),
        numpy_heat[4:6, 6:8].sum() / math.sqrt(25.0),
    ]
    scores = box_scores(heat, boxes)
    torch.testing.assert_close(scores[:3], torch.tensor(by_hand, dtype=torch.float32))
    assert scores[3] == -math.inf
    linear = box_scores(heat, boxes[:2], exponent=1.0)  # the exponent is the area normalisation
    assert linear[1] == pytest.approx(float(numpy_heat.sum() / 48.0), rel=1e-6)


def test_predict_boxes_prefers_heat_per_sqrt_area_and_skips_padding() -> None:
    heat = torch.zeros(2, 8, 8)
    heat[:, 2:4, 5:7] = 1.0  # a hot 2 x 2 block at rows 2-3, columns 5-6
    proposals = torch.tensor(
        [
            [[0.0, 0, 8, 8], [5, 2, 2, 2], [0, 0, 2, 2], [0, 0, 1, 1]],  # whole map 4/8, tight 4/2, cold 0
            [[0.0, 0, 8, 8], [0, 0, 2, 2], [5, 2, 2, 2], [5, 2, 2, 2]],  # the tight box is padding here
        ]
    )
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    sizes = torch.tensor([[8, 8], [8, 8]])  # the map's own size: upsampling changes nothing
    assert predict_boxes(heat, sizes, proposals, valid).tolist() == [1, 0]
    # a larger image: the 8 x 8 map is upsampled (bicubic) to 16 x 16 and boxes are in its pixels
    bigger = proposals * 2
    assert predict_boxes(heat, torch.tensor([[16, 16], [16, 16]]), bigger, valid).tolist() == [1, 0]


# -- Grad-CAM -----------------------------------------------------------------------------------------------------------
def test_gradcam_map_equals_hand_computed_relu_weighted_attention(pretrained: Path, synth_data: Path) -> None:
    """A and G are taken independently: the test recomputes the layer's cross-attention from its weights, feeds the
    rest of the stream a detached copy of the probabilities and back-propagates the match logits into it."""
    import vlalign

    model = vlalign.load(pretrained)
    backbone, head = model.backbone, model.itm.itm_head
    layer = resolve_gradcam_layer(backbone.stream, -1)
    core = backbone.stream.encoder.layer[layer].crossattention.self
    images = torch.stack([model.preprocess_image(p) for p in sorted((synth_data / "images" / "val").glob("*.jpg"))[:3]])
    ids, mask = model.tokenize(["the red circle on the left", "the small blue square", "the star"])
    assert mask.sum(1).tolist()[2] < mask.shape[1], "one expression is padded"

    maps, logits = cross_attention_gradcam(backbone, head, images, ids, mask, layer)

    kept: dict[str, torch.Tensor] = {}

    def explicit(module, args, output):  # noqa: ANN001, ANN202 - a forward hook
        hidden, context = args[0], args[1]
        q, k, v = (
            module._heads(proj(x))
            for proj, x in ((module.query, hidden), (module.key, context), (module.value, context))
        )
        probs = ((q @ k.transpose(-1, -2)) / math.sqrt(module.head_dim)).softmax(-1)
        kept["A"] = probs.detach().requires_grad_(True)
        return (kept["A"] @ v).transpose(1, 2).flatten(2), None

    handle = core.register_forward_hook(explicit)
    try:
        fused = backbone.fuse(ids, mask, backbone.vision(images))
    finally:
        handle.remove()
    reference_logits = head(fused.last_hidden_state[:, 0])[:, 1]
    reference_logits.sum().backward()
    A, G = kept["A"].detach(), kept["A"].grad
    torch.testing.assert_close(logits, reference_logits.detach())

    grid = backbone.vision.grid_size
    heads, patches = A.shape[1], grid[0] * grid[1]
    expected = torch.zeros(A.shape[0], patches)
    for b in range(A.shape[0]):
        tokens = [t for t in range(A.shape[2]) if mask[b, t]]
        for t in tokens:
            for h in range(heads):
                expected[b] += A[b, h, t, 1:] * G[b, h, t, 1:].clamp(min=0) / heads
        expected[b] /= len(tokens)
    torch.testing.assert_close(maps, expected.view(-1, *grid), rtol=1e-4, atol=1e-9)
    assert expected.abs().sum() > 0 and (G < 0).any(), "the check sees real, signed gradients"


def test_gradcam_layer_must_cross_attend(pretrained: Path) -> None:
    import vlalign

    stream = vlalign.load(pretrained).backbone.stream  # 2 single-stream layers
    assert resolve_gradcam_layer(stream, None) == 1 and resolve_gradcam_layer(stream, -2) == 0
    with pytest.raises(ValueError, match=r"model.gradcam_layer=2: .* one of 0..1"):
        resolve_gradcam_layer(stream, 2, key="model.gradcam_layer")


# -- configs ------------------------------------------------------------------------------------------------------------
def _printed(config: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    import yaml

    with pytest.raises(SystemExit) as info:
        main(["finetune", "grounding", "--config", str(config), "--print_config"])
    assert info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_configs_carry_the_reference_settings_and_the_tiny_one_its_own_splits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    full = _printed(CONFIGS / "finetune" / "grounding.yaml", capsys)
    model, data, trainer = full["model"], full["data"], full["trainer"]
    assert (model["gradcam_layer"], model["area_exponent"], model["iou_threshold"]) == (8, 0.5, 0.5)
    assert (model["queue_size"], model["momentum"], model["alpha"], trainer["max_epochs"]) == (65536, 0.995, 0.4, 5)
    assert model["optim"]["lr"] == 1e-5 and model["optim"]["min_lr"] == 1e-6
    assert (data["batch_size"], data["image_size"]) == (32, 384)
    assert trainer["callbacks"][0]["init_args"]["monitor"] == "val/acc"
    tiny = _printed(TINY, capsys)
    assert tiny["data"]["test_files"] == {
        "testA": "demo_run/data/grounding_testA.json",
        "testB": "demo_run/data/grounding_testB.json",
    }, "a split map replaces the full config's, it is not merged into it"
    assert tiny["model"]["gradcam_layer"] is None and tiny["model"]["alpha"] == 0.4


# -- data ---------------------------------------------------------------------------------------------------------------
def _module(files: dict[str, Any], synth_data: Path, **overrides: Any) -> GroundingDataModule:
    from vlalign.data.transforms import AugmentConfig

    settings: dict[str, Any] = {
        "train_files": [str(files["train"])],
        "val_file": str(files["val"]),
        "test_files": {"test": str(files["test"])},
        "dets_file": str(files["dets"]),
        "refs_file": str(files["refs"]),
        "image_root": str(files["root"]),
        "tokenizer": str(synth_data / "tokenizer"),
        "image_size": 32,
        "batch_size": 4,
        "eval_batch_size": 4,
        "num_workers": 0,
        "augment": AugmentConfig(scale=(0.6, 1.0), randaugment=None),
        **overrides,
    }
    return GroundingDataModule(**settings)


def test_test_entries_take_boxes_ids_and_splits_from_the_refs_export(
    public_layout: dict[str, Any], synth_data: Path
) -> None:
    module = _module(public_layout, synth_data)
    module.setup("test")
    dataset = module.test_dataset
    assert dataset.splits == list(SPLITS)
    counts = {split: sum(e.split == split for e in dataset.entries) for split in SPLITS}
    assert counts == public_layout["expressions"]
    batch = next(iter(module.test_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["size"].tolist()[0] == [64, 64]
    assert batch["proposals"].shape[0] == 4 and batch["proposal_mask"].any(1).all()
    first = json.loads((synth_data / "grounding_testA.json").read_text())[0]
    assert batch["box"][0].tolist() == pytest.approx(first["bbox"]) and dataset.entries[0].image_id == str(
        first["image_id"]
    )


def test_training_entries_group_by_image_file_and_bad_ones_are_skipped_and_counted(
    public_layout: dict[str, Any], synth_data: Path, tmp_path: Path
) -> None:
    train = json.loads(public_layout["train"].read_text())
    images = sorted({e["image"] for e in train})[:3]
    entries = [
        {"image": images[0], "text": "the red circle"},
        {"image": images[0], "text": "the blue square"},
        {"image": images[1], "caption": "the green star"},  # `caption` is read when `text` is absent
        {"image": images[2], "text": "the pink triangle"},
        {"image": "train/gone.jpg", "text": "a missing file"},
        {"image": images[1], "text": "   "},  # empty after cleaning
        {"text": "no image at all"},
        {"image": images[2]},  # no text
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(entries))
    module = _module({**public_layout, "train": path}, synth_data, batch_size=8, max_skip_fraction=1.0)
    module.setup("fit")
    ids = [image_id for _, _, image_id in module.train_dataset.entries]
    assert ids[0] == ids[1] and ids[3] == ids[7] and len({ids[0], ids[2], ids[3]}) == 3  # the image file is the id
    (batch,) = list(module.train_dataloader())
    assert batch["skipped"] == {"missing_file": 1, "empty_caption": 1, "missing_image": 1, "missing_caption": 1}
    assert batch["image"].shape == (4, 3, 32, 32) and sorted(batch["image_ids"].tolist()) == sorted(ids[:4])


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"bbox": None}, r"entry 1 \(ref_id 7\) .*no true box.*not in data.refs_file"),
        ({"bbox": [1, 2, 0, 4]}, r"entry 1 \(ref_id 7\) .*bbox must be \[x, y, w, h\]"),
        ({"image_id": 999999}, r"entry 1 \(ref_id 7\) .*no proposals for image id '999999'"),
        ({"image": None}, r"entry 1 \(ref_id 7\) has no image path"),
        ({"text": ""}, r"entry 1 \(ref_id 7\) .*has no expression"),
        ({"image": "val/missing.jpg"}, r"entry 1: .*missing\.jpg"),
    ],
)
def test_bad_evaluation_entry_is_an_error_naming_file_and_entry(
    public_layout: dict[str, Any], synth_data: Path, tmp_path: Path, change: dict, expected: str
) -> None:
    rows = json.loads(public_layout["val"].read_text())[:2]
    rows[1] = {**rows[1], "ref_id": 7, **change}
    rows[1] = {k: v for k, v in rows[1].items() if v is not None}
    bad = tmp_path / "bad_val.json"
    bad.write_text(json.dumps(rows))
    module = _module({**public_layout, "val": bad}, synth_data)
    with pytest.raises(InputFileError, match=expected) as info:
        module.setup("validate")
    assert str(bad) in str(info.value)


def test_evaluation_error_reaches_the_command_line_as_one_error(
    pretrained: Path, public_layout: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = json.loads(public_layout["test"].read_text())[:2]
    rows[1]["ref_id"] = -5  # in no refs export: no box
    bad = tmp_path / "test.json"
    bad.write_text(json.dumps(rows))
    args = ["evaluate", "grounding", "--model", str(pretrained), "--config", str(TINY)]
    args += _data_args(public_layout) + _run_args(tmp_path) + ["--data.test_files", json.dumps({"test": str(bad)})]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(bad) in err and "entry 1" in err and "Traceback" not in err


# -- synthetic files ----------------------------------------------------------------------------------------------------
def test_synthetic_expressions_use_caption_words_and_boxes_are_among_the_proposals(synth_data: Path) -> None:
    captions = json.loads((synth_data / "retrieval_train.json").read_text())
    vocabulary = {word for entry in captions for word in entry["caption"].split()}
    dets = json.loads((synth_data / "grounding_dets.json").read_text())
    for split in ("val", *SPLITS):
        entries = json.loads((synth_data / f"grounding_{split}.json").read_text())
        assert entries and all(e["split"] == split for e in entries)
        for entry in entries:
            assert set(entry["text"].split()) <= vocabulary, entry["text"]
            proposals = dets[str(entry["image_id"])]
            assert entry["bbox"] in proposals, "the true box is one of the proposals"
            assert entry["image"].startswith("images/test/" if split in SPLITS else "images/val/")
            if split in SPLITS:  # shapes' boxes + one jittered copy each + 2 random: testB holds the 3-shape images
                assert (len(proposals) == 3 * 2 + 2) == (split == "testB")


def test_synthetic_box_encloses_the_drawn_shape(synth_data: Path) -> None:
    """Pixels far from the background colour lie inside the boxes of the image's shapes (one-shape images)."""
    dets = json.loads((synth_data / "grounding_dets.json").read_text())
    checked = 0
    for entry in json.loads((synth_data / "grounding_testA.json").read_text()):
        if len(dets[str(entry["image_id"])]) != 1 * 2 + 2:
            continue
        pixels = np.asarray(Image.open(synth_data / entry["image"]).convert("RGB"), dtype=np.float32)
        background = np.median(pixels.reshape(-1, 3), axis=0)
        ys, xs = np.nonzero(np.abs(pixels - background).sum(-1) > 150)
        x, y, w, h = entry["bbox"]
        assert xs.min() >= x - 1.5 and xs.max() <= x + w + 1.5 and ys.min() >= y - 1.5 and ys.max() <= y + h + 1.5
        checked += 1
    assert checked > 0


# -- end to end ---------------------------------------------------------------------------------------------------------
def test_finetune_writes_accuracy_per_split_chance_and_pictures(finetuned: dict, public_layout: dict[str, Any]) -> None:
    results = finetuned["results"]
    assert results["task"] == "grounding" and results["command"] == "finetune" and results["split"] == "test"
    assert Path(results["checkpoint"]).name.startswith("best-"), "the best checkpoint by val/acc is tested"
    assert {"test/acc", "test/acc_testA", "test/acc_testB"} <= set(results["metrics"])
    assert all(0.0 <= value <= 100.0 for value in results["metrics"].values())
    details = results["details"]
    for split in SPLITS:
        assert details["splits"][split]["expressions"] == public_layout["expressions"][split]
        assert 0.0 < details["splits"][split]["chance"] < 100.0 and details["splits"][split]["mean_proposals"] >= 4
    assert details["expressions"] == sum(public_layout["expressions"].values()) and details["gradcam_layer"] == 1
    run = finetuned["results_file"].parent
    for stage in ("val", "test"):
        with Image.open(run / f"grounding_{stage}.png") as picture:
            assert picture.format == "PNG" and picture.height > 2 * 192
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in run.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["images"]) | set(accumulator.Tags()["scalars"])
    assert {"test/grounding", "val/grounding", "test/acc_testA", "val/acc_val"} <= tags


def test_finetuned_checkpoint_loads_and_evaluates_to_the_same_accuracy(
    finetuned: dict, public_layout: dict[str, Any], tmp_path: Path
) -> None:
    import vlalign

    checkpoint = finetuned["results"]["checkpoint"]
    assert vlalign.load(checkpoint).config["finetuned"]["task"] == "grounding"
    out = tmp_path / "eval"
    args = ["evaluate", "grounding", "--model", checkpoint, "--config", str(TINY), "--out", str(out)]
    assert main(args + _data_args(public_layout) + _run_args(tmp_path)) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("test/acc", "test/acc_testA", "test/acc_testB"):
        assert results["metrics"][key] == pytest.approx(finetuned["results"]["metrics"][key], abs=1e-4), key
    assert (out / "grounding_test.png").is_file()


def test_heatmap_of_a_loaded_exported_model_has_the_image_shape(
    pretrained: Path, synth_data: Path, tmp_path: Path
) -> None:
    import vlalign
    from vlalign.evaluation.grounding import save_heatmap

    assert main(["export", "--ckpt_path", str(pretrained), "--out", str(tmp_path / "model")]) == 0
    model = vlalign.load(tmp_path / "model")
    path = sorted((synth_data / "images" / "test").glob("*.jpg"))[0]
    image = Image.open(path).convert("RGB").resize((50, 40))
    heat = model.heatmap(image, "the red circle on the left")
    assert heat.shape == (40, 50) and heat.dtype == torch.float32 and torch.isfinite(heat).all()
    assert heat.max() > heat.min(), "the map is not flat"
    assert model.heatmap(path, "the star", layer=0).shape == (64, 64)
    pixels = model.preprocess_image(path)
    assert model.heatmap(pixels, "the star").shape == (32, 32)
    saved = save_heatmap(image, heat, tmp_path / "out" / "heat.png")
    with Image.open(saved) as picture:
        assert picture.size == (50, 40) and picture.format == "PNG"
    with pytest.raises(ValueError, match="cross-attends"):
        model.heatmap(image, "the star", layer=5)
