"""Whole-slide synthesis (``bundle.sampling.slide.synthesize_slide``, its plan, inputs and report), the seam metric
and the streamed pyramid writer."""

from __future__ import annotations

import importlib.util
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from bundle.demo import visium_spot_lattice
from bundle.geometry import hex_neighbors, lattice_offsets
from bundle.io.tiff import downsample_by_two, write_pyramidal_tiff, write_pyramidal_tiff_streamed
from bundle.networks import GeneConditionedUNet, GeneCondNet
from bundle.sampling.pipeline import ExpressionToTissuePipeline
from bundle.sampling.seams import seam_score
from bundle.sampling.slide import initial_canvas_noise, interpolate_expression, synthesize_slide, window_weights
from bundle.sampling.slide_io import format_summary, save_thumbnail, spots_from_dataset, spots_from_input
from bundle.sampling.slide_plan import plan_slide

FOV_UM = 128.0  # tiny model: 16-px patches (decoder x2) of 8x8 latents, so 8 um/px and 16 um per latent pixel
NUM_GENES = 5


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed; install it to check that it reads the synthetic slide")


class SmoothDecoder(torch.nn.Module):
    """A stand-in stage-1 decoder without texture: channel mixing then bilinear x2 upsampling.

    A random-weight convolutional decoder turns any latent into pixel noise, in which no seam can show; this one keeps
    the latent's spatial structure, so windows that disagree at their borders leave visible steps, as a trained
    decoder does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mix = torch.nn.Conv2d(3, 3, 1)

    def decode_stage_2_outputs(self, z: torch.Tensor) -> torch.Tensor:
        upsampled = torch.nn.functional.interpolate(self.mix(z), scale_factor=2, mode="bilinear", align_corners=False)
        return torch.tanh(upsampled)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny networks run fastest on one thread (and tens of times slower with several on a busy shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline() -> ExpressionToTissuePipeline:
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(
        spatial_dims=2, in_channels=3, out_channels=3, channels=(8, 8), latent_channels=3, num_res_blocks=1,
        attention_levels=(False, False), norm_num_groups=4, with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )  # fmt: skip
    unet = DiffusionModelUNet(
        spatial_dims=2, in_channels=3, out_channels=3, channels=(8, 8), attention_levels=(False, True),
        num_head_channels=(0, 8), num_res_blocks=1, norm_num_groups=8, with_conditioning=True, cross_attention_dim=16,
    )  # fmt: skip
    for p in unet.parameters():  # MONAI zero-initialises output layers; make the condition visible in the output
        torch.nn.init.normal_(p, std=0.05)
    network = GeneConditionedUNet(GeneCondNet(NUM_GENES, 16, num_tokens=2, hidden_dim=16, num_neighbors=6), unet)
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", clip_sample=False)
    return ExpressionToTissuePipeline(
        network, autoencoder, scheduler, scale_factor=0.5, latent_shape=(3, 8, 8), num_inference_steps=2,
        guidance_scale=3.0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def spots() -> dict[str, np.ndarray]:
    """A 600 x 500 um Visium-like hex array (28 spots, 100 um pitch) with smooth expression gradients."""
    lattice = visium_spot_lattice(500.0, 600.0)
    positions = np.stack([lattice["x_um"], lattice["y_um"]], axis=1)
    x, y = positions[:, 0] / 300.0, positions[:, 1] / 300.0
    expression = np.stack([x, y, np.ones_like(x), np.sin(3 * x) + 1, (x * y) % 1.0], axis=1).astype(np.float32)
    return {
        "positions_um": positions,
        "expression": expression,
        "neighbors": hex_neighbors(lattice["array_row"], lattice["array_col"]),
    }


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory, pipeline, spots) -> dict:
    path = tmp_path_factory.mktemp("synthetic") / "slide.tif"
    summary = synthesize_slide(
        pipeline, spots["positions_um"], spots["expression"], path, patch_fov_um=FOV_UM, neighbors=spots["neighbors"],
        seed=1, batch_size=128, tile_size=32, min_level_size=24,
    )  # fmt: skip
    return summary


def _pixel_distance_to_spots(summary: dict, positions_um: np.ndarray) -> np.ndarray:
    """Distance (um) from every level-0 pixel centre to the nearest spot."""
    from scipy.spatial import cKDTree

    height, width = summary["shape"]
    x0, y0 = summary["origin_um"]
    yy, xx = np.mgrid[0:height, 0:width]
    centres = np.stack([x0 + (xx.ravel() + 0.5) * summary["mpp"], y0 + (yy.ravel() + 0.5) * summary["mpp"]], axis=1)
    return cKDTree(positions_um).query(centres)[0].reshape(height, width)


# --- synthesis ------------------------------------------------------------------------------------------------------


def test_synthetic_slide_reads_back_with_every_reader(slide: dict, spots: dict) -> None:
    import tifffile

    path = Path(slide["path"])
    levels = slide["levels"]
    assert slide["mpp"] == pytest.approx(FOV_UM / 16) and slide["windows"] > 0 and len(levels) == 3
    assert levels[0] == slide["shape"] and np.isfinite(slide["seam_score"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["slide.tif"]  # no temporary file left
    with tifffile.TiffFile(path) as tif:
        assert [page.shape[:2] for page in tif.pages] == levels
        pages = [page.asarray() for page in tif.pages]
        for level, page in enumerate(tif.pages):
            assert page.is_tiled and page.compression == tifffile.COMPRESSION.JPEG
            x_num, x_den = page.tags["XResolution"].value
            assert 1e4 * x_den / x_num == pytest.approx(slide["mpp"] * levels[0][1] / levels[level][1], rel=1e-6)
    level0 = pages[0].astype(np.int16)
    # background: pixels farther from every spot than a window centre can be (tissue distance + half a window
    # diagonal) were never generated and are white; pixels on spots are synthetic tissue
    distance = _pixel_distance_to_spots(slide, spots["positions_um"])
    far = distance > slide["tissue_distance_um"] + FOV_UM / np.sqrt(2) + slide["mpp"]
    near = distance < 40.0
    assert far.sum() > 100 and near.sum() > 100
    assert level0[far].min() >= 245  # JPEG rounding only
    assert level0[near].mean() < 235

    # level 1 is level 0 halved (compared at 4x4-block means: JPEG noise on pixel-level texture averages out)
    def blocks(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[0] // 4 * 4, image.shape[1] // 4 * 4
        return image[:h, :w].reshape(h // 4, 4, w // 4, 4, 3).mean(axis=(1, 3))

    halved = blocks(downsample_by_two(pages[0]).astype(np.float64))
    assert np.abs(blocks(pages[1].astype(np.float64)) - halved).mean() < 3.0

    _needs("cucim")
    from cucim import CuImage

    cu = CuImage(str(path))
    assert [tuple(d) for d in cu.resolutions["level_dimensions"]] == [(w, h) for h, w in levels]
    assert cu.metadata["cucim"]["spacing"][:2] == pytest.approx([slide["mpp"]] * 2)
    for level, (h, w) in enumerate(levels):
        region = np.asarray(cu.read_region(location=(0, 0), size=(w, h), level=level))[..., :3]
        assert np.abs(region.astype(np.int16) - pages[level]).mean() < 1.0

    _needs("openslide")
    import openslide

    with openslide.OpenSlide(str(path)) as osr:
        assert list(osr.level_dimensions) == [(w, h) for h, w in levels]
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(slide["mpp"])
        for level, (h, w) in enumerate(levels):
            region = np.asarray(osr.read_region((0, 0), level, (w, h)).convert("RGB"))
            assert np.abs(region.astype(np.int16) - pages[level]).mean() < 1.0


def test_same_seed_same_slide_whatever_the_batch(tmp_path: Path, pipeline, spots) -> None:
    common = dict(patch_fov_um=FOV_UM, neighbors=spots["neighbors"], region_um=(150, 150, 342, 342), compression="none")
    args = (pipeline, spots["positions_um"], spots["expression"])
    a = synthesize_slide(*args, tmp_path / "a.tif", seed=3, batch_size=64, **common)
    synthesize_slide(*args, tmp_path / "b.tif", seed=3, batch_size=3, **common)
    synthesize_slide(*args, tmp_path / "c.tif", seed=4, batch_size=64, **common)
    import tifffile

    images = {k: tifffile.imread(tmp_path / f"{k}.tif").astype(np.int16) for k in "abc"}
    assert a["grid"] == (2, 2) and a["shape"] == (24, 24)  # 192 um = 12 latent pixels = 24 px at 8 um/px
    assert np.abs(images["a"] - images["b"]).max() <= 1  # float summation order only
    assert np.abs(images["a"] - images["c"]).mean() > 5


def test_naive_tiling_is_independent_windows(tmp_path: Path, pipeline, spots) -> None:
    """blend=False equals denoising and decoding each window alone from its slice of the slide's noise."""
    import tifffile
    from scipy.spatial import cKDTree

    region = (100.0, 100.0, 356.0, 356.0)  # 256 um = 16 latent pixels: 2 x 2 windows of 8
    summary = synthesize_slide(
        pipeline, spots["positions_um"], spots["expression"], tmp_path / "naive.tif", patch_fov_um=FOV_UM,
        neighbors=spots["neighbors"], region_um=region, blend=False, seed=5, compression="none",
    )  # fmt: skip
    assert summary["grid"] == (2, 2) and summary["windows"] == 4 and summary["stride_px"] == summary["window_px"]
    image = tifffile.imread(tmp_path / "naive.tif")

    # the reference: the pipeline's building blocks on each window, conditions built as documented
    positions, expression = spots["positions_um"], spots["expression"]
    pitch, tree = 100.0, cKDTree(positions)
    offsets = lattice_offsets(positions, spots["neighbors"])
    noise = initial_canvas_noise(5, (3, 16, 16))
    expected = np.zeros_like(image)
    pipeline.scheduler.set_timesteps(2)
    for r in (0, 8):
        for c in (0, 8):
            centre = np.array([[region[0] + (c + 4) * 16.0, region[1] + (r + 4) * 16.0]])
            rows = [interpolate_expression(positions, expression, centre, 0.4 * pitch, 150.0, tree)[0][0]]
            for offset in offsets:
                value, found = interpolate_expression(positions, expression, centre + offset, 0.4 * pitch, 150.0, tree)
                on_tissue = tree.query(centre + offset)[0][0] <= pitch
                rows.append(value[0] if on_tissue else rows[0])
            condition = torch.as_tensor(np.stack(rows))[None]
            latents = torch.from_numpy(noise[:, r : r + 8, c : c + 8].copy())[None]
            with torch.no_grad():
                for t in pipeline.scheduler.timesteps:
                    latents = pipeline.step(pipeline.guided_output(latents, t, condition, 3.0), t, latents)
                patch = pipeline.decode(latents)[0].numpy().transpose(1, 2, 0)
            expected[2 * r : 2 * r + 16, 2 * c : 2 * c + 16] = np.rint(patch * 255)
    assert np.abs(image.astype(np.int16) - expected).max() <= 1


def test_ddpm_slides_are_seeded(tmp_path: Path, pipeline, spots) -> None:
    ddpm = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", clip_sample=False)
    sampler = ExpressionToTissuePipeline(pipeline.network, pipeline.autoencoder, ddpm, 0.5, (3, 8, 8), 2, 3.0)
    common = dict(patch_fov_um=FOV_UM, region_um=(150, 150, 342, 342), compression="none", batch_size=64)
    args = (sampler, spots["positions_um"], spots["expression"])
    import tifffile

    synthesize_slide(*args, tmp_path / "a.tif", seed=7, **common)
    synthesize_slide(*args, tmp_path / "b.tif", seed=7, **common)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a.tif"), tifffile.imread(tmp_path / "b.tif"))


def test_upsampled_output_pixel_size(tmp_path: Path, pipeline, spots) -> None:
    summary = synthesize_slide(
        pipeline, spots["positions_um"], spots["expression"], tmp_path / "fine.tif", patch_fov_um=FOV_UM,
        region_um=(150, 150, 342, 342), mpp=FOV_UM / 16 / 2, seed=1, compression="none",
    )  # fmt: skip
    assert summary["mpp"] == pytest.approx(4.0) and summary["shape"] == (48, 48) and summary["window_px"] == 32


def test_plan_resolves_settings_and_lays_out_tissue_windows(tmp_path: Path, pipeline, spots) -> None:
    settings = dict(
        patch_fov_um=FOV_UM, neighbors=spots["neighbors"], mpp=None, overlap=0.5, blend=True, num_inference_steps=None,
        guidance_scale=None, seed=3, batch_size=4, tissue_distance_um=None, sigma_um=None, pitch_um=None,
        region_um=(150, 150, 342, 342), tile_size=256, compression="none", quality=90, min_level_size=256,
    )  # fmt: skip
    plan = plan_slide(pipeline, spots["positions_um"], spots["expression"], tmp_path / "s.tif", **settings)
    assert plan.layout.grid == (2, 2) and plan.shape == (24, 24) and plan.factor == 2 and plan.mpp == 8.0
    assert (
        plan.pitch == pytest.approx(100.0) and plan.sigma == pytest.approx(40.0) and plan.radius == pytest.approx(150)
    )
    assert plan.steps == 2 and plan.scale == 3.0 and plan.num_neighbors == 6 and len(plan.offsets) == 6
    assert plan.window_px == 16 and plan.stride_px == 8 and len(plan.layout.starts) == 4
    naive = plan_slide(pipeline, spots["positions_um"], spots["expression"], tmp_path / "s.tif",
                       **{**settings, "blend": False})  # fmt: skip
    assert naive.stride_px == naive.window_px == 16
    with pytest.raises(ValueError, match="whole number"):
        plan_slide(pipeline, spots["positions_um"], spots["expression"], tmp_path / "s.tif", **{**settings, "mpp": 3.0})
    assert list(tmp_path.iterdir()) == []  # planning writes nothing


def test_spots_of_a_dataset_folder_and_of_a_csv(tmp_path: Path) -> None:
    import json

    genes = ["A", "B", "C"]
    (tmp_path / "gene_panel.json").write_text(json.dumps({"genes": genes}))
    np.save(tmp_path / "expression.npy", np.arange(12, dtype=np.float32).reshape(4, 3))
    item = dict(mpp=0.5, neighbors=[-1] * 6)
    datalist = {
        "training": [
            {**item, "sample": "S1", "expression": 0, "location": [100, 200], "neighbors": [2, -1, -1, -1, -1, -1]},
            {**item, "sample": "S2", "expression": 1, "location": [0, 0]},
        ],
        "validation": [{**item, "sample": "S1", "expression": 2, "location": [300, 200]}],
    }
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    spots = spots_from_dataset(tmp_path, "S1", genes)
    np.testing.assert_array_equal(spots["positions_um"], [[50.0, 100.0], [150.0, 100.0]])
    np.testing.assert_array_equal(spots["expression"], [[0, 1, 2], [6, 7, 8]])
    assert spots["neighbors"].tolist() == [[1, -1, -1, -1, -1, -1], [-1] * 6] and spots["sample"] == "S1"
    with pytest.raises(ValueError, match="S9.*S1"):
        spots_from_dataset(tmp_path, "S9", genes)
    with pytest.raises(ValueError):
        spots_from_dataset(tmp_path, "S1", ["A", "C", "B"])
    with pytest.raises(FileNotFoundError, match="prepare_dataset"):
        spots_from_dataset(tmp_path / "missing", "S1", genes)

    counts = "spot_id,A,B,C,total_counts,x_um,y_um\ns1,1,2,3,10,10.0,20.0\ns2,4,0,1,10,110.0,20.0\n"
    (tmp_path / "spots.csv").write_text(counts)
    normalization = {"method": "normalize_total+log1p", "target_sum": 10000.0}
    from_csv = spots_from_input(tmp_path / "spots.csv", genes, normalization)
    np.testing.assert_array_equal(from_csv["positions_um"], [[10.0, 20.0], [110.0, 20.0]])
    assert from_csv["expression"].shape == (2, 3) and from_csv["neighbors"].shape == (2, 6)
    (tmp_path / "no_xy.csv").write_text("spot_id,A,B,C,total_counts\ns1,1,2,3,10\n")
    with pytest.raises(ValueError, match="no spot positions"):
        spots_from_input(tmp_path / "no_xy.csv", genes, normalization)


def test_summary_text_and_thumbnail(slide: dict, tmp_path: Path) -> None:
    from PIL import Image

    text = format_summary({**slide, "timings_s": {**slide["timings_s"]}})
    height, width = slide["shape"]
    assert text.startswith(f"wrote {slide['path']}: {width} x {height} px at 8 um/px") and "seam score" in text
    thumbnail = save_thumbnail(slide["path"], tmp_path / "thumb.png", max_size=20)
    assert max(Image.open(thumbnail).size) <= 20


# --- seams ----------------------------------------------------------------------------------------------------------


def test_seam_score_on_synthetic_images() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float64)
    ramp = np.stack([xx * 0.7 + yy * 0.3, 255 - xx * 0.5, yy * 0.6], axis=-1)  # float: no rounding pattern
    assert seam_score(ramp, 32) == pytest.approx(1.0, abs=1e-6)
    from scipy.ndimage import gaussian_filter

    texture = gaussian_filter(rng.normal(128, 40, (256, 256, 3)), sigma=(2, 2, 0))
    assert seam_score(texture, 32, 16) == pytest.approx(1.0, abs=0.1)
    tiled = texture.copy()
    for y in range(0, 256, 32):
        for x in range(0, 256, 32):
            tiled[y : y + 32, x : x + 32] += rng.uniform(-15, 15, 3)  # a per-tile colour shift, as naive tiling gives
    naive = seam_score(tiled, 32)
    print(f"seam score: smooth texture {seam_score(texture, 32):.3f}, tiles with colour offsets {naive:.3f}")
    assert naive > 1.5
    # an offset grid is not seen at the wrong place; masked-out pixels do not count; a single window has no border
    assert seam_score(tiled, 32, offset=16) == pytest.approx(1.0, abs=0.2)
    mask = np.zeros((256, 256), dtype=bool)
    mask[40:60, 40:60] = True  # inside one tile only: no border pair
    assert np.isnan(seam_score(tiled, 32, mask=mask))
    assert np.isnan(seam_score(texture[:32, :32], 32))
    # period: a decoder pattern repeating every 2 px is not a seam
    pattern = texture.copy()
    pattern[:, 0::2] += 20
    assert seam_score(pattern, 32, period=2) == pytest.approx(1.0, abs=0.1)
    with pytest.raises(ValueError, match="positive"):
        seam_score(texture, 0)
    with pytest.raises(ValueError, match="mask"):
        seam_score(texture, 32, mask=np.ones((10, 10), dtype=bool))


def test_window_weights_partition_of_unity() -> None:
    ramp = window_weights(16)
    assert ramp.min() > 0 and ramp.argmax() in (7, 8)
    np.testing.assert_allclose(ramp[:8] + ramp[8:], 1.0, rtol=1e-6)  # half-overlapping ramps add up to 1


def test_blending_removes_seams_that_naive_tiling_shows(tmp_path: Path, pipeline, spots) -> None:
    smooth = ExpressionToTissuePipeline(
        pipeline.network, SmoothDecoder(), pipeline.scheduler, 0.5, (3, 8, 8), num_inference_steps=2, guidance_scale=3.0
    )
    args = (smooth, spots["positions_um"], spots["expression"])
    common = dict(patch_fov_um=FOV_UM, neighbors=spots["neighbors"], seed=2, batch_size=128, compression="none")
    blended = synthesize_slide(*args, tmp_path / "blended.tif", **common)
    naive = synthesize_slide(*args, tmp_path / "naive.tif", blend=False, **common)
    print(f"seam score: blended {blended['seam_score']:.3f}, naive tiling {naive['seam_score']:.3f}")
    assert naive["seam_score"] > 1.3
    assert blended["seam_score"] < 1.15
    assert blended["seam_score"] < naive["seam_score"]


def test_synthesis_memory_does_not_grow_with_the_slide(tmp_path: Path, pipeline) -> None:
    """Peak Python-allocated memory (numpy buffers; torch's allocator is untraced) for arrays 2.4 and 4.8 mm tall."""
    peaks, shapes = {}, {}
    for height_um in (2400.0, 4800.0):
        lattice = visium_spot_lattice(height_um, 600.0)
        positions = np.stack([lattice["x_um"], lattice["y_um"]], axis=1)
        expression = np.random.default_rng(0).random((len(positions), NUM_GENES)).astype(np.float32)
        tracemalloc.start()
        summary = synthesize_slide(pipeline, positions, expression, tmp_path / "slide.tif", patch_fov_um=FOV_UM,
                                   num_inference_steps=1, batch_size=64, tile_size=32, workdir=tmp_path)  # fmt: skip
        peaks[height_um] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        shapes[height_um] = summary["shape"]
    print(f"synthesis peak traced memory: {peaks[2400.0] / 2**20:.2f} MiB for {shapes[2400.0]} px, "
          f"{peaks[4800.0] / 2**20:.2f} MiB for {shapes[4800.0]} px")  # fmt: skip
    assert shapes[4800.0][0] > 1.8 * shapes[2400.0][0]
    assert peaks[4800.0] < 1.3 * peaks[2400.0]


# --- streamed pyramid writer ----------------------------------------------------------------------------------------


def _memmap_image(path: Path, height: int, width: int) -> np.ndarray:
    image = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(height, width, 3))
    for row in range(0, height, 512):
        yy, xx = np.mgrid[row : min(row + 512, height), 0:width]
        image[row : row + 512, :, 0] = (xx * 7 + yy) % 256
        image[row : row + 512, :, 1] = (yy // 3) % 256
        image[row : row + 512, :, 2] = np.where(((xx // 64) + (yy // 64)) % 2, 200, 40)
    image.flush()
    return image


@pytest.mark.parametrize("compression", ["deflate", "jpeg"])
def test_streamed_writer_matches_the_in_memory_writer(tmp_path: Path, compression: str) -> None:
    import tifffile

    source = _memmap_image(tmp_path / "source.npy", 700, 1000)
    image = np.array(source)
    memory = write_pyramidal_tiff(tmp_path / "memory.tif", image, 0.5, tile_size=128, compression=compression,
                                  min_level_size=64)  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    streamed = write_pyramidal_tiff_streamed(tmp_path / "streamed.tif", source, 0.5, tile_size=128,
                                             compression=compression, min_level_size=64, workdir=work)  # fmt: skip
    assert list(work.iterdir()) == []  # temporary levels removed
    with tifffile.TiffFile(memory) as a, tifffile.TiffFile(streamed) as b:
        assert len(a.pages) == len(b.pages) == 4
        level = image
        for index, (page_a, page_b) in enumerate(zip(a.pages, b.pages)):
            if index:
                level = downsample_by_two(level)
            assert page_a.shape == page_b.shape == level.shape
            assert page_a.tags["XResolution"].value == page_b.tags["XResolution"].value
            np.testing.assert_array_equal(page_a.asarray(), page_b.asarray())
            if compression == "deflate":
                np.testing.assert_array_equal(page_b.asarray(), level)


def test_streamed_writer_memory_does_not_grow_with_the_image(tmp_path: Path) -> None:
    peaks = {}
    for height in (2048, 4096):
        source = _memmap_image(tmp_path / f"source{height}.npy", height, 2048)
        tracemalloc.start()
        write_pyramidal_tiff_streamed(tmp_path / f"slide{height}.tif", source, 0.25, workdir=tmp_path)
        peaks[height] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del source
    print(f"streamed writer peak traced memory: {peaks[2048] / 2**20:.1f} MiB (2048 x 2048), "
          f"{peaks[4096] / 2**20:.1f} MiB (4096 x 2048); the image is {4096 * 2048 * 3 / 2**20:.0f} MiB")  # fmt: skip
    assert peaks[4096] < 1.3 * peaks[2048]
    assert peaks[4096] < 4096 * 2048 * 3 / 2  # far below the image itself


def test_streamed_writer_refuses_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        write_pyramidal_tiff_streamed(tmp_path / "a.tif", np.zeros((8, 8, 4), np.uint8), 0.5)
    with pytest.raises(ValueError, match="uint8"):
        write_pyramidal_tiff_streamed(tmp_path / "a.tif", np.zeros((8, 8, 3), np.float32), 0.5)
    with pytest.raises(ValueError, match="array-like"):
        write_pyramidal_tiff_streamed(tmp_path / "a.tif", [[0, 0, 0]], 0.5)
    with pytest.raises(FileNotFoundError, match="workdir"):
        write_pyramidal_tiff_streamed(tmp_path / "a.tif", np.zeros((8, 8, 3), np.uint8), 0.5, workdir=tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(positions_um=np.zeros((0, 2)), expression=np.zeros((0, NUM_GENES))), ValueError, "no spots"),
        (dict(expression_genes=NUM_GENES - 1), ValueError, "5-gene panel"),
        (dict(positions_um="3 columns"), ValueError, r"positions_um must be \(N, 2\)"),
        (dict(expression_rows=3), ValueError, "one row per spot"),
        (dict(region_um=(5000, 5000, 5300, 5300)), ValueError, "no in-tissue spot"),
        (dict(mpp=3.0), ValueError, "whole number"),
        (dict(overlap=1.0), ValueError, "overlap"),
        (dict(output="missing/slide.tif"), FileNotFoundError, "does not exist"),
        (dict(output="file/slide.tif"), NotADirectoryError, "not a folder"),
    ],
)
def test_bad_input_is_refused_and_leaves_nothing(tmp_path: Path, pipeline, spots, change, error, match) -> None:
    positions, expression = spots["positions_um"], spots["expression"]
    kwargs = dict(patch_fov_um=FOV_UM, workdir=tmp_path / "work")
    (tmp_path / "work").mkdir()
    (tmp_path / "file").write_text("not a folder")
    output = tmp_path / change.pop("output", "slide.tif")
    if "expression_genes" in change:
        expression = expression[:, : change.pop("expression_genes")]
    if "expression_rows" in change:
        expression = expression[: change.pop("expression_rows")]
    if isinstance(change.get("positions_um"), str):
        change["positions_um"] = np.concatenate([positions, positions[:, :1]], axis=1)
    positions = change.pop("positions_um", positions)
    expression = change.pop("expression", expression)
    with pytest.raises(error, match=match):
        synthesize_slide(pipeline, positions, expression, output, **kwargs, **change)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "work"]
    assert list((tmp_path / "work").iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_output_folder_is_refused(tmp_path: Path, pipeline, spots) -> None:
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="writable"):
            synthesize_slide(
                pipeline, spots["positions_um"], spots["expression"], folder / "s.tif", patch_fov_um=FOV_UM
            )
    finally:
        folder.chmod(0o755)


def test_failure_while_writing_keeps_the_old_file(tmp_path: Path, pipeline, spots, monkeypatch) -> None:
    import tifffile

    path = tmp_path / "slide.tif"
    path.write_bytes(b"previous content")
    work = tmp_path / "work"
    work.mkdir()
    original = tifffile.TiffWriter.write

    def failing_write(self, *args, **kwargs):
        raise OSError("simulated disk full")

    monkeypatch.setattr(tifffile.TiffWriter, "write", failing_write)
    with pytest.raises(OSError, match="simulated"):
        synthesize_slide(pipeline, spots["positions_um"], spots["expression"], path, patch_fov_um=FOV_UM,
                         region_um=(150, 150, 278, 278), workdir=work)  # fmt: skip
    monkeypatch.setattr(tifffile.TiffWriter, "write", original)
    assert path.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.tif", "work"]
    assert list(work.iterdir()) == []
