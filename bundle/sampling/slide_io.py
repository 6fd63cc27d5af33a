"""What whole-slide synthesis (``scripts/synthesize_slide.py``) reads and reports: the spots of one sample (from a
prepared dataset folder, or a Space Ranger folder, ``.h5ad`` or CSV), a PNG thumbnail of the written slide, and the
summary of :func:`bundle.sampling.slide.synthesize_slide` as text."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def spots_from_dataset(dataset: str | os.PathLike, sample: str, genes: Sequence[str]) -> dict[str, Any]:
    """Positions (slide micrometres), expression and neighbour indices of one sample of a prepared dataset folder.

    Positions are the datalist's ``location`` times its ``mpp``; expression the dataset's log-normalised
    ``expression.npy`` rows; neighbours the datalist's ``neighbors`` rows mapped to the sample's spots (``-1``: none).

    Args:
        dataset: a folder written by ``scripts/prepare_dataset.py`` (datalist.json, expression.npy, gene_panel.json).
        sample: a sample id of its datalist.
        genes: the model's gene panel; the dataset's must be the same.

    Returns:
        ``{"positions_um": (N, 2), "expression": (N, G) float32, "neighbors": (N, 6) or None, "sample": sample}``.
    """
    from bundle.io.gene_panel import check_gene_panel, load_gene_panel
    from bundle.utils import read_json

    dataset = Path(dataset)
    for name in ("datalist.json", "expression.npy", "gene_panel.json"):
        if not (dataset / name).is_file():
            raise FileNotFoundError(
                f"{str(dataset / name)!r} does not exist: --dataset must be a folder written by "
                "scripts/prepare_dataset.py (datalist.json, expression.npy, gene_panel.json)."
            )
    check_gene_panel(list(genes), load_gene_panel(dataset / "gene_panel.json"), what=f"dataset {str(dataset)!r}")
    datalist = read_json(dataset / "datalist.json")
    items = [item for split in datalist.values() if isinstance(split, list) for item in split]
    selected = [item for item in items if item.get("sample") == sample]
    if not selected:
        samples = sorted({str(item.get("sample")) for item in items})
        raise ValueError(f"sample {sample!r} is not in {str(dataset / 'datalist.json')!r}; its samples are {samples}.")
    store = np.load(dataset / "expression.npy", mmap_mode="r")
    rows = np.array([int(item["expression"]) for item in selected])
    positions = np.array([[float(v) * float(item["mpp"]) for v in item["location"]] for item in selected])
    index_of_row = {int(row): i for i, row in enumerate(rows)}
    neighbors = np.array(
        [[index_of_row.get(int(r), -1) for r in item.get("neighbors", [-1] * 6)] for item in selected], dtype=np.int64
    )
    return {
        "positions_um": positions,
        "expression": np.asarray(store[rows], dtype=np.float32),
        "neighbors": neighbors if neighbors.ndim == 2 and neighbors.shape[1] >= 6 else None,
        "sample": sample,
    }


def spots_from_input(
    path: str | os.PathLike, genes: Sequence[str], normalization: Mapping[str, Any] | None, mpp: float | None = None
) -> dict[str, Any]:
    """The spots of a Space Ranger folder, ``.h5ad`` or CSV (:func:`bundle.io.spots.read_spots`), as
    :func:`spots_from_dataset` returns them; refuses inputs without spot positions."""
    from bundle.io.spots import read_spots

    spots = read_spots(path, list(genes), normalization, mpp=mpp)
    if spots.positions_um is None:
        raise ValueError(
            f"{str(path)!r} has no spot positions; whole-slide synthesis needs them (tissue_positions.csv, or x_um/y_um "
            "columns)."
        )
    return {
        "positions_um": np.asarray(spots.positions_um, dtype=np.float64),
        "expression": np.asarray(spots.expression, dtype=np.float32),
        "neighbors": None if spots.neighbors is None else np.asarray(spots.neighbors),
        "sample": spots.sample,
    }


def save_thumbnail(slide: str | os.PathLike, path: str | os.PathLike, max_size: int = 1024) -> Path:
    """Save the smallest pyramid level of ``slide``, shrunk to at most ``max_size`` pixels, as a PNG."""
    import tifffile
    from PIL import Image

    with tifffile.TiffFile(slide) as tif:
        image = Image.fromarray(tif.pages[len(tif.pages) - 1].asarray())
    image.thumbnail((max_size, max_size), Image.LANCZOS)
    path = Path(path)
    image.save(path, optimize=True)
    return path


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary of :func:`bundle.sampling.slide.synthesize_slide` as four lines of text."""
    height, width = summary["shape"]
    mpp, timings = summary["mpp"], summary["timings_s"]
    tiling = f"blended, overlap {summary['overlap']:g}" if summary["blend"] else "naive tiling"
    return (
        f"wrote {summary['path']}: {width} x {height} px at {mpp:g} um/px "
        f"({width * mpp / 1000:.2f} x {height * mpp / 1000:.2f} mm, {len(summary['levels'])} "
        f"levels), origin (x, y) = ({summary['origin_um'][0]:.1f}, {summary['origin_um'][1]:.1f}) um\n"
        f"windows: {summary['windows']} over tissue of {summary['grid'][0]} x {summary['grid'][1]}, {tiling}; "
        f"{summary['num_inference_steps']} steps, guidance {summary['guidance_scale']}, seed {summary['seed']}\n"
        f"seam score: {summary['seam_score']:.3f} (1 = no visible seams)\n"
        f"time: {timings['total']:.1f} s (denoise {timings['denoise']:.1f} s, decode {timings['decode']:.1f} s, "
        f"write {timings['write']:.1f} s); peak RSS {summary['memory_mb']['process_peak_rss']:.0f} MB"
    )
