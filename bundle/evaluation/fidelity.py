"""Biological fidelity: per-gene Pearson r of the probe on real (ceiling) and generated (fidelity) patches."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bundle.evaluation.probe import Probe

__all__ = ["pearson_per_column", "top_gene_summary", "probe_scores", "write_per_gene_table"]


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


def _gene_group(
    index: np.ndarray, genes: list[str], ceiling: np.ndarray, fidelity: np.ndarray, by: str
) -> dict[str, Any]:
    """Mean ceiling and fidelity r (where defined) over the genes ``index``, the genes, and how they were chosen."""
    mean_ceiling, mean_fidelity = _nanmean(ceiling[index]), _nanmean(fidelity[index])
    return {
        "chosen_by": by,
        "genes": [genes[i] for i in index],
        "num_genes": int(len(index)),
        "num_defined": int(np.sum(np.isfinite(ceiling[index]) & np.isfinite(fidelity[index]))),
        "ceiling_r_mean": mean_ceiling,
        "fidelity_r_mean": mean_fidelity,
        "fidelity_fraction": _ratio(mean_fidelity, mean_ceiling),
    }


def top_gene_summary(
    genes: list[str], ceiling: np.ndarray, fidelity: np.ndarray, expression: np.ndarray, num: int = 50
) -> dict[str, Any]:
    """Mean ceiling and fidelity r over two sets of ``num`` genes, as published spatial-transcriptomics results report.

    ``top_ceiling``: the ``num`` genes with the highest ceiling r (genes without one are never chosen); their mean
    ceiling r is optimistic (chosen by it), their mean fidelity r less so. ``top_hvg``: the ``num`` genes with the
    largest variance of log-normalised expression over the evaluated spots, chosen without looking at any r. Ties keep
    panel order.

    Args:
        genes: panel, in the order of the other arrays.
        ceiling: ``(G,)`` per-gene ceiling r (NaN where undefined).
        fidelity: ``(G,)`` per-gene fidelity r.
        expression: ``(N, G)`` log-normalised expression of the evaluated spots.
        num: genes in each set (capped at the panel size).
    """
    ceiling, fidelity = np.asarray(ceiling, np.float64), np.asarray(fidelity, np.float64)
    defined = np.flatnonzero(np.isfinite(ceiling))
    by_ceiling = defined[np.argsort(-ceiling[defined], kind="stable")][:num]
    by_variance = np.argsort(-np.var(np.asarray(expression, np.float64), axis=0), kind="stable")[:num]
    return {
        "num": int(num),
        "top_ceiling": _gene_group(by_ceiling, genes, ceiling, fidelity, "highest ceiling r"),
        "top_hvg": _gene_group(
            by_variance, genes, ceiling, fidelity, "largest expression variance of the evaluated spots"
        ),
    }


def probe_scores(
    probe: Probe,
    real_images: np.ndarray,
    generated_images: np.ndarray,
    expression: np.ndarray,
    threshold: float = 0.3,
    num_permutations: int = 200,
    seed: int = 0,
    predictions: tuple[np.ndarray, np.ndarray] | None = None,
    top_genes: int = 50,
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
        top_genes: genes in each set of :func:`top_gene_summary`.

    Returns:
        per-gene lists in panel order (``genes``, ``ceiling_r``, ``fidelity_r``, ``expression_mean`` and
        ``expression_sd`` of the evaluated spots), the summaries ``ceiling_r_mean``, ``fidelity_r_mean``,
        ``fidelity_fraction`` (= fidelity / ceiling), the same over genes with ceiling r > ``threshold``, and
        ``top_genes`` (:func:`top_gene_summary`). Means are over the genes where r is defined (None in the lists).
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
        "expression_mean": np.asarray(expression, np.float64).mean(axis=0).tolist(),
        "expression_sd": np.asarray(expression, np.float64).std(axis=0).tolist(),
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
    out["top_genes"] = top_gene_summary(list(probe.genes), ceiling, fidelity, expression, int(top_genes))
    return out


PER_GENE_COLUMNS = (
    "gene",
    "ceiling_r",
    "fidelity_r",
    "expression_mean",
    "expression_sd",
    "readable",
    "top_ceiling",
    "top_hvg",
)
"""Columns of ``per_gene.csv``."""


def write_per_gene_table(path: str | os.PathLike, fidelity: Mapping[str, Any]) -> Path:
    """Write the per-gene results of :func:`probe_scores` as a CSV, one row per panel gene, highest ceiling r first.

    Columns (:data:`PER_GENE_COLUMNS`): the gene, its ceiling and fidelity r (empty where undefined), the mean and sd
    of its log-normalised expression over the evaluated spots, and whether it is readable (ceiling r above the
    threshold), among the top genes by ceiling r and among the most variable genes (1 or 0).
    """
    from bundle.utils import write_atomic

    top = fidelity.get("top_genes", {})
    chosen = {key: set(top.get(key, {}).get("genes", [])) for key in ("top_ceiling", "top_hvg")}
    threshold = float(fidelity.get("threshold", 0.3))
    rows = []
    for i, gene in enumerate(fidelity["genes"]):
        ceiling = fidelity["ceiling_r"][i]
        rows.append(
            {
                "gene": gene,
                "ceiling_r": "" if ceiling is None else f"{ceiling:.4f}",
                "fidelity_r": "" if fidelity["fidelity_r"][i] is None else f"{fidelity['fidelity_r'][i]:.4f}",
                "expression_mean": f"{fidelity['expression_mean'][i]:.4f}",
                "expression_sd": f"{fidelity['expression_sd'][i]:.4f}",
                "readable": int(ceiling is not None and ceiling > threshold),
                "top_ceiling": int(gene in chosen["top_ceiling"]),
                "top_hvg": int(gene in chosen["top_hvg"]),
            }
        )
    rows.sort(key=lambda row: -float(row["ceiling_r"]) if row["ceiling_r"] else float("inf"))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=PER_GENE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text.getvalue(), encoding="utf-8"))
