"""Spatial-transcriptomics readers and the dataset builder behind ``scripts/prepare_dataset.py``.

Reads Space Ranger output folders, ``.h5ad`` files with ``obsm["spatial"]`` and HEST samples (h5ad + slide +
metadata JSON), pairs every spot with its slide, runs QC, chooses a gene panel and writes a dataset folder:

``datalist.json``
    one entry per kept spot, in MONAI's decathlon layout (``training`` / ``validation`` / ``test``): ``image`` (slide
    path), ``location`` (``(x, y)`` level-0 pixels), ``mpp`` (level-0 um/px), ``expression`` (row in the expression
    store), ``neighbors`` (rows of the 6 hex-lattice neighbours, -1 where none), ``sample``, ``patient``, ``barcode``,
    ``split``, ``library_size``.
``gene_panel.json``
    ``{"genes": [...], "normalization": {...}, "selection": {...}}``.
``expression.npy`` / ``counts.npy``
    memory-mappable ``(num_spots, num_genes)`` stores: log-normalised float32 values and raw int32 counts.
``spots.csv`` / ``qc_summary.json`` / ``dataset.json``
    every spot with its QC outcome, the per-sample summary, and how the dataset was made.

scanpy and anndata are imported inside the functions that need them, so ``import bundle`` stays light.
"""

from __future__ import annotations

import csv
import datetime
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bundle.readers import read_slide_info
from bundle.utils import read_json, replace_dir, write_json_atomic

__all__ = [
    "SPLIT_KEYS",
    "ManifestRow",
    "read_manifest",
    "read_spaceranger",
    "read_h5ad",
    "read_hest_metadata",
    "read_st",
    "get_counts",
    "hex_neighbors",
    "load_gene_panel",
    "check_gene_panel",
    "select_gene_panel",
    "prepare_dataset",
]

# manifest split name -> datalist key (MONAI decathlon layout)
SPLIT_KEYS = {"train": "training", "val": "validation", "test": "test"}
# Visium hexagonal lattice: the six neighbours of (row, col) in array coordinates
HEX_OFFSETS = ((0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1))
VISIUM_SPOT_DIAMETER_UM = 55.0


@dataclass
class ManifestRow:
    """One sample of a manifest: its expression data, slide and split.

    Attributes:
        sample_id: unique sample name.
        st_path: Space Ranger folder or ``.h5ad`` file.
        slide_path: whole-slide image the spot coordinates refer to (level-0 pixels).
        mpp: explicit level-0 pixel size (um/px), or None to read it from the slide (or the HEST metadata).
        split: ``"train"``, ``"val"`` or ``"test"``.
        patient: patient id; a patient's samples must all be in one split. Defaults to the sample id.
        metadata_path: HEST metadata JSON (gives the pixel size), or None.
        layer: AnnData layer with raw counts (None: ``.raw`` when present, else ``X``).
    """

    sample_id: str
    st_path: Path
    slide_path: Path
    mpp: float | None = None
    split: str = "train"
    patient: str = ""
    metadata_path: Path | None = None
    layer: str | None = None


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read a manifest CSV: ``sample_id,st_path,slide_path[,mpp,split,patient,metadata_path,layer]``.

    Relative paths are taken relative to the manifest's folder. Raises ``ValueError`` naming the row and column for
    missing columns, duplicate samples, unknown splits, missing files and patients spread over several splits.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Manifest {str(path)!r} does not exist.")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("sample_id", "st_path", "slide_path") if c not in columns]
        if missing:
            raise ValueError(
                f"Manifest {str(path)!r} lacks the column(s) {missing}; it needs sample_id,st_path,slide_path and may "
                "have mpp,split,patient,metadata_path,layer."
            )
        raw_rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    if not raw_rows:
        raise ValueError(f"Manifest {str(path)!r} lists no samples.")
    base = path.parent
    rows, seen = [], set()
    for i, raw in enumerate(raw_rows, start=2):
        where = f"{path.name} line {i}"
        sid = raw["sample_id"]
        if not sid:
            raise ValueError(f"{where}: empty sample_id.")
        if sid in seen:
            raise ValueError(f"{where}: sample_id {sid!r} appears twice; sample ids must be unique.")
        seen.add(sid)
        split = raw.get("split") or "train"
        if split not in SPLIT_KEYS:
            raise ValueError(f"{where}: split {split!r} of sample {sid!r} must be one of {sorted(SPLIT_KEYS)}.")
        resolved = {}
        for col in ("st_path", "slide_path", "metadata_path"):
            value = raw.get(col, "")
            if not value:
                resolved[col] = None
                continue
            p = Path(value) if Path(value).is_absolute() else base / value
            if not p.exists():
                raise FileNotFoundError(f"{where}: {col} {value!r} of sample {sid!r} does not exist (looked at {p}).")
            resolved[col] = p.resolve()
        if resolved["st_path"] is None or resolved["slide_path"] is None:
            raise ValueError(f"{where}: sample {sid!r} needs both st_path and slide_path.")
        mpp_text = raw.get("mpp", "")
        try:
            mpp = float(mpp_text) if mpp_text else None
        except ValueError:
            raise ValueError(f"{where}: mpp {mpp_text!r} of sample {sid!r} is not a number (um/px).") from None
        rows.append(
            ManifestRow(
                sample_id=sid,
                st_path=resolved["st_path"],
                slide_path=resolved["slide_path"],
                mpp=mpp,
                split=split,
                patient=raw.get("patient") or sid,
                metadata_path=resolved["metadata_path"],
                layer=raw.get("layer") or None,
            )
        )
    patient_splits: dict[str, set[str]] = {}
    for r in rows:
        patient_splits.setdefault(r.patient, set()).add(r.split)
    leaking = {p: sorted(s) for p, s in patient_splits.items() if len(s) > 1}
    if leaking:
        raise ValueError(
            f"Manifest {str(path)!r} puts one patient's samples in several splits {leaking}; splits must be by "
            "patient, so that validation tissue is never seen in training."
        )
    return rows


def read_spaceranger(path: str | os.PathLike, count_file: str = "filtered_feature_bc_matrix.h5"):
    """Read a Space Ranger output folder with ``scanpy.read_visium``.

    Returns an AnnData with raw counts in ``X``, ``obsm["spatial"]`` = ``(x, y)`` full-resolution pixels,
    ``obs["in_tissue"/"array_row"/"array_col"]`` and unique gene symbols as ``var_names``.

    Raises:
        FileNotFoundError: the folder, the count matrix or ``spatial/`` files are missing.
        ValueError: the HDF5 lacks the ``library_ids`` attribute that scanpy needs.
    """
    import scanpy as sc

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Space Ranger folder {str(path)!r} does not exist.")
    h5 = path / count_file
    if not h5.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no {count_file}; point st_path at Space Ranger's `outs/` folder.")
    positions = [path / "spatial" / n for n in ("tissue_positions.csv", "tissue_positions_list.csv")]
    if not any(p.is_file() for p in positions):
        raise FileNotFoundError(
            f"{str(path)!r} has no spatial/tissue_positions.csv (Space Ranger >= 2.0) or "
            "spatial/tissue_positions_list.csv (1.x): the spot coordinates are needed."
        )
    import h5py

    with h5py.File(h5, "r") as f:
        has_library_ids = "library_ids" in f.attrs
    if not has_library_ids:
        raise ValueError(
            f"{str(h5)!r} has no `library_ids` attribute, which scanpy.read_visium needs to name the capture area. "
            "Space Ranger writes it; for a file from another tool add it, e.g. "
            "`h5py.File(path, 'a').attrs['library_ids'] = [b'<sample id>']`, or convert the sample to .h5ad "
            "with obsm['spatial'] and use that."
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        adata = sc.read_visium(path, count_file=count_file)
    adata.var_names_make_unique()
    return adata


def read_h5ad(path: str | os.PathLike):
    """Read an ``.h5ad`` file whose ``obsm["spatial"]`` holds ``(x, y)`` level-0 pixel spot centres."""
    import anndata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"h5ad file {str(path)!r} does not exist.")
    adata = anndata.read_h5ad(path)
    if "spatial" not in adata.obsm:
        raise ValueError(
            f"{str(path)!r} has no obsm['spatial'] (spot centres as (x, y) level-0 pixels); add it before preparing."
        )
    adata.var_names_make_unique()
    return adata


def read_hest_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read a HEST sample's metadata JSON and return it with ``"mpp"`` set from its pixel size.

    HEST records ``pixel_size_um_embedded`` (from the slide file, may be null) and ``pixel_size_um_estimated``
    (from the spot lattice); the embedded one is preferred.
    """
    meta = read_json(path)
    for key in ("pixel_size_um_embedded", "pixel_size_um_estimated"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, float) and np.isnan(value)) and float(value) > 0:
            meta["mpp"], meta["mpp_key"] = float(value), key
            break
    else:
        meta["mpp"], meta["mpp_key"] = None, None
    return meta


def read_st(path: str | os.PathLike):
    """Read spatial transcriptomics from a Space Ranger folder or an ``.h5ad`` file (HEST samples are h5ad)."""
    path = Path(path)
    if path.is_dir():
        return read_spaceranger(path)
    if path.suffix == ".h5ad":
        return read_h5ad(path)
    raise ValueError(f"Cannot read {str(path)!r}: st_path must be a Space Ranger folder or an .h5ad file.")


def get_counts(adata, layer: str | None = None, name: str = "sample"):
    """Return ``(counts, gene_names)``: a CSR matrix of raw counts and the matching gene names.

    Looks in ``layer`` when given, else ``adata.raw`` when present, else ``X``, and checks that the values are counts.

    Raises:
        ValueError: the values are negative or not whole numbers (log-normalised or scaled data), naming ``name``.
    """
    from scipy import sparse

    if layer is not None:
        if layer not in adata.layers:
            raise ValueError(f"{name}: layer {layer!r} not found; available layers: {list(adata.layers)}.")
        matrix, genes, source = adata.layers[layer], list(adata.var_names), f"layer {layer!r}"
    elif adata.raw is not None:
        matrix, genes, source = adata.raw.X, list(adata.raw.var_names), "adata.raw"
    else:
        matrix, genes, source = adata.X, list(adata.var_names), "X"
    matrix = sparse.csr_matrix(matrix)
    values = matrix.data
    if values.size and values.min() < 0:
        raise ValueError(
            f"{name}: {source} has negative values (min {values.min():.4g}), so it is not raw counts (scaled data?). "
            "Provide raw counts: the Space Ranger matrix, adata.raw, or a counts layer (manifest column `layer`)."
        )
    if values.size and not np.all(np.equal(np.mod(values, 1), 0)):
        bad = values[np.mod(values, 1) != 0][:3]
        raise ValueError(
            f"{name}: {source} has non-integer values (e.g. {np.round(bad, 4).tolist()}), so it is not raw counts "
            "(it looks log-normalised). Provide raw counts: the Space Ranger matrix, adata.raw, or a counts layer "
            "(manifest column `layer`)."
        )
    return matrix, genes


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


def _radius_neighbors(xy: np.ndarray, radius: float, k: int = 6) -> np.ndarray:
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


def load_gene_panel(path: str | os.PathLike) -> list[str]:
    """Read the gene list of a ``gene_panel.json`` (``{"genes": [...]}``) or of a text file with one gene a line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Gene panel {str(path)!r} does not exist.")
    if path.suffix == ".json":
        data = read_json(path)
        genes = data.get("genes") if isinstance(data, dict) else data
        if not isinstance(genes, list) or not all(isinstance(g, str) for g in genes):
            raise ValueError(f"{str(path)!r} must hold {{\"genes\": [\"GENE1\", ...]}}.")
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


def _log_normalize(counts, library_size: np.ndarray, target_sum: float) -> np.ndarray:
    from scipy import sparse

    scaled = sparse.diags(target_sum / np.maximum(library_size, 1.0)) @ sparse.csr_matrix(counts, dtype=np.float64)
    return np.log1p(scaled.toarray()).astype(np.float32)


def select_gene_panel(
    counts: Sequence[Any], library_sizes: Sequence[np.ndarray], genes: Sequence[str], n_top_genes: int, target_sum: float
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
    x = sparse.vstack([sparse.csr_matrix(_log_normalize(c, s, target_sum)) for c, s in zip(counts, library_sizes)])
    adata = anndata.AnnData(X=x.tocsr())
    adata.var_names = list(genes)
    sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor="seurat")
    ranked = adata.var.sort_values("dispersions_norm", ascending=False)
    chosen = set(ranked.index[ranked["highly_variable"]][:n_top_genes])
    return [g for g in genes if g in chosen]


def _spot_table(adata) -> dict[str, np.ndarray]:
    obs = adata.obs
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
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
    return table


def _spot_diameter_px(adata) -> float | None:
    for library in (adata.uns.get("spatial") or {}).values():
        value = (library.get("scalefactors") or {}).get("spot_diameter_fullres")
        if value:
            return float(value)
    return None


def _check_geometry(sample: str, table: dict, slide, diameter_px: float | None, spot_spacing_um: float | None) -> None:
    """Raise when the spots do not fit the slide or the lattice spacing does not fit the pixel size."""
    height, width = slide.size
    tissue = table["in_tissue"] == 1
    x, y = table["x"][tissue], table["y"][tissue]
    outside = (x < 0) | (y < 0) | (x >= width) | (y >= height)
    if outside.any():
        examples = [
            f"{b} at (x={xx:.0f}, y={yy:.0f})"
            for b, xx, yy in zip(table["barcode"][tissue][outside][:3], x[outside][:3], y[outside][:3])
        ]
        raise ValueError(
            f"Sample {sample!r}: {int(outside.sum())} of {int(tissue.sum())} in-tissue spot centres lie outside the slide "
            f"{slide.path!r} ({width} x {height} px), e.g. {', '.join(examples)}; spots span x {x.min():.0f}-{x.max():.0f}, "
            f"y {y.min():.0f}-{y.max():.0f}. The coordinates do not belong to this slide at this scale: check that the "
            "slide is the full-resolution image the spots were aligned to and that the coordinates are full-resolution "
            "pixels (not hires/lowres image pixels: divide by tissue_hires_scalef)."
        )
    mpp = slide.mpp
    if diameter_px is not None:
        diameter_um = diameter_px * mpp
        if not 0.6 * VISIUM_SPOT_DIAMETER_UM <= diameter_um <= 1.6 * VISIUM_SPOT_DIAMETER_UM:
            raise ValueError(
                f"Sample {sample!r}: spot_diameter_fullres = {diameter_px:.1f} px at {mpp} um/px means {diameter_um:.1f} um "
                f"spots, but Visium spots are {VISIUM_SPOT_DIAMETER_UM:.0f} um: the pixel size (mpp) or the scale factors "
                "do not match this slide."
            )
    if spot_spacing_um and "array_row" in table:
        r, c = table["array_row"], table["array_col"]
        idx = {(a, b): i for i, (a, b) in enumerate(zip(r, c))}
        pairs = [(i, idx[(a, b + 2)]) for i, (a, b) in enumerate(zip(r, c)) if (a, b + 2) in idx]
        if pairs:
            i, j = np.asarray(pairs).T
            spacing_um = float(np.median(np.hypot(table["x"][i] - table["x"][j], table["y"][i] - table["y"][j]))) * mpp
            if abs(spacing_um - spot_spacing_um) > 0.25 * spot_spacing_um:
                raise ValueError(
                    f"Sample {sample!r}: neighbouring spots are {spacing_um:.1f} um apart at {mpp} um/px, but the array "
                    f"spacing is {spot_spacing_um:.0f} um: the pixel size (mpp) or the coordinates' scale is wrong."
                )


def prepare_dataset(
    manifest: str | os.PathLike,
    output_dir: str | os.PathLike,
    fov_um: float = 128.0,
    genes: Sequence[str] | None = None,
    n_top_genes: int = 256,
    min_counts: int = 100,
    target_sum: float = 1e4,
    backend: str | None = None,
    spot_spacing_um: float | None = 100.0,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict[str, Any]:
    """Build a dataset folder (see the module docstring) from a manifest of samples.

    The folder is assembled in a temporary sibling and renamed into place at the end, so a failure leaves no
    half-written dataset.

    Args:
        manifest: CSV read by :func:`read_manifest`.
        output_dir: dataset folder to create.
        fov_um: patch field of view in micrometres; spots whose patch would leave the slide are dropped.
        genes: explicit gene panel; None selects the ``n_top_genes`` most variable genes of the training samples.
        n_top_genes: panel size when ``genes`` is None.
        min_counts: spots with fewer total counts are dropped.
        target_sum: ``normalize_total`` target before ``log1p``.
        backend: slide reader for pixel sizes and dimensions (None: the best available).
        spot_spacing_um: expected centre-to-centre spacing of the array (100 for Visium), checked against the pixel
            size; None skips the check.
        overwrite: replace an existing dataset folder.
        verbose: print the QC summary.

    Returns:
        The QC summary (also written to ``qc_summary.json``).
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"Dataset folder {str(output_dir)!r} exists and is not empty; pass overwrite=True to replace it.")
    if fov_um <= 0:
        raise ValueError(f"fov_um must be positive micrometres, got {fov_um}.")
    rows = read_manifest(manifest)

    samples = []
    for row in rows:
        adata = read_st(row.st_path)
        counts, sample_genes = get_counts(adata, row.layer, name=f"sample {row.sample_id!r} ({row.st_path})")
        mpp, mpp_source = row.mpp, "manifest"
        if mpp is None and row.metadata_path is not None:
            meta = read_hest_metadata(row.metadata_path)
            mpp, mpp_source = meta["mpp"], f"hest:{meta['mpp_key']}"
        slide = read_slide_info(row.slide_path, backend=backend, mpp=mpp)
        if slide.mpp_source == "explicit":
            slide.mpp_source = mpp_source
        table = _spot_table(adata)
        _check_geometry(row.sample_id, table, slide, _spot_diameter_px(adata), spot_spacing_um)
        samples.append((row, counts, sample_genes, slide, table))

    # genes measured in every sample, in the first sample's order
    common = set(samples[0][2])
    for s in samples[1:]:
        common &= set(s[2])
    all_genes = [g for g in samples[0][2] if g in common]
    if genes is not None:
        genes = [str(g) for g in genes]
        for row, _, sample_genes, _, _ in samples:
            absent = [g for g in genes if g not in set(sample_genes)]
            if absent:
                raise ValueError(
                    f"{len(absent)} gene(s) of the requested panel are absent from sample {row.sample_id!r}: "
                    f"{absent[:20]}{' ...' if len(absent) > 20 else ''}. Check the spelling (gene symbols, e.g. "
                    "'EPCAM'), or remove them from the panel."
                )

    # QC
    summary: dict[str, Any] = {"samples": {}}
    kept_per_sample = []
    for row, counts, sample_genes, slide, table in samples:
        library = np.asarray(counts.sum(axis=1)).ravel()
        half = fov_um / slide.mpp / 2.0
        height, width = slide.size
        reason = np.full(len(library), "", dtype=object)
        reason[table["in_tissue"] != 1] = "not_in_tissue"
        low = (reason == "") & (library < min_counts)
        reason[low] = "too_few_counts"
        leaves = (reason == "") & (
            (table["x"] - half < 0) | (table["y"] - half < 0) | (table["x"] + half > width) | (table["y"] + half > height)
        )
        reason[leaves] = "patch_leaves_slide"
        kept = reason == ""
        kept_per_sample.append((kept, library, reason))
        summary["samples"][row.sample_id] = {
            "split": row.split,
            "spots": int(len(library)),
            "kept": int(kept.sum()),
            "not_in_tissue": int((reason == "not_in_tissue").sum()),
            "too_few_counts": int((reason == "too_few_counts").sum()),
            "patch_leaves_slide": int((reason == "patch_leaves_slide").sum()),
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
        }
        if not kept.any():
            raise ValueError(
                f"Sample {row.sample_id!r} keeps no spot after QC ({summary['samples'][row.sample_id]}); check min_counts "
                f"({min_counts}), fov_um ({fov_um}) and the in_tissue flags."
            )

    # gene panel
    if genes is None:
        train = [i for i, s in enumerate(samples) if s[0].split == "train"]
        if not train:
            raise ValueError("No sample has split 'train': the gene panel is chosen on training samples only.")
        gene_pos = [{g: j for j, g in enumerate(s[2])} for s in samples]
        matrices = [samples[i][1][kept_per_sample[i][0]][:, [gene_pos[i][g] for g in all_genes]] for i in train]
        libraries = [kept_per_sample[i][1][kept_per_sample[i][0]] for i in train]
        genes = select_gene_panel(matrices, libraries, all_genes, n_top_genes, target_sum)
        selection = {
            "method": "highly_variable_genes",
            "flavor": "seurat",
            "n_top_genes": n_top_genes,
            "samples": [samples[i][0].sample_id for i in train],
        }
    else:
        selection = {"method": "given"}

    # stores and datalist
    expression_parts, count_parts, spot_rows = [], [], []
    datalist: dict[str, list] = {key: [] for key in SPLIT_KEYS.values()}
    offset = 0
    for (row, counts, sample_genes, slide, table), (kept, library, reason) in zip(samples, kept_per_sample):
        pos = {g: j for j, g in enumerate(sample_genes)}
        panel_counts = counts[kept][:, [pos[g] for g in genes]]
        count_parts.append(panel_counts.toarray().astype(np.int32))
        expression_parts.append(_log_normalize(panel_counts, library[kept], target_sum))
        kept_idx = np.flatnonzero(kept)
        if "array_row" in table:
            neighbors = hex_neighbors(table["array_row"][kept], table["array_col"][kept])
        else:
            xy = np.stack([table["x"][kept], table["y"][kept]], axis=1)
            neighbors = _radius_neighbors(xy, radius=1.25 * (spot_spacing_um or 100.0) / slide.mpp)
        neighbors = np.where(neighbors >= 0, neighbors + offset, -1)
        for local, i in enumerate(kept_idx):
            datalist[SPLIT_KEYS[row.split]].append(
                {
                    "image": str(Path(slide.path).resolve()),
                    "location": [float(table["x"][i]), float(table["y"][i])],
                    "mpp": slide.mpp,
                    "expression": offset + local,
                    "neighbors": neighbors[local].tolist(),
                    "sample": row.sample_id,
                    "patient": row.patient,
                    "barcode": str(table["barcode"][i]),
                    "split": row.split,
                    "library_size": float(library[i]),
                }
            )
        for i in range(len(library)):
            spot_rows.append(
                [row.sample_id, table["barcode"][i], f"{table['x'][i]:.2f}", f"{table['y'][i]:.2f}", int(library[i]),
                 reason[i] or "kept"]
            )
        offset += len(kept_idx)

    summary["total_kept"] = offset
    summary["genes"] = len(genes)
    summary["splits"] = {k: len(v) for k, v in datalist.items()}
    panel = {
        "genes": list(genes),
        "normalization": {
            "method": "normalize_total+log1p",
            "target_sum": target_sum,
            "library_size": "total counts of the spot over all measured genes",
            "null_value": -1.0,
        },
        "selection": selection,
    }
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        np.save(staging / "expression.npy", np.concatenate(expression_parts, axis=0))
        np.save(staging / "counts.npy", np.concatenate(count_parts, axis=0))
        write_json_atomic(staging / "datalist.json", datalist)
        write_json_atomic(staging / "gene_panel.json", panel)
        write_json_atomic(staging / "qc_summary.json", summary)
        with (staging / "spots.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sample", "barcode", "x", "y", "total_counts", "qc"])
            writer.writerows(spot_rows)
        write_json_atomic(
            staging / "dataset.json",
            {
                "manifest": str(Path(manifest).resolve()),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "fov_um": fov_um,
                "min_counts": min_counts,
                "spot_spacing_um": spot_spacing_um,
                "num_spots": offset,
                "num_genes": len(genes),
                "stores": {"expression.npy": "log1p(normalize_total) float32", "counts.npy": "raw counts int32"},
            },
        )
        replace_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if verbose:
        print(format_qc_summary(summary))
    return summary


def format_qc_summary(summary: dict[str, Any]) -> str:
    """The QC summary as a plain-text table: spots kept and dropped per sample, and why."""
    head = f"{'sample':<16}{'split':<7}{'spots':>7}{'kept':>7}{'not_in_tissue':>15}{'too_few_counts':>16}{'patch_leaves_slide':>20}{'mpp':>8}"
    lines = [head, "-" * len(head)]
    for sid, s in summary["samples"].items():
        lines.append(
            f"{sid:<16}{s['split']:<7}{s['spots']:>7}{s['kept']:>7}{s['not_in_tissue']:>15}{s['too_few_counts']:>16}"
            f"{s['patch_leaves_slide']:>20}{s['mpp']:>8.3f}"
        )
    lines.append(f"kept {summary['total_kept']} spots, {summary['genes']} genes; per split: {summary['splits']}")
    return "\n".join(lines)
