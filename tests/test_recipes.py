"""SIMLA on the tiny config through the CLI: every objective trains and logs; each ablation removes exactly its passes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from vlalign.cli.train import run_training_cli
from vlalign.models.stream import SingleStreamTransformer
from vlalign.models.vision import VisionEncoder
from vlalign.tasks.pretrain import PretrainRecipe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIMLA_TINY = CONFIGS / "pretrain" / "simla_tiny.yaml"
BATCH = 8


@pytest.fixture()
def pass_counter(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts encoder passes made inside training steps as (encoder, mode, batch size)."""
    passes: Counter = Counter()
    in_step = {"on": False}
    step, stream_forward, vision_forward = (
        PretrainRecipe.training_step,
        SingleStreamTransformer.forward,
        VisionEncoder.forward,
    )

    def counted_step(self, *args, **kwargs):
        in_step["on"] = True
        try:
            return step(self, *args, **kwargs)
        finally:
            in_step["on"] = False

    def counted_stream(self, hidden_states, *args, mode="text", **kwargs):
        if in_step["on"]:
            passes[("stream", mode, hidden_states.shape[0])] += 1
        return stream_forward(self, hidden_states, *args, mode=mode, **kwargs)

    def counted_vision(self, images, *args, **kwargs):
        if in_step["on"]:
            passes[("vision", images.shape[0])] += 1
        return vision_forward(self, images, *args, **kwargs)

    monkeypatch.setattr(PretrainRecipe, "training_step", counted_step)
    monkeypatch.setattr(SingleStreamTransformer, "forward", counted_stream)
    monkeypatch.setattr(VisionEncoder, "forward", counted_vision)
    return passes


def _fit(cli_data_args: list[str], *overlays: Path):
    args = ["fit", "--config", str(SIMLA_TINY)]
    for overlay in overlays:
        args += ["--config", str(overlay)]
    # alpha from step 0, so the distillation teachers (skipped while alpha is 0) run in the one step
    return run_training_cli([*args, *cli_data_args, "--trainer.fast_dev_run", "1", "--model.alpha_warmup_steps", "0"])


# SIMLA's passes per step (single stream, batch B): ViT online + momentum over clean and masked views (2B each);
# text mode online + momentum (ITC); one multimodal pass of 3B (ITM); multimodal B online + momentum (XMM text) and
# momentum (PSL); image mode online + momentum (XMM image).
FULL = Counter({
    ("vision", 2 * BATCH): 2,
    ("stream", "text", BATCH): 2,
    ("stream", "multimodal", 3 * BATCH): 1,
    ("stream", "multimodal", BATCH): 3,
    ("stream", "image", BATCH): 2,
})  # fmt: skip


def test_simla_tiny_trains_all_four_objectives_and_logs_every_loss(cli_data_args, pass_counter) -> None:
    cli = _fit(cli_data_args)
    metrics = cli.trainer.callback_metrics
    for key in ("itc_loss", "itm_loss", "xmm_loss", "xmm_text_loss", "xmm_image_loss", "psl_loss", "loss"):
        assert torch.isfinite(metrics[f"train/{key}"]), key
    assert pass_counter == FULL


ABLATIONS = {
    "no_itc": {("stream", "text", BATCH): -2},
    "no_itm": {("stream", "multimodal", 3 * BATCH): -1},
    "no_xmm_text": {("stream", "multimodal", BATCH): -2},
    "no_xmm_image": {("stream", "image", BATCH): -2, ("vision", 2 * BATCH): -2, ("vision", BATCH): +2},
    "no_psl": {("stream", "multimodal", BATCH): -1},
}
REMOVED_LOSS = {
    "no_itc": "itc",
    "no_itm": "itm",
    "no_xmm_text": "xmm_text",
    "no_xmm_image": "xmm_image",
    "no_psl": "psl",
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_each_ablation_removes_exactly_its_objective_and_passes(name, cli_data_args, pass_counter) -> None:
    cli = _fit(cli_data_args, CONFIGS / "ablations" / f"{name}.yaml")
    logged = {
        k.removeprefix("train/").removesuffix("_loss") for k in cli.trainer.callback_metrics if k.endswith("_loss")
    }
    assert REMOVED_LOSS[name] not in logged
    assert {"itc", "itm", "xmm_text", "xmm_image", "psl"} - {REMOVED_LOSS[name]} <= logged | {"xmm"}
    expected = Counter(FULL)
    for key, delta in ABLATIONS[name].items():
        expected[key] += delta
    assert +pass_counter == +expected
