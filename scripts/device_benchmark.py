"""One-shot GPU benchmark of the default (512-px) path: training, sampling, whole slides and the loader in one command.

Run once on a CUDA machine (about 6-8 minutes on one H100/H200, no network), it prints Markdown tables and writes
``device_benchmark.json`` and ``device_benchmark.md`` into ``--out-dir`` (default ``docs/``):

1. **Device**: name, torch/MONAI/diffusers versions, the datasheet dense bf16 peak and the measured rate of a large
   bf16 matrix product (the two denominators of model FLOPs utilisation).
2. **Stage-2 training** at the defaults of ``configs/train.json`` (512 px, 4x64x64 latents, default UNet and
   GeneCondNet, bf16 autocast) at batch 16 and 32: this bundle's ``GeneConditionedUNet`` (MONAI
   ``DiffusionModelUNet``) against a diffusers ``UNet2DConditionModel`` of matched size, timed interleaved. A step is
   what the trainer does: encode the batch with the frozen autoencoder (fp32, outside autocast, as
   ``SupervisedTrainer`` calls ``prepare_batch``), noise and v-target, forward under autocast, MSE, backward, gradient
   clipping, AdamW. FLOPs of the UNet's forward + backward are counted once with ``torch.utils.flop_counter``;
   MFU = those FLOPs per second over the peak. Peak memory is ``torch.cuda.max_memory_allocated``.
3. **Speed levers**, cumulative, at batch 16 with the MONAI UNet: the 0.5.0 path; + cached latents (no encode in the
   step); + fused AdamW; + scaled-dot-product (flash) attention (``use_flash_attention``); + ``channels_last``;
   + ``torch.compile`` (compile time reported separately; run last, only if the time budget allows).
4. **Stage-1 training**: the bundle's real ``SupervisedTrainer`` + ``AutoencoderKLIteration`` (default
   ``AutoencoderKL`` and ``PatchDiscriminator``, bf16 autocast), without and with the adversarial step.
5. **Sampling**: ``ExpressionToTissuePipeline`` (DDIM, batched classifier-free guidance, bf16 autocast) at 25 and 50
   steps, batch 1 and 16: seconds per patch.
6. **Whole slide**: ``synthesize_slide`` on a synthetic hex array: windows/s and seconds per spot.
7. **Loader**: ``LoadWSIPatchd`` + the training augmentations and final transforms of ``configs/train.json`` at 512 px
   from a generated JPEG-tiled pyramidal TIFF (tifffile backend), in one process and with 8 ``DataLoader`` workers,
   against the raw tifffile reader and against the stage-2 step rate.

Every section is timed after warm-up; ratios compare configurations timed in the same process. A section that fails
records its error and the rest still run; the JSON is rewritten after each section, so a run cut short keeps what it
measured. ``--smoke`` runs every section on the CPU at the demo sizes (``configs/demo.json``) with a few steps, to
keep the script working without a GPU (torch.compile is skipped there unless ``--compile`` is given).

    python scripts/device_benchmark.py                 # on the GPU machine; writes docs/device_benchmark.*
    python scripts/device_benchmark.py --smoke --out-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_train import load_config  # noqa: E402
from device_benchmark_report import render  # noqa: E402
from device_benchmark_steps import (  # noqa: E402
    LEVERS,
    TrainStep,
    datasheet_peak,
    measured_matmul_peak,
    peak_mib,
    reset_peak,
    step_memory,
    time_interleaved,
)

from bundle.profiling import sync  # noqa: E402

FULL = {
    "demo": False,
    "batches": (16, 32),
    "lever_batch": 16,
    "warmup": 3,
    "steps": 12,
    "rounds": 3,
    "ae_batch": 16,
    "ae_steps": 6,
    "sample_steps": (25, 50),
    "sample_batches": (1, 16),
    "slide_spots": 48,
    "slide_steps": 25,
    "loader_patches": 512,
    "loader_workers": 8,
    "slide_side": 8192,
    "matmul": 8192,
    "scaling_batches": (16, 64, 128),
    "profile_steps": 5,
}
SMOKE = {
    "demo": True,
    "batches": (2,),
    "lever_batch": 2,
    "warmup": 1,
    "steps": 2,
    "rounds": 1,
    "ae_batch": 2,
    "ae_steps": 1,
    "sample_steps": (2,),
    "sample_batches": (1, 2),
    "slide_spots": 6,
    "slide_steps": 2,
    "loader_patches": 16,
    "loader_workers": 2,
    "slide_side": 1024,
    "matmul": 256,
    "scaling_batches": (2, 4),
    "profile_steps": 2,
}


SECTIONS = (
    "stage2_training",
    "speed_levers",
    "batch_scaling",
    "profile",
    "stage1_training",
    "stage1_levers",
    "sampling",
    "whole_slide",
    "loader",
    "torch_compile",
)


class Benchmark:
    def __init__(self, args, settings: dict) -> None:
        self.args, self.s = args, settings
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.start = time.perf_counter()
        self.results: dict = {"sections": {}, "errors": {}, "skipped": []}
        self.out_dir = Path(args.out_dir)
        self.parser = load_config(ROOT, settings["demo"])
        self.parser["num_genes"] = args.num_genes
        self.parser["num_neighbors"] = 6
        self.autoencoder = None

    # ---------------------------------------------------------------- helpers
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        (self.out_dir / "device_benchmark.json").write_text(json.dumps(self.results, indent=2, default=float))
        (self.out_dir / "device_benchmark.md").write_text(self.markdown())

    def section(self, name: str, fn, min_left_s: float = 0.0) -> None:
        left = self.args.budget_s - self.elapsed()
        if left < min_left_s:
            self.results["skipped"].append(f"{name}: {left:.0f} s of the time budget left, needs {min_left_s:.0f}")
            print(f"[skip] {name} ({left:.0f} s left)", flush=True)
            self.save()
            return
        print(f"[{self.elapsed():6.1f} s] {name} ...", flush=True)
        try:
            self.results["sections"][name] = fn()
        except Exception as error:  # one failing section must not lose the others' numbers
            self.results["errors"][name] = "".join(traceback.format_exception_only(type(error), error)).strip()
            traceback.print_exc()
        finally:
            reset_peak(self.device)
        self.save()

    def get_autoencoder(self):
        if self.autoencoder is None:
            torch.manual_seed(0)  # random weights of the configured architecture: timing only
            self.autoencoder = self.parser.get_parsed_content("autoencoder_def", lazy=False).to(self.device).eval()
        return self.autoencoder, 1.0

    def peak(self) -> float | None:
        return datasheet_peak(self.results["device"]["name"])

    # ---------------------------------------------------------------- sections
    def device_info(self) -> dict:
        import monai

        try:
            import diffusers

            diffusers_version = diffusers.__version__
        except ImportError:
            diffusers_version = None
        cuda = self.device.type == "cuda"
        name = torch.cuda.get_device_name(self.device) if cuda else f"CPU ({platform.processor() or 'unknown'})"
        info = {
            "name": name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "monai": monai.__version__,
            "diffusers": diffusers_version,
            "threads": torch.get_num_threads(),
            "datasheet_bf16_tflops": (datasheet_peak(name) or 0) / 1e12 or None,
            "measured_bf16_matmul_tflops": measured_matmul_peak(self.device, self.s["matmul"]) / 1e12,
            "smoke": bool(self.args.smoke),
            "config": "train.json + demo.json" if self.s["demo"] else "train.json (defaults)",
        }
        if cuda:
            info["memory_gib"] = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        self.results["device"] = info
        return info

    def mfu(self, flops: int, sec: float) -> dict:
        out = {"tflops_per_s": flops / sec / 1e12}
        peak = self.peak()
        out["mfu_datasheet"] = flops / sec / peak if peak else None
        measured = self.results["device"]["measured_bf16_matmul_tflops"] * 1e12
        out["mfu_measured_matmul"] = flops / sec / measured
        return out

    def stage2(self) -> list[dict]:
        autoencoder, scale = self.get_autoencoder()
        rows = []
        for batch in self.s["batches"]:
            steps = {
                kind: TrainStep(self.parser, kind, self.device, batch, autoencoder, scale)
                for kind in ("monai", "diffusers")
            }
            secs = time_interleaved(steps, self.device, self.s["steps"], self.s["warmup"], self.s["rounds"])
            for kind, step in steps.items():
                flops = step.unet_flops()
                rows.append(
                    {
                        "batch": batch,
                        "unet": kind,
                        "unet_params_m": sum(p.numel() for p in step.network.unet.parameters()) / 1e6,
                        "latent": list(step.latents.shape[1:]),
                        "sec_per_step": secs[kind],
                        "images_per_s": batch / secs[kind],
                        "ratio_to_monai": secs["monai"] / secs[kind],
                        "unet_gflops_per_step": flops / 1e9,
                        "peak_mib": step_memory(step, self.device),
                        **self.mfu(flops, secs[kind]),
                    }
                )
            del steps
        return rows

    def _lever_rows(self, secs: dict, memory: dict, flops: int, batch: int, base: float) -> list[dict]:
        rows, previous = [], None
        for name, sec in secs.items():
            rows.append(
                {
                    "lever": name,
                    "batch": batch,
                    "sec_per_step": sec,
                    "images_per_s": batch / sec,
                    "speedup_vs_current": base / sec,
                    "speedup_vs_previous": (previous / sec) if previous else 1.0,
                    "peak_mib": memory[name],
                    **self.mfu(flops, sec),
                }
            )
            previous = sec
        return rows

    def levers(self) -> list[dict]:
        autoencoder, scale = self.get_autoencoder()
        batch = self.s["lever_batch"]
        kwargs, steps = {}, {}
        for name, extra in LEVERS:
            kwargs = {**kwargs, **extra}
            steps[name] = TrainStep(self.parser, "monai", self.device, batch, autoencoder, scale, **kwargs)
        flops = steps[LEVERS[0][0]].unet_flops()
        secs = time_interleaved(steps, self.device, self.s["steps"], self.s["warmup"], self.s["rounds"])
        memory = {name: step_memory(step, self.device) for name, step in steps.items()}
        self.results["lever_flops"] = flops
        return self._lever_rows(secs, memory, flops, batch, secs[LEVERS[0][0]])

    def compiled(self) -> list[dict]:
        """All levers, eager against ``torch.compile`` (default mode), timed interleaved; compile time apart."""
        autoencoder, scale = self.get_autoencoder()
        batch = self.s["lever_batch"]
        kwargs = {k: v for _, extra in LEVERS for k, v in extra.items()}
        eager_name, compiled_name = LEVERS[-1][0], "+ torch.compile"
        steps = {
            eager_name: TrainStep(self.parser, "monai", self.device, batch, autoencoder, scale, **kwargs),
            compiled_name: TrainStep(
                self.parser, "monai", self.device, batch, autoencoder, scale, compile=True, **kwargs
            ),
        }
        t = time.perf_counter()
        steps[compiled_name]()
        sync(self.device)
        self.results["compile_s"] = time.perf_counter() - t
        flops = self.results.get("lever_flops") or steps[eager_name].unet_flops()
        secs = time_interleaved(steps, self.device, self.s["steps"], self.s["warmup"], self.s["rounds"])
        memory = {name: step_memory(step, self.device) for name, step in steps.items()}
        current = {row["lever"]: row for row in self.results["sections"].get("speed_levers", [])}
        base = (
            current[LEVERS[0][0]]["sec_per_step"] * secs[eager_name] / current[eager_name]["sec_per_step"]
            if current
            else secs[eager_name]
        )
        return self._lever_rows(secs, memory, flops, batch, base)

    def batch_scaling(self) -> list[dict]:
        """All eager levers at growing batch sizes: how far the step is from the arithmetic bound."""
        autoencoder, scale = self.get_autoencoder()
        kwargs = {k: v for _, extra in LEVERS for k, v in extra.items()}
        rows = []
        for batch in self.s["scaling_batches"]:
            step = TrainStep(self.parser, "monai", self.device, batch, autoencoder, scale, **kwargs)
            flops = step.unet_flops()
            sec = time_interleaved({"step": step}, self.device, self.s["steps"], self.s["warmup"], 1)["step"]
            rows.append(
                {
                    "batch": batch,
                    "sec_per_step": sec,
                    "images_per_s": batch / sec,
                    "peak_mib": step_memory(step, self.device),
                    **self.mfu(flops, sec),
                }
            )
            del step
        return rows

    def stage1_levers(self) -> list[dict]:
        """Stage 1 (adversarial step on) at the default batch: SDPA attention and activation checkpointing."""
        plan = [
            ("default", {}, self.s["ae_batch"]),
            ("default, half batch", {}, max(1, self.s["ae_batch"] // 2)),
            ("use_flash_attention", {"use_flash_attention": True}, self.s["ae_batch"]),
            (
                "use_flash_attention + use_checkpoint",
                {"use_flash_attention": True, "use_checkpoint": True},
                self.s["ae_batch"],
            ),
        ]
        rows = []
        for name, extra, batch in plan:
            cfg = dict(self.parser.get("autoencoder_def"))
            cfg.update(extra)
            self.parser["autoencoder_def_bench"] = cfg
            autoencoder = self.parser.get_parsed_content("autoencoder_def_bench", lazy=False).to(self.device)
            row = self._stage1_row(autoencoder, batch, adversarial=True)
            rows.append({"variant": name, **row})
        return rows

    def profile(self) -> dict:
        """CUDA kernel time against wall time of the all-levers step (batch as the levers): where the step goes."""
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        autoencoder, scale = self.get_autoencoder()
        kwargs = {k: v for _, extra in LEVERS for k, v in extra.items()}
        step = TrainStep(self.parser, "monai", self.device, self.s["lever_batch"], autoencoder, scale, **kwargs)
        for _ in range(self.s["warmup"]):
            step()
        n = self.s["profile_steps"]
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        sync(self.device)
        t = time.perf_counter()
        with torch_profile(activities=activities) as prof:
            for _ in range(n):
                step()
            sync(self.device)
        wall = (time.perf_counter() - t) / n
        events = prof.key_averages()
        attr = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        kernels = [
            e
            for e in events
            if getattr(e, attr, 0) > 0 and (self.device.type != "cuda" or e.device_type.name == "CUDA")
        ]
        busy = sum(getattr(e, attr) for e in kernels) / 1e6 / n
        launches = sum(e.count for e in kernels) / n
        top = sorted(kernels, key=lambda e: getattr(e, attr), reverse=True)[:12]
        return {
            "batch": self.s["lever_batch"],
            "wall_s_per_step": wall,
            "kernel_s_per_step": busy,
            "device_busy_fraction": busy / wall,
            "kernels_per_step": launches,
            "top": [
                {"name": e.key[:90], "s_per_step": getattr(e, attr) / 1e6 / n, "calls_per_step": e.count / n}
                for e in top
            ],
        }

    def stage1(self) -> list[dict]:
        rows = []
        for adversarial in (False, True):
            autoencoder = self.parser.get_parsed_content("autoencoder_def", lazy=False).to(self.device)
            rows.append(self._stage1_row(autoencoder, self.s["ae_batch"], adversarial))
        return rows

    def _stage1_row(self, autoencoder: nn.Module, batch: int, adversarial: bool) -> dict:
        """The bundle's SupervisedTrainer + AutoencoderKLIteration for warm-up + timed iterations on one batch."""
        from ignite.engine import Events
        from monai.engines import SupervisedTrainer
        from monai.utils import set_determinism

        from bundle.autoencoder import AutoencoderKLIteration

        set_determinism(0)
        size = int(self.parser["patch_size"])
        discriminator = self.parser.get_parsed_content("discriminator_def", lazy=False).to(self.device)
        d_opt = torch.optim.Adam(discriminator.parameters(), lr=2e-4)
        iteration = AutoencoderKLIteration(
            discriminator, d_opt, adv_weight=0.01, adv_start_iteration=0 if adversarial else 10**9
        )
        images = torch.rand(batch, 3, size, size) * 2 - 1
        n = self.s["warmup"] + self.s["ae_steps"]
        trainer = SupervisedTrainer(
            device=self.device,
            max_epochs=1,
            epoch_length=n,
            train_data_loader=[{"image": images} for _ in range(n)],
            network=autoencoder,
            optimizer=torch.optim.Adam(autoencoder.parameters(), lr=1e-4),
            loss_function=nn.L1Loss(),
            iteration_update=iteration,
            amp=self.device.type == "cuda",
            amp_kwargs={"dtype": torch.bfloat16},
            decollate=False,
        )
        marks = []
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED, lambda _: (sync(self.device), marks.append(time.perf_counter()))
        )
        reset_peak(self.device)
        trainer.run()
        loss = float(trainer.state.output["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"stage 1 loss {loss}")
        sec = float(np.median(np.diff(marks[max(0, self.s["warmup"] - 1) :])))
        return {
            "adversarial": adversarial,
            "batch": batch,
            "sec_per_step": sec,
            "images_per_s": batch / sec,
            "peak_mib": peak_mib(self.device),
            "autoencoder_params_m": sum(p.numel() for p in autoencoder.parameters()) / 1e6,
        }

    def pipeline(self):
        from bundle.sampling.pipeline import ExpressionToTissuePipeline

        torch.manual_seed(0)
        network = self.parser.get_parsed_content("network_def", lazy=False).to(self.device).eval()
        autoencoder, scale = self.get_autoencoder()
        latent = [self.parser.get_parsed_content(k) for k in ("latent_channels", "latent_size", "latent_size")]
        scheduler = self.parser.get_parsed_content("sample_scheduler", lazy=False)
        return ExpressionToTissuePipeline(network, autoencoder, scheduler, scale_factor=scale, latent_shape=latent)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()

    def sampling(self) -> list[dict]:
        from bundle.sampling.pipeline import seeded_generators

        pipe = self.pipeline()
        genes, k = pipe.network.num_genes, pipe.network.num_neighbors or 0
        rows = []
        with torch.inference_mode(), self.autocast():
            for steps in self.s["sample_steps"]:
                for batch in self.s["sample_batches"]:
                    cond = torch.rand((batch, 1 + k, genes) if k else (batch, genes)) * 3

                    def call():
                        return pipe(
                            cond,
                            num_inference_steps=steps,
                            guidance_scale=3.0,
                            generator=seeded_generators(range(batch)),
                        )

                    call()  # warm-up
                    reset_peak(self.device)
                    times = []
                    for _ in range(max(1, self.s["rounds"] - 1)):
                        sync(self.device)
                        t = time.perf_counter()
                        out = call()
                        sync(self.device)
                        times.append(time.perf_counter() - t)
                    if not torch.isfinite(out.float()).all():
                        raise FloatingPointError("non-finite samples")
                    sec = statistics.median(times)
                    rows.append(
                        {
                            "ddim_steps": steps,
                            "batch": batch,
                            "sec_per_call": sec,
                            "sec_per_patch": sec / batch,
                            "patches_per_s": batch / sec,
                            "image": list(out.shape[1:]),
                            "peak_mib": peak_mib(self.device),
                        }
                    )
        return rows

    def whole_slide(self) -> dict:
        from benchmark_sampling import hex_array

        from bundle.sampling.slide import synthesize_slide

        pipe = self.pipeline()
        positions = hex_array(self.s["slide_spots"])
        expression = (
            np.random.default_rng(0).gamma(1.0, 1.0, (len(positions), pipe.network.num_genes)).astype(np.float32)
        )
        fov = float(self.parser.get_parsed_content("patch_fov_um"))
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode(), self.autocast():
            reset_peak(self.device)
            t = time.perf_counter()
            info = synthesize_slide(
                pipe,
                positions,
                expression,
                Path(tmp) / "slide.tif",
                patch_fov_um=fov,
                num_inference_steps=self.s["slide_steps"],
                guidance_scale=3.0,
                seed=0,
                batch_size=16,
            )
            sync(self.device)
            sec = time.perf_counter() - t
        return {
            "spots": len(positions),
            "windows": info["windows"],
            "shape": list(info["shape"]),
            "ddim_steps": self.s["slide_steps"],
            "sec": sec,
            "windows_per_s": info["windows"] / sec,
            "sec_per_spot": sec / len(positions),
            "peak_mib": peak_mib(self.device),
        }

    def loader(self) -> list[dict]:
        from monai.data import DataLoader, Dataset
        from monai.transforms import Compose

        from bundle.io.tiff import write_pyramidal_tiff
        from bundle.transforms import LoadWSIPatchd

        side, size, mpp = self.s["slide_side"], int(self.parser["patch_size"]), 0.25
        fov = float(self.parser["patch_fov_um"])
        pixels = int(round(fov / mpp))
        rng = np.random.default_rng(0)
        coarse = rng.integers(120, 250, (side // 64, side // 64, 3), dtype=np.uint8)
        image = np.repeat(np.repeat(coarse, 64, 0), 64, 1)
        image = np.clip(image.astype(np.int16) + rng.integers(-25, 25, image.shape, dtype=np.int16), 0, 255)
        n = self.s["loader_patches"]
        half = pixels // 2 + 1
        centres = rng.uniform(half, side - half, (n, 2))
        batch = self.s["lever_batch"]
        with tempfile.TemporaryDirectory() as tmp:
            path = str(write_pyramidal_tiff(Path(tmp) / "slide.tif", image.astype(np.uint8), mpp=mpp))
            del image
            raw = self._raw_tifffile(path, centres, pixels)
            entries = [
                {"image": path, "location": [float(x), float(y)], "mpp": mpp, "expression": np.zeros(8, np.float32)}
                for x, y in centres
            ]
            transform = Compose(
                [LoadWSIPatchd("image", fov_um=fov, size=size, backend="tifffile")]
                + self.parser.get_parsed_content("augmentations")
                + self.parser.get_parsed_content("final_transforms")
            )
            rows = [{"loader": "raw tifffile + zarr region reads, one process", "patches_per_s": n / raw}]
            for workers in (0, self.s["loader_workers"]):
                loader = DataLoader(
                    Dataset(entries, transform=transform),
                    batch_size=batch,
                    num_workers=workers,
                    persistent_workers=workers > 0,
                    pin_memory=self.device.type == "cuda",
                )
                for _ in loader:  # warm-up: workers start, slides open
                    pass
                t = time.perf_counter()
                count = sum(len(b["image"]) for b in loader)
                rows.append(
                    {
                        "loader": f"LoadWSIPatchd + augmentations + final transforms, DataLoader {workers} workers",
                        "patches_per_s": count / (time.perf_counter() - t),
                    }
                )
        step_rate = self._step_images_per_s()
        for row in rows:
            row["ratio_to_raw"] = row["patches_per_s"] / rows[0]["patches_per_s"]
            row["ratio_to_step_images_per_s"] = row["patches_per_s"] / step_rate if step_rate else None
        self.results["loader_step_images_per_s"] = step_rate
        return rows

    @staticmethod
    def _raw_tifffile(path: str, centres: np.ndarray, pixels: int) -> float:
        import tifffile
        import zarr

        with tifffile.TiffFile(path) as tif:
            array = zarr.open(tif.aszarr(series=0, level=0), mode="r")
            best = float("inf")
            for _ in range(2):  # the first pass warms the file cache, as the loaders' warm-up epoch does
                t = time.perf_counter()
                for x, y in centres:
                    top, left = int(y) - pixels // 2, int(x) - pixels // 2
                    np.asarray(array[top : top + pixels, left : left + pixels])
                best = min(best, time.perf_counter() - t)
            return best

    def _step_images_per_s(self) -> float | None:
        """The fastest stage-2 training rate measured in this run (or given with --step-images-per-s)."""
        rates = [self.args.step_images_per_s] if self.args.step_images_per_s else []
        for name in ("stage2_training", "speed_levers", "batch_scaling", "torch_compile"):
            rates += [row["images_per_s"] for row in self.results["sections"].get(name, [])]
        return max(rates) if rates else None

    def markdown(self) -> str:
        return render(self.results)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, demo sizes, a few steps: checks the script runs")
    ap.add_argument("--out-dir", default=None, help="where the JSON and Markdown go (default docs/, smoke: outputs/)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="sections that would start later are skipped")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile in --smoke")
    ap.add_argument("--num-genes", type=int, default=256, help="gene panel size of the benchmark networks")
    ap.add_argument(
        "--step-images-per-s", type=float, default=None, help="training rate for the loader's ratio when not measured"
    )
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    ap.add_argument(
        "--sections", nargs="+", default=None, choices=SECTIONS, help="run only these sections (device always runs)"
    )
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --smoke on the CPU")
    if args.out_dir is None:
        args.out_dir = str(ROOT / ("outputs/device_benchmark_smoke" if args.smoke else "docs"))
    settings = SMOKE if args.smoke else FULL
    bench = Benchmark(args, settings)
    bench.section("device", bench.device_info)
    plan = {
        "stage2_training": (bench.stage2, 0),
        "speed_levers": (bench.levers, 60),
        "batch_scaling": (bench.batch_scaling, 60),
        "profile": (bench.profile, 30),
        "stage1_training": (bench.stage1, 60),
        "stage1_levers": (bench.stage1_levers, 60),
        "sampling": (bench.sampling, 60),
        "whole_slide": (bench.whole_slide, 40),
        "loader": (bench.loader, 40),
        "torch_compile": (bench.compiled, 150),
    }
    wanted = args.sections or [name for name in SECTIONS if name != "torch_compile" or args.compile or not args.smoke]
    for name in SECTIONS:
        if name in wanted:
            fn, min_left = plan[name]
            bench.section(name, fn, min_left_s=min_left)
    print()
    print(bench.markdown())
    return 1 if bench.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
