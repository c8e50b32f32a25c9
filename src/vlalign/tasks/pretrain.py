"""The pretraining LightningModule: a :class:`~vlalign.models.backbone.Backbone` and one typed slot per objective.

The recipe runs the objectives in the order their ``requires`` give, sums their weighted losses, keeps the EMA twins
and queues in step with real optimizer updates, and reports zero-shot retrieval at validation. Everything it needs
from an objective is a declared method of :class:`~vlalign.objectives.base.Objective`.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn

from vlalign.data.preprocessing import Preprocessing, preprocessing_of
from vlalign.data.tokenization import VocabInfo
from vlalign.errors import ConfigError, InputFileError
from vlalign.evaluation.metrics import retrieval_recalls
from vlalign.models.backbone import Backbone
from vlalign.models.compile import CompileChoice, apply_compile, parse_compile_encoders
from vlalign.models.heads import load_hf_mlm_head
from vlalign.models.stream import StreamConfig
from vlalign.models.vision import VisionConfig
from vlalign.objectives.base import (
    OBJECTIVES,
    BuildSpec,
    Objective,
    builtin_objectives,
    ema_update,
    execution_order,
    from_config,
)
from vlalign.objectives.context import StepContext
from vlalign.objectives.itc import ITC
from vlalign.objectives.itm import ITM
from vlalign.objectives.psl import PSL
from vlalign.objectives.xmm import XMM
from vlalign.tasks.optim import OptimConfig, build_optimizer
from vlalign.training.fault_tolerance import (
    NONFINITE_STATE_KEY,
    RNG_STATE_KEY,
    NonFiniteGuard,
    capture_rng_states,
    prepare_checkpointing,
    restore_rng_states,
)
from vlalign.training.objective_cost import ObjectiveCostMeter
from vlalign.training.progress import losses_on_progress_bar
from vlalign.utils.distributed import all_gather_variable
from vlalign.weights.reading import torch_load_weights_only
from vlalign.weights.safe_loading import (
    DEFAULT_INIT_MIN_MATCH,
    allow_config_classes_in_checkpoints,
    load_init_weights,
)

log = logging.getLogger(__name__)
allow_config_classes_in_checkpoints()

#: The recipe's typed objective slots: the built-in registered objectives, in registry order (a test checks that
#: ``__init__`` has exactly these slots).
OBJECTIVE_SLOTS: tuple[str, ...] = builtin_objectives()
#: Key under which a checkpoint records how to rebuild its model (see :meth:`PretrainRecipe.model_spec`).
SPEC_KEY = "vlalign_model"
SPEC_FORMAT = 1


class PretrainRecipe(L.LightningModule):
    """Vision-language pretraining with pluggable objectives (SIMLA, ALBEF, CLIP-style recipes).

    Each built-in objective has its own optional slot; ``null`` disables it and removes every forward pass only it
    needed. Objectives from outside vlalign go into ``extra_objectives`` (a list: an overlay file replaces it whole).
    The method and every key: docs/method.md.

    Args:
        vision: the timm ViT and its optional local weights.
        stream: the BERT-compatible text / fusion transformer; ``fusion_layer`` selects the ALBEF split.
        text_weights: local Hugging Face BERT directory to initialise the stream from.
        vocab: tokenizer sizes and special ids (linked from the data module; overrides ``stream.vocab_size``).
        itc: image-text contrastive objective.
        itm: image-text matching objective (needs ``itc`` for hard negatives).
        xmm: cross-modal masked reconstruction, text side and image side.
        psl: pseudo-keyword prediction (needs ``itc``).
        extra_objectives: further registered objectives (third-party plug-ins), run in ``requires`` order.
        momentum: EMA coefficient of the momentum twin.
        alpha: distillation weight shared by every distillation term.
        alpha_warmup_steps: ``alpha`` ramps linearly from 0 over this many optimizer steps (reference: one epoch).
        optim: optimiser and learning-rate schedule.
        init_from: a vlalign checkpoint, exported model folder or converted reference checkpoint to start from;
            not a resume (that is ``--ckpt_path``).
        init_min_match: ``init_from`` fails unless at least this fraction (0-1) of the model's online
            (non-momentum) tensors, in the parts the file provides (``backbone.vision``, ``backbone.stream``,
            ``itc`` ...), is in the file with the model's shapes; 0 accepts any file. See
            :func:`~vlalign.weights.safe_loading.load_init_weights`.
        compile_encoders: ``torch.compile`` the encoders (the ViT and the stream, and their momentum twins) in
            ``configure_model``: ``true`` / ``blocks`` compiles each repeated transformer block (regional
            compilation: a short first step), ``whole`` each whole encoder; ``scope:mode`` picks an inductor mode,
            e.g. ``blocks:max-autotune-no-cudagraphs``. Parameter names and checkpoints are unchanged
            (docs/benchmarks.md).
        max_consecutive_nonfinite: steps with a NaN / infinite total loss are skipped (no update, counted in
            ``train/nonfinite_steps``); this many in a row stop the run with ``nonfinite-stop.ckpt``. Checkpoints
            saved during such a streak, or holding non-finite weights, are not written: ``last.ckpt`` keeps the
            last good state (:class:`~vlalign.training.fault_tolerance.GoodCheckpoints`).
    """

    #: Skip non-finite steps on the device on the CPU too (tests of the device gate; see ``_use_device_gate``).
    device_gate_on_cpu: ClassVar[bool] = False

    def __init__(
        self,
        vision: VisionConfig = VisionConfig(),
        stream: StreamConfig = StreamConfig(),
        text_weights: str | None = None,
        vocab: VocabInfo | None = None,
        itc: ITC | None = None,
        itm: ITM | None = None,
        xmm: XMM | None = None,
        psl: PSL | None = None,
        extra_objectives: list[Objective] | None = None,
        momentum: float = 0.995,
        alpha: float = 0.4,
        alpha_warmup_steps: int = 0,
        optim: OptimConfig = OptimConfig(),
        init_from: str | None = None,
        init_min_match: float = DEFAULT_INIT_MIN_MATCH,
        compile_encoders: bool | CompileChoice = False,
        max_consecutive_nonfinite: int = 10,
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"model.momentum must be in [0, 1), got {momentum}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"model.alpha must be in [0, 1], got {alpha}")
        if not 0.0 <= init_min_match <= 1.0:
            raise ConfigError(
                f"model.init_min_match must be in [0, 1] (the fraction of the model's tensors model.init_from must "
                f"provide; 0 accepts any file), got {init_min_match}"
            )
        if vocab is not None:  # one vocabulary size: the tokenizer's
            stream = dataclasses.replace(stream, vocab_size=vocab.vocab_size, pad_token_id=vocab.pad_token_id)
        self.vocab = vocab or VocabInfo(vocab_size=stream.vocab_size, pad_token_id=stream.pad_token_id)
        self.save_hyperparameters(ignore=[*OBJECTIVE_SLOTS, "extra_objectives"])
        self.hparams["stream"] = stream
        self.hparams["vocab"] = self.vocab
        self.momentum = momentum
        self.alpha = alpha
        self.alpha_warmup_steps = alpha_warmup_steps
        self.optim = optim
        self.compile_encoders = compile_encoders
        parse_compile_encoders(compile_encoders)  # a wrong value fails here, naming model.compile_encoders

        given = [o for o in (itc, itm, xmm, psl) if o is not None]
        for slot, objective in zip(OBJECTIVE_SLOTS, (itc, itm, xmm, psl), strict=True):
            if objective is not None and objective.name != slot:
                raise ValueError(f"model.{slot} holds a {type(objective).__name__} (objective {objective.name!r})")
        for objective in extra_objectives or []:
            if OBJECTIVES.get(objective.name) is not type(objective):
                raise ValueError(
                    f"model.extra_objectives: {type(objective).__qualname__} is not registered under its name "
                    f"{objective.name!r}: decorate it with @register_objective"
                )
            if objective.name in OBJECTIVE_SLOTS or hasattr(self, objective.name):
                raise ValueError(f"model.extra_objectives: the name {objective.name!r} is taken; rename the objective")
        given += list(extra_objectives or [])
        if not given:
            raise ValueError(
                f"no objective enabled: set at least one of {', '.join('model.' + s for s in OBJECTIVE_SLOTS)}"
            )
        ordered = execution_order(given)  # checks requires; raises naming the config keys
        self._order = [o.name for o in ordered]
        for slot in OBJECTIVE_SLOTS:
            setattr(self, slot, None)
        for objective in ordered:
            setattr(self, objective.name, objective)

        # Momentum twins exist only for the encoders an enabled objective reads.
        needed = frozenset().union(*(o.momentum_encoders() for o in ordered))
        self.backbone = Backbone(vision, stream, needed, text_weights)
        for objective in ordered:
            objective.build(self.build_spec(momentum=bool(objective.momentum_encoders())))
        if text_weights and xmm is not None and xmm.text:
            log.info("MLM head from %s: %s", text_weights, load_hf_mlm_head(xmm.mlm_head, text_weights))
            xmm.reset_twins()
        if init_from:
            load_init_weights(self, init_from, min_match=init_min_match)
        self._nonfinite = NonFiniteGuard(max_consecutive_nonfinite)
        self._update_pending = False  # a finite micro-batch since the last optimizer step: EMA / queues follow it
        # Device-side skip decision (see _use_device_gate): the optimizer it gates, and this step's "applied" flag.
        self._device_gate: bool | None = None
        self._gated_optimizer: torch.optim.Optimizer | None = None
        self._step_applied: Tensor | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._eval_store: dict[str, list[Tensor]] = defaultdict(list)
        self.preprocessing: Preprocessing | None = None  # from the data module at setup, or from a checkpoint
        #: Per-objective cost accounting (set by ``ObjectiveCostMonitor``); used only on the steps it measures.
        self.cost_meter: ObjectiveCostMeter | None = None

    # -- structure -------------------------------------------------------------------------------------------------
    def build_spec(self, momentum: bool) -> BuildSpec:
        """What an objective's :meth:`~vlalign.objectives.base.Objective.build` sees of the encoders."""
        itc = getattr(self, "itc", None)
        backbone = self.backbone
        return BuildSpec(
            vision_width=backbone.vision_width,
            text_width=backbone.text_width,
            vocab=self.vocab,
            patch_grid=backbone.vision.grid_size,
            patch_size=backbone.vision.patch_size,
            momentum=momentum,
            stream=backbone.stream,
            stream_m=backbone.stream_m,
            embed_dim=itc.embed_dim if itc is not None else None,
            twin_map=backbone.twin_map() if momentum else {},
        )

    @property
    def objectives(self) -> list[Objective]:
        """Enabled objectives in execution order (each after the ones it requires)."""
        return [getattr(self, name) for name in self._order]

    @property
    def needs_masked_images(self) -> bool:
        return any(o.needs_masked_images for o in self.objectives)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = list(self.backbone.momentum_pairs())
        for objective in self.objectives:
            pairs.extend(objective.momentum_pairs())
        return pairs

    def no_weight_decay(self) -> set[str]:
        """Full names of the parameters the objectives exempt from weight decay (the optimiser groups read it)."""
        return {f"{o.name}.{name}" for o in self.objectives for name in o.no_weight_decay()}

    # -- self-describing checkpoints ---------------------------------------------------------------------------------
    def model_spec(self) -> dict[str, Any]:
        """Everything needed to rebuild this module without its config file: the recipe's settings (one vocabulary
        size, the resolved stream config) and each objective as ``{class_path, init_args}``."""
        accepted = inspect.signature(type(self).__init__).parameters  # LightningCLI adds private entries
        settings = {
            key: (dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
            for key, value in self.hparams.items()
            if key in accepted
        }
        settings["objectives"] = [o.config() for o in self.objectives]
        return {
            "format": SPEC_FORMAT,
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "init_args": settings,
            "preprocessing": self.preprocessing.to_dict() if self.preprocessing is not None else None,
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], **overrides: Any) -> PretrainRecipe:
        """Build a recipe from :meth:`model_spec` output (weights are not loaded; ``init_from`` is dropped)."""
        if spec.get("format") != SPEC_FORMAT:
            raise ValueError(f"unknown vlalign model spec format {spec.get('format')!r} (this version reads 1)")
        args = dict(spec["init_args"])
        objectives = [from_config(o) for o in args.pop("objectives")]
        slots = {o.name: o for o in objectives if o.name in OBJECTIVE_SLOTS}
        extras = [o for o in objectives if o.name not in OBJECTIVE_SLOTS]
        args["vision"] = VisionConfig(**{**args["vision"], "weights": None})
        args["stream"] = StreamConfig(**args["stream"])
        args["vocab"] = VocabInfo(**args["vocab"]) if args.get("vocab") else None
        args["optim"] = OptimConfig(**args["optim"])
        args.update(text_weights=None, init_from=None)
        args.update(overrides)
        model = cls(**args, **slots, extra_objectives=extras or None)
        if spec.get("preprocessing"):
            model.preprocessing = Preprocessing.from_dict(spec["preprocessing"])
        return model

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, map_location: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """Rebuild the recipe (objectives included) from the spec the checkpoint records, then load its weights.

        Only ``weights_only=True`` loading is used; keyword arguments override recorded settings.
        """
        checkpoint = torch_load_weights_only(checkpoint_path, map_location=map_location or "cpu")
        if not isinstance(checkpoint, dict) or SPEC_KEY not in checkpoint:
            raise InputFileError(
                f"{checkpoint_path}: no {SPEC_KEY!r} entry; it was not written by this vlalign version (a Lightning "
                "checkpoint of PretrainRecipe is expected; for weights files use model.init_from)"
            )
        model = cls.from_spec(checkpoint[SPEC_KEY], **kwargs)
        model.load_state_dict(checkpoint["state_dict"])
        model.on_load_checkpoint(checkpoint)
        return model

    def setup(self, stage: str) -> None:
        """Record the data module's evaluation preprocessing (tokenizer files, image size) for the checkpoints."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.preprocessing is None and datamodule is not None:
            self.preprocessing = preprocessing_of(datamodule)

    # -- training --------------------------------------------------------------------------------------------------
    def current_alpha(self) -> float:
        if self.alpha_warmup_steps <= 0:
            return self.alpha
        return self.alpha * min(1.0, self.global_step / self.alpha_warmup_steps)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        meter = self.cost_meter if self.cost_meter is not None and self.cost_meter.active else None
        ctx = StepContext(
            self.backbone, batch, alpha=self.current_alpha(), masked_images=self.needs_masked_images, shared_meter=meter
        )
        total: Tensor | None = None
        batch_size = batch["input_ids"].shape[0]
        losses: dict[str, Tensor] = {}
        for objective in self.objectives:
            objective.begin_step()
        bar = losses_on_progress_bar(self)
        for objective in self.objectives:
            out = objective(ctx) if meter is None else meter.objective(objective, ctx)
            losses[objective.name] = out.loss
            ctx.published[objective.name] = out.publish
            weighted = objective.weight * out.loss
            total = weighted if total is None else total + weighted
            self.log(f"train/{objective.name}_loss", out.loss.detach(), prog_bar=bar, batch_size=batch_size)
            for key, value in out.logs.items():
                self.log(f"train/{objective.name}_{key}", value, batch_size=batch_size)
        if meter is not None:
            meter.forward_done(total)  # places the backward timing hooks
        self.log("train/loss", total.detach(), batch_size=batch_size)
        self.log("train/alpha", ctx.alpha, batch_size=batch_size)
        if self._use_device_gate():  # no host read: the update, EMA and queue writes are gated on the device
            applied = self._nonfinite.record_on_device(total, losses, self._trainer)
            self._gated_optimizer.found_inf = (~applied).float()  # type: ignore[union-attr]
            self._step_applied = applied
            self.log("train/nonfinite_steps", self._nonfinite.logged_total(), batch_size=batch_size)
            return total
        finite = self._nonfinite.is_finite(total, self._trainer)
        if not finite:
            self._nonfinite.skip(losses)
            for objective in self.objectives:
                objective.rollback_step()
        else:
            self._nonfinite.finite_step()
            self._update_pending = True
        self.log("train/nonfinite_steps", float(self._nonfinite.total), batch_size=batch_size)
        return total if finite else None  # None: Lightning skips backward, the optimizer sees no gradient

    def _use_device_gate(self) -> bool:
        """Whether this fit skips non-finite steps on the device (decided at its first step).

        Yes when the step can be skipped exactly without the host: one optimizer that honours ``found_inf`` as the
        AMP grad scaler uses it (fused AdamW, vlalign's default on CUDA: ``model.optim.fused``), no gradient
        accumulation (a non-finite micro-batch must not spoil the others' gradients), no fp16 grad scaler (it owns
        ``found_inf``), automatic optimisation, and parameters off the CPU (there a host read costs nothing, and the
        gated EMA's three foreach ops cost more than one; ``device_gate_on_cpu`` turns the gate on for tests). The
        optimizer then skips the update when the flag is set, EMA and queue writes are gated with it (``ema_update(gate=...)``, ``after_optimizer_step_gated``, or the
        objective's buffers restored), and the counters stay on the device. Otherwise (and outside a Trainer) the
        flag is read on the host once per step and a skipped step returns None.
        """
        if self._device_gate is None:
            trainer = self._trainer
            optimizers = trainer.optimizers if trainer is not None else []
            self._device_gate = bool(
                trainer is not None
                and self.automatic_optimization
                and len(optimizers) == 1
                and getattr(optimizers[0], "_step_supports_amp_scaling", False)
                and trainer.accumulate_grad_batches == 1
                and getattr(trainer.precision_plugin, "scaler", None) is None
                and (self.device.type != "cpu" or self.device_gate_on_cpu)
            )
            self._gated_optimizer = optimizers[0] if self._device_gate else None
        return self._device_gate

    def _release_device_gate(self) -> None:
        if self._gated_optimizer is not None and hasattr(self._gated_optimizer, "found_inf"):
            del self._gated_optimizer.found_inf
        self._device_gate, self._gated_optimizer, self._step_applied = None, None, None

    def on_fit_start(self) -> None:
        """Only good checkpoints are written from here on, and stale temp files of killed saves are removed."""
        self._release_device_gate()
        prepare_checkpointing(self.trainer)

    def on_train_end(self) -> None:
        self._release_device_gate()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # here, not at load: nothing between load and step may draw from it
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._nonfinite.exceeded:
            self._nonfinite.stop(self.trainer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[SPEC_KEY] = self.model_spec()
        checkpoint[RNG_STATE_KEY] = capture_rng_states()
        checkpoint["vlalign_nonfinite_steps"] = self._nonfinite.total
        checkpoint[NONFINITE_STATE_KEY] = self._nonfinite.checkpoint_state()  # GoodCheckpoints reads it

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get(RNG_STATE_KEY)
        self._nonfinite.total = checkpoint.get("vlalign_nonfinite_steps", 0)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """EMA and queue updates run only after real optimizer steps (correct under gradient accumulation)."""
        super().optimizer_step(*args, **kwargs)
        applied, self._step_applied = self._step_applied, None
        if applied is not None:  # device gate: the update happened where `applied` holds; EMA and queues follow it
            self.after_real_optimizer_step(applied)
            return
        if not self._update_pending:  # every micro-batch of this step had a non-finite loss: nothing changed
            return
        self._update_pending = False
        self.after_real_optimizer_step()

    def after_real_optimizer_step(self, applied: Tensor | None = None) -> None:
        """EMA twins and objective hooks (queue writes); also for loops that step the optimizer themselves.

        ``applied`` (a 0-dim bool tensor, device-side non-finite guard): every change is made only where it is
        true, without reading it on the host. An objective gates its own hook with
        ``after_optimizer_step_gated(applied)`` when it has one (ITC: its queue writes); otherwise its buffers are
        put back where the step was not applied.
        """
        ema_update(self.momentum_pairs(), self.momentum, gate=applied)
        for objective in self.objectives:
            if applied is None:
                objective.after_optimizer_step()
            else:
                gated_after_optimizer_step(objective, applied)

    def configure_model(self) -> None:
        """Compile the encoders in place (``nn.Module.compile``) as ``compile_encoders`` says: each repeated block,
        or each whole encoder, momentum twins included; idempotent (vlalign.models.compile)."""
        backbone = self.backbone
        modules = [backbone.vision, backbone.stream, backbone.vision_m, backbone.stream_m]
        apply_compile(modules, parse_compile_encoders(self.compile_encoders))

    def configure_optimizers(self) -> dict:
        return build_optimizer(self, self.optim, self.trainer.estimated_stepping_batches)

    # -- zero-shot retrieval with ITC similarities -----------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._retrieval_features(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._retrieval_features(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_retrieval("val")

    def on_test_epoch_end(self) -> None:
        self._log_retrieval("test")

    def _retrieval_features(self, batch: dict[str, Any]) -> None:
        if self.itc is None:
            return
        self._eval_store["image_feat"].append(self.itc.image_features(self.backbone.vision(batch["image"])))
        self._eval_store["image_index"].append(batch["image_index"])
        text_states = self.backbone.encode_text(batch["input_ids"], batch["attention_mask"])
        self._eval_store["text_feat"].append(self.itc.text_features(text_states, batch["attention_mask"]))
        self._eval_store["text_index"].append(batch["text_index"])
        self._eval_store["text_image_index"].append(batch["text_image_index"])

    def _log_retrieval(self, stage: str) -> None:
        store = {k: torch.cat(v) for k, v in self._eval_store.items()}
        self._eval_store.clear()
        if not store:
            if self.itc is None:
                log.warning("%s retrieval needs model.itc; skipped", stage)
            return
        store = {k: all_gather_variable(v) for k, v in store.items()}
        # Distributed samplers may pad with repeated samples: place features by their global index.
        num_images = int(store["image_index"].max()) + 1
        num_texts = int(store["text_index"].max()) + 1
        image_feat = store["image_feat"].new_zeros(num_images, store["image_feat"].shape[-1])
        image_feat[store["image_index"]] = store["image_feat"]
        text_feat = store["text_feat"].new_zeros(num_texts, store["text_feat"].shape[-1])
        text_feat[store["text_index"]] = store["text_feat"]
        text_image_index = torch.zeros(num_texts, dtype=torch.long, device=text_feat.device)
        text_image_index[store["text_index"]] = store["text_image_index"]
        recalls = retrieval_recalls(image_feat @ text_feat.t(), text_image_index)
        self.last_retrieval = {stage: recalls}
        for key, value in recalls.items():
            self.log(f"{stage}/{key}", value, rank_zero_only=True, sync_dist=False)


@torch.no_grad()
def gated_after_optimizer_step(objective: Objective, applied: Tensor) -> None:
    """``objective.after_optimizer_step()`` with its effect kept only where ``applied`` holds (no host read)."""
    gated = getattr(objective, "after_optimizer_step_gated", None)
    if gated is not None:
        gated(applied)
        return
    if type(objective).after_optimizer_step is Objective.after_optimizer_step:
        return  # the default hook does nothing
    saved = [(buffer, buffer.clone()) for buffer in objective.buffers()]
    objective.after_optimizer_step()
    for buffer, before in saved:
        buffer.copy_(torch.where(applied, buffer, before))
