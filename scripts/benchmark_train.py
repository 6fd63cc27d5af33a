"""Stage-2 (latent diffusion) training-step throughput and peak memory, with the data loader's throughput beside it.

Measured:

1. The full training step of ``configs/train.json`` (+ ``configs/demo.json`` by default): encode the image batch with
   the frozen autoencoder (``LatentDiffusionPrepareBatch``), ``DiffusionInferer`` forward of the
   ``GeneConditionedUNet`` (GeneCondNet + MONAI ``DiffusionModelUNet``), MSE loss, backward, gradient clipping and
   the AdamW step; iterations/s and peak memory.
2. The same step with a diffusers ``UNet2DConditionModel`` of matched size (same channels, residual blocks, attention
   levels and head width, the same GeneCondNet tokens as ``encoder_hidden_states`` and its pooled vector through
   ``class_embed_type="projection"``, which adds it to the time embedding as ``GeneConditionedUNet`` does), timed
   interleaved with (1) in the same process, reported as a ratio.
3. The loader: ``train#preprocessing`` (LoadWSIPatchd + LoadExpressiond + SpatialContextd + augmentations + final +
   condition dropout) through a ``DataLoader`` with 0 and 2 workers, and the ``CacheDataset`` path the demo uses
   (``cache_rate`` 1.0: loading cached once, augmentations per epoch); patches/s and batches/s against the step rate.

On CUDA (``torch.cuda.is_available()``) (1)-(2) also run at the default size of train.json (512 px, 4x64x64
latents, bf16 autocast, default UNet); peak memory is ``torch.cuda.max_memory_allocated``. On CPU, peak memory is the
peak RSS (sampled every millisecond from ``/proc/self/statm``) of a fresh subprocess building one configuration and
running 3 steps, and that peak minus its RSS after imports and config parsing (networks, optimiser state,
activations, autoencoder, batch). Example (CPU, about 5 minutes on 2 cores):

    python scripts/benchmark_train.py --steps 20 --loader-patches 320
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.profiling import PeakMemory, sync  # noqa: E402


def load_config(root: Path, demo: bool, overrides: dict | None = None):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    files = [str(root / "configs/train.json")] + ([str(root / "configs/demo.json")] if demo else [])
    parser.read_config(files)
    parser["bundle_root"] = str(root)
    for k, v in (overrides or {}).items():
        parser[k] = v
    return parser


class DiffusersGeneUNet(nn.Module):
    """GeneCondNet + diffusers ``UNet2DConditionModel`` matched to the config's MONAI ``DiffusionModelUNet``."""

    def __init__(self, gene_encoder: nn.Module, unet_kwargs: dict, latent_size: int) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        channels = list(unet_kwargs["channels"])
        attention = list(unet_kwargs["attention_levels"])
        heads = [c // h if h else 1 for c, h in zip(channels, unet_kwargs["num_head_channels"])]
        down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
        up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
        self.gene_encoder = gene_encoder
        self.unet = UNet2DConditionModel(
            sample_size=latent_size,
            in_channels=unet_kwargs["in_channels"],
            out_channels=unet_kwargs["out_channels"],
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            block_out_channels=tuple(channels),
            layers_per_block=unet_kwargs["num_res_blocks"],
            norm_num_groups=unet_kwargs["norm_num_groups"],
            cross_attention_dim=unet_kwargs["cross_attention_dim"],
            attention_head_dim=tuple(heads),  # diffusers' historical name: this is the number of heads
            transformer_layers_per_block=unet_kwargs.get("transformer_num_layers", 1),
            class_embed_type="projection",
            projection_class_embeddings_input_dim=unet_kwargs["cross_attention_dim"],
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        tokens, pooled = self.gene_encoder.encode(context)
        return self.unet(x, timesteps, encoder_hidden_states=tokens, class_labels=pooled).sample


def build_step(parser, kind: str, device: torch.device, amp: bool, autoencoder_ckpt: str | None):
    """Return ``(step_fn, info)``: one full training step on a fixed synthetic batch."""
    from monai.inferers import DiffusionInferer

    from bundle.engines import LatentDiffusionPrepareBatch

    torch.manual_seed(0)
    if autoencoder_ckpt and Path(autoencoder_ckpt).is_file():
        from bundle.autoencoder import load_autoencoder_checkpoint

        autoencoder, scale = load_autoencoder_checkpoint(autoencoder_ckpt, None)
    else:  # timing only: random weights of the configured architecture
        autoencoder, scale = parser.get_parsed_content("autoencoder_def", lazy=False), 1.0
    autoencoder = autoencoder.to(device).eval()
    gene_encoder = parser.get_parsed_content("gene_encoder_def", lazy=False)
    if kind == "monai":
        unet = parser.get_parsed_content("unet_def", lazy=False)
        from bundle.networks import GeneConditionedUNet

        network = GeneConditionedUNet(gene_encoder, unet, add_condition_to_time_embedding=True)
    else:
        kwargs = {k: parser.get_parsed_content(f"unet_def#{k}") for k in parser["unet_def"] if not k.startswith("_")}
        network = DiffusersGeneUNet(gene_encoder, kwargs, int(parser.get_parsed_content("latent_size")))
    network = network.to(device).train()
    scheduler = parser.get_parsed_content("noise_scheduler", lazy=False)
    prepare = LatentDiffusionPrepareBatch(
        autoencoder, scale_factor=scale, scheduler=scheduler, condition_name="expression"
    )
    inferer = DiffusionInferer(scheduler)
    opt = torch.optim.AdamW(network.parameters(), lr=1e-4, weight_decay=0.01)
    loss_fn = nn.MSELoss()
    bs, size = int(parser["batch_size"]), int(parser["patch_size"])
    g = int(parser.get_parsed_content("num_genes"))
    k = int(parser["num_neighbors"])
    batch = {
        "image": (torch.rand(bs, 3, size, size) * 2 - 1).to(device),
        "expression": torch.rand(bs, 1 + k, g).to(device) if k else torch.rand(bs, g).to(device),
    }
    max_norm = float(parser["max_grad_norm"])
    amp_ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else None

    def step() -> float:
        latents, target, _, kw = prepare(batch, device)
        opt.zero_grad(set_to_none=True)
        if amp_ctx:
            with amp_ctx():
                pred = inferer(
                    latents, network, noise=kw["noise"], timesteps=kw["timesteps"], condition=kw["condition"]
                )
                loss = loss_fn(pred.float(), target)
        else:
            pred = inferer(latents, network, noise=kw["noise"], timesteps=kw["timesteps"], condition=kw["condition"])
            loss = loss_fn(pred, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), max_norm)
        opt.step()
        return float(loss.detach())

    unet_params = sum(p.numel() for p in network.unet.parameters())
    info = {
        "unet_params": unet_params,
        "latent": tuple(prepare.autoencoder.encode_stage_2_inputs(batch["image"][:1]).shape[1:]),
        "batch": bs,
        "size": size,
    }
    return step, info


def time_steps_interleaved(steps: dict, device, n: int, warmup: int, rounds: int) -> dict:
    """Median seconds per step of each configuration, alternating rounds of ``n // rounds`` steps."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    sync(device)
    per = {name: [] for name in steps}
    chunk = max(1, n // rounds)
    for _ in range(rounds):
        for name, fn in steps.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(chunk):
                fn()
            sync(device)
            per[name].append((time.perf_counter() - t) / chunk)
    return {name: statistics.median(v) for name, v in per.items()}


def _memory_child(root: str, demo: bool, kind: str, ckpt: str | None, steps: int, queue) -> None:
    parser = load_config(Path(root), demo)
    parser.get_parsed_content("num_genes")  # reads the gene panel before the baseline
    with PeakMemory("cpu") as memory:
        step, _ = build_step(parser, kind, torch.device("cpu"), False, ckpt)
        for _ in range(steps):
            step()
    queue.put((memory.peak_mib, memory.delta_mib))


def cpu_peak_memory(root: Path, demo: bool, kind: str, ckpt: str | None, steps: int = 3) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(str(root), demo, kind, ckpt, steps, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def run_step_benchmark(
    root: Path, demo: bool, device: torch.device, amp: bool, ckpt: str | None, n: int, warmup: int, rounds: int
):
    parser = load_config(root, demo)
    built = {kind: build_step(parser, kind, device, amp, ckpt) for kind in ("monai", "diffusers")}
    secs = time_steps_interleaved({k: v[0] for k, v in built.items()}, device, n, warmup, rounds)
    rows = []
    for kind, (step, info) in built.items():
        row = {"kind": kind, "sec": secs[kind], **info}
        if device.type == "cuda":
            sync(device)
            torch.cuda.empty_cache()
            with PeakMemory(device) as memory:
                for _ in range(3):
                    step()
            row["peak"], row["peak_delta"] = memory.peak_mib, memory.delta_mib
        rows.append(row)
    del built
    if device.type != "cuda":
        for row in rows:
            row["peak"], row["peak_delta"] = cpu_peak_memory(root, demo, row["kind"], ckpt)
    return rows


def run_loader_benchmark(root: Path, num_patches: int, workers_list, step_rate: float) -> list[tuple]:
    from monai.data import CacheDataset, DataLoader, Dataset

    parser = load_config(root, True)
    bs = int(parser["batch_size"])
    data = parser.get_parsed_content("train_datalist")[:num_patches]
    transform = parser.get_parsed_content("train#preprocessing")
    rows = []

    def epoch_rate(loader, repeat=3):
        for _ in loader:  # warm-up: worker start, slide opening
            pass
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            n = sum(len(b["image"]) for b in loader)
            best = min(best, time.perf_counter() - t)
        return n / best

    for workers in workers_list:
        loader = DataLoader(
            Dataset(data, transform=transform),
            batch_size=bs,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
        rate = epoch_rate(loader)
        rows.append((f"Dataset, DataLoader {workers} workers", rate))
        del loader
    t = time.perf_counter()
    cached = CacheDataset(data, transform=transform, cache_rate=1.0, num_workers=0, progress=False)
    build = time.perf_counter() - t
    loader = DataLoader(cached, batch_size=bs, shuffle=True, drop_last=True, num_workers=0)
    rate = epoch_rate(loader)
    rows.append((f"CacheDataset (cache_rate 1.0, demo), 0 workers; cache built once in {build:.1f} s", rate))
    return [(what, rate, rate / bs, rate / bs / step_rate) for what, rate in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(ROOT))
    parser.add_argument(
        "--autoencoder", default=None, help="demo autoencoder checkpoint (default <root>/models/autoencoder.pt)"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
    parser.add_argument("--loader-patches", type=int, default=320)
    parser.add_argument("--no-default-size", action="store_true", help="skip the 512-px run on CUDA")
    args = parser.parse_args(argv)

    root = Path(args.root)
    ckpt = args.autoencoder or str(root / "models/autoencoder.pt")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print(
        f"device: {torch.cuda.get_device_name() if cuda else f'CPU, {torch.get_num_threads()} threads'}; torch {torch.__version__}"
    )

    tables = []
    setups = [("demo (64 px, configs/demo.json)", True, False, ckpt)]
    if cuda and not args.no_default_size:
        setups.append(("default (512 px, train.json), bf16 autocast", False, True, None))
    if cuda:
        setups[0] = ("demo (64 px, configs/demo.json), fp32", True, False, ckpt)
    demo_rate = None
    for name, demo, amp, ck in setups:
        rows = run_step_benchmark(root, demo, device, amp, ck, args.steps, args.warmup, args.rounds)
        if demo:
            demo_rate = 1 / rows[0]["sec"]
        tables.append((name, rows))

    mem = "peak CUDA memory allocated (MiB)" if cuda else "peak RSS, fresh process (MiB)"
    delta = "above before the steps" if cuda else "above imports + config"
    print(
        f"\n### Training step: {args.steps} timed steps per model in {args.rounds} interleaved rounds (median), "
        f"after {args.warmup} warm-up steps\n"
    )
    print(f"| size | UNet | UNet params | batch | latents | it/s | s/step | ratio to MONAI | {mem} | {delta} (MiB) |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for name, rows in tables:
        ref = rows[0]["sec"]
        for r in rows:
            label = (
                "MONAI DiffusionModelUNet + GeneCondNet"
                if r["kind"] == "monai"
                else "diffusers UNet2DConditionModel + GeneCondNet"
            )
            print(
                f"| {name} | {label} | {r['unet_params'] / 1e6:.2f} M | {r['batch']} | {'x'.join(map(str, r['latent']))} | "
                f"{1 / r['sec']:.2f} | {r['sec']:.3f} | {ref / r['sec']:.2f} | {r['peak']:.0f} | {r['peak_delta']:.0f} |"
            )

    if args.loader_patches > 0:
        rows = run_loader_benchmark(root, args.loader_patches, (0, 2), demo_rate)
        print(
            f"\n### Loader (demo, train#preprocessing, batch 32, {args.loader_patches} patches, best of 3 epochs after a "
            f"warm-up) against the demo step rate {demo_rate:.2f} it/s\n"
        )
        print("| loader | patches/s | batches/s | batches/s ÷ steps/s (target >= 3) |")
        print("|---|---:|---:|---:|")
        for what, rate, bps, ratio in rows:
            print(f"| {what} | {rate:.0f} | {bps:.2f} | {ratio:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
