"""StepContext: the shared features of one training step, each computed at most once and only when asked for.

Objectives read features from the context instead of running encoders themselves, so two objectives that need the
same pass share it, and an ablation that disables an objective also removes the passes only it needed.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from vlalign.models.stream import StreamOutput
    from vlalign.tasks.pretrain import PretrainRecipe


class StepContext:
    """Lazily computed, cached features of one batch for the online and the momentum (EMA) encoders."""

    def __init__(self, recipe: PretrainRecipe, batch: dict[str, Any], alpha: float) -> None:
        self.recipe = recipe
        self.batch = batch
        self.alpha = alpha
        self.input_ids: Tensor = batch["input_ids"]
        self.attention_mask: Tensor = batch["attention_mask"]
        self.published: dict[str, dict[str, Tensor]] = {}

    @property
    def single_stream(self) -> bool:
        return self.recipe.stream.single_stream

    @property
    def patch_mask(self) -> Tensor:
        mask = self.batch.get("patch_mask")
        if mask is None:
            raise KeyError("this objective needs batch['patch_mask']: set data.mask_patch_size in the data config")
        return mask.flatten(1).bool()

    # -- image tokens: clean and masked views share one ViT batch when both are needed --------------------------------
    def _vision_pass(self, encoder: torch.nn.Module) -> tuple[Tensor, Tensor | None]:
        images = self.batch["image"]
        if not self.recipe.needs_masked_images:
            return encoder(images), None
        mask = self.patch_mask
        both = encoder(torch.cat([images, images]), torch.cat([torch.zeros_like(mask), mask]))
        clean, masked = both.chunk(2)
        return clean, masked

    @cached_property
    def _online_images(self) -> tuple[Tensor, Tensor | None]:
        return self._vision_pass(self.recipe.vision)

    @cached_property
    def _momentum_images(self) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            return self._vision_pass(self.recipe.momentum_encoder("vision"))

    @property
    def image_tokens(self) -> Tensor:
        return self._online_images[0]

    @property
    def image_tokens_m(self) -> Tensor:
        return self._momentum_images[0]

    @property
    def masked_image_tokens(self) -> Tensor:
        masked = self._online_images[1]
        assert masked is not None, "recipe.needs_masked_images is False but masked image tokens were requested"
        return masked

    @property
    def masked_image_tokens_m(self) -> Tensor:
        masked = self._momentum_images[1]
        assert masked is not None, "recipe.needs_masked_images is False but masked image tokens were requested"
        return masked

    # -- text ------------------------------------------------------------------------------------------------------
    @cached_property
    def text_states(self) -> Tensor:
        return self.recipe.stream.encode_text(self.input_ids, self.attention_mask).last_hidden_state

    @cached_property
    def text_states_m(self) -> Tensor:
        with torch.no_grad():
            stream_m = self.recipe.momentum_encoder("stream")
            return stream_m.encode_text(self.input_ids, self.attention_mask).last_hidden_state

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
    ) -> StreamOutput:
        """Text queries attending to image tokens, in whichever layout the stream has.

        Under an ALBEF split, ``text_states`` (cached text-encoder outputs of these ids) skip the text layers;
        otherwise the ids are encoded from scratch.
        """
        stream = self.recipe.momentum_encoder("stream") if momentum else self.recipe.stream
        use_states = text_states is not None and not stream.single_stream
        return stream.fuse(
            attention_mask,
            image_tokens,
            input_ids=None if use_states else input_ids,
            text_states=text_states if use_states else None,
            attention_probs_layer=attention_probs_layer,
        )
