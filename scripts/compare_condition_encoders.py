"""GeneCondNet against the simplest condition encoder (one linear layer to one token), measured on the demo data.

Experiment (see docs/gene_condnet.md):

1. Encode every training and validation patch of the demo dataset once with the trained demo autoencoder
   (``models/autoencoder.pt``; deterministic transforms only, posterior mean, scale factor applied).
2. Train the demo diffusion UNet (``configs/train.json`` + ``configs/demo.json``: UNet, noise scheduler,
   v-prediction, AdamW, warm-up + cosine learning rate, gradient clipping, EMA) in latent space with three condition
   encoders, for the same number of iterations, from the same seed, on the same batches, noise, timesteps, latent
   flips/rotations and condition-dropout draws (p=0.1):

   - ``linear``: :class:`bundle.networks.LinearGeneCondNet`, centre spot, one token;
   - ``gene_condnet_centre``: :class:`bundle.networks.GeneCondNet`, centre spot only;
   - ``gene_condnet_nbr6``: :class:`bundle.networks.GeneCondNet` with the 6 hex-lattice neighbours (the dataset's
     ``neighbors`` rows; a missing neighbour is the spot itself, as in ``SpatialContextd``).

3. On the held-out slide (validation split) with fixed noise and timesteps, report the EMA model's denoising loss
   (MSE of the v-prediction) with the true condition, with the condition of a spot of a different dominant
   compartment (ground truth of the demo generator), and with the null condition. The condition gaps
   ``wrong - true`` and ``null - true`` measure how much the model uses the expression.
4. Optionally (``--agreement``), sample latents for every validation spot (DDIM, classifier-free guidance) and
   report how often a logistic-regression classifier trained on real *training* latents assigns a sample the
   compartment of the spot whose expression conditioned it.

Example (about 15-25 minutes on 2 shared CPU cores):

    python scripts/compare_condition_encoders.py --iterations 600 --seeds 0 --agreement --json results.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("linear", "gene_condnet_centre", "gene_condnet_nbr6")


def load_config(root: Path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(root / "configs/train.json"), str(root / "configs/demo.json")])
    parser["bundle_root"] = str(root)
    return parser


def encode_split(parser, datalist, autoencoder, scale: float, batch_size: int = 64) -> torch.Tensor:
    """Posterior-mean latents (scaled) of the deterministic (validation) preprocessing of ``datalist``."""
    from monai.data import DataLoader, Dataset

    transform = parser.get_parsed_content("validate#preprocessing")
    loader = DataLoader(Dataset(datalist, transform=transform), batch_size=batch_size, shuffle=False, num_workers=0)
    out = []
    with torch.no_grad():
        for batch in loader:
            z_mu, _ = autoencoder.encode(batch["image"].float())
            out.append(z_mu * scale)
    return torch.cat(out)


def conditions(datalist, expression: np.ndarray, num_neighbors: int = 6) -> torch.Tensor:
    """``(N, 1 + K, G)``: the spot then its neighbours, a missing neighbour (-1) filled with the spot itself."""
    rows = []
    for item in datalist:
        centre = expression[int(item["expression"])]
        nbr = [expression[r] if r >= 0 else centre for r in item["neighbors"][:num_neighbors]]
        rows.append(np.stack([centre, *nbr]))
    return torch.as_tensor(np.stack(rows), dtype=torch.float32)


def compartments(root: Path, datalist) -> list[str]:
    labels: dict[tuple[str, str], str] = {}
    for sample in {item["sample"] for item in datalist}:
        with open(root / "datasets/demo/raw" / sample / "ground_truth.csv") as f:
            for row in csv.DictReader(f):
                labels[(sample, row["barcode"])] = row["dominant"]
    return [labels[(item["sample"], item["barcode"])] for item in datalist]


def build_network(parser, variant: str, num_genes: int, seed: int) -> nn.Module:
    from bundle.networks import GeneConditionedUNet, GeneCondNet, LinearGeneCondNet

    torch.manual_seed(seed)
    unet = parser.get_parsed_content("unet_def", lazy=False)
    dim = parser.get_parsed_content("cross_attention_dim")
    if variant == "linear":
        encoder = LinearGeneCondNet(num_genes, dim)
    else:
        encoder = GeneCondNet(
            num_genes,
            dim,
            num_tokens=parser.get_parsed_content("num_context_tokens"),
            hidden_dim=parser.get_parsed_content("gene_encoder_hidden_dim"),
            num_layers=2,
            num_neighbors=6 if variant == "gene_condnet_nbr6" else 0,
        )
    return GeneConditionedUNet(encoder, unet, add_condition_to_time_embedding=True)


def variant_condition(cond: torch.Tensor, variant: str) -> torch.Tensor:
    return cond if variant == "gene_condnet_nbr6" else cond[:, 0]


def dihedral(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Per-sample flips / 90-degree rotations of latents (cheap stand-in for the image augmentations)."""
    out = x.clone()
    for k in range(8):
        sel = code == k
        if sel.any():
            y = torch.rot90(x[sel], k % 4, dims=(-2, -1))
            out[sel] = y.flip(-1) if k >= 4 else y
    return out


def make_schedule(n_train: int, iterations: int, batch_size: int, num_t: int, latent_shape, seed: int, p_uncond: float):
    """All random draws of a training run, shared by every variant."""
    g = torch.Generator().manual_seed(seed + 1000)
    per_epoch = n_train // batch_size
    idx = torch.cat(
        [
            torch.randperm(n_train, generator=g)[: per_epoch * batch_size]
            for _ in range(math.ceil(iterations / per_epoch))
        ]
    )
    return {
        "index": idx[: iterations * batch_size].view(iterations, batch_size),
        "noise": g,  # noise is drawn on the fly from this generator (same sequence for every variant)
        "seed": seed,
        "timesteps": torch.randint(0, num_t, (iterations, batch_size), generator=g),
        "drop": torch.rand(iterations, batch_size, generator=g) < p_uncond,
        "aug": torch.randint(0, 8, (iterations, batch_size), generator=g),
        "shape": latent_shape,
    }


def train(parser, variant, latents, conds, schedule, iterations, seed, log_every=100):
    from monai.optimizers import WarmupCosineSchedule

    from bundle.handlers import make_ema

    net = build_network(parser, variant, conds.shape[-1], seed)
    ema = make_ema(net)
    decay = float(parser.get_parsed_content("ema_decay"))
    scheduler = parser.get_parsed_content("noise_scheduler", lazy=False)
    opt = torch.optim.AdamW(
        net.parameters(), lr=float(parser["learning_rate"]), weight_decay=float(parser["weight_decay"])
    )
    lr = WarmupCosineSchedule(
        opt, warmup_steps=int(parser["warmup_iterations"]), t_total=iterations, end_lr=0.0, cycles=0.0
    )
    max_norm = float(parser["max_grad_norm"])
    g = torch.Generator().manual_seed(schedule["seed"] + 2000)
    net.train()
    start, losses = time.perf_counter(), []
    for it in range(iterations):
        idx = schedule["index"][it]
        x0 = dihedral(latents[idx], schedule["aug"][it])
        cond = variant_condition(conds[idx], variant).clone()
        cond[schedule["drop"][it]] = -1.0
        noise = torch.randn(x0.shape, generator=g)
        t = schedule["timesteps"][it]
        noisy = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        loss = nn.functional.mse_loss(net(noisy, t, cond), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
        opt.step()
        lr.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
            for be, b in zip(ema.buffers(), net.buffers()):
                be.copy_(b)
        losses.append(loss.item())
        if (it + 1) % log_every == 0:
            print(
                f"  [{variant} seed {seed}] it {it + 1}/{iterations} loss(last {log_every}) {np.mean(losses[-log_every:]):.4f} "
                f"{(it + 1) / (time.perf_counter() - start):.2f} it/s",
                flush=True,
            )
    ema.eval()
    return ema, scheduler, time.perf_counter() - start, float(np.mean(losses[-100:]))


def wrong_partner(labels: list[str], seed: int) -> torch.Tensor:
    """For each spot, a spot of a different dominant compartment (fixed by ``seed``)."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    out = []
    for lab in labels_arr:
        candidates = np.flatnonzero(labels_arr != lab)
        out.append(int(rng.choice(candidates)) if candidates.size else 0)
    return torch.as_tensor(out)


@torch.no_grad()
def evaluate(net, scheduler, variant, latents, conds, partner, repeats, seed, batch_size=128):
    """Per-(spot, draw) v-prediction MSE with the true, wrong and null conditions; fixed noise and timesteps."""
    g = torch.Generator().manual_seed(seed + 3000)
    n = latents.shape[0]
    num_t = scheduler.num_train_timesteps
    # stratified timesteps: draw r covers [r/R, (r+1)/R) of the schedule for every spot
    t_all = (
        ((torch.arange(repeats)[None] + torch.rand(n, repeats, generator=g)) / repeats * num_t)
        .long()
        .clamp_max(num_t - 1)
    )
    noise_all = torch.randn((n, repeats, *latents.shape[1:]), generator=g)
    out = {k: torch.zeros(n, repeats) for k in ("true", "wrong", "null")}
    for r in range(repeats):
        for s in range(0, n, batch_size):
            sl = slice(s, s + batch_size)
            x0, noise, t = latents[sl], noise_all[sl, r], t_all[sl, r]
            noisy = scheduler.add_noise(x0, noise, t)
            target = scheduler.get_velocity(x0, noise, t)
            true = variant_condition(conds[sl], variant)
            wrong = variant_condition(conds[partner[sl]], variant)
            for key, cond in (("true", true), ("wrong", wrong), ("null", torch.full_like(true, -1.0))):
                pred = net(noisy, t, cond)
                out[key][sl, r] = ((pred - target) ** 2).flatten(1).mean(1)
    return out, t_all


@torch.no_grad()
def sample_latents(net, parser, variant, conds, shape, seed, steps, guidance, batch_size=96):
    """DDIM sampling with classifier-free guidance (the bundle's sample scheduler, v-prediction)."""
    scheduler = parser.get_parsed_content("sample_scheduler", lazy=False)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed + 4000)
    out = []
    for s in range(0, conds.shape[0], batch_size):
        cond = variant_condition(conds[s : s + batch_size], variant)
        x = torch.randn((cond.shape[0], *shape), generator=g)
        both = torch.cat([torch.full_like(cond, -1.0), cond])
        for t in scheduler.timesteps:
            tt = torch.full((2 * x.shape[0],), int(t), dtype=torch.long)
            u, c = net(torch.cat([x, x]), tt, both).chunk(2)
            x, _ = scheduler.step(u + guidance * (c - u), t, x)
        out.append(x)
    return torch.cat(out)


def latent_features(z: torch.Tensor) -> np.ndarray:
    """Orientation-robust texture features of latents for the compartment classifier: 4x4 average pooling, channel
    standard deviations and mean absolute gradients."""
    pooled = nn.functional.adaptive_avg_pool2d(z, 4).flatten(1)
    std = z.flatten(2).std(-1)
    gx = (z[..., 1:] - z[..., :-1]).abs().flatten(2).mean(-1)
    gy = (z[..., 1:, :] - z[..., :-1, :]).abs().flatten(2).mean(-1)
    return torch.cat([pooled, z.flatten(2).mean(-1), std, gx, gy], 1).numpy()


def fmt(x: torch.Tensor) -> str:
    """mean +- standard error over spots (draws averaged per spot first)."""
    per_spot = x.mean(1)
    return f"{per_spot.mean():.4f} ± {per_spot.std() / math.sqrt(len(per_spot)):.4f}"


@dataclass
class DemoData:
    """The demo dataset encoded once and shared by every run: latents, conditions and compartments of both splits."""

    parser: Any
    scale: float
    num_train: int
    num_val: int
    train_lat: torch.Tensor
    val_lat: torch.Tensor
    train_cond: torch.Tensor
    val_cond: torch.Tensor
    train_lab: list[str]
    val_lab: list[str]
    partner: torch.Tensor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(ROOT), help="bundle root (configs/, datasets/demo, models/)")
    parser.add_argument("--autoencoder", default=None, help="default: <root>/models/autoencoder.pt")
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--eval-repeats", type=int, default=8, help="fixed (noise, timestep) draws per validation spot")
    parser.add_argument("--p-uncond", type=float, default=0.1)
    parser.add_argument("--agreement", action="store_true", help="also sample and classify compartments")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--json", default=None, help="write all results to this JSON file")
    return parser.parse_args(argv)


def prepare_data(root: Path, autoencoder_path: str | None) -> DemoData:
    """Read the config and the demo dataset and encode both splits with the trained autoencoder."""
    from bundle.autoencoder import load_autoencoder_checkpoint

    t0 = time.perf_counter()
    parser = load_config(root)
    dataset_dir = Path(parser.get_parsed_content("dataset_dir"))
    datalist = json.loads((dataset_dir / "datalist.json").read_text())
    train_list, val_list = datalist["training"], datalist["validation"]
    expression = np.load(dataset_dir / "expression.npy")
    autoencoder, scale = load_autoencoder_checkpoint(autoencoder_path or root / "models/autoencoder.pt", None)
    autoencoder.eval()
    torch.manual_seed(0)
    train_lat = encode_split(parser, train_list, autoencoder, scale)
    val_lat = encode_split(parser, val_list, autoencoder, scale)
    val_lab = compartments(root, val_list)
    data = DemoData(
        parser=parser,
        scale=scale,
        num_train=len(train_list),
        num_val=len(val_list),
        train_lat=train_lat,
        val_lat=val_lat,
        train_cond=conditions(train_list, expression),
        val_cond=conditions(val_list, expression),
        train_lab=compartments(root, train_list),
        val_lab=val_lab,
        partner=wrong_partner(val_lab, 0),
    )
    print(
        f"latents: train {tuple(train_lat.shape)}, val {tuple(val_lat.shape)} (scale factor {scale:.4f}), "
        f"encoded in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    print("val compartments:", {k: val_lab.count(k) for k in sorted(set(val_lab))}, flush=True)
    return data


def fit_compartment_classifier(data: DemoData) -> tuple[Any, float]:
    """Logistic regression of the compartment on real training latents, and its accuracy on real validation ones."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
    classifier.fit(latent_features(data.train_lat), data.train_lab)
    real_acc = float((classifier.predict(latent_features(data.val_lat)) == np.asarray(data.val_lab)).mean())
    print(f"classifier on real validation latents: accuracy {real_acc:.3f}", flush=True)
    return classifier, real_acc


def run_variant(data: DemoData, variant: str, schedule: dict, seed: int, args, classifier) -> dict:
    """Train one condition encoder, evaluate it on the validation slide and, with a classifier, sample and score
    the compartment agreement."""
    parser = data.parser
    num_t = int(parser["num_train_timesteps"])
    net, scheduler, seconds, final_loss = train(
        parser, variant, data.train_lat, data.train_cond, schedule, args.iterations, seed
    )
    losses, t_all = evaluate(
        net, scheduler, variant, data.val_lat, data.val_cond, data.partner, args.eval_repeats, seed
    )
    run = {
        "variant": variant,
        "seed": seed,
        "train_seconds": seconds,
        "train_loss_last100": final_loss,
        "encoder_parameters": sum(p.numel() for p in net.gene_encoder.parameters()),
        "val": {k: float(v.mean()) for k, v in losses.items()},
        "val_fmt": {k: fmt(v) for k, v in losses.items()},
        "gap_wrong": fmt(losses["wrong"] - losses["true"]),
        "gap_null": fmt(losses["null"] - losses["true"]),
        "gap_wrong_by_t": {},
    }
    for lo, hi in ((0, 333), (333, 666), (666, num_t)):
        m = (t_all >= lo) & (t_all < hi)
        run["gap_wrong_by_t"][f"{lo}-{hi}"] = float((losses["wrong"] - losses["true"])[m].mean())
    if classifier is not None:
        guidance = float(parser["guidance_scale"])
        gen = sample_latents(
            net, parser, variant, data.val_cond, data.val_lat.shape[1:], seed, args.sample_steps, guidance
        )
        run["agreement"] = float((classifier.predict(latent_features(gen)) == np.asarray(data.val_lab)).mean())
    return run


def print_table(results: dict, data: DemoData, args, real_acc: float | None) -> None:
    """The runs as a Markdown table, with the classifier's ceiling and chance level when agreement was measured."""
    agreement = real_acc is not None
    print(
        f"\n{args.iterations} iterations, batch {args.batch_size}, seeds {args.seeds}; validation slide: "
        f"{data.num_val} spots x {args.eval_repeats} fixed (noise, t) draws; mean ± s.e. over spots\n"
    )
    head = (
        "| encoder | seed | encoder params | val loss, true | wrong compartment | null | gap wrong - true "
        "| gap null - true | wrong - true by t (0-333 / 333-666 / 666-1000) |"
    )
    if agreement:
        head += " compartment agreement |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in results["runs"]:
        bt = " / ".join(f"{v:.4f}" for v in r["gap_wrong_by_t"].values())
        line = (
            f"| {r['variant']} | {r['seed']} | {r['encoder_parameters']:,} | {r['val_fmt']['true']} | "
            f"{r['val_fmt']['wrong']} | {r['val_fmt']['null']} | {r['gap_wrong']} | {r['gap_null']} | {bt} |"
        )
        if agreement:
            line += f" {r['agreement']:.3f} |"
        print(line)
    if agreement:
        val_lab = data.val_lab
        print(
            f"\nclassifier accuracy on real validation latents (ceiling): {real_acc:.3f}; "
            f"chance (majority class): {max(val_lab.count(k) for k in set(val_lab)) / len(val_lab):.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    data = prepare_data(Path(args.root), args.autoencoder)
    classifier, real_acc = fit_compartment_classifier(data) if args.agreement else (None, None)

    results = {"args": vars(args), "scale_factor": data.scale, "runs": []}
    if classifier is not None:
        results["classifier_real_val_accuracy"] = real_acc
    num_t = int(data.parser["num_train_timesteps"])
    for seed in args.seeds:
        schedule = make_schedule(
            data.num_train, args.iterations, args.batch_size, num_t, data.train_lat.shape[1:], seed, args.p_uncond
        )
        for variant in args.variants:
            run = run_variant(data, variant, schedule, seed, args, classifier)
            print(json.dumps(run), flush=True)
            results["runs"].append(run)

    print_table(results, data, args, real_acc)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
