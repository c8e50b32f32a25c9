"""XMM: symmetric cross-modal masked reconstruction (fine-grained level of SIMLA).

Text side: masked caption tokens predicted by the stream in multimodal mode, with the image as context (MLM).
Image side: masked patches predicted by the same stream in image mode, attending to the caption's input embeddings.
Both sides distil from the momentum model's predictions, mixed by the recipe's shared ``alpha``.

The prediction heads run on the masked positions only, picked one of two ways (the same rows, the same loss):
a **gather** of a fixed number of positions per row (a static bound, padded; sync-free, for accelerators) or a
**boolean selection** of exactly the masked positions (its output size is the mask's count, a host read: free on
the CPU, a sync on a GPU). Both predict at most a fixed number of positions per row: the bound of the gather
(docs/differences.md row 26).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vlalign.data.masking import BlockMaskGenerator
from vlalign.models.heads import MaskedLMHead
from vlalign.objectives.base import BuildSpec, Objective, ObjectiveOutput, register_objective
from vlalign.objectives.functional import distilled_cross_entropy, mask_tokens
from vlalign.objectives.image_targets import ImageTargets, PixelTargets

if TYPE_CHECKING:
    from vlalign.objectives.context import StepContext

#: Per-row probability that Bernoulli token masking picks more tokens than the text side's default bound
#: (:func:`binomial_cap`), for a caption filling the whole padded length; shorter captions exceed it even less often.
TEXT_CAP_TAIL = 1e-6


@register_objective
class XMM(Objective):
    """Masked reconstruction on both modalities (docs/method.md §2.3–2.4).

    Deliberate differences from the reference:
    - the text side's distillation log-softmax is over the vocabulary (the reference's is over the sequence axis,
      docs/differences.md row 6);
    - the image side's teacher cross-attends to the *momentum* word embeddings (the reference mixes in the online
      ones, docs/differences.md row 8), so the whole teacher is the EMA model;
    - the heads run on the masked positions only (the reference runs them on every position): on an accelerator
      (``sync_free``) on a fixed-size gather of ``K`` positions per row (masked ones first, padded; the padding is
      weighted 0), elsewhere on exactly the masked rows (boolean indexing, whose size costs a host read);
    - at most ``K`` positions per row are predicted, on every device (docs/differences.md row 26). Text side: a
      row that draws more than ``K`` picks keeps its first ``K`` (the others are left uncorrupted and unpredicted),
      which the default ``K`` makes a one-in-a-million event per row. Image side: vlalign's block masks never
      exceed the default ``K``; masked patches beyond it (masks from elsewhere) stay masked in the ViT input but
      are not predicted. Both counts are logged (``text_beyond_cap``, ``image_beyond_cap``).

    Args:
        weight: weight of the total XMM loss (``text_weight·L_text + image_weight·L_image``).
        text: enable the text side (masked language modelling conditioned on the image).
        image: enable the image side (masked patch prediction conditioned on the text).
        text_weight: weight of the text side within XMM.
        image_weight: weight of the image side within XMM.
        mask_probability: fraction of caption tokens picked for masking (80% [MASK], 10% random, 10% kept).
        protect_cls: never mask [CLS] ([PAD] is never masked).
        distill: distil both sides from the momentum model with the recipe's ``alpha``.
        image_targets: what masked patches predict: ``PixelTargets`` (no weights needed) or ``DVAETargets``.
        max_masked_tokens: most caption tokens picked per row. None: the smallest ``K`` that Bernoulli picking
            over the batch's padded length exceeds with probability at most ``TEXT_CAP_TAIL`` per row (14 of a
            25-token batch at 0.15).
        max_masked_patches: most masked patches predicted per row. None: the block-mask target of vlalign's data
            pipeline for the ViT's patch grid (75 of 16×16, 169 of 24×24), which its masks never exceed; set it
            (up to the patch count) when masks come from elsewhere and may mask more.
    """

    name = "xmm"
    # None: gather a fixed number of positions on CUDA tensors, select the masked rows elsewhere (same loss; on the
    # CPU, where a host read is free, the selection's fewer head rows make a reduced-config step ~16-22% cheaper).
    sync_free: bool | None = None

    def __init__(
        self,
        weight: float = 1.0,
        text: bool = True,
        image: bool = True,
        text_weight: float = 1.0,
        image_weight: float = 1.0,
        mask_probability: float = 0.15,
        protect_cls: bool = True,
        distill: bool = True,
        image_targets: ImageTargets | None = None,
        max_masked_tokens: int | None = None,
        max_masked_patches: int | None = None,
    ) -> None:
        super().__init__(weight)
        if not (text or image):
            raise ValueError("model.xmm has both sides disabled (text: false, image: false): set model.xmm: null")
        if not 0.0 < mask_probability < 1.0:
            raise ValueError(f"model.xmm.mask_probability must be in (0, 1), got {mask_probability}")
        for key, value in (("max_masked_tokens", max_masked_tokens), ("max_masked_patches", max_masked_patches)):
            if value is not None and not value >= 1:
                raise ValueError(f"model.xmm.{key} must be >= 1 or null (derived), got {value}")
        self.text, self.image = text, image
        self.text_weight, self.image_weight = text_weight, image_weight
        self.mask_probability = mask_probability
        self.protect_cls = protect_cls
        self.distill = distill
        self.image_targets = (image_targets or PixelTargets()) if image else None
        self.max_masked_tokens = max_masked_tokens
        self.max_masked_patches = max_masked_patches
        self.momentum_heads = tuple(head for head, on in (("mlm_head", text), ("mim_head", image)) if on)

    @classmethod
    def masks_images_for(cls, settings: Mapping[str, Any]) -> bool:
        return bool(settings.get("image", True))

    def momentum_encoders(self) -> frozenset[str]:
        return frozenset({"vision", "stream"}) if self.distill else frozenset()

    def build(self, spec: BuildSpec) -> None:
        if spec.stream is None:
            raise ValueError("XMM needs the stream in its BuildSpec (the MLM decoder is tied to the word embeddings)")
        self.vocab = spec.vocab
        if self.text:
            self.mlm_head = MaskedLMHead(spec.stream.config, spec.stream.embeddings.word_embeddings)
        if self.image:
            if spec.vision_width != spec.text_width:
                raise ValueError(
                    f"model.xmm.image feeds ViT tokens (width {spec.vision_width}) into the stream "
                    f"(hidden_size {spec.text_width}): make them equal or set model.xmm.image: false"
                )
            self.image_targets.setup(spec.patch_size, spec.patch_grid)
            self.mim_head = nn.Linear(spec.text_width, self.image_targets.output_dim)
            patches = spec.patch_grid[0] * spec.patch_grid[1]
            if self.max_masked_patches is not None and self.max_masked_patches > patches:
                raise ValueError(
                    f"model.xmm.max_masked_patches ({self.max_masked_patches}) exceeds the ViT's {patches} patches "
                    f"(grid {tuple(spec.patch_grid)}): set it to at most {patches}, or null"
                )
            self.patch_cap = self.max_masked_patches or max(1, BlockMaskGenerator(spec.patch_grid).num_masking_patches)
        # Twins: the teacher's MLM decoder is tied to the momentum word embeddings, like the student's to the online.
        super().build(spec)

    def forward(self, ctx: StepContext) -> ObjectiveOutput:
        logs: dict[str, Tensor] = {}
        total: Tensor | None = None
        if self.text:
            text_loss, beyond = self.text_loss_and_beyond(ctx)
            logs["text_loss"] = text_loss.detach()
            logs["text_beyond_cap"] = beyond
            total = self.text_weight * text_loss
        if self.image:
            image_loss, beyond = self.image_loss_and_beyond(ctx)
            logs["image_loss"] = image_loss.detach()
            logs["image_beyond_cap"] = beyond
            total = self.image_weight * image_loss if total is None else total + self.image_weight * image_loss
        return ObjectiveOutput(loss=total, logs=logs)

    # -- text side ----------------------------------------------------------------------------------------------
    def text_cap(self, length: int) -> int:
        """Most tokens picked per row of a batch padded to ``length`` (a Python int: the gather's static size)."""
        if self.max_masked_tokens is not None:
            return min(self.max_masked_tokens, length)
        candidates = length - 1 if self.protect_cls else length
        return max(1, binomial_cap(candidates, self.mask_probability, TEXT_CAP_TAIL))

    def text_loss(self, ctx: StepContext) -> Tensor:
        return self.text_loss_and_beyond(ctx)[0]

    def text_loss_and_beyond(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """The text side's loss and the count of picks the cap dropped (a 0-d float tensor, for the logs)."""
        ids, mask = ctx.input_ids, ctx.attention_mask
        protected = ~mask.bool()
        if self.protect_cls:
            protected = protected | (ids == self.vocab.cls_token_id)
        corrupted, labels = mask_tokens(
            ids, self.mask_probability, self.vocab.mask_token_id, self.vocab.vocab_size, protected
        )
        drawn = labels != -100
        cap = self.text_cap(ids.shape[1])
        picked = keep_first(drawn, cap)
        beyond = drawn & ~picked
        corrupted = torch.where(beyond, ids, corrupted)  # picks beyond the cap: neither corrupted nor predicted
        labels = labels.masked_fill(beyond, -100)
        rows = MaskedRows(picked, cap, gather=self._gathers(ids))
        hidden = ctx.fuse(corrupted, mask, ctx.image_tokens).last_hidden_state
        logits = self.mlm_head(rows(hidden))
        teacher = None
        if self.distill and ctx.alpha > 0:
            with torch.no_grad():
                hidden_m = ctx.fuse(corrupted, mask, ctx.image_tokens_m, momentum=True).last_hidden_state
                teacher = self.mlm_head_m(rows(hidden_m))
        loss = distilled_cross_entropy(logits, rows(labels), teacher, ctx.alpha, valid=rows.valid)
        return loss, beyond.sum().float()

    # -- image side ---------------------------------------------------------------------------------------------
    def image_loss(self, ctx: StepContext) -> Tensor:
        return self.image_loss_and_beyond(ctx)[0]

    def image_loss_and_beyond(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """The image side's loss and the count of masked patches beyond the cap, not predicted (0-d float)."""
        masked = ctx.patch_mask  # [B, N]
        picked = keep_first(masked, self.patch_cap)
        rows = MaskedRows(picked, self.patch_cap, gather=self._gathers(masked))
        targets = rows(self.image_targets.targets(ctx.batch))
        hidden = ctx.image_side(ctx.masked_image_tokens)
        prediction = self.mim_head(rows(hidden[:, 1:]))
        teacher = None
        if self.distill and ctx.alpha > 0:
            with torch.no_grad():
                hidden_m = ctx.image_side(ctx.masked_image_tokens_m, momentum=True)
                teacher = self.mim_head_m(rows(hidden_m[:, 1:]))
        loss = self.image_targets.loss(prediction, targets, teacher, ctx.alpha, valid=rows.valid)
        return loss, (masked & ~picked).sum().float()

    def _gathers(self, like: Tensor) -> bool:
        return like.is_cuda if self.sync_free is None else self.sync_free


class MaskedRows:
    """Rows of tensors ``[B, N, ...]`` at the positions ``picked`` [B, N] (at most ``cap`` per row), flattened.

    ``gather``: ``B·cap`` rows, each row's picked positions first (in position order), then unpicked ones as
    padding; :attr:`valid` [B·cap] marks the picked ones, for the loss's weights. Shapes are static and nothing
    is read on the host. Otherwise exactly the picked rows (boolean indexing: a host read of their count) and
    :attr:`valid` is None. Either way the same rows reach the loss, in the same order.
    """

    def __init__(self, picked: Tensor, cap: int, gather: bool) -> None:
        self.picked = picked
        self.index: Tensor | None = None
        self.valid: Tensor | None = None
        if gather:
            cap = min(cap, picked.shape[1])
            order = torch.sort(picked.to(torch.uint8), dim=1, descending=True, stable=True).indices
            self.index = order[:, :cap]
            self.valid = picked.gather(1, self.index).flatten()

    def __call__(self, x: Tensor) -> Tensor:
        if self.index is None:
            return x[self.picked]
        index = self.index.view(*self.index.shape, *([1] * (x.dim() - 2)))
        return torch.take_along_dim(x, index, dim=1).flatten(0, 1)


def keep_first(picked: Tensor, cap: int) -> Tensor:
    """``picked`` [B, N] with each row's picks after its first ``cap`` cleared (batched, no host read)."""
    if cap >= picked.shape[1]:
        return picked
    return picked & (picked.cumsum(dim=1) <= cap)


@functools.lru_cache(maxsize=512)
def binomial_cap(n: int, p: float, tail: float) -> int:
    """Smallest ``K`` with ``P(Binomial(n, p) > K) <= tail``: summed from the top, in log space (no overflow)."""
    if n <= 0:
        return 0
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    above = 0.0  # P(X > k) for the current k
    for k in range(n, 0, -1):
        above_previous = above + math.exp(
            log_n - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q
        )
        if above_previous > tail:  # P(X > k - 1) too large: K = k
            return k
        above = above_previous
    return 0
