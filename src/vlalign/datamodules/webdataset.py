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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from vlalign.data.transforms import BadSampleError
from vlalign.datamodules.base import PretrainDataModule
from vlalign.datamodules.collate import (
    CAPTION_ENCODING,
    SHARD_ERROR,
    PretrainCollate,
    SampleProcessor,
    SkipGuard,
    SkippedSample,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
# Consecutive unreadable shards (no batch in between) after which a stream gives up instead of spinning forever.
_MAX_SHARD_ERRORS_PER_BATCH = 1000
#: Batch entry ``(role, records read, batches made, epoch)``: where the producing stream stood after this batch. The
#: data module pops it before the batch reaches the model and keeps the latest per role, to resume mid-epoch.
POSITION_KEY = "stream_position"


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


@contextmanager
def _sample_rng(seed: int, isolate: bool) -> Iterator[random.Random]:
    """Seed the generators one record's augmentation draws from (torch CPU, Python, NumPy) from ``seed``.

    Augmentations then depend only on (seed, epoch, rank, role, record index): identical after a resume that
    skipped records undecoded, and independent of how many batches were prefetched. ``isolate`` restores the
    global states afterwards, for streams read in the training process itself (``num_workers=0``).
    """
    if isolate:
        saved = torch.default_generator.get_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield random.Random(seed + 1)
    finally:
        if isolate:
            torch.default_generator.set_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


class _RecordCursor:
    """Iterator over a stream's raw records that first drops ``start`` of them undecoded, then counts the rest."""

    def __init__(self, records: Iterator[dict[str, Any]], start: int, skipped: Counter[str]) -> None:
        self.records = records
        self.position = start  # records consumed so far, the dropped ones included
        self._drop = start
        self._skipped = skipped

    def __iter__(self) -> _RecordCursor:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._drop:
            dropped = sum(1 for _ in itertools.islice(self.records, self._drop))
            if dropped < self._drop:
                log.warning("resume: the stream ended after %d of %d records to skip", dropped, self._drop)
            self._drop = 0
            self._skipped.clear()  # shard errors met again while skipping were counted before the interruption
        record = next(self.records)
        self.position += 1
        return record


class _SampleSeeds:
    """Per-record generators for :meth:`ShardStream._batches`, keyed by the index of the record just read."""

    def __init__(self, cursor: _RecordCursor, isolate: bool, *parts: int | str) -> None:
        self.cursor = cursor
        self.isolate = isolate
        self.parts = parts

    def sample(self) -> Any:
        return _sample_rng(stable_seed(*self.parts, self.cursor.position - 1), self.isolate)


def _mix(
    streams: list[Iterator[dict[str, Any]]], weights: list[float], longest: bool, rng: random.Random
) -> Iterator[dict[str, Any]]:
    """``wds.RandomMix`` with a seeded generator instead of Python's global one, so the mix is reproducible."""
    streams, weights = list(streams), list(weights)
    while streams:
        index = rng.choices(range(len(streams)), weights=weights)[0]
        try:
            yield next(streams[index])
        except StopIteration:
            if not longest:
                return
            del streams[index], weights[index]


@dataclass
class _StreamPosition:
    """Per worker role: ``[records read, batches made]`` after the role's latest batch that reached the model."""

    epoch: int
    roles: list[list[int]]
    last_role: int | None = None


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def raw_image(sample: dict[str, Any]) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    return None


def raw_caption(sample: dict[str, Any]) -> bytes | str | None:
    """The caption from ``KEY.txt`` (raw bytes: :class:`SampleProcessor` decodes them strictly as UTF-8), else
    from ``KEY.json``'s "caption" field (img2dataset writes both); None when there is none.

    Raises :class:`BadSampleError` ("caption_encoding") when ``KEY.json`` is not valid Unicode.
    """
    if "txt" in sample:
        return bytes(sample["txt"])
    if "json" in sample:
        try:
            caption = json.loads(sample["json"]).get("caption")
        except UnicodeDecodeError as err:
            raise BadSampleError(CAPTION_ENCODING, f"KEY.json is not UTF-8: {err}") from err
        except (ValueError, AttributeError):
            return None
        return caption if isinstance(caption, str) else None
    return None


class _ShardErrorCounter:
    """webdataset exception handler: count an unreadable shard or tar member, and go on with the next one."""

    def __init__(self, skipped: Counter[str], guard: SkipGuard | None = None) -> None:
        self.skipped = skipped
        self.guard = guard

    def __call__(self, exn: Exception) -> bool:
        self.skipped[SHARD_ERROR] += 1
        log.warning("skipping unreadable shard data: %r", exn)
        if self.guard is not None:
            # webdataset appends the shard's url to the exception's args
            url = exn.args[-1] if len(exn.args) > 1 and isinstance(exn.args[-1], str) else None
            self.guard.bad(SHARD_ERROR, where=url)
        if self.skipped[SHARD_ERROR] > _MAX_SHARD_ERRORS_PER_BATCH:
            raise RuntimeError(f"{self.skipped[SHARD_ERROR]} shard errors without a single batch") from exn
        return True


class ShardStream(IterableDataset):
    """Stream of full training batches for one process, read from one or more shard sources.

    Exact-epoch mode shuffles the shard list with a seed shared by all processes, then gives each
    (rank, worker) pair every ``world_size * num_workers``-th shard, so an epoch reads every sample once.
    Resampled mode draws shards with replacement, independently per (rank, worker), and stops after
    ``batches_per_epoch`` batches for this process, spread evenly over the workers.

    ``guard``, when given, counts every record read and skipped (an unreadable shard counts as one) and stops
    the stream with :class:`~vlalign.datamodules.collate.TooManyBadSamples` when the data is mostly broken.
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
        guard: SkipGuard | None = None,
    ) -> None:
        super().__init__()
        # Set by the data module on a resumed run: {"epoch", "offset", "roles": [[records, batches], ...]}.
        self.resume: dict[str, Any] | None = None
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
        self.guard = guard
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
        resume, self.resume = self.resume, None
        if resume is not None and resume["epoch"] != epoch:
            resume = None
        # The DataLoader takes batches from workers 0, 1, ... in turn. A resumed run rotates which part of the
        # epoch ("role") each worker reads, so that its worker 0 continues the role whose turn was next.
        role = (worker + (resume["offset"] if resume else 0)) % num_workers
        records_done, batches_done = resume["roles"][role] if resume else (0, 0)
        skipped: Counter[str] = Counter()
        handler = _ShardErrorCounter(skipped, self.guard)
        streams = [self._source_samples(index, epoch, role, num_workers, handler) for index in range(len(self.urls))]
        if len(streams) == 1:
            samples: Iterator[dict[str, Any]] = streams[0]
        else:
            # Exact epochs drain every source; resampled sources never end, so `longest` does not matter there.
            mix_rng = random.Random(stable_seed(self.seed, epoch, self.rank, role, "mix"))
            samples = _mix(streams, self.weights, longest=not self.resampled, rng=mix_rng)
        cursor = _RecordCursor(samples, records_done, skipped)
        seeds = _SampleSeeds(cursor, info is None, self.seed, epoch, self.rank, role, "sample")
        batches: Iterable[dict[str, Any]] = self._batches(cursor, skipped, seeds)
        if self.batches_per_epoch is not None:
            share, extra = divmod(self.batches_per_epoch, num_workers)
            batches = itertools.islice(batches, max(0, share + (1 if role < extra else 0) - batches_done))
        for made, batch in enumerate(batches, start=batches_done + 1):
            batch[POSITION_KEY] = (role, cursor.position, made, epoch)
            yield batch

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
        self, samples: Iterator[dict[str, Any]], skipped: Counter[str], seeds: _SampleSeeds
    ) -> Iterator[dict[str, Any]]:
        """Decode, skip-and-count, and batch; a final partial batch is dropped (the model wants full ones)."""
        pending = []
        produced = False
        for raw in samples:
            key = raw.get("__key__", "?")
            try:
                with seeds.sample() as rng:
                    item = self.processor(key, raw_image(raw), raw_caption(raw), rng)
            except BadSampleError as err:
                item = SkippedSample(key, err.reason)
            if isinstance(item, SkippedSample):
                skipped[item.reason] += 1
                if self.guard is not None:
                    self.guard.bad(item.reason, where=raw.get("__url__"))
                continue
            if self.guard is not None:
                self.guard.good()
            pending.append(item)
            if len(pending) == self.batch_size:
                batch = self.collate(pending, skipped)
                skipped.clear()
                pending = []
                produced = True
                yield batch
        if not produced and not pending and self.guard is not None and self.guard.seen:
            self.guard.check(force=True)  # every record read was unusable: not one batch came out of them


class ShardLoader(DataLoader):
    """DataLoader that tells its :class:`ShardStream` which epoch starts, so the shard order changes per epoch.

    Needed because Lightning only forwards the epoch to samplers, which iterable datasets do not have. With
    persistent workers the workers' own copies count epochs themselves and stay in step. ``next_epoch`` is
    set from the trainer, so a resumed run or a reloaded loader continues the sequence instead of restarting.
    """

    next_epoch = 0

    def __iter__(self) -> Any:
        epoch = self.next_epoch
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
        self.next_epoch += 1
        # Starting an iterator draws the workers' base seed. From the loader's own generator, seeded per epoch, it
        # leaves the global generator alone (a resumed run restores that one from the checkpoint) and is the same
        # for an epoch however the run got there.
        if self.generator is not None:
            self.generator.manual_seed(stable_seed(self.dataset.seed, "loader", epoch))  # type: ignore[attr-defined]
        return super().__iter__()

    # The position inside an epoch is checkpointed by ShardDataModule (it sees which batches reached the model,
    # prefetched ones excluded); these tell Lightning that this loader resumes mid-epoch.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


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
        self._position: _StreamPosition | None = None  # this process's place in the current epoch
        self._loaded_position: dict[str, Any] | None = None  # from a checkpoint, until the train loader is built
        self._train_loader_built = False
        self._epoch_mismatch_warned = False

    @property
    def data_source(self) -> str:
        return "train_shards " + ", ".join(source.urls for source in self.sources)

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
            readers = world_size * max(1, self.num_workers)
            for source in self.sources:
                count = len(expand_urls(source.urls))
                if count < readers:  # a rank without shards would wait forever in the other ranks' collectives
                    raise ValueError(
                        f"train_shards {source.urls!r} has {count} shard(s) for {readers} readers "
                        f"({world_size} processes x {max(1, self.num_workers)} workers) in exact-epoch mode: "
                        "set data.resampled: true (with samples_per_epoch), or use more shards or fewer workers"
                    )
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
            guard=self.build_skip_guard(),
        )
        loader = ShardLoader(stream, batch_size=None, generator=torch.Generator(), **self.loader_kwargs())
        saved, self._loaded_position = self._loaded_position, None
        loader.next_epoch = self._starting_epoch(saved)
        stream.resume = self._resume_point(saved, loader.next_epoch, rank, world_size)
        self._train_loader_built = True
        return loader

    # -- mid-epoch resumption ----------------------------------------------------------------------------------
    # Lightning builds (and starts iterating) the training loader before it restores the loops of a checkpoint
    # whenever the recipe asks for ``trainer.estimated_stepping_batches`` in ``configure_optimizers``, and then keeps
    # that loader. ``trainer.current_epoch`` still reads 0 at that moment, so the checkpoint itself records the epoch
    # a resumed run trains in (``next_epoch``) and the loader is built for that epoch, whenever it is built.
    @property
    def _roles(self) -> int:
        return max(1, self.num_workers)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record where the stream stands after each training batch that reaches the model."""
        if isinstance(batch, dict) and POSITION_KEY in batch:
            role, records, made, stream_epoch = batch.pop(POSITION_KEY)
            epoch = self.trainer.current_epoch if self.trainer is not None else int(stream_epoch)
            if int(stream_epoch) != epoch and not self._epoch_mismatch_warned:
                self._epoch_mismatch_warned = True
                rank_zero_warn(
                    f"the training data stream reads epoch {int(stream_epoch)} while the trainer is in epoch {epoch}: "
                    "the data order differs from an uninterrupted run (please report this with your Lightning version)"
                )
            if self._position is None or self._position.epoch != epoch:
                self._position = _StreamPosition(epoch, [[0, 0] for _ in range(self._roles)])
            self._position.roles[role] = [int(records), int(made)]
            self._position.last_role = int(role)
        return batch

    def _epoch_finished(self) -> bool:
        """Whether the trainer has taken the last batch of its current epoch (a checkpoint then resumes the next).

        This is Lightning's own test (``batch_progress.is_last_batch``, set from the data fetcher, which looks one
        batch ahead; ``limit_train_batches`` included).
        """
        fit_loop = getattr(self.trainer, "fit_loop", None)
        progress = getattr(getattr(fit_loop, "epoch_loop", None), "batch_progress", None)
        return bool(getattr(progress, "is_last_batch", False))

    def state_dict(self) -> dict[str, Any]:
        """The epoch a resumed run trains in and, when that is the current epoch, the records and batches consumed in
        it per process and per worker role (checkpointed)."""
        if self.trainer is None:
            return {}
        epoch = self.trainer.current_epoch
        position = self._position
        rows: list[list[int]] | None = None
        rank, world_size = self.process_group()
        if position is not None and position.last_role is not None:  # the same on every rank: batches in lockstep
            flat = [position.last_role, *itertools.chain.from_iterable(position.roles)]
            if world_size > 1:  # every rank saves; each read its own records
                strategy = self.trainer.strategy
                local = torch.tensor(flat, dtype=torch.long, device=strategy.root_device)
                rows = strategy.all_gather(local).reshape(world_size, -1).tolist()
            else:
                rows = [flat]
        in_epoch = position is not None and position.epoch == epoch
        if in_epoch and self._epoch_finished():
            return {"shard_stream": {"next_epoch": epoch + 1}}
        if not in_epoch or rows is None:
            return {"shard_stream": {"next_epoch": epoch}}  # no batch of this epoch yet: it starts afresh
        ranks = [{"last_role": row[0], "roles": [row[i : i + 2] for i in range(1, len(row), 2)]} for row in rows]
        return {
            "shard_stream": {
                "next_epoch": epoch,
                "epoch": epoch,
                "world_size": world_size,
                "num_workers": self._roles,
                "ranks": ranks,
            }
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_position = state_dict.get("shard_stream")
        if self._loaded_position is not None and self._train_loader_built:
            rank_zero_warn(
                "the checkpoint's data position arrived after the training loader was built (a strategy that "
                "restores checkpoints after setup): the resumed epoch restarts from its beginning, so some of its "
                "samples are seen twice"
            )

    def _starting_epoch(self, saved: dict[str, Any] | None) -> int:
        """The epoch the training loader starts with: the checkpoint's next epoch, else (no checkpoint, or one written
        before ``next_epoch`` existed) the trainer's epoch."""
        if saved is not None and "next_epoch" in saved:
            return int(saved["next_epoch"])
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _resume_point(
        self, saved: dict[str, Any] | None, epoch: int, rank: int, world_size: int
    ) -> dict[str, Any] | None:
        """What this process's stream skips to continue the checkpointed epoch; None to start ``epoch`` afresh."""
        if saved is None or "ranks" not in saved or saved.get("epoch") != epoch:
            return None  # no checkpoint, or it was taken at the end of its epoch or before its first batch
        if (saved["world_size"], saved["num_workers"]) != (world_size, self._roles):
            rank_zero_warn(
                f"the checkpoint's data position is for {saved['world_size']} process(es) x {saved['num_workers']} "
                f"reader(s) (num_workers), this run has {world_size} x {self._roles}: epoch {epoch} restarts from "
                "its beginning, so some of its samples are seen twice. Resume with the same layout to avoid this."
            )
            return None
        mine = saved["ranks"][rank]
        roles = [list(map(int, entry)) for entry in mine["roles"]]
        self._position = _StreamPosition(epoch, [list(entry) for entry in roles], mine["last_role"])
        return {"epoch": epoch, "offset": (mine["last_role"] + 1) % self._roles, "roles": roles}
