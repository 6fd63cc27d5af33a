"""Pixel sizes are never guessed, and spots must land on tissue: broken copies of the real SVS and of the demo study."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from bundle.io.dataset import format_qc_summary, prepare_dataset, read_manifest
from bundle.io.slides import available_backends, read_slide_info
from bundle.io.tissue import MIN_TISSUE_FRACTION, spot_tissue_fractions
from tests.helpers import demo_rows, edit_positions, realdata, swap_xy, write_manifest

BACKENDS = available_backends()
DEMO_QC = dict(fov_um=64.0, n_top_genes=48, min_counts=50, verbose=False)  # the demo_dataset fixture's settings


def svs_without_mpp(tmp_path: Path) -> Path:
    """A copy of the real Aperio SVS whose descriptions lack the ``MPP = ...`` field (all else byte-identical)."""
    source = realdata("slides", "cmu-1-small-region.svs")
    copy = tmp_path / "no_mpp.svs"
    shutil.copyfile(source, copy)
    with tifffile.TiffFile(copy) as tif:
        descriptions = [page.description for page in tif.pages]
    for index, description in enumerate(descriptions):
        if "|MPP = " in description:
            tifffile.tiffcomment(copy, re.sub(r"\|MPP = [0-9.]+", "", description).encode("ascii"), pageindex=index)
    with tifffile.TiffFile(copy) as tif:  # still an Aperio SVS, just without a pixel size
        assert tif.is_svs and tif.pages[0].description.startswith("Aperio Image Library")
        assert "AppMag = 20" in tif.pages[0].description and "MPP" not in tif.pages[0].description
    return copy


def glass_location(slide: str, mpp: float, box_um: float) -> tuple[float, float]:
    """Level-0 ``(x, y)`` of a glass area (low saturation over a ``box_um`` square), found on the slide's pixels."""
    with tifffile.TiffFile(slide) as tif:
        level = tif.series[0].levels[-1]
        image = level.asarray().astype(np.float32)
        scale = tif.series[0].levels[0].shape[0] / level.shape[0]
    saturation = (image.max(-1) - image.min(-1)) / np.maximum(image.max(-1), 1.0)
    box = int(np.ceil(box_um / (mpp * scale)))
    for y in range(0, image.shape[0] - box, 4):
        for x in range(0, image.shape[1] - box, 4):
            if saturation[y : y + box, x : x + box].max() < 0.05:
                return (x + box / 2) * scale, (y + box / 2) * scale
    raise AssertionError(f"no glass area in {slide}")


# --- item 1: no pixel size recorded -> refused by every backend ------------------------------------------------------


@pytest.mark.parametrize("backend", ["cucim", "openslide", "tifffile"])
def test_svs_without_mpp_is_refused_by_every_backend(tmp_path, backend):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} is not installed")
    slide = svs_without_mpp(tmp_path)
    # cuCIM reports spacing [1, 1] with empty units for this file: that must not become 1.0 um/px
    with pytest.raises(ValueError, match=r"no_mpp\.svs' has no pixel size in its metadata.*never guessed"):
        read_slide_info(slide, backend=backend)
    info = read_slide_info(slide, backend=backend, mpp=0.499)
    assert (info.mpp, info.mpp_source, info.size) == (0.499, "explicit", (2967, 2220))


# --- item 5: an mpp of nan is refused, never replaced by the slide's ------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "NaN", "inf"])
def test_manifest_mpp_that_is_not_a_number_is_refused(demo_root, tmp_path, value):
    rows = demo_rows(demo_root)
    rows[1]["mpp"] = value
    manifest = write_manifest(tmp_path / "m.csv", rows)
    with pytest.raises(ValueError, match=rf"m\.csv line 3: mpp '{value}' of sample 'CRC_S02' is not a pixel size"):
        read_manifest(manifest)
    with pytest.raises(ValueError, match="is not a pixel size"):
        prepare_dataset(manifest, tmp_path / "out", **DEMO_QC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]


def test_explicit_nan_mpp_is_refused_by_the_reader():
    slide = realdata("slides", "cmu-1-small-region.svs")
    with pytest.raises(ValueError, match=r"mpp=nan for slide .*cmu-1-small-region\.svs' is not a plausible pixel size"):
        read_slide_info(slide, backend="tifffile", mpp=float("nan"))


# --- item 2: spots must land on tissue -------------------------------------------------------------------------------


def test_demo_spots_are_on_tissue(demo_dataset):
    summary = json.loads((demo_dataset / "qc_summary.json").read_text())
    for sid, s in summary["samples"].items():
        assert s["on_background"] == 0, sid
        assert s["kept"] + s["not_in_tissue"] + s["on_background"] + s["too_few_counts"] + s["patch_leaves_slide"] == (
            s["spots"]
        )
    assert "on_background" in format_qc_summary(summary).splitlines()[0]


def test_swapped_coordinates_are_refused(demo_root, tmp_path):
    rows = demo_rows(demo_root)
    for r in rows:
        r["st_path"] = edit_positions(demo_root, r["sample_id"], tmp_path / "st", swap_xy)
    manifest = write_manifest(tmp_path / "m.csv", rows)
    pattern = (
        r"Sample 'CRC_S02': \d+ of 64 in-tissue spots \(\d+%\) lie on background.*slide.*CRC_S02.*slide\.tif"
        r".*x and y are not swapped.*hires/lowres.*wrong slide.*max_background_share"
    )
    with pytest.raises(ValueError, match=pattern):
        prepare_dataset(manifest, tmp_path / "out", **DEMO_QC)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "st"]  # no staging folder left behind
    # the share is a setting: allowing every spot on background builds the dataset, counting them
    summary = prepare_dataset(manifest, tmp_path / "out", max_background_share=1.0, **DEMO_QC)
    assert summary["samples"]["CRC_S02"]["on_background"] >= 10


def test_spots_moved_onto_background_are_dropped_and_counted(demo_root, demo_dataset, tmp_path):
    row = demo_rows(demo_root)[0]
    with (demo_dataset / "spots.csv").open() as f:
        kept = [r["barcode"] for r in csv.DictReader(f) if r["sample"] == row["sample_id"] and r["qc"] == "kept"]
    moved = kept[10:13]
    x, y = glass_location(row["slide_path"], 0.25, box_um=160.0)

    def move(rows):
        for i, r in enumerate(r for r in rows if r["barcode"] in moved):
            r["pxl_col_in_fullres"], r["pxl_row_in_fullres"] = str(int(x) + 8 * i), str(int(y))

    row["st_path"] = edit_positions(demo_root, row["sample_id"], tmp_path / "st", move)
    summary = prepare_dataset(write_manifest(tmp_path / "m.csv", [row]), tmp_path / "out", **DEMO_QC)
    before = json.loads((demo_dataset / "qc_summary.json").read_text())["samples"][row["sample_id"]]
    after = summary["samples"][row["sample_id"]]
    assert after["on_background"] == 3 and after["kept"] == before["kept"] - 3
    with (tmp_path / "out" / "spots.csv").open() as f:
        assert sorted(r["barcode"] for r in csv.DictReader(f) if r["qc"] == "on_background") == sorted(moved)
    saved = json.loads((tmp_path / "out" / "qc_summary.json").read_text())
    assert saved["samples"][row["sample_id"]]["on_background"] == 3
    table = format_qc_summary(summary).splitlines()
    column = table[0].split().index("on_background")
    assert table[2].split()[column] == "3"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # a real 9,272 x 9,923 JPEG
def test_real_spots_land_on_tissue_and_swapped_ones_on_glass(tmp_path):
    # HER2ST section B4: real spots under tissue (selected == 1) on their own H&E, about 0.69 um/px
    folder = realdata("her2st", "B4")
    image = Image.open(next(folder.glob("*.jpg")))
    full_width = image.width
    image.draft("RGB", (image.width // 8, image.height // 8))  # decode at 1/8 scale: a 5.5 um/px "slide"
    scale = full_width / image.width
    slide = tmp_path / "B4.tif"
    tifffile.imwrite(slide, np.asarray(image.convert("RGB")), tile=(256, 256), photometric="rgb")
    with (folder / "B4_selection.tsv").open() as f:
        spots = [r for r in csv.DictReader(f, delimiter="\t") if r["selected"] == "1"]
    xy = np.array([[float(r["pixel_x"]), float(r["pixel_y"])] for r in spots]) / scale
    mpp = 0.69 * scale
    fractions = spot_tissue_fractions(slide, "tifffile", [1.0], mpp, xy, fov_um=128.0)
    assert len(spots) > 250 and (fractions < MIN_TISSUE_FRACTION).sum() == 0
    swapped = xy[:, ::-1][(xy[:, 1] < image.width) & (xy[:, 0] < image.height)]
    on_glass = spot_tissue_fractions(slide, "tifffile", [1.0], mpp, swapped, fov_um=128.0) < MIN_TISSUE_FRACTION
    assert len(swapped) > 250 and on_glass.mean() > 0.5


def test_off_slide_message_mentions_a_swap(tmp_path):
    # real Space Ranger spots (full-resolution coordinates up to ~10,000 px) paired with a 2220 x 2967 slide
    manifest = write_manifest(
        tmp_path / "m.csv",
        [
            {
                "sample_id": "human1",
                "st_path": str(realdata("visium_human_spaceranger1")),
                "slide_path": str(realdata("slides", "cmu-1-small-region.svs")),
            }
        ],
    )
    with pytest.raises(ValueError, match=r"lie outside the slide.*x and y are not swapped.*hires/lowres"):
        prepare_dataset(manifest, tmp_path / "out", spot_spacing_um=None, verbose=False)
