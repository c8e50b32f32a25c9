"""Hard-negative accuracy on a hand-made score table, failure selection, and batched scoring against per-pair
computation (ITC similarity, ITM match logit)."""

from __future__ import annotations

import pytest
import torch

from vlalign.evaluation.hardneg import (
    HardNegScores,
    hardneg_accuracy,
    hardneg_report,
    score_hardneg,
    select_failures,
)
from vlalign.objectives.itc import ITC
from vlalign.tasks.pretrain import PretrainRecipe
from vlalign.testing import tiny_recipe

# Three examples (images). Positives score 2.0, 1.0, 0.5.
POS = torch.tensor([2.0, 1.0, 0.5])
# negative:        0     1     2     3     4     5     6
NEG = torch.tensor([1.0, 2.0, 1.0, 0.9, 1.0, 0.4, 0.6])
NEG_EXAMPLE = torch.tensor([0, 0, 1, 1, 1, 2, 2])
NEG_TYPE = ["colour_swap", "relation_swap", "colour_swap", "shape_swap", "relation_swap", "shape_swap", "colour_swap"]
# pair by pair: 2>1 yes | 2>2 tie: NO | 1>1 tie: NO | 1>.9 yes | 1>1 tie: NO | .5>.4 yes | .5>.6 no


def test_accuracy_by_hand_ties_fail() -> None:
    out = hardneg_accuracy(POS, NEG, NEG_EXAMPLE, NEG_TYPE)
    assert out["overall"] == pytest.approx(3 / 7)
    assert out["count"] == 7
    assert list(out["by_type"]) == ["colour_swap", "relation_swap", "shape_swap"]  # order of first appearance
    assert out["by_type"]["colour_swap"] == {"accuracy": pytest.approx(1 / 3), "count": 3}  # negatives 0, 2, 6
    assert out["by_type"]["relation_swap"] == {"accuracy": 0.0, "count": 2}  # 1, 4: both ties
    assert out["by_type"]["shape_swap"] == {"accuracy": 1.0, "count": 2}  # 3, 5


def test_accuracy_with_type_codes_and_names() -> None:
    names = ["shape_swap", "colour_swap", "relation_swap", "attribute_binding_swap"]
    codes = torch.tensor([names.index(t) for t in NEG_TYPE])
    out = hardneg_accuracy(POS, NEG, NEG_EXAMPLE, codes, names)
    assert list(out["by_type"]) == ["shape_swap", "colour_swap", "relation_swap"]  # no binding negatives: left out
    assert out == hardneg_accuracy(POS, NEG, NEG_EXAMPLE, NEG_TYPE, names)
    unnamed = hardneg_accuracy(POS, NEG, NEG_EXAMPLE, codes)
    assert unnamed["by_type"]["1"] == out["by_type"]["colour_swap"]
    nan = hardneg_accuracy(torch.tensor([float("nan")]), torch.tensor([0.0]), torch.tensor([0]), ["x"])
    assert nan["overall"] == 0.0  # a NaN score never counts as a success


def test_accuracy_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one negative"):
        hardneg_accuracy(POS, NEG[:0], NEG_EXAMPLE[:0], [])
    with pytest.raises(ValueError, match="index the 3 positives"):
        hardneg_accuracy(POS, NEG, NEG_EXAMPLE + 1, NEG_TYPE)
    with pytest.raises(ValueError, match="entries"):
        hardneg_accuracy(POS, NEG, NEG_EXAMPLE, NEG_TYPE[:3])
    with pytest.raises(ValueError, match="type_names"):
        hardneg_accuracy(POS, NEG, NEG_EXAMPLE, torch.arange(7), ["a", "b"])


def test_select_failures_one_per_example_by_margin() -> None:
    # failures (neg >= pos): 1 (margin 0, ex 0), 2 (0, ex 1), 4 (0, ex 1), 6 (+.1, ex 2)
    assert select_failures(POS, NEG, NEG_EXAMPLE).tolist() == [6, 1, 2]
    assert select_failures(POS, NEG, NEG_EXAMPLE, limit=2).tolist() == [6, 1]
    assert select_failures(POS + 10, NEG, NEG_EXAMPLE).tolist() == []


def test_report_per_scorer() -> None:
    scores = HardNegScores(POS, NEG, -POS, -NEG, NEG_EXAMPLE)
    report = hardneg_report(scores, NEG_TYPE)
    assert list(report) == ["itm", "itc"]
    assert report["itm"]["overall"] == pytest.approx(3 / 7)
    assert report["itc"]["overall"] == pytest.approx(1 / 7)  # negated: only -.5 > -.6 holds strictly
    only_itc = HardNegScores(None, None, POS, NEG, NEG_EXAMPLE)
    assert list(hardneg_report(only_itc, NEG_TYPE)) == ["itc"]


def _model(kind: str) -> PretrainRecipe:
    stream = {"max_position_embeddings": 16, **({"fusion_layer": 1, "type_vocab_size": 2} if kind == "albef" else {})}
    itc = ITC(embed_dim=8, queue_size=0, distill=False)
    overrides = {"itm": None} if kind == "clip" else {}
    return tiny_recipe("itc_itm", vision={"img_size": 16}, stream=stream, itc=itc, **overrides).eval()


def _captions(num: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, 40, (num, length), generator=g)
    ids[:, 0] = 2
    lengths = torch.randint(2, length + 1, (num,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("kind", ["single_stream", "albef", "clip"])
def test_score_hardneg_equals_per_pair_scores(kind: str) -> None:
    model = _model(kind)
    g = torch.Generator().manual_seed(4)
    images = torch.randn(5, 3, 16, 16, generator=g)
    pos_ids, pos_mask = _captions(5, 6, g)
    neg_ids, neg_mask = _captions(9, 8, g)  # longer than the positives: padded together
    neg_example = torch.tensor([4, 0, 0, 2, 1, 4, 4, 3, 0])
    scores = score_hardneg(
        model, images, pos_ids, pos_mask, neg_ids, neg_mask, neg_example, batch_size=3, image_batch_size=2
    )
    with torch.no_grad():
        tokens = model.backbone.vision(images)

        def itc(i: int, ids: torch.Tensor, mask: torch.Tensor) -> float:
            text = model.itc.text_features(model.backbone.encode_text(ids[None], mask[None]), mask[None])
            return float(model.itc.image_features(tokens[i : i + 1]) @ text[0])

        def itm(i: int, ids: torch.Tensor, mask: torch.Tensor) -> float:
            fused = model.backbone.stream.fuse(mask[None], tokens[i : i + 1], input_ids=ids[None])
            return float(model.itm.itm_head(fused.last_hidden_state[:, 0])[0, 1])

        pos_itc = torch.tensor([itc(i, pos_ids[i], pos_mask[i]) for i in range(5)])
        neg_itc = torch.tensor([itc(int(e), neg_ids[m], neg_mask[m]) for m, e in enumerate(neg_example)])
    torch.testing.assert_close(scores.positive_itc, pos_itc, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.negative_itc, neg_itc, atol=1e-5, rtol=0)
    assert torch.equal(scores.negative_example, neg_example)
    if kind == "clip":
        assert scores.positive_itm is None and scores.negative_itm is None
        return
    with torch.no_grad():
        pos_itm = torch.tensor([itm(i, pos_ids[i], pos_mask[i]) for i in range(5)])
        neg_itm = torch.tensor([itm(int(e), neg_ids[m], neg_mask[m]) for m, e in enumerate(neg_example)])
    torch.testing.assert_close(scores.positive_itm, pos_itm, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.negative_itm, neg_itm, atol=1e-5, rtol=0)


def test_score_hardneg_rejects_bad_input() -> None:
    model = _model("single_stream")
    g = torch.Generator().manual_seed(0)
    ids, mask = _captions(2, 5, g)
    images = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="neg_example"):
        score_hardneg(model, images, ids, mask, ids, mask, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="one positive per image"):
        score_hardneg(model, images[:1], ids, mask, ids, mask, torch.tensor([0, 0]))
