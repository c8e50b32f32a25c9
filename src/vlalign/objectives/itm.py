"""ITM: image-text matching with hard negatives mined from the contrastive similarities."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlalign.objectives.base import BuildSpec, Objective, ObjectiveOutput, register_objective
from vlalign.objectives.functional import sample_hard_negatives
from vlalign.utils.distributed import all_gather_no_grad, all_gather_with_grad, rank, world_size

if TYPE_CHECKING:
    from vlalign.objectives.context import StepContext


_RUNNING_WEIGHT = 0.05  # weight of the newest step in ITM's running training accuracy (about 20 steps)


@register_objective
class ITM(Objective):
    """Binary matched / not-matched classification on the fused [CLS] state (docs/method.md §2.2).

    For every caption one negative image and for every image one negative caption are drawn with probability
    ``softmax`` of ITC's similarities (positive excluded), all rows at once on the device; the positive and both
    negative sets go through the fusion encoder as one batch of ``3B``. The reference draws each negative with a
    separate ``multinomial(...).item()`` (``2B`` host syncs per step) and runs three fusion passes.

    With ``global_negatives`` each rank draws its negatives from the samples of *every* rank (the global batch),
    like the contrastive candidates under ``itc.gather_features`` (which it needs for hard negatives on several
    processes): image tokens are gathered with gradients flowing back to the rank that owns them, captions (ids,
    masks, text states) are gathered padded to the longest. The drawn global indices are published as
    ``negative_image`` / ``negative_text``. The reference draws from the local batch only (docs/differences.md row 1).

    Args:
        weight: weight of this loss in the total.
        negatives: ``hard`` (mined from ITC similarities, needs ``itc``) or ``random`` (uniform over the other
            samples of the batch; what an ablation without ITC uses).
        global_negatives: draw negatives from all ranks' samples instead of the local batch.
        hard_negatives_warmup_steps: a curriculum for hard negatives: over this many optimizer steps the sampling
            weights go from uniform (random negatives) to the reference's ``softmax`` of ITC's similarities, as
            ``softmax(beta * sim)`` with ``beta`` ramping linearly from 0 to 1 (0: hard from the first step, the
            reference). From scratch, hard negatives become hard (ITC learns) before the fusion layers have learnt to
            look at the image, and ITM then stays at its prior (docs/toy_ablation.md).
        hard_negatives_start_accuracy: the ramp advances only on steps where ITM's running training accuracy (an
            exponential average over about 20 steps, kept on the device) is at least this; ``0`` advances it every
            step. With ``0.8`` the negatives stay random until the fusion layers tell matches from random pairs
            (the all-"no match" prior scores 0.667), whatever the budget: a from-scratch toy run waits a few hundred
            steps, a run from pretrained encoders a few dozen. The ramp's progress and the running accuracy are
            buffers of this module (``negatives_step``, ``running_accuracy``), saved in checkpoints, so a resumed run
            continues the curriculum.
    """

    name = "itm"
    requires = ("itc",)

    def __init__(
        self,
        weight: float = 1.0,
        negatives: Literal["hard", "random"] = "hard",
        global_negatives: bool = False,
        hard_negatives_warmup_steps: int = 0,
        hard_negatives_start_accuracy: float = 0.0,
    ) -> None:
        super().__init__(weight)
        if negatives not in ("hard", "random"):
            raise ValueError(f"model.itm.negatives must be 'hard' or 'random', got {negatives!r}")
        if hard_negatives_warmup_steps < 0:
            raise ValueError(
                f"model.itm.hard_negatives_warmup_steps must be >= 0 (0: hard negatives from the first step), got "
                f"{hard_negatives_warmup_steps}"
            )
        if not 0.0 <= hard_negatives_start_accuracy < 1.0:
            raise ValueError(
                f"model.itm.hard_negatives_start_accuracy must be in [0, 1) (0: the ramp starts at once), got "
                f"{hard_negatives_start_accuracy}"
            )
        if hard_negatives_start_accuracy and not hard_negatives_warmup_steps:
            raise ValueError(
                "model.itm.hard_negatives_start_accuracy needs model.itm.hard_negatives_warmup_steps > 0 (the ramp it "
                "starts)"
            )
        self.negatives = negatives
        self.global_negatives = global_negatives
        self.hard_negatives_warmup_steps = hard_negatives_warmup_steps
        self.hard_negatives_start_accuracy = hard_negatives_start_accuracy
        self._last_accuracy: Tensor | None = None
        if hard_negatives_warmup_steps and negatives == "hard":
            self.register_buffer("negatives_step", torch.zeros((), dtype=torch.long))
            self.register_buffer("running_accuracy", torch.zeros(()))

    @classmethod
    def required_for(cls, settings: Mapping[str, Any]) -> tuple[str, ...]:
        return cls.requires if settings.get("negatives", "hard") == "hard" else ()

    @classmethod
    def requirement_hint(cls, required: str) -> str:
        return ", or let model.itm draw random negatives (--model.itm.negatives random)" if required == "itc" else ""

    def build(self, spec: BuildSpec) -> None:
        self.itm_head = nn.Linear(spec.text_width, 2)
        self.pad_token_id = spec.vocab.pad_token_id
        super().build(spec)

    def hardness(self) -> Tensor | None:
        """``beta`` of the hard-negative curriculum (a 0-dim tensor on the device, no host read), or None without
        one."""
        if not hasattr(self, "negatives_step"):
            return None
        return (self.negatives_step.float() / self.hard_negatives_warmup_steps).clamp(max=1.0)

    def _sharpen(self, *sims: Tensor) -> tuple[Tensor, ...]:
        beta = self.hardness()
        return sims if beta is None else tuple(beta * sim for sim in sims)

    def after_optimizer_step(self) -> None:
        if not hasattr(self, "negatives_step"):
            return
        if self._last_accuracy is not None:
            self.running_accuracy.lerp_(self._last_accuracy.to(self.running_accuracy), _RUNNING_WEIGHT)
            self._last_accuracy = None
        if self.hard_negatives_start_accuracy:  # on the device: no host read of the accuracy
            self.negatives_step += (self.running_accuracy >= self.hard_negatives_start_accuracy).long()
        else:
            self.negatives_step += 1

    def forward(self, ctx: StepContext) -> ObjectiveOutput:
        if self.global_negatives and world_size() > 1:
            return self._forward_global(ctx)
        if self.negatives == "hard":
            itc = ctx.published["itc"]
            sim_t2i, sim_i2t = self._sharpen(itc["sim_t2i"], itc["sim_i2t"])
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
            word_embeds=ctx.word_embeds[text_order] if ctx.single_stream else None,
        )
        return self._loss(fused, batch, {"negative_image": negative_image, "negative_text": negative_text})

    def _forward_global(self, ctx: StepContext) -> ObjectiveOutput:
        """Negatives drawn from every rank's samples; indices are global (rank-major, as the gathers order them)."""
        ids, mask = ctx.input_ids, ctx.attention_mask
        batch, device = ids.shape[0], ids.device
        total, offset = batch * world_size(), batch * rank()
        if self.negatives == "hard":
            itc = ctx.published["itc"]
            sim_t2i, sim_i2t = itc["sim_t2i_global"], itc["sim_i2t_global"]
            if sim_t2i.shape[1] != total:
                raise ValueError("model.itm.global_negatives with hard negatives needs model.itc.gather_features: true")
            sim_t2i, sim_i2t = self._sharpen(sim_t2i, sim_i2t)
        else:
            sim_t2i = sim_i2t = torch.zeros(batch, total, device=device)
        rows = torch.arange(batch, device=device)[:, None] + offset
        exclude = torch.arange(total, device=device)[None, :] == rows  # the positive
        image_ids = ctx.batch.get("image_ids")
        if image_ids is not None:  # other samples of the same image are no negatives either, on any rank
            same = image_ids[:, None] == all_gather_no_grad(image_ids)[None, :]
            exclude = torch.where(same.all(dim=1, keepdim=True), exclude, exclude | same)
        negative_image = sample_hard_negatives(sim_t2i, exclude)  # per caption, a global image index
        negative_text = sample_hard_negatives(sim_i2t, exclude)  # per image, a global caption index

        image_tokens = ctx.image_tokens
        image_pool = all_gather_with_grad(image_tokens)
        images = torch.cat([image_tokens, image_pool[negative_image], image_tokens])
        # Captions are padded per batch, so ranks differ in length: pad to the longest before gathering (the one
        # host read of this path: the longest length decides a shape).
        length = int(all_gather_no_grad(torch.tensor([ids.shape[1]], device=device)).max())
        ids_local, mask_local = _pad(ids, length, self.pad_token_id), _pad(mask, length, 0)
        ids_pool, mask_pool = all_gather_no_grad(ids_local), all_gather_no_grad(mask_local)
        text_ids = torch.cat([ids_local, ids_local, ids_pool[negative_text]])
        text_mask = torch.cat([mask_local, mask_local, mask_pool[negative_text]])
        text_states = None
        if not ctx.single_stream:
            states = _pad(ctx.text_states, length, 0.0)
            text_states = torch.cat([states, states, all_gather_with_grad(states)[negative_text]])
        fused = ctx.fuse(text_ids, text_mask, images, text_states=text_states)
        return self._loss(fused, batch, {"negative_image": negative_image, "negative_text": negative_text})

    def _loss(self, fused, batch: int, publish: dict) -> ObjectiveOutput:
        logits = self.itm_head(fused.last_hidden_state[:, 0]).float()
        labels = torch.cat([torch.ones(batch, device=logits.device), torch.zeros(2 * batch, device=logits.device)])
        loss = F.cross_entropy(logits, labels.long())
        accuracy = (logits.argmax(-1) == labels).float().mean()
        logs = {"accuracy": accuracy.detach()}
        beta = self.hardness()
        if beta is not None:
            logs["hardness"] = beta
            self._last_accuracy = logs["accuracy"]
        return ObjectiveOutput(loss=loss, logs=logs, publish=publish)


def _pad(x: torch.Tensor, length: int, value: float) -> torch.Tensor:
    """Pad dim 1 of ``x`` ([B, L] or [B, L, H]) with ``value`` up to ``length``."""
    missing = length - x.shape[1]
    if missing == 0:
        return x
    pad = (0, 0, 0, missing) if x.dim() == 3 else (0, missing)
    return F.pad(x, pad, value=value)
