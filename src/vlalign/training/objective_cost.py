"""Per-objective cost accounting: the time each objective's forward and backward takes and the peak memory it adds.

:class:`ObjectiveCostMonitor` (a callback the `vlalign` command adds to every run) measures one training batch in
``every_n_steps`` after ``warmup_steps`` unmeasured ones, logs ``cost/...`` scalars to TensorBoard, and at the end
of ``fit`` prints a table and writes ``<log dir>/objective_cost.json``. :class:`ObjectiveCostMeter` does the
measuring; the recipe calls it only on measured batches, so an unmeasured or disabled step runs exactly the code it
runs without accounting (no hook, no event, no extra host-device sync). Method and measured overhead:
docs/benchmarks.md (section "Per-objective cost accounting").

How a measured batch is cut into parts. The meter keeps a timeline of *marks* (a label and a timestamp); the time
from one mark to the next belongs to the first mark's label, so the parts always add up to the measured batch.

- **Forward.** Each objective's call is bracketed by marks. The shared features of
  :class:`~vlalign.objectives.context.StepContext` (online and momentum ViT passes, text encoder passes) are
  computed lazily by whichever objective asks first; they are bracketed too and go to the ``shared`` part, so the
  objective that happened to trigger them is charged only for its own work.
- **Backward** (one ``backward`` of the weighted total). The forward records the autograd sequence number (the
  creation counter of graph nodes) at each part boundary, so every node belongs to the part that created it. The
  engine runs the ready node with the highest sequence number first, and a node is ready once all its consumers,
  which were created after it, have run; so the backward runs the nodes in exactly the reverse of their creation
  order (checked node by node by ``tests/test_objective_cost.py``). After the forward the graph is walked once
  (:func:`backward_runs`); a pre-hook on the first node of each run of one part marks the part's start, and an engine
  callback marks the end of the backward. Gradient accumulation into a parameter goes to the run whose node
  completes that gradient. Approximation: on CUDA a run's time is the device time between the events recorded when
  its first node and the next run's first node are launched; nodes on different devices, and work on other streams
  (DDP's all-reduce), are not attributed separately.
- **Other**: everything else between the start and the end of the batch: the recipe's own work in
  ``training_step`` (loss sum, logging, non-finite check), the autograd engine's set-up and the backward of the loss
  sum, the optimizer step, EMA and queue updates, Lightning's per-batch hooks, and on measured batches the
  accounting's own graph walk (also reported alone as ``accounting_ms``). Waiting for the next batch of data is
  **not** included (the batch is measured from ``on_train_batch_start`` to ``on_train_batch_end``).
- **Peak memory** (CUDA only; ``None`` on other devices): for each part, the highest ``max_memory_allocated``
  during its forward minus the memory allocated when it started, not counting what the shared passes it triggered
  still hold (those count for ``shared``; for ``shared`` the largest of its passes). Measured batches reset the
  device's peak-memory statistics (``torch.cuda.reset_peak_memory_stats``) at each part boundary.

Timestamps: ``time.perf_counter`` on the CPU; on CUDA, ``torch.cuda.Event``\\ s recorded on the current stream and
read when ``Event.query()`` says they completed, usually one batch later (never a ``synchronize`` during training;
one at the end of ``fit`` to read the last ones).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from vlalign.errors import ConfigError

if TYPE_CHECKING:
    from vlalign.objectives.base import Objective, ObjectiveOutput
    from vlalign.objectives.context import StepContext

T = TypeVar("T")

#: File written into the run's log folder at the end of ``fit``.
COST_FILE = "objective_cost.json"
SHARED = "<shared>"  # internal labels: angle brackets, so no registered objective name can collide
OTHER = "<other>"
ACCOUNTING = "<accounting>"
FORWARD, BACKWARD, REST = "forward", "backward", "rest"
MIB = float(2**20)


# -- clocks and memory probes ----------------------------------------------------------------------------------------
class Clock(Protocol):
    """Where timestamps come from: ``stamp()`` now, ``ready`` once they can be read, ``elapsed_ms(a, b)``."""

    def stamp(self) -> Any: ...

    def ready(self, stamps: Sequence[Any]) -> bool: ...

    def elapsed_ms(self, start: Any, end: Any) -> float: ...

    def wait(self) -> None: ...


class HostClock:
    """``time.perf_counter``: right for CPU work, which runs when the host calls it."""

    def stamp(self) -> float:
        return time.perf_counter()

    def ready(self, stamps: Sequence[Any]) -> bool:
        return True

    def elapsed_ms(self, start: float, end: float) -> float:
        return (end - start) * 1e3

    def wait(self) -> None:
        return None


class CudaEventClock:
    """CUDA events on the current stream: recording never waits for the device, reading waits for nothing either
    (only events whose ``query()`` is True are read); ``wait`` synchronises, for the end of ``fit`` only."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def stamp(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ready(self, stamps: Sequence[torch.cuda.Event]) -> bool:
        return all(event.query() for event in stamps)

    def elapsed_ms(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return float(start.elapsed_time(end))

    def wait(self) -> None:
        torch.cuda.synchronize(self.device)


class MemoryProbe(Protocol):
    """Allocator statistics read on the host: bytes allocated now, the peak since the last ``reset``."""

    def allocated(self) -> int: ...

    def peak(self) -> int: ...

    def reset(self) -> None: ...


class CudaMemoryProbe:
    """``torch.cuda`` allocator counters (host-side bookkeeping: reading or resetting them does not synchronise)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


# -- results ---------------------------------------------------------------------------------------------------------
@dataclass
class PartCost:
    """One part's cost in one measured batch (or the mean over batches): milliseconds and MiB (None off CUDA)."""

    forward_ms: float = 0.0
    backward_ms: float = 0.0
    peak_mem_mb: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {"forward_ms": self.forward_ms, "backward_ms": self.backward_ms, "peak_mem_mb": self.peak_mem_mb}


@dataclass
class StepCost:
    """The cost of one measured batch: ``step_ms`` = sum of the objectives, ``shared`` and ``other_ms``."""

    index: int  # the batch's position among the batches the meter saw (0 = first)
    step: int | None  # the trainer's global step when measured (None outside a Trainer)
    batch_size: int
    step_ms: float
    objectives: dict[str, PartCost]
    shared: PartCost
    other_ms: float  # accounting_ms included
    accounting_ms: float

    def metrics(self) -> dict[str, float]:
        """TensorBoard scalars: ``cost/<objective>_{forward,backward}_ms``, ``cost/shared_*``, ``cost/step_ms`` ...
        (``_peak_mem_mb`` only where memory is measured)."""
        out: dict[str, float] = {}
        for name, part in [*self.objectives.items(), ("shared", self.shared)]:
            out[f"cost/{name}_forward_ms"] = part.forward_ms
            out[f"cost/{name}_backward_ms"] = part.backward_ms
            if part.peak_mem_mb is not None:
                out[f"cost/{name}_peak_mem_mb"] = part.peak_mem_mb
        out["cost/other_ms"] = self.other_ms
        out["cost/accounting_ms"] = self.accounting_ms
        out["cost/step_ms"] = self.step_ms
        out["cost/samples_per_s"] = self.batch_size / self.step_ms * 1e3 if self.step_ms > 0 else 0.0
        return out


@dataclass
class _Frame:
    """A part being run in the forward (objective or shared pass), for the peak-memory bookkeeping."""

    label: str
    base: int = 0  # bytes allocated when it started
    peak: int = 0  # highest allocation above base seen so far, minus what nested shared passes hold
    nested: int = 0  # bytes still held by the shared passes it triggered


@dataclass
class _Timeline:
    """One measured batch: marks ``(label, phase, stamp)``, peak memory per label, the batch's facts."""

    index: int
    step: int | None
    batch_size: int
    marks: list[tuple[str, str, Any]] = field(default_factory=list)
    peaks: dict[str, int] = field(default_factory=dict)
    backward_started: bool = False
    backward_done: bool = False


def split_timeline(marks: Sequence[tuple[str, str, Any]], elapsed_ms: Callable[[Any, Any], float]) -> dict:
    """Milliseconds per ``(label, phase)``: each mark's time runs until the next mark (the last mark ends the batch).

    Pure bookkeeping, checked by hand in the tests: the values add up to the time from the first to the last mark.
    """
    totals: dict[tuple[str, str], float] = {}
    for (label, phase, start), (_, _, end) in zip(marks, marks[1:], strict=False):
        totals[(label, phase)] = totals.get((label, phase), 0.0) + elapsed_ms(start, end)
    return totals


# -- the meter ---------------------------------------------------------------------------------------------------------
class ObjectiveCostMeter:
    """Measures one batch in ``every_n_steps`` (after ``warmup_steps`` unmeasured ones); 0 measures none.

    Outside a Trainer (tests, benchmarks): set ``recipe.cost_meter = meter`` and call :meth:`begin_step` before and
    :meth:`end_step` after each training step (forward, backward, optimizer), then :meth:`collect`.

    Args:
        every_n_steps: measure every n-th batch; 0 disables measuring.
        warmup_steps: batches at the start that are never measured (lazy initialisation, autotuning).
        clock: timestamps (default: CUDA events on a CUDA device, ``perf_counter`` otherwise).
        memory: allocator probe (default: ``torch.cuda`` counters on a CUDA device, none otherwise).
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        warmup_steps: int = 1,
        clock: Clock | None = None,
        memory: MemoryProbe | None = None,
    ) -> None:
        if every_n_steps < 0 or warmup_steps < 0:
            raise ValueError(f"every_n_steps and warmup_steps must be >= 0, got {every_n_steps}, {warmup_steps}")
        self.every_n_steps = every_n_steps
        self.warmup_steps = warmup_steps
        self.clock = clock
        self.memory = memory
        self._device_set = clock is not None
        self.active = False  # True between begin_step and end_step of a measured batch
        self.batches_seen = 0
        self.hooks_registered = 0  # backward pre-hooks placed so far (tests: none when nothing is measured)
        self.objective_names: list[str] = []
        self._timeline: _Timeline | None = None
        self._frames: list[_Frame] = []
        self._spans: list[tuple[int, str]] = []  # (autograd sequence number where it starts, part) in the forward
        self._pending: list[_Timeline] = []
        self.totals = CostTotals()

    # -- batch boundaries --------------------------------------------------------------------------------------------
    def is_measured(self, index: int) -> bool:
        """Whether the ``index``-th batch (0-based) is measured."""
        if self.every_n_steps == 0 or index < self.warmup_steps:
            return False
        return (index - self.warmup_steps) % self.every_n_steps == 0

    def begin_step(self, batch_size: int, device: torch.device | str = "cpu", step: int | None = None) -> bool:
        """Start a batch; returns whether it is measured (then :attr:`active` until :meth:`end_step`)."""
        index = self.batches_seen
        self.batches_seen += 1
        if not self.is_measured(index):
            return False
        if not self._device_set:
            self._use_device(torch.device(device))
        self._timeline = _Timeline(index=index, step=step, batch_size=batch_size)
        self._frames = []
        self._spans = [(_sequence_nr(), OTHER)]
        self.active = True
        self._mark(OTHER, REST)
        return True

    def end_step(self) -> None:
        """End the batch; a measured one is queued for :meth:`collect` (dropped when it ran no backward, e.g. a
        skipped non-finite step)."""
        timeline = self._timeline
        if timeline is None:
            return
        self._mark("<end>", REST)
        self.active = False
        self._timeline = None
        self._spans = []
        if timeline.backward_done:
            self._pending.append(timeline)

    def collect(self, wait: bool = False) -> list[StepCost]:
        """Measured batches whose timestamps can be read now, oldest first (``wait``: synchronise and read all)."""
        if wait and self._pending and self.clock is not None:
            self.clock.wait()
        done: list[StepCost] = []
        while self._pending and self.clock is not None:
            timeline = self._pending[0]
            if not self.clock.ready([stamp for _, _, stamp in timeline.marks]):
                break  # later batches were recorded after it: not ready either
            self._pending.pop(0)
            cost = self._resolve(timeline)
            self.totals.add(cost)
            done.append(cost)
        return done

    def _use_device(self, device: torch.device) -> None:
        if device.type == "cuda":
            self.clock = CudaEventClock(device)
            self.memory = self.memory or CudaMemoryProbe(device)
        else:
            self.clock = HostClock()
        self._device_set = True

    # -- called by the recipe and the step context on measured batches -----------------------------------------------
    def objective(self, objective: Objective, ctx: StepContext) -> ObjectiveOutput:
        """Run ``objective(ctx)`` as its own part."""
        name = objective.name
        if name not in self.objective_names:
            self.objective_names.append(name)
        self._push(name)
        try:
            return objective(ctx)
        finally:
            self._pop()

    def shared(self, compute: Callable[[], T]) -> T:
        """Compute a shared feature of the step context as part ``shared`` (whichever objective asked for it)."""
        self._push(SHARED)
        try:
            return compute()
        finally:
            self._pop()

    def forward_done(self, total: Tensor) -> None:
        """After the last objective: place the backward pre-hooks (one per run of nodes of one part)."""
        self._mark(ACCOUNTING, FORWARD)
        for node, label in backward_runs(total, self._spans):
            node.register_prehook(self._backward_hook(label))
            self.hooks_registered += 1
        self._spans = []
        self._mark(OTHER, FORWARD)

    # -- internals -------------------------------------------------------------------------------------------------
    def _mark(self, label: str, phase: str) -> None:
        assert self._timeline is not None and self.clock is not None
        self._timeline.marks.append((label, phase, self.clock.stamp()))

    def _push(self, label: str) -> None:
        frame = _Frame(label)
        if self.memory is not None:
            if self._frames:  # close the enclosing part's segment before the nested part starts
                self._close_segment(self._frames[-1])
            self.memory.reset()
            frame.base = self.memory.allocated()
        self._frames.append(frame)
        self._spans.append((_sequence_nr(), label))
        self._mark(label, FORWARD)

    def _pop(self) -> None:
        frame = self._frames.pop()
        if self.memory is not None and self._timeline is not None:
            self._close_segment(frame)
            held = self.memory.allocated() - frame.base
            peaks = self._timeline.peaks
            peaks[frame.label] = max(peaks.get(frame.label, 0), frame.peak)
            if self._frames:
                self._frames[-1].nested += held
            self.memory.reset()  # the enclosing part's next segment starts from here
        label = self._frames[-1].label if self._frames else OTHER
        self._spans.append((_sequence_nr(), label))
        self._mark(label, FORWARD)

    def _close_segment(self, frame: _Frame) -> None:
        assert self.memory is not None
        frame.peak = max(frame.peak, self.memory.peak() - frame.base - frame.nested)

    def _backward_hook(self, label: str) -> Callable[[Any], None]:
        timeline = self._timeline

        def hook(grad_outputs: Any) -> None:
            if timeline is None or timeline is not self._timeline:
                return None  # a graph kept past its batch: not measured
            if not timeline.backward_started:
                timeline.backward_started = True
                torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)
            self._mark(label, BACKWARD)
            return None

        return hook

    def _backward_end(self) -> None:
        if self._timeline is not None:
            self._timeline.backward_done = True
            self._mark(OTHER, REST)

    def _resolve(self, timeline: _Timeline) -> StepCost:
        assert self.clock is not None
        split = split_timeline(timeline.marks, self.clock.elapsed_ms)
        memory = self.memory is not None

        def part(label: str) -> PartCost:
            peak = timeline.peaks.get(label, 0) / MIB if memory else None
            return PartCost(split.get((label, FORWARD), 0.0), split.get((label, BACKWARD), 0.0), peak)

        accounting = sum(ms for (label, _), ms in split.items() if label == ACCOUNTING)
        other = accounting + sum(ms for (label, _), ms in split.items() if label == OTHER)
        return StepCost(
            index=timeline.index,
            step=timeline.step,
            batch_size=timeline.batch_size,
            step_ms=self.clock.elapsed_ms(timeline.marks[0][2], timeline.marks[-1][2]),
            objectives={name: part(name) for name in self.objective_names},
            shared=part(SHARED),
            other_ms=other,
            accounting_ms=accounting,
        )

    def summary(self) -> dict[str, Any] | None:
        """The contract of ``objective_cost.json`` (means over the measured batches), or None if none was read."""
        return self.totals.summary()


def _sequence_nr() -> int:
    """The sequence number the next autograd node created on this thread gets (the engine orders by it)."""
    return torch.autograd._get_sequence_nr()


def backward_runs(total: Tensor, spans: Sequence[tuple[int, str]]) -> list[tuple[Any, str]]:
    """The first node of each run of one part in the backward of ``total``, with the part, in running order.

    ``spans`` are ``(sequence number, part)`` boundaries recorded in the forward: a node belongs to the part of the
    last boundary at or below its sequence number (nodes before the first boundary, and the loss sum, to ``other``).
    The engine runs the nodes in decreasing sequence number (see the module docstring); parameter leaves
    (``AccumulateGrad``) run right after the node that completes their gradient and are left to its run.
    """
    starts = [start for start, _ in spans]
    seen: set[Any] = set()
    nodes: list[tuple[int, str, Any]] = []
    stack = [total.grad_fn] if total.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "AccumulateGrad":
            continue
        sequence = node._sequence_nr()
        at = bisect.bisect_right(starts, sequence) - 1
        nodes.append((sequence, spans[at][1] if at >= 0 else OTHER, node))
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None and nxt not in seen)
    nodes.sort(key=lambda item: item[0], reverse=True)
    runs: list[tuple[Any, str]] = []
    for _, label, node in nodes:
        if not runs or runs[-1][1] != label:
            runs.append((node, label))
    return runs


class CostTotals:
    """Running sums over measured batches: means of the times, the highest peak memory per part."""

    def __init__(self) -> None:
        self.count = 0
        self.samples = 0
        self.step_ms = 0.0
        self.other_ms = 0.0
        self.accounting_ms = 0.0
        self.parts: dict[str, list[float]] = {}  # name -> [forward, backward]
        self.peaks: dict[str, float | None] = {}

    def add(self, cost: StepCost) -> None:
        self.count += 1
        self.samples += cost.batch_size
        self.step_ms += cost.step_ms
        self.other_ms += cost.other_ms
        self.accounting_ms += cost.accounting_ms
        for name, part in [*cost.objectives.items(), (SHARED, cost.shared)]:
            sums = self.parts.setdefault(name, [0.0, 0.0])
            sums[0] += part.forward_ms
            sums[1] += part.backward_ms
            if part.peak_mem_mb is None:
                self.peaks.setdefault(name, None)
            else:
                self.peaks[name] = max(self.peaks.get(name) or 0.0, part.peak_mem_mb)

    def _part(self, name: str) -> dict[str, float | None]:
        forward, backward = self.parts.get(name, [0.0, 0.0])
        return PartCost(forward / self.count, backward / self.count, self.peaks.get(name)).to_dict()

    def summary(self) -> dict[str, Any] | None:
        if self.count == 0:
            return None
        return {
            "step_ms": self.step_ms / self.count,
            "samples_per_s": self.samples / self.step_ms * 1e3 if self.step_ms > 0 else 0.0,
            "sampled_steps": self.count,
            "objectives": {name: self._part(name) for name in self.parts if name != SHARED},
            "shared": self._part(SHARED),
            "other_ms": self.other_ms / self.count,
        }

    @property
    def mean_accounting_ms(self) -> float:
        return self.accounting_ms / self.count if self.count else 0.0


def format_table(summary: Mapping[str, Any], accounting_ms: float = 0.0, note: str = "") -> str:
    """The end-of-fit table: forward, backward and total ms per part, its share of the step, peak MiB."""
    step = summary["step_ms"]
    rows = [("part", "forward ms", "backward ms", "total ms", "share", "peak MiB")]

    def add(name: str, part: Mapping[str, Any]) -> None:
        total = part["forward_ms"] + part["backward_ms"]
        peak = "-" if part["peak_mem_mb"] is None else f"{part['peak_mem_mb']:.1f}"
        share = f"{100 * total / step:.1f}%" if step > 0 else "-"
        rows.append((name, f"{part['forward_ms']:.2f}", f"{part['backward_ms']:.2f}", f"{total:.2f}", share, peak))

    for name, part in summary["objectives"].items():
        add(name, part)
    add("shared", summary["shared"])
    other = summary["other_ms"]
    rows.append(("other", "", "", f"{other:.2f}", f"{100 * other / step:.1f}%" if step > 0 else "-", ""))
    rows.append(("step", "", "", f"{step:.2f}", "100.0%", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    count = summary["sampled_steps"]
    header = (
        f"objective cost: mean of {count} measured batch{'' if count == 1 else 'es'}{note}, "
        f"{summary['step_ms']:.1f} ms per batch, {summary['samples_per_s']:.1f} samples/s"
    )
    footer = (
        "shared = ViT and text encoder passes (online and momentum) that several objectives read; other = loss sum, "
        f"optimizer, EMA and queue updates, per-batch hooks and {accounting_ms:.2f} ms of accounting (data loading "
        "not included)"
    )
    return "\n".join([header, *lines, footer])


# -- the callback ----------------------------------------------------------------------------------------------------
class ObjectiveCostMonitor(Callback):
    """Per-objective cost of pretraining, in every run: ``cost/...`` in TensorBoard, a table and
    ``objective_cost.json`` at the end of ``fit``. The `vlalign` command adds it unless a config lists one.

    Acts on modules with a ``cost_meter`` attribute (:class:`~vlalign.tasks.pretrain.PretrainRecipe`); others are
    left alone. Each process measures its own batches; rank zero logs and writes its numbers.

    Args:
        every_n_steps: measure one training batch in this many (a micro-batch under gradient accumulation); 0 turns
            the accounting off (no hook, no file).
        warmup_steps: the first batches of the run that are never measured.
        filename: name of the JSON summary in the run's log folder.
        print_table: print the table at the end of ``fit`` (rank zero).
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        warmup_steps: int = 1,
        filename: str = COST_FILE,
        print_table: bool = True,
    ) -> None:
        if every_n_steps < 0:
            raise ConfigError(
                f"ObjectiveCostMonitor every_n_steps must be >= 0 (0 turns cost accounting off), got {every_n_steps}: "
                "set trainer.callbacks[ObjectiveCostMonitor].init_args.every_n_steps"
            )
        if warmup_steps < 0:
            raise ConfigError(
                f"ObjectiveCostMonitor warmup_steps must be >= 0, got {warmup_steps}: set "
                "trainer.callbacks[ObjectiveCostMonitor].init_args.warmup_steps"
            )
        if not filename or Path(filename).name != filename:
            raise ConfigError(
                f"ObjectiveCostMonitor filename must be a plain file name (it goes into the run's log folder), "
                f"got {filename!r}"
            )
        self.every_n_steps = every_n_steps
        self.warmup_steps = warmup_steps
        self.filename = filename
        self.print_table = print_table
        self.meter: ObjectiveCostMeter | None = None
        self.path: Path | None = None  # where the summary was written

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.every_n_steps == 0 or not hasattr(pl_module, "cost_meter"):
            return
        self.meter = ObjectiveCostMeter(self.every_n_steps, self.warmup_steps)
        self.meter.objective_names = [o.name for o in getattr(pl_module, "objectives", [])]
        pl_module.cost_meter = self.meter

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.meter is not None:
            self.meter.begin_step(_batch_size(batch), pl_module.device, step=trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.meter is not None:
            self.meter.end_step()
            self._log(trainer, self.meter.collect())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        meter = self.meter
        if meter is None:
            return
        self._log(trainer, meter.collect(wait=True))
        if not trainer.is_global_zero:
            return
        summary = meter.summary()
        if summary is None:
            rank_zero_info(
                f"objective cost: no batch was measured ({meter.batches_seen} batches; the first measured one is "
                f"batch {meter.warmup_steps + 1}); nothing written"
            )
            return
        logger = trainer.logger
        folder = Path(getattr(logger, "log_dir", None) or trainer.default_root_dir) if logger else None
        self.path = write_summary(summary, (folder or Path(trainer.default_root_dir)) / self.filename)
        if self.print_table:
            note = f" (1 in {meter.every_n_steps} after {meter.warmup_steps} unmeasured)"
            rank_zero_info(f"{format_table(summary, meter.totals.mean_accounting_ms, note)}\nwritten to {self.path}")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.meter is not None and getattr(pl_module, "cost_meter", None) is self.meter:
            pl_module.cost_meter = None
        self.meter = None

    @staticmethod
    def _log(trainer: L.Trainer, costs: list[StepCost]) -> None:
        if not costs or not trainer.is_global_zero:
            return
        for cost in costs:
            for logger in trainer.loggers:  # plain floats straight to the loggers: no device tensor, no sync
                logger.log_metrics(cost.metrics(), step=cost.step if cost.step is not None else cost.index)


def _batch_size(batch: Any) -> int:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    return int(ids.shape[0]) if isinstance(ids, Tensor) else 0


def write_summary(summary: Mapping[str, Any], path: Path) -> Path:
    """Write the summary as JSON, atomically (a reader sees the old file or the new one)."""
    if any(isinstance(v, float) and not math.isfinite(v) for v in _floats(summary)):
        raise ValueError(f"objective cost summary holds a non-finite number: {summary}")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as file:
        json.dump(summary, file, indent=2)
        file.write("\n")
    os.replace(tmp, path)
    return path


def _floats(value: Any) -> Iterable[Any]:
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _floats(item)
    else:
        yield value
