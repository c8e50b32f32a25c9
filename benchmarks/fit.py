"""End-to-end ``fit`` throughput: ``python -m benchmarks.fit [--recipe tiny|full] [--device cpu|cuda] [--ablate]``.

What runs. Synthetic shards from ``vlalign.data.synth.write_synthetic`` (JPEGs of the recipe's source size: 128 px for
``tiny``, 384 px for ``full``), then the real command, ``python -m vlalign fit --config configs/pretrain/<recipe>.yaml
--config <overlay>.yaml``, in a subprocess: the recipe's data pipeline (decode, crop, flip, RandAugment for ``full``,
block masks, tokenisation in the collate), its callbacks and TensorBoard logger, the callbacks the command adds to
every run (``LastCheckpoint``, ``PreemptionCheckpoint``, ``DataQualityMonitor``, ``ObjectiveCostMonitor``), Lightning's
default progress bar and one validation. The overlay changes only what a benchmark must: the data paths,
``resampled`` shards with an epoch longer than the run (``samples_per_epoch``: no data-loader restart in the window;
a real epoch lasts thousands of steps), ``val_check_interval`` so that one validation (and the checkpoints written
after it) falls in the middle of the timed window, the number of data workers, ``max_steps``, the run folder, the
device (one device, ``strategy: auto``), and it appends :class:`StepTimer`. For ``full`` it also drops the
pretrained weight files (random weights; the synthetic tokenizer's vocabulary padded with unused entries to BERT's
30,522 words on CUDA; dVAE targets from a randomly initialised ``dall_e`` encoder when importable, else pixel
targets) and on the CPU replaces the model by a small one (:data:`CPU_FULL_MODEL`) fed by the full-size pipeline.

How it is timed. :class:`StepTimer` stamps the start of every training batch (``on_train_batch_start``). The run has
``warmup + steps + 1`` optimizer steps; the ``steps`` intervals from the start of batch ``warmup`` to the start of the
final batch are timed, so each timed interval holds one whole loop iteration: waiting for data, the step, every
callback, logging and the progress bar. An interval in which a validation ran or a checkpoint was written, and the
one after it, are *periodic*: reported on their own (with the time spent in validation and in each
``save_checkpoint``) and left out of the steady-state rate, because their cost per step depends on how often a
recipe validates and saves. **samples/s** = samples of the steady intervals / their total time. On CUDA the timer
synchronises once at the start of the window and once at its end (never in between), so the host's run-ahead
cancels out, and counts the host syncs in between (``torch.cuda.set_sync_debug_mode("warn")``, with their call
sites). On every device it counts the tensors Lightning converts to Python numbers (``convert_tensors_to_scalars``
in Lightning's result collection: the values logged with ``prog_bar=True``), each a device-to-host copy, i.e. a
host sync on CUDA; it samples the GPU's utilisation (``torch.cuda.utilization()``, NVML; else ``nvidia-smi``; else
the report says unavailable) in a thread; and it records the training process's CPU time, split into *in step*
(batch start to batch end) and *between steps*.

The bare step, twice. (1) *Own run*: the same two config files are instantiated in this process
(``VlalignCLI(run=False)``), one real batch is drawn from the data module (``num_workers=0``), and
``vlalign.testing.train_step`` (forward, backward, AdamW, EMA and queue writes, no Trainer) is timed on that fixed
batch with the same torch threads, under ``bf16`` autocast when the precision is ``bf16-mixed``
(``cuda.synchronize`` around each step), before the fits. (2) *Adjacent*: inside every fit process, right after its
timed window, ``StepTimer`` times ``train_step`` on the batch at hand with the trainer's optimizer and precision
context: the same process at the same moment, so a shared machine's changing load hits both alike. **fit / bare**
is fit samples/s over bare samples/s. The data pipeline's per-worker rate is ``benchmarks.pipeline.run_pipeline`` of
the recipe's pipeline in this process with one torch thread, as a DataLoader worker has, and **workers needed** for
a rate R is ``ceil(R / per-worker rate)``.

``--ablate`` adds runs at one worker count with one default switched off each (progress bar; the progress-bar losses,
which emulates dropping ``prog_bar=True`` in ``PretrainRecipe.training_step``; the logger with the learning-rate
monitor that needs it; the objective-cost monitor; validation and checkpoint writes), then all of them
(``--ablations`` picks some). Every run is fixed-step; the load average is recorded before and after each. ``--out``
writes JSON and the markdown next to it; ``--render`` rewrites the markdown of a JSON report.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
TIMER = "benchmarks.fit.StepTimer"
BENCH_VIT = "vit_fitbench_small_patch16"
BERT_VOCAB = 30522
#: Tensors Lightning converts per step are counted by wrapping this module's ``convert_tensors_to_scalars``.
RESULT_MODULE = "lightning.pytorch.trainer.connectors.logger_connector.result"


def register_bench_vit() -> str:
    """A timm ViT of width 128, depth 4, 4 heads, MLP ratio 4, 16-px patches at 256 px (registered once).

    The CPU stand-in for ViT-B/16 in ``--recipe full``: the full-size pipeline's 256 px images and 16 px block
    masks, at a cost two cores can run. Registered when this module is imported, which the ``fit`` subprocess does
    while it parses its callbacks (``StepTimer`` lives here), before the model is built.
    """
    from timm.models import build_model_with_cfg, is_model, register_model
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if is_model(BENCH_VIT):
        return BENCH_VIT

    def build(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        cfg = {"input_size": (3, 256, 256), "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head"}
        kwargs.pop("pretrained_cfg", None)
        args = {"img_size": 256, "patch_size": 16, "embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0}
        return build_model_with_cfg(
            VisionTransformer,
            BENCH_VIT,
            pretrained=False,
            pretrained_cfg=cfg,
            pretrained_filter_fn=checkpoint_filter_fn,
            **{**args, "qkv_bias": True, **kwargs},
        )

    build.__name__ = BENCH_VIT
    register_model(build)
    return BENCH_VIT


register_bench_vit()

#: ``--recipe full --device cpu``: simla_tiny.yaml's encoder sizes on 16-px patches at 256 px (1 + 256 image tokens,
#: so the stream's image side needs 257 positions), normalised-pixel image targets, fp32; everything else (data
#: pipeline, objectives, callbacks, logging interval, checkpoint interval) as configs/pretrain/simla.yaml.
CPU_FULL_MODEL: dict[str, Any] = {
    "vision": {"name": BENCH_VIT, "img_size": 256, "weights": None},
    "stream": {
        "hidden_size": 128,
        "num_layers": 4,
        "num_heads": 4,
        "intermediate_size": 256,
        "encoder_width": 128,
        "max_position_embeddings": 272,
    },
    "itc": {"embed_dim": 64, "queue_size": 1024},
}


@dataclass(frozen=True)
class FitRecipe:
    """A benchmarked recipe: its config file, its data pipeline (``benchmarks.pipeline.PIPELINES``), the batch."""

    config: str
    pipeline: str
    batch_size: int
    num_val: int  # synthetic validation images (3 captions each)


RECIPES: dict[str, FitRecipe] = {
    "tiny": FitRecipe("configs/pretrain/simla_tiny.yaml", "tiny", 32, 64),
    "full": FitRecipe("configs/pretrain/simla.yaml", "full", 64, 256),
}


@dataclass(frozen=True)
class Ablation:
    """One fit run's switches; all on is ``fit`` as the command runs it."""

    name: str
    progress_bar: bool = True
    progress_bar_losses: bool = True  # False emulates PretrainRecipe logging its losses without prog_bar=True
    logger: bool = True
    cost_monitor: bool = True
    validation_and_checkpoints: bool = True


DEFAULTS = Ablation("fit (defaults)")
ABLATIONS: tuple[Ablation, ...] = (
    Ablation("progress bar off", progress_bar=False),
    Ablation("progress-bar losses off", progress_bar_losses=False),
    Ablation("logger off", logger=False),
    Ablation("cost monitor off", cost_monitor=False),
    Ablation("validation + checkpoints off", validation_and_checkpoints=False),
    Ablation(
        "all off",
        progress_bar=False,
        progress_bar_losses=False,
        logger=False,
        cost_monitor=False,
        validation_and_checkpoints=False,
    ),
)
ABLATION_NAMES = ", ".join(a.name for a in ABLATIONS)


# -- the timer the fit subprocess runs ---------------------------------------------------------------------------------
class StepTimer(Callback):
    """Time a ``fit`` from inside: batch-start stamps, periodic work, host conversions, GPU utilisation.

    Args:
        out: JSON file written when the window closes (the start of the final batch).
        warmup: optimizer steps before the window opens.
        steps: timed loop iterations; the run must have ``max_steps = warmup + steps + 1``.
        progress_bar_losses: False logs what ``PretrainRecipe`` logs with ``prog_bar=True`` without it (emulates
            that change for the ablation; the values still reach the logger).
        gpu_sample_s: seconds between ``torch.cuda.utilization()`` samples on CUDA.
        bare_steps: when the window closes, time this many ``vlalign.testing.train_step`` calls on the batch at
            hand, in this process, with the trainer's optimizer and precision context (``cuda.synchronize`` around
            each): the bare step at the same moment, under the same machine load, as the fit it is compared with.
    """

    def __init__(
        self,
        out: str,
        warmup: int,
        steps: int,
        progress_bar_losses: bool = True,
        gpu_sample_s: float = 0.2,
        bare_steps: int = 4,
    ) -> None:
        if warmup < 0 or steps < 1:
            raise ValueError(f"StepTimer needs warmup >= 0 and steps >= 1, got {warmup} and {steps}")
        self.out = out
        self.warmup = warmup
        self.steps = steps
        self.progress_bar_losses = progress_bar_losses
        self.gpu_sample_s = gpu_sample_s
        self.bare_steps = bare_steps
        self.stamps: list[float] = []  # start of each batch from the window's first on
        self.cpu_stamps: list[float] = []  # this process's CPU time at the same moments
        self.end_stamps: list[tuple[float, float]] = []  # (wall, CPU) at the end of each timed batch
        self.batch_sizes: list[int] = []
        self.conversions: list[int] = []  # tensors converted to Python numbers, per timed interval
        self.events: list[tuple[str, float, float]] = []  # (kind, start, end): validation, checkpoint
        self._converted = 0
        self._validation_start: float | None = None
        self._device: torch.device | None = None
        self._gpu_samples: list[tuple[float, float]] = []
        self._gpu_error: str | None = None
        self._gpu_source: str | None = None
        self._syncs: list[tuple[float, str]] | None = None  # (time, call site) of each host sync on CUDA
        self._sync_error: str | None = None
        self._showwarning: Any = None
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._done = False

    # setup: patches that exist for the run's lifetime (this process is the benchmark's own subprocess)
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import importlib

        result = importlib.import_module(RESULT_MODULE)
        convert = result.convert_tensors_to_scalars

        def counting_convert(data: Any) -> Any:
            from lightning.fabric.utilities.apply_func import apply_to_collection

            counted: list[int] = []
            apply_to_collection(data, torch.Tensor, lambda t: counted.append(1))
            self._converted += len(counted)
            return convert(data)

        result.convert_tensors_to_scalars = counting_convert
        save = trainer.save_checkpoint

        def timed_save(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return save(*args, **kwargs)
            finally:
                self.events.append(("checkpoint", start, time.perf_counter()))

        trainer.save_checkpoint = timed_save  # type: ignore[method-assign]
        if not self.progress_bar_losses:
            log = pl_module.log

            def log_without_bar(*args: Any, **kwargs: Any) -> Any:
                kwargs["prog_bar"] = False
                return log(*args, **kwargs)

            pl_module.log = log_without_bar  # type: ignore[method-assign]

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._done or step < self.warmup:
            return
        now = self._now(pl_module.device, first=step == self.warmup, last=step == self.warmup + self.steps)
        if step == self.warmup:
            self._start_sampler(pl_module.device)
        else:
            self.conversions.append(self._converted)
        self._converted = 0
        self.stamps.append(now)
        self.cpu_stamps.append(time.process_time())
        if step == self.warmup + self.steps:
            self._finish(trainer, pl_module, batch)
            return
        self.batch_sizes.append(int(batch["input_ids"].shape[0]))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._done and len(self.end_stamps) < len(self.batch_sizes):
            self.end_stamps.append((time.perf_counter(), time.process_time()))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validation_start is not None:
            self.events.append(("validation", self._validation_start, time.perf_counter()))
            self._validation_start = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._done:
            raise RuntimeError(
                f"StepTimer: the fit ended at step {trainer.global_step} before the window closed; set "
                f"trainer.max_steps to warmup + steps + 1 = {self.warmup + self.steps + 1}"
            )

    # helpers
    def _now(self, device: torch.device, first: bool, last: bool) -> float:
        """The time of a stamp; on CUDA the window's two ends synchronise, and host syncs are counted between them."""
        if device.type == "cuda":
            if last:
                self._count_syncs(False)
            if first or last:
                torch.cuda.synchronize(device)
            if first:
                self._count_syncs(True)
        return time.perf_counter()

    def _count_syncs(self, start: bool) -> None:
        """Record every synchronising CUDA call (``torch.cuda.set_sync_debug_mode("warn")``, as benchmarks/syncs.py)."""
        import traceback

        try:
            if not start:
                if self._showwarning is not None:
                    torch.cuda.set_sync_debug_mode("default")
                    warnings.showwarning = self._showwarning
                return
            original = warnings.showwarning
            syncs: list[tuple[float, str]] = []

            def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None):
                if "synchroniz" not in str(message):
                    return original(message, category, filename, lineno, file, line)
                frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
                site = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-3:]))
                syncs.append((time.perf_counter(), site))
                return None

            warnings.filterwarnings("always", message=".*synchroniz.*")
            warnings.showwarning = record
            self._showwarning, self._syncs = original, syncs
            torch.cuda.set_sync_debug_mode("warn")
        except Exception as error:  # report it; never fail the run over the count
            self._sync_error = f"{type(error).__name__}: {error}"

    def _start_sampler(self, device: torch.device) -> None:
        self._device = device
        if device.type != "cuda":
            return
        read = gpu_utilization_reader(device)
        if isinstance(read, str):
            self._gpu_error = read
            return
        self._gpu_source, reader = read

        def sample() -> None:
            while not self._stop.wait(self.gpu_sample_s):
                try:
                    self._gpu_samples.append((time.perf_counter(), reader()))
                except Exception as error:
                    self._gpu_error = f"sampling stopped: {type(error).__name__}: {error}"
                    return

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        self._done = True
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
        report = summarise_window(
            self.stamps,
            self.batch_sizes,
            self.conversions,
            self.events,
            self._gpu_samples,
            self._gpu_error,
            cpu_stamps=self.cpu_stamps,
            end_stamps=self.end_stamps,
            syncs=self._syncs,
        )
        origin = self.stamps[0]
        report["raw"] = {
            "stamps_s": [t - origin for t in self.stamps],
            "events": [(kind, start - origin, end - origin) for kind, start, end in self.events],
        }
        if self._gpu_source is not None and isinstance(report["gpu_utilization"], dict):
            report["gpu_utilization"]["source"] = self._gpu_source
        if self._sync_error is not None:
            report["syncs_per_step"] = f"unavailable ({self._sync_error})"
        report.update(
            {
                "torch_threads": torch.get_num_threads(),
                "device": str(pl_module.device),
                "precision": str(trainer.precision),
                "progress_bar": type(trainer.progress_bar_callback).__name__ if trainer.progress_bar_callback else None,
                "logger": [type(logger).__name__ for logger in trainer.loggers],
                "callbacks": [type(callback).__name__ for callback in trainer.callbacks],
                "num_workers": getattr(trainer.datamodule, "num_workers", None),
                "log_every_n_steps": trainer.log_every_n_steps,
                "adjacent_bare": self._adjacent_bare(trainer, pl_module, batch) if self.bare_steps else None,
            }
        )
        Path(self.out).write_text(json.dumps(report, indent=2))

    def _adjacent_bare(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> dict[str, Any]:
        """``bare_steps`` bare steps on ``batch`` right after the window (the model trains on; a benchmark run)."""
        from vlalign.testing import train_step

        device = pl_module.device
        meter = getattr(pl_module, "cost_meter", None)
        pl_module.cost_meter = None  # no cost accounting of these steps
        times, cpu = [], []
        try:
            for index in range(self.bare_steps):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                wall0, cpu0 = time.perf_counter(), time.process_time()
                with trainer.precision_plugin.train_step_context():
                    train_step(pl_module, batch, trainer.optimizers[0], batch_idx=index)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - wall0)
                cpu.append(time.process_time() - cpu0)
        finally:
            pl_module.cost_meter = meter
        batch_size = int(batch["input_ids"].shape[0])
        return {
            "steps": len(times),
            "batch_size": batch_size,
            "samples_per_s": batch_size * len(times) / sum(times),
            "median_step_ms": 1e3 * statistics.median(times),
            "samples_per_s_median": batch_size / statistics.median(times),
            "cpu_ms_per_step": 1e3 * statistics.fmean(cpu),
            "step_ms": [1e3 * t for t in times],
        }


def gpu_utilization_reader(device: torch.device) -> tuple[str, Any] | str:
    """A function reading the GPU's utilisation in percent, and its source; or why there is none.

    ``torch.cuda.utilization`` (NVML through pynvml) first, then ``nvidia-smi`` (the physical index of ``device``
    from ``CUDA_VISIBLE_DEVICES`` when that lists numbers).
    """
    try:
        torch.cuda.utilization(device)
        return "torch.cuda.utilization (NVML)", lambda: float(torch.cuda.utilization(device))
    except Exception as error:  # pynvml missing, NVML not loadable
        reason = f"torch.cuda.utilization: {type(error).__name__}: {error}"
    import shutil

    executable = shutil.which("nvidia-smi")
    if executable is None:
        return f"unavailable ({reason}; no nvidia-smi)"
    index = device.index or 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    if index < len(visible) and visible[index].strip().isdigit():
        index = int(visible[index])
    query = [executable, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", str(index)]

    def read() -> float:
        out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True)
        return float(out.stdout.strip().splitlines()[0])

    try:
        read()
    except Exception as error:
        return f"unavailable ({reason}; nvidia-smi: {type(error).__name__}: {error})"
    return "nvidia-smi", read


def summarise_window(
    stamps: list[float],
    batch_sizes: list[int],
    conversions: list[int],
    events: list[tuple[str, float, float]],
    gpu_samples: list[tuple[float, float]],
    gpu_error: str | None = None,
    cpu_stamps: list[float] | None = None,
    end_stamps: list[tuple[float, float]] | None = None,
    syncs: list[tuple[float, str]] | None = None,
) -> dict[str, Any]:
    """Steady-state rate and periodic work from the batch-start ``stamps`` (one more than ``batch_sizes``).

    Interval i runs from ``stamps[i]`` to ``stamps[i + 1]`` and carries ``batch_sizes[i]`` samples. An interval in
    which a validation or checkpoint event started is periodic, and so is the one after it (it pays part of the
    cost: on the CPU the first step after a validation took 250-400 ms longer than the others); the others are
    steady. ``conversions`` (tensors converted per interval) are averaged over the steady intervals. ``cpu_stamps``
    (this process's CPU time at each stamp) give the mean CPU time of a steady interval. ``end_stamps`` (wall, CPU at each
    batch's ``on_train_batch_end``) split a steady interval into *in step* (batch start to batch end: the step and the
    per-batch hooks) and *between steps* (the rest: waiting for the next batch, the loop's logging and bookkeeping);
    on CUDA these are host times, meaningful only together. ``syncs`` (time, call site) give the host syncs per
    steady interval and their most frequent sites (CUDA; None elsewhere).
    """
    if len(stamps) != len(batch_sizes) + 1:
        raise ValueError(f"need one stamp more than batches, got {len(stamps)} stamps and {len(batch_sizes)} batches")
    intervals = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    with_event = [
        index
        for index, (start, end) in enumerate(zip(stamps, stamps[1:], strict=False))
        if any(start <= s < end for _, s, _ in events)
    ]
    after = [index + 1 for index in with_event if index + 1 < len(intervals) and index + 1 not in with_event]
    steady = [index for index in range(len(intervals)) if index not in with_event and index not in after]
    periodic: list[dict[str, Any]] = []
    for index in with_event:
        start, end = stamps[index], stamps[index + 1]
        inside = [(kind, s, e) for kind, s, e in events if start <= s < end]
        periodic.append(
            {
                "interval": index,
                "seconds": end - start,
                "next_seconds": intervals[index + 1] if index + 1 in after else None,
                "validation_s": sum(e - s for kind, s, e in inside if kind == "validation"),
                "checkpoint_s": [e - s for kind, s, e in inside if kind == "checkpoint"],
            }
        )
    steady_s = sum(intervals[i] for i in steady)
    steady_samples = sum(batch_sizes[i] for i in steady)
    median = statistics.median(intervals[i] for i in steady) if steady else float("nan")
    for entry in periodic:  # beyond ordinary steps
        entry["extra_s"] = entry["seconds"] - median + (entry["next_seconds"] or median) - median
    in_periodic = [(stamps[i], stamps[i + 1]) for i in with_event + after]
    steady_util = [u for t, u in gpu_samples if not any(a <= t < b for a, b in in_periodic)]
    if gpu_error is not None:
        gpu: dict[str, Any] | str = f"unavailable ({gpu_error})"
    elif gpu_samples:
        gpu = {"mean": statistics.fmean(steady_util) if steady_util else float("nan"), "samples": len(steady_util)}
    else:
        gpu = "unavailable (not a CUDA run)"
    split: dict[str, float] = {}
    if cpu_stamps and end_stamps and len(end_stamps) == len(batch_sizes) and steady:
        split = {
            "in_step_ms_median": 1e3 * statistics.median(end_stamps[i][0] - stamps[i] for i in steady),
            "between_steps_ms_median": 1e3 * statistics.median(stamps[i + 1] - end_stamps[i][0] for i in steady),
            "in_step_cpu_ms": 1e3 * statistics.fmean(end_stamps[i][1] - cpu_stamps[i] for i in steady),
            "between_steps_cpu_ms": 1e3 * statistics.fmean(cpu_stamps[i + 1] - end_stamps[i][1] for i in steady),
        }
    sync_report: dict[str, Any] = {"syncs_per_step": "unavailable (not a CUDA run)", "sync_sites": {}}
    if syncs is not None and steady:
        steady_syncs = [site for t, site in syncs if any(stamps[i] <= t < stamps[i + 1] for i in steady)]
        sync_report = {
            "syncs_per_step": len(steady_syncs) / len(steady),
            "sync_sites": dict(Counter(steady_syncs).most_common(8)),
        }
    return {
        **split,
        **sync_report,
        "timed_intervals": len(intervals),
        "steady_intervals": len(steady),
        "steady_samples": steady_samples,
        "steady_s": steady_s,
        "samples_per_s": steady_samples / steady_s if steady_s > 0 else float("nan"),
        "median_interval_ms": 1e3 * median,
        "samples_per_s_median": (steady_samples / len(steady)) / median if steady else float("nan"),
        "window_s": stamps[-1] - stamps[0],
        "main_process_cpu_ms_per_step": 1e3 * statistics.fmean(cpu_stamps[i + 1] - cpu_stamps[i] for i in steady)
        if cpu_stamps and steady
        else float("nan"),
        "interval_ms": [1e3 * t for t in intervals],
        "periodic": periodic,
        "conversions_per_step": statistics.fmean(conversions[i] for i in steady) if conversions and steady else 0.0,
        "gpu_utilization": gpu,
    }


# -- data -------------------------------------------------------------------------------------------------------------
@dataclass
class BenchData:
    tokenizer: str
    train_shards: str
    val_retrieval: str
    num_train: int
    num_val: int
    source_size: int
    vocab_size: int
    write_s: float


def pad_vocabulary(tokenizer_dir: Path, size: int) -> int:
    """Pad a WordPiece ``tokenizer.json`` in place with ``[unusedN]`` entries to ``size`` words (BERT's layout: such
    entries never match caption text), so vocabulary-sized layers have the reference's size. Returns the size."""
    path = tokenizer_dir / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    if len(vocab) > size:
        raise ValueError(f"{path} already has {len(vocab)} words, more than {size}")
    next_id, filler = len(vocab), 0
    while len(vocab) < size:
        token = f"[unused{filler}]"
        filler += 1
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1
    path.write_text(json.dumps(spec))
    return len(vocab)


def write_data(recipe: FitRecipe, root: Path, num_train: int, num_val: int, vocab_size: int | None) -> BenchData:
    from benchmarks.pipeline import PIPELINES
    from vlalign.data.synth import write_synthetic

    source = PIPELINES[recipe.pipeline]["source_size"]
    start = time.perf_counter()
    summary = write_synthetic(
        root,
        num_train=num_train,
        num_val=num_val,
        num_test=0,
        image_size=source,
        samples_per_shard=max(1, math.ceil(num_train / 8)),  # 8 shards: enough for 8 workers
        progress=False,
    )
    size = len(json.loads((summary.tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    if vocab_size is not None:
        size = pad_vocabulary(summary.tokenizer_dir, vocab_size)
    return BenchData(
        tokenizer=str(summary.tokenizer_dir),
        train_shards=summary.shard_urls("train"),
        val_retrieval=str(summary.retrieval_json["val"]),
        num_train=num_train,
        num_val=num_val,
        source_size=source,
        vocab_size=size,
        write_s=time.perf_counter() - start,
    )


# -- configs ----------------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """Everything one fit run (or the bare step) is built from, besides the recipe's config file."""

    recipe: str
    device: str
    precision: str
    batch_size: int
    warmup: int
    steps: int
    threads: int
    workdir: Path
    dvae_weights: str | None = None  # CUDA full: a random dall_e encoder; None: pixel targets


def _class_name(entry: Any) -> str:
    return str(entry.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(entry, dict) else ""


def overlay(
    spec: RunSpec, data: BenchData, workers: int, ablation: Ablation, run_dir: Path, timer_out: Path | None
) -> dict[str, Any]:
    """The second ``--config`` of a run: data, device, steps, run folder, ablation switches, the timer."""
    recipe = RECIPES[spec.recipe]
    base = yaml.safe_load((REPO / recipe.config).read_text())
    callbacks = []
    for entry in base["trainer"].get("callbacks") or []:
        name = _class_name(entry)
        if name == "LearningRateMonitor" and not ablation.logger:
            continue  # it refuses to run without a logger
        if name == "ModelCheckpoint" and not ablation.validation_and_checkpoints:
            continue  # Lightning refuses one with enable_checkpointing=False
        callbacks.append(entry)
    if not ablation.cost_monitor:
        callbacks.append(
            {"class_path": "vlalign.training.objective_cost.ObjectiveCostMonitor", "init_args": {"every_n_steps": 0}}
        )
    if timer_out is not None:
        callbacks.append(
            {
                "class_path": TIMER,
                "init_args": {
                    "out": str(timer_out),
                    "warmup": spec.warmup,
                    "steps": spec.steps,
                    "progress_bar_losses": ablation.progress_bar_losses,
                },
            }
        )
    trainer: dict[str, Any] = {
        "max_steps": spec.warmup + spec.steps + 1,
        "max_epochs": -1,
        "precision": spec.precision,
        "default_root_dir": str(run_dir),
        "callbacks": callbacks,
        "enable_progress_bar": ablation.progress_bar,
        "enable_checkpointing": ablation.validation_and_checkpoints,
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(run_dir / "runs"), "name": spec.recipe},
        }
        if ablation.logger
        else False,
    }
    if not ablation.validation_and_checkpoints:
        trainer["limit_val_batches"] = 0
    if spec.device == "cuda":
        trainer.update({"accelerator": "gpu", "devices": 1, "strategy": "auto"})
    else:
        trainer.update({"accelerator": "cpu", "devices": 1, "strategy": "auto"})
    # one validation (then last.ckpt and the best checkpoint) in the middle of the window; the epoch outlasts the run
    # (the next validation, at twice the interval, falls after max_steps when warmup >= 2)
    trainer["val_check_interval"] = spec.warmup + math.ceil(spec.steps / 2)
    epoch_steps = 2 * (spec.warmup + spec.steps + 1)
    data_args: dict[str, Any] = {
        "tokenizer": data.tokenizer,
        "train_shards": data.train_shards,
        "val_retrieval": data.val_retrieval,
        "test_retrieval": None,
        "image_root": None,
        "batch_size": spec.batch_size,
        "num_workers": workers,
        "resampled": True,
        "samples_per_epoch": spec.batch_size * epoch_steps,
    }
    model: dict[str, Any] = {}
    if spec.recipe == "full":
        model = {"vision": {"weights": None}, "text_weights": None}
        targets = (
            {"class_path": "vlalign.objectives.image_targets.DVAETargets", "init_args": {"weights": spec.dvae_weights}}
            if spec.dvae_weights
            else {"class_path": "vlalign.objectives.image_targets.PixelTargets"}
        )
        model["xmm"] = {"image_targets": targets}
        if spec.device == "cpu":
            for key, value in CPU_FULL_MODEL.items():
                model[key] = {**model.get(key, {}), **value}
    result: dict[str, Any] = {
        "trainer": trainer,
        "data": {"class_path": base["data"]["class_path"], "init_args": data_args},
    }
    if model:
        result["model"] = model
    return result


def fit_command(config_files: list[Path]) -> list[str]:
    command = [sys.executable, "-m", "vlalign", "fit"]
    for path in config_files:
        command += ["--config", str(path)]
    return command


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- running ----------------------------------------------------------------------------------------------------------
def run_fit(spec: RunSpec, data: BenchData, workers: int, ablation: Ablation, name: str) -> dict[str, Any]:
    """One ``vlalign fit`` subprocess; the timer's report with the command, wall time and load average."""
    run_dir = spec.workdir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    overlay_path, timer_out, log_path = run_dir / "overlay.yaml", run_dir / "timer.json", run_dir / "fit.log"
    overlay_path.write_text(yaml.safe_dump(overlay(spec, data, workers, ablation, run_dir, timer_out)))
    command = fit_command([REPO / RECIPES[spec.recipe].config, overlay_path])
    load_before = load_average()
    start = time.perf_counter()
    with log_path.open("w") as log:
        completed = subprocess.run(
            command, cwd=REPO, env=thread_env(spec.threads), stdout=log, stderr=subprocess.STDOUT
        )
    wall = time.perf_counter() - start
    if completed.returncode != 0 or not timer_out.exists():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"fit run {name!r} failed (exit {completed.returncode}); log {log_path}:\n{tail}")
    report = json.loads(timer_out.read_text())
    report.update(
        {
            "name": name,
            "ablation": dataclasses.asdict(ablation),
            "workers": workers,
            "process_wall_s": wall,
            "load_before": load_before,
            "load_after": load_average(),
            "command": shlex.join(command) + f"  # OMP_NUM_THREADS={spec.threads}",
        }
    )
    return report


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision not in ("32-true", "32"):
        raise ValueError(f"--precision {precision!r}: the bare step supports 32-true and bf16-mixed")
    return contextlib.nullcontext()


def bare_step(spec: RunSpec, data: BenchData) -> dict[str, Any]:
    """``vlalign.testing.train_step`` on the fit's model config and one real batch of its data module."""
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from lightning.pytorch import LightningDataModule

    from vlalign.cli.train import VlalignCLI
    from vlalign.tasks.optim import build_optimizer
    from vlalign.tasks.pretrain import PretrainRecipe
    from vlalign.testing import train_step

    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer
    run_dir = spec.workdir / "bare"
    run_dir.mkdir(parents=True, exist_ok=True)
    overlay_path = run_dir / "overlay.yaml"
    off = Ablation("bare", progress_bar=False, logger=False, cost_monitor=False, validation_and_checkpoints=False)
    overlay_path.write_text(yaml.safe_dump(overlay(spec, data, 0, off, run_dir, None)))
    previous = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    load_before = load_average()
    try:
        cli = VlalignCLI(
            PretrainRecipe,
            LightningDataModule,
            subclass_mode_data=True,
            seed_everything_default=42,
            run=False,
            save_config_callback=None,
            auto_configure_optimizers=False,
            args=["--config", str(REPO / RECIPES[spec.recipe].config), "--config", str(overlay_path)],
        )
        device = torch.device(spec.device)
        recipe, module = cli.model, cli.datamodule
        batch = next(iter(module.train_dataloader()))
        batch = module.on_before_batch_transfer(batch, 0)
        batch = move_data_to_device(batch, device)
        recipe = recipe.to(device).train()
        recipe.configure_model()
        optimizer = build_optimizer(recipe, recipe.optim, total_steps=100_000)
        opt, scheduler = optimizer["optimizer"], optimizer["lr_scheduler"]["scheduler"]
        times, cpu = [], []
        for index in range(spec.warmup + spec.steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            with _autocast(spec.precision, device):
                loss = train_step(recipe, batch, opt, scheduler, batch_idx=index)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index >= spec.warmup:
                times.append(time.perf_counter() - wall0)
                cpu.append(time.process_time() - cpu0)
        batch_size = int(batch["input_ids"].shape[0])
    finally:
        torch.set_num_threads(previous)
    return {
        "batch_size": batch_size,
        "text_length": int(batch["input_ids"].shape[1]),
        "samples_per_s": batch_size * len(times) / sum(times),
        "median_step_ms": 1e3 * statistics.median(times),
        "samples_per_s_median": batch_size / statistics.median(times),
        "cpu_ms_per_step": 1e3 * statistics.fmean(cpu),
        "step_ms": [1e3 * t for t in times],
        "loss": float(loss) if loss is not None else float("nan"),
        "torch_threads": spec.threads,
        "load_before": load_before,
        "load_after": load_average(),
    }


def pipeline_rate(pipeline: str, num_samples: int, batch_size: int) -> dict[str, Any]:
    """One data worker's rate: ``benchmarks.pipeline.run_pipeline`` (one torch thread, as in a DataLoader worker)."""
    from benchmarks.pipeline import run_pipeline

    return run_pipeline(pipeline, num_samples=num_samples, batch_size=batch_size)


def workers_needed(rate: float, per_worker: float) -> int | None:
    """Data workers whose combined rate reaches ``rate`` (each at ``per_worker`` samples/s)."""
    if not (per_worker > 0 and math.isfinite(per_worker) and math.isfinite(rate)):
        return None
    return max(1, math.ceil(rate / per_worker))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark: data, bare step, pipeline rate, fit per worker count, ablations."""
    from benchmarks.model import dall_e_available, random_dvae_weights

    recipe = RECIPES[args.recipe]
    precision = args.precision or ("bf16-mixed" if args.device == "cuda" else None)
    if precision is None:
        precision = str(yaml.safe_load((REPO / recipe.config).read_text())["trainer"]["precision"])
        if args.recipe == "full":  # simla.yaml says bf16-mixed; the CPU stand-in runs fp32
            precision = "32-true"
    started = dt.datetime.now(dt.timezone.utc)
    wall0 = time.perf_counter()
    load_start = load_average()
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        dvae = None
        if args.recipe == "full" and args.device == "cuda" and dall_e_available():
            dvae = str(random_dvae_weights(workdir))
        spec = RunSpec(
            recipe=args.recipe,
            device=args.device,
            precision=precision,
            batch_size=args.batch_size or recipe.batch_size,
            warmup=args.warmup,
            steps=args.steps,
            threads=args.threads,
            workdir=workdir,
            dvae_weights=dvae,
        )
        vocab = BERT_VOCAB if args.recipe == "full" and args.device == "cuda" else None
        num_train = args.num_train or 8 * spec.batch_size
        data = write_data(recipe, workdir / "data", num_train, args.num_val or recipe.num_val, vocab)
        print(f"data: {num_train} train / {data.num_val} val images of {data.source_size} px in {data.write_s:.1f} s")
        bare = bare_step(spec, data)
        if args.device == "cuda":  # the fits run in other processes: give the GPU memory of the bare step back
            import gc

            gc.collect()
            torch.cuda.empty_cache()
        print(f"bare step: {bare['samples_per_s']:.1f} samples/s ({bare['median_step_ms']:.0f} ms median)")
        pipeline = pipeline_rate(recipe.pipeline, args.pipeline_samples, spec.batch_size)
        per_worker = pipeline["samples_per_s_per_worker"]
        print(f"data pipeline: {per_worker:.1f} samples/s per worker")
        rows = []
        for workers in args.workers:
            row = run_fit(spec, data, workers, DEFAULTS, f"fit_w{workers}")
            rows.append(row)
            print(f"fit, {workers} workers: {row['samples_per_s']:.1f} samples/s")
        ablation_rows = []
        if args.ablate or args.ablations:
            workers = args.ablate_workers if args.ablate_workers is not None else args.workers[0]
            for ablation in (a for a in ABLATIONS if args.ablations is None or a.name in args.ablations):
                name = "ablate_" + ablation.name.replace(" ", "_").replace("+", "and").replace("-", "_")
                row = run_fit(spec, data, workers, ablation, name)
                ablation_rows.append(row)
                print(f"fit, {workers} workers, {ablation.name}: {row['samples_per_s']:.1f} samples/s")
    for row in rows + ablation_rows:
        row["fit_over_bare"] = row["samples_per_s"] / bare["samples_per_s"]
        row["fit_over_bare_median"] = row["samples_per_s_median"] / bare["samples_per_s_median"]
        adjacent = row.get("adjacent_bare")
        if adjacent:
            row["fit_over_adjacent_bare"] = row["samples_per_s"] / adjacent["samples_per_s"]
            row["fit_over_adjacent_bare_median"] = row["samples_per_s_median"] / adjacent["samples_per_s_median"]
    best = max((row["samples_per_s"] for row in rows), default=float("nan"))
    fed = [row["workers"] for row in rows if row.get("fit_over_adjacent_bare", row["fit_over_bare"]) >= 0.95]
    targets = {"bare step": bare["samples_per_s"], **{f"{rate:g} samples/s": rate for rate in args.feed_rates}}
    return {
        "meta": {
            "started": started.isoformat(timespec="seconds"),
            "command": "python -m benchmarks.fit " + " ".join(shlex.quote(a) for a in args.argv),
            "host": f"{platform.machine()}, {os.cpu_count()} cores",
            "device": describe_device(args.device),
            "torch": torch.__version__,
            "lightning": L.__version__,
            "recipe": args.recipe,
            "config": recipe.config,
            "model": describe_model(args.recipe, args.device, bool(spec.dvae_weights)),
            "pipeline": recipe.pipeline,
            "precision": precision,
            "batch_size": spec.batch_size,
            "warmup": spec.warmup,
            "steps": spec.steps,
            "threads": spec.threads,
            "num_train": data.num_train,
            "num_val": data.num_val,
            "vocab_size": data.vocab_size,
            "load_start": load_start,
            "load_end": load_average(),
            "wall_s": time.perf_counter() - wall0,
        },
        "bare": bare,
        "pipeline": pipeline,
        "fit": rows,
        "ablations": ablation_rows,
        "workers_needed": {name: workers_needed(rate, per_worker) for name, rate in targets.items()},
        "best_fit_samples_per_s": best,
        "workers_within_5pct_of_bare": min(fed) if fed else None,
    }


def describe_device(device: str) -> str:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def describe_model(recipe: str, device: str, dvae: bool) -> str:
    if recipe == "tiny":
        return "configs/pretrain/simla_tiny.yaml as is (ViT 128x4 on 8-px patches at 64 px, 4-layer stream of 128)"
    if device == "cpu":
        return (
            f"simla.yaml with a small model: {BENCH_VIT} (width 128, depth 4, 16-px patches at 256 px), 4-layer stream "
            "of 128 (257 positions), ITC embed 64 / queue 1024, pixel image targets, fp32, synthetic vocabulary"
        )
    targets = "random-weight dVAE codes" if dvae else "pixel targets (dall_e not importable)"
    return f"simla.yaml as is, random weights, vocabulary padded to {BERT_VOCAB}, {targets}"


# -- markdown ---------------------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _gpu(row: dict[str, Any]) -> str:
    gpu = row["gpu_utilization"]
    return f"{gpu['mean']:.0f}%" if isinstance(gpu, dict) else "unavailable"


def _periodic(row: dict[str, Any]) -> str:
    parts = []
    for entry in row["periodic"]:
        saves = ", ".join(f"{s:.2f}" for s in entry["checkpoint_s"])
        parts.append(f"{entry['seconds']:.1f} s (validation {entry['validation_s']:.1f} s; saves {saves or '–'} s)")
    return "; ".join(parts) or "none"


def _cpu_ratio(row: dict[str, Any]) -> float | None:
    """Bare over fit CPU time per step of the training process (>1: fit needs less; data workers not counted)."""
    adjacent = row.get("adjacent_bare") or {}
    fit_cpu = row.get("main_process_cpu_ms_per_step")
    if not adjacent or not fit_cpu or math.isnan(fit_cpu):
        return None
    return adjacent["cpu_ms_per_step"] / fit_cpu


def _syncs(row: dict[str, Any]) -> str:
    value = row.get("syncs_per_step")
    return f"{value:.1f}" if isinstance(value, (int, float)) else "unavailable"


def _load(row: dict[str, Any]) -> str:
    return f"{'/'.join(map(str, row['load_before']))} → {'/'.join(map(str, row['load_after']))}"


def to_markdown(report: dict[str, Any]) -> str:
    meta, bare, pipeline = report["meta"], report["bare"], report["pipeline"]
    rows = report["fit"] + report["ablations"]
    lines = [
        f"{meta['started']} · {meta['device']} · torch {meta['torch']}, Lightning {meta['lightning']} · "
        f"`{meta['command']}` · wall {meta['wall_s']:.0f} s",
        "",
        f"Recipe `{meta['recipe']}`: {meta['model']}; data pipeline `{meta['pipeline']}`; batch "
        f"{meta['batch_size']}; precision {meta['precision']}; {meta['threads']} torch thread(s) in the training "
        f"process; {meta['warmup']} warm-up steps, {meta['steps']} timed; synthetic data {meta['num_train']} train / "
        f"{meta['num_val']} validation images, vocabulary {meta['vocab_size']}.",
        f"Load average (1/5/15 min) at the start {'/'.join(map(str, meta['load_start']))}, at the end "
        f"{'/'.join(map(str, meta['load_end']))}.",
        "",
        "Throughput. *bare (own run)*: `train_step` in the benchmark process before the fits; *adjacent bare*: "
        "`train_step` inside each fit process right after its timed window, on its last batch.",
        "",
        "| run | workers | fit samples/s | fit / bare (own run) | adjacent bare samples/s | fit / adjacent bare "
        "| same, from medians | load before → after |",
        "|---|---|---|---|---|---|---|---|",
        f"| bare step (own run) | – | {_fmt(bare['samples_per_s'])} | 1.00 | – | – | – | {_load(bare)} |",
    ]
    for row in rows:
        adjacent = row.get("adjacent_bare") or {}
        lines.append(
            f"| {row['ablation']['name']} | {row['workers']} | {_fmt(row['samples_per_s'])} | "
            f"{_fmt(row['fit_over_bare'], 2)} | {_fmt(adjacent.get('samples_per_s'))} | "
            f"{_fmt(row.get('fit_over_adjacent_bare'), 2)} | {_fmt(row.get('fit_over_adjacent_bare_median'), 2)} | "
            f"{_load(row)} |"
        )
    lines += [
        "",
        "Where the time goes (steady intervals; CPU = the training process's CPU time, data workers excluded; "
        "conversions = logged tensors turned into Python numbers, each a host sync on CUDA).",
        "",
        "| run | workers | median interval ms: in step / between | CPU ms per step: in step / between | "
        "adjacent bare CPU ms | fit / adjacent bare by CPU time | conversions per step | host syncs per step "
        "| GPU util | periodic intervals |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| bare step (own run) | – | {_fmt(bare['median_step_ms'], 0)} / – | {_fmt(bare['cpu_ms_per_step'], 0)} / – "
        "| – | – | 0 | – | – | – |",
    ]
    for row in rows:
        adjacent = row.get("adjacent_bare") or {}
        lines.append(
            f"| {row['ablation']['name']} | {row['workers']} | {_fmt(row.get('in_step_ms_median'), 0)} / "
            f"{_fmt(row.get('between_steps_ms_median'), 0)} | {_fmt(row.get('in_step_cpu_ms'), 0)} / "
            f"{_fmt(row.get('between_steps_cpu_ms'), 0)} | {_fmt(adjacent.get('cpu_ms_per_step'), 0)} | "
            f"{_fmt(_cpu_ratio(row), 2)} | {_fmt(row['conversions_per_step'], 1)} | {_syncs(row)} | {_gpu(row)} | "
            f"{_periodic(row)} |"
        )
    needed = report["workers_needed"]
    lines += [
        "",
        f"Data pipeline `{pipeline['recipe']}` ({pipeline['source_jpeg_size']} px JPEGs → {pipeline['image_size']} px, "
        f"one torch thread as in a DataLoader worker): {_fmt(pipeline['samples_per_s_per_worker'])} samples/s per "
        "worker. Workers needed: "
        + ", ".join(f"{_fmt(count)} for {name}" for name, count in needed.items())
        + ". Smallest measured worker count within 5% of the bare step (adjacent): "
        + _fmt(report["workers_within_5pct_of_bare"])
        + ".",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=30, help="timed loop iterations per fit run (and bare steps)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (fit and bare)")
    parser.add_argument(
        "--workers", default=None, help="comma-separated data-worker counts (default: 0,1,2 on cpu, 2,4,8 on cuda)"
    )
    parser.add_argument(
        "--precision", default=None, help="trainer.precision (default: the config's; bf16-mixed on cuda)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (tiny 32, full 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on cpu, 4 on cuda)")
    parser.add_argument("--ablate", action="store_true", help="also run each default switched off, then all off")
    parser.add_argument("--ablate-workers", type=int, default=None, help="worker count of the ablation runs")
    parser.add_argument(
        "--ablations",
        default=None,
        help=f"comma-separated subset of the ablations (implies --ablate): {ABLATION_NAMES}",
    )
    parser.add_argument("--num-train", type=int, default=None, help="synthetic training images (default 8 batches)")
    parser.add_argument("--num-val", type=int, default=None, help="synthetic validation images (tiny 64, full 256)")
    parser.add_argument("--pipeline-samples", type=int, default=320, help="samples timed for the per-worker rate")
    parser.add_argument("--feed-rates", default="400", help="comma-separated rates to size the workers for")
    parser.add_argument("--workdir", default=None, help="keep data, logs and run folders here (default: a temp dir)")
    parser.add_argument("--out", default=None, help="JSON report; the markdown goes next to it")
    parser.add_argument("--render", default=None, help="only rewrite the markdown of this JSON report, run nothing")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.workers is None:
        args.workers = "0,1,2" if args.device == "cpu" else "2,4,8"
    args.workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    args.feed_rates = [float(r) for r in str(args.feed_rates).split(",") if r.strip()]
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 4
    args.ablations = [a.strip() for a in args.ablations.split(",")] if args.ablations else None
    unknown = [a for a in args.ablations or [] if a not in ABLATION_NAMES]
    if unknown:
        parser.error(f"--ablations: unknown {unknown}; choose from {ABLATION_NAMES}")
    if args.steps < 3 or args.warmup < 2:
        parser.error("--steps must be >= 3 and --warmup >= 2 (one validation in the window, steady steps around it)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        report = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(to_markdown(report))
        return report
    report = measure(args)
    markdown = to_markdown(report)
    print(markdown)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        out.with_suffix(".md").write_text(markdown)
    return report


if __name__ == "__main__":
    main()
