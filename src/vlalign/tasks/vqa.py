"""Visual question answering (VQA v2 layout): the reference's answer decoder, trained with answer-weighted teacher
forcing, answers ranked from a fixed list, scored with the official VQA accuracy.

``vlalign finetune vqa`` trains :class:`VQATask` from a pretrained model; ``vlalign evaluate vqa`` tests any model
:func:`vlalign.load` accepts, or a VQA-fine-tuned checkpoint (whose answer decoder it loads). What it computes
(docs/tasks.md, VQA):

- the question is encoded by the stream in multimodal mode (question tokens cross-attending to the ViT's image
  tokens); an answer decoder (:class:`~vlalign.models.answer_decoder.AnswerDecoder`, initialised from the stream's
  top layers, embeddings and MLM head as the reference does) reads the question states;
- training: each question's distinct human answers are teacher-forced, their summed token losses weighted by the
  answers' shares of the human answers (VG answers: 0.5) and divided by the number of questions; momentum
  distillation mixes in the EMA teacher's token distributions with weight α, ramped over the first epoch (ALBEF's
  fixed VQA; SIMLA never passes α, so its distillation is inert, docs/differences.md row 25);
- evaluation: every question's answer is picked from ``answer_list.json`` (the ``k_test`` best by first-token
  probability, re-scored by their full sequence log-probability, each token counted once;
  ``model.reference_answer_scoring`` counts the first twice as the reference), then scored with the official VQA
  accuracy when the split has answers (``{split}/acc``, per ``answer_type`` ``{split}/acc_<type>``, and the
  majority-answer level ``{split}/majority_acc``); every evaluation also writes the submission file
  ``vqa_<split>_submission.json`` (``[{"question_id", "answer"}]``, one per question, sampler padding dropped).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from vlalign.api import CONFIG_FILE, WEIGHTS_FILE, read_checkpoint, read_weights
from vlalign.api import load as load_model
from vlalign.data.preprocessing import Preprocessing
from vlalign.errors import ConfigError, InputFileError
from vlalign.evaluation.vqa import (
    RankedAnswers,
    constant_answer_accuracy,
    majority_answer,
    normalize_answer,
    place_predictions,
    prior_answers,
    question_accuracy,
    rank_answers,
)
from vlalign.models.answer_decoder import AnswerDecoder, answer_loss, decoder_config, decoder_init_state
from vlalign.models.backbone import make_twin, with_prefix
from vlalign.objectives.base import ema_update
from vlalign.tasks.optim import OptimConfig, build_optimizer
from vlalign.tasks.registry import CONFIG_DIR, TaskSpec, register_task
from vlalign.training.fault_tolerance import (
    NONFINITE_STATE_KEY,
    RNG_STATE_KEY,
    NonFiniteGuard,
    capture_rng_states,
    prepare_checkpointing,
    restore_rng_states,
)
from vlalign.training.progress import losses_on_progress_bar
from vlalign.training.run_folder import output_folder
from vlalign.utils.distributed import all_gather_variable
from vlalign.weights.safe_loading import allow_config_classes_in_checkpoints

log = logging.getLogger(__name__)
allow_config_classes_in_checkpoints()

__all__ = ["SUBMISSION_FILE", "VQA_OPTIM", "VQA_TASK", "VQATask", "chance_levels", "demo_finetune_args"]

SPEC_KEY = "vlalign_model"
#: The reference VQA schedule: AdamW lr 2e-5, weight decay 0.02, warm-up from 1e-5 over 400 steps ("4 warm-up
#: epochs" of 100 iterations), cosine to 1e-6 (per step here, docs/differences.md row 16).
VQA_OPTIM = OptimConfig(lr=2e-5, weight_decay=0.02, warmup_steps=400, warmup_lr=1e-5, min_lr=1e-6)
#: The answers of an evaluated split, in the EvalAI upload format; ``{split}`` is ``val`` or ``test``.
SUBMISSION_FILE = "vqa_{split}_submission.json"
DECODER_PREFIX = "answer_decoder."
MLM_HEAD_PREFIX = "xmm.mlm_head."


class VQATask(L.LightningModule):
    """Fine-tune and evaluate VQA from a pretrained vlalign or reference model (see the module docstring).

    The encoders come from ``init_from`` (:func:`vlalign.load`: a vlalign ``.ckpt``, an exported folder, a converted
    ALBEF / SIMLA ``.safetensors``); the answer decoder from the same model's top stream layers, or, for a checkpoint
    written by this task, its own trained decoder. The ITC / ITM heads of the pretrained model are kept frozen (not
    trained, not used), so a VQA checkpoint stays a model :func:`vlalign.load` reads.

    Logged: ``train/loss``, ``train/alpha``; at validation and test ``{split}/acc`` (official VQA accuracy, 0-100)
    with ``{split}/acc_<answer_type>`` and ``{split}/majority_acc`` when the split has answers.

    Args:
        init_from: the pretrained model to start from, or a VQA checkpoint to evaluate (required).
        tokenizer: tokenizer directory; required for converted reference files (they record none).
        image_size: image side the model sees (position embeddings interpolated; reference: 384). None: the
            model's. Linked from ``data.image_size`` by the CLI.
        zero_shot: evaluate ``init_from`` as it is: ``vlalign finetune`` skips training and only tests.
        decoder_layers: answer-decoder depth, initialised from that many top stream layers (reference: 6 of 12).
            None: half the stream's layers, or the depth a VQA checkpoint records.
        momentum: EMA coefficient of the momentum twins (reference: 0.995).
        alpha: distillation weight (reference: 0.4).
        alpha_warmup_steps: α ramps linearly from 0 over this many optimizer steps; None: the first epoch (the
            reference), 0: no ramp.
        distill: momentum distillation of the answer tokens (off: no momentum twins are kept).
        k_test: answers kept by their first-token probability and re-scored in full (reference: 128).
        reference_answer_scoring: score candidates as the reference does, with the first token's log-probability
            counted twice (docs/differences.md row 24); False: every token once.
        rank_batch_size: candidate answers per decoder pass at evaluation (bounds memory: rows x answer length x
            vocabulary logits).
        gradient_checkpointing: recompute activations in the backward pass (less memory, slower).
        optim: optimiser and schedule (reference: lr 2e-5, weight decay 0.02, warm-up 400 steps, cosine to 1e-6).
        max_consecutive_nonfinite: steps with a non-finite loss are skipped; this many in a row stop the run.
    """

    def __init__(
        self,
        init_from: str | None = None,
        tokenizer: str | None = None,
        image_size: int | None = None,
        zero_shot: bool = False,
        decoder_layers: int | None = None,
        momentum: float = 0.995,
        alpha: float = 0.4,
        alpha_warmup_steps: int | None = None,
        distill: bool = True,
        k_test: int = 128,
        reference_answer_scoring: bool = False,
        rank_batch_size: int = 2048,
        gradient_checkpointing: bool = False,
        optim: OptimConfig = VQA_OPTIM,
        max_consecutive_nonfinite: int = 10,
    ) -> None:
        super().__init__()
        errors = range_errors(
            decoder_layers=decoder_layers,
            momentum=momentum,
            alpha=alpha,
            alpha_warmup_steps=alpha_warmup_steps,
            k_test=k_test,
            rank_batch_size=rank_batch_size,
            image_size=image_size,
        )
        if errors:
            raise ConfigError("; ".join(errors))
        if not init_from:
            raise ConfigError(
                "model.init_from is required: the pretrained model to fine-tune (a vlalign .ckpt, a folder written by "
                "`vlalign export`, a converted ALBEF / SIMLA .safetensors file) or a VQA checkpoint to evaluate"
            )
        self.save_hyperparameters()
        self.momentum = momentum
        self.alpha = alpha
        self.alpha_warmup_steps = alpha_warmup_steps
        self.distill = distill
        self.zero_shot = zero_shot
        self.k_test = k_test
        self.reference_answer_scoring = reference_answer_scoring
        self.rank_batch_size = rank_batch_size
        self.optim = optim
        self.output_dir: Path | None = None  # where the submission files go; the run's log folder when None

        overrides = {"image_size": image_size} if image_size is not None else {}
        try:
            pretrained = load_model(init_from, tokenizer=tokenizer, **overrides)
        except InputFileError as err:
            raise InputFileError(f"model.init_from: {err}") from None
        self.tokenizer = pretrained.tokenizer
        self.preprocessing: Preprocessing = pretrained.preprocessing
        self._base_spec: dict[str, Any] = copy.deepcopy(pretrained.config)
        backbone = pretrained.backbone
        backbone.requires_grad_(True)
        if backbone.vision.mask_token is not None:  # nothing is masked in fine-tuning (an unused DDP parameter)
            backbone.vision.mask_token.requires_grad_(False)
        if gradient_checkpointing:
            backbone.vision.vit.set_grad_checkpointing(True)
            backbone.stream.config = dataclasses.replace(backbone.stream.config, gradient_checkpointing=True)

        raw = _extra_tensors(init_from)
        trained = {k[len(DECODER_PREFIX) :]: v for k, v in raw.items() if k.startswith(DECODER_PREFIX)}
        stream_config = backbone.stream.config
        if trained:
            recorded = int((self._base_spec.get("vqa") or {}).get("decoder_layers") or _layer_count(trained))
            if decoder_layers is not None and decoder_layers != recorded:
                raise ConfigError(
                    f"model.decoder_layers={decoder_layers}, but model.init_from {init_from} holds a trained answer "
                    f"decoder of {recorded} layers: leave model.decoder_layers unset (null)"
                )
            decoder_layers = recorded
        elif decoder_layers is None:
            decoder_layers = max(1, stream_config.num_layers // 2)
        fusion = len(backbone.stream.fusion_layers)
        if decoder_layers > fusion:
            raise ConfigError(
                f"model.decoder_layers={decoder_layers}, but the stream of {init_from} has {fusion} layers with "
                f"cross-attention to initialise the decoder from: set model.decoder_layers to at most {fusion}"
            )
        config = decoder_config(stream_config, decoder_layers)
        self.answer_decoder = AnswerDecoder(dataclasses.replace(config, gradient_checkpointing=gradient_checkpointing))
        if trained:
            self._load_trained_decoder(trained, init_from)
            self.decoder_source = "trained"
        else:
            mlm = {k[len(MLM_HEAD_PREFIX) :]: v for k, v in raw.items() if k.startswith(MLM_HEAD_PREFIX)} or None
            state, missing = decoder_init_state(
                self.answer_decoder, backbone.stream.state_dict(), stream_config.num_layers, mlm
            )
            self.answer_decoder.load_state_dict(state, strict=False)
            self.decoder_source = "stream"
            if missing:
                log.info(
                    "answer decoder: %d tensors start fresh (not in %s with the decoder's shapes): %s",
                    len(missing),
                    init_from,
                    missing[:8],
                )
        del raw, trained

        self.backbone = backbone
        self.answer_decoder_m: AnswerDecoder | None = None
        if distill:  # twins of the LOADED weights (docs/differences.md rows 18, 23)
            backbone.vision_m = make_twin(backbone.vision)
            backbone.stream_m = make_twin(backbone.stream)
            self.answer_decoder_m = make_twin(self.answer_decoder)  # type: ignore[assignment]
        # Kept so the checkpoint is a model vlalign.load reads; frozen, never used here.
        self.itc = pretrained.itc
        self.itm = pretrained.itm
        for head in (self.itc, self.itm):
            if head is not None:
                head.requires_grad_(False)
        del pretrained
        self._nonfinite = NonFiniteGuard(max_consecutive_nonfinite)
        self._update_pending = False
        self._rng_to_restore: dict[str, Any] | None = None
        self._warmup_steps = alpha_warmup_steps or 0
        self._eval_store: dict[str, list[Tensor]] = defaultdict(list)
        self._answer_tokens: dict[str, tuple[Tensor, Tensor]] = {}
        self.last_results: dict[str, dict[str, float]] = {}
        self.results: dict[str, Any] = {}
        self.submissions: dict[str, Path] = {}
        self.train()

    def _load_trained_decoder(self, state: Mapping[str, Tensor], source: str) -> None:
        own = self.answer_decoder.state_dict()
        missing = [k for k in own if k not in state and k != "head.decoder.weight"]
        wrong = [
            f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        if missing or wrong:
            raise InputFileError(
                f"model.init_from {source}: its answer decoder does not fit the model built from its config "
                f"(missing: {missing[:5]}; other shapes: {wrong[:5]}); the checkpoint is damaged: fine-tune again"
            )
        values = {k: v for k, v in state.items() if k in own and k != "head.decoder.weight"}
        self.answer_decoder.load_state_dict(values, strict=False)

    # -- configuration checks (before anything is built) ---------------------------------------------------------
    @classmethod
    def config_errors(cls, config: Mapping[str, Any], subcommand: str) -> list[str]:
        """Mistakes in a parsed ``vlalign finetune|evaluate vqa`` config (``model``, ``data``)."""
        model = config.get("model") or {}
        data = config.get("data") or {}
        errors = range_errors(**{k: model[k] for k in RANGE_KEYS if model.get(k) is not None})
        init_from = model.get("init_from")
        if not init_from:
            errors.append(
                "model.init_from is required: the pretrained model to fine-tune or evaluate (--model PATH for "
                "`vlalign evaluate`, --model.init_from PATH for `vlalign finetune`)"
            )
        elif not Path(str(init_from)).expanduser().exists():
            errors.append(f"model.init_from: {Path(str(init_from)).expanduser()} does not exist")
        if subcommand == "fit" and not model.get("zero_shot") and not data.get("train_files"):
            errors.append(
                'data.train_files is empty: fine-tuning needs a training JSON [{"question", "answer": [..], "image", '
                '"dataset"}] (vqa_train.json)'
            )
        for key in ("val_file", "test_file", "answer_list", "image_root", "vg_image_root", "tokenizer"):
            value = data.get(key)
            if value and not Path(str(value)).expanduser().exists():
                errors.append(f"data.{key}: {Path(str(value)).expanduser()} does not exist")
        for value in (data.get("train_files") or []) if subcommand == "fit" else []:
            if not Path(str(value)).expanduser().exists():
                errors.append(f"data.train_files: {Path(str(value)).expanduser()} does not exist")
        if subcommand in ("fit", "test") and not data.get("test_file"):
            errors.append(
                "data.test_file is not set: testing (also after `vlalign finetune`) needs a question file "
                "(vqa_test.json)"
            )
        if subcommand == "validate" and not data.get("val_file"):
            errors.append("data.val_file is not set: validation needs a question file with answers (vqa_val.json)")
        if (data.get("val_file") or data.get("test_file")) and not data.get("answer_list"):
            errors.append("data.answer_list is not set: evaluation ranks the answers of answer_list.json")
        return errors

    # -- structure --------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> VQATask:
        """The momentum decoder stays in eval mode (teachers run without dropout, docs/differences.md row 11)."""
        super().train(mode)
        if self.__dict__.get("_modules", {}).get("answer_decoder_m") is not None:
            self.answer_decoder_m.eval()
        return self

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = list(self.backbone.momentum_pairs())
        if self.answer_decoder_m is not None:
            pairs.append((self.answer_decoder, self.answer_decoder_m))
        return pairs

    def model_spec(self) -> dict[str, Any]:
        """The fine-tuned model in the format ``vlalign.load`` reads (the encoders and the kept ITC / ITM heads),
        plus ``vqa`` (the decoder depth) and a ``finetuned`` note naming the task and the start."""
        spec = copy.deepcopy(self._base_spec)
        args = spec["init_args"]
        args["vision"] = {**args["vision"], "img_size": int(self.preprocessing.image_size)}
        args["objectives"] = [head.config() for head in (self.itc, self.itm) if head is not None]
        spec["preprocessing"] = self.preprocessing.to_dict()
        spec["finetuned"] = {"task": "vqa", "init_from": str(self.hparams["init_from"])}
        spec["vqa"] = {
            "decoder_layers": self.answer_decoder.num_layers,
            "reference_answer_scoring": self.reference_answer_scoring,
        }
        return spec

    def setup(self, stage: str) -> None:
        """Record the image size the data module settled on (the model's, unless data.image_size is given)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        size = getattr(datamodule, "image_size", None)
        if isinstance(size, int):
            self.preprocessing = dataclasses.replace(self.preprocessing, image_size=size)

    # -- training ---------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        prepare_checkpointing(self.trainer)

    def on_train_start(self) -> None:
        if self.alpha_warmup_steps is None:  # the reference: α ramps over the first epoch
            batches = self.trainer.num_training_batches
            per_epoch = int(batches) // max(1, self.trainer.accumulate_grad_batches) if batches != float("inf") else 0
            self._warmup_steps = per_epoch

    def current_alpha(self) -> float:
        if not self.distill:
            return 0.0
        if self._warmup_steps <= 0:
            return self.alpha
        return self.alpha * min(1.0, self.global_step / self._warmup_steps)

    def question_states(self, images: Tensor, ids: Tensor, mask: Tensor, momentum: bool = False) -> Tensor:
        """The question encoded with the image: multimodal-mode stream states [B, L, H]."""
        image_tokens, _ = self.backbone.encode_images(images, momentum=momentum)
        return self.backbone.fuse(ids, mask, image_tokens, momentum=momentum).last_hidden_state

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        alpha = self.current_alpha()
        images, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        owner = batch["answer_question"]
        answer_ids, answer_mask = batch["answer_ids"], batch["answer_mask"]
        num_questions = ids.shape[0]
        states = self.question_states(images, ids, mask)
        logits = self.answer_decoder(
            answer_ids, answer_mask, states.index_select(0, owner), mask.index_select(0, owner)
        )
        teacher = None
        if alpha > 0 and self.answer_decoder_m is not None:
            with torch.no_grad():
                states_m = self.question_states(images, ids, mask, momentum=True)
                teacher = self.answer_decoder_m(
                    answer_ids, answer_mask, states_m.index_select(0, owner), mask.index_select(0, owner)
                )
        loss = answer_loss(logits, answer_ids, answer_mask, batch["answer_weight"], num_questions, teacher, alpha)
        self.log("train/loss", loss.detach(), prog_bar=losses_on_progress_bar(self), batch_size=num_questions)
        self.log("train/alpha", alpha, batch_size=num_questions)
        if not self._nonfinite.is_finite(loss, self._trainer):
            self._nonfinite.skip({"vqa": loss})
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
        """The EMA update follows real optimizer steps only (as the pretraining recipe)."""
        super().optimizer_step(*args, **kwargs)
        if not self._update_pending:
            return
        self._update_pending = False
        ema_update(self.momentum_pairs(), self.momentum)

    def configure_optimizers(self) -> dict:
        return build_optimizer(self, self.optim, self.trainer.estimated_stepping_batches)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[SPEC_KEY] = self.model_spec()
        checkpoint[RNG_STATE_KEY] = capture_rng_states()
        checkpoint[NONFINITE_STATE_KEY] = self._nonfinite.checkpoint_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get(RNG_STATE_KEY)

    # -- evaluation -------------------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._predict(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._predict(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    def _eval_dataset(self, stage: str) -> Any:
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        return getattr(loader, "dataset", None)

    def _answers_on_device(self, stage: str) -> tuple[Tensor, Tensor]:
        dataset = self._eval_dataset(stage)
        key = f"{stage}:{id(dataset)}"
        cached = self._answer_tokens.get(key)
        if cached is None or cached[0].device != self.device:
            if getattr(dataset, "answer_ids", None) is None:
                raise ConfigError(
                    "the evaluation data carries no tokenised answer list: run VQATask with "
                    "vlalign.datamodules.vqa.VQADataModule and data.answer_list"
                )
            cached = (dataset.answer_ids.to(self.device), dataset.answer_mask.to(self.device))
            self._answer_tokens[key] = cached
        return cached

    @torch.no_grad()
    def predict_answers(
        self, images: Tensor, ids: Tensor, mask: Tensor, answer_ids: Tensor, answer_mask: Tensor
    ) -> RankedAnswers:
        """Rank the answer list for a batch of questions (:func:`vlalign.evaluation.vqa.rank_answers`)."""
        states = self.question_states(images, ids, mask)

        def decode(rows: Tensor, a_ids: Tensor, a_mask: Tensor) -> Tensor:
            return self.answer_decoder(a_ids, a_mask, states.index_select(0, rows), mask.index_select(0, rows))

        return rank_answers(
            decode,
            ids.shape[0],
            answer_ids,
            answer_mask,
            self.k_test,
            reference_scoring=self.reference_answer_scoring,
            chunk_size=self.rank_batch_size,
        )

    def _predict(self, batch: dict[str, Any], stage: str) -> None:
        answer_ids, answer_mask = self._answers_on_device(stage)
        ranked = self.predict_answers(
            batch["image"], batch["input_ids"], batch["attention_mask"], answer_ids, answer_mask
        )
        self._eval_store["index"].append(batch["index"])
        self._eval_store["best"].append(ranked.best)

    @torch.no_grad()
    def _evaluate(self, stage: str) -> None:
        if not self._eval_store:
            return
        index = all_gather_variable(torch.cat(self._eval_store["index"])).cpu()
        best = all_gather_variable(torch.cat(self._eval_store["best"])).cpu()
        self._eval_store.clear()
        dataset = self._eval_dataset(stage)
        predicted = place_predictions(index, best, len(dataset))
        positions = predicted.ge(0).nonzero().squeeze(1).tolist()
        answer_list = dataset.answer_list
        answers = {i: answer_list[int(predicted[i])] for i in positions}
        results: dict[str, float] = {}
        details: dict[str, Any] = {
            "split": stage,
            "file": str(dataset.json_file),
            "num_questions": len(positions),
            "answer_list_size": len(answer_list),
            "k_test": min(self.k_test, len(answer_list)),
            "scoring": "reference (first token counted twice)" if self.reference_answer_scoring else "sequence",
        }
        if dataset.answers is not None:
            human = [dataset.answers[i] for i in positions]
            scores = [
                question_accuracy(normalize_answer(answers[i]), dataset.answers[i], normalized=True) for i in positions
            ]
            results["acc"] = 100.0 * sum(scores) / len(scores)
            by_type: dict[str, list[float]] = defaultdict(list)
            for i, score in zip(positions, scores, strict=True):
                if dataset.answer_types[i] is not None:
                    by_type[dataset.answer_types[i]].append(score)
            for kind, values in sorted(by_type.items()):
                results[f"acc_{_metric_word(kind)}"] = 100.0 * sum(values) / len(values)
            majority = majority_answer(human)
            results["majority_acc"] = constant_answer_accuracy(majority, human)
            details["majority_answer"] = majority
            details["questions_per_type"] = {kind: len(values) for kind, values in sorted(by_type.items())}
        self.last_results[stage] = results
        for key, value in results.items():
            self.log(f"{stage}/{key}", value, rank_zero_only=True, sync_dist=False)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            rows = [{"question_id": dataset.question_ids[i], "answer": answers[i]} for i in positions]
            folder = output_folder(self.trainer, self.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / SUBMISSION_FILE.format(split=stage)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(rows))
            os.replace(tmp, path)
            self.submissions[stage] = path
            details["submission"] = str(path)
        self.results = details


# -- helpers -----------------------------------------------------------------------------------------------------------
RANGE_KEYS = ("decoder_layers", "momentum", "alpha", "alpha_warmup_steps", "k_test", "rank_batch_size", "image_size")


def range_errors(
    decoder_layers: int | None = None,
    momentum: float = 0.995,
    alpha: float = 0.4,
    alpha_warmup_steps: int | None = None,
    k_test: int = 128,
    rank_batch_size: int = 2048,
    image_size: int | None = None,
) -> list[str]:
    """Out-of-range ``model.*`` settings of :class:`VQATask`, each naming its key."""
    errors = []
    if decoder_layers is not None and decoder_layers < 1:
        errors.append(f"model.decoder_layers must be >= 1 (or null: half the stream's layers), got {decoder_layers}")
    if not 0.0 <= momentum < 1.0:
        errors.append(f"model.momentum must be in [0, 1), got {momentum}")
    if not 0.0 <= alpha <= 1.0:
        errors.append(f"model.alpha must be in [0, 1], got {alpha}")
    if alpha_warmup_steps is not None and alpha_warmup_steps < 0:
        errors.append(f"model.alpha_warmup_steps must be >= 0 (or null: one epoch), got {alpha_warmup_steps}")
    if k_test < 1:
        errors.append(f"model.k_test must be >= 1, got {k_test}")
    if rank_batch_size < 1:
        errors.append(f"model.rank_batch_size must be >= 1, got {rank_batch_size}")
    if image_size is not None and image_size < 1:
        errors.append(f"model.image_size (linked from data.image_size) must be >= 1, got {image_size}")
    return errors


def _metric_word(kind: str) -> str:
    """``yes/no`` -> ``yes_no``: an answer type as a metric-name word."""
    return "".join(c if c.isalnum() else "_" for c in kind.strip().lower()) or "unknown"


def _layer_count(state: Mapping[str, Tensor]) -> int:
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")}
    return max(layers) + 1 if layers else 0


def _extra_tensors(path: str) -> dict[str, Tensor]:
    """The tensors of ``path`` that :func:`vlalign.load` does not keep but VQA uses: a trained answer decoder
    (``answer_decoder.*``) and the MLM head (``xmm.mlm_head.*``), from a ``.ckpt``, an exported folder or a converted
    ``.safetensors`` file."""
    from vlalign.weights.reading import read_safetensors

    source = Path(path).expanduser()
    if source.is_file() and source.name == WEIGHTS_FILE and (source.parent / CONFIG_FILE).is_file():
        source = source.parent
    if source.is_dir():
        state = read_weights(source / WEIGHTS_FILE)
    elif source.suffix == ".safetensors":
        state = with_prefix(read_safetensors(source))
    else:
        state = read_checkpoint(source)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith((DECODER_PREFIX, MLM_HEAD_PREFIX))}


# -- make demo-finetune ------------------------------------------------------------------------------------------------
VQA_TINY_CONFIG = CONFIG_DIR / "vqa_tiny.yaml"


def demo_finetune_args(data: Path, checkpoint: Path, steps: int) -> list[str]:
    """``vlalign finetune vqa`` arguments that fine-tune ``checkpoint`` (``make demo``'s ``last.ckpt``) for exactly
    ``steps`` optimizer steps on the synthetic VQA files under ``data`` (``vlalign data synth``'s folder) and test
    ``last.ckpt`` on ``vqa_test.json``. Add the run folder options (``--trainer.default_root_dir``, the logger's
    ``save_dir``) and ``--seed_everything``; pass them to :func:`vlalign.cli.tasks.finetune` (after ``"vqa"``)."""
    return [
        "--config", str(VQA_TINY_CONFIG),
        "--model.init_from", str(checkpoint),
        "--data.train_files", f"[{data / 'vqa_train.json'}]",
        "--data.val_file", str(data / "vqa_val.json"),
        "--data.test_file", str(data / "vqa_test.json"),
        "--data.answer_list", str(data / "answer_list.json"),
        "--trainer.max_steps", str(steps),  # the schedule spans exactly these steps
        "--trainer.max_epochs", "-1",
        "--trainer.limit_val_batches", "0",  # the test of last.ckpt is the result
    ]  # fmt: skip


def chance_levels(train_file: str | Path, eval_file: str | Path) -> dict[str, Any]:
    """Baselines to print next to a VQA accuracy: always the most frequent training answer (``majority``, the chance
    level) and, per ``question_type``, its most frequent training answer (``prior``: the question without the
    image). Scored on ``eval_file`` with the official accuracy; keys as the task's metrics (``acc``,
    ``acc_<answer_type>``), plus ``majority_answer`` and ``prior_answers``.

    Both files in the VQA layout with answers (``vlalign data synth`` writes ``question_type`` and ``answer_type``;
    without them the prior is the majority answer)."""
    from vlalign.data.annotations import load_annotations

    train = [e for e in load_annotations(train_file) if isinstance(e, dict) and isinstance(e.get("answer"), list)]
    rows = [e for e in load_annotations(eval_file) if isinstance(e, dict) and isinstance(e.get("answer"), list)]
    if not train or not rows:
        raise InputFileError(f"{train_file} and {eval_file} need questions with human answers ('answer': [..])")
    majority = majority_answer([e["answer"] for e in train])
    priors = prior_answers([e["answer"] for e in train], [str(e.get("question_type", "")) for e in train])
    guesses = {
        "majority": [majority] * len(rows),
        "prior": [priors.get(str(e.get("question_type", "")), majority) for e in rows],
    }
    out: dict[str, Any] = {"majority_answer": majority, "prior_answers": priors}
    for name, predicted in guesses.items():
        scores = [question_accuracy(p, e["answer"]) for p, e in zip(predicted, rows, strict=True)]
        levels = {"acc": 100.0 * sum(scores) / len(scores)}
        by_type: dict[str, list[float]] = defaultdict(list)
        for entry, score in zip(rows, scores, strict=True):
            if isinstance(entry.get("answer_type"), str):
                by_type[entry["answer_type"]].append(score)
        levels.update({f"acc_{_metric_word(k)}": 100.0 * sum(v) / len(v) for k, v in sorted(by_type.items())})
        out[name] = levels
    return out


VQA_TASK = register_task(
    TaskSpec(
        name="vqa",
        module="vlalign.tasks.vqa.VQATask",
        datamodule="vlalign.datamodules.vqa.VQADataModule",
        config="vqa.yaml",
        description=(
            "visual question answering (VQA v2 layout): answer decoder, answer-list ranking, official VQA accuracy"
        ),
        trains=True,
    )
)
