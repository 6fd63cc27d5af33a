"""Stage-1 ablation: train the demo autoencoder under named variants and measure what stage 2 can at best reach.

Every row trains stage 1 alone with the README's main job (``configs/train.json`` + ``configs/demo.json``) plus the
row's overrides, in its own folder under ``--work-dir`` (``<row>/models/autoencoder.pt``, with its scale factor), then
reconstructs the demo validation patches (encode to the posterior mean, decode) and reports:

- reconstruction PSNR (dB, mean over patches) and SSIM (MONAI ``SSIMMetric``, 11-px Gaussian window) against the real
  patches;
- the probe ceiling on reconstructions: the evaluation's probe (CNN, trained once on the real training patches) reads
  the reconstructions as it reads generated patches, so compartment agreement and fidelity r of the reconstructions
  against the real ceiling are the upper bound a diffusion model decoded by this autoencoder can reach;
- latent shape, parameters and training minutes.

The table goes to stdout and ``<work-dir>/autoencoder.md``, the numbers to ``<work-dir>/autoencoder.json``; a row
already measured in that JSON is not rerun (``--force`` reruns it). ``--reconstructions N`` writes a PNG of N real
patches (top) over each row's reconstructions.

    python scripts/benchmark_autoencoder.py --rows demo_0.5 latent8 --work-dir outputs/autoencoder_ablation
    python scripts/benchmark_autoencoder.py --list
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEMO_AE = {
    "spatial_dims": 2,
    "in_channels": 3,
    "out_channels": 3,
    "channels": [16, 32, 64],
    "latent_channels": 3,
    "num_res_blocks": 1,
    "attention_levels": [False, False, False],
    "norm_num_groups": 8,
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
}


def _ae(**changes) -> dict:
    return {**DEMO_AE, **changes}


# name -> description and stage-1 overrides (train.json keys)
ROWS: dict[str, dict] = {
    "demo_0.5": {
        "desc": "demo stage 1 of version 0.5.0: 16-32-64, 3 latent channels, 300 iterations",
        "train": {"autoencoder_kwargs": _ae()},
    },
    "latent8": {"desc": "8 latent channels", "train": {"autoencoder_kwargs": _ae(latent_channels=8)}},
    "wide_latent8": {
        "desc": "32-64-128, 8 latent channels",
        "train": {"autoencoder_kwargs": _ae(channels=[32, 64, 128], latent_channels=8)},
    },
    "latent8_600": {
        "desc": "8 latent channels, 600 iterations",
        "train": {"autoencoder_kwargs": _ae(latent_channels=8), "autoencoder_iterations": 600},
    },
    "f2_latent4": {
        "desc": "one downsampling (32-64, latent 32x32), 4 latent channels",
        "train": {"autoencoder_kwargs": _ae(channels=[32, 64], latent_channels=4, attention_levels=[False, False])},
    },
    "f2_narrow": {
        "desc": "one downsampling, narrow (16-32, latent 32x32), 4 latent channels",
        "train": {"autoencoder_kwargs": _ae(channels=[16, 32], latent_channels=4, attention_levels=[False, False])},
    },
}
STAGE1_STEPS = ("training#0", "training#1")


def train_row(name: str, row: dict, work: Path) -> float | None:
    """Stage 1 of the README's main job with the row's overrides (the ``training`` list's first two steps); its
    seconds, or None when the row's checkpoint was there already."""
    from monai.bundle import ConfigParser

    models, outputs = work / name / "models", work / name / "outputs"
    models.mkdir(parents=True, exist_ok=True)
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs/train.json"), str(ROOT / "configs/demo.json")])
    parser.update({"bundle_root": str(ROOT), "ckpt_dir": str(models), "output_dir": str(outputs)})
    parser.update({"tracking_uri": f"sqlite:///{outputs / 'mlruns.db'}", **row.get("train", {})})
    for step in ("initialize#1", "initialize#2", "initialize#3"):
        parser.get_parsed_content(step)
    if (models / "autoencoder.pt").is_file():
        return None
    start = time.perf_counter()
    for step in STAGE1_STEPS:
        parser.get_parsed_content(step)
    return time.perf_counter() - start


def psnr_ssim(real: np.ndarray, recon: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM of uint8 ``(N, 3, H, W)`` reconstructions against the real patches."""
    from monai.metrics import SSIMMetric

    mse = ((recon.astype(np.float64) - real.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    psnr = float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))
    x, y = (torch.as_tensor(a).float() / 255.0 for a in (recon, real))
    return psnr, float(SSIMMetric(spatial_dims=2, data_range=1.0)(x, y).mean())


def reconstruct(path: Path, real: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, tuple[int, ...], int]:
    """Reconstructions (posterior mean, decoded) of uint8 patches by the autoencoder checkpoint at ``path``, the
    latent shape and the autoencoder's parameter count."""
    from bundle.autoencoder import load_autoencoder_checkpoint

    autoencoder, _ = load_autoencoder_checkpoint(path)
    out, shape = [], ()
    with torch.no_grad():
        for start in range(0, len(real), batch_size):
            x = torch.as_tensor(real[start : start + batch_size]).float() / 127.5 - 1.0
            z_mu = autoencoder.encode(x)[0]
            shape = tuple(z_mu.shape[1:])
            out.append(((autoencoder.decode(z_mu).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out).numpy(), shape, sum(p.numel() for p in autoencoder.parameters())


class ProbeBench:
    """The evaluation's CNN probe, trained once on the demo's real training patches, and the validation spots."""

    def __init__(self, dataset_dir: Path, fov_um: float, size: int, seed: int = 0) -> None:
        from bundle.evaluation.labels import spot_labels
        from bundle.evaluation.probe import train_probe
        from bundle.evaluation.spots import load_conditions, load_real_patches, select_spots
        from bundle.io.gene_panel import load_gene_panel

        val, _ = select_spots(dataset_dir, "validation", None, seed)
        train, _ = select_spots(dataset_dir, "training", 4000, seed)
        store = dataset_dir / "expression.npy"
        _, self.expression = load_conditions(val, store, 0)
        _, train_expression = load_conditions(train, store, 0)
        train_labels, self.labels, _ = spot_labels(train, val, train_expression, self.expression, "auto", 6, seed)
        self.real = load_real_patches(val, fov_um, size)
        genes = load_gene_panel(dataset_dir / "gene_panel.json")
        train_images = load_real_patches(train, fov_um, size)
        self.probe = train_probe(train_images, train_expression, genes, train_labels, epochs=8, seed=seed)
        self.seed = seed
        self.pred_real, self.label_real = self.probe.predict(self.real)  # the same for every row

    def score(self, recon: np.ndarray) -> dict:
        from bundle.evaluation.compartments import compartment_agreement
        from bundle.evaluation.fidelity import probe_scores

        pred_real, label_real = self.pred_real, self.label_real
        pred_rec, label_rec = self.probe.predict(recon)
        fid = probe_scores(
            self.probe, self.real, recon, self.expression, seed=self.seed, predictions=(pred_real, pred_rec)
        )
        comp = compartment_agreement(self.probe.classes, self.labels, label_real, label_rec)
        recalls = {
            k: v["generated_agreement"]
            for k, v in comp["per_class"].items()
            if isinstance(v, dict) and v.get("generated_agreement") is not None
        }
        return {
            "compartment_real": comp["real_accuracy"],
            "compartment_recon": comp["generated_agreement"],
            "recognised": [sum(v >= 0.5 for v in recalls.values()), len(recalls)],
            "ceiling_r": fid["ceiling_r_mean"],
            "recon_r": fid["fidelity_r_mean"],
        }


def markdown(results: dict) -> str:
    lines = [
        "| row | what | latent | parameters | PSNR (dB) | SSIM | compartments recon / real | recognised | "
        "probe r recon / real | train (min) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        p = r["probe"]
        train = f"{r['train_s'] / 60:.1f}" if r.get("train_s") else "-"
        lines.append(
            f"| {name} | {r['desc']} | {'x'.join(map(str, r['latent_shape']))} | {r['parameters'] / 1e6:.2f} M | "
            f"{r['psnr']:.2f} | {r['ssim']:.3f} | {p['compartment_recon']:.3f} / {p['compartment_real']:.3f} | "
            f"{p['recognised'][0]}/{p['recognised'][1]} | {p['recon_r']:.3f} / {p['ceiling_r']:.3f} | "
            f"{train} |"
        )
    return "\n".join(lines) + "\n"


def save_grid(path: Path, real: np.ndarray, recons: dict[str, np.ndarray], num: int) -> None:
    from PIL import Image

    idx = np.linspace(0, len(real) - 1, num).astype(int)
    rows = [real] + list(recons.values())
    grid = np.concatenate([np.concatenate([r[i].transpose(1, 2, 0) for i in idx], axis=1) for r in rows], axis=0)
    Image.fromarray(grid).save(path)
    print(f"reconstructions (real on top, then {', '.join(recons)}): {path}")


def main(argv: list[str] | None = None) -> int:
    from bundle.utils import named_rows, write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=["demo_0.5", "latent8"], help="rows to run, in order")
    ap.add_argument("--work-dir", default=str(ROOT / "outputs/autoencoder_ablation"))
    ap.add_argument("--row", action="append", default=[], metavar="NAME=JSON", help="an extra row (train overrides)")
    ap.add_argument("--force", action="store_true", help="rerun rows already in <work-dir>/autoencoder.json")
    ap.add_argument("--reconstructions", type=int, default=0, metavar="N", help="write a PNG of N patches per row")
    ap.add_argument("--list", action="store_true", help="print the built-in rows and exit")
    args = ap.parse_args(argv)
    rows = named_rows(ROWS, args.rows, args.row, ap.error)
    if args.list:
        for name, row in rows.items():
            print(f"{name}: {row['desc']}  train={row.get('train', {})}")
        return 0
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "autoencoder.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    bench, recons = None, {}
    for name in args.rows:
        if name in results and not args.force and not args.reconstructions:
            print(f"{name}: measured before (see {store}); --force reruns it")
            continue
        print(f"{name}: {rows[name]['desc']}", flush=True)
        train_s = train_row(name, rows[name], work)
        if train_s is None:  # trained before: keep the time it took then
            train_s = results.get(name, {}).get("train_s")
        if bench is None:
            from bundle.training import ensure_demo_dataset

            dataset_dir = Path(ensure_demo_dataset(str(ROOT / "datasets/demo"), fov_um=128.0))
            bench = ProbeBench(dataset_dir, 128.0, 64)
        path = work / name / "models/autoencoder.pt"
        recon, shape, params = reconstruct(path, bench.real)
        recons[name] = recon
        psnr, ssim = psnr_ssim(bench.real, recon)
        results[name] = {
            "desc": rows[name]["desc"],
            "train": rows[name].get("train", {}),
            "latent_shape": list(shape),
            "parameters": params,
            "psnr": psnr,
            "ssim": ssim,
            "probe": bench.score(recon),
            "train_s": train_s,
        }
        write_json_atomic(store, results)
        print(markdown({name: results[name]}).splitlines()[-1], flush=True)
    table = markdown(results)
    (work / "autoencoder.md").write_text(table)
    print(table)
    if args.reconstructions and recons:
        save_grid(work / "reconstructions.png", bench.real, recons, args.reconstructions)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
