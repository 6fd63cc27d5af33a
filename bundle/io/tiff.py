"""Tiled pyramidal TIFF writing (levels as top-level pages, pixel size recorded) that cuCIM, OpenSlide and tifffile
read and QuPath opens; the streamed writer holds one level band at a time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from bundle.utils import check_writable, memmap_array, no_space_errors

_COMPRESSIONS = ("jpeg", "deflate", "zlib", "lzw", "none")
_WRITE_BUFFER_TILES = 32  # tiles that tifffile compresses per pass
_DOWNSAMPLE_BLOCK = 2048  # reduced-level columns made per block (4096 columns of the level above)


def downsample_by_two(image: np.ndarray) -> np.ndarray:
    """Halve an image's height and width by averaging 2x2 blocks (area interpolation).

    An odd last row or column is replicated before averaging, so the result has ``ceil(H / 2) x ceil(W / 2)``
    pixels and the content stays aligned with the level-0 pixel grid (level pixel ``i`` covers level-0 pixels
    ``2i`` and ``2i + 1``).

    Args:
        image: array of shape (H, W) or (H, W, C), any numeric dtype.

    Returns:
        The downsampled array with the input's dtype (rounded half up for integer dtypes).
    """
    if image.ndim not in (2, 3):
        raise ValueError(f"image must have shape (H, W) or (H, W, C), got shape {image.shape}.")
    if image.dtype == np.uint8 and (image.ndim == 2 or image.shape[2] == 3):
        from PIL import Image  # C implementation of the same 2x2 box average (ragged edge blocks averaged as is)

        return np.asarray(Image.fromarray(np.ascontiguousarray(image)).reduce(2))
    height, width = image.shape[:2]
    if height % 2 or width % 2:
        pad = [(0, height % 2), (0, width % 2)] + [(0, 0)] * (image.ndim - 2)
        image = np.pad(image, pad, mode="edge")
    if np.issubdtype(image.dtype, np.integer) and image.dtype.itemsize <= 2:
        wide = np.uint32 if image.dtype.kind == "u" else np.int32
        total = image[0::2, 0::2].astype(wide)
        total += image[1::2, 0::2]
        total += image[0::2, 1::2]
        total += image[1::2, 1::2]
        total += 2  # round half up
        total >>= 2
        return total.astype(image.dtype)
    total = image[0::2, 0::2].astype(np.float64) + image[1::2, 0::2] + image[0::2, 1::2] + image[1::2, 1::2]
    if np.issubdtype(image.dtype, np.integer):
        return np.floor(total * 0.25 + 0.5).astype(image.dtype)
    return (total * 0.25).astype(image.dtype)


def pyramid_level_shapes(height: int, width: int, min_level_size: int = 256) -> list[tuple[int, int]]:
    """Sizes ``(height, width)`` of the pyramid levels that :func:`write_pyramidal_tiff` writes.

    Level 0 is the full image. Each further level halves the previous one (rounding up) while the previous
    level's longest side is at least ``2 * min_level_size``, so the smallest level's longest side lies in
    ``[min_level_size, 2 * min_level_size)`` (or is level 0 itself when the image is smaller than that).

    Args:
        height: level-0 height in pixels.
        width: level-0 width in pixels.
        min_level_size: the smallest level keeps a longest side of at least this many pixels.

    Returns:
        One ``(height, width)`` tuple per level, level 0 first.
    """
    if min_level_size < 1:
        raise ValueError(f"min_level_size must be a positive number of pixels, got {min_level_size}.")
    shapes = [(int(height), int(width))]
    while max(shapes[-1]) >= 2 * min_level_size:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def write_pyramidal_tiff(
    path: str | os.PathLike,
    image: np.ndarray,
    mpp: float,
    tile_size: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    min_level_size: int = 256,
) -> Path:
    """Write an RGB image as a tiled pyramidal TIFF that tifffile, cuCIM, OpenSlide and MONAI read with its pixel size.

    Layout: every pyramid level is a top-level page (not a SubIFD), tiled ``tile_size x tile_size``, RGB, compressed
    with ``compression`` (JPEG through imagecodecs by default; tifffile stores JPEG tiles as YCbCr with 2x2 chroma
    subsampling, as Aperio scanners do, and every reader decodes them to RGB). Level 0 is the full image
    (``NewSubfileType`` 0); each further level halves the previous one by 2x2 area averaging and is marked as a
    reduced-resolution image (``NewSubfileType`` 1), until the longest side falls below ``2 * min_level_size``
    (see :func:`pyramid_level_shapes`).

    Pixel size: each page carries ``XResolution = 1e4 / (mpp * W0 / W)`` and ``YResolution = 1e4 / (mpp * H0 / H)``
    pixels per centimetre with ``ResolutionUnit = CENTIMETER`` (``W0, H0``: level-0 size; ``W, H``: the page's size),
    i.e. ``1e4 / (mpp * 2**level)`` when the sizes divide evenly. Measured with tifffile 2026.3, cuCIM 23.10,
    OpenSlide 4.0 (openslide-python 1.4.7) and MONAI 1.6.1:

    - tifffile reads the per-page tags;
    - cuCIM reports ``metadata["cucim"]["spacing"] == [mpp, mpp, 1]`` in micrometres at level 0, which
      ``WSIReader(backend="cucim").get_mpp(wsi, level)`` multiplies by the level's downsample;
    - OpenSlide (generic-tiff vendor) exposes ``tiff.XResolution``/``tiff.ResolutionUnit`` and derives
      ``openslide.mpp-x``/``openslide.mpp-y`` from them, which ``WSIReader(backend="openslide")`` reads;
    - ``WSIReader(backend="tifffile").get_mpp(wsi, level)`` reads the tags of page ``level``.

    All of them report ``mpp * downsample`` at every level. Where a level's size was rounded up (an odd size
    halved), cuCIM and OpenSlide use the mean of the width and height ratios as the downsample and MONAI's tifffile
    backend the per-axis tag, so they can differ in the third digit on the smallest levels.

    The file is written atomically: to a temporary file in the destination folder, then renamed over ``path``; if
    anything fails, no file (neither ``path`` nor the temporary one) is left behind. The reduced levels are held in
    memory; for images that do not fit in memory use :func:`write_pyramidal_tiff_streamed` (same file, same pixels).

    Args:
        path: destination file (``.tif``/``.tiff``); its folder must exist. An existing file is replaced.
        image: level-0 pixels, shape (H, W, 3), dtype uint8, RGB.
        mpp: level-0 pixel size in micrometres per pixel (0.25 for a 40x scan), must be positive.
        tile_size: tile edge in pixels; a positive multiple of 16 (a TIFF requirement). Defaults to 256.
        compression: one of ``"jpeg"``, ``"deflate"`` (alias ``"zlib"``), ``"lzw"`` or ``"none"``.
            Defaults to ``"jpeg"``.
        quality: JPEG quality 1-100, ignored for other compressions. Defaults to 90.
        min_level_size: stop adding levels once the longest side is below ``2 * min_level_size`` pixels.
            Defaults to 256.

    Returns:
        The path written, as a :class:`pathlib.Path`.

    Raises:
        ValueError: if ``image`` is not an (H, W, 3) uint8 array or another argument is out of range.
        FileNotFoundError: if the destination folder does not exist.
        PermissionError, NotADirectoryError: if no file can be created in the destination folder (checked first).
        bundle.utils.NoSpaceError: if the disk fills up (the message names ``path``; no file is left behind).
    """
    path = Path(path)
    image = _check_image(image)
    compression = check_write_arguments(path, mpp, tile_size, compression, quality, min_level_size)
    return _write_pyramid(
        path, image, float(mpp), int(tile_size), compression, int(quality), int(min_level_size),
        new_level=lambda index, shape: np.empty(shape, dtype=np.uint8),
    )  # fmt: skip


def write_pyramidal_tiff_streamed(
    path: str | os.PathLike,
    source,
    mpp: float,
    tile_size: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    min_level_size: int = 256,
    workdir: str | os.PathLike | None = None,
) -> Path:
    """Write the same pyramidal TIFF as :func:`write_pyramidal_tiff` from level-0 pixels that need not fit in memory.

    ``source`` is read block by block (a tile, or two tile rows by at most 4096 columns), never as a whole: pass an
    ``np.memmap`` of a raw RGB file, a zarr array, or any object with ``shape``, ``dtype`` and numpy-style slicing
    ``source[y0:y1, x0:x1]`` returning an ``(h, w, 3)`` uint8 array. Level 0 is written tile by tile from it; each
    reduced level is made from the previous one two tile rows at a time (:func:`downsample_by_two` on blocks with even
    offsets, so the pixels are exactly those of :func:`write_pyramidal_tiff`) into a raw temporary file, and written
    tile by tile from there. tifffile compresses tiles as they come, at most a few dozen at a time.

    Peak memory is therefore a constant (a few tile buffers and blocks, about 10 MB with 256-px tiles) whatever the
    slide's size; temporary disk space is a third of the raw level-0 size (the reduced levels), in ``workdir``.
    Written atomically like :func:`write_pyramidal_tiff`; the temporary folder is removed in any case.

    Args:
        path: destination file; its folder must exist. An existing file is replaced.
        source: level-0 pixels, an array-like of shape (H, W, 3) and dtype uint8 (RGB), read by slices.
        mpp: level-0 pixel size in micrometres per pixel, must be positive.
        tile_size: tile edge in pixels; a positive multiple of 16. Defaults to 256.
        compression: ``"jpeg"``, ``"deflate"`` (alias ``"zlib"``), ``"lzw"`` or ``"none"``. Defaults to ``"jpeg"``.
        quality: JPEG quality 1-100. Defaults to 90.
        min_level_size: stop adding levels once the longest side is below ``2 * min_level_size``. Defaults to 256.
        workdir: folder for the temporary level files (a fresh sub-folder is made and removed). Defaults to the
            system's temporary folder (``TMPDIR``).

    Returns:
        The path written, as a :class:`pathlib.Path`.

    Raises:
        ValueError: if ``source`` is not an (H, W, 3) uint8 array-like or another argument is out of range.
        FileNotFoundError: if the destination folder or ``workdir`` does not exist.
        PermissionError, NotADirectoryError: if no file can be created in the destination folder (checked first).
        bundle.utils.NoSpaceError: if the disk fills up (the message names ``path``; no file is left behind).
    """
    path = Path(path)
    shape, dtype = getattr(source, "shape", None), getattr(source, "dtype", None)
    if shape is None or dtype is None or not hasattr(source, "__getitem__"):
        raise ValueError(
            f"source must be an array-like with shape, dtype and slicing (e.g. np.memmap of shape (H, W, 3), uint8), "
            f"got {type(source).__name__}."
        )
    _check_pixels(shape, dtype, "source")
    compression = check_write_arguments(path, mpp, tile_size, compression, quality, min_level_size)
    if workdir is not None and not Path(workdir).is_dir():
        raise FileNotFoundError(f"workdir {str(workdir)!r} does not exist; create it or pass workdir=None.")
    scratch = Path(tempfile.mkdtemp(prefix=".pyramid-", dir=None if workdir is None else str(workdir)))
    try:

        def new_level(index: int, level_shape: tuple[int, int, int]) -> np.ndarray:
            return memmap_array(scratch, f"level{index}", level_shape, dtype=np.uint8)

        return _write_pyramid(
            path, source, float(mpp), int(tile_size), compression, int(quality), int(min_level_size), new_level
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_write_arguments(
    path: Path, mpp: float, tile_size: int, compression: str, quality: int, min_level_size: int
) -> str:
    """Validate the writer's arguments (raising ``ValueError``/``FileNotFoundError``); return the compression name."""
    if not isinstance(mpp, (int, float, np.floating, np.integer)) or not np.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"mpp must be a positive, finite pixel size in micrometres per pixel, got {mpp!r}.")
    if not isinstance(tile_size, (int, np.integer)) or tile_size < 16 or tile_size % 16:
        raise ValueError(f"tile_size must be a positive multiple of 16 pixels (e.g. 256), got {tile_size!r}.")
    compression = str(compression).lower()
    if compression not in _COMPRESSIONS:
        raise ValueError(f"compression must be one of {_COMPRESSIONS}, got {compression!r}.")
    if not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer JPEG quality in [1, 100], got {quality!r}.")
    if not isinstance(min_level_size, (int, np.integer)) or min_level_size < 1:
        raise ValueError(f"min_level_size must be a positive number of pixels, got {min_level_size!r}.")
    if not path.parent.exists():
        raise FileNotFoundError(f"the folder of path {str(path)!r} does not exist; create it first.")
    check_writable(path, "TIFF file")  # a file as folder, no rights or a read-only disk: before any pixel is made
    return compression


def _iter_tiles(level, tile_size: int) -> Iterator[np.ndarray]:
    """Tiles of ``level`` in row-major order, edge tiles cropped (tifffile pads them with zeros, as for arrays)."""
    height, width = level.shape[:2]
    for y in range(0, height, tile_size):
        for x in range(0, width, tile_size):
            yield np.ascontiguousarray(level[y : y + tile_size, x : x + tile_size])


def _downsample_into(source, target: np.ndarray, rows: int, columns: int = _DOWNSAMPLE_BLOCK) -> None:
    """Fill ``target`` with :func:`downsample_by_two` of ``source``, block by block (even offsets: same pixels)."""
    height, width = target.shape[:2]
    for y in range(0, height, rows):
        for x in range(0, width, columns):
            block = np.asarray(source[2 * y : 2 * (y + rows), 2 * x : 2 * (x + columns)])
            target[y : y + rows, x : x + columns] = downsample_by_two(block)


def _write_pyramid(
    path: Path,
    source,
    mpp: float,
    tile_size: int,
    compression: str,
    quality: int,
    min_level_size: int,
    new_level: Callable[[int, tuple[int, int, int]], np.ndarray],
) -> Path:
    """Write the pyramid of ``source`` (array-like, read by slices) atomically; reduced levels go to ``new_level``."""
    import tifffile

    height0, width0 = int(source.shape[0]), int(source.shape[1])
    shapes = pyramid_level_shapes(height0, width0, min_level_size)
    codec: str | None = None if compression == "none" else ("zlib" if compression == "deflate" else compression)
    compressionargs = {"level": int(quality)} if compression == "jpeg" else None
    # BigTIFF once the uncompressed pyramid could approach the 4 GiB offset limit of classic TIFF.
    bigtiff = height0 * width0 * 3 * 4 // 3 > 2**31
    # tifffile compresses this many bytes of tiles per pass (its default, 512 MB, would hold whole levels in memory)
    buffersize = _WRITE_BUFFER_TILES * tile_size * tile_size * 3

    # a fresh name beside the target (same file system, so os.replace is atomic); created with the usual permissions
    tmp_name = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with no_space_errors(path, "the pyramidal TIFF"), tifffile.TiffWriter(tmp_name, bigtiff=bigtiff) as tif:
            level = source
            for index, (height, width) in enumerate(shapes):
                if index > 0:
                    reduced = new_level(index, (height, width, 3))
                    _downsample_into(level, reduced, rows=tile_size)
                    level = reduced
                if tuple(level.shape[:2]) != (height, width):  # guards the shape rule shared with pyramid_level_shapes
                    raise RuntimeError(f"level {index} has shape {level.shape[:2]}, expected {(height, width)}.")
                # The level's physical pixel size along each axis (exact, also for odd sizes rounded up).
                pixels_per_cm_y = 1e4 / (mpp * height0 / height)
                pixels_per_cm_x = 1e4 / (mpp * width0 / width)
                tif.write(
                    _iter_tiles(level, tile_size),
                    shape=(height, width, 3),
                    dtype=np.uint8,
                    photometric="rgb",
                    tile=(tile_size, tile_size),
                    compression=codec,
                    compressionargs=compressionargs,
                    resolution=(pixels_per_cm_x, pixels_per_cm_y),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if index == 0 else 1,
                    software="st-he-ldm bundle.io.tiff.write_pyramidal_tiff",
                    metadata=None,
                    buffersize=buffersize,
                )
        with no_space_errors(path, "the pyramidal TIFF"):
            os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _check_pixels(shape: tuple, dtype, what: str) -> None:
    """Raise a ``ValueError`` naming what is wrong unless ``shape`` and ``dtype`` are those of RGB uint8 pixels."""
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(
            f"{what} must have shape (H, W, 3) (RGB, channels last), got shape {tuple(shape)}; "
            "convert grayscale or RGBA images to RGB first."
        )
    if np.dtype(dtype) != np.uint8:
        raise ValueError(f"{what} must have dtype uint8, got {dtype}; scale it to 0-255 and store it as uint8.")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{what} must have at least one pixel, got shape {tuple(shape)}.")


def _check_image(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as a C-contiguous (H, W, 3) uint8 array or raise a ``ValueError`` naming what is wrong."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array of shape (H, W, 3) and dtype uint8, got {type(image).__name__}.")
    _check_pixels(image.shape, image.dtype, "image")
    return np.ascontiguousarray(image)
