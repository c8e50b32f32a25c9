"""Shared machinery of the classification tasks on the fused [CLS] state (NLVR2, SNLI-VE): the starting model, the
classifier head with its momentum twin, momentum distillation, accuracy, checkpoints.

What it computes (docs/tasks.md): the stream fuses the sentence with the image(s); a head ``Linear(H, H) -> ReLU ->
Linear(H, C)`` reads the fused [CLS] state. Training minimises ``(1 - α)·CE(logits, label) + α·CE(logits,
softmax(teacher logits))``; the teacher is the EMA twin of the ViT, the stream and the head, created from the
*loaded* weights (the reference creates NLVR2's teacher before loading, ALBEF#67: docs/differences.md row 23), and
updated after each real optimizer step. Accuracy (percent) counts every example once, however the evaluation loader
was sharded (:func:`accuracy_by_index`).

Starting points (``model.init_from``): anything :func:`vlalign.load` reads (a pretraining ``.ckpt``, an exported
folder, a converted ALBEF / SIMLA file with ``model.tokenizer``), or a checkpoint this task wrote (fine-tuned, or
NLVR2's text-assignment pre-stage), whose encoders (and head, when it is the same head) are loaded as they are.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import tempfile
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from vlalign.api import SPEC_KEY, read_checkpoint
from vlalign.api import load as load_model
from vlalign.data.preprocessing import Preprocessing, preprocessing_of
from vlalign.data.tokenization import VocabInfo, load_tokenizer
from vlalign.errors import ConfigError, InputFileError
from vlalign.models.backbone import Backbone, make_twin
from vlalign.models.stream import StreamConfig
from vlalign.models.vision import VisionConfig, interpolate_pos_embed
from vlalign.objectives.base import ema_update
from vlalign.objectives.functional import distilled_cross_entropy
from vlalign.tasks.optim import OptimConfig, build_optimizer
from vlalign.training.fault_tolerance import (
    NONFINITE_STATE_KEY,
    RNG_STATE_KEY,
    NonFiniteGuard,
    capture_rng_states,
    prepare_checkpointing,
    restore_rng_states,
)
from vlalign.training.progress import losses_on_progress_bar
from vlalign.utils.distributed import all_gather_variable
from vlalign.weights.safe_loading import allow_config_classes_in_checkpoints

log = logging.getLogger(__name__)
allow_config_classes_in_checkpoints()

__all__ = [
    "CLASSIFY_OPTIM",
    "ClassificationTask",
    "StartingPoint",
    "accuracy_by_index",
    "classifier_head",
    "load_starting_point",
]

#: The reference NLVR2 / SNLI-VE schedule: AdamW lr 2e-5 (weight decay 0.02) after 100 warm-up steps from 1e-5,
#: cosine to 1e-6.
CLASSIFY_OPTIM = OptimConfig(lr=2e-5, weight_decay=0.02, warmup_steps=100, warmup_lr=1e-5, min_lr=1e-6)


def classifier_head(width: int, num_classes: int) -> nn.Sequential:
    """The reference's ``cls_head``: ``Linear(width, width) -> ReLU -> Linear(width, num_classes)``."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


# -- the starting model ---------------------------------------------------------------------------------------------
@dataclass
class StartingPoint:
    """What ``model.init_from`` provides.

    Attributes:
        backbone: the online ViT and stream (no twins). From a task checkpoint: built in the pretrained layout with
            untrained weights (``task_state`` holds the weights; the task reshapes the stream first, then loads).
        tokenizer: the tokenizer captions are encoded with.
        preprocessing: image size, caption limits and tokenizer files (``image_size`` already overridden).
        base_spec: the model spec in the pretrained layout (what :func:`vlalign.load` reads), or the task
            checkpoint's spec.
        itc: the pretrained ITC projections (inference form), None when the model has none or for a task checkpoint.
        task_state: the state dict of a checkpoint this task wrote; None otherwise.
        task_info: that checkpoint's ``finetuned`` entry (``task``, ``stage``, ...); None otherwise.
    """

    backbone: Backbone
    tokenizer: Any
    preprocessing: Preprocessing
    base_spec: dict[str, Any]
    itc: nn.Module | None = None
    task_state: dict[str, Tensor] | None = None
    task_info: dict[str, Any] | None = None


def task_checkpoint_spec(path: str | Path, task: str) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
    """``(spec, state_dict)`` of a vlalign ``.ckpt`` that ``task`` wrote, else None (other files are left to
    :func:`vlalign.load`)."""
    file = Path(path).expanduser()
    if not file.is_file() or file.suffix in (".safetensors", ".json"):
        return None
    try:
        checkpoint = read_checkpoint(file)
    except InputFileError:
        return None  # vlalign.load reports what is wrong with it
    spec = checkpoint[SPEC_KEY]
    if (spec.get("finetuned") or {}).get("task") != task:
        return None
    state = {key: value for key, value in checkpoint["state_dict"].items() if isinstance(value, Tensor)}
    return spec, state


def load_starting_point(
    init_from: str, task: str, tokenizer: str | None = None, image_size: int | None = None
) -> StartingPoint:
    """The model ``init_from`` names (see the module docstring); errors name ``model.init_from`` and the file."""
    found = task_checkpoint_spec(init_from, task)
    if found is None:
        overrides = {"image_size": image_size} if image_size is not None else {}
        try:
            pretrained = load_model(init_from, tokenizer=tokenizer, **overrides)
        except InputFileError as err:
            raise InputFileError(f"model.init_from: {err}") from None
        backbone = pretrained.backbone
        backbone.requires_grad_(True)
        return StartingPoint(
            backbone, pretrained.tokenizer, pretrained.preprocessing, copy.deepcopy(pretrained.config), pretrained.itc
        )
    spec, state = found
    args = spec["init_args"]
    preprocessing = Preprocessing.from_dict(spec["preprocessing"])
    if image_size is not None:
        preprocessing = dataclasses.replace(preprocessing, image_size=int(image_size))
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        with tempfile.TemporaryDirectory(prefix="vlalign-tokenizer-") as tmp:
            tok = load_tokenizer(preprocessing.write_tokenizer(tmp))
    vision = VisionConfig(
        **{**args["vision"], "weights": None, "gradient_checkpointing": False, "img_size": preprocessing.image_size}
    )
    stream = StreamConfig(**{**args["stream"], "gradient_checkpointing": False})
    if args.get("vocab"):
        vocab = VocabInfo(**args["vocab"])
        stream = dataclasses.replace(stream, vocab_size=vocab.vocab_size, pad_token_id=vocab.pad_token_id)
    return StartingPoint(
        Backbone(vision, stream), tok, preprocessing, copy.deepcopy(spec), None, state, dict(spec["finetuned"])
    )


def load_task_state(module: nn.Module, state: Mapping[str, Tensor], prefixes: Sequence[str], source: str) -> None:
    """Load the tensors of ``module`` under ``prefixes`` from a task checkpoint, all of them with the module's shapes
    (vision position embeddings interpolated to the module's grid); an :class:`InputFileError` otherwise."""
    own = {key: value for key, value in module.state_dict().items() if key.startswith(tuple(prefixes))}
    missing = [key for key in own if key not in state]
    selected = {key: state[key] for key in own if key in state}
    for key, value in selected.items():
        if key.endswith("pos_embed") and value.shape != own[key].shape and value.ndim == 3:
            side = math.isqrt(own[key].shape[1] - 1)
            selected[key] = interpolate_pos_embed(value.float(), (side, side)).to(value.dtype)
    wrong = [
        f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
        for k, v in selected.items()
        if v.shape != own[k].shape
    ]
    if missing or wrong:
        problems = (missing[:5] if missing else []) + wrong[:5]
        raise InputFileError(
            f"model.init_from {source}: the checkpoint does not fit the task model ({len(missing)} tensor(s) missing, "
            f"{len(wrong)} with other shapes: {', '.join(problems)}); it was written with other model settings"
        )
    module.load_state_dict(selected, strict=False)


# -- accuracy -------------------------------------------------------------------------------------------------------
def accuracy_by_index(predictions: Tensor, labels: Tensor, index: Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy in percent over the distinct examples: rows sharing an ``index`` (a distributed sampler's padding
    repeats) count once.

    Returns ``{"accuracy", "count", "per_class": {name: {"accuracy", "count"}}, "majority"}``: per-class accuracy
    is the share of that class's examples predicted correctly (None when the class has none), ``majority`` the
    accuracy of always answering the most frequent class.
    """
    size = int(index.max()) + 1 if index.numel() else 0
    seen = torch.zeros(size, dtype=torch.bool, device=index.device)
    predicted = torch.zeros(size, dtype=torch.long, device=index.device)
    truth = torch.zeros(size, dtype=torch.long, device=index.device)
    seen[index] = True
    predicted[index] = predictions.long()
    truth[index] = labels.long()
    correct = (predicted == truth) & seen
    count = int(seen.sum())
    per_class: dict[str, dict[str, Any]] = {}
    counts = []
    for value, name in enumerate(class_names):
        members = seen & (truth == value)
        members_count = int(members.sum())
        counts.append(members_count)
        share = 100.0 * float(correct[members].sum()) / members_count if members_count else None
        per_class[name] = {"accuracy": share, "count": members_count}
    accuracy = 100.0 * float(correct.sum()) / count if count else float("nan")
    majority = 100.0 * max(counts) / count if count else float("nan")
    return {"accuracy": accuracy, "count": count, "per_class": per_class, "majority": majority}


# -- the task -------------------------------------------------------------------------------------------------------
class ClassificationTask(L.LightningModule, ABC):
    """Base of :class:`~vlalign.tasks.nlvr2.NLVR2Task` and :class:`~vlalign.tasks.snli_ve.SNLIVETask`.

    A subclass sets :attr:`task_name` and :attr:`class_names`, calls :meth:`_start` then :meth:`_finish` from its
    ``__init__`` (typed: the config schema) and implements :meth:`logits`.

    Logged: ``train/loss``, ``train/acc``, ``train/alpha``; at validation and test ``{val,test}/acc`` and
    ``{val,test}/acc_<class>`` (percent). After each evaluation :attr:`results` holds the split's accuracy, per-class
    accuracy and counts, chance and majority-class accuracy, and every validation accuracy so far
    (``val_history``); ``vlalign finetune`` / ``evaluate`` write it into ``results.json``.
    """

    task_name: ClassVar[str] = ""
    class_names: ClassVar[tuple[str, ...]] = ()

    # -- building ---------------------------------------------------------------------------------------------------
    def _start(
        self,
        init_from: str | None,
        tokenizer: str | None,
        image_size: int | None,
        momentum: float,
        alpha: float,
        alpha_warmup_steps: int | None,
        distill: bool,
        optim: OptimConfig,
        max_consecutive_nonfinite: int,
    ) -> StartingPoint:
        """Check the common settings and load the starting model."""
        errors = []
        if not 0.0 <= momentum < 1.0:
            errors.append(f"model.momentum must be in [0, 1), got {momentum}")
        if not 0.0 <= alpha <= 1.0:
            errors.append(f"model.alpha must be in [0, 1], got {alpha}")
        if alpha_warmup_steps is not None and alpha_warmup_steps < 0:
            errors.append(f"model.alpha_warmup_steps must be >= 0 (or null: one epoch), got {alpha_warmup_steps}")
        if image_size is not None and image_size < 1:
            errors.append(f"model.image_size (linked from data.image_size) must be >= 1, got {image_size}")
        if errors:
            raise ConfigError("; ".join(errors))
        if not init_from:
            raise ConfigError(
                "model.init_from is required: the model to fine-tune or evaluate (a vlalign .ckpt, a folder written "
                "by `vlalign export`, or a converted ALBEF / SIMLA .safetensors file with model.tokenizer)"
            )
        self.momentum = momentum
        self.alpha = alpha
        self.alpha_warmup_steps = alpha_warmup_steps
        self.distill = distill
        self.optim = optim
        self.output_dir: Path | None = None
        self.results: dict[str, Any] = {}
        self.last_results: dict[str, dict[str, Any]] = {}
        self.val_history: list[dict[str, Any]] = []
        self._eval_store: dict[str, list[Tensor]] = defaultdict(list)
        self._nonfinite = NonFiniteGuard(max_consecutive_nonfinite)
        self._warmup_steps = alpha_warmup_steps or 0
        self._update_pending = False
        self._rng_to_restore: dict[str, Any] | None = None
        start = load_starting_point(init_from, self.task_name, tokenizer, image_size)
        self.tokenizer = start.tokenizer
        self.preprocessing: Preprocessing = start.preprocessing
        return start

    def _finish(
        self, start: StartingPoint, head: nn.Module, head_from_checkpoint: bool, gradient_checkpointing: bool
    ) -> None:
        """Attach the backbone (already in the task's shape) and the head, load a task checkpoint's weights, then make
        the momentum twins of what was loaded (so the teacher starts equal to the student)."""
        backbone = start.backbone
        backbone.vision_m = None
        backbone.stream_m = None
        self.backbone = backbone
        self.head = head
        self.head_m: nn.Module | None = None
        self.head_loaded = start.task_state is not None and head_from_checkpoint
        if start.task_state is not None:
            prefixes = ["backbone.vision.", "backbone.stream."] + (["head."] if head_from_checkpoint else [])
            load_task_state(self, start.task_state, prefixes, str(self.hparams.get("init_from")))
        if gradient_checkpointing:
            backbone.vision.vit.set_grad_checkpointing(True)
            backbone.stream.config = dataclasses.replace(backbone.stream.config, gradient_checkpointing=True)
        if self.distill:
            backbone.vision_m = make_twin(backbone.vision)
            backbone.stream_m = make_twin(backbone.stream)
            self.head_m = make_twin(head)
        self._base_spec: dict[str, Any] = start.base_spec
        self.train()  # vlalign.load returns eval mode; Lightning keeps the mode it finds (twins stay in eval)

    @classmethod
    def common_config_errors(cls, config: Mapping[str, Any], subcommand: str, train_key: str) -> list[str]:
        """What a parsed config lacks for ``subcommand``, before anything is built: the model to start from, the
        training files (``data.<train_key>``) for ``fit``, the split that ``test`` / ``validate`` evaluate."""
        model, data = config.get("model") or {}, config.get("data") or {}
        errors = []
        init_from = model.get("init_from")
        if init_from and not Path(str(init_from)).expanduser().exists():
            errors.append(
                f"model.init_from: {init_from} does not exist; give the model with --model.init_from PATH "
                "(`vlalign evaluate`: --model PATH): a vlalign .ckpt, a folder from `vlalign export`, or a "
                "`vlalign convert reference` .safetensors file"
            )
        if subcommand == "fit" and not data.get(train_key):
            errors.append(f"data.{train_key} is empty: fine-tuning needs training files (--data.{train_key} '[FILE]')")
        for command, key in (("test", "test_file"), ("validate", "val_file")):
            if subcommand == command and not data.get(key):
                errors.append(f"data.{key} is not set: `{command}` evaluates it (--data.{key} FILE)")
        return errors

    # -- structure --------------------------------------------------------------------------------------------------
    @property
    def max_text_length(self) -> int:
        """Tokens a sentence may have ([CLS] included): the stream's position embeddings."""
        return int(self.backbone.stream.config.max_position_embeddings)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = list(self.backbone.momentum_pairs())
        if self.head_m is not None:
            pairs.append((self.head, self.head_m))
        return pairs

    def train(self, mode: bool = True) -> ClassificationTask:
        """The teacher (momentum twins) always runs in eval mode."""
        super().train(mode)
        if self.head_m is not None:
            self.head_m.eval()
        return self

    def task_details(self) -> dict[str, Any]:
        """Task-specific entries of the checkpoint's ``finetuned`` note (subclasses add theirs)."""
        return {}

    def model_spec(self) -> dict[str, Any]:
        """How to rebuild the fine-tuned model: the pretrained spec (encoder settings in the pretrained layout, the
        fine-tuning image size, no ITC / ITM objectives: this model classifies) and a ``finetuned`` note naming the
        task, the start and the task's structure. ``model.init_from`` of this task reads it back."""
        spec = copy.deepcopy(self._base_spec)
        args = spec["init_args"]
        args["vision"] = {**args["vision"], "img_size": int(self.preprocessing.image_size)}
        args["objectives"] = []
        spec["preprocessing"] = self.preprocessing.to_dict()
        spec["finetuned"] = {
            "task": self.task_name,
            "init_from": str(self.hparams.get("init_from")),
            "classes": list(self.class_names),
            **self.task_details(),
        }
        return spec

    def setup(self, stage: str) -> None:
        """Record the data module's evaluation preprocessing (its tokenizer is the model's unless configured)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        recorded = preprocessing_of(datamodule) if datamodule is not None else None
        if recorded is not None:
            self.preprocessing = recorded

    # -- the model --------------------------------------------------------------------------------------------------
    @abstractmethod
    def logits(self, batch: Mapping[str, Any], momentum: bool = False) -> Tensor:
        """Class logits ``[B, C]`` of a batch, by the online model or (``momentum``) the teacher."""

    def classify(self, fused_cls: Tensor, momentum: bool = False) -> Tensor:
        head = self.head_m if momentum else self.head
        if head is None:
            raise RuntimeError("no momentum head: the task was built with model.distill false")
        return head(fused_cls)

    # -- training ---------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        prepare_checkpointing(self.trainer)

    def on_train_start(self) -> None:
        if self.alpha_warmup_steps is None:  # the reference NLVR2: α ramps over the first epoch
            batches = self.trainer.num_training_batches
            per_epoch = int(batches) // max(1, self.trainer.accumulate_grad_batches) if batches != float("inf") else 0
            self._warmup_steps = per_epoch

    def current_alpha(self) -> float:
        if self._warmup_steps <= 0:
            return self.alpha
        return self.alpha * min(1.0, self.global_step / self._warmup_steps)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        labels = batch["label"]
        alpha = self.current_alpha() if self.distill else 0.0
        logits = self.logits(batch)
        teacher = None
        if alpha > 0.0:
            with torch.no_grad():
                teacher = self.logits(batch, momentum=True)
        loss = distilled_cross_entropy(logits, labels, teacher, alpha)
        size = labels.shape[0]
        self.log("train/loss", loss.detach(), prog_bar=losses_on_progress_bar(self), batch_size=size)
        self.log("train/acc", 100.0 * (logits.detach().argmax(-1) == labels).float().mean(), batch_size=size)
        self.log("train/alpha", alpha, batch_size=size)
        return self._checked(loss)

    def _checked(self, loss: Tensor) -> Tensor | None:
        """The loss, or None (a skipped step) when it is not finite."""
        if not self._nonfinite.is_finite(loss, self._trainer):
            self._nonfinite.skip({"loss": loss})
            return None
        self._nonfinite.finite_step()
        self._update_pending = True
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._nonfinite.exceeded:
            self._nonfinite.stop(self.trainer)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The EMA update follows real optimizer steps only."""
        super().optimizer_step(*args, **kwargs)
        if not self._update_pending:
            return
        self._update_pending = False
        pairs = self.momentum_pairs()
        if pairs:
            ema_update(pairs, self.momentum)

    def configure_optimizers(self) -> dict:
        return build_optimizer(self, self.optim, self.trainer.estimated_stepping_batches)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[SPEC_KEY] = self.model_spec()
        checkpoint[RNG_STATE_KEY] = capture_rng_states()
        checkpoint[NONFINITE_STATE_KEY] = self._nonfinite.checkpoint_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get(RNG_STATE_KEY)

    # -- evaluation -------------------------------------------------------------------------------------------------
    def _warn_untrained_head(self) -> None:
        """Evaluating (not fine-tuning) a model whose classifier head was not loaded measures a random head."""
        if not self.head_loaded and self.global_step == 0 and self.trainer.state.fn != "fit":
            rank_zero_warn(
                f"model.init_from {self.hparams.get('init_from')} has no {self.task_name} classifier head: it is freshly "
                "initialised, so the accuracy is chance level. Evaluate a checkpoint written by "
                f"`vlalign finetune {self.task_name}`"
            )

    def on_validation_start(self) -> None:
        self._warn_untrained_head()

    def on_test_start(self) -> None:
        self._warn_untrained_head()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._store(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._store(batch)

    def _store(self, batch: Mapping[str, Any]) -> None:
        self._eval_store["prediction"].append(self.logits(batch).argmax(-1))
        self._eval_store["label"].append(batch["label"])
        self._eval_store["index"].append(batch["index"])

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    @torch.no_grad()
    def _evaluate(self, stage: str) -> None:
        if not self._eval_store:
            return
        gathered = {key: all_gather_variable(torch.cat(values)) for key, values in self._eval_store.items()}
        self._eval_store.clear()
        scores = accuracy_by_index(gathered["prediction"], gathered["label"], gathered["index"], self.class_names)
        self.last_results[stage] = scores
        self.log(f"{stage}/acc", scores["accuracy"], rank_zero_only=True, sync_dist=False)
        for name, entry in scores["per_class"].items():
            if entry["accuracy"] is not None:
                self.log(f"{stage}/acc_{name}", entry["accuracy"], rank_zero_only=True, sync_dist=False)
        if stage == "val" and not self.trainer.sanity_checking:
            self.val_history.append({"step": int(self.global_step), "acc": scores["accuracy"]})
        self.results = {
            "split": stage,
            "num_examples": scores["count"],
            "accuracy": scores["accuracy"],
            "per_class": scores["per_class"],
            "chance": 100.0 / len(self.class_names),
            "majority": scores["majority"],
            "val_history": list(self.val_history),
        }
