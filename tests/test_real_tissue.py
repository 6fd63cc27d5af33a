"""Real tissue as a first-class input: legacy ST sections (her2st), HEST samples, plain-image slides, spot geometry
from the technology, pixel sizes fitted from the array, and the refusals of inconsistent inputs.

Runs on small real crops of the shared her2st sections (``her2st_root`` fixture: C2 and C5, 49 spots each).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from bundle.geometry import SQUARE_OFFSETS, fit_pixel_size, get_technology, lattice_neighbors, lattice_offsets
from bundle.io.dataset import dataset_num_neighbors, prepare_dataset, read_manifest
from bundle.io.legacy_st import read_legacy_st
from bundle.io.spots import read_spots
from tests.helpers import write_manifest

# her2st: 200 um between spots at about 0.688 um/px (HEST-1k estimates 0.669-0.698 for these sections)
HER2ST_MPP = 0.688
QUICK = {"fov_um": 128.0, "n_top_genes": 32, "min_counts": 100, "verbose": False}


def her2st_rows(root: Path, **changes) -> list[dict]:
    """Manifest rows of the two cropped sections: C2 trains, C5 validates (patients kept apart)."""
    rows = []
    for section, split in (("C2", "train"), ("C5", "val")):
        folder = root / section
        rows.append(
            {
                "sample_id": section,
                "st_path": str(folder),
                "slide_path": str(next(folder.glob("*.jpg"))),
                "split": split,
                **changes,
            }
        )
    return rows


def copy_section(root: Path, section: str, dest: Path) -> Path:
    target = dest / section
    shutil.copytree(root / section, target)
    return target


@pytest.fixture(scope="module")
def her2st_dataset(her2st_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("her2st_dataset")
    manifest = write_manifest(out / "m.csv", her2st_rows(her2st_root))
    prepare_dataset(manifest, out / "dataset", **QUICK)
    return out


# --------------------------------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [("Visium", "visium"), ("Spatial Transcriptomics", "st"), ("legacy_st", "st"), ("Visium HD", "visium_hd")],
)
def test_technology_names_from_manifests_and_hest(name, expected):
    assert get_technology(name).name == expected
    assert get_technology(None).name == "visium"


def test_unknown_technology_names_the_known_ones():
    with pytest.raises(ValueError, match=r"'slide-seq' is not a spot technology.*\['st', 'visium', 'visium_hd'"):
        get_technology("slide-seq")


@pytest.mark.parametrize("name, mpp", [("visium", 0.2738), ("st", 0.6881)])
@pytest.mark.parametrize("angle, mirror", [(0.0, False), (0.3, True)])
def test_pixel_size_fit_recovers_a_rotated_mirrored_lattice(name, mpp, angle, mirror):
    technology = get_technology(name)
    rows, cols = np.meshgrid(np.arange(8), np.arange(0, 16, 2 if name == "visium" else 1), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    if name == "visium":
        cols = cols + rows % 2  # hex lattice: odd rows shifted by one column
    um = technology.array_to_um(rows, cols)
    if mirror:
        um[:, 0] = -um[:, 0]
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pixels = um @ rotation.T / mpp + [1000.0, 2000.0]
    fit = fit_pixel_size(rows, cols, pixels[:, 0], pixels[:, 1], technology)
    assert fit.mpp == pytest.approx(mpp, rel=1e-6) and fit.residual_um < 1e-6 and fit.outliers == 0
    other = get_technology("st" if name == "visium" else "visium")
    assert fit_pixel_size(rows, cols, pixels[:, 0], pixels[:, 1], other).residual_um > 0.2 * other.pitch_um


def test_square_lattice_has_eight_neighbours_and_offsets():
    rows, cols = np.meshgrid(np.arange(3), np.arange(3), indexing="ij")
    neighbors = lattice_neighbors(rows.ravel(), cols.ravel(), SQUARE_OFFSETS)
    assert neighbors.shape == (9, 8)
    assert (neighbors[4] >= 0).all() and (neighbors[0] >= 0).sum() == 3  # centre: all 8; corner: 3
    offsets = lattice_offsets(np.zeros((1, 2)), pitch_um=200.0, num_neighbors=8)
    assert np.allclose(np.hypot(*offsets.T), [200] * 4 + [200 * math.sqrt(2)] * 4)
    with pytest.raises(ValueError, match="6 \\(hex lattice\\) or 8 \\(square lattice\\)"):
        lattice_offsets(np.zeros((1, 2)), pitch_um=200.0, num_neighbors=4)


# --------------------------------------------------------------------------------------------------------------------
# legacy ST sections
# --------------------------------------------------------------------------------------------------------------------


def test_legacy_st_section_reads_like_a_visium_sample(her2st_root):
    folder = her2st_root / "C5"
    adata = read_legacy_st(folder)
    assert adata.n_obs == 49 and adata.n_vars > 15000 and adata.uns["technology"] == "st"
    assert {"in_tissue", "array_row", "array_col", "array_row_fit", "array_col_fit"} <= set(adata.obs.columns)
    name = adata.obs_names[0]
    x, y = (int(v) for v in name.split("x"))
    assert (adata.obs["array_col"].iloc[0], adata.obs["array_row"].iloc[0]) == (x, y)
    assert np.allclose(read_legacy_st(folder / "C5.tsv.gz").obsm["spatial"], adata.obsm["spatial"])


def test_prepared_sections_have_estimated_pixel_size_and_square_neighbours(her2st_dataset):
    dataset = her2st_dataset / "dataset"
    summary = json.loads((dataset / "qc_summary.json").read_text())
    for section in ("C2", "C5"):
        record = summary["samples"][section]
        assert record["mpp_source"] == "estimated" and record["technology"] == "st"
        assert record["mpp"] == pytest.approx(HER2ST_MPP, rel=0.01)
        assert record["mpp_fit"]["residual_um"] < 10.0 and record["num_neighbors"] == 8
        assert record["on_background"] == 0 and record["kept"] >= 45
    datalist = json.loads((dataset / "datalist.json").read_text())
    entries = datalist["training"] + datalist["validation"]
    assert all(len(e["neighbors"]) == 8 for e in entries)
    assert max(sum(n >= 0 for n in e["neighbors"]) for e in entries) == 8  # inner spots have all 8
    assert dataset_num_neighbors(dataset) == 8
    assert dataset_num_neighbors(dataset / "absent") == 6  # no dataset yet: the default network (model-zoo checks)
    # the JPEGs were converted once, beside the dataset, and the datalist points at the TIFFs
    slides = {e["image"] for e in entries}
    assert all(Path(s).suffix == ".tif" and Path(s).parent == her2st_dataset / "dataset_slides" for s in slides)


def test_converted_slides_are_reused(her2st_root, her2st_dataset, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in (her2st_dataset / "dataset_slides").glob("*.tif")}
    manifest = write_manifest(tmp_path / "m.csv", her2st_rows(her2st_root))
    prepare_dataset(manifest, tmp_path / "again", slide_cache_dir=her2st_dataset / "dataset_slides", **QUICK)
    after = {p.name: p.stat().st_mtime_ns for p in (her2st_dataset / "dataset_slides").glob("*.tif")}
    assert after == before and len(after) == 2


def test_generation_reads_a_legacy_st_section_with_its_lattice(her2st_root, her2st_dataset):
    genes = json.loads((her2st_dataset / "dataset" / "gene_panel.json").read_text())["genes"]
    spots = read_spots(her2st_root / "C5", genes)
    assert spots.neighbors.shape == (49, 8)
    pitch = np.median(np.sort(np.hypot(*(spots.positions_um[:, None] - spots.positions_um[None]).T), axis=0)[1])
    # positions in micrometres, from the fitted pixel size (the printed array is not perfectly regular: the adjusted
    # positions new_x/new_y place neighbours 180-200 um apart)
    assert pitch == pytest.approx(200.0, rel=0.1)


def test_patient_split_is_enforced_unless_split_by_sample(her2st_root, tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", her2st_rows(her2st_root, patient="C"))
    with pytest.raises(ValueError, match=r"one patient's samples in several splits \{'C': \['train', 'val'\]\}"):
        read_manifest(manifest)
    assert len(read_manifest(manifest, split_by="sample")) == 2


def test_min_spot_fraction_and_included_genes(her2st_dataset, her2st_root, tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", her2st_rows(her2st_root))
    options = {**QUICK, "min_spot_fraction": 0.5, "include_genes": ["ERBB2", "PTPRC"]}
    prepare_dataset(manifest, tmp_path / "out", **options)
    panel = json.loads((tmp_path / "out" / "gene_panel.json").read_text())
    assert panel["selection"]["min_spot_fraction"] == 0.5 and {"ERBB2", "PTPRC"} <= set(panel["genes"])
    counts = np.load(tmp_path / "out" / "counts.npy")
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    train = [e["expression"] for e in datalist["training"]]
    selected = [i for i, g in enumerate(panel["genes"]) if g not in panel["selection"].get("included", [])]
    assert ((counts[train][:, selected] > 0).mean(axis=0) >= 0.5).all()


# --------------------------------------------------------------------------------------------------------------------
# HEST samples
# --------------------------------------------------------------------------------------------------------------------


def write_hest_sample(root: Path, section_folder: Path, sample_id: str, meta_changes: dict | None = None) -> None:
    """A HEST-1k sample (st/<id>.h5ad, wsis/<id>.tif, metadata/<id>.json) made from a real cropped section."""
    from PIL import Image

    from bundle.io.tiff import write_pyramidal_tiff

    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    adata = read_legacy_st(section_folder)
    del adata.uns["technology"]  # HEST's h5ad names no technology; the metadata does
    adata.write_h5ad(root / "st" / f"{sample_id}.h5ad")
    image = np.asarray(Image.open(next(section_folder.glob("*.jpg"))).convert("RGB"))
    write_pyramidal_tiff(root / "wsis" / f"{sample_id}.tif", image, mpp=HER2ST_MPP, min_level_size=512)
    meta = {
        "id": sample_id,
        "st_technology": "Spatial Transcriptomics",
        "pixel_size_um_embedded": None,
        "pixel_size_um_estimated": 0.6887,
        "spot_diameter": 100,
        "inter_spot_dist": 200,
        "patient": "Patient C",
        **(meta_changes or {}),
    }
    (root / "metadata" / f"{sample_id}.json").write_text(json.dumps(meta))


def test_hest_root_and_sample_id_are_enough(her2st_root, tmp_path):
    hest = tmp_path / "hest"
    write_hest_sample(hest, her2st_root / "C2", "SPA141")
    write_hest_sample(hest, her2st_root / "C5", "SPA138")
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["sample_id", "hest_root", "split"], ["SPA141", "hest", "train"], ["SPA138", "hest", "val"]])
    summary = prepare_dataset(manifest, tmp_path / "out", **QUICK)
    record = summary["samples"]["SPA138"]
    assert record["technology"] == "st" and record["num_neighbors"] == 8
    assert record["mpp_source"] == "hest:pixel_size_um_estimated" and record["mpp"] == pytest.approx(0.6887)
    assert record["mpp_fit"]["mpp"] == pytest.approx(HER2ST_MPP, rel=0.01)


def test_hest_metadata_of_another_sample_is_refused(her2st_root, tmp_path):
    hest = tmp_path / "hest"
    write_hest_sample(hest, her2st_root / "C2", "SPA141", {"id": "SPA140"})
    manifest = write_manifest(tmp_path / "m.csv", [])
    manifest.write_text("sample_id,hest_root\nSPA141,hest\n")
    with pytest.raises(ValueError, match=r"metadata/SPA141.json' describes sample 'SPA140'.*given for sample 'SPA141'"):
        prepare_dataset(manifest, tmp_path / "out", **QUICK)
    assert not (tmp_path / "out").exists()


def test_hest_root_without_the_sample_names_the_missing_file(tmp_path):
    (tmp_path / "hest").mkdir()
    (tmp_path / "m.csv").write_text("sample_id,hest_root\nTENX95,hest\n")
    with pytest.raises(FileNotFoundError, match=r"HEST root .* has no st/TENX95.h5ad"):
        read_manifest(tmp_path / "m.csv")


# --------------------------------------------------------------------------------------------------------------------
# refusals: each names the file and the fix, and leaves nothing half-written
# --------------------------------------------------------------------------------------------------------------------


def assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "out_slides").glob("*.tif")) if (tmp_path / "out_slides").exists() else True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging folder


def test_counts_that_match_no_selection_row_are_refused(her2st_root, tmp_path):
    folder = copy_section(her2st_root, "C5", tmp_path)
    selection = folder / "C5_selection.tsv"
    lines = selection.read_text().splitlines()
    header, rows = lines[0], [r.split("\t") for r in lines[1:]]
    for r in rows:  # move every spot of the selection to other array positions
        r[0], r[1] = str(int(r[0]) + 100), str(int(r[1]) + 100)
    selection.write_text("\n".join([header] + ["\t".join(r) for r in rows]) + "\n")
    row = {**her2st_rows(her2st_root)[1], "st_path": str(folder), "split": "train"}
    with pytest.raises(ValueError, match=r"None of the 49 spots of the counts table .*C5.tsv.gz.* matches a row of"):
        prepare_dataset(write_manifest(tmp_path / "m.csv", [row]), tmp_path / "out", **QUICK)
    assert_nothing_written(tmp_path)


def test_selection_without_pixel_columns_is_refused(her2st_root, tmp_path):
    folder = copy_section(her2st_root, "C5", tmp_path)
    import pandas as pd

    table = pd.read_csv(folder / "C5_selection.tsv", sep="\t").drop(columns=["pixel_x", "pixel_y"])
    table.to_csv(folder / "C5_selection.tsv", sep="\t", index=False)
    row = {**her2st_rows(her2st_root)[1], "st_path": str(folder), "split": "train"}
    with pytest.raises(ValueError, match=r"C5_selection.tsv' lacks the column\(s\) \['pixel_x', 'pixel_y'\]"):
        prepare_dataset(write_manifest(tmp_path / "m.csv", [row]), tmp_path / "out", **QUICK)
    assert_nothing_written(tmp_path)


def test_pixel_size_that_contradicts_the_pitch_is_refused(her2st_root, tmp_path):
    rows = her2st_rows(her2st_root, mpp="0.5")  # a 20x guess; the array says 0.688
    with pytest.raises(
        ValueError, match=r"pixel size 0.5 um/px \(manifest\) contradicts the spot pitch.*0.68\d+ um/px"
    ):
        prepare_dataset(write_manifest(tmp_path / "m.csv", rows), tmp_path / "out", **QUICK)
    assert_nothing_written(tmp_path)
    rows = her2st_rows(her2st_root, mpp="0.69")  # within 5%: accepted as given
    summary = prepare_dataset(write_manifest(tmp_path / "m2.csv", rows), tmp_path / "ok", **QUICK)
    assert summary["samples"]["C5"]["mpp_source"] == "manifest" and summary["samples"]["C5"]["mpp"] == 0.69


def test_truncated_jpeg_is_refused(her2st_root, tmp_path):
    folder = copy_section(her2st_root, "C5", tmp_path)
    jpeg = next(folder.glob("*.jpg"))
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: len(data) // 2])
    row = {**her2st_rows(her2st_root)[1], "st_path": str(folder), "slide_path": str(jpeg), "split": "train"}
    with pytest.raises(ValueError, match=r"5714_HE_BT_E1.jpg' cannot be decoded .*truncated or corrupt"):
        prepare_dataset(write_manifest(tmp_path / "m.csv", [row]), tmp_path / "out", **QUICK)
    assert_nothing_written(tmp_path)


def test_unknown_technology_in_the_manifest_is_refused(her2st_root, tmp_path):
    rows = her2st_rows(her2st_root, technology="slide-seq")
    with pytest.raises(
        ValueError, match=r"m.csv line 2: technology of sample 'C2' 'slide-seq' is not a spot technology"
    ):
        read_manifest(write_manifest(tmp_path / "m.csv", rows))


def test_wrong_technology_shows_as_spots_off_the_lattice(her2st_root, tmp_path):
    rows = her2st_rows(her2st_root, technology="visium")
    with pytest.raises(ValueError, match=r"Sample 'C2': the spots do not lie on a visium array \(hex lattice"):
        prepare_dataset(write_manifest(tmp_path / "m.csv", rows), tmp_path / "out", **QUICK)
    assert_nothing_written(tmp_path)


def test_hest_manifest_splits_by_patient(her2st_root, tmp_path):
    from bundle.io.hest import split_patients, write_hest_manifest

    hest = tmp_path / "hest"
    for i, (section, patient) in enumerate((("C2", "Patient C"), ("C5", "Patient C"), ("C2", "Patient D"))):
        write_hest_sample(hest, her2st_root / section, f"SPA{130 + i}", {"patient": patient})
    splits = write_hest_manifest(hest, ["SPA130", "SPA131", "SPA132"], tmp_path / "m.csv", 0.5, 0.0, seed=1)
    assert splits["SPA130"] == splits["SPA131"] and {splits["SPA130"], splits["SPA132"]} == {"train", "val"}
    rows = read_manifest(tmp_path / "m.csv")  # patients kept apart: accepted with the default split_by
    assert [r.technology for r in rows] == ["Spatial Transcriptomics"] * 3
    assert rows[0].slide_path == (hest / "wsis" / "SPA130.tif").resolve()
    with pytest.raises(ValueError, match=r"1 patient\(s\) cannot be split into training, 1 validation"):
        split_patients(["P1", "P1"], 0.5, 0.0, seed=0)
    with pytest.raises(FileNotFoundError, match=r"HEST sample 'SPA999' has no metadata file"):
        write_hest_manifest(hest, ["SPA999"], tmp_path / "x.csv")


def test_min_spot_fraction_out_of_range_or_too_strict_is_refused(her2st_root, tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", her2st_rows(her2st_root))
    with pytest.raises(ValueError, match=r"min_spot_fraction must be a share in \[0, 1\), got 1.5"):
        prepare_dataset(manifest, tmp_path / "a", **{**QUICK, "min_spot_fraction": 1.5})
    with pytest.raises(ValueError, match=r"only \d+ genes are detected in at least 99% of the training spots"):
        prepare_dataset(manifest, tmp_path / "b", **{**QUICK, "n_top_genes": 2000, "min_spot_fraction": 0.99})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_lattice_offsets_refuse_neighbours_of_another_lattice():
    positions = np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"neighbors must be \(3, 8\) indices"):
        lattice_offsets(positions, np.full((3, 6), -1), pitch_um=200.0, num_neighbors=8)
