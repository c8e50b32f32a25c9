"""Image-text retrieval scoring: ITC similarities re-ranked by the ITM head, batched over many pairs at once.

The protocol is ALBEF/SIMLA's (docs/method.md §5.2): ITC similarities for all pairs, then each query's top ``k``
candidates re-scored by the ITM head's match logit; recall as §5.3. The reference re-ranks one query at a time and
crashes when ``k`` exceeds the number of candidates (docs/differences.md row 22). Here:

- every (image, caption) pair in the top ``k`` of either direction is scored once (:func:`topk_pairs`), and ``k``
  is capped by the candidate count;
- each image's cross-attention keys and values are computed once per fusion layer
  (:meth:`~vlalign.models.stream.SingleStreamTransformer.precompute_image_kv`) and gathered for every caption paired
  with it; under an ALBEF split each caption's text-layer states are computed once too;
- pairs of one image are fused in groups that read its keys and values once; fusion batches of ``batch_size``
  pairs mix many queries, ordered by caption length and cut to the longest caption of the batch;
- distributed evaluation splits the pair list into contiguous shards (:func:`pair_shard`) and gathers the scores
  (:func:`gather_pair_scores`), so every rank ends with the full score matrices.

``model`` is anything with ``.backbone`` (:class:`~vlalign.models.backbone.Backbone`) and ``.itm.itm_head``: the
pretraining recipe, a downstream task module or :class:`vlalign.api.VisionLanguageModel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlalign.evaluation.metrics import RECALL_KS, retrieval_recalls
from vlalign.models.stream import SingleStreamTransformer
from vlalign.utils.distributed import all_gather_variable
from vlalign.utils.distributed import world_size as current_world_size

#: Default memory budget of one image chunk's cached keys and values (all fusion layers), in GiB.
KV_CACHE_GIB = 8.0


def _check_model(model: Any) -> None:
    if getattr(model, "itm", None) is None:
        raise ValueError("ITM re-ranking needs a model with an ITM head (model.itm enabled)")


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype linear layers produce on ``device``: the autocast dtype when autocast is on, else ``dtype``."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def images_per_kv_chunk(
    stream: SingleStreamTransformer, num_tokens: int, dtype: torch.dtype, budget_gib: float = KV_CACHE_GIB
) -> int:
    """How many images' keys and values (every fusion layer, ``num_tokens`` tokens each) fit in ``budget_gib``."""
    if budget_gib <= 0:
        raise ValueError(f"kv_cache_gib must be > 0, got {budget_gib}")
    element = torch.empty((), dtype=dtype).element_size()
    per_image = 2 * len(stream.fusion_layers) * num_tokens * stream.config.hidden_size * element
    return max(1, int(budget_gib * 2**30) // per_image)


@torch.no_grad()
def text_states_for(
    stream: SingleStreamTransformer, text_ids: Tensor, text_mask: Tensor, batch_size: int = 256
) -> Tensor:
    """Text-mode output of every caption, [N_txt, L, H], in batches of ``batch_size`` captions of similar length.

    Each batch is cut to its longest caption. Positions past a caption's length hold values no one reads (masked
    keys; zeros past the batch's cut). Under an ALBEF split these are the states the fusion layers continue from.
    """
    num, length = text_ids.shape
    if num == 0:
        return torch.zeros(0, length, stream.config.hidden_size, device=text_ids.device)
    lengths = text_mask.sum(1).cpu()
    order = lengths.argsort(stable=True)
    states: Tensor | None = None
    for start in range(0, num, batch_size):
        rows = order[start : start + batch_size]
        cut = max(1, int(lengths[rows[-1]]))  # sorted by length: the last caption is the longest
        rows = rows.to(text_ids.device)
        out = stream.encode_text(text_ids[rows, :cut], text_mask[rows, :cut]).last_hidden_state
        if states is None:  # allocated in the dtype the layers produce (bf16 under autocast)
            states = out.new_zeros(num, length, out.shape[-1])
        states[rows, :cut] = out
    assert states is not None
    return states


def auto_group_size(pairs_per_image: float, batch_size: int, largest: int = 16) -> int:
    """Rows that share one image's keys and values in a fusion batch: the largest power of two up to ``largest``
    (and ``batch_size``) that is at most a quarter of the mean pairs per image, so padding groups costs little."""
    size = 1
    while size * 2 <= min(largest, batch_size) and size * 2 <= pairs_per_image / 4:
        size *= 2
    return size


@dataclass
class _ChunkPlan:
    """Fusion rows of one image chunk: groups of ``group_size`` rows of one image, groups in order of length."""

    row_pair: Tensor  # [R] chunk pair position of each row (a padding row repeats its group's first pair)
    row_valid: Tensor  # [R] bool, False for padding rows
    group_image: Tensor  # [G] local image of each group
    group_length: Tensor  # [G] longest caption of each group, ascending


def _plan_chunk(local_image: Tensor, lengths: Tensor, num_images: int, group_size: int) -> _ChunkPlan:
    """Vectorised planning on the host: pairs sorted by (image, length), cut into groups of ``group_size`` pairs of
    one image (the last group of an image padded with repeats of its first pair), groups sorted by length."""
    n = group_size
    order = (local_image * (int(lengths.max()) + 1) + lengths).argsort(stable=True)
    image_sorted = local_image[order]
    counts = torch.bincount(image_sorted, minlength=num_images)
    position = torch.arange(order.shape[0]) - (counts.cumsum(0) - counts)[image_sorted]
    groups_per_image = (counts + n - 1) // n
    group = (groups_per_image.cumsum(0) - groups_per_image)[image_sorted] + position // n
    table = torch.full((int(groups_per_image.sum()), n), -1, dtype=torch.long)
    table[group, position % n] = order
    valid = table >= 0
    table = torch.where(valid, table, table[:, :1])  # slot 0 is always a real pair, and the group's shortest
    group_length = lengths[table].max(dim=1).values
    by_length = group_length.argsort(stable=True)
    table, valid = table[by_length], valid[by_length]
    return _ChunkPlan(table.flatten(), valid.flatten(), local_image[table[:, 0]], group_length[by_length])


@torch.no_grad()
def itm_pair_scores(
    model: Any,
    image_tokens: Tensor,
    text_ids: Tensor,
    text_mask: Tensor,
    image_index: Tensor,
    text_index: Tensor,
    batch_size: int = 256,
    *,
    image_mask: Tensor | None = None,
    text_states: Tensor | None = None,
    kv_cache_gib: float = KV_CACHE_GIB,
    group_size: int | None = None,
) -> Tensor:
    """ITM match logit (``itm_head(fused[CLS])[:, 1]``, as the reference) of pairs ``(image_index[p], text_index[p])``.

    ``image_tokens`` [N_img, 1+P, W] are the ViT outputs (``image_mask`` [N_img, 1+P] optional);
    ``text_ids`` / ``text_mask`` [N_txt, L] the tokenised, right-padded captions. How (docs/method.md §5.2):

    - the images that occur in the pairs are taken in chunks of at most ``kv_cache_gib`` GiB of cached keys and
      values; each chunk's cross-attention K/V are computed once per fusion layer
      (:meth:`~vlalign.models.stream.SingleStreamTransformer.precompute_image_kv`);
    - a chunk's pairs are cut into groups of ``group_size`` pairs of one image (None: :func:`auto_group_size` of the
      mean pairs per image; the last group of an image is padded with a repeat), whose K/V rows are gathered once
      per group and whose queries attend as one sequence;
    - groups are ordered by caption length and fused ``batch_size`` pairs at a time (rounded down to whole groups),
      each batch cut to its longest caption;
    - under an ALBEF split the text layers run once per caption; ``text_states`` [N_txt, ≥L_max, H] (the text-mode
      output of the same captions, e.g. kept from computing ITC features, :func:`itc_similarities`) skip even that.
      They are ignored in single stream, which fuses from the ids.

    Returns float32 scores [num_pairs] on ``image_tokens``' device. Host syncs: the pair indices and caption lengths
    are read once; none inside the batch loop.
    """
    _check_model(model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if image_index.shape != text_index.shape or image_index.dim() != 1:
        raise ValueError(
            f"image_index and text_index must be 1-d and equal in length, got {tuple(image_index.shape)} and "
            f"{tuple(text_index.shape)}"
        )
    stream: SingleStreamTransformer = model.backbone.stream
    itm_head = model.itm.itm_head
    device = image_tokens.device
    num_pairs = image_index.shape[0]
    scores = torch.empty(num_pairs + 1, dtype=torch.float32, device=device)  # the last slot takes padding rows
    if num_pairs == 0:
        return scores[:0]
    images_cpu, texts_cpu = image_index.cpu(), text_index.cpu()  # the pair list is read once per evaluation
    pair_lengths = text_mask.sum(1).cpu()[texts_cpu].clamp_min(1)

    state_rows = None  # row of each pair's caption in ``states`` (ALBEF split only)
    states = None
    if not stream.single_stream:
        if text_states is not None:
            states, state_rows = text_states, texts_cpu
        else:  # text layers once per caption that occurs in a pair
            used = texts_cpu.unique()
            used_dev = used.to(text_ids.device)
            states = text_states_for(stream, text_ids[used_dev], text_mask[used_dev], batch_size)
            state_rows = torch.searchsorted(used, texts_cpu)

    by_image = images_cpu.argsort(stable=True)
    unique_images, counts = images_cpu.unique(return_counts=True)
    offsets = [0, *counts.cumsum(0).tolist()]
    dtype = _compute_dtype(device, image_tokens.dtype)
    per_chunk = images_per_kv_chunk(stream, image_tokens.shape[1], dtype, kv_cache_gib)
    for first in range(0, unique_images.shape[0], per_chunk):
        last = min(first + per_chunk, unique_images.shape[0])
        chunk_images = unique_images[first:last]
        pairs = by_image[offsets[first] : offsets[last]]  # positions in the pair list
        n = group_size or auto_group_size(pairs.shape[0] / chunk_images.shape[0], batch_size)
        plan = _plan_chunk(
            torch.searchsorted(chunk_images, images_cpu[pairs]), pair_lengths[pairs], chunk_images.shape[0], n
        )
        chunk_dev = chunk_images.to(device)
        kv = stream.precompute_image_kv(image_tokens[chunk_dev], None if image_mask is None else image_mask[chunk_dev])
        # one host-to-device copy of the chunk's plan; the batch loop only slices it
        row_pairs = pairs[plan.row_pair]
        targets = torch.where(plan.row_valid, row_pairs, num_pairs).to(device)
        row_texts = texts_cpu[row_pairs].to(text_ids.device)
        row_states = None if state_rows is None else state_rows[row_pairs].to(states.device)
        group_image = plan.group_image.to(device)
        groups_per_batch = max(1, batch_size // n)
        num_groups = plan.group_image.shape[0]
        for g0 in range(0, num_groups, groups_per_batch):
            g1 = min(g0 + groups_per_batch, num_groups)
            r0, r1 = g0 * n, g1 * n
            cut = int(plan.group_length[g1 - 1])  # groups are in ascending length: the last is the longest
            texts = row_texts[r0:r1]
            mask = text_mask[texts, :cut]
            if row_states is None:
                start = {"input_ids": text_ids[texts, :cut]}
            else:
                start = {"text_states": states[row_states[r0:r1], :cut]}
            fused = stream.fuse_cached(mask, kv, group_image[g0:g1], group_size=n, **start)
            scores[targets[r0:r1]] = itm_head(fused.last_hidden_state[:, 0])[:, 1].float()
        del kv
    return scores[:num_pairs]


@torch.no_grad()
def topk_pairs(sims: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pairs re-ranking scores: those in the top ``k`` of an image query (row) or of a caption query (column).

    Returns ``(image_index, text_index, in_i2t, in_t2i)``: the union's pairs in row-major (image-major) order, and the
    [N_img, N_txt] masks of each direction's top ``k`` (``k`` capped by the candidate count). One host sync.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    num_images, num_texts = sims.shape
    device = sims.device
    top_texts = sims.topk(min(k, num_texts), dim=1).indices  # [N_img, k]
    top_images = sims.t().topk(min(k, num_images), dim=1).indices  # [N_txt, k]
    in_i2t = torch.zeros(num_images, num_texts, dtype=torch.bool, device=device)
    in_i2t[torch.arange(num_images, device=device)[:, None], top_texts] = True
    in_t2i = torch.zeros_like(in_i2t)
    in_t2i[top_images, torch.arange(num_texts, device=device)[:, None]] = True
    image_index, text_index = (in_i2t | in_t2i).nonzero(as_tuple=True)
    return image_index, text_index, in_i2t, in_t2i


def pair_shard(num_pairs: int, rank: int, world_size: int) -> slice:
    """The contiguous part of a pair list that ``rank`` of ``world_size`` scores (pure; no process group needed).

    Shards differ in size by at most one pair and cover the list exactly once, in rank order, so concatenating the
    ranks' scores (:func:`gather_pair_scores`) restores the list order. On the image-major list of
    :func:`topk_pairs` a shard spans a contiguous range of images, so a rank computes the keys and values of about
    ``1/world_size`` of the images (at most one image is shared with each neighbour).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if num_pairs < 0:
        raise ValueError(f"num_pairs must be >= 0, got {num_pairs}")
    base, extra = divmod(num_pairs, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


@torch.no_grad()
def gather_pair_scores(local_scores: Tensor, num_pairs: int) -> Tensor:
    """Concatenate every rank's shard of pair scores (:func:`pair_shard`) in rank order: all ranks get all scores.

    A collective (``vlalign.utils.distributed.all_gather_variable``): every rank must call it. In one process it is
    the identity.
    """
    full = all_gather_variable(local_scores)
    if full.shape[0] != num_pairs:
        raise RuntimeError(
            f"gathered {full.shape[0]} pair scores, expected {num_pairs}: every rank must score its pair_shard "
            "of the same pair list (same sims and k on every rank)"
        )
    return full


@torch.no_grad()
def rerank_with_itm(
    model: Any,
    image_tokens: Tensor,
    text_ids: Tensor,
    text_mask: Tensor,
    sims: Tensor,
    k: int,
    batch_size: int = 256,
    *,
    image_mask: Tensor | None = None,
    text_states: Tensor | None = None,
    rank: int = 0,
    world_size: int = 1,
    kv_cache_gib: float = KV_CACHE_GIB,
    group_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Re-rank the top-``k`` candidates of every query by ITM, as ALBEF/SIMLA retrieval evaluation does (§5.2).

    ``sims`` [N_img, N_txt] are ITC similarities. Returns the score matrices ``(scores_i2t, scores_t2i)``, both
    [N_img, N_txt] float32: ``scores_i2t[i, j]`` is the ITM score when caption ``j`` is among image ``i``'s top
    ``k`` by ``sims`` and ``-inf`` otherwise (image queries, rows); ``scores_t2i`` likewise for caption queries
    (columns). A pair in both top-``k`` lists is fused once, with each image's keys and values computed once
    (:func:`itm_pair_scores`; ``image_mask``, ``text_states``, ``kv_cache_gib``, ``group_size`` are passed on).

    Distributed: with ``world_size`` > 1 every rank passes the same inputs, scores its :func:`pair_shard` and the
    scores are all-gathered (:func:`gather_pair_scores`), so every rank returns the full matrices; all ranks must call
    it. Call it with the model in eval mode; wrap it in ``torch.autocast`` for reduced precision.
    """
    num_images, num_texts = sims.shape
    if image_tokens.shape[0] != num_images or text_ids.shape[0] != num_texts:
        raise ValueError(
            f"sims {tuple(sims.shape)} does not match {image_tokens.shape[0]} images and {text_ids.shape[0]} texts"
        )
    if world_size > 1 and current_world_size() != world_size:
        raise RuntimeError(
            f"rerank_with_itm(world_size={world_size}) needs an initialised process group of that size, found "
            f"{current_world_size()} process(es)"
        )
    device = image_tokens.device
    image_index, text_index, in_i2t, in_t2i = topk_pairs(sims.to(device), k)
    num_pairs = image_index.shape[0]
    part = pair_shard(num_pairs, rank, world_size)
    pair_scores = itm_pair_scores(
        model,
        image_tokens,
        text_ids,
        text_mask,
        image_index[part],
        text_index[part],
        batch_size,
        image_mask=image_mask,
        text_states=text_states,
        kv_cache_gib=kv_cache_gib,
        group_size=group_size,
    )
    if world_size > 1:
        pair_scores = gather_pair_scores(pair_scores, num_pairs)
    scores = torch.full((num_images, num_texts), float("-inf"), device=device)
    scores[image_index, text_index] = pair_scores
    minus_inf = scores.new_tensor(float("-inf"))
    return torch.where(in_i2t, scores, minus_inf), torch.where(in_t2i, scores, minus_inf)


def reranked_recalls(
    scores_i2t: Tensor, scores_t2i: Tensor, text_image_index: Tensor, ks: tuple[int, ...] = RECALL_KS
) -> dict[str, float]:
    """Recalls as :func:`vlalign.evaluation.metrics.retrieval_recalls` reports them: image→text (``txt_r*``) from the
    image queries' matrix, text→image (``img_r*``) from the caption queries' matrix."""
    i2t = retrieval_recalls(scores_i2t, text_image_index, ks)
    t2i = retrieval_recalls(scores_t2i, text_image_index, ks)
    out = {key: value for key, value in i2t.items() if key.startswith("txt_")}
    out.update({key: value for key, value in t2i.items() if key.startswith("img_")})
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def itc_and_itm_recalls(
    sims: Tensor,
    scores_i2t: Tensor,
    scores_t2i: Tensor,
    text_image_index: Tensor,
    ks: tuple[int, ...] = RECALL_KS,
) -> dict[str, float]:
    """ITC-only and ITM re-ranked recall in one flat dict (percent, docs/method.md §5.3).

    Keys: ``itc_<m>`` from the similarities ``sims`` alone and ``itm_<m>`` from the re-ranked matrices
    (:func:`reranked_recalls`), where ``<m>`` is each of ``txt_r{k}`` (image → text), ``img_r{k}`` (text → image),
    ``txt_r_mean``, ``img_r_mean`` and ``r_mean``; e.g. ``itm_r_mean``, ``itc_txt_r1``. Log them as
    ``f"{stage}/{key}"`` (``test/itm_r_mean``).
    """
    out = {f"itc_{key}": value for key, value in retrieval_recalls(sims, text_image_index, ks).items()}
    out.update(
        {f"itm_{key}": value for key, value in reranked_recalls(scores_i2t, scores_t2i, text_image_index, ks).items()}
    )
    return out


@torch.no_grad()
def itc_similarities(
    model: Any, image_tokens: Tensor, text_ids: Tensor, text_mask: Tensor, batch_size: int = 256
) -> tuple[Tensor, Tensor | None]:
    """Cosine similarities ``v · t`` [N_img, N_txt] (float32, no temperature; docs/method.md §5.1) and, under an ALBEF
    split, the captions' text-mode states [N_txt, L, H] to pass to :func:`rerank_with_itm` as ``text_states`` (the
    fusion layers continue from them); None in single stream, whose fusion starts from the ids.

    Each caption runs through the text layers once, in batches of similar length. ``model`` needs ``.backbone`` and ``.itc`` (``image_features``, ``text_features``).
    """
    itc = getattr(model, "itc", None)
    if itc is None:
        raise ValueError("ITC similarities need a model with ITC projections (model.itc enabled)")
    image_feat = torch.cat(
        [itc.image_features(image_tokens[s : s + batch_size]) for s in range(0, image_tokens.shape[0], batch_size)]
    )
    stream = model.backbone.stream
    states = text_states_for(stream, text_ids, text_mask, batch_size)
    text_feat = torch.cat(
        [
            itc.text_features(states[s : s + batch_size], text_mask[s : s + batch_size])
            for s in range(0, states.shape[0], batch_size)
        ]
    )
    return image_feat @ text_feat.t(), (None if stream.single_stream else states)


def expected_pairs(num_images: int, num_texts: int, k: int) -> int:
    """An upper bound on the pairs :func:`rerank_with_itm` fuses: ``(N_img + N_txt) × k`` capped by all pairs."""
    return min(num_images * num_texts, num_images * min(k, num_texts) + num_texts * min(k, num_images))


__all__ = [
    "KV_CACHE_GIB",
    "auto_group_size",
    "expected_pairs",
    "gather_pair_scores",
    "images_per_kv_chunk",
    "itc_and_itm_recalls",
    "itc_similarities",
    "itm_pair_scores",
    "pair_shard",
    "rerank_with_itm",
    "reranked_recalls",
    "text_states_for",
    "topk_pairs",
]
