"""ITC: image-text contrastive alignment (global level) with feature queues and momentum distillation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlalign.objectives.base import BuildSpec, ConfigFacts, Objective, ObjectiveOutput, register_objective
from vlalign.objectives.functional import contrastive_loss, distillation_targets, positive_targets
from vlalign.utils.distributed import all_gather_no_grad, all_gather_with_grad, rank, world_size

if TYPE_CHECKING:
    from vlalign.objectives.context import StepContext

TEMPERATURE_RANGE = (0.001, 0.5)


@register_objective
class ITC(Objective):
    """Contrast each image with every caption in the batch and the queue, and vice versa (docs/method.md §2.1).

    Differences from the reference, on purpose:
    - the queue needs no ``queue_size % global_batch == 0``: writes wrap around the ring buffer;
    - ``gather_features`` also puts other ranks' current features among the candidates (the reference sees them only
      one step later, through the queue); ``gather_with_grad`` lets gradients flow through them (open_clip style).

    The queues are always filled with the momentum features of every rank (gathered in rank order), as the
    reference does, so they hold the same contents on every rank.

    Publishes ``sim_i2t`` / ``sim_t2i`` (similarities to this rank's samples, [B, B]), ``sim_i2t_global`` /
    ``sim_t2i_global`` (to the samples of every rank whose features were gathered, [B, W·B] with
    ``gather_features``, else the local [B, B]) and the features.

    Args:
        weight: weight of this loss in the total.
        embed_dim: width of the shared embedding space both projections map into.
        temperature: initial softmax temperature; clamped to [0.001, 0.5] before every step.
        learnable_temperature: train the temperature (reference) or keep it fixed.
        queue_size: number of past momentum features kept per modality as extra negatives; 0 disables the queue.
        distill: mix the momentum model's similarity distribution into the targets with the recipe's ``alpha``.
        gather_features: include all ranks' current-step features as candidates.
        gather_with_grad: when gathering online features (no momentum model), keep their gradients.
        text_pooling: ``cls`` (the reference: the [CLS] state) or ``mean`` (masked mean of the token states).
            A randomly initialised post-LN text stack learns a discriminative [CLS] slowly, so the from-scratch tiny
            recipes use ``mean``; recipes starting from BERT keep ``cls``.
        same_image_positives: retrieval fine-tuning targets (ALBEF's ``model_retrieval``): every candidate, in the
            batch or in the queue, whose ``batch["image_ids"]`` entry equals the sample's is a positive, and each
            target row is normalised to sum to 1. An ``image_id_queue`` buffer (-1: no image) is kept next to the
            feature queues. Off in pretraining, whose batches carry no image ids (docs/method.md §2.1).
    """

    name = "itc"
    momentum_heads = ("vision_proj", "text_proj")
    no_decay = ("temp",)

    def __init__(
        self,
        weight: float = 1.0,
        embed_dim: int = 256,
        temperature: float = 0.07,
        learnable_temperature: bool = True,
        queue_size: int = 65536,
        distill: bool = True,
        gather_features: bool = False,
        gather_with_grad: bool = False,
        text_pooling: Literal["cls", "mean"] = "cls",
        same_image_positives: bool = False,
    ) -> None:
        super().__init__(weight)
        lo, hi = TEMPERATURE_RANGE
        if not lo <= temperature <= hi:
            raise ValueError(f"itc.temperature must be in [{lo}, {hi}], got {temperature}")
        if embed_dim <= 0:
            raise ValueError(f"itc.embed_dim must be positive, got {embed_dim}")
        if queue_size < 0:
            raise ValueError(f"itc.queue_size must be >= 0, got {queue_size}")
        if text_pooling not in ("cls", "mean"):
            raise ValueError(f"itc.text_pooling must be 'cls' or 'mean', got {text_pooling!r}")
        self.text_pooling = text_pooling
        self.embed_dim = embed_dim
        self.queue_size = queue_size
        self.distill = distill
        self.gather_features = gather_features
        self.gather_with_grad = gather_with_grad
        self.same_image_positives = same_image_positives
        self.temp = nn.Parameter(torch.tensor(float(temperature)), requires_grad=learnable_temperature)
        # momentum features (and image ids) waiting for the next optimizer step
        self._pending: list[tuple[Tensor, Tensor, Tensor | None]] = []
        self._pending_mark = 0

    @classmethod
    def config_errors(cls, settings: Mapping[str, Any], facts: ConfigFacts) -> list[str]:
        errors = super().config_errors(settings, facts)
        queue_size = settings.get("queue_size", 0)
        if facts.subcommand != "fit" or not isinstance(facts.batch_size, int) or not isinstance(queue_size, int):
            return errors  # only training writes the queue
        written = facts.batch_size * facts.world_size * facts.accumulate_grad_batches
        if 0 < queue_size < written:
            errors.append(
                f"model.itc.queue_size ({queue_size}) is smaller than the features written to it per optimizer "
                f"step: data.batch_size ({facts.batch_size}) x {facts.world_size} process(es) x "
                f"trainer.accumulate_grad_batches ({facts.accumulate_grad_batches}) = {written}, so the queue would "
                f"never hold a full step of negatives. Raise model.itc.queue_size to at least {written}, lower "
                "data.batch_size, or set model.itc.queue_size 0 to disable the queue"
            )
        return errors

    @property
    def uses_momentum(self) -> bool:
        return self.distill or self.queue_size > 0

    def momentum_encoders(self) -> frozenset[str]:
        return frozenset({"vision", "stream"}) if self.uses_momentum else frozenset()

    def build(self, spec: BuildSpec) -> None:
        self.vision_proj = nn.Linear(spec.vision_width, self.embed_dim)
        self.text_proj = nn.Linear(spec.text_width, self.embed_dim)
        if self.queue_size > 0:
            self.register_buffer("image_queue", F.normalize(torch.randn(self.embed_dim, self.queue_size), dim=0))
            self.register_buffer("text_queue", F.normalize(torch.randn(self.embed_dim, self.queue_size), dim=0))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
            if self.same_image_positives:  # -1: a slot holding no real sample (ids are >= 0)
                self.register_buffer("image_id_queue", torch.full((self.queue_size,), -1, dtype=torch.long))
        super().build(spec)

    # -- features -----------------------------------------------------------------------------------------------
    def image_features(self, image_tokens: Tensor, momentum: bool = False) -> Tensor:
        proj = self.vision_proj_m if momentum else self.vision_proj
        return F.normalize(proj(image_tokens[:, 0]).float(), dim=-1)

    def text_features(
        self, text_states: Tensor, attention_mask: Tensor | None = None, momentum: bool = False
    ) -> Tensor:
        proj = self.text_proj_m if momentum else self.text_proj
        if self.text_pooling == "cls":
            pooled = text_states[:, 0]
        elif attention_mask is None:
            pooled = text_states.mean(dim=1)
        else:
            weights = attention_mask.to(text_states.dtype).unsqueeze(-1)
            pooled = (text_states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return F.normalize(proj(pooled).float(), dim=-1)

    def _batch_image_ids(self, ctx: StepContext) -> Tensor:
        ids = ctx.batch.get("image_ids") if isinstance(ctx.batch, Mapping) else None
        if ids is None:
            raise KeyError(
                "model.itc.same_image_positives needs batch['image_ids'] (one integer per sample): use a data module "
                "that provides them, e.g. vlalign.datamodules.retrieval_finetune.RetrievalFinetuneDataModule"
            )
        return ids.long()

    def _gather(self, x: Tensor) -> Tensor:
        if not self.gather_features:
            return x
        return all_gather_with_grad(x) if self.gather_with_grad and x.requires_grad else all_gather_no_grad(x)

    # -- loss ---------------------------------------------------------------------------------------------------
    def forward(self, ctx: StepContext) -> ObjectiveOutput:
        with torch.no_grad():
            self.temp.clamp_(*TEMPERATURE_RANGE)
        image_feat = self.image_features(ctx.image_tokens)
        text_feat = self.text_features(ctx.text_states, ctx.attention_mask)
        batch = image_feat.shape[0]
        offset = rank() * batch if self.gather_features else 0

        image_ids = self._batch_image_ids(ctx) if self.same_image_positives else None
        id_bank = id_cands = None
        if image_ids is not None:
            id_bank = id_cands = self._gather(image_ids)
        image_feat_m = text_feat_m = image_queue = text_queue = None
        if self.uses_momentum:
            with torch.no_grad():
                image_feat_m = self.image_features(ctx.image_tokens_m, momentum=True)
                text_feat_m = self.text_features(ctx.text_states_m, ctx.attention_mask, momentum=True)
                image_bank, text_bank = self._gather(image_feat_m), self._gather(text_feat_m)
                image_cands, text_cands = image_bank, text_bank
                if self.queue_size > 0:
                    image_queue, text_queue = self.image_queue, self.text_queue
                    if id_bank is not None:
                        id_cands = torch.cat([id_bank, self.image_id_queue])
                    if not self.gather_features:  # the queues take every rank's features all the same
                        image_bank, text_bank = all_gather_no_grad(image_feat_m), all_gather_no_grad(text_feat_m)
                        if image_ids is not None:
                            id_bank = all_gather_no_grad(image_ids)
            if self.queue_size > 0:
                self._pending.append((image_bank, text_bank, id_bank))
        else:
            image_cands, text_cands = self._gather(image_feat), self._gather(text_feat)

        distill = self.distill and ctx.alpha > 0
        sim_i2t, teacher_i2t = self._direction(image_feat, image_feat_m if distill else None, text_cands, text_queue)
        sim_t2i, teacher_t2i = self._direction(text_feat, text_feat_m if distill else None, image_cands, image_queue)
        if image_ids is not None and id_cands is not None:
            hard = same_image_targets(image_ids, id_cands)
        else:
            hard = positive_targets(batch, sim_i2t.shape[1], sim_i2t.device, offset)
        targets_i2t = targets_t2i = hard
        if teacher_i2t is not None and teacher_t2i is not None:
            with torch.no_grad():
                targets_i2t = distillation_targets(teacher_i2t, hard, ctx.alpha)
                targets_t2i = distillation_targets(teacher_t2i, hard, ctx.alpha)
        loss = contrastive_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i)

        local = slice(offset, offset + batch)
        current = batch * world_size() if self.gather_features else batch  # candidates of this step, before the queue
        publish = {
            "image_feat": image_feat,
            "text_feat": text_feat,
            "sim_i2t": sim_i2t[:, local],
            "sim_t2i": sim_t2i[:, local],
            "sim_i2t_global": sim_i2t[:, :current],
            "sim_t2i_global": sim_t2i[:, :current],
        }
        if image_feat_m is not None:
            publish["image_feat_m"] = image_feat_m
        return ObjectiveOutput(loss=loss, logs={"temperature": self.temp.detach()}, publish=publish)

    def _direction(
        self, query: Tensor, teacher_query: Tensor | None, current: Tensor, queue: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """One direction's logits over the temperature: the student's [B, C (+ Q)] and, given ``teacher_query``
        (the momentum features), the teacher's, detached. Student and teacher share every candidate, so both go
        through one product per operand and the queue is read once per direction, not twice."""
        if teacher_query is None:
            return self.candidate_logits(query, current, queue) / self.temp, None
        rows = query.shape[0]
        both = self.candidate_logits(torch.cat([query, teacher_query.to(query.dtype)]), current, queue) / self.temp
        return both[:rows], both[rows:].detach()

    @staticmethod
    def candidate_logits(feat: Tensor, current: Tensor, queue: Tensor | None) -> Tensor:
        """Dot products [B, C (+ Q)] of ``feat`` [B, D] with this step's candidates ``current`` [C, D], then with
        the queue's ``queue`` [D, Q] when given.

        The queue is multiplied in its stored [D, Q] layout (``feat @ queue``: a plain matrix product, no copy);
        only the two logit blocks are concatenated. Concatenating the transposed queue into one [C + Q, D]
        candidate matrix first costs a strided copy of the whole queue every step (a quarter of a reduced-size
        CPU step at Q = 65,536; docs/benchmarks.md, "Speed II (CPU)").
        """
        logits = feat @ current.t()
        if queue is None:
            return logits
        return torch.cat([logits, feat @ queue.to(feat.dtype)], dim=1)

    # -- queue --------------------------------------------------------------------------------------------------
    def begin_step(self) -> None:
        self._pending_mark = len(self._pending)

    def rollback_step(self) -> None:
        """A skipped micro-batch's features never reach the queue."""
        del self._pending[self._pending_mark :]

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Write the features of every micro-batch since the last optimizer step into the ring buffers."""
        self._flush(None)

    @torch.no_grad()
    def after_optimizer_step_gated(self, applied: Tensor) -> None:
        """:meth:`after_optimizer_step` where ``applied`` (a 0-dim bool tensor on the device) is true; where it is
        false the queues, the image-id queue and the pointer keep their values. Never read on the host: the
        recipe's device-side non-finite guard calls this after every optimizer step."""
        self._flush(applied)

    def _flush(self, applied: Tensor | None) -> None:
        if not self._pending:
            return
        images = torch.cat([p[0] for p in self._pending])
        texts = torch.cat([p[1] for p in self._pending])
        ids = [p[2] for p in self._pending]
        image_ids = torch.cat(ids) if all(i is not None for i in ids) else None  # type: ignore[arg-type]
        self._pending.clear()
        self.enqueue(images, texts, image_ids, applied=applied)

    @torch.no_grad()
    def enqueue(
        self, image_feat: Tensor, text_feat: Tensor, image_ids: Tensor | None = None, applied: Tensor | None = None
    ) -> None:
        """Write features (and, with ``same_image_positives``, their image ids) at the ring buffer's pointer.

        ``applied`` (0-dim bool tensor): write only where it is true, decided on the device (no host read)."""
        n = image_feat.shape[0]
        start = self.queue_ptr
        if n > self.queue_size:  # only the newest queue_size features survive a write larger than the queue
            image_feat, text_feat = image_feat[-self.queue_size :], text_feat[-self.queue_size :]
            image_ids = image_ids[-self.queue_size :] if image_ids is not None else None
            start = start + (n - self.queue_size)
            n = self.queue_size
        idx = (start + torch.arange(n, device=start.device)) % self.queue_size
        id_queue = getattr(self, "image_id_queue", None)
        writes = [(self.image_queue, 1, image_feat.t()), (self.text_queue, 1, text_feat.t())]
        if id_queue is not None:  # features written without ids belong to no image
            writes.append((id_queue, 0, image_ids if image_ids is not None else torch.full_like(idx, -1)))
        for queue, dim, values in writes:
            values = values.to(queue.dtype)
            if applied is not None:
                values = torch.where(applied, values, queue.index_select(dim, idx))
            # index_copy_, not `queue[:, idx] = ...`: writing through an index tensor syncs with the host on CUDA
            queue.index_copy_(dim, idx, values)
        moved = (start + n) % self.queue_size
        self.queue_ptr.copy_(moved if applied is None else torch.where(applied, moved, self.queue_ptr))


def same_image_targets(image_ids: Tensor, candidate_ids: Tensor) -> Tensor:
    """Contrastive targets with every candidate of the sample's image as a positive, rows summing to 1.

    ``image_ids`` [B] are the samples' image ids, ``candidate_ids`` [C] the ids of the candidates (the current
    batch, gathered or not, then the queue; -1 marks a queue slot without an image). Row ``b`` is uniform over the
    candidates with ``candidate_ids == image_ids[b]``, as ALBEF's retrieval fine-tuning (``pos_idx / pos_idx.sum``).
    Each sample is among its own candidates, so no row is empty.
    """
    positives = (image_ids[:, None] == candidate_ids[None, :]).float()
    return positives / positives.sum(dim=1, keepdim=True).clamp_min(1.0)
