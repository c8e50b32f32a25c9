"""ITM: image-text matching with hard negatives mined from the contrastive similarities."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlalign.objectives.base import BuildSpec, Objective, ObjectiveOutput, register_objective
from vlalign.objectives.functional import sample_hard_negatives

if TYPE_CHECKING:
    from vlalign.tasks.context import StepContext


@register_objective
class ITM(Objective):
    """Binary matched / not-matched classification on the fused [CLS] state (method §2.2).

    For every caption one negative image and for every image one negative caption are drawn with probability
    ``softmax`` of ITC's similarities (positive excluded), all rows at once on the device; the positive and both
    negative sets go through the fusion encoder as one batch of ``3B``. The reference draws each negative with a
    separate ``multinomial(...).item()`` (``2B`` host syncs per step) and runs three fusion passes.

    Args:
        weight: weight of this loss in the total.
        negatives: ``hard`` (mined from ITC similarities, needs ``itc``) or ``random`` (uniform over the other
            samples of the batch; what an ablation without ITC uses).
    """

    name = "itm"

    def __init__(self, weight: float = 1.0, negatives: Literal["hard", "random"] = "hard") -> None:
        super().__init__(weight)
        if negatives not in ("hard", "random"):
            raise ValueError(f"model.itm.negatives must be 'hard' or 'random', got {negatives!r}")
        self.negatives = negatives

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("itc",) if self.negatives == "hard" else ()

    def build(self, spec: BuildSpec) -> None:
        self.itm_head = nn.Linear(spec.text_width, 2)
        super().build(spec)

    def forward(self, ctx: StepContext) -> ObjectiveOutput:
        if self.negatives == "hard":
            itc = ctx.published["itc"]
            sim_t2i, sim_i2t = itc["sim_t2i"], itc["sim_i2t"]
        else:  # equal similarities: uniform over the allowed samples
            n = ctx.input_ids.shape[0]
            sim_t2i = sim_i2t = torch.zeros(n, n, device=ctx.input_ids.device)
        negative_image = sample_hard_negatives(sim_t2i, ctx.same_image)  # per caption, an image
        negative_text = sample_hard_negatives(sim_i2t, ctx.same_image)  # per image, a caption
        batch = negative_image.shape[0]

        image_tokens = ctx.image_tokens
        images = torch.cat([image_tokens, image_tokens[negative_image], image_tokens])
        ids, mask = ctx.input_ids, ctx.attention_mask
        text_order = torch.cat([torch.arange(batch, device=ids.device).repeat(2), negative_text])
        fused = ctx.fuse(
            ids[text_order],
            mask[text_order],
            images,
            text_states=None if ctx.single_stream else ctx.text_states[text_order],
        )
        logits = self.itm_head(fused.last_hidden_state[:, 0]).float()
        labels = torch.cat([torch.ones(batch, device=logits.device), torch.zeros(2 * batch, device=logits.device)])
        loss = F.cross_entropy(logits, labels.long())
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return ObjectiveOutput(loss=loss, logs={"accuracy": accuracy.detach()})
