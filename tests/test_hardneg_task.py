"""Hard-negative evaluation: the synthetic files, the data module's checks, accuracy on a hand-made score table through
the task's epoch-end path, and the task end to end on a tiny trained model (Lightning ``test`` and the config)."""

from __future__ import annotations

import json
import re
import socket
import types
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from vlalign.data.synth import HARDNEG_TYPES, Scene, Shape, hard_negatives
from vlalign.data.tokenization import load_tokenizer, tokenize_captions, vocab_info
from vlalign.datamodules.hardneg import HardNegativeDataModule, HardNegativeDataset
from vlalign.errors import ConfigError, InputFileError
from vlalign.tasks.hardneg import FAILURES_FILE, HardNegativeEvaluation

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAIR = re.compile(
    r"^an? (?P<ca>\w+) (?P<sa>\w+) (?P<rel>to the left of|to the right of|above|below) an? (?P<cb>\w+) (?P<sb>\w+)$"
)
SINGLE = re.compile(r"^an? (?P<ca>\w+) (?P<sa>\w+) (?P<where>on the \w+|at the \w+|in the centre)$")
COLOURS = {"red", "green", "blue", "yellow", "orange", "purple", "pink", "black"}
SHAPES = {"circle", "square", "triangle", "star"}


# -- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_trained: dict[str, Any]) -> Path:
    """last.ckpt of the session's tiny ITC + ITM model trained 3 steps through the training CLI (conftest)."""
    return tiny_trained["ckpt"]


@pytest.fixture(scope="module")
def task(trained: Path) -> HardNegativeEvaluation:
    return HardNegativeEvaluation(init_from=str(trained), batch_size=7, num_failures=3)


def trainer(root: Path) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=L.pytorch.loggers.TensorBoardLogger(str(root), name="hardneg"),
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def write_json(path: Path, entries: Any) -> Path:
    path.write_text(json.dumps(entries))
    return path


# -- the synthetic hard negatives ------------------------------------------------------------------------------------
def test_synth_writes_hard_negatives_of_every_type_that_are_what_they_claim(synth_data: Path) -> None:
    test_images = json.loads((synth_data / "retrieval_test.json").read_text())
    for split in ("val", "test"):
        entries = json.loads((synth_data / f"hardneg_{split}.json").read_text())
        assert [e["image"] for e in entries] == [e["image"] for e in json.loads(
            (synth_data / f"retrieval_{split}.json").read_text())]  # fmt: skip
        for entry in entries:
            assert set(entry) == {"image", "positive", "negatives"} and (synth_data / entry["image"]).is_file()
            kinds = [n["type"] for n in entry["negatives"]]
            assert kinds == [k for k in HARDNEG_TYPES if k in kinds] and kinds[:2] == ["colour_swap", "shape_swap"]
            captions = [n["caption"] for n in entry["negatives"]]
            assert entry["positive"] not in captions and len(set(captions)) == len(captions)
    entries = json.loads((synth_data / "hardneg_test.json").read_text())
    assert len(entries) == len(test_images)
    seen = {n["type"] for e in entries for n in e["negatives"]}
    assert seen == set(HARDNEG_TYPES)
    for entry in entries:
        negatives = {n["type"]: n["caption"] for n in entry["negatives"]}
        pair = PAIR.match(entry["positive"])
        if pair is None:
            single = SINGLE.match(entry["positive"])
            assert single is not None and set(negatives) == {"colour_swap", "shape_swap"}, entry
            continue
        p = pair.groupdict()
        assert {p["ca"], p["cb"]} <= COLOURS and {p["sa"], p["sb"]} <= SHAPES and p["ca"] != p["cb"]
        reverse = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below"}
        rel = PAIR.match(negatives["relation_swap"]).groupdict()  # type: ignore[union-attr]
        assert rel == {**p, "rel": reverse.get(p["rel"], "above")}
        if "attribute_binding_swap" in negatives:
            bound = PAIR.match(negatives["attribute_binding_swap"]).groupdict()  # type: ignore[union-attr]
            assert bound == {**p, "ca": p["cb"], "cb": p["ca"]} and p["sa"] != p["sb"]
        else:
            assert p["sa"] == p["sb"]
        colour = PAIR.match(negatives["colour_swap"]).groupdict()  # type: ignore[union-attr]
        changed = [k for k in p if colour[k] != p[k]]
        assert changed in (["ca"], ["cb"]) and colour[changed[0]] not in (p["ca"], p["cb"])
        shape = PAIR.match(negatives["shape_swap"]).groupdict()  # type: ignore[union-attr]
        changed = [k for k in p if shape[k] != p[k]]
        assert changed in (["sa"], ["sb"]) and shape[changed[0]] in SHAPES
    # every word is in the synthetic tokenizer's vocabulary
    tokenizer = load_tokenizer(synth_data / "tokenizer")
    texts = [e["positive"] for e in entries] + [n["caption"] for e in entries for n in e["negatives"]]
    ids, _ = tokenize_captions(tokenizer, texts, max_length=40)
    assert not (ids == vocab_info(tokenizer).unk_token_id).any()


def test_hard_negatives_of_hand_made_scenes() -> None:
    """Edits are taken from the structure: a colour no object has, the pair's colours exchanged, relation reversed."""
    red_circle = Shape("red", "circle", "small", "left", 0.2, 0.5)
    blue_square = Shape("blue", "square", "large", "right", 0.8, 0.5)
    green_star = Shape("green", "star", "small", "top", 0.5, 0.2)
    for seed in range(12):
        positive, negatives = hard_negatives(Scene("white", (red_circle, blue_square, green_star)), _rng(seed))
        by_type = {n["type"]: n["caption"] for n in negatives}
        assert list(by_type) == list(HARDNEG_TYPES)
        p = PAIR.match(positive).groupdict()  # type: ignore[union-attr]
        colour = PAIR.match(by_type["colour_swap"]).groupdict()  # type: ignore[union-attr]
        assert {colour["ca"], colour["cb"]} - {"red", "blue", "green"}, "a colour not in the scene"
        assert p["sa"] != p["sb"] and "attribute_binding_swap" in by_type, "the pair has different shapes"
        relation = {("red", "blue"): "to the left of", ("blue", "red"): "to the right of"}
        assert p["rel"] == relation.get((p["ca"], p["cb"]), p["rel"])
    positive, negatives = hard_negatives(Scene("white", (red_circle, blue_square)), _rng(0))
    assert positive in ("a red circle to the left of a blue square", "a blue square to the right of a red circle")
    by_type = {n["type"]: n["caption"] for n in negatives}
    if positive.startswith("a red"):
        assert by_type["attribute_binding_swap"] == "a blue circle to the left of a red square"
        assert by_type["relation_swap"] == "a red circle to the right of a blue square"
    same_shape = Scene("white", (red_circle, Shape("blue", "circle", "small", "right", 0.8, 0.5)))
    kinds = [n["type"] for n in hard_negatives(same_shape, _rng(0))[1]]
    assert kinds == ["colour_swap", "shape_swap", "relation_swap"], "no binding swap between two circles"
    positive, negatives = hard_negatives(Scene("grey", (Shape("pink", "star", "large", "centre", 0.5, 0.5),)), _rng(0))
    assert positive == "a pink star in the centre"
    assert [n["type"] for n in negatives] == ["colour_swap", "shape_swap"]
    assert negatives[0]["caption"].endswith("star in the centre") and "pink" not in negatives[0]["caption"]
    assert negatives[1]["caption"].startswith("a pink ") and "star" not in negatives[1]["caption"]


def _rng(seed: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed)


# -- the data module -------------------------------------------------------------------------------------------------
GOOD = {"image": "images/test/000000096.jpg", "positive": "a red circle", "negatives": [{"type": "t", "caption": "x"}]}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("not an object", r"entry 1 is a JSON string .*, not an object"),
        (
            {"positive": "p", "negatives": [{"type": "t", "caption": "c"}]},
            r"entry 1 has no image path .*no 'image' key",
        ),
        ({**GOOD, "positive": ""}, r"entry 1 \(images/.*\) has no positive caption .*an empty string"),
        ({**GOOD, "positive": 3}, r"entry 1 .* has no positive caption .*a JSON number 3"),
        ({k: v for k, v in GOOD.items() if k != "negatives"}, r"entry 1 .* has no negatives .*no 'negatives' key"),
        ({**GOOD, "negatives": []}, r"entry 1 .* has no negatives .*an empty list"),
        ({**GOOD, "negatives": [{"type": "t", "caption": "c"}, "c2"]}, r"entry 1 .*: negative 1 is a JSON string"),
        ({**GOOD, "negatives": [{"type": "t", "caption": ["c"]}]}, r"negative 0 needs 'caption' as a non-empty str"),
        ({**GOOD, "negatives": [{"caption": "c"}]}, r"negative 0 needs 'type' .*no 'type' key"),
    ],
)
def test_malformed_entries_name_the_file_and_the_entry(
    synth_data: Path, tmp_path: Path, entry: Any, message: str
) -> None:
    path = write_json(tmp_path / "bad.json", [GOOD, entry])
    with pytest.raises(InputFileError, match=message) as caught:
        HardNegativeDataset(path, synth_data, transform=lambda image: image)
    assert str(path) in str(caught.value)


def test_missing_images_fail_at_setup_with_the_image_root_hint(synth_data: Path, tmp_path: Path) -> None:
    source = json.loads((synth_data / "hardneg_test.json").read_text())[:3]
    path = write_json(tmp_path / "moved.json", source)  # relative paths now resolve under tmp_path
    module = HardNegativeDataModule(json_file=str(path), image_size=32, num_workers=0)
    with pytest.raises(
        InputFileError, match=r"moved.json: 3 of its 3 images are not found, e.g. entry 0: .*image_root"
    ):
        module.setup("test")
    module = HardNegativeDataModule(json_file=str(path), image_root=str(synth_data), image_size=32, num_workers=0)
    module.setup("test")
    assert module.test_dataset is not None and len(module.test_dataset) == 3
    with pytest.raises(InputFileError, match="json_file: .*does not exist"):
        HardNegativeDataModule(json_file=str(tmp_path / "absent.json"))
    with pytest.raises(ConfigError, match="data.image_size is not set"):
        HardNegativeDataModule(json_file=str(path), image_root=str(synth_data)).setup("test")


def test_batches_carry_images_raw_captions_and_global_indices(synth_data: Path) -> None:
    module = HardNegativeDataModule(json_file=str(synth_data / "hardneg_test.json"), image_size=32, batch_size=3,
                                    num_workers=0)  # fmt: skip
    module.setup("test")
    dataset = module.test_dataset
    assert dataset is not None and dataset.types == list(HARDNEG_TYPES)
    batches = list(module.test_dataloader())
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(len(dataset)))
    negative_index = torch.cat([b["negative_index"] for b in batches])
    assert negative_index.tolist() == list(range(dataset.num_negatives))
    first = batches[0]
    assert first["image"].shape == (3, 3, 32, 32) and first["positive"][0] == dataset.examples[0].positive
    assert [c for group in first["negatives"] for c in group] == dataset.negative_caption[
        : len(first["negative_index"])
    ]


# -- the task ---------------------------------------------------------------------------------------------------------
def test_scores_equal_the_inference_api(task: HardNegativeEvaluation, synth_data: Path) -> None:
    """A batch is scored as vlalign.load's itm_scores (match logits) and similarity score the same pairs."""
    model = task.model
    data = HardNegativeDataModule(json_file=str(synth_data / "hardneg_test.json"), image_size=64, batch_size=3,
                                  num_workers=0)  # fmt: skip
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    scores = task.score_batch(batch)
    images = [str(example.image) for example in data.test_dataset.examples[:3]]  # type: ignore[union-attr]
    flat = list(batch["positive"]) + [c for group in batch["negatives"] for c in group]
    owner = list(range(3)) + [i for i, group in enumerate(batch["negatives"]) for _ in group]
    itm = model.itm_scores(images, flat, logits=True)[owner, range(len(flat))]
    itc = model.similarity(model.encode_image(images), model.encode_text(flat))[owner, range(len(flat))]
    for name, expected in (("itm", itm), ("itc", itc)):
        positive, negative = scores[name]
        torch.testing.assert_close(torch.cat([positive, negative]), expected, atol=1e-5, rtol=0)


def test_accuracy_on_a_hand_made_score_table(
    task: HardNegativeEvaluation, synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scores looked up from a table by the batches' global indices; accuracy per type counted by hand (a tie fails)."""
    images = [e["image"] for e in json.loads((synth_data / "hardneg_test.json").read_text())[:4]]
    entries = [
        {"image": images[0], "positive": "p0", "negatives": [{"type": "colour", "caption": "a"},
                                                             {"type": "binding", "caption": "b"}]},
        {"image": images[1], "positive": "p1", "negatives": [{"type": "colour", "caption": "c"}]},
        {"image": images[2], "positive": "p2", "negatives": [{"type": "binding", "caption": "d"},
                                                             {"type": "colour", "caption": "e"},
                                                             {"type": "relation", "caption": "f"}]},
        {"image": images[3], "positive": "p3", "negatives": [{"type": "binding", "caption": "g"}]},
    ]  # fmt: skip
    path = write_json(tmp_path / "table.json", entries)
    # ITM: positives 0.9 0.2 0.6 0.5; negatives a..g: 0.1 0.95 | 0.1 | 0.6 (tie) 0.3 0.7 | 0.4
    #   colour a,c,e: pass pass pass -> 3/3; binding b,d,g: fail fail pass -> 1/3; relation f: fail -> 0/1; all 4/7
    # ITC: positives 0 0 0 0, every negative -1: all pass
    table = {
        "itm": (torch.tensor([0.9, 0.2, 0.6, 0.5]), torch.tensor([0.1, 0.95, 0.1, 0.6, 0.3, 0.7, 0.4])),
        "itc": (torch.zeros(4), -torch.ones(7)),
    }

    def lookup(self: HardNegativeEvaluation, batch: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: (pos[batch["index"]], neg[batch["negative_index"]]) for name, (pos, neg) in table.items()}

    monkeypatch.setattr(HardNegativeEvaluation, "score_batch", lookup)
    data = HardNegativeDataModule(json_file=str(path), image_root=str(synth_data), batch_size=3, num_workers=0)
    trainer(tmp_path).test(task, datamodule=data, verbose=False)
    results = task.results
    assert results["num_examples"] == 4 and results["num_negatives"] == 7
    assert results["types"] == ["colour", "binding", "relation"]
    assert results["itm"]["overall"] == pytest.approx(4 / 7)
    expected = {"colour": (3 / 3, 3), "binding": (1 / 3, 3), "relation": (0.0, 1)}
    got = {k: (v["accuracy"], v["count"]) for k, v in results["itm"]["by_type"].items()}
    assert got == {k: (pytest.approx(a), n) for k, (a, n) in expected.items()}
    assert results["itc"]["overall"] == pytest.approx(1.0)
    metrics = task.trainer.callback_metrics
    assert float(metrics["test/hardneg_itm_acc"]) == pytest.approx(4 / 7)
    assert float(metrics["test/hardneg_itm_acc/binding"]) == pytest.approx(1 / 3)
    assert float(metrics["test/hardneg_itc_acc/relation"]) == pytest.approx(1.0)
    assert float(metrics["test/hardneg_count/colour"]) == 3
    # failures, largest margin first: example 2 prefers f (0.1 above its positive; the tie d fails by less), then
    # example 0 prefers b (0.05 above); examples 1 and 3 pass
    negative_example = torch.tensor(task.trainer.test_dataloaders.dataset.negative_example)
    assert task.failures(negative_example, torch.arange(7), "itm") == [(2, 5), (0, 1)]
    picture = Path(results["failures_picture"])
    assert picture.name == FAILURES_FILE and picture.is_file() and picture.parent == Path(task.trainer.log_dir)


def test_scores_from_several_processes_are_placed_by_index(task: HardNegativeEvaluation) -> None:
    """A distributed sampler's padding repeats an example: it lands on its own slot, counted once."""
    task._store.clear()
    task._store["index"] = [torch.tensor([0, 2]), torch.tensor([1, 0])]
    task._store["negative_index"] = [torch.tensor([0, 2, 3]), torch.tensor([1, 0])]
    task._store["itm"] = [torch.tensor([0.5, 0.7]), torch.tensor([0.6, 0.5])]
    task._store["itm_negatives"] = [torch.tensor([0.1, 0.3, 0.4]), torch.tensor([0.2, 0.1])]
    task._store["itc"] = [torch.zeros(2), torch.zeros(2)]
    task._store["itc_negatives"] = [torch.zeros(3), torch.zeros(2)]
    scores = task.gather_scores(num_examples=4, num_negatives=5)
    torch.testing.assert_close(scores["itm"][:3], torch.tensor([0.5, 0.6, 0.7]))
    assert torch.isnan(scores["itm"][3]) and torch.isnan(scores["itm_negatives"][4])
    torch.testing.assert_close(scores["itm_negatives"][:4], torch.tensor([0.1, 0.2, 0.3, 0.4]))


def _gather_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo processes: rank 0 scored examples 0, 2, 4; rank 1 scored 1, 3 and a padding repeat of 0."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        examples = [[0, 2, 4], [1, 3, 0]][rank]
        negatives = [[0, 1, 3, 5, 6], [2, 4, 0, 1]][rank]  # examples own negatives 0-1, 2, 3, 4, 5-6
        store = types.SimpleNamespace(scorers=("itm",), _store=defaultdict(list))
        store._store["index"] = [torch.tensor(examples)]
        store._store["negative_index"] = [torch.tensor(negatives)]
        store._store["itm"] = [torch.tensor(examples, dtype=torch.float) / 10]
        store._store["itm_negatives"] = [torch.tensor(negatives, dtype=torch.float) / 100]
        scores = HardNegativeEvaluation.gather_scores(store, num_examples=5, num_negatives=7)  # type: ignore[arg-type]
        torch.save(scores, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_gather_every_score_by_index(tmp_path: Path) -> None:
    """Over a real process group (gloo), both ranks end with every example's and negative's score in its slot."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_gather_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        scores = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(scores["itm"], torch.arange(5, dtype=torch.float) / 10)
        torch.testing.assert_close(scores["itm_negatives"], torch.arange(7, dtype=torch.float) / 100)


def test_end_to_end_on_a_tiny_model(task: HardNegativeEvaluation, synth_data: Path, tmp_path: Path) -> None:
    data = HardNegativeDataModule(json_file=str(synth_data / "hardneg_test.json"), batch_size=5, num_workers=0)
    trainer(tmp_path).test(task, datamodule=data, verbose=False)
    results = task.results
    entries = json.loads((synth_data / "hardneg_test.json").read_text())
    counts = {kind: sum(n["type"] == kind for e in entries for n in e["negatives"]) for kind in HARDNEG_TYPES}
    assert results["num_examples"] == len(entries) and results["num_negatives"] == sum(counts.values())
    for scorer in ("itm", "itc"):
        by_type = results[scorer]["by_type"]
        assert set(by_type) == set(HARDNEG_TYPES)
        assert {k: v["count"] for k, v in by_type.items()} == counts
        assert all(0.0 <= v["accuracy"] <= 1.0 for v in by_type.values())
        assert 0.0 <= results[scorer]["overall"] <= 1.0
    assert not torch.isnan(task.scores["itm_negatives"]).any()
    json.dumps(results)  # what `vlalign evaluate hardneg` writes to results.json
    if results["failures_picture"] is not None:
        assert Path(results["failures_picture"]).is_file()


def test_vlalign_evaluate_hardneg_with_the_tiny_config(trained: Path, synth_data: Path, tmp_path: Path) -> None:
    """`vlalign evaluate hardneg --model PATH --config configs/finetune/hardneg_tiny.yaml`: results.json with every
    edit type and its count, and the failures picture next to it."""
    from vlalign.cli.main import main
    from vlalign.tasks.registry import get_task

    spec = get_task("hardneg")
    assert not spec.trains and spec.config_path == CONFIGS / "finetune" / "hardneg.yaml" and spec.config_path.is_file()
    out = tmp_path / "out"
    args = [
        "evaluate", "hardneg",
        "--model", str(trained),
        "--config", str(CONFIGS / "finetune" / "hardneg_tiny.yaml"),
        "--data.json_file", str(synth_data / "hardneg_test.json"),
        "--data.num_workers", "0",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    entries = json.loads((synth_data / "hardneg_test.json").read_text())
    counts = {kind: sum(n["type"] == kind for e in entries for n in e["negatives"]) for kind in HARDNEG_TYPES}
    details = results["details"]
    assert details["num_examples"] == len(entries) and details["types"] == list(HARDNEG_TYPES)
    for scorer in ("itm", "itc"):
        assert {k: v["count"] for k, v in details[scorer]["by_type"].items()} == counts
        assert results["metrics"][f"test/hardneg_{scorer}_acc"] == pytest.approx(details[scorer]["overall"])
        for kind in HARDNEG_TYPES:
            key = f"test/hardneg_{scorer}_acc/{kind}"
            assert results["metrics"][key] == pytest.approx(details[scorer]["by_type"][kind]["accuracy"])
    if details["failures_picture"] is not None:
        assert Path(details["failures_picture"]) == out / FAILURES_FILE and (out / FAILURES_FILE).is_file()


def test_vlalign_evaluate_hardneg_names_what_is_missing(
    synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlalign.cli.main import main

    config = str(CONFIGS / "finetune" / "hardneg.yaml")
    assert main(["evaluate", "hardneg", "--config", config, "--split", "val"]) == 2
    assert "has no validation split" in capsys.readouterr().err  # the hard-negative file is the split
    assert main(["evaluate", "hardneg", "--config", config]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err
    assert "model.init_from: path/to/model does not exist; give the model with --model PATH" in err
    assert "data.json_file: path/to/hardneg_test.json does not exist" in err
