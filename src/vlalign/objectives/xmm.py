"""XMM: symmetric cross-modal masked reconstruction (fine-grained level of SIMLA).

Text side: masked caption tokens predicted by the stream in multimodal mode, with the image as context (MLM).
Image side: masked patches predicted by the same stream in image mode, attending to the caption's input embeddings.
Both sides distil from the momentum model's predictions, mixed by the recipe's shared ``alpha``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vlalign.models.heads import MaskedLMHead
from vlalign.objectives.base import BuildSpec, Objective, ObjectiveOutput, register_objective
from vlalign.objectives.functional import distilled_cross_entropy, mask_tokens
from vlalign.objectives.image_targets import ImageTargets, PixelTargets

if TYPE_CHECKING:
    from vlalign.objectives.context import StepContext


@register_objective
class XMM(Objective):
    """Masked reconstruction on both modalities (docs/method.md §2.3–2.4).

    Deliberate differences from the reference:
    - the text side's distillation log-softmax is over the vocabulary (the reference's is over the sequence axis,
      docs/differences.md row 6);
    - the image side's teacher cross-attends to the *momentum* word embeddings (the reference mixes in the online
      ones, docs/differences.md row 8), so the whole teacher is the EMA model;
    - on the CPU only masked positions go through the prediction heads; on an accelerator (``sync_free``) the
      heads run over every position and the losses average over the masked ones with weights: the same loss
      without boolean indexing, whose output size (the count of masked positions) costs a host-device sync,
      at the price of head compute at unmasked positions (about 1% of a SIMLA step at the reference sizes).

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
    """

    name = "xmm"
    # None: sync-free (weighted, all positions) on CUDA tensors, gather the masked rows elsewhere. Same loss.
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
    ) -> None:
        super().__init__(weight)
        if not (text or image):
            raise ValueError("model.xmm has both sides disabled (text: false, image: false): set model.xmm: null")
        if not 0.0 < mask_probability < 1.0:
            raise ValueError(f"model.xmm.mask_probability must be in (0, 1), got {mask_probability}")
        self.text, self.image = text, image
        self.text_weight, self.image_weight = text_weight, image_weight
        self.mask_probability = mask_probability
        self.protect_cls = protect_cls
        self.distill = distill
        self.image_targets = (image_targets or PixelTargets()) if image else None
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
        # Twins: the teacher's MLM decoder is tied to the momentum word embeddings, like the student's to the online.
        super().build(spec)

    def forward(self, ctx: StepContext) -> ObjectiveOutput:
        logs: dict[str, Tensor] = {}
        total: Tensor | None = None
        if self.text:
            text_loss = self.text_loss(ctx)
            logs["text_loss"] = text_loss.detach()
            total = self.text_weight * text_loss
        if self.image:
            image_loss = self.image_loss(ctx)
            logs["image_loss"] = image_loss.detach()
            total = self.image_weight * image_loss if total is None else total + self.image_weight * image_loss
        return ObjectiveOutput(loss=total, logs=logs)

    # -- text side ----------------------------------------------------------------------------------------------
    def text_loss(self, ctx: StepContext) -> Tensor:
        ids, mask = ctx.input_ids, ctx.attention_mask
        protected = ~mask.bool()
        if self.protect_cls:
            protected = protected | (ids == self.vocab.cls_token_id)
        corrupted, labels = mask_tokens(
            ids, self.mask_probability, self.vocab.mask_token_id, self.vocab.vocab_size, protected
        )
        picked = labels != -100
        hidden = ctx.fuse(corrupted, mask, ctx.image_tokens).last_hidden_state
        dense = self._dense(hidden)
        logits = self.mlm_head(_rows(hidden, picked, dense))
        teacher = None
        if self.distill and ctx.alpha > 0:
            with torch.no_grad():
                hidden_m = ctx.fuse(corrupted, mask, ctx.image_tokens_m, momentum=True).last_hidden_state
                teacher = self.mlm_head_m(_rows(hidden_m, picked, dense))
        valid = picked.flatten() if dense else None
        return distilled_cross_entropy(logits, _rows(labels, picked, dense), teacher, ctx.alpha, valid=valid)

    # -- image side ---------------------------------------------------------------------------------------------
    def image_loss(self, ctx: StepContext) -> Tensor:
        picked = ctx.patch_mask  # [B, N]
        dense = self._dense(picked)
        targets = _rows(self.image_targets.targets(ctx.batch), picked, dense)
        hidden = ctx.image_side(ctx.masked_image_tokens)
        prediction = self.mim_head(_rows(hidden[:, 1:], picked, dense))
        teacher = None
        if self.distill and ctx.alpha > 0:
            with torch.no_grad():
                hidden_m = ctx.image_side(ctx.masked_image_tokens_m, momentum=True)
                teacher = self.mim_head_m(_rows(hidden_m[:, 1:], picked, dense))
        valid = picked.flatten() if dense else None
        return self.image_targets.loss(prediction, targets, teacher, ctx.alpha, valid=valid)

    def _dense(self, like: Tensor) -> bool:
        return like.is_cuda if self.sync_free is None else self.sync_free


def _rows(x: Tensor, picked: Tensor, dense: bool) -> Tensor:
    """Rows of ``x`` [B, N, ...] at the masked positions ``picked`` [B, N]: all B·N rows when ``dense`` (the loss
    weights them), else only the picked ones (boolean indexing: its size needs a host-device sync on a GPU)."""
    return x.flatten(0, 1) if dense else x[picked]
