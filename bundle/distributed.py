"""Small helpers for multi-process (``torchrun``) runs: training with ``configs/multi_gpu_train.json``, generation
and evaluation with ``configs/multi_gpu_inference.json`` / ``configs/multi_gpu_evaluate.json``.

Every collective here (``barrier``, :func:`broadcast_object`, :func:`gather_objects`) must be reached by all ranks, in
the same order; calling one on some ranks only hangs the job. Without an initialised process group they behave as in a
single process. :func:`shard` and :func:`unshard` are pure: how items are dealt to ranks and put back in order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "backend",
    "barrier",
    "broadcast_object",
    "gather_objects",
    "is_distributed",
    "launch_rank",
    "rank",
    "rank0_first",
    "shard",
    "unshard",
    "world_size",
]

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


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable; ``obj`` itself without a process group). Must be called on
    every rank; the value other ranks pass is ignored."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank ``dst``; None on the other ranks (``[obj]`` without a
    process group). Must be called on every rank. With nccl, each rank's CUDA device must be set first
    (``torch.cuda.set_device``, as the multi-GPU configs do)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def shard(count: int, rank: int | None = None, world_size: int | None = None, block: int = 1) -> list[int]:
    """Indices of ``count`` items that rank ``rank`` of ``world_size`` handles: consecutive blocks of ``block`` items,
    dealt round-robin (block ``b`` to rank ``b % world_size``).

    With ``block`` the batch size, every rank runs exactly the batches a single process would run (batch ``b`` on rank
    ``b % world_size``), so batched float arithmetic gives the same results. A rank may get no item (more ranks than
    blocks): it gets ``[]``.

    Args:
        count: number of items.
        rank: this rank (default: :func:`rank`).
        world_size: number of ranks (default: :func:`world_size`).
        block: items per block, at least 1.

    Raises:
        ValueError: naming the argument, for a negative ``count``, a ``block`` or ``world_size`` below 1, or a
            ``rank`` outside ``[0, world_size)``.
    """
    distributed = is_distributed()
    rank = int(rank) if rank is not None else (dist.get_rank() if distributed else 0)
    world_size = int(world_size) if world_size is not None else (dist.get_world_size() if distributed else 1)
    if int(count) < 0:
        raise ValueError(f"shard: count must be >= 0, got {count}.")
    if int(block) < 1:
        raise ValueError(f"shard: block must be >= 1 (e.g. the batch size), got {block}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"shard: rank must be in [0, world_size) and world_size >= 1, got rank {rank} of {world_size}."
        )
    block = int(block)
    starts = range(rank * block, int(count), world_size * block)
    return [i for start in starts for i in range(start, min(start + block, int(count)))]


def unshard(parts: Sequence[Sequence[T]], block: int = 1) -> list[T]:
    """The items of every rank's part (``parts[r]`` in the order :func:`shard` gave rank ``r``) in their original order.

    Raises:
        ValueError: when a part's length is not the one :func:`shard` gives that rank for the total count.
    """
    count = sum(len(part) for part in parts)
    out: list[Any] = [None] * count
    for r, part in enumerate(parts):
        indices = shard(count, r, len(parts), block)
        if len(indices) != len(part):
            raise ValueError(
                f"unshard: rank {r} returned {len(part)} items but its shard of {count} items in blocks of {block} "
                f"holds {len(indices)}; every rank must return one result per item of its shard."
            )
        for i, item in zip(indices, part):
            out[i] = item
    return out


def launch_rank() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` as ``torchrun`` sets them in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``), for work split without a process group; ``(0, 1, 0)`` when not launched by torchrun.

    Raises:
        ValueError: when the variables are not whole numbers or the rank is outside ``[0, WORLD_SIZE)``.
    """
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    defaults = ("0", "1", "0")
    try:
        values = tuple(int(os.environ.get(n, d)) for n, d in zip(names, defaults))
    except ValueError as error:
        found = {n: os.environ.get(n) for n in names}
        raise ValueError(
            f"torchrun variables {found} are not whole numbers; launch with torchrun or unset them."
        ) from error
    if values[1] < 1 or not 0 <= values[0] < values[1]:
        raise ValueError(f"RANK={values[0]} is not in [0, WORLD_SIZE={values[1]}); launch with torchrun or unset them.")
    return values
