"""The manifest of a dataset: one CSV row per sample (its expression data, slide, split and patient), read and checked.

Columns ``sample_id,st_path,slide_path`` (or ``sample_id,hest_root``) and optional
``mpp,split,patient,metadata_path,layer,technology``; see ``docs/data.md``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# manifest split name -> datalist key (MONAI decathlon layout)
SPLIT_KEYS = {"train": "training", "val": "validation", "test": "test"}


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
        metadata_path: HEST metadata JSON (pixel size, technology, spot diameter and pitch), or None.
        layer: AnnData layer with raw counts (None: ``.raw`` when present, else ``X``).
        technology: spot technology (:func:`bundle.geometry.get_technology`); None: the HEST metadata's, else legacy
            ST for a legacy ST section, else Visium.
    """

    sample_id: str
    st_path: Path
    slide_path: Path
    mpp: float | None = None
    split: str = "train"
    patient: str = ""
    metadata_path: Path | None = None
    layer: str | None = None
    technology: str | None = None


# where a HEST root keeps a sample's files
HEST_LAYOUT = {"st_path": "st/{}.h5ad", "slide_path": "wsis/{}.tif", "metadata_path": "metadata/{}.json"}


def read_manifest(path: str | os.PathLike, split_by: str = "patient") -> list[ManifestRow]:
    """Read a manifest CSV: ``sample_id,st_path,slide_path[,mpp,split,patient,metadata_path,layer,technology,hest_root]``.

    Relative paths are taken relative to the manifest's folder. A row with ``hest_root`` (a HEST-1k download) may leave
    ``st_path``, ``slide_path`` and ``metadata_path`` empty: they default to ``st/<sample_id>.h5ad``,
    ``wsis/<sample_id>.tif`` and ``metadata/<sample_id>.json`` under it. Raises ``ValueError`` naming the row and
    column for missing columns, duplicate samples, unknown splits, missing files and, with ``split_by="patient"``,
    patients spread over several splits (``split_by="sample"`` allows it, with a warning: serial sections of one patient
    in training and validation measure less than a held-out patient does).
    """
    path = Path(path)
    if split_by not in ("patient", "sample"):
        raise ValueError(f"split_by must be 'patient' or 'sample', got {split_by!r}.")
    if not path.is_file():
        raise FileNotFoundError(f"Manifest {str(path)!r} does not exist.")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        required = ("sample_id",) if "hest_root" in columns else ("sample_id", "st_path", "slide_path")
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(
                f"Manifest {str(path)!r} lacks the column(s) {missing}; it needs sample_id,st_path,slide_path (or "
                "sample_id,hest_root) and may have mpp,split,patient,metadata_path,layer,technology."
            )
        raw_rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    if not raw_rows:
        raise ValueError(f"Manifest {str(path)!r} lists no samples.")
    rows, seen = [], set()
    for i, raw in enumerate(raw_rows, start=2):
        row = _manifest_row(raw, path.parent, f"{path.name} line {i}")
        if row.sample_id in seen:
            raise ValueError(
                f"{path.name} line {i}: sample_id {row.sample_id!r} appears twice; sample ids must be unique."
            )
        seen.add(row.sample_id)
        rows.append(row)
    _check_patient_splits(rows, path, split_by)
    return rows


def _manifest_paths(raw: dict[str, str], base: Path, where: str, sid: str) -> dict[str, Path | None]:
    """The row's ``st_path``, ``slide_path`` and ``metadata_path``, resolved (HEST layout under ``hest_root``)."""
    hest_root = raw.get("hest_root", "")
    if hest_root:
        hest_root = Path(hest_root) if Path(hest_root).is_absolute() else base / hest_root
        if not hest_root.is_dir():
            raise FileNotFoundError(f"{where}: hest_root {raw['hest_root']!r} of sample {sid!r} is not a folder.")
    resolved = {}
    for col in ("st_path", "slide_path", "metadata_path"):
        value = raw.get(col, "")
        if not value and hest_root:
            p = hest_root / HEST_LAYOUT[col].format(sid)
            if not p.exists():
                raise FileNotFoundError(
                    f"{where}: sample {sid!r} has no {col} and its HEST root {str(hest_root)!r} has no "
                    f"{HEST_LAYOUT[col].format(sid)}; download the sample's st/, wsis/ and metadata/ files, or give "
                    f"{col}."
                )
            resolved[col] = p.resolve()
            continue
        if not value:
            resolved[col] = None
            continue
        p = Path(value) if Path(value).is_absolute() else base / value
        if not p.exists():
            raise FileNotFoundError(f"{where}: {col} {value!r} of sample {sid!r} does not exist (looked at {p}).")
        resolved[col] = p.resolve()
    if resolved["st_path"] is None or resolved["slide_path"] is None:
        raise ValueError(f"{where}: sample {sid!r} needs both st_path and slide_path (or a hest_root).")
    return resolved


def _manifest_row(raw: dict[str, str], base: Path, where: str) -> ManifestRow:
    """One manifest line as a :class:`ManifestRow`, checked."""
    from bundle.geometry import get_technology

    sid = raw["sample_id"]
    if not sid:
        raise ValueError(f"{where}: empty sample_id.")
    split = raw.get("split") or "train"
    if split not in SPLIT_KEYS:
        raise ValueError(f"{where}: split {split!r} of sample {sid!r} must be one of {sorted(SPLIT_KEYS)}.")
    resolved = _manifest_paths(raw, base, where, sid)
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
    technology = raw.get("technology") or None
    if technology is not None:
        get_technology(technology, what=f"{where}: technology of sample {sid!r}")
    return ManifestRow(
        sample_id=sid,
        st_path=resolved["st_path"],
        slide_path=resolved["slide_path"],
        mpp=mpp,
        split=split,
        patient=raw.get("patient") or sid,
        metadata_path=resolved["metadata_path"],
        layer=raw.get("layer") or None,
        technology=technology,
    )


def _check_patient_splits(rows: Sequence[ManifestRow], path: Path, split_by: str) -> None:
    """Refuse (``split_by="patient"``) or warn about (``"sample"``) patients whose samples are in several splits."""
    patient_splits: dict[str, set[str]] = {}
    for r in rows:
        patient_splits.setdefault(r.patient, set()).add(r.split)
    leaking = {p: sorted(s) for p, s in patient_splits.items() if len(s) > 1}
    if not leaking:
        return
    if split_by == "sample":
        logger.warning(
            "Manifest %s puts one patient's samples in several splits %s (split_by='sample'): the held-out sections "
            "share their patient with training sections, so scores measure new sections, not new patients.",
            path,
            leaking,
        )
        return
    raise ValueError(
        f"Manifest {str(path)!r} puts one patient's samples in several splits {leaking}; splits must be by "
        "patient, so that validation tissue is never seen in training (split_by='sample', --split-by sample, "
        "allows serial sections of one patient in several splits, and says so in dataset.json)."
    )
