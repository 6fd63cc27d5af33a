"""Spot geometry: the Visium lattice constants, neighbours, pitch and the one (x, y) <-> (row, column) conversion.

AnnData ``obsm["spatial"]`` and HEST hold (x, y) = (column, row) in level-0 pixels; MONAI's ``WSIReader.get_data`` takes
(row, column): :func:`xy_to_rowcol` is the only place that converts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Visium hexagonal lattice: the six neighbours of (row, col) in array coordinates
HEX_OFFSETS = ((0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1))
VISIUM_SPOT_DIAMETER_UM = 55.0
# centre-to-centre distance of neighbouring Visium spots
VISIUM_PITCH_UM = 100.0
# without array coordinates, spots closer than this many pitches are neighbours
NEIGHBOR_RADIUS_PITCHES = 1.25


def hex_neighbors(array_row: np.ndarray, array_col: np.ndarray) -> np.ndarray:
    """Indices of each spot's six Visium hex-lattice neighbours, ``(N, 6)``, ``-1`` where there is none.

    Neighbours of ``(r, c)`` are ``(r, c +- 2)`` and ``(r +- 1, c +- 1)`` in Visium array coordinates.
    """
    index = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(array_row, array_col))}
    out = np.full((len(index), len(HEX_OFFSETS)), -1, dtype=np.int64)
    for i, (r, c) in enumerate(zip(array_row, array_col)):
        for k, (dr, dc) in enumerate(HEX_OFFSETS):
            out[i, k] = index.get((int(r) + dr, int(c) + dc), -1)
    return out


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
) -> np.ndarray | None:
    """Each spot's neighbours ``(N, 6)``, ``-1`` where there is none, from whatever locates the spots.

    The hex lattice (:func:`hex_neighbors`) when array coordinates are given, else the up to 6 nearest spots within
    ``radius`` of the positions ``xy`` (:func:`radius_neighbors`, same units), else None.
    """
    if array_row is not None and array_col is not None:
        return hex_neighbors(array_row, array_col)
    if xy is None:
        return None
    return radius_neighbors(xy, radius=radius)


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
    positions_um: np.ndarray, neighbors: np.ndarray | None = None, pitch_um: float | None = None
) -> np.ndarray:
    """Displacements ``(6, 2)`` (x, y in micrometres) from a spot to its six hex neighbours, in the model's slot order.

    With ``neighbors`` (the ``(N, 6)`` neighbour indices the training data used, ``-1`` for none), each slot's offset is
    the mean displacement to that neighbour over the spots that have it, so a rotated or mirrored array keeps the slot
    meaning the model learnt. Otherwise (or for a slot no spot has) the Visium layout of
    :data:`bundle.geometry.HEX_OFFSETS` is used: ``array_col`` steps of ``pitch / 2`` along x and ``array_row`` steps of
    ``pitch * sqrt(3) / 2`` along y.

    Args:
        positions_um: spot centres ``(N, 2)`` as (x, y) micrometres.
        neighbors: optional ``(N, 6)`` indices into ``positions_um`` (``-1``: no neighbour).
        pitch_um: spot pitch; measured with :func:`estimate_spot_pitch` when None.
    """
    positions_um = np.asarray(positions_um, dtype=np.float64)
    pitch = estimate_spot_pitch(positions_um) if pitch_um is None else float(pitch_um)
    offsets = np.array([(dc * pitch / 2.0, dr * pitch * np.sqrt(3.0) / 2.0) for dr, dc in HEX_OFFSETS])
    if neighbors is None:
        return offsets
    neighbors = np.asarray(neighbors)
    if neighbors.ndim != 2 or neighbors.shape[0] != len(positions_um) or neighbors.shape[1] < len(HEX_OFFSETS):
        raise ValueError(
            f"neighbors must be ({len(positions_um)}, 6) indices into positions_um (-1 for none), got shape "
            f"{neighbors.shape}."
        )
    for slot in range(len(HEX_OFFSETS)):
        index = neighbors[:, slot].astype(np.int64)
        valid = (index >= 0) & (index < len(positions_um))
        if valid.any():
            offsets[slot] = (positions_um[index[valid]] - positions_um[valid]).mean(axis=0)
    return offsets
