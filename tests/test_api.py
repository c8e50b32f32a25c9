"""``vlalign.load`` and ``vlalign export``: a model trained through the CLI, loaded from its checkpoint, from an exported
folder in a fresh process and from a converted reference-layout file, gives the trained module's own outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import vlalign
from vlalign.api import QUEUE_KEYS, SPEC_KEY, VisionLanguageModel
from vlalign.cli.inference import export, export_command
from vlalign.data.preprocessing import Preprocessing, tokenizer_files
from vlalign.data.text import pre_caption
from vlalign.data.tokenization import load_tokenizer, tokenize_captions, vocab_info
from vlalign.data.transforms import EvalTransform, load_rgb
from vlalign.errors import InputFileError
from vlalign.models.backbone import online_name

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOL = 1e-6
CAPTIONS = [
    "A red circle to the left of a blue square.",
    "two green triangles",
    "a small yellow star above a large purple circle on a grey background",
    "",
]


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(synth_data: Path, tiny_trained: dict[str, Any]) -> dict[str, Any]:
    """The session's tiny trained model (conftest): the in-memory module, its last.ckpt, a few test images."""
    images = sorted((synth_data / "images" / "test").glob("*.jpg"))[:5]
    return {"recipe": tiny_trained["model"], "ckpt": tiny_trained["ckpt"], "root": tiny_trained["root"],
            "images": images, "data": synth_data}  # fmt: skip


@pytest.fixture(scope="module")
def exported(trained: dict[str, Any]) -> Path:
    out = trained["root"] / "exported"
    export(str(trained["ckpt"]), str(out))
    return out


def expected_outputs(recipe: Any, tokenizer: Any, images: list[Path], captions: list[str], image_size: int) -> dict:
    """What the recipe itself computes, with the evaluation preprocessing done here independently; ITM per pair."""
    with torch.no_grad():
        pixels = torch.stack([EvalTransform(image_size)(load_rgb(path)) for path in images])
        tokens = recipe.backbone.vision(pixels)
        ids, mask = tokenize_captions(tokenizer, [pre_caption(c, 30) for c in captions], 30, padding="longest")
        text = recipe.itc.text_features(recipe.backbone.encode_text(ids, mask), mask)
        logits = torch.empty(len(images), len(captions), 2)
        for i in range(len(images)):
            for j in range(len(captions)):
                n = int(mask[j].sum())  # each caption alone, unpadded
                fused = recipe.backbone.fuse(ids[j : j + 1, :n], mask[j : j + 1, :n], tokens[i : i + 1])
                logits[i, j] = recipe.itm.itm_head(fused.last_hidden_state[:, 0]).float()[0]
        return {
            "image": recipe.itc.image_features(tokens).float(),
            "text": text.float(),
            "itm": logits.softmax(-1)[..., 1],
            "itm_logits": logits[..., 1],
        }


def assert_matches(model: VisionLanguageModel, expected: dict, images: list[Any], captions: list[str]) -> None:
    torch.testing.assert_close(model.encode_image(images), expected["image"], atol=TOL, rtol=0)
    torch.testing.assert_close(model.encode_text(captions), expected["text"], atol=TOL, rtol=0)
    torch.testing.assert_close(model.itm_scores(images, captions, batch_size=3), expected["itm"], atol=TOL, rtol=0)


# -- vlalign.load from a checkpoint -------------------------------------------------------------------------------------
def test_checkpoint_load_gives_the_trained_modules_outputs(trained: dict[str, Any]) -> None:
    model = vlalign.load(trained["ckpt"])
    assert isinstance(model, VisionLanguageModel) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.preprocessing.image_size == 64 and model.tokenizer is not None
    tokenizer = load_tokenizer(trained["data"] / "tokenizer")
    expected = expected_outputs(trained["recipe"], tokenizer, trained["images"], CAPTIONS, 64)
    assert_matches(model, expected, [str(p) for p in trained["images"]], CAPTIONS)
    pil = [Image.open(p) for p in trained["images"]]
    torch.testing.assert_close(model.encode_image(pil), expected["image"], atol=TOL, rtol=0)
    pixels = torch.stack([model.preprocess_image(p) for p in trained["images"]])
    torch.testing.assert_close(model.encode_image(pixels, batch_size=2), expected["image"], atol=TOL, rtol=0)


def test_load_keeps_only_the_recipes_online_encoder_itc_and_itm_keys(trained: dict[str, Any]) -> None:
    model = vlalign.load(trained["ckpt"])
    recipe_keys = {k for k in trained["recipe"].state_dict() if online_name(k) is None and k not in QUEUE_KEYS}
    assert set(model.state_dict()) == recipe_keys
    assert model.backbone.vision_m is None and model.backbone.stream_m is None
    assert model.itc.queue_size == 0 and not model.itc.distill


def test_itm_scores_equal_a_brute_force_per_pair_computation(trained: dict[str, Any]) -> None:
    model = vlalign.load(trained["ckpt"])
    recipe, images = trained["recipe"], [str(p) for p in trained["images"]]
    captions = [*CAPTIONS, "a blue square", "three red circles in a row next to each other"]
    expected = expected_outputs(recipe, model.tokenizer, trained["images"], captions, 64)
    for batch_size in (1, 4, 64):  # pair batches inside one image chunk, across chunks, all at once
        scores = model.itm_scores(images, captions, batch_size=batch_size)
        assert scores.shape == (len(images), len(captions)) and scores.dtype == torch.float32
        torch.testing.assert_close(scores, expected["itm"], atol=TOL, rtol=0)
    raw = model.itm_scores(images, captions, batch_size=5, logits=True)
    torch.testing.assert_close(raw, expected["itm_logits"], atol=TOL, rtol=0)


def test_similarity_is_the_cosine_matrix(trained: dict[str, Any]) -> None:
    model = vlalign.load(trained["ckpt"])
    image_emb, text_emb = model.encode_image(trained["images"]), model.encode_text(CAPTIONS)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(len(trained["images"])))
    sims = model.similarity(image_emb, text_emb)
    torch.testing.assert_close(sims, image_emb @ text_emb.t())
    torch.testing.assert_close(model.similarity(3 * image_emb[0], text_emb), sims[:1])


def test_bfloat16_path_runs_and_returns_float32(trained: dict[str, Any]) -> None:
    model = vlalign.load(trained["ckpt"], dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    image_emb = model.encode_image(trained["images"])
    text_emb = model.encode_text(CAPTIONS)
    scores = model.itm_scores(trained["images"][:2], CAPTIONS)
    for out in (image_emb, text_emb, scores):
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model.to(torch.float32).dtype == torch.float32


def test_image_size_override_interpolates_the_position_table(trained: dict[str, Any]) -> None:
    model = vlalign.load(trained["ckpt"], image_size=96)
    assert model.preprocessing.image_size == 96
    assert model.backbone.vision.grid_size == (12, 12)
    assert model.encode_image(trained["images"][:2]).shape == (2, model.embed_dim)


# -- export ------------------------------------------------------------------------------------------------------------
def test_exported_folder_in_a_fresh_process_gives_the_trained_modules_outputs(
    trained: dict[str, Any], exported: Path, tmp_path: Path
) -> None:
    images = [str(p) for p in trained["images"]]
    result = tmp_path / "outputs.pt"
    script = textwrap.dedent(
        """
        import json, sys
        import torch
        import vlalign

        folder, images, captions, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
        m = vlalign.load(folder)
        assert "lightning" not in sys.modules, "loading an exported folder imported Lightning"
        torch.save(
            {"image": m.encode_image(images), "text": m.encode_text(captions),
             "itm": m.itm_scores(images, captions, batch_size=3)},
            out,
        )
        """
    )
    subprocess.run(
        [sys.executable, "-c", script, str(exported), json.dumps(images), json.dumps(CAPTIONS), str(result)],
        check=True,
        cwd=tmp_path,
        timeout=300,
    )
    outputs = torch.load(result, weights_only=True)
    expected = expected_outputs(
        trained["recipe"], load_tokenizer(trained["data"] / "tokenizer"), trained["images"], CAPTIONS, 64
    )
    for key in ("image", "text", "itm"):
        torch.testing.assert_close(outputs[key], expected[key], atol=TOL, rtol=0)


def test_export_leaves_out_momentum_twins_and_queues_by_default(trained: dict[str, Any], exported: Path) -> None:
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer"]
    with safe_open(str(exported / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    online = {k for k in trained["recipe"].state_dict() if online_name(k) is None and k not in QUEUE_KEYS}
    assert keys == online
    assert not any(k.split(".")[0].endswith("_m") or "_m." in k for k in keys)
    assert not keys & set(QUEUE_KEYS)


def test_export_with_momentum_keeps_twins_and_queues(trained: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "with_momentum"
    export_command(["--ckpt_path", str(trained["ckpt"]), "--out", str(out), "--with_momentum", "true"])
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        queue = handle.get_tensor("itc.image_queue")
    state = trained["recipe"].state_dict()
    assert keys == set(state)
    pretraining_queues = {"itc.image_queue", "itc.text_queue", "itc.queue_ptr"}  # no image-id queue in pretraining
    assert {"backbone.vision_m.vit.pos_embed", "itc.vision_proj_m.weight", *pretraining_queues} <= keys
    torch.testing.assert_close(queue, state["itc.image_queue"])
    assert vlalign.load(out).encode_text(CAPTIONS[:1]).shape == (1, 64)  # the extra tensors are ignored


def test_export_config_tokenizer_and_model_card(trained: dict[str, Any], exported: Path) -> None:
    config = json.loads((exported / "config.json").read_text())
    assert config["format"] == 1 and "tokenizer_files" not in config["preprocessing"]
    assert config["preprocessing"]["image_size"] == 64
    assert [o["class_path"] for o in config["init_args"]["objectives"]] == [
        "vlalign.objectives.itc.ITC",
        "vlalign.objectives.itm.ITM",
    ]
    assert config["exported_from"]["global_step"] == 3
    assert len(load_tokenizer(exported / "tokenizer")) == config["init_args"]["vocab"]["vocab_size"]
    card = (exported / "README.md").read_text()
    for needle in (
        "global step 3",
        "epoch 0",
        "queue_size=256",
        "embed_dim=64",
        "177 tokens",
        "64 px",
        "vlalign.load(",
    ):
        assert needle in card, needle


def test_export_refuses_a_non_empty_folder(trained: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputFileError, match="not empty"):
        export(str(trained["ckpt"]), str(out))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export(str(trained["ckpt"]), str(empty))  # an empty folder is fine
    assert (empty / "model.safetensors").is_file()


def test_failed_export_leaves_no_folder_behind(
    trained: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vlalign.cli.inference as inference

    def broken(folder: Path) -> None:
        assert (folder / "model.safetensors").is_file()  # failing after the weights were written
        raise InputFileError("simulated failure")

    monkeypatch.setattr(inference, "_verify_export", broken)
    with pytest.raises(InputFileError, match="simulated"):
        export(str(trained["ckpt"]), str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_exported_folder_works_as_init_from(trained: dict[str, Any], exported: Path) -> None:
    from vlalign.tasks.pretrain import PretrainRecipe

    checkpoint = torch.load(trained["ckpt"], weights_only=True, map_location="cpu")
    recipe = PretrainRecipe.from_spec(checkpoint[SPEC_KEY], init_from=str(exported))
    trained_state, state = trained["recipe"].state_dict(), recipe.state_dict()
    for key in trained_state:
        if key in QUEUE_KEYS:
            continue
        source = online_name(key) or key  # twins start as copies of the online weights
        torch.testing.assert_close(state[key], trained_state[source], atol=0, rtol=0, msg=key)


def test_spec_key_agrees_with_the_recipe() -> None:
    from vlalign.tasks import pretrain

    assert SPEC_KEY == pretrain.SPEC_KEY


# -- tied weights: an ALBEF-layout recipe with a text MLM head ---------------------------------------------------------
@pytest.fixture(scope="module")
def albef(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny ALBEF-split recipe (token types, fusion from layer 1, MLM decoder tied to the word embeddings) saved
    as a self-describing checkpoint without a Trainer."""
    from vlalign.testing import tiny_recipe

    root = tmp_path_factory.mktemp("albef")
    tokenizer = load_tokenizer(synth_data / "tokenizer")
    recipe = tiny_recipe("albef", vocab=vocab_info(tokenizer)).eval()
    spec = recipe.model_spec()
    spec["preprocessing"] = Preprocessing(image_size=32, tokenizer_files=tokenizer_files(tokenizer)).to_dict()
    ckpt = root / "albef.ckpt"
    torch.save({"state_dict": recipe.state_dict(), SPEC_KEY: spec, "global_step": 7, "epoch": 1}, ckpt)
    images = sorted((synth_data / "images" / "test").glob("*.jpg"))[:4]
    return {"recipe": recipe, "ckpt": ckpt, "root": root, "tokenizer": tokenizer, "images": images}


def test_export_writes_tied_weights_once_and_loads_them_back(albef: dict[str, Any]) -> None:
    recipe = albef["recipe"]
    tied = recipe.xmm.mlm_head.decoder.weight
    assert tied.data_ptr() == recipe.backbone.stream.embeddings.word_embeddings.weight.data_ptr()
    out = albef["root"] / "exported"
    summary = export(str(albef["ckpt"]), str(out))
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    aliases = json.loads(metadata["vlalign_aliases"])
    assert aliases == {"xmm.mlm_head.decoder.weight": "backbone.stream.embeddings.word_embeddings.weight"}
    assert summary.aliases == aliases and "xmm.mlm_head.decoder.weight" not in keys
    assert "xmm.mlm_head.transform.dense.weight" in keys  # other heads stay in the file (init_from reads them)
    expected = expected_outputs(recipe, albef["tokenizer"], albef["images"], CAPTIONS, 32)
    assert_matches(vlalign.load(out), expected, albef["images"], CAPTIONS)


def test_converted_albef_file_loads_like_the_recipe(albef: dict[str, Any]) -> None:
    path = albef["root"] / "converted_albef.safetensors"
    state = albef["recipe"].state_dict()
    tensors = {k.removeprefix("backbone."): v.clone() for k, v in state.items() if online_name(k) is None}
    tensors.pop("xmm.mlm_head.decoder.weight")  # the converter drops it too (tied)
    save_file(tensors, str(path))
    model = vlalign.load(path, tokenizer=albef["tokenizer"], stream_num_heads=2)
    assert model.backbone.stream.config.fusion_layer == 1 and model.backbone.stream.config.type_vocab_size == 2
    expected = expected_outputs(albef["recipe"], albef["tokenizer"], albef["images"], CAPTIONS, 32)
    assert_matches(model, expected, albef["images"], CAPTIONS)


# -- converted reference-layout files ------------------------------------------------------------------------------
def converted_file(recipe: Any, path: Path) -> Path:
    """What `vlalign convert reference` writes: backbone-relative keys (vision.*, stream.*), online and queue tensors."""
    state = recipe.state_dict()
    tensors = {k.removeprefix("backbone."): v.clone().contiguous() for k, v in state.items() if online_name(k) is None}
    save_file(tensors, str(path), metadata={"format": "vlalign", "layout": "simla"})
    return path


def test_converted_reference_file_loads_like_the_trained_model(trained: dict[str, Any], tmp_path: Path) -> None:
    path = converted_file(trained["recipe"], tmp_path / "converted.safetensors")
    tokenizer_dir = trained["data"] / "tokenizer"
    model = vlalign.load(path, tokenizer=tokenizer_dir, stream_num_heads=4, text_pooling="mean")
    assert model.preprocessing.image_size == 64  # from the position table
    expected = expected_outputs(trained["recipe"], load_tokenizer(tokenizer_dir), trained["images"], CAPTIONS, 64)
    assert_matches(model, expected, trained["images"], CAPTIONS)


def test_converted_file_without_tokenizer_names_the_fix(trained: dict[str, Any], tmp_path: Path) -> None:
    path = converted_file(trained["recipe"], tmp_path / "converted.safetensors")
    with pytest.raises(InputFileError, match=r"converted\.safetensors.*records no tokenizer.*tokenizer="):
        vlalign.load(path)


# -- errors ------------------------------------------------------------------------------------------------------------
def test_unusable_inputs_raise_errors_naming_the_file_and_the_fix(trained: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="nowhere.ckpt: does not exist"):
        vlalign.load(tmp_path / "nowhere.ckpt")
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(InputFileError, match="config.json and model.safetensors missing.*vlalign export"):
        vlalign.load(folder)
    reference = tmp_path / "albef.pth"
    torch.save({"model": {"visual_encoder.cls_token": torch.zeros(1, 1, 8)}}, reference)
    with pytest.raises(InputFileError, match="albef.pth.*vlalign convert reference"):
        vlalign.load(reference)
    old = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, old)
    with pytest.raises(InputFileError, match="old.ckpt.*without a 'vlalign_model' entry"):
        vlalign.load(old)
    with pytest.raises(ValueError, match="unknown override.*num_heads"):
        vlalign.load(trained["ckpt"], num_heads=2)
    with pytest.raises(ValueError, match="stream_num_heads only apply to converted"):
        vlalign.load(trained["ckpt"], stream_num_heads=2)
    missing = tmp_path / "missing.safetensors"
    tensors = {k: v.clone() for k, v in load_file_state(converted_file(trained["recipe"], missing)).items()}
    del tensors["itc.text_proj.weight"]
    save_file(tensors, str(missing))
    with pytest.raises(InputFileError, match=r"missing.safetensors: 1 tensor\(s\).*itc.text_proj.weight"):
        vlalign.load(missing, tokenizer=trained["data"] / "tokenizer", stream_num_heads=4)


def load_file_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_import_vlalign_stays_light() -> None:
    code = "import sys, vlalign; assert callable(vlalign.load); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False"
