"""Shared base of the pre-training data modules: tokenizer, transforms, batching and retrieval evaluation.

Subclasses only decide where training records come from (shards, JSON lists); everything that shapes a batch
lives here once, so both storage formats produce identical batches.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from vlalign.data.annotations import InputFileNotFound
from vlalign.data.masking import BlockMaskGenerator
from vlalign.data.tokenization import VocabInfo, load_tokenizer, vocab_info
from vlalign.data.transforms import DEFAULT_MAX_PIXELS, AugmentConfig, EvalTransform, PretrainTransform
from vlalign.datamodules.collate import PretrainCollate, SampleProcessor, SkipGuard
from vlalign.datamodules.retrieval import RetrievalCollate, RetrievalEvalDataset


def require_path(path: str | Path, key: str) -> Path:
    """Return ``path`` as a Path, or raise :class:`InputFileNotFound` (a ``FileNotFoundError``) naming the config
    key and the path."""
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise InputFileNotFound(f"{key}: {resolved} does not exist (set data.{key} to an existing path)")
    return resolved


def require_positive(value: int, key: str, minimum: int = 1) -> None:
    if value < minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {value}")


#: Signals that stop a job and that schedulers, ``timeout``, container runtimes and terminals (Ctrl-C) send to a
#: whole process group. DataLoader workers ignore them: the training process alone decides (PreemptionCheckpoint
#: saves and exits; Ctrl-C ends the run) and then shuts its workers down through the DataLoader, and a worker whose
#: training process is gone exits by itself (PyTorch's worker watchdog). SIGKILL still ends a worker at once.
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name)
)


@dataclass(frozen=True)
class WorkerInit:
    """``worker_init_fn`` of every loader of the data modules: ignore :data:`STOP_SIGNALS`, then seed.

    Without it, a signal sent to the process group kills the workers with the default action before the training
    process can save: it fails with ``DataLoader worker ... killed by signal`` and no checkpoint. Lightning adds its
    own per-worker seeding (``seed_everything(workers=True)``, as the CLI does) only to loaders without a
    ``worker_init_fn``, so this one runs it itself; ``then`` chains any further function. Picklable (spawn).

    Args:
        rank: Global rank of the process that owns the loader (for Lightning's worker seeds).
        then: Called with the worker id afterwards.
    """

    rank: int = 0
    then: Callable[[int], None] | None = None

    def __call__(self, worker_id: int) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if int(os.environ.get("PL_SEED_WORKERS", 0)):
            pl_worker_init_function(worker_id, rank=self.rank)
        if self.then is not None:
            self.then(worker_id)


class PretrainDataModule(L.LightningDataModule):
    """Base pre-training data module; see :class:`ShardDataModule` and :class:`JsonCaptionDataModule`.

    Args:
        tokenizer: Directory of a Hugging Face tokenizer saved with ``save_pretrained`` (local only).
        val_retrieval: Karpathy-layout retrieval JSON (one entry per image, caption list) evaluated at validation.
        test_retrieval: Same layout, evaluated by ``test``.
        image_root: Directory that relative image paths in JSON files are resolved against; by default each
            JSON file's own directory. Absolute paths are used as they are.
        image_size: Side of the square training and evaluation images.
        batch_size: Training batch size per process (every shard batch is full; see the subclasses).
        eval_batch_size: Images per retrieval evaluation batch (all their captions come along).
        num_workers: DataLoader worker processes.
        max_words: Captions are cut to this many words by ``pre_caption``.
        max_length: Training token length including [CLS] (reference: 25); batches pad to the longest caption.
        eval_max_length: Evaluation captions are padded and truncated to exactly this length (reference: 30).
        augment: Training augmentation (crop scale, flip, RandAugment, left/right swap).
        tokenizer_view_size: When set, each sample also carries the augmented view resized to this side, in
            [0, 1], as input for an image tokenizer (SIMLA's masked-image targets).
        mask_patch_size: When set, each sample carries a BEiT block mask over the
            ``image_size // mask_patch_size`` square patch grid, flattened row-major as ``patch_mask``.
        pin_memory: Pin host memory of batches for faster copies to the GPU.
        persistent_workers: Keep workers alive between epochs (only applies when ``num_workers > 0``).
        seed: Base seed of the data order (shard shuffles, block masks); the same on every process.
        max_skip_fraction: Stop the run with :class:`~vlalign.datamodules.collate.TooManyBadSamples` when more
            than this fraction of the training records a data worker read were unusable (1.0: never stop).
        skip_check_after: Records a data worker must have read before ``max_skip_fraction`` applies.
        max_image_pixels: Images whose header declares more pixels are skipped as decompression bombs
            before any pixel is decoded.
    """

    def __init__(
        self,
        tokenizer: str,
        val_retrieval: str | None = None,
        test_retrieval: str | None = None,
        image_root: str | None = None,
        image_size: int = 256,
        batch_size: int = 64,
        eval_batch_size: int = 64,
        num_workers: int = 4,
        max_words: int = 30,
        max_length: int = 25,
        eval_max_length: int = 30,
        augment: AugmentConfig = AugmentConfig(),
        tokenizer_view_size: int | None = None,
        mask_patch_size: int | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
        max_skip_fraction: float = 0.1,
        skip_check_after: int = 1000,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__()
        for key, value in (("image_size", image_size), ("batch_size", batch_size), ("max_words", max_words)):
            require_positive(value, key)
        require_positive(eval_batch_size, "eval_batch_size")
        require_positive(num_workers, "num_workers", minimum=0)
        require_positive(max_length, "max_length", minimum=2)
        require_positive(eval_max_length, "eval_max_length", minimum=2)
        require_positive(skip_check_after, "skip_check_after")
        require_positive(max_image_pixels, "max_image_pixels")
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        if tokenizer_view_size is not None:
            require_positive(tokenizer_view_size, "tokenizer_view_size")
        if mask_patch_size is not None:
            require_positive(mask_patch_size, "mask_patch_size")
            if image_size % mask_patch_size:
                raise ValueError(f"image_size ({image_size}) must be a multiple of mask_patch_size ({mask_patch_size})")
        self.tokenizer_path = require_path(tokenizer, "tokenizer")
        self.val_retrieval = require_path(val_retrieval, "val_retrieval") if val_retrieval else None
        self.test_retrieval = require_path(test_retrieval, "test_retrieval") if test_retrieval else None
        self.image_root = require_path(image_root, "image_root") if image_root else None
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.max_words = max_words
        self.max_length = max_length
        self.eval_max_length = eval_max_length
        self.augment = replace(augment)
        self.tokenizer_view_size = tokenizer_view_size
        self.mask_patch_size = mask_patch_size
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.seed = seed
        self.max_skip_fraction = max_skip_fraction
        self.skip_check_after = skip_check_after
        self.max_image_pixels = max_image_pixels
        self.val_dataset: RetrievalEvalDataset | None = None
        self.test_dataset: RetrievalEvalDataset | None = None

    # -- tokenizer -------------------------------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """Loaded on first use, so building the module (and ``--help``) stays cheap."""
        return load_tokenizer(self.tokenizer_path)

    @property
    def vocab(self) -> VocabInfo:
        """Vocabulary size and special ids, linked into the model by the CLI."""
        return vocab_info(self.tokenizer)

    # -- per-sample processing -------------------------------------------------------------------------------
    @property
    def patch_grid(self) -> tuple[int, int] | None:
        if self.mask_patch_size is None:
            return None
        side = self.image_size // self.mask_patch_size
        return side, side

    def build_processor(self) -> SampleProcessor:
        """Decode + augment + mask one record; built fresh per loader so workers get their own copy."""
        transform = PretrainTransform(self.image_size, self.augment, self.tokenizer_view_size)
        grid = self.patch_grid
        mask_generator = BlockMaskGenerator(grid=grid) if grid is not None else None
        return SampleProcessor(transform, self.max_words, mask_generator, max_pixels=self.max_image_pixels)

    def build_collate(self, guard: SkipGuard | None = None) -> PretrainCollate:
        return PretrainCollate(self.tokenizer, self.max_length, guard)

    @property
    def data_source(self) -> str:
        """Where training records come from, as error messages name it; subclasses say more."""
        return type(self).__name__

    def build_skip_guard(self) -> SkipGuard:
        """A fresh skip counter; every pipeline copy (worker) gets its own through pickling."""
        return SkipGuard(self.max_skip_fraction, self.skip_check_after, self.data_source)

    def resolve_root(self, json_file: str | Path) -> Path:
        """Where relative image paths of ``json_file`` point: ``image_root`` if set, else the file's directory."""
        return self.image_root if self.image_root is not None else Path(json_file).parent

    def loader_kwargs(self) -> dict[str, Any]:
        """DataLoader options shared by every loader of this module (pinning only helps when there is a GPU).

        With workers, their ``worker_init_fn`` (:class:`WorkerInit`) makes them ignore the stop signals, so a
        SIGTERM / SIGUSR1 sent to the whole process group reaches only the training process's handler.
        """
        workers = self.num_workers
        kwargs: dict[str, Any] = {
            "num_workers": workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.persistent_workers and workers > 0,
        }
        if workers > 0:
            kwargs["worker_init_fn"] = WorkerInit(rank=self.process_group()[0])
        return kwargs

    def process_group(self) -> tuple[int, int]:
        """``(rank, world_size)`` of this process, read in the main process (workers may not see the group)."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    # -- retrieval evaluation --------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.val_retrieval is not None and self.val_dataset is None:
            self.val_dataset = self._retrieval_dataset(self.val_retrieval)
        if stage in (None, "test") and self.test_retrieval is not None and self.test_dataset is None:
            self.test_dataset = self._retrieval_dataset(self.test_retrieval)

    def _retrieval_dataset(self, json_file: Path) -> RetrievalEvalDataset:
        return RetrievalEvalDataset(
            json_file, self.resolve_root(json_file), EvalTransform(self.image_size), max_words=self.max_words
        )

    def _retrieval_loader(self, dataset: RetrievalEvalDataset | None) -> DataLoader | list:
        if dataset is None:
            return []
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=RetrievalCollate(self.tokenizer, self.eval_max_length),
            **self.loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader | list:
        """Retrieval loader over ``val_retrieval``; an empty list (no validation) when it is not set."""
        return self._retrieval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader | list:
        """Retrieval loader over ``test_retrieval``; an empty list when it is not set."""
        return self._retrieval_loader(self.test_dataset)
