"""Configuration mistakes fail before any model or data module is built, naming the key and how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlalign.cli.train import ConfigError, VlalignCLI, run_training_cli
from vlalign.data.tokenization import VocabInfo, load_tokenizer
from vlalign.tasks.pretrain import PretrainRecipe

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
TINY = str(CONFIGS / "tiny.yaml")


class Checked(Exception):
    """Raised instead of instantiating: the configuration passed every check."""


@pytest.fixture()
def nothing_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instantiation raises :class:`Checked`: a mistake the checks miss shows up as Checked, not as a build error,
    and no test here ever builds a model."""

    def stop(self: VlalignCLI) -> None:
        raise Checked

    monkeypatch.setattr(VlalignCLI, "instantiate_classes", stop)


def fit_args(cli_data_args: list[str], *overrides: str, config: str = TINY) -> list[str]:
    return ["fit", "--config", config, *cli_data_args, *overrides]


def config_error(args: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        run_training_cli(args)
    return str(info.value)


def parse_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises((ValueError, SystemExit)) as info:
        run_training_cli(args)
    assert isinstance(info.value, SystemExit) and info.value.code != 0
    return capsys.readouterr().err


def _tiny(path: Path) -> bool:
    """Recipes sized for a CPU (they name no pretrained weights): ``*tiny*`` and the toy ablation's base."""
    return "tiny" in path.name or path.name.startswith("toy")


@pytest.mark.usefixtures("nothing_is_built")
@pytest.mark.parametrize("config", sorted(p for p in CONFIGS.glob("*.yaml") if _tiny(p)), ids=lambda p: p.name)
def test_tiny_recipes_pass_every_check(cli_data_args: list[str], config: Path) -> None:
    with pytest.raises(Checked):
        run_training_cli(fit_args(cli_data_args, config=str(config)))


@pytest.mark.usefixtures("nothing_is_built")
@pytest.mark.parametrize(
    "config", sorted(p for p in CONFIGS.glob("*.yaml") if not _tiny(p)), ids=lambda p: p.name
)
def test_full_recipes_only_lack_their_weight_files(cli_data_args: list[str], config: Path) -> None:
    # The full recipes name pretrained weights this machine does not have: that must be all that is wrong.
    message = config_error(fit_args(cli_data_args, config=str(config)))
    problems = [line for line in message.splitlines() if line.startswith("  - ")]
    assert problems and all("does not exist" in line for line in problems), message


def test_unknown_key_is_named(cli_data_args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    err = parse_error(fit_args(cli_data_args, "--model.itc.queue_sz", "5"), capsys)
    assert "queue_sz" in err


def test_unknown_key_in_a_config_file_is_named(
    cli_data_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overlay = tmp_path / "typo.yaml"
    overlay.write_text("data:\n  init_args:\n    batch_sise: 4\n")
    err = parse_error(fit_args(cli_data_args, "--config", str(overlay)), capsys)
    assert "batch_sise" in err


def test_unknown_objective_class_names_the_slot_and_the_valid_class(
    cli_data_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    err = parse_error(fit_args(cli_data_args, "--model.itc.class_path", "vlalign.objectives.Nope"), capsys)
    assert "model.itc" in err and "vlalign.objectives.Nope" in err
    assert "vlalign.objectives.itc.ITC" in err  # the accepted choice(s)


@pytest.mark.usefixtures("nothing_is_built")
def test_objective_whose_requirement_is_disabled(cli_data_args: list[str]) -> None:
    message = config_error(fit_args(cli_data_args, "--model.itc", "null"))
    assert "model.itm requires model.itc" in message
    assert "--model.itc '{}'" in message and "--model.itm null" in message  # both ways to fix it
    assert "--model.itm.negatives random" in message
    # With random negatives ITM needs no ITC: the same config then passes.
    with pytest.raises(Checked):
        run_training_cli(fit_args(cli_data_args, "--model.itc", "null", "--model.itm.negatives", "random"))


def test_recipe_built_directly_also_says_how_to_fix_a_disabled_requirement() -> None:
    from vlalign.models.stream import StreamConfig
    from vlalign.models.vision import VisionConfig
    from vlalign.objectives.itm import ITM

    vision = VisionConfig(name="vit_vlalign_tiny_patch8", img_size=32)
    stream = StreamConfig(
        vocab_size=50, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=64, encoder_width=64
    )
    with pytest.raises(ValueError, match=r"model.itm requires model.itc.*enable model.itc or set model.itm: null"):
        PretrainRecipe(itc=None, itm=ITM(), vision=vision, stream=stream)


@pytest.mark.usefixtures("nothing_is_built")
def test_no_objective_at_all(cli_data_args: list[str]) -> None:
    message = config_error(fit_args(cli_data_args, "--model.itc", "null", "--model.itm", "null"))
    assert "no objective enabled" in message and "model.xmm" in message


@pytest.mark.usefixtures("nothing_is_built")
def test_queue_smaller_than_the_global_batch(cli_data_args: list[str]) -> None:
    # 8 per process x 4 processes = 32 features per step > a queue of 16.
    args = fit_args(cli_data_args, "--model.itc.queue_size", "16", "--trainer.devices", "4")
    message = config_error(args)
    assert "model.itc.queue_size (16)" in message and "data.batch_size (8)" in message and "= 32" in message
    with pytest.raises(Checked):  # one process: 8 <= 16
        run_training_cli(fit_args(cli_data_args, "--model.itc.queue_size", "16"))
    with pytest.raises(Checked):  # no queue at all
        run_training_cli(fit_args(cli_data_args, "--model.itc.queue_size", "0", "--trainer.devices", "4"))
    with pytest.raises(ConfigError, match="accumulate_grad_batches"):  # a step writes every micro-batch
        run_training_cli(
            fit_args(cli_data_args, "--model.itc.queue_size", "16", "--trainer.accumulate_grad_batches", "4")
        )


@pytest.mark.usefixtures("nothing_is_built")
def test_image_size_not_divisible_by_the_patch_size(cli_data_args: list[str]) -> None:
    message = config_error(fit_args(cli_data_args, "--model.vision.img_size", "60"))
    assert "model.vision.img_size (60)" in message and "patch size 8" in message and "56 or 64" in message


@pytest.mark.usefixtures("nothing_is_built")
def test_stream_encoder_width_must_equal_the_vit_width(cli_data_args: list[str]) -> None:
    # The tiny ViT is 128 wide; the stream's default encoder_width (768) fits only ViT-B and crashed at step 0.
    message = config_error(fit_args(cli_data_args, "--model.stream.encoder_width", "768"))
    assert (
        "model.stream.encoder_width (768)" in message
        and "model.vision.name 'vit_vlalign_small_patch8' (128)" in message
    )
    assert "--model.stream.encoder_width 128" in message


@pytest.mark.usefixtures("nothing_is_built")
def test_unknown_vision_model_suggests_close_names(cli_data_args: list[str]) -> None:
    message = config_error(fit_args(cli_data_args, "--model.vision.name", "vit_vlalign_small_patch_8"))
    assert "model.vision.name" in message and "vit_vlalign_small_patch8" in message


@pytest.mark.usefixtures("nothing_is_built")
def test_masked_image_objective_needs_the_vit_patch_grid(cli_data_args: list[str]) -> None:
    message = config_error(fit_args(cli_data_args, "--model.xmm", "{}"))
    assert (
        "model.xmm" in message and "data.mask_patch_size" in message and "--data.init_args.mask_patch_size 8" in message
    )
    message = config_error(fit_args(cli_data_args, "--model.xmm", "{}", "--data.init_args.mask_patch_size", "16"))
    assert "it is 16" in message
    with pytest.raises(Checked):
        run_training_cli(fit_args(cli_data_args, "--model.xmm", "{}", "--data.init_args.mask_patch_size", "8"))


@pytest.mark.usefixtures("nothing_is_built")
def test_missing_tokenizer_path(cli_data_args: list[str], tmp_path: Path) -> None:
    message = config_error(fit_args(cli_data_args, "--data.init_args.tokenizer", str(tmp_path / "no-tokenizer")))
    assert "data.tokenizer" in message and "no-tokenizer does not exist" in message


@pytest.mark.usefixtures("nothing_is_built")
def test_several_mistakes_are_reported_together(cli_data_args: list[str], tmp_path: Path) -> None:
    args = fit_args(cli_data_args, "--model.vision.img_size", "60", "--data.init_args.tokenizer", str(tmp_path / "x"))
    message = config_error(args)
    assert "2 problems" in message and "model.vision.img_size" in message and "data.tokenizer" in message


@pytest.fixture()
def vocab_size(synth_data: Path) -> int:
    return len(load_tokenizer(synth_data / "tokenizer"))


@pytest.mark.usefixtures("nothing_is_built")
def test_text_weights_with_a_smaller_embedding_table(cli_data_args: list[str], tmp_path: Path, vocab_size: int) -> None:
    small = tmp_path / "bert-small" / "model.safetensors"
    small.parent.mkdir()
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(vocab_size - 20, 128)}, str(small))
    message = config_error(fit_args(cli_data_args, "--model.text_weights", str(small.parent)))
    assert "model.text_weights" in message and f"{vocab_size - 20} rows" in message
    assert f"{vocab_size} tokens of data.tokenizer" in message and "index past the table" in message

    matching = tmp_path / "bert-ok.safetensors"
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(vocab_size, 128)}, str(matching))
    with pytest.raises(Checked):
        run_training_cli(fit_args(cli_data_args, "--model.text_weights", str(matching)))


@pytest.mark.usefixtures("nothing_is_built")
def test_init_from_with_a_smaller_embedding_table(cli_data_args: list[str], tmp_path: Path, vocab_size: int) -> None:
    checkpoint = tmp_path / "init.ckpt"
    state = {
        "stream.embeddings.word_embeddings.weight": torch.zeros(vocab_size - 1, 128),
        "stream_m.embeddings.word_embeddings.weight": torch.zeros(vocab_size - 1, 128),
    }
    # A Lightning checkpoint: its hyper-parameters hold config dataclasses, which weights_only loading accepts.
    torch.save({"state_dict": state, "hyper_parameters": {"vocab": VocabInfo(vocab_size=vocab_size - 1)}}, checkpoint)
    message = config_error(fit_args(cli_data_args, "--model.init_from", str(checkpoint)))
    assert "model.init_from" in message and f"{vocab_size - 1} rows" in message


@pytest.mark.usefixtures("nothing_is_built")
def test_missing_weight_files_are_named(cli_data_args: list[str], tmp_path: Path) -> None:
    message = config_error(fit_args(cli_data_args, "--model.init_from", str(tmp_path / "gone.ckpt")))
    assert "model.init_from" in message and "gone.ckpt does not exist" in message


def test_cli_links_the_tokenizer_vocabulary_over_a_configured_size(cli_data_args: list[str], vocab_size: int) -> None:
    # model.stream.vocab_size smaller than the tokenizer cannot reach the model: the CLI links the tokenizer's size.
    cli = VlalignCLI(
        PretrainRecipe,
        subclass_mode_data=True,
        args=fit_args(cli_data_args, "--model.stream.vocab_size", "10", "--model.stream.num_layers", "1")[1:],
        run=False,
        auto_configure_optimizers=False,
    )
    assert cli.model.backbone.stream.embeddings.word_embeddings.num_embeddings == vocab_size


@pytest.mark.usefixtures("nothing_is_built")
@pytest.mark.parametrize("strategy", ["model_parallel", "lightning.pytorch.strategies.ModelParallelStrategy"])
def test_a_strategy_that_would_train_unsynchronised_copies_is_refused(cli_data_args: list[str], strategy: str) -> None:
    message = config_error(fit_args(cli_data_args, "--trainer.strategy", strategy))
    assert "trainer.strategy" in message and "each process would train its own copy" in message
    assert "trainer.strategy: ddp" in message
