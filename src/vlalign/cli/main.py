"""`vlalign` entry point: routes the first word to the training CLI or to a tool."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from vlalign.cli.train import TRAINING_COMMANDS

USAGE = """usage: vlalign <command> [options]

Training (LightningCLI; `vlalign <command> --help` lists every option):
  fit        pretrain or fine-tune:  vlalign fit --config configs/pretrain/simla.yaml
  validate   zero-shot retrieval on the validation split of a config (with --ckpt_path)
  test       zero-shot retrieval on the test split

Tools:
  data synth    write synthetic image-caption data (shards, JSON lists, tokenizer)
  data convert  convert an ALBEF-style JSON caption list into WebDataset shards
  convert       import ALBEF / SIMLA / BERT / DeiT weights into a vlalign checkpoint
"""


def _tools() -> dict[str, Callable[[list[str]], None]]:
    from vlalign.cli.tools import TOOLS

    return TOOLS


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command = args[0]
    if command in TRAINING_COMMANDS:
        from vlalign.cli.train import run_training_cli

        run_training_cli(args)
        return 0
    tools = _tools()
    if command in tools:
        tools[command](args[1:])
        return 0
    print(f"vlalign: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2
