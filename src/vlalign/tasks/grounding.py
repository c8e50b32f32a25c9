"""Weakly-supervised referring-expression grounding (RefCOCO+ with detection proposals), as ALBEF / SIMLA evaluate it.

``vlalign finetune grounding`` trains :class:`GroundingTask` from a pretrained model; ``vlalign evaluate grounding``
tests any model :func:`vlalign.load` accepts. Training is retrieval fine-tuning (:class:`RetrievalTask`: ITC with
same-image positives, ITM with hard negatives, momentum distillation with the α ramp) on (expression, whole image)
pairs: no box is ever seen. At validation and test every expression is grounded by Grad-CAM on one stream layer's
cross-attention, driven by the ITM match logit, and the detection proposal with the most heat per square root of
its area is the prediction (:mod:`vlalign.evaluation.grounding`); it is correct at IoU >= 0.5 with the true box.

Logged (TensorBoard and ``results.json``): ``{val,test}/acc`` over all expressions of the stage and
``{val,test}/acc_<split>`` per split (``val``; ``testA``, ``testB``), in percent; ``results.json``'s ``details``
add per split the number of expressions, the mean number of proposals and the chance level (the accuracy of a
proposal drawn at random: the mean share of an expression's proposals at IoU >= 0.5). A picture of a few
expressions per split (image with the true and predicted boxes, and the heat map) goes to
``grounding_<stage>.png`` in the run folder and to TensorBoard.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlalign.errors import ConfigError
from vlalign.evaluation.grounding import (
    AREA_EXPONENT,
    IOU_THRESHOLD,
    GroundingExample,
    box_iou,
    cross_attention_gradcam,
    grounding_picture,
    predict_boxes,
    resolve_gradcam_layer,
    split_accuracies,
)
from vlalign.objectives.base import ConfigFacts
from vlalign.objectives.itc import ITC
from vlalign.tasks.optim import OptimConfig
from vlalign.tasks.registry import CONFIG_DIR, TaskSpec, register_task
from vlalign.tasks.retrieval import FINETUNE_OPTIM, RetrievalTask, _world_size, range_errors
from vlalign.training.run_folder import output_folder
from vlalign.utils.distributed import all_gather_variable

log = logging.getLogger(__name__)

__all__ = ["GROUNDING_TASK", "GroundingTask", "demo_finetune_args"]

#: The picture's file name in the run folder: ``grounding_val.png``, ``grounding_test.png``.
PICTURE_FILE = "grounding_{stage}.png"
_STORE_KEYS = ("index", "split", "iou", "chance", "proposals", "predicted")


class GroundingTask(RetrievalTask):
    """Fine-tune retrieval-style on referring expressions, evaluate grounding by Grad-CAM on cross-attention.

    Everything about training (and ``init_from``: a vlalign ``.ckpt``, an exported folder or a converted ALBEF /
    SIMLA ``.safetensors``; momentum twins copied from the loaded weights) is :class:`RetrievalTask`'s; the model
    needs an ITM head, whose match logit Grad-CAM explains.

    Args:
        init_from: the pretrained model to start from or to evaluate (required).
        tokenizer: tokenizer directory; required for converted reference files.
        image_size: image side the model sees (reference: 384); None: the model's. Linked from ``data.image_size``.
        zero_shot: only test ``init_from`` as it is (no fine-tuning).
        queue_size: ITC queue length (reference: 65536).
        momentum: EMA coefficient of the momentum twins (reference: 0.995).
        alpha: distillation weight (reference: 0.4).
        alpha_warmup_steps: α ramp in optimizer steps; None: the first epoch (the reference).
        distill: momentum distillation of the ITC targets.
        gradcam_layer: index of the stream layer whose cross-attention Grad-CAM reads (reference: 8 of 12, the
            ``block_num``); negative values count from the top; None: two thirds up the stack (8 of 12).
        area_exponent: a proposal scores ``heat inside / area ** area_exponent`` (reference: 0.5).
        iou_threshold: a predicted box is correct at this IoU with the true one or more (reference: 0.5).
        picture_expressions: expressions per split in the evaluation picture (0: no picture).
        gradient_checkpointing: recompute encoder activations in the backward pass.
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
        gradcam_layer: int | None = None,
        area_exponent: float = AREA_EXPONENT,
        iou_threshold: float = IOU_THRESHOLD,
        picture_expressions: int = 4,
        gradient_checkpointing: bool = False,
        optim: OptimConfig = FINETUNE_OPTIM,
        max_consecutive_nonfinite: int = 10,
    ) -> None:
        errors = grounding_range_errors(
            area_exponent=area_exponent, iou_threshold=iou_threshold, picture_expressions=picture_expressions
        )
        if errors:
            raise ConfigError("; ".join(errors))
        super().__init__(
            init_from=init_from,
            tokenizer=tokenizer,
            image_size=image_size,
            zero_shot=zero_shot,
            queue_size=queue_size,
            momentum=momentum,
            alpha=alpha,
            alpha_warmup_steps=alpha_warmup_steps,
            distill=distill,
            grid_queries=0,
            gradient_checkpointing=gradient_checkpointing,
            optim=optim,
            max_consecutive_nonfinite=max_consecutive_nonfinite,
        )
        if self.itm is None:
            raise ConfigError(
                f"model.init_from {init_from}: the model has no ITM head; grounding explains the ITM match score "
                "with Grad-CAM, so start from a model trained with model.itm"
            )
        try:
            self.gradcam_layer = resolve_gradcam_layer(self.backbone.stream, gradcam_layer, key="model.gradcam_layer")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.area_exponent = area_exponent
        self.iou_threshold = iou_threshold
        self.picture_expressions = picture_expressions
        self._ground_store: dict[str, list[Tensor]] = defaultdict(list)
        self._picture_rows: list[dict[str, Any]] = []

    # -- configuration checks ---------------------------------------------------------------------------------------
    @classmethod
    def config_errors(cls, config: Mapping[str, Any], subcommand: str) -> list[str]:
        """Mistakes in a parsed ``vlalign finetune|evaluate grounding`` config (``model``, ``data``, ``trainer``)."""
        model = config.get("model") or {}
        data = config.get("data") or {}
        trainer = config.get("trainer") or {}
        shared = ("queue_size", "momentum", "alpha", "alpha_warmup_steps", "image_size")
        errors = range_errors(**{k: model[k] for k in shared if model.get(k) is not None})
        errors += grounding_range_errors(
            **{
                k: model[k]
                for k in ("area_exponent", "iou_threshold", "picture_expressions")
                if model.get(k) is not None
            }
        )
        init_from = model.get("init_from")
        if not init_from:
            errors.append(
                "model.init_from is required: the pretrained model to fine-tune or evaluate (--model PATH for "
                "`vlalign evaluate`, --model.init_from PATH for `vlalign finetune`)"
            )
        elif not Path(str(init_from)).expanduser().exists():
            errors.append(f"model.init_from: {Path(str(init_from)).expanduser()} does not exist")
        fitting = subcommand == "fit" and not model.get("zero_shot")
        if fitting:
            if not data.get("train_files"):
                errors.append("data.train_files is empty: fine-tuning needs a training JSON [{image, text}]")
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
        paths = [(key, data.get(key)) for key in ("val_file", "dets_file", "refs_file", "image_root", "tokenizer")]
        paths += [(f"test_files.{name}", path) for name, path in (data.get("test_files") or {}).items()]
        paths += [("train_files", path) for path in (data.get("train_files") or [])] if fitting else []
        for key, value in paths:
            if value and not Path(str(value)).expanduser().exists():
                errors.append(f"data.{key}: {Path(str(value)).expanduser()} does not exist")
        if subcommand in ("fit", "test") and not data.get("test_files"):
            errors.append(
                "data.test_files is not set: testing (also after `vlalign finetune`) needs split name -> evaluation "
                "JSON, e.g. {testA: refcoco+_testA.json, testB: refcoco+_testB.json}"
            )
        if subcommand == "validate" and not data.get("val_file"):
            errors.append("data.val_file is not set: validation needs the val split's evaluation JSON")
        evaluates = subcommand in ("test", "validate") or data.get("test_files") or data.get("val_file")
        if evaluates and not data.get("dets_file"):
            errors.append(
                "data.dets_file is not set: evaluation ranks detection proposals "
                '{"<image_id>": [[x, y, w, h], ...]} (dets.json of the ALBEF grounding data)'
            )
        return errors

    # -- structure ----------------------------------------------------------------------------------------------------
    def model_spec(self) -> dict[str, Any]:
        """The fine-tuned model in the format ``vlalign.load`` reads (retrieval's, with this task's name)."""
        spec = super().model_spec()
        spec["finetuned"]["task"] = "grounding"
        return spec

    # -- evaluation ---------------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._ground_store.clear()
        self._picture_rows = []

    def on_test_epoch_start(self) -> None:
        self._ground_store.clear()
        self._picture_rows = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._ground(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._ground(batch)

    def _ground(self, batch: dict[str, Any]) -> None:
        """Grad-CAM maps, the best proposal of each expression, its IoU and the chance level of its proposals."""
        # Evaluation runs under inference mode; the batch is cloned into ordinary tensors for the backward pass.
        with torch.inference_mode(False), torch.enable_grad():
            maps, _ = cross_attention_gradcam(
                self.backbone,
                self.itm.itm_head,
                batch["image"].clone(),
                batch["input_ids"].clone(),
                batch["attention_mask"].clone(),
                self.gradcam_layer,
            )
        proposals, valid, truth = batch["proposals"], batch["proposal_mask"], batch["box"]
        pick = predict_boxes(maps, batch["size"], proposals, valid, self.area_exponent)
        predicted = proposals[torch.arange(pick.shape[0], device=pick.device), pick]
        hits = (box_iou(proposals, truth[:, None]) >= self.iou_threshold) & valid
        count = valid.sum(1)
        store = self._ground_store
        store["index"].append(batch["index"])
        store["split"].append(batch["split"])
        store["iou"].append(box_iou(predicted, truth))
        store["chance"].append(hits.sum(1).float() / count.clamp(min=1).float())
        store["proposals"].append(count.float())
        store["predicted"].append(predicted.float())
        self._keep_for_picture(batch, maps, predicted)

    def _keep_for_picture(self, batch: dict[str, Any], maps: Tensor, predicted: Tensor) -> None:
        """The first ``picture_expressions`` expressions of each split this (global-zero) process evaluates."""
        if self.picture_expressions <= 0 or not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        taken: dict[int, int] = defaultdict(int)
        for row in self._picture_rows:
            taken[row["split"]] += 1
        for position, split in enumerate(batch["split"].tolist()):
            if taken[split] < self.picture_expressions:
                taken[split] += 1
                self._picture_rows.append(
                    {
                        "index": int(batch["index"][position]),
                        "split": split,
                        "heat": maps[position].detach().float().cpu(),
                        "predicted": tuple(float(v) for v in predicted[position].tolist()),
                    }
                )

    @torch.no_grad()
    def _evaluate(self, stage: str) -> None:
        if not self._ground_store:
            return
        gathered = {key: all_gather_variable(torch.cat(self._ground_store[key])) for key in _STORE_KEYS}
        self._ground_store.clear()
        index = gathered["index"]
        count = int(index.max()) + 1
        seen = torch.zeros(count, dtype=torch.bool, device=index.device)
        seen[index] = True
        placed: dict[str, Tensor] = {}
        for key in ("split", "iou", "chance", "proposals"):  # sampler padding repeats land on their own index
            value = gathered[key]
            placed[key] = value.new_zeros((count, *value.shape[1:]))
            placed[key][index] = value
            placed[key] = placed[key][seen]
        dataset = self._eval_dataset(stage)
        splits = list(getattr(dataset, "splits", []))
        names = {i: (splits[i] if i < len(splits) else f"split{i}") for i in sorted(set(placed["split"].tolist()))}
        correct = placed["iou"] >= self.iou_threshold
        accuracies = split_accuracies(correct, placed["split"], names)
        self.log(f"{stage}/acc", 100.0 * accuracies["all"], rank_zero_only=True, sync_dist=False)
        details: dict[str, Any] = {}
        for split_id, name in names.items():
            chosen = placed["split"] == split_id
            self.log(f"{stage}/acc_{name}", 100.0 * accuracies[name], rank_zero_only=True, sync_dist=False)
            details[name] = {
                "expressions": int(chosen.sum()),
                "acc": 100.0 * accuracies[name],
                "chance": 100.0 * float(placed["chance"][chosen].mean()),
                "mean_proposals": float(placed["proposals"][chosen].mean()),
                "mean_iou": float(placed["iou"][chosen].mean()),
            }
        self.last_results[stage] = {"acc": 100.0 * accuracies["all"], **{n: d["acc"] for n, d in details.items()}}
        self.results = {
            "stage": stage,
            "expressions": int(correct.numel()),
            "chance": 100.0 * float(placed["chance"].mean()),
            "splits": details,
            "gradcam_layer": self.gradcam_layer,
            "area_exponent": self.area_exponent,
            "iou_threshold": self.iou_threshold,
        }
        if self.trainer.is_global_zero and self._picture_rows and not self.trainer.sanity_checking:
            self._draw(stage, dataset, names)

    def _draw(self, stage: str, dataset: Any, names: Mapping[int, str]) -> None:
        """The picture of the kept expressions, as PNG and TensorBoard image (a failure is logged, never raised)."""
        try:
            examples = []
            for row in self._picture_rows:
                entry = dataset.entries[row["index"]]
                truth = entry.box
                predicted = row["predicted"]
                iou = float(box_iou(torch.tensor(predicted), torch.tensor(truth)))
                examples.append(
                    GroundingExample(
                        image=entry.image,
                        text=entry.text,
                        heat=row["heat"],
                        true_box=truth,
                        predicted_box=predicted,
                        iou=iou,
                        split=names.get(row["split"], ""),
                    )
                )
            picture = grounding_picture(examples)
            folder = output_folder(self.trainer, self.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / PICTURE_FILE.format(stage=stage)
            picture.save(path)
            self.pictures[stage] = path
            self.results["picture"] = str(path)
            for logger in self.loggers:
                add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
                if callable(add_image):
                    add_image(f"{stage}/grounding", np.asarray(picture), self.global_step, dataformats="HWC")
        except Exception as err:  # noqa: BLE001 - a picture must never cost a run its results
            log.warning("grounding picture for %s not drawn: %r", stage, err)
        finally:
            self._picture_rows = []


def grounding_range_errors(
    area_exponent: float = AREA_EXPONENT, iou_threshold: float = IOU_THRESHOLD, picture_expressions: int = 0
) -> list[str]:
    """Out-of-range grounding settings of :class:`GroundingTask`, each naming its key."""
    errors = []
    if not 0.0 <= area_exponent <= 1.0:
        errors.append(f"model.area_exponent must be in [0, 1] (0.5: the square root of the area), got {area_exponent}")
    if not 0.0 < iou_threshold <= 1.0:
        errors.append(f"model.iou_threshold must be in (0, 1], got {iou_threshold}")
    if picture_expressions < 0:
        errors.append(f"model.picture_expressions must be >= 0, got {picture_expressions}")
    return errors


def demo_finetune_args(data: str | Path, model: str | Path, out: str | Path, steps: int, seed: int = 42) -> list[str]:
    """Arguments of ``vlalign finetune grounding`` (``vlalign.cli.main.main(["finetune", "grounding", *args])``) that
    fine-tune the ``make demo`` model ``model`` for exactly ``steps`` optimizer steps (the schedule spans them) on the
    synthetic grounding files of ``data`` (``vlalign data synth``), without validation, then test ``last.ckpt`` on
    ``testA`` / ``testB``; everything goes under ``out`` (``results.json`` and ``grounding_test.png`` in
    ``out/runs/grounding_tiny/version_N``). The zero-shot accuracy of ``model``: ``vlalign evaluate grounding --model
    MODEL`` with the same arguments minus ``--model.init_from`` and the trainer's."""
    data, out = Path(data), Path(out)
    test_files = {"testA": str(data / "grounding_testA.json"), "testB": str(data / "grounding_testB.json")}
    return [
        "--config", str(CONFIG_DIR / "grounding_tiny.yaml"),
        "--seed_everything", str(seed),
        "--model.init_from", str(model),
        "--data.train_files", f"[{data / 'grounding_train.json'}]",
        "--data.val_file", str(data / "grounding_val.json"),
        "--data.test_files", json.dumps(test_files),
        "--data.dets_file", str(data / "grounding_dets.json"),
        "--data.seed", str(seed),
        "--trainer.max_steps", str(steps),
        "--trainer.max_epochs", "-1",
        "--trainer.max_time", "null",
        "--trainer.limit_val_batches", "0",
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out / "runs"),
    ]  # fmt: skip


GROUNDING_TASK = register_task(
    TaskSpec(
        name="grounding",
        module="vlalign.tasks.grounding.GroundingTask",
        datamodule="vlalign.datamodules.grounding.GroundingDataModule",
        config="grounding.yaml",
        description=(
            "weakly-supervised grounding (RefCOCO+ with proposals): Grad-CAM on cross-attention, accuracy at IoU >= 0.5"
        ),
        trains=True,
    )
)
