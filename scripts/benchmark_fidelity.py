"""Fidelity ablation: train and evaluate the demo model under named variants, one table row each.

Every row trains stage 2 (and stage 1 when the row changes the autoencoder) with the README's main job
(``configs/train.json`` + ``configs/demo.json``) plus the row's overrides, in its own folder under ``--work-dir``, then
runs the README's evaluation (``configs/evaluate.json`` + ``configs/demo.json``, ``--require_inception false``) on the
demo validation spots, and reports what the evaluation measures against its real ceiling:

- compartment agreement of generated patches / the real patches' accuracy, and the worst compartment's recall;
- fidelity probe r (pooled mean over genes) / the ceiling r on real patches;
- edit directionality, pooled and per built-in edit (in parentheses: the mean over several probes when the row's
  evaluation sets ``edit_probe_seeds``, e.g. ``"evaluate": {"edit_probe_seeds": 5}``);
- training and evaluation wall time.

A row's ``"autoencoder"`` names a stage-1 checkpoint to start from (e.g. a row of ``scripts/benchmark_autoencoder.py``);
its recorded network settings are passed on, so stage 2 is built for its latents. Rows that change only sampling
(``"model": "<row>"``) reuse that row's model and run the evaluation alone. Rows whose training overrides leave the
autoencoder alone start from ``--autoencoder`` (default ``models/autoencoder.pt``; copied, never written), so stage-2
rows differ only in stage 2. The table goes to stdout and ``<work-dir>/fidelity.md``, the numbers to
``<work-dir>/fidelity.json``; a row already measured in that JSON is not rerun (``--force`` reruns it).

    python scripts/benchmark_fidelity.py --rows baseline latent_cache --work-dir outputs/fidelity
    python scripts/benchmark_fidelity.py --list
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name -> description, training overrides (train.json keys), evaluation overrides, model of another row (no training)
ROWS: dict[str, dict] = {
    "baseline": {
        "desc": "images encoded every step (latent_cache false), as the 0.5.0 demo",
        "train": {"latent_cache": False},
    },
    "latent_cache": {"desc": "stage 2 on cached latents (8 dihedral variants encoded once)", "train": {}},
    "min_snr": {"desc": "cached latents + min-SNR-gamma 5 loss weighting", "train": {"min_snr_gamma": 5.0}},
    "offset_noise": {"desc": "cached latents + offset noise 0.05", "train": {"offset_noise": 0.05}},
    "p_uncond_0.2": {"desc": "cached latents + classifier-free dropout 0.2", "train": {"p_uncond": 0.2}},
    "guidance_1.5": {
        "desc": "latent_cache model, guidance 1.5",
        "model": "latent_cache",
        "evaluate": {"guidance_scale": 1.5},
    },
    "guidance_6": {
        "desc": "latent_cache model, guidance 6.0",
        "model": "latent_cache",
        "evaluate": {"guidance_scale": 6.0},
    },
    "expression_guidance_0": {
        "desc": "latent_cache model, expression guidance off",
        "model": "latent_cache",
        "evaluate": {"expression_guidance_scale": 0.0},
    },
    "expression_guidance_140": {
        "desc": "latent_cache model, expression guidance 140",
        "model": "latent_cache",
        "evaluate": {"expression_guidance_scale": 140.0},
    },
    "steps_50": {
        "desc": "latent_cache model, 50 DDIM steps",
        "model": "latent_cache",
        "evaluate": {"num_inference_steps": 50},
    },
}
AUTOENCODER_KEYS = ("autoencoder_kwargs", "autoencoder_iterations", "autoencoder_lr", "adv_weight", "kl_weight")


def _override_args(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        # MONAI's command line drops "None"; the expression "$None" sets a key to None (e.g. min_snr_gamma off)
        text = "$None" if value is None else value if isinstance(value, str) else repr(value)
        args += [f"--{key}", text]
    return args


def _run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed (exit {proc.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - start


def autoencoder_overrides(path: Path) -> dict:
    """``autoencoder_kwargs`` of a stage-1 checkpoint, so that stage 2 is built for its latents."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    kwargs = checkpoint.get("network_kwargs")
    if not kwargs:
        raise ValueError(f"{path} records no network_kwargs: give a checkpoint written by the bundle's stage 1.")
    return {"autoencoder_kwargs": dict(kwargs)}


def train_row(name: str, row: dict, work: Path, autoencoder: Path) -> float:
    models, outputs = work / name / "models", work / name / "outputs"
    models.mkdir(parents=True, exist_ok=True)
    overrides = dict(row.get("train", {}))
    source = Path(row["autoencoder"]) if row.get("autoencoder") else autoencoder
    if row.get("autoencoder") or not any(k in overrides for k in AUTOENCODER_KEYS):
        if not source.is_file():
            raise FileNotFoundError(
                f"autoencoder {source} does not exist: train the demo once (the README's main job), give a stage-1 "
                f'checkpoint (--autoencoder, or the row\'s "autoencoder") or run scripts/benchmark_autoencoder.py.'
            )
        if not (models / "autoencoder.pt").exists():
            shutil.copy2(source, models / "autoencoder.pt")
        overrides = {**autoencoder_overrides(source), **overrides}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file"]
    cmd += [str([str(ROOT / "configs/train.json"), str(ROOT / "configs/demo.json")])]
    cmd += ["--bundle_root", str(ROOT), "--ckpt_dir", str(models), "--output_dir", str(outputs)]
    return _run(cmd + _override_args(overrides), work / name / "train.log")


def evaluate_row(name: str, row: dict, work: Path) -> tuple[float, dict]:
    model_row = row.get("model", name)
    eval_dir = work / name / "eval"
    (work / name).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
    cmd += [str([str(ROOT / "configs/evaluate.json"), str(ROOT / "configs/demo.json")])]
    cmd += ["--bundle_root", str(ROOT), "--ckpt_dir", str(work / model_row / "models")]
    cmd += ["--output_dir", str(work / name / "outputs"), "--eval_dir", str(eval_dir), "--require_inception", "false"]
    seconds = _run(cmd + _override_args(row.get("evaluate", {})), work / name / "evaluate.log")
    return seconds, json.loads((eval_dir / "metrics.json").read_text())


def _per_edit(summary: dict, suffix: str) -> dict:
    """``{edit: value}`` of the summary keys ``edit_<edit><suffix>`` (not the pooled ``edit_directionality...``)."""
    return {
        k.removeprefix("edit_").removesuffix(suffix): v
        for k, v in summary.items()
        if k.startswith("edit_") and k.endswith(suffix) and not k.startswith("edit_directionality")
    }


def summarise(metrics: dict) -> dict:
    s, comp = metrics["summary"], metrics["compartments"]
    recalls = {
        label: values["generated_agreement"]
        for label, values in (comp.get("per_class") or {}).items()
        if isinstance(values, dict) and values.get("generated_agreement") is not None
    }
    edits, probe_means = _per_edit(s, "_fraction"), _per_edit(s, "_probe_mean")
    return {
        "compartment_real": s["compartment_real_accuracy"],
        "compartment_generated": s["compartment_generated_agreement"],
        "compartment_ratio": s["compartment_generated_agreement"] / s["compartment_real_accuracy"],
        "worst_compartment": min(recalls.items(), key=lambda kv: kv[1]) if recalls else None,
        "compartments_recognised": [sum(v >= 0.5 for v in recalls.values()), len(recalls)],
        "ceiling_r": s["ceiling_r_mean"],
        "fidelity_r": s["fidelity_r_mean"],
        "fidelity_ratio": s["fidelity_r_mean"] / s["ceiling_r_mean"],
        "edit_pooled": s["edit_directionality"],
        "edits": edits,
        "edit_pooled_probe_mean": s.get("edit_directionality_probe_mean"),
        "edits_probe_mean": probe_means,
    }


def _rate(value: float, probe_mean: float | None) -> str:
    """``0.81``, or ``0.81 (0.76)`` with the mean over several probes."""
    return f"{value:.2f}" + (f" ({probe_mean:.2f})" if probe_mean is not None else "")


def markdown(results: dict) -> str:
    lines = [
        "| row | what | compartments gen / real | ratio | recognised in >= half | worst compartment | "
        "fidelity r / ceiling | ratio | edits pooled | per edit | train (min) | evaluate (min) |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    for name, r in results.items():
        m = r["summary"]
        worst = f"{m['worst_compartment'][0]} ({m['worst_compartment'][1]:.2f})" if m["worst_compartment"] else "-"
        means = m.get("edits_probe_mean") or {}
        edits = ", ".join(f"{k} {_rate(v, means.get(k))}" for k, v in m["edits"].items())
        pooled = _rate(m["edit_pooled"], m.get("edit_pooled_probe_mean"))
        train = f"{r['train_s'] / 60:.1f}" if r.get("train_s") else "-"
        lines.append(
            f"| {name} | {r['desc']} | {m['compartment_generated']:.3f} / {m['compartment_real']:.3f} | "
            f"{m['compartment_ratio']:.0%} | {m['compartments_recognised'][0]}/{m['compartments_recognised'][1]} | "
            f"{worst} | {m['fidelity_r']:.3f} / {m['ceiling_r']:.3f} | "
            f"{m['fidelity_ratio']:.0%} | {pooled} | {edits} | {train} | {r['evaluate_s'] / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bundle.utils import named_rows, write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=["baseline", "latent_cache"], help="rows to run, in order")
    ap.add_argument("--work-dir", default=str(ROOT / "outputs/fidelity"))
    ap.add_argument("--autoencoder", default=str(ROOT / "models/autoencoder.pt"), help="stage 1 shared by the rows")
    ap.add_argument(
        "--row",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="an extra row, e.g. " '\'wide={"desc": "...", "train": {"num_iterations": 1000}}\'',
    )
    ap.add_argument("--force", action="store_true", help="rerun rows already in <work-dir>/fidelity.json")
    ap.add_argument("--list", action="store_true", help="print the built-in rows and exit")
    args = ap.parse_args(argv)
    rows = named_rows(ROWS, args.rows, args.row, ap.error)
    if args.list:
        for name, row in rows.items():
            print(f"{name}: {row['desc']}  train={row.get('train', {})} evaluate={row.get('evaluate', {})}")
        return 0
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "fidelity.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    for name in args.rows:
        row = rows[name]
        if name in results and not args.force:
            print(f"{name}: measured before (see {store}); --force reruns it")
            continue
        if "model" in row and not (work / row["model"] / "models/model.pt").is_file():
            ap.error(f"row {name} evaluates the model of row {row['model']!r}: run that row first")
        print(f"{name}: {row['desc']}", flush=True)
        train_s = None if "model" in row else train_row(name, row, work, Path(args.autoencoder))
        evaluate_s, metrics = evaluate_row(name, row, work)
        results[name] = {
            "desc": row["desc"],
            "train": row.get("train", {}),
            "evaluate": row.get("evaluate", {}),
            "model": row.get("model", name),
            "train_s": train_s,
            "evaluate_s": evaluate_s,
            "summary": summarise(metrics),
        }
        write_json_atomic(store, results)
        (work / "fidelity.md").write_text(markdown(results))
    print(markdown({k: results[k] for k in args.rows if k in results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
