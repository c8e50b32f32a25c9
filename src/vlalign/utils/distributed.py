"""Collectives that degrade to the identity in a single process, so no code path needs a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order (queue contents, hard-negative pools)."""
    n = world_size()
    if n == 1:
        return x
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank with gradients flowing back to each rank's slice (open_clip style)."""
    n = world_size()
    if n == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def all_gather_variable(x: Tensor) -> Tensor:
    """Like :func:`all_gather_no_grad` but ranks may hold different numbers of rows (evaluation leftovers)."""
    n = world_size()
    if n == 1:
        return x
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = all_gather_no_grad(size)
    longest = int(sizes.max())
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    gathered = all_gather_no_grad(padded).view(n, longest, *x.shape[1:])
    return torch.cat([gathered[r, : int(sizes[r])] for r in range(n)])
