"""The training commands (fit, validate, test, predict): one LightningCLI subclass using public hooks only."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from vlalign.tasks.pretrain import PretrainRecipe

TRAINING_COMMANDS = ("fit", "validate", "test", "predict")


class VlalignCLI(LightningCLI):
    """Links the tokenizer's vocabulary and the image size between data and model, so each is set once."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - LightningArgumentParser
        parser.link_arguments("model.vision.img_size", "data.init_args.image_size")
        parser.link_arguments("data.vocab", "model.vocab", apply_on="instantiate")


def run_training_cli(args: list[str]) -> VlalignCLI:
    from lightning.pytorch import LightningDataModule

    return VlalignCLI(
        PretrainRecipe,
        LightningDataModule,
        subclass_mode_data=True,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )
