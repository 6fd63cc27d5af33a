"""One simulated slide: layout, histology, Visium spots and counts drawn from the slide's random streams."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bundle.demo.expression import expression_profiles, simulate_counts
from bundle.demo.genes import demo_gene_table
from bundle.demo.histology import render_histology
from bundle.demo.layout import simulate_layout
from bundle.demo.visium import spot_fractions, visium_barcodes, visium_spot_lattice


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
    height_um, width_um = _check_arguments(seed, slide_index, size_um, mpp, in_tissue_min_coverage, dispersion)

    sequence = np.random.SeedSequence(int(seed), spawn_key=(1, int(slide_index)))
    layout_rng, image_rng, spot_rng, count_rng = (np.random.default_rng(s) for s in sequence.spawn(4))
    atlas_rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(0,)))

    mpp = float(mpp)
    factor = max(1, int(round(1.0 / mpp)))
    px_um = mpp * factor
    shape = (int(round(height_um / px_um)), int(round(width_um / px_um)))
    layout = simulate_layout(layout_rng, shape, px_um)
    image, num_nuclei = render_histology(image_rng, layout, mpp, factor, stain_jitter)

    spots, fractions = _measure_spots(spot_rng, layout.labels, px_um, mpp, in_tissue_min_coverage)
    coverage = spots["tissue_coverage"]

    gene_ids, gene_names, programmes = demo_gene_table()
    profiles = expression_profiles(atlas_rng, count_rng, programmes, slide_variation)
    depth = float(np.exp(count_rng.normal(0.0, 0.2)))
    keep = spots["in_tissue"].astype(bool)
    counts = simulate_counts(count_rng, fractions[keep], coverage[keep], profiles, dispersion, library_sigma, depth)
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


def _check_arguments(
    seed: int, slide_index: int, size_um: float | Sequence[float], mpp: float, min_coverage: float, dispersion: float
) -> tuple[float, float]:
    """Check the arguments of :func:`simulate_slide`; returns the slide's ``(height, width)`` in micrometres."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if isinstance(slide_index, bool) or not isinstance(slide_index, (int, np.integer)) or slide_index < 0:
        raise ValueError(f"slide_index must be a non-negative integer, got {slide_index!r}.")
    if not isinstance(mpp, (int, float, np.floating, np.integer)) or not 0.05 <= float(mpp) <= 2.0:
        raise ValueError(f"mpp must be a pixel size between 0.05 and 2.0 um/px (0.25 for 40x), got {mpp!r}.")
    size = check_size(size_um)
    if not 0.0 < min_coverage <= 1.0:
        raise ValueError(f"in_tissue_min_coverage must lie in (0, 1], got {min_coverage}.")
    if dispersion <= 0:
        raise ValueError(f"dispersion must be positive, got {dispersion}.")
    return size


def _measure_spots(
    rng: np.random.Generator, labels: np.ndarray, px_um: float, mpp: float, min_coverage: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The Visium lattice over the whole slide (outermost spot centres 30-60 um from the edges): the spot columns of
    :attr:`SimulatedSlide.spots` and the compartment fractions inside every spot."""
    origin = (float(rng.uniform(30.0, 60.0)), float(rng.uniform(30.0, 60.0)))
    offset = (2 * int(rng.integers(0, 10)), 2 * int(rng.integers(0, 20)))
    lattice = visium_spot_lattice(labels.shape[0] * px_um, labels.shape[1] * px_um, origin, offset, margin_um=30.0)
    x_px = np.round(lattice["x_um"] / mpp).astype(np.int64)
    y_px = np.round(lattice["y_um"] / mpp).astype(np.int64)
    fractions, coverage = spot_fractions(labels, px_um, y_px * mpp, x_px * mpp)
    spots = {
        "barcode": visium_barcodes(lattice["array_row"], lattice["array_col"]),
        "x": x_px,
        "y": y_px,
        "array_row": lattice["array_row"],
        "array_col": lattice["array_col"],
        "in_tissue": (coverage >= min_coverage).astype(np.int64),
        "tissue_coverage": coverage,
    }
    return spots, fractions


def check_size(size_um: float | Sequence[float]) -> tuple[float, float]:
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
