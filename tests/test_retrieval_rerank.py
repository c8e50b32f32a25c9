"""Batched ITM re-ranking (K/V reuse, pairs of many queries per fusion batch) equals scoring every (query, candidate)
pair on its own with the plain fusion; distributed sharding; ITC + ITM recall keys."""

from __future__ import annotations

import pytest
import torch

from vlalign.evaluation.metrics import retrieval_ranks, retrieval_recalls
from vlalign.evaluation.retrieval import (
    _plan_chunk,
    auto_group_size,
    gather_pair_scores,
    images_per_kv_chunk,
    itc_and_itm_recalls,
    itc_similarities,
    itm_pair_scores,
    pair_shard,
    rerank_with_itm,
    reranked_recalls,
    text_states_for,
    topk_pairs,
)
from vlalign.objectives.itc import ITC
from vlalign.tasks.pretrain import PretrainRecipe
from vlalign.testing import TINY_WIDTH, tiny_recipe

WIDTH = TINY_WIDTH  # image tokens feed the cross-attention


def _recipe(split: bool) -> PretrainRecipe:
    stream = {"max_position_embeddings": 16, **({"fusion_layer": 1, "type_vocab_size": 2} if split else {})}
    model = tiny_recipe(
        "itc_itm", vision={"img_size": 16}, stream=stream, itc=ITC(embed_dim=8, queue_size=0, distill=False)
    )
    return model.eval()


@pytest.fixture(scope="module")
def recipe() -> PretrainRecipe:
    return _recipe(split=False)


@pytest.fixture(scope="module", params=["single_stream", "albef_split"])
def any_recipe(request: pytest.FixtureRequest) -> PretrainRecipe:
    return _recipe(split=request.param == "albef_split")


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


def _inputs(seed: int, num_images: int = 5, num_texts: int = 12, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(num_images, 5, WIDTH, generator=g)
    ids, mask = _texts(num_texts, length, g)
    return tokens, ids, mask, g


def _brute_force(recipe: PretrainRecipe, tokens, ids, mask) -> torch.Tensor:
    """Every (image, caption) pair fused on its own with the plain fuse."""
    with torch.no_grad():
        return torch.tensor(
            [[_naive(recipe, tokens, ids, mask, i, j) for j in range(ids.shape[0])] for i in range(tokens.shape[0])]
        )


@pytest.mark.parametrize(
    ("kv_cache_gib", "group_size"),
    [(8.0, None), (1e-9, None), (8.0, 1), (8.0, 5), (1e-9, 3)],  # one K/V chunk or one image per chunk; groups
)
def test_full_k_reranking_equals_brute_force(
    any_recipe: PretrainRecipe, kv_cache_gib: float, group_size: int | None
) -> None:
    """k covering all candidates: both matrices are the brute-force ITM matrix (to 1e-5), so are the rankings."""
    tokens, ids, mask, g = _inputs(11)
    sims = torch.randn(tokens.shape[0], ids.shape[0], generator=g)
    brute = _brute_force(any_recipe, tokens, ids, mask)
    i2t, t2i = rerank_with_itm(
        any_recipe, tokens, ids, mask, sims, k=1000, batch_size=10, kv_cache_gib=kv_cache_gib, group_size=group_size
    )
    torch.testing.assert_close(i2t, brute, atol=1e-5, rtol=0)
    torch.testing.assert_close(t2i, brute, atol=1e-5, rtol=0)
    text_image_index = torch.arange(ids.shape[0]) % tokens.shape[0]
    for ours, theirs in zip(
        retrieval_ranks(i2t, text_image_index), retrieval_ranks(brute, text_image_index), strict=True
    ):
        assert torch.equal(ours, theirs)
    assert reranked_recalls(i2t, t2i, text_image_index) == retrieval_recalls(brute, text_image_index)


def test_pair_scores_with_text_states_and_image_mask(any_recipe: PretrainRecipe) -> None:
    tokens, ids, mask, g = _inputs(5)
    image_mask = torch.ones(tokens.shape[:2], dtype=torch.long)
    image_mask[2, 3:] = 0
    image_index = torch.tensor([2, 0, 2, 4, 1, 2, 3])
    text_index = torch.tensor([0, 5, 7, 11, 5, 3, 0])
    with torch.no_grad():
        scores = itm_pair_scores(any_recipe, tokens, ids, mask, image_index, text_index, 3, image_mask=image_mask)
        states = text_states_for(any_recipe.backbone.stream, ids, mask)
        valid = mask[..., None]  # positions past a caption's length are masked keys, never read
        expected_states = any_recipe.backbone.encode_text(ids, mask)
        torch.testing.assert_close(states * valid, expected_states * valid, atol=1e-5, rtol=0)
        given = itm_pair_scores(
            any_recipe, tokens, ids, mask, image_index, text_index, 4, image_mask=image_mask, text_states=states
        )
        expected = []
        for i, j in zip(image_index.tolist(), text_index.tolist(), strict=True):
            fused = any_recipe.backbone.stream.fuse(
                mask[j : j + 1], tokens[i : i + 1], image_mask[i : i + 1], input_ids=ids[j : j + 1]
            )
            expected.append(any_recipe.itm.itm_head(fused.last_hidden_state[:, 0])[0, 1].item())
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(given, torch.tensor(expected), atol=1e-5, rtol=0)
    assert itm_pair_scores(any_recipe, tokens, ids, mask, image_index[:0], text_index[:0]).shape == (0,)


def test_topk_pairs_union_in_image_major_order() -> None:
    sims = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    image_index, text_index, in_i2t, in_t2i = topk_pairs(sims, k=1)
    assert in_i2t.tolist() == [[True, False, False], [False, True, False]]
    assert in_t2i.tolist() == [[True, False, True], [False, True, False]]
    assert list(zip(image_index.tolist(), text_index.tolist(), strict=True)) == [(0, 0), (0, 2), (1, 1)]
    with pytest.raises(ValueError, match="k must be"):
        topk_pairs(sims, k=0)


@pytest.mark.parametrize("num_pairs", [0, 1, 7, 10])
@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_pair_shard_covers_every_pair_once_in_rank_order(num_pairs: int, world_size: int) -> None:
    shards = [pair_shard(num_pairs, rank, world_size) for rank in range(world_size)]
    assert [i for part in shards for i in range(num_pairs)[part]] == list(range(num_pairs))
    sizes = [part.stop - part.start for part in shards]
    assert max(sizes) - min(sizes) <= 1
    for bad in ((0, 0), (2, 2), (-1, 2)):
        with pytest.raises(ValueError, match="rank"):
            pair_shard(num_pairs, *bad)


def test_sharded_scores_concatenate_to_the_single_process_scores(recipe: PretrainRecipe) -> None:
    """Ranks simulated in one process: each scores its shard; the rank-order concatenation is the full result."""
    tokens, ids, mask, g = _inputs(3)
    sims = torch.randn(tokens.shape[0], ids.shape[0], generator=g)
    image_index, text_index, _, _ = topk_pairs(sims, k=3)
    full = itm_pair_scores(recipe, tokens, ids, mask, image_index, text_index, batch_size=4)
    world = 3
    parts = []
    for rank in range(world):
        part = pair_shard(image_index.shape[0], rank, world)
        touched = image_index[part].unique()
        assert touched.numel() <= -(-tokens.shape[0] // world) + 1  # a contiguous image range per rank
        parts.append(itm_pair_scores(recipe, tokens, ids, mask, image_index[part], text_index[part], batch_size=4))
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-6, rtol=0)
    assert torch.equal(gather_pair_scores(full, full.shape[0]), full)  # one process: the identity
    with pytest.raises(RuntimeError, match="expected"):
        gather_pair_scores(parts[0], full.shape[0])
    with pytest.raises(RuntimeError, match="process group"):
        rerank_with_itm(recipe, tokens, ids, mask, sims, k=3, rank=0, world_size=2)


def test_itc_and_itm_recall_keys_and_itc_similarities(any_recipe: PretrainRecipe) -> None:
    tokens, ids, mask, g = _inputs(9)
    with torch.no_grad():
        sims, states = itc_similarities(any_recipe, tokens, ids, mask, batch_size=5)
        text_feat = any_recipe.itc.text_features(any_recipe.backbone.encode_text(ids, mask), mask)
        expected = any_recipe.itc.image_features(tokens) @ text_feat.t()
    torch.testing.assert_close(sims, expected, atol=1e-5, rtol=0)
    assert (states is None) == any_recipe.backbone.single_stream
    i2t, t2i = rerank_with_itm(any_recipe, tokens, ids, mask, sims, k=4, text_states=states)
    text_image_index = torch.arange(ids.shape[0]) % tokens.shape[0]
    out = itc_and_itm_recalls(sims, i2t, t2i, text_image_index)
    metrics = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean"]
    assert sorted(out) == sorted([f"itc_{m}" for m in metrics] + [f"itm_{m}" for m in metrics])
    itc = retrieval_recalls(sims, text_image_index)
    itm = reranked_recalls(i2t, t2i, text_image_index)
    assert all(out[f"itc_{m}"] == itc[m] and out[f"itm_{m}"] == itm[m] for m in metrics)


def test_kv_chunk_size_follows_the_budget(recipe: PretrainRecipe) -> None:
    stream = recipe.backbone.stream  # 2 fusion layers, hidden 64: 2 * 2 * 5 * 64 * 4 bytes per image in fp32
    per_image = 2 * 2 * 5 * 64 * 4
    assert images_per_kv_chunk(stream, 5, torch.float32, 10 * per_image / 2**30) == 10
    assert images_per_kv_chunk(stream, 5, torch.bfloat16, 10 * per_image / 2**30) == 20
    assert images_per_kv_chunk(stream, 5, torch.float32, 1e-12) == 1
    with pytest.raises(ValueError, match="kv_cache_gib"):
        images_per_kv_chunk(stream, 5, torch.float32, 0)


def test_plan_groups_pairs_of_one_image_and_orders_groups_by_length() -> None:
    local_image = torch.tensor([1, 0, 1, 1, 0, 1, 1])
    lengths = torch.tensor([5, 3, 2, 7, 4, 2, 6])
    plan = _plan_chunk(local_image, lengths, num_images=2, group_size=2)
    rows = plan.row_pair.view(-1, 2)
    # image 0: pairs 1 (3), 4 (4) -> one group; image 1: 2 (2), 5 (2) | 0 (5), 6 (6) | 3 (7) + padding
    assert plan.group_image.tolist() == [1, 0, 1, 1]
    assert plan.group_length.tolist() == [2, 4, 6, 7]
    assert rows.tolist() == [[2, 5], [1, 4], [0, 6], [3, 3]]
    assert plan.row_valid.tolist() == [True] * 7 + [False]
    assert sorted(plan.row_pair[plan.row_valid].tolist()) == list(range(7))  # every pair exactly once


def test_auto_group_size() -> None:
    assert auto_group_size(1440.0, 512) == 16  # COCO-like: ~1,440 pairs per image
    assert auto_group_size(19.0, 256) == 4
    assert auto_group_size(2.4, 256) == 1
    assert auto_group_size(1000.0, 8) == 8


def _rerank_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo processes: the same model and inputs, each scoring its share of the pairs."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = _recipe(split=False)
        tokens, ids, mask, _ = _inputs(21, num_images=7, num_texts=15)
        sims = torch.randn(7, 15, generator=torch.Generator().manual_seed(22))
        with torch.no_grad():
            scores = rerank_with_itm(model, tokens, ids, mask, sims, k=4, batch_size=5, rank=rank, world_size=2)
        torch.save({"scores": scores, "state": model.state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_rerank_returns_the_single_process_matrices_on_every_rank(tmp_path) -> None:
    """Distributed retrieval evaluation, for real: two gloo processes split the pairs, gather, and each returns the
    matrices one process computes alone."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rerank_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    model = _recipe(split=False)
    model.load_state_dict(ranks[0]["state"])
    tokens, ids, mask, _ = _inputs(21, num_images=7, num_texts=15)
    sims = torch.randn(7, 15, generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        single = rerank_with_itm(model, tokens, ids, mask, sims, k=4, batch_size=5)
    for result in ranks:
        for got, want in zip(result["scores"], single, strict=True):
            assert torch.equal(torch.isinf(got), torch.isinf(want))
            torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)], atol=1e-6, rtol=0)
