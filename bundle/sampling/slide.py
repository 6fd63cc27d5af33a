"""Whole-slide synthesis: a synthetic H&E slide for a whole spot array, generated with a patch model and written as a
tiled pyramidal TIFF (:func:`bundle.io.tiff.write_pyramidal_tiff_streamed`) that memory does not grow with.

:func:`synthesize_slide` runs these steps (details in ``docs/whole_slide.md``):

1. **Plan** (:func:`bundle.sampling.slide_plan.plan_slide`): check the inputs, then lay out one latent canvas at the
   model's resolution (a latent pixel covers ``patch_fov_um / latent width`` micrometres: 8 um for the demo model),
   covered by windows of the model's latent size with a stride of ``(1 - overlap)`` windows. It spans the spots'
   bounding box plus ``tissue_distance_um`` and half a window on every side (or ``region_um``). A window is *tissue*
   when an in-tissue spot lies within ``tissue_distance_um`` of its centre; other windows are background: never
   denoised nor decoded, their pixels white (255).
2. **Window conditions** (:func:`_window_conditions`) interpolated over the hex lattice: a window's condition is the
   Gaussian-weighted mean (:func:`interpolate_expression`, ``sigma_um``) of the log-normalised expression of the spots
   within ``1.5 * max(pitch, tissue_distance_um)`` of its centre; for models with neighbours, neighbour ``k``'s
   condition is interpolated at the centre plus the lattice's ``k``-th hex offset
   (:func:`bundle.geometry.lattice_offsets`), or is the centre's condition where that point is off the tissue (no spot
   within ``tissue_distance_um``), as in training, where a missing neighbour is the spot itself.
3. **Canvas and noise** (:func:`_create_canvas`): the seeded initial latents (:func:`initial_canvas_noise`) and the
   summed window weights :func:`window_weights` (outer product of two sine-squared ramps).
4. **Joint denoising** (:func:`_denoise_canvas`, MultiDiffusion): at every timestep each tissue window's guided model
   output is accumulated into the canvas with the window weights, divided by the summed weights, and one scheduler step
   is taken on the whole canvas (steps are elementwise, so this equals averaging the per-window steps of deterministic
   samplers). Overlapping windows thus agree at every step.
5. **Decoding** (:func:`_decode_canvas`): overlapping windows decoded and blended in pixel space with the same ramps,
   band by band of window rows; each finished band of pixels goes to a raw level-0 file.
6. **Seam score** (:func:`_slide_seam_score`, :class:`bundle.sampling.seams.SeamStatistics`) of the synthesised
   pixels at the window borders, and **writing** the pyramidal TIFF.
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

from bundle.io.tiff import pyramid_level_shapes, write_pyramidal_tiff_streamed
from bundle.sampling.seams import STRIP_ROWS, SeamStatistics
from bundle.sampling.slide_plan import SlidePlan, _check_output_path, plan_slide
from bundle.utils import memmap_array

logger = logging.getLogger(__name__)


_NOISE_ROWS = 64  # latent rows per chunk of initial and step noise: fixed, so the slide does not depend on chunking
_KNN = 19  # spots considered per interpolated point: a spot and two hexagonal rings around it
_COLUMN_BLOCK = 4096  # pixel columns finalised at a time


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


@dataclass
class _Canvas:
    """The slide's latents and their blending weights, ``np.memmap`` files of the scratch folder."""

    latents: np.ndarray  # (C, H, W): the initial noise, then denoised in place
    accumulator: np.ndarray  # (C, H, W): the weighted window outputs of one step
    weight_sum: np.ndarray  # (H, W): summed window weights, 0 on background
    inverse_weights: np.ndarray  # (H, W): 1 / weight_sum, 0 on background
    window_weights: np.ndarray  # (window, window): the weights of one window

    @property
    def nbytes(self) -> int:
        return self.latents.nbytes + self.accumulator.nbytes + self.weight_sum.nbytes + self.inverse_weights.nbytes


@dataclass
class _Band:
    """Pixel rows of one row of windows being blended: weighted sums, summed weights, the weights of one window."""

    values: np.ndarray  # (window_px, W, 3)
    weights: np.ndarray  # (window_px, W)
    window_weights: np.ndarray  # (window_px, window_px)


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

    The steps (layout, window conditions, joint denoising, decoding, seam score, writing) are described in this
    module's docstring and in ``docs/whole_slide.md``. ``blend=False`` is naive tiling: non-overlapping windows, each
    denoised and decoded alone (the same code with a stride of one window), for comparison.

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
    start_time = time.perf_counter()
    plan = plan_slide(
        pipeline, positions_um, expression, output_path, patch_fov_um=patch_fov_um, neighbors=neighbors, mpp=mpp,
        overlap=overlap, blend=blend, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        seed=seed, batch_size=batch_size, tissue_distance_um=tissue_distance_um, sigma_um=sigma_um,
        pitch_um=pitch_um, region_um=region_um, tile_size=tile_size, compression=compression, quality=quality,
        min_level_size=min_level_size,
    )  # fmt: skip
    _log_plan(plan)
    if workdir is not None and not Path(workdir).is_dir():
        raise FileNotFoundError(f"workdir {str(workdir)!r} does not exist; create it or pass workdir=None.")
    scratch = Path(tempfile.mkdtemp(prefix=".synthesis-", dir=None if workdir is None else str(workdir)))
    network = pipeline.network
    was_training = network.training
    network.eval()
    try:
        score, timings, memory_mb = _generate_slide(pipeline, plan, scratch, progress)
    finally:
        network.train(was_training)
        shutil.rmtree(scratch, ignore_errors=True)
    timings["total"] = time.perf_counter() - start_time
    height_px, width_px = plan.shape
    logger.info(
        "wrote %s: %d x %d px at %.4g um/px, %d windows, seam score %.3f (%s), %.1f s",
        plan.output_path, height_px, width_px, plan.mpp, len(plan.layout.starts), score,
        "blended" if plan.blend else "naive tiling", timings["total"],
    )  # fmt: skip
    summary = _summary(plan, score, timings, memory_mb)
    summary["expression_guidance_scale"] = float(getattr(pipeline, "expression_guidance_scale", 0.0))
    return summary


def check_slide_outputs(paths: Sequence[str | os.PathLike]) -> None:
    """Fail before any slide is synthesised when one of several output paths cannot be written (missing folder, a
    folder, no rights; as :func:`synthesize_slide` checks each) or a path comes twice."""
    seen: set[Path] = set()
    for path in map(Path, paths):
        if path.resolve() in seen:
            raise ValueError(f"output_path {str(path)!r} is given for two slides; give each slide its own file.")
        seen.add(path.resolve())
        _check_output_path(path)


def _log_plan(plan: SlidePlan) -> None:
    layout = plan.layout
    height_px, width_px = plan.shape
    logger.info(
        "synthesising %s: %d x %d px at %.4g um/px, %d of %d windows over tissue (%d x %d latent, stride %d), "
        "%d steps, guidance %s, seed %d",
        plan.output_path, height_px, width_px, plan.mpp, len(layout.starts), layout.grid[0] * layout.grid[1],
        layout.window, layout.window, layout.stride, plan.steps, plan.scale, plan.seed,
    )  # fmt: skip


def _generate_slide(
    pipeline, plan: SlidePlan, scratch: Path, progress: bool
) -> tuple[float, dict[str, float], dict[str, float]]:
    """The steps after planning, with their files in ``scratch``; returns ``(seam score, timings, file sizes)``."""
    import torch

    timings: dict[str, float] = {}
    conditions = _window_conditions(plan, scratch)
    pipeline.check_inputs(torch.as_tensor(np.asarray(conditions[:1])), plan.steps, plan.scale)
    canvas = _create_canvas(plan, scratch)
    start = time.perf_counter()
    _denoise_canvas(pipeline, plan, conditions, canvas, progress)
    timings["denoise"] = time.perf_counter() - start
    start = time.perf_counter()
    level0, band_bytes = _decode_canvas(pipeline, plan, canvas.latents, scratch, progress)
    timings["decode"] = time.perf_counter() - start
    start = time.perf_counter()
    score = _slide_seam_score(plan, level0, canvas.weight_sum)
    timings["seam_score"] = time.perf_counter() - start
    start = time.perf_counter()
    level0.flush()
    write_pyramidal_tiff_streamed(plan.output_path, level0, plan.mpp, workdir=scratch, **plan.writer)
    timings["write"] = time.perf_counter() - start
    memory_mb = {
        "canvas_files": canvas.nbytes / 2**20,
        "conditions_file": conditions.nbytes / 2**20,
        "band_files": band_bytes / 2**20,
        "level0_file": level0.nbytes / 2**20,
        "process_peak_rss": _peak_rss_mb(),
    }
    return score, timings, memory_mb


def _window_conditions(plan: SlidePlan, scratch: Path) -> np.ndarray:
    """The conditions ``(M, [1 + K,] G)`` of the tissue windows, a memmap computed 256 windows at a time."""
    centres_um = plan.layout.centres_um
    num_windows, num_neighbors = len(centres_um), plan.num_neighbors
    shape = (num_windows, *((1 + num_neighbors,) if num_neighbors else ()), plan.expression.shape[1])
    conditions = memmap_array(scratch, "conditions", shape)
    for first in range(0, num_windows, 256):
        centres = centres_um[first : first + 256]
        conditions[first : first + len(centres)] = _conditions_at(plan, centres)
    return conditions


def _conditions_at(plan: SlidePlan, centres: np.ndarray) -> np.ndarray:
    """Conditions of windows centred at ``centres``: the interpolated expression there and, for models with
    neighbours, at each hex offset (the centre's own where the offset point is off the tissue)."""
    positions, expression, tree = plan.positions_um, plan.expression, plan.tree
    centre, _ = interpolate_expression(positions, expression, centres, plan.sigma, plan.radius, tree)
    if not plan.num_neighbors:
        return centre
    block = np.repeat(centre[:, None], 1 + plan.num_neighbors, axis=1)
    for slot in range(plan.num_neighbors):
        points = centres + plan.offsets[slot % len(plan.offsets)]
        values, _ = interpolate_expression(positions, expression, points, plan.sigma, plan.radius, tree)
        distance, _ = tree.query(points, k=1, distance_upper_bound=plan.tissue_distance * (1 + 1e-9))
        on_tissue = np.isfinite(distance)
        block[on_tissue, 1 + slot] = values[on_tissue]
    return block


def _create_canvas(plan: SlidePlan, scratch: Path) -> _Canvas:
    """The latent canvas with its seeded initial noise, and the summed window weights (and their inverse)."""
    shape = (plan.channels, *plan.layout.canvas)
    latents = memmap_array(scratch, "canvas", shape)
    accumulator = memmap_array(scratch, "accumulator", shape)
    weight_sum = memmap_array(scratch, "weight_sum", plan.layout.canvas)
    initial_canvas_noise(plan.seed, shape, out=latents)
    size = plan.window
    weights = np.outer(window_weights(size), window_weights(size))
    for row, col in plan.layout.starts:
        weight_sum[row : row + size, col : col + size] += weights
    inverse_weights = memmap_array(scratch, "inverse_weights", plan.layout.canvas)
    for row in range(0, plan.layout.canvas[0], _NOISE_ROWS):
        block = np.asarray(weight_sum[row : row + _NOISE_ROWS])
        inverse_weights[row : row + _NOISE_ROWS] = np.where(block > 0, 1.0 / np.maximum(block, 1e-30), 0.0)
    return _Canvas(latents, accumulator, weight_sum, inverse_weights, weights)


def _progress(items, description: str, enabled: bool):
    """``items``, with a progress bar when ``enabled``."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, leave=False)


def _denoise_canvas(pipeline, plan: SlidePlan, conditions: np.ndarray, canvas: _Canvas, progress: bool) -> None:
    """Joint denoising: at every timestep, blend the tissue windows' outputs and step the whole canvas."""
    import torch

    pipeline.scheduler.set_timesteps(plan.steps, device=pipeline.device)
    timesteps = list(pipeline.scheduler.timesteps)
    with torch.no_grad():
        for step_index, t in enumerate(_progress(timesteps, "denoising slide", progress)):
            _accumulate_window_outputs(pipeline, plan, conditions, canvas, t)
            _step_canvas(pipeline, plan, canvas, t, step_index)


def _accumulate_window_outputs(pipeline, plan: SlidePlan, conditions: np.ndarray, canvas: _Canvas, t) -> None:
    """``canvas.accumulator``: the sum of the tissue windows' guided outputs at timestep ``t``, times their weights."""
    import torch

    size, device = plan.window, pipeline.device
    canvas.accumulator[:] = 0.0
    for first in range(0, len(plan.layout.starts), plan.batch_size):
        starts = plan.layout.starts[first : first + plan.batch_size]
        latents = np.stack([canvas.latents[:, r : r + size, c : c + size] for r, c in starts])
        condition = torch.from_numpy(np.asarray(conditions[first : first + len(starts)])).to(device)
        latents = torch.from_numpy(latents).to(device)
        output = pipeline.guided_output(latents, t, condition, plan.scale)
        output = pipeline.expression_guidance(condition)(output, latents, t)
        output = output.float().cpu().numpy() * canvas.window_weights
        for (r, c), out in zip(starts, output):
            canvas.accumulator[:, r : r + size, c : c + size] += out


def _step_canvas(pipeline, plan: SlidePlan, canvas: _Canvas, t, step_index: int) -> None:
    """One scheduler step on the blended output, 64 latent rows at a time, each chunk with its own seeded noise."""
    import torch

    device = pipeline.device
    for chunk, row in enumerate(range(0, plan.layout.canvas[0], _NOISE_ROWS)):
        rows = slice(row, row + _NOISE_ROWS)
        inverse = np.asarray(canvas.inverse_weights[rows])
        latents = torch.from_numpy(np.array(canvas.latents[:, rows]))[None].to(device)
        output = torch.from_numpy(np.asarray(canvas.accumulator[:, rows]) * inverse)[None].to(device)
        generators = None
        if pipeline.stochastic:
            step_seed = _derived_seed(plan.seed, 1, step_index, chunk)
            generators = [torch.Generator(device=device).manual_seed(step_seed)]
        stepped = pipeline.step(output, t, latents, generators)[0].float().cpu().numpy()
        canvas.latents[:, rows] = np.where(inverse > 0, stepped, canvas.latents[:, rows])


def _decode_canvas(pipeline, plan: SlidePlan, latents: np.ndarray, scratch: Path, progress: bool):
    """Decode the tissue windows row by row into level 0 (a uint8 memmap); returns ``(level0, band file bytes)``."""
    import torch

    height_px, width_px = plan.shape
    level0 = memmap_array(scratch, "level0", (height_px, width_px, 3), dtype=np.uint8)
    band = _Band(
        memmap_array(scratch, "band", (plan.window_px, width_px, 3)),
        memmap_array(scratch, "band_weights", (plan.window_px, width_px)),
        np.outer(window_weights(plan.window_px), window_weights(plan.window_px)),
    )
    rows_of_windows = plan.layout.starts[:, 0] // plan.layout.stride
    with torch.no_grad():
        for grid_row in _progress(range(plan.layout.grid[0]), "decoding slide", progress):
            _decode_window_row(pipeline, plan, latents, plan.layout.starts[rows_of_windows == grid_row], band)
            _finish_band(plan, grid_row, band, level0)
    return level0, band.values.nbytes + band.weights.nbytes


def _decode_window_row(pipeline, plan: SlidePlan, latents: np.ndarray, starts: np.ndarray, band: _Band) -> None:
    """Add the decoded (and upsampled) windows of one window row, times their weights, to the band."""
    import torch

    size = plan.window
    for first in range(0, len(starts), plan.batch_size):
        batch = starts[first : first + plan.batch_size]
        stacked = np.stack([latents[:, r : r + size, c : c + size] for r, c in batch])
        images = pipeline.decode(torch.from_numpy(stacked).to(pipeline.device))
        if plan.upsample > 1:
            images = torch.nn.functional.interpolate(
                images, scale_factor=plan.upsample, mode="bilinear", align_corners=False
            ).clamp(0.0, 1.0)
        images = images.float().cpu().numpy().transpose(0, 2, 3, 1) * band.window_weights[..., None]
        for (_, c), image in zip(batch, images):
            x = c * plan.factor
            band.values[:, x : x + plan.window_px] += image
            band.weights[:, x : x + plan.window_px] += band.window_weights


def _finish_band(plan: SlidePlan, grid_row: int, band: _Band, level0: np.ndarray) -> None:
    """Write the band's finished pixel rows (all of them after the last window row) to level 0 and move the rest up.

    Rows without any window weight (background) are white.
    """
    window_px, stride_px = plan.window_px, plan.stride_px
    last = grid_row == plan.layout.grid[0] - 1
    done = window_px if last else stride_px
    top = grid_row * stride_px
    for x in range(0, plan.shape[1], _COLUMN_BLOCK):
        columns = slice(x, x + _COLUMN_BLOCK)
        weights = np.asarray(band.weights[:done, columns])
        values = np.asarray(band.values[:done, columns]) / np.maximum(weights, 1e-30)[..., None]
        values = np.where(weights[..., None] > 0, values, 1.0)
        level0[top : top + done, columns] = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
        if not last:  # move the rows the next window row still adds to up, clear the rest
            band.values[: window_px - stride_px, columns] = np.array(band.values[stride_px:, columns])
            band.values[window_px - stride_px :, columns] = 0.0
            band.weights[: window_px - stride_px, columns] = np.array(band.weights[stride_px:, columns])
            band.weights[window_px - stride_px :, columns] = 0.0


def _slide_seam_score(plan: SlidePlan, level0: np.ndarray, weight_sum: np.ndarray) -> float:
    """:func:`bundle.sampling.seams.seam_score` of level 0 over the synthesised pixels (not the white background),
    comparing with inside pairs at the latent-pixel phase only."""
    height_px, width_px = plan.shape
    factor = plan.factor
    stats = SeamStatistics(height_px, width_px, plan.window_px, plan.stride_px, period=factor)
    for row in range(0, height_px, STRIP_ROWS):
        strip = np.asarray(level0[row : row + STRIP_ROWS])
        covered = np.asarray(weight_sum[row // factor : -(-(row + len(strip)) // factor)]) > 0
        covered = np.repeat(np.repeat(covered, factor, axis=0), factor, axis=1)
        offset = row - (row // factor) * factor
        stats.update(strip, covered[offset : offset + len(strip)])
    return stats.score


def _summary(plan: SlidePlan, score: float, timings: dict[str, float], memory_mb: dict[str, float]) -> dict:
    """What :func:`synthesize_slide` returns."""
    layout = plan.layout
    height_px, width_px = plan.shape
    return {
        "path": str(plan.output_path),
        "shape": (height_px, width_px),
        "mpp": plan.mpp,
        "origin_um": layout.origin_um,
        "levels": pyramid_level_shapes(height_px, width_px, plan.writer["min_level_size"]),
        "windows": len(layout.starts),
        "grid": layout.grid,
        "latent_canvas": (plan.channels, *layout.canvas),
        "window_px": plan.window_px,
        "stride_px": plan.stride_px,
        "blend": plan.blend,
        "overlap": 1.0 - layout.stride / layout.window,
        "seam_score": score,
        "num_inference_steps": plan.steps,
        "guidance_scale": plan.scale,
        "seed": plan.seed,
        "tissue_distance_um": plan.tissue_distance,
        "sigma_um": plan.sigma,
        "pitch_um": plan.pitch,
        "timings_s": timings,
        "memory_mb": memory_mb,
    }


def _peak_rss_mb() -> float:
    """The process's peak resident memory so far in MiB (``ru_maxrss``; includes the model and everything before)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except (ImportError, OSError):  # pragma: no cover - not on Linux/macOS
        return float("nan")
