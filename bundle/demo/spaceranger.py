"""Space Ranger 2.x ``outs`` folder of a simulated slide: the 10x HDF5 count matrix, tissue positions, scale factors
and the hires/lowres PNGs that ``scanpy.read_visium`` loads."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bundle.demo.files import csv_text, write_text
from bundle.demo.slide import SimulatedSlide
from bundle.geometry import SPACERANGER_DIAMETER_FULLRES_UM
from bundle.utils import write_atomic

_FIDUCIAL_DIAMETER_UM = 89.4  # Space Ranger reports fiducials ~1.625x the spot diameter


def write_spaceranger_outputs(slide: SimulatedSlide, spaceranger_dir: str | os.PathLike, library_id: str) -> Path:
    """Write a slide's Visium measurement as a Space Ranger 2.x ``outs`` folder that ``scanpy.read_visium`` loads.

    Writes ``filtered_feature_bc_matrix.h5`` (in-tissue spots only, as Space Ranger does) and ``spatial/``:
    ``tissue_positions.csv`` (all lattice spots, Space Ranger 2.x header, pixel coordinates in the level-0 frame of the
    slide), ``scalefactors_json.json``, ``tissue_hires_image.png`` (longest side 2000 px, or the slide's own size if
    smaller) and ``tissue_lowres_image.png`` (longest side 600 px). Every file is written atomically.

    Args:
        slide: the simulated slide.
        spaceranger_dir: destination folder (created if missing).
        library_id: the library id stored in the HDF5 file (``library_ids`` attribute), e.g. the sample id.

    Returns:
        The folder written.
    """
    from PIL import Image

    out = Path(spaceranger_dir)
    spatial = out / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    spots = slide.spots
    keep = slide.in_tissue
    _write_10x_h5(
        out / "filtered_feature_bc_matrix.h5", slide.counts, spots["barcode"][keep], slide.gene_ids, slide.gene_names,
        library_id,
    )  # fmt: skip
    rows = zip(spots["barcode"], spots["in_tissue"], spots["array_row"], spots["array_col"], spots["y"], spots["x"])
    header = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
    write_text(spatial / "tissue_positions.csv", csv_text(header, [list(map(str, row)) for row in rows]))

    height, width = slide.image.shape[:2]
    source = Image.fromarray(slide.image)
    scales = {}
    for name, longest in (("hires", 2000), ("lowres", 600)):
        scale = min(1.0, longest / max(height, width))
        size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
        small = source if size == source.size else source.resize(size, Image.Resampling.BOX, reducing_gap=3.0)
        source = small  # the lowres image is reduced from the hires one
        write_atomic(
            spatial / f"tissue_{name}_image.png", lambda tmp, im=small: im.save(tmp, format="PNG", compress_level=1)
        )
        scales[name] = scale
    scalefactors = {
        "spot_diameter_fullres": SPACERANGER_DIAMETER_FULLRES_UM / slide.mpp,
        "fiducial_diameter_fullres": _FIDUCIAL_DIAMETER_UM / slide.mpp,
        "tissue_hires_scalef": scales["hires"],
        "tissue_lowres_scalef": scales["lowres"],
    }
    write_text(spatial / "scalefactors_json.json", json.dumps(scalefactors, indent=4) + "\n")
    return out


def _ascii_strings(values: Sequence[str]) -> np.ndarray:
    """Fixed-length ASCII byte strings, as 10x HDF5 files store them."""
    encoded = [str(v).encode("ascii") for v in values]
    return np.array(encoded, dtype=f"S{max([len(v) for v in encoded] + [1])}")


def _write_10x_h5(
    path: Path, counts: np.ndarray, barcodes: Sequence[str], gene_ids: Sequence[str], gene_names: Sequence[str],
    library_id: str,
) -> Path:  # fmt: skip
    """Write a filtered feature-barcode matrix in the 10x Genomics HDF5 (v3) layout, barcodes sorted as 10x does."""
    import h5py
    from scipy import sparse

    order = np.argsort(np.asarray(barcodes, dtype=str), kind="stable")
    matrix = sparse.csr_matrix(counts[order])  # rows = barcodes: CSR of (barcodes, genes) = CSC of (genes, barcodes)
    matrix.sort_indices()

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["chemistry_description"] = np.array([b"Spatial 3' v1"])
            f.attrs["filetype"] = np.array([b"matrix"])
            f.attrs["library_ids"] = _ascii_strings([library_id])
            f.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
            f.attrs["version"] = np.array([2], dtype=np.int64)
            f.attrs["software_version"] = "st-he-ldm demo simulator (Space Ranger 2.x output layout)"
            group = f.create_group("matrix")
            options = dict(compression="gzip", compression_opts=4, shuffle=True)
            group.create_dataset("barcodes", data=_ascii_strings(np.asarray(barcodes)[order]), **options)
            group.create_dataset("data", data=matrix.data.astype(np.int32), **options)
            group.create_dataset("indices", data=matrix.indices.astype(np.int64), **options)
            group.create_dataset("indptr", data=matrix.indptr.astype(np.int64), **options)
            group.create_dataset("shape", data=np.array([counts.shape[1], counts.shape[0]], dtype=np.int32))
            features = group.create_group("features")
            features.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
            features.create_dataset("feature_type", data=_ascii_strings(["Gene Expression"] * len(gene_ids)), **options)
            features.create_dataset("genome", data=_ascii_strings(["GRCh38"] * len(gene_ids)), **options)
            features.create_dataset("id", data=_ascii_strings(gene_ids), **options)
            features.create_dataset("name", data=_ascii_strings(gene_names), **options)

    return write_atomic(path, write)
