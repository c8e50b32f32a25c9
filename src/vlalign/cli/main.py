"""`vlalign` entry point: routes the first word to the training CLI, the downstream task commands or a tool.

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
#: Downstream task commands (:mod:`vlalign.cli.tasks`), followed by a task name from :mod:`vlalign.tasks.registry`.
TASK_COMMANDS = ("finetune", "evaluate")

USAGE = """usage: vlalign [--debug] <command> [options]

Training (LightningCLI; `vlalign <command> --help` lists every option):
  fit        pretrain or fine-tune:  vlalign fit --config configs/pretrain/simla.yaml
             resume the newest checkpoint of that run:  vlalign fit --config ... --ckpt_path last
  validate   zero-shot retrieval on the validation split of a config (with --ckpt_path)
  test       zero-shot retrieval on the test split

Downstream tasks (`vlalign finetune <task> --help` lists every option of a task):
  finetune   fine-tune, then test the best checkpoint; results.json in the run folder:
             vlalign finetune retrieval --config configs/finetune/retrieval_coco.yaml --model.init_from MODEL
  evaluate   test any model (.ckpt, exported folder, converted .safetensors) on a task; --split val|test, --out DIR:
             vlalign evaluate retrieval --model MODEL --config configs/finetune/retrieval_coco.yaml
{tasks}
Experiments:
  sweep      ablation sweep: variants x seeds, one run after another, then results.csv / results.md / plots:
             vlalign sweep --config configs/sweeps/toy_ablation.yaml [--quick] [--dry_run] [--launcher slurm]

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


def task_listing() -> str:
    """The registered tasks as ``vlalign --help`` lists them (from the registry's static table: no torch import)."""
    from vlalign.tasks.registry import help_tasks

    rows = help_tasks()
    if not rows:
        return "  (no task registered)\n"
    names = {name: name if trains else f"{name}*" for name, (_, trains) in rows.items()}
    width = max(len(shown) for shown in names.values())
    lines = [f"    {names[name]:<{width}}  {text}" for name, (text, _) in rows.items()]
    note = "" if all(trains for _, trains in rows.values()) else "    * evaluate only\n"
    return "  tasks:\n" + "\n".join(lines) + "\n" + note


def usage() -> str:
    """The ``vlalign --help`` text, with the registered tasks."""
    return USAGE.replace("{tasks}", task_listing())


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
        print(usage())
        return 0
    command = args[0]
    if command in TRAINING_COMMANDS:
        from vlalign.cli.train import run_training_cli

        run_training_cli(args)
        return 0
    if command in TASK_COMMANDS:
        if len(args) > 1 and args[1] in ("-h", "--help", "help"):
            print(usage())
            return 0
        from vlalign.cli.tasks import run_task_command

        run_task_command(command, args[1:])
        return 0
    if command == "sweep":
        from vlalign.cli.sweep import sweep_command

        return sweep_command(args[1:])
    tools = _tools()
    if command in tools:
        tools[command](args[1:])
        return 0
    print(f"vlalign: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    return 2
