"""Building blocks of ``scripts/device_benchmark.py``: the stage-2 training step with its speed levers, timing and
memory helpers, and the devices' bf16 peaks."""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext

import torch
from benchmark_train import DiffusersGeneUNet, time_steps_interleaved
from torch import nn

from bundle.profiling import sync

# dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; matched on the device name
DATASHEET_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
)

LEVERS = (
    ("0.5.0 path (encode every step, AdamW foreach, math attention)", {}),
    ("+ cached latents", {"cached_latents": True}),
    ("+ fused AdamW", {"fused_adamw": True}),
    ("+ SDPA / flash attention", {"flash_attention": True}),
    ("+ channels_last", {"channels_last": True}),
)


def datasheet_peak(name: str) -> float | None:
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def measured_matmul_peak(device: torch.device, n: int) -> float:
    """FLOP/s of an ``n x n x n`` bf16 matrix product (random data), median of 10 after 3 warm-ups."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


class TrainStep:
    """One stage-2 training step of the bundle's trainer on a fixed batch, with optional speed levers."""

    def __init__(
        self,
        parser,
        kind: str,
        device: torch.device,
        batch: int,
        autoencoder: nn.Module,
        scale: float,
        *,
        cached_latents: bool = False,
        fused_adamw: bool = False,
        flash_attention: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: str | None = None,
    ) -> None:
        from monai.inferers import DiffusionInferer

        from bundle.engines import LatentDiffusionPrepareBatch
        from bundle.networks import GeneConditionedUNet

        torch.manual_seed(0)
        gene_encoder = parser.get_parsed_content("gene_encoder_def", lazy=False, instantiate=True)
        if kind == "monai":
            unet_cfg = dict(parser.get("unet_def"))
            unet_cfg["use_flash_attention"] = flash_attention
            parser["unet_def_bench"] = unet_cfg
            unet = parser.get_parsed_content("unet_def_bench", lazy=False)
            network = GeneConditionedUNet(gene_encoder, unet, add_condition_to_time_embedding=True)
        else:
            kwargs = {
                k: parser.get_parsed_content(f"unet_def#{k}") for k in parser["unet_def"] if not k.startswith("_")
            }
            network = DiffusersGeneUNet(gene_encoder, kwargs, int(parser.get_parsed_content("latent_size")))
        self.network = network.to(device).train()
        if channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        self.params = [p for p in self.network.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=1e-4, weight_decay=0.01, **({"fused": True} if fused_adamw else {})
        )
        self.model = torch.compile(self.network, mode=compile_mode) if compile else self.network
        scheduler = parser.get_parsed_content("noise_scheduler", lazy=False)
        self.prepare = LatentDiffusionPrepareBatch(autoencoder, scale_factor=scale, scheduler=scheduler)
        self.inferer = DiffusionInferer(scheduler)
        self.device, self.cached, self.channels_last = device, cached_latents, channels_last
        self.max_norm = float(parser["max_grad_norm"])
        size, genes = int(parser["patch_size"]), int(parser.get_parsed_content("num_genes"))
        k = int(parser.get_parsed_content("num_neighbors"))
        g = torch.Generator().manual_seed(1)
        self.batch = {
            "image": (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device),
            "expression": torch.rand((batch, 1 + k, genes) if k else (batch, genes), generator=g).to(device),
        }
        with torch.no_grad():
            self.latents = autoencoder.encode_stage_2_inputs(self.batch["image"]) * scale
        self.amp = device.type == "cuda"

    def _inputs(self):
        if self.cached:  # the latent cache hands the step latents: the diffusion part of prepare_batch only
            latents = self.latents
            noise = torch.randn_like(latents)
            t = torch.randint(0, self.prepare.num_train_timesteps, (latents.shape[0],), device=self.device).long()
            target = self.prepare.get_target(latents, noise, t)
            kw = {"noise": noise, "timesteps": t, "condition": self.batch["expression"]}
        else:
            latents, target, _, kw = self.prepare(self.batch, self.device)
        if self.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
            kw["noise"] = kw["noise"].contiguous(memory_format=torch.channels_last)
        return latents, target, kw

    def forward_backward(self) -> torch.Tensor:
        latents, target, kw = self._inputs()
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext():
            pred = self.inferer(latents, self.model, **kw)
            loss = nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        return loss

    def __call__(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.optimizer.step()
        self.last_loss = loss.detach()
        return self.last_loss

    def unet_flops(self) -> int:
        """FLOPs of one forward + backward of the diffusion network on this batch (no encode, no optimiser)."""
        from torch.utils.flop_counter import FlopCounterMode

        self.optimizer.zero_grad(set_to_none=True)
        cached, model = self.cached, self.model
        self.cached, self.model = True, self.network  # count the eager network's math, not the compiler's
        try:
            with FlopCounterMode(display=False) as counter:
                self.forward_backward()
        finally:
            self.cached, self.model = cached, model
        self.optimizer.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())


def time_interleaved(steps: dict, device, n: int, warmup: int, rounds: int) -> dict:
    """Median seconds per step of each :class:`TrainStep`, timed interleaved; refuses non-finite last losses."""
    secs = time_steps_interleaved(steps, device, n, warmup, rounds)
    for name, step in steps.items():
        if not torch.isfinite(step.last_loss).all():
            raise FloatingPointError(f"{name}: non-finite loss {step.last_loss}")
    return secs


def step_memory(step, device: torch.device) -> float | None:
    reset_peak(device)
    step()
    sync(device)
    return peak_mib(device)
