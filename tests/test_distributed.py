"""Two CPU processes (gloo, loopback) agree with one process on the concatenated batch where the math says so.

One spawn runs every distributed scenario (process start-up dominates the cost); the tests compare its saved
results with single-process computations. Also: shards split over 2 ranks x 2 workers read every sample once.
"""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlalign.data.tokenization import VocabInfo
from vlalign.objectives.context import StepContext
from vlalign.objectives.itc import ITC
from vlalign.objectives.itm import ITM
from vlalign.tasks.pretrain import PretrainRecipe
from vlalign.testing import tiny_recipe

WORLD = 2
LOCAL = 4  # samples per rank
VOCAB = VocabInfo(vocab_size=40, pad_token_id=0, unk_token_id=1, cls_token_id=2, sep_token_id=3, mask_token_id=4)
ALPHA = 0.4
SIMLA_ITC = {"queue_size": 32, "distill": True, "gather_features": True}
LOCAL_ITC = {"queue_size": 32, "distill": True, "gather_features": False}
CLIP_ITC = {"queue_size": 0, "distill": False, "gather_features": True, "gather_with_grad": True}
GRAD_PARAMS = ("itc.vision_proj.weight", "itc.text_proj.weight", "backbone.vision.vit.patch_embed.proj.weight")
ITM_REPEATS = 6


def make_recipe(itc: dict, itm: dict | None = None, fusion_layer: int | None = None) -> PretrainRecipe:
    """Identical weights and initial queues in every process (``tiny_recipe`` seeds before building)."""
    stream = {
        "hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 16, "hidden_dropout": 0.0,
        "attention_dropout": 0.0, "fusion_layer": fusion_layer,
    }  # fmt: skip
    return tiny_recipe(
        "itc_itm", stream=stream, vision={"img_size": 16}, vocab=VOCAB,
        itc=ITC(embed_dim=8, **itc), itm=ITM(**itm) if itm is not None else None,
    )  # fmt: skip


def full_batch(length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    total = WORLD * LOCAL
    ids = torch.randint(5, 40, (total, length), generator=g)
    ids[:, 0] = VOCAB.cls_token_id
    lengths = torch.randint(3, length + 1, (total,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return {
        "image": torch.randn(total, 3, 16, 16, generator=g),
        "input_ids": ids.masked_fill(mask == 0, 0),
        "attention_mask": mask,
        "image_ids": torch.tensor([0, 1, 2, 3, 4, 0, 6, 3]),  # samples 5 and 7 repeat images of rank 0
    }


def shard(batch: dict[str, torch.Tensor], rank: int, length: int | None = None) -> dict[str, torch.Tensor]:
    out = {key: value[rank * LOCAL : (rank + 1) * LOCAL] for key, value in batch.items()}
    if length is not None:  # captions padded to a per-rank length, as per-batch padding gives
        out["input_ids"], out["attention_mask"] = out["input_ids"][:, :length], out["attention_mask"][:, :length]
    return out


def run_objectives(recipe: PretrainRecipe, batch: dict) -> tuple[dict, dict]:
    """What training_step does, keeping what the objectives published."""
    ctx = StepContext(recipe.backbone, batch, alpha=ALPHA, masked_images=recipe.needs_masked_images)
    losses = {}
    for objective in recipe.objectives:
        out = objective(ctx)
        ctx.published[objective.name] = out.publish
        losses[objective.name] = out.loss
    return ctx.published, losses


def _queues(recipe: PretrainRecipe) -> dict[str, torch.Tensor]:
    itc = recipe.itc
    return {"image": itc.image_queue.clone(), "text": itc.text_queue.clone(), "ptr": itc.queue_ptr.clone()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results: dict = {}
    batch = full_batch()
    local = shard(batch, rank)
    try:
        with torch.no_grad():
            for name, itc in (("simla", SIMLA_ITC), ("local", LOCAL_ITC)):
                recipe = make_recipe(itc)
                published, losses = run_objectives(recipe, local)
                recipe.itc.after_optimizer_step()
                results[name] = {
                    "sim_i2t": published["itc"]["sim_i2t_global"],
                    "sim_t2i": published["itc"]["sim_t2i_global"],
                    "loss": losses["itc"],
                    "queues": _queues(recipe),
                }
        recipe = make_recipe(CLIP_ITC)
        _, losses = run_objectives(recipe, local)
        losses["itc"].backward()
        params = dict(recipe.named_parameters())
        grads = {}
        for name in GRAD_PARAMS:  # what DDP does: average the gradients over ranks
            grad = params[name].grad.clone()
            dist.all_reduce(grad)
            grads[name] = grad / WORLD
        results["clip"] = {"loss": losses["itc"].detach(), "grads": grads}

        negatives = []
        for fusion_layer in (None, 1):  # single stream (ids re-encoded) and ALBEF split (text states gathered)
            recipe = make_recipe(CLIP_ITC | {"gather_with_grad": False}, {"global_negatives": True}, fusion_layer)
            for step in range(ITM_REPEATS // 2):
                torch.manual_seed(100 * rank + step)
                rank_batch = shard(batch, rank, length=5 + 2 * rank)  # ranks pad captions to different lengths
                published, losses = run_objectives(recipe, rank_batch)
                (losses["itc"] + losses["itm"]).backward()  # gradients flow through the gathered image tokens
                negatives.append({k: published["itm"][k].clone() for k in ("negative_image", "negative_text")})
                assert torch.isfinite(losses["itm"])
        results["itm"] = negatives
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("distributed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single(itc: dict) -> tuple[PretrainRecipe, dict, dict]:
    recipe = make_recipe(itc)
    published, losses = run_objectives(recipe, full_batch())
    return recipe, published, losses


def test_gathered_similarities_are_rows_of_the_single_process_matrix(ranks: list[dict]) -> None:
    with torch.no_grad():
        _, published, _ = _single(SIMLA_ITC)
    for rank, result in enumerate(ranks):
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        assert result["simla"]["sim_i2t"].shape == (LOCAL, WORLD * LOCAL)
        torch.testing.assert_close(result["simla"]["sim_i2t"], published["itc"]["sim_i2t_global"][rows])
        torch.testing.assert_close(result["simla"]["sim_t2i"], published["itc"]["sim_t2i_global"][rows])


@pytest.mark.parametrize("config", ["simla", "clip"])
def test_mean_of_rank_losses_equals_single_process_loss(ranks: list[dict], config: str) -> None:
    _, _, losses = _single(SIMLA_ITC if config == "simla" else CLIP_ITC)
    mean = sum(result[config]["loss"] for result in ranks) / WORLD
    torch.testing.assert_close(mean, losses["itc"].detach())


def test_averaged_gradients_equal_single_process_gradients_with_gather_with_grad(ranks: list[dict]) -> None:
    recipe, _, losses = _single(CLIP_ITC)
    losses["itc"].backward()
    params = dict(recipe.named_parameters())
    for name in GRAD_PARAMS:
        for result in ranks:
            torch.testing.assert_close(result["clip"]["grads"][name], params[name].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("config", ["simla", "local"])
def test_queues_hold_every_ranks_features_like_one_process(ranks: list[dict], config: str) -> None:
    """Both ranks enqueue all-gathered momentum features, with or without gather_features for the loss."""
    with torch.no_grad():
        recipe, _, _ = _single(SIMLA_ITC if config == "simla" else LOCAL_ITC)
        recipe.itc.after_optimizer_step()
    expected = _queues(recipe)
    assert int(expected["ptr"]) == WORLD * LOCAL
    for result in ranks:
        for key in ("image", "text", "ptr"):
            torch.testing.assert_close(result[config]["queues"][key], expected[key])


def test_global_negatives_are_valid_global_indices_never_the_positive(ranks: list[dict]) -> None:
    image_ids = full_batch()["image_ids"]
    drawn_from_other_rank = 0
    for rank, result in enumerate(ranks):
        assert len(result["itm"]) == ITM_REPEATS
        own = torch.arange(LOCAL) + rank * LOCAL
        for draw in result["itm"]:
            for key in ("negative_image", "negative_text"):
                index = draw[key]
                assert index.shape == (LOCAL,)
                assert bool(((index >= 0) & (index < WORLD * LOCAL)).all())
                assert not bool((index == own).any())
                assert not bool((image_ids[index] == image_ids[own]).any())  # same image on any rank excluded
                drawn_from_other_rank += int(((index // LOCAL) != rank).sum())
    assert drawn_from_other_rank > 0


def test_global_negatives_in_one_process_stay_local() -> None:
    recipe = make_recipe(CLIP_ITC, {"global_negatives": True})
    batch = shard(full_batch(), 0)
    published, losses = run_objectives(recipe, batch)
    assert published["itm"]["negative_image"].max() < LOCAL
    assert torch.isfinite(losses["itm"])


def _shard_module(tmp_path: Path, num_train: int, rank: int):
    """A 2-worker ShardDataModule over ``num_train`` synthetic samples (10 per shard), as seen by ``rank``."""
    from vlalign.data.synth import write_synthetic
    from vlalign.datamodules.webdataset import ShardDataModule

    if not (tmp_path / "tokenizer").is_dir():
        write_synthetic(
            tmp_path, num_train=num_train, num_val=0, num_test=0, image_size=32, samples_per_shard=10, progress=False
        )
    module = ShardDataModule(
        tokenizer=str(tmp_path / "tokenizer"),
        train_shards=str(tmp_path / "shards" / "train" / f"{{000000..{num_train // 10 - 1:06d}}}.tar"),
        image_size=32,
        batch_size=5,
        num_workers=2,
        shuffle_buffer=8,
        seed=3,
    )
    module.trainer = SimpleNamespace(global_rank=rank, world_size=WORLD, current_epoch=0)
    return module


def test_shards_split_across_ranks_and_workers_read_every_sample_once(tmp_path: Path) -> None:
    seen: dict[int, list[str]] = {0: [], 1: []}  # 8 shards: 2 for each of the 2 ranks x 2 workers
    for rank in range(WORLD):
        loader = _shard_module(tmp_path, 80, rank).train_dataloader()
        for epoch in range(2):
            for batch in loader:
                seen[epoch].extend(batch["keys"])
    for epoch, keys in seen.items():
        assert len(keys) == 80, f"epoch {epoch}: {len(keys)} samples read"
        assert len(set(keys)) == 80, f"epoch {epoch}: duplicates"


def test_exact_epoch_with_fewer_shards_than_readers_fails_instead_of_hanging(tmp_path: Path) -> None:
    module = _shard_module(tmp_path, 20, rank=0)
    with pytest.raises(ValueError, match=r"2 shard\(s\) for 4 readers.*resampled"):
        module.train_dataloader()
