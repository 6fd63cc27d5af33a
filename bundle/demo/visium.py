"""Visium measurement geometry: the hexagonal spot lattice, barcodes of array positions, and the compartment fractions
inside each spot disk."""

from __future__ import annotations

import math

import numpy as np

from bundle.demo.compartments import COMPARTMENTS
from bundle.geometry import VISIUM_PITCH_UM, VISIUM_SPOT_DIAMETER_UM


def visium_spot_lattice(
    height_um: float,
    width_um: float,
    origin_um: tuple[float, float] = (40.0, 40.0),
    array_offset: tuple[int, int] = (0, 0),
    pitch_um: float = VISIUM_PITCH_UM,
    margin_um: float | None = None,
) -> dict[str, np.ndarray]:
    """Centres of the Visium hexagonal spot lattice covering a rectangle.

    Spots sit on rows ``array_row`` spaced ``pitch * sqrt(3) / 2`` apart in y; within a row, ``array_col`` steps by
    2 per ``pitch`` in x (so one ``array_col`` unit is ``pitch / 2``), and ``array_row + array_col`` is even on every
    spot, as on a Visium capture area.

    Args:
        height_um: height of the rectangle in micrometres.
        width_um: width of the rectangle in micrometres.
        origin_um: (y, x) centre of the spot at local array position (0, 0), in micrometres from the top-left corner.
        array_offset: even (row, col) numbers added to the array indices, as if the rectangle were part of a larger
            capture area.
        pitch_um: centre-to-centre distance of neighbouring spots. Defaults to 100 um.
        margin_um: keep spots whose centre lies at least this far inside the rectangle. Defaults to the smaller
            origin coordinate.

    Returns:
        ``{"array_row", "array_col"}`` (int64) and ``{"y_um", "x_um"}`` (float64) arrays, row-major order.
    """
    if height_um <= 0 or width_um <= 0:
        raise ValueError(f"height_um and width_um must be positive, got {height_um} and {width_um}.")
    if array_offset[0] % 2 or array_offset[1] % 2:
        raise ValueError(f"array_offset must hold even numbers to keep array_row + array_col even, got {array_offset}.")
    oy, ox = origin_um
    margin = min(oy, ox) if margin_um is None else margin_um
    row_step = pitch_um * math.sqrt(3.0) / 2.0
    col_step = pitch_um / 2.0
    rows = np.arange(0, int(math.floor((height_um - margin - oy) / row_step)) + 1)
    cols = np.arange(0, int(math.floor((width_um - margin - ox) / col_step)) + 1)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    keep = (rr + cc) % 2 == 0
    rr, cc = rr[keep], cc[keep]
    y = oy + rr * row_step
    x = ox + cc * col_step
    inside = (y >= margin) & (y <= height_um - margin) & (x >= margin) & (x <= width_um - margin)
    return {
        "array_row": (rr[inside] + array_offset[0]).astype(np.int64),
        "array_col": (cc[inside] + array_offset[1]).astype(np.int64),
        "y_um": y[inside].astype(np.float64),
        "x_um": x[inside].astype(np.float64),
    }


def visium_barcodes(array_row: np.ndarray, array_col: np.ndarray) -> np.ndarray:
    """Visium-style barcodes (16 bases + ``"-1"``), a fixed one-to-one function of the array position.

    As on real capture areas, the same array position gets the same barcode on every slide. The position is packed
    into 32 bits and scrambled by an invertible integer hash, so distinct positions always get distinct barcodes.

    Args:
        array_row: array rows, integers in [0, 4096).
        array_col: array columns, integers in [0, 4096).

    Returns:
        An array of ``str`` barcodes such as ``"ACGTTGCA...-1"``.
    """
    row = np.asarray(array_row, dtype=np.int64)
    col = np.asarray(array_col, dtype=np.int64)
    if row.shape != col.shape:
        raise ValueError(f"array_row and array_col must have the same shape, got {row.shape} and {col.shape}.")
    if row.size and (row.min() < 0 or col.min() < 0 or row.max() >= 4096 or col.max() >= 4096):
        raise ValueError("array_row and array_col must lie in [0, 4096) to get unique barcodes.")
    mask = np.uint64(0xFFFFFFFF)
    value = ((row << 12) | col).astype(np.uint64)
    value = (value * np.uint64(0x9E3779B1) + np.uint64(0x7F4A7C15)) & mask
    value ^= value >> np.uint64(16)
    value = (value * np.uint64(0x85EBCA6B)) & mask
    value ^= value >> np.uint64(13)
    value = (value * np.uint64(0xC2B2AE35)) & mask
    value ^= value >> np.uint64(16)
    bases = np.array(list("ACGT"))
    shifts = np.arange(30, -1, -2, dtype=np.uint64)
    digits = ((value[..., None] >> shifts) & np.uint64(3)).astype(np.int64)
    letters = bases[digits]
    return np.array(["".join(word) + "-1" for word in letters.reshape(-1, 16)], dtype=object).reshape(row.shape)


def spot_fractions(
    labels: np.ndarray, px_um: float, y_um: np.ndarray, x_um: np.ndarray, diameter_um: float = VISIUM_SPOT_DIAMETER_UM
) -> tuple[np.ndarray, np.ndarray]:
    """Compartment fractions and tissue coverage inside each spot disk, counted on the label map.

    Returns:
        ``(fractions, coverage)``: (n, len(COMPARTMENTS)) fractions of the *tissue* pixels in the disk (glass is left
        out and the rest renormalised; all zero when the disk holds no tissue), and (n,) the tissue share of the disk.
    """
    radius = diameter_um / 2.0
    n_comp = len(COMPARTMENTS)
    fractions = np.zeros((y_um.size, n_comp), dtype=np.float64)
    coverage = np.zeros(y_um.size, dtype=np.float64)
    h, w = labels.shape
    for i, (cy, cx) in enumerate(zip(y_um, x_um)):
        y0, y1 = max(int((cy - radius) / px_um) - 1, 0), min(int((cy + radius) / px_um) + 2, h)
        x0, x1 = max(int((cx - radius) / px_um) - 1, 0), min(int((cx + radius) / px_um) + 2, w)
        yy = (np.arange(y0, y1) + 0.5)[:, None] * px_um - cy
        xx = (np.arange(x0, x1) + 0.5)[None, :] * px_um - cx
        inside = labels[y0:y1, x0:x1][yy * yy + xx * xx <= radius * radius].astype(np.int64)
        counts = np.bincount(inside + 1, minlength=n_comp + 1)
        tissue = counts[1:].sum()
        coverage[i] = tissue / max(inside.size, 1)
        if tissue:
            fractions[i] = counts[1:] / tissue
    return fractions, coverage
