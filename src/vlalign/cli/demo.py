"""`make demo`: synthetic data → tiny ITC+ITM pretraining on CPU → zero-shot retrieval table next to chance.

Everything is generated locally; nothing is downloaded. The demo trains a fixed number of optimizer steps (the
cosine schedule spans exactly those steps), so a busy machine gives the same result as a quiet one, only later.
Everything it writes (data, TensorBoard logs, checkpoints, config, result JSON) goes under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vlalign.evaluation.metrics import RECALL_KS, chance_recalls

REPO_CONFIGS = Path(__file__).resolve().parents[3] / "configs"
DEFAULT_STEPS = 800
DEFAULT_SEED = 42
DEFAULT_VAL_EVERY = 4  # epochs (62 steps each at the defaults) between validations
# One intra-op thread: on 2 cores the data worker has the other. Two threads are faster only on an idle machine;
# under load their lock-step parallel regions wait on each other (measured: 6x slower per step at load 5 on 2 cores).
DEFAULT_THREADS = 1
DATA_SEED = 0  # the synthetic dataset (and so the test split) is the same for every --seed


class DemoError(RuntimeError):
    """The demo produced no checkpoint or no result."""


def _format_table(recalls: dict[str, float], chance: dict[str, float]) -> str:
    rows = ["| direction | " + " | ".join(f"R@{k}" for k in RECALL_KS) + " |", "|---|" + "---|" * len(RECALL_KS)]
    for prefix, label in (("txt", "image → text"), ("img", "text → image")):
        measured = " | ".join(f"{recalls[f'{prefix}_r{k}']:.1f}" for k in RECALL_KS)
        rows.append(f"| {label} | {measured} |")
        at_chance = " | ".join(f"{chance[f'{prefix}_r{k}']:.1f}" for k in RECALL_KS)
        rows.append(f"| {label} (chance) | {at_chance} |")
    return "\n".join(rows)


def _load_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint read with ``weights_only=True`` (no code runs)."""
    import torch

    from vlalign.weights.safe_loading import allow_config_classes_in_checkpoints

    allow_config_classes_in_checkpoints()
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _checkpoint_step(path: Path) -> int | None:
    """``global_step`` stored in a Lightning checkpoint, None if unreadable."""
    try:
        state = _load_checkpoint(path)
    except Exception:  # noqa: BLE001 - reported by the caller as "no usable checkpoint"
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    return int(step) if step is not None else None


def _last_checkpoint_path(trainer) -> Path:  # noqa: ANN001 - lightning.Trainer
    """Where the run keeps ``last.ckpt``: the CLI's LastCheckpoint callback, else the checkpoint folder."""
    from vlalign.training.fault_tolerance import checkpoint_dir
    from vlalign.training.run_folder import LastCheckpoint

    for callback in trainer.callbacks:
        if isinstance(callback, LastCheckpoint) and callback.path:
            return Path(callback.path)
    return Path(checkpoint_dir(trainer)) / "last.ckpt"


def _final_checkpoint(trainer, steps: int) -> Path:  # noqa: ANN001 - lightning.Trainer
    """``last.ckpt`` of the run, checked to hold the final step: the demo never tests older weights."""
    if trainer.global_step != steps:
        raise DemoError(f"training stopped at step {trainer.global_step}, not at the requested {steps} steps")
    last = _last_checkpoint_path(trainer)
    if not last.is_file():
        raise DemoError(f"training wrote no checkpoint: {last} does not exist")
    saved = _checkpoint_step(last)
    if saved != steps:
        raise DemoError(f"{last} holds step {saved}, not the final step {steps}: the final weights were not saved")
    return last


def run_demo(
    out: Path,
    steps: int = DEFAULT_STEPS,
    seed: int = DEFAULT_SEED,
    num_train: int = 2000,
    num_val: int = 200,
    num_test: int = 200,
    config: Path = REPO_CONFIGS / "pretrain" / "tiny.yaml",
    val_every: int = DEFAULT_VAL_EVERY,
    threads: int | None = DEFAULT_THREADS,
    extra_args: list[str] | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Synthesize data, train ``steps`` optimizer steps from ``seed``, test ``last.ckpt``; return the test recalls.

    ``threads`` sets torch's intra-op threads for the run (None keeps torch's default). ``extra_args`` are appended
    to the ``vlalign fit`` command line (e.g. ``--trainer.enable_progress_bar false``).
    Raises :class:`DemoError` when no final checkpoint or no test result was produced.
    """
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(out, steps, seed, num_train, num_val, num_test, config, val_every, extra_args, progress)
    finally:
        torch.set_num_threads(previous)


def _run_demo(
    out: Path,
    steps: int,
    seed: int,
    num_train: int,
    num_val: int,
    num_test: int,
    config: Path,
    val_every: int,
    extra_args: list[str] | None,
    progress: bool,
) -> dict[str, float]:
    from vlalign.cli.train import run_training_cli
    from vlalign.data.synth import write_synthetic

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    start = time.time()
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    synth = write_synthetic(
        data, num_train=num_train, num_val=num_val, num_test=num_test, seed=DATA_SEED, progress=progress
    )
    args = [
        "fit",
        "--config", str(config),
        "--seed_everything", str(seed),
        "--data.init_args.seed", str(seed),
        "--data.init_args.tokenizer", str(data / "tokenizer"),
        "--data.init_args.train_shards", synth.shard_urls("train"),
        "--data.init_args.val_retrieval", str(data / "retrieval_val.json"),
        "--data.init_args.test_retrieval", str(data / "retrieval_test.json"),
        "--trainer.default_root_dir", str(out),  # anything not given a folder lands here, never in the cwd
        "--trainer.logger.init_args.save_dir", str(out / "runs"),
        "--trainer.max_steps", str(steps),  # the LR schedule follows: estimated_stepping_batches honours max_steps
        "--trainer.max_epochs", "-1",  # the step count alone ends training, never the clock or an epoch count
        "--trainer.max_time", "null",
        "--trainer.check_val_every_n_epoch", str(val_every),  # validation only feeds the logs and best-*.ckpt
    ]  # fmt: skip
    fit = run_training_cli(args + list(extra_args or []))
    checkpoint = _final_checkpoint(fit.trainer, steps)
    train_minutes = (time.time() - start) / 60
    # Test the weights read back from last.ckpt with the run's own trainer and data module (one configuration).
    fit.model.load_state_dict(_load_checkpoint(checkpoint)["state_dict"])
    fit.trainer.test(fit.model, datamodule=fit.datamodule, verbose=False)
    recalls = getattr(fit.model, "last_retrieval", {}).get("test")
    if not recalls or any(f"{p}_r{k}" not in recalls for p in ("txt", "img") for k in RECALL_KS):
        raise DemoError(f"testing {checkpoint} produced no retrieval result")
    result = out / "test_retrieval.json"
    result.write_text(json.dumps(recalls, indent=2))
    elapsed = (time.time() - start) / 60
    test_json = json.loads((data / "retrieval_test.json").read_text())
    captions_per_image = sum(len(e["caption"]) for e in test_json) / len(test_json)
    chance = chance_recalls(len(test_json), captions_per_image)
    print(f"\nZero-shot retrieval on the held-out test split ({len(test_json)} images), ITC similarities:\n")
    print(_format_table(recalls, chance))
    print(f"\nmean recall {recalls['r_mean']:.1f}; {steps} steps, seed {seed}")
    print(f"wall time {elapsed:.1f} min (data + training {train_minutes:.1f} min)")
    print(f"checkpoint: {checkpoint}\nresult: {result}\nTensorBoard: tensorboard --logdir {out / 'runs'}")
    return recalls


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlalign.cli.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("demo_run"), help="folder for everything the demo writes")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps (fixed: load only slows)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed_everything and the data-order seed")
    parser.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS, help="torch intra-op threads (default 1: robust under load)"
    )
    parser.add_argument("--num-train", type=int, default=2000, help="synthetic training pairs")
    parser.add_argument("--num-val", type=int, default=200, help="synthetic validation images")
    parser.add_argument("--num-test", type=int, default=200, help="synthetic test images (the table's split)")
    parser.add_argument("--config", type=Path, default=REPO_CONFIGS / "pretrain" / "tiny.yaml")
    args = parser.parse_args(argv)
    argv0 = sys.argv
    sys.argv = sys.argv[:1]  # the training CLI gets its arguments explicitly, not from our command line
    try:
        run_demo(
            args.out,
            steps=args.steps,
            seed=args.seed,
            num_train=args.num_train,
            num_val=args.num_val,
            num_test=args.num_test,
            config=args.config,
            threads=args.threads,
        )
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        sys.argv = argv0
    return 0


if __name__ == "__main__":
    sys.exit(cli())
