"""Stage 2 on cached latents (bundle.latent_cache): the dihedral variants, the memmap cache, its key, the dataset, the
prepare batch's posterior sampling, several processes, and training through the real configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.networks.schedulers import DDPMScheduler
from monai.transforms import Compose, EnsureTyped

from bundle.autoencoder import save_autoencoder_checkpoint
from bundle.engines import LatentDiffusionPrepareBatch
from bundle.latent_cache import (
    NUM_VARIANTS,
    LatentCacheDataset,
    StaleLatentCacheError,
    cache_image_transform,
    dihedral,
    ensure_latent_cache,
    latent_cache_key,
    latent_cache_nbytes,
    open_latent_cache,
)
from bundle.transforms import LoadExpressiond, RandDropConditiond
from tests.helpers import CONFIGS, tiny_autoencoder, tiny_train_overrides

FOV_UM, SIZE = 64.0, 32
NUM_SPOTS = 6
SCALE = 0.5


def write_autoencoder(path: Path, seed: int = 0) -> torch.nn.Module:
    autoencoder = tiny_autoencoder(seed).eval()
    save_autoencoder_checkpoint(path, autoencoder, SCALE)
    return autoencoder


def training_entries(dataset_dir: Path, count: int = NUM_SPOTS) -> list[dict]:
    return json.loads((dataset_dir / "datalist.json").read_text())["training"][:count]


def item_transform(dataset_dir: Path, p_uncond: float = 0.0) -> Compose:
    return Compose(
        [
            LoadExpressiond(keys="expression", store=dataset_dir / "expression.npy"),
            EnsureTyped(keys=["latent_mean", "latent_std", "expression"], dtype=torch.float32, track_meta=False),
            RandDropConditiond(keys="expression", prob=p_uncond),
        ]
    )


def make_dataset(folder: Path, dataset_dir: Path, autoencoder, ckpt: Path, data=None, **kwargs) -> LatentCacheDataset:
    return LatentCacheDataset(
        data if data is not None else training_entries(dataset_dir),
        kwargs.pop("transform", item_transform(dataset_dir)),
        folder,
        autoencoder,
        ckpt,
        FOV_UM,
        SIZE,
        backend="tifffile",
        batch_size=kwargs.pop("batch_size", 4),
        **kwargs,
    )


@pytest.fixture(scope="module")
def cache(demo_dataset, tmp_path_factory):
    """A float32 cache of the first training spots of the demo dataset, encoded by a tiny autoencoder."""
    root = tmp_path_factory.mktemp("latent_cache")
    autoencoder = write_autoencoder(root / "autoencoder.pt")
    dataset = make_dataset(root / "cache", demo_dataset, autoencoder, root / "autoencoder.pt", dtype="float32")
    return {"root": root, "autoencoder": autoencoder, "dataset": dataset}


def test_dihedral_gives_the_eight_distinct_elements_of_d4():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    variants = [dihedral(x, v) for v in range(NUM_VARIANTS)]
    assert torch.equal(variants[0], x)
    assert len({tuple(v.flatten().tolist()) for v in variants}) == NUM_VARIANTS
    assert torch.equal(variants[1], torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(variants[4], torch.flip(x, dims=(-1,)))
    rotated_again = [tuple(dihedral(v, 1).flatten().tolist()) for v in variants]  # closed under composition
    assert set(rotated_again) == {tuple(v.flatten().tolist()) for v in variants}
    with pytest.raises(ValueError, match="variant must be in"):
        dihedral(x, 8)


def test_cache_holds_mean_and_logvar_of_each_encoded_variant(cache, demo_dataset):
    dataset = cache["dataset"]
    latents, info = open_latent_cache(dataset.cache_dir, dataset.key)
    assert latents.shape == (NUM_SPOTS, NUM_VARIANTS, 6, 16, 16) and latents.dtype == np.float32
    assert info["shape"] == list(latents.shape) and info["key"]["num_spots"] == NUM_SPOTS
    assert (dataset.cache_dir / "latents.npy").stat().st_size >= latent_cache_nbytes(NUM_SPOTS, 3, 16, "float32")
    entry = training_entries(demo_dataset)[2]
    image = cache_image_transform(FOV_UM, SIZE, "tifffile")(dict(entry))["image"]
    with torch.no_grad():
        for variant in (0, 3, 6):
            mean, std = cache["autoencoder"].encode(dihedral(image[None], variant))
            stored = torch.from_numpy(np.array(latents[2, variant]))
            assert torch.allclose(stored[:3], mean[0], atol=1e-5)
            assert torch.allclose(stored[3:], 2 * torch.log(std[0]), atol=1e-4)
        # the encoder is not equivariant: encoding the rotated patch is not rotating the latent
        rotated_latent = dihedral(torch.from_numpy(np.array(latents[2, 0, :3])), 1)
        assert not torch.allclose(torch.from_numpy(np.array(latents[2, 1, :3])), rotated_latent, atol=1e-3)


def test_dataset_items_prepare_batch_and_posterior_statistics(cache, demo_dataset):
    dataset = cache["dataset"]
    latents = dataset.latents
    dataset.set_random_state(seed=1)
    item = dataset[4]
    assert set(item) >= {"latent_mean", "latent_std", "expression", "latent_variant"} and "image" not in item
    variant = item["latent_variant"]
    assert torch.equal(item["latent_mean"], torch.from_numpy(np.array(latents[4, variant, :3])))
    assert torch.allclose(item["latent_std"], torch.exp(0.5 * torch.from_numpy(np.array(latents[4, variant, 3:]))))
    expression = np.load(demo_dataset / "expression.npy")[training_entries(demo_dataset)[4]["expression"]]
    assert torch.allclose(item["expression"], torch.from_numpy(np.asarray(expression, dtype=np.float32)))
    assert {dataset[0]["latent_variant"] for _ in range(200)} == set(range(NUM_VARIANTS))  # a random variant per item

    batch = next(iter(DataLoader(dataset, batch_size=NUM_SPOTS)))
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    prepare = LatentDiffusionPrepareBatch(cache["autoencoder"], scale_factor=SCALE, scheduler=scheduler)
    torch.manual_seed(3)
    z, target, _, kwargs = prepare(batch)
    torch.manual_seed(3)
    expected = (batch["latent_mean"] + batch["latent_std"] * torch.randn_like(batch["latent_std"])) * SCALE
    assert torch.allclose(z, expected)
    assert torch.allclose(target, scheduler.get_velocity(z, kwargs["noise"], kwargs["timesteps"]))
    assert torch.equal(kwargs["condition"], batch["expression"])
    torch.manual_seed(0)
    draws = torch.stack([prepare.latents(batch) for _ in range(1000)])  # z = (mean + std * eps) * scale
    eps = (draws / SCALE - batch["latent_mean"]) / batch["latent_std"]
    assert abs(float(eps.mean())) < 0.01 and abs(float(eps.std()) - 1.0) < 0.01
    assert float(eps.mean(0).abs().max()) < 0.2  # every element centred on its own mean


@pytest.mark.slow
def test_cache_is_reused_and_rebuilt_when_its_inputs_change(cache, demo_dataset, tmp_path):
    ckpt, folder = tmp_path / "autoencoder.pt", tmp_path / "cache"
    autoencoder = write_autoencoder(ckpt)
    first = make_dataset(folder, demo_dataset, autoencoder, ckpt)
    latents_file = folder / "latents.npy"
    before = latents_file.stat().st_mtime_ns
    again = make_dataset(folder, demo_dataset, autoencoder, ckpt)
    assert latents_file.stat().st_mtime_ns == before and again.key == first.key  # opened, not encoded again
    assert first.latents.dtype == np.float16  # the default; float32 differs by float16 rounding only
    assert np.allclose(first.latents, cache["dataset"].latents, atol=2e-2)

    other = tmp_path / "other_autoencoder.pt"
    other_autoencoder = write_autoencoder(other, seed=1)
    other_key = latent_cache_key(other, training_entries(demo_dataset), FOV_UM, SIZE)
    with pytest.raises(StaleLatentCacheError, match="another autoencoder checkpoint"):
        open_latent_cache(folder, other_key)
    rebuilt = make_dataset(folder, demo_dataset, other_autoencoder, other)
    assert rebuilt.info["key"] == other_key and latents_file.stat().st_mtime_ns != before
    assert not np.allclose(rebuilt.latents[0, 0], first.latents[0, 0], atol=1e-2)

    fewer = training_entries(demo_dataset, NUM_SPOTS - 1)
    with pytest.raises(StaleLatentCacheError, match="training spots differ"):
        open_latent_cache(folder, latent_cache_key(other, fewer, FOV_UM, SIZE))
    with pytest.raises(StaleLatentCacheError, match="patch size differs"):
        open_latent_cache(folder, latent_cache_key(other, training_entries(demo_dataset), FOV_UM, 64))
    smaller = make_dataset(folder, demo_dataset, other_autoencoder, other, data=fewer)
    assert smaller.latents.shape[0] == NUM_SPOTS - 1
    assert np.allclose(smaller.latents, rebuilt.latents[: NUM_SPOTS - 1], atol=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["autoencoder.pt", "cache", "other_autoencoder.pt"]


def test_bad_inputs_are_named(cache, demo_dataset, tmp_path):
    ckpt = cache["root"] / "autoencoder.pt"
    with pytest.raises(ValueError, match="dtype must be one of"):
        latent_cache_key(ckpt, training_entries(demo_dataset), FOV_UM, SIZE, "bfloat16")
    with pytest.raises(FileNotFoundError, match="missing.pt.*train stage 1"):
        latent_cache_key(tmp_path / "missing.pt", training_entries(demo_dataset), FOV_UM, SIZE)
    with pytest.raises(KeyError, match="entry 0 has no \\['mpp'\\]"):
        latent_cache_key(ckpt, [{"image": "x", "location": [0, 0]}], FOV_UM, SIZE)
    with pytest.raises(FileNotFoundError, match="No finished latent cache"):
        open_latent_cache(tmp_path / "nothing")
    with pytest.raises(ValueError, match="training datalist is empty"):
        ensure_latent_cache(tmp_path / "empty", {"dtype": "float16"}, [], cache["autoencoder"], lambda d: d)


def train_demo(root: Path, dataset_dir: Path, **override) -> None:
    """``python -m monai.bundle run`` of train.json + demo.json, in-process."""
    from monai.bundle import ConfigWorkflow

    files = [str(CONFIGS / "train.json"), str(CONFIGS / "demo.json")]
    workflow = ConfigWorkflow(
        config_file=files, workflow_type="train", bundle_root=str(root), dataset_dir=str(dataset_dir), **override
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def _build_in_process_group(rank: int, world_size: int, init_file: str, folder: str, dataset_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        dataset_dir = Path(dataset_dir)
        ckpt = Path(folder).parent / "autoencoder.pt"
        make_dataset(Path(folder), dataset_dir, tiny_autoencoder(0).eval(), ckpt, dtype="float32", batch_size=2)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_encode_their_shards_into_one_cache(cache, demo_dataset, tmp_path):
    import torch.multiprocessing as mp

    write_autoencoder(tmp_path / "autoencoder.pt")
    folder = tmp_path / "cache"
    args = (2, str(tmp_path / "init"), str(folder), str(demo_dataset))
    mp.start_processes(_build_in_process_group, args=args, nprocs=2, join=True, start_method="spawn")
    shared, info = open_latent_cache(folder)
    assert info["key"]["num_spots"] == NUM_SPOTS
    assert np.allclose(shared, cache["dataset"].latents, atol=1e-5)  # the single-process cache, row for row


@pytest.mark.slow
def test_demo_config_trains_on_cached_latents_and_resumes_with_the_same_cache(demo_dataset, tmp_path):
    overrides = tiny_train_overrides(
        num_iterations=2,
        epoch_length=2,
        num_val_spots=8,
        sample_interval=2,
        num_sample_spots=4,
        autoencoder_iterations=2,
        autoencoder_epoch_length=2,
        adv_start_iteration=1,
        scale_factor_batches=1,
    )
    demo_sizes = ("patch_size", "patch_fov_um", "batch_size", "autoencoder_kwargs", "unet_kwargs", "cache_rate")
    demo_sizes += ("cross_attention_dim", "num_context_tokens", "gene_encoder_hidden_dim", "discriminator_kwargs")
    for key in demo_sizes:  # demo.json's sizes, not the tiny ones
        overrides.pop(key)
    root = tmp_path / "bundle"
    train_demo(root, demo_dataset, **overrides)
    cache_dir = root / "outputs" / "latent_cache"
    info = json.loads((cache_dir / "info.json").read_text())
    # demo.json's autoencoder: 4x32x32 latents, mean and log-variance
    assert info["shape"][1:] == [NUM_VARIANTS, 8, 32, 32] and info["key"]["patch_size"] == 64
    assert torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)["iteration"] == 2
    stat = os.stat(cache_dir / "latents.npy")

    overrides.update(num_iterations=4)  # the same command with more iterations resumes from checkpoint_2.pt
    train_demo(root, demo_dataset, **overrides)
    assert torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)["iteration"] == 4
    after = os.stat(cache_dir / "latents.npy")
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)  # reused, not encoded again
