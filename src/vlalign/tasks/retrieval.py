"""Image-text retrieval fine-tuning and evaluation (COCO / Flickr30k), the headline task of ALBEF / SIMLA.

``vlalign finetune retrieval`` trains :class:`RetrievalTask` from a pretrained model; ``vlalign evaluate retrieval``
tests any model :func:`vlalign.load` accepts. Training is the reference's retrieval fine-tuning: ITC where every
caption of an image is a positive, in the batch and in the queue (``ITC(same_image_positives=True)``,
docs/method.md §2.1), ITM with hard negatives that never pick another caption of the same image (§2.2), momentum
distillation with α ramped over the first epoch (§2.6). Evaluation is the reference protocol (§5): ITC similarities
of all pairs, each query's top ``k_test`` candidates re-scored by ITM, recall R@1/5/10 both ways and their means,
for the ITM re-ranked scores (``itm_*``) and for ITC alone (``itc_*``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from vlalign.api import load as load_model
from vlalign.data.preprocessing import Preprocessing, preprocessing_of
from vlalign.errors import ConfigError
from vlalign.evaluation.metrics import retrieval_recalls
from vlalign.evaluation.retrieval import rerank_with_itm, reranked_recalls
from vlalign.models.backbone import make_twin
from vlalign.objectives.base import BuildSpec, ConfigFacts, Objective, ema_update
from vlalign.objectives.context import StepContext
from vlalign.objectives.itc import ITC
from vlalign.tasks.optim import OptimConfig, build_optimizer
from vlalign.tasks.registry import TaskSpec, register_task
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

__all__ = ["FINETUNE_OPTIM", "RETRIEVAL_TASK", "RetrievalTask"]

#: Key under which checkpoints record how to rebuild the model (the format ``PretrainRecipe.model_spec`` writes, so
#: ``vlalign.load``, ``export`` and ``embed`` read fine-tuned checkpoints too).
SPEC_KEY = "vlalign_model"
#: The reference fine-tuning schedule: AdamW lr 1e-5, weight decay 0.02, cosine to 1e-6, no real warm-up.
FINETUNE_OPTIM = OptimConfig(lr=1e-5, weight_decay=0.02, warmup_steps=0, warmup_lr=1e-5, min_lr=1e-6)
#: Images per text query in the retrieval picture (the columns `retrieval_grid` draws).
GRID_TOP = 5


class RetrievalTask(L.LightningModule):
    """Fine-tune and evaluate image-text retrieval starting from a pretrained vlalign or reference model.

    The encoders and the ITC / ITM heads come from ``init_from`` (loaded with :func:`vlalign.load`'s building
    blocks: a vlalign ``.ckpt``, an exported folder or a converted ALBEF / SIMLA ``.safetensors``); the momentum
    twins are copies of the loaded weights (:func:`~vlalign.models.backbone.make_twin`). The ITC temperature,
    embedding width and pooling are the loaded model's. Checkpoints record the fine-tuned model in the format
    :func:`vlalign.load` reads.

    Logged: ``train/{itc,itm}_loss``, ``train/loss``, ``train/alpha``; at validation and test
    ``{val,test}/itm_{txt,img}_r{1,5,10}``, ``.../itm_{txt,img}_r_mean``, ``.../itm_r_mean`` (ITM re-ranked),
    the same with ``itc_`` (ITC similarities alone) and ``.../r_mean`` (the re-ranked mean, or ITC's for a model
    without ITM), plus a picture of the top images of a few text queries.

    Args:
        init_from: the pretrained model to start from or to evaluate (required).
        tokenizer: tokenizer directory; required for converted reference files (they record none), replaces the
            recorded tokenizer otherwise.
        image_size: image side the model sees; the ViT's position embeddings are interpolated when it differs from
            the pretrained size (reference: 384). None: the size the model records. Linked from
            ``data.image_size`` by the CLI.
        zero_shot: evaluate ``init_from`` as it is: ``vlalign finetune`` skips training and only tests (the
            reference's ``--evaluate``).
        queue_size: ITC queue length (reference: 65536); 0 disables the queue.
        momentum: EMA coefficient of the momentum twins (reference: 0.995).
        alpha: distillation weight (reference: 0.4).
        alpha_warmup_steps: α ramps linearly from 0 over this many optimizer steps; None: the first epoch (the
            reference), 0: no ramp.
        distill: momentum distillation of the ITC targets.
        k_test: candidates per query re-ranked by ITM at evaluation (reference: 256 for COCO, 128 for Flickr30k).
        itm_batch_size: (image, caption) pairs per fusion pass of the re-ranking.
        grid_queries: text queries shown in the retrieval picture of each evaluation (0: no picture).
        gradient_checkpointing: recompute encoder activations in the backward pass (less memory, slower).
        optim: optimiser and schedule (reference: lr 1e-5, weight decay 0.02, cosine to 1e-6).
        max_consecutive_nonfinite: steps with a non-finite loss are skipped; this many in a row stop the run.
    """

    def __init__(
        self,
        init_from: str | None = None,
        tokenizer: str | None = None,
        image_size: int | None = None,
        zero_shot: bool = False,
        queue_size: int = 65536,
        momentum: float = 0.995,
        alpha: float = 0.4,
        alpha_warmup_steps: int | None = None,
        distill: bool = True,
        k_test: int = 256,
        itm_batch_size: int = 256,
        grid_queries: int = 4,
        gradient_checkpointing: bool = False,
        optim: OptimConfig = FINETUNE_OPTIM,
        max_consecutive_nonfinite: int = 10,
    ) -> None:
        super().__init__()
        errors = range_errors(
            queue_size=queue_size,
            momentum=momentum,
            alpha=alpha,
            alpha_warmup_steps=alpha_warmup_steps,
            k_test=k_test,
            itm_batch_size=itm_batch_size,
            grid_queries=grid_queries,
            image_size=image_size,
        )
        if errors:
            raise ConfigError("; ".join(errors))
        if not init_from:
            raise ConfigError(
                "model.init_from is required: the pretrained model to fine-tune or evaluate (a vlalign .ckpt, a "
                "folder written by `vlalign export`, or a converted ALBEF / SIMLA .safetensors file)"
            )
        self.save_hyperparameters()
        self.momentum = momentum
        self.alpha = alpha
        self.alpha_warmup_steps = alpha_warmup_steps
        self.zero_shot = zero_shot
        self.k_test = k_test
        self.itm_batch_size = itm_batch_size
        self.grid_queries = grid_queries
        self.optim = optim
        self.output_dir: Path | None = None  # where pictures go; the run's log folder when None

        overrides = {"image_size": image_size} if image_size is not None else {}
        pretrained = load_model(init_from, tokenizer=tokenizer, **overrides)
        if pretrained.itc is None:
            raise ConfigError(
                f"model.init_from {init_from}: the model was trained without ITC, so it has no joint embedding space "
                "to retrieve with; start from a model trained with model.itc"
            )
        self.tokenizer = pretrained.tokenizer
        self.preprocessing: Preprocessing = pretrained.preprocessing
        self._base_spec: dict[str, Any] = copy.deepcopy(pretrained.config)

        backbone = pretrained.backbone
        backbone.requires_grad_(True)
        if gradient_checkpointing:
            backbone.vision.vit.set_grad_checkpointing(True)
            backbone.stream.config = dataclasses.replace(backbone.stream.config, gradient_checkpointing=True)
        settings = {
            **pretrained.itc.init_args,
            "queue_size": queue_size,
            "distill": distill,
            "same_image_positives": True,
        }
        itc = ITC(**settings)
        if itc.uses_momentum:  # twins of the LOADED weights
            backbone.vision_m = make_twin(backbone.vision)
            backbone.stream_m = make_twin(backbone.stream)
        itc.build(
            BuildSpec(
                vision_width=backbone.vision_width,
                text_width=backbone.text_width,
                vocab=_vocab(self._base_spec),
                patch_grid=backbone.vision.grid_size,
                patch_size=backbone.vision.patch_size,
                momentum=itc.uses_momentum,
                stream=backbone.stream,
                stream_m=backbone.stream_m,
                embed_dim=itc.embed_dim,
                twin_map=backbone.twin_map() if itc.uses_momentum else {},
            )
        )
        missing = itc.load_state_dict(pretrained.itc.state_dict(), strict=False).missing_keys
        not_loaded = [key for key in missing if not key.endswith(("_queue", "queue_ptr")) and "_m." not in key]
        if not_loaded:
            raise ConfigError(f"model.init_from {init_from}: ITC tensors missing from the model: {not_loaded}")
        itc.reset_twins()
        self.backbone = backbone
        self.itc = itc
        self.itm = pretrained.itm
        if self.itm is not None:
            self.itm.requires_grad_(True)
        else:
            log.warning("%s has no ITM head: fine-tuning with ITC alone, evaluating ITC recall only", init_from)
        del pretrained
        self._nonfinite = NonFiniteGuard(max_consecutive_nonfinite)
        self._update_pending = False
        self._rng_to_restore: dict[str, Any] | None = None
        self._warmup_steps = alpha_warmup_steps or 0
        self._eval_store: dict[str, list[Tensor]] = defaultdict(list)
        self.last_results: dict[str, dict[str, float]] = {}  # stage -> recalls of the latest evaluation
        self.results: dict[str, Any] = {}  # what results.json records besides the metrics (latest evaluation)
        self.pictures: dict[str, Path] = {}
        self.train()  # vlalign.load returns eval mode; Lightning keeps the mode it finds (twins stay in eval)

    # -- configuration checks (before anything is built) ---------------------------------------------------------
    @classmethod
    def config_errors(cls, config: Mapping[str, Any], subcommand: str) -> list[str]:
        """Mistakes in a parsed ``vlalign finetune|evaluate retrieval`` config (``model``, ``data``, ``trainer``)."""
        model = config.get("model") or {}
        data = config.get("data") or {}
        trainer = config.get("trainer") or {}
        errors = range_errors(**{k: model[k] for k in RANGE_KEYS if k in model and model[k] is not None})
        init_from = model.get("init_from")
        if not init_from:
            errors.append(
                "model.init_from is required: the pretrained model to fine-tune or evaluate (--model PATH for "
                "`vlalign evaluate`, --model.init_from PATH for `vlalign finetune`)"
            )
        elif not Path(str(init_from)).expanduser().exists():
            errors.append(f"model.init_from: {Path(str(init_from)).expanduser()} does not exist")
        if subcommand == "fit" and not model.get("zero_shot"):
            if not data.get("train_files"):
                errors.append(
                    "data.train_files is empty: fine-tuning needs a training JSON [{image, caption, image_id}]"
                )
            facts = ConfigFacts(
                subcommand="fit",
                batch_size=data.get("batch_size"),
                world_size=_world_size(trainer),
                accumulate_grad_batches=int(trainer.get("accumulate_grad_batches") or 1),
            )
            errors += [
                e.replace("model.itc.", "model.")
                for e in ITC.config_errors({"queue_size": model.get("queue_size", 0)}, facts)
            ]
        for key in ("val_file", "test_file", "image_root", "tokenizer"):
            value = data.get(key)
            if value and not Path(str(value)).expanduser().exists():
                errors.append(f"data.{key}: {Path(str(value)).expanduser()} does not exist")
        train_files = (data.get("train_files") or []) if subcommand == "fit" else []
        for value in train_files:
            if not Path(str(value)).expanduser().exists():
                errors.append(f"data.train_files: {Path(str(value)).expanduser()} does not exist")
        if subcommand in ("fit", "test") and not data.get("test_file"):
            errors.append(
                "data.test_file is not set: testing (also after `vlalign finetune`) needs an evaluation JSON "
                "[{image, caption: [..]}]"
            )
        if subcommand == "validate" and not data.get("val_file"):
            errors.append("data.val_file is not set: validation needs an evaluation JSON [{image, caption: [..]}]")
        return errors

    # -- structure --------------------------------------------------------------------------------------------------
    @property
    def objectives(self) -> list[Objective]:
        """ITC, then ITM (which reads ITC's similarities for its hard negatives) when the model has one."""
        return [self.itc] + ([self.itm] if self.itm is not None else [])

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = list(self.backbone.momentum_pairs())
        for objective in self.objectives:
            pairs.extend(objective.momentum_pairs())
        return pairs

    def no_weight_decay(self) -> set[str]:
        return {f"{o.name}.{name}" for o in self.objectives for name in o.no_weight_decay()}

    def model_spec(self) -> dict[str, Any]:
        """The fine-tuned model in the format ``vlalign.load`` reads: the pretrained spec with this task's ITC / ITM,
        the fine-tuning image size and preprocessing, and a ``finetuned`` note naming the task and the start."""
        spec = copy.deepcopy(self._base_spec)
        args = spec["init_args"]
        args["vision"] = {**args["vision"], "img_size": int(self.preprocessing.image_size)}
        args["objectives"] = [o.config() for o in self.objectives]
        spec["preprocessing"] = self.preprocessing.to_dict()
        spec["finetuned"] = {"task": "retrieval", "init_from": str(self.hparams["init_from"])}
        return spec

    def setup(self, stage: str) -> None:
        """Record the data module's evaluation preprocessing (its tokenizer is the model's unless configured)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        recorded = preprocessing_of(datamodule) if datamodule is not None else None
        if recorded is not None:
            self.preprocessing = recorded

    # -- training ---------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        prepare_checkpointing(self.trainer)

    def on_train_start(self) -> None:
        if self.alpha_warmup_steps is None:  # the reference: α ramps over the first epoch
            batches = self.trainer.num_training_batches
            per_epoch = int(batches) // max(1, self.trainer.accumulate_grad_batches) if batches != float("inf") else 0
            self._warmup_steps = per_epoch

    def current_alpha(self) -> float:
        if self._warmup_steps <= 0:
            return self.alpha
        return self.alpha * min(1.0, self.global_step / self._warmup_steps)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        ctx = StepContext(self.backbone, batch, alpha=self.current_alpha())
        batch_size = batch["input_ids"].shape[0]
        losses: dict[str, Tensor] = {}
        total: Tensor | None = None
        for objective in self.objectives:
            objective.begin_step()
        for objective in self.objectives:
            out = objective(ctx)
            ctx.published[objective.name] = out.publish
            losses[objective.name] = out.loss
            total = out.loss if total is None else total + out.loss
            self.log(
                f"train/{objective.name}_loss",
                out.loss.detach(),
                prog_bar=losses_on_progress_bar(self),
                batch_size=batch_size,
            )
            for key, value in out.logs.items():
                self.log(f"train/{objective.name}_{key}", value, batch_size=batch_size)
        assert total is not None
        self.log("train/loss", total.detach(), batch_size=batch_size)
        self.log("train/alpha", ctx.alpha, batch_size=batch_size)
        if not self._nonfinite.is_finite(total, self._trainer):
            self._nonfinite.skip(losses)
            for objective in self.objectives:
                objective.rollback_step()
            return None
        self._nonfinite.finite_step()
        self._update_pending = True
        return total

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._nonfinite.exceeded:
            self._nonfinite.stop(self.trainer)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """EMA and queue updates follow real optimizer steps only (as the pretraining recipe)."""
        super().optimizer_step(*args, **kwargs)
        if not self._update_pending:
            return
        self._update_pending = False
        ema_update(self.momentum_pairs(), self.momentum)
        for objective in self.objectives:
            objective.after_optimizer_step()

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
        self._store_features(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._store_features(batch)

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    def _store_features(self, batch: dict[str, Any]) -> None:
        """Image tokens (kept for the ITM re-ranking), ITC features, caption ids and the global indices."""
        store = self._eval_store
        image_tokens = self.backbone.vision(batch["image"])
        store["image_tokens"].append(image_tokens)
        store["image_feat"].append(self.itc.image_features(image_tokens))
        store["image_index"].append(batch["image_index"])
        ids, mask = batch["input_ids"], batch["attention_mask"]
        store["text_feat"].append(self.itc.text_features(self.backbone.encode_text(ids, mask), mask))
        store["text_ids"].append(ids)
        store["text_mask"].append(mask)
        store["text_index"].append(batch["text_index"])
        store["text_image_index"].append(batch["text_image_index"])

    def _gathered(self) -> dict[str, Tensor]:
        """Every rank's stored evaluation tensors, placed by global index (sampler padding repeats drop out)."""
        store = {key: all_gather_variable(torch.cat(values)) for key, values in self._eval_store.items()}
        self._eval_store.clear()
        num_images = int(store["image_index"].max()) + 1
        num_texts = int(store["text_index"].max()) + 1
        placed: dict[str, Tensor] = {}
        for key in ("image_tokens", "image_feat"):
            value = store[key]
            placed[key] = value.new_zeros((num_images, *value.shape[1:]))
            placed[key][store["image_index"]] = value
        for key in ("text_feat", "text_ids", "text_mask", "text_image_index"):
            value = store[key]
            placed[key] = value.new_zeros((num_texts, *value.shape[1:]))
            placed[key][store["text_index"]] = value
        return placed

    @torch.no_grad()
    def _evaluate(self, stage: str) -> None:
        if not self._eval_store:
            return
        data = self._gathered()
        sims = data["image_feat"].float() @ data["text_feat"].float().t()
        text_image_index = data["text_image_index"]
        results = {f"itc_{key}": value for key, value in retrieval_recalls(sims, text_image_index).items()}
        scores_t2i = sims
        if self.itm is not None:
            # epoch-end hooks run outside the precision plugin's autocast that the evaluation steps ran under
            with self.trainer.precision_plugin.forward_context():
                scores_i2t, scores_t2i = rerank_with_itm(
                    self,
                    data["image_tokens"],
                    data["text_ids"],
                    data["text_mask"],
                    sims,
                    self.k_test,
                    self.itm_batch_size,
                    rank=self.global_rank,  # every rank holds the gathered inputs: each fuses its share of the pairs
                    world_size=self.trainer.world_size,
                )
            results.update(
                {
                    f"itm_{key}": value
                    for key, value in reranked_recalls(scores_i2t, scores_t2i, text_image_index).items()
                }
            )
        results["r_mean"] = results.get("itm_r_mean", results["itc_r_mean"])
        self.last_results[stage] = results
        self.results = {
            "split": stage,
            "num_images": int(sims.shape[0]),
            "num_texts": int(sims.shape[1]),
            "k_test": self.k_test,
            "itm_reranked": self.itm is not None,
        }
        for key, value in results.items():
            self.log(f"{stage}/{key}", value, rank_zero_only=True, sync_dist=False)
        if self.trainer.is_global_zero and self.grid_queries > 0 and not self.trainer.sanity_checking:
            self._picture(stage, scores_t2i, text_image_index)

    # -- pictures ---------------------------------------------------------------------------------------------------
    def _eval_dataset(self, stage: str) -> Any:
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        return getattr(loader, "dataset", None)

    def _picture(self, stage: str, scores_t2i: Tensor, text_image_index: Tensor) -> None:
        """The top images of a few text queries (true image outlined), as PNG and TensorBoard image.

        A picture is a by-product: any failure is logged and the evaluation goes on.
        """
        try:
            from vlalign.evaluation.pictures import retrieval_grid
        except ImportError:
            return
        dataset = self._eval_dataset(stage)
        images, captions = getattr(dataset, "images", None), getattr(dataset, "captions", None)
        if images is None or captions is None:
            return
        try:
            picture = self._grid(retrieval_grid, images, captions, scores_t2i, text_image_index)
            folder = output_folder(self.trainer, self.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"retrieval_{stage}.png"
            picture.save(path)
            self.pictures[stage] = path
            self.results["picture"] = str(path)
            for logger in self.loggers:
                add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
                if callable(add_image):
                    import numpy as np

                    add_image(
                        f"{stage}/retrieval", np.asarray(picture.convert("RGB")), self.global_step, dataformats="HWC"
                    )
        except Exception as err:  # noqa: BLE001 - a picture must never cost a run its results
            log.warning("retrieval picture for %s not drawn: %r", stage, err)

    def _grid(self, retrieval_grid: Any, images: list, captions: list, scores_t2i: Tensor, text_image_index: Tensor):
        """``grid_queries`` captions spread evenly over the split, each with its top images by ``scores_t2i``."""
        num_images, num_texts = scores_t2i.shape
        if num_images < GRID_TOP:
            raise ValueError(f"the split has {num_images} images, fewer than the {GRID_TOP} a picture row shows")
        count = min(self.grid_queries, num_texts)
        queries = torch.linspace(0, num_texts - 1, count).round().long().to(scores_t2i.device)
        top = scores_t2i[:, queries].t().topk(GRID_TOP, dim=1).indices  # [Q, 5] by the final (re-ranked) scores
        return retrieval_grid(
            [captions[int(q)] for q in queries.tolist()], images, top.cpu(), text_image_index[queries].cpu()
        )


# -- helpers ------------------------------------------------------------------------------------------------------------
RANGE_KEYS = (
    "queue_size",
    "momentum",
    "alpha",
    "alpha_warmup_steps",
    "k_test",
    "itm_batch_size",
    "grid_queries",
    "image_size",
)


def range_errors(
    queue_size: int = 0,
    momentum: float = 0.995,
    alpha: float = 0.4,
    alpha_warmup_steps: int | None = None,
    k_test: int = 256,
    itm_batch_size: int = 256,
    grid_queries: int = 0,
    image_size: int | None = None,
) -> list[str]:
    """Out-of-range ``model.*`` settings of :class:`RetrievalTask`, each naming its key."""
    errors = []
    if queue_size < 0:
        errors.append(f"model.queue_size must be >= 0, got {queue_size}")
    if not 0.0 <= momentum < 1.0:
        errors.append(f"model.momentum must be in [0, 1), got {momentum}")
    if not 0.0 <= alpha <= 1.0:
        errors.append(f"model.alpha must be in [0, 1], got {alpha}")
    if alpha_warmup_steps is not None and alpha_warmup_steps < 0:
        errors.append(f"model.alpha_warmup_steps must be >= 0 (or null: one epoch), got {alpha_warmup_steps}")
    if k_test < 1:
        errors.append(f"model.k_test must be >= 1, got {k_test}")
    if itm_batch_size < 1:
        errors.append(f"model.itm_batch_size must be >= 1, got {itm_batch_size}")
    if grid_queries < 0:
        errors.append(f"model.grid_queries must be >= 0, got {grid_queries}")
    if image_size is not None and image_size < 1:
        errors.append(f"model.image_size (linked from data.image_size) must be >= 1, got {image_size}")
    return errors


def _vocab(spec: Mapping[str, Any]) -> Any:
    from vlalign.data.tokenization import VocabInfo

    args = spec["init_args"]
    if args.get("vocab"):
        return VocabInfo(**args["vocab"])
    stream = args["stream"]
    return VocabInfo(vocab_size=stream["vocab_size"], pad_token_id=stream.get("pad_token_id", 0))


def _world_size(trainer: Mapping[str, Any]) -> int:
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    else:
        try:
            count = max(1, int(devices))
        except (TypeError, ValueError):
            count = max(1, torch.cuda.device_count())
    return count * int(nodes)


RETRIEVAL_TASK = register_task(
    TaskSpec(
        name="retrieval",
        module="vlalign.tasks.retrieval.RetrievalTask",
        datamodule="vlalign.datamodules.retrieval_finetune.RetrievalFinetuneDataModule",
        config="retrieval_coco.yaml",
        description=(
            "image-text retrieval (COCO / Flickr30k Karpathy splits): ITC + ITM fine-tuning, ITM re-ranked recall"
        ),
        trains=True,
    )
)
