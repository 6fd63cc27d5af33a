"""Planning a synthetic slide: checking :func:`bundle.sampling.slide.synthesize_slide`'s inputs before any long
computation, resolving its settings (spot pitch, pixel sizes, guidance) and laying the latent canvas and its window
grid over the tissue. :func:`plan_slide` returns everything as a :class:`SlidePlan`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bundle.geometry import estimate_spot_pitch, lattice_offsets
from bundle.io.tiff import check_write_arguments
from bundle.utils import check_writable


@dataclass
class SlideLayout:
    """Geometry of a synthetic slide: latent canvas, window grid and the windows over tissue."""

    origin_um: tuple[float, float]  # (x, y) of the canvas's top-left corner
    latent_um: float  # micrometres per latent pixel
    window: int  # latent window edge
    stride: int  # latent stride between windows
    grid: tuple[int, int]  # (rows, columns) of windows
    canvas: tuple[int, int]  # (rows, columns) of latent pixels
    starts: np.ndarray  # (M, 2) latent (row, column) of the tissue windows, row-major
    centres_um: np.ndarray  # (M, 2) (x, y) window centres


def _plan_layout(
    positions_um: np.ndarray,
    tree,
    fov_um: float,
    window: int,
    stride: int,
    tissue_distance_um: float,
    region_um: Sequence[float] | None,
) -> SlideLayout:
    """Window grid over the tissue (or ``region_um``) and the windows whose centre is near an in-tissue spot."""
    latent_um = fov_um / window
    if region_um is None:
        margin = tissue_distance_um + fov_um / 2.0
        x0, y0 = positions_um.min(axis=0) - margin
        x1, y1 = positions_um.max(axis=0) + margin
    else:
        x0, y0, x1, y1 = (float(v) for v in region_um)
    counts = []
    for extent in (y1 - y0, x1 - x0):
        length = max(int(np.ceil(extent / latent_um - 1e-6)), window)
        counts.append(int(np.ceil((length - window) / stride)) + 1)
    grid = (counts[0], counts[1])
    canvas = ((grid[0] - 1) * stride + window, (grid[1] - 1) * stride + window)
    rows, cols = np.meshgrid(np.arange(grid[0]) * stride, np.arange(grid[1]) * stride, indexing="ij")
    starts = np.stack([rows.ravel(), cols.ravel()], axis=1)
    centres = np.stack(
        [x0 + (starts[:, 1] + window / 2.0) * latent_um, y0 + (starts[:, 0] + window / 2.0) * latent_um], axis=1
    )
    distance, _ = tree.query(centres, k=1, distance_upper_bound=tissue_distance_um * (1 + 1e-9))
    keep = np.isfinite(distance)
    return SlideLayout((float(x0), float(y0)), latent_um, window, stride, grid, canvas, starts[keep], centres[keep])


def _check_output_path(path: Path) -> None:
    """Fail early (before any compute) when ``path`` cannot be written: missing folder, a file as folder, no rights."""
    folder = path.parent
    if not folder.exists():
        raise FileNotFoundError(f"the folder of output_path {str(path)!r} does not exist; create it first.")
    if not folder.is_dir():
        raise NotADirectoryError(f"the folder of output_path {str(path)!r} is not a folder; choose another path.")
    if path.is_dir():
        raise IsADirectoryError(f"output_path {str(path)!r} is a folder; give a file name such as slide.tif.")
    check_writable(path, "slide output_path")


@dataclass
class SlidePlan:
    """What :func:`synthesize_slide` computes from: the checked inputs, the resolved settings and the layout."""

    output_path: Path
    positions_um: np.ndarray  # (N, 2) float64 spot centres
    expression: np.ndarray  # (N, G) float32
    tree: Any  # scipy.spatial.cKDTree of positions_um
    num_neighbors: int
    offsets: np.ndarray | None  # hex offsets of the neighbour slots (None without neighbours)
    steps: int
    scale: float | None  # guidance scale
    seed: int
    batch_size: int
    blend: bool
    pitch: float
    tissue_distance: float
    sigma: float
    channels: int  # latent channels
    upsample: int  # output pixels per decoded pixel
    factor: int  # output pixels per latent pixel
    mpp: float  # output pixel size
    layout: SlideLayout
    writer: dict[str, Any]  # tile_size, compression, quality, min_level_size of the TIFF

    @property
    def radius(self) -> float:
        """Spots farther than this from a point do not contribute to its interpolated expression."""
        return 1.5 * max(self.pitch, self.tissue_distance)

    @property
    def window(self) -> int:
        return self.layout.window

    @property
    def window_px(self) -> int:
        return self.layout.window * self.factor

    @property
    def stride_px(self) -> int:
        return self.layout.stride * self.factor

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 (height, width) in pixels."""
        return self.layout.canvas[0] * self.factor, self.layout.canvas[1] * self.factor


def _check_spots(positions_um, expression, num_genes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Spot centres as ``(N, 2)`` float64 and expression as ``(N, G)`` float32, refusing what does not fit."""
    positions_um = np.asarray(positions_um, dtype=np.float64)
    expression = expression.detach().cpu().numpy() if hasattr(expression, "detach") else expression
    expression = np.asarray(expression, dtype=np.float32)
    if positions_um.ndim != 2 or positions_um.shape[1] != 2:
        raise ValueError(
            f"positions_um must be (N, 2) spot centres (x, y) in micrometres, got shape {positions_um.shape}."
        )
    if len(positions_um) == 0:
        raise ValueError("positions_um holds no spots: pass the in-tissue spots of the array (at least one).")
    if not np.isfinite(positions_um).all():
        raise ValueError("positions_um contains NaN or infinite values; drop spots without a position.")
    if expression.ndim != 2 or expression.shape[0] != len(positions_um):
        raise ValueError(
            f"expression must be (N, G) with one row per spot of positions_um (N = {len(positions_um)}), got shape "
            f"{expression.shape}."
        )
    if num_genes is not None and expression.shape[1] != num_genes:
        raise ValueError(
            f"expression has {expression.shape[1]} genes but the model was trained on a {num_genes}-gene panel; "
            "select the checkpoint's gene_panel genes, in its order (bundle.io.gene_panel.check_gene_panel)."
        )
    if not np.isfinite(expression).all():
        raise ValueError("expression contains NaN or infinite values; fill missing genes (e.g. with 0) first.")
    return positions_um, expression


def _check_settings(
    pipeline, patch_fov_um: float | None, overlap: float, batch_size: int, region_um, mpp: float | None
) -> tuple[float, tuple[float, ...] | None]:
    """Refuse settings that do not fit the model or each other; returns ``(patch_fov_um, region_um)`` resolved."""
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap must be in [0, 1) (0.5: windows overlap by half), got {overlap}.")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of windows, got {batch_size!r}.")
    if patch_fov_um is None:
        patch_fov_um = (getattr(pipeline, "info", None) or {}).get("patch_fov_um")
        if patch_fov_um is None:
            raise ValueError("patch_fov_um is unknown: pass the config's patch_fov_um (128.0 for the bundle's models).")
    patch_fov_um = float(patch_fov_um)
    if not np.isfinite(patch_fov_um) or patch_fov_um <= 0:
        raise ValueError(f"patch_fov_um must be a positive field of view in micrometres, got {patch_fov_um}.")
    _, latent_h, latent_w = pipeline.latent_shape
    if latent_h != latent_w:
        raise ValueError(f"whole-slide synthesis needs square latents, the pipeline's are {pipeline.latent_shape}.")
    if region_um is not None:
        region_um = tuple(float(v) for v in region_um)
        if len(region_um) != 4 or not (region_um[2] > region_um[0] and region_um[3] > region_um[1]):
            raise ValueError(
                f"region_um must be (x0, y0, x1, y1) micrometres with x1 > x0 and y1 > y0, got {region_um}."
            )
    number = (int, float, np.floating, np.integer)
    if mpp is not None and (not isinstance(mpp, number) or not np.isfinite(mpp) or mpp <= 0):
        raise ValueError(f"mpp must be None (the model's pixel size) or a positive pixel size in um/px, got {mpp!r}.")
    return patch_fov_um, region_um


def _spot_distances(
    positions_um: np.ndarray, pitch_um: float | None, tissue_distance_um: float | None, sigma_um: float | None
) -> tuple[float, float, float]:
    """``(pitch, tissue distance, sigma)`` in micrometres: measured or defaulted from the pitch, checked positive."""
    pitch = estimate_spot_pitch(positions_um) if pitch_um is None else float(pitch_um)
    tissue_distance = pitch if tissue_distance_um is None else float(tissue_distance_um)
    sigma = 0.4 * pitch if sigma_um is None else float(sigma_um)
    if tissue_distance <= 0 or sigma <= 0 or pitch <= 0:
        raise ValueError(
            f"tissue_distance_um, sigma_um and pitch_um must be positive, got {tissue_distance}, {sigma} and {pitch}."
        )
    return pitch, tissue_distance, sigma


def _output_pixels(pipeline, patch_fov_um: float, mpp: float | None) -> tuple[int, int, float]:
    """``(upsample, output pixels per latent pixel, output mpp)``, from one decode (which also checks the decoder)."""
    import torch

    channels, latent_h, latent_w = pipeline.latent_shape
    pipeline.autoencoder.eval()
    with torch.no_grad():
        probe = pipeline.decode(torch.zeros((1, channels, latent_h, latent_w), device=pipeline.device))
    patch_px = int(probe.shape[-1])
    if patch_px % latent_w:
        raise ValueError(f"the decoder maps {latent_w} latent pixels to {patch_px}: not a whole factor.")
    model_mpp = patch_fov_um / patch_px
    upsample = 1 if mpp is None else model_mpp / float(mpp)
    if abs(upsample - round(upsample)) > 1e-6 or round(upsample) < 1:
        raise ValueError(
            f"mpp must be the model's pixel size {model_mpp:g} um/px divided by a whole number (e.g. {model_mpp:g}, "
            f"{model_mpp / 2:g}, {model_mpp / 4:g}), got {mpp}; resample the written slide for other sizes."
        )
    upsample = int(round(upsample))
    return upsample, patch_px // latent_w * upsample, model_mpp / upsample


def plan_slide(
    pipeline, positions_um, expression, output_path: str | os.PathLike, *, patch_fov_um, neighbors, mpp, overlap,
    blend, num_inference_steps, guidance_scale, seed, batch_size, tissue_distance_um, sigma_um, pitch_um, region_um,
    tile_size, compression, quality, min_level_size,
) -> SlidePlan:  # fmt: skip
    """Check every input (before any long computation) and lay the slide out (:func:`synthesize_slide`'s arguments)."""
    from scipy.spatial import cKDTree

    output_path = Path(output_path)
    network = pipeline.network
    positions_um, expression = _check_spots(positions_um, expression, getattr(network, "num_genes", None))
    patch_fov_um, region_um = _check_settings(pipeline, patch_fov_um, overlap, batch_size, region_um, mpp)
    _check_output_path(output_path)
    compression = check_write_arguments(output_path, 1.0, tile_size, compression, quality, min_level_size)
    steps = pipeline.num_inference_steps if num_inference_steps is None else int(num_inference_steps)
    scale = pipeline.guidance_scale if guidance_scale is None else guidance_scale
    pitch, tissue_distance, sigma = _spot_distances(positions_um, pitch_um, tissue_distance_um, sigma_um)
    upsample, factor, out_mpp = _output_pixels(pipeline, patch_fov_um, mpp)
    channels, _, latent_w = pipeline.latent_shape
    stride = latent_w if not blend else max(1, int(round(latent_w * (1.0 - float(overlap)))))
    tree = cKDTree(positions_um)
    layout = _plan_layout(positions_um, tree, patch_fov_um, latent_w, stride, tissue_distance, region_um)
    if len(layout.starts) == 0:
        where = f"region_um {region_um}" if region_um is not None else "the slide"
        raise ValueError(
            f"no in-tissue spot lies within tissue_distance_um={tissue_distance:g} of a window centre in {where}; "
            "choose a region over the spots (positions_um are in the same micrometre coordinates) or a larger "
            "tissue_distance_um."
        )
    num_neighbors = int(getattr(network, "num_neighbors", 0) or 0)
    offsets = lattice_offsets(positions_um, neighbors, pitch, num_neighbors) if num_neighbors else None
    writer = dict(tile_size=tile_size, compression=compression, quality=quality, min_level_size=min_level_size)
    return SlidePlan(
        output_path, positions_um, expression, tree, num_neighbors, offsets, steps, scale, int(seed), batch_size,
        bool(blend), pitch, tissue_distance, sigma, int(channels), upsample, factor, out_mpp, layout, writer,
    )  # fmt: skip
