"""Plain images (JPEG, PNG, BMP, untiled TIFF) as slides: converted once to a cached tiled pyramidal TIFF.

The slide readers (cuCIM, OpenSlide, tifffile; see :mod:`bundle.io.slides`) read tiled TIFF-based whole-slide
formats. Many public spatial-transcriptomics datasets ship their H&E image as a plain JPEG or PNG instead (the her2st
sections are ~9,300 x 9,900 px JPEGs with no pixel size), which none of them reads. :func:`needs_conversion` tells
such files apart from real slides, and :func:`converted_slide` writes their pixels, with the given pixel size, as a
tiled pyramidal TIFF (:func:`bundle.io.tiff.write_pyramidal_tiff_streamed`) into a cache folder, once: later calls
with the same file (same path, size and modification time) and pixel size return the cached file.

Cache layout: ``<cache_dir>/<stem>-<key>.tif`` and its sidecar ``<stem>-<key>.json`` (source, size, mtime_ns, mpp,
shape, created), written after the TIFF. A TIFF without a readable sidecar counts as absent and is written again, so
a run killed between the two leaves nothing that is reused half-checked.

Pixels are stored as given (EXIF orientation is not applied: spot coordinates refer to the stored pixel grid).
Transparency is composited on white (the colour of empty glass in brightfield), greyscale, palette and CMYK images
become RGB; 16-bit and floating-point images are refused.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bundle.io.slides import PLAUSIBLE_MPP_RANGE
from bundle.io.tiff import write_pyramidal_tiff_streamed
from bundle.utils import check_writable, read_json, write_json_atomic

__all__ = ["CONVERSION_VERSION", "MAX_CONVERT_PIXELS", "PLAIN_IMAGE_SUFFIXES", "converted_slide", "needs_conversion"]

logger = logging.getLogger(__name__)

# Part of the cache key: raise it when the converted pixels or layout change, so that old cache files are not reused.
CONVERSION_VERSION = 1
# Largest image converted (decoded in memory: 4 bytes per pixel for RGB in PIL, 64 GiB at this size).
MAX_CONVERT_PIXELS = 2**34
PLAIN_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

_JPEG_PNG_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF, both byte orders
# TIFF-based vendor formats the slide readers know, whatever their page layout (NDPI level 0 is stripped)
_VENDOR_TIFF_FLAGS = ("is_svs", "is_ndpi", "is_scn", "is_philips", "is_bif", "is_qpi")
# PIL modes made RGB here; others (16-bit "I;16", 32-bit "I", float "F", ...) are refused
_CONVERTIBLE_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
_PIXEL_LIMIT_LOCK = threading.Lock()


def needs_conversion(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a plain image that the slide readers cannot read and :func:`converted_slide` must convert.

    True for JPEG and PNG files (recognised by content, or by a ``.jpg``/``.jpeg``/``.png``/``.bmp`` suffix when the
    content is not recognised, so that a damaged image is reported by :func:`converted_slide`), for BMP files with a
    ``.bmp`` suffix, and for TIFF files whose first image is not tiled (a single-page strip TIFF as image editors
    write). False for tiled TIFFs (pyramidal or not), TIFF-based vendor formats (SVS, NDPI, SCN, Philips, BIF, QPTIFF)
    and anything else (MRXS, DICOM, ...): those go to the slide readers, which report what they cannot read.

    Args:
        path: the slide file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if path.is_dir():  # formats stored as folders are for the slide readers
        return False
    if not path.is_file():
        raise FileNotFoundError(f"Slide {str(path)!r} does not exist; check the path in the manifest/datalist.")
    with path.open("rb") as f:
        head = f.read(8)
    suffix = path.suffix.lower()
    if head.startswith(_JPEG_PNG_MAGIC) or (head.startswith(b"BM") and suffix == ".bmp"):
        return True
    if head[:4] in _TIFF_MAGIC:
        return _tiff_needs_conversion(path)
    return suffix in PLAIN_IMAGE_SUFFIXES


def _tiff_needs_conversion(path: Path) -> bool:
    """True for a TIFF whose level 0 is untiled and that is no vendor slide format; False when tifffile fails."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if any(getattr(tif, flag, False) for flag in _VENDOR_TIFF_FLAGS):
                return False
            return not tif.series[0].levels[0].keyframe.is_tiled
    except Exception:  # a damaged or unusual TIFF: left to the slide readers, whose errors name the file
        return False


def converted_slide(
    source: str | os.PathLike, mpp: float, cache_dir: str | os.PathLike, backend: str | None = None
) -> Path:
    """Return a tiled pyramidal TIFF with pixel size ``mpp`` holding ``source``'s pixels, converted once and cached.

    The TIFF is ``<cache_dir>/<stem>-<key>.tif``, ``key`` a short hash of the resolved source path, its size and
    modification time (ns), ``mpp`` rounded to 1e-6 and :data:`CONVERSION_VERSION`; a sidecar ``<stem>-<key>.json``
    is written after it. When both exist the TIFF is reused ("reusing converted slide ..." at INFO). Otherwise the
    image is decoded with PIL (its decompression-bomb limit raised to :data:`MAX_CONVERT_PIXELS` while the file is
    opened), and written with :func:`bundle.io.tiff.write_pyramidal_tiff_streamed`, which reads it block by block
    (each block made RGB on its own: alpha composited on white, greyscale/palette/CMYK converted), so only the decoded
    image is held in memory; the reduced levels go to a temporary folder in ``cache_dir``. Writes are atomic: a
    failure leaves no partial file behind, and a TIFF whose sidecar was not written is converted again next time.

    Measured on a full her2st JPEG (9,274 x 9,911 px RGB, 276 MB as raw RGB; 2 shared CPU cores, file in the page
    cache): 2.0-2.1 s (7 s with a cold file cache on a busy machine) and 470 MB of extra peak resident memory, 1.7x
    the raw RGB size: PIL holds RGB at 4 bytes per pixel (368 MB), plus the resident pages of the reduced levels'
    temporary files (a third of the raw size at most). The 6-level TIFF is 11.5 MB. Decoding to a numpy array and
    writing with :func:`bundle.io.tiff.write_pyramidal_tiff` instead peaked at 920 MB (3.3x), in 2.9-4.0 s.

    Args:
        source: a JPEG, PNG, BMP or untiled TIFF (see :func:`needs_conversion`), 8-bit.
        mpp: level-0 pixel size in micrometres per pixel, recorded in the TIFF (never read from the image: plain
            images carry none, or a meaningless 72 dpi).
        cache_dir: folder of converted slides; created when missing.
        backend: when given (``"cucim"``, ``"openslide"``, ``"tifffile"``), a newly written TIFF is opened with this
            backend and its size and pixel size checked before it is recorded. None skips the check.

    Returns:
        The path of the converted TIFF.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: ``mpp`` is not a plausible pixel size; ``source`` is not an image, is truncated or corrupt, has
            16-bit/float pixels, or is larger than :data:`MAX_CONVERT_PIXELS`.
        PermissionError, NotADirectoryError: ``cache_dir`` cannot be written (from :func:`bundle.utils.check_writable`).
        bundle.utils.NoSpaceError: the disk fills up (nothing is left half-written).
    """
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"Slide image {str(source)!r} does not exist; check the path in the manifest.")
    mpp = _check_mpp(mpp, source)
    stat = source.stat()  # the state that the key records, read before the pixels
    target = _cache_path(source, stat, mpp, Path(cache_dir))
    sidecar = target.with_suffix(".json")
    if _is_cached(target, sidecar):
        logger.info(f"reusing converted slide {str(target)!r} for {str(source)!r}.")
        return target
    check_writable(target, "converted slide")
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    shape = _convert(source, target, mpp)
    if backend is not None:
        _check_readable(target, backend, mpp, shape)
    record = {
        "source": str(source.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "mpp": mpp,
        "shape": list(shape),
        "conversion_version": CONVERSION_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(sidecar, record)
    seconds = time.perf_counter() - start
    logger.info(
        f"converted {str(source)!r} to {str(target)!r} ({shape[1]} x {shape[0]} px, {mpp} um/px) in {seconds:.1f} s."
    )
    return target


def _check_mpp(mpp, source: Path) -> float:
    """``mpp`` as a float, or a ``ValueError`` naming ``source`` when it is not a plausible scan pixel size."""
    low, high = PLAUSIBLE_MPP_RANGE
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(mpp, bool) or not (math.isfinite(value) and low <= value <= high):
        raise ValueError(
            f"mpp={mpp!r} for slide image {str(source)!r} is not a plausible pixel size (expected {low}-{high} um/px; "
            "0.25 at 40x, 0.5 at 20x). Give the scan's pixel size in the manifest's `mpp` column: plain images do not "
            "record one."
        )
    return value


def _cache_path(source: Path, stat: os.stat_result, mpp: float, cache_dir: Path) -> Path:
    """``<cache_dir>/<stem>-<key>.tif`` for this version (``stat``) of ``source`` at ``mpp``."""
    identity = [str(source.resolve()), stat.st_size, stat.st_mtime_ns, f"{mpp:.6f}", CONVERSION_VERSION]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    return cache_dir / f"{source.stem}-{key}.tif"


def _is_cached(target: Path, sidecar: Path) -> bool:
    """Both the TIFF and a readable sidecar exist."""
    if not (target.is_file() and sidecar.is_file()):
        return False
    try:
        return isinstance(read_json(sidecar), dict)
    except (OSError, ValueError):
        return False


def _convert(source: Path, target: Path, mpp: float) -> tuple[int, int, int]:
    """Decode ``source`` and write it to ``target`` as a pyramidal TIFF; return the (H, W, 3) shape written."""
    with _decoded_image(source) as image:
        pixels = _RGBBlocks(image)
        write_pyramidal_tiff_streamed(target, pixels, mpp, workdir=target.parent)
        return pixels.shape


@contextmanager
def _decoded_image(source: Path) -> Iterator:
    """Open and fully decode ``source`` with PIL, turning its errors into ``ValueError`` messages naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _pixel_limit(MAX_CONVERT_PIXELS):
            image = Image.open(source)
    except UnidentifiedImageError as error:
        raise ValueError(
            f"Slide image {str(source)!r} is not an image file ({error}): expected a JPEG, PNG, BMP or TIFF image, or a "
            "whole-slide format (SVS, NDPI, MRXS, tiled TIFF); check the manifest's slide path."
        ) from error
    except Image.DecompressionBombError as error:
        raise _too_large(source, str(error)) from error
    except (OSError, SyntaxError) as error:  # a damaged header
        raise _undecodable(source, error) from error
    with image:
        _check_opened(source, image)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as error:  # PIL's decoders raise all three for damaged data
            raise _undecodable(source, error) from error
        yield image


def _check_opened(source: Path, image) -> None:
    """Refuse images too large to decode here and pixel types that have no faithful 8-bit RGB form."""
    width, height = image.size
    if width * height > MAX_CONVERT_PIXELS:
        raise _too_large(source, f"{width} x {height} px")
    if image.mode not in _CONVERTIBLE_MODES:
        raise ValueError(
            f"Slide image {str(source)!r} has pixels of PIL mode {image.mode!r} (16-bit, 32-bit or floating point); "
            "export it as an 8-bit RGB image (JPEG, PNG or TIFF) first."
        )


def _undecodable(source: Path, error: Exception) -> ValueError:
    return ValueError(
        f"Slide image {str(source)!r} cannot be decoded ({error}): the file is truncated or corrupt (an interrupted "
        "copy or download?); copy it again."
    )


def _too_large(source: Path, detail: str) -> ValueError:
    return ValueError(
        f"Slide image {str(source)!r} is too large to convert in memory ({detail}; at most {MAX_CONVERT_PIXELS} "
        "pixels); export it as a tiled pyramidal TIFF with the scanner's or an image tool's software instead."
    )


@contextmanager
def _pixel_limit(limit: int) -> Iterator[None]:
    """Raise PIL's decompression-bomb limit (checked when a file is opened) to ``limit`` inside the block only.

    The limit is a PIL global: it is restored afterwards, and a lock keeps concurrent conversions from restoring each
    other's value. Keep the block short (opening a file reads its header only).
    """
    from PIL import Image

    with _PIXEL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        if saved is not None:  # None: the limit is already off
            Image.MAX_IMAGE_PIXELS = max(int(saved), int(limit))
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


class _RGBBlocks:
    """A decoded PIL image seen as a read-only (H, W, 3) uint8 RGB array, made one block at a time.

    ``blocks[y0:y1, x0:x1]`` crops the image and converts only that block, so that the streamed TIFF writer never
    needs a second full-size copy. Alpha is composited on white.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, image) -> None:
        self.image = image
        self.shape = (int(image.height), int(image.width), 3)

    def __getitem__(self, index) -> np.ndarray:
        rows, columns = index
        y0, y1, y_step = rows.indices(self.shape[0])
        x0, x1, x_step = columns.indices(self.shape[1])
        if y_step != 1 or x_step != 1:
            raise IndexError("only contiguous blocks (step 1) can be read.")
        return _as_rgb(self.image.crop((x0, y0, max(x1, x0), max(y1, y0))))


def _as_rgb(block) -> np.ndarray:
    """A PIL image block as an (h, w, 3) uint8 RGB array; transparency composited on white."""
    if block.mode == "RGB":
        return np.asarray(block)
    if "A" in block.mode or "a" in block.mode or "transparency" in block.info:
        rgba = np.asarray(block.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[..., 3:]
        # white * (1 - a) + colour * a, with a = alpha / 255, rounded to nearest
        return (255 - ((255 - rgba[..., :3]) * alpha + 127) // 255).astype(np.uint8)
    return np.asarray(block.convert("RGB"))


def _check_readable(target: Path, backend: str, mpp: float, shape: tuple[int, int, int]) -> None:
    """Open ``target`` with ``backend``; remove it and raise when its size or pixel size is not the one written."""
    from bundle.io.slides import read_slide_info

    try:
        info = read_slide_info(target, backend, None)
        if tuple(info.size) != tuple(shape[:2]) or abs(info.mpp - mpp) > 1e-3 * mpp:
            raise ValueError(
                f"the {backend!r} backend reads {info.size} px at {info.mpp} um/px, not {shape[:2]} px at {mpp} um/px"
            )
    except BaseException:
        target.unlink(missing_ok=True)
        raise
