"""Legacy Spatial Transcriptomics sections (the her2st layout) read into an AnnData like a Space Ranger sample's.

A section is a counts table and a spot selection table, as the ST pipeline and the her2st repository publish them:

``<id>.tsv`` or ``<id>.tsv.gz``
    spots x genes raw UMI counts, tab-separated; the first column names each spot ``"{x}x{y}"`` from its array
    coordinates.
``<id>_selection.tsv``
    one row per array position: ``x``, ``y`` (array coordinates), ``new_x``, ``new_y`` (positions adjusted by spot
    detection, in array units), ``pixel_x`` (column) and ``pixel_y`` (row) spot centres in full-resolution image
    pixels, ``selected`` (1 under tissue).

The AnnData gets ``obs["in_tissue"]`` (``selected``), ``obs["array_row"]`` = ``y`` and ``obs["array_col"]`` = ``x``,
``obs["array_row_fit"]``/``obs["array_col_fit"]`` (``new_y``/``new_x``, used to fit the pixel size), ``obsm["spatial"]``
= ``(pixel_x, pixel_y)`` and ``uns["technology"] = "st"``. Spots of the counts table without a selection row have no
position and are left out (logged); selection rows without counts are ignored.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SELECTION_SUFFIX = "_selection.tsv"
COUNTS_SUFFIXES = (".tsv.gz", ".tsv")
_SPOT_NAME = re.compile(r"^\s*(-?\d+)\s*x\s*(-?\d+)\s*$")


def _counts_id(path: Path) -> str | None:
    """The section id of a counts file name (``C2.tsv.gz`` -> ``C2``), None for other names."""
    name = path.name
    if name.endswith(SELECTION_SUFFIX):
        return None
    for suffix in COUNTS_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def legacy_st_files(path: str | Path) -> tuple[Path, Path] | None:
    """``(counts, selection)`` of a legacy ST section given as its folder or its counts file, None when ``path`` is
    not one (no ``*_selection.tsv`` there); raises when a folder holds several sections or no counts table."""
    path = Path(path)
    if path.is_file():
        section = _counts_id(path)
        if section is None:
            return None
        selection = path.with_name(section + SELECTION_SUFFIX)
        return (path, selection) if selection.is_file() else None
    if not path.is_dir():
        return None
    selections = sorted(path.glob("*" + SELECTION_SUFFIX))
    if not selections:
        return None
    if len(selections) > 1:
        raise ValueError(
            f"Folder {str(path)!r} holds several spot selection tables ({[p.name for p in selections]}); give the "
            "counts file of one section as st_path (e.g. <id>.tsv.gz)."
        )
    section = selections[0].name[: -len(SELECTION_SUFFIX)]
    for suffix in COUNTS_SUFFIXES:
        counts = path / (section + suffix)
        if counts.is_file():
            return counts, selections[0]
    raise FileNotFoundError(
        f"Legacy ST folder {str(path)!r} has the spot selection table {selections[0].name} but no counts table "
        f"{section}.tsv.gz (or {section}.tsv): copy the section's counts (spots x genes, rows named '{{x}}x{{y}}')."
    )


def _read_table(path: Path, what: str, **kwargs):
    """A tab-separated table, with a message naming the file when it cannot be read."""
    import pandas as pd

    try:
        return pd.read_csv(path, sep="\t", **kwargs)
    except (OSError, EOFError, ValueError, pd.errors.ParserError) as error:
        raise ValueError(
            f"{what} {str(path)!r} cannot be read ({error}): the file is truncated or corrupt (an interrupted copy or "
            "download?) or not tab-separated; copy it again."
        ) from None


def read_selection(path: Path):
    """The spot selection table, checked for the array and pixel columns."""
    table = _read_table(path, "Spot selection table")
    table.columns = [str(c).strip() for c in table.columns]
    missing_array = [c for c in ("x", "y") if c not in table.columns]
    missing_pixels = [c for c in ("pixel_x", "pixel_y") if c not in table.columns]
    if missing_array or missing_pixels:
        raise ValueError(
            f"Spot selection table {str(path)!r} lacks the column(s) {missing_array + missing_pixels} (it has "
            f"{list(table.columns)}): it needs the array coordinates x, y and the spot centres pixel_x (column) and "
            "pixel_y (row) in full-resolution image pixels, as the ST pipeline's spot detection writes them. A "
            "selection table without pixel positions cannot be paired with the image: export it again with them."
        )
    return table


def _spot_names(index, path: Path) -> list[tuple[int, int]]:
    """``(x, y)`` array coordinates of the counts table's spot names ``"{x}x{y}"``."""
    names = []
    for name in index:
        match = _SPOT_NAME.match(str(name))
        if match is None:
            raise ValueError(
                f"Counts table {str(path)!r} names a spot {str(name)!r}; legacy ST spots are named '{{x}}x{{y}}' from "
                "their array coordinates (e.g. '10x21'). Is this the spots x genes counts table?"
            )
        names.append((int(match.group(1)), int(match.group(2))))
    return names


def _match_spots(counts, selection, counts_path: Path, selection_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``counts`` that have a selection row, and those selection rows."""
    rows = {(int(x), int(y)): i for i, (x, y) in enumerate(zip(selection["x"], selection["y"]))}
    names = _spot_names(counts.index, counts_path)
    matched = [(i, rows[key]) for i, key in enumerate(names) if key in rows]
    if not matched:
        raise ValueError(
            f"None of the {len(names)} spots of the counts table {str(counts_path)!r} (e.g. {list(counts.index[:3])}) "
            f"matches a row of the spot selection table {str(selection_path)!r} (x, y such as "
            f"{[f'{x}x{y}' for x, y in list(rows)[:3]]}): the two files belong to different sections. Pair each "
            "counts table with its own <id>_selection.tsv."
        )
    if len(matched) < len(names):
        logger.warning(
            "%s: %d of %d spots of the counts table have no row in %s (no pixel position) and are left out.",
            counts_path.name,
            len(names) - len(matched),
            len(names),
            selection_path.name,
        )
    count_rows, selection_rows = (np.asarray(v, dtype=np.int64) for v in zip(*matched))
    return count_rows, selection_rows


def read_legacy_st(path: str | Path):
    """Read a legacy ST section (its folder or counts file) into an AnnData (see the module docstring)."""
    import anndata
    import pandas as pd
    from scipy import sparse

    files = legacy_st_files(path)
    if files is None:
        raise ValueError(
            f"{str(path)!r} is not a legacy ST section: expected a counts table <id>.tsv(.gz) next to "
            "<id>_selection.tsv."
        )
    counts_path, selection_path = files
    counts = _read_table(counts_path, "Counts table", index_col=0)
    selection = read_selection(selection_path)
    count_rows, selection_rows = _match_spots(counts, selection, counts_path, selection_path)
    counts = counts.iloc[count_rows]
    spots = selection.iloc[selection_rows].reset_index(drop=True)
    non_numeric = [c for c in counts.columns if not pd.api.types.is_numeric_dtype(counts[c])]
    if non_numeric:
        raise ValueError(f"Counts table {str(counts_path)!r} has non-numeric gene columns {non_numeric[:5]}.")
    obs = pd.DataFrame(
        {
            "in_tissue": spots["selected"].astype(int).to_numpy() if "selected" in spots else 1,
            "array_row": spots["y"].astype(int).to_numpy(),
            "array_col": spots["x"].astype(int).to_numpy(),
        },
        index=[str(name) for name in counts.index],
    )
    if "new_x" in spots and "new_y" in spots:
        obs["array_row_fit"] = spots["new_y"].astype(float).to_numpy()
        obs["array_col_fit"] = spots["new_x"].astype(float).to_numpy()
    adata = anndata.AnnData(
        X=sparse.csr_matrix(counts.to_numpy(dtype=np.float32)),
        obs=obs,
        var=pd.DataFrame(index=[str(g) for g in counts.columns]),
    )
    adata.obsm["spatial"] = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    adata.uns["technology"] = "st"
    adata.var_names_make_unique()
    return adata
