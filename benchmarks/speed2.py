"""Speed II on the CPU: ``python -m benchmarks.speed2`` (reduced config, ITC queue 4,096 and 65,536).

The reduced config of docs/benchmarks.md "Speed II (CPU)": a ViT of width 192, depth 2, 3 heads and 16-px patches
at 128 px; a 2-layer stream of width 192 (3 heads, intermediate 768, cross-attention in every layer); embedding
256; vocabulary 30,522; batch 8; fp32; ITC, ITM, XMM (text and image side) and PSL. vlalign has no image target
that reads precomputed code ids, so this file defines one (:class:`PrecomputedCodes`: random ids of an 8,192-word
codebook carried in the batch, as a dVAE's codes computed ahead of training would be), and the MIM head predicts
8,192 classes as with dVAE targets, without running a dVAE.

One step is ``vlalign.testing.train_step`` (forward, backward, AdamW with the recipe's default settings, EMA and
queue updates; no Trainer) on one fixed random batch. Each (code, queue size) setting runs in its own worker
process: **after** imports vlalign from this working tree, **before** (with ``--compare``, the default) from an
export of ``--before-commit`` (``git archive`` of its ``src``: the whole library as it was, not one swapped
function). Same seed, same weights and batch; the workers are timed one at a time in interleaved blocks of
``--block`` steps whose order rotates every round, so a change of machine load hits all settings alike. Per setting: the median over rounds of the per-step wall time and process
CPU time of a block, samples/s from the wall time, and after/before ratios (median of the per-round ratios); the
load average before and after. ``--profile`` adds a ``torch.profiler`` table (top 10 by self CPU time) per
setting. ``--out`` writes JSON and the markdown next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import time
import types
import warnings
from pathlib import Path
from typing import Any

import torch

from vlalign.objectives.image_targets import ImageTargets

#: The last commit before the Speed II changes ("today" in issue 13): its ITC.forward concatenates the transposed
#: queue into the candidate matrix every step, its AdamW on the CPU is the foreach kernel.
BEFORE_COMMIT = "ec056252a6a9f6701b8d3c2cd58bd2347d15ef3c"
QUEUES = (4096, 65536)
BATCH, TEXT_LENGTH, IMAGE, PATCH, VOCAB, CODEBOOK = 8, 25, 128, 16, 30522, 8192
REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "reduced": "ViT 192x2 (16 px, 128 px), stream 2x192 (3 heads, 768, cross-attention every layer), embed 256, "
    "vocab 30522, batch 8, fp32, ITC+ITM+XMM(text + image: precomputed code ids, 8192 classes)+PSL",
    "tiny": "simla_tiny.yaml sizes (benchmarks/model.py 'tiny'), queue 1024, batch 32, fp32, SIMLA, pixel targets",
}


# -- the reduced config -----------------------------------------------------------------------------------------------
def _register_vit() -> str:
    """A timm ViT of width 192, depth 2, 3 heads, MLP ratio 4, 16-px patches at 128 px (registered once)."""
    from timm.models import build_model_with_cfg, is_model, register_model
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    name = "vit_speed2_reduced_patch16"
    if is_model(name):
        return name

    def build(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        cfg = {"input_size": (3, IMAGE, IMAGE), "num_classes": 0, "first_conv": "patch_embed.proj"}
        kwargs.pop("pretrained_cfg", None)
        args = {"img_size": IMAGE, "patch_size": PATCH, "embed_dim": 192, "depth": 2, "num_heads": 3}
        return build_model_with_cfg(
            VisionTransformer, name, pretrained=False, pretrained_cfg=cfg, pretrained_filter_fn=checkpoint_filter_fn,
            **{**args, "mlp_ratio": 4.0, "qkv_bias": True, **kwargs},
        )  # fmt: skip

    build.__name__ = name
    register_model(build)
    return name


class PrecomputedCodes(ImageTargets):
    """Image-side targets given as code ids in ``batch["image_codes"]`` [B, N] (no tokenizer runs in the step)."""

    def __init__(self, codebook: int = CODEBOOK) -> None:
        super().__init__()
        self.num_classes = codebook

    def targets(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["image_codes"]


def build_reduced(queue_size: int) -> Any:
    """The reduced-config PretrainRecipe with random weights and an ITC queue of ``queue_size``."""
    from vlalign.data.tokenization import VocabInfo
    from vlalign.models.stream import StreamConfig
    from vlalign.models.vision import VisionConfig
    from vlalign.objectives.itc import ITC
    from vlalign.objectives.itm import ITM
    from vlalign.objectives.psl import PSL
    from vlalign.objectives.xmm import XMM
    from vlalign.tasks.pretrain import PretrainRecipe

    stream = StreamConfig(
        vocab_size=VOCAB, hidden_size=192, num_layers=2, num_heads=3, intermediate_size=768,
        max_position_embeddings=80, encoder_width=192,
    )  # fmt: skip
    return PretrainRecipe(
        vision=VisionConfig(name=_register_vit(), img_size=IMAGE),
        stream=stream,
        vocab=VocabInfo(vocab_size=VOCAB),
        itc=ITC(embed_dim=256, queue_size=queue_size),
        itm=ITM(),
        xmm=XMM(image_targets=PrecomputedCodes()),
        psl=PSL(),
    )


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Captions of 8–25 BERT ids padded to 25, 19 of 64 patches masked (BEiT's 75/256), code ids per patch."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB, (BATCH, TEXT_LENGTH), generator=g)
    lengths = torch.randint(8, TEXT_LENGTH + 1, (BATCH,), generator=g)
    lengths[0] = TEXT_LENGTH
    positions = torch.arange(TEXT_LENGTH)[None, :]
    mask = positions < lengths[:, None]
    ids[:, 0] = 101  # [CLS]
    ids = torch.where(positions == lengths[:, None] - 1, torch.full_like(ids, 102), ids).masked_fill(~mask, 0)
    grid = IMAGE // PATCH
    order = torch.rand(BATCH, grid * grid, generator=g).argsort(dim=1)
    patch_mask = torch.zeros(BATCH, grid * grid, dtype=torch.bool)
    patch_mask.scatter_(1, order[:, : round(75 * grid * grid / 256)], True)
    return {
        "image": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g),
        "input_ids": ids,
        "attention_mask": mask.long(),
        "patch_mask": patch_mask.view(BATCH, grid, grid),
        "image_codes": torch.randint(CODEBOOK, (BATCH, grid * grid), generator=g),
    }


# -- the code path before ----------------------------------------------------------------------------------------------
def before_itc_forward(commit: str) -> Any:
    """``ITC.forward`` as of ``commit`` (``git show`` of objectives/itc.py, executed here; the registry is left as
    it was). Raises RuntimeError when the repository's history is not available."""
    from vlalign.objectives import base

    try:
        source = subprocess.run(
            ["git", "show", f"{commit}:src/vlalign/objectives/itc.py"],
            cwd=REPO, check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(f"cannot read objectives/itc.py at {commit} (pass --no-compare): {err}") from err
    module = types.ModuleType("benchmarks._itc_before")
    registered = dict(base.OBJECTIVES)
    try:
        exec(compile(source, f"{commit[:10]}:src/vlalign/objectives/itc.py", "exec"), module.__dict__)
    finally:
        base.OBJECTIVES.clear()
        base.OBJECTIVES.update(registered)
    return module.ITC.forward


# -- measuring --------------------------------------------------------------------------------------------------------
def setup(queues: tuple[int, ...], recipe_name: str = "reduced") -> tuple[dict[int, tuple[Any, Any]], dict]:
    """One recipe (same seed: same weights) and AdamW optimizer per queue size, and the batch. ``tiny``:
    ``benchmarks/model.py``'s tiny SIMLA row (simla_tiny.yaml sizes, queue 1,024, batch 32, pixel targets)."""
    import tempfile

    from vlalign.tasks.optim import build_optimizer

    if recipe_name == "tiny":
        from benchmarks.model import RECIPES, Case, build_recipe
        from benchmarks.model import make_batch as tiny_batch
    built = {}
    for queue in queues:
        torch.manual_seed(0)
        if recipe_name == "tiny":
            if queue != RECIPES["tiny"].queue_size:
                raise SystemExit(f"--recipe tiny has queue {RECIPES['tiny'].queue_size}: pass --queues accordingly")
            with tempfile.TemporaryDirectory() as tmp:
                recipe = build_recipe(Case("speed2", "tiny"), Path(tmp))[0].train()
        else:
            recipe = build_reduced(queue).train()
        optimizer = build_optimizer(recipe, recipe.optim, total_steps=100_000)["optimizer"]
        built[queue] = (recipe, optimizer)
    batch = tiny_batch(Case("speed2", "tiny"), torch.device("cpu")) if recipe_name == "tiny" else make_batch()
    return built, batch


@contextlib.contextmanager
def itc_forward_of(itc: Any, forward: Any | None) -> Any:
    """Run ``itc`` with ``forward`` (a function of (self, ctx)) for the block; None: the current code."""
    if forward is None:
        yield
        return
    itc.forward = types.MethodType(forward, itc)
    try:
        yield
    finally:
        del itc.forward


def _steps(recipe: Any, optimizer: Any, batch: dict, steps: int) -> tuple[float, float]:
    """Wall and process CPU milliseconds per step over ``steps`` train steps."""
    from vlalign.testing import train_step

    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        train_step(recipe, batch, optimizer)
    return (time.perf_counter() - wall) * 1e3 / steps, (time.process_time() - cpu) * 1e3 / steps


def worker(args: argparse.Namespace) -> None:
    """``--worker``: build one recipe (``--queues`` holds one size), then answer commands on stdin, one JSON line
    each: ``time N`` (wall and CPU ms per step over N steps), ``profile N [shapes]`` (:func:`profile_table`)."""
    import sys

    import vlalign

    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer
    built, batch = setup(args.queues, args.recipe)
    ((recipe, optimizer),) = built.values()
    fused = any(group.get("fused") for group in optimizer.param_groups)
    print(json.dumps({"ready": True, "vlalign": vlalign.__file__, "fused_adamw": fused}), flush=True)
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "time":
            wall, cpu = _steps(recipe, optimizer, batch, int(rest[0]))
            print(json.dumps({"wall_ms": wall, "cpu_ms": cpu}), flush=True)
        elif command == "profile":
            print(json.dumps(profile_table(built[args.queues[0]], batch, int(rest[0]), bool(rest[1:]))), flush=True)
        else:
            raise SystemExit(f"unknown worker command {command!r}")


class Worker:
    """A ``--worker`` subprocess timing one (code, queue) setting; ``source`` is the ``src`` folder it imports
    vlalign from (the working tree, or a checkout of the before commit)."""

    def __init__(self, source: Path, recipe: str, queue: int, threads: int | None) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), str(REPO)])}
        command = [os.sys.executable, "-m", "benchmarks.speed2", "--worker", "--recipe", recipe, "--queues", str(queue)]
        if threads:
            command += ["--threads", str(threads)]
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )  # fmt: skip
        self.info = self._read()
        if Path(self.info["vlalign"]).resolve().parents[1] != source.resolve():
            raise RuntimeError(f"worker imported vlalign from {self.info['vlalign']}, expected {source}")

    def _read(self) -> dict:
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"benchmark worker exited with {self.process.wait()}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()  # type: ignore[union-attr]
        self.process.wait()


@contextlib.contextmanager
def before_tree(commit: str) -> Any:
    """A read-only export of ``commit``'s ``src`` folder in a temporary directory (``git archive``)."""
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vlalign-before-") as tmp:
        try:
            archive = subprocess.run(
                ["git", "archive", "--format=tar", commit, "src"], cwd=REPO, check=True, capture_output=True
            ).stdout  # fmt: skip
        except (OSError, subprocess.CalledProcessError) as err:
            raise RuntimeError(f"cannot export {commit} (pass --no-compare): {err}") from err
        import io

        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp) / "src"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every (queue, code) setting in its own worker process, timed in interleaved blocks."""
    with contextlib.ExitStack() as stack:
        sources = {"after": REPO / "src"}
        if args.compare:
            sources["before"] = stack.enter_context(before_tree(args.before_commit))
        keys = [(queue, setting) for queue in args.queues for setting in sources]
        workers: dict[tuple[int, str], Worker] = {}
        for queue, setting in keys:
            workers[queue, setting] = Worker(sources[setting], args.recipe, queue, args.threads)
            stack.callback(workers[queue, setting].close)
        for key in keys:
            if args.warmup:
                workers[key].ask(f"time {args.warmup}")
        load_before = os.getloadavg()
        wall: dict[tuple[int, str], list[float]] = {key: [] for key in keys}
        cpu: dict[tuple[int, str], list[float]] = {key: [] for key in keys}
        for index in range(args.rounds):
            for key in keys[index % len(keys) :] + keys[: index % len(keys)]:  # rotate: no setting always runs first
                timed = workers[key].ask(f"time {args.block}")
                wall[key].append(timed["wall_ms"])
                cpu[key].append(timed["cpu_ms"])
        load_after = os.getloadavg()
        profiles = {}
        if args.profile:
            for queue, setting in keys:
                shapes = " shapes" if args.profile_shapes else ""
                profiles[f"{setting} q{queue}"] = workers[queue, setting].ask(f"profile {args.profile_steps}{shapes}")
        fused = {f"{setting} q{queue}": workers[queue, setting].info["fused_adamw"] for queue, setting in keys}
    batch_size = BATCH if args.recipe == "reduced" else 32
    rows = []
    for queue, setting in keys:
        row: dict[str, Any] = {
            "queue": queue,
            "setting": setting,
            "step_ms_median": statistics.median(wall[queue, setting]),
            "cpu_ms_median": statistics.median(cpu[queue, setting]),
            "samples_per_s": batch_size / statistics.median(wall[queue, setting]) * 1e3,
            "samples_per_cpu_s": batch_size / statistics.median(cpu[queue, setting]) * 1e3,
            "block_step_ms": wall[queue, setting],
            "block_cpu_ms": cpu[queue, setting],
        }
        if setting != "before" and (queue, "before") in wall:
            before_wall, before_cpu = wall[queue, "before"], cpu[queue, "before"]
            row["speedup_wall"] = statistics.median(
                b / a for a, b in zip(wall[queue, setting], before_wall, strict=True)
            )
            row["speedup_cpu"] = statistics.median(b / a for a, b in zip(cpu[queue, setting], before_cpu, strict=True))
        rows.append(row)
    result: dict[str, Any] = {
        "config": CONFIGS[args.recipe],
        "batch_size": batch_size,
        "threads": args.threads or torch.get_num_threads(),
        "rounds": args.rounds,
        "block": args.block,
        "warmup": args.warmup,
        "before_commit": args.before_commit if args.compare else None,
        "fused_adamw": fused,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "rows": rows,
        "torch": torch.__version__,
    }
    if profiles:
        result["profiles"] = profiles
    return result


def profile_table(built: tuple[Any, Any], batch: dict[str, torch.Tensor], steps: int, by_shape: bool = False) -> dict:
    """``torch.profiler`` over ``steps`` train steps: the top 10 operators (with ``by_shape``: operator and input
    shapes) by self CPU time, per step."""
    from torch.profiler import ProfilerActivity, profile

    from vlalign.testing import train_step

    recipe, optimizer = built
    train_step(recipe, batch, optimizer)  # warm
    with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as prof:
        for _ in range(steps):
            train_step(recipe, batch, optimizer)
    averages = prof.key_averages(group_by_input_shape=by_shape)
    events = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [
        {
            "name": f"{e.key} {e.input_shapes}" if by_shape else e.key,
            "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "self_cpu_share": e.self_cpu_time_total / total,
            "calls_per_step": e.count / steps,
        }
        for e in events[:10]
    ]
    return {"steps": steps, "self_cpu_ms_per_step": total / 1e3 / steps, "top": top}


def itc_only(commit: str, repeats: int = 20) -> list[dict[str, Any]]:
    """ITC's forward + backward alone (random encoder outputs, distillation on, queue writes left out), current
    vs ``commit``'s forward, median process CPU time: the tiny recipe's sizes and the reduced config's."""
    from vlalign.data.tokenization import VocabInfo
    from vlalign.objectives.base import BuildSpec
    from vlalign.objectives.itc import ITC

    before = before_itc_forward(commit)
    rows = []
    for batch, width, embed, queue in ((32, 128, 64, 1024), (8, 192, 256, 4096), (8, 192, 256, 65536)):
        torch.manual_seed(0)
        itc = ITC(embed_dim=embed, queue_size=queue)
        itc.build(BuildSpec(width, width, VocabInfo(vocab_size=50), (2, 2), 8, momentum=True))
        ctx = types.SimpleNamespace(
            image_tokens=torch.randn(batch, 5, width, requires_grad=True),
            text_states=torch.randn(batch, 9, width, requires_grad=True),
            image_tokens_m=torch.randn(batch, 5, width),
            text_states_m=torch.randn(batch, 9, width),
            attention_mask=torch.ones(batch, 9, dtype=torch.long),
            batch={},
            alpha=0.4,
            published={},
        )
        row: dict[str, Any] = {"batch": batch, "embed": embed, "queue": queue}
        for setting in ("after", "before", "after", "before"):  # twice each, interleaved; the second pass counts
            with itc_forward_of(itc, before if setting == "before" else None):
                times = []
                for _ in range(repeats):
                    cpu = time.process_time()
                    itc(ctx).loss.backward()
                    itc._pending.clear()
                    times.append(time.process_time() - cpu)
            row[f"{setting}_cpu_ms"] = statistics.median(times) * 1e3
        rows.append(row)
    return rows


def xmm_paths(rounds: int = 6, block: int = 4) -> list[dict[str, Any]]:
    """XMM's head paths on the reduced config (queue 4,096), one recipe switched between them in interleaved
    blocks whose order rotates: the boolean selection (CPU default), the fixed-size gather (accelerator default)
    and the gather of every position (the heads' previous accelerator path). Process CPU ms per step, medians."""
    warnings.filterwarnings("ignore", message=".*self.log.*")
    built, batch = setup((4096,))
    recipe, optimizer = built[4096]
    xmm = recipe.xmm
    length, patches = batch["input_ids"].shape[1], batch["image_codes"].shape[1]
    paths = {
        "selection (CPU default)": (False, None, xmm.patch_cap),
        f"gather, bounds {xmm.text_cap(length)} / {xmm.patch_cap} (accelerator default)": (True, None, xmm.patch_cap),
        "gather of every position (previous accelerator path)": (True, length, patches),
    }

    def use(name: str) -> None:
        xmm.sync_free, xmm.max_masked_tokens, xmm.patch_cap = paths[name]

    default = paths[next(iter(paths))]
    names = list(paths)
    for name in names:
        use(name)
        _steps(recipe, optimizer, batch, 1)
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            use(name)
            cpu[name].append(_steps(recipe, optimizer, batch, block)[1])
    xmm.sync_free, xmm.max_masked_tokens, xmm.patch_cap = default
    base = cpu[names[0]]
    return [
        {
            "path": name,
            "cpu_ms_median": statistics.median(cpu[name]),
            "vs_selection": statistics.median(a / b for a, b in zip(cpu[name], base, strict=True)),
        }
        for name in names
    ]


# -- reporting --------------------------------------------------------------------------------------------------------
def _load(values: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in values)


def report(result: dict[str, Any]) -> str:
    lines = [
        f"Speed II, {result['config']}; CPU, {result['threads']} thread(s), {result['rounds']} rounds x {result['block']} "
        f"steps per setting, interleaved; torch {result['torch']}",
        f"load average (1/5/15 min) before {_load(result['load_average_before'])}, after "
        f"{_load(result['load_average_after'])}",
        "",
        "| queue | code | step ms, wall (median) | CPU ms per step (median) | samples/s | samples per CPU-s "
        "| speed-up over before, wall / CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        speedup = f"{row['speedup_wall']:.2f}× / {row['speedup_cpu']:.2f}×" if "speedup_wall" in row else "–"
        lines.append(
            f"| {row['queue']:,} | {row['setting']} | {row['step_ms_median']:.1f} | {row['cpu_ms_median']:.1f} "
            f"| {row['samples_per_s']:.1f} | {row['samples_per_cpu_s']:.1f} | {speedup} |"
        )
    for name, table in result.get("profiles", {}).items():
        lines += [
            "",
            f"torch.profiler, {name}: {table['self_cpu_ms_per_step']:.1f} ms self CPU per step ({table['steps']} steps)",
            "",
            "| operator | self CPU ms per step | share | calls per step |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{e['name']}` | {e['self_cpu_ms_per_step']:.1f} | {100 * e['self_cpu_share']:.1f}% "
            f"| {e['calls_per_step']:g} |"
            for e in table["top"]
        ]
    return "\n".join(lines)


def bench_rows(steps: int, warmup: int) -> list[dict[str, Any]]:
    """The ``make bench`` rows: the current code at each queue size, ``steps`` timed steps after ``warmup``."""
    from vlalign.testing import train_step

    warnings.filterwarnings("ignore", message=".*self.log.*")
    built, batch = setup(QUEUES)
    rows = []
    for queue, (recipe, optimizer) in built.items():
        times = []
        for index in range(warmup + steps):
            start = time.perf_counter()
            train_step(recipe, batch, optimizer)
            if index >= warmup:
                times.append(time.perf_counter() - start)
        median = statistics.median(times)
        rows.append({"queue": queue, "step_ms": median * 1e3, "samples_per_s": BATCH / median})
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=sorted(CONFIGS), default="reduced")
    parser.add_argument("--queues", default=None, help="comma-separated ITC queue sizes (reduced: 4096,65536)")
    parser.add_argument("--rounds", type=int, default=5, help="blocks per setting")
    parser.add_argument("--block", type=int, default=3, help="steps per block")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per setting before the first block")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-compare", dest="compare", action="store_false", help="time the current code only")
    parser.add_argument("--before-commit", default=BEFORE_COMMIT, help="commit whose ITC.forward is 'before'")
    parser.add_argument("--profile", action="store_true", help="add torch.profiler top-10 tables")
    parser.add_argument("--itc-only", action="store_true", help="time ITC's forward + backward alone, then exit")
    parser.add_argument("--xmm-paths", action="store_true", help="time XMM's head paths (reduced config), then exit")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--profile-shapes", action="store_true", help="profile rows per operator and input shapes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="write JSON (and the markdown next to it)")
    args = parser.parse_args(argv)
    default = QUEUES if args.recipe == "reduced" else (1024,)
    args.queues = tuple(int(q) for q in args.queues.split(",")) if args.queues else default
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return {}
    if args.xmm_paths:
        rows = xmm_paths(args.rounds, args.block)
        print("| XMM head path | CPU ms per step (median) | vs selection |\n|---|---|---|")
        for r in rows:
            print(f"| {r['path']} | {r['cpu_ms_median']:.1f} | {r['vs_selection']:.2f}x |")
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            payload = {"xmm_paths": rows, "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
            args.out.write_text(json.dumps(payload, indent=1) + "\n")
        return {"xmm_paths": rows}
    if args.itc_only:
        rows = itc_only(args.before_commit)
        print("| batch | embed | queue | ITC fwd+bwd CPU ms, after | before | speed-up |\n|---|---|---|---|---|---|")
        for r in rows:
            speedup = r["before_cpu_ms"] / r["after_cpu_ms"]
            print(f"| {r['batch']} | {r['embed']} | {r['queue']:,} | {r['after_cpu_ms']:.2f} | {r['before_cpu_ms']:.2f} "
                  f"| {speedup:.2f}× |")  # fmt: skip
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"itc_only": rows, "threads": torch.get_num_threads()}, indent=1) + "\n")
        return {"itc_only": rows}
    result = measure(args)
    text = report(result)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
