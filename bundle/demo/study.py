"""The demo study on disk: slides simulated (in parallel processes), written as pyramidal TIFFs, Space Ranger folders
and ground truth, then ``README.md`` and ``manifest.csv``."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from bundle.demo.compartments import COMPARTMENTS
from bundle.demo.files import csv_text, write_text
from bundle.demo.genes import demo_gene_table
from bundle.demo.slide import SimulatedSlide, check_size, simulate_slide
from bundle.demo.spaceranger import write_spaceranger_outputs


def make_demo_dataset(
    output_dir: str | os.PathLike = "demo_data",
    num_slides: int = 4,
    seed: int = 0,
    size_um: float | tuple[float, float] = (1600.0, 2000.0),
    mpp: float = 0.25,
    overwrite: bool = False,
    num_workers: int | None = None,
    verbose: bool = False,
) -> Path:
    """Simulate a small colorectal-cancer Visium study and write it in real file formats.

    Layout under ``output_dir`` (paths in ``manifest.csv`` are relative to its folder)::

        manifest.csv        sample_id,st_path,slide_path,mpp,split,patient (written last)
        README.md           what the data is, how it was made, licence
        <sample_id>/slide.tif                 pyramidal JPEG TIFF at ``mpp`` (bundle.io.tiff.write_pyramidal_tiff)
        <sample_id>/spaceranger/...           Space Ranger 2.x outs (see write_spaceranger_outputs)
        <sample_id>/ground_truth.csv          per spot: barcode, x, y, array_row, array_col, in_tissue,
                                              tissue_coverage, one fraction per compartment, dominant

    Sample ids are ``CRC_S01``, ``CRC_S02``, ...; each slide comes from its own patient (``P01``, ...). Split rule: the
    last slide is ``"val"`` and the others ``"train"`` (a single slide is ``"train"``). Each file is written
    atomically and ``manifest.csv`` last, so an interrupted run leaves no manifest.

    Args:
        output_dir: destination folder; created if missing.
        num_slides: number of slides (1-99).
        seed: dataset seed; the same seed gives identical counts and pixels.
        size_um: slide extent in micrometres, one number (square) or ``(height, width)``. The default
            1.6 mm x 2.0 mm slide holds about 350 lattice spots.
        mpp: level-0 pixel size in micrometres per pixel. Defaults to 0.25 (40x).
        overwrite: replace the demo files in a non-empty ``output_dir``; without it a non-empty folder is refused.
            Other files in the folder are left alone (an old manifest is deleted first).
        num_workers: slides simulated in parallel processes; ``None`` uses one per core (at most 4), 1 runs in this
            process. The files do not depend on it.
        verbose: print one line per slide.

    Returns:
        The path of the written ``manifest.csv``.

    Raises:
        FileExistsError: ``output_dir`` is not empty and ``overwrite`` is False.
        ValueError: an argument is out of range.
    """
    if isinstance(num_slides, bool) or not isinstance(num_slides, (int, np.integer)) or not 1 <= num_slides <= 99:
        raise ValueError(f"num_slides must be an integer between 1 and 99, got {num_slides!r}.")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer))
                                    or num_workers < 1):  # fmt: skip
        raise ValueError(f"num_workers must be a positive integer or None (one per core), got {num_workers!r}.")
    height_um, width_um = check_size(size_um)
    out = _prepare_output_dir(Path(output_dir), overwrite)

    start = time.perf_counter()
    splits = _default_splits(int(num_slides))
    jobs = [
        dict(output_dir=str(out), index=i, seed=int(seed), size_um=(height_um, width_um), mpp=float(mpp), split=split)
        for i, split in enumerate(splits)
    ]
    workers = min(_default_workers() if num_workers is None else int(num_workers), len(jobs))
    summary = _write_samples(jobs, workers, start if verbose else None)
    manifest_rows = [
        [s["sample_id"], f"{s['sample_id']}/spaceranger", f"{s['sample_id']}/slide.tif", f"{s['mpp']:g}", s["split"],
         s["patient"]]
        for s in summary
    ]  # fmt: skip
    genes = demo_gene_table()[1]
    readme = _readme_text(int(seed), int(num_slides), (height_um, width_um), float(mpp), summary, len(genes))
    write_text(out / "README.md", readme)
    header = ("sample_id", "st_path", "slide_path", "mpp", "split", "patient")
    return write_text(out / "manifest.csv", csv_text(header, manifest_rows))


def _write_ground_truth(slide: SimulatedSlide, path: Path) -> Path:
    """Write ``ground_truth.csv``: every lattice spot with its compartment fractions and dominant compartment."""
    spots = slide.spots
    header = ["barcode", "x", "y", "array_row", "array_col", "in_tissue", "tissue_coverage", *COMPARTMENTS, "dominant"]
    rows = []
    for i in range(spots["x"].size):
        fractions = slide.fractions[i]
        dominant = COMPARTMENTS[int(np.argmax(fractions))] if fractions.sum() > 0 else "background"
        rows.append(
            [spots["barcode"][i], int(spots["x"][i]), int(spots["y"][i]), int(spots["array_row"][i]),
             int(spots["array_col"][i]), int(spots["in_tissue"][i]), f"{spots['tissue_coverage'][i]:.4f}",
             *(f"{v:.4f}" for v in fractions), dominant]
        )  # fmt: skip
    return write_text(path, csv_text(header, rows))


def _default_splits(num_slides: int) -> list[str]:
    """``"val"`` for the last slide and ``"train"`` for the others; a single slide is ``"train"``."""
    return ["train"] * (num_slides - 1) + ["val" if num_slides > 1 else "train"]


def _prepare_output_dir(out: Path, overwrite: bool) -> Path:
    """Create ``out``; a non-empty folder is refused unless ``overwrite`` (then only its old manifest is deleted)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output_dir {str(out)!r} exists and is not a folder; choose another path.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            entries = sorted(p.name for p in out.iterdir())
            raise FileExistsError(
                f"output_dir {str(out)!r} is not empty (holds {len(entries)} entries, e.g. {entries[:3]}); "
                "pass overwrite=True (--overwrite) to replace the demo files in it, or choose an empty folder."
            )
        (out / "manifest.csv").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_samples(jobs: list[dict], workers: int, start: float | None) -> list[dict]:
    """Run :func:`_write_sample` for every job, in ``workers`` processes when more than one; summaries in job order,
    each printed when it arrives if ``start`` (the run's start time) is given."""
    summary = []
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # "spawn": safe when the caller has threads or CUDA state (torch, MONAI) that a fork would copy
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_write_sample, **job) for job in jobs]
            for future in futures:
                summary.append(future.result())
                if start is not None:
                    _print_sample(summary[-1], start)
    else:
        for job in jobs:
            summary.append(_write_sample(**job))
            if start is not None:
                _print_sample(summary[-1], start)
    return summary


def _default_workers() -> int:
    """Worker processes used by default: one per available core, at most 4 (each needs about 1 GB)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def _write_sample(output_dir: str, index: int, seed: int, size_um: tuple[float, float], mpp: float, split: str) -> dict:
    """Simulate slide ``index`` and write its folder; returns a summary for the manifest and README."""
    from bundle.io.tiff import write_pyramidal_tiff

    sample_id, patient = f"CRC_S{index + 1:02d}", f"P{index + 1:02d}"
    started = time.perf_counter()
    slide = simulate_slide(seed, index, size_um, mpp)
    sample_dir = Path(output_dir) / sample_id
    sample_dir.mkdir(exist_ok=True)
    write_pyramidal_tiff(sample_dir / "slide.tif", slide.image, slide.mpp)
    write_spaceranger_outputs(slide, sample_dir / "spaceranger", library_id=sample_id)
    _write_ground_truth(slide, sample_dir / "ground_truth.csv")
    dominant = slide.fractions[slide.in_tissue].argmax(axis=1)
    return dict(
        sample_id=sample_id,
        patient=patient,
        split=split,
        mpp=slide.mpp,
        shape=tuple(int(v) for v in slide.image.shape[:2]),
        spots=int(slide.spots["x"].size),
        in_tissue=int(slide.in_tissue.sum()),
        dominant={COMPARTMENTS[c]: int((dominant == c).sum()) for c in range(len(COMPARTMENTS))},
        nuclei=slide.metadata["num_nuclei"],
        seconds=time.perf_counter() - started,
    )


def _print_sample(summary: dict, start: float) -> None:
    print(
        f"{summary['sample_id']} ({summary['split']}): {summary['shape'][1]}x{summary['shape'][0]} px, "
        f"{summary['in_tissue']} of {summary['spots']} spots in tissue, {summary['nuclei']} nuclei "
        f"({summary['seconds']:.1f} s; {time.perf_counter() - start:.1f} s elapsed)",
        flush=True,
    )


def _readme_text(
    seed: int, num_slides: int, size_um: tuple[float, float], mpp: float, summary: list[dict], num_genes: int
) -> str:
    """The study's ``README.md``: what the data is, how it was made, one table row per slide, licence."""
    rows = "\n".join(
        f"| {s['sample_id']} | {s['split']} | {s['shape'][1]} x {s['shape'][0]} | {s['spots']} | {s['in_tissue']} | "
        + ", ".join(f"{k} {v}" for k, v in s["dominant"].items() if v)
        + " |"
        for s in summary
    )
    return f"""# Synthetic colorectal-cancer Visium demo data

**Everything here is simulated.** No patient, slide or sequencing run is behind these files. They were written by
`bundle.demo.make_demo_dataset` (`python scripts/make_demo_data.py`) to exercise the bundle's readers and training
pipeline on real file formats where real Visium data cannot be downloaded.

Generated with: `seed={seed}`, `num_slides={num_slides}`, `size_um={size_um[0]:g} x {size_um[1]:g}` (height x width),
`mpp={mpp:g}`. The same arguments regenerate identical files (counts and pixels).

## Layout

- `manifest.csv`: `sample_id,st_path,slide_path,mpp,split,patient`; paths relative to this folder. Split rule: the last
  slide is `val`, the others `train`; one patient per slide.
- `<sample_id>/slide.tif`: pyramidal, tiled (256 px), JPEG-compressed RGB TIFF at {mpp:g} um/px; every level is a
  top-level page with its pixel size in the TIFF resolution tags (cuCIM, OpenSlide, tifffile and MONAI read it).
- `<sample_id>/spaceranger/`: Space Ranger 2.x output layout: `filtered_feature_bc_matrix.h5` (10x HDF5 v3, in-tissue
  spots only, {num_genes} genes with real symbols and synthetic `ENSG99...` ids), `spatial/tissue_positions.csv`
  (all lattice spots, pixel coordinates in the level-0 frame of `slide.tif`), `scalefactors_json.json`,
  `tissue_hires_image.png`, `tissue_lowres_image.png`. `scanpy.read_visium("<sample_id>/spaceranger")` loads it.
- `<sample_id>/ground_truth.csv`: per spot the centre (`x`, `y` = column, row in level-0 pixels), array position,
  `in_tissue`, `tissue_coverage` (share of the 55 um disk on tissue), the fraction of each compartment
  ({", ".join(COMPARTMENTS)}) among the tissue inside the disk (glass excluded, renormalised; all 0 without tissue)
  and the `dominant` compartment (`background` without tissue).

## How it was simulated

Each slide is a section through a colon wall with a tumour: normal mucosa (crypts with goblet cells) on one side,
adipose tissue on the other, an adenocarcinoma (glands with crowded elongated nuclei) in desmoplastic stroma
between them, central necrosis wrapped in a hypoxic rim of solid viable tumour, and lymphoid aggregates. The image is
painted as haematoxylin and eosin concentrations converted to RGB with the Beer-Lambert law (per-slide stain
variation). Spots lie on the Visium lattice (55 um spots, 100 um apart); a spot is in tissue when at least 30% of
its disk is tissue. Counts are negative-binomial around a mixture of compartment expression programmes weighted by
the spot's compartment fractions and compartment-specific library sizes (necrosis yields little RNA).

| sample | split | size (px, W x H) | spots | in tissue | dominant compartment of in-tissue spots |
|---|---|---|---|---|---|
{rows}

## Licence

Generated data, dedicated to the public domain under CC0-1.0 (https://creativecommons.org/publicdomain/zero/1.0/);
the code that generates it is under the project's licence (Apache-2.0).
"""
