"""Spot geometry: the technologies' lattices, neighbours, the pixel size fitted from the array, pitch and the one
(x, y) <-> (row, column) conversion.

AnnData ``obsm["spatial"]`` and HEST hold (x, y) = (column, row) in level-0 pixels; MONAI's ``WSIReader.get_data`` takes
(row, column): :func:`xy_to_rowcol` is the only place that converts.

Technologies (:data:`TECHNOLOGIES`, :func:`get_technology`):

=============  ========  ==========  ========  =========================================================
name           lattice   diameter    pitch     array coordinates
=============  ========  ==========  ========  =========================================================
``visium``     hex       55 um       100 um    ``array_col`` steps of pitch / 2 along x, ``array_row`` of
                                               pitch * sqrt(3) / 2 along y; 6 neighbours
``st``         square    100 um      200 um    legacy Spatial Transcriptomics: one pitch per step; 8 neighbours
``visium_hd``  square    bin size    bin size  square bins (16 um unless the metadata says); 8 neighbours
``xenium``     square    bin size    bin size  transcripts pooled into contiguous square pseudo-spots (HEST-1k:
                                               100 um bins, 100 um apart, unless the metadata says); 8 neighbours
=============  ========  ==========  ========  =========================================================

On a square lattice the 8 neighbours are the 4 edge neighbours (one pitch away) and the 4 diagonal ones (sqrt(2)
pitches): together they cover the ring of tissue around a spot as the 6 hex neighbours do on Visium.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Visium hexagonal lattice: the six neighbours of (row, col) in array coordinates
HEX_OFFSETS = ((0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1))
# square lattice (legacy ST, binned data): edge neighbours first, then the diagonals
SQUARE_OFFSETS = ((0, -1), (0, 1), (-1, 0), (1, 0), (-1, -1), (-1, 1), (1, -1), (1, 1))
VISIUM_SPOT_DIAMETER_UM = 55.0
# centre-to-centre distance of neighbouring Visium spots
VISIUM_PITCH_UM = 100.0
# Space Ranger's ``spot_diameter_fullres`` spans a theoretical 65 um spot (not the 55 um capture spot): on the shared
# real Visium sample it gives 0.727 um/px, the array fit 0.725
SPACERANGER_DIAMETER_FULLRES_UM = 65.0
# without array coordinates, spots closer than this many pitches are neighbours
NEIGHBOR_RADIUS_PITCHES = 1.25
# a pixel size that differs from the one fitted to the array by more than this share is refused
PITCH_TOLERANCE = 0.05
# spots further than this share of the pitch (RMS) from the fitted lattice do not lie on the technology's array
MAX_LATTICE_RESIDUAL = 0.2


@dataclass(frozen=True)
class Technology:
    """A spot technology's geometry.

    Attributes:
        name: ``"visium"``, ``"st"``, ``"visium_hd"`` or ``"xenium"``.
        lattice: ``"hex"`` or ``"square"``.
        spot_diameter_um: diameter of a spot (side of a bin) in micrometres.
        pitch_um: centre-to-centre distance of neighbouring spots in micrometres.
    """

    name: str
    lattice: str
    spot_diameter_um: float
    pitch_um: float

    @property
    def neighbor_offsets(self) -> tuple[tuple[int, int], ...]:
        """``(d_row, d_col)`` array offsets of the neighbours, in the model's slot order."""
        return HEX_OFFSETS if self.lattice == "hex" else SQUARE_OFFSETS

    @property
    def num_neighbors(self) -> int:
        return len(self.neighbor_offsets)

    def array_to_um(self, array_row: np.ndarray, array_col: np.ndarray) -> np.ndarray:
        """Positions ``(N, 2)`` as (x, y) micrometres of array coordinates (up to a shift, rotation and mirroring)."""
        row, col = np.asarray(array_row, dtype=np.float64), np.asarray(array_col, dtype=np.float64)
        if self.lattice == "hex":
            return np.stack([col * self.pitch_um / 2.0, row * self.pitch_um * math.sqrt(3.0) / 2.0], axis=1)
        return np.stack([col * self.pitch_um, row * self.pitch_um], axis=1)


TECHNOLOGIES = {
    "visium": Technology("visium", "hex", VISIUM_SPOT_DIAMETER_UM, VISIUM_PITCH_UM),
    "st": Technology("st", "square", 100.0, 200.0),
    "visium_hd": Technology("visium_hd", "square", 16.0, 16.0),
    "xenium": Technology("xenium", "square", VISIUM_PITCH_UM, VISIUM_PITCH_UM),
}
# spellings seen in manifests and HEST metadata (``st_technology``), compared without case, spaces, "-" and "_"
_TECHNOLOGY_ALIASES = {
    "visium": "visium",
    "10xvisium": "visium",
    "visiumcytassist": "visium",
    "st": "st",
    "legacyst": "st",
    "spatialtranscriptomics": "st",
    "visiumhd": "visium_hd",
    "xenium": "xenium",
}


def get_technology(
    name: str | None, spot_diameter_um: float | None = None, pitch_um: float | None = None, what: str = "technology"
) -> Technology:
    """The :class:`Technology` called ``name`` (None: Visium), with the diameter and pitch replaced where given
    (HEST metadata's ``spot_diameter`` and ``inter_spot_dist``); raises naming the known ones for any other name."""
    key = "visium" if name is None or not str(name).strip() else str(name).lower()
    for char in " -_":
        key = key.replace(char, "")
    if key not in _TECHNOLOGY_ALIASES:
        raise ValueError(
            f"{what} {name!r} is not a spot technology this bundle knows; use one of {sorted(TECHNOLOGIES)} "
            "(Visium: hexagonal 55/100 um; st: legacy Spatial Transcriptomics, square 100/200 um; visium_hd and "
            "xenium: square bins). Cell-level data must be pooled into spots or bins first."
        )
    base = TECHNOLOGIES[_TECHNOLOGY_ALIASES[key]]
    diameter = base.spot_diameter_um if spot_diameter_um is None else float(spot_diameter_um)
    pitch = base.pitch_um if pitch_um is None else float(pitch_um)
    if not (diameter > 0 and pitch > 0 and math.isfinite(diameter) and math.isfinite(pitch)):
        raise ValueError(f"{what} {name!r}: spot diameter {diameter} and pitch {pitch} must be positive micrometres.")
    return Technology(base.name, base.lattice, diameter, pitch)


@dataclass(frozen=True)
class PitchFit:
    """The level-0 pixel size fitted from array coordinates to pixel positions.

    Attributes:
        mpp: micrometres per pixel.
        residual_um: root-mean-square distance of the fitted spots from the fitted lattice, in micrometres.
        num_spots: spots the fit used.
        outliers: spots left out of the fit, further than a quarter pitch from the first fit's lattice (moved spots).
    """

    mpp: float
    residual_um: float
    num_spots: int
    outliers: int = 0


def _similarity_fit(grid: np.ndarray, pixels: np.ndarray) -> tuple[float, np.ndarray] | None:
    """Scale (pixels per micrometre) of the least-squares similarity map of ``grid`` onto ``pixels``, and each spot's
    residual in pixels; None when the grid is collinear."""
    grid = grid - grid.mean(axis=0)
    pixels = pixels - pixels.mean(axis=0)
    if len(grid) < 3 or np.linalg.matrix_rank(grid) < 2:
        return None
    u, singular, vt = np.linalg.svd(grid.T @ pixels)
    scale = float(singular.sum() / (grid**2).sum())
    if not scale > 0:
        return None
    return scale, np.sqrt(((pixels - scale * grid @ (u @ vt)) ** 2).sum(axis=1))


def fit_pixel_size(array_row, array_col, x, y, technology: Technology) -> PitchFit | None:
    """Fit ``(x, y)`` pixels as a similarity map (rotation, mirroring, one scale, shift) of the array positions in
    micrometres; return its pixel size and how far the spots lie from the fitted lattice.

    One scale for both axes, so an array of the wrong technology (a hex lattice read as a square one) shows as a large
    residual. Spots far from the fit (beyond three times the median distance, and at least a quarter pitch) are left
    out and the fit repeated, so that a few moved spots do not bend it; at least half the spots are kept. Returns None
    with fewer than 3 spots or when the array positions are collinear.
    """
    grid = technology.array_to_um(array_row, array_col)
    pixels = np.stack([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)], axis=1)
    inliers = np.ones(len(grid), dtype=bool)
    fit = _similarity_fit(grid, pixels)
    if fit is None:
        return None
    for _ in range(10):
        scale, residual = fit
        distance_um = np.full(len(grid), np.inf)
        distance_um[inliers] = residual / scale
        limit = max(3.0 * float(np.median(distance_um[inliers])), 0.25 * technology.pitch_um)
        keep = inliers & (distance_um <= limit)
        if keep.sum() == inliers.sum() or keep.sum() < max(3, len(grid) // 2):
            break
        refit = _similarity_fit(grid[keep], pixels[keep])
        if refit is None:
            break
        inliers, fit = keep, refit
    scale, residual = fit
    residual_um = float(np.sqrt((residual**2).mean())) / scale
    return PitchFit(1.0 / scale, residual_um, int(inliers.sum()), int((~inliers).sum()))


def lattice_neighbors(array_row: np.ndarray, array_col: np.ndarray, offsets=HEX_OFFSETS) -> np.ndarray:
    """Indices ``(N, K)`` of each spot's neighbours at the array ``offsets`` (``(d_row, d_col)`` pairs), ``-1`` where
    there is none."""
    index = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(array_row, array_col))}
    out = np.full((len(array_row), len(offsets)), -1, dtype=np.int64)
    for i, (r, c) in enumerate(zip(array_row, array_col)):
        for k, (dr, dc) in enumerate(offsets):
            out[i, k] = index.get((int(r) + dr, int(c) + dc), -1)
    return out


def hex_neighbors(array_row: np.ndarray, array_col: np.ndarray) -> np.ndarray:
    """Indices of each spot's six Visium hex-lattice neighbours, ``(N, 6)``, ``-1`` where there is none.

    Neighbours of ``(r, c)`` are ``(r, c +- 2)`` and ``(r +- 1, c +- 1)`` in Visium array coordinates.
    """
    return lattice_neighbors(array_row, array_col, HEX_OFFSETS)


def radius_neighbors(xy: np.ndarray, radius: float, k: int = 6) -> np.ndarray:
    """Up to ``k`` nearest spots within ``radius`` pixels, for data without array coordinates."""
    from scipy.spatial import cKDTree

    out = np.full((len(xy), k), -1, dtype=np.int64)
    if len(xy) < 2:
        return out
    dist, idx = cKDTree(xy).query(xy, k=min(k + 1, len(xy)))
    for i in range(len(xy)):
        found = [j for d, j in zip(dist[i, 1:], idx[i, 1:]) if d <= radius]
        out[i, : len(found)] = found
    return out


def spot_neighbors(
    array_row: np.ndarray | None = None,
    array_col: np.ndarray | None = None,
    xy: np.ndarray | None = None,
    radius: float | None = None,
    technology: Technology | None = None,
) -> np.ndarray | None:
    """Each spot's neighbours ``(N, K)``, ``-1`` where there is none, from whatever locates the spots.

    The technology's lattice (:func:`lattice_neighbors`; Visium's hex lattice, K = 6, when ``technology`` is None) when
    array coordinates are given, else the up to K nearest spots within ``radius`` of the positions ``xy``
    (:func:`radius_neighbors`, same units), else None.
    """
    offsets = HEX_OFFSETS if technology is None else technology.neighbor_offsets
    if array_row is not None and array_col is not None:
        return lattice_neighbors(array_row, array_col, offsets)
    if xy is None:
        return None
    return radius_neighbors(xy, radius=radius, k=len(offsets))


def xy_to_rowcol(location_xy: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Convert a spot centre from ``(x, y)`` to ``(row, column)``.

    AnnData ``obsm["spatial"]``, HEST and the datalist hold ``(x, y) = (column, row)`` in level-0 pixels;
    MONAI's ``WSIReader.get_data(location=...)`` and numpy indexing take ``(row, column)``. This is the only
    place in the project where the two orders meet.

    Args:
        location_xy: ``(x, y)`` pair.

    Returns:
        ``(row, column)`` = ``(y, x)``.
    """
    if len(location_xy) != 2:
        raise ValueError(f"location must be an (x, y) pair, got {location_xy!r}.")
    x, y = location_xy
    return y, x


def rowcol_to_xy(location_rowcol: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Inverse of :func:`xy_to_rowcol`: ``(row, column)`` to ``(x, y)``."""
    return xy_to_rowcol(location_rowcol)  # swapping the pair is its own inverse


def estimate_spot_pitch(positions_um: np.ndarray) -> float:
    """Centre-to-centre spot distance in micrometres: the median nearest-neighbour distance (100 um on Visium)."""
    from scipy.spatial import cKDTree

    positions_um = np.asarray(positions_um, dtype=np.float64)
    if len(positions_um) < 2:
        return VISIUM_PITCH_UM
    distances, _ = cKDTree(positions_um).query(positions_um, k=2)
    pitch = float(np.median(distances[:, 1]))
    if not pitch > 0:
        raise ValueError("positions_um holds duplicate spot positions (nearest-neighbour distance 0); remove them.")
    return pitch


def lattice_offsets(
    positions_um: np.ndarray,
    neighbors: np.ndarray | None = None,
    pitch_um: float | None = None,
    num_neighbors: int | None = None,
) -> np.ndarray:
    """Displacements ``(K, 2)`` (x, y in micrometres) from a spot to its K lattice neighbours, in the model's slot order.

    With ``neighbors`` (the ``(N, K)`` neighbour indices the training data used, ``-1`` for none), each slot's offset is
    the mean displacement to that neighbour over the spots that have it, so a rotated or mirrored array keeps the slot
    meaning the model learnt. Otherwise (or for a slot no spot has) the lattice's layout is used: K = 6 is Visium's hex
    lattice (:data:`HEX_OFFSETS`: ``array_col`` steps of ``pitch / 2`` along x and ``array_row`` steps of
    ``pitch * sqrt(3) / 2`` along y), K = 8 a square one (:data:`SQUARE_OFFSETS`, one pitch per step).

    Args:
        positions_um: spot centres ``(N, 2)`` as (x, y) micrometres.
        neighbors: optional ``(N, K)`` indices into ``positions_um`` (``-1``: no neighbour).
        pitch_um: spot pitch; measured with :func:`estimate_spot_pitch` when None.
        num_neighbors: K (6 or 8); defaults to the width of ``neighbors``, else 6.
    """
    positions_um = np.asarray(positions_um, dtype=np.float64)
    pitch = estimate_spot_pitch(positions_um) if pitch_um is None else float(pitch_um)
    if num_neighbors is None:
        num_neighbors = np.asarray(neighbors).shape[-1] if neighbors is not None else len(HEX_OFFSETS)
    lattices = {len(HEX_OFFSETS): "hex", len(SQUARE_OFFSETS): "square"}
    if num_neighbors not in lattices:
        raise ValueError(f"num_neighbors must be 6 (hex lattice) or 8 (square lattice), got {num_neighbors}.")
    technology = Technology("", lattices[num_neighbors], pitch, pitch)
    rows, cols = np.asarray(technology.neighbor_offsets, dtype=np.float64).T
    offsets = technology.array_to_um(rows, cols)
    if neighbors is None:
        return offsets
    neighbors = np.asarray(neighbors)
    if neighbors.ndim != 2 or neighbors.shape[0] != len(positions_um) or neighbors.shape[1] != num_neighbors:
        raise ValueError(
            f"neighbors must be ({len(positions_um)}, {num_neighbors}) indices into positions_um (-1 for none), got "
            f"shape {neighbors.shape}."
        )
    for slot in range(num_neighbors):
        index = neighbors[:, slot].astype(np.int64)
        valid = (index >= 0) & (index < len(positions_um))
        if valid.any():
            offsets[slot] = (positions_um[index[valid]] - positions_um[valid]).mean(axis=0)
    return offsets
