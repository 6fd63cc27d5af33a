"""The data layer on real Space Ranger / h5ad files and on the demo study: readers, dataset building, bad inputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from bundle.geometry import hex_neighbors, radius_neighbors, spot_neighbors
from bundle.io.dataset import prepare_dataset, read_manifest
from bundle.io.gene_panel import check_gene_panel, load_gene_panel
from bundle.io.spots import check_counts, library_sizes, log_normalize, read_hest_metadata, read_spaceranger
from bundle.transforms import LoadExpressiond, LoadWSIPatchd, NormalizeExpression, SpatialContextd
from tests.helpers import ROOT, demo_rows, realdata, write_manifest


def test_real_spaceranger_folder_loads_in_xy_order():
    folder = realdata("visium_human_spaceranger1")
    adata = read_spaceranger(folder)
    assert adata.shape == (100, 100)
    positions = {}
    with (folder / "spatial" / "tissue_positions_list.csv").open() as f:
        for barcode, _, _, _, pxl_row, pxl_col in csv.reader(f):
            positions[barcode] = (int(pxl_col), int(pxl_row))
    for barcode, (x, y) in zip(adata.obs_names[:20], adata.obsm["spatial"][:20]):
        assert (int(x), int(y)) == positions[barcode]  # obsm["spatial"] = (column, row)
    assert {"in_tissue", "array_row", "array_col"} <= set(adata.obs.columns)


def test_visium_h5_without_library_ids_gets_a_clear_error():
    with pytest.raises(ValueError, match="no `library_ids` attribute.*Space Ranger writes it"):
        read_spaceranger(realdata("visium_malformed"))


def test_hex_neighbors_on_lattice():
    rows = np.array([0, 0, 0, 1, 1, 2])
    cols = np.array([0, 2, 4, 1, 3, 2])
    nb = hex_neighbors(rows, cols)
    assert set(nb[4]) - {-1} == {1, 2, 3, 5}  # (1,3) touches (1,1), (0,2), (0,4), (2,2); (1,5), (2,4) absent
    assert set(nb[0]) - {-1} == {1, 3}


def test_spot_neighbors_use_the_lattice_else_the_positions():
    rows, cols = np.array([0, 0, 1, 5]), np.array([0, 2, 1, 9])
    xy = np.array([[0.0, 0.0], [100.0, 0.0], [50.0, 86.6], [300.0, 300.0]])
    lattice = spot_neighbors(rows, cols, xy, radius=1.0)  # array coordinates win over positions
    assert np.array_equal(lattice, hex_neighbors(rows, cols))
    positions = spot_neighbors(xy=xy, radius=125.0)
    assert np.array_equal(positions, radius_neighbors(xy, radius=125.0))
    assert set(positions[0]) - {-1} == {1, 2} and set(positions[3]) == {-1}
    assert spot_neighbors(radius=125.0) is None  # nothing locates the spots


def test_counts_library_sizes_and_normalisation():
    from scipy import sparse

    counts = sparse.csr_matrix(np.array([[1, 0, 3], [0, 0, 0]]))
    library = library_sizes(counts)
    assert library.tolist() == [4, 0]
    # the panel (first gene) normalised by the total over all genes; an empty spot divides by 1
    assert np.allclose(log_normalize(counts[:, [0]], library, 1e4), np.log1p([[1e4 / 4], [0.0]]))
    check_counts(counts.data)
    with pytest.raises(ValueError, match=r"sample 'x' has non-integer values.*not raw counts.*use the layer"):
        check_counts(np.array([1.0, 2.5]), "sample 'x'", remedy="use the layer")


def test_prepare_demo_dataset(demo_root, demo_dataset):
    datalist = json.loads((demo_dataset / "datalist.json").read_text())
    panel = json.loads((demo_dataset / "gene_panel.json").read_text())
    summary = json.loads((demo_dataset / "qc_summary.json").read_text())
    expression = np.load(demo_dataset / "expression.npy", mmap_mode="r")
    counts = np.load(demo_dataset / "counts.npy", mmap_mode="r")
    genes = panel["genes"]
    assert len(genes) == 48 and panel["selection"]["method"] == "highly_variable_genes"
    assert panel["normalization"]["target_sum"] == 1e4
    assert len(datalist["training"]) > 0 and len(datalist["validation"]) > 0
    entries = datalist["training"] + datalist["validation"]
    assert expression.shape == counts.shape == (len(entries), 48)
    assert summary["total_kept"] == len(entries)
    for s in summary["samples"].values():
        assert s["kept"] + s["not_in_tissue"] + s["too_few_counts"] + s["patch_leaves_slide"] == s["spots"]
        assert s["mpp"] == pytest.approx(0.25) and s["mpp_source"] == "manifest"  # the demo manifest gives mpp
    # the filtered Space Ranger matrix holds only in-tissue spots, as the ground truth counts them
    for sid, s in summary["samples"].items():
        truth = list(csv.DictReader((demo_root / sid / "ground_truth.csv").open()))
        assert s["spots"] == sum(int(t["in_tissue"]) for t in truth)
    # splits are by sample: no sample on both sides
    assert not {e["sample"] for e in datalist["training"]} & {e["sample"] for e in datalist["validation"]}
    # stored expression = log1p(normalize_total) of the counts with the spot's full library size
    e = entries[7]
    expected = NormalizeExpression()(counts[e["expression"]], e["library_size"])
    np.testing.assert_allclose(expression[e["expression"]], expected.numpy(), rtol=1e-5, atol=1e-5)
    # neighbours are spots of the same sample one lattice step (100 um) away
    by_row = {x["expression"]: x for x in entries}
    checked = 0
    for x in entries[:50]:
        for nb in x["neighbors"]:
            if nb >= 0:
                other = by_row[nb]
                assert other["sample"] == x["sample"]
                dist_um = np.hypot(*(np.subtract(other["location"], x["location"]))) * x["mpp"]
                assert dist_um == pytest.approx(100.0, rel=0.02)
                checked += 1
    assert checked > 50
    # highly variable genes = the compartment programmes, not the patternless background genes
    from bundle.demo import BACKGROUND_GENES, GENE_PROGRAMMES

    represented = [p for p, members in GENE_PROGRAMMES.items() if set(members) & set(genes)]
    assert len(represented) >= len(GENE_PROGRAMMES) - 2, represented  # 48 genes: most programmes, not necessarily all
    assert len(set(BACKGROUND_GENES) & set(genes)) <= 2


@pytest.mark.parametrize("backend", ["cucim", "openslide", "tifffile"])
def test_demo_round_trip_through_loader(demo_dataset, backend):
    from bundle.io.slides import available_backends

    if backend not in available_backends():
        pytest.skip(f"{backend} is not installed")
    entry = json.loads((demo_dataset / "datalist.json").read_text())["training"][3]
    store = demo_dataset / "expression.npy"
    out = LoadWSIPatchd("image", fov_um=64.0, size=16, backend=backend)(entry)
    out = SpatialContextd("expression", store)(LoadExpressiond("expression", store)(out))
    assert out["image"].shape == (3, 16, 16) and out["image"].meta["level"] > 0  # 4 um/px comes from a coarse level
    assert out["expression"].shape == (7, 48) and out["expression"].dtype == torch.float32
    assert out["barcode"] == entry["barcode"] and out["sample"] == entry["sample"]
    assert out["image"].float().std() > 3  # tissue, not padding
    # a full-resolution read of the same spot agrees with the level-0 slide pixels
    x, y = (int(round(v)) for v in entry["location"])
    level0 = tifffile.imread(entry["image"], key=0)
    patch = LoadWSIPatchd("image", fov_um=8.0, size=32, backend=backend)(entry)["image"]
    expected = level0[y - 16 : y + 16, x - 16 : x + 16]
    assert np.abs(patch.permute(1, 2, 0).numpy().astype(int) - expected.astype(int)).mean() < 1.0


def test_explicit_gene_panel_and_absent_genes(demo_root, tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", demo_rows(demo_root))
    panel = ["EPCAM", "KRT20", "COL1A1", "PTPRC", "ADIPOQ", "CA9"]
    prepare_dataset(manifest, tmp_path / "ok", fov_um=64.0, genes=panel, verbose=False)
    assert load_gene_panel(tmp_path / "ok" / "gene_panel.json") == panel
    with pytest.raises(ValueError, match=r"absent from sample 'CRC_S01'.*\['NOTAGENE1', 'EPCAMX'\]"):
        prepare_dataset(manifest, tmp_path / "bad", genes=["EPCAM", "NOTAGENE1", "EPCAMX"], verbose=False)
    assert not (tmp_path / "bad").exists()


def test_wrong_pixel_size_is_reported(demo_root, tmp_path):
    rows = demo_rows(demo_root)
    rows[0]["mpp"] = "0.5"  # the demo slides are 0.25 um/px
    manifest = write_manifest(tmp_path / "m.csv", rows)
    with pytest.raises(ValueError, match=r"pixel size 0.5 um/px \(manifest\) contradicts the spot pitch.*0.25 um/px"):
        prepare_dataset(manifest, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()


def test_spots_outside_the_slide_are_counted(tmp_path):
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
    with pytest.raises(ValueError, match=r"\d+ of 100 in-tissue spot centres lie outside the slide.*2220 x 2967"):
        prepare_dataset(manifest, tmp_path / "out", spot_spacing_um=None, verbose=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.csv"]  # no staging folder left behind


def test_non_count_data_and_missing_pixel_size(tmp_path):
    image = np.asarray(Image.open(realdata("visium_mouse_brain_he", "test_img.jpg")).convert("RGB"))
    slide = tmp_path / "mouse.tif"
    tifffile.imwrite(slide, image, tile=(256, 256), photometric="rgb")  # no resolution tags
    row = {
        "sample_id": "mouse",
        "st_path": str(realdata("visium_mouse_brain_he", "test_data.h5ad")),
        "slide_path": str(slide),
    }
    manifest = write_manifest(tmp_path / "m.csv", [row])
    with pytest.raises(ValueError, match=r"sample 'mouse'.*non-integer values.*not raw counts"):
        prepare_dataset(manifest, tmp_path / "out", verbose=False)
    # counts present (layer) but no pixel size anywhere
    import anndata

    adata = anndata.read_h5ad(row["st_path"])
    adata.layers["counts"] = np.round(np.expm1(adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X) * 3)
    h5ad = tmp_path / "mouse_counts.h5ad"
    adata.write_h5ad(h5ad)
    manifest = write_manifest(tmp_path / "m2.csv", [{**row, "st_path": str(h5ad), "layer": "counts"}])
    with pytest.raises(ValueError, match=r"no pixel size.*never guessed"):
        prepare_dataset(manifest, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()


def test_hest_sample_takes_pixel_size_from_metadata(demo_root, tmp_path):
    rows = demo_rows(demo_root)
    adata = read_spaceranger(rows[0]["st_path"])
    adata.uns.pop("spatial")
    h5ad = tmp_path / "st" / "CRC_S01.h5ad"
    h5ad.parent.mkdir()
    adata.write_h5ad(h5ad)
    slide = tmp_path / "wsis" / "CRC_S01.tif"
    slide.parent.mkdir()
    # a slide without resolution tags: only the HEST metadata knows the pixel size
    tifffile.imwrite(slide, tifffile.imread(rows[0]["slide_path"], key=0), tile=(256, 256), photometric="rgb")
    meta = tmp_path / "metadata" / "CRC_S01.json"
    meta.parent.mkdir()
    meta.write_text(json.dumps({"pixel_size_um_embedded": None, "pixel_size_um_estimated": 0.25, "spot_diameter": 220}))
    assert read_hest_metadata(meta)["mpp"] == 0.25
    manifest = write_manifest(
        tmp_path / "hest.csv",
        [
            {
                "sample_id": "CRC_S01",
                "st_path": "st/CRC_S01.h5ad",
                "slide_path": "wsis/CRC_S01.tif",
                "metadata_path": "metadata/CRC_S01.json",
            }
        ],
    )
    summary = prepare_dataset(manifest, tmp_path / "out", fov_um=64.0, n_top_genes=16, verbose=False)
    assert summary["samples"]["CRC_S01"]["mpp_source"] == "hest:pixel_size_um_estimated"
    assert summary["samples"]["CRC_S01"]["kept"] > 20


def test_manifest_errors(demo_root, tmp_path):
    rows = demo_rows(demo_root)
    bad = tmp_path / "bad.csv"
    bad.write_text("sample_id,slide_path\nA,x.tif\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['st_path'\]"):
        read_manifest(bad)
    with pytest.raises(ValueError, match="one patient's samples in several splits"):
        read_manifest(
            write_manifest(
                tmp_path / "leak.csv",
                [{**rows[0], "patient": "P1", "split": "train"}, {**rows[1], "patient": "P1", "split": "val"}],
            )
        )
    with pytest.raises(ValueError, match="split 'validation'"):
        read_manifest(write_manifest(tmp_path / "split.csv", [{**rows[0], "split": "validation"}]))
    with pytest.raises(FileNotFoundError, match="slide_path 'missing.tif'"):
        read_manifest(write_manifest(tmp_path / "missing.csv", [{**rows[0], "slide_path": "missing.tif"}]))
    with pytest.raises(ValueError, match="appears twice"):
        read_manifest(write_manifest(tmp_path / "dup.csv", [rows[0], rows[0]]))


def test_existing_dataset_is_not_overwritten(demo_dataset, tmp_path):
    before = (demo_dataset / "datalist.json").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare_dataset(tmp_path / "unused.csv", demo_dataset, verbose=False)
    assert (demo_dataset / "datalist.json").read_bytes() == before


def test_check_gene_panel_names_differences():
    check_gene_panel(["A", "B"], ["A", "B"])
    with pytest.raises(ValueError, match=r"missing \['B'\], unexpected \['C'\]"):
        check_gene_panel(["A", "B"], ["A", "C"], what="checkpoint")
    with pytest.raises(ValueError, match="different order"):
        check_gene_panel(["A", "B"], ["B", "A"])


def test_prepare_dataset_cli(demo_root, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "prepare_dataset.py"),
            "--manifest",
            str(demo_root / "manifest.csv"),
            "--output-dir",
            str(out),
            "--fov-um",
            "64",
            "--n-top-genes",
            "32",
            "--backend",
            "tifffile",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "not_in_tissue" in result.stdout and "kept" in result.stdout
    assert len(load_gene_panel(out / "gene_panel.json")) == 32
