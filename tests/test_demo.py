"""The demo tissue simulator: real file formats, Visium geometry, determinism, biology and histology it encodes."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import pytest

from bundle.demo import (
    COMPARTMENTS,
    GENE_PROGRAMMES,
    demo_gene_table,
    make_demo_dataset,
    simulate_slide,
    visium_barcodes,
    visium_spot_lattice,
)
from bundle.demo.compartments import GLASS
from bundle.demo.expression import expression_profiles, simulate_counts
from bundle.demo.fields import jittered_grid, lookup, smooth_noise, smoothstep, stamp_disks
from bundle.demo.files import csv_text, write_text
from bundle.demo.histology import render_histology
from bundle.demo.layout import simulate_layout
from bundle.demo.nuclei import nucleus_bank, stamp_nuclei
from bundle.demo.stains import StainModel
from bundle.demo.visium import spot_fractions
from bundle.utils import write_atomic

SEED = 7
SIZE_UM = (1200.0, 1400.0)  # height, width: non-square, so a swapped row/column shows
MPP = 0.25
SAMPLES = ("CRC_S01", "CRC_S02")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo_sim")
    manifest = make_demo_dataset(root, num_slides=2, seed=SEED, size_um=SIZE_UM, mpp=MPP)
    assert manifest == root / "manifest.csv"
    return root


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _ground_truth(demo_dir: Path, sample: str) -> dict[str, np.ndarray]:
    rows = _read_csv(demo_dir / sample / "ground_truth.csv")
    columns = {key: np.array([row[key] for row in rows]) for key in rows[0]}
    for key in ("x", "y", "array_row", "array_col", "in_tissue"):
        columns[key] = columns[key].astype(np.int64)
    for key in ("tissue_coverage", *COMPARTMENTS):
        columns[key] = columns[key].astype(np.float64)
    return columns


def _read_visium(demo_dir: Path, sample: str):
    import warnings

    import scanpy as sc

    with warnings.catch_warnings():  # scanpy points to squidpy.read.visium; the reader itself is what we test
        warnings.filterwarnings("ignore", message="Use `squidpy.read.visium` instead", category=FutureWarning)
        return sc.read_visium(demo_dir / sample / "spaceranger")


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed; install it to check that it reads the demo slides")


# --- files -----------------------------------------------------------------------------------------------------------
def test_manifest_readme_and_files(demo_dir: Path) -> None:
    rows = _read_csv(demo_dir / "manifest.csv")
    assert list(rows[0]) == ["sample_id", "st_path", "slide_path", "mpp", "split", "patient"]
    assert [r["sample_id"] for r in rows] == list(SAMPLES)
    assert [r["split"] for r in rows] == ["train", "val"]  # the last slide is the validation slide
    assert len({r["patient"] for r in rows}) == 2
    for row in rows:
        assert not Path(row["st_path"]).is_absolute() and not Path(row["slide_path"]).is_absolute()
        assert float(row["mpp"]) == MPP
        st = demo_dir / row["st_path"]
        assert (demo_dir / row["slide_path"]).is_file()
        for name in ("filtered_feature_bc_matrix.h5", "spatial/tissue_positions.csv", "spatial/scalefactors_json.json",
                     "spatial/tissue_hires_image.png", "spatial/tissue_lowres_image.png"):  # fmt: skip
            assert (st / name).is_file(), name
        assert (demo_dir / row["sample_id"] / "ground_truth.csv").is_file()
    readme = (demo_dir / "README.md").read_text()
    assert "CC0-1.0" in readme and f"seed={SEED}" in readme and "simulated" in readme
    assert not list(demo_dir.rglob("*.tmp")), "temporary files were left behind"


def test_scanpy_read_visium_loads_every_sample(demo_dir: Path) -> None:
    _needs("scanpy")
    for sample in SAMPLES:
        adata = _read_visium(demo_dir, sample)
        positions = _read_csv(demo_dir / sample / "spaceranger" / "spatial" / "tissue_positions.csv")
        assert list(positions[0]) == [
            "barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"
        ]  # fmt: skip
        in_tissue = {p["barcode"] for p in positions if p["in_tissue"] == "1"}
        assert 0 < len(in_tissue) < len(positions), "some lattice spots must be off the tissue"
        assert adata.n_obs == len(in_tissue) and set(adata.obs_names) == in_tissue
        assert adata.n_vars == len(demo_gene_table()[1]) and "EPCAM" in adata.var_names
        counts = adata.X.toarray()
        assert np.array_equal(counts, np.round(counts)) and counts.min() >= 0 and counts.sum(axis=1).min() > 0

        truth = _ground_truth(demo_dir, sample)
        index = {barcode: i for i, barcode in enumerate(truth["barcode"])}
        rows = np.array([index[b] for b in adata.obs_names])
        spatial = np.asarray(adata.obsm["spatial"])  # (x, y) = (column, row) in level-0 pixels
        np.testing.assert_array_equal(spatial[:, 0], truth["x"][rows])
        np.testing.assert_array_equal(spatial[:, 1], truth["y"][rows])
        np.testing.assert_array_equal(adata.obs["array_row"].to_numpy(), truth["array_row"][rows])

        library = adata.uns["spatial"][sample]
        scale = library["scalefactors"]
        # Space Ranger's spot_diameter_fullres spans a theoretical 65 um spot (not the 55 um capture spot)
        assert scale["spot_diameter_fullres"] == pytest.approx(65.0 / MPP)
        height, width = round(SIZE_UM[0] / MPP), round(SIZE_UM[1] / MPP)
        hires = library["images"]["hires"]
        assert max(hires.shape[:2]) == min(2000, max(height, width))
        assert hires.shape[0] == round(height * scale["tissue_hires_scalef"])
        assert max(library["images"]["lowres"].shape[:2]) == 600
        assert library["images"]["lowres"].shape[1] == round(width * scale["tissue_lowres_scalef"])


def test_h5_is_a_10x_v3_matrix(demo_dir: Path) -> None:
    import h5py

    with h5py.File(demo_dir / "CRC_S01" / "spaceranger" / "filtered_feature_bc_matrix.h5", "r") as f:
        assert [v.decode() for v in f.attrs["library_ids"]] == ["CRC_S01"]
        assert f.attrs["filetype"][0] == b"matrix" and int(f.attrs["version"][0]) == 2
        assert "chemistry_description" in f.attrs and "software_version" in f.attrs
        m = f["matrix"]
        n_genes, n_barcodes = (int(v) for v in m["shape"][()])
        barcodes = [b.decode() for b in m["barcodes"][()]]
        assert len(barcodes) == n_barcodes and barcodes == sorted(barcodes) and len(set(barcodes)) == n_barcodes
        assert all(re.fullmatch(r"[ACGT]{16}-1", b) for b in barcodes)
        assert m["indptr"].shape == (n_barcodes + 1,) and int(m["indptr"][-1]) == m["data"].shape[0]
        assert m["data"].dtype.kind == "i" and int(m["indices"][()].max()) < n_genes
        features = m["features"]
        assert list(features["_all_tag_keys"][()]) == [b"genome"]
        ids = [v.decode() for v in features["id"][()]]
        names = [v.decode() for v in features["name"][()]]
        assert len(ids) == len(set(ids)) == n_genes and all(re.fullmatch(r"ENSG\d{11}", i) for i in ids)
        assert set(features["feature_type"][()]) == {b"Gene Expression"} and set(features["genome"][()]) == {b"GRCh38"}
        assert names == demo_gene_table()[1]
        assert 150 <= n_genes <= 250


# --- slide -----------------------------------------------------------------------------------------------------------
def test_slide_opens_in_every_reader_with_its_pixel_size(demo_dir: Path) -> None:
    import tifffile

    path = demo_dir / "CRC_S01" / "slide.tif"
    height, width = round(SIZE_UM[0] / MPP), round(SIZE_UM[1] / MPP)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].shape == (height, width, 3) and len(tif.pages) >= 3
        x_num, x_den = tif.pages[0].tags["XResolution"].value
        assert 1e4 * x_den / x_num == pytest.approx(MPP)
    levels = len(tifffile.TiffFile(path).pages)
    if importlib.util.find_spec("cucim") is not None:
        from cucim import CuImage

        slide = CuImage(str(path))
        assert slide.resolutions["level_count"] == levels
        assert slide.metadata["cucim"]["spacing"][:2] == pytest.approx([MPP, MPP])
    if importlib.util.find_spec("openslide") is not None:
        import openslide

        with openslide.OpenSlide(str(path)) as slide:
            assert slide.level_count == levels and slide.dimensions == (width, height)
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP)
    from monai.data import WSIReader

    for backend in ("cucim", "openslide", "tifffile"):
        if importlib.util.find_spec(backend) is None:
            continue
        reader = WSIReader(backend=backend)
        wsi = reader.read(str(path))
        assert reader.get_level_count(wsi) == levels
        assert reader.get_mpp(wsi, 0) == pytest.approx((MPP, MPP)), backend
        assert reader.get_mpp(wsi, 2) == pytest.approx((4 * MPP, 4 * MPP)), backend


# --- Visium geometry ---------------------------------------------------------------------------------------------
def test_spots_lie_on_the_visium_hex_lattice(demo_dir: Path) -> None:
    truth = _ground_truth(demo_dir, "CRC_S01")
    assert np.all((truth["array_row"] + truth["array_col"]) % 2 == 0)
    assert len(set(truth["barcode"])) == truth["barcode"].size
    xy = np.stack([truth["x"], truth["y"]], axis=1).astype(np.float64)
    distance = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    np.fill_diagonal(distance, np.inf)
    nearest = distance.min(axis=1)
    np.testing.assert_allclose(nearest, 100.0 / MPP, atol=1.0)  # 100 um centre to centre (rounded pixel centres)
    # neighbours within a row: array_col + 2 is 100 um to the right; the next row is 86.6 um down
    pos = {(r, c): (x, y) for r, c, x, y in zip(truth["array_row"], truth["array_col"], truth["x"], truth["y"])}
    r, c = truth["array_row"][0], truth["array_col"][0]
    assert pos[(r, c + 2)][0] - pos[(r, c)][0] == pytest.approx(400, abs=1)
    assert pos[(r + 1, c + 1)][1] - pos[(r, c)][1] == pytest.approx(100 / MPP * np.sqrt(3) / 2, abs=1)
    # spot disks lie on the slide, but some in-tissue spots are close enough to the edge that a patch leaves it
    height, width = round(SIZE_UM[0] / MPP), round(SIZE_UM[1] / MPP)
    radius = 27.5 / MPP
    assert truth["x"].min() >= radius and truth["y"].min() >= radius
    assert truth["x"].max() <= width - radius and truth["y"].max() <= height - radius
    edge = np.minimum.reduce([truth["x"], truth["y"], width - truth["x"], height - truth["y"]])
    assert np.any((truth["in_tissue"] == 1) & (edge < 64.0 / MPP))


def test_lattice_and_barcode_helpers() -> None:
    lattice = visium_spot_lattice(1000.0, 2000.0, origin_um=(40.0, 40.0), array_offset=(2, 4))
    assert np.all((lattice["array_row"] + lattice["array_col"]) % 2 == 0)
    assert lattice["array_row"].min() == 2 and lattice["array_col"].min() == 4
    assert lattice["y_um"].max() <= 960.0 and lattice["x_um"].max() <= 1960.0
    rows, cols = np.meshgrid(np.arange(78), np.arange(128), indexing="ij")
    keep = (rows + cols) % 2 == 0
    barcodes = visium_barcodes(rows[keep], cols[keep])  # a full Visium capture area
    assert len(set(barcodes)) == barcodes.size == 4992
    assert all(re.fullmatch(r"[ACGT]{16}-1", b) for b in barcodes[:50])
    assert visium_barcodes(np.array([3]), np.array([5]))[0] == visium_barcodes(np.array([3]), np.array([5]))[0]
    with pytest.raises(ValueError, match="even"):
        visium_spot_lattice(1000.0, 1000.0, array_offset=(1, 0))


def test_ground_truth_fractions(demo_dir: Path) -> None:
    for sample in SAMPLES:
        truth = _ground_truth(demo_dir, sample)
        fractions = np.stack([truth[c] for c in COMPARTMENTS], axis=1)
        inside = truth["in_tissue"] == 1
        np.testing.assert_allclose(fractions[inside].sum(axis=1), 1.0, atol=2e-3)
        assert np.all(truth["tissue_coverage"][inside] >= 0.3) and np.all(truth["tissue_coverage"][~inside] < 0.3)
        touched = truth["tissue_coverage"] > 0
        dominant = np.where(touched, np.array(COMPARTMENTS)[fractions.argmax(axis=1)], "background")
        np.testing.assert_array_equal(truth["dominant"], dominant)
        assert np.all(fractions[~touched] == 0)


# --- determinism -----------------------------------------------------------------------------------------------------
def _level0_hash(path: Path) -> str:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return hashlib.sha256(tif.pages[0].asarray().tobytes()).hexdigest()


def _counts(path: Path) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        return np.concatenate([f["matrix/data"][()], f["matrix/indices"][()], f["matrix/indptr"][()]])


def test_same_seed_same_files_different_seed_different_files(demo_dir: Path, tmp_path: Path) -> None:
    again = make_demo_dataset(tmp_path / "again", num_slides=1, seed=SEED, size_um=SIZE_UM, mpp=MPP).parent
    other = make_demo_dataset(tmp_path / "other", num_slides=1, seed=SEED + 1, size_um=SIZE_UM, mpp=MPP).parent
    h5 = Path("CRC_S01/spaceranger/filtered_feature_bc_matrix.h5")
    assert np.array_equal(_counts(demo_dir / h5), _counts(again / h5))
    assert _level0_hash(demo_dir / "CRC_S01/slide.tif") == _level0_hash(again / "CRC_S01/slide.tif")
    assert (demo_dir / "CRC_S01/ground_truth.csv").read_bytes() == (again / "CRC_S01/ground_truth.csv").read_bytes()
    assert not np.array_equal(_counts(demo_dir / h5), _counts(other / h5))
    assert _level0_hash(demo_dir / "CRC_S01/slide.tif") != _level0_hash(other / "CRC_S01/slide.tif")
    # slides of one dataset differ from each other
    assert _level0_hash(demo_dir / "CRC_S01/slide.tif") != _level0_hash(demo_dir / "CRC_S02/slide.tif")


def test_simulate_slide_is_deterministic_in_memory() -> None:
    first = simulate_slide(seed=5, slide_index=1, size_um=500.0)
    second = simulate_slide(seed=5, slide_index=1, size_um=500.0)
    assert np.array_equal(first.image, second.image) and np.array_equal(first.counts, second.counts)
    assert np.array_equal(first.labels, second.labels)
    third = simulate_slide(seed=5, slide_index=2, size_um=500.0)
    assert not np.array_equal(first.image, third.image)
    assert first.image.shape == (2000, 2000, 3) and first.label_mpp == pytest.approx(1.0)
    assert first.counts.shape == (int(first.in_tissue.sum()), len(first.gene_names))


# --- what the data encodes ---------------------------------------------------------------------------------------
def test_expression_follows_the_compartments(demo_dir: Path) -> None:
    _needs("scanpy")
    import scanpy as sc

    expression, fractions, library = [], [], []
    for sample in SAMPLES:
        adata = _read_visium(demo_dir, sample)
        truth = _ground_truth(demo_dir, sample)
        index = {barcode: i for i, barcode in enumerate(truth["barcode"])}
        rows = np.array([index[b] for b in adata.obs_names])
        fractions.append(np.stack([truth[c][rows] for c in COMPARTMENTS], axis=1))
        library.append(np.asarray(adata.X.sum(axis=1)).ravel())
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        expression.append(adata.to_df())
    import pandas as pd

    table = pd.concat(expression)
    fractions = np.concatenate(fractions)
    library = np.concatenate(library)
    pairs = [
        ("EPCAM", "tumour", "stroma"),
        ("COL1A1", "stroma", "tumour"),
        ("PTPRC", "immune", "tumour"),
        ("CD79A", "immune", "stroma"),
        ("ADIPOQ", "adipose", "stroma"),
        ("CA9", "hypoxic_rim", "tumour"),
        ("MUC2", "normal_mucosa", "tumour"),
        ("HSPA1A", "necrosis", "stroma"),
    ]
    for gene, high, low in pairs:
        in_high = fractions[:, COMPARTMENTS.index(high)] >= 0.6
        in_low = fractions[:, COMPARTMENTS.index(low)] >= 0.6
        assert in_high.sum() >= 3 and in_low.sum() >= 3, (gene, high, low, in_high.sum(), in_low.sum())
        difference = table[gene].to_numpy()[in_high].mean() - table[gene].to_numpy()[in_low].mean()
        assert difference > 1.5, f"{gene}: {high} - {low} = {difference:.2f} log units"
    necrotic = fractions[:, COMPARTMENTS.index("necrosis")] >= 0.6
    tumour = fractions[:, COMPARTMENTS.index("tumour")] >= 0.6
    assert np.median(library[necrotic]) < 0.4 * np.median(library[tumour])
    assert set(GENE_PROGRAMMES["hypoxia"]) <= set(table.columns)


def test_histology_differs_between_compartments(demo_dir: Path) -> None:
    import tifffile

    stats: dict[str, list[np.ndarray]] = {c: [] for c in COMPARTMENTS}
    for sample in SAMPLES:
        truth = _ground_truth(demo_dir, sample)
        with tifffile.TiffFile(demo_dir / sample / "slide.tif") as tif:
            level = tif.pages[3].asarray()  # 2 um/px, the resolution the models see
        scale = 8
        radius = 27.5 / (MPP * scale)
        yy, xx = np.mgrid[-14:15, -14:15]
        disk = yy**2 + xx**2 <= radius**2
        for i in np.nonzero(truth["in_tissue"] == 1)[0]:
            dominant = truth["dominant"][i]
            if truth[dominant][i] < 0.6:
                continue
            cy, cx = int(round(truth["y"][i] / scale)), int(round(truth["x"][i] / scale))
            pixels = level[cy - 14 : cy + 15, cx - 14 : cx + 15][disk].astype(np.float64)
            grey = pixels.mean(axis=1)
            blue_to_red = pixels[:, 2].mean() / pixels[:, 0].mean()
            stats[dominant].append(np.array([grey.mean(), (grey < 110).mean(), blue_to_red]))
    summary = {c: np.mean(v, axis=0) for c, v in stats.items() if len(v) >= 3}
    assert {"tumour", "stroma", "immune", "adipose"} <= set(summary), {c: len(v) for c, v in stats.items()}
    brightness = {c: s[0] for c, s in summary.items()}
    dark_share = {c: s[1] for c, s in summary.items()}
    assert brightness["adipose"] > brightness["stroma"] + 30 > brightness["immune"] + 30
    assert dark_share["immune"] > 3 * dark_share["stroma"]
    assert dark_share["tumour"] > 1.5 * dark_share["stroma"]
    if "necrosis" in summary:
        assert dark_share["necrosis"] < dark_share["immune"]
    # eosin absorbs blue more than red (pink), haematoxylin red more than blue (blue-purple)
    assert summary["stroma"][2] < 0.95 < summary["immune"][2]


# --- arguments and overwriting ---------------------------------------------------------------------------------------
def test_refuses_a_non_empty_folder_and_leaves_it_untouched(tmp_path: Path) -> None:
    target = tmp_path / "data"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_demo_dataset(target, num_slides=1, size_um=500.0)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"
    manifest = make_demo_dataset(target, num_slides=1, size_um=500.0, overwrite=True, num_workers=1)
    assert manifest.is_file() and (target / "notes.txt").read_text() == "keep me"
    assert [r["split"] for r in _read_csv(manifest)] == ["train"]  # a single slide is a training slide


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_slides=0), "num_slides"),
        (dict(size_um=100.0), "size_um"),
        (dict(size_um=(500.0, 600.0, 700.0)), "size_um"),
        (dict(mpp=-0.25), "mpp"),
        (dict(seed=-1), "seed"),
        (dict(num_workers=0), "num_workers"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_demo_dataset(tmp_path / "bad", **({"num_slides": 1, "size_um": 500.0} | kwargs))
    assert not (tmp_path / "bad" / "manifest.csv").exists()


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import importlib.util as util

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_data.py"
    spec = util.spec_from_file_location("make_demo_data", script)
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "cli"
    argv = ["--output-dir", str(out), "--num-slides", "1", "--seed", "2", "--size-um", "500", "600"]
    assert module.main(argv) == 0
    printed = capsys.readouterr().out
    assert "manifest" in printed and "CRC_S01" in printed and " s" in printed
    assert (out / "manifest.csv").is_file() and (out / "CRC_S01" / "slide.tif").is_file()
    assert module.main(argv) == 2  # refuses the now non-empty folder
    assert "overwrite" in capsys.readouterr().err
    assert module.main([*argv, "--overwrite"]) == 0


# --- building blocks -------------------------------------------------------------------------------------------------
def test_spot_fractions_count_tissue_inside_the_disk() -> None:

    labels = np.full((200, 300), GLASS, dtype=np.int8)  # 1 um/px: glass | tumour | stroma, 100 um each
    labels[:, 100:200] = COMPARTMENTS.index("tumour")
    labels[:, 200:] = COMPARTMENTS.index("stroma")
    fractions, coverage = spot_fractions(labels, 1.0, np.array([100.0, 100.0, 100.0]), np.array([150.0, 200.0, 20.0]))
    tumour, stroma = COMPARTMENTS.index("tumour"), COMPARTMENTS.index("stroma")
    assert fractions[0, tumour] == 1.0 and coverage[0] == 1.0  # 55 um disk well inside the tumour band
    assert fractions[1, tumour] == pytest.approx(0.5, abs=0.03) and fractions[1, stroma] == pytest.approx(0.5, abs=0.03)
    assert np.all(fractions[2] == 0) and coverage[2] == 0.0  # on glass
    partial, partial_coverage = spot_fractions(labels, 1.0, np.array([100.0]), np.array([100.0]))
    assert partial_coverage[0] == pytest.approx(0.5, abs=0.03) and partial[0, tumour] == 1.0  # glass left out


def test_random_fields_and_raster_helpers() -> None:

    rng = np.random.default_rng(0)
    field = smooth_noise(rng, (300, 200), 20.0)
    assert field.shape == (300, 200) and field.dtype == np.float32
    assert abs(float(field.mean())) < 0.3 and 0.5 < float(field.std()) < 1.5
    assert np.abs(np.diff(field, axis=1)).mean() < 0.2  # smooth at the pixel scale
    np.testing.assert_allclose(smoothstep(0.0, 1.0, np.array([-1.0, 0.0, 0.5, 1.0, 2.0])), [0, 0, 0.5, 1, 1])
    y, x = jittered_grid(rng, 100.0, 150.0, 10.0, jitter=0.3)
    assert np.all((y >= 0) & (y < 100.0) & (x >= 0) & (x < 150.0))
    expected = 100.0 * 150.0 / (10.0 * 10.0 * np.sqrt(3.0) / 2.0)  # area over the area per hexagonal-grid point
    assert 0.8 * expected < y.size < 1.2 * expected
    grid = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(lookup(grid, np.array([0.5, 2.5, 99.0]), np.array([3.9, 0.1, -5.0]), 1.0), [3, 8, 8])
    target = np.zeros((20, 20), dtype=np.float32)
    stamp_disks(target, np.array([10.0, 0.0]), np.array([10.0, 19.0]), np.array([4.0, 3.0]), 0.8)
    assert target[10, 10] == pytest.approx(0.8) and target[10, 16] == 0.0 and target[0, 19] == pytest.approx(0.8)


def test_stain_model_and_nucleus_kernels() -> None:

    rng = np.random.default_rng(1)
    stains = StainModel.draw(rng, stain_jitter=0.0)
    glass = stains.lut[0].astype(int)
    assert np.all((glass >= 225) & (glass <= 252))
    haem_only, eosin_only = stains.lut[200 << 8].astype(int), stains.lut[200].astype(int)
    assert np.all(haem_only < glass) and haem_only[0] < haem_only[2]  # blue-purple: red absorbed most
    assert eosin_only[1] < eosin_only[0]  # pink: green absorbed more than red
    bank = nucleus_bank(rng, 0.25)
    kernels, n_orient, n_var = bank["fibroblast"]
    assert len(kernels) == n_orient * n_var
    horizontal = kernels[0]  # orientation bin 0: the long axis along x
    assert (horizontal > 0.3).any(axis=0).sum() > 2 * (horizontal > 0.3).any(axis=1).sum()
    target = np.zeros((40, 40), dtype=np.uint8)
    kernels8 = [stains.haem_levels(k) for k in bank["lymphocyte"][0]]
    stamp_nuclei(target, kernels8, np.array([20, 0, 100]), np.array([20, 39, 100]), np.array([0, 1, 2]))
    assert target[20, 20] > 100 and target[0, 39] > 0 and target[5:35, 5:35].sum() > 0


def test_counts_follow_depth_and_library_size() -> None:

    ids, names, programmes = demo_gene_table()
    profiles = expression_profiles(np.random.default_rng(0), np.random.default_rng(1), programmes, 0.15)
    assert profiles.shape == (len(COMPARTMENTS), len(ids))
    np.testing.assert_allclose(profiles.sum(axis=1), 1.0)
    fractions = np.zeros((400, len(COMPARTMENTS)))
    fractions[:200, COMPARTMENTS.index("tumour")] = 1.0
    fractions[200:, COMPARTMENTS.index("necrosis")] = 1.0
    counts = simulate_counts(np.random.default_rng(2), fractions, np.ones(400), profiles, 0.2, 0.01, 1.0)
    assert counts.dtype == np.int32 and counts.shape == (400, len(ids))
    assert counts[:200].sum(axis=1).mean() == pytest.approx(6000.0, rel=0.05)  # the tumour library size
    assert counts[200:].sum(axis=1).mean() == pytest.approx(500.0, rel=0.1)  # necrosis yields little RNA


def test_layout_and_histology_of_a_small_section() -> None:

    layout = simulate_layout(np.random.default_rng(3), (500, 600), 1.0)
    assert layout.labels.shape == layout.alpha.shape == layout.rho.shape == (500, 600)
    assert layout.labels.min() >= -1 and layout.labels.max() < len(COMPARTMENTS)
    assert np.all((layout.alpha >= 0) & (layout.alpha <= 1)) and np.all((layout.labels == -1) == (layout.alpha <= 0.5))
    assert len({len(v) for v in layout.seeds.values()}) == 1 and layout.seeds["kind"][-1] == 3  # placeholder last
    image, num_nuclei = render_histology(np.random.default_rng(4), layout, 0.5, 2)
    assert image.shape == (1000, 1200, 3) and image.dtype == np.uint8 and num_nuclei > 100
    glass = np.repeat(np.repeat(layout.labels == -1, 2, axis=0), 2, axis=1)
    if glass.any():
        assert image[glass].mean() > image[~glass].mean()  # glass is brighter than stained tissue


def test_atomic_writes_make_ordinary_files(tmp_path: Path) -> None:
    assert csv_text(("a", "b"), [[1, "x,y"]]) == 'a,b\n1,"x,y"\n'
    path = write_text(tmp_path / "notes.txt", "hello")
    assert path.read_text() == "hello"
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not the private mode of a temporary file

    def fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_atomic(tmp_path / "broken.txt", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
