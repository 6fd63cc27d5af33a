"""Slide readers on the real SVS slide and bad inputs: every backend, same pixels, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from bundle.geometry import rowcol_to_xy, xy_to_rowcol
from bundle.io.slides import available_backends, get_wsi_reader, level_for_mpp, open_slide, read_slide_info
from tests.helpers import realdata

BACKENDS = available_backends()


def test_coordinate_helper_swaps_xy_to_rowcol():
    assert xy_to_rowcol((10, 20)) == (20, 10)
    assert rowcol_to_xy(xy_to_rowcol((3.5, 7.0))) == (3.5, 7.0)
    with pytest.raises(ValueError, match="pair"):
        xy_to_rowcol((1, 2, 3))


@pytest.mark.parametrize("backend", ["cucim", "openslide", "tifffile"])
def test_real_svs_geometry_and_pixel_size(backend):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} is not installed")
    info = read_slide_info(realdata("slides", "cmu-1-small-region.svs"), backend=backend)
    assert info.size == (2967, 2220)
    assert info.mpp == pytest.approx(0.499)
    assert info.mpp_source == "slide"


def test_real_svs_same_pixels_through_every_backend():
    path = str(realdata("slides", "cmu-1-small-region.svs"))
    patches = {}
    for backend in BACKENDS:
        reader = get_wsi_reader(backend, channel_dim=-1)
        wsi = open_slide(path, reader)
        patch, _ = reader.get_data(wsi, location=(1600, 1400), size=(96, 128), level=0)
        patches[backend] = np.asarray(patch).astype(int)
        assert patches[backend].shape == (96, 128, 3)
    assert len(patches) >= 2, f"only {list(patches)} available"
    reference = patches[BACKENDS[0]]
    assert reference.std() > 5  # real tissue, not padding
    for backend, patch in patches.items():
        # JPEG tiles decoded by different libjpeg builds may differ by a grey level or two
        assert np.abs(patch - reference).mean() < 1.0, backend


def test_tifffile_reader_matches_full_decode_and_pads_past_border():
    path = realdata("slides", "cmu-1-small-region.svs")
    full = tifffile.imread(path)  # level 0 of the first series
    reader = get_wsi_reader("tifffile", channel_dim=-1)
    wsi = open_slide(path, reader)
    patch, _ = reader.get_data(wsi, location=(333, 444), size=(50, 60), level=0)
    np.testing.assert_array_equal(np.asarray(patch), full[333:383, 444:504])
    # 2967 rows: a read starting at row 2950 has 17 real rows, then white
    edge, _ = reader.get_data(wsi, location=(2950, 0), size=(40, 8), level=0)
    edge = np.asarray(edge)
    np.testing.assert_array_equal(edge[:17], full[2950:2967, 0:8])
    assert (edge[17:] == 255).all()
    assert reader.get_level_count(wsi) == 1  # thumbnail, label and macro pages are not levels


@pytest.mark.parametrize("backend", ["cucim", "openslide", "tifffile"])
def test_broken_slide_error_names_the_file(backend):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} is not installed")
    path = realdata("slides", "broken.svs")
    with pytest.raises(ValueError, match=r"broken\.svs.*not a readable whole-slide image"):
        read_slide_info(path, backend=backend)


def test_missing_slide_error():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_slide_info("/nonexistent/slide.svs", backend="tifffile")


def test_slide_without_pixel_size_needs_mpp(tmp_path):
    # the real Kather tile carries a 72-dpi placeholder tag: not a scan resolution
    tile = realdata("tiles", "crc_kather_224.tif")
    with pytest.raises(ValueError, match="not a scan resolution.*mpp"):
        read_slide_info(tile, backend="tifffile")
    assert read_slide_info(tile, backend="tifffile", mpp=0.5).mpp == 0.5
    # a TIFF with no resolution tags at all
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, np.asarray(Image.open(realdata("tiles", "crc_tcga_512_1.jpg"))), tile=(256, 256))
    for backend in BACKENDS:  # cuCIM reports spacing 1.0 (unit-less) here: that must not pass as a pixel size
        with pytest.raises(ValueError, match="no pixel size.*never guessed"):
            read_slide_info(bare, backend=backend)
    with pytest.raises(ValueError, match="not a plausible pixel size"):
        read_slide_info(bare, backend="tifffile", mpp=250.0)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        get_wsi_reader("pillow")


def test_level_for_mpp_picks_coarsest_sufficient_level():
    downsamples = [1.0, 2.0, 4.0, 8.0]
    assert level_for_mpp(downsamples, 0.25, 0.25) == 0
    assert level_for_mpp(downsamples, 0.25, 0.5) == 1
    assert level_for_mpp(downsamples, 0.25, 0.9) == 1  # level 2 (1.0 um/px) would be too coarse
    assert level_for_mpp(downsamples, 0.25, 1.0) == 2
    assert level_for_mpp(downsamples, 0.25, 100.0) == 3
    assert level_for_mpp(downsamples, 0.25, 0.1) == 0
