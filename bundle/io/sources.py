"""Where spots come from: Space Ranger folders (``scanpy.read_visium``, with clear messages for broken files), ``.h5ad``
files (HEST samples), legacy Spatial Transcriptomics sections, and HEST metadata JSON files.

scanpy and anndata are imported inside the functions that need them, so ``import bundle`` stays light.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from bundle.io.legacy_st import legacy_st_files
from bundle.utils import read_json

logger = logging.getLogger(__name__)


def read_spaceranger(path: str | os.PathLike, count_file: str = "filtered_feature_bc_matrix.h5"):
    """Read a Space Ranger output folder with ``scanpy.read_visium``.

    Returns an AnnData with raw counts in ``X``, ``obsm["spatial"]`` = ``(x, y)`` full-resolution pixels,
    ``obs["in_tissue"/"array_row"/"array_col"]`` and unique gene symbols as ``var_names``. A ``library_ids``
    attribute stored as a variable-length string (which scanpy cannot decode) is read as well.

    Raises:
        FileNotFoundError: the folder, the count matrix or ``spatial/`` files are missing.
        ValueError: the HDF5 is truncated or corrupt or lacks the ``library_ids`` attribute; ``spatial/`` files are
            empty, unreadable or do not cover the matrix's barcodes. Every message names the file.
    """
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
    positions = next(p for p in positions if p.is_file())  # the one scanpy reads
    library_id = _library_id(h5, path)
    _check_spatial_files(path, positions)
    adata = _read_visium(path, count_file, library_id, positions)
    lost = np.isnan(np.asarray(adata.obsm["spatial"], dtype=np.float64)).any(axis=1)
    if lost.any():
        raise ValueError(
            f"{str(positions)!r} has no position for {int(lost.sum())} of the {adata.n_obs} barcodes of {count_file} "
            f"(e.g. {list(adata.obs_names[lost][:3])}): the file is incomplete or from another run. Copy the spatial/ "
            "folder of the same Space Ranger run."
        )
    adata.var_names_make_unique()
    return adata


def corrupt_file_message(path: Path, error: BaseException, source: str = "where it came from") -> str:
    """The message for a file that its library cannot open: names it, says it is truncated or corrupt, and to copy it."""
    return (
        f"{str(path)!r} cannot be read ({error}): the file is truncated or corrupt (an interrupted copy or download?); "
        f"copy it again from {source}."
    )


def _folder_sample(path: Path) -> str:
    """A sample name from a Space Ranger folder's path (its parent's name for ``outs``)."""
    return path.parent.name if path.name in ("outs", "spaceranger") else path.name


def _library_id(h5: Path, folder: Path) -> str:
    """The HDF5's ``library_ids`` attribute as text (fixed-length bytes or a variable-length string)."""
    import h5py

    try:
        with h5py.File(h5, "r") as f:
            value = f.attrs.get("library_ids")
    except OSError as error:
        raise ValueError(corrupt_file_message(h5, error, "Space Ranger's outs/ folder")) from None
    values = np.asarray(value).ravel() if value is not None else np.array([])
    if values.size == 0:
        sample = re.sub(r"[^A-Za-z0-9_.-]", "_", _folder_sample(folder)) or "sample"
        fix = (
            f"import h5py, numpy as np; f = h5py.File({str(h5)!r}, 'a'); "
            f"f.attrs['library_ids'] = np.array([b'{sample}'], dtype='S'); f.close()"
        )
        raise ValueError(
            f"{str(h5)!r} has no `library_ids` attribute, which scanpy.read_visium needs to name the capture area. "
            "Space Ranger writes it; for a file from another tool add it as fixed-length bytes (a list of Python "
            f'strings is stored as a variable-length string that scanpy cannot decode): python -c "{fix}" '
            "(or convert the sample to .h5ad with obsm['spatial'] and use that)."
        )
    first = values[0]
    return first.decode("utf-8") if isinstance(first, bytes) else str(first)


def _check_spatial_files(folder: Path, positions: Path) -> None:
    """Raise naming the file when the positions are empty or ``spatial/`` lacks what scanpy.read_visium loads."""
    with positions.open("rb") as f:
        if not f.read(4096).strip():
            raise ValueError(
                f"{str(positions)!r} is empty: it should hold one row per spot (barcode, in_tissue, array_row, "
                "array_col, pixel row and column). Copy the whole spatial/ folder again from the Space Ranger run's "
                "outs/."
            )
    names = ("scalefactors_json.json", "tissue_hires_image.png", "tissue_lowres_image.png")
    missing = [n for n in names if not (folder / "spatial" / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Space Ranger folder {str(folder)!r}: spatial/ lacks {', '.join(missing)}, which scanpy.read_visium "
            "loads; copy the whole spatial/ folder from the same Space Ranger run's outs/ (tissue positions, "
            "scalefactors_json.json and the hires and lowres images)."
        )


def _read_visium(folder: Path, count_file: str, library_id: str, positions: Path):
    """``scanpy.read_visium``, with its errors turned into messages that name the file at fault."""
    import scanpy as sc

    h5 = folder / count_file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return sc.read_visium(folder, count_file=count_file, library_id=library_id)
    except (FileNotFoundError, PermissionError):
        raise
    except OSError as error:
        image = re.match(r"Could not find '(hires|lowres)_image'", str(error))
        if image:
            png = folder / "spatial" / f"tissue_{image.group(1)}_image.png"
            raise ValueError(
                corrupt_file_message(png, error.__cause__ or error, "the Space Ranger run's spatial/ folder")
            ) from None
        raise ValueError(corrupt_file_message(h5, error, "Space Ranger's outs/ folder")) from None
    except ValueError as error:
        if "Length mismatch" not in str(error):
            raise
        raise ValueError(
            f"{str(positions)!r} does not have Space Ranger's six columns (barcode, in_tissue, array_row, array_col, "
            f"pxl_row_in_fullres, pxl_col_in_fullres): {error}. Copy the spatial/ folder of the Space Ranger run."
        ) from None
    except Exception as error:
        if not isinstance(error.__cause__, KeyError):
            raise
        raise ValueError(
            f"{str(h5)!r} is not a complete 10x HDF5 count matrix: it lacks the dataset {error.__cause__} ({error}). "
            "Copy it again from Space Ranger's outs/ folder."
        ) from None


def read_h5ad(path: str | os.PathLike, require_spatial: bool = True):
    """Read an ``.h5ad`` file whose ``obsm["spatial"]`` holds ``(x, y)`` level-0 pixel spot centres.

    Args:
        path: the file.
        require_spatial: refuse a file without ``obsm["spatial"]`` (the dataset builder needs the spot centres).
    """
    import anndata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"h5ad file {str(path)!r} does not exist.")
    try:
        adata = anndata.read_h5ad(path)
    except OSError as error:
        raise ValueError(corrupt_file_message(path, error)) from None
    if require_spatial and "spatial" not in adata.obsm:
        raise ValueError(
            f"{str(path)!r} has no obsm['spatial'] (spot centres as (x, y) level-0 pixels); add it before preparing."
        )
    adata.var_names_make_unique()
    return adata


def read_st(path: str | os.PathLike, require_spatial: bool = True):
    """Read spatial transcriptomics from a Space Ranger folder, an ``.h5ad`` file (HEST samples are h5ad) or a legacy
    Spatial Transcriptomics section (its folder or ``<id>.tsv(.gz)`` counts next to ``<id>_selection.tsv``).

    Args:
        path: Space Ranger ``outs/`` folder, ``.h5ad`` file or legacy ST section.
        require_spatial: refuse an ``.h5ad`` file without ``obsm["spatial"]`` (see :func:`read_h5ad`).
    """
    from bundle.io.legacy_st import read_legacy_st

    path = Path(path)
    if legacy_st_files(path) is not None:
        return read_legacy_st(path)
    if path.is_dir():
        return read_spaceranger(path)
    if path.suffix.lower() == ".h5ad":
        return read_h5ad(path, require_spatial=require_spatial)
    raise ValueError(
        f"Cannot read {str(path)!r}: st_path must be a Space Ranger folder, an .h5ad file or a legacy ST section "
        "(<id>.tsv.gz with <id>_selection.tsv beside it)."
    )


def technology_name(adata) -> str | None:
    """The spot technology an AnnData records (``uns["technology"]``, set for legacy ST sections), or None."""
    value = adata.uns.get("technology")
    return str(value) if isinstance(value, str) else None


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
