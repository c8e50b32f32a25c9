"""Tools that need no trainer, as typed functions under jsonargparse (``--help`` comes from their signatures)."""

from __future__ import annotations

from jsonargparse import auto_cli


def data_command(args: list[str]) -> None:
    """``vlalign data synth|convert``."""
    from vlalign.data.convert import json_to_shards
    from vlalign.data.synth import write_synthetic

    result = auto_cli({"synth": write_synthetic, "convert": json_to_shards}, args=args, as_positional=False)
    print(result)


TOOLS = {"data": data_command}
