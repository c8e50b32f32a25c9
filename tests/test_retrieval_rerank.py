"""Batched ITM re-ranking equals scoring every (query, candidate) pair on its own."""

from __future__ import annotations

import pytest
import torch

from vlalign.evaluation.retrieval import rerank_with_itm, reranked_recalls
from vlalign.objectives.itc import ITC
from vlalign.tasks.pretrain import PretrainRecipe
from vlalign.testing import TINY_WIDTH, tiny_recipe

WIDTH = TINY_WIDTH  # image tokens feed the cross-attention


@pytest.fixture(scope="module")
def recipe() -> PretrainRecipe:
    model = tiny_recipe(
        "itc_itm", vision={"img_size": 16}, stream={"max_position_embeddings": 16},
        itc=ITC(embed_dim=8, queue_size=0, distill=False),
    )  # fmt: skip
    return model.eval()


def _texts(num: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, 40, (num, length), generator=generator)
    ids[:, 0] = 2
    lengths = torch.randint(3, length + 1, (num,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def _naive(recipe: PretrainRecipe, tokens, ids, mask, i: int, j: int) -> float:
    fused = recipe.backbone.stream.fuse(mask[j : j + 1], tokens[i : i + 1], input_ids=ids[j : j + 1])
    return recipe.itm.itm_head(fused.last_hidden_state[:, 0])[0, 1].item()


@pytest.mark.parametrize(("k", "batch_size"), [(3, 4), (3, 1000), (50, 7)])
def test_top_k_scores_equal_per_pair_computation(recipe: PretrainRecipe, k: int, batch_size: int) -> None:
    g = torch.Generator().manual_seed(k + batch_size)
    num_images, num_texts = 5, 12
    tokens = torch.randn(num_images, 5, WIDTH, generator=g)
    ids, mask = _texts(num_texts, 7, g)
    sims = torch.randn(num_images, num_texts, generator=g)
    with torch.no_grad():
        i2t, t2i = rerank_with_itm(recipe, tokens, ids, mask, sims, k=k, batch_size=batch_size)
        naive = [[_naive(recipe, tokens, ids, mask, i, j) for j in range(num_texts)] for i in range(num_images)]
        for i in range(num_images):
            top = set(sims[i].topk(min(k, num_texts)).indices.tolist())
            for j in range(num_texts):
                if j in top:
                    assert i2t[i, j].item() == pytest.approx(naive[i][j], abs=1e-5)
                else:
                    assert i2t[i, j].item() == float("-inf")
        for j in range(num_texts):
            top = set(sims[:, j].topk(min(k, num_images)).indices.tolist())
            for i in range(num_images):
                if i in top:
                    assert t2i[i, j].item() == pytest.approx(naive[i][j], abs=1e-5)
                else:
                    assert t2i[i, j].item() == float("-inf")


def test_reranked_recalls_take_each_direction_from_its_matrix() -> None:
    text_image_index = torch.tensor([0, 0, 1, 1])
    i2t = torch.tensor([[1.0, 0.0, 0.5, 0.2], [0.9, 0.8, 0.1, 0.0]])  # image 1's best caption belongs to image 0
    t2i = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])  # caption 3 prefers image 0
    out = reranked_recalls(i2t, t2i, text_image_index)
    assert out["txt_r1"] == pytest.approx(50.0)
    assert out["img_r1"] == pytest.approx(75.0)
    assert out["r_mean"] == pytest.approx((out["txt_r_mean"] + out["img_r_mean"]) / 2)


def test_rerank_rejects_mismatched_shapes(recipe: PretrainRecipe) -> None:
    ids, mask = _texts(3, 4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="does not match"):
        rerank_with_itm(recipe, torch.randn(2, 5, WIDTH), ids, mask, torch.randn(2, 4), k=2)
