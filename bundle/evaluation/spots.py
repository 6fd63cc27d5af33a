"""The evaluated spots: their choice from the dataset's datalist, their real patches and their conditions."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.utils import read_json

__all__ = ["select_spots", "split_sizes", "load_real_patches", "resize_images", "load_conditions"]


def select_spots(
    dataset_dir: str | os.PathLike, split: str = "validation", num: int | None = None, seed: int = 0
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The entries of ``split`` in the dataset's ``datalist.json`` and their indices in that list.

    Args:
        dataset_dir: prepared dataset folder.
        split: ``"training"``, ``"validation"`` or ``"test"``.
        num: number of spots; None (or at least the split's size) takes them all, otherwise a seeded choice,
            returned in list order.
        seed: seed of the choice.
    """
    datalist = read_json(Path(dataset_dir) / "datalist.json")
    datalist = datalist if isinstance(datalist, dict) else {}
    entries = datalist.get(split)
    if not entries:
        sizes = ", ".join(f"{k} {v}" for k, v in split_sizes(datalist).items())
        raise ValueError(
            f"the dataset {str(dataset_dir)!r} has no {split!r} spots (its datalist.json holds {sizes}); score a split "
            "that has spots (eval_split: 'validation' or 'test'; the probe learns from 'training') or prepare the "
            "dataset with a manifest that puts at least one sample in that split (scripts/prepare_dataset.py)."
        )
    index = np.arange(len(entries))
    if num is not None:
        if int(num) < 1:
            raise ValueError(f"the number of spots must be >= 1 or None (all), got {num}.")
        if int(num) < len(entries):
            index = np.sort(np.random.default_rng(seed).choice(len(entries), size=int(num), replace=False))
    return [dict(entries[i]) for i in index], index


def split_sizes(datalist: Mapping[str, Any]) -> dict[str, int]:
    """Spots per split of a ``datalist.json`` dictionary: ``training``, ``validation``, ``test`` (0 when absent) and
    any other list it holds."""
    sizes = dict.fromkeys(("training", "validation", "test"), 0)
    sizes.update({str(k): len(v) for k, v in datalist.items() if isinstance(v, list)})
    return sizes


def load_real_patches(
    entries: Sequence[Mapping[str, Any]],
    fov_um: float,
    size: int,
    backend: str | None = None,
    output_size: int | None = None,
) -> np.ndarray:
    """Real patches of ``entries`` as ``(N, 3, S, S)`` uint8, read like training does (:class:`LoadWSIPatchd`).

    Args:
        entries: datalist entries (``image``, ``location``, ``mpp``).
        fov_um: field of view in micrometres.
        size: patch size in pixels.
        backend: slide reader (None: the best available).
        output_size: downsample each patch to this size (area average) as it is read, to keep memory low.
    """
    from bundle.io.slides import default_backend
    from bundle.transforms import LoadWSIPatchd

    loader = LoadWSIPatchd(keys="image", fov_um=fov_um, size=size, backend=backend or default_backend())
    out_size = int(output_size or size)
    out = np.empty((len(entries), 3, out_size, out_size), np.uint8)
    for i, entry in enumerate(entries):
        patch = torch.as_tensor(loader({k: entry[k] for k in ("image", "location", "mpp")})["image"]).float()
        out[i] = resize_images(patch[None] / 255.0, out_size)[0]
    return out


def resize_images(images: torch.Tensor | np.ndarray, size: int | None) -> np.ndarray:
    """``(N, 3, H, W)`` images (float in [0, 1] or uint8) to uint8 at ``size`` (area average; None keeps the size)."""
    x = torch.as_tensor(images)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()


def load_conditions(
    entries: Sequence[Mapping[str, Any]], expression_store: str | os.PathLike, num_neighbors: int
) -> tuple[np.ndarray, np.ndarray]:
    """The conditions of ``entries`` as configs/train.json builds them, and the spots' own expression.

    Returns:
        ``(conditions, expression)``: ``(N, 1 + K, G)`` (``SpatialContextd``; ``(N, G)`` when ``num_neighbors`` is
        0) and ``(N, G)``, float32.
    """
    from bundle.transforms import LoadExpressiond, SpatialContextd

    load = LoadExpressiond(keys="expression", store=expression_store)
    context = (
        SpatialContextd(keys="expression", store=expression_store, num_neighbors=num_neighbors)
        if num_neighbors
        else None
    )
    conditions, expression = [], []
    for entry in entries:
        item = load({"expression": entry["expression"], "neighbors": entry.get("neighbors", [])})
        expression.append(torch.as_tensor(item["expression"]).float().numpy())
        if context is not None:
            item = context(item)
        conditions.append(torch.as_tensor(item["expression"]).float().numpy())
    return np.stack(conditions).astype(np.float32), np.stack(expression).astype(np.float32)
