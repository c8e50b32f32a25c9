"""List every host-device synchronisation in one SIMLA training step: ``python -m benchmarks.syncs [--recipe full]``.

Runs a warm-up step, then one step (forward, backward, AdamW, EMA, queue update) under
``torch.cuda.set_sync_debug_mode("warn")`` and prints each distinct vlalign source line that synchronised. The
test ``tests/test_gpu.py`` asserts there are none; this tool says where they are when it fails.
"""

from __future__ import annotations

import argparse
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

from benchmarks.model import Case, build_recipe, make_batch


def find_syncs(recipe_name: str = "tiny", precision: str = "bf16") -> Counter[str]:
    from vlalign.tasks.optim import build_optimizer

    device = torch.device("cuda")
    case = Case("syncs", recipe_name, precision=precision, fused_adamw=True)
    with tempfile.TemporaryDirectory() as tmp:
        recipe, _ = build_recipe(case, Path(tmp))
    recipe = recipe.to(device).train()
    batch = make_batch(case, device)
    optimizer = build_optimizer(recipe, recipe.optim, total_steps=100)["optimizer"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with autocast:
            loss = recipe.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recipe.after_real_optimizer_step()

    sites: Counter[str] = Counter()
    warnings.filterwarnings("ignore", message=".*self.log.*")
    step()
    torch.cuda.synchronize()
    original = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing" not in str(message):
            return original(message, category, filename, lineno, file, line)
        stack = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
        if stack and "set_sync_debug_mode" in (stack[-1].line or ""):  # the switch itself, not the step
            return None
        sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.line}" for f in reversed(stack[-4:]))] += 1

    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = original
    return sites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="tiny", choices=("tiny", "full"))
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    args = parser.parse_args()
    sites = find_syncs(args.recipe, args.precision)
    print(f"{sum(sites.values())} host-device syncs in one {args.recipe} SIMLA step ({args.precision})")
    for site, count in sites.most_common():
        print(f"  {count:4d}  {site}")


if __name__ == "__main__":
    main()
