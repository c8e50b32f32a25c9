"""The pretraining LightningModule: encoders, a momentum twin when needed, and one typed slot per objective."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections import defaultdict
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from vlalign.callbacks import RNG_STATE_KEY, NonFiniteGuard, capture_rng_states, restore_rng_states
from vlalign.checkpoints import allow_config_classes_in_checkpoints, load_init_weights
from vlalign.distributed import all_gather_variable
from vlalign.metrics import retrieval_recalls
from vlalign.models.heads import load_hf_mlm_head
from vlalign.models.stream import SingleStreamTransformer, StreamConfig, load_hf_bert
from vlalign.models.vision import VisionConfig, VisionEncoder
from vlalign.objectives.base import BuildSpec, Objective, ema_update
from vlalign.objectives.itc import ITC
from vlalign.objectives.itm import ITM
from vlalign.objectives.psl import PSL
from vlalign.objectives.xmm import XMM
from vlalign.tasks.context import StepContext
from vlalign.tasks.optim import OptimConfig, build_optimizer
from vlalign.tokenization import VocabInfo

log = logging.getLogger(__name__)
allow_config_classes_in_checkpoints()

OBJECTIVE_SLOTS = ("itc", "itm", "xmm", "psl")  # execution order: ITC publishes what ITM and PSL read


class PretrainRecipe(L.LightningModule):
    """Vision-language pretraining with pluggable objectives (SIMLA, ALBEF, CLIP-style recipes).

    Each objective has its own optional slot; ``null`` disables it and removes every forward pass only it needed.

    Args:
        vision: the timm ViT and its optional local weights.
        stream: the BERT-compatible text / fusion transformer; ``fusion_layer`` selects the ALBEF split.
        text_weights: local Hugging Face BERT directory to initialise the stream from.
        vocab: tokenizer sizes and special ids (linked from the data module; overrides ``stream.vocab_size``).
        itc: image-text contrastive objective.
        itm: image-text matching objective (needs ``itc`` for hard negatives).
        xmm: cross-modal masked reconstruction, text side and image side.
        psl: pseudo-keyword prediction (needs ``itc``).
        momentum: EMA coefficient of the momentum twin.
        alpha: distillation weight shared by every distillation term.
        alpha_warmup_steps: ``alpha`` ramps linearly from 0 over this many optimizer steps (reference: one epoch).
        optim: optimiser and learning-rate schedule.
        init_from: a vlalign checkpoint (or converted reference checkpoint) to start from; not a resume.
        compile_encoders: ``torch.compile`` the forwards of the ViT and the stream (and their momentum twins) in
            ``configure_model``; parameter names and checkpoints are unchanged.
        max_consecutive_nonfinite: steps with a NaN / infinite total loss are skipped (no update, counted in
            ``train/nonfinite_steps``); this many in a row stop the run with ``nonfinite-stop.ckpt``.
    """

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
        momentum: float = 0.995,
        alpha: float = 0.4,
        alpha_warmup_steps: int = 0,
        optim: OptimConfig = OptimConfig(),
        init_from: str | None = None,
        compile_encoders: bool = False,
        max_consecutive_nonfinite: int = 10,
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"model.momentum must be in [0, 1), got {momentum}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"model.alpha must be in [0, 1], got {alpha}")
        self.save_hyperparameters(ignore=list(OBJECTIVE_SLOTS))
        if vocab is not None:
            stream = dataclasses.replace(stream, vocab_size=vocab.vocab_size, pad_token_id=vocab.pad_token_id)
        self.vocab = vocab or VocabInfo(vocab_size=stream.vocab_size, pad_token_id=stream.pad_token_id)
        self.momentum = momentum
        self.alpha = alpha
        self.alpha_warmup_steps = alpha_warmup_steps
        self.optim = optim
        self.compile_encoders = compile_encoders

        self.vision = VisionEncoder(vision)
        self.stream = SingleStreamTransformer(stream)
        if text_weights:
            log.info("stream weights from %s: %s", text_weights, load_hf_bert(self.stream, text_weights))

        self.itc, self.itm, self.xmm, self.psl = itc, itm, xmm, psl
        self._check_requirements()
        # Momentum twins exist only for the encoders an enabled objective reads; created before the objectives'
        # heads so that a head tied to the word embeddings can tie its own twin to the momentum stream.
        needed = frozenset().union(*(o.momentum_encoders() for o in self.objectives))
        self.vision_m = self._twin(self.vision) if "vision" in needed else None
        self.stream_m = self._twin(self.stream) if "stream" in needed else None
        spec = BuildSpec(
            vision_width=self.vision.width,
            text_width=stream.hidden_size,
            vocab=self.vocab,
            patch_grid=self.vision.grid_size,
            patch_size=self.vision.patch_size,
            momentum=False,
            stream=self.stream,
            stream_m=self.stream_m,
            embed_dim=itc.embed_dim if itc is not None else None,
        )
        for objective in self.objectives:
            objective.build(dataclasses.replace(spec, momentum=bool(objective.momentum_encoders())))
        if text_weights and xmm is not None and xmm.text:
            log.info("MLM head from %s: %s", text_weights, load_hf_mlm_head(xmm.mlm_head, text_weights))
            if hasattr(xmm, "mlm_head_m"):
                xmm.mlm_head_m.load_state_dict(xmm.mlm_head.state_dict())
        if init_from:
            load_init_weights(self, init_from)
        self._skipped: dict[str, int] = defaultdict(int)
        self._nonfinite = NonFiniteGuard(max_consecutive_nonfinite)
        self._update_pending = False  # a finite micro-batch since the last optimizer step: EMA / queues follow it
        self._rng_to_restore: dict[str, Any] | None = None
        self._eval_store: dict[str, list[Tensor]] = defaultdict(list)

    # -- structure -------------------------------------------------------------------------------------------------
    @property
    def objectives(self) -> list[Objective]:
        """Enabled objectives in execution order (ITC first: others read what it publishes)."""
        return [o for o in (getattr(self, slot) for slot in OBJECTIVE_SLOTS) if o is not None]

    @property
    def needs_masked_images(self) -> bool:
        return any(getattr(o, "needs_masked_images", False) for o in self.objectives)

    def _check_requirements(self) -> None:
        if not self.objectives:
            raise ValueError(
                f"no objective enabled: set at least one of {', '.join('model.' + s for s in OBJECTIVE_SLOTS)}"
            )
        enabled = {o.name for o in self.objectives}
        for objective in self.objectives:
            for required in objective.requires:
                if required not in enabled:
                    raise ValueError(
                        f"model.{objective.name} requires model.{required}, which is disabled: "
                        f"enable model.{required} or set model.{objective.name}: null"
                    )

    @staticmethod
    def _twin(module: nn.Module) -> nn.Module:
        twin = copy.deepcopy(module)
        twin.requires_grad_(False)
        return twin

    def train(self, mode: bool = True) -> PretrainRecipe:
        """Momentum twins stay in eval mode: the teacher runs without dropout (the reference's does not, §8.2.9)."""
        super().train(mode)
        for twin in (self.vision_m, self.stream_m):
            if twin is not None:
                twin.eval()
        return self

    def momentum_encoder(self, name: str) -> nn.Module:
        twin = getattr(self, f"{name}_m")
        if twin is None:
            raise RuntimeError(f"no momentum {name} encoder: no enabled objective declared it in momentum_encoders()")
        return twin

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(m, t) for m, t in ((self.vision, self.vision_m), (self.stream, self.stream_m)) if t is not None]
        for objective in self.objectives:
            pairs.extend(objective.momentum_pairs())
        return pairs

    # -- training --------------------------------------------------------------------------------------------------
    def current_alpha(self) -> float:
        if self.alpha_warmup_steps <= 0:
            return self.alpha
        return self.alpha * min(1.0, self.global_step / self.alpha_warmup_steps)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        ctx = StepContext(self, batch, alpha=self.current_alpha())
        total: Tensor | None = None
        batch_size = batch["input_ids"].shape[0]
        losses: dict[str, Tensor] = {}
        self._nonfinite.begin_step(self.objectives)
        for objective in self.objectives:
            out = objective(ctx)
            losses[objective.name] = out.loss
            ctx.published[objective.name] = out.publish
            weighted = objective.weight * out.loss
            total = weighted if total is None else total + weighted
            self.log(f"train/{objective.name}_loss", out.loss.detach(), prog_bar=True, batch_size=batch_size)
            for key, value in out.logs.items():
                self.log(f"train/{objective.name}_{key}", value, batch_size=batch_size)
        self.log("train/loss", total.detach(), batch_size=batch_size)
        self.log("train/alpha", ctx.alpha, batch_size=batch_size)
        self._count_skipped(batch.get("skipped"))
        finite = self._nonfinite.is_finite(total, self._trainer)
        if not finite:
            self._nonfinite.skip(losses, self.objectives)
        else:
            self._nonfinite.finite_step()
            self._update_pending = True
        self.log("train/nonfinite_steps", float(self._nonfinite.total), batch_size=batch_size)
        return total if finite else None  # None: Lightning skips backward, the optimizer sees no gradient

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # here, not at load: nothing between load and step may draw from it
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._nonfinite.exceeded:
            self._nonfinite.stop(self.trainer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_STATE_KEY] = capture_rng_states()
        checkpoint["vlalign_nonfinite_steps"] = self._nonfinite.total

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get(RNG_STATE_KEY)
        self._nonfinite.total = checkpoint.get("vlalign_nonfinite_steps", 0)

    def _count_skipped(self, skipped: dict[str, int] | None) -> None:
        """Bad samples the data workers dropped travel with the batches; log running totals per reason."""
        if not skipped:
            return
        for reason, count in skipped.items():
            self._skipped[reason] += int(count)
        for reason, count in self._skipped.items():
            self.log(f"data/skipped_{reason}", float(count), reduce_fx="sum", batch_size=1)

    def on_train_epoch_end(self) -> None:
        """One summary line per epoch on rank zero: the bad samples skipped this epoch, by reason, over all ranks."""
        previous: dict[str, int] = getattr(self, "_skipped_at_epoch_start", {})
        epoch = {r: n - previous.get(r, 0) for r, n in self._skipped.items() if n > previous.get(r, 0)}
        self._skipped_at_epoch_start = dict(self._skipped)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[dict[str, int] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, epoch)
            epoch = defaultdict(int)
            for counts in gathered:
                for reason, count in (counts or {}).items():
                    epoch[reason] += count
        if epoch:
            reasons = ", ".join(
                f"{reason}={count}" for reason, count in sorted(epoch.items(), key=lambda x: (-x[1], x[0]))
            )
            rank_zero_info(f"epoch {self.current_epoch}: skipped {sum(epoch.values())} bad samples ({reasons})")
        else:
            rank_zero_info(f"epoch {self.current_epoch}: skipped no bad samples")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """EMA and queue updates run only after real optimizer steps (correct under gradient accumulation)."""
        super().optimizer_step(*args, **kwargs)
        if not self._update_pending:  # every micro-batch of this step had a non-finite loss: nothing changed
            return
        self._update_pending = False
        self.after_real_optimizer_step()

    def after_real_optimizer_step(self) -> None:
        """EMA twins and objective hooks (queue writes); also for loops that step the optimizer themselves."""
        ema_update(self.momentum_pairs(), self.momentum)
        for objective in self.objectives:
            objective.after_optimizer_step()

    def configure_model(self) -> None:
        """Compile the encoders in place (``nn.Module.compile``) when ``compile_encoders`` is set; idempotent."""
        if not self.compile_encoders:
            return
        for module in (self.vision, self.stream, self.vision_m, self.stream_m):
            if module is not None and getattr(module, "_compiled_call_impl", None) is None:
                module.compile()

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
        self._eval_store["image_feat"].append(self.itc.image_features(self.vision(batch["image"])))
        self._eval_store["image_index"].append(batch["image_index"])
        text_states = self.stream.encode_text(batch["input_ids"], batch["attention_mask"]).last_hidden_state
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
