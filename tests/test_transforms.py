"""Transforms: the WSI patch loader on a real spot/H&E pair, expression transforms, condition dropout, stain jitter."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from bundle.io.slides import available_backends
from bundle.io.spots import check_counts
from bundle.transforms import (
    LoadExpressiond,
    LoadWSIPatch,
    LoadWSIPatchd,
    NormalizeExpression,
    NormalizeExpressiond,
    RandDropConditiond,
    RandHEStainJitter,
    RandHEStainJitterd,
    SelectGenes,
    SelectGenesd,
    SpatialContextd,
)
from tests.helpers import realdata

MOUSE_MPP = 0.615  # um/px of the squidpy crop (spot diameter ~89 px = 55 um)


@pytest.fixture(scope="module")
def mouse_pair(tmp_path_factory):
    """The real mouse-brain H&E crop as a tiled TIFF with its pixel size, and its 49 spots' (x, y) centres."""
    import anndata

    image = np.asarray(Image.open(realdata("visium_mouse_brain_he", "test_img.jpg")).convert("RGB"))
    path = tmp_path_factory.mktemp("mouse") / "mouse_he.tif"
    res = 1e4 / MOUSE_MPP
    tifffile.imwrite(
        path, image, tile=(256, 256), photometric="rgb", resolution=(res, res), resolutionunit="CENTIMETER"
    )
    adata = anndata.read_h5ad(realdata("visium_mouse_brain_he", "test_data.h5ad"))
    return path, image, np.asarray(adata.obsm["spatial"], dtype=float), adata


@pytest.mark.parametrize("backend", available_backends())
def test_patches_are_centred_on_real_spots(mouse_pair, backend):
    path, image, spots, _ = mouse_pair
    assert image.shape[:2] == (
        1717,
        950,
    )  # 950 wide, 1717 tall, not square: an (x, y) / (row, col) mix-up reads elsewhere or fails
    size = 64
    loader = LoadWSIPatch(fov_um=size * MOUSE_MPP, size=size, backend=backend)
    checked = 0
    for x, y in spots:
        x, y = int(x), int(y)
        if not (size // 2 <= x < image.shape[1] - size // 2 and size // 2 <= y < image.shape[0] - size // 2):
            continue
        patch = loader(path, (x, y), MOUSE_MPP)
        assert patch.shape == (3, size, size) and patch.dtype == torch.uint8
        expected = image[y - size // 2 : y + size // 2, x - size // 2 : x + size // 2]
        np.testing.assert_array_equal(patch.permute(1, 2, 0).numpy(), expected)
        checked += 1
    assert checked >= 40


def test_patch_resized_from_field_of_view(mouse_pair):
    path, image, spots, _ = mouse_pair
    x, y = (int(v) for v in spots[5])
    # 128 um at 32 px = 4 um/px, read at level 0 (0.615 um/px) and resized with antialiasing
    patch = LoadWSIPatch(fov_um=128.0, size=32, backend="tifffile")(path, (x, y), MOUSE_MPP)
    region = round(128.0 / MOUSE_MPP)
    crop = image[y - region // 2 : y - region // 2 + region, x - region // 2 : x - region // 2 + region].astype(float)
    assert patch.shape == (3, 32, 32)
    # the centre of the patch shows the centre of the crop: compare mean colour of the middle quarter
    middle = patch.permute(1, 2, 0).numpy()[12:20, 12:20].reshape(-1, 3).mean(0)
    crop_middle = (
        crop[region * 12 // 32 : region * 20 // 32, region * 12 // 32 : region * 20 // 32].reshape(-1, 3).mean(0)
    )
    np.testing.assert_allclose(middle, crop_middle, atol=6)
    assert patch.meta["mpp"] == pytest.approx(4.0)


def test_patch_past_the_border_is_padded_white(mouse_pair):
    path, image, _, _ = mouse_pair
    patch = LoadWSIPatch(fov_um=40 * MOUSE_MPP, size=40, backend="tifffile")(path, (5, 5), MOUSE_MPP)
    array = patch.permute(1, 2, 0).numpy()
    assert (array[:15, :15] == 255).all()
    np.testing.assert_array_equal(array[15:, 15:], image[0:25, 0:25])


def test_dict_loader_keeps_other_keys_and_pickles_without_handles(mouse_pair):
    path, _, spots, _ = mouse_pair
    t = LoadWSIPatchd("image", fov_um=20.0, size=16, backend="tifffile")
    entry = {"image": str(path), "location": spots[0].tolist(), "mpp": MOUSE_MPP, "expression": 3, "barcode": "AAA-1"}
    out = t(entry)
    assert out["image"].shape == (3, 16, 16)
    assert {k: out[k] for k in ("location", "mpp", "expression", "barcode")} == {
        k: entry[k] for k in ("location", "mpp", "expression", "barcode")
    }
    assert len(t.loader._slides) == 1  # handle cached for reuse
    clone = pickle.loads(pickle.dumps(t))
    assert len(clone.loader._slides) == 0  # handles stay in their process
    torch.testing.assert_close(clone(entry)["image"].as_tensor(), out["image"].as_tensor())
    with pytest.raises(KeyError, match="needs key 'mpp'"):
        t({"image": str(path), "location": [10, 10]})


def _read_in_forked_child(loader, path, location, mpp, queue) -> None:
    inherited = loader._slides[str(path)][0]
    patch = loader(path, location, mpp)
    queue.put((loader._slides[str(path)][0] is inherited, patch.numpy()))


@pytest.mark.parametrize("backend", available_backends())
def test_forked_worker_reopens_slides_opened_by_the_parent(mouse_pair, backend):
    """A DataLoader worker forked after the main process read a patch must not read through the parent's handle.

    A forked file handle shares its position with the parent's: 8 workers reading through it returned other reads'
    bytes ("Not a JPEG file") with the tifffile backend on a 16-core machine.
    """
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork start method here")
    path, _, spots, _ = mouse_pair
    loader = LoadWSIPatch(fov_um=32 * MOUSE_MPP, size=32, backend=backend)
    location = spots[3].tolist()
    parent_patch = loader(path, location, MOUSE_MPP).numpy()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_forked_child, args=(loader, path, location, MOUSE_MPP, queue))
    child.start()
    reused, child_patch = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert not reused  # the child opened its own handle
    np.testing.assert_array_equal(child_patch, parent_patch)
    assert loader(path, location, MOUSE_MPP).numpy().tobytes() == parent_patch.tobytes()  # the parent's still works


@pytest.mark.parametrize("backend", available_backends())
def test_plain_tensor_patches_equal_metatensor_patches(mouse_pair, backend):
    from monai.data import DataLoader, Dataset, MetaTensor
    from monai.data.meta_obj import set_track_meta

    path, _, spots, _ = mouse_pair
    # level-0 read, read and resized, past the border
    for fov, size, location in ((32 * MOUSE_MPP, 32, spots[4]), (128.0, 32, spots[5]), (40 * MOUSE_MPP, 40, (5, 5))):
        with_meta = LoadWSIPatch(fov, size, backend=backend)(path, location, MOUSE_MPP)
        plain = LoadWSIPatch(fov, size, backend=backend, meta=False)(path, location, MOUSE_MPP)
        assert isinstance(with_meta, MetaTensor) and with_meta.meta["filename_or_obj"] == str(path)
        assert type(plain) is torch.Tensor and plain.dtype == torch.uint8 and plain.shape == (3, size, size)
        assert plain.numpy().tobytes() == with_meta.as_tensor().numpy().tobytes()
    set_track_meta(False)  # meta=None follows MONAI's switch
    try:
        assert type(LoadWSIPatch(20.0, 16, backend=backend)(path, spots[0], MOUSE_MPP)) is torch.Tensor
    finally:
        set_track_meta(True)
    entries = [{"image": str(path), "location": spots[i].tolist(), "mpp": MOUSE_MPP} for i in range(6)]

    def first_batch(meta: bool) -> torch.Tensor:
        dataset = Dataset(entries, LoadWSIPatchd("image", 20.0, 16, backend=backend, meta=meta))
        return next(iter(DataLoader(dataset, batch_size=6)))["image"]

    with_meta, plain = first_batch(True), first_batch(False)
    assert isinstance(with_meta, MetaTensor) and type(plain) is torch.Tensor and plain.shape == (6, 3, 16, 16)
    torch.testing.assert_close(plain, with_meta.as_tensor(), rtol=0, atol=0)


def test_tifffile_tiles_decoded_into_the_patch_equal_the_zarr_view(mouse_pair, tmp_path):
    """Tiles decoded straight into the output: pyramid levels, partial edge tiles, a missing tile, strided output."""
    import zarr

    from bundle.io.slides import TiffZarrWSIReader, open_slide

    _, image, _, _ = mouse_pair
    pyramid = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(pyramid) as tif:  # level 1 is a reduced-resolution page (as bundle.io.tiff writes)
        for level, data in enumerate((image, np.ascontiguousarray(image[::2, ::2]))):
            tif.write(data, tile=(128, 128), photometric="rgb", compression="jpeg", subfiletype=level, metadata=None)
    with tifffile.TiffFile(pyramid, mode="r+b") as tif:  # a sparse file: tile 9 (rows 128-255, cols 128-255) absent
        for name in ("TileOffsets", "TileByteCounts"):
            values = list(tif.pages[0].tags[name].value)
            values[9] = 0
            tif.pages[0].tags[name].overwrite(values)
    strips = tmp_path / "strips.tif"
    tifffile.imwrite(strips, image, photometric="rgb", rowsperstrip=64)
    reader = TiffZarrWSIReader()
    for path, levels in ((pyramid, 2), (strips, 1)):
        wsi = open_slide(path, reader)
        assert reader.get_level_count(wsi) == levels
        for level in range(levels):
            full = np.asarray(zarr.open(wsi.aszarr(series=0, level=level), mode="r"))
            h, w = full.shape[:2]
            for i, (top, left, height, width) in enumerate(
                ((0, 0, 200, 300), (100, 120, 129, 257), (h - 50, w - 70, 90, 100), (-20, -30, 60, 70))
            ):
                # every other output is a channel-last view of a channel-first array, as LoadWSIPatch passes
                out = np.zeros((3, height, width), np.uint8).transpose(1, 2, 0)
                got = reader.read_into(wsi, level, top, left, out if i % 2 else np.zeros((height, width, 3), np.uint8))
                expected = np.full((height, width, 3), 255, np.uint8)
                r0, c0 = max(top, 0), max(left, 0)
                region = full[r0 : top + height, c0 : left + width]
                expected[r0 - top : r0 - top + region.shape[0], c0 - left : c0 - left + region.shape[1]] = region
                np.testing.assert_array_equal(got, expected)
        wsi.close()
    with tifffile.TiffFile(pyramid) as tif:  # the tile really is missing (zarr fills it with 0)
        assert (np.asarray(zarr.open(tif.aszarr(series=0, level=0), mode="r"))[128:256, 128:256] == 0).all()


def test_loader_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fov_um"):
        LoadWSIPatch(fov_um=0, size=8)
    with pytest.raises(ValueError, match="size"):
        LoadWSIPatch(fov_um=10, size=(8, -1))
    with pytest.raises(ValueError, match="mpp"):
        LoadWSIPatch(fov_um=10, size=8, backend="tifffile")("x.tif", (1, 1), None)


def test_normalize_expression_matches_scanpy():
    import scanpy as sc

    from bundle.io.spots import read_spaceranger

    adata = read_spaceranger(realdata("visium_human_spaceranger1"))
    counts = adata.X.toarray()
    expected = sc.pp.log1p(sc.pp.normalize_total(adata.copy(), target_sum=1e4, inplace=False)["X"])
    expected = np.asarray(expected.toarray() if hasattr(expected, "toarray") else expected)
    got = NormalizeExpression(target_sum=1e4)(counts)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    # with the library size of all genes, a subset normalises like the full vector
    d = NormalizeExpressiond("counts", library_size_key="total")({"counts": counts[0, :10], "total": counts[0].sum()})
    np.testing.assert_allclose(d["counts"].numpy(), expected[0, :10], rtol=1e-5, atol=1e-5)


def test_non_count_data_is_refused():
    import anndata

    adata = anndata.read_h5ad(realdata("visium_mouse_brain_he", "test_data.h5ad"))  # log-normalised values
    values = adata.X.toarray()[:4] if hasattr(adata.X, "toarray") else adata.X[:4]
    with pytest.raises(ValueError, match="non-integer values.*raw counts"):
        NormalizeExpression()(values)
    with pytest.raises(ValueError, match="negative values"):
        check_counts(np.array([1.0, -2.0, 3.0]), name="spot 7")
    with pytest.raises(ValueError, match="target_sum"):
        NormalizeExpression(target_sum=0)


def test_select_genes_reorders_and_names_missing_genes():
    source = ["ACTB", "EPCAM", "CD3E", "COL1A1"]
    x = torch.arange(8.0).reshape(2, 4)
    out = SelectGenes(source, ["COL1A1", "EPCAM"])(x)
    torch.testing.assert_close(out, torch.tensor([[3.0, 1.0], [7.0, 5.0]]))
    np.testing.assert_array_equal(SelectGenesd("e", source, ["CD3E"])({"e": x.numpy()})["e"], [[2.0], [6.0]])
    with pytest.raises(ValueError, match=r"absent from the data: \['NOTAGENE', 'KRT20'\]"):
        SelectGenes(source, ["EPCAM", "NOTAGENE", "KRT20"])
    with pytest.raises(ValueError, match="duplicated"):
        SelectGenes(["A", "A"], ["A"])
    with pytest.raises(ValueError, match="last axis"):
        SelectGenes(source, ["EPCAM"])(torch.zeros(3))


def test_expression_store_and_spatial_context(tmp_path):
    store = tmp_path / "expression.npy"
    values = np.arange(20, dtype=np.float32).reshape(5, 4)
    np.save(store, values)
    d = LoadExpressiond("expression", store)({"expression": 2, "neighbors": [0, -1, 4, -1, -1, 1]})
    torch.testing.assert_close(d["expression"], torch.from_numpy(values[2]))
    d = SpatialContextd("expression", store)(d)
    assert d["expression"].shape == (7, 4)
    expected = np.stack([values[2], values[0], values[2], values[4], values[2], values[2], values[1]])
    np.testing.assert_array_equal(d["expression"].numpy(), expected)  # missing neighbours repeat the spot itself
    with pytest.raises(IndexError, match="outside the store"):
        LoadExpressiond("expression", store)({"expression": 9})
    with pytest.raises(FileNotFoundError, match="prepare_dataset"):
        LoadExpressiond("expression", tmp_path / "none.npy")({"expression": 0})
    with pytest.raises(ValueError, match="neighbour rows"):
        SpatialContextd("expression", store)({"expression": values[0], "neighbors": [1, 2]})


def test_rand_drop_condition_writes_null_value():
    data = {"expression": torch.rand(7, 4), "image": torch.zeros(3, 2, 2)}
    always = RandDropConditiond("expression", prob=1.0)(data)
    assert (always["expression"] == -1).all() and always["image"] is data["image"]
    never = RandDropConditiond("expression", prob=0.0)(data)
    torch.testing.assert_close(never["expression"], data["expression"])
    t = RandDropConditiond("expression", prob=0.3)
    t.set_random_state(0)
    dropped = [bool((t(data)["expression"] == -1).all()) for _ in range(2000)]
    assert 0.25 < np.mean(dropped) < 0.35
    with pytest.raises(ValueError, match="null_value"):
        RandDropConditiond("expression", null_value=0.0)


def test_stain_jitter_changes_stain_not_structure():
    tile = torch.from_numpy(np.array(Image.open(realdata("tiles", "crc_tcga_512_1.jpg")).convert("RGB"))).permute(
        2, 0, 1
    )
    tile = tile[:, :128, :128].contiguous()
    identity = RandHEStainJitter(prob=1.0, sigma=0.0, bias=0.0)(tile)
    assert (identity.int() - tile.int()).abs().max() <= 2  # deconvolution round trip
    jitter = RandHEStainJitter(prob=1.0, sigma=0.2, bias=0.05)
    jitter.set_random_state(1)
    out = jitter(tile)
    assert out.dtype == torch.uint8 and out.shape == tile.shape
    diff = (out.float() - tile.float()).abs().mean()
    assert 1.0 < diff < 40.0
    # structure kept: pixel intensities stay strongly correlated
    corr = np.corrcoef(out.float().mean(0).flatten(), tile.float().mean(0).flatten())[0, 1]
    assert corr > 0.95
    # the same seed gives the same jitter; the dictionary version applies one draw to all keys
    again = RandHEStainJitter(prob=1.0, sigma=0.2, bias=0.05)
    again.set_random_state(1)
    torch.testing.assert_close(again(tile), out)
    d = RandHEStainJitterd(["a", "b"], prob=1.0, sigma=0.2)
    d.set_random_state(2)
    res = d({"a": tile, "b": tile.clone()})
    torch.testing.assert_close(res["a"], res["b"])
    with pytest.raises(ValueError, match="sigma"):
        RandHEStainJitter(sigma=-1.0)
