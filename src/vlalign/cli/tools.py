"""Tools that need no trainer, as typed functions under jsonargparse (``--help`` comes from their signatures)."""

from __future__ import annotations

import sys

from jsonargparse import auto_cli


def data_command(args: list[str]) -> None:
    """``vlalign data synth|convert``."""
    from vlalign.data.convert import json_to_shards
    from vlalign.data.synth import write_synthetic

    result = auto_cli({"synth": write_synthetic, "convert": json_to_shards}, args=args, as_positional=False)
    print(result)


def convert_command(args: list[str]) -> None:
    """``vlalign convert reference|bert|timm|dvae``: import weights into a vlalign ``init_from`` safetensors file."""
    from vlalign.convert import ConversionError, convert_bert, convert_dvae, convert_reference, convert_timm

    kinds = {"reference": convert_reference, "bert": convert_bert, "timm": convert_timm, "dvae": convert_dvae}
    try:
        result = auto_cli(kinds, args=args, as_positional=False)
    except (ConversionError, PermissionError) as err:
        print(f"vlalign convert: {err}", file=sys.stderr)
        raise SystemExit(1) from err
    print(result)


TOOLS = {"data": data_command, "convert": convert_command}
