"""NLVR2: is a statement true of a pair of images? Fine-tuning, the optional text-assignment pre-stage, accuracy.

``vlalign finetune nlvr2`` trains :class:`NLVR2Task` from a pretrained model (or from the text-assignment pre-stage's
checkpoint), validates on dev (the best checkpoint is picked by ``val/acc``) and tests the best checkpoint on test-P;
``vlalign evaluate nlvr2 --model CKPT`` tests a fine-tuned checkpoint. docs/tasks.md ("NLVR2") describes the model:

- both images go through the ViT in one batch; the stream (:class:`~vlalign.models.two_image.TwoImageStream`)
  fuses the statement with the left image and the right image in alternating layers, its upper fusion layers
  duplicated from the pretrained ones with the cross-attention keys and values shared by each pair;
- ``Linear(H, H) -> ReLU -> Linear(H, 2)`` on the fused [CLS]; loss ``(1 - α)·CE + α·CE(softmax(teacher))`` with the
  teacher an EMA twin of ViT, stream and head made from the *loaded* weights (docs/differences.md row 23), α ramped
  over the first epoch as the reference does.

``model.stage: text_assignment`` (``configs/finetune/nlvr2_pretrain_ta.yaml``) is the reference's pre-stage on
image-caption pairs: for each caption, with probability 2/3 one other image of the batch is drawn by ITC image
similarity (``softmax(v·vᵀ / ta_temperature)``, same image excluded) and the pair is (caption's image, it), label 0,
or the reverse, label 1, with equal probability; with probability 1/3 two other images are drawn, label 2 ("the
text matches neither"). A ``Linear(H, 3)`` head on the fused [CLS], cross-entropy, no teacher; all draws for the
batch at once (:func:`text_assignment_pairs`). Its checkpoint is a valid ``model.init_from`` of the NLVR2 stage.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlalign.errors import ConfigError
from vlalign.models.two_image import TwoImageStream
from vlalign.tasks.classification import CLASSIFY_OPTIM, ClassificationTask, classifier_head
from vlalign.tasks.optim import OptimConfig
from vlalign.tasks.registry import TaskSpec, register_task
from vlalign.training.progress import losses_on_progress_bar

log = logging.getLogger(__name__)

__all__ = ["NLVR2_CLASSES", "NLVR2_TASK", "NLVR2Task", "TA_CLASSES", "text_assignment_pairs"]

#: Class names by index: the label 1 iff the statement is true.
NLVR2_CLASSES: tuple[str, ...] = ("false", "true")
#: Text-assignment classes: the caption belongs to the left image, the right one, or neither.
TA_CLASSES: tuple[str, ...] = ("left", "right", "neither")
Stage = Literal["nlvr2", "text_assignment"]


def text_assignment_pairs(
    similarity: Tensor, image_ids: Tensor | None = None, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The text-assignment draw for a batch: ``(left, right, label)``, each long ``[B]``.

    Row ``b`` is caption ``b`` (of image ``b``). Other images are drawn with probability ``softmax(similarity[b])``
    over the allowed columns: not ``b`` and, with ``image_ids``, no image with the same id (a row that would be left
    with fewer than two columns falls back to excluding only ``b``). With probability 1/3 the two first draws without
    replacement form the pair (label 2); otherwise the first draw ``j`` pairs with ``b`` as ``(b, j)``, label 0, or
    ``(j, b)``, label 1, with equal probability. Everything is drawn on the device at once (an exponential race:
    ``torch.multinomial`` without replacement, without its host-side checks).
    """
    rows = similarity.shape[0]
    if similarity.shape != (rows, rows) or rows < 3:
        raise ValueError(f"text assignment needs a square similarity of at least 3 x 3, got {tuple(similarity.shape)}")
    device = similarity.device
    eye = torch.eye(rows, dtype=torch.bool, device=device)
    exclude = eye if image_ids is None else eye | (image_ids[:, None] == image_ids[None, :])
    exclude = torch.where((~exclude).sum(1, keepdim=True) < 2, eye, exclude)
    weights = similarity.float().masked_fill(exclude, float("-inf")).softmax(dim=1)
    race = torch.empty_like(weights).exponential_(1, generator=generator)
    first, second = (weights / race).topk(2, dim=1).indices.unbind(1)
    draws = torch.rand((2, rows), device=device, generator=generator)
    own = torch.arange(rows, device=device)
    neither = draws[0] < 1.0 / 3.0
    own_left = draws[1] < 0.5
    left = torch.where(neither, first, torch.where(own_left, own, first))
    right = torch.where(neither, second, torch.where(own_left, first, own))
    label = torch.where(neither, 2, torch.where(own_left, 0, 1))
    return left, right, label


class NLVR2Task(ClassificationTask):
    """NLVR2 fine-tuning (``stage: nlvr2``) or its text-assignment pre-stage (``stage: text_assignment``).

    Args:
        init_from: the model to start from or to evaluate: a pretraining ``.ckpt``, an exported folder, a converted
            ALBEF / SIMLA ``.safetensors`` (with ``tokenizer``), or a checkpoint of this task (the pre-stage's, or a
            fine-tuned one, whose head is kept when the stage is the same).
        tokenizer: tokenizer directory; required for converted reference files, replaces the recorded one otherwise.
        image_size: image side (reference: 384; 256 in the pre-stage); None: the model's. Linked from
            ``data.image_size``.
        stage: ``nlvr2`` (fine-tuning, dev / test-P accuracy) or ``text_assignment`` (the pre-stage).
        duplicate_from: first pretrained stream layer that is duplicated for the two images (docs/tasks.md); None:
            the reference's choice (the first fusion layer under the ALBEF split, half the layers in single stream),
            or the recorded one of a checkpoint of this task.
        momentum: EMA coefficient of the teacher (reference: 0.995).
        alpha: distillation weight (reference: 0.4).
        alpha_warmup_steps: α ramps linearly from 0 over this many optimizer steps; None: the first epoch (the
            reference), 0: no ramp.
        distill: momentum distillation (the pre-stage never distils).
        ta_temperature: temperature of the image similarity the pre-stage draws pairs by (reference: 0.07).
        gradient_checkpointing: recompute encoder activations in the backward pass (less memory, slower).
        optim: optimiser and schedule (reference: lr 2e-5, 100 warm-up steps from 1e-5, cosine to 1e-6).
        max_consecutive_nonfinite: steps with a non-finite loss are skipped; this many in a row stop the run.
    """

    task_name = "nlvr2"
    class_names = NLVR2_CLASSES

    def __init__(
        self,
        init_from: str | None = None,
        tokenizer: str | None = None,
        image_size: int | None = None,
        stage: Stage = "nlvr2",
        duplicate_from: int | None = None,
        momentum: float = 0.995,
        alpha: float = 0.4,
        alpha_warmup_steps: int | None = None,
        distill: bool = True,
        ta_temperature: float = 0.07,
        gradient_checkpointing: bool = False,
        optim: OptimConfig = CLASSIFY_OPTIM,
        max_consecutive_nonfinite: int = 10,
    ) -> None:
        super().__init__()
        if stage not in ("nlvr2", "text_assignment"):
            raise ConfigError(f"model.stage must be 'nlvr2' or 'text_assignment', got {stage!r}")
        if ta_temperature <= 0:
            raise ConfigError(f"model.ta_temperature must be > 0, got {ta_temperature}")
        self.save_hyperparameters()
        self.stage = stage
        self.ta_temperature = ta_temperature
        start = self._start(
            init_from, tokenizer, image_size, momentum, alpha, alpha_warmup_steps, distill, optim,
            max_consecutive_nonfinite,
        )  # fmt: skip
        if stage == "text_assignment":
            self.distill = False  # the reference pre-stage has no teacher
            self.class_names = TA_CLASSES  # type: ignore[misc]
        info = start.task_info
        stream = start.backbone.stream
        if info is not None:  # a checkpoint of this task: the stream is expanded as recorded, weights loaded next
            recorded = int(info["two_image"]["duplicate_from"])
            if duplicate_from is not None and duplicate_from != recorded:
                raise ConfigError(
                    f"model.duplicate_from={duplicate_from}, but model.init_from {init_from} was expanded from layer "
                    f"{recorded}: leave model.duplicate_from null (or {recorded})"
                )
            start.backbone.stream = TwoImageStream(stream.config, recorded)
        else:
            start.backbone.stream = TwoImageStream.from_stream(stream, duplicate_from)
        width = start.backbone.text_width
        head = nn.Linear(width, len(TA_CLASSES)) if stage == "text_assignment" else classifier_head(width, 2)
        # The pre-stage draws pairs by the pretrained ITC image embedding (frozen); uniformly when there is none.
        itc = start.itc
        self.ta_projection: nn.Module | None = None
        if stage == "text_assignment" and itc is not None:
            self.ta_projection = itc.vision_proj.requires_grad_(False)
        elif stage == "text_assignment":
            log.warning("model.init_from has no ITC projection: the text-assignment pairs are drawn uniformly")
        same_stage = info is not None and info.get("stage") == stage
        self._finish(start, head, head_from_checkpoint=same_stage, gradient_checkpointing=gradient_checkpointing)
        if info is not None and not same_stage and stage == "nlvr2":
            log.info("model.init_from is a %s checkpoint: encoders loaded, new NLVR2 head", info.get("stage"))

    @property
    def two_image_stream(self) -> TwoImageStream:
        return self.backbone.stream  # type: ignore[return-value]

    def task_details(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "two_image": {"duplicate_from": self.two_image_stream.duplicate_from},
            "classes": list(self.class_names),
        }

    @classmethod
    def config_errors(cls, config: dict[str, Any], subcommand: str) -> list[str]:
        stage = (config.get("model") or {}).get("stage", "nlvr2")
        return cls.common_config_errors(config, subcommand, "ta_files" if stage == "text_assignment" else "train_files")

    # -- the model --------------------------------------------------------------------------------------------------
    def logits(self, batch: Mapping[str, Any], momentum: bool = False) -> Tensor:
        """Both images through the ViT in one batch, the statement fused with them in alternating layers."""
        images = batch["images"]  # [B, 2, 3, H, W]
        size = images.shape[0]
        tokens = self.backbone.encoder("vision", momentum)(images.flatten(0, 1)).unflatten(0, (size, 2))
        stream = self.backbone.encoder("stream", momentum)
        fused = stream.fuse_pair(batch["input_ids"], batch["attention_mask"], [tokens[:, 0], tokens[:, 1]])
        return self.classify(fused.last_hidden_state[:, 0], momentum)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        if self.stage == "nlvr2":
            return super().training_step(batch, batch_idx)
        images = batch["image"]
        size = images.shape[0]
        if size < 3:
            raise ConfigError(
                f"the text-assignment stage needs batches of at least 3 captions, got {size}: raise data.batch_size"
            )
        tokens = self.backbone.vision(images)
        with torch.no_grad():
            if self.ta_projection is not None:
                features = F.normalize(self.ta_projection(tokens[:, 0].detach()).float(), dim=-1)
                similarity = features @ features.t() / self.ta_temperature
            else:
                similarity = tokens.new_zeros((size, size), dtype=torch.float32)
            left, right, labels = text_assignment_pairs(similarity, batch.get("image_ids"))
        fused = self.backbone.stream.fuse_pair(
            batch["input_ids"], batch["attention_mask"], [tokens[left], tokens[right]]
        )
        logits = self.head(fused.last_hidden_state[:, 0])
        loss = F.cross_entropy(logits.float(), labels)
        self.log("train/loss", loss.detach(), prog_bar=losses_on_progress_bar(self), batch_size=size)
        self.log("train/acc", 100.0 * (logits.detach().argmax(-1) == labels).float().mean(), batch_size=size)
        return self._checked(loss)


NLVR2_TASK = register_task(
    TaskSpec(
        name="nlvr2",
        module="vlalign.tasks.nlvr2.NLVR2Task",
        datamodule="vlalign.datamodules.nlvr2.NLVR2DataModule",
        config="nlvr2.yaml",
        description="NLVR2: is a statement true of a pair of images; two-image fusion, accuracy on dev / test-P",
        trains=True,
    )
)
