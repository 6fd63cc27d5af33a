"""Nucleus kernels: banks of pre-drawn nuclei per kind (tumour, fibroblast, lymphocyte, ...) and their compositing
into a haematoxylin map."""

from __future__ import annotations

import math

import numpy as np

# Nucleus kinds: semi-axes (um), stain density, drawing style, orientation bins, variants per bin.
_NUCLEUS_KINDS: dict[str, dict] = {
    "tumour": dict(a=(4.0, 5.6), b=(2.0, 2.7), density=(0.8, 1.1), style="vesicular", n_orient=12, n_var=6),
    "hypoxic": dict(a=(3.5, 4.8), b=(2.8, 3.7), density=(0.7, 1.0), style="vesicular", n_orient=6, n_var=6),
    "pyknotic": dict(a=(1.9, 2.5), b=(1.7, 2.3), density=(1.4, 1.8), style="dense", n_orient=1, n_var=4),
    "fibroblast": dict(a=(6.0, 9.0), b=(1.2, 1.7), density=(0.8, 1.0), style="spindle", n_orient=12, n_var=4),
    "lymphocyte": dict(a=(2.4, 3.0), b=(2.3, 2.9), density=(1.3, 1.6), style="dense", n_orient=4, n_var=6),
    "plasma": dict(a=(3.4, 4.0), b=(2.7, 3.2), density=(0.95, 1.2), style="clockface", n_orient=4, n_var=4),
    "adipocyte": dict(a=(5.0, 7.0), b=(1.2, 1.6), density=(0.75, 0.95), style="spindle", n_orient=8, n_var=3),
    "mucosa": dict(a=(3.4, 4.4), b=(2.0, 2.6), density=(0.65, 0.85), style="dense", n_orient=12, n_var=4),
    "debris": dict(a=(2.5, 4.0), b=(2.5, 4.0), density=(1.3, 1.8), style="fragments", n_orient=1, n_var=10),
    "ghost": dict(a=(3.5, 4.5), b=(3.2, 4.2), density=(0.22, 0.32), style="ring", n_orient=1, n_var=4),
}  # fmt: skip


def nucleus_bank(rng: np.random.Generator, mpp: float) -> dict[str, tuple[list[np.ndarray], int, int]]:
    """Pre-drawn nucleus kernels (haematoxylin density, level-0 pixels) for every kind in ``_NUCLEUS_KINDS``.

    Returns:
        ``{kind: (kernels, n_orient, n_var)}``; kernel ``o * n_var + v`` has orientation bin ``o`` (the long axis at
        angle ``pi * o / n_orient`` from the x axis) and variant ``v``.
    """
    from scipy import ndimage

    bank = {}
    for kind, spec in _NUCLEUS_KINDS.items():
        kernels = []
        for o in range(spec["n_orient"]):
            theta = math.pi * o / spec["n_orient"]
            for _ in range(spec["n_var"]):
                a = rng.uniform(*spec["a"]) / mpp
                b = min(rng.uniform(*spec["b"]) / mpp, a)
                density = rng.uniform(*spec["density"])
                n = int(math.ceil(a * 1.15 + 3))
                yy, xx = np.mgrid[-n : n + 1, -n : n + 1].astype(np.float32)
                if spec["style"] == "fragments":  # karyorrhexis: a cluster of small dense fragments
                    kernel = np.zeros(yy.shape, dtype=np.float32)
                    for _ in range(int(rng.integers(2, 6))):
                        fy, fx = rng.uniform(-0.6, 0.6, 2) * a
                        fr = rng.uniform(0.7, 1.6) / mpp
                        fragment = np.clip(fr - np.sqrt((yy - fy) ** 2 + (xx - fx) ** 2) + 0.5, 0.0, 1.0)
                        kernel = np.maximum(kernel, fragment * density * rng.uniform(0.8, 1.1))
                    kernels.append(ndimage.gaussian_filter(kernel, 0.6))
                    continue
                c, s = math.cos(theta), math.sin(theta)
                u = xx * c + yy * s
                v = -xx * s + yy * c
                phi = np.arctan2(v / b, u / a)
                phases = rng.uniform(0.0, 2.0 * math.pi, 2)
                wobble = 1.0 + 0.07 * np.cos(2 * phi + phases[0]) + 0.05 * np.cos(3 * phi + phases[1])
                rr = np.sqrt((u / a) ** 2 + (v / b) ** 2) / wobble
                inside = np.clip((1.0 - rr) * b / 1.2 + 0.5, 0.0, 1.0)
                texture = ndimage.gaussian_filter(rng.standard_normal(yy.shape).astype(np.float32), 0.9 / (mpp / 0.25))
                texture /= texture.std() + 1e-6
                if spec["style"] == "vesicular":  # open chromatin, darker membrane, a nucleolus
                    profile = 0.62 + 0.38 * np.clip(rr, 0, 1) ** 3 + 0.22 * texture
                    ny, nx = rng.uniform(-0.3, 0.3, 2) * b
                    profile += 0.55 * np.exp(-((u - nx) ** 2 + (v - ny) ** 2) / (2 * (0.5 / mpp) ** 2))
                elif spec["style"] == "clockface":  # plasma cell: coarse peripheral chromatin clumps
                    profile = 0.8 + 0.25 * np.cos(5 * phi) * np.clip(rr, 0, 1) + 0.15 * texture
                elif spec["style"] == "ring":  # ghost nucleus of a dead cell: a pale outline
                    profile = 0.4 + 0.9 * np.clip(rr, 0, 1) ** 4 + 0.2 * texture
                else:  # dense / spindle: compact chromatin
                    profile = 0.92 + 0.12 * texture
                kernel = np.clip(inside * density * profile, 0.0, None).astype(np.float32)
                kernels.append(ndimage.gaussian_filter(kernel, 0.5))
        bank[kind] = (kernels, spec["n_orient"], spec["n_var"])
    return bank


def stamp_nuclei(
    target: np.ndarray, kernels: list[np.ndarray], cy: np.ndarray, cx: np.ndarray, index: np.ndarray
) -> None:
    """Composite nucleus kernels centred at integer pixel positions into ``target`` by maximum, in place."""
    h, w = target.shape
    for y, x, k in zip(cy.tolist(), cx.tolist(), index.tolist()):
        kernel = kernels[k]
        kh, kw = kernel.shape
        y0, x0 = y - kh // 2, x - kw // 2
        ky0, kx0 = max(-y0, 0), max(-x0, 0)
        ky1, kx1 = kh - max(y0 + kh - h, 0), kw - max(x0 + kw - w, 0)
        if ky0 >= ky1 or kx0 >= kx1:
            continue
        region = target[y0 + ky0 : y0 + ky1, x0 + kx0 : x0 + kx1]
        np.maximum(region, kernel[ky0:ky1, kx0:kx1], out=region)
