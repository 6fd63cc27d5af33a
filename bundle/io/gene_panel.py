"""The gene panel contract: ``gene_panel.json`` (``{"genes": [...], "normalization": {...}}``), choosing a panel
from training data, and refusing a panel that does not match, naming the genes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundle.io.spots import log_normalize
from bundle.utils import read_json


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
) -> list[str]:
    """Top-``n_top_genes`` highly variable genes (scanpy, Seurat flavour) of log-normalised training spots.

    Args:
        counts: per-sample CSR count matrices over ``genes`` (training samples only).
        library_sizes: per-sample total counts of each spot over all genes.
        genes: gene names of the matrices' columns.
        n_top_genes: panel size.
        target_sum: normalisation total (as for training).
    """
    import anndata
    import scanpy as sc
    from scipy import sparse

    if n_top_genes < 1:
        raise ValueError(f"n_top_genes must be >= 1, got {n_top_genes}.")
    if n_top_genes >= len(genes):
        return list(genes)
    x = sparse.vstack([sparse.csr_matrix(log_normalize(c, s, target_sum)) for c, s in zip(counts, library_sizes)])
    adata = anndata.AnnData(X=x.tocsr())
    adata.var_names = list(genes)
    sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor="seurat")
    ranked = adata.var.sort_values("dispersions_norm", ascending=False)
    chosen = set(ranked.index[ranked["highly_variable"]][:n_top_genes])
    return [g for g in genes if g in chosen]
