"""Shared fixtures: one small synthetic dataset per test session, and CLI arguments pointing at it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 train / 16 val / 16 test images in every layout the data tools write, plus a tokenizer."""
    from vlalign.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, num_train=80, num_val=16, num_test=16, image_size=64, samples_per_shard=40, progress=False)
    return root


def data_args(synth_data: Path, root: Path) -> list[str]:
    """Overrides that point a tiny config at the session's synthetic data, write under ``root`` and stay quiet."""
    return [
        "--data.init_args.tokenizer", str(synth_data / "tokenizer"),
        "--data.init_args.train_shards", str(synth_data / "shards" / "train" / "{000000..000001}.tar"),
        "--data.init_args.val_retrieval", str(synth_data / "retrieval_val.json"),
        "--data.init_args.test_retrieval", str(synth_data / "retrieval_test.json"),
        "--data.init_args.batch_size", "8",
        "--data.init_args.eval_batch_size", "8",
        "--data.init_args.num_workers", "0",
        "--data.init_args.shuffle_buffer", "16",
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


@pytest.fixture()
def cli_data_args(synth_data: Path, tmp_path: Path) -> list[str]:
    """Overrides that point a tiny config at the session's synthetic data and keep runs small and quiet."""
    return data_args(synth_data, tmp_path)


@pytest.fixture(scope="session")
def tiny_trained(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny ITC + ITM model trained 3 steps through `vlalign fit`, once per session: the in-memory module
    (``model``) and its ``last.ckpt`` (``ckpt``) under ``root``."""
    from vlalign.cli.train import run_training_cli

    root = tmp_path_factory.mktemp("trained")
    cli = run_training_cli([
        "fit", "--config", str(CONFIGS / "pretrain" / "tiny.yaml"), *data_args(synth_data, root),
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--model.stream.num_layers", "2",
    ])  # fmt: skip
    (ckpt,) = sorted(root.rglob("last.ckpt"))
    return {"model": cli.model.cpu().eval(), "ckpt": ckpt, "root": root}
