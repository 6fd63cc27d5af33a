"""Plain images as slides: real JPEG/PNG files converted once to a cached pyramidal TIFF that every backend reads."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import bundle.io.tiff
from bundle.io.convert import CONVERSION_VERSION, converted_slide, needs_conversion
from bundle.io.slides import available_backends, get_wsi_reader, read_slide_info
from bundle.io.tiff import write_pyramidal_tiff
from tests.helpers import realdata

BACKENDS = available_backends()
HER2ST_MPP = 0.688  # about 200 um spot pitch / 290.7 px


@pytest.fixture(scope="module")
def c2_jpeg(her2st_root) -> Path:
    """The real her2st C2 crop (an RGB JPEG of about 2,300 px square, no pixel size)."""
    return her2st_root / "C2" / "5714_HE_BT_C2.jpg"


@pytest.fixture(scope="module")
def c2_converted(c2_jpeg, tmp_path_factory) -> Path:
    return converted_slide(c2_jpeg, HER2ST_MPP, tmp_path_factory.mktemp("converted"))


def decoded(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def level0_through_tifffile_backend(path: Path) -> np.ndarray:
    reader = get_wsi_reader("tifffile", channel_dim=-1)
    wsi = reader.read(str(path))
    try:
        pixels, _ = reader.get_data(wsi, level=0)
    finally:
        wsi.close()
    return np.asarray(pixels)


def copy_of(source: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(source, folder / source.name))


@pytest.mark.parametrize("backend", ["cucim", "openslide", "tifffile"])
def test_converted_crop_reads_with_every_backend(c2_jpeg, c2_converted, backend):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} is not installed")
    height, width = decoded(c2_jpeg).shape[:2]
    info = read_slide_info(c2_converted, backend=backend)  # the pixel size comes from the converted file itself
    assert info.size == (height, width)
    assert len(info.level_sizes) > 1
    assert info.mpp == pytest.approx(HER2ST_MPP, rel=1e-4) and info.mpp_source == "slide"


def test_converted_pixels_match_the_jpeg(c2_jpeg, c2_converted):
    original = decoded(c2_jpeg).astype(np.int16)
    level0 = level0_through_tifffile_backend(c2_converted)
    assert level0.shape == original.shape and level0.dtype == np.uint8
    assert np.abs(level0.astype(np.int16) - original).mean() < 3.0  # JPEG re-encoding at quality 90
    with tifffile.TiffFile(c2_converted) as tif:
        assert all(page.is_tiled for page in tif.pages)


def test_conversion_is_cached_and_keyed_by_mpp(c2_jpeg, tmp_path, caplog):
    source = copy_of(c2_jpeg, tmp_path / "in")
    cache = tmp_path / "cache" / "slides"  # created on the first call
    first = converted_slide(source, HER2ST_MPP, cache)
    assert first.parent == cache and first.name.startswith("5714_HE_BT_C2-") and first.suffix == ".tif"
    record = json.loads(first.with_suffix(".json").read_text())
    assert record["source"] == str(source.resolve()) and record["mpp"] == HER2ST_MPP
    assert (record["size"], record["mtime_ns"]) == (source.stat().st_size, source.stat().st_mtime_ns)
    assert record["shape"] == list(decoded(source).shape) and record["conversion_version"] == CONVERSION_VERSION
    written = first.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="bundle.io.convert"):
        again = converted_slide(source, HER2ST_MPP + 4e-7, cache)  # same pixel size to 1e-6
    assert again == first and first.stat().st_mtime_ns == written
    assert "reusing converted slide" in caplog.text
    other = converted_slide(source, 0.5, cache)
    assert other != first and read_slide_info(other, backend="tifffile").mpp == pytest.approx(0.5)
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # the file was replaced
    assert converted_slide(source, HER2ST_MPP, cache) not in (first, other)


def test_tiff_without_its_sidecar_is_written_again(c2_jpeg, tmp_path):
    cache = tmp_path / "cache"
    first = converted_slide(c2_jpeg, HER2ST_MPP, cache)
    first.with_suffix(".json").unlink()  # a run killed between the TIFF and its record
    first.write_bytes(b"half a TIFF")
    again = converted_slide(c2_jpeg, HER2ST_MPP, cache, backend="tifffile")
    assert again == first and first.with_suffix(".json").is_file()
    assert read_slide_info(again, backend="tifffile").size == decoded(c2_jpeg).shape[:2]


def test_truncated_jpeg_is_refused_and_leaves_nothing(c2_jpeg, tmp_path):
    truncated = tmp_path / "copied.jpg"
    data = c2_jpeg.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    cache = tmp_path / "cache"
    assert needs_conversion(truncated)
    with pytest.raises(ValueError, match=r"'.*copied\.jpg' cannot be decoded \(image file is truncated.*copy it again"):
        converted_slide(truncated, HER2ST_MPP, cache)
    assert list(cache.iterdir()) == []


def test_failure_while_writing_leaves_no_partial_tiff(c2_jpeg, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("simulated failure in the middle of the pyramid")

    monkeypatch.setattr(bundle.io.tiff, "downsample_by_two", fail)  # level 0 is written, level 1 fails
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="simulated failure"):
        converted_slide(c2_jpeg, HER2ST_MPP, cache)
    assert list(cache.iterdir()) == []


def test_file_that_is_not_an_image_is_refused(tmp_path):
    fake = tmp_path / "slide.jpg"
    fake.write_text("sample_id,st_path\nS1,counts.h5\n")
    assert needs_conversion(fake)  # by its suffix, so that the conversion reports it
    with pytest.raises(ValueError, match=r"'.*slide\.jpg' is not an image file"):
        converted_slide(fake, HER2ST_MPP, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.tif"))


@pytest.mark.parametrize("mpp", [0, -0.5, math.nan, math.inf, 72.0, 0.001, "abc", None, True])
def test_implausible_mpp_is_refused(c2_jpeg, tmp_path, mpp):
    with pytest.raises(ValueError, match=r"mpp=.* for slide image '.*5714_HE_BT_C2\.jpg' is not a plausible pixel"):
        converted_slide(c2_jpeg, mpp, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_unwritable_cache_dir_is_refused(c2_jpeg, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(NotADirectoryError, match=r"converted slide .* is a file, not a folder"):
        converted_slide(c2_jpeg, HER2ST_MPP, blocker / "slides")


def test_missing_source_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*absent\.jpg' does not exist"):
        converted_slide(tmp_path / "absent.jpg", HER2ST_MPP, tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=r"'.*absent\.jpg' does not exist"):
        needs_conversion(tmp_path / "absent.jpg")


def test_rgba_png_becomes_rgb_composited_on_white(tmp_path):
    tile = realdata("tiles", "high-nuclei-score-level0.png")
    rgba = decoded(tile).copy()
    assert rgba.shape[2] == 4
    rgba[:256, :256, 3] = 0  # transparent corner: white glass
    rgba[256:512, :256, 3] = 128  # half transparent
    source = tmp_path / "tile.png"
    Image.fromarray(rgba).save(source)
    assert needs_conversion(source)
    level0 = level0_through_tifffile_backend(converted_slide(source, 0.5, tmp_path / "cache"))
    assert level0.shape == rgba.shape[:2] + (3,)
    expected = rgba[..., :3].astype(np.float64)
    expected[:256, :256] = 255
    expected[256:512, :256] = 255 - (255 - expected[256:512, :256]) * 128 / 255
    assert np.abs(level0 - expected).mean() < 5.0  # JPEG re-encoding of a detailed lossless tile
    assert level0[16:240, 16:240].min() >= 250  # white, within JPEG rounding
    half = (slice(272, 496), slice(16, 240))
    assert abs((level0[half] - expected[half]).mean()) < 1.0  # the blend itself, JPEG errors averaged out
    assert abs(level0[half].mean() - rgba[half][..., :3].mean()) > 20  # and not the opaque colours


def test_greyscale_and_palette_images_become_rgb(c2_jpeg, tmp_path):
    with Image.open(c2_jpeg) as image:
        crop = image.crop((0, 0, 600, 500))
    crop.convert("L").save(tmp_path / "grey.png")
    crop.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    grey = level0_through_tifffile_backend(converted_slide(tmp_path / "grey.png", 0.5, tmp_path / "cache"))
    assert grey.shape == (500, 600, 3)
    assert np.abs(grey.astype(np.int16) - decoded(tmp_path / "grey.png")[..., None]).mean() < 3.0
    palette = level0_through_tifffile_backend(converted_slide(tmp_path / "palette.png", 0.5, tmp_path / "cache"))
    with Image.open(tmp_path / "palette.png") as image:
        assert image.mode == "P"
        expected = np.asarray(image.convert("RGB")).astype(np.int16)
    assert np.abs(palette.astype(np.int16) - expected).mean() < 4.0


def test_sixteen_bit_image_is_refused(tmp_path):
    source = tmp_path / "scan16.tif"
    tifffile.imwrite(source, np.full((64, 80), 1000, dtype=np.uint16))
    assert needs_conversion(source)
    with pytest.raises(ValueError, match=r"'.*scan16\.tif' has pixels of PIL mode .*export it as an 8-bit RGB"):
        converted_slide(source, 0.5, tmp_path / "cache")


def test_needs_conversion_for_plain_images(c2_jpeg, tmp_path):
    assert needs_conversion(c2_jpeg)
    assert needs_conversion(realdata("tiles", "crc_tcga_512_1.jpg"))
    assert needs_conversion(realdata("tiles", "no-tissue.png"))
    assert needs_conversion(realdata("tiles", "crc_kather_224.tif"))  # a real single-page strip TIFF
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, decoded(c2_jpeg)[:300, :400])
    assert needs_conversion(plain)
    renamed = copy_of(c2_jpeg, tmp_path / "renamed")
    assert needs_conversion(renamed.rename(renamed.with_suffix(".tif")))  # by content, whatever the name


def test_needs_conversion_false_for_slides(c2_jpeg, tmp_path):
    assert not needs_conversion(realdata("slides", "cmu-1-small-region.svs"))  # tiled, one level, Aperio
    assert not needs_conversion(realdata("slides", "broken.svs"))  # not readable: left to the slide readers
    pyramid = write_pyramidal_tiff(tmp_path / "pyramid.tif", decoded(c2_jpeg), HER2ST_MPP)
    assert not needs_conversion(pyramid)
    assert not needs_conversion(tmp_path)  # a folder (e.g. a DICOM series) is never a plain image
