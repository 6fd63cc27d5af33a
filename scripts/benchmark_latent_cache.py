"""Stage 2 of the demo on cached latents against the image path, in one process.

Measured:

1. The stage-2 trainer of ``configs/train.json`` + ``configs/demo.json`` (``train#trainer``: its loader, prepare
   batch, UNet forward/backward, AdamW, EMA, gradient clipping) run for ``--warmup + --iterations`` iterations with
   ``latent_cache`` false (read cached patches, flips / rotations / stain jitter, encode every step) and true
   (draw a variant from the latent cache, sample the posterior); iterations/s over the last ``--iterations``, and the
   ratio to the image path. Validation, the final sample grid and the model export run after the timed window.
2. The time to build the latent cache (every training spot read and encoded in 8 variants), to open it again, and
   its size: the demo's, and for 512-px patches (4x64x64 latents of train.json's autoencoder) per 1,000 spots.
3. How far the encoder is from equivariant: ``|enc(g x) - g enc(x)| / |enc(x)|`` (posterior means, over all cached
   spots) for each flip / rotation ``g``, from the cache itself.
4. What the cached path leaves out: the change of the posterior mean under the image path's stain jitter
   (``RandHEStainJitter`` with the config's sigma and bias, always applied), against the posterior standard
   deviation that the training samples every step; and the float16 storage error.

The demo dataset (``datasets/demo/dataset``) and the demo autoencoder (``models/autoencoder.pt``) of ``--bundle-root``
are read, never written: the runs write into a temporary folder holding a copy of the autoencoder. Example (CPU,
about 5 minutes on 2 cores):

    python scripts/benchmark_latent_cache.py --iterations 100
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.latent_cache import NUM_VARIANTS, dihedral, latent_cache_nbytes  # noqa: E402


def load_config(root: Path, work: Path, output: str, overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(root / "configs/train.json"), str(root / "configs/demo.json")])
    parser["bundle_root"] = str(root)
    parser["ckpt_dir"] = str(work / "models")
    parser["output_dir"] = str(work / output)  # one per path: a run would resume from the other's checkpoint
    for key, value in overrides.items():
        parser[key] = value
    return parser


def run_stage2(root: Path, work: Path, cached: bool, warmup: int, iterations: int) -> dict:
    """Build the stage-2 trainer with or without the latent cache and time its iterations."""
    from ignite.engine import Events

    total = warmup + iterations
    parser = load_config(
        root,
        work,
        "outputs_cached" if cached else "outputs_images",
        {
            "latent_cache": cached,
            "num_iterations": total,
            "epoch_length": total,
            "sample_interval": total + 1,
            "num_val_spots": 16,
            "num_inference_steps": 2,
        },
    )
    start = time.perf_counter()
    parser.get_parsed_content("train#dataset")  # the image path's CacheDataset (not filled on the cached path)
    loaded = time.perf_counter()
    latent_dataset = parser.get_parsed_content("train#latent_dataset")
    built = time.perf_counter()
    trainer = parser.get_parsed_content("train#trainer")
    ready = time.perf_counter()
    stamps: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: stamps.append(time.perf_counter()))
    trainer.run()
    rate = iterations / (stamps[-1] - stamps[warmup - 1])
    return {
        "path": "cached latents" if cached else "images (encode every step)",
        "load_s": loaded - start,
        "cache_s": built - loaded,
        "setup_s": ready - start,
        "rate": rate,
        "batch": parser.get_parsed_content("batch_size"),
        "latent_dataset": latent_dataset,
        "parser": parser,
    }


def equivariance_gaps(latents: np.ndarray, channels: int) -> list[float]:
    """``|enc(g x) - g enc(x)| / |enc(x)|`` of the posterior means, per variant, over all cached spots."""
    means = torch.from_numpy(np.asarray(latents[:, :, :channels], dtype=np.float32))
    base = means[:, 0]
    return [float((means[:, v] - dihedral(base, v)).norm() / base.norm()) for v in range(NUM_VARIANTS)]


def stain_and_storage(parser, num_spots: int = 128) -> dict:
    """Posterior-mean change under the config's stain jitter, and the float16 storage error, on ``num_spots`` spots."""
    from bundle.latent_cache import cache_image_transform
    from bundle.transforms import RandHEStainJitter, RandHEStainJitterd

    autoencoder = parser.get_parsed_content("frozen_autoencoder")
    jitter_d = next(t for t in parser.get_parsed_content("augmentations") if isinstance(t, RandHEStainJitterd))
    sigma, bias = jitter_d.jitter.sigma, jitter_d.jitter.bias
    entries = parser.get_parsed_content("train_datalist")[:num_spots]
    read = cache_image_transform(parser["patch_fov_um"], parser["patch_size"], parser.get_parsed_content("wsi_backend"))
    images = torch.stack([read(dict(e))["image"] for e in entries])
    jitter = RandHEStainJitter(prob=1.0, sigma=sigma, bias=bias)
    jitter.set_random_state(0)
    jittered = torch.stack([jitter(((im + 1) * 127.5).round().to(torch.uint8)) for im in images]).float() / 127.5 - 1
    with torch.no_grad():
        mean, std = autoencoder.encode(images)
        mean_j, _ = autoencoder.encode(jittered)
    change = mean_j - mean
    return {
        "sigma": sigma,
        "bias": bias,
        "relative": float(change.norm() / mean.norm()),
        "rms_over_std": float(change.pow(2).mean().sqrt() / std.mean()),
        "std_over_mean_spread": float(std.mean() / mean.std()),
        "float16_relative": float((mean.half().float() - mean).norm() / mean.norm()),
    }


def report(results: list[dict], cache_info: dict, gaps: list[float], stain: dict, reopen_s: float) -> None:
    base = results[0]["rate"]
    print(f"\ntorch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print("\n| stage-2 path | batch | setup (s) | it/s | s/it | ratio to image path |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['path']} | {r['batch']} | {r['setup_s']:.1f} | {r['rate']:.2f} | {1 / r['rate']:.3f} | "
            f"{r['rate'] / base:.2f} |"
        )
    shape, dtype = cache_info["shape"], cache_info["key"]["dtype"]
    size = latent_cache_nbytes(shape[0], shape[2] // 2, shape[3], dtype)
    print(f"\nlatent cache: {shape[0]} spots x {NUM_VARIANTS} variants, shape {shape} {dtype}, {size / 2**20:.1f} MiB")
    print(f"built in {results[1]['cache_s']:.1f} s (read + encode), opened again in {reopen_s:.2f} s")
    for dt in ("float16", "float32"):
        per_1000 = latent_cache_nbytes(1000, 4, 64, dt)
        print(f"512-px patches (4x64x64 latents), {dt}: {per_1000 / 2**30:.2f} GiB per 1,000 spots")
    print("\n| variant | 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7 |")
    print("|---|" + "---:|" * NUM_VARIANTS)
    print("| \\|enc(g x) - g enc(x)\\| / \\|enc(x)\\| | " + " | ".join(f"{g:.3f}" for g in gaps) + " |")
    print(
        f"\nstain jitter (sigma {stain['sigma']}, bias {stain['bias']}, always applied): posterior mean changes by "
        f"{stain['relative']:.3f} of its norm, {stain['rms_over_std']:.3f} of the mean posterior std (which the "
        f"training samples every step); posterior std / spread of the means {stain['std_over_mean_spread']:.3f}; "
        f"float16 storage error {stain['float16_relative']:.1e} of the norm"
    )


def main(argv: list[str] | None = None) -> None:
    from bundle.latent_cache import LatentCacheDataset, open_latent_cache

    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--bundle-root", type=Path, default=ROOT, help="bundle with models/ and datasets/demo")
    cli.add_argument("--iterations", type=int, default=100, help="timed iterations per path")
    cli.add_argument("--warmup", type=int, default=5, help="iterations before the timed window")
    cli.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = cli.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    source = args.bundle_root / "models" / "autoencoder.pt"
    if not source.is_file():
        raise SystemExit(f"{source} does not exist: train the demo's stage 1 first (see docs/training.md).")
    with tempfile.TemporaryDirectory(prefix="latent_cache_benchmark_") as tmp:
        work = Path(tmp)
        (work / "models").mkdir()
        shutil.copy2(source, work / "models" / "autoencoder.pt")
        results = [run_stage2(args.bundle_root, work, cached, args.warmup, args.iterations) for cached in (False, True)]
        dataset, parser = results[1]["latent_dataset"], results[1]["parser"]
        start = time.perf_counter()  # what a resumed run does: hash the autoencoder and slides, check, open
        LatentCacheDataset(
            dataset.data,
            None,
            dataset.cache_dir,
            parser.get_parsed_content("frozen_autoencoder"),
            work / "models" / "autoencoder.pt",
            parser["patch_fov_um"],
            parser["patch_size"],
            dtype=dataset.key["dtype"],
        )
        reopen_s = time.perf_counter() - start
        latents, info = open_latent_cache(dataset.cache_dir, dataset.key)
        gaps = equivariance_gaps(latents, dataset.channels)
        stain = stain_and_storage(parser)
        report(results, info, gaps, stain, reopen_s)


if __name__ == "__main__":
    main()
