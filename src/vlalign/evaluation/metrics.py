"""Retrieval recall exactly as ALBEF/SIMLA define it (docs/method.md §5.3), vectorised, with a documented tie rule
(:func:`retrieval_ranks`)."""

from __future__ import annotations

import torch
from torch import Tensor

RECALL_KS = (1, 5, 10)


def retrieval_ranks(scores: Tensor, text_image_index: Tensor) -> tuple[Tensor, Tensor]:
    """Rank (0 = best) of the best ground truth for every image query and every text query.

    ``scores`` is [num_images, num_texts]; ``text_image_index[j]`` is the image caption ``j`` describes. Image →
    text: the position of the highest-ranked of the image's captions in the image's row. Text → image: the position
    of its image in the caption's column.

    Tie rule: each query's candidates are ordered by descending score, equal scores by ascending candidate index (a
    stable sort), and a rank is a position in that order, i.e. the number of candidates scored strictly higher plus
    the number scored equally that have a lower index. Without ties this is exactly the reference's rank
    (``np.argsort(score)[::-1]``, whose order among equal scores numpy leaves unspecified); with ties it is
    deterministic on every device. A ground truth scored ``-inf`` (outside the query's re-ranked top ``k``,
    :func:`vlalign.evaluation.retrieval.rerank_with_itm`) is never retrieved: its rank is the number of candidates.
    """
    num_images, num_texts = scores.shape
    device = scores.device
    gt = torch.zeros_like(scores, dtype=torch.bool)
    gt[text_image_index, torch.arange(num_texts, device=device)] = True
    dropped = scores == float("-inf")
    order_i2t = scores.argsort(dim=1, descending=True, stable=True)
    position_i2t = torch.empty_like(order_i2t)
    position_i2t.scatter_(1, order_i2t, torch.arange(num_texts, device=device).expand(num_images, -1))
    ranks_i2t = position_i2t.masked_fill(~gt | dropped, num_texts).min(dim=1).values
    order_t2i = scores.t().argsort(dim=1, descending=True, stable=True)
    ranks_t2i = (order_t2i == text_image_index[:, None]).int().argmax(dim=1)
    gt_dropped = dropped[text_image_index, torch.arange(num_texts, device=device)]
    ranks_t2i = ranks_t2i.masked_fill(gt_dropped, num_images)
    return ranks_i2t, ranks_t2i


def retrieval_recalls(scores: Tensor, text_image_index: Tensor, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """``txt_r{k}`` (image → text), ``img_r{k}`` (text → image) in percent, their means and ``r_mean``."""
    ranks_i2t, ranks_t2i = retrieval_ranks(scores.float(), text_image_index)
    out: dict[str, float] = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * (ranks_i2t < k).float().mean().item()
        out[f"img_r{k}"] = 100.0 * (ranks_t2i < k).float().mean().item()
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def chance_recalls(num_images: int, captions_per_image: float, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """Expected recall of a random ranking, to print next to measured recall."""
    num_texts = num_images * captions_per_image
    out = {}
    for k in ks:
        # image → text: P(at least one of c ground truths among the first k of num_texts) ≈ 1 - (1 - c/T)^k
        out[f"txt_r{k}"] = 100.0 * (1.0 - (1.0 - captions_per_image / num_texts) ** k)
        out[f"img_r{k}"] = 100.0 * min(1.0, k / num_images)
    return out
