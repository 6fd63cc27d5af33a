"""Tissue detection on a slide thumbnail: which spots' patches land on tissue and which on bare glass.

The mask follows what pathology toolkits do (CLAM, TIAToolbox, histolab): the HSV saturation of a low-resolution
image, thresholded with Otsu's method, then closed and hole-filled so that gland lumina, vessels and fat inside the
tissue count as tissue. Glass is nearly grey (saturation about 0.0-0.03), stained tissue is not (0.1-0.6). One
thumbnail is read per slide, band by band from the coarsest pyramid level that is fine enough, so the check costs
about as much as opening the slide.

A spot's tissue fraction is measured on the mask grown by :data:`TISSUE_MARGIN_UM`: Space Ranger calls a spot in
tissue when it touches tissue, so a spot at the tissue's edge is not background; a spot is on background when less
than :data:`MIN_TISSUE_FRACTION` of its patch is tissue.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bundle.io.slides import close_slide, get_wsi_reader, level_for_mpp, open_slide

__all__ = [
    "MIN_TISSUE_FRACTION",
    "SATURATION_THRESHOLD_RANGE",
    "TISSUE_MARGIN_UM",
    "TissueThumbnail",
    "otsu_threshold",
    "patch_tissue_fractions",
    "read_thumbnail",
    "spot_tissue_fractions",
    "tissue_mask",
]

# Otsu's threshold is clipped to this range: on a slide that is all tissue (or all glass) Otsu would split one class
# in two, and a threshold outside this range is never the glass/tissue boundary of an H&E stain.
SATURATION_THRESHOLD_RANGE = (0.05, 0.1)
# closing radius of the mask (fills nuclei-free gaps, thin fat membranes) and the margin a spot may lie off the tissue
TISSUE_CLOSING_UM = 32.0
TISSUE_MARGIN_UM = 32.0
# a spot whose patch has less tissue than this (after the margin) is on background
MIN_TISSUE_FRACTION = 0.05

# a patch spans at least this many thumbnail pixels across
_PIXELS_PER_PATCH = 16
# pixels read per band (bounds the memory of reading a single-level slide)
_BAND_PIXELS = 16_000_000


@dataclass
class TissueThumbnail:
    """A slide thumbnail and its tissue mask.

    Attributes:
        image: ``(height, width, 3)`` float32 RGB thumbnail (0-255).
        mask: ``(height, width)`` bool, True on tissue.
        mpp: thumbnail pixel size in um/px.
        scale: level-0 pixels per thumbnail pixel.
        threshold: saturation threshold used for ``mask``.
    """

    image: np.ndarray
    mask: np.ndarray
    mpp: float
    scale: float
    threshold: float


def otsu_threshold(values: np.ndarray, bins: int = 256, value_range: tuple[float, float] = (0.0, 1.0)) -> float:
    """Otsu's threshold of ``values``: the cut that maximises the between-class variance of the histogram."""
    hist, edges = np.histogram(np.asarray(values, dtype=np.float64).ravel(), bins=bins, range=value_range)
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(hist * centres)
    mean0 = sum0 / np.maximum(weight0, 1)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _disk(radius_px: float) -> np.ndarray:
    r = max(1, int(round(radius_px)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx**2 + yy**2 <= r * r


def tissue_mask(
    image: np.ndarray,
    mpp: float,
    threshold_range: Sequence[float] = SATURATION_THRESHOLD_RANGE,
    closing_um: float = TISSUE_CLOSING_UM,
) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB thumbnail: HSV saturation above Otsu's threshold, closed and with holes filled.

    Args:
        image: ``(height, width, 3)`` RGB.
        mpp: the thumbnail's pixel size (um/px), for the closing radius.
        threshold_range: Otsu's threshold is clipped to this range.
        closing_um: radius of the morphological closing in micrometres (0: none).

    Returns:
        The bool mask and the saturation threshold used.
    """
    from scipy import ndimage

    rgb = np.asarray(image, dtype=np.float32)[..., :3]
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
    threshold = float(np.clip(otsu_threshold(saturation), *threshold_range))
    mask = saturation > threshold
    if closing_um > 0:
        disk = _disk(closing_um / mpp)
        pad = disk.shape[0] // 2
        mask = ndimage.binary_closing(np.pad(mask, pad, mode="edge"), structure=disk)[pad:-pad, pad:-pad]
    return ndimage.binary_fill_holes(mask), threshold


def read_thumbnail(
    path: str | os.PathLike,
    backend: str | None,
    downsamples: Sequence[float],
    mpp: float,
    target_mpp: float,
    threshold_range: Sequence[float] = SATURATION_THRESHOLD_RANGE,
) -> TissueThumbnail:
    """Read a slide at about ``target_mpp`` um/px (block means of the finest sufficient level) and mask its tissue.

    Args:
        path: slide file.
        backend: slide reader (see :func:`bundle.io.slides.get_wsi_reader`).
        downsamples: downsample of each pyramid level (``SlideInfo.downsamples``).
        mpp: level-0 pixel size (um/px).
        target_mpp: wanted thumbnail pixel size (um/px); the result is at least this fine.
        threshold_range: clip range of the saturation threshold.
    """
    reader = get_wsi_reader(backend, channel_dim=-1)
    wsi = open_slide(path, reader)
    try:
        level = level_for_mpp(downsamples, mpp, target_mpp)
        height, width = (int(v) for v in reader.get_size(wsi, level))
        level_ds = reader.get_downsample_ratio(wsi, level)
        factor = max(1, min(int(target_mpp / (mpp * level_ds)), height, width))
        out_h, out_w = max(1, height // factor), max(1, width // factor)
        rows_per_band = max(1, _BAND_PIXELS // max(width, 1) // factor) * factor
        image = np.zeros((out_h, out_w, 3), dtype=np.float32)
        for top in range(0, out_h * factor, rows_per_band):
            rows = min(rows_per_band, out_h * factor - top)
            band, _ = reader.get_data(
                wsi, location=(int(round(top * level_ds)), 0), size=(rows, out_w * factor), level=level, mode="RGB"
            )
            band = np.asarray(band, dtype=np.float32)[..., :3]
            reduced = band.reshape(rows // factor, factor, out_w, factor, 3).mean(axis=(1, 3))
            image[top // factor : top // factor + rows // factor] = reduced
    finally:
        close_slide(wsi)
    scale = level_ds * factor
    mask, threshold = tissue_mask(image, mpp * scale, threshold_range)
    return TissueThumbnail(image, mask, mpp * scale, scale, threshold)


def patch_tissue_fractions(
    thumbnail: TissueThumbnail, xy: np.ndarray, size_px: float, margin_um: float = TISSUE_MARGIN_UM
) -> np.ndarray:
    """Fraction of tissue in the square patch of side ``size_px`` (level-0 px) around each ``(x, y)`` centre.

    The tissue mask is grown by ``margin_um`` first (see the module docstring). The part of a patch outside the slide
    is not counted (a spot at the edge is judged on what the slide shows); a patch entirely outside has fraction 0.
    """
    from scipy import ndimage

    mask = thumbnail.mask
    if margin_um > 0:
        mask = ndimage.binary_dilation(mask, structure=_disk(margin_um / thumbnail.mpp))
    height, width = mask.shape
    integral = np.zeros((height + 1, width + 1))
    integral[1:, 1:] = mask.astype(np.float64).cumsum(axis=0).cumsum(axis=1)
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2) / thumbnail.scale
    half = max(size_px / thumbnail.scale / 2.0, 0.5)
    x0 = np.clip(np.round(xy[:, 0] - half), 0, width).astype(int)
    x1 = np.clip(np.round(xy[:, 0] + half), 0, width).astype(int)
    y0 = np.clip(np.round(xy[:, 1] - half), 0, height).astype(int)
    y1 = np.clip(np.round(xy[:, 1] + half), 0, height).astype(int)
    area = (x1 - x0) * (y1 - y0)
    tissue = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return np.where(area > 0, tissue / np.maximum(area, 1), 0.0)


def spot_tissue_fractions(
    path: str | os.PathLike,
    backend: str | None,
    downsamples: Sequence[float],
    mpp: float,
    xy: np.ndarray,
    fov_um: float,
) -> np.ndarray:
    """Tissue fraction of each spot's ``fov_um`` patch, from one thumbnail of the slide (16 thumbnail pixels a patch).

    Args:
        path: slide file.
        backend: slide reader.
        downsamples: the slide's pyramid downsamples.
        mpp: level-0 pixel size (um/px).
        xy: ``(n, 2)`` spot centres in level-0 pixels.
        fov_um: patch field of view in micrometres.
    """
    target_mpp = max(fov_um / _PIXELS_PER_PATCH, mpp)
    thumbnail = read_thumbnail(path, backend, downsamples, mpp, target_mpp)
    return patch_tissue_fractions(thumbnail, xy, fov_um / mpp)
