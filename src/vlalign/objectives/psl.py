"""PSL: pseudo-keyword prediction (conceptual level of SIMLA)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlalign.objectives.base import BuildSpec, Objective, ObjectiveOutput, register_objective
from vlalign.objectives.functional import keyword_loss, keyword_targets

if TYPE_CHECKING:
    from vlalign.objectives.context import StepContext


@register_objective
class PSL(Objective):
    """Predict a caption's keywords from the image embedding alone (docs/method.md §2.5).

    Keywords are the caption tokens the momentum multimodal encoder's [CLS] attends to most in one layer
    (``attention_layer``): each head votes for its ``picks_per_head`` most attended positions and the
    ``num_keywords`` most voted positions give a multi-hot target over the vocabulary. A concept head on the
    projected, normalised ITC image feature predicts them with BCE, mixed by ``alpha`` with the momentum head's
    sigmoid outputs on the momentum image feature (keywords the image suggests but the caption lacks).

    Like the reference, the keyword teacher runs the momentum stream over the *online* image tokens (detached).
    Differences on purpose: every special token ([CLS], [PAD], [SEP], [MASK]) is removed from the targets (the
    reference removes only [CLS], so [PAD] becomes a keyword of short captions), a position needs at least one vote,
    and ties go to the earlier position. Only ``attention_layer`` computes explicit attention probabilities; every
    other layer keeps fused SDPA.

    Args:
        weight: weight of this loss in the total.
        attention_layer: stream layer whose [CLS] self-attention row picks the keywords (-1 = last).
        picks_per_head: positions each head votes for.
        num_keywords: most-voted positions that become keywords.
        distill: mix in the momentum concept head's predictions with the recipe's ``alpha``.
        embed_dim: width of PSL's own image projection, used only when ITC is disabled (ablations); with ITC the
            concept head reads ITC's image embedding, as in the reference.
    """

    name = "psl"
    reads = ("itc",)  # the concept head reads ITC's image embedding when ITC is enabled
    trains_encoders = frozenset({"vision"})  # keywords come from the momentum stream; the image side learns

    def __init__(
        self,
        weight: float = 1.0,
        attention_layer: int = -1,
        picks_per_head: int = 4,
        num_keywords: int = 5,
        distill: bool = True,
        embed_dim: int = 256,
    ) -> None:
        super().__init__(weight)
        if picks_per_head < 1 or num_keywords < 1:
            raise ValueError("model.psl.picks_per_head and model.psl.num_keywords must be >= 1")
        self.attention_layer = attention_layer
        self.picks_per_head = picks_per_head
        self.num_keywords = num_keywords
        self.distill = distill
        self.embed_dim = embed_dim
        self.momentum_heads: tuple[str, ...] = ("concept_head",)

    def momentum_encoders(self) -> frozenset[str]:
        return frozenset({"stream", "vision"}) if self.distill else frozenset({"stream"})

    def build(self, spec: BuildSpec) -> None:
        self.vocab = spec.vocab
        self.owns_projection = spec.embed_dim is None
        if self.owns_projection:  # no ITC: project the image [CLS] ourselves
            self.image_proj = nn.Linear(spec.vision_width, self.embed_dim)
            self.momentum_heads = ("concept_head", "image_proj")
        self.concept_head = nn.Linear(spec.embed_dim or self.embed_dim, spec.vocab.vocab_size)
        super().build(spec)

    def _image_features(self, ctx: StepContext, momentum: bool) -> Tensor:
        if not self.owns_projection:
            key = "image_feat_m" if momentum else "image_feat"
            if key not in ctx.published["itc"]:
                raise ValueError(
                    "model.psl.distill reads ITC's momentum image feature: enable model.itc.distill or a queue"
                )
            return ctx.published["itc"][key]
        proj = self.image_proj_m if momentum else self.image_proj
        tokens = ctx.image_tokens_m if momentum else ctx.image_tokens
        return F.normalize(proj(tokens[:, 0]).float(), dim=-1)

    def forward(self, ctx: StepContext) -> ObjectiveOutput:
        # Outside no_grad: the context caches the image tokens on first use, and the student's path (own projection,
        # without ITC) must keep their graph.
        image_tokens = ctx.image_tokens
        with torch.no_grad():
            fused = ctx.fuse(
                ctx.input_ids,
                ctx.attention_mask,
                image_tokens.detach(),
                momentum=True,
                attention_probs_layer=self.attention_layer,
            )
            cls_attention = fused.attention_probs[:, :, 0, :]  # [B, heads, L]
            hard = keyword_targets(
                cls_attention,
                ctx.input_ids,
                ctx.attention_mask,
                self.vocab.vocab_size,
                self.vocab.special_ids,
                self.picks_per_head,
                self.num_keywords,
            )
            soft = None
            if self.distill and ctx.alpha > 0:
                soft = torch.sigmoid(self.concept_head_m(self._image_features(ctx, momentum=True)).float())
        logits = self.concept_head(self._image_features(ctx, momentum=False))
        loss = keyword_loss(logits, hard, soft, ctx.alpha)
        return ObjectiveOutput(loss=loss, logs={"keywords_per_caption": hard.sum(1).mean()})
