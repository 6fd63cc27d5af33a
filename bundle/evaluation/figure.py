"""The figure ``real_vs_generated.png``: real and generated patches of the same spots side by side, grouped by label.

PIL (through :func:`bundle.sampling.grids.save_image_grid`) is imported when the figure is written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.evaluation.spots import resize_images

__all__ = ["figure_spots", "write_real_vs_generated"]


def _natural_key(text: str) -> list[Any]:
    """Sort key that puts ``cluster_2`` before ``cluster_10``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", str(text)) if part]


def figure_spots(labels: Sequence[str], per_label: int, seed: int = 0) -> list[tuple[str, list[int], int]]:
    """The spots of the figure: per label (in natural order of the names), up to ``per_label`` spot indices.

    The choice is seeded (``numpy.random.default_rng(seed)``, drawn label after label) and each label's spots are
    returned in list order, so a rerun with the same spots and seed shows the same patches.

    Returns:
        ``(label, indices, number of spots with that label)`` per label.
    """
    rng = np.random.default_rng(seed)
    groups = []
    for label in sorted(set(map(str, labels)), key=_natural_key):
        members = np.flatnonzero(np.asarray([str(v) == label for v in labels]))
        chosen = np.sort(rng.choice(members, size=min(int(per_label), len(members)), replace=False))
        groups.append((label, [int(i) for i in chosen], int(len(members))))
    return groups


def write_real_vs_generated(
    path: str | os.PathLike,
    real: np.ndarray,
    generated: np.ndarray,
    labels: Sequence[str],
    per_label: int = 4,
    seed: int = 0,
    max_size: int = 256,
) -> dict[str, Any]:
    """Write the PNG of :func:`figure_spots`: one row per spot (real | generated), rows grouped by label.

    Each group's first row carries ``<label> (<shown> of <spots>)`` in the left margin; groups are further apart than
    rows; the columns are headed ``real`` and ``generated``. Patches above ``max_size`` px are downsampled to it.

    Args:
        path: destination, e.g. ``<eval_dir>/real_vs_generated.png``.
        real: ``(N, 3, H, W)`` uint8 real patches of the evaluated spots.
        generated: the generated patches of the same spots.
        labels: ``N`` labels (compartments or expression clusters).
        per_label: most spots per label.
        seed: seed of the choice.
        max_size: largest side of a patch in the figure.

    Returns:
        ``{"path", "rows", "spots": {label: [spot index, ...]}}``.
    """
    from bundle.sampling.grids import save_image_grid

    if real.shape != generated.shape:
        raise ValueError(f"real {real.shape} and generated {generated.shape} patches differ in shape.")
    groups = figure_spots(labels, per_label, seed)
    size = min(int(real.shape[-1]), int(max_size))
    rows, row_labels = [], []
    for label, index, count in groups:
        pairs = np.stack([resize_images(real[index], size), resize_images(generated[index], size)], axis=1)
        rows.extend(torch.as_tensor(pair).float() / 255.0 for pair in pairs)
        row_labels.extend([f"{label} ({len(index)} of {count})"] + [""] * (len(index) - 1))
    save_image_grid(rows, path, row_labels, ["real", "generated"], rows_per_group=[len(g[1]) for g in groups])
    return {"path": str(Path(path)), "rows": len(rows), "spots": {label: index for label, index, _ in groups}}
