"""Retrieval evaluation time: encode N images and 5N captions, ITC similarities and recall, then ITM re-ranking
(docs/method.md §5.2), with and without K/V reuse.

The re-ranking phase runs ``vlalign.evaluation.retrieval.rerank_with_itm`` (each image's cross-attention keys and
values computed once, gathered per pair). The "plain" baseline is the previous implementation, emulated here: the
same pairs in the same length-sorted batches, but every pair projects its image's keys and values again (and, under
an ALBEF split, re-runs the text layers). The baseline scores all pairs, or a random sample of ``baseline_pairs``
of them (20,000 by default; its cost per pair does not depend on which pairs), and both scores are compared on the pairs it scored.

    python -m benchmarks.evaluation --device cpu                        # tiny recipe, 1000 × 5000, k = 16
    python -m benchmarks.evaluation --device cuda --coco5k --out $OUT/coco5k.json   # 5000 × 25000, k = 256, full

``benchmarks.run`` calls :func:`run_retrieval` for its retrieval table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.model import RECIPES


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load() -> list[float]:
    """1-, 5- and 15-minute load averages (``uptime``); other jobs on the machine skew CPU timings."""
    return [round(x, 2) for x in os.getloadavg()]


def build_model(recipe_name: str, fusion_layer: int | None = None) -> Any:
    """A recipe of ``recipe_name``'s sizes (``benchmarks.model.RECIPES``) with random weights, ITC (no queue) + ITM."""
    from vlalign.data.tokenization import VocabInfo
    from vlalign.models.stream import StreamConfig
    from vlalign.models.vision import VisionConfig
    from vlalign.objectives.itc import ITC
    from vlalign.objectives.itm import ITM
    from vlalign.tasks.pretrain import PretrainRecipe

    size = RECIPES[recipe_name]
    vocab = VocabInfo(vocab_size=size.vocab) if size.vocab == 30522 else VocabInfo(size.vocab, 0, 2, 3, 4, 1)
    return PretrainRecipe(
        vision=VisionConfig(name=size.vision, img_size=size.img_size),
        stream=StreamConfig(
            vocab_size=size.vocab,
            hidden_size=size.hidden,
            num_layers=size.layers,
            num_heads=size.heads,
            intermediate_size=size.intermediate,
            max_position_embeddings=size.max_positions,
            encoder_width=size.hidden,
            fusion_layer=fusion_layer,
            type_vocab_size=2 if fusion_layer is not None else 0,
        ),
        vocab=vocab,
        itc=ITC(embed_dim=size.embed_dim, queue_size=0, distill=False),
        itm=ITM(),
    )


@torch.no_grad()
def plain_pair_scores(
    model: Any,
    image_tokens: Tensor,
    text_ids: Tensor,
    text_mask: Tensor,
    image_index: Tensor,
    text_index: Tensor,
    batch_size: int = 256,
) -> Tensor:
    """The re-ranking fusion without K/V reuse (the implementation before it): pairs sorted by caption length,
    ``batch_size`` per pass, each pass projecting its images' keys and values (and, under an ALBEF split, running
    the text layers) again through the plain ``fuse``."""
    device = image_tokens.device
    pair_lengths = text_mask.sum(1).cpu()[text_index.cpu()]
    order = pair_lengths.argsort(stable=True)
    scores = torch.empty(image_index.shape[0], dtype=torch.float32, device=device)
    for start in range(0, order.shape[0], batch_size):
        chunk = order[start : start + batch_size]
        length = max(1, int(pair_lengths[chunk].max()))
        chunk = chunk.to(device)
        images, texts = image_index[chunk], text_index[chunk]
        ids, mask = text_ids[texts, :length], text_mask[texts, :length]
        fused = model.backbone.stream.fuse(mask, image_tokens[images], input_ids=ids)
        scores[chunk] = model.itm.itm_head(fused.last_hidden_state[:, 0])[:, 1].float()
    return scores


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
    baseline_pairs: int | None = 20_000,
    fusion_layer: int | None = None,
    skip_baseline: bool = False,
) -> dict:
    """Time each phase of a zero-shot retrieval evaluation on random weights and random inputs.

    ``baseline_pairs``: score a random sample of this many pairs with the plain fusion (None or 0: all of them);
    ``skip_baseline``: do not run it. Returns a JSON-able dict (``pairs_per_s`` is the K/V-reuse path's rate).
    """
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning.*")
    from vlalign.evaluation.metrics import retrieval_recalls
    from vlalign.evaluation.retrieval import itc_similarities, rerank_with_itm, reranked_recalls, topk_pairs

    device = torch.device(device_name)
    size = RECIPES[recipe_name]
    torch.manual_seed(0)
    model = build_model(recipe_name, fusion_layer).to(device).eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    g = torch.Generator().manual_seed(0)
    num_texts = num_images * captions_per_image
    cls_id = 101 if size.vocab == 30522 else 2
    ids = torch.randint(5, size.vocab, (num_texts, text_length), generator=g)
    ids[:, 0] = cls_id
    lengths = torch.randint(8, text_length + 1, (num_texts,), generator=g)
    mask = (torch.arange(text_length)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0).to(device)
    mask = mask.to(device)
    text_image_index = (torch.arange(num_texts) // captions_per_image).to(device)
    phases: dict[str, float] = {}
    cpu_phases: dict[str, float] = {}  # process CPU time: less sensitive than wall time to other jobs on a CPU
    load_before = _load()

    @contextlib.contextmanager
    def timed(name: str) -> Iterator[None]:
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        yield
        _sync(device)
        phases[name] = time.perf_counter() - start
        cpu_phases[name] = time.process_time() - cpu_start

    with autocast:
        # warm-up of the kernels on a few samples, outside the timings
        warm = model.backbone.vision(torch.randn(2, 3, size.img_size, size.img_size, device=device))
        rerank_with_itm(model, warm, ids[:4], mask[:4], torch.randn(2, 4, device=device), k=2)
        with timed("encode_images"):
            tokens = []
            for start in range(0, num_images, encode_batch):
                count = min(encode_batch, num_images - start)
                images = torch.randn(count, 3, size.img_size, size.img_size, generator=g).to(device)
                tokens.append(model.backbone.vision(images))
            image_tokens = torch.cat(tokens)
        with timed("encode_texts"):  # image features, text layers once per caption, similarities
            sims, text_states = itc_similarities(model, image_tokens, ids, mask, encode_batch)
        with timed("itc_similarity_and_recall"):
            itc_recalls = retrieval_recalls(sims, text_image_index)
        with timed("itm_rerank"):
            i2t, t2i = rerank_with_itm(
                model, image_tokens, ids, mask, sims, k=k, batch_size=rerank_batch, text_states=text_states
            )
            itm_recalls = reranked_recalls(i2t, t2i, text_image_index)
        image_index, text_index, _, _ = topk_pairs(sims, k)
        pairs = int(image_index.shape[0])
        baseline: dict[str, Any] | None = None
        if not skip_baseline:
            sample = torch.randperm(pairs, generator=g)[: baseline_pairs or pairs].sort().values.to(device)
            with timed("itm_rerank_plain"):
                plain = plain_pair_scores(
                    model, image_tokens, ids, mask, image_index[sample], text_index[sample], rerank_batch
                )
            reused = i2t.where(i2t.isfinite(), t2i)[image_index[sample], text_index[sample]]
            baseline = {
                "pairs": int(sample.shape[0]),
                "seconds": phases["itm_rerank_plain"],
                "pairs_per_s": sample.shape[0] / phases["itm_rerank_plain"],
                "pairs_per_cpu_s": sample.shape[0] / cpu_phases["itm_rerank_plain"],
                "max_abs_score_diff_vs_kv_reuse": float((plain - reused).abs().max()),
            }
    reuse_rate = pairs / phases["itm_rerank"]
    total = sum(value for key, value in phases.items() if key != "itm_rerank_plain")
    return {
        "recipe": recipe_name,
        "layout": "single stream" if fusion_layer is None else f"ALBEF split, fusion_layer={fusion_layer}",
        "device": device_name,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "precision": precision,
        "num_images": num_images,
        "num_texts": num_texts,
        "image_tokens": int(image_tokens.shape[1]),
        "k": k,
        "rerank_batch": rerank_batch,
        "pairs_fused": pairs,
        "pairs_per_s": reuse_rate,
        "plain": baseline,
        "pairs_per_cpu_s": pairs / cpu_phases["itm_rerank"],
        "speedup_kv_reuse": None if baseline is None else reuse_rate / baseline["pairs_per_s"],
        "speedup_kv_reuse_cpu_time": None
        if baseline is None
        else pairs / cpu_phases["itm_rerank"] / baseline["pairs_per_cpu_s"],
        "phases_s": phases,
        "phases_process_cpu_s": cpu_phases,
        "total_s": total,
        "load_average_before": load_before,
        "load_average_after": _load(),
        "itc_r_mean_random_weights": itc_recalls["r_mean"],
        "itm_r_mean_random_weights": itm_recalls["r_mean"],
    }


def table(r: dict) -> str:
    """A markdown summary of one :func:`run_retrieval` result."""
    phases = r["phases_s"]
    lines = [
        f"{r['num_images']} images × {r['num_texts']} captions, recipe {r['recipe']} ({r['layout']}), "
        f"{r['device_name']}, {r['precision']}, k = {r['k']}, {r['rerank_batch']} pairs per fusion pass, "
        f"load average {r['load_average_before']} → {r['load_average_after']}",
        "",
        "| phase | time |",
        "|---|---|",
        f"| encode images | {phases['encode_images']:.2f} s |",
        f"| encode captions + ITC similarities | {phases['encode_texts']:.2f} s |",
        f"| ITC recall | {phases['itc_similarity_and_recall']:.2f} s |",
        f"| ITM re-ranking with K/V reuse, {r['pairs_fused']:,} pairs | {phases['itm_rerank']:.2f} s "
        f"({r['pairs_per_s']:,.0f} pairs/s; {r['pairs_per_cpu_s']:,.0f} per process CPU-s) |",
    ]
    if r["plain"] is not None:
        p = r["plain"]
        lines.append(
            f"| plain re-ranking (no K/V reuse), {p['pairs']:,} pairs | {p['seconds']:.2f} s "
            f"({p['pairs_per_s']:,.0f} pairs/s; {p['pairs_per_cpu_s']:,.0f} per process CPU-s) |"
        )
        lines.append(
            f"| K/V reuse speed-up | {r['speedup_kv_reuse']:.2f}× wall, {r['speedup_kv_reuse_cpu_time']:.2f}× CPU "
            f"time; max score difference {p['max_abs_score_diff_vs_kv_reuse']:.1e} |"
        )
    lines.append(f"| total (K/V reuse) | {r['total_s']:.2f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None, help="default: tiny on cpu, full on cuda")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: fp32 cpu, bf16 cuda")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--rerank-batch", type=int, default=256)
    parser.add_argument("--encode-batch", type=int, default=128)
    parser.add_argument("--baseline-pairs", type=int, default=20_000, help="plain-path sample; 0: all pairs")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--fusion-layer", type=int, default=None, help="ALBEF split at this layer (default: none)")
    parser.add_argument(
        "--coco5k",
        action="store_true",
        help="the COCO 5k test setting: 5000 images × 25000 captions, k = 256, full recipe, bf16, 512 pairs per "
        "pass, plain path on a 200,000-pair sample",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (a .md table goes next to it)")
    args = parser.parse_args(argv)
    if args.coco5k:
        args.images, args.captions_per_image, args.k = 5000, 5, 256
        args.recipe = args.recipe or "full"
        args.rerank_batch = 512
        args.baseline_pairs = 200_000
    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    result = run_retrieval(
        args.recipe or ("tiny" if cpu else "full"),
        args.device,
        args.precision or ("fp32" if cpu else "bf16"),
        num_images=args.images,
        captions_per_image=args.captions_per_image,
        k=args.k,
        encode_batch=args.encode_batch,
        rerank_batch=args.rerank_batch,
        baseline_pairs=args.baseline_pairs,
        fusion_layer=args.fusion_layer,
        skip_baseline=args.skip_baseline,
    )
    result["command"] = "python -m benchmarks.evaluation " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(result)
    print(text, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
