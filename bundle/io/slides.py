"""Whole-slide image access: MONAI ``WSIReader`` backends plus a tile-level tifffile reader, and pixel sizes.

* ``"cucim"`` (default) and ``"openslide"`` are MONAI's own readers.
* ``"tifffile"`` is :class:`TiffZarrWSIReader`: MONAI's ``TiffFileWSIReader`` decodes a whole pyramid level for
  every patch (tens of seconds per hundred patches on a real slide), so this subclass decodes only the tiles that a
  patch touches (with tifffile's own decoders, straight into the output; through tifffile's zarr interface for
  untiled levels), and takes pyramid levels from the image series (an SVS file's label, macro and thumbnail pages are
  not levels).
* :func:`read_rgb_into` is the patch loader's read: the backend's own call, without ``WSIReader.get_data``.

Pixel sizes are read from the slide (Aperio ``MPP``, TIFF resolution tags, OpenSlide properties) or given
explicitly; they are never guessed (see :func:`resolve_mpp`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.data.wsi_reader import BaseWSIReader, CuCIMWSIReader, OpenSlideWSIReader, TiffFileWSIReader
from monai.utils import optional_import

__all__ = [
    "SUPPORTED_BACKENDS",
    "TiffZarrWSIReader",
    "SlideInfo",
    "available_backends",
    "close_slide",
    "default_backend",
    "get_wsi_reader",
    "open_slide",
    "read_rgb_into",
    "read_slide_info",
    "resolve_mpp",
]

SUPPORTED_BACKENDS = ("cucim", "openslide", "tifffile")

# Pixel sizes outside this range are not scan resolutions: a "72 dpi" default tag reads as 352.8 um/px.
PLAUSIBLE_MPP_RANGE = (0.05, 20.0)

_UNIT_TO_UM = {"INCH": 25400.0, "CENTIMETER": 1e4, "MILLIMETER": 1e3, "MICROMETER": 1.0}


class TiffZarrWSIReader(TiffFileWSIReader):
    """MONAI ``TiffFileWSIReader`` that decodes only the tiles a patch needs.

    Levels are the image series' pyramid levels (``TiffFile.series[0].levels``), so SVS thumbnails, labels and macro
    images are not mistaken for levels. Reads that extend past the slide are padded with ``fill_value``. A tiled level
    is read tile by tile with tifffile's decoder, each tile copied straight into the patch (the same pixels as
    tifffile's zarr view, without its per-read overhead); other levels are read through the zarr view.

    Args:
        fill_value: value of pixels outside the slide. Defaults to 255 (white glass).
        kwargs: passed to :class:`monai.data.TiffFileWSIReader` (``channel_dim``, ``dtype``, ``mode``, ...).
    """

    backend = "tifffile"

    def __init__(self, fill_value: int = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fill_value = fill_value

    @staticmethod
    def _levels(wsi) -> list:
        return list(wsi.series[0].levels)

    @staticmethod
    def get_level_count(wsi) -> int:
        return len(TiffZarrWSIReader._levels(wsi))

    def get_size(self, wsi, level: int) -> tuple[int, int]:
        shape = self._levels(wsi)[level].shape
        return int(shape[0]), int(shape[1])

    def get_downsample_ratio(self, wsi, level: int) -> float:
        return float(self.get_size(wsi, 0)[0]) / float(self.get_size(wsi, level)[0])

    def get_mpp(self, wsi, level: int) -> tuple[float, float]:
        ratio = self.get_downsample_ratio(wsi, level)
        page = self._levels(wsi)[0].keyframe
        aperio = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", page.description or "")
        if aperio:
            return (ratio * float(aperio.group(1)),) * 2
        tags = page.tags
        if "XResolution" in tags and "YResolution" in tags and "ResolutionUnit" in tags:
            unit = tags["ResolutionUnit"].value
            unit_name = getattr(unit, "name", str(unit)).upper()
            xres, yres = tags["XResolution"].value, tags["YResolution"].value
            if unit_name in _UNIT_TO_UM and xres[0] and yres[0]:
                to_um = _UNIT_TO_UM[unit_name]
                return ratio * to_um * yres[1] / yres[0], ratio * to_um * xres[1] / xres[0]
        raise ValueError("`mpp` cannot be obtained for this file. Please use `level` instead.")

    def _zarr_level(self, wsi, level: int):
        cache = wsi.__dict__.setdefault("_zarr_levels", {})
        if level not in cache:
            zarr, _ = optional_import("zarr")
            cache[level] = zarr.open(wsi.aszarr(series=0, level=level), mode="r")
        return cache[level]

    def _tile_plan(self, wsi, level: int) -> dict | None:
        """How to decode the tiles of ``level`` directly, or None when the level is not one tiled, chunky page."""
        cache = wsi.__dict__.setdefault("_tile_plans", {})
        if level not in cache:
            series_level = self._levels(wsi)[level]
            page = series_level.pages[0]
            tiled = (
                len(series_level.pages) == 1
                and page is series_level.keyframe  # a TiffPage, not a TiffFrame
                and page.is_tiled
                and page.tiledepth == 1
                and page.imagedepth == 1
                and (page.samplesperpixel == 1 or page.planarconfig == 1)  # 1: CONTIG, interleaved samples
                and tuple(series_level.shape[:2]) == (page.imagelength, page.imagewidth)
            )
            plan = None
            if tiled:
                decode_args = {"_fullsize": True}
                if page.jpegtables is not None:
                    decode_args["jpegtables"] = page.jpegtables
                if page.jpegheader is not None:
                    decode_args["jpegheader"] = page.jpegheader
                page.parent.filehandle.set_lock(True)  # the lock tifffile's own zarr store reads under
                plan = {
                    "page": page,
                    "tile": (int(page.tilelength), int(page.tilewidth)),
                    "tiles_across": -(-int(page.imagewidth) // int(page.tilewidth)),
                    "decode_args": decode_args,
                    "missing": page.nodata,  # what tifffile's zarr store returns for a tile that is not stored
                }
            cache[level] = plan
        return cache[level]

    def read_into(self, wsi, level: int, top: int, left: int, out: np.ndarray) -> np.ndarray:
        """Fill ``out`` (``(h, w, c)``, any strides) with the pixels of ``level`` from level pixel ``(top, left)``.

        Only the tiles the region touches are decoded, each straight into ``out``; the first ``c`` samples of each
        pixel are kept, and pixels outside the level get ``fill_value``. Returns ``out``.
        """
        height, width, channels = out.shape
        shape = self._levels(wsi)[level].shape
        level_h, level_w = int(shape[0]), int(shape[1])
        samples = int(shape[2]) if len(shape) == 3 else 1
        if samples < channels:
            raise ValueError(f"The image is expected to have {channels} color channels but has {samples}.")
        r0, r1 = max(top, 0), min(top + height, level_h)
        c0, c1 = max(left, 0), min(left + width, level_w)
        if (r0, c0, r1, c1) != (top, left, top + height, left + width):
            out[...] = self.fill_value
        if r1 <= r0 or c1 <= c0:
            return out
        plan = self._tile_plan(wsi, level)
        if plan is None:
            region = np.asarray(self._zarr_level(wsi, level)[r0:r1, c0:c1]).reshape(r1 - r0, c1 - c0, -1)
            out[r0 - top : r1 - top, c0 - left : c1 - left] = region[..., :channels]
            return out
        page, (th, tw) = plan["page"], plan["tile"]
        fh = page.parent.filehandle
        for ty in range(r0 // th, (r1 - 1) // th + 1):
            y0, y1 = max(r0, ty * th), min(r1, ty * th + th)
            for tx in range(c0 // tw, (c1 - 1) // tw + 1):
                x0, x1 = max(c0, tx * tw), min(c1, tx * tw + tw)
                target = out[y0 - top : y1 - top, x0 - left : x1 - left]
                index = ty * plan["tiles_across"] + tx
                offset, count = page.dataoffsets[index], page.databytecounts[index]
                if not offset or not count:
                    target[...] = plan["missing"]
                    continue
                with fh.lock:
                    fh.seek(offset)
                    data = fh.read(count)
                tile = page.decode(data, index, **plan["decode_args"])[0].reshape(th, tw, -1)
                target[...] = tile[y0 - ty * th : y1 - ty * th, x0 - tx * tw : x1 - tx * tw, :channels]
        return out

    def _get_patch(self, wsi, location, size, level, dtype, mode) -> np.ndarray:
        ratio = self.get_downsample_ratio(wsi, level)
        top, left = (int(round(v / ratio)) for v in location)
        series_level = self._levels(wsi)[level]
        channels = int(series_level.shape[2]) if len(series_level.shape) == 3 else 1
        patch = np.empty((int(size[0]), int(size[1]), channels), series_level.dtype)
        self.read_into(wsi, level, top, left, patch)
        if mode in "RGB":
            if channels not in (3, 4):
                raise ValueError(f"The image is expected to have three or four color channels but has {channels}.")
            patch = patch[..., :3]
        return np.moveaxis(patch.astype(dtype, copy=False), -1, self.channel_dim)


def available_backends() -> list[str]:
    """The slide-reading backends importable here, in order of preference."""
    found = []
    if optional_import("cucim", name="CuImage")[1]:
        found.append("cucim")
    if optional_import("openslide")[1]:
        found.append("openslide")
    found.append("tifffile")  # a hard dependency of MONAI's WSI support and of this bundle
    return found


def default_backend() -> str:
    """cuCIM where it imports, else OpenSlide, else tifffile."""
    return available_backends()[0]


def get_wsi_reader(backend: str | None = "cucim", **kwargs: Any) -> BaseWSIReader:
    """Create a MONAI WSI reader for ``backend`` (``"cucim"``, ``"openslide"``, ``"tifffile"`` or ``None`` = best).

    Args:
        backend: reader library. ``"tifffile"`` gives :class:`TiffZarrWSIReader`, not MONAI's whole-level reader.
        kwargs: passed to the reader (``channel_dim``, ``dtype``, ...).
    """
    backend = default_backend() if backend in (None, "auto") else str(backend).lower()
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"backend must be one of {SUPPORTED_BACKENDS} (or None for the best available), got {backend!r}."
        )
    if backend not in available_backends():
        raise ImportError(
            f"Slide backend {backend!r} is not installed here; install it (cuCIM: `pip install cucim`, OpenSlide: "
            f"`pip install openslide-python openslide-bin`) or choose one of {available_backends()}."
        )
    if backend == "cucim":
        return CuCIMWSIReader(**kwargs)
    if backend == "openslide":
        return OpenSlideWSIReader(**kwargs)
    return TiffZarrWSIReader(**kwargs)


def open_slide(path: str | os.PathLike, reader: BaseWSIReader):
    """Open a slide with ``reader`` and return the backend's slide object, with an error that names the file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the backend cannot read it (not a slide, truncated, unsupported format).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Slide {str(path)!r} does not exist; check the path in the manifest/datalist.")
    try:
        wsi = reader.read(str(path))
        reader.get_size(wsi, 0)
    except Exception as e:  # each backend raises its own type for unreadable files
        raise ValueError(
            f"Cannot read slide {str(path)!r} with the {reader.backend!r} backend ({type(e).__name__}: {e}). "
            "The file is not a readable whole-slide image (truncated download, wrong format or corrupt); "
            "re-download or re-export it as a tiled pyramidal TIFF/SVS, or try another backend."
        ) from e
    return wsi


def read_rgb_into(reader: BaseWSIReader, wsi, level: int, top: int, left: int, downsample: float, out: np.ndarray):
    """Fill ``out`` (``(h, w, 3)``, any strides) with the RGB pixels of a region that lies inside ``level``.

    The backend library is called directly, without ``WSIReader.get_data``'s checks, metadata and copies; cuCIM's and
    OpenSlide's regions are copied once, into ``out`` (OpenSlide's alpha channel is dropped, as ``convert("RGB")``
    does), and :class:`TiffZarrWSIReader` decodes its tiles straight into it.

    Args:
        reader: the reader that opened ``wsi``.
        wsi: the opened slide.
        level: pyramid level.
        top: first row of the region, in ``level`` pixels.
        left: first column of the region, in ``level`` pixels.
        downsample: downsample of ``level`` relative to level 0 (cuCIM and OpenSlide take level-0 locations).
        out: destination; its first two dimensions give the region's size.

    Returns:
        ``out``.
    """
    if isinstance(reader, TiffZarrWSIReader):
        return reader.read_into(wsi, level, top, left, out)
    height, width = out.shape[:2]
    x0, y0 = int(round(left * downsample)), int(round(top * downsample))
    if isinstance(reader, CuCIMWSIReader):
        out[...] = np.asarray(wsi.read_region(location=(x0, y0), size=(width, height), level=level))[..., :3]
    elif isinstance(reader, OpenSlideWSIReader):
        out[...] = np.asarray(wsi.read_region((x0, y0), level, (width, height)))[..., :3]
    else:
        patch, _ = reader.get_data(wsi, location=(y0, x0), size=(height, width), level=level, mode="RGB")
        out[...] = np.moveaxis(np.asarray(patch), reader.channel_dim, -1)
    return out


class MissingPixelSize(ValueError):
    """A slide records no pixel size, or only a placeholder (such as a 72 dpi tag), and none was given."""


@dataclass
class SlideInfo:
    """Geometry and pixel size of one slide.

    Attributes:
        path: slide file.
        backend: reader used.
        level_sizes: ``(height, width)`` of each pyramid level, level 0 first.
        downsamples: downsample factor of each level relative to level 0.
        mpp: level-0 pixel size in micrometres (x and y assumed equal).
        mpp_source: where ``mpp`` came from (``"slide"`` or ``"explicit"``).
    """

    path: str
    backend: str
    level_sizes: list[tuple[int, int]] = field(default_factory=list)
    downsamples: list[float] = field(default_factory=list)
    mpp: float = 0.0
    mpp_source: str = ""

    @property
    def size(self) -> tuple[int, int]:
        """Level-0 ``(height, width)``."""
        return self.level_sizes[0]


def _recorded_mpp(reader: BaseWSIReader, wsi) -> tuple[float, float]:
    """The level-0 ``(y, x)`` pixel size the slide records, or raise when it records none.

    cuCIM reports spacing 1.0 with empty units for any file without a pixel size (a bare TIFF, or an Aperio SVS whose
    description has no ``MPP`` field), and MONAI's reader falls back to that spacing: it is accepted only with
    micrometre units, and an Aperio ``MPP`` field only when it is a positive number, so that every backend agrees.
    """
    if isinstance(reader, CuCIMWSIReader):
        aperio_mpp = str(wsi.metadata.get("aperio", {}).get("MPP", "") or "").strip()
        if aperio_mpp:
            value = float(aperio_mpp)  # raises for text that is not a number
            if not value > 0:
                raise ValueError(f"the Aperio description records MPP = {aperio_mpp}")
            return value, value
        if "aperio" in wsi.metadata:
            raise ValueError("the Aperio description has no MPP field")
        units = [str(u).lower() for u in wsi.spacing_units()[:2]]
        if not all(u in ("micrometer", "um", "micron", "\u00b5m") for u in units):
            raise ValueError(f"the slide's spacing has units {units}, not micrometres")
    return reader.get_mpp(wsi, 0)


def resolve_mpp(path: str | os.PathLike, reader: BaseWSIReader, wsi, mpp: float | None = None) -> tuple[float, str]:
    """Return the level-0 pixel size (um/px) and its source: ``mpp`` when given, else the slide's own metadata.

    A pixel size is never guessed: a slide without one (or with a placeholder such as a 72 dpi tag) and no ``mpp``
    raises, telling the user to pass ``mpp``.

    Args:
        path: slide path, for the messages.
        reader: the reader that opened ``wsi``.
        wsi: the opened slide.
        mpp: explicit level-0 pixel size in um/px, or None to read it from the slide.
    """
    low, high = PLAUSIBLE_MPP_RANGE
    if mpp is not None:
        mpp = float(mpp)
        if not low <= mpp <= high:  # also false for NaN: an unreadable value is never replaced by the slide's
            raise ValueError(
                f"mpp={mpp} for slide {str(path)!r} is not a plausible pixel size (expected {low}-{high} um/px; "
                "0.25 at 40x, 0.5 at 20x). Give the scan's pixel size, or leave it empty to read it from the slide."
            )
        return mpp, "explicit"
    try:
        mpp_y, mpp_x = _recorded_mpp(reader, wsi)
    except Exception as e:
        raise MissingPixelSize(
            f"Slide {str(path)!r} has no pixel size in its metadata ({e}). Pass it explicitly (the manifest's `mpp` "
            "column, or `mpp=`), e.g. 0.25 um/px for a 40x scan or 0.5 for 20x; it is never guessed."
        ) from e
    if not (low <= mpp_x <= high and low <= mpp_y <= high):
        raise MissingPixelSize(
            f"Slide {str(path)!r} reports a pixel size of {mpp_x:.4g} x {mpp_y:.4g} um/px, which is not a scan "
            "resolution (often a 72 dpi placeholder tag). Pass the real pixel size explicitly (the manifest's `mpp` "
            "column, or `mpp=`)."
        )
    if abs(mpp_x - mpp_y) > 0.02 * max(mpp_x, mpp_y):
        raise ValueError(f"Slide {str(path)!r} has non-square pixels ({mpp_x} x {mpp_y} um/px); resample it first.")
    return float(mpp_x), "slide"


def read_slide_info(path: str | os.PathLike, backend: str | None = "cucim", mpp: float | None = None) -> SlideInfo:
    """Open a slide and return its :class:`SlideInfo` (levels, downsamples, level-0 pixel size).

    Args:
        path: slide file (TIFF, SVS, ... whatever the backend reads).
        backend: ``"cucim"``, ``"openslide"``, ``"tifffile"`` or None for the best available.
        mpp: explicit level-0 pixel size in um/px; required when the slide does not record one.
    """
    reader = get_wsi_reader(backend)
    wsi = open_slide(path, reader)
    try:
        count = reader.get_level_count(wsi)
        sizes = [tuple(int(v) for v in reader.get_size(wsi, level)) for level in range(count)]
        downsamples = [sizes[0][0] / s[0] for s in sizes]
        value, source = resolve_mpp(path, reader, wsi, mpp)
    finally:
        close_slide(wsi)
    return SlideInfo(str(path), reader.backend, sizes, downsamples, value, source)


def close_slide(wsi) -> None:
    """Close a slide object opened by :func:`open_slide` (cuCIM objects have no ``close``)."""
    close = getattr(wsi, "close", None)
    if callable(close):
        close()


def level_for_mpp(downsamples: Sequence[float], mpp0: float, target_mpp: float, rtol: float = 0.01) -> int:
    """Pick the coarsest pyramid level that is at least as fine as ``target_mpp`` (within ``rtol``).

    Reading there and resizing down keeps full detail while decoding the fewest pixels.

    Args:
        downsamples: downsample of each level relative to level 0.
        mpp0: level-0 pixel size (um/px).
        target_mpp: pixel size wanted after resizing (um/px).
        rtol: relative tolerance, so a level at 0.2501 um/px serves a 0.25 um/px request.
    """
    best = 0
    for level, ds in enumerate(downsamples):
        if mpp0 * ds <= target_mpp * (1.0 + rtol) and ds >= downsamples[best]:
            best = level
    return best
