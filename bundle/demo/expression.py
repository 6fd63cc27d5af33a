"""Expression simulation: per-compartment gene profiles and negative-binomial UMI counts of mixed spots."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from bundle.demo.compartments import COMPARTMENTS

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


def expression_profiles(
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


def simulate_counts(
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
