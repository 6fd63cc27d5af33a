"""Generated patches of the evaluated spots: one seeded generator per spot, and their cache on disk.

Every generator is a callable with the pipeline's signature, ``generator(condition, generator=[torch.Generator])
-> (B, 3, H, W)`` in [0, 1], so an :class:`bundle.sampling.pipeline.ExpressionToTissuePipeline` and the stand-ins of
the tests go through the same code. Patches are cached as ``<name>-<hash of key>.npy`` under a key of the
checkpoints (:func:`checkpoint_fingerprint`), sampler settings and spots.

Under ``torchrun`` (``configs/multi_gpu_evaluate.json``) :func:`generate_patches` with ``sharded=True`` and
:func:`cached_array` are collective: every rank generates its batches, rank 0 gets all the patches (and alone reads
and writes the cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.distributed import broadcast_object, gather_objects, rank, shard, unshard, world_size
from bundle.evaluation.spots import resize_images
from bundle.utils import save_npy_atomic, write_json_atomic

__all__ = ["checkpoint_fingerprint", "key_hash", "safe_name", "cached_array", "generate_patches", "generated_size"]

logger = logging.getLogger(__name__)


Generator = Callable[..., torch.Tensor]
"""``generator(condition, generator=[torch.Generator]) -> (B, 3, H, W)`` in [0, 1]."""


def checkpoint_fingerprint(*paths: str | os.PathLike | None) -> list[dict[str, Any]]:
    """Path, size and modification time of each file: a cache key part that changes when a checkpoint is rewritten."""
    out = []
    for path in paths:
        if path is None:
            continue
        p = Path(path)
        stat = p.stat() if p.is_file() else None
        out.append(
            {
                "path": str(p.resolve()),
                "size": stat.st_size if stat else None,
                "mtime_ns": stat.st_mtime_ns if stat else None,
            }
        )
    return out


def key_hash(key: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of ``key`` as sorted JSON: the same for equal keys in any order."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def safe_name(text: str) -> str:
    """``text`` with every run of characters other than letters, digits, ``_``, ``.`` and ``-`` made one ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def cached_array(
    cache_dir: str | os.PathLike | None,
    name: str,
    key: Mapping[str, Any] | None,
    compute: Callable[[], np.ndarray | None],
    regenerate: bool,
) -> tuple[np.ndarray | None, bool]:
    """``compute()`` cached as ``<cache_dir>/<name>-<hash of key>.npy`` (and ``.json``, the key).

    Under ``torchrun`` it must be called on every rank, with a collective ``compute`` (e.g. one calling
    :func:`generate_patches` with ``sharded=True``): rank 0 alone reads the cache and tells the others whether to
    compute, and rank 0 alone writes it; other ranks get None for the array.

    Returns:
        the array and whether it came from the cache.
    """
    if cache_dir is None or key is None:
        return compute(), False
    path = Path(cache_dir) / f"{safe_name(name)}-{key_hash(key)}.npy"
    cached = None
    if rank() == 0 and path.is_file() and not regenerate:
        try:
            cached = np.load(path)
        except (OSError, ValueError) as err:
            logger.warning("ignoring the unreadable cache file %s (%s); generating again", path, err)
    if broadcast_object(cached is not None):
        return cached, True
    array = compute()
    if rank() == 0:
        save_npy_atomic(path, array)
        write_json_atomic(path.with_suffix(".json"), dict(key))
    return array, False


def _checked_conditions(conditions: np.ndarray | torch.Tensor, seeds: Sequence[int], batch_size: int) -> torch.Tensor:
    """``conditions`` as a float32 tensor, after checking that there is one seed per spot and a batch size >= 1."""
    conditions = torch.as_tensor(np.asarray(conditions), dtype=torch.float32)
    if len(seeds) != len(conditions):
        raise ValueError(f"got {len(seeds)} seeds for {len(conditions)} conditions; pass one seed per spot.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    return conditions


def generate_patches(
    generator: Generator,
    conditions: np.ndarray | torch.Tensor,
    seeds: Sequence[int],
    batch_size: int = 16,
    desc: str = "generating",
    sharded: bool = False,
) -> np.ndarray | None:
    """Run ``generator`` over ``conditions`` in batches with one seeded ``torch.Generator`` per spot.

    With ``sharded`` under ``torchrun`` (a process group of several ranks), rank ``r`` generates batches ``r, r +
    world_size, ...``: the batches and seeds one process would use, so the patches are the same. Every rank must then
    call it; a rank without a batch only takes part in the gathering, and only rank 0 gets the patches.

    Args:
        generator: callable ``generator(condition, generator=[torch.Generator]) -> (B, 3, H, W)`` in [0, 1]
            (an :class:`bundle.sampling.pipeline.ExpressionToTissuePipeline` or any stand-in).
        conditions: ``(N, ...)`` conditions.
        seeds: one seed per spot; a spot's patch depends on its own seed only.
        batch_size: spots per call.
        desc: what the log lines call this run.
        sharded: deal the batches to the ranks of a ``torchrun`` job (no effect in one process).

    Returns:
        ``(N, 3, H, W)`` uint8 (None on ranks other than 0 when sharded).
    """
    from bundle.sampling.pipeline import seeded_generators

    conditions = _checked_conditions(conditions, seeds, batch_size)
    if sharded and world_size() > 1:
        return _generate_shard(generator, conditions, seeds, batch_size, desc)
    out: list[np.ndarray] = []
    start = time.perf_counter()
    for lo in range(0, len(conditions), batch_size):
        hi = min(lo + batch_size, len(conditions))
        images = generator(conditions[lo:hi], generator=seeded_generators(seeds[lo:hi]))
        images = torch.as_tensor(images).detach().float().cpu()
        if images.ndim != 4 or images.shape[0] != hi - lo or images.shape[1] != 3:
            raise ValueError(
                f"the generator returned {tuple(images.shape)} for {hi - lo} conditions; it must return (B, 3, H, W) "
                "images in [0, 1]."
            )
        out.append(resize_images(images, None))
        logger.info("%s: %d/%d patches (%.1f s)", desc, hi, len(conditions), time.perf_counter() - start)
    return np.concatenate(out)


def _generate_shard(generator: Generator, conditions: torch.Tensor, seeds: Sequence[int], batch_size: int, desc: str):
    """This rank's batches (:func:`bundle.distributed.shard` in blocks of ``batch_size``), gathered on rank 0 in the
    order of ``conditions``; None on the other ranks."""
    mine = shard(len(conditions), block=batch_size)
    part = generate_patches(generator, conditions[mine], [seeds[i] for i in mine], batch_size, desc) if mine else None
    parts = gather_objects(part)
    if parts is None:
        return None
    return np.stack(unshard([[] if p is None else list(p) for p in parts], block=batch_size))


def generated_size(generator: Generator) -> int | None:
    """Side of the patches an :class:`ExpressionToTissuePipeline` makes (one decode of a zero latent), else None."""
    decode, shape = getattr(generator, "decode", None), getattr(generator, "latent_shape", None)
    if decode is None or shape is None:
        return None
    device = getattr(generator, "device", torch.device("cpu"))
    with torch.no_grad():
        return int(decode(torch.zeros((1, *shape), device=device)).shape[-1])
