"""Random fields and raster helpers shared by the layout and the histology: smooth noise, jittered point grids,
map look-ups, soft disks and Pillow resizing."""

from __future__ import annotations

import math

import numpy as np


def resize_float(array: np.ndarray, size_hw: tuple[int, int], resample: str = "bilinear") -> np.ndarray:
    """Resize a 2-D float32 array with Pillow (fast, pixel-centre aligned)."""
    from PIL import Image

    method = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[resample]
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F")
    return np.array(image.resize((int(size_hw[1]), int(size_hw[0])), method), dtype=np.float32)


def resize_uint8(array: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D uint8 array with Pillow."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L")
    return np.array(image.resize((int(size_hw[1]), int(size_hw[0])), Image.Resampling.BILINEAR), dtype=np.uint8)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Smooth Gaussian random field with zero mean, unit standard deviation and correlation length ~``scale_px``."""
    from scipy import ndimage

    h, w = shape
    step = max(scale_px / 2.0, 1.0)
    ch, cw = int(math.ceil(h / step)) + 3, int(math.ceil(w / step)) + 3
    coarse = ndimage.gaussian_filter(rng.standard_normal((ch, cw), dtype=np.float32), 1.0, mode="wrap")
    coarse -= coarse.mean()
    coarse /= coarse.std() + 1e-6  # normalised on the coarse grid: interpolation keeps mean and spread
    if step > 1.0:
        return resize_float(coarse, (int(round(ch * step)), int(round(cw * step))), "bicubic")[:h, :w]
    return np.ascontiguousarray(coarse[:h, :w])


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at ``edge0`` to 1 at ``edge1`` (clamped outside), with zero slope at both ends."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def jittered_grid(
    rng: np.random.Generator, height_um: float, width_um: float, spacing_um: float, jitter: float = 0.35
) -> tuple[np.ndarray, np.ndarray]:
    """Points on a hexagonal grid of the given spacing, each moved by up to ``jitter * spacing`` (blue-noise-like)."""
    row_step = spacing_um * math.sqrt(3.0) / 2.0
    ys = np.arange(row_step / 2.0, height_um, row_step)
    xs = np.arange(spacing_um / 2.0, width_um + spacing_um, spacing_um)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    xx = xx - (np.arange(len(ys))[:, None] % 2) * spacing_um / 2.0
    yy = yy.ravel() + rng.uniform(-jitter, jitter, yy.size) * spacing_um
    xx = xx.ravel() + rng.uniform(-jitter, jitter, xx.size) * spacing_um
    inside = (yy >= 0) & (yy < height_um) & (xx >= 0) & (xx < width_um)
    return yy[inside], xx[inside]


def lookup(grid: np.ndarray, y_um: np.ndarray, x_um: np.ndarray, px_um: float) -> np.ndarray:
    """Values of a map at 1-um-grid positions given in micrometres (nearest pixel)."""
    iy = np.clip((y_um / px_um).astype(np.int64), 0, grid.shape[0] - 1)
    ix = np.clip((x_um / px_um).astype(np.int64), 0, grid.shape[1] - 1)
    return grid[iy, ix]


def stamp_disks(
    target: np.ndarray, cy: np.ndarray, cx: np.ndarray, radius: np.ndarray, value: np.ndarray | float
) -> None:
    """Paint soft-edged disks (centres and radii in pixels) into ``target`` by maximum, in place."""
    value = np.broadcast_to(np.asarray(value, dtype=np.float32), cy.shape)
    h, w = target.shape
    for y, x, r, v in zip(cy, cx, radius, value):
        n = int(math.ceil(r + 1.5))
        y0, y1 = max(int(y) - n, 0), min(int(y) + n + 1, h)
        x0, x1 = max(int(x) - n, 0), min(int(x) + n + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - y
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - x
        disk = np.clip(r - np.sqrt(yy * yy + xx * xx) + 0.5, 0.0, 1.0) * v
        np.maximum(target[y0:y1, x0:x1], disk, out=target[y0:y1, x0:x1])
