"""Hard-negative evaluation: does the model score an image's caption above minimally edited captions?

For every example of a hard-negative file (:mod:`vlalign.datamodules.hardneg`; ``vlalign data synth`` writes one
with colour, shape, relation and attribute-binding edits) the positive caption and every negative are scored with
the image as retrieval scores pairs: by the ITM head's match logit and by ITC cosine similarity
(:func:`vlalign.evaluation.hardneg.score_hardneg`: each image through the ViT once, its cross-attention keys and
values reused for all its captions). A negative is passed when the positive scores strictly higher (a tie fails).
Reported overall and per edit type, with counts, for each scorer the model has: TensorBoard scalars
``test/hardneg_itm_acc``, ``test/hardneg_itc_acc``, ``test/hardneg_itm_acc/<type>``, ... (fractions in [0, 1]),
:attr:`HardNegativeEvaluation.results` (``vlalign evaluate hardneg`` writes it to ``results.json``), and a picture of
the most confident failures (the image, its positive and the negative the model preferred) as
``hardneg_failures.png`` in the run folder and in TensorBoard.

Run it with ``vlalign evaluate hardneg --model PATH --config configs/finetune/hardneg.yaml``; it trains nothing.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from vlalign.api import load
from vlalign.errors import InputFileError
from vlalign.evaluation.hardneg import SCORERS, hardneg_accuracy, score_hardneg, select_failures
from vlalign.tasks.registry import TaskSpec, register_task
from vlalign.training.run_folder import output_folder
from vlalign.utils.distributed import all_gather_variable

log = logging.getLogger(__name__)

__all__ = ["FAILURES_FILE", "HardNegativeEvaluation"]

#: File name of the failures picture, written into the run folder.
FAILURES_FILE = "hardneg_failures.png"


class HardNegativeEvaluation(L.LightningModule):
    """Hard-negative accuracy of a trained model, overall and per edit type, with ITM and with ITC (test only).

    Args:
        init_from: the model: a vlalign ``.ckpt``, a folder written by ``vlalign export``, or a ``.safetensors``
            file written by ``vlalign convert reference`` (anything :func:`vlalign.load` accepts).
        tokenizer: tokenizer directory; required for converted reference files, which record none; otherwise it
            replaces the model's recorded tokenizer (leave it unset).
        image_size: evaluate at this image side instead of the model's (position embeddings interpolated).
        max_words: ``pre_caption`` word limit; default: the model's recorded one.
        max_length: caption token limit, ``[CLS]`` included; default: the model's recorded one.
        batch_size: captions per text pass and (image, caption) pairs per fusion pass.
        num_failures: failures drawn in the picture (the most confident ones); 0: no picture.

    Attributes:
        model: the loaded :class:`~vlalign.api.VisionLanguageModel`.
        output_dir: where ``hardneg_failures.png`` goes (``vlalign evaluate`` sets it to the folder of
            ``results.json``); None: the run's log folder.
        results: after ``test``: ``{"task", "json_file", "num_examples", "num_negatives", "types", "itm": {"overall",
            "count", "by_type": {type: {"accuracy", "count"}}}, "itc": {...}, "failures_picture"}``, accuracies as
            fractions (a scorer the model lacks is left out; ``failures_picture`` is None when nothing failed).
        scores: after ``test``: ``{scorer: [N] positive scores, "<scorer>_negatives": [M] negative scores}`` by
            global example / negative index, CPU (NaN where not scored, e.g. under ``limit_test_batches``).
    """

    def __init__(
        self,
        init_from: str,
        tokenizer: str | None = None,
        image_size: int | None = None,
        max_words: int | None = None,
        max_length: int | None = None,
        batch_size: int = 256,
        num_failures: int = 8,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"model.batch_size must be >= 1, got {batch_size}")
        if num_failures < 0:
            raise ValueError(f"model.num_failures must be >= 0, got {num_failures}")
        self.save_hyperparameters()
        overrides = {
            key: value
            for key, value in (("image_size", image_size), ("max_words", max_words), ("max_length", max_length))
            if value is not None
        }
        try:
            self.model = load(init_from, tokenizer=tokenizer, **overrides)
        except InputFileError as err:
            raise InputFileError(f"model.init_from: {err}") from None
        self.batch_size = batch_size
        self.num_failures = num_failures
        self.output_dir: Path | None = None
        self.results: dict[str, Any] = {}
        self.scores: dict[str, Tensor] = {}
        self._store: dict[str, list[Tensor]] = defaultdict(list)

    @classmethod
    def config_errors(cls, config: dict[str, Any], subcommand: str) -> list[str]:
        """Problems of a parsed ``vlalign evaluate hardneg`` config, all at once, before the model is loaded."""
        errors = []
        if subcommand != "test":
            errors.append(
                "hardneg evaluates the file data.json_file, so there is no separate validation split: run the test "
                "(drop --split val) and give the validation file as --data.json_file .../hardneg_val.json"
            )
        init_from = (config.get("model") or {}).get("init_from")
        if not init_from or not Path(str(init_from)).expanduser().exists():
            errors.append(
                f"model.init_from: {init_from} does not exist; give the model with --model PATH (a vlalign .ckpt, a "
                "folder from `vlalign export`, or a `vlalign convert reference` .safetensors file)"
            )
        json_file = (config.get("data") or {}).get("json_file")
        if not json_file or not Path(str(json_file)).expanduser().is_file():
            errors.append(
                f"data.json_file: {json_file} does not exist; give the hard-negative list with --data.json_file FILE "
                "(`vlalign data synth` writes hardneg_test.json)"
            )
        return errors

    # -- what the data module asks -------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """The side of the images the model evaluates (the data module resizes to it)."""
        return self.model.image_size

    @property
    def image_transform(self) -> Any:
        """The model's evaluation transform (the data module applies it in its workers)."""
        return self.model.image_transform

    @property
    def scorers(self) -> tuple[str, ...]:
        """The scorers this model has, in report order: ``itm`` (an ITM head), ``itc`` (ITC projections)."""
        return tuple(name for name in SCORERS if getattr(self.model, name) is not None)

    # -- scoring -------------------------------------------------------------------------------------------------------
    def score_batch(self, batch: dict[str, Any]) -> dict[str, tuple[Tensor, Tensor]]:
        """``{scorer: (positive scores [B], negative scores [M])}`` of one batch, negatives example-major.

        Captions are cleaned and tokenised with the model's own tokenizer and limits (:meth:`VisionLanguageModel
        .tokenize`), then scored by :func:`~vlalign.evaluation.hardneg.score_hardneg`.
        """
        negatives = batch["negatives"]
        pos_ids, pos_mask = self.model.tokenize(batch["positive"])
        neg_ids, neg_mask = self.model.tokenize([caption for group in negatives for caption in group])
        counts = torch.tensor([len(group) for group in negatives])
        neg_example = torch.repeat_interleave(torch.arange(len(negatives)), counts)
        scores = score_hardneg(
            self.model,
            batch["image"],
            pos_ids,
            pos_mask,
            neg_ids,
            neg_mask,
            neg_example,
            batch_size=self.batch_size,
            image_batch_size=max(1, batch["image"].shape[0]),
        )
        return {name: pair for name in self.scorers if (pair := scores.scores(name)) is not None}

    def on_test_epoch_start(self) -> None:
        self._store.clear()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        device = batch["index"].device  # gathered across processes on the module's device
        self._store["index"].append(batch["index"])
        self._store["negative_index"].append(batch["negative_index"])
        for name, (positive, negative) in self.score_batch(batch).items():
            self._store[name].append(positive.float().to(device))
            self._store[f"{name}_negatives"].append(negative.float().to(device))

    # -- report --------------------------------------------------------------------------------------------------------
    def _dataset(self) -> Any:
        loaders = self.trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        dataset = getattr(loader, "dataset", None)
        if not all(hasattr(dataset, key) for key in ("examples", "negative_example", "negative_type", "types")):
            raise TypeError(
                "HardNegativeEvaluation needs the test data of vlalign.datamodules.hardneg.HardNegativeDataModule "
                f"(a HardNegativeDataset), got {type(dataset).__name__}"
            )
        return dataset

    def gather_scores(self, num_examples: int, num_negatives: int) -> dict[str, Tensor]:
        """Every process's scores placed by global index (a distributed sampler's padding repeats land on their own
        slot, counted once): per scorer ``[num_examples]`` positive and ``[num_negatives]`` negative scores on the
        CPU, NaN where nothing was scored."""
        store = {key: torch.cat(values) for key, values in self._store.items()}
        self._store.clear()
        if not store:
            return {}
        store = {key: all_gather_variable(value).cpu() for key, value in store.items()}
        out: dict[str, Tensor] = {}
        for name in self.scorers:
            if name in store:
                out[name] = torch.full((num_examples,), float("nan"))
                out[name][store["index"]] = store[name]
                out[f"{name}_negatives"] = torch.full((num_negatives,), float("nan"))
                out[f"{name}_negatives"][store["negative_index"]] = store[f"{name}_negatives"]
        return out

    def on_test_epoch_end(self) -> None:
        dataset = self._dataset()
        negative_example = torch.as_tensor(dataset.negative_example, dtype=torch.long)
        self.scores = self.gather_scores(len(dataset), len(negative_example))
        self.results = {}
        if not self.scores:
            log.warning("hard-negative evaluation scored no example (empty test data, or limit_test_batches=0)")
            return
        scored = ~torch.isnan(self.scores[self.scorers[0]])
        kept = scored[negative_example].nonzero().squeeze(1)  # negatives of scored examples (all, unless limited)
        kept_types = [dataset.negative_type[k] for k in kept.tolist()]
        results: dict[str, Any] = {
            "task": "hardneg",
            "json_file": str(getattr(dataset, "json_file", "")),
            "num_examples": int(scored.sum()),
            "num_negatives": len(kept),
            "types": [kind for kind in dataset.types if kind in set(kept_types)],
        }
        for name in self.scorers:
            results[name] = hardneg_accuracy(
                self.scores[name],
                self.scores[f"{name}_negatives"][kept],
                negative_example[kept],
                kept_types,
                type_names=dataset.types,
            )
            self.log(f"test/hardneg_{name}_acc", float(results[name]["overall"]), rank_zero_only=True)
            for kind, values in results[name]["by_type"].items():
                self.log(f"test/hardneg_{name}_acc/{kind}", float(values["accuracy"]), rank_zero_only=True)
        for kind, values in results[self.scorers[0]]["by_type"].items():
            self.log(f"test/hardneg_count/{kind}", float(values["count"]), rank_zero_only=True)
        results["failures_picture"] = self._failures_picture(dataset, negative_example, kept)
        self.results = results

    def failures(self, negative_example: Tensor, kept: Tensor, scorer: str) -> list[tuple[int, int]]:
        """The ``num_failures`` most confident failures of ``scorer`` among the ``kept`` negatives:
        ``[(example index, global index of the negative it preferred)]``, largest margin first
        (:func:`~vlalign.evaluation.hardneg.select_failures`)."""
        chosen = select_failures(
            self.scores[scorer], self.scores[f"{scorer}_negatives"][kept], negative_example[kept], self.num_failures
        )
        negatives = kept[chosen]
        return list(zip(negative_example[negatives].tolist(), negatives.tolist(), strict=True))

    def _failures_picture(self, dataset: Any, negative_example: Tensor, kept: Tensor) -> str | None:
        """Draw the failures of the first scorer into ``output_dir`` or the run folder (``hardneg_failures.png``)
        and TensorBoard, on global rank zero; returns the PNG's path (None when nothing failed, ``num_failures`` is
        0, on other ranks)."""
        if not self.num_failures or not self.trainer.is_global_zero:
            return None
        scorer = self.scorers[0]
        chosen = self.failures(negative_example, kept, scorer)
        if not chosen:
            return None
        from vlalign.evaluation.pictures import hardneg_failures

        examples = [dataset.examples[e] for e, _ in chosen]
        picture = hardneg_failures(
            [example.image for example in examples],
            [example.positive for example in examples],
            [dataset.negative_caption[k] for _, k in chosen],
            [(float(self.scores[scorer][e]), float(self.scores[f"{scorer}_negatives"][k])) for e, k in chosen],
            types=[dataset.negative_type[k] for _, k in chosen],
            scorer=scorer.upper(),
        )
        folder = output_folder(self.trainer, self.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / FAILURES_FILE
        picture.save(path)
        experiment = getattr(self.logger, "experiment", None) if self.logger is not None else None
        if hasattr(experiment, "add_image"):
            pixels = np.asarray(picture.convert("RGB"))
            experiment.add_image("test/hardneg_failures", pixels, self.global_step, dataformats="HWC")
        return str(path)


register_task(
    TaskSpec(
        name="hardneg",
        module="vlalign.tasks.hardneg.HardNegativeEvaluation",
        datamodule="vlalign.datamodules.hardneg.HardNegativeDataModule",
        config="hardneg.yaml",
        description="hard-negative captions (colour, shape, relation, binding swaps): ITM / ITC accuracy per edit type",
        trains=False,
    )
)
