"""Retrieval evaluation time: encode N images and 5N captions, ITC similarities and recall, then ITM re-ranking."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks.model import RECIPES, Case, build_recipe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_retrieval(
    recipe_name: str,
    device_name: str,
    precision: str,
    num_images: int = 1000,
    captions_per_image: int = 5,
    k: int = 16,
    encode_batch: int = 128,
    rerank_batch: int = 256,
    text_length: int = 30,
) -> dict:
    """Time each phase of a zero-shot retrieval evaluation on random weights and random inputs."""
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning.*")
    from vlalign.evaluation.metrics import retrieval_recalls
    from vlalign.evaluation.retrieval import rerank_with_itm, reranked_recalls

    device = torch.device(device_name)
    size = RECIPES[recipe_name]
    case = Case("retrieval", recipe_name, objectives="itc+itm", precision=precision)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        recipe, _ = build_recipe(case, Path(tmp))
    recipe = recipe.to(device).eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    g = torch.Generator().manual_seed(0)
    num_texts = num_images * captions_per_image
    ids = torch.randint(5, size.vocab, (num_texts, text_length), generator=g)
    lengths = torch.randint(8, text_length + 1, (num_texts,), generator=g)
    mask = (torch.arange(text_length)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0).to(device)
    mask = mask.to(device)
    text_image_index = (torch.arange(num_texts) // captions_per_image).to(device)
    phases: dict[str, float] = {}

    def timed(name: str):
        @contextlib.contextmanager
        def block():
            _sync(device)
            start = time.perf_counter()
            yield
            _sync(device)
            phases[name] = time.perf_counter() - start

        return block()

    with autocast:
        # warm-up of every kernel shape on a few samples, outside the timings
        recipe.backbone.vision(torch.randn(2, 3, size.img_size, size.img_size, device=device))
        recipe.backbone.stream.encode_text(ids[:2], mask[:2])
        with timed("encode_images"):
            tokens, image_feat = [], []
            for start in range(0, num_images, encode_batch):
                count = min(encode_batch, num_images - start)
                images = torch.randn(count, 3, size.img_size, size.img_size, generator=g).to(device)
                out = recipe.backbone.vision(images)
                tokens.append(out)
                image_feat.append(recipe.itc.image_features(out))
            image_tokens, image_feat = torch.cat(tokens), torch.cat(image_feat)
        with timed("encode_texts"):
            text_feat = torch.cat(
                [
                    recipe.itc.text_features(
                        recipe.backbone.stream.encode_text(
                            ids[s : s + encode_batch], mask[s : s + encode_batch]
                        ).last_hidden_state,
                        mask[s : s + encode_batch],
                    )
                    for s in range(0, num_texts, encode_batch)
                ]
            )
        with timed("itc_similarity_and_recall"):
            sims = image_feat @ text_feat.t()
            itc_recalls = retrieval_recalls(sims, text_image_index)
        with timed("itm_rerank"):
            i2t, t2i = rerank_with_itm(recipe, image_tokens, ids, mask, sims, k=k, batch_size=rerank_batch)
            itm_recalls = reranked_recalls(i2t, t2i, text_image_index)
    pairs = int((torch.isfinite(i2t) | torch.isfinite(t2i)).sum())
    total = sum(phases.values())
    return {
        "recipe": recipe_name,
        "device": device_name,
        "precision": precision,
        "num_images": num_images,
        "num_texts": num_texts,
        "k": k,
        "rerank_batch": rerank_batch,
        "pairs_fused": pairs,
        "pairs_per_s": pairs / phases["itm_rerank"],
        "phases_s": phases,
        "total_s": total,
        "itc_r_mean_random_weights": itc_recalls["r_mean"],
        "itm_r_mean_random_weights": itm_recalls["r_mean"],
        "settings": dataclasses.asdict(case),
    }
