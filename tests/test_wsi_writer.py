"""``bundle.io.tiff.write_pyramidal_tiff``: written once, read back with every whole-slide reader the bundle uses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from bundle.io.tiff import downsample_by_two, pyramid_level_shapes, write_pyramidal_tiff

MPP = 0.25
HEIGHT, WIDTH = 700, 1000
MIN_LEVEL = 64
# 1000 -> 500 -> 250 -> 125 (< 2 * 64: stop); the odd 175 rounds up to 88
EXPECTED_SHAPES = [(700, 1000), (350, 500), (175, 250), (88, 125)]


def _pattern(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Distinct, JPEG-friendly content: colour ramps, a coarse checkerboard and a dark disk."""
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[..., 0] = (xx * 255 // (width - 1)).astype(np.uint8)
    image[..., 1] = (yy * 255 // (height - 1)).astype(np.uint8)
    image[..., 2] = np.where(((yy // 64) + (xx // 64)) % 2 == 0, 220, 40).astype(np.uint8)
    disk = (yy - 300) ** 2 + (xx - 620) ** 2 < 90**2
    image[disk] = (30, 20, 90)
    return image


def _expected_mpp(level: int) -> tuple[float, float]:
    """(y, x) pixel size of a level: exact ratios of level 0 to this level's size."""
    h, w = EXPECTED_SHAPES[level]
    return MPP * HEIGHT / h, MPP * WIDTH / w


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return _pattern()


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory, image: np.ndarray) -> Path:
    path = tmp_path_factory.mktemp("wsi") / "slide.tif"
    returned = write_pyramidal_tiff(path, image, mpp=MPP, tile_size=256, min_level_size=MIN_LEVEL)
    assert returned == path
    return path


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed; install it to check that it reads the written slide")


def test_pyramid_level_shapes_rule() -> None:
    assert pyramid_level_shapes(HEIGHT, WIDTH, MIN_LEVEL) == EXPECTED_SHAPES
    assert pyramid_level_shapes(100, 90, 256) == [(100, 90)]  # small image: level 0 only
    assert pyramid_level_shapes(512, 300, 256) == [(512, 300), (256, 150)]
    with pytest.raises(ValueError, match="min_level_size"):
        pyramid_level_shapes(10, 10, 0)


def test_downsample_by_two_is_an_area_average() -> None:
    rng = np.random.default_rng(0)
    odd = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    result = downsample_by_two(odd)
    assert result.shape == (4, 5, 3) and result.dtype == np.uint8
    padded = np.pad(odd, [(0, 1), (0, 1), (0, 0)], mode="edge").astype(np.float64)
    reference = np.floor(padded.reshape(4, 2, 5, 2, 3).mean(axis=(1, 3)) + 0.5)
    np.testing.assert_array_equal(result, reference)
    floats = rng.random((6, 4)).astype(np.float32)
    np.testing.assert_allclose(downsample_by_two(floats), floats.reshape(3, 2, 2, 2).mean(axis=(1, 3)), rtol=1e-6)
    uint16 = rng.integers(0, 65536, (5, 5, 2), dtype=np.uint16)
    assert downsample_by_two(uint16).dtype == np.uint16
    with pytest.raises(ValueError, match="shape"):
        downsample_by_two(np.zeros((2, 2, 2, 2)))


def test_tifffile_sees_top_level_tiled_jpeg_pages(slide_path: Path, image: np.ndarray) -> None:
    import tifffile

    with tifffile.TiffFile(slide_path) as tif:
        assert len(tif.pages) == len(EXPECTED_SHAPES)
        for level, page in enumerate(tif.pages):
            assert page.shape[:2] == EXPECTED_SHAPES[level]
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert not page.subifds, "levels must be top-level pages, not SubIFDs"
            assert int(page.subfiletype) == (0 if level == 0 else 1)
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            x_num, x_den = page.tags["XResolution"].value
            y_num, y_den = page.tags["YResolution"].value
            mpp_y, mpp_x = _expected_mpp(level)
            assert 1e4 * x_den / x_num == pytest.approx(mpp_x, rel=1e-6)
            assert 1e4 * y_den / y_num == pytest.approx(mpp_y, rel=1e-6)
        level0 = tif.pages[0].asarray()
        level1 = tif.pages[1].asarray()
        # the series' pyramid (what tile-level zarr readers use) sees the same levels
        assert [lvl.shape[:2] for lvl in tif.series[0].levels] == EXPECTED_SHAPES
    assert np.abs(level0.astype(np.int16) - image).mean() < 3.0
    assert np.abs(level1.astype(np.int16) - downsample_by_two(image)).mean() < 3.0


def test_cucim_reads_levels_and_pixel_size(slide_path: Path, image: np.ndarray) -> None:
    _needs("cucim")
    from cucim import CuImage

    slide = CuImage(str(slide_path))
    assert slide.resolutions["level_count"] == len(EXPECTED_SHAPES)
    assert [tuple(d) for d in slide.resolutions["level_dimensions"]] == [(w, h) for h, w in EXPECTED_SHAPES]
    spacing = slide.metadata["cucim"]["spacing"]
    units = slide.metadata["cucim"]["spacing_units"]
    assert spacing[:2] == pytest.approx([MPP, MPP]) and list(units[:2]) == ["micrometer", "micrometer"]
    region = np.asarray(slide.read_region(location=(0, 0), size=(WIDTH, HEIGHT), level=0))[..., :3]
    assert np.abs(region.astype(np.int16) - image).mean() < 3.0


def test_openslide_reads_levels_and_pixel_size(slide_path: Path, image: np.ndarray) -> None:
    _needs("openslide")
    import openslide

    with openslide.OpenSlide(str(slide_path)) as slide:
        assert slide.level_count == len(EXPECTED_SHAPES)
        assert list(slide.level_dimensions) == [(w, h) for h, w in EXPECTED_SHAPES]
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(MPP)
        region = np.asarray(slide.read_region((0, 0), 0, (WIDTH, HEIGHT)).convert("RGB"))
    assert np.abs(region.astype(np.int16) - image).mean() < 3.0


@pytest.mark.parametrize("backend", ["cucim", "openslide", "tifffile"])
def test_monai_wsireader_reports_levels_and_mpp(slide_path: Path, image: np.ndarray, backend: str) -> None:
    _needs(backend)
    from monai.data import WSIReader

    reader = WSIReader(backend=backend)
    wsi = reader.read(str(slide_path))
    assert reader.get_level_count(wsi) == len(EXPECTED_SHAPES)
    for level, shape in enumerate(EXPECTED_SHAPES):
        assert tuple(reader.get_size(wsi, level)) == shape
        mpp_y, mpp_x = _expected_mpp(level)
        # readers that use one downsample per level (mean of both axes) differ in the 3rd digit on odd-sized levels
        assert reader.get_mpp(wsi, level) == pytest.approx((mpp_y, mpp_x), rel=5e-3)
    patch, _ = reader.get_data(wsi, location=(100, 200), size=(256, 300), level=0)  # (row, column), (height, width)
    patch = np.moveaxis(np.asarray(patch), 0, -1)
    assert patch.shape == (256, 300, 3)
    assert np.abs(patch.astype(np.int16) - image[100:356, 200:500]).mean() < 3.0


@pytest.mark.parametrize("compression", ["deflate", "none"])
def test_lossless_compressions_round_trip_exactly(tmp_path: Path, image: np.ndarray, compression: str) -> None:
    import tifffile

    path = write_pyramidal_tiff(tmp_path / "lossless.tif", image, mpp=0.5, compression=compression, min_level_size=256)
    with tifffile.TiffFile(path) as tif:
        np.testing.assert_array_equal(tif.pages[0].asarray(), image)
        assert len(tif.pages) == 2  # 1000 >= 512: one reduced level, 500 < 512: stop


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(image=np.zeros((64, 64), dtype=np.uint8)), "shape"),
        (dict(image=np.zeros((64, 64, 4), dtype=np.uint8)), "shape"),
        (dict(image=np.zeros((64, 64, 3), dtype=np.float32)), "dtype uint8"),
        (dict(image=[[0, 0, 0]]), "numpy array"),
        (dict(mpp=0.0), "mpp"),
        (dict(mpp=-0.25), "mpp"),
        (dict(mpp=float("nan")), "mpp"),
        (dict(tile_size=100), "tile_size"),
        (dict(compression="webp2000"), "compression"),
        (dict(quality=0), "quality"),
        (dict(min_level_size=0), "min_level_size"),
    ],
)
def test_bad_arguments_raise_and_leave_no_file(tmp_path: Path, kwargs: dict, match: str) -> None:
    arguments = dict(image=np.zeros((64, 64, 3), dtype=np.uint8), mpp=MPP) | kwargs
    path = tmp_path / "bad.tif"
    with pytest.raises(ValueError, match=match):
        write_pyramidal_tiff(path, **arguments)
    assert list(tmp_path.iterdir()) == []


def test_missing_folder_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_pyramidal_tiff(tmp_path / "missing" / "slide.tif", np.zeros((32, 32, 3), dtype=np.uint8), mpp=MPP)
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_write_keeps_the_old_file_and_no_temporary(
    tmp_path: Path, image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tifffile

    path = tmp_path / "slide.tif"
    path.write_bytes(b"previous content")
    original = tifffile.TiffWriter.write
    calls = []

    def failing_write(self, *args, **kwargs):  # the first level goes through, the second fails (e.g. disk full)
        calls.append(1)
        if len(calls) == 2:
            raise OSError("simulated write failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffWriter, "write", failing_write)
    with pytest.raises(OSError, match="simulated"):
        write_pyramidal_tiff(path, image, mpp=MPP, min_level_size=MIN_LEVEL)
    assert len(calls) == 2
    assert path.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.tif"]
