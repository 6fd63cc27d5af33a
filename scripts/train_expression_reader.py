"""Fit the expression reader of expression guidance for an already trained model (the last step of training).

Since 0.8.0 ``configs/train.json`` ends by fitting ``models/expression_reader.pt``; a model trained before has none, and
sampling with ``expression_guidance_scale`` > 0 refuses to start without it. This script runs that step alone, with
the same configs the model was trained with (it reads the training spots, the autoencoder checkpoint and the latent
cache, which it builds when missing). Example (the demo_long model):

    python scripts/train_expression_reader.py --config-file configs/train.json configs/demo.json configs/demo_long.json

Settings of the configs (``ckpt_dir``, ``output_dir``, ``expression_reader_iterations``, ...) can be overridden with
``--set key=value`` (the value read as JSON when it parses, e.g. ``--set ckpt_dir=models/demo_long_bal``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config-file",
        nargs="+",
        default=[str(ROOT / "configs" / "train.json"), str(ROOT / "configs" / "demo.json")],
        help="the training configs of the model, merged in order (default: train.json demo.json)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config setting")
    return parser.parse_args(argv)


def overrides(pairs: list[str]) -> dict:
    """``["key=value", ...]`` as a dictionary; values are JSON when they parse, strings otherwise."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set {pair!r}: write KEY=VALUE, e.g. --set ckpt_dir=models/demo_long")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def main(argv: list[str] | None = None) -> int:
    from bundle.sampling.generation import read_inference_config

    args = parse_args(argv)
    start = time.perf_counter()
    config = read_inference_config(args.config_file, {"bundle_root": str(ROOT), **overrides(args.set)})
    iterations = int(config.get_parsed_content("expression_reader_iterations"))
    if iterations <= 0:
        raise SystemExit("expression_reader_iterations is 0: nothing to fit (--set expression_reader_iterations=1000).")
    autoencoder_ckpt = Path(config.get_parsed_content("autoencoder_ckpt"))
    if not autoencoder_ckpt.is_file():
        raise SystemExit(
            f"no autoencoder checkpoint {str(autoencoder_ckpt)!r}: train the model first (or --set ckpt_dir=...)."
        )
    from bundle.expression_guidance import train_expression_reader

    path = config.get_parsed_content("expression_reader_path")
    summary = train_expression_reader(
        path,
        config.get_parsed_content("expression_reader#dataset"),
        config.get_parsed_content("expression_store"),
        config.get_parsed_content("gene_panel"),
        config.get_parsed_content("scale_factor"),
        iterations=iterations,
        num_components=config.get_parsed_content("expression_reader_components"),
        seed=int(config.get_parsed_content("seed")),
        device=config.get_parsed_content("device"),
        scheduler=config.get_parsed_content("noise_scheduler"),
    )
    if summary is None or not Path(path).is_file():
        raise SystemExit(f"no expression reader was written to {path!r}.")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
