"""Reading spots and their counts: Space Ranger folders, ``.h5ad`` files (HEST) and CSV tables.

Two readers share the same count extraction (:func:`get_counts`, checked by :func:`check_counts`), library size
(:func:`library_sizes`) and normalisation (:func:`log_normalize`), so that generation sees expression exactly as
training did:

- the dataset builder (``bundle.io.dataset``) reads whole samples with :func:`read_st` (:mod:`bundle.io.sources`,
  re-exported here), :func:`spot_table` and :func:`spot_diameter_px`;
- :func:`read_spots` turns a Space Ranger folder, ``.h5ad`` or CSV into conditions for a trained model's gene panel
  (a :class:`SpotExpression`).

scanpy, anndata and pandas are imported inside the functions that need them, so ``import bundle`` stays light.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bundle.geometry import (
    NEIGHBOR_RADIUS_PITCHES,
    SPACERANGER_DIAMETER_FULLRES_UM,
    Technology,
    fit_pixel_size,
    get_technology,
    spot_neighbors,
)
from bundle.io.legacy_st import legacy_st_files
from bundle.io.sources import (  # noqa: F401  (re-exported: the readers' public home was this module)
    corrupt_file_message,
    read_h5ad,
    read_hest_metadata,
    read_spaceranger,
    read_st,
    technology_name,
)

logger = logging.getLogger(__name__)

# CSV columns that describe a spot rather than a gene
CSV_ID_COLUMNS = ("spot_id", "barcode", "id", "spot")
CSV_META_COLUMNS = ("sample", "array_row", "array_col", "x_um", "y_um", "total_counts", "in_tissue")
# where raw counts come from, for error messages
RAW_COUNTS_HINT = "the Space Ranger matrix, adata.raw, or a counts layer (manifest column `layer`)"


# ----------------------------------------------------------------------------------------------------------------------
# counts, library sizes and normalisation
# ----------------------------------------------------------------------------------------------------------------------


def check_counts(values: Any, name: str = "counts", remedy: str | None = None) -> None:
    """Raise ``ValueError`` unless ``values`` (array, tensor or matrix data) are raw counts: non-negative whole numbers.

    Args:
        values: the values to check.
        name: what the values are, for the message (e.g. a sample id).
        remedy: what to do instead, for the message; defaults to using the raw counts or skipping normalisation.
    """
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    values = np.asarray(values)
    if values.size == 0:
        return
    if remedy is None:
        remedy = (
            f"Use the raw counts ({RAW_COUNTS_HINT}), or skip normalisation for data that is already log-normalised."
        )
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        n_nan = int(np.isnan(values).sum())
        n_inf = int((~np.isfinite(values)).sum()) - n_nan
        found = " and ".join([f"{n_nan} NaN"] * bool(n_nan) + [f"{n_inf} infinite"] * bool(n_inf))
        raise ValueError(
            f"{name} has {found} value(s), so it is not raw counts (missing measurements?); fill them with 0 or "
            f"export the raw counts again. {remedy}"
        )
    if values.min() < 0:
        raise ValueError(
            f"{name} has negative values (min {values.min():.4g}), so it is not raw counts (scaled or centred data?). "
            f"{remedy}"
        )
    if np.issubdtype(values.dtype, np.floating):
        fractional = values != np.round(values)
        if fractional.any():
            bad = values[fractional][:3]
            raise ValueError(
                f"{name} has non-integer values (e.g. {np.round(bad, 4).tolist()}), so it is not raw counts (it looks "
                f"log-normalised). {remedy}"
            )


def _layer(adata, layer: str, name: str):
    """``adata.layers[layer]``, with an error naming the layers there are."""
    if layer not in adata.layers:
        raise ValueError(f"{name}: layer {layer!r} not found; available layers: {list(adata.layers)}.")
    return adata.layers[layer]


def get_counts(adata, layer: str | None = None, name: str = "sample"):
    """Return ``(counts, gene_names)``: a CSR matrix of raw counts and the matching gene names.

    Looks in ``layer`` when given, else ``adata.raw`` when present, else ``X``, and checks that the values are counts
    (:func:`check_counts`). A probe-level matrix (Space Ranger probe-based assays) is summed to genes, without the
    probes Space Ranger filtered out (:func:`bundle.io.gene_panel.sum_probes`).

    Raises:
        ValueError: the values are negative or not whole numbers (log-normalised or scaled data), naming ``name``.
    """
    from scipy import sparse

    from bundle.io.gene_panel import sum_probes

    if layer is not None:
        matrix, genes, var, source = _layer(adata, layer, name), list(adata.var_names), adata.var, f"layer {layer!r}"
    elif adata.raw is not None:
        matrix, genes, var, source = adata.raw.X, list(adata.raw.var_names), adata.raw.var, "adata.raw"
    else:
        matrix, genes, var, source = adata.X, list(adata.var_names), adata.var, "X"
    matrix = sparse.csr_matrix(matrix)
    check_counts(matrix.data, f"{name}: {source}", remedy=f"Provide raw counts: {RAW_COUNTS_HINT}.")
    summed = sum_probes(matrix, genes, var, what=f"{name}: {source}")
    return summed if summed is not None else (matrix, genes)


def library_sizes(counts) -> np.ndarray:
    """Total counts of each spot (row) over all measured genes: the library size that normalisation divides by."""
    return np.asarray(counts.sum(axis=1)).ravel()


def log_normalize(counts, library_size: np.ndarray, target_sum: float) -> np.ndarray:
    """``log1p(counts * target_sum / library_size)`` as float32 (scanpy's ``normalize_total`` + ``log1p``).

    Args:
        counts: ``(spots, genes)`` raw counts (dense or sparse), e.g. the panel genes only.
        library_size: each spot's total over *all* measured genes (:func:`library_sizes`); values below 1 count as 1.
        target_sum: total each spot is scaled to.
    """
    from scipy import sparse

    scaled = sparse.diags(target_sum / np.maximum(library_size, 1.0)) @ sparse.csr_matrix(counts, dtype=np.float64)
    return np.log1p(scaled.toarray()).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# spot positions
# ----------------------------------------------------------------------------------------------------------------------


def _spatial_xy(adata) -> np.ndarray:
    """``(N, 2)`` float64 spot centres ``(x, y)`` of ``obsm["spatial"]`` (full-resolution pixels)."""
    return np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]


def spot_table(adata) -> dict[str, np.ndarray]:
    """Barcodes, centres ``x``/``y`` (pixels), ``in_tissue`` flags (1 when absent) and, when present, the array
    coordinates ``array_row``/``array_col`` of every spot of an AnnData."""
    obs = adata.obs
    xy = _spatial_xy(adata)
    n = adata.n_obs
    table = {
        "barcode": np.asarray(adata.obs_names, dtype=str),
        "x": xy[:, 0],
        "y": xy[:, 1],
        "in_tissue": np.asarray(obs["in_tissue"], dtype=int) if "in_tissue" in obs else np.ones(n, dtype=int),
    }
    if "array_row" in obs and "array_col" in obs:
        table["array_row"] = np.asarray(obs["array_row"], dtype=int)
        table["array_col"] = np.asarray(obs["array_col"], dtype=int)
        fit = "array_row_fit" in obs and "array_col_fit" in obs
        table["array_row_fit"] = np.asarray(obs["array_row_fit" if fit else "array_row"], dtype=np.float64)
        table["array_col_fit"] = np.asarray(obs["array_col_fit" if fit else "array_col"], dtype=np.float64)
    return table


def spot_diameter_px(adata) -> float | None:
    """Spot diameter in full-resolution pixels from Space Ranger's scale factors (``spot_diameter_fullres``), or None."""
    for library in (adata.uns.get("spatial") or {}).values():
        value = (library.get("scalefactors") or {}).get("spot_diameter_fullres")
        if value:
            return float(value)
    return None


# ----------------------------------------------------------------------------------------------------------------------
# spots for generation
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SpotExpression:
    """Spots ready to condition the model: log-normalised expression of the model's gene panel, with their context.

    Attributes:
        ids: spot ids (barcodes), unique, in input order.
        expression: ``(N, G)`` float32 ``log1p(normalize_total)`` values of the panel genes, in panel order.
        neighbors: ``(N, 6)`` row indices of each spot's hex-lattice neighbours (``-1`` where there is none), or None
            when the input has no spot positions.
        positions_um: ``(N, 2)`` spot centres ``(x, y)`` in micrometres, or None when unknown.
        sample: sample (capture area) name.
        genes: the panel the columns of ``expression`` follow.
        source: the file or folder the spots were read from.
    """

    ids: list[str]
    expression: np.ndarray
    neighbors: np.ndarray | None
    positions_um: np.ndarray | None
    sample: str
    genes: list[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)


def _target_sum(normalization: Mapping[str, Any] | None) -> float:
    """``target_sum`` of the checkpoint's normalisation record (``normalize_total+log1p`` is the only method)."""
    if normalization is None:
        logger.warning("the model records no normalisation; using normalize_total(target_sum=1e4) + log1p.")
        return 1e4
    method = normalization.get("method", "normalize_total+log1p")
    if method != "normalize_total+log1p":
        raise ValueError(
            f"the model's expression was normalised with {method!r}, which generation cannot reproduce; only "
            "'normalize_total+log1p' (what prepare_dataset writes) is supported."
        )
    return float(normalization.get("target_sum", 1e4))


def _panel_columns(genes: Sequence[str], available: Sequence[str], what: str) -> list[int]:
    """Column of each panel gene in ``available``; raises naming the panel genes that are missing."""
    position = {}
    for i, g in enumerate(available):
        position.setdefault(str(g), i)
    missing = [g for g in genes if g not in position]
    if missing:
        raise ValueError(
            f"{what} lacks {len(missing)} of the model's {len(genes)} panel genes: {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}. The input must measure every gene of the panel (other genes are "
            "ignored); check the gene symbols, or use a model trained on a panel that this data covers."
        )
    return [position[g] for g in genes]


def _check_values(values: np.ndarray, what: str, normalized: bool) -> None:
    """Raise unless ``values`` are finite, non-negative and (unless ``normalized``) whole numbers."""
    if values.size == 0:
        return
    if not np.isfinite(values).all():
        raise ValueError(f"{what} contains NaN or infinite values; fill missing measurements (e.g. with 0) first.")
    if not normalized:
        check_counts(
            values,
            what,
            remedy="Give raw counts, or set normalized=True (--normalized True) if the values are already "
            "log1p(normalize_total) with the model's target sum.",
        )
    elif values.min() < 0:
        raise ValueError(
            f"{what} has negative values (min {values.min():.4g}): expected log1p(normalize_total) values (>= 0); "
            "scaled or centred data cannot be used."
        )


def _unique_ids(ids: Sequence[Any], what: str) -> list[str]:
    """``ids`` as strings; raises naming the ones that occur twice."""
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        seen, dupes = set(), []
        for i in ids:
            if i in seen and i not in dupes:
                dupes.append(i)
            seen.add(i)
        raise ValueError(f"{what} names some spots more than once ({dupes[:5]}); spot ids must be unique.")
    return ids


def _anndata_sample(adata: Any, path: Path) -> str:
    """The sample name of an AnnData: its one Space Ranger library id, else the folder or file name."""
    spatial = adata.uns.get("spatial")
    libraries = list(spatial) if isinstance(spatial, Mapping) else []
    if len(libraries) == 1:
        return str(libraries[0])
    if path.is_dir():
        return path.parent.name if path.name in ("outs", "spaceranger") else path.name
    return path.stem


def _read_anndata_spots(
    adata: Any,
    genes: list[str],
    target_sum: float,
    layer: str | None,
    normalized: bool,
    mpp: float | None,
    what: str,
    technology: str | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Ids, expression, neighbours and positions of an AnnData from Space Ranger or an h5ad file."""
    from scipy import sparse

    if "in_tissue" in adata.obs and (np.asarray(adata.obs["in_tissue"]) == 0).any():
        keep = np.asarray(adata.obs["in_tissue"]) != 0
        logger.info(f"{what}: using the {int(keep.sum())} of {adata.n_obs} spots in tissue (obs['in_tissue']).")
        adata = adata[keep].copy()
    if adata.n_obs == 0:
        raise ValueError(f"{what} holds no spot.")
    ids = _unique_ids(adata.obs_names, what)
    if normalized:
        from bundle.io.gene_panel import probe_genes

        if probe_genes(adata.var_names, adata.var) is not None:
            raise ValueError(
                f"{what} is a probe-level matrix (features like {str(adata.var_names[0])!r}) holding normalised values, "
                "which cannot be summed to genes. Give raw counts (normalized=False: the probes are summed per gene as "
                "Space Ranger does) or a gene-level matrix."
            )
        matrix = _layer(adata, layer, what) if layer is not None else adata.X
        columns = _panel_columns(genes, list(adata.var_names), what)
        values = sparse.csr_matrix(matrix)[:, columns].toarray().astype(np.float32)
        _check_values(values, what, normalized=True)
        expression = values
    else:
        counts, all_genes = get_counts(adata, layer, name=what)
        columns = _panel_columns(genes, all_genes, what)
        expression = log_normalize(counts[:, columns], library_sizes(counts), target_sum)
    technology = get_technology(technology or technology_name(adata), what=f"{what}: technology")
    lattice = "array_row" in adata.obs and "array_col" in adata.obs
    if mpp is None and "spatial" in adata.obsm:
        mpp = _estimated_mpp(adata, technology, lattice)
    positions_um = None
    if "spatial" in adata.obsm and mpp is not None:
        positions_um = _spatial_xy(adata) * float(mpp)
    neighbors = spot_neighbors(
        np.asarray(adata.obs["array_row"]) if lattice else None,
        np.asarray(adata.obs["array_col"]) if lattice else None,
        positions_um,
        radius=NEIGHBOR_RADIUS_PITCHES * technology.pitch_um,
        technology=technology,
    )
    return ids, expression, neighbors, positions_um


def _estimated_mpp(adata, technology: Technology, lattice: bool) -> float | None:
    """The pixel size of ``obsm["spatial"]``: fitted from the array coordinates, else from Space Ranger's spot
    diameter (``spot_diameter_fullres``), else None."""
    if lattice:
        table = spot_table(adata)
        fit = fit_pixel_size(table["array_row_fit"], table["array_col_fit"], table["x"], table["y"], technology)
        if fit is not None:
            return fit.mpp
    diameter_px = spot_diameter_px(adata)
    return SPACERANGER_DIAMETER_FULLRES_UM / diameter_px if diameter_px else None


def _read_csv_spots(
    path: Path, genes: list[str], target_sum: float, normalized: bool, what: str, technology: str | None = None
) -> tuple[list[str], np.ndarray, np.ndarray | None, np.ndarray | None, str | None]:
    """Ids, expression, neighbours, positions and sample of a CSV/TSV with one spot a row and one gene a column."""
    import pandas as pd

    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") or path.name.lower().endswith(".tsv.gz") else ","
    table = pd.read_csv(path, sep=sep)
    if table.empty:
        raise ValueError(f"{what} holds no spot (rows = spots, columns = genes).")
    columns = [str(c) for c in table.columns]
    table.columns = columns
    id_column = next((c for c in CSV_ID_COLUMNS if c in columns), None)
    first = columns[0]
    if id_column is None and (first.startswith("Unnamed") or not first or table[first].dtype == object):
        id_column = first  # the index column pandas writes (to_csv) or another leading name column
    if id_column is None:
        logger.info(f"{what} has no spot id column ({'/'.join(CSV_ID_COLUMNS)}): spots are named by their row number.")
        ids = [str(i) for i in range(len(table))]
    else:
        ids = _unique_ids(table[id_column].tolist(), what)
    meta = {c: table[c] for c in CSV_META_COLUMNS if c in columns}
    lattice_of = get_technology(technology, what=f"{what}: technology")
    if "in_tissue" in meta and (meta["in_tissue"].to_numpy() == 0).any():
        keep = meta["in_tissue"].to_numpy() != 0
        logger.info(f"{what}: using the {int(keep.sum())} of {len(table)} spots with in_tissue != 0.")
        table = table[keep].reset_index(drop=True)
        ids = [i for i, k in zip(ids, keep) if k]
        meta = {c: table[c] for c in meta}
    gene_columns = [c for c in columns if c != id_column and c not in CSV_META_COLUMNS]
    non_numeric = [c for c in gene_columns if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric:
        raise ValueError(
            f"{what} has non-numeric columns {non_numeric[:10]}: apart from the spot id column "
            f"({'/'.join(CSV_ID_COLUMNS)} or the first column) and {', '.join(CSV_META_COLUMNS)}, every column must be "
            "a gene holding numbers."
        )
    panel = _panel_columns(genes, gene_columns, what)
    values = table[gene_columns].to_numpy(dtype=np.float64)
    _check_values(values, what, normalized)
    if normalized:
        expression = values[:, panel].astype(np.float32)
    else:
        if "total_counts" in meta:
            library = meta["total_counts"].to_numpy(dtype=np.float64)
        else:
            library = values.sum(axis=1)
            if set(gene_columns) <= set(genes):
                logger.warning(
                    f"{what} holds only panel genes and no total_counts column: the library size is their sum, but "
                    "the model was trained with the total over all measured genes. Add a total_counts column (or all "
                    "genes)."
                )
        expression = log_normalize(values[:, panel], library, target_sum)
    positions_um = None
    if "x_um" in meta and "y_um" in meta:
        positions_um = np.stack([meta["x_um"].to_numpy(np.float64), meta["y_um"].to_numpy(np.float64)], axis=1)
    lattice = "array_row" in meta and "array_col" in meta
    neighbors = spot_neighbors(
        meta["array_row"].to_numpy() if lattice else None,
        meta["array_col"].to_numpy() if lattice else None,
        positions_um,
        radius=NEIGHBOR_RADIUS_PITCHES * lattice_of.pitch_um,
        technology=lattice_of,
    )
    samples = meta["sample"].astype(str).unique().tolist() if "sample" in meta else []
    if len(samples) > 1:
        raise ValueError(f"{what} mixes the samples {samples[:5]}; give one sample (capture area) per file.")
    return ids, expression, neighbors, positions_um, (samples[0] if samples else None)


def read_spots(
    path: str | os.PathLike,
    genes: Sequence[str],
    normalization: Mapping[str, Any] | None = None,
    layer: str | None = None,
    normalized: bool = False,
    mpp: float | None = None,
    sample: str | None = None,
    technology: str | None = None,
) -> SpotExpression:
    """Read spots' expression and normalise it the way the model's training data was normalised.

    Inputs:

    - a Space Ranger ``outs/`` folder (``filtered_feature_bc_matrix.h5`` + ``spatial/``): raw counts; neighbours
      from ``array_row``/``array_col``; positions from the full-resolution pixel coordinates;
    - an ``.h5ad`` file: raw counts in ``layer``, else ``adata.raw``, else ``X``; neighbours from
      ``obs["array_row"/"array_col"]`` when present, else from positions; positions from ``obsm["spatial"]``;
    - a CSV (``.csv``, or tab-separated ``.tsv``/``.txt``): one spot a row, one gene a column, raw counts; the spot id
      in a column ``spot_id``/``barcode``/``id``/``spot`` or the first column (as ``DataFrame.to_csv`` writes the
      index); optional columns ``sample``, ``array_row``/``array_col`` (hex neighbours), ``x_um``/``y_um``
      (positions), ``total_counts`` (library size; otherwise the sum of the gene columns, so give all measured
      genes) and ``in_tissue``.

    Raw counts are normalised as in ``prepare_dataset``: library size = the spot's total counts over all measured
    genes, ``normalize_total(target_sum)`` then ``log1p``, then the panel genes are taken in panel order. Spots with
    ``in_tissue == 0`` are skipped. Genes outside the panel are ignored; a missing panel gene is refused.

    Args:
        path: Space Ranger folder, ``.h5ad`` or CSV.
        genes: the model's gene panel (``read_model_info(...)["gene_panel"]``).
        normalization: the checkpoint's normalisation record (``{"method": "normalize_total+log1p", "target_sum":
            ...}``).
        layer: AnnData layer to read (None: ``adata.raw`` when present, else ``X``; with ``normalized``, ``X``).
        normalized: the values are already ``log1p(normalize_total)`` with the model's target sum (used as they are).
        mpp: micrometres per full-resolution pixel of ``obsm["spatial"]``; None fits it from the array coordinates
            (:func:`bundle.geometry.fit_pixel_size`) or derives it from the spot diameter in Space Ranger's scale
            factors (``spot_diameter_fullres``) when they are there.
        sample: sample name (defaults to the Space Ranger library id, the CSV's ``sample`` column or the file name).
        technology: spot technology (:func:`bundle.geometry.get_technology`) whose lattice gives the neighbours; None:
            legacy ST for a legacy ST section, else Visium.

    Returns:
        A :class:`SpotExpression`.
    """
    path = Path(path)
    genes = [str(g) for g in genes]
    if isinstance(normalized, str):  # a command-line value such as "false"
        normalized = normalized.strip().lower() in ("1", "true", "yes", "on")
    if not genes:
        raise ValueError("the gene panel is empty; read it from the model checkpoint (read_model_info).")
    target_sum = _target_sum(normalization)
    if not path.exists():
        raise FileNotFoundError(
            f"input {str(path)!r} does not exist: give a Space Ranger outs/ folder, an .h5ad file or a CSV of spots x "
            "genes."
        )
    legacy = legacy_st_files(path) is not None
    if path.is_dir() or path.suffix.lower() == ".h5ad" or legacy:
        kind = "legacy ST section" if legacy else "Space Ranger folder" if path.is_dir() else "h5ad file"
        what = f"{kind} {str(path)!r}"
        adata = read_st(path, require_spatial=False)
        ids, expression, neighbors, positions_um = _read_anndata_spots(
            adata, genes, target_sum, layer, normalized, mpp, what, technology
        )
        default_sample = _anndata_sample(adata, path)
    elif path.suffix.lower() in (".csv", ".tsv", ".txt", ".gz"):
        what = f"CSV file {str(path)!r}"
        ids, expression, neighbors, positions_um, csv_sample = _read_csv_spots(
            path, genes, target_sum, normalized, what, technology
        )
        default_sample = csv_sample or path.name.split(".")[0]
    else:
        raise ValueError(
            f"cannot read {str(path)!r}: give a Space Ranger outs/ folder, an .h5ad file or a .csv/.tsv of spots x "
            "genes."
        )
    return SpotExpression(
        ids=ids,
        expression=np.ascontiguousarray(expression, dtype=np.float32),
        neighbors=None if neighbors is None else np.asarray(neighbors, dtype=np.int64),
        positions_um=positions_um,
        sample=str(sample or default_sample),
        genes=genes,
        source=str(path),
    )
