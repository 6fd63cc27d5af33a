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
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bundle.geometry import (
    HEX_OFFSETS,
    NEIGHBOR_RADIUS_PITCHES,
    VISIUM_PITCH_UM,
    VISIUM_SPOT_DIAMETER_UM,
    spot_neighbors,
)
from bundle.io.gene_panel import probe_genes, select_gene_panel
from bundle.io.slides import SlideInfo, read_slide_info
from bundle.io.spots import (
    get_counts,
    library_sizes,
    log_normalize,
    read_hest_metadata,
    read_st,
    spot_diameter_px,
    spot_table,
)
from bundle.io.tissue import MIN_TISSUE_FRACTION, TISSUE_MARGIN_UM, spot_tissue_fractions
from bundle.utils import check_writable, staging_dir, write_json_atomic

# manifest split name -> datalist key (MONAI decathlon layout)
SPLIT_KEYS = {"train": "training", "val": "validation", "test": "test"}
# why a spot is dropped, in the order the checks run (``spots.csv``'s ``qc`` column, ``qc_summary.json``'s counts)
DROP_REASONS = ("not_in_tissue", "on_background", "too_few_counts", "patch_leaves_slide")
# a sample with a larger share of its in-tissue spots on background is refused (spots and slide do not line up)
MAX_BACKGROUND_SHARE = 0.1


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
        if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
            raise ValueError(
                f"{where}: mpp {mpp_text!r} of sample {sid!r} is not a pixel size: give the scan's level-0 pixel size in "
                "um/px (0.25 at 40x, 0.5 at 20x), or leave the cell empty to read it from the slide."
            )
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
            "slide is the full-resolution image the spots were aligned to, that x and y are not swapped (x = column, "
            f"y = row{'; swapped, they would fit' if _fits_swapped(x, y, width, height) else ''}) and that the "
            "coordinates are full-resolution pixels (not hires/lowres image pixels: divide by tissue_hires_scalef)."
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
        dr, dc = HEX_OFFSETS[1]  # the next spot along an array row, one pitch away
        pairs = [(i, idx[(a + dr, b + dc)]) for i, (a, b) in enumerate(zip(r, c)) if (a + dr, b + dc) in idx]
        if pairs:
            i, j = np.asarray(pairs).T
            spacing_um = float(np.median(np.hypot(table["x"][i] - table["x"][j], table["y"][i] - table["y"][j]))) * mpp
            if abs(spacing_um - spot_spacing_um) > 0.25 * spot_spacing_um:
                raise ValueError(
                    f"Sample {sample!r}: neighbouring spots are {spacing_um:.1f} um apart at {mpp} um/px, but the array "
                    f"spacing is {spot_spacing_um:.0f} um: the pixel size (mpp) or the coordinates' scale is wrong."
                )


def _fits_swapped(x: np.ndarray, y: np.ndarray, width: int, height: int) -> bool:
    """Whether the spots would lie on the slide with x and y exchanged."""
    return bool(((y >= 0) & (x >= 0) & (y < width) & (x < height)).all())


def _check_tissue(
    sample: str, table: dict, slide: SlideInfo, backend: str | None, fov_um: float, max_background_share: float
) -> np.ndarray:
    """Tissue fraction of each spot's patch (NaN for spots not in tissue); raise when too many in-tissue spots lie
    on background, which means the coordinates and the slide do not line up."""
    fractions = np.full(len(table["x"]), np.nan)
    tissue = table["in_tissue"] == 1
    if not tissue.any():
        return fractions
    xy = np.stack([table["x"][tissue], table["y"][tissue]], axis=1)
    fractions[tissue] = spot_tissue_fractions(slide.path, backend, slide.downsamples, slide.mpp, xy, fov_um)
    refusal = background_refusal(sample, fractions, slide.path, fov_um, max_background_share)
    if refusal is not None:
        raise ValueError(refusal)
    return fractions


def background_refusal(
    sample: str, fractions: np.ndarray, slide_path: str, fov_um: float, max_background_share: float
) -> str | None:
    """The refusal message when more than ``max_background_share`` of the in-tissue spots (finite ``fractions``) lie
    on background, else None."""
    measured = np.isfinite(fractions)
    if not measured.any():
        return None
    background = int((fractions[measured] < MIN_TISSUE_FRACTION).sum())
    share = background / int(measured.sum())
    if share <= max_background_share:
        return None
    return (
        f"Sample {sample!r}: {background} of {int(measured.sum())} in-tissue spots ({100 * share:.0f}%) lie on "
        f"background (less than {MIN_TISSUE_FRACTION:.0%} tissue within {TISSUE_MARGIN_UM:.0f} um of their "
        f"{fov_um:g} um patch) on slide {slide_path!r}, more than max_background_share = {max_background_share:g}. "
        "The spots do not line up with the tissue: check that x and y are not swapped (x = column, y = row), that "
        "the coordinates are full-resolution pixels (not hires/lowres image pixels: divide by "
        "tissue_hires_scalef), and that this is the slide the spots were aligned to, not a wrong slide. If the "
        "tissue really is this faint, raise max_background_share."
    )


@dataclass
class Sample:
    """One manifest sample while the dataset is built: its counts, slide and spot table, then its QC outcome."""

    row: ManifestRow
    counts: Any  # CSR raw counts, (spots, genes)
    genes: list[str]
    slide: SlideInfo
    table: dict[str, np.ndarray]
    library: np.ndarray | None = None
    reason: np.ndarray | None = None  # per spot: "" (kept) or why it was dropped
    tissue: np.ndarray | None = None  # per spot: tissue fraction of its patch (NaN where not measured)
    features: str = ""  # what the matrix's features were: genes, or probes summed to genes

    @property
    def kept(self) -> np.ndarray:
        return self.reason == ""


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse, before any input is read, an output location that cannot be written, a file, or a non-empty folder
    without ``overwrite``."""
    check_writable(output_dir, "dataset folder")
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"Dataset folder {str(output_dir)!r} is a file; choose a folder path for the dataset.")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Dataset folder {str(output_dir)!r} exists and is not empty; pass overwrite=True to replace it."
        )


def read_sample(
    row: ManifestRow,
    backend: str | None,
    spot_spacing_um: float | None,
    fov_um: float = 128.0,
    max_background_share: float = MAX_BACKGROUND_SHARE,
) -> Sample:
    """Read one sample's counts, slide (pixel size from the manifest, the HEST metadata or the slide) and spots, and
    check that the spots fit the slide and land on its tissue."""
    adata = read_st(row.st_path)
    counts, sample_genes = get_counts(adata, row.layer, name=f"sample {row.sample_id!r} ({row.st_path})")
    mpp, mpp_source = row.mpp, "manifest"
    if mpp is None and row.metadata_path is not None:
        meta = read_hest_metadata(row.metadata_path)
        mpp, mpp_source = meta["mpp"], f"hest:{meta['mpp_key']}"
    slide = read_slide_info(row.slide_path, backend=backend, mpp=mpp)
    if slide.mpp_source == "explicit":
        slide.mpp_source = mpp_source
    table = spot_table(adata)
    _check_geometry(row.sample_id, table, slide, spot_diameter_px(adata), spot_spacing_um)
    tissue = _check_tissue(row.sample_id, table, slide, backend, fov_um, max_background_share)
    probes = probe_genes(adata.var_names, adata.var)
    features = f"{adata.n_vars} probes -> {len(sample_genes)} genes" if probes else f"{len(sample_genes)} genes"
    return Sample(row, counts, sample_genes, slide, table, tissue=tissue, features=features)


def _common_genes(samples: Sequence[Sample]) -> list[str]:
    """Genes measured in every sample, in the first sample's order."""
    common = set(samples[0].genes)
    for sample in samples[1:]:
        common &= set(sample.genes)
    return [g for g in samples[0].genes if g in common]


def _check_requested_panel(genes: Sequence[str], samples: Sequence[Sample]) -> list[str]:
    """The requested panel as strings; raises naming the genes a sample lacks."""
    genes = [str(g) for g in genes]
    for sample in samples:
        absent = [g for g in genes if g not in set(sample.genes)]
        if absent:
            raise ValueError(
                f"{len(absent)} gene(s) of the requested panel are absent from sample {sample.row.sample_id!r}: "
                f"{absent[:20]}{' ...' if len(absent) > 20 else ''}. Check the spelling (gene symbols, e.g. "
                "'EPCAM'), or remove them from the panel."
            )
    return genes


def quality_control(sample: Sample, fov_um: float, min_counts: int) -> dict[str, Any]:
    """Mark why each spot is dropped (:data:`DROP_REASONS`, first match wins); return the summary."""
    table, slide = sample.table, sample.slide
    library = library_sizes(sample.counts)
    half = fov_um / slide.mpp / 2.0
    height, width = slide.size
    reason = np.full(len(library), "", dtype=object)
    reason[table["in_tissue"] != 1] = "not_in_tissue"
    if sample.tissue is not None:
        reason[(reason == "") & (sample.tissue < MIN_TISSUE_FRACTION)] = "on_background"
    low = (reason == "") & (library < min_counts)
    reason[low] = "too_few_counts"
    leaves = (reason == "") & (
        (table["x"] - half < 0) | (table["y"] - half < 0) | (table["x"] + half > width) | (table["y"] + half > height)
    )
    reason[leaves] = "patch_leaves_slide"
    sample.library, sample.reason = library, reason
    summary = {
        "split": sample.row.split,
        "spots": int(len(library)),
        "kept": int(sample.kept.sum()),
        **{why: int((reason == why).sum()) for why in DROP_REASONS},
        "mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
    }
    if not sample.kept.any():
        raise ValueError(
            f"Sample {sample.row.sample_id!r} keeps no spot after QC ({summary}); check min_counts ({min_counts}), "
            f"fov_um ({fov_um}), the in_tissue flags and whether the spots lie on the slide's tissue."
        )
    return summary


def _gene_columns(sample: Sample, genes: Sequence[str]) -> list[int]:
    """Column of each of ``genes`` in the sample's count matrix."""
    position = {g: j for j, g in enumerate(sample.genes)}
    return [position[g] for g in genes]


def _choose_panel(
    samples: Sequence[Sample], genes: list[str] | None, all_genes: list[str], n_top_genes: int, target_sum: float
) -> tuple[list[str], dict[str, Any]]:
    """The gene panel and how it was chosen: as given, or the most variable genes of the kept training spots."""
    if genes is not None:
        return genes, {"method": "given"}
    train = [s for s in samples if s.row.split == "train"]
    if not train:
        raise ValueError("No sample has split 'train': the gene panel is chosen on training samples only.")
    matrices = [s.counts[s.kept][:, _gene_columns(s, all_genes)] for s in train]
    libraries = [s.library[s.kept] for s in train]
    genes = select_gene_panel(matrices, libraries, all_genes, n_top_genes, target_sum)
    selection = {
        "method": "highly_variable_genes",
        "flavor": "seurat",
        "n_top_genes": n_top_genes,
        "samples": [s.row.sample_id for s in train],
    }
    return genes, selection


def _datalist_entries(sample: Sample, offset: int, spot_spacing_um: float | None) -> list[dict[str, Any]]:
    """Datalist entries of a sample's kept spots; their expression rows start at ``offset``."""
    table, slide, kept = sample.table, sample.slide, sample.kept
    lattice = "array_row" in table
    neighbors = spot_neighbors(
        table["array_row"][kept] if lattice else None,
        table["array_col"][kept] if lattice else None,
        np.stack([table["x"][kept], table["y"][kept]], axis=1),
        radius=NEIGHBOR_RADIUS_PITCHES * (spot_spacing_um or VISIUM_PITCH_UM) / slide.mpp,
    )
    neighbors = np.where(neighbors >= 0, neighbors + offset, -1)
    image = str(Path(slide.path).resolve())
    return [
        {
            "image": image,
            "location": [float(table["x"][i]), float(table["y"][i])],
            "mpp": slide.mpp,
            "expression": offset + local,
            "neighbors": neighbors[local].tolist(),
            "sample": sample.row.sample_id,
            "patient": sample.row.patient,
            "barcode": str(table["barcode"][i]),
            "split": sample.row.split,
            "library_size": float(sample.library[i]),
        }
        for local, i in enumerate(np.flatnonzero(kept))
    ]


def _spot_rows(sample: Sample) -> list[list]:
    """``spots.csv`` rows of every spot of a sample, kept or not."""
    table = sample.table
    return [
        [
            sample.row.sample_id,
            table["barcode"][i],
            f"{table['x'][i]:.2f}",
            f"{table['y'][i]:.2f}",
            int(sample.library[i]),
            sample.reason[i] or "kept",
        ]
        for i in range(len(sample.library))
    ]


def _assemble(
    samples: Sequence[Sample], genes: list[str], target_sum: float, spot_spacing_um: float | None
) -> dict[str, Any]:
    """The expression and count stores, the datalist and the ``spots.csv`` rows of all samples' kept spots."""
    expression_parts, count_parts, spot_rows = [], [], []
    datalist: dict[str, list] = {key: [] for key in SPLIT_KEYS.values()}
    offset = 0
    for sample in samples:
        kept = sample.kept
        panel_counts = sample.counts[kept][:, _gene_columns(sample, genes)]
        count_parts.append(panel_counts.toarray().astype(np.int32))
        expression_parts.append(log_normalize(panel_counts, sample.library[kept], target_sum))
        datalist[SPLIT_KEYS[sample.row.split]].extend(_datalist_entries(sample, offset, spot_spacing_um))
        spot_rows.extend(_spot_rows(sample))
        offset += int(kept.sum())
    return {
        "expression": np.concatenate(expression_parts, axis=0),
        "counts": np.concatenate(count_parts, axis=0),
        "datalist": datalist,
        "spot_rows": spot_rows,
        "num_spots": offset,
    }


def _panel_record(genes: list[str], target_sum: float, selection: dict[str, Any]) -> dict[str, Any]:
    """The ``gene_panel.json`` contents: genes, normalisation and how the genes were selected."""
    return {
        "genes": list(genes),
        "normalization": {
            "method": "normalize_total+log1p",
            "target_sum": target_sum,
            "library_size": "total counts of the spot over all measured genes",
            "null_value": -1.0,
        },
        "selection": selection,
    }


def _write_dataset(output_dir: Path, stores: dict[str, Any], files: dict[str, Any]) -> None:
    """Write the stores, ``spots.csv`` and the JSON ``files`` into a staging sibling, then rename it into place.

    :func:`bundle.utils.staging_dir`: stale staging folders of killed runs are removed first, the folder and files
    get the umask's permissions, a failure leaves nothing behind and a full disk is reported naming ``output_dir``.
    """
    with staging_dir(output_dir, "dataset folder") as staging:
        np.save(staging / "expression.npy", stores["expression"])
        np.save(staging / "counts.npy", stores["counts"])
        for name, content in files.items():
            write_json_atomic(staging / name, content)
        with (staging / "spots.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sample", "barcode", "x", "y", "total_counts", "qc"])
            writer.writerows(stores["spot_rows"])


def prepare_dataset(
    manifest: str | os.PathLike,
    output_dir: str | os.PathLike,
    fov_um: float = 128.0,
    genes: Sequence[str] | None = None,
    n_top_genes: int = 256,
    min_counts: int = 100,
    target_sum: float = 1e4,
    backend: str | None = None,
    spot_spacing_um: float | None = VISIUM_PITCH_UM,
    max_background_share: float = MAX_BACKGROUND_SHARE,
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
        max_background_share: a sample whose share of in-tissue spots lying on background (no tissue in their patch
            on the slide's thumbnail) exceeds this is refused: the coordinates and the slide do not line up (x/y
            swapped, hires/lowres pixels, wrong slide). Such spots of accepted samples are dropped as
            ``on_background``. 1 turns the refusal off.
        overwrite: replace an existing dataset folder.
        verbose: print the QC summary.

    Returns:
        The QC summary (also written to ``qc_summary.json``).
    """
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    if fov_um <= 0:
        raise ValueError(f"fov_um must be positive micrometres, got {fov_um}.")
    if not 0.0 <= max_background_share <= 1.0:
        raise ValueError(f"max_background_share must be a share between 0 and 1, got {max_background_share}.")
    samples = [
        read_sample(row, backend, spot_spacing_um, fov_um, max_background_share) for row in read_manifest(manifest)
    ]
    all_genes = _common_genes(samples)
    if genes is not None:
        genes = _check_requested_panel(genes, samples)
    summary: dict[str, Any] = {"samples": {}}
    for sample in samples:
        summary["samples"][sample.row.sample_id] = quality_control(sample, fov_um, min_counts)
    genes, selection = _choose_panel(samples, genes, all_genes, n_top_genes, target_sum)
    stores = _assemble(samples, genes, target_sum, spot_spacing_um)
    summary["total_kept"] = stores["num_spots"]
    summary["genes"] = len(genes)
    summary["splits"] = {k: len(v) for k, v in stores["datalist"].items()}
    record = {
        "manifest": str(Path(manifest).resolve()),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fov_um": fov_um,
        "min_counts": min_counts,
        "spot_spacing_um": spot_spacing_um,
        "max_background_share": max_background_share,
        "num_spots": stores["num_spots"],
        "num_genes": len(genes),
        "stores": {"expression.npy": "log1p(normalize_total) float32", "counts.npy": "raw counts int32"},
    }
    files = {
        "datalist.json": stores["datalist"],
        "gene_panel.json": _panel_record(genes, target_sum, selection),
        "qc_summary.json": summary,
        "dataset.json": record,
    }
    _write_dataset(output_dir, stores, files)
    if verbose:
        print(format_qc_summary(summary))
    return summary


def format_qc_summary(summary: dict[str, Any]) -> str:
    """The QC summary as a plain-text table: spots kept and dropped per sample, and why."""
    widths = {why: len(why) + 2 for why in DROP_REASONS}
    head = f"{'sample':<16}{'split':<7}{'spots':>7}{'kept':>7}" + "".join(f"{k:>{w}}" for k, w in widths.items())
    head += f"{'mpp':>8}"
    lines = [head, "-" * len(head)]
    for sid, s in summary["samples"].items():
        counts = "".join(f"{s.get(k, 0):>{w}}" for k, w in widths.items())
        lines.append(f"{sid:<16}{s['split']:<7}{s['spots']:>7}{s['kept']:>7}{counts}{s['mpp']:>8.3f}")
    lines.append(f"kept {summary['total_kept']} spots, {summary['genes']} genes; per split: {summary['splits']}")
    return "\n".join(lines)
