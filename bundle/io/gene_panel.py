"""The gene panel contract: ``gene_panel.json`` (``{"genes": [...], "normalization": {...}}``), choosing a panel
from training data, refusing a panel that does not match, naming the genes, and turning a probe-level count matrix
(Space Ranger's probe-based assays) into genes.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundle.io.spots import log_normalize
from bundle.utils import read_json

logger = logging.getLogger(__name__)

# Space Ranger probe features: the name is GENE_NAME|hash, the id GENE_ID|GENE_NAME|hash (7 hex digits)
PROBE_NAME = re.compile(r"^(?P<gene>[^|]+)\|[0-9a-f]{7}$")
PROBE_ID = re.compile(r"^[^|]+\|(?P<gene>[^|]+)\|[0-9a-f]{7}$")
# columns scanpy.read_10x_h5 gives the features of a probe-barcode matrix
PROBE_COLUMNS = ("probe_ids", "probe_region", "filtered_probes")


def load_gene_panel(path: str | os.PathLike) -> list[str]:
    """Read the gene list of a ``gene_panel.json`` (``{"genes": [...]}``) or of a text file with one gene a line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Gene panel {str(path)!r} does not exist.")
    if path.suffix == ".json":
        data = read_json(path)
        genes = data.get("genes") if isinstance(data, dict) else data
        if not isinstance(genes, list) or not all(isinstance(g, str) for g in genes):
            raise ValueError(f'{str(path)!r} must hold {{"genes": ["GENE1", ...]}}.')
    else:
        genes = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not genes:
        raise ValueError(f"Gene panel {str(path)!r} is empty.")
    if len(set(genes)) != len(genes):
        raise ValueError(f"Gene panel {str(path)!r} names some genes twice.")
    return genes


def check_gene_panel(expected: Sequence[str], actual: Sequence[str], what: str = "data") -> None:
    """Raise ``ValueError`` unless ``actual`` is exactly ``expected`` (same genes, same order), naming differences.

    Args:
        expected: the panel a model was trained with.
        actual: the panel of the data offered to it.
        what: name of the data, for the message.
    """
    expected, actual = list(expected), list(actual)
    if expected == actual:
        return
    missing = [g for g in expected if g not in set(actual)]
    extra = [g for g in actual if g not in set(expected)]
    if not missing and not extra:
        raise ValueError(f"{what} has the panel's genes in a different order; reorder them with SelectGenesd.")
    raise ValueError(
        f"{what} does not match the gene panel ({len(expected)} genes): missing {missing[:20]}"
        f"{' ...' if len(missing) > 20 else ''}, unexpected {extra[:20]}{' ...' if len(extra) > 20 else ''}. "
        "Use data with the panel's genes (SelectGenesd), or train with this panel."
    )


def select_gene_panel(
    counts: Sequence[Any],
    library_sizes: Sequence[np.ndarray],
    genes: Sequence[str],
    n_top_genes: int,
    target_sum: float,
    min_spot_fraction: float = 0.0,
) -> list[str]:
    """Top-``n_top_genes`` highly variable genes (scanpy, Seurat flavour) of log-normalised training spots.

    Args:
        counts: per-sample CSR count matrices over ``genes`` (training samples only).
        library_sizes: per-sample total counts of each spot over all genes.
        genes: gene names of the matrices' columns.
        n_top_genes: panel size.
        target_sum: normalisation total (as for training).
        min_spot_fraction: only genes detected (count > 0) in at least this share of the training spots are
            candidates, as ``scanpy.pp.filter_genes(min_cells=...)`` does before selection; on shallow data the
            dispersion ranking otherwise favours genes seen in a handful of spots.
    """
    import anndata
    import scanpy as sc
    from scipy import sparse

    if n_top_genes < 1:
        raise ValueError(f"n_top_genes must be >= 1, got {n_top_genes}.")
    if n_top_genes >= len(genes):
        return list(genes)
    if not 0.0 <= min_spot_fraction < 1.0:
        raise ValueError(f"min_spot_fraction must be a share in [0, 1), got {min_spot_fraction}.")
    x = sparse.vstack([sparse.csr_matrix(log_normalize(c, s, target_sum)) for c, s in zip(counts, library_sizes)])
    adata = anndata.AnnData(X=x.tocsr())
    adata.var_names = list(genes)
    detected = np.asarray((adata.X > 0).sum(axis=0)).ravel() / max(adata.n_obs, 1)
    candidates = detected >= min_spot_fraction
    if candidates.sum() <= n_top_genes:
        raise ValueError(
            f"only {int(candidates.sum())} genes are detected in at least {min_spot_fraction:.0%} of the training "
            f"spots, fewer than n_top_genes = {n_top_genes}; lower min_spot_fraction or n_top_genes."
        )
    adata = adata[:, candidates].copy()
    sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor="seurat")
    ranked = adata.var.sort_values("dispersions_norm", ascending=False)
    chosen = set(ranked.index[ranked["highly_variable"]][:n_top_genes])
    return [g for g in genes if g in chosen]


def probe_genes(features: Sequence[str], var: Any = None) -> list[str] | None:
    """The gene each feature measures when the features are Space Ranger probes, else None (gene-level features).

    Probe-level data is recognised by the columns ``scanpy.read_10x_h5`` gives a probe-barcode matrix's features
    (``gene_name`` with ``probe_ids``/``probe_region``/``filtered_probes``), or by feature names of the form
    ``GENE_NAME|hash`` / ``GENE_ID|GENE_NAME|hash`` (most of them; a name that does not match is its own gene).

    Args:
        features: the feature names (``var_names``).
        var: the features' table (``adata.var`` or ``adata.raw.var``), if there is one.
    """
    columns = set(getattr(var, "columns", ()))
    if "gene_name" in columns and columns & set(PROBE_COLUMNS):
        return [str(g) for g in var["gene_name"]]
    names = [str(f) for f in features]
    matches = [PROBE_NAME.match(n) or PROBE_ID.match(n) for n in names]
    if not names or sum(m is not None for m in matches) <= len(names) / 2:
        return None
    return [m.group("gene") if m else n for m, n in zip(matches, names)]


def _passed_filter(flags: Any) -> np.ndarray:
    """``filtered_probes`` as booleans (True: the probe passed Space Ranger's filter), also from text values."""
    flags = np.asarray(flags)
    if flags.dtype.kind in "biuf":
        return flags.astype(bool)
    return np.isin(np.char.lower(flags.astype(str)), ("true", "1"))


def _unique_names(names: list[str]) -> list[str]:
    """``names`` with repeats suffixed ``-1``, ``-2``, ... as ``AnnData.var_names_make_unique`` does."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        count = seen.get(name, 0)
        unique.append(name if count == 0 else f"{name}-{count}")
        seen[name] = count + 1
    return unique


def sum_probes(
    matrix: Any, features: Sequence[str], var: Any = None, what: str = "data"
) -> tuple[Any, list[str]] | None:
    """Sum a probe-level count matrix to genes as Space Ranger does for its gene-level matrix; None for gene features.

    Probes that Space Ranger filtered out (``filtered_probes`` false: e.g. probes prone to off-target or gDNA
    binding) are dropped, the other probes of each gene are summed. Genes keep the order of their first probe; a gene
    whose probes were all filtered out stays as a column of zeros. What was done is logged.

    Args:
        matrix: ``(spots, features)`` raw counts (dense or sparse).
        features: the feature names.
        var: the features' table, for the ``gene_name`` and ``filtered_probes`` columns when present.
        what: the data, for the log and errors.

    Returns:
        ``(counts, genes)``: a CSR ``(spots, genes)`` matrix and the gene names, or None when the features are genes.
    """
    from scipy import sparse

    genes = probe_genes(features, var)
    if genes is None:
        return None
    columns = set(getattr(var, "columns", ()))
    keep = _passed_filter(var["filtered_probes"]) if "filtered_probes" in columns else np.ones(len(genes), bool)
    if not keep.any():
        raise ValueError(
            f"{what} is a probe-level matrix whose {len(genes)} probes were all filtered out by Space Ranger "
            "(filtered_probes is false for every probe): no gene can be counted. Use Space Ranger's gene-level "
            "filtered_feature_bc_matrix.h5."
        )
    # one column per gene id when the table has them (two genes may share a symbol), named by the gene's symbol
    keys = [str(k) for k in var["gene_ids"]] if "gene_ids" in columns else genes
    if any("|" in k for k in keys):  # probe ids, not gene ids
        keys = genes
    first = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    column = {key: c for c, key in enumerate(first)}
    order = _unique_names([genes[i] for i in first.values()])
    kept = np.flatnonzero(keep)
    matrix = sparse.csr_matrix(matrix)
    indicator = sparse.csr_matrix(
        (np.ones(len(kept), dtype=matrix.dtype), (kept, [column[keys[i]] for i in kept])),
        shape=(len(genes), len(order)),
    )
    dropped = len(genes) - len(kept)
    empty = len(order) - len({keys[i] for i in kept})
    logger.warning(
        f"{what}: probe-level matrix ({len(genes)} probes of {len(order)} genes, features like {str(features[0])!r}): "
        + (
            f"dropped {dropped} probes that Space Ranger filtered out (filtered_probes false) and summed the other "
            if "filtered_probes" in columns
            else "no filtered_probes column, so no probe was dropped; summed the "
        )
        + f"{len(kept)} probes per gene, as Space Ranger does for its gene-level matrix"
        + (f"; {empty} genes had no probe left and count 0." if empty else ".")
    )
    return (matrix @ indicator).tocsr(), order
