"""Image-text retrieval scoring: ITC similarities re-ranked by the ITM head, batched over many pairs at once.

The reference (docs/method.md §5.2; docs/differences.md row 22) re-ranks one query at a time: for each image it runs the fusion encoder on
its ``k`` best captions, then for each caption on its ``k`` best images, and crashes when ``k`` exceeds the number
of candidates. Here every (image, caption) pair that is in the top ``k`` of either direction is scored once, in
fusion batches of ``batch_size`` pairs drawn from many queries, and ``k`` is capped by the candidate count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vlalign.evaluation.metrics import RECALL_KS, retrieval_recalls

if TYPE_CHECKING:
    from vlalign.tasks.pretrain import PretrainRecipe


@torch.no_grad()
def itm_pair_scores(
    recipe: PretrainRecipe,
    image_tokens: Tensor,
    text_ids: Tensor,
    text_mask: Tensor,
    image_index: Tensor,
    text_index: Tensor,
    batch_size: int = 256,
) -> Tensor:
    """ITM match logit (``itm_head(fused[CLS])[:, 1]``, as the reference) of pairs ``(image_index[p], text_index[p])``.

    Runs the fusion encoder on ``batch_size`` pairs per pass. ``image_tokens`` [N_img, 1+P, W] are the ViT outputs;
    ``text_ids`` / ``text_mask`` [N_txt, L] the tokenised (right-padded) captions. Pairs are processed in order of
    caption length and each pass is cut to its longest caption, so padding costs little. Returns float32 scores
    [num_pairs].
    """
    if recipe.itm is None:
        raise ValueError("ITM re-ranking needs a recipe with model.itm enabled")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = image_tokens.device
    pair_lengths = text_mask.sum(1).cpu()[text_index.cpu()]  # one host read for the whole evaluation
    order = pair_lengths.argsort(stable=True)
    scores = torch.empty(image_index.shape[0], dtype=torch.float32, device=device)
    for start in range(0, order.shape[0], batch_size):
        chunk = order[start : start + batch_size]
        length = max(1, int(pair_lengths[chunk].max()))
        chunk = chunk.to(device)
        images, texts = image_index[chunk], text_index[chunk]
        ids, mask = text_ids[texts, :length], text_mask[texts, :length]
        fused = recipe.backbone.stream.fuse(mask, image_tokens[images], input_ids=ids)
        scores[chunk] = recipe.itm.itm_head(fused.last_hidden_state[:, 0])[:, 1].float()
    return scores


@torch.no_grad()
def rerank_with_itm(
    recipe: PretrainRecipe,
    image_tokens: Tensor,
    text_ids: Tensor,
    text_mask: Tensor,
    sims: Tensor,
    k: int,
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Re-rank the top-``k`` candidates of every query by ITM, as ALBEF/SIMLA retrieval evaluation does.

    ``sims`` [N_img, N_txt] are ITC similarities. Returns the score matrices ``(scores_i2t, scores_t2i)``, both
    [N_img, N_txt] float32: ``scores_i2t[i, j]`` is the ITM score when caption ``j`` is among image ``i``'s top
    ``k`` by ``sims`` and ``-inf`` otherwise (image queries, rows); ``scores_t2i`` likewise for caption queries
    (columns). A pair in both top-``k`` lists is fused once. Call it with the recipe in eval mode; wrap it in
    ``torch.autocast`` for reduced precision.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    num_images, num_texts = sims.shape
    if image_tokens.shape[0] != num_images or text_ids.shape[0] != num_texts:
        raise ValueError(
            f"sims {tuple(sims.shape)} does not match {image_tokens.shape[0]} images and {text_ids.shape[0]} texts"
        )
    device = image_tokens.device
    sims = sims.to(device)
    top_texts = sims.topk(min(k, num_texts), dim=1).indices  # [N_img, k]
    top_images = sims.t().topk(min(k, num_images), dim=1).indices  # [N_txt, k]
    in_i2t = torch.zeros(num_images, num_texts, dtype=torch.bool, device=device)
    in_i2t[torch.arange(num_images, device=device)[:, None], top_texts] = True
    in_t2i = torch.zeros_like(in_i2t)
    in_t2i[top_images, torch.arange(num_texts, device=device)[:, None]] = True
    image_index, text_index = (in_i2t | in_t2i).nonzero(as_tuple=True)  # one host sync per evaluation
    pair_scores = itm_pair_scores(recipe, image_tokens, text_ids, text_mask, image_index, text_index, batch_size)
    scores = torch.full((num_images, num_texts), float("-inf"), device=device)
    scores[image_index, text_index] = pair_scores
    minus_inf = scores.new_tensor(float("-inf"))
    return torch.where(in_i2t, scores, minus_inf), torch.where(in_t2i, scores, minus_inf)


def reranked_recalls(
    scores_i2t: Tensor, scores_t2i: Tensor, text_image_index: Tensor, ks: tuple[int, ...] = RECALL_KS
) -> dict[str, float]:
    """Recalls as :func:`vlalign.evaluation.metrics.retrieval_recalls` reports them: image→text (``txt_r*``) from the image
    queries' matrix, text→image (``img_r*``) from the caption queries' matrix."""
    i2t = retrieval_recalls(scores_i2t, text_image_index, ks)
    t2i = retrieval_recalls(scores_t2i, text_image_index, ks)
    out = {key: value for key, value in i2t.items() if key.startswith("txt_")}
    out.update({key: value for key, value in t2i.items() if key.startswith("img_")})
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out
