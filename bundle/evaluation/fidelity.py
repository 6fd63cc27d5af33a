"""Biological fidelity: per-gene Pearson r of the probe on real (ceiling) and generated (fidelity) patches."""

from __future__ import annotations

from typing import Any

import numpy as np

from bundle.evaluation.probe import Probe

__all__ = ["pearson_per_column", "probe_scores"]


def pearson_per_column(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r between matching columns of ``(N, G)`` arrays; NaN where a column is constant."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cannot correlate arrays of shapes {a.shape} and {b.shape}.")
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / denom
    return np.where(denom > 1e-12, r, np.nan)


def _nanmean(values: np.ndarray) -> float | None:
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return float(a / b) if a is not None and b is not None and abs(b) > 1e-12 else None


def probe_scores(
    probe: Probe,
    real_images: np.ndarray,
    generated_images: np.ndarray,
    expression: np.ndarray,
    threshold: float = 0.3,
    num_permutations: int = 200,
    seed: int = 0,
    predictions: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Per-gene Pearson r of the probe on real (ceiling) and generated (fidelity) patches of the evaluated spots.

    Args:
        probe: trained on real training patches.
        real_images: ``(N, 3, H, W)`` real patches of the spots.
        generated_images: ``(N, 3, H, W)`` patches generated from the spots' expression.
        expression: ``(N, G)`` the spots' log-normalised expression (the truth for both).
        threshold: genes whose ceiling r exceeds this are the "readable" genes of the second summary.
        num_permutations: permutations of the spot order for the p-value of the mean fidelity r.
        seed: seed of the permutations.
        predictions: the probe's expression predictions on (real, generated) when already computed.

    Returns:
        per-gene r lists (panel order) and the summaries ``ceiling_r_mean``, ``fidelity_r_mean``,
        ``fidelity_fraction`` (= fidelity / ceiling) and the same over genes with ceiling r > ``threshold``.
    """
    if predictions is None:
        pred_real, _ = probe.predict(real_images)
        pred_gen, _ = probe.predict(generated_images)
    else:
        pred_real, pred_gen = predictions
    truth = (np.asarray(expression, np.float32) - probe.mean) / probe.std
    ceiling = pearson_per_column(pred_real, truth)
    fidelity = pearson_per_column(pred_gen, truth)
    readable = np.isfinite(ceiling) & (ceiling > threshold)
    mean_fid = _nanmean(fidelity)
    rng = np.random.default_rng(seed)
    null = [_nanmean(pearson_per_column(pred_gen, truth[rng.permutation(len(truth))])) for _ in range(num_permutations)]
    null = np.asarray([v for v in null if v is not None])
    p_value = float((1 + np.sum(null >= mean_fid)) / (1 + len(null))) if mean_fid is not None and len(null) else None
    out = {
        "genes": list(probe.genes),
        "ceiling_r": [None if not np.isfinite(v) else float(v) for v in ceiling],
        "fidelity_r": [None if not np.isfinite(v) else float(v) for v in fidelity],
        "ceiling_r_mean": _nanmean(ceiling),
        "fidelity_r_mean": mean_fid,
        "threshold": float(threshold),
        "num_readable_genes": int(readable.sum()),
        "ceiling_r_mean_readable": _nanmean(ceiling[readable]),
        "fidelity_r_mean_readable": _nanmean(fidelity[readable]),
        "fidelity_p_value": p_value,
        "num_spots": int(len(truth)),
    }
    out["fidelity_fraction"] = _ratio(out["fidelity_r_mean"], out["ceiling_r_mean"])
    out["fidelity_fraction_readable"] = _ratio(out["fidelity_r_mean_readable"], out["ceiling_r_mean_readable"])
    return out
