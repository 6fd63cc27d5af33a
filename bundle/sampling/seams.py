"""Seam metric of tiled images: how much more adjacent pixels differ across window borders than inside windows.

:func:`seam_score` scores an image in memory (or an ``np.memmap``, read strip by strip); :class:`SeamStatistics`
accumulates the same statistic over strips, as :func:`bundle.sampling.slide.synthesize_slide` produces them. See
``docs/whole_slide.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

STRIP_ROWS = 128  # pixel rows per strip of the seam statistics


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
    multiple of ``f``), so this decoder pattern does not count as a seam. :func:`bundle.sampling.slide.synthesize_slide`
    does so.

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
    for row in range(0, image.shape[0], STRIP_ROWS):
        stats.update(image[row : row + STRIP_ROWS], None if mask is None else mask[row : row + STRIP_ROWS])
    return stats.score
