"""Sampling throughput and peak memory: patches per second and whole synthetic slides.

Measured:

1. Patches: :class:`bundle.sampling.pipeline.ExpressionToTissuePipeline` at 25 and 50 DDIM steps for batch sizes 1, 8 and 32,
   with classifier-free guidance as one batched forward over ``[null, condition]`` and as two forwards; patches/s, the
   ratio of the two CFG modes (timed interleaved in this process) and peak memory (CPU: peak RSS sampled every
   millisecond, and its rise over the RSS before the call; CUDA: ``max_memory_allocated``). On CUDA the same table
   also runs at the default size of ``configs/train.json`` (512 px, 4x64x64 latents) in bf16 autocast.
2. Whole slides: :func:`bundle.sampling.slide.synthesize_slide` for synthetic hex arrays of 1x, 2x and 4x the number of spots
   (the area grows, the spot density stays); seconds, seconds per spot (should stay flat: time linear in the spots)
   and peak memory (should stay flat: the slide is streamed).

The networks are built from the configs with random weights (speed does not depend on the weights), or loaded from
``--model-path``/``--autoencoder-path``. Example (CPU, demo sizes, about 10 minutes on 2 cores):

    python scripts/benchmark_sampling.py --rounds 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.profiling import PeakMemory, sync  # noqa: E402


def build_pipeline(config_files: list[str], overrides: dict, device: torch.device, num_genes: int = 128):
    """Pipeline of the config's ``network_def`` + autoencoder (random weights), DDIM scheduler."""
    from monai.bundle import ConfigParser

    from bundle.autoencoder import build_autoencoder
    from bundle.sampling.pipeline import ExpressionToTissuePipeline

    parser = ConfigParser()
    parser.read_config(config_files)
    parser["bundle_root"] = str(ROOT)
    parser["num_genes"] = num_genes
    for k, v in overrides.items():
        parser[k] = v
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def").to(device).eval()
    autoencoder = build_autoencoder(parser.get_parsed_content("autoencoder_kwargs")).to(device).eval()
    latent = [parser.get_parsed_content(k) for k in ("latent_channels", "latent_size", "latent_size")]
    scheduler = parser.get_parsed_content("sample_scheduler")
    pipeline = ExpressionToTissuePipeline(network, autoencoder, scheduler, scale_factor=1.0, latent_shape=latent)
    return pipeline, parser


def condition_batch(pipeline, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = pipeline.network.num_neighbors or 0
    shape = (batch, 1 + k, pipeline.network.num_genes) if k else (batch, pipeline.network.num_genes)
    return torch.rand(shape, generator=g) * 3


def patch_rows(pipeline, device, steps_list, batches, rounds: int, amp: bool) -> list[dict]:
    """Time both CFG modes interleaved for every (steps, batch); median seconds per call."""
    from bundle.sampling.pipeline import seeded_generators

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    rows = []
    for steps in steps_list:
        for batch in batches:
            cond = condition_batch(pipeline, batch)

            def call(batched: bool):
                pipeline.batched_guidance = batched
                with autocast:
                    pipeline(
                        cond, num_inference_steps=steps, guidance_scale=3.0, generator=seeded_generators(range(batch))
                    )

            call(True)  # warm-up (allocator, kernels)
            secs = {True: [], False: []}
            peaks = {}
            for r in range(rounds):
                for batched in (True, False):
                    sync(device)
                    with PeakMemory(device) as memory:
                        t = time.perf_counter()
                        call(batched)
                        sync(device)
                        secs[batched].append(time.perf_counter() - t)
                    if r == 0:
                        peaks[batched] = (memory.peak_mib, memory.delta_mib)
            for batched in (True, False):
                sec = statistics.median(secs[batched])
                rows.append(
                    {
                        "steps": steps,
                        "batch": batch,
                        "cfg": "batched" if batched else "two forwards",
                        "sec": sec,
                        "ratio": statistics.median(secs[False]) / statistics.median(secs[True]),
                        "peak": peaks[batched][0],
                        "delta": peaks[batched][1],
                    }
                )
            print(f"  steps {steps} batch {batch}: {batch / statistics.median(secs[True]):.2f} patches/s", flush=True)
    return rows


def print_patch_table(title: str, rows: list[dict], device) -> None:
    mem = "peak CUDA memory allocated (MiB)" if device.type == "cuda" else "peak RSS (MiB)"
    print(f"\n### {title}\n")
    print(
        "| DDIM steps | batch | CFG | patches/s | s per call | two forwards ÷ batched (time) | "
        f"{mem} | rise during the call (MiB) |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['steps']} | {r['batch']} | {r['cfg']} | {r['batch'] / r['sec']:.2f} | {r['sec']:.2f} | "
            f"{r['ratio']:.2f} | {r['peak']:.0f} | {r['delta']:.0f} |"
        )


def hex_array(num_spots: int, pitch_um: float = 100.0, aspect: float = 1.0) -> np.ndarray:
    """Centres (µm) of about ``num_spots`` spots on a Visium-like hex lattice filling a rectangle."""
    rows = max(1, round(math.sqrt(num_spots / aspect / 0.866)))
    cols = max(1, math.ceil(num_spots / rows))
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    x = c * pitch_um + (r % 2) * pitch_um / 2
    y = r * pitch_um * math.sqrt(3) / 2
    return np.stack([x.ravel(), y.ravel()], axis=1)[:num_spots].astype(np.float64)


def slide_table(pipeline, parser, device, base_spots: int, steps: int) -> None:
    """Whole-slide time and peak memory for 1x, 2x and 4x the spots (the slide grows in height)."""
    import tempfile

    from bundle.sampling.slide import synthesize_slide

    fov = float(parser.get_parsed_content("patch_fov_um"))
    genes = pipeline.network.num_genes
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for factor in (1, 2, 4):
            positions = hex_array(base_spots * factor, aspect=1.0 / factor)  # same width, taller slide
            expression = np.random.default_rng(factor).gamma(1.0, 1.0, (len(positions), genes)).astype(np.float32)
            with PeakMemory(device) as memory:
                t = time.perf_counter()
                info = synthesize_slide(
                    pipeline,
                    positions,
                    expression,
                    Path(tmp) / f"slide_{factor}.tif",
                    patch_fov_um=fov,
                    num_inference_steps=steps,
                    guidance_scale=3.0,
                    seed=0,
                    batch_size=16,
                )
                sync(device)
                sec = time.perf_counter() - t
            rows.append((factor, len(positions), info, sec, memory))
            print(f"  {factor}x: {len(positions)} spots in {sec:.1f} s", flush=True)
    mem = "peak CUDA memory allocated (MiB)" if device.type == "cuda" else "peak RSS (MiB)"
    print(f"\n### Whole slides: {steps} DDIM steps, guidance 3.0, 50% window overlap, batch 16\n")
    print(f"| spots | slide (px) | s | s per spot | time ÷ 1x | {mem} | rise during the call (MiB) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    base = rows[0][3]
    for factor, n, info, sec, memory in rows:
        shape = "x".join(str(v) for v in info["shape"][:2])
        print(
            f"| {n} ({factor}x) | {shape} | {sec:.1f} | {sec / n:.3f} | {sec / base:.2f} | {memory.peak_mib:.0f} | "
            f"{memory.delta_mib:.0f} |"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config-file",
        nargs="+",
        default=["configs/train.json", "configs/demo.json"],
        help="bundle configs that define network_def and the autoencoder (default: the demo sizes)",
    )
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per configuration (median reported)")
    ap.add_argument("--slide-spots", type=int, default=48, help="spots of the 1x slide (0 skips the slide table)")
    ap.add_argument("--slide-steps", type=int, default=10)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    files = [str(ROOT / f) if not Path(f).is_absolute() else f for f in args.config_file]
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )

    with torch.inference_mode():
        pipeline, parser = build_pipeline(files, {}, device)
        size = parser.get_parsed_content("patch_size")
        rows = patch_rows(pipeline, device, args.steps, args.batch_sizes, args.rounds, amp=False)
        print_patch_table(
            f"Patches: {size} px, latents {'x'.join(map(str, pipeline.latent_shape))}, fp32, "
            f"guidance 3.0, median of {args.rounds} rounds after a warm-up",
            rows,
            device,
        )
        if device.type == "cuda":
            default, _ = build_pipeline([str(ROOT / "configs/train.json")], {}, device)
            rows = patch_rows(default, device, args.steps, args.batch_sizes, args.rounds, amp=True)
            print_patch_table(
                f"Patches: 512 px (train.json defaults), latents {'x'.join(map(str, default.latent_shape))}, "
                f"bf16 autocast",
                rows,
                device,
            )
        if args.slide_spots > 0:
            slide_table(pipeline, parser, device, args.slide_spots, args.slide_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
