"""Pure loss math of the objectives, pinned down by tests against hand computations.

No modules, no state: tensors in, tensors out. Everything is batched; nothing syncs with the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_cross_entropy(logits: Tensor, targets: Tensor, dim: int = -1) -> Tensor:
    """Mean over rows of ``-Σ targets · log_softmax(logits)`` along ``dim``."""
    return -(targets * F.log_softmax(logits.float(), dim=dim)).sum(dim).mean()


def distillation_targets(teacher_logits: Tensor, hard: Tensor, alpha: float) -> Tensor:
    """``α·softmax(teacher) + (1−α)·hard`` — momentum distillation targets (ALBEF / SIMLA)."""
    if alpha == 0.0:
        return hard
    return alpha * F.softmax(teacher_logits.float(), dim=-1) + (1.0 - alpha) * hard


def contrastive_loss(sim_i2t: Tensor, sim_t2i: Tensor, targets_i2t: Tensor, targets_t2i: Tensor) -> Tensor:
    """Symmetric image-text contrastive loss: the mean of both directions' soft cross-entropies."""
    return 0.5 * (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i))


def positive_targets(batch: int, num_candidates: int, device: torch.device, offset: int = 0) -> Tensor:
    """One-hot targets: row ``i``'s positive is candidate ``offset + i`` (offset = rank · local batch under DDP)."""
    rows = torch.arange(batch, device=device)[:, None] + offset
    # a comparison, not an index_put: writing through index tensors syncs with the host on CUDA
    return (torch.arange(num_candidates, device=device)[None, :] == rows).float()


@torch.no_grad()
def sample_hard_negatives(
    sim: Tensor, exclude: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """For each row of ``sim`` draw one column with probability ``softmax(sim_row)`` over the allowed columns.

    ``exclude`` (bool, same shape) marks columns that are not negatives — at least the positive. Defaults to the
    diagonal. All rows are drawn at once; the reference loops over the batch with
    one ``.item()`` sync per draw and crashes when a row underflows. Masking with ``-inf`` *before* the softmax keeps
    every row a valid distribution as long as one column is allowed.
    """
    rows, cols = sim.shape
    eye = torch.eye(rows, cols, dtype=torch.bool, device=sim.device)
    if exclude is None:
        exclude = eye
    # A row whose every column is excluded (all candidates share its image id) falls back to excluding only its
    # own positive, so it still gets a (possibly false) negative instead of an invalid distribution.
    exclude = torch.where(exclude.all(dim=1, keepdim=True), eye, exclude)
    weights = sim.float().masked_fill(exclude, float("-inf")).softmax(dim=1)
    # torch.multinomial(weights, 1) draws exactly this way (exponential race, argmax), but first validates the
    # weights with .item() calls: host syncs. The masking above keeps every row valid, so draw directly.
    race = torch.empty_like(weights).exponential_(1, generator=generator)
    return (weights / race).argmax(dim=1)


def mask_tokens(
    input_ids: Tensor,
    probability: float,
    mask_token_id: int,
    vocab_size: int,
    protected: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking: pick tokens with ``probability``; of those 80% → [MASK], 10% → random id, 10% unchanged.

    ``protected`` (bool, like ``input_ids``) marks positions never picked ([PAD], [CLS]). Returns the corrupted ids
    and labels (the original id at picked positions, -100 elsewhere). All on the ids' device, no host syncs.
    """
    device = input_ids.device

    def draw(p: float) -> Tensor:
        return torch.rand(input_ids.shape, device=device, generator=generator) < p

    picked = draw(probability) & ~protected
    labels = input_ids.masked_fill(~picked, -100)
    to_mask = picked & draw(0.8)
    to_random = picked & ~to_mask & draw(0.5)
    random_ids = torch.randint(vocab_size, input_ids.shape, device=device, generator=generator)
    corrupted = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    corrupted = torch.where(to_random, random_ids, corrupted)
    return corrupted, labels


def distilled_cross_entropy(
    logits: Tensor, labels: Tensor, teacher_logits: Tensor | None, alpha: float, valid: Tensor | None = None
) -> Tensor:
    """``(1−α)·CE(logits, labels) + α·mean(−Σ_v softmax(teacher)_v · log_softmax(logits)_v)`` over rows.

    The soft term is over the class (vocabulary) axis: the reference takes SIMLA's MLM log-softmax over the
    sequence axis, a defect (docs/differences.md row 6) fixed here.

    ``valid`` (bool, one entry per row) restricts both means to the rows it marks: the same value as gathering
    those rows first, without the boolean indexing that needs their count on the host (a device sync).
    """
    if valid is None:
        hard = F.cross_entropy(logits.float(), labels)
    else:
        weight = valid.float()
        count = weight.sum()
        hard = (F.cross_entropy(logits.float(), labels, reduction="none") * weight).sum() / count
    if teacher_logits is None or alpha == 0.0:
        return hard
    targets = F.softmax(teacher_logits.float(), dim=-1)
    if valid is None:
        soft = soft_cross_entropy(logits, targets)
    else:
        soft = ((-(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1)) * weight).sum() / count
    return (1.0 - alpha) * hard + alpha * soft


def stable_topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest entries along the last axis; ties go to the lower index (deterministic)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def keyword_targets(
    cls_attention: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    vocab_size: int,
    special_ids: tuple[int, ...],
    picks_per_head: int = 4,
    num_keywords: int = 5,
) -> Tensor:
    """PSL hard targets: multi-hot [B, V] over the tokens [CLS] attends to most (docs/method.md §2.5).

    ``cls_attention`` is [B, heads, L]: the [CLS] query row of one layer's self-attention probabilities. Each head
    votes for its ``picks_per_head`` most attended positions (padding excluded); the ``num_keywords`` positions with
    the most votes are the keywords (ties → lower position; a position needs at least one vote). Their token ids
    become positives, then every special-token column is cleared. The reference clears only [CLS], so [PAD],
    [SEP] and [MASK] can become "keywords" of short captions.
    """
    batch, heads, length = cls_attention.shape
    valid = attention_mask.bool()
    attention = cls_attention.float().masked_fill(~valid[:, None, :], -1.0)
    picks = stable_topk_indices(attention, min(picks_per_head, length))  # [B, heads, k]
    picked_valid = torch.gather(valid[:, None, :].expand(-1, heads, -1), 2, picks)
    votes = torch.zeros(batch, length, device=cls_attention.device)
    votes.scatter_add_(1, picks.flatten(1), picked_valid.flatten(1).float())
    top = stable_topk_indices(votes, min(num_keywords, length))  # [B, K]
    chosen = torch.gather(votes, 1, top) > 0
    token_ids = torch.gather(input_ids, 1, top)
    targets = torch.zeros(batch, vocab_size, device=cls_attention.device)
    targets.scatter_reduce_(1, token_ids, chosen.float(), reduce="amax")  # a repeated id stays positive
    for special in special_ids:  # integer indexing: a list index would be copied to the device (a sync)
        targets[:, special] = 0.0
    return targets


def keyword_loss(logits: Tensor, hard: Tensor, soft: Tensor | None, alpha: float) -> Tensor:
    """``(1−α)·BCE(logits, hard) + α·BCE(logits, soft)``, each averaged over all B × V entries (as the reference)."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), hard)
    if soft is None or alpha == 0.0:
        return loss
    return (1.0 - alpha) * loss + alpha * F.binary_cross_entropy_with_logits(logits.float(), soft.float())
