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
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bundle.geometry import (
    MAX_LATTICE_RESIDUAL,
    NEIGHBOR_RADIUS_PITCHES,
    PITCH_TOLERANCE,
    SPACERANGER_DIAMETER_FULLRES_UM,
    PitchFit,
    Technology,
    fit_pixel_size,
    get_technology,
    spot_neighbors,
)
from bundle.io.gene_panel import probe_genes, select_gene_panel
from bundle.io.manifest import SPLIT_KEYS, ManifestRow, read_manifest
from bundle.io.slides import MissingPixelSize, SlideInfo, read_slide_info
from bundle.io.spots import (
    get_counts,
    library_sizes,
    log_normalize,
    read_hest_metadata,
    read_st,
    spot_diameter_px,
    spot_table,
    technology_name,
)
from bundle.io.tissue import MIN_TISSUE_FRACTION, TISSUE_MARGIN_UM, spot_tissue_fractions
from bundle.utils import check_writable, read_json, staging_dir, write_json_atomic

logger = logging.getLogger(__name__)

# why a spot is dropped, in the order the checks run (``spots.csv``'s ``qc`` column, ``qc_summary.json``'s counts)
DROP_REASONS = ("not_in_tissue", "on_background", "too_few_counts", "patch_leaves_slide")
# a sample with a larger share of its in-tissue spots on background is refused (spots and slide do not line up)
MAX_BACKGROUND_SHARE = 0.1


def _check_on_slide(sample: str, table: dict, slide) -> None:
    """Raise when in-tissue spot centres lie outside the slide."""
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


def _check_pitch(sample: str, mpp: float, source: str, geometry: "SpotGeometry", tolerance: float | None) -> None:
    """Raise when the pixel size ``mpp`` contradicts the one fitted to the spot array by more than ``tolerance``."""
    fit = geometry.fit
    if tolerance is None or fit is None or abs(mpp - fit.mpp) <= tolerance * fit.mpp:
        return
    tech = geometry.technology
    raise ValueError(
        f"Sample {sample!r}: the pixel size {mpp:.4g} um/px ({source}) contradicts the spot pitch: the "
        f"{tech.name} array ({tech.lattice} lattice, {tech.pitch_um:g} um pitch) fits the spot centres at "
        f"{fit.mpp:.4g} um/px ({100 * abs(mpp / fit.mpp - 1):.1f}% apart, more than pitch_tolerance = "
        f"{tolerance:g}). Check the manifest's mpp, the slide (is it the full-resolution image the spots were "
        "aligned to?) and the technology; leave mpp empty to use the fitted value for a slide without one."
    )


def _check_diameter(sample: str, mpp: float, geometry: "SpotGeometry", diameter_px: float | None) -> None:
    """Raise when Space Ranger's ``spot_diameter_fullres`` does not fit the pixel size."""
    if diameter_px is None or geometry.technology.name != "visium":
        return
    diameter_um = diameter_px * mpp
    if not 0.8 * SPACERANGER_DIAMETER_FULLRES_UM <= diameter_um <= 1.25 * SPACERANGER_DIAMETER_FULLRES_UM:
        raise ValueError(
            f"Sample {sample!r}: spot_diameter_fullres = {diameter_px:.1f} px at {mpp} um/px is {diameter_um:.1f} um, "
            f"but Space Ranger's value spans {SPACERANGER_DIAMETER_FULLRES_UM:.0f} um: the pixel size (mpp) or the "
            "scale factors do not match this slide."
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
    geometry: "SpotGeometry | None" = None  # technology and fitted pixel size

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


@dataclass
class SpotGeometry:
    """A sample's spot technology and the pixel size fitted from its array (None without array coordinates)."""

    technology: Technology
    fit: PitchFit | None = None

    def record(self) -> dict[str, Any]:
        """The geometry as ``qc_summary.json`` records it."""
        tech = self.technology
        record = {
            "technology": tech.name,
            "lattice": tech.lattice,
            "spot_diameter_um": tech.spot_diameter_um,
            "pitch_um": tech.pitch_um,
            "num_neighbors": tech.num_neighbors,
        }
        if self.fit is not None:
            record["mpp_fit"] = {"mpp": self.fit.mpp, "residual_um": self.fit.residual_um, "spots": self.fit.num_spots}
        return record


def _hest_metadata(row: ManifestRow) -> dict[str, Any] | None:
    """The row's HEST metadata, checked to describe this sample (its ``id`` is the sample's HEST id)."""
    if row.metadata_path is None:
        return None
    meta = read_hest_metadata(row.metadata_path)
    named = meta.get("id") or meta.get("sample_id")
    expected = {row.sample_id, Path(row.st_path).name.split(".")[0], Path(row.slide_path).name.split(".")[0]}
    if named is not None and str(named) not in expected:
        raise ValueError(
            f"HEST metadata {str(row.metadata_path)!r} describes sample {named!r}, but it is given for sample "
            f"{row.sample_id!r} ({Path(row.st_path).name}): each sample needs its own metadata/<id>.json (its pixel "
            "size and spot geometry). Point metadata_path at the right file."
        )
    return meta


def _number(value: Any) -> float | None:
    """A finite positive number from metadata, else None."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def spot_geometry(
    row: ManifestRow, adata: Any, table: dict[str, np.ndarray], meta: dict | None, spot_spacing_um: float | None
) -> SpotGeometry:
    """The sample's technology (manifest, HEST metadata, the reader's, else Visium; ``spot_spacing_um`` overrides
    the pitch) and the pixel size fitted from its array coordinates; raises when the spots do not lie on that
    technology's lattice."""
    meta = meta or {}
    name = row.technology or meta.get("st_technology") or technology_name(adata)
    technology = get_technology(
        name,
        _number(meta.get("spot_diameter")),
        spot_spacing_um or _number(meta.get("inter_spot_dist")),
        what=f"Sample {row.sample_id!r}: technology",
    )
    if "array_row" not in table:
        return SpotGeometry(technology)
    fit = fit_pixel_size(table["array_row_fit"], table["array_col_fit"], table["x"], table["y"], technology)
    if fit is not None and fit.residual_um > MAX_LATTICE_RESIDUAL * technology.pitch_um:
        raise ValueError(
            f"Sample {row.sample_id!r}: the spots do not lie on a {technology.name} array ({technology.lattice} "
            f"lattice, {technology.pitch_um:g} um pitch): their centres are {fit.residual_um:.1f} um (RMS) from the "
            "best-fitting one. Check the technology (manifest column `technology`: visium, st, visium_hd, xenium) "
            "and that array_row/array_col belong to these pixel positions."
        )
    return SpotGeometry(technology, fit)


def _given_mpp(row: ManifestRow, meta: dict | None) -> tuple[float | None, str]:
    """The pixel size given for the sample (manifest, else HEST metadata) and its source."""
    if row.mpp is not None:
        return row.mpp, "manifest"
    if meta is not None and meta.get("mpp") is not None:
        return meta["mpp"], f"hest:{meta['mpp_key']}"
    return None, ""


def _open_slide(
    row: ManifestRow, given: float | None, fit: PitchFit | None, backend: str | None, cache_dir: Path | None
) -> tuple[SlideInfo, str | None]:
    """The sample's slide (a plain image converted once into ``cache_dir``) and, when its pixel size was fitted
    from the array, ``"estimated"``."""
    from bundle.io.convert import converted_slide, needs_conversion

    path, estimated = Path(row.slide_path), None
    if needs_conversion(path):
        if given is None and fit is None:
            raise ValueError(
                f"Slide {str(path)!r} of sample {row.sample_id!r} is a plain image without a pixel size, and the "
                "spots have no array coordinates to fit one from: give the manifest's mpp (um/px)."
            )
        if cache_dir is None:
            raise ValueError(f"Slide {str(path)!r} is a plain image: a cache folder for its converted TIFF is needed.")
        path = converted_slide(path, given or fit.mpp, cache_dir, backend)
        estimated = None if given is not None else "estimated"
        return read_slide_info(path, backend=backend, mpp=given or fit.mpp), estimated
    try:
        return read_slide_info(path, backend=backend, mpp=given), None
    except MissingPixelSize:
        if fit is None:
            raise
    return read_slide_info(path, backend=backend, mpp=fit.mpp), "estimated"


def read_sample(
    row: ManifestRow,
    backend: str | None,
    spot_spacing_um: float | None = None,
    fov_um: float = 128.0,
    max_background_share: float = MAX_BACKGROUND_SHARE,
    pitch_tolerance: float | None = PITCH_TOLERANCE,
    cache_dir: str | os.PathLike | None = None,
) -> Sample:
    """Read one sample's counts, spot geometry and slide, and check that the spots fit the slide and its tissue.

    The pixel size comes from the manifest, the HEST metadata or the slide; a slide without one (a plain image, a
    bare TIFF) gets the one fitted from the spot array (:func:`bundle.geometry.fit_pixel_size`), recorded as
    ``estimated``. A given or recorded pixel size more than ``pitch_tolerance`` away from the fitted one is refused
    (None skips the check). Plain images are converted once into ``cache_dir`` (:mod:`bundle.io.convert`).
    """
    adata = read_st(row.st_path)
    counts, sample_genes = get_counts(adata, row.layer, name=f"sample {row.sample_id!r} ({row.st_path})")
    meta = _hest_metadata(row)
    table = spot_table(adata)
    geometry = spot_geometry(row, adata, table, meta, spot_spacing_um)
    given, source = _given_mpp(row, meta)
    if given is not None:  # before a plain image is converted with it
        _check_pitch(row.sample_id, given, source, geometry, pitch_tolerance)
    slide, estimated = _open_slide(row, given, geometry.fit, backend, None if cache_dir is None else Path(cache_dir))
    slide.mpp_source = estimated or (source if slide.mpp_source == "explicit" else slide.mpp_source)
    _check_on_slide(row.sample_id, table, slide)
    if slide.mpp_source == "slide":
        _check_pitch(row.sample_id, slide.mpp, "recorded in the slide", geometry, pitch_tolerance)
    _check_diameter(row.sample_id, slide.mpp, geometry, spot_diameter_px(adata))
    tissue = _check_tissue(row.sample_id, table, slide, backend, fov_um, max_background_share)
    probes = probe_genes(adata.var_names, adata.var)
    features = f"{adata.n_vars} probes -> {len(sample_genes)} genes" if probes else f"{len(sample_genes)} genes"
    return Sample(row, counts, sample_genes, slide, table, tissue=tissue, features=features, geometry=geometry)


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
        **(sample.geometry.record() if sample.geometry is not None else {}),
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
    samples: Sequence[Sample],
    genes: list[str] | None,
    all_genes: list[str],
    n_top_genes: int,
    target_sum: float,
    min_spot_fraction: float = 0.0,
) -> tuple[list[str], dict[str, Any]]:
    """The gene panel and how it was chosen: as given, or the most variable genes of the kept training spots."""
    if genes is not None:
        return genes, {"method": "given"}
    train = [s for s in samples if s.row.split == "train"]
    if not train:
        raise ValueError("No sample has split 'train': the gene panel is chosen on training samples only.")
    matrices = [s.counts[s.kept][:, _gene_columns(s, all_genes)] for s in train]
    libraries = [s.library[s.kept] for s in train]
    genes = select_gene_panel(matrices, libraries, all_genes, n_top_genes, target_sum, min_spot_fraction)
    selection = {
        "method": "highly_variable_genes",
        "flavor": "seurat",
        "n_top_genes": n_top_genes,
        "min_spot_fraction": min_spot_fraction,
        "samples": [s.row.sample_id for s in train],
    }
    return genes, selection


def _datalist_entries(sample: Sample, offset: int) -> list[dict[str, Any]]:
    """Datalist entries of a sample's kept spots; their expression rows start at ``offset``."""
    table, slide, kept = sample.table, sample.slide, sample.kept
    technology = sample.geometry.technology
    lattice = "array_row" in table
    neighbors = spot_neighbors(
        table["array_row"][kept] if lattice else None,
        table["array_col"][kept] if lattice else None,
        np.stack([table["x"][kept], table["y"][kept]], axis=1),
        radius=NEIGHBOR_RADIUS_PITCHES * technology.pitch_um / slide.mpp,
        technology=technology,
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


def _assemble(samples: Sequence[Sample], genes: list[str], target_sum: float) -> dict[str, Any]:
    """The expression and count stores, the datalist and the ``spots.csv`` rows of all samples' kept spots."""
    expression_parts, count_parts, spot_rows = [], [], []
    datalist: dict[str, list] = {key: [] for key in SPLIT_KEYS.values()}
    offset = 0
    for sample in samples:
        kept = sample.kept
        panel_counts = sample.counts[kept][:, _gene_columns(sample, genes)]
        count_parts.append(panel_counts.toarray().astype(np.int32))
        expression_parts.append(log_normalize(panel_counts, sample.library[kept], target_sum))
        datalist[SPLIT_KEYS[sample.row.split]].extend(_datalist_entries(sample, offset))
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


def _check_one_lattice(samples: Sequence[Sample]) -> int:
    """The number of neighbours every sample's lattice gives; raises when samples mix lattices."""
    counts = {s.row.sample_id: s.geometry.technology.num_neighbors for s in samples}
    if len(set(counts.values())) > 1:
        lattices = {s.row.sample_id: s.geometry.technology.lattice for s in samples}
        raise ValueError(
            f"The samples mix spot lattices {lattices}: a hexagonal array gives 6 neighbours, a square one 8, and the "
            "model's condition has one neighbour count. Prepare the technologies as separate datasets."
        )
    return next(iter(counts.values()))


def _panel_genes(samples, genes, include_genes, all_genes, n_top_genes, target_sum, min_spot_fraction):
    """The gene panel and its selection record: the given genes, or the most variable ones plus ``include_genes``."""
    if genes is not None:
        genes = _check_requested_panel(genes, samples)
    genes, selection = _choose_panel(samples, genes, all_genes, n_top_genes, target_sum, min_spot_fraction)
    extra = [g for g in _check_requested_panel(include_genes or [], samples) if g not in genes]
    if extra:
        selection = {**selection, "included": extra}
    return genes + extra, selection


def _slide_cache_dir(output_dir: Path, slide_cache_dir: str | os.PathLike | None) -> Path:
    """Where plain-image slides are converted: ``slide_cache_dir``, else ``<output_dir>_slides`` beside the dataset."""
    return Path(slide_cache_dir) if slide_cache_dir is not None else output_dir.with_name(output_dir.name + "_slides")


def prepare_dataset(
    manifest: str | os.PathLike,
    output_dir: str | os.PathLike,
    fov_um: float = 128.0,
    genes: Sequence[str] | None = None,
    n_top_genes: int = 256,
    min_counts: int = 100,
    target_sum: float = 1e4,
    backend: str | None = None,
    spot_spacing_um: float | None = None,
    max_background_share: float = MAX_BACKGROUND_SHARE,
    overwrite: bool = False,
    verbose: bool = True,
    pitch_tolerance: float | None = PITCH_TOLERANCE,
    split_by: str = "patient",
    include_genes: Sequence[str] | None = None,
    slide_cache_dir: str | os.PathLike | None = None,
    min_spot_fraction: float = 0.0,
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
        spot_spacing_um: centre-to-centre spacing of the array; None: the technology's (100 um Visium, 200 um legacy
            ST) or the HEST metadata's ``inter_spot_dist``.
        max_background_share: a sample whose share of in-tissue spots lying on background (no tissue in their patch
            on the slide's thumbnail) exceeds this is refused: the coordinates and the slide do not line up (x/y
            swapped, hires/lowres pixels, wrong slide). Such spots of accepted samples are dropped as
            ``on_background``. 1 turns the refusal off.
        overwrite: replace an existing dataset folder.
        verbose: print the QC summary.
        pitch_tolerance: a pixel size (given or recorded in the slide) further than this share from the one fitted to
            the spot array is refused; None skips the check.
        split_by: ``"patient"`` refuses a patient whose samples are in several splits; ``"sample"`` allows it (serial
            sections) and records it.
        include_genes: genes added to the selected panel (e.g. the genes of the edits to score).
        slide_cache_dir: where plain-image slides (JPEG, PNG, untiled TIFF) are converted to pyramidal TIFFs once;
            defaults to ``<output_dir>_slides`` beside the dataset folder.
        min_spot_fraction: genes detected in fewer than this share of the training spots are not selected (they may
            still be given in ``genes`` or ``include_genes``).

    Returns:
        The QC summary (also written to ``qc_summary.json``).
    """
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    if fov_um <= 0:
        raise ValueError(f"fov_um must be positive micrometres, got {fov_um}.")
    if not 0.0 <= max_background_share <= 1.0:
        raise ValueError(f"max_background_share must be a share between 0 and 1, got {max_background_share}.")
    cache_dir = _slide_cache_dir(output_dir, slide_cache_dir)
    samples = [
        read_sample(row, backend, spot_spacing_um, fov_um, max_background_share, pitch_tolerance, cache_dir)
        for row in read_manifest(manifest, split_by)
    ]
    num_neighbors = _check_one_lattice(samples)
    all_genes = _common_genes(samples)
    summary: dict[str, Any] = {"samples": {}}
    for sample in samples:
        summary["samples"][sample.row.sample_id] = quality_control(sample, fov_um, min_counts)
    genes, selection = _panel_genes(
        samples, genes, include_genes, all_genes, n_top_genes, target_sum, min_spot_fraction
    )
    stores = _assemble(samples, genes, target_sum)
    summary["total_kept"] = stores["num_spots"]
    summary["genes"] = len(genes)
    summary["splits"] = {k: len(v) for k, v in stores["datalist"].items()}
    record = {
        "manifest": str(Path(manifest).resolve()),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fov_um": fov_um,
        "min_counts": min_counts,
        "spot_spacing_um": spot_spacing_um,
        "pitch_tolerance": pitch_tolerance,
        "max_background_share": max_background_share,
        "split_by": split_by,
        "technologies": sorted({s.geometry.technology.name for s in samples}),
        "num_neighbors": num_neighbors,
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


def dataset_num_neighbors(dataset_dir: str | os.PathLike, default: int = 6) -> int:
    """The neighbour count of a prepared dataset's lattice (``dataset.json``'s ``num_neighbors``).

    ``default`` (Visium's 6) for a dataset that predates the record, and where there is no dataset yet: the model-zoo
    checks (``verify_net_in_out``) build the network of ``configs/train.json`` without data, and training itself
    refuses a missing dataset when it reads the gene panel.
    """
    record = Path(dataset_dir) / "dataset.json"
    if not record.is_file():
        return int(default)
    return int(read_json(record).get("num_neighbors", default))


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
