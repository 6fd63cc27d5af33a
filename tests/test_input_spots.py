"""Spot and count readers on real files and broken copies of them (issue 11, items 4, 6, 8, 9, 10): probe-level
Space Ranger matrices, truncated HDF5 files, empty or incomplete ``spatial/`` folders, the ``library_ids`` fix, NaN
counts."""

from __future__ import annotations

import csv
import hashlib
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from bundle.io.dataset import prepare_dataset
from bundle.io.spots import get_counts, read_spaceranger, read_spots, read_st
from tests.helpers import realdata

HUMAN = "visium_human_spaceranger1"


def copy_folder(name: str, tmp_path: Path) -> Path:
    """A writable copy of a shared real-data folder."""
    target = tmp_path / name
    shutil.copytree(realdata(name), target)
    for p in [target, *target.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)
    return target


def write_manifest(path: Path, st_path: Path, **extra: str) -> Path:
    """A one-sample manifest pairing ``st_path`` with the real CMU-1 slide (spots are read before the slide)."""
    row = {"sample_id": "s1", "st_path": str(st_path), "slide_path": str(realdata("slides", "cmu-1-small-region.svs"))}
    row.update(extra)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    return path


def gene_panel(folder: Path, n: int = 5) -> list[str]:
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "r") as f:
        return [v.decode() for v in f["matrix/features/name"][:n]]


# ----------------------------------------------------------------------------------------------------------------------
# item 4: probe-level matrices
# ----------------------------------------------------------------------------------------------------------------------


def _fixed(values) -> np.ndarray:
    encoded = [str(v).encode("ascii") for v in values]
    return np.array(encoded, dtype=f"S{max(len(v) for v in encoded)}")


def write_probe_matrix(gene_h5: Path, probe_h5: Path) -> dict:
    """Rewrite a real gene-level 10x HDF5 as a Space Ranger 2.1 probe-level matrix (``raw_probe_bc_matrix.h5``).

    Every gene gets two probes (``GENE_ID|GENE_NAME|hash`` ids, ``GENE_NAME|hash`` names) that split its counts; every
    third gene also gets a probe that Space Ranger filtered out (``filtered_probes`` false) with 7 counts in every
    spot, which must not reach the gene. Returns the original gene counts (spots x genes) and names, and the probe
    names.
    """
    from scipy import sparse

    with h5py.File(gene_h5, "r") as f:
        m = f["matrix"]
        n_genes, n_spots = m["shape"][()]
        genes = sparse.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=(n_genes, n_spots))
        barcodes = m["barcodes"][()]
        gene_ids = [v.decode() for v in m["features/id"][()]]
        gene_names = [v.decode() for v in m["features/name"][()]]
        attrs = dict(f.attrs)
    dense = genes.toarray().astype(np.int64)  # genes x spots
    rows, probe = [], {k: [] for k in ("gene_id", "gene_name", "id", "name", "probe_region", "filtered_probes")}
    for g, (gid, name) in enumerate(zip(gene_ids, gene_names)):
        halves = [(dense[g] + 1) // 2, dense[g] // 2]
        parts = [(halves[0], True), (halves[1], True)] + ([(np.full(n_spots, 7), False)] if g % 3 == 0 else [])
        for k, (values, kept) in enumerate(parts):
            digest = hashlib.sha1(f"{gid}{k}".encode()).hexdigest()[:7]
            probe["gene_id"].append(gid)
            probe["gene_name"].append(name)
            probe["id"].append(f"{gid}|{name}|{digest}")
            probe["name"].append(f"{name}|{digest}")
            probe["probe_region"].append("spliced" if k == 0 else "unspliced")
            probe["filtered_probes"].append(kept)
            rows.append(values)
    probes = sparse.csc_matrix(np.stack(rows))  # probes x spots, CSC = one column per barcode
    with h5py.File(probe_h5, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=barcodes)
        m.create_dataset("filtered_barcodes", data=np.ones(n_spots, dtype=bool))
        m.create_dataset("data", data=probes.data.astype(np.int32))
        m.create_dataset("indices", data=probes.indices.astype(np.int64))
        m.create_dataset("indptr", data=probes.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array(probes.shape, dtype=np.int32))
        features = m.create_group("features")
        n = len(probe["id"])
        features.create_dataset("genome", data=_fixed(["GRCh38"] * n))
        features.create_dataset("feature_type", data=_fixed(["Gene Expression"] * n))
        for key in ("gene_id", "gene_name", "id", "name", "probe_region"):
            features.create_dataset(key, data=_fixed(probe[key]))
        features.create_dataset("filtered_probes", data=np.array(probe["filtered_probes"], dtype=bool))
        target = features.create_group("target_sets")
        target.create_dataset("Visium Human Transcriptome Probe Set v2.0", data=np.arange(n, dtype=np.uint32))
    return {"counts": dense.T, "genes": gene_names, "probes": probe["name"], "kept": probe["filtered_probes"]}


def test_probe_level_matrix_is_summed_to_genes(tmp_path, caplog):
    folder = copy_folder(HUMAN, tmp_path)
    h5 = folder / "filtered_feature_bc_matrix.h5"
    probe_h5 = tmp_path / "raw_probe_bc_matrix.h5"
    truth = write_probe_matrix(h5, probe_h5)
    shutil.copy(probe_h5, h5)
    import scanpy as sc

    raw = sc.read_10x_h5(probe_h5)  # what scanpy makes of it: probe names as features
    assert list(raw.var_names) == truth["probes"] and raw.n_vars > 200

    # dataset preparation reads the folder with read_st + get_counts
    with caplog.at_level("WARNING", logger="bundle.io"):
        adata = read_st(folder)
        counts, genes = get_counts(adata, name="sample 's1'")
    assert genes == truth["genes"]  # one column per gene, in the matrix's order, no probe ids
    assert not any("|" in g for g in genes)
    np.testing.assert_array_equal(counts.toarray(), truth["counts"])  # filtered probes (7 per spot) are not summed
    assert re.search(
        r"probe-level matrix \(234 probes of 100 genes, .*dropped 34 probes.*summed the other 200", caplog.text
    )

    # generation reads it with read_spots: same genes and counts
    panel = truth["genes"][:6]
    spots = read_spots(folder, panel, {"method": "normalize_total+log1p", "target_sum": 1e4})
    library = truth["counts"].sum(axis=1, keepdims=True)
    expected = np.log1p(truth["counts"][:, :6] * 1e4 / np.maximum(library, 1))
    np.testing.assert_allclose(spots.expression, expected, rtol=1e-5)


def test_probe_level_h5ad_without_filter_column_is_summed_by_name(tmp_path):
    folder = copy_folder(HUMAN, tmp_path)
    truth = write_probe_matrix(folder / "filtered_feature_bc_matrix.h5", tmp_path / "probes.h5")
    import anndata
    import scanpy as sc

    raw = sc.read_10x_h5(tmp_path / "probes.h5")
    raw = raw[:, np.asarray(truth["kept"])].copy()
    adata = anndata.AnnData(raw.X, obs=raw.obs[[]], var=raw.var[[]])  # only the probe names are left
    adata.obsm["spatial"] = np.zeros((adata.n_obs, 2))
    h5ad = tmp_path / "probes.h5ad"
    adata.write_h5ad(h5ad)
    counts, genes = get_counts(read_st(h5ad), name="probes")
    assert genes == truth["genes"]
    np.testing.assert_array_equal(counts.toarray(), truth["counts"])


def test_probe_level_normalized_values_are_refused(tmp_path):
    folder = copy_folder(HUMAN, tmp_path)
    write_probe_matrix(folder / "filtered_feature_bc_matrix.h5", tmp_path / "probes.h5")
    import scanpy as sc

    adata = sc.read_10x_h5(tmp_path / "probes.h5")
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.obsm["spatial"] = np.zeros((adata.n_obs, 2))
    adata.write_h5ad(tmp_path / "norm.h5ad")
    with pytest.raises(ValueError, match=r"norm.h5ad.*probe-level.*cannot be summed.*raw counts"):
        read_spots(tmp_path / "norm.h5ad", gene_panel(folder, 1), normalized=True)


def test_probes_of_two_genes_sharing_a_symbol_stay_two_genes(caplog):
    import pandas as pd

    from bundle.io.gene_panel import sum_probes

    var = pd.DataFrame(
        {
            "gene_ids": ["ENSG1", "ENSG1", "ENSG2", "ENSG3"],
            "gene_name": ["A", "A", "A", "B"],
            "probe_ids": ["ENSG1|A|1111111", "ENSG1|A|2222222", "ENSG2|A|3333333", "ENSG3|B|4444444"],
        },
        index=["A|1111111", "A|2222222", "A|3333333", "B|4444444"],
    )
    counts = np.array([[1, 2, 4, 8], [0, 1, 0, 3]])
    with caplog.at_level("WARNING", logger="bundle.io"):
        summed, genes = sum_probes(counts, list(var.index), var, what="tiny")
    assert genes == ["A", "A-1", "B"]
    np.testing.assert_array_equal(summed.toarray(), [[3, 4, 8], [1, 0, 3]])
    assert "no filtered_probes column, so no probe was dropped; summed the 4 probes" in caplog.text
    assert sum_probes(counts, ["A", "B", "C", "D"], None) is None  # gene-level features are left alone


def test_probe_level_matrix_with_every_probe_filtered_out_is_refused(tmp_path):
    folder = copy_folder(HUMAN, tmp_path)
    h5 = folder / "filtered_feature_bc_matrix.h5"
    write_probe_matrix(h5, tmp_path / "probes.h5")
    shutil.copy(tmp_path / "probes.h5", h5)
    with h5py.File(h5, "a") as f:
        f["matrix/features/filtered_probes"][...] = False
    with pytest.raises(ValueError, match=r"probe-level matrix whose 234 probes were all filtered out.*gene-level"):
        get_counts(read_st(folder), name="s1")


# ----------------------------------------------------------------------------------------------------------------------
# item 6: truncated HDF5
# ----------------------------------------------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_matrix_is_named_in_preparation_and_generation(tmp_path):
    folder = copy_folder(HUMAN, tmp_path)
    truncate(folder / "filtered_feature_bc_matrix.h5")
    message = r"filtered_feature_bc_matrix.h5.*truncated or corrupt.*copy it again"
    manifest = write_manifest(tmp_path / "m.csv", folder)
    with pytest.raises(ValueError, match=message):
        prepare_dataset(manifest, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=message):
        read_spots(folder, ["SAMD11"])


def test_truncated_h5ad_is_named(tmp_path):
    h5ad = tmp_path / "test_data.h5ad"
    shutil.copy(realdata("visium_mouse_brain_he", "test_data.h5ad"), h5ad)
    h5ad.chmod(0o644)
    truncate(h5ad)
    with pytest.raises(ValueError, match=r"test_data.h5ad.*truncated or corrupt.*copy it again"):
        read_spots(h5ad, ["Gene"])


def test_matrix_missing_a_dataset_is_named(tmp_path):
    folder = copy_folder(HUMAN, tmp_path)
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "a") as f:
        del f["matrix/indptr"]
    with pytest.raises(ValueError, match=r"filtered_feature_bc_matrix.h5.*not a complete 10x.*indptr"):
        read_st(folder)


# ----------------------------------------------------------------------------------------------------------------------
# item 8: spatial/ folder
# ----------------------------------------------------------------------------------------------------------------------


def test_empty_tissue_positions_is_named(tmp_path):
    folder = copy_folder(HUMAN, tmp_path)
    (folder / "spatial" / "tissue_positions_list.csv").write_bytes(b"")
    manifest = write_manifest(tmp_path / "m.csv", folder)
    with pytest.raises(ValueError, match=r"tissue_positions_list.csv.*is empty.*spatial/ folder"):
        prepare_dataset(manifest, tmp_path / "out", verbose=False)
    with pytest.raises(ValueError, match=r"tissue_positions_list.csv.*is empty"):
        read_spots(folder, gene_panel(folder))


def test_tissue_positions_with_header_only_is_named(tmp_path):
    folder = copy_folder(HUMAN, tmp_path)
    (folder / "spatial" / "tissue_positions_list.csv").unlink()
    header = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n"
    (folder / "spatial" / "tissue_positions.csv").write_text(header)
    with pytest.raises(ValueError, match=r"tissue_positions.csv.*no position for 100 of the 100 barcodes"):
        read_st(folder)


def test_tissue_positions_with_wrong_columns_is_named(tmp_path):
    folder = copy_folder(HUMAN, tmp_path)
    positions = folder / "spatial" / "tissue_positions_list.csv"
    rows = [line.split(",")[:3] for line in positions.read_text().splitlines()]
    positions.write_text("".join(",".join(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"tissue_positions_list.csv.*does not have Space Ranger's six columns"):
        read_st(folder)


@pytest.mark.parametrize(
    "missing", [("tissue_hires_image.png",), ("tissue_hires_image.png", "tissue_lowres_image.png")]
)
def test_spatial_folder_without_images_is_named(tmp_path, missing):
    folder = copy_folder(HUMAN, tmp_path)
    for name in missing:
        (folder / "spatial" / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"spatial.*lacks {missing[0]}.*copy the whole spatial/ folder"):
        read_st(folder)
    with pytest.raises(FileNotFoundError, match=rf"lacks {missing[0]}"):
        read_spots(folder, gene_panel(folder))


def test_unreadable_image_is_named(tmp_path):
    folder = copy_folder(HUMAN, tmp_path)
    (folder / "spatial" / "tissue_lowres_image.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"tissue_lowres_image.png.*cannot be read.*truncated or corrupt"):
        read_st(folder)


# ----------------------------------------------------------------------------------------------------------------------
# item 9: the library_ids attribute
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Use `squidpy.read.visium` instead:FutureWarning")
def test_library_ids_fix_from_the_message_works(tmp_path):
    import scanpy as sc

    folder = copy_folder("visium_malformed", tmp_path)
    with pytest.raises(ValueError, match="no `library_ids` attribute") as error:
        read_spaceranger(folder)
    snippet = re.search(r'python -c "([^"]+)"', str(error.value))
    assert snippet, str(error.value)
    subprocess.run([sys.executable, "-c", snippet.group(1)], check=True)  # the fix exactly as the message gives it
    adata = sc.read_visium(folder)  # scanpy itself now reads it
    assert adata.n_obs == 2695 and list(adata.uns["spatial"]) == ["visium_malformed"]
    adata = read_spaceranger(folder)
    assert adata.n_obs == 2695 and adata.obsm["spatial"].shape == (2695, 2)


def test_library_ids_stored_as_variable_length_str_are_read(tmp_path):
    folder = copy_folder("visium_malformed", tmp_path)
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "a") as f:
        f.attrs["library_ids"] = ["mouse1"]  # what the old advice wrote: a variable-length str scanpy cannot decode
    adata = read_spaceranger(folder)
    assert adata.n_obs == 2695 and list(adata.uns["spatial"]) == ["mouse1"]
    spots = read_spots(folder, list(adata.var_names[:4]))
    assert spots.sample == "mouse1" and len(spots) == int((adata.obs["in_tissue"] != 0).sum())


# ----------------------------------------------------------------------------------------------------------------------
# item 10: NaN counts in an h5ad
# ----------------------------------------------------------------------------------------------------------------------


def test_nan_counts_in_h5ad_are_called_nan(tmp_path):
    import anndata

    adata = anndata.read_h5ad(realdata("visium_mouse_brain_he", "test_data.h5ad"))
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    counts = np.round(np.expm1(x) * 3)
    counts[3, 5] = np.nan
    adata.layers["counts"] = counts
    h5ad = tmp_path / "nan_counts.h5ad"
    adata.write_h5ad(h5ad)
    manifest = write_manifest(tmp_path / "m.csv", h5ad, layer="counts")
    with pytest.raises(ValueError, match=r"sample 's1'.*layer 'counts'.*1 NaN") as error:
        prepare_dataset(manifest, tmp_path / "out", verbose=False)
    assert "log-normalised" not in str(error.value)
    with pytest.raises(ValueError, match=r"nan_counts.h5ad.*1 NaN") as error:
        read_spots(h5ad, list(adata.var_names[:4]), layer="counts")
    assert "log-normalised" not in str(error.value)
