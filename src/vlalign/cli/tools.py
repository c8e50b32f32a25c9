"""Tools that need no trainer, as typed functions under jsonargparse (``--help`` comes from their signatures)."""

from __future__ import annotations

from jsonargparse import auto_cli


def data_command(args: list[str]) -> None:
    """``vlalign data synth|convert|tokenizer``."""
    import logging

    from vlalign.data.json_to_shards import json_to_shards
    from vlalign.data.synth import write_synthetic
    from vlalign.data.tokenization import train_caption_tokenizer

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")  # skipped-entry warnings
    commands = {"synth": write_synthetic, "convert": json_to_shards, "tokenizer": train_caption_tokenizer}
    result = auto_cli(commands, args=args, as_positional=False)
    print(result)


def convert_command(args: list[str]) -> None:
    """``vlalign convert reference|bert|timm|dvae``: import weights into a vlalign ``init_from`` safetensors file."""
    from vlalign.errors import UserError
    from vlalign.weights.published import convert_bert, convert_dvae, convert_reference, convert_timm

    kinds = {"reference": convert_reference, "bert": convert_bert, "timm": convert_timm, "dvae": convert_dvae}
    try:
        result = auto_cli(kinds, args=args, as_positional=False)
    except PermissionError as err:  # the dVAE conversion refuses to unpickle without --allow_pickle true
        raise UserError(str(err)) from err
    print(result)


def export_command(args: list[str]) -> None:
    """``vlalign export``: a checkpoint -> a portable model folder."""
    from vlalign.cli.inference import export_command as run

    run(args)


def embed_command(args: list[str]) -> None:
    """``vlalign embed``: images and/or captions -> .npy embeddings + key files."""
    from vlalign.cli.inference import embed_command as run

    run(args)


TOOLS = {"data": data_command, "convert": convert_command, "export": export_command, "embed": embed_command}
