"""Manifests for HEST-1k cohorts: samples named by id under one HEST root, split by patient.

HEST-1k keeps each sample as ``st/<id>.h5ad``, ``wsis/<id>.tif`` and ``metadata/<id>.json``; the metadata names the
sample (``id``), its patient (``patient``), technology (``st_technology``) and pixel size. :func:`write_hest_manifest`
reads the metadata of the chosen ids and writes a manifest with ``sample_id,hest_root,split,patient,technology``, the
patients assigned to ``train``/``val``/``test`` by a seeded shuffle, so that no patient's tissue is in two splits.
"""

from __future__ import annotations

import csv
import io
import os
import random
from collections.abc import Sequence
from pathlib import Path

from bundle.utils import read_json, write_atomic

__all__ = ["hest_patients", "split_patients", "write_hest_manifest"]


def hest_patients(hest_root: str | os.PathLike, sample_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{sample id: {"patient": ..., "technology": ...}}`` from each sample's ``metadata/<id>.json``.

    A sample without a patient in its metadata is its own patient (logged in the manifest as ``<id>``); a missing
    metadata file or one that names another sample is refused.
    """
    root = Path(hest_root)
    out = {}
    for sid in sample_ids:
        path = root / "metadata" / f"{sid}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"HEST sample {sid!r} has no metadata file {str(path)!r}; download its metadata/, st/ and wsis/ files."
            )
        meta = read_json(path)
        named = meta.get("id")
        if named is not None and str(named) != sid:
            raise ValueError(f"HEST metadata {str(path)!r} describes sample {named!r}, not {sid!r}.")
        patient = str(meta.get("patient") or "").strip() or sid
        out[sid] = {"patient": patient, "technology": str(meta.get("st_technology") or "")}
    return out


def split_patients(patients: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Assign each distinct patient to ``train``, ``val`` or ``test`` (seeded; at least one training patient, and one
    validation / test patient whenever the fraction is positive and there are enough patients)."""
    unique = sorted(set(patients))
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be shares in [0, 1) that leave "
            "patients for training."
        )
    random.Random(seed).shuffle(unique)
    n_val = max(1, round(val_fraction * len(unique))) if val_fraction > 0 else 0
    n_test = max(1, round(test_fraction * len(unique))) if test_fraction > 0 else 0
    if n_val + n_test >= len(unique):
        raise ValueError(
            f"{len(unique)} patient(s) cannot be split into training, {n_val} validation and {n_test} test patients."
        )
    splits = dict.fromkeys(unique[:n_val], "val")
    splits.update(dict.fromkeys(unique[n_val : n_val + n_test], "test"))
    splits.update(dict.fromkeys(unique[n_val + n_test :], "train"))
    return splits


def write_hest_manifest(
    hest_root: str | os.PathLike,
    sample_ids: Sequence[str],
    output: str | os.PathLike,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> dict[str, str]:
    """Write a manifest of HEST samples split by patient; return ``{sample id: split}``.

    ``hest_root`` is written relative to the manifest's folder when it lies below it, else absolute.
    """
    if not sample_ids:
        raise ValueError("no HEST sample id given.")
    if len(set(sample_ids)) != len(sample_ids):
        raise ValueError(f"sample ids are repeated in {list(sample_ids)}.")
    info = hest_patients(hest_root, sample_ids)
    splits = split_patients([v["patient"] for v in info.values()], val_fraction, test_fraction, seed)
    output = Path(output)
    root = Path(hest_root).resolve()
    try:
        root_text = os.path.relpath(root, output.resolve().parent)
    except ValueError:  # another drive
        root_text = str(root)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["sample_id", "hest_root", "split", "patient", "technology"])
    for sid in sample_ids:
        writer.writerow([sid, root_text, splits[info[sid]["patient"]], info[sid]["patient"], info[sid]["technology"]])
    text = buffer.getvalue()
    write_atomic(output, lambda tmp: Path(tmp).write_text(text))
    return {sid: splits[info[sid]["patient"]] for sid in sample_ids}
