"""Retrieval recall (docs/method.md §5.3) on a crafted score matrix with ties and several captions per image, against
a hand computation; the tie rule (stable order: equal scores by ascending candidate index) tested explicitly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlalign.evaluation.metrics import retrieval_ranks, retrieval_recalls

# Captions 0..5 describe images [1, 0, 2, 0, 2, 0]: image 0 has three captions, image 1 one, image 2 two.
TEXT_IMAGE_INDEX = torch.tensor([1, 0, 2, 0, 2, 0])
SCORES = torch.tensor(
    [
        # caption: 0     1     2     3     4     5
        [0.7, 0.7, 0.9, 0.6, 0.5, 0.1],  # image 0: its best caption (1) ties with caption 0 (not its own)
        [0.4, 0.4, 0.4, 0.4, 0.4, 0.4],  # image 1: all tied; its caption 0 has the lowest index
        [0.8, 0.1, 0.5, 0.6, 0.5, 0.6],  # image 2: its captions 2 and 4 tie with each other at 0.5
    ]
)


def test_ranks_by_hand_with_ties() -> None:
    ranks_i2t, ranks_t2i = retrieval_ranks(SCORES, TEXT_IMAGE_INDEX)
    # image 0: order 2 (.9), 0 (.7), 1 (.7), 3, 4, 5 -> its best caption 1 sits at position 2
    #   ("strictly higher" would say 1, "higher or equal" 3: the stable order puts the lower index 0 first)
    # image 1: all equal -> stable order 0..5 -> caption 0 at position 0
    # image 2: order 0 (.8), 3 (.6), 5 (.6), 2 (.5), 4 (.5), 1 -> caption 2 at position 3
    assert ranks_i2t.tolist() == [2, 0, 3]
    # caption 0 (image 1): column [.7, .4, .8] -> 2, 0, 1 -> 2
    # caption 1 (image 0): [.7, .4, .1] -> 0
    # caption 2 (image 2): [.9, .4, .5] -> 0, 2, 1 -> 1
    # caption 3 (image 0): [.6, .4, .6] -> tie of images 0 and 2, lower index first -> 0
    # caption 4 (image 2): [.5, .4, .5] -> tie of images 0 and 2, image 0 first -> 1
    # caption 5 (image 0): [.1, .4, .6] -> 2, 1, 0 -> 2
    assert ranks_t2i.tolist() == [2, 0, 1, 0, 1, 2]


def test_recalls_by_hand() -> None:
    out = retrieval_recalls(SCORES, TEXT_IMAGE_INDEX, ks=(1, 2, 3))
    expected = {
        "txt_r1": 100 / 3,  # ranks [2, 0, 3]
        "txt_r2": 100 / 3,
        "txt_r3": 200 / 3,
        "img_r1": 200 / 6,  # ranks [2, 0, 1, 0, 1, 2]
        "img_r2": 400 / 6,
        "img_r3": 100.0,
    }
    expected["txt_r_mean"] = (expected["txt_r1"] + expected["txt_r2"] + expected["txt_r3"]) / 3
    expected["img_r_mean"] = (expected["img_r1"] + expected["img_r2"] + expected["img_r3"]) / 3
    expected["r_mean"] = (expected["txt_r_mean"] + expected["img_r_mean"]) / 2
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-4), key
    default = retrieval_recalls(SCORES, TEXT_IMAGE_INDEX)  # k = 1, 5, 10: everything is within 5 of 6 candidates
    assert default["txt_r5"] == default["img_r5"] == default["img_r10"] == 100.0


def test_tie_rule_is_deterministic_and_index_ordered() -> None:
    """Relabelling candidates changes which tied candidate comes first, and the rank with it, exactly as documented."""
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    for gt_caption in range(4):  # the only captions' image is 0; caption gt_caption is its ground truth ...
        text_image_index = torch.ones(4, dtype=torch.long)
        text_image_index[gt_caption] = 0
        ranks_i2t, _ = retrieval_ranks(torch.cat([scores, torch.zeros(1, 4)]), text_image_index)
        assert ranks_i2t[0].item() == gt_caption  # ... and ranks behind the lower-index tied captions
    big = torch.full((3, 5000), 0.25)  # long rows: the order must stay stable beyond small-sort kernels
    ranks_i2t, ranks_t2i = retrieval_ranks(big, torch.arange(5000) % 3)
    assert ranks_i2t.tolist() == [0, 1, 2]
    assert torch.equal(ranks_t2i, torch.arange(5000) % 3)


def test_without_ties_equals_the_reference_loop() -> None:
    """ALBEF's evaluation loop (np.argsort(score)[::-1], best ground truth) on a tie-free matrix."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(7, 20, generator=g)
    text_image_index = torch.randint(0, 7, (20,), generator=g)
    text_image_index[:7] = torch.arange(7)  # every image has a caption
    img2txt = {i: [j for j in range(20) if text_image_index[j] == i] for i in range(7)}
    ref_i2t, ref_t2i = [], []
    for i, row in enumerate(scores.numpy()):
        inds = np.argsort(row)[::-1]
        ref_i2t.append(min(int(np.where(inds == j)[0][0]) for j in img2txt[i]))
    for j, col in enumerate(scores.t().numpy()):
        inds = np.argsort(col)[::-1]
        ref_t2i.append(int(np.where(inds == int(text_image_index[j]))[0][0]))
    ranks_i2t, ranks_t2i = retrieval_ranks(scores, text_image_index)
    assert ranks_i2t.tolist() == ref_i2t
    assert ranks_t2i.tolist() == ref_t2i


def test_minus_inf_ground_truth_is_never_retrieved() -> None:
    """Re-ranked matrices hold -inf outside a query's top k: such a ground truth is not found at any cutoff."""
    inf = float("-inf")
    scores = torch.tensor([[inf, inf, 2.0], [inf, 1.0, inf]])
    text_image_index = torch.tensor([0, 1, 1])
    ranks_i2t, ranks_t2i = retrieval_ranks(scores, text_image_index)
    assert ranks_i2t.tolist() == [3, 0]  # image 0's caption 0 is -inf: not position 1 among the tied -inf entries
    assert ranks_t2i.tolist() == [2, 0, 2]  # caption 2's image 1 is -inf there
    out = retrieval_recalls(scores, text_image_index, ks=(1, 3))
    assert out["txt_r3"] == pytest.approx(50.0) and out["img_r1"] == pytest.approx(100 / 3)
