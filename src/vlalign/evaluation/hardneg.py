"""Hard-negative evaluation: is an image's true caption scored above minimally edited false ones?

Goes beyond the reference protocol. Each example is an image, its positive caption and negatives
``[{"type", "caption"}]`` (colour swap, shape swap, relation swap, attribute-binding swap, ...). Every (image,
caption) pair of an example is scored twice, as retrieval scores it (docs/method.md §5.1, §5.2): by ITC similarity
(cosine ``v · t``, no temperature) and by the ITM head's match logit (``itm_head(fused[CLS])[1]``). Accuracy is the
fraction of (positive, negative) pairs in which the positive scores **strictly** above the negative: a tie counts as
a failure (a model that scores everything equally gets 0, not 0.5).

The functions are pure tensor code apart from :func:`score_hardneg`, which runs the model (each image through the
ViT once, its cross-attention keys and values computed once for all its captions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlalign.evaluation.retrieval import KV_CACHE_GIB, itm_pair_scores, text_states_for

#: The scorers, in the order reports list them.
SCORERS: tuple[str, ...] = ("itm", "itc")


@dataclass
class HardNegScores:
    """Scores of every example's positive [N] and of every negative [M] (float32, on the CPU).

    ``negative_example[m]`` is the example (and image) negative ``m`` belongs to. A scorer the model lacks (no ITC
    projections, no ITM head) has None scores.
    """

    positive_itm: Tensor | None
    negative_itm: Tensor | None
    positive_itc: Tensor | None
    negative_itc: Tensor | None
    negative_example: Tensor

    def scores(self, scorer: str) -> tuple[Tensor, Tensor] | None:
        """``(positive, negative)`` scores of ``"itm"`` or ``"itc"``, or None when the model has no such scorer."""
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        positive, negative = getattr(self, f"positive_{scorer}"), getattr(self, f"negative_{scorer}")
        return None if positive is None else (positive, negative)


def _type_codes(
    neg_type: Sequence[str] | Tensor, count: int, type_names: Sequence[str] | None
) -> tuple[Tensor, list[str]]:
    """Negative types as integer codes [M] and the name of each code."""
    if isinstance(neg_type, Tensor):
        codes = neg_type.long().cpu()
        if codes.shape != (count,):
            raise ValueError(f"neg_type must have shape {(count,)}, got {tuple(codes.shape)}")
        if count and int(codes.min()) < 0:
            raise ValueError("neg_type codes must be >= 0")
        num_codes = int(codes.max()) + 1 if count else 0
        if type_names is None:
            names = [str(code) for code in range(num_codes)]
        else:
            names = list(type_names)
            if num_codes > len(names):
                raise ValueError(f"neg_type holds code {num_codes - 1} but type_names names only {len(names)} types")
        return codes, names
    labels = list(neg_type)
    if len(labels) != count:
        raise ValueError(f"neg_type has {len(labels)} entries for {count} negatives")
    names = list(type_names) if type_names is not None else []
    index = {name: code for code, name in enumerate(names)}
    for label in labels:  # labels only; the scoring itself is vectorised
        if label not in index:
            index[label] = len(names)
            names.append(label)
    return torch.tensor([index[label] for label in labels], dtype=torch.long), names


def hardneg_accuracy(
    pos_scores: Tensor,
    neg_scores: Tensor,
    neg_example: Tensor,
    neg_type: Sequence[str] | Tensor,
    type_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Fraction of (positive, negative) pairs whose positive scores strictly above the negative, overall and per type.

    Args:
        pos_scores: [N] score of each example's positive caption with its image.
        neg_scores: [M] score of each negative caption with its example's image.
        neg_example: [M] long, the example of each negative (``0 <= neg_example < N``).
        neg_type: [M] type of each negative: strings, or integer codes named by ``type_names``.
        type_names: the name of each code, or the order in which string types are listed (others follow in order
            of first appearance).

    Returns:
        ``{"overall": accuracy, "count": M, "by_type": {type: {"accuracy": a, "count": c}}}`` with accuracies in
        [0, 1]; types without negatives are left out. A tie (or a NaN score) counts as a failure.
    """
    pos_scores, neg_scores, neg_example = pos_scores.float().cpu(), neg_scores.float().cpu(), neg_example.long().cpu()
    count = neg_scores.shape[0]
    if pos_scores.dim() != 1 or neg_scores.dim() != 1 or neg_example.shape != (count,):
        raise ValueError(
            f"need pos_scores [N], neg_scores [M], neg_example [M]; got {tuple(pos_scores.shape)}, "
            f"{tuple(neg_scores.shape)}, {tuple(neg_example.shape)}"
        )
    if count == 0:
        raise ValueError("hard-negative accuracy needs at least one negative")
    if int(neg_example.min()) < 0 or int(neg_example.max()) >= pos_scores.shape[0]:
        raise ValueError(f"neg_example must index the {pos_scores.shape[0]} positives")
    codes, names = _type_codes(neg_type, count, type_names)
    correct = (pos_scores[neg_example] > neg_scores).float()
    per_type = torch.bincount(codes, minlength=len(names))
    per_type_correct = torch.bincount(codes, weights=correct, minlength=len(names))
    by_type = {
        names[code]: {"accuracy": float(per_type_correct[code] / per_type[code]), "count": int(per_type[code])}
        for code in range(len(names))
        if per_type[code] > 0
    }
    return {"overall": float(correct.mean()), "count": count, "by_type": by_type}


def hardneg_report(
    scores: HardNegScores, neg_type: Sequence[str] | Tensor, type_names: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """:func:`hardneg_accuracy` for each scorer the model has: ``{"itm": {...}, "itc": {...}}``."""
    out: dict[str, dict[str, Any]] = {}
    for scorer in SCORERS:
        pair = scores.scores(scorer)
        if pair is not None:
            out[scorer] = hardneg_accuracy(pair[0], pair[1], scores.negative_example, neg_type, type_names)
    return out


def select_failures(pos_scores: Tensor, neg_scores: Tensor, neg_example: Tensor, limit: int = 8) -> Tensor:
    """Negatives to show as failures: per failing example the negative it prefers most (largest ``neg - pos``, ties
    by lower index), examples ordered by that margin, at most ``limit``. Returns negative indices [≤ limit] (long,
    CPU). A failure is a negative scored at or above the positive, as :func:`hardneg_accuracy` counts it."""
    pos_scores, neg_scores, neg_example = pos_scores.float().cpu(), neg_scores.float().cpu(), neg_example.long().cpu()
    margin = neg_scores - pos_scores[neg_example]
    margin = torch.where(margin.isnan(), torch.full_like(margin, float("inf")), margin)  # NaN fails: show it first
    failing = (margin >= 0).nonzero(as_tuple=True)[0]
    if failing.numel() == 0 or limit < 1:
        return failing[:0]
    order = failing[margin[failing].argsort(descending=True, stable=True)]
    examples = neg_example[order]
    first = torch.full((int(examples.max()) + 1,), order.numel(), dtype=torch.long)
    first.scatter_reduce_(0, examples, torch.arange(order.numel()), reduce="amin")
    kept = first[first < order.numel()].sort().values  # positions in ``order``: already by descending margin
    return order[kept][:limit]


def _pad_to(ids: Tensor, length: int, value: int) -> Tensor:
    if ids.shape[1] >= length:
        return ids
    return torch.cat([ids, ids.new_full((ids.shape[0], length - ids.shape[1]), value)], dim=1)


@torch.no_grad()
def score_hardneg(
    model: Any,
    images: Tensor,
    pos_ids: Tensor,
    pos_mask: Tensor,
    neg_ids: Tensor,
    neg_mask: Tensor,
    neg_example: Tensor,
    *,
    batch_size: int = 256,
    image_batch_size: int = 64,
    kv_cache_gib: float = KV_CACHE_GIB,
) -> HardNegScores:
    """ITC similarity and ITM match logit of every (image, caption) pair of every example.

    Args:
        model: has ``.backbone`` and ``.itc`` (``image_features``, ``text_features``) and/or ``.itm``
            (``itm_head``): a task module, the pretraining recipe or :class:`vlalign.api.VisionLanguageModel`.
            Call it in eval mode; wrap the call in ``torch.autocast`` for reduced precision.
        images: [N, 3, S, S] preprocessed images, one per example (any device; moved to the model's per batch).
        pos_ids, pos_mask: [N, L] tokenised, right-padded positive captions.
        neg_ids, neg_mask: [M, L'] tokenised negatives; ``neg_example`` [M] the example of each.
        batch_size: captions per text pass and pairs per fusion pass.
        image_batch_size: images per ViT pass; the examples of one image batch are scored together.

    Each image batch goes through the ViT once; its captions (positives and negatives) through the text layers
    once; the images' cross-attention keys and values are computed once and reused for every caption of the example
    (:func:`vlalign.evaluation.retrieval.itm_pair_scores`). Returns :class:`HardNegScores` on the CPU.
    """
    itc, itm = getattr(model, "itc", None), getattr(model, "itm", None)
    if itc is None and itm is None:
        raise ValueError("hard-negative scoring needs ITC projections or an ITM head (model.itc / model.itm)")
    if batch_size < 1 or image_batch_size < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {image_batch_size}")
    num_examples, num_negatives = images.shape[0], neg_ids.shape[0]
    neg_example = neg_example.long().cpu()
    if pos_ids.shape[0] != num_examples or pos_mask.shape != pos_ids.shape or neg_mask.shape != neg_ids.shape:
        raise ValueError(
            f"need one positive per image: images {tuple(images.shape)}, pos_ids {tuple(pos_ids.shape)}, pos_mask "
            f"{tuple(pos_mask.shape)}, neg_ids {tuple(neg_ids.shape)}, neg_mask {tuple(neg_mask.shape)}"
        )
    if neg_example.shape != (num_negatives,) or (
        num_negatives and (int(neg_example.min()) < 0 or int(neg_example.max()) >= num_examples)
    ):
        raise ValueError(f"neg_example must be [{num_negatives}] indices of the {num_examples} examples")
    backbone = model.backbone
    stream = backbone.stream
    device = next(backbone.parameters()).device
    pad = stream.config.pad_token_id
    length = max(pos_ids.shape[1], neg_ids.shape[1])
    ids = torch.cat([_pad_to(pos_ids.cpu(), length, pad), _pad_to(neg_ids.cpu(), length, pad)])
    mask = torch.cat([_pad_to(pos_mask.cpu(), length, 0), _pad_to(neg_mask.cpu(), length, 0)])
    caption_example = torch.cat([torch.arange(num_examples), neg_example])
    by_example = caption_example.argsort(stable=True)
    offsets = [0, *torch.bincount(caption_example, minlength=num_examples).cumsum(0).tolist()]
    itc_scores = torch.empty(ids.shape[0]) if itc is not None else None
    itm_scores = torch.empty(ids.shape[0]) if itm is not None else None
    for first in range(0, num_examples, image_batch_size):
        last = min(first + image_batch_size, num_examples)
        rows = by_example[offsets[first] : offsets[last]]  # this image batch's captions, CPU
        tokens = backbone.vision(images[first:last].to(device))
        chunk_ids, chunk_mask = ids[rows].to(device), mask[rows].to(device)
        local_image = caption_example[rows] - first
        states = None
        if itc is not None or not stream.single_stream:  # text layers once per caption
            states = text_states_for(stream, chunk_ids, chunk_mask, batch_size)
        if itc is not None:
            image_feat = itc.image_features(tokens)
            text_feat = torch.cat(
                [
                    itc.text_features(states[s : s + batch_size], chunk_mask[s : s + batch_size])
                    for s in range(0, rows.shape[0], batch_size)
                ]
            )
            sims = (image_feat[local_image.to(device)] * text_feat).sum(-1)
            itc_scores[rows] = sims.float().cpu()
        if itm is not None:
            scores = itm_pair_scores(
                model,
                tokens,
                chunk_ids,
                chunk_mask,
                local_image,
                torch.arange(rows.shape[0]),
                batch_size,
                text_states=None if stream.single_stream else states,
                kv_cache_gib=kv_cache_gib,
            )
            itm_scores[rows] = scores.cpu()

    def split(scores: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        return (None, None) if scores is None else (scores[:num_examples], scores[num_examples:])

    positive_itm, negative_itm = split(itm_scores)
    positive_itc, negative_itc = split(itc_scores)
    return HardNegScores(positive_itm, negative_itm, positive_itc, negative_itc, neg_example)
