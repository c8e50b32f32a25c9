"""One pretraining step, timed: forward (``PretrainRecipe.training_step``), backward, AdamW, EMA and queue updates.

The LightningModule's methods are called directly, without a Trainer, so the numbers measure the model and
the optimiser only (no data loading, logging or callbacks). Each "fast step" that is switchable is toggled
by a :class:`Case`; switches that are not config options (batched passes, fused attention kernels, sync-free
negative sampling) are emulated here by swapping in the unbatched / reference-style code paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

OBJECTIVE_SETS: dict[str, tuple[str, ...]] = {
    "itc": ("itc",),
    "itc+itm": ("itc", "itm"),
    "itc+itm+xmm": ("itc", "itm", "xmm"),
    "simla": ("itc", "itm", "xmm", "psl"),
}


@dataclass(frozen=True)
class RecipeSize:
    """Encoder sizes and batch of one benchmarked recipe."""

    vision: str
    img_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int
    vocab: int
    embed_dim: int
    queue_size: int
    batch_size: int
    text_length: int = 25
    dvae: bool = False  # DALL-E dVAE image targets when the dall_e package is importable


RECIPES: dict[str, RecipeSize] = {
    # configs/pretrain/simla_tiny.yaml (vocabulary of the synthetic WordPiece tokenizer)
    "tiny": RecipeSize("vit_vlalign_small_patch8", 64, 128, 4, 4, 256, 80, 600, 64, 1024, 32),
    # configs/pretrain/simla.yaml: ViT-B/16 at 256 px, BERT-base stream, batch 64 per GPU
    "full": RecipeSize("vit_base_patch16_224", 256, 768, 12, 12, 3072, 512, 30522, 256, 65536, 64, dvae=True),
}


@dataclass(frozen=True)
class Case:
    """One row of the model table: a recipe, an objective set and the state of every fast-step switch."""

    name: str
    recipe: str
    objectives: str = "simla"
    precision: str = "fp32"  # fp32 | tf32 (fp32 with TF32 matmuls) | bf16 (autocast)
    checkpointing: bool = False
    compile: bool | str = False  # model.compile_encoders: True = "blocks" (regional), "whole"
    fused_adamw: bool | None = None  # None: vlalign's default (fused on CUDA and CPU)
    batched_passes: bool = True  # clean+masked ViT in one batch, ITM's 3B fusion batch
    fused_attention: bool = True  # SDPA kernels; False forces the math (explicit softmax) backend
    sync_free_negatives: bool = True  # False: reference-style per-row multinomial(...).item() draws
    batch_size: int | None = None

    @property
    def options(self) -> str:
        parts = [self.precision]
        parts.append("ckpt" if self.checkpointing else "no-ckpt")
        if self.compile:
            parts.append("compile" if self.compile is True else f"compile-{self.compile}")
        if self.fused_adamw is not None:
            parts.append("fused-adamw" if self.fused_adamw else "unfused-adamw")
        if not self.batched_passes:
            parts.append("unbatched")
        if not self.fused_attention:
            parts.append("math-attn")
        if not self.sync_free_negatives:
            parts.append("per-row-neg")
        return ", ".join(parts)


def standard_cases(recipe: str, device: str, variants: str = "default") -> list[Case]:
    """The objective-set rows at the device's default precision, then SIMLA with each switch flipped."""
    default_precision = "bf16" if device == "cuda" else "fp32"
    base = Case("simla", recipe, precision=default_precision)
    cases = [dataclasses.replace(base, name=name, objectives=name) for name in OBJECTIVE_SETS]
    flips: list[Case] = []
    if device == "cuda":
        flips += [
            dataclasses.replace(base, name="simla fp32", precision="fp32"),
            dataclasses.replace(base, name="simla tf32", precision="tf32"),
        ]
    else:
        flips.append(dataclasses.replace(base, name="simla bf16", precision="bf16"))
    flips += [
        dataclasses.replace(base, name="simla +ckpt", checkpointing=True),
        dataclasses.replace(base, name="simla unbatched", batched_passes=False),
        dataclasses.replace(base, name="simla math-attn", fused_attention=False),
        dataclasses.replace(base, name="simla per-row-neg", sync_free_negatives=False),
        # vlalign fuses AdamW by default on CUDA only: flip it the other way on each device
        dataclasses.replace(
            base,
            name="simla unfused-adamw" if device == "cuda" else "simla fused-adamw",
            fused_adamw=device != "cuda",
        ),
        dataclasses.replace(
            base,
            name="all off (fp32)",
            precision="fp32",
            fused_adamw=False,
            batched_passes=False,
            fused_attention=False,
            sync_free_negatives=False,
        ),
    ]
    if variants == "all" or device == "cuda":
        flips.append(dataclasses.replace(base, name="simla +compile", compile=True))
        flips.append(dataclasses.replace(base, name="simla +compile-whole", compile="whole"))
    return cases + flips


# -- building ------------------------------------------------------------------------------------------------------
def dall_e_available() -> bool:
    try:
        import dall_e.encoder  # noqa: F401
    except ImportError:
        return False
    return True


def random_dvae_weights(directory: Path) -> Path:
    """A randomly initialised DALL-E encoder (reference sizes) in the safetensors layout DVAETargets reads."""
    from dall_e.encoder import Encoder
    from safetensors.torch import save_file

    config = {"n_hid": 256, "n_blk_per_group": 2, "input_channels": 3, "vocab_size": 8192}
    encoder = Encoder(**config, requires_grad=False, use_mixed_precision=False)
    path = directory / "dvae_random.safetensors"
    state = {k: v.detach().float().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(path), metadata={"dvae_config": json.dumps(config)})
    return path


def build_recipe(case: Case, workdir: Path) -> tuple[Any, str]:
    """The PretrainRecipe of ``case`` with random weights, and the name of its image-target kind."""
    from vlalign.data.tokenization import VocabInfo
    from vlalign.models.stream import StreamConfig
    from vlalign.models.vision import VisionConfig
    from vlalign.objectives.image_targets import DVAETargets, PixelTargets
    from vlalign.objectives.itc import ITC
    from vlalign.objectives.itm import ITM
    from vlalign.objectives.psl import PSL
    from vlalign.objectives.xmm import XMM
    from vlalign.tasks.optim import OptimConfig
    from vlalign.tasks.pretrain import PretrainRecipe

    size = RECIPES[case.recipe]
    enabled = OBJECTIVE_SETS[case.objectives]
    targets_kind = "none"
    targets = None
    if "xmm" in enabled:
        if size.dvae and dall_e_available():
            targets, targets_kind = DVAETargets(str(random_dvae_weights(workdir))), "dvae"
        else:
            targets, targets_kind = PixelTargets(), "pixels"
    vocab = VocabInfo(vocab_size=size.vocab) if size.vocab == 30522 else VocabInfo(size.vocab, 0, 2, 3, 4, 1)
    recipe = PretrainRecipe(
        vision=VisionConfig(name=size.vision, img_size=size.img_size, gradient_checkpointing=case.checkpointing),
        stream=StreamConfig(
            vocab_size=size.vocab,
            hidden_size=size.hidden,
            num_layers=size.layers,
            num_heads=size.heads,
            intermediate_size=size.intermediate,
            max_position_embeddings=size.max_positions,
            encoder_width=size.hidden,
            gradient_checkpointing=case.checkpointing,
        ),
        vocab=vocab,
        itc=ITC(embed_dim=size.embed_dim, queue_size=size.queue_size),
        itm=ITM() if "itm" in enabled else None,
        xmm=XMM(image_targets=targets) if "xmm" in enabled else None,
        psl=PSL() if "psl" in enabled else None,
        optim=OptimConfig(fused=case.fused_adamw),
        compile_encoders=case.compile,
    )
    return recipe, targets_kind


def make_batch(case: Case, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Random images and captions shaped like a real batch: lengths 8..25 padded to the longest, BEiT-sized masks."""
    size = RECIPES[case.recipe]
    batch_size = case.batch_size or size.batch_size
    g = torch.Generator().manual_seed(seed)
    length = size.text_length
    ids = torch.randint(5, size.vocab, (batch_size, length), generator=g)
    cls_id = 101 if size.vocab == 30522 else 2
    sep_id = 102 if size.vocab == 30522 else 3
    lengths = torch.randint(8, length + 1, (batch_size,), generator=g)
    lengths[0] = length
    positions = torch.arange(length)[None, :]
    mask = positions < lengths[:, None]
    ids[:, 0] = cls_id
    ids = torch.where(positions == lengths[:, None] - 1, torch.full_like(ids, sep_id), ids)
    ids = ids.masked_fill(~mask, 0)
    grid = size.img_size // (8 if size.vision.endswith("patch8") else 16)
    num_masked = round(75 * grid * grid / 256)  # the reference's 75 of 256 patches, scaled to the grid
    order = torch.rand(batch_size, grid * grid, generator=g).argsort(dim=1)
    patch_mask = torch.zeros(batch_size, grid * grid, dtype=torch.bool)
    patch_mask.scatter_(1, order[:, :num_masked], True)
    batch = {
        "image": torch.randn(batch_size, 3, size.img_size, size.img_size, generator=g),
        "input_ids": ids,
        "attention_mask": mask.long(),
        "patch_mask": patch_mask.view(batch_size, grid, grid),
        "tokenizer_view": torch.rand(batch_size, 3, size.img_size // 2, size.img_size // 2, generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


# -- emulated switches ----------------------------------------------------------------------------------------------
def _unbatched_context_class():
    """StepContext running clean and masked images as two ViT passes and ITM's 3B fusion as three B passes."""
    from vlalign.models.stream import StreamOutput
    from vlalign.objectives.context import StepContext

    class UnbatchedContext(StepContext):
        def _images(self, momentum):
            encoder = self.backbone.encoder("vision", momentum)
            images = self.batch["image"]
            if not self.masked_images:
                return encoder(images), None
            return encoder(images), encoder(images, self.patch_mask)

        def fuse(self, input_ids, attention_mask, image_tokens, *, text_states=None, **kwargs):
            chunk = self.input_ids.shape[0]
            if input_ids.shape[0] <= chunk:
                return super().fuse(input_ids, attention_mask, image_tokens, text_states=text_states, **kwargs)
            outs = [
                super(UnbatchedContext, self).fuse(
                    input_ids[i : i + chunk],
                    attention_mask[i : i + chunk],
                    image_tokens[i : i + chunk],
                    text_states=None if text_states is None else text_states[i : i + chunk],
                    **kwargs,
                )
                for i in range(0, input_ids.shape[0], chunk)
            ]
            return StreamOutput(last_hidden_state=torch.cat([o.last_hidden_state for o in outs]))

    return UnbatchedContext


@torch.no_grad()
def reference_negative_sampling(sim, exclude=None, generator=None):
    """The reference's draws: softmax, zeroed positives, one ``multinomial(...).item()`` per row (a sync each)."""
    rows, cols = sim.shape
    weights = F.softmax(sim.float(), dim=1)
    if exclude is None:
        exclude = torch.eye(rows, cols, dtype=torch.bool, device=sim.device)
    weights = weights.masked_fill(exclude, 0.0)
    picks = [torch.multinomial(weights[b], 1, generator=generator).item() for b in range(rows)]
    return torch.tensor(picks, device=sim.device)


@contextlib.contextmanager
def switches(case: Case) -> Iterator[None]:
    """Patch in the emulated (slow) code paths of ``case`` for the duration of the block."""
    import vlalign.objectives.itm as itm_module
    import vlalign.tasks.pretrain as pretrain_module

    saved_context, saved_sampler = pretrain_module.StepContext, itm_module.sample_hard_negatives
    saved_precision = torch.get_float32_matmul_precision()
    stack = contextlib.ExitStack()
    try:
        if not case.batched_passes:
            pretrain_module.StepContext = _unbatched_context_class()
        if not case.sync_free_negatives:
            itm_module.sample_hard_negatives = reference_negative_sampling
        torch.set_float32_matmul_precision("high" if case.precision == "tf32" else "highest")
        if not case.fused_attention:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield
    finally:
        stack.close()
        pretrain_module.StepContext, itm_module.sample_hard_negatives = saved_context, saved_sampler
        torch.set_float32_matmul_precision(saved_precision)


# -- measuring ------------------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    case: dict
    status: str = "ok"
    targets: str = ""
    batch_size: int = 0
    step_ms: float = float("nan")
    samples_per_s: float = float("nan")
    peak_memory_mb: float = float("nan")
    memory_kind: str = ""
    gflop_per_sample: float = float("nan")
    achieved_tflops: float = float("nan")
    mfu: float | None = None
    step_times_ms: list[float] = field(default_factory=list)
    compile_s: float | None = None
    loss: float = float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(case: Case, device: torch.device):
    if case.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def count_step_flops(recipe, batch: dict, case: Case, device: torch.device) -> float:
    """FLOPs of one forward + backward (FlopCounterMode: matmuls, convolutions, attention), without recompute."""
    from torch.utils.flop_counter import FlopCounterMode

    vit = recipe.backbone.vision.vit
    saved = vit.grad_checkpointing, recipe.backbone.stream.config.gradient_checkpointing
    vit.grad_checkpointing, recipe.backbone.stream.config.gradient_checkpointing = False, False
    try:
        counter = FlopCounterMode(display=False)
        with counter:  # one block: entering the counter again would reset its counts
            with _autocast(case, device):
                loss = recipe.training_step(batch, 0)
            loss.backward()
        recipe.zero_grad(set_to_none=True)
    finally:
        vit.grad_checkpointing, recipe.backbone.stream.config.gradient_checkpointing = saved
    return float(counter.get_total_flops())


def run_case(
    case: Case,
    device_name: str,
    steps: int,
    warmup: int,
    peak_tflops: float | None,
    known_flops: float | None = None,
) -> dict:
    """Build, warm up and time ``case``; returns a :class:`StepResult` as a dict (picklable across processes)."""
    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning.*")
    from vlalign.tasks.optim import build_optimizer
    from vlalign.testing import train_step

    device = torch.device(device_name)
    result = StepResult(case=dataclasses.asdict(case))
    if device.type == "cuda":
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    recipe = optimizer = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            torch.manual_seed(0)
            recipe, result.targets = build_recipe(case, Path(tmp))
            recipe = recipe.to(device).train()
            batch = make_batch(case, device)
            result.batch_size = batch["input_ids"].shape[0]
            optim = build_optimizer(recipe, recipe.optim, total_steps=100_000)
            optimizer, scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rss_before = _maxrss_mb()

            def step() -> torch.Tensor:
                with _autocast(case, device):
                    return train_step(recipe, batch, optimizer, scheduler)

            with switches(case):
                flops = known_flops if known_flops is not None else count_step_flops(recipe, batch, case, device)
                result.gflop_per_sample = flops / result.batch_size / 1e9
                recipe.configure_model()  # compiles the encoders when the case asks for it
                times = []
                for index in range(warmup + steps):
                    _sync(device)
                    start = time.perf_counter()
                    loss = step()
                    _sync(device)
                    elapsed = time.perf_counter() - start
                    if index == 0 and case.compile:
                        result.compile_s = elapsed
                    if index >= warmup:
                        times.append(elapsed)
            result.loss = float(loss.detach())
            if not math.isfinite(result.loss):
                result.status = "non-finite loss"
            median = statistics.median(times)
            result.step_times_ms = [t * 1e3 for t in times]
            result.step_ms = median * 1e3
            result.samples_per_s = result.batch_size / median
            result.achieved_tflops = flops / median / 1e12
            if peak_tflops:
                result.mfu = result.achieved_tflops / peak_tflops
            if device.type == "cuda":
                result.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
                result.memory_kind = "cuda max_memory_allocated"
            else:
                result.peak_memory_mb = _maxrss_mb()
                result.memory_kind = f"process max RSS (before first step {rss_before:.0f} MB)"
        except torch.cuda.OutOfMemoryError:
            result.status = "OOM"
            if device.type == "cuda":
                result.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
        finally:
            recipe = optimizer = scheduler = batch = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch._dynamo.reset()
    return dataclasses.asdict(result)
