"""Image grids: the one writer of PNG grids of patches, used for counterfactual edits (rows of edits with labels) and
for the training sample grids (real patches above generated ones), and the float-to-uint8 conversion of patches."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` [0, 1] image to an ``(H, W, 3)`` uint8 array."""
    return (image.detach().float().cpu().permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)


def save_image_grid(
    rows: Sequence[torch.Tensor],
    path: str | os.PathLike,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    gap: int = 2,
    rows_per_group: int | Sequence[int] = 0,
) -> Path:
    """Save rows of ``(S, 3, H, W)`` [0, 1] patches as one PNG grid (row ``r``, column ``s``), atomically.

    With labels, a white margin on the left holds ``row_labels`` and one on top ``column_labels``. Rows and columns are
    ``gap`` pixels apart; with ``rows_per_group`` > 0 the rows come in groups of that many (e.g. a real row above a
    generated one), ``2 * gap`` apart; a sequence gives the size of each group in turn (groups of unequal size).

    Returns:
        The path written.
    """
    from PIL import Image

    if not rows:
        raise ValueError("no rows to put in the grid.")
    shape = tuple(rows[0].shape)
    if any(tuple(r.shape) != shape for r in rows) or len(shape) != 4:
        shapes = [tuple(r.shape) for r in rows]
        raise ValueError(f"every row must hold (S, 3, H, W) patches of one shape, got {shapes}.")
    columns, _, h, w = shape
    font = _label_font() if row_labels or column_labels else None
    left = max(int(font.getlength(str(t))) for t in row_labels) + 6 if row_labels else 0
    top = 14 if column_labels else 0
    tops = [top + r * (h + gap) + group * gap for r, group in enumerate(_row_groups(len(rows), rows_per_group))]
    canvas = np.full((tops[-1] + h, left + columns * (w + gap) - gap, 3), 255, np.uint8)
    for y, images in zip(tops, rows):
        for c in range(columns):
            x = left + c * (w + gap)
            canvas[y : y + h, x : x + w] = to_uint8(images[c])
    image = Image.fromarray(canvas)
    if font is not None:
        _draw_labels(image, font, tops, (h, w), left, gap, row_labels or [], column_labels or [])
    from bundle.utils import write_atomic  # an ordinary file's permissions, not a temporary file's private ones

    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG", optimize=True))


def pair_rows(real: torch.Tensor, generated: torch.Tensor, columns: int = 8) -> list[torch.Tensor]:
    """Rows for :func:`save_image_grid` (``rows_per_group=2``): ``columns`` real patches above the same spots'
    generated ones, group after group; the last group is padded with white patches.

    Args:
        real: ``(B, 3, H, W)`` [0, 1] patches.
        generated: patches of the same shape.
        columns: spots per row.
    """
    if real.shape != generated.shape:
        raise ValueError(f"real {tuple(real.shape)} and generated {tuple(generated.shape)} patches differ in shape.")
    count = real.shape[0]
    columns = max(1, min(columns, count))
    padding = -count % columns
    rows = []
    for first in range(0, count, columns):
        for batch in (real, generated):
            row = batch[first : first + columns]
            if len(row) < columns:
                row = torch.cat([row, torch.ones((padding, *row.shape[1:]), dtype=row.dtype)])
            rows.append(row)
    return rows


def _row_groups(count: int, rows_per_group: int | Sequence[int]) -> list[int]:
    """The group of each of ``count`` rows: groups of ``rows_per_group`` rows (0: one group), or of the given sizes."""
    if isinstance(rows_per_group, int):
        return [r // rows_per_group if rows_per_group > 0 else 0 for r in range(count)]
    sizes = [int(n) for n in rows_per_group]
    if sum(sizes) != count or min(sizes, default=1) < 1:
        raise ValueError(f"group sizes {sizes} must be positive and add up to the {count} rows.")
    return [g for g, n in enumerate(sizes) for _ in range(n)]


def _label_font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _draw_labels(image, font, tops: list[int], size: tuple[int, int], left: int, gap: int, row_labels, column_labels):
    """Row labels in the left margin (vertically centred on their rows), column labels cut to a patch's width on top."""
    from PIL import ImageDraw

    height, width = size
    draw = ImageDraw.Draw(image)
    for y, text in zip(tops, row_labels):
        draw.text((2, y + height // 2 - 5), str(text), fill=(0, 0, 0), font=font)
    for c, text in enumerate(column_labels):
        label = str(text)
        while label and font.getlength(label) > width:
            label = label[:-1]
        draw.text((left + c * (width + gap), 1), label, fill=(0, 0, 0), font=font)
