"""Pre-training from WebDataset tar shards in the layout img2dataset writes (``KEY.jpg``, ``KEY.txt``, ``KEY.json``).

Decoding, skipping and batching all run inside the DataLoader worker, so the count of bad samples a worker
skipped travels with the batch it produced (``batch["skipped"]``) and the training loop can log it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from vlalign.datamodules.base import PretrainDataModule
from vlalign.datamodules.collate import SHARD_ERROR, PretrainCollate, SampleProcessor, SkippedSample

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
# Consecutive unreadable shards (no batch in between) after which a stream gives up instead of spinning forever.
_MAX_SHARD_ERRORS_PER_BATCH = 1000


@dataclass
class ShardSource:
    """One collection of shards and its sampling weight when several are mixed.

    ``urls`` is a brace pattern such as ``data/{000000..000099}.tar``; several patterns may be joined by ``::``.
    """

    urls: str
    weight: float = 1.0


def stable_seed(*parts: int | str) -> int:
    """A seed from ``parts`` that every process computes alike (``hash()`` of strings differs per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def raw_image(sample: dict[str, Any]) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    return None


def raw_caption(sample: dict[str, Any]) -> str | None:
    """The caption from ``KEY.txt``, else from ``KEY.json``'s "caption" field (img2dataset writes both)."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8", errors="replace")
    if "json" in sample:
        try:
            caption = json.loads(sample["json"]).get("caption")
        except (ValueError, AttributeError):
            return None
        return caption if isinstance(caption, str) else None
    return None


class _ShardErrorCounter:
    """webdataset exception handler: count an unreadable shard or tar member, and go on with the next one."""

    def __init__(self, skipped: Counter[str]) -> None:
        self.skipped = skipped

    def __call__(self, exn: Exception) -> bool:
        self.skipped[SHARD_ERROR] += 1
        log.warning("skipping unreadable shard data: %r", exn)
        if self.skipped[SHARD_ERROR] > _MAX_SHARD_ERRORS_PER_BATCH:
            raise RuntimeError(f"{self.skipped[SHARD_ERROR]} shard errors without a single batch") from exn
        return True


class ShardStream(IterableDataset):
    """Stream of full training batches for one process, read from one or more shard sources.

    Exact-epoch mode shuffles the shard list with a seed shared by all processes, then gives each
    (rank, worker) pair every ``world_size * num_workers``-th shard, so an epoch reads every sample once.
    Resampled mode draws shards with replacement, independently per (rank, worker), and stops after
    ``batches_per_epoch`` batches for this process, spread evenly over the workers.
    """

    def __init__(
        self,
        sources: list[ShardSource],
        processor: SampleProcessor,
        collate: PretrainCollate,
        batch_size: int,
        resampled: bool,
        shuffle_buffer: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        batches_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        self.urls = [expand_urls(source.urls) for source in sources]
        self.weights = [source.weight for source in sources]
        self.processor = processor
        self.collate = collate
        self.batch_size = batch_size
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch on this process; known only in resampled mode (Lightning then sizes the epoch)."""
        if not self.resampled or self.batches_per_epoch is None:
            raise TypeError("an exact-epoch shard stream has no length known in advance")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Each process (main or worker) holds its own copy; counting here keeps persistent workers in step.
        epoch, self.epoch = self.epoch, self.epoch + 1
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skipped: Counter[str] = Counter()
        handler = _ShardErrorCounter(skipped)
        streams = [self._source_samples(index, epoch, worker, num_workers, handler) for index in range(len(self.urls))]
        if len(streams) == 1:
            samples: Iterator[dict[str, Any]] = streams[0]
        else:
            # Exact epochs drain every source; resampled sources never end, so `longest` does not matter there.
            samples = iter(wds.RandomMix(streams, probs=self.weights, longest=not self.resampled))
        rng = random.Random(stable_seed(self.seed, epoch, self.rank, worker, "masks"))
        batches = self._batches(samples, skipped, rng)
        if self.batches_per_epoch is not None:
            share, extra = divmod(self.batches_per_epoch, num_workers)
            batches = itertools.islice(batches, share + (1 if worker < extra else 0))
        yield from batches

    def _source_samples(
        self, index: int, epoch: int, worker: int, num_workers: int, handler: _ShardErrorCounter
    ) -> Iterator[dict[str, Any]]:
        urls = self.urls[index]
        if self.resampled:
            pick = random.Random(stable_seed(self.seed, epoch, self.rank, worker, index, "shards"))
            shards: Iterator[dict[str, str]] = ({"url": pick.choice(urls)} for _ in itertools.count())
        else:
            order = list(urls)
            random.Random(stable_seed(self.seed, epoch, index, "shards")).shuffle(order)
            slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
            shards = ({"url": url} for url in itertools.islice(order, slot, None, slots))
        samples = wds.tarfile_samples(shards, handler=handler)
        if self.shuffle_buffer > 1:
            rng = random.Random(stable_seed(self.seed, epoch, self.rank, worker, index, "samples"))
            samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(samples)
        return iter(samples)

    def _batches(
        self, samples: Iterator[dict[str, Any]], skipped: Counter[str], rng: random.Random
    ) -> Iterator[dict[str, Any]]:
        """Decode, skip-and-count, and batch; a final partial batch is dropped (the model wants full ones)."""
        pending = []
        for raw in samples:
            item = self.processor(raw["__key__"], raw_image(raw), raw_caption(raw), rng)
            if isinstance(item, SkippedSample):
                skipped[item.reason] += 1
                continue
            pending.append(item)
            if len(pending) == self.batch_size:
                batch = self.collate(pending, skipped)
                skipped.clear()
                pending = []
                yield batch


class ShardLoader(DataLoader):
    """DataLoader that tells its :class:`ShardStream` which epoch starts, so the shard order changes per epoch.

    Needed because Lightning only forwards the epoch to samplers, which iterable datasets do not have. With
    persistent workers the workers' own copies count epochs themselves and stay in step. ``next_epoch`` is
    set from the trainer, so a resumed run or a reloaded loader continues the sequence instead of restarting.
    """

    next_epoch = 0

    def __iter__(self) -> Any:
        self.dataset.set_epoch(self.next_epoch)  # type: ignore[attr-defined]
        self.next_epoch += 1
        return super().__iter__()


def check_sources(sources: list[ShardSource]) -> None:
    """Fail at configuration time on bad weights, empty patterns and missing local shards."""
    if not sources:
        raise ValueError("train_shards must name at least one shard source")
    for source in sources:
        if source.weight <= 0:
            raise ValueError(f"train_shards: weight of {source.urls!r} must be > 0, got {source.weight}")
        urls = expand_urls(source.urls)
        if not urls:
            raise ValueError(f"train_shards: {source.urls!r} expands to no shards")
        missing = [url for url in urls if _is_local(url) and not Path(url).expanduser().is_file()]
        if missing:
            raise FileNotFoundError(f"train_shards: {len(missing)} shard(s) not found, first: {missing[0]}")


class ShardDataModule(PretrainDataModule):
    """Pre-training from WebDataset shards; see :class:`PretrainDataModule` for the shared arguments.

    Every training batch has exactly ``batch_size`` samples: bad samples are skipped (counted in
    ``batch["skipped"]``) and each worker's last partial batch is dropped.

    Args:
        train_shards: A brace-expanded shard pattern (``data/{000000..000099}.tar``, ``::`` joins several), or
            a list of :class:`ShardSource` to mix by weight.
        shuffle_buffer: Samples held in each worker's shuffle buffer (0 or 1: no sample shuffling).
        resampled: Draw shards with replacement (infinite stream) and end an epoch after ``samples_per_epoch``;
            otherwise each epoch reads every sample exactly once (with several sources, the weights only set
            how their samples interleave). Under DDP prefer resampled: exact epochs can give ranks different
            batch counts.
        samples_per_epoch: Samples per epoch summed over all processes; each process runs
            ``samples_per_epoch // (batch_size * world_size)`` batches. Required when ``resampled``; without
            it, an upper bound on an exact epoch.
    """

    def __init__(
        self,
        train_shards: str | list[ShardSource],
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        sources = [ShardSource(train_shards)] if isinstance(train_shards, str) else list(train_shards)
        check_sources(sources)
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if resampled and samples_per_epoch is None:
            raise ValueError("samples_per_epoch is required when resampled=True (resampled streams never end)")
        if samples_per_epoch is not None and samples_per_epoch < self.batch_size:
            raise ValueError(f"samples_per_epoch ({samples_per_epoch}) must be >= batch_size ({self.batch_size})")
        self.sources = sources
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.samples_per_epoch = samples_per_epoch

    def train_dataloader(self) -> ShardLoader:
        rank, world_size = self.process_group()
        batches = None
        if self.samples_per_epoch is not None:
            batches = self.samples_per_epoch // (self.batch_size * world_size)
            if batches == 0:
                raise ValueError(
                    f"samples_per_epoch ({self.samples_per_epoch}) is less than one batch per process "
                    f"(batch_size {self.batch_size} x {world_size} processes)"
                )
        if world_size > 1 and not self.resampled:
            rank_zero_warn("exact-epoch shard reading under DDP can give ranks unequal batch counts; use resampled")
        stream = ShardStream(
            self.sources,
            self.build_processor(),
            self.build_collate(),
            batch_size=self.batch_size,
            resampled=self.resampled,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            batches_per_epoch=batches,
        )
        loader = ShardLoader(stream, batch_size=None, **self.loader_kwargs())
        loader.next_epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return loader
