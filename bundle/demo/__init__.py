"""Synthetic colorectal-cancer Visium study: H&E slides plus matching 10x Space Ranger outputs.

Real Visium slides cannot be downloaded everywhere the bundle must run, so this module simulates a small
study that exercises every reader of the bundle with real file formats:

* a pyramidal, tiled, JPEG-compressed TIFF per slide at 0.25 um/px (40x), written by
  :func:`bundle.io.tiff.write_pyramidal_tiff`;
* a Space Ranger 2.x ``outs``-style folder per slide (``filtered_feature_bc_matrix.h5`` in the 10x HDF5 v3 layout,
  ``spatial/tissue_positions.csv``, ``scalefactors_json.json``, hires and lowres PNGs) that ``scanpy.read_visium``
  loads;
* a ``ground_truth.csv`` per slide with the tissue-compartment fractions inside every spot;
* ``manifest.csv`` and ``README.md`` for the whole study.

How a slide is made (:func:`simulate_slide`):

1. **Layout** (at 1 um/px): an irregular tissue outline with a glass margin on some sides and tissue running off the
   slide on others, small tears, and seven spatially coherent compartments (:data:`COMPARTMENTS`) arranged like a
   colon wall cut through a tumour: normal mucosa on one side, pericolic fat on the other, a tumour mass between them
   in desmoplastic stroma, central necrosis inside the tumour wrapped in a hypoxic rim of viable tumour cells, and
   lymphoid aggregates at the invasive front and under the mucosa.
2. **Histology** (stain densities at 1 um/px, nuclei at 0.25 um/px): haematoxylin and eosin concentration maps per
   compartment (glands with lumens, crypts with goblet cells, wavy collagen bundles, adipocyte vacuoles, amorphous
   necrosis) are upsampled to 40x, nuclei are stamped from banks of pre-drawn kernels (elongated hyperchromatic
   tumour nuclei radially oriented around gland lumens, spindle fibroblasts along the collagen, dense round
   lymphocytes, flat adipocyte nuclei, karyorrhectic debris), then converted to RGB with the Beer-Lambert law and a
   per-slide perturbation of the stain vectors. Every compartment differs in colour, nuclear density and texture scale
   at 2 um/px too (collagen bundles are 6-10 um wide), not only at full resolution.
3. **Spots**: the Visium hexagonal lattice (55 um spots, 100 um apart) over the whole slide; a spot is in tissue when
   at least ``in_tissue_min_coverage`` of its disk is tissue.
4. **Expression**: real gene symbols in compartment programmes (:data:`GENE_PROGRAMMES`) plus housekeeping and
   background genes; counts are negative-binomial (gamma-Poisson) around a library size that depends on the
   compartments in the spot times a mixture of compartment profiles weighted by the compartment fractions.

Everything is drawn from ``numpy.random.default_rng`` streams derived from ``(seed, slide_index)``, so the same seed
gives identical counts and identical pixels.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "COMPARTMENTS",
    "GENE_PROGRAMMES",
    "HOUSEKEEPING_GENES",
    "BACKGROUND_GENES",
    "SimulatedSlide",
    "demo_gene_table",
    "make_demo_dataset",
    "simulate_slide",
    "visium_barcodes",
    "visium_spot_lattice",
    "write_spaceranger_outputs",
]

COMPARTMENTS: tuple[str, ...] = ("tumour", "stroma", "immune", "adipose", "necrosis", "hypoxic_rim", "normal_mucosa")
"""Tissue compartments of the simulated colorectal-cancer sections, in label order (label ``i`` = ``COMPARTMENTS[i]``,
-1 = glass)."""

# --- gene programmes ------------------------------------------------------------------------------------------------
# Real HGNC symbols. A gene belongs to one programme only; compartments mix programmes (see _PROGRAMME_WEIGHTS).
GENE_PROGRAMMES: dict[str, tuple[str, ...]] = {
    # intestinal epithelium, shared by tumour and normal mucosa
    "epithelial": (
        "EPCAM", "KRT8", "KRT18", "KRT19", "KRT20", "CDX1", "CDX2", "CDH17", "VIL1", "ELF3", "CLDN4", "PHGR1", "TSPAN8",
    ),
    # colorectal adenocarcinoma: proliferation, stem-like / WNT targets, CEA family
    "tumour": (
        "CEACAM5", "CEACAM6", "MKI67", "TOP2A", "PCNA", "LGR5", "ASCL2", "OLFM4", "AXIN2", "MYC", "SOX9", "CCND1",
    ),
    # cancer-associated fibroblasts, extracellular matrix, vessels
    "stroma": (
        "COL1A1", "COL1A2", "COL3A1", "COL5A1", "COL6A3", "ACTA2", "TAGLN", "DCN", "LUM", "FAP", "POSTN", "SPARC",
        "FN1", "VIM", "PDGFRB", "THY1", "MMP2", "CTHRC1", "INHBA", "SFRP2", "PECAM1", "VWF", "CDH5", "PLVAP",
    ),
    # lymphoid aggregates: T cells, B cells, plasma cells, some myeloid cells
    "immune": (
        "PTPRC", "CD3E", "CD3D", "CD2", "CD8A", "CD4", "GZMB", "NKG7", "CCL5", "IL7R", "MS4A1", "CD19", "CD79A",
        "CD79B", "CR2", "CXCL13", "IGKC", "IGHG1", "IGHA1", "JCHAIN", "MZB1", "CD74", "HLA-DRA", "LYZ", "CD68",
        "CD163", "C1QA",
    ),
    # pericolic adipose tissue
    "adipose": ("ADIPOQ", "PLIN1", "PLIN4", "FABP4", "LEP", "LPL", "CD36", "CFD", "CIDEA", "RBP4", "GPD1", "PPARG"),
    # necrosis: little RNA, stress response, neutrophil debris
    "necrosis": ("HSPA1A", "HSPA1B", "DDIT3", "ATF3", "FOS", "JUN", "S100A8", "S100A9", "MT2A", "MT1X", "HMOX1"),
    # hypoxia response of viable tumour next to necrosis (HIF1A targets)
    "hypoxia": (
        "CA9", "VEGFA", "SLC2A1", "LDHA", "BNIP3", "NDRG1", "PGK1", "ADM", "ANGPTL4", "P4HA1", "ENO1", "ERO1A",
        "EGLN3", "PDK1",
    ),
    # normal colonic mucosa: goblet cells and colonocytes
    "mucosa": (
        "MUC2", "TFF3", "CA1", "CA2", "CA4", "SLC26A3", "GUCA2A", "GUCA2B", "AQP8", "CLCA1", "FCGBP", "ZG16", "SPINK4",
        "CEACAM7", "MS4A12", "CLCA4",
    ),
}  # fmt: skip

HOUSEKEEPING_GENES: tuple[str, ...] = (
    "ACTB", "GAPDH", "B2M", "RPLP0", "EEF1A1", "TPT1", "RPS18", "RPL13A", "RPS27A", "RPL32", "PPIA", "HPRT1", "TBP",
    "UBC", "YWHAZ", "TMSB4X", "FTL", "FTH1", "MALAT1", "MT-CO1", "MT-CO2", "MT-CO3", "MT-ND1", "MT-ATP6", "MT-CYB",
)  # fmt: skip
"""Genes expressed at a high, compartment-independent level."""

BACKGROUND_GENES: tuple[str, ...] = (
    "TP53", "PTEN", "RB1", "BRCA1", "BRCA2", "ATM", "MDM2", "CDKN1A", "CDKN1B", "CDK4", "CDK6", "GSK3B", "CTNNB1",
    "APC", "KRAS", "NRAS", "BRAF", "PIK3CA", "AKT1", "MTOR", "MAPK1", "MAPK3", "EGFR", "ERBB2", "SMAD3", "SMAD4",
    "TGFB1", "TGFBR2", "NOTCH1", "STAT3", "ATP5F1A", "ATP5F1B", "NDUFA4", "COX4I1", "COX7C", "UQCRH", "SDHA", "SDHB",
    "CS", "IDH1", "IDH2", "MDH1", "MDH2", "SLC25A3", "TFRC", "SRSF1", "SRSF2", "SRSF3", "HNRNPA1", "HNRNPK", "SNRPB",
    "POLR2A", "SF3B1", "DDX5", "HSP90AA1", "HSP90AB1", "HSPA8", "CCT2", "PSMA1", "PSMB1", "UBB", "UBE2D3", "EIF4A1",
    "EIF4G1", "EEF2", "PABPC1", "NPM1", "NCL", "TUBA1B", "TUBB", "ACTG1", "MYL6", "CFL1", "PFN1", "CALM1", "CALM2",
    "SOD1", "PRDX1", "TXN", "PARK7", "ARF1", "RAB7A", "RHOA", "RAC1", "CDC42", "GNAS", "SEC61B", "CANX", "CALR",
    "PDIA3",
)  # fmt: skip
"""Real, broadly expressed genes given random levels with no compartment pattern ("noise" genes)."""

# Programme weight of each compartment: how strongly it expresses each programme (1 = the programme's home).
_PROGRAMME_WEIGHTS: dict[str, dict[str, float]] = {
    "tumour": {"epithelial": 1.0, "tumour": 1.0, "stroma": 0.08, "immune": 0.03},
    "stroma": {"stroma": 1.0, "immune": 0.06, "adipose": 0.02},
    "immune": {"immune": 1.0, "stroma": 0.08},
    "adipose": {"adipose": 1.0, "stroma": 0.15, "immune": 0.02},
    "necrosis": {"necrosis": 1.0, "epithelial": 0.10, "tumour": 0.05, "hypoxia": 0.15, "immune": 0.05},
    "hypoxic_rim": {"epithelial": 0.8, "tumour": 0.6, "hypoxia": 1.0, "necrosis": 0.12, "stroma": 0.04},
    "normal_mucosa": {"epithelial": 1.0, "mucosa": 1.0, "immune": 0.12, "stroma": 0.05},
}
# Mean UMI count within the panel for a spot fully covered by one compartment.
_LIBRARY_SIZES: dict[str, float] = {
    "tumour": 6000.0,
    "stroma": 3000.0,
    "immune": 5000.0,
    "adipose": 1200.0,
    "necrosis": 500.0,
    "hypoxic_rim": 4500.0,
    "normal_mucosa": 5000.0,
}

# --- histology tables ------------------------------------------------------------------------------------------------
# Beer-Lambert stain vectors (optical density per unit concentration, R, G, B), close to Macenko estimates on
# colorectal TCGA tiles; perturbed per slide.
_HAEMATOXYLIN_OD = (0.52, 0.76, 0.39)
_EOSIN_OD = (0.27, 0.84, 0.47)
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

_SPOT_DIAMETER_UM = 55.0
_SPOT_PITCH_UM = 100.0
_FIDUCIAL_DIAMETER_UM = 89.4  # Space Ranger reports fiducials ~1.625x the spot diameter
_GLASS = -1


# =====================================================================================================================
# public data structures
# =====================================================================================================================
@dataclass
class SimulatedSlide:
    """One simulated section: the H&E image, its ground truth and its Visium measurement.

    Attributes:
        image: level-0 RGB pixels, (H, W, 3) uint8, at ``mpp`` um/px.
        mpp: level-0 pixel size in micrometres.
        labels: compartment label map, (h, w) int8 at ``label_mpp`` um/px; ``i`` = ``COMPARTMENTS[i]``, -1 = glass.
        label_mpp: pixel size of ``labels`` in micrometres.
        spots: per-spot columns for *all* lattice spots over the slide: ``barcode`` (str), ``x``, ``y`` (level-0
            pixel column and row of the centre, int), ``array_row``, ``array_col``, ``in_tissue`` (0/1) and
            ``tissue_coverage`` (share of the spot disk on tissue).
        fractions: (num_spots, len(COMPARTMENTS)) compartment fractions of the tissue inside each spot disk (rows sum
            to 1 where the disk touches tissue, 0 elsewhere).
        counts: (num_in_tissue_spots, num_genes) int32 UMI counts, rows in the order of the in-tissue spots.
        gene_ids: synthetic Ensembl-style ids, one per gene.
        gene_names: gene symbols.
        metadata: seed, slide index and generation parameters.
    """

    image: np.ndarray
    mpp: float
    labels: np.ndarray
    label_mpp: float
    spots: dict[str, np.ndarray]
    fractions: np.ndarray
    counts: np.ndarray
    gene_ids: list[str]
    gene_names: list[str]
    metadata: dict = field(default_factory=dict)

    @property
    def in_tissue(self) -> np.ndarray:
        """Boolean mask over ``spots`` of the spots that are in tissue (the rows of ``counts``)."""
        return self.spots["in_tissue"].astype(bool)


def demo_gene_table() -> tuple[list[str], list[str], list[str]]:
    """The simulator's gene panel.

    Returns:
        ``(gene_ids, gene_names, gene_programme)``: synthetic but well-formed Ensembl ids (``ENSG99...``, a range
        that no real Ensembl gene uses), real HGNC symbols, and each gene's programme name (a key of
        :data:`GENE_PROGRAMMES`, ``"housekeeping"`` or ``"background"``).
    """
    names: list[str] = []
    programmes: list[str] = []
    for programme, genes in GENE_PROGRAMMES.items():
        names.extend(genes)
        programmes.extend([programme] * len(genes))
    names.extend(HOUSEKEEPING_GENES)
    programmes.extend(["housekeeping"] * len(HOUSEKEEPING_GENES))
    names.extend(BACKGROUND_GENES)
    programmes.extend(["background"] * len(BACKGROUND_GENES))
    if len(set(names)) != len(names):
        duplicated = sorted({n for n in names if names.count(n) > 1})
        raise RuntimeError(f"gene tables list these symbols more than once: {duplicated}; each gene needs one home.")
    ids = [f"ENSG99{index:09d}" for index in range(len(names))]
    return ids, names, programmes


# =====================================================================================================================
# Visium geometry
# =====================================================================================================================
def visium_spot_lattice(
    height_um: float,
    width_um: float,
    origin_um: tuple[float, float] = (40.0, 40.0),
    array_offset: tuple[int, int] = (0, 0),
    pitch_um: float = _SPOT_PITCH_UM,
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


# =====================================================================================================================
# random fields and small geometry helpers
# =====================================================================================================================
def _resize_float(array: np.ndarray, size_hw: tuple[int, int], resample: str = "bilinear") -> np.ndarray:
    """Resize a 2-D float32 array with Pillow (fast, pixel-centre aligned)."""
    from PIL import Image

    method = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[resample]
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F")
    return np.array(image.resize((int(size_hw[1]), int(size_hw[0])), method), dtype=np.float32)


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Smooth Gaussian random field with zero mean, unit standard deviation and correlation length ~``scale_px``."""
    from scipy import ndimage

    h, w = shape
    step = max(scale_px / 2.0, 1.0)
    ch, cw = int(math.ceil(h / step)) + 3, int(math.ceil(w / step)) + 3
    coarse = ndimage.gaussian_filter(rng.standard_normal((ch, cw), dtype=np.float32), 1.0, mode="wrap")
    coarse -= coarse.mean()
    coarse /= coarse.std() + 1e-6  # normalised on the coarse grid: interpolation keeps mean and spread
    if step > 1.0:
        return _resize_float(coarse, (int(round(ch * step)), int(round(cw * step))), "bicubic")[:h, :w]
    return np.ascontiguousarray(coarse[:h, :w])


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _jittered_grid(
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


def _lookup(grid: np.ndarray, y_um: np.ndarray, x_um: np.ndarray, px_um: float) -> np.ndarray:
    """Values of a map at 1-um-grid positions given in micrometres (nearest pixel)."""
    iy = np.clip((y_um / px_um).astype(np.int64), 0, grid.shape[0] - 1)
    ix = np.clip((x_um / px_um).astype(np.int64), 0, grid.shape[1] - 1)
    return grid[iy, ix]


def _stamp_disks(
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


# =====================================================================================================================
# 1. layout
# =====================================================================================================================
@dataclass
class _Layout:
    labels: np.ndarray  # int8 (h, w), -1 glass
    alpha: np.ndarray  # float32 (h, w), soft tissue mask
    px_um: float
    nearest: np.ndarray  # int32 (h, w) id of the nearest structure seed
    seeds: dict[str, np.ndarray]  # per seed: y, x, radius (um), lumen (rho), aspect, angle, kind, dirty
    # kind: 0 tumour gland, 1 mucosal crypt, 2 adipocyte, 3 the far-away placeholder
    rho: np.ndarray  # float32 (h, w) distance to the nearest seed / its radius (+ outline noise)
    membrane: np.ndarray  # float32 (h, w) adipocyte membrane strength (0-1)


def _simulate_layout(
    rng: np.random.Generator, shape: tuple[int, int], px_um: float, region_um: float = 4.0, voronoi_um: float = 2.0
) -> _Layout:
    """Draw the tissue outline, the compartment label map and the gland/crypt/adipocyte seeds.

    Region-scale fields (outline, compartments, distances) are computed on a ``region_um`` grid and upsampled with
    soft (bilinear) boundaries; the nearest-seed partition on a ``voronoi_um`` grid; everything else at ``px_um``.
    """
    from scipy import ndimage

    h, w = shape
    h_um, w_um = h * px_um, w * px_um
    cf = max(1, int(round(region_um / px_um)))
    ch, cw = -(-h // cf), -(-w // cf)
    cpx = cf * px_um
    y = ((np.arange(ch, dtype=np.float32) + 0.5) * cpx)[:, None]
    x = ((np.arange(cw, dtype=np.float32) + 0.5) * cpx)[None, :]

    def noise(scale_um: float) -> np.ndarray:
        return _noise(rng, (ch, cw), scale_um / cpx)

    def edt_um(mask: np.ndarray) -> np.ndarray:
        return ndimage.distance_transform_edt(mask).astype(np.float32) * cpx

    # --- tissue outline: glass margins on 2-3 sides, tissue running off the slide on the others ---------------------
    touching = rng.permutation(4)[: int(rng.integers(1, 3))]
    margins = rng.uniform(70.0, 200.0, 4)
    margins[touching] = -150.0
    edge_distance = np.minimum(
        np.minimum(y - margins[0], h_um - y - margins[1]), np.minimum(x - margins[2], w_um - x - margins[3])
    )
    signed = edge_distance + 55.0 * noise(300.0) + 15.0 * noise(60.0)
    signed = np.minimum(signed, (2.6 - noise(45.0)) * 25.0)  # a few small tears (about 1% of the section)
    tissue = signed > 0

    # --- compartments: a colon wall through a tumour ------------------------------------------------------------------
    angle = rng.uniform(0.0, 2.0 * math.pi)
    axis = (x - w_um / 2) * math.cos(angle) + (y - h_um / 2) * math.sin(angle)
    lo, hi = (float(v) for v in np.quantile(axis[tissue], [0.0, 1.0])) if tissue.any() else (0.0, 1.0)
    wall = (axis - lo) / max(hi - lo, 1e-6) + 0.08 * noise(250.0) + 0.03 * noise(60.0)
    mucosa = tissue & (wall < rng.uniform(0.16, 0.24))
    adipose = tissue & (wall > 1.0 - rng.uniform(0.14, 0.2))
    middle = tissue & ~mucosa & ~adipose
    # a tumour mass in the middle band, with an irregular invasive front
    along = rng.uniform(0.42, 0.58) * (hi - lo) + lo
    across = rng.uniform(-0.15, 0.15) * min(h_um, w_um)
    cy_t = h_um / 2 + along * math.sin(angle) + across * math.cos(angle)
    cx_t = w_um / 2 + along * math.cos(angle) - across * math.sin(angle)
    radial = np.sqrt((y - cy_t) ** 2 + (x - cx_t) ** 2) / (0.5 * math.hypot(h_um, w_um))
    tumour_field = -radial + 0.25 * noise(220.0) + 0.08 * noise(60.0)
    tumour = middle & (tumour_field > _quantile(tumour_field, middle, 1.0 - rng.uniform(0.5, 0.62)))
    # central necrosis wrapped in a hypoxic rim of viable tumour
    depth = edt_um(tumour)
    necrosis_field = noise(110.0) + depth / 120.0
    deep = tumour & (depth > min(80.0, 0.5 * float(depth.max())))
    necrosis = deep & (necrosis_field > _quantile(necrosis_field, deep, 1.0 - rng.uniform(0.25, 0.35)))
    hypoxic = tumour & ~necrosis & (edt_um(~necrosis) + 10.0 * noise(40.0) < rng.uniform(50.0, 70.0))
    stroma = middle & ~tumour
    # lymphoid aggregates at the invasive front and beneath the mucosa
    to_tumour = edt_um(~tumour)
    front = stroma & (to_tumour > 30.0) & (to_tumour < 260.0)
    base = stroma & (edt_um(~mucosa) < 150.0) if mucosa.any() else front
    area_mm2 = float(tissue.sum()) * cpx * cpx / 1e6
    blob_noise = noise(35.0)
    immune = np.zeros((ch, cw), dtype=bool)
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

    region = np.full((ch, cw), _GLASS, dtype=np.int8)
    for name, mask in (("stroma", stroma), ("normal_mucosa", mucosa), ("adipose", adipose), ("tumour", tumour),
                       ("necrosis", necrosis), ("hypoxic_rim", hypoxic), ("immune", immune)):  # fmt: skip
        region[mask] = COMPARTMENTS.index(name)
    # nearest tissue label under the glass, so that soft edges never invent a compartment
    glass_index = ndimage.distance_transform_edt(region == _GLASS, return_distances=False, return_indices=True)
    region_filled = region[glass_index[0], glass_index[1]] if tissue.any() else np.zeros_like(region)

    # --- to the layout grid: bilinear soft boundaries, ragged tissue edge --------------------------------------------
    up = (ch * cf, cw * cf)
    signed_fine = _resize_float(signed, up)[:h, :w] + 4.0 * _noise(rng, shape, 12.0 / px_um)
    alpha = np.clip(signed_fine / 3.0 + 0.5, 0.0, 1.0).astype(np.float32)
    best = np.full(shape, -1.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.int8)
    for index in np.unique(region_filled):
        soft = _resize_float(ndimage.gaussian_filter((region_filled == index).astype(np.float32), 1.0), up)[:h, :w]
        better = soft > best
        labels[better] = index
        np.maximum(best, soft, out=best)
    labels[alpha <= 0.5] = _GLASS
    del best, signed_fine

    # --- structure seeds: tumour glands, mucosal crypts, adipocytes ---------------------------------------------------
    seed_sets = []
    for kind, label, spacing, jitter, radius_share, lumen, aspect in (
        (0, "tumour", rng.uniform(95.0, 120.0), 0.3, (0.5, 0.62), (0.25, 0.55), (1.0, 1.9)),
        (1, "normal_mucosa", rng.uniform(58.0, 68.0), 0.12, (0.40, 0.44), (0.18, 0.24), (1.0, 1.15)),
        (2, "adipose", rng.uniform(62.0, 80.0), 0.38, (1.0, 1.0), (0.0, 0.0), (1.0, 1.0)),
    ):
        sy, sx = _jittered_grid(rng, h_um, w_um, spacing, jitter)
        keep = _lookup(labels, sy, sx, px_um) == COMPARTMENTS.index(label)
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
    # a far-away dummy seed keeps the code uniform on slides without structures
    for key, value in dict(y=-1e6, x=-1e6, radius=1.0, lumen=0.0, aspect=1.0, angle=0.0, kind=3, dirty=False).items():
        seeds[key] = np.append(seeds[key], np.asarray(value, dtype=seeds[key].dtype))
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
    # look the partition up through a slightly warped grid so that cell walls are wavy, not straight
    wy = np.arange(h, dtype=np.float32)[:, None] + (2.5 / px_um) * _noise(rng, shape, 15.0 / px_um)
    wx = np.arange(w, dtype=np.float32)[None, :] + (2.5 / px_um) * _noise(rng, shape, 15.0 / px_um)
    nearest = ids[np.clip((wy / vf).astype(np.int64), 0, vh - 1), np.clip((wx / vf).astype(np.int64), 0, vw - 1)]
    del wy, wx, ids, free
    ym = ((np.arange(h, dtype=np.float32) + 0.5) * px_um)[:, None]
    xm = ((np.arange(w, dtype=np.float32) + 0.5) * px_um)[None, :]
    dy = ym - seeds["y"].astype(np.float32)[nearest]
    dx = xm - seeds["x"].astype(np.float32)[nearest]
    cos_a = np.cos(seeds["angle"]).astype(np.float32)[nearest]
    sin_a = np.sin(seeds["angle"]).astype(np.float32)[nearest]
    u = (dx * cos_a + dy * sin_a) / seeds["aspect"].astype(np.float32)[nearest]
    v = -dx * sin_a + dy * cos_a
    rho = np.sqrt(u * u + v * v) / seeds["radius"].astype(np.float32)[nearest]
    rho += 0.12 * _noise(rng, shape, 22.0 / px_um)
    del dy, dx, cos_a, sin_a, u, v
    boundary = np.zeros(shape, dtype=np.float32)
    boundary[:, 1:] += nearest[:, 1:] != nearest[:, :-1]
    boundary[1:, :] += nearest[1:, :] != nearest[:-1, :]
    membrane = np.clip(ndimage.gaussian_filter(boundary, 1.0 / px_um) * 2.4, 0.0, 1.0)
    return _Layout(labels, alpha, px_um, nearest, seeds, rho.astype(np.float32), membrane.astype(np.float32))


def _quantile(values: np.ndarray, mask: np.ndarray, q: float) -> float:
    """The ``q`` quantile of ``values`` where ``mask`` is set (``+inf`` if the mask is empty)."""
    selected = values[mask]
    return float(np.quantile(selected, q)) if selected.size else float("inf")


# =====================================================================================================================
# 2. histology
# =====================================================================================================================
def _nucleus_bank(rng: np.random.Generator, mpp: float) -> dict[str, tuple[list[np.ndarray], int, int]]:
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


def _stamp_nuclei(
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


def _render_histology(
    rng: np.random.Generator, layout: _Layout, mpp: float, factor: int, stain_jitter: float = 1.0
) -> tuple[np.ndarray, int]:
    """Paint the H&E image of a layout: stain maps at ``layout.px_um``, nuclei and colour at ``mpp``.

    Args:
        rng: random stream of the slide's image.
        layout: the slide's layout.
        mpp: output pixel size (um/px).
        factor: output pixels per layout pixel along each axis.
        stain_jitter: scale of the per-slide stain-colour variation (0 disables it).

    Returns:
        The (H, W, 3) uint8 RGB image (``H = factor * layout height``) and the number of nuclei drawn.
    """
    from scipy import ndimage

    px = layout.px_um
    labels = layout.labels
    shape = labels.shape
    h, w = shape
    h_um, w_um = h * px, w * px
    C = {name: i for i, name in enumerate(COMPARTMENTS)}
    seeds = layout.seeds
    kind = seeds["kind"][layout.nearest]
    lumen = seeds["lumen"][layout.nearest].astype(np.float32)
    dirty = seeds["dirty"][layout.nearest]
    rho = layout.rho

    def noise(scale_um: float) -> np.ndarray:
        return _noise(rng, shape, scale_um / px)

    # --- collagen: wavy bundles 6-10 um wide, iso-lines of a warped phase ---------------------------------------------
    y = ((np.arange(h, dtype=np.float32) + 0.5) * px)[:, None]
    x = ((np.arange(w, dtype=np.float32) + 0.5) * px)[None, :]
    theta0 = rng.uniform(0, math.pi)
    period = rng.uniform(20.0, 26.0)
    phase = (x * math.cos(theta0) + y * math.sin(theta0)) / period + 4.0 * noise(200.0) + 1.0 * noise(50.0)
    phase += 0.25 * noise(15.0)
    bundles = _smoothstep(0.0, 0.6, np.cos(2.0 * math.pi * phase))  # ~40% of the period: 8-10 um bundles
    segments = _smoothstep(-0.5, 0.4, noise(35.0))  # bundles break up and end
    fibres = bundles * segments * np.clip(0.8 + 0.35 * noise(90.0), 0.25, 1.0)
    del bundles, segments
    grad_y, grad_x = np.gradient(phase)
    fibre_angle = np.arctan2(grad_y, grad_x) + math.pi / 2  # bundles run along the iso-phase lines
    del grad_x, grad_y

    haem = np.zeros(shape, dtype=np.float32)
    eosin = np.zeros(shape, dtype=np.float32)

    def paint(mask: np.ndarray, h_value, e_value) -> None:
        haem[mask] = h_value[mask] if isinstance(h_value, np.ndarray) else h_value
        eosin[mask] = e_value[mask] if isinstance(e_value, np.ndarray) else e_value

    grain = noise(3.0)
    # stroma: pink collagen, paler clefts, a few vessels with red cells
    stroma_e = 0.24 + 0.34 * fibres + 0.05 * noise(7.0) + 0.02 * grain
    paint(labels == C["stroma"], np.float32(0.05) + 0.01 * grain, stroma_e)
    # tumour: glands (lumen, crowded epithelium) in thin desmoplastic stroma
    in_gland = kind == 0
    lumen_w = np.where(in_gland, 1.0 - _smoothstep(lumen - 0.04, lumen + 0.04, rho), 0.0)
    stroma_w = np.where(in_gland, _smoothstep(0.95, 1.05, rho), 1.0)
    epi_w = 1.0 - lumen_w - stroma_w
    debris_tex = np.clip(0.6 + 0.5 * noise(6.0), 0.0, None)
    tumour_h = epi_w * (0.2 + 0.03 * grain) + stroma_w * 0.05 + lumen_w * (0.02 + 0.06 * dirty * debris_tex)
    tumour_e = (
        epi_w * (0.3 + 0.04 * grain) + stroma_w * (0.26 + 0.3 * fibres) + lumen_w * (0.03 + 0.3 * dirty * debris_tex)
    )
    paint(labels == C["tumour"], tumour_h, tumour_e)
    # hypoxic rim: solid sheets of tumour cells with more eosinophilic cytoplasm
    sheet = noise(9.0)
    paint(labels == C["hypoxic_rim"], 0.19 + 0.03 * sheet, 0.40 + 0.05 * sheet + 0.03 * grain)
    # necrosis: pale, patchy, amorphous eosinophilic material with basophilic dust and clefts
    patch = noise(25.0)
    clefts = _smoothstep(1.3, 1.9, noise(14.0))
    necrosis_e = (0.36 + 0.09 * patch + 0.08 * noise(6.0)) * (1.0 - 0.75 * clefts)
    necrosis_h = (0.11 + 0.05 * noise(4.0)) * (1.0 - 0.75 * clefts)
    paint(labels == C["necrosis"], necrosis_h, necrosis_e)
    # immune aggregates: little matrix between densely packed lymphocytes
    paint(labels == C["immune"], np.float32(0.11) + 0.02 * grain, 0.17 + 0.03 * grain)
    # adipose: empty vacuoles with thin pink membranes
    paint(labels == C["adipose"], 0.006 + 0.06 * layout.membrane, 0.012 + 0.62 * layout.membrane)
    # normal mucosa: round crypts (goblet cells, small lumen) in a cellular lamina propria
    in_crypt = kind == 1
    crypt_lumen = np.where(in_crypt, 1.0 - _smoothstep(lumen - 0.04, lumen + 0.04, rho), 0.0)
    lamina = np.where(in_crypt, _smoothstep(0.95, 1.05, rho), 1.0)
    crypt_epi = 1.0 - crypt_lumen - lamina
    goblet = np.zeros(shape, dtype=np.float32)
    gy, gx = _jittered_grid(rng, h_um, w_um, 7.0, 0.3)
    g_rho = _lookup(rho, gy, gx, px)
    g_keep = (
        (_lookup(labels, gy, gx, px) == C["normal_mucosa"])
        & (_lookup(kind, gy, gx, px) == 1)
        & (g_rho > _lookup(lumen, gy, gx, px) + 0.12)
        & (g_rho < 0.76)
        & (rng.random(gy.size) < 0.85)
    )
    gy, gx = gy[g_keep], gx[g_keep]
    _stamp_disks(goblet, gy / px, gx / px, rng.uniform(2.8, 3.8, gy.size) / px, 1.0)
    goblet *= crypt_epi
    mucosa_h = crypt_epi * (0.1 + 0.02 * grain) + lamina * (0.1 + 0.03 * noise(6.0)) + crypt_lumen * 0.05
    mucosa_e = crypt_epi * (0.27 + 0.03 * grain) + lamina * (0.27 + 0.05 * noise(8.0)) + crypt_lumen * 0.04
    mucosa_h = mucosa_h * (1.0 - goblet) + goblet * 0.15
    mucosa_e = mucosa_e * (1.0 - goblet) + goblet * 0.06
    paint(labels == C["normal_mucosa"], mucosa_h, mucosa_e)
    del lumen_w, stroma_w, epi_w, tumour_h, tumour_e, crypt_lumen, lamina, crypt_epi, mucosa_h, mucosa_e, stroma_e

    # vessels with red blood cells in the stroma
    vy, vx = _jittered_grid(rng, h_um, w_um, 140.0, 0.45)
    v_keep = (_lookup(labels, vy, vx, px) == C["stroma"]) & (rng.random(vy.size) < 0.6)
    vy, vx = vy[v_keep], vx[v_keep]
    vessels = np.zeros(shape, dtype=np.float32)
    _stamp_disks(vessels, vy / px, vx / px, rng.uniform(4.0, 10.0, vy.size) / px, 1.0)
    eosin = eosin * (1.0 - vessels) + vessels * 1.05
    haem = haem * (1.0 - vessels) + vessels * 0.02

    # soften the 1-um steps of compartment boundaries (finer than any texture drawn above), then the tissue edge
    haem = ndimage.gaussian_filter(haem, 0.7 / px) * layout.alpha
    eosin = ndimage.gaussian_filter(eosin, 0.7 / px) * layout.alpha

    # --- nuclei -------------------------------------------------------------------------------------------------------
    def sites(
        spacing: float, where: Callable[[np.ndarray, np.ndarray], np.ndarray], keep: float, jitter: float = 0.4
    ) -> tuple[np.ndarray, np.ndarray]:
        sy, sx = _jittered_grid(rng, h_um, w_um, spacing, jitter)
        selected = where(sy, sx) & (rng.random(sy.size) < keep)
        return sy[selected], sx[selected]

    def at(grid: np.ndarray, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
        return _lookup(grid, sy, sx, px)

    def radial(sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
        index = at(layout.nearest, sy, sx)
        return np.arctan2(sy - seeds["y"][index], sx - seeds["x"][index])

    nuclei: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    is_label = {name: (lambda sy, sx, i=i: at(labels, sy, sx) == i) for name, i in C.items()}

    def add(kind_name: str, sy: np.ndarray, sx: np.ndarray, angle: np.ndarray | None = None) -> None:
        angle = rng.uniform(0, math.pi, sy.size) if angle is None else angle
        nuclei.append((kind_name, sy, sx, angle))

    # tumour: pseudostratified, crowded, radially elongated nuclei in the basal two thirds of the epithelium
    def tumour_epithelium(sy, sx):
        r, lum = at(rho, sy, sx), at(lumen, sy, sx)
        return is_label["tumour"](sy, sx) & (at(kind, sy, sx) == 0) & (r > lum + 0.3 * (1 - lum)) & (r < 0.97)

    sy, sx = sites(5.6, tumour_epithelium, 0.9)
    add("tumour", sy, sx, radial(sy, sx))

    def tumour_stroma(sy, sx):
        return is_label["tumour"](sy, sx) & ((at(kind, sy, sx) != 0) | (at(rho, sy, sx) > 1.06))

    sy, sx = sites(15.0, tumour_stroma, 0.55)
    add("fibroblast", sy, sx, at(fibre_angle, sy, sx))
    sy, sx = sites(15.0, tumour_stroma, 0.25)
    add("lymphocyte", sy, sx)
    sy, sx = sites(
        9.0,
        lambda sy, sx: is_label["tumour"](sy, sx) & at(dirty, sy, sx) & (at(rho, sy, sx) < at(lumen, sy, sx) - 0.05),
        0.5,
    )
    add("debris", sy, sx)
    # hypoxic rim: sheets of rounder, pleomorphic nuclei, some pyknotic
    sy, sx = sites(10.0, is_label["hypoxic_rim"], 0.95)
    pyknotic = rng.random(sy.size) < 0.14
    add("hypoxic", sy[~pyknotic], sx[~pyknotic])
    add("pyknotic", sy[pyknotic], sx[pyknotic])
    # necrosis: karyorrhectic debris and ghost nuclei
    sy, sx = sites(9.0, is_label["necrosis"], 0.55)
    add("debris", sy, sx)
    sy, sx = sites(13.0, is_label["necrosis"], 0.3)
    add("ghost", sy, sx)
    # stroma: sparse spindle fibroblasts along the collagen, a few lymphocytes and plasma cells
    sy, sx = sites(19.0, is_label["stroma"], 0.6)
    add("fibroblast", sy, sx, at(fibre_angle, sy, sx))
    sy, sx = sites(16.0, is_label["stroma"], 0.12)
    add("lymphocyte", sy, sx)
    sy, sx = sites(20.0, is_label["stroma"], 0.05)
    add("plasma", sy, sx)
    # immune aggregates: densely packed small round lymphocytes
    sy, sx = sites(6.0, is_label["immune"], 0.95, jitter=0.3)
    plasma = rng.random(sy.size) < 0.05
    add("lymphocyte", sy[~plasma], sx[~plasma])
    add("plasma", sy[plasma], sx[plasma])
    # adipose: a few flat nuclei pressed against the membranes
    sy, sx = sites(20.0, lambda sy, sx: is_label["adipose"](sy, sx) & (at(layout.membrane, sy, sx) > 0.45), 0.35)
    add("adipocyte", sy, sx)
    # normal mucosa: a regular row of basal nuclei in every crypt, plasma cells and lymphocytes in the lamina propria
    sy, sx = sites(
        4.0,
        lambda sy, sx: is_label["normal_mucosa"](sy, sx)
        & (at(kind, sy, sx) == 1)
        & (at(rho, sy, sx) > 0.8)
        & (at(rho, sy, sx) < 0.96),
        0.92,
        jitter=0.25,
    )
    add("mucosa", sy, sx, radial(sy, sx))
    sy, sx = sites(
        9.0,
        lambda sy, sx: is_label["normal_mucosa"](sy, sx) & ((at(kind, sy, sx) != 1) | (at(rho, sy, sx) > 1.06)),
        0.5,
    )
    cell = rng.random(sy.size)
    add("plasma", sy[cell < 0.5], sx[cell < 0.5])
    add("lymphocyte", sy[(cell >= 0.5) & (cell < 0.85)], sx[(cell >= 0.5) & (cell < 0.85)])
    add("fibroblast", sy[cell >= 0.85], sx[cell >= 0.85])
    del kind, lumen, dirty, fibre_angle, phase, fibres

    # --- to full resolution: quantised stain maps upsampled, nuclei stamped, colour by lookup table -------------------
    stains = _StainModel.draw(rng, stain_jitter)
    full = (h * factor, w * factor)
    haem_full = _resize_uint8(stains.quantise_haem(rng, haem), full)
    eosin_full = _resize_uint8(stains.quantise_eosin(rng, eosin), full)
    del haem, eosin
    bank = _nucleus_bank(rng, mpp)
    num_nuclei = 0
    for kind_name, sy, sx, angle in nuclei:
        kernels, n_orient, n_var = bank[kind_name]
        kernels8 = [stains.haem_levels(k) for k in kernels]
        orient = np.round((np.mod(angle, math.pi) / math.pi) * n_orient).astype(np.int64) % n_orient
        index = orient * n_var + rng.integers(0, n_var, sy.size)
        cy, cx = np.floor(sy / mpp).astype(np.int64), np.floor(sx / mpp).astype(np.int64)
        _stamp_nuclei(haem_full, kernels8, cy, cx, index)
        num_nuclei += sy.size
    return stains.to_rgb(rng, haem_full, eosin_full), num_nuclei


def _resize_uint8(array: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D uint8 array with Pillow."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L")
    return np.array(image.resize((int(size_hw[1]), int(size_hw[0])), Image.Resampling.BILINEAR), dtype=np.uint8)


@dataclass
class _StainModel:
    """Beer-Lambert colour model: stain concentrations quantised to 8 bits each, RGB through a 65536-entry table."""

    lut: np.ndarray  # (65536, 3) uint8, index = haem_level << 8 | eosin_level
    h_max: float = 2.4
    e_max: float = 1.6

    @classmethod
    def draw(
        cls, rng: np.random.Generator, stain_jitter: float = 1.0, h_max: float = 2.4, e_max: float = 1.6
    ) -> _StainModel:
        """Perturb the stain vectors, stain strengths and glass colour for one slide and build the table."""
        h_vec = np.asarray(_HAEMATOXYLIN_OD) + rng.normal(0.0, 0.025 * stain_jitter, 3)
        e_vec = np.asarray(_EOSIN_OD) + rng.normal(0.0, 0.025 * stain_jitter, 3)
        h_vec = h_vec / np.linalg.norm(h_vec) * (1.0 + rng.uniform(-0.12, 0.12) * stain_jitter)
        e_vec = e_vec / np.linalg.norm(e_vec) * (1.0 + rng.uniform(-0.15, 0.15) * stain_jitter)
        glass = 242.0 + rng.uniform(-4.0, 4.0) * stain_jitter + rng.normal(0.0, 1.5, 3) * stain_jitter
        levels = np.arange(256, dtype=np.float64)
        h_conc = (levels * h_max / 255.0)[:, None, None]
        e_conc = (levels * e_max / 255.0)[None, :, None]
        optical_density = h_conc * h_vec + e_conc * e_vec  # (256, 256, 3)
        lut = np.clip(np.round(np.clip(glass, 225, 252) * 10.0 ** (-optical_density)), 0, 255).astype(np.uint8)
        return cls(lut.reshape(-1, 3), h_max, e_max)

    @staticmethod
    def _quantise(rng: np.random.Generator, values: np.ndarray, maximum: float) -> np.ndarray:
        levels = values * np.float32(255.0 / maximum) + rng.random(values.shape, dtype=np.float32)  # dithered
        return np.clip(levels, 0.0, 255.0).astype(np.uint8)

    def quantise_haem(self, rng: np.random.Generator, values: np.ndarray) -> np.ndarray:
        return self._quantise(rng, values, self.h_max)

    def quantise_eosin(self, rng: np.random.Generator, values: np.ndarray) -> np.ndarray:
        return self._quantise(rng, values, self.e_max)

    def haem_levels(self, kernel: np.ndarray) -> np.ndarray:
        return np.clip(np.round(kernel * (255.0 / self.h_max)), 0, 255).astype(np.uint8)

    def to_rgb(self, rng: np.random.Generator, haem: np.ndarray, eosin: np.ndarray, grain: int = 3) -> np.ndarray:
        """RGB pixels of 8-bit stain levels, after adding a little sensor-like grain (``0..grain-1`` levels)."""
        for channel in (haem, eosin):
            noise = rng.integers(0, grain, size=(min(509, channel.shape[0]), channel.shape[1]), dtype=np.uint8)
            np.minimum(channel, 255 - grain, out=channel)
            for start in range(0, channel.shape[0], noise.shape[0]):
                block = channel[start : start + noise.shape[0]]
                block += noise[: block.shape[0]]
        index = haem.astype(np.uint16) << 8
        index |= eosin
        return self.lut[index]


# =====================================================================================================================
# 3. spots and 4. expression
# =====================================================================================================================
def _spot_fractions(
    labels: np.ndarray, px_um: float, y_um: np.ndarray, x_um: np.ndarray, diameter_um: float = _SPOT_DIAMETER_UM
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


def _expression_profiles(
    atlas_rng: np.random.Generator, slide_rng: np.random.Generator, programmes: Sequence[str], slide_variation: float
) -> np.ndarray:
    """Per-compartment expression profiles (rows sum to 1) over the demo gene panel.

    Gene levels are drawn once per dataset (``atlas_rng``); each slide multiplies them by a gene-wise log-normal
    factor (``slide_variation``), a patient/batch effect shared by all compartments of the slide.
    """
    programmes = np.asarray(programmes)
    n_genes = programmes.size
    level = np.exp(atlas_rng.normal(0.0, 0.8, n_genes))  # background genes
    housekeeping = programmes == "housekeeping"
    level[housekeeping] = np.exp(atlas_rng.normal(math.log(20.0), 0.6, housekeeping.sum()))
    is_marker = ~np.isin(programmes, ("housekeeping", "background"))
    level[is_marker] = np.exp(atlas_rng.normal(math.log(8.0), 0.5, is_marker.sum()))
    profiles = np.empty((len(COMPARTMENTS), n_genes), dtype=np.float64)
    for c, name in enumerate(COMPARTMENTS):
        weight = np.ones(n_genes)
        weights = _PROGRAMME_WEIGHTS[name]
        weight[is_marker] = [0.01 + weights.get(p, 0.0) for p in programmes[is_marker]]
        profiles[c] = level * weight
    profiles *= np.exp(slide_rng.normal(0.0, slide_variation, n_genes))[None, :]
    return profiles / profiles.sum(axis=1, keepdims=True)


def _simulate_counts(
    rng: np.random.Generator,
    fractions: np.ndarray,
    coverage: np.ndarray,
    profiles: np.ndarray,
    dispersion: float,
    library_sigma: float,
    depth: float,
) -> np.ndarray:
    """Negative-binomial (gamma-Poisson) UMI counts for spots with the given compartment fractions.

    The mean of gene ``g`` in a spot is ``depth * coverage * s * sum_c f_c L_c p_cg`` with ``L_c`` the library size of
    compartment ``c`` (RNA-rich compartments dominate mixed spots), ``p_c`` its profile and ``s`` a per-spot
    log-normal capture efficiency; the variance is ``mean + dispersion * mean**2``.
    """
    library = np.array([_LIBRARY_SIZES[name] for name in COMPARTMENTS])
    efficiency = np.exp(rng.normal(-0.5 * library_sigma**2, library_sigma, fractions.shape[0]))
    mean = (fractions * library) @ profiles
    mean *= (depth * np.clip(coverage, 0.05, 1.0) * efficiency)[:, None]
    rate = rng.gamma(1.0 / dispersion, mean * dispersion)
    return rng.poisson(rate).astype(np.int32)


# =====================================================================================================================
# the slide
# =====================================================================================================================
def simulate_slide(
    seed: int = 0,
    slide_index: int = 0,
    size_um: float | tuple[float, float] = (1600.0, 2000.0),
    mpp: float = 0.25,
    in_tissue_min_coverage: float = 0.3,
    dispersion: float = 0.2,
    library_sigma: float = 0.25,
    slide_variation: float = 0.15,
    stain_jitter: float = 1.0,
) -> SimulatedSlide:
    """Simulate one H&E section of a colorectal tumour with its Visium measurement (nothing is written).

    Args:
        seed: dataset seed (a non-negative integer). Gene levels are shared by all slides of a seed.
        slide_index: which slide of the dataset; slides of one seed draw independent streams
            ``SeedSequence(seed, spawn_key=(1, slide_index))``.
        size_um: slide extent, one number (square) or ``(height, width)``, in micrometres. At least 400 um.
        mpp: level-0 pixel size in micrometres (0.25 = 40x). The layout is drawn at ``mpp * round(1 / mpp)`` um/px
            (1 um for 0.25), so the image size is rounded to a multiple of ``round(1 / mpp)`` pixels.
        in_tissue_min_coverage: a spot is in tissue when at least this share of its 55 um disk lies on tissue.
        dispersion: negative-binomial overdispersion ``phi`` (variance = mean + phi * mean^2).
        library_sigma: standard deviation of the per-spot log capture efficiency.
        slide_variation: standard deviation of the per-slide, per-gene log expression factor (batch effect).
        stain_jitter: scale of the per-slide stain-colour variation; 0 gives every slide the same colours.

    Returns:
        A :class:`SimulatedSlide`.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if isinstance(slide_index, bool) or not isinstance(slide_index, (int, np.integer)) or slide_index < 0:
        raise ValueError(f"slide_index must be a non-negative integer, got {slide_index!r}.")
    if not isinstance(mpp, (int, float, np.floating, np.integer)) or not 0.05 <= float(mpp) <= 2.0:
        raise ValueError(f"mpp must be a pixel size between 0.05 and 2.0 um/px (0.25 for 40x), got {mpp!r}.")
    height_um, width_um = _check_size(size_um)
    if not 0.0 < in_tissue_min_coverage <= 1.0:
        raise ValueError(f"in_tissue_min_coverage must lie in (0, 1], got {in_tissue_min_coverage}.")
    if dispersion <= 0:
        raise ValueError(f"dispersion must be positive, got {dispersion}.")

    sequence = np.random.SeedSequence(int(seed), spawn_key=(1, int(slide_index)))
    layout_rng, image_rng, spot_rng, count_rng = (np.random.default_rng(s) for s in sequence.spawn(4))
    atlas_rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(0,)))

    mpp = float(mpp)
    factor = max(1, int(round(1.0 / mpp)))
    px_um = mpp * factor
    shape = (int(round(height_um / px_um)), int(round(width_um / px_um)))
    layout = _simulate_layout(layout_rng, shape, px_um)
    image, num_nuclei = _render_histology(image_rng, layout, mpp, factor, stain_jitter)

    # Visium lattice over the whole slide; outermost spot centres 30-60 um from the edges
    origin = (float(spot_rng.uniform(30.0, 60.0)), float(spot_rng.uniform(30.0, 60.0)))
    offset = (2 * int(spot_rng.integers(0, 10)), 2 * int(spot_rng.integers(0, 20)))
    lattice = visium_spot_lattice(shape[0] * px_um, shape[1] * px_um, origin, offset, margin_um=30.0)
    x_px = np.round(lattice["x_um"] / mpp).astype(np.int64)
    y_px = np.round(lattice["y_um"] / mpp).astype(np.int64)
    fractions, coverage = _spot_fractions(layout.labels, px_um, y_px * mpp, x_px * mpp)
    in_tissue = (coverage >= in_tissue_min_coverage).astype(np.int64)
    spots = {
        "barcode": visium_barcodes(lattice["array_row"], lattice["array_col"]),
        "x": x_px,
        "y": y_px,
        "array_row": lattice["array_row"],
        "array_col": lattice["array_col"],
        "in_tissue": in_tissue,
        "tissue_coverage": coverage,
    }

    gene_ids, gene_names, programmes = demo_gene_table()
    profiles = _expression_profiles(atlas_rng, count_rng, programmes, slide_variation)
    depth = float(np.exp(count_rng.normal(0.0, 0.2)))
    keep = in_tissue.astype(bool)
    counts = _simulate_counts(count_rng, fractions[keep], coverage[keep], profiles, dispersion, library_sigma, depth)
    metadata = dict(
        seed=int(seed),
        slide_index=int(slide_index),
        size_um=(shape[0] * px_um, shape[1] * px_um),
        mpp=mpp,
        label_mpp=px_um,
        num_nuclei=int(num_nuclei),
        sequencing_depth=depth,
        in_tissue_min_coverage=in_tissue_min_coverage,
        dispersion=dispersion,
    )
    return SimulatedSlide(image, mpp, layout.labels, px_um, spots, fractions, counts, gene_ids, gene_names, metadata)


def _check_size(size_um: float | Sequence[float]) -> tuple[float, float]:
    """``(height, width)`` in micrometres from one number or a pair, checked."""
    values = (size_um, size_um) if np.isscalar(size_um) else tuple(size_um)
    if len(values) != 2:
        raise ValueError(f"size_um must be one number or a (height, width) pair in micrometres, got {size_um!r}.")
    try:
        height, width = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"size_um must be numbers in micrometres, got {size_um!r}.") from None
    if not (400.0 <= height <= 20000.0 and 400.0 <= width <= 20000.0):
        raise ValueError(
            f"size_um must lie between 400 and 20000 um per side (a few Visium spots up to a 2 cm section), "
            f"got {size_um!r}."
        )
    return height, width


# =====================================================================================================================
# writing
# =====================================================================================================================
def _atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)`` for a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    # a fresh name beside the target (same file system, so os.replace is atomic); created with the usual permissions
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_text(path: Path, text: str) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _write_10x_h5(
    path: Path, counts: np.ndarray, barcodes: Sequence[str], gene_ids: Sequence[str], gene_names: Sequence[str],
    library_id: str,
) -> Path:  # fmt: skip
    """Write a filtered feature-barcode matrix in the 10x Genomics HDF5 (v3) layout, barcodes sorted as 10x does."""
    import h5py
    from scipy import sparse

    order = np.argsort(np.asarray(barcodes, dtype=str), kind="stable")
    matrix = sparse.csr_matrix(counts[order])  # rows = barcodes: CSR of (barcodes, genes) = CSC of (genes, barcodes)
    matrix.sort_indices()

    def strings(values: Sequence[str]) -> np.ndarray:
        encoded = [str(v).encode("ascii") for v in values]
        return np.array(encoded, dtype=f"S{max([len(v) for v in encoded] + [1])}")

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["chemistry_description"] = np.array([b"Spatial 3' v1"])
            f.attrs["filetype"] = np.array([b"matrix"])
            f.attrs["library_ids"] = strings([library_id])
            f.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
            f.attrs["version"] = np.array([2], dtype=np.int64)
            f.attrs["software_version"] = "st-he-ldm demo simulator (Space Ranger 2.x output layout)"
            group = f.create_group("matrix")
            options = dict(compression="gzip", compression_opts=4, shuffle=True)
            group.create_dataset("barcodes", data=strings(np.asarray(barcodes)[order]), **options)
            group.create_dataset("data", data=matrix.data.astype(np.int32), **options)
            group.create_dataset("indices", data=matrix.indices.astype(np.int64), **options)
            group.create_dataset("indptr", data=matrix.indptr.astype(np.int64), **options)
            group.create_dataset("shape", data=np.array([counts.shape[1], counts.shape[0]], dtype=np.int32))
            features = group.create_group("features")
            features.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
            features.create_dataset("feature_type", data=strings(["Gene Expression"] * len(gene_ids)), **options)
            features.create_dataset("genome", data=strings(["GRCh38"] * len(gene_ids)), **options)
            features.create_dataset("id", data=strings(gene_ids), **options)
            features.create_dataset("name", data=strings(gene_names), **options)

    return _atomic_write(path, write)


def write_spaceranger_outputs(slide: SimulatedSlide, spaceranger_dir: str | os.PathLike, library_id: str) -> Path:
    """Write a slide's Visium measurement as a Space Ranger 2.x ``outs`` folder that ``scanpy.read_visium`` loads.

    Writes ``filtered_feature_bc_matrix.h5`` (in-tissue spots only, as Space Ranger does) and ``spatial/``:
    ``tissue_positions.csv`` (all lattice spots, Space Ranger 2.x header, pixel coordinates in the level-0 frame of the
    slide), ``scalefactors_json.json``, ``tissue_hires_image.png`` (longest side 2000 px, or the slide's own size if
    smaller) and ``tissue_lowres_image.png`` (longest side 600 px). Every file is written atomically.

    Args:
        slide: the simulated slide.
        spaceranger_dir: destination folder (created if missing).
        library_id: the library id stored in the HDF5 file (``library_ids`` attribute), e.g. the sample id.

    Returns:
        The folder written.
    """
    from PIL import Image

    out = Path(spaceranger_dir)
    spatial = out / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    spots = slide.spots
    keep = slide.in_tissue
    _write_10x_h5(
        out / "filtered_feature_bc_matrix.h5", slide.counts, spots["barcode"][keep], slide.gene_ids, slide.gene_names,
        library_id,
    )  # fmt: skip
    rows = zip(spots["barcode"], spots["in_tissue"], spots["array_row"], spots["array_col"], spots["y"], spots["x"])
    header = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
    _write_text(spatial / "tissue_positions.csv", _csv_text(header, [list(map(str, row)) for row in rows]))

    height, width = slide.image.shape[:2]
    source = Image.fromarray(slide.image)
    scales = {}
    for name, longest in (("hires", 2000), ("lowres", 600)):
        scale = min(1.0, longest / max(height, width))
        size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
        small = source if size == source.size else source.resize(size, Image.Resampling.BOX, reducing_gap=3.0)
        source = small  # the lowres image is reduced from the hires one
        _atomic_write(
            spatial / f"tissue_{name}_image.png", lambda tmp, im=small: im.save(tmp, format="PNG", compress_level=1)
        )
        scales[name] = scale
    scalefactors = {
        "spot_diameter_fullres": _SPOT_DIAMETER_UM / slide.mpp,
        "fiducial_diameter_fullres": _FIDUCIAL_DIAMETER_UM / slide.mpp,
        "tissue_hires_scalef": scales["hires"],
        "tissue_lowres_scalef": scales["lowres"],
    }
    _write_text(spatial / "scalefactors_json.json", json.dumps(scalefactors, indent=4) + "\n")
    return out


def _write_ground_truth(slide: SimulatedSlide, path: Path) -> Path:
    spots = slide.spots
    header = ["barcode", "x", "y", "array_row", "array_col", "in_tissue", "tissue_coverage", *COMPARTMENTS, "dominant"]
    rows = []
    for i in range(spots["x"].size):
        fractions = slide.fractions[i]
        dominant = COMPARTMENTS[int(np.argmax(fractions))] if fractions.sum() > 0 else "background"
        rows.append(
            [spots["barcode"][i], int(spots["x"][i]), int(spots["y"][i]), int(spots["array_row"][i]),
             int(spots["array_col"][i]), int(spots["in_tissue"][i]), f"{spots['tissue_coverage'][i]:.4f}",
             *(f"{v:.4f}" for v in fractions), dominant]
        )  # fmt: skip
    return _write_text(path, _csv_text(header, rows))


def _default_splits(num_slides: int) -> list[str]:
    """``"val"`` for the last slide and ``"train"`` for the others; a single slide is ``"train"``."""
    return ["train"] * (num_slides - 1) + ["val" if num_slides > 1 else "train"]


def make_demo_dataset(
    output_dir: str | os.PathLike = "demo_data",
    num_slides: int = 4,
    seed: int = 0,
    size_um: float | tuple[float, float] = (1600.0, 2000.0),
    mpp: float = 0.25,
    overwrite: bool = False,
    num_workers: int | None = None,
    verbose: bool = False,
) -> Path:
    """Simulate a small colorectal-cancer Visium study and write it in real file formats.

    Layout under ``output_dir`` (paths in ``manifest.csv`` are relative to its folder)::

        manifest.csv        sample_id,st_path,slide_path,mpp,split,patient (written last)
        README.md           what the data is, how it was made, licence
        <sample_id>/slide.tif                 pyramidal JPEG TIFF at ``mpp`` (bundle.io.tiff.write_pyramidal_tiff)
        <sample_id>/spaceranger/...           Space Ranger 2.x outs (see write_spaceranger_outputs)
        <sample_id>/ground_truth.csv          per spot: barcode, x, y, array_row, array_col, in_tissue,
                                              tissue_coverage, one fraction per compartment, dominant

    Sample ids are ``CRC_S01``, ``CRC_S02``, ...; each slide comes from its own patient (``P01``, ...). Split rule: the
    last slide is ``"val"`` and the others ``"train"`` (a single slide is ``"train"``). Each file is written
    atomically and ``manifest.csv`` last, so an interrupted run leaves no manifest.

    Args:
        output_dir: destination folder; created if missing.
        num_slides: number of slides (1-99).
        seed: dataset seed; the same seed gives identical counts and pixels.
        size_um: slide extent in micrometres, one number (square) or ``(height, width)``. The default
            1.6 mm x 2.0 mm slide holds about 350 lattice spots.
        mpp: level-0 pixel size in micrometres per pixel. Defaults to 0.25 (40x).
        overwrite: replace the demo files in a non-empty ``output_dir``; without it a non-empty folder is refused.
            Other files in the folder are left alone (an old manifest is deleted first).
        num_workers: slides simulated in parallel processes; ``None`` uses one per core (at most 4), 1 runs in this
            process. The files do not depend on it.
        verbose: print one line per slide.

    Returns:
        The path of the written ``manifest.csv``.

    Raises:
        FileExistsError: ``output_dir`` is not empty and ``overwrite`` is False.
        ValueError: an argument is out of range.
    """
    if isinstance(num_slides, bool) or not isinstance(num_slides, (int, np.integer)) or not 1 <= num_slides <= 99:
        raise ValueError(f"num_slides must be an integer between 1 and 99, got {num_slides!r}.")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer))
                                    or num_workers < 1):  # fmt: skip
        raise ValueError(f"num_workers must be a positive integer or None (one per core), got {num_workers!r}.")
    height_um, width_um = _check_size(size_um)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output_dir {str(out)!r} exists and is not a folder; choose another path.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            entries = sorted(p.name for p in out.iterdir())
            raise FileExistsError(
                f"output_dir {str(out)!r} is not empty (holds {len(entries)} entries, e.g. {entries[:3]}); "
                "pass overwrite=True (--overwrite) to replace the demo files in it, or choose an empty folder."
            )
        (out / "manifest.csv").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    splits = _default_splits(int(num_slides))
    jobs = [
        dict(output_dir=str(out), index=i, seed=int(seed), size_um=(height_um, width_um), mpp=float(mpp), split=split)
        for i, split in enumerate(splits)
    ]
    workers = min(_default_workers() if num_workers is None else int(num_workers), len(jobs))
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # "spawn": safe when the caller has threads or CUDA state (torch, MONAI) that a fork would copy
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_write_sample, **job) for job in jobs]
            summary = []
            for future in futures:
                summary.append(future.result())
                if verbose:
                    _print_sample(summary[-1], start)
    else:
        summary = []
        for job in jobs:
            summary.append(_write_sample(**job))
            if verbose:
                _print_sample(summary[-1], start)
    manifest_rows = [
        [s["sample_id"], f"{s['sample_id']}/spaceranger", f"{s['sample_id']}/slide.tif", f"{s['mpp']:g}", s["split"],
         s["patient"]]
        for s in summary
    ]  # fmt: skip
    genes = demo_gene_table()[1]
    readme = _readme_text(int(seed), int(num_slides), (height_um, width_um), float(mpp), summary, len(genes))
    _write_text(out / "README.md", readme)
    header = ("sample_id", "st_path", "slide_path", "mpp", "split", "patient")
    return _write_text(out / "manifest.csv", _csv_text(header, manifest_rows))


def _default_workers() -> int:
    """Worker processes used by default: one per available core, at most 4 (each needs about 1 GB)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def _write_sample(output_dir: str, index: int, seed: int, size_um: tuple[float, float], mpp: float, split: str) -> dict:
    """Simulate slide ``index`` and write its folder; returns a summary for the manifest and README."""
    from bundle.io.tiff import write_pyramidal_tiff

    sample_id, patient = f"CRC_S{index + 1:02d}", f"P{index + 1:02d}"
    started = time.perf_counter()
    slide = simulate_slide(seed, index, size_um, mpp)
    sample_dir = Path(output_dir) / sample_id
    sample_dir.mkdir(exist_ok=True)
    write_pyramidal_tiff(sample_dir / "slide.tif", slide.image, slide.mpp)
    write_spaceranger_outputs(slide, sample_dir / "spaceranger", library_id=sample_id)
    _write_ground_truth(slide, sample_dir / "ground_truth.csv")
    dominant = slide.fractions[slide.in_tissue].argmax(axis=1)
    return dict(
        sample_id=sample_id,
        patient=patient,
        split=split,
        mpp=slide.mpp,
        shape=tuple(int(v) for v in slide.image.shape[:2]),
        spots=int(slide.spots["x"].size),
        in_tissue=int(slide.in_tissue.sum()),
        dominant={COMPARTMENTS[c]: int((dominant == c).sum()) for c in range(len(COMPARTMENTS))},
        nuclei=slide.metadata["num_nuclei"],
        seconds=time.perf_counter() - started,
    )


def _print_sample(summary: dict, start: float) -> None:
    print(
        f"{summary['sample_id']} ({summary['split']}): {summary['shape'][1]}x{summary['shape'][0]} px, "
        f"{summary['in_tissue']} of {summary['spots']} spots in tissue, {summary['nuclei']} nuclei "
        f"({summary['seconds']:.1f} s; {time.perf_counter() - start:.1f} s elapsed)",
        flush=True,
    )


def _readme_text(
    seed: int, num_slides: int, size_um: tuple[float, float], mpp: float, summary: list[dict], num_genes: int
) -> str:
    rows = "\n".join(
        f"| {s['sample_id']} | {s['split']} | {s['shape'][1]} x {s['shape'][0]} | {s['spots']} | {s['in_tissue']} | "
        + ", ".join(f"{k} {v}" for k, v in s["dominant"].items() if v)
        + " |"
        for s in summary
    )
    return f"""# Synthetic colorectal-cancer Visium demo data

**Everything here is simulated.** No patient, slide or sequencing run is behind these files. They were written by
`bundle.demo.make_demo_dataset` (`python scripts/make_demo_data.py`) to exercise the bundle's readers and training
pipeline on real file formats where real Visium data cannot be downloaded.

Generated with: `seed={seed}`, `num_slides={num_slides}`, `size_um={size_um[0]:g} x {size_um[1]:g}` (height x width),
`mpp={mpp:g}`. The same arguments regenerate identical files (counts and pixels).

## Layout

- `manifest.csv`: `sample_id,st_path,slide_path,mpp,split,patient`; paths relative to this folder. Split rule: the last
  slide is `val`, the others `train`; one patient per slide.
- `<sample_id>/slide.tif`: pyramidal, tiled (256 px), JPEG-compressed RGB TIFF at {mpp:g} um/px; every level is a
  top-level page with its pixel size in the TIFF resolution tags (cuCIM, OpenSlide, tifffile and MONAI read it).
- `<sample_id>/spaceranger/`: Space Ranger 2.x output layout: `filtered_feature_bc_matrix.h5` (10x HDF5 v3, in-tissue
  spots only, {num_genes} genes with real symbols and synthetic `ENSG99...` ids), `spatial/tissue_positions.csv`
  (all lattice spots, pixel coordinates in the level-0 frame of `slide.tif`), `scalefactors_json.json`,
  `tissue_hires_image.png`, `tissue_lowres_image.png`. `scanpy.read_visium("<sample_id>/spaceranger")` loads it.
- `<sample_id>/ground_truth.csv`: per spot the centre (`x`, `y` = column, row in level-0 pixels), array position,
  `in_tissue`, `tissue_coverage` (share of the 55 um disk on tissue), the fraction of each compartment
  ({", ".join(COMPARTMENTS)}) among the tissue inside the disk (glass excluded, renormalised; all 0 without tissue)
  and the `dominant` compartment (`background` without tissue).

## How it was simulated

Each slide is a section through a colon wall with a tumour: normal mucosa (crypts with goblet cells) on one side,
adipose tissue on the other, an adenocarcinoma (glands with crowded elongated nuclei) in desmoplastic stroma
between them, central necrosis wrapped in a hypoxic rim of solid viable tumour, and lymphoid aggregates. The image is
painted as haematoxylin and eosin concentrations converted to RGB with the Beer-Lambert law (per-slide stain
variation). Spots lie on the Visium lattice (55 um spots, 100 um apart); a spot is in tissue when at least 30% of
its disk is tissue. Counts are negative-binomial around a mixture of compartment expression programmes weighted by
the spot's compartment fractions and compartment-specific library sizes (necrosis yields little RNA).

| sample | split | size (px, W x H) | spots | in tissue | dominant compartment of in-tissue spots |
|---|---|---|---|---|---|
{rows}

## Licence

Generated data, dedicated to the public domain under CC0-1.0 (https://creativecommons.org/publicdomain/zero/1.0/);
the code that generates it is under the project's licence (Apache-2.0).
"""
