"""`vlalign` entry point: routes the first word to the training CLI or to a tool.

Mistakes a user can fix (:class:`vlalign.errors.UserError`: configuration, paths, input files) end the command
with one ``error:`` block on stderr and exit status 2, without a traceback; ``vlalign --debug ...`` or
``VLALIGN_DEBUG=1`` prints the traceback as well.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

from vlalign.errors import UserError

#: Commands run by the LightningCLI (:mod:`vlalign.cli.train`), imported only when one is asked for, so
#: ``vlalign --help`` and the tools start without loading Lightning.
TRAINING_COMMANDS = ("fit", "validate", "test")

USAGE = """usage: vlalign [--debug] <command> [options]

Training (LightningCLI; `vlalign <command> --help` lists every option):
  fit        pretrain or fine-tune:  vlalign fit --config configs/pretrain/simla.yaml
             resume the newest checkpoint of that run:  vlalign fit --config ... --ckpt_path last
  validate   zero-shot retrieval on the validation split of a config (with --ckpt_path)
  test       zero-shot retrieval on the test split

Tools:
  data synth      write synthetic image-caption data (shards, JSON lists, tokenizer)
  data convert    convert an ALBEF-style JSON caption list into WebDataset shards
  data tokenizer  train a WordPiece tokenizer on your own captions (JSON lists, shards, text files)
  convert         import ALBEF / SIMLA / BERT / DeiT weights into a vlalign checkpoint
  export          write a portable model folder (weights, config, tokenizer, model card) from a checkpoint:
                  vlalign export --ckpt_path last.ckpt --out model/   (--with_momentum true keeps twins, queues)
  embed           embed images (folder, JSON list or shards) and/or captions into .npy files + key files:
                  vlalign embed --model model/ --images photos/ --captions captions.txt --out emb/

Mistakes in settings or input files print one `error:` message and exit with status 2;
--debug (or VLALIGN_DEBUG=1) also prints the traceback.
"""

DEBUG_FLAG = "--debug"
DEBUG_ENV = "VLALIGN_DEBUG"


def _tools() -> dict[str, Callable[[list[str]], None]]:
    from vlalign.cli.tools import TOOLS

    return TOOLS


def _debug_requested(args: list[str]) -> tuple[bool, list[str]]:
    """Whether tracebacks are wanted (a leading ``--debug``, or ``VLALIGN_DEBUG`` set and not 0), and the rest."""
    from_env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    if args and args[0] == DEBUG_FLAG:
        return True, args[1:]
    return from_env, args


def main(argv: Sequence[str] | None = None) -> int:
    debug, args = _debug_requested(list(sys.argv[1:] if argv is None else argv))
    try:
        return _run(args)
    except UserError as error:
        if debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args: list[str]) -> int:
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
