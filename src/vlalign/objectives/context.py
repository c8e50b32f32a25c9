"""StepContext: the shared features of one training step, each computed at most once and only when asked for.

Objectives read features from the context instead of running encoders themselves, so two objectives that need the
same pass share it, and an ablation that disables an objective also removes the passes only it needed. The context
sees the :class:`~vlalign.models.backbone.Backbone` and the batch, never the LightningModule.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from vlalign.models.backbone import Backbone
    from vlalign.models.stream import StreamOutput

T = TypeVar("T")


class SharedFeatureMeter(Protocol):
    """Runs the computation of a shared feature on a measured step (``vlalign.training.objective_cost``), so its
    cost is booked to the shared passes rather than to the objective that asked for it first."""

    def shared(self, compute: Callable[[], T]) -> T: ...


class StepContext:
    """Lazily computed, cached features of one batch for the online and the momentum (EMA) encoders.

    Args:
        backbone: the encoders (and their twins) the features come from.
        batch: the collated batch (``image``, ``input_ids``, ``attention_mask``, optional ``patch_mask``,
            ``image_ids``, image-side target inputs).
        alpha: the distillation weight of this step (after its warm-up ramp).
        masked_images: whether an enabled objective reads masked image tokens; the clean and masked views then go
            through the ViT as one batch.
        shared_meter: on a step whose cost is measured, the meter each shared feature is computed through; None
            (every other step) computes them directly.
    """

    def __init__(
        self,
        backbone: Backbone,
        batch: dict[str, Any],
        alpha: float,
        masked_images: bool = False,
        shared_meter: SharedFeatureMeter | None = None,
    ) -> None:
        self.backbone = backbone
        self.shared_meter = shared_meter
        self.batch = batch
        self.alpha = alpha
        self.masked_images = masked_images
        self.input_ids: Tensor = batch["input_ids"]
        self.attention_mask: Tensor = batch["attention_mask"]
        self.published: dict[str, dict[str, Tensor]] = {}

    @property
    def single_stream(self) -> bool:
        return self.backbone.single_stream

    @property
    def patch_mask(self) -> Tensor:
        mask = self.batch.get("patch_mask")
        if mask is None:
            raise KeyError("this objective needs batch['patch_mask']: set data.mask_patch_size in the data config")
        return mask.flatten(1).bool()

    # -- image tokens: clean and masked views share one ViT batch when both are needed --------------------------------
    def _images(self, momentum: bool) -> tuple[Tensor, Tensor | None]:
        mask = self.patch_mask if self.masked_images else None
        return self.backbone.encode_images(self.batch["image"], mask, momentum=momentum)

    def _shared(self, compute: Callable[[], T]) -> T:
        return compute() if self.shared_meter is None else self.shared_meter.shared(compute)

    @cached_property
    def _online_images(self) -> tuple[Tensor, Tensor | None]:
        return self._shared(lambda: self._images(momentum=False))

    @cached_property
    def _momentum_images(self) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            return self._shared(lambda: self._images(momentum=True))

    @property
    def image_tokens(self) -> Tensor:
        return self._online_images[0]

    @property
    def image_tokens_m(self) -> Tensor:
        return self._momentum_images[0]

    @property
    def masked_image_tokens(self) -> Tensor:
        return _masked(self._online_images[1])

    @property
    def masked_image_tokens_m(self) -> Tensor:
        return _masked(self._momentum_images[1])

    # -- text ------------------------------------------------------------------------------------------------------
    @cached_property
    def word_embeds(self) -> Tensor:
        """[B, L, H] rows of the online stream's word embeddings for the batch's ids, looked up once per step: the
        text encoder, the image side and the ITM pairs read them, so backward forms one [vocab, hidden] gradient
        for them instead of one per pass (each pass still adds positions, LayerNorm and its own dropout)."""
        return self._shared(lambda: self.backbone.stream.embeddings.word_embeddings(self.input_ids))

    @cached_property
    def text_states(self) -> Tensor:
        return self._shared(
            lambda: self.backbone.encode_text(self.input_ids, self.attention_mask, word_embeds=self.word_embeds)
        )

    @cached_property
    def text_states_m(self) -> Tensor:
        with torch.no_grad():
            return self._shared(lambda: self.backbone.encode_text(self.input_ids, self.attention_mask, momentum=True))

    @cached_property
    def same_image(self) -> Tensor | None:
        """[B, B] bool, True where two samples show the same image (from ``batch['image_ids']`` when present)."""
        ids = self.batch.get("image_ids")
        if ids is None:
            return None
        return ids[:, None] == ids[None, :]

    # -- fusion ----------------------------------------------------------------------------------------------------
    def fuse(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_tokens: Tensor,
        *,
        text_states: Tensor | None = None,
        momentum: bool = False,
        attention_probs_layer: int | None = None,
        word_embeds: Tensor | None = None,
    ) -> StreamOutput:
        """:meth:`Backbone.fuse <vlalign.models.backbone.Backbone.fuse>` (text queries attending to image tokens).
        ``word_embeds``: rows of :attr:`word_embeds` matching ``input_ids`` (online passes only)."""
        return self.backbone.fuse(
            input_ids,
            attention_mask,
            image_tokens,
            text_states=text_states,
            momentum=momentum,
            attention_probs_layer=attention_probs_layer,
            word_embeds=word_embeds,
        )

    def image_side(self, image_tokens: Tensor, *, momentum: bool = False) -> Tensor:
        """:meth:`Backbone.image_side <vlalign.models.backbone.Backbone.image_side>` with this batch's caption (the
        online pass reads the shared :attr:`word_embeds`)."""
        word_embeds = None if momentum else self.word_embeds
        return self.backbone.image_side(
            image_tokens, self.input_ids, self.attention_mask, momentum=momentum, word_embeds=word_embeds
        )


def _masked(tokens: Tensor | None) -> Tensor:
    if tokens is None:
        raise RuntimeError("masked image tokens were requested but no enabled objective declared needs_masked_images")
    return tokens
