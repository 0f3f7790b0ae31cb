"""Fit a module's buffers once, on rank 0, from every rank's data (the refinement stages'
targets): all-gather the parts, fit on rank 0, broadcast every buffer."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


@torch.no_grad()
def fit_on_rank_zero(module: nn.Module, parts: Sequence[Tensor], fit: Callable[..., None]) -> None:
    """`fit(*arrays)` on rank 0 with each of `parts` gathered from every rank (same sizes
    on every rank: gloo and NCCL both all-gather), then `module`'s buffers broadcast.
    Without a process group the fit is local."""
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        gathered = []
        for part in parts:
            pieces = [torch.empty_like(part) for _ in range(dist.get_world_size())]
            dist.all_gather(pieces, part.contiguous())
            gathered.append(torch.cat(pieces))
        parts = gathered
    if not distributed or dist.get_rank() == 0:
        fit(*(p.cpu().numpy() for p in parts))
    if distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)
