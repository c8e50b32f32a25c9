"""SNLI-VE visual entailment: does the image entail, contradict or leave open a hypothesis? Fine-tuning, accuracy.

``vlalign finetune snli_ve`` trains :class:`SNLIVETask` from a pretrained model, validates on dev (the best checkpoint
is picked by ``val/acc``) and tests the best checkpoint; ``vlalign evaluate snli_ve --model CKPT`` tests a fine-tuned
checkpoint. The model is the reference's (docs/tasks.md, "SNLI-VE"): the stream fuses the hypothesis with the image
(the premise), ``Linear(H, H) -> ReLU -> Linear(H, 3)`` reads the fused [CLS]; loss ``(1 - α)·CE + α·CE(softmax(
teacher))`` with the EMA teacher (ViT, stream, head) made from the loaded weights and α = 0.4 from the first step
(the reference's ``warm_up: False``). Classes by index: contradiction 0, neutral 1, entailment 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from vlalign.datamodules.snli_ve import SNLI_VE_CLASSES
from vlalign.tasks.classification import CLASSIFY_OPTIM, ClassificationTask, classifier_head
from vlalign.tasks.optim import OptimConfig
from vlalign.tasks.registry import TaskSpec, register_task

__all__ = ["SNLI_VE_TASK", "SNLIVETask"]


class SNLIVETask(ClassificationTask):
    """SNLI-VE fine-tuning and evaluation.

    Args:
        init_from: the model to start from or to evaluate: a pretraining ``.ckpt``, an exported folder, a converted
            ALBEF / SIMLA ``.safetensors`` (with ``tokenizer``), or a checkpoint of this task (head kept).
        tokenizer: tokenizer directory; required for converted reference files, replaces the recorded one otherwise.
        image_size: image side (reference: 384); None: the model's. Linked from ``data.image_size``.
        momentum: EMA coefficient of the teacher (reference: 0.995).
        alpha: distillation weight (reference: 0.4).
        alpha_warmup_steps: α ramps linearly from 0 over this many optimizer steps; 0 (the reference): no ramp;
            None: the first epoch.
        distill: momentum distillation.
        gradient_checkpointing: recompute encoder activations in the backward pass (less memory, slower).
        optim: optimiser and schedule (reference: lr 2e-5, 100 warm-up steps from 1e-5, cosine to 1e-6).
        max_consecutive_nonfinite: steps with a non-finite loss are skipped; this many in a row stop the run.
    """

    task_name = "snli_ve"
    class_names = SNLI_VE_CLASSES

    def __init__(
        self,
        init_from: str | None = None,
        tokenizer: str | None = None,
        image_size: int | None = None,
        momentum: float = 0.995,
        alpha: float = 0.4,
        alpha_warmup_steps: int | None = 0,
        distill: bool = True,
        gradient_checkpointing: bool = False,
        optim: OptimConfig = CLASSIFY_OPTIM,
        max_consecutive_nonfinite: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        start = self._start(
            init_from, tokenizer, image_size, momentum, alpha, alpha_warmup_steps, distill, optim,
            max_consecutive_nonfinite,
        )  # fmt: skip
        head = classifier_head(start.backbone.text_width, len(SNLI_VE_CLASSES))
        self._finish(start, head, head_from_checkpoint=start.task_info is not None,
                     gradient_checkpointing=gradient_checkpointing)  # fmt: skip

    @classmethod
    def config_errors(cls, config: dict[str, Any], subcommand: str) -> list[str]:
        return cls.common_config_errors(config, subcommand, "train_files")

    def logits(self, batch: Mapping[str, Any], momentum: bool = False) -> Tensor:
        """The hypothesis fused with the image; the head on the fused [CLS]."""
        tokens = self.backbone.encoder("vision", momentum)(batch["image"])
        fused = self.backbone.fuse(batch["input_ids"], batch["attention_mask"], tokens, momentum=momentum)
        return self.classify(fused.last_hidden_state[:, 0], momentum)


SNLI_VE_TASK = register_task(
    TaskSpec(
        name="snli_ve",
        module="vlalign.tasks.snli_ve.SNLIVETask",
        datamodule="vlalign.datamodules.snli_ve.SNLIVEDataModule",
        config="snli_ve.yaml",
        description="SNLI-VE visual entailment: entailment / neutral / contradiction from an image premise; accuracy",
        trains=True,
    )
)
