"""Tissue layout of a simulated section at 1 um/px: outline, compartment label map and gland/crypt/adipocyte seeds.

The compartments are arranged like a colon wall cut through a tumour (:func:`simulate_layout`): normal mucosa on one
side, pericolic fat on the other, a tumour mass between them in desmoplastic stroma, central necrosis wrapped in a
hypoxic rim, and lymphoid aggregates at the invasive front and under the mucosa.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bundle.demo.compartments import COMPARTMENTS, GLASS
from bundle.demo.fields import jittered_grid, lookup, resize_float, smooth_noise


@dataclass
class Layout:
    """The layout of one slide, at ``px_um`` um/px.

    Attributes:
        labels: int8 (h, w) compartment labels, ``GLASS`` (-1) off tissue.
        alpha: float32 (h, w) soft tissue mask.
        px_um: pixel size in micrometres.
        nearest: int32 (h, w) id of the nearest structure seed.
        seeds: per seed: ``y``, ``x``, ``radius`` (um), ``lumen`` (rho), ``aspect``, ``angle``, ``kind``, ``dirty``;
            kind 0 is a tumour gland, 1 a mucosal crypt, 2 an adipocyte, 3 the far-away placeholder.
        rho: float32 (h, w) distance to the nearest seed over its radius (plus outline noise).
        membrane: float32 (h, w) adipocyte membrane strength (0-1).
    """

    labels: np.ndarray
    alpha: np.ndarray
    px_um: float
    nearest: np.ndarray
    seeds: dict[str, np.ndarray]
    rho: np.ndarray
    membrane: np.ndarray


def simulate_layout(
    rng: np.random.Generator, shape: tuple[int, int], px_um: float, region_um: float = 4.0, voronoi_um: float = 2.0
) -> Layout:
    """Draw the tissue outline, the compartment label map and the gland/crypt/adipocyte seeds.

    Region-scale fields (outline, compartments, distances) are computed on a ``region_um`` grid and upsampled with
    soft (bilinear) boundaries; the nearest-seed partition on a ``voronoi_um`` grid; everything else at ``px_um``.
    """
    grid = _RegionGrid.build(rng, shape, px_um, region_um)
    signed = _tissue_outline(grid)
    region = _compartment_regions(grid, signed > 0)
    labels, alpha = _fine_labels(rng, region, signed, shape, px_um, grid.factor)
    seeds = _structure_seeds(rng, labels, px_um)
    nearest = _nearest_seed(rng, seeds, shape, px_um, voronoi_um)
    rho = _seed_distance(rng, seeds, nearest, px_um)
    return Layout(labels, alpha, px_um, nearest, seeds, rho, _membranes(nearest, px_um))


@dataclass
class _RegionGrid:
    """The coarse grid of the region-scale fields, with the layout's random stream."""

    rng: np.random.Generator
    y: np.ndarray  # (ch, 1) float32 cell centres in micrometres
    x: np.ndarray  # (1, cw)
    cell_um: float
    factor: int  # layout pixels per cell along each axis
    height_um: float  # extent of the layout
    width_um: float

    @classmethod
    def build(cls, rng: np.random.Generator, shape: tuple[int, int], px_um: float, region_um: float) -> _RegionGrid:
        h, w = shape
        factor = max(1, int(round(region_um / px_um)))
        ch, cw = -(-h // factor), -(-w // factor)
        cell_um = factor * px_um
        y = ((np.arange(ch, dtype=np.float32) + 0.5) * cell_um)[:, None]
        x = ((np.arange(cw, dtype=np.float32) + 0.5) * cell_um)[None, :]
        return cls(rng, y, x, cell_um, factor, h * px_um, w * px_um)

    @property
    def shape(self) -> tuple[int, int]:
        return self.y.shape[0], self.x.shape[1]

    def noise(self, scale_um: float) -> np.ndarray:
        """A smooth random field on the grid with correlation length ~``scale_um``."""
        return smooth_noise(self.rng, self.shape, scale_um / self.cell_um)

    def edt_um(self, mask: np.ndarray) -> np.ndarray:
        """Distance in micrometres from every cell of ``mask`` to the nearest cell outside it."""
        from scipy import ndimage

        return ndimage.distance_transform_edt(mask).astype(np.float32) * self.cell_um


def _tissue_outline(grid: _RegionGrid) -> np.ndarray:
    """Signed distance (um) to the tissue edge: glass margins on 2-3 sides, tissue running off the slide on the
    others, and a few small tears (about 1% of the section)."""
    rng, y, x = grid.rng, grid.y, grid.x
    h_um, w_um = grid.height_um, grid.width_um
    touching = rng.permutation(4)[: int(rng.integers(1, 3))]
    margins = rng.uniform(70.0, 200.0, 4)
    margins[touching] = -150.0
    edge_distance = np.minimum(
        np.minimum(y - margins[0], h_um - y - margins[1]), np.minimum(x - margins[2], w_um - x - margins[3])
    )
    signed = edge_distance + 55.0 * grid.noise(300.0) + 15.0 * grid.noise(60.0)
    return np.minimum(signed, (2.6 - grid.noise(45.0)) * 25.0)


def _compartment_regions(grid: _RegionGrid, tissue: np.ndarray) -> np.ndarray:
    """Compartment labels on the region grid, glass filled with the nearest tissue label (so that soft edges never
    invent a compartment)."""
    from scipy import ndimage

    mucosa, adipose, middle, tumour = _colon_wall_through_tumour(grid, tissue)
    necrosis, hypoxic = _necrosis_and_hypoxic_rim(grid, tumour)
    stroma = middle & ~tumour
    immune = _lymphoid_aggregates(grid, tissue, tumour, mucosa, stroma)
    region = np.full(grid.shape, GLASS, dtype=np.int8)
    for name, mask in (("stroma", stroma), ("normal_mucosa", mucosa), ("adipose", adipose), ("tumour", tumour),
                       ("necrosis", necrosis), ("hypoxic_rim", hypoxic), ("immune", immune)):  # fmt: skip
        region[mask] = COMPARTMENTS.index(name)
    glass_index = ndimage.distance_transform_edt(region == GLASS, return_distances=False, return_indices=True)
    return region[glass_index[0], glass_index[1]] if tissue.any() else np.zeros_like(region)


def _colon_wall_through_tumour(
    grid: _RegionGrid, tissue: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Masks ``(mucosa, adipose, middle, tumour)``: mucosa and fat at the two ends of a random axis across the
    section, and a tumour mass with an irregular invasive front in the middle band between them."""
    rng, y, x = grid.rng, grid.y, grid.x
    h_um, w_um = grid.height_um, grid.width_um
    angle = rng.uniform(0.0, 2.0 * math.pi)
    axis = (x - w_um / 2) * math.cos(angle) + (y - h_um / 2) * math.sin(angle)
    lo, hi = (float(v) for v in np.quantile(axis[tissue], [0.0, 1.0])) if tissue.any() else (0.0, 1.0)
    wall = (axis - lo) / max(hi - lo, 1e-6) + 0.08 * grid.noise(250.0) + 0.03 * grid.noise(60.0)
    mucosa = tissue & (wall < rng.uniform(0.16, 0.24))
    adipose = tissue & (wall > 1.0 - rng.uniform(0.14, 0.2))
    middle = tissue & ~mucosa & ~adipose
    along = rng.uniform(0.42, 0.58) * (hi - lo) + lo
    across = rng.uniform(-0.15, 0.15) * min(h_um, w_um)
    cy_t = h_um / 2 + along * math.sin(angle) + across * math.cos(angle)
    cx_t = w_um / 2 + along * math.cos(angle) - across * math.sin(angle)
    radial = np.sqrt((y - cy_t) ** 2 + (x - cx_t) ** 2) / (0.5 * math.hypot(h_um, w_um))
    tumour_field = -radial + 0.25 * grid.noise(220.0) + 0.08 * grid.noise(60.0)
    tumour = middle & (tumour_field > _quantile(tumour_field, middle, 1.0 - rng.uniform(0.5, 0.62)))
    return mucosa, adipose, middle, tumour


def _necrosis_and_hypoxic_rim(grid: _RegionGrid, tumour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks ``(necrosis, hypoxic)``: central necrosis deep in the tumour, wrapped in a rim of viable hypoxic
    tumour."""
    rng = grid.rng
    depth = grid.edt_um(tumour)
    necrosis_field = grid.noise(110.0) + depth / 120.0
    deep = tumour & (depth > min(80.0, 0.5 * float(depth.max())))
    necrosis = deep & (necrosis_field > _quantile(necrosis_field, deep, 1.0 - rng.uniform(0.25, 0.35)))
    hypoxic = tumour & ~necrosis & (grid.edt_um(~necrosis) + 10.0 * grid.noise(40.0) < rng.uniform(50.0, 70.0))
    return necrosis, hypoxic


def _lymphoid_aggregates(
    grid: _RegionGrid, tissue: np.ndarray, tumour: np.ndarray, mucosa: np.ndarray, stroma: np.ndarray
) -> np.ndarray:
    """Mask of lymphoid aggregates: round blobs in the stroma at the invasive front and beneath the mucosa."""
    rng, y, x = grid.rng, grid.y, grid.x
    to_tumour = grid.edt_um(~tumour)
    front = stroma & (to_tumour > 30.0) & (to_tumour < 260.0)
    base = stroma & (grid.edt_um(~mucosa) < 150.0) if mucosa.any() else front
    area_mm2 = float(tissue.sum()) * grid.cell_um * grid.cell_um / 1e6
    blob_noise = grid.noise(35.0)
    immune = np.zeros(grid.shape, dtype=bool)
    for candidates, count in ((front, max(2, round(area_mm2 * rng.uniform(1.2, 1.8)))),
                              (base, max(1, round(area_mm2 * rng.uniform(0.4, 0.7))))):  # fmt: skip
        if not candidates.any():
            candidates = stroma if stroma.any() else tissue
        iy, ix = np.nonzero(candidates)
        for k in rng.choice(iy.size, size=min(count, iy.size), replace=False) if iy.size else []:
            radius = rng.uniform(55.0, 105.0)
            distance = np.sqrt((y - y[iy[k], 0]) ** 2 + (x - x[0, ix[k]]) ** 2)
            immune |= distance / radius + 0.22 * blob_noise < 1.0
    immune &= stroma | mucosa
    return immune


def _quantile(values: np.ndarray, mask: np.ndarray, q: float) -> float:
    """The ``q`` quantile of ``values`` where ``mask`` is set (``+inf`` if the mask is empty)."""
    selected = values[mask]
    return float(np.quantile(selected, q)) if selected.size else float("inf")


def _fine_labels(
    rng: np.random.Generator, region: np.ndarray, signed: np.ndarray, shape: tuple[int, int], px_um: float, factor: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, alpha)`` on the layout grid: region labels upsampled with bilinear soft boundaries, and the soft
    tissue mask of a ragged tissue edge."""
    from scipy import ndimage

    h, w = shape
    up = (region.shape[0] * factor, region.shape[1] * factor)
    signed_fine = resize_float(signed, up)[:h, :w] + 4.0 * smooth_noise(rng, shape, 12.0 / px_um)
    alpha = np.clip(signed_fine / 3.0 + 0.5, 0.0, 1.0).astype(np.float32)
    best = np.full(shape, -1.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.int8)
    for index in np.unique(region):
        soft = resize_float(ndimage.gaussian_filter((region == index).astype(np.float32), 1.0), up)[:h, :w]
        better = soft > best
        labels[better] = index
        np.maximum(best, soft, out=best)
    labels[alpha <= 0.5] = GLASS
    return labels, alpha


def _structure_seeds(rng: np.random.Generator, labels: np.ndarray, px_um: float) -> dict[str, np.ndarray]:
    """Seeds of tumour glands, mucosal crypts and adipocytes on jittered grids inside their compartments, plus a
    far-away placeholder seed that keeps the code uniform on slides without structures."""
    h_um, w_um = labels.shape[0] * px_um, labels.shape[1] * px_um
    seed_sets = []
    for kind, label, spacing, jitter, radius_share, lumen, aspect in (
        (0, "tumour", rng.uniform(95.0, 120.0), 0.3, (0.5, 0.62), (0.25, 0.55), (1.0, 1.9)),
        (1, "normal_mucosa", rng.uniform(58.0, 68.0), 0.12, (0.40, 0.44), (0.18, 0.24), (1.0, 1.15)),
        (2, "adipose", rng.uniform(62.0, 80.0), 0.38, (1.0, 1.0), (0.0, 0.0), (1.0, 1.0)),
    ):
        sy, sx = jittered_grid(rng, h_um, w_um, spacing, jitter)
        keep = lookup(labels, sy, sx, px_um) == COMPARTMENTS.index(label)
        n = int(keep.sum())
        seed_sets.append(
            dict(
                y=sy[keep],
                x=sx[keep],
                radius=rng.uniform(*radius_share, n) * spacing,
                lumen=rng.uniform(*lumen, n),
                aspect=rng.uniform(*aspect, n),
                angle=rng.uniform(0.0, math.pi, n),
                kind=np.full(n, kind, dtype=np.int8),
                dirty=rng.random(n) < (0.4 if kind == 0 else 0.0),
            )
        )
    seeds = {key: np.concatenate([s[key] for s in seed_sets]) for key in seed_sets[0]}
    for key, value in dict(y=-1e6, x=-1e6, radius=1.0, lumen=0.0, aspect=1.0, angle=0.0, kind=3, dirty=False).items():
        seeds[key] = np.append(seeds[key], np.asarray(value, dtype=seeds[key].dtype))
    return seeds


def _nearest_seed(
    rng: np.random.Generator, seeds: dict[str, np.ndarray], shape: tuple[int, int], px_um: float, voronoi_um: float
) -> np.ndarray:
    """Id of the nearest seed of every layout pixel (a partition computed on a ``voronoi_um`` grid), looked up
    through a slightly warped grid so that cell walls are wavy, not straight."""
    from scipy import ndimage

    h, w = shape
    vf = max(1, int(round(voronoi_um / px_um)))
    vh, vw = -(-h // vf), -(-w // vf)
    free = np.ones((vh, vw), dtype=bool)
    ids = np.full((vh, vw), seeds["y"].size - 1, dtype=np.int32)
    real = seeds["kind"] < 3
    iy = np.clip((seeds["y"][real] / (vf * px_um)).astype(np.int64), 0, vh - 1)
    ix = np.clip((seeds["x"][real] / (vf * px_um)).astype(np.int64), 0, vw - 1)
    free[iy, ix] = False
    ids[iy, ix] = np.nonzero(real)[0].astype(np.int32)
    if not free.all():
        index = ndimage.distance_transform_edt(free, return_distances=False, return_indices=True)
        ids = ids[index[0], index[1]]
        del index
    wy = np.arange(h, dtype=np.float32)[:, None] + (2.5 / px_um) * smooth_noise(rng, shape, 15.0 / px_um)
    wx = np.arange(w, dtype=np.float32)[None, :] + (2.5 / px_um) * smooth_noise(rng, shape, 15.0 / px_um)
    return ids[np.clip((wy / vf).astype(np.int64), 0, vh - 1), np.clip((wx / vf).astype(np.int64), 0, vw - 1)]


def _seed_distance(
    rng: np.random.Generator, seeds: dict[str, np.ndarray], nearest: np.ndarray, px_um: float
) -> np.ndarray:
    """Float32 ``rho``: each pixel's distance to its seed in the seed's rotated, stretched frame over the seed's
    radius (1 at the structure's outline), with a little noise on the outline."""
    h, w = nearest.shape
    ym = ((np.arange(h, dtype=np.float32) + 0.5) * px_um)[:, None]
    xm = ((np.arange(w, dtype=np.float32) + 0.5) * px_um)[None, :]
    dy = ym - seeds["y"].astype(np.float32)[nearest]
    dx = xm - seeds["x"].astype(np.float32)[nearest]
    cos_a = np.cos(seeds["angle"]).astype(np.float32)[nearest]
    sin_a = np.sin(seeds["angle"]).astype(np.float32)[nearest]
    u = (dx * cos_a + dy * sin_a) / seeds["aspect"].astype(np.float32)[nearest]
    v = -dx * sin_a + dy * cos_a
    del dy, dx, cos_a, sin_a
    rho = np.sqrt(u * u + v * v) / seeds["radius"].astype(np.float32)[nearest]
    rho += 0.12 * smooth_noise(rng, (h, w), 22.0 / px_um)
    return rho.astype(np.float32)


def _membranes(nearest: np.ndarray, px_um: float) -> np.ndarray:
    """Float32 membrane strength (0-1) along the walls between neighbouring seeds' cells."""
    from scipy import ndimage

    boundary = np.zeros(nearest.shape, dtype=np.float32)
    boundary[:, 1:] += nearest[:, 1:] != nearest[:, :-1]
    boundary[1:, :] += nearest[1:, :] != nearest[:-1, :]
    return np.clip(ndimage.gaussian_filter(boundary, 1.0 / px_um) * 2.4, 0.0, 1.0).astype(np.float32)
