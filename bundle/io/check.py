"""Dry run of dataset preparation: every input check of :func:`bundle.io.dataset.prepare_dataset` on a manifest,
without writing anything, as one table (``scripts/check_inputs.py``).

Each sample gets a row: its pixel size and where that came from, its spots (in tissue, on background, with a patch
leaving the slide, too few counts, kept), its features (genes, or probes summed to genes), the raw-count check and a
verdict. A sample that :func:`~bundle.io.dataset.prepare_dataset` would refuse shows the first line of the message it
would raise, so users learn about every problem of a cohort at once, before hours of preparation.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from bundle.geometry import PITCH_TOLERANCE
from bundle.io.dataset import MAX_BACKGROUND_SHARE, background_refusal, quality_control, read_manifest, read_sample

__all__ = ["check_inputs", "format_check_table", "CHECK_COLUMNS"]

CHECK_COLUMNS = (
    "sample",
    "technology",
    "mpp",
    "mpp_source",
    "spots",
    "in_tissue",
    "on_background",
    "leaves_slide",
    "too_few_counts",
    "kept",
    "features",
    "counts",
    "verdict",
)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _check_one(
    row, fov_um: float, min_counts: int, backend, max_background_share: float, options: dict[str, Any]
) -> dict[str, Any]:
    """The check row of one manifest sample (never raises for problems of the sample's files)."""
    result: dict[str, Any] = dict.fromkeys(CHECK_COLUMNS, "")
    result["sample"] = row.sample_id
    try:
        sample = read_sample(row, backend, fov_um=fov_um, max_background_share=1.0, **options)
    except (OSError, ValueError, KeyError) as error:  # the bundle's refusals of unreadable or inconsistent inputs
        result["verdict"] = f"refused: {_first_line(error)}"
        return result
    result.update(
        technology=sample.geometry.technology.name,
        mpp=round(float(sample.slide.mpp), 4),
        mpp_source=sample.slide.mpp_source,
        features=sample.features,
        counts="raw integers",
    )
    try:
        summary = quality_control(sample, fov_um, min_counts)
        verdict = "ok"
    except ValueError as error:  # no spot kept
        summary, verdict = None, f"refused: {_first_line(error)}"
    in_tissue = int((sample.table["in_tissue"] == 1).sum())
    result.update(spots=len(sample.table["x"]), in_tissue=in_tissue)
    if summary is not None:
        result.update(
            on_background=summary["on_background"],
            leaves_slide=summary["patch_leaves_slide"],
            too_few_counts=summary["too_few_counts"],
            kept=summary["kept"],
        )
    fractions = sample.tissue if sample.tissue is not None else np.full(len(sample.table["x"]), np.nan)
    refusal = background_refusal(row.sample_id, fractions, str(sample.slide.path), fov_um, max_background_share)
    result["verdict"] = f"refused: {refusal.splitlines()[0]}" if refusal else verdict
    return result


def check_inputs(
    manifest: str | os.PathLike,
    fov_um: float = 128.0,
    min_counts: int = 100,
    backend: str | None = None,
    spot_spacing_um: float | None = None,
    max_background_share: float = MAX_BACKGROUND_SHARE,
    pitch_tolerance: float | None = PITCH_TOLERANCE,
    split_by: str = "patient",
) -> list[dict[str, Any]]:
    """Run the input checks of dataset preparation on every sample of ``manifest``; write nothing.

    The arguments mean what they mean for :func:`bundle.io.dataset.prepare_dataset`. A manifest that cannot be read
    at all raises (there are no samples to report); every problem of a sample's own files becomes its verdict. Plain
    images are converted into a temporary folder, removed at the end.

    Returns:
        One dict per sample with the keys :data:`CHECK_COLUMNS`.
    """
    rows = read_manifest(manifest, split_by)
    with tempfile.TemporaryDirectory(prefix="check_inputs_") as cache_dir:
        options = {"spot_spacing_um": spot_spacing_um, "pitch_tolerance": pitch_tolerance, "cache_dir": cache_dir}
        return [_check_one(r, fov_um, min_counts, backend, max_background_share, options) for r in rows]


def format_check_table(results: list[dict[str, Any]], width: int = 100) -> str:
    """The check rows as a Markdown table; verdicts longer than ``width`` characters are cut with an ellipsis."""

    def cell(key: str, value: Any) -> str:
        text = str(value).replace("|", "/")
        return text if key != "verdict" or len(text) <= width else text[: width - 1] + "…"

    lines = ["| " + " | ".join(CHECK_COLUMNS) + " |", "|" + "---|" * len(CHECK_COLUMNS)]
    lines += ["| " + " | ".join(cell(k, r[k]) for k in CHECK_COLUMNS) + " |" for r in results]
    return "\n".join(lines)
