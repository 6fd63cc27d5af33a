"""Whole-slide images: writing pyramidal TIFF slides that every reader of the bundle opens, and synthesising them.

Writing. :func:`write_pyramidal_tiff` (an image in memory) and :func:`write_pyramidal_tiff_streamed` (level 0 read
block by block, e.g. from an ``np.memmap``) produce the simplest layout that tifffile, cuCIM, OpenSlide and MONAI's
``WSIReader`` (all three backends) agree on: a tiled, JPEG-compressed RGB TIFF whose pyramid levels are top-level
pages (SubIFD levels are invisible to MONAI's readers), each page carrying its own pixel size in the standard
resolution tags.

Synthesis. :func:`synthesize_slide` generates a synthetic H&E slide for a whole spot array with a patch model: one
latent canvas denoised jointly by overlapping windows (MultiDiffusion-style blending), each conditioned on the
expression interpolated over the hex lattice at the window, decoded window by window with pixel-space blending and
streamed to disk, so memory does not grow with the slide. :func:`seam_score` measures how visible window borders are.
See ``docs/whole_slide.md``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bundle.geometry import estimate_spot_pitch, lattice_offsets
from bundle.io.tiff import check_write_arguments, pyramid_level_shapes, write_pyramidal_tiff_streamed
from bundle.utils import memmap_array

logger = logging.getLogger(__name__)


"""Centre-to-centre distance of Visium spots; used when the pitch cannot be measured (fewer than two spots)."""


_NOISE_ROWS = 64  # latent rows per chunk of initial and step noise: fixed, so the slide does not depend on chunking
_KNN = 19  # spots considered per interpolated point: a spot and two hexagonal rings around it
_COLUMN_BLOCK = 4096  # pixel columns finalised at a time
_SEAM_ROWS = 128  # pixel rows per strip of the seam statistics


def window_weights(size: int) -> np.ndarray:
    """Blending ramp of one window axis: ``sin(pi * (i + 0.5) / size) ** 2``, float32, positive everywhere.

    The ramp is largest at the window's centre and small (but never 0) at its edges, where a decoder's or denoiser's
    border effects are worst. With a stride of half the window, overlapping ramps add up to exactly 1 (``sin^2 +
    cos^2``); with other strides the blend divides by the summed weights. 2D weights are the outer product of two
    ramps.

    Args:
        size: window length in (latent or output) pixels, at least 1.
    """
    if size < 1:
        raise ValueError(f"window size must be at least 1 pixel, got {size}.")
    return (np.sin(np.pi * (np.arange(size, dtype=np.float64) + 0.5) / size) ** 2).astype(np.float32)


def interpolate_expression(
    positions_um: np.ndarray,
    expression: np.ndarray,
    points_um: np.ndarray,
    sigma_um: float,
    radius_um: float,
    tree=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Expression at arbitrary points: Gaussian-weighted mean of the spots within ``radius_um`` (log-normalised space).

    Weights are ``exp(-d^2 / (2 sigma^2))`` over the (at most 19) nearest spots within ``radius_um`` of the point,
    normalised to sum to 1; at a spot's centre with ``sigma = 0.4 * pitch`` the spot itself has about 80% of the
    weight, and half-way between two spots both have the same. The mean is taken in log-normalised space, the space
    the model was conditioned in, so interpolated conditions stay within the range of values it saw in training.

    Args:
        positions_um: spot centres ``(N, 2)`` (x, y) in micrometres.
        expression: ``(N, G)`` log-normalised expression, panel order.
        points_um: ``(Q, 2)`` query points.
        sigma_um: Gaussian width.
        radius_um: spots farther than this do not contribute.
        tree: a ``scipy.spatial.cKDTree`` of ``positions_um`` to reuse.

    Returns:
        ``(values (Q, G) float32, found (Q,) bool)``; rows without any spot within ``radius_um`` are 0 and
        ``found`` is False there.
    """
    from scipy.spatial import cKDTree

    tree = cKDTree(np.asarray(positions_um, dtype=np.float64)) if tree is None else tree
    points_um = np.asarray(points_um, dtype=np.float64).reshape(-1, 2)
    k = min(_KNN, tree.n)
    distances, index = tree.query(points_um, k=k, distance_upper_bound=float(radius_um))
    distances, index = distances.reshape(len(points_um), k), index.reshape(len(points_um), k)
    valid = np.isfinite(distances)
    found = valid.any(axis=1)
    squared = np.where(valid, distances, 0.0) ** 2
    nearest = np.where(valid, squared, np.inf).min(axis=1, initial=np.inf)
    nearest = np.where(found, nearest, 0.0)
    # relative to the nearest spot's weight, so the weights cannot all underflow for large distances
    weights = np.where(valid, np.exp(-(squared - nearest[:, None]) / (2.0 * float(sigma_um) ** 2)), 0.0)
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-300)
    safe_index = np.where(valid, index, 0)
    values = np.zeros((len(points_um), expression.shape[1]), dtype=np.float64)
    for j in range(k):  # one neighbour rank at a time: temporaries stay (Q, G)
        values += weights[:, j, None] * expression[safe_index[:, j]]
    return values.astype(np.float32), found


def initial_canvas_noise(seed: int, shape: tuple[int, int, int], out: np.ndarray | None = None) -> np.ndarray:
    """Gaussian initial latents ``(C, H, W)`` of a slide, drawn in fixed chunks of 64 rows from seeded generators.

    Chunk ``i`` uses a ``torch.Generator`` seeded with ``SeedSequence([seed, 0, i])``, so the noise depends on the seed
    and the canvas shape only (not on batch sizes or devices). ``out`` (e.g. an ``np.memmap``) receives the noise in
    place; otherwise a new array is returned.
    """
    import torch

    channels, height, width = (int(v) for v in shape)
    out = np.empty((channels, height, width), dtype=np.float32) if out is None else out
    for chunk, row in enumerate(range(0, height, _NOISE_ROWS)):
        rows = min(_NOISE_ROWS, height - row)
        generator = torch.Generator().manual_seed(_derived_seed(seed, 0, chunk))
        out[:, row : row + rows] = torch.randn((channels, rows, width), generator=generator).numpy()
    return out


def _derived_seed(*entropy: int) -> int:
    """A 63-bit seed from integers (``numpy.random.SeedSequence``), for independent, reproducible generators."""
    return int(np.random.SeedSequence([int(v) for v in entropy]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class SeamStatistics:
    """Running seam statistics of an image read strip by strip (see :func:`seam_score`).

    Args:
        height: image height in pixels.
        width: image width in pixels.
        window_px: window size in pixels.
        stride_px: distance between window starts in pixels.
        offset: pixel position ``(y, x)`` (or one int for both) of the first window's top-left corner.
        period: compare with inside pairs at the same phase modulo ``period`` only (see :func:`seam_score`).
    """

    def __init__(
        self, height: int, width: int, window_px: int, stride_px: int, offset: int | Sequence[int] = 0, period: int = 1
    ) -> None:
        if window_px < 1 or stride_px < 1 or period < 1:
            raise ValueError(
                f"window_px, stride_px and period must be positive pixel counts, got {window_px}, {stride_px} and "
                f"{period}."
            )
        if window_px % period or stride_px % period:
            raise ValueError(
                f"window_px ({window_px}) and stride_px ({stride_px}) must be multiples of period ({period})."
            )
        oy, ox = (int(offset), int(offset)) if np.isscalar(offset) else (int(offset[0]), int(offset[1]))
        self.height, self.width = int(height), int(width)
        self.row_border = self._borders(self.height, window_px, stride_px, oy)
        self.column_border = self._borders(self.width, window_px, stride_px, ox)
        # pairs used as the reference: the same phase as the borders modulo period (True where counted at all)
        self.row_phase = (np.arange(len(self.row_border)) - oy) % period == 0
        self.column_phase = (np.arange(len(self.column_border)) - ox) % period == 0
        self.sums = np.zeros(4)  # border sum, border count, inside sum, inside count
        self._last: tuple[np.ndarray, np.ndarray] | None = None
        self._next_row = 0

    @staticmethod
    def _borders(length: int, window: int, stride: int, offset: int) -> np.ndarray:
        """``border[i]``: whether pixels ``i - 1`` and ``i`` lie on two sides of a window's start or end."""
        border = np.zeros(max(length, 1), dtype=bool)
        first = offset - ((offset + window) // stride + 1) * stride  # a start left of (or at) the image's start
        for start in range(first, length + stride, stride):
            for edge in (start, start + window):
                if 0 < edge < length:
                    border[edge] = True
        return border

    def update(self, strip: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add the next rows ``(h, W, C)`` or ``(h, W)`` of the image; ``mask`` ``(h, W)`` marks pixels to compare."""
        strip = np.asarray(strip)
        values = strip.astype(np.float32)
        if values.ndim == 2:
            values = values[..., None]
        mask = np.ones(values.shape[:2], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if values.shape[1] != self.width or mask.shape != values.shape[:2]:
            raise ValueError(f"strip must be (rows, {self.width}, C) with a (rows, {self.width}) mask, got "
                             f"{strip.shape} and {mask.shape}.")  # fmt: skip
        row0 = self._next_row
        self._next_row += values.shape[0]
        # pairs along x within the strip
        diff = np.abs(values[:, 1:] - values[:, :-1]).mean(axis=-1)
        valid = mask[:, 1:] & mask[:, :-1] & self.column_phase[None, 1 : self.width]
        self._add(diff, valid, self.column_border[None, 1 : self.width])
        # pairs along y, including the one across the previous strip
        if self._last is not None:
            values = np.concatenate([self._last[0], values])
            mask = np.concatenate([self._last[1], mask])
            row0 -= 1
        if values.shape[0] > 1:
            diff = np.abs(values[1:] - values[:-1]).mean(axis=-1)
            rows = slice(row0 + 1, row0 + values.shape[0])
            self._add(diff, mask[1:] & mask[:-1] & self.row_phase[rows][:, None], self.row_border[rows][:, None])
        self._last = (values[-1:], mask[-1:])

    def _add(self, diff: np.ndarray, valid: np.ndarray, border: np.ndarray) -> None:
        border = np.broadcast_to(border, diff.shape)
        on, off = valid & border, valid & ~border
        self.sums += (float(diff[on].sum()), float(on.sum()), float(diff[off].sum()), float(off.sum()))

    @property
    def score(self) -> float:
        """Mean difference across window borders over the mean difference inside windows (NaN when undefined)."""
        border_sum, border_n, inside_sum, inside_n = self.sums
        if border_n == 0 or inside_n == 0 or inside_sum == 0:
            return float("nan")
        return float((border_sum / border_n) / (inside_sum / inside_n))


def seam_score(
    image: np.ndarray,
    window_px: int,
    stride_px: int | None = None,
    offset: int | Sequence[int] = 0,
    mask: np.ndarray | None = None,
    period: int = 1,
) -> float:
    """How visible window seams are: 1 means none, above 1 means the windows show.

    The statistic is the mean absolute intensity difference (averaged over channels) between adjacent pixels that lie
    on two sides of a window border (a window's first or last column or row: columns ``b - 1`` and ``b``), divided by
    the same mean over all other adjacent pixel pairs (inside windows), pooling horizontal and vertical pairs. A
    tiling whose windows disagree at their borders has larger jumps there than anywhere else; a seamless image has
    the same statistics on and off the borders.

    A decoder that upsamples latents by ``f`` can make pairs across latent-pixel boundaries differ more than pairs
    inside a latent pixel everywhere, and window borders always fall on latent-pixel boundaries; ``period=f`` compares
    the border pairs with the inside pairs at the same phase only (pairs ``(b - 1, b)`` with ``b - offset`` a
    multiple of ``f``), so this decoder pattern does not count as a seam. :func:`synthesize_slide` does so.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` image (any numeric dtype; an ``np.memmap`` is read strip by strip).
        window_px: window size in pixels.
        stride_px: distance between window starts; defaults to ``window_px`` (non-overlapping tiles).
        offset: pixel ``(y, x)`` (or one int for both) of a window's top-left corner; borders repeat every
            ``stride_px`` from there.
        mask: optional ``(H, W)`` bool array; only pairs of two masked pixels count (e.g. the synthesised tissue,
            without the white background, whose edges are window borders too).
        period: reference pairs only at multiples of ``period`` from ``offset`` (1: all inside pairs).

    Returns:
        The ratio, or NaN when the image has no border pair or no inside pair (e.g. a single window).
    """
    image = np.asarray(image) if not isinstance(image, np.memmap) else image
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {image.shape}.")
    if mask is not None and tuple(np.shape(mask)) != tuple(image.shape[:2]):
        raise ValueError(f"mask must have the image's (H, W) = {image.shape[:2]}, got {np.shape(mask)}.")
    stats = SeamStatistics(image.shape[0], image.shape[1], int(window_px), int(stride_px or window_px), offset, period)
    for row in range(0, image.shape[0], _SEAM_ROWS):
        stats.update(image[row : row + _SEAM_ROWS], None if mask is None else mask[row : row + _SEAM_ROWS])
    return stats.score


@dataclass
class _Layout:
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
) -> _Layout:
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
    return _Layout((float(x0), float(y0)), latent_um, window, stride, grid, canvas, starts[keep], centres[keep])


def _check_output_path(path: Path) -> None:
    """Fail early (before any compute) when ``path`` cannot be written: missing folder, a file as folder, no rights."""
    folder = path.parent
    if not folder.exists():
        raise FileNotFoundError(f"the folder of output_path {str(path)!r} does not exist; create it first.")
    if not folder.is_dir():
        raise NotADirectoryError(f"the folder of output_path {str(path)!r} is not a folder; choose another path.")
    if path.is_dir():
        raise IsADirectoryError(f"output_path {str(path)!r} is a folder; give a file name such as slide.tif.")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as error:
        raise PermissionError(
            f"cannot write into the folder of output_path {str(path)!r} ({error.strerror}); choose a writable folder."
        ) from error


def synthesize_slide(
    pipeline,
    positions_um: np.ndarray,
    expression: np.ndarray,
    output_path: str | os.PathLike,
    *,
    patch_fov_um: float | None = None,
    neighbors: np.ndarray | None = None,
    mpp: float | None = None,
    overlap: float = 0.5,
    blend: bool = True,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    tissue_distance_um: float | None = None,
    sigma_um: float | None = None,
    pitch_um: float | None = None,
    region_um: Sequence[float] | None = None,
    tile_size: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    min_level_size: int = 256,
    progress: bool = False,
    workdir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Generate a synthetic whole slide for a spot array and write it as a pyramidal TIFF.

    How (details in ``docs/whole_slide.md``):

    1. **Layout.** The slide is one latent canvas at the model's resolution (a latent pixel covers
       ``patch_fov_um / latent width`` micrometres: 8 um for the demo model), covered by windows of the model's latent
       size with a stride of ``(1 - overlap)`` windows. It spans the spots' bounding box plus ``tissue_distance_um``
       and half a window on every side (or ``region_um``). A window is *tissue* when an in-tissue spot lies within
       ``tissue_distance_um`` of its centre; other windows are background: never denoised nor decoded, their pixels
       white (255).
    2. **Conditions** interpolated over the hex lattice: a window's condition is the Gaussian-weighted mean
       (:func:`interpolate_expression`, ``sigma_um``) of the log-normalised expression of the spots within
       ``1.5 * max(pitch, tissue_distance_um)`` of its centre; for models with neighbours, neighbour ``k``'s
       condition is interpolated at the centre plus the lattice's ``k``-th hex offset (:func:`lattice_offsets`), or is
       the centre's condition where that point is off the tissue (no spot within ``tissue_distance_um``), as in
       training, where a missing neighbour is the spot itself.
    3. **Joint denoising** (MultiDiffusion): at every timestep each tissue window's guided model output is
       accumulated into a canvas with weights :func:`window_weights` (outer product of two sine-squared ramps), divided
       by the summed weights, and one scheduler step is taken on the whole canvas (steps are elementwise, so this
       equals averaging the per-window steps of deterministic samplers). Overlapping windows thus agree at every step.
    4. **Decoding** overlapping windows and blending them in pixel space with the same ramps, band by band of
       window rows; each finished band of pixels goes to a raw level-0 file.
    5. **Writing** with :func:`write_pyramidal_tiff_streamed`, and measuring :func:`seam_score` at the window borders.

    ``blend=False`` is naive tiling: non-overlapping windows, each denoised and decoded alone (the same code with a
    stride of one window), for comparison.

    Memory: the latent canvas, the weight accumulators, the window conditions, the pixel band and level 0 live in
    ``np.memmap`` files in a temporary folder (removed at the end); the process holds the model plus one batch of
    windows, one band column block and a few tiles, whatever the slide's size.

    Args:
        pipeline: an :class:`bundle.sampling.pipeline.ExpressionToTissuePipeline` (e.g. from
            :func:`bundle.sampling.generation.load_pipeline`).
        positions_um: ``(N, 2)`` centres (x, y) of the in-tissue spots in micrometres (slide or array coordinates).
        expression: ``(N, G)`` log-normalised expression in the model's gene-panel order.
        output_path: the ``.tif`` to write (atomically); its folder must exist.
        patch_fov_um: field of view of one model patch in micrometres; defaults to the checkpoint's
            ``pipeline.info["patch_fov_um"]``.
        neighbors: optional ``(N, 6)`` neighbour indices into the spots (``-1``: none), as in training, to measure the
            lattice's orientation (default: the Visium layout with array rows along y).
        mpp: output pixel size in micrometres; the model's pixel size (``patch_fov_um / patch size``) divided by a
            whole number (decoded windows are upsampled bilinearly). Defaults to the model's pixel size.
        overlap: fraction of a window shared with the next one, in [0, 1). Defaults to 0.5.
        blend: False for naive tiling (``overlap`` 0, no blending). Defaults to True.
        num_inference_steps: denoising steps; defaults to the pipeline's.
        guidance_scale: classifier-free guidance scale; defaults to the pipeline's (1.0: none).
        seed: seed of the initial noise and of stochastic steps; the same seed gives the same slide.
        batch_size: windows per network forward (twice that with guidance). Defaults to 16.
        tissue_distance_um: a window is over tissue when a spot lies this close to its centre. Defaults to the spot
            pitch, so a spot dropped by QC inside the tissue leaves no hole.
        sigma_um: Gaussian width of the interpolation; defaults to 0.4 x the spot pitch.
        pitch_um: spot pitch; measured from the positions by default (100 um on Visium).
        region_um: optional ``(x0, y0, x1, y1)`` micrometres to synthesise instead of the whole array (rounded up to
            whole windows).
        tile_size: TIFF tile edge. Defaults to 256.
        compression: TIFF compression (see :func:`write_pyramidal_tiff`). Defaults to ``"jpeg"``.
        quality: JPEG quality. Defaults to 90.
        min_level_size: smallest pyramid level's longest side (see :func:`pyramid_level_shapes`). Defaults to 256.
        progress: show progress bars.
        workdir: folder for the temporary files; defaults to the system's temporary folder.

    Returns:
        A summary: ``path``, ``shape`` (level-0 height, width), ``mpp``, ``origin_um`` (x, y of pixel (0, 0) in the
        positions' coordinates), ``levels``, ``windows`` (tissue windows), ``grid``, ``window_px``, ``stride_px``,
        ``seam_score``, ``timings_s``, ``memory_mb`` and the settings used.

    Raises:
        ValueError: for inputs that do not fit the model or each other (gene count, shapes, no spot in the region).
        FileNotFoundError, NotADirectoryError, PermissionError: when ``output_path`` cannot be written (checked before
            any computation; nothing is left behind on any error).
    """
    import torch
    from scipy.spatial import cKDTree

    start_time = time.perf_counter()
    output_path = Path(output_path)
    positions_um = np.asarray(positions_um, dtype=np.float64)
    expression = expression.detach().cpu().numpy() if hasattr(expression, "detach") else expression
    expression = np.asarray(expression, dtype=np.float32)
    network = pipeline.network
    num_genes = getattr(network, "num_genes", None)
    num_neighbors = int(getattr(network, "num_neighbors", 0) or 0)
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
    channels, latent_h, latent_w = pipeline.latent_shape
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
    _check_output_path(output_path)
    compression = check_write_arguments(output_path, 1.0, tile_size, compression, quality, min_level_size)
    steps = pipeline.num_inference_steps if num_inference_steps is None else int(num_inference_steps)
    scale = pipeline.guidance_scale if guidance_scale is None else guidance_scale
    pitch = estimate_spot_pitch(positions_um) if pitch_um is None else float(pitch_um)
    tissue_distance = pitch if tissue_distance_um is None else float(tissue_distance_um)
    sigma = 0.4 * pitch if sigma_um is None else float(sigma_um)
    if tissue_distance <= 0 or sigma <= 0 or pitch <= 0:
        raise ValueError(
            f"tissue_distance_um, sigma_um and pitch_um must be positive, got {tissue_distance}, {sigma} and {pitch}."
        )
    radius = 1.5 * max(pitch, tissue_distance)

    device = pipeline.device
    pipeline.autoencoder.eval()
    # the decoder's upsampling factor, from one decode (also checks that the autoencoder runs)
    with torch.no_grad():
        probe = pipeline.decode(torch.zeros((1, channels, latent_h, latent_w), device=device))
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
    out_mpp = model_mpp / upsample
    stride = latent_w if not blend else max(1, int(round(latent_w * (1.0 - float(overlap)))))
    factor = patch_px // latent_w * upsample  # output pixels per latent pixel
    window_px, stride_px = latent_w * factor, stride * factor

    tree = cKDTree(positions_um)
    layout = _plan_layout(positions_um, tree, patch_fov_um, latent_w, stride, tissue_distance, region_um)
    num_windows = len(layout.starts)
    if num_windows == 0:
        where = f"region_um {region_um}" if region_um is not None else "the slide"
        raise ValueError(
            f"no in-tissue spot lies within tissue_distance_um={tissue_distance:g} of a window centre in {where}; "
            "choose a region over the spots (positions_um are in the same micrometre coordinates) or a larger "
            "tissue_distance_um."
        )
    offsets = lattice_offsets(positions_um, neighbors, pitch) if num_neighbors else None
    height_px, width_px = layout.canvas[0] * factor, layout.canvas[1] * factor
    logger.info(
        "synthesising %s: %d x %d px at %.4g um/px, %d of %d windows over tissue (%d x %d latent, stride %d), "
        "%d steps, guidance %s, seed %d",
        output_path, height_px, width_px, out_mpp, num_windows, layout.grid[0] * layout.grid[1], latent_w, latent_w,
        stride, steps, scale, seed,
    )  # fmt: skip

    if workdir is not None and not Path(workdir).is_dir():
        raise FileNotFoundError(f"workdir {str(workdir)!r} does not exist; create it or pass workdir=None.")
    scratch = Path(tempfile.mkdtemp(prefix=".synthesis-", dir=None if workdir is None else str(workdir)))
    timings: dict[str, float] = {}
    was_training = network.training
    network.eval()
    try:
        # --- conditions of the tissue windows (memmap, computed in chunks) ------------------------------------------
        cond_shape = (num_windows, *((1 + num_neighbors,) if num_neighbors else ()), expression.shape[1])
        conditions = memmap_array(scratch, "conditions", cond_shape)
        for first in range(0, num_windows, 256):
            centres = layout.centres_um[first : first + 256]
            centre, _ = interpolate_expression(positions_um, expression, centres, sigma, radius, tree)
            if not num_neighbors:
                conditions[first : first + len(centres)] = centre
                continue
            block = np.repeat(centre[:, None], 1 + num_neighbors, axis=1)
            for slot in range(num_neighbors):
                points = centres + offsets[slot % len(offsets)]
                values, _ = interpolate_expression(positions_um, expression, points, sigma, radius, tree)
                distance, _ = tree.query(points, k=1, distance_upper_bound=tissue_distance * (1 + 1e-9))
                on_tissue = np.isfinite(distance)
                block[on_tissue, 1 + slot] = values[on_tissue]
            conditions[first : first + len(centres)] = block
        pipeline.check_inputs(torch.as_tensor(np.asarray(conditions[:1])), steps, scale)

        # --- latent canvas, weights, initial noise ------------------------------------------------------------------
        canvas = memmap_array(scratch, "canvas", (channels, *layout.canvas))
        accumulator = memmap_array(scratch, "accumulator", (channels, *layout.canvas))
        weight_sum = memmap_array(scratch, "weight_sum", layout.canvas)
        initial_canvas_noise(seed, (channels, *layout.canvas), out=canvas)
        latent_weights = np.outer(window_weights(latent_w), window_weights(latent_w))
        for row, col in layout.starts:
            weight_sum[row : row + latent_w, col : col + latent_w] += latent_weights
        inverse_weights = memmap_array(scratch, "inverse_weights", layout.canvas)
        for row in range(0, layout.canvas[0], _NOISE_ROWS):
            block = np.asarray(weight_sum[row : row + _NOISE_ROWS])
            inverse_weights[row : row + _NOISE_ROWS] = np.where(block > 0, 1.0 / np.maximum(block, 1e-30), 0.0)

        # --- joint denoising ----------------------------------------------------------------------------------------
        denoise_start = time.perf_counter()
        pipeline.scheduler.set_timesteps(steps, device=device)
        timesteps = list(pipeline.scheduler.timesteps)
        iterator = timesteps
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(timesteps, desc="denoising slide", leave=False)
        with torch.no_grad():
            for step_index, t in enumerate(iterator):
                accumulator[:] = 0.0
                for first in range(0, num_windows, batch_size):
                    starts = layout.starts[first : first + batch_size]
                    latents = np.stack([canvas[:, r : r + latent_w, c : c + latent_w] for r, c in starts])
                    condition = torch.from_numpy(np.asarray(conditions[first : first + len(starts)])).to(device)
                    output = pipeline.guided_output(torch.from_numpy(latents).to(device), t, condition, scale)
                    output = output.float().cpu().numpy() * latent_weights
                    for (r, c), out in zip(starts, output):
                        accumulator[:, r : r + latent_w, c : c + latent_w] += out
                for chunk, row in enumerate(range(0, layout.canvas[0], _NOISE_ROWS)):
                    rows = slice(row, row + _NOISE_ROWS)
                    inverse = np.asarray(inverse_weights[rows])
                    latents = torch.from_numpy(np.array(canvas[:, rows]))[None].to(device)
                    output = torch.from_numpy(np.asarray(accumulator[:, rows]) * inverse)[None].to(device)
                    generators = None
                    if pipeline.stochastic:
                        step_seed = _derived_seed(seed, 1, step_index, chunk)
                        generators = [torch.Generator(device=device).manual_seed(step_seed)]
                    stepped = pipeline.step(output, t, latents, generators)[0].float().cpu().numpy()
                    canvas[:, rows] = np.where(inverse > 0, stepped, canvas[:, rows])
        timings["denoise"] = time.perf_counter() - denoise_start

        # --- decoding and pixel blending, band by band --------------------------------------------------------------
        decode_start = time.perf_counter()
        level0 = memmap_array(scratch, "level0", (height_px, width_px, 3), dtype=np.uint8)
        band = memmap_array(scratch, "band", (window_px, width_px, 3))
        band_weights = memmap_array(scratch, "band_weights", (window_px, width_px))
        pixel_weights = np.outer(window_weights(window_px), window_weights(window_px))
        rows_of_windows = layout.starts[:, 0] // stride
        grid_rows = range(layout.grid[0])
        if progress:
            from tqdm.auto import tqdm

            grid_rows = tqdm(grid_rows, desc="decoding slide", leave=False)
        with torch.no_grad():
            for grid_row in grid_rows:
                selected = layout.starts[rows_of_windows == grid_row]
                for first in range(0, len(selected), batch_size):
                    starts = selected[first : first + batch_size]
                    latents = np.stack([canvas[:, r : r + latent_w, c : c + latent_w] for r, c in starts])
                    images = pipeline.decode(torch.from_numpy(latents).to(device))
                    if upsample > 1:
                        images = torch.nn.functional.interpolate(
                            images, scale_factor=upsample, mode="bilinear", align_corners=False
                        ).clamp(0.0, 1.0)
                    images = images.float().cpu().numpy().transpose(0, 2, 3, 1) * pixel_weights[..., None]
                    for (_, c), image in zip(starts, images):
                        x = c * factor
                        band[:, x : x + window_px] += image
                        band_weights[:, x : x + window_px] += pixel_weights
                last = grid_row == layout.grid[0] - 1
                done = window_px if last else stride_px
                top = grid_row * stride_px
                for x in range(0, width_px, _COLUMN_BLOCK):
                    columns = slice(x, x + _COLUMN_BLOCK)
                    weights = np.asarray(band_weights[:done, columns])
                    values = np.asarray(band[:done, columns]) / np.maximum(weights, 1e-30)[..., None]
                    values = np.where(weights[..., None] > 0, values, 1.0)
                    level0[top : top + done, columns] = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
                    if not last:  # move the rows the next window row still adds to up, clear the rest
                        band[: window_px - stride_px, columns] = np.array(band[stride_px:, columns])
                        band[window_px - stride_px :, columns] = 0.0
                        band_weights[: window_px - stride_px, columns] = np.array(band_weights[stride_px:, columns])
                        band_weights[window_px - stride_px :, columns] = 0.0
        timings["decode"] = time.perf_counter() - decode_start

        # --- seam score on the synthesised pixels -------------------------------------------------------------------
        seam_start = time.perf_counter()
        stats = SeamStatistics(height_px, width_px, window_px, stride_px, period=factor)
        for row in range(0, height_px, _SEAM_ROWS):
            strip = np.asarray(level0[row : row + _SEAM_ROWS])
            covered = np.asarray(weight_sum[row // factor : -(-(row + len(strip)) // factor)]) > 0
            covered = np.repeat(np.repeat(covered, factor, axis=0), factor, axis=1)
            offset = row - (row // factor) * factor
            stats.update(strip, covered[offset : offset + len(strip)])
        score = stats.score
        timings["seam_score"] = time.perf_counter() - seam_start

        # --- pyramidal TIFF -----------------------------------------------------------------------------------------
        write_start = time.perf_counter()
        level0.flush()
        write_pyramidal_tiff_streamed(
            output_path, level0, out_mpp, tile_size=tile_size, compression=compression, quality=quality,
            min_level_size=min_level_size, workdir=scratch,
        )  # fmt: skip
        timings["write"] = time.perf_counter() - write_start
        memory_mb = {
            "canvas_files": (canvas.nbytes + accumulator.nbytes + weight_sum.nbytes + inverse_weights.nbytes) / 2**20,
            "conditions_file": conditions.nbytes / 2**20,
            "band_files": (band.nbytes + band_weights.nbytes) / 2**20,
            "level0_file": level0.nbytes / 2**20,
            "process_peak_rss": _peak_rss_mb(),
        }
    finally:
        network.train(was_training)
        shutil.rmtree(scratch, ignore_errors=True)
    timings["total"] = time.perf_counter() - start_time
    summary = {
        "path": str(output_path),
        "shape": (height_px, width_px),
        "mpp": out_mpp,
        "origin_um": layout.origin_um,
        "levels": pyramid_level_shapes(height_px, width_px, min_level_size),
        "windows": num_windows,
        "grid": layout.grid,
        "latent_canvas": (channels, *layout.canvas),
        "window_px": window_px,
        "stride_px": stride_px,
        "blend": bool(blend),
        "overlap": 1.0 - stride / latent_w,
        "seam_score": score,
        "num_inference_steps": steps,
        "guidance_scale": scale,
        "seed": int(seed),
        "tissue_distance_um": tissue_distance,
        "sigma_um": sigma,
        "pitch_um": pitch,
        "timings_s": timings,
        "memory_mb": memory_mb,
    }
    logger.info(
        "wrote %s: %d x %d px at %.4g um/px, %d windows, seam score %.3f (%s), %.1f s",
        output_path, height_px, width_px, out_mpp, num_windows, score, "blended" if blend else "naive tiling",
        timings["total"],
    )  # fmt: skip
    return summary


def _peak_rss_mb() -> float:
    """The process's peak resident memory so far in MiB (``ru_maxrss``; includes the model and everything before)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except (ImportError, OSError):  # pragma: no cover - not on Linux/macOS
        return float("nan")
