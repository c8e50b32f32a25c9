"""Data-pipeline throughput: decoded, augmented, masked, tokenised samples per second for one worker.

Shards come from ``vlalign.data.synth.write_synthetic`` in a temporary directory and are read by the
``ShardDataModule`` with ``num_workers=0``, so the loop runs in this process and its rate is the per-worker rate
(a run with W workers approaches W times it while the cores last). Imports the data stack only when called.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

PIPELINES: dict[str, dict] = {
    # configs/pretrain/simla_tiny.yaml: 64 px, light augmentation, 8 px block masks; synthetic JPEGs of 128 px
    "tiny": {
        "source_size": 128,
        "module": {"image_size": 64, "mask_patch_size": 8},
        "augment": {"scale": (0.6, 1.0), "hflip": 0.5, "randaugment": None, "swap_left_right": True},
    },
    # configs/pretrain/simla.yaml: 256 px, RandAugment, 16 px block masks, 128 px dVAE view; JPEGs of 384 px
    "full": {
        "source_size": 384,
        "module": {"image_size": 256, "mask_patch_size": 16, "tokenizer_view_size": 128},
        "augment": {},
    },
}


def run_pipeline(recipe_name: str, num_samples: int = 320, batch_size: int = 32) -> dict:
    """Write ``num_samples`` synthetic shards, then time one worker's batches (the first batch is warm-up), with one
    torch thread as in a DataLoader worker (PyTorch sets one in each): at torch's default thread count the per-sample
    tensor operations contend for busy cores (on the 2-core VM at load average 5.7 the full pipeline gave 6.5
    samples/s that way and 172 with one thread)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {**_run_pipeline(recipe_name, num_samples, batch_size), "torch_threads": 1}
    finally:
        torch.set_num_threads(previous)


def _run_pipeline(recipe_name: str, num_samples: int, batch_size: int) -> dict:
    from vlalign.data.synth import write_synthetic
    from vlalign.data.transforms import AugmentConfig
    from vlalign.datamodules.webdataset import ShardDataModule

    spec = PIPELINES[recipe_name]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = write_synthetic(
            Path(tmp),
            num_train=num_samples,
            num_val=0,
            num_test=0,
            image_size=spec["source_size"],
            samples_per_shard=max(1, num_samples // 4),
            progress=False,
        )
        write_s = time.perf_counter() - start
        module = ShardDataModule(
            tokenizer=str(summary.tokenizer_dir),
            train_shards=summary.shard_urls("train"),
            batch_size=batch_size,
            num_workers=0,
            shuffle_buffer=100,
            max_length=25,
            augment=AugmentConfig(**spec["augment"]),
            **spec["module"],
        )
        loader = module.train_dataloader()
        samples, first = 0, None
        start = time.perf_counter()
        for batch in loader:
            if first is None:
                first = time.perf_counter()
                continue
            samples += batch["input_ids"].shape[0]
        elapsed = time.perf_counter() - (first if first is not None else start)
    return {
        "recipe": recipe_name,
        "image_size": spec["module"]["image_size"],
        "source_jpeg_size": spec["source_size"],
        "batch_size": batch_size,
        "samples_timed": samples,
        "samples_per_s_per_worker": samples / elapsed if samples else float("nan"),
        "write_synthetic_s": write_s,
    }
