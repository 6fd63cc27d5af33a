"""Small helpers for multi-process (``torchrun``) training with ``configs/multi_gpu_train.json``.

Every function here may be called on every rank (collectives such as ``barrier`` must be reached by all ranks; calling
them on one rank only hangs the job). Without an initialised process group they behave as in a single process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["backend", "barrier", "is_distributed", "rank", "world_size", "rank0_first"]

T = TypeVar("T")


def backend() -> str:
    """The process-group backend to use: ``"nccl"`` when CUDA is available, otherwise ``"gloo"`` (CPU)."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def is_distributed() -> bool:
    """Whether a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank0_first(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` on rank 0 first, then (after a barrier) on the other ranks; return its result.

    For idempotent preparation steps that write files (e.g. generating the demo dataset): rank 0 creates them while
    the others wait, then the others find them ready. Must be called on every rank.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    if dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        finally:
            dist.barrier()  # release the others even if rank 0 failed (they then fail on their own call)
        return result
    dist.barrier()
    return fn(*args, **kwargs)


def barrier() -> None:
    """Wait until every rank gets here (a no-op without a process group). Must be called on every rank."""
    if is_distributed():
        dist.barrier()
