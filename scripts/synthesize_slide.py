"""Generate a synthetic whole slide (pyramidal TIFF) for a Visium array with a trained model.

The demo model on the demo validation array CRC_S04 (a 1.2 mm x 1.2 mm region; drop --region for the whole array):

    python scripts/synthesize_slide.py --config-file configs/inference.json configs/demo.json \\
        --dataset datasets/demo/dataset --sample CRC_S04 --region 400 300 1600 1500 \\
        --output outputs/synthetic_CRC_S04.tif --steps 25 --seed 0

Spots come from a prepared dataset folder (``--dataset`` + ``--sample``: positions are the datalist's ``location`` x
``mpp`` in slide micrometres, expression the dataset's log-normalised ``expression.npy``) or from a Space Ranger
folder, ``.h5ad`` or CSV (``--input``, read with ``bundle.io.spots.read_spots`` and normalised like the training
data). The configs give the sampling pipeline (``configs/inference.json``'s ``pipeline``: the network built from the
architecture the checkpoint records, the scheduler, steps and guidance). See docs/whole_slide.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config-file",
        nargs="+",
        default=None,
        help="config files, later ones override earlier ones (default: configs/inference.json configs/demo.json)",
    )
    parser.add_argument("--model-path", default=None, help="model checkpoint (default: the configs' model_path)")
    parser.add_argument(
        "--autoencoder-path", default=None, help="autoencoder checkpoint (default: the configs' autoencoder_path)"
    )
    source = parser.add_argument_group("spots (one of)")
    source.add_argument("--dataset", help="prepared dataset folder (datalist.json, expression.npy, gene_panel.json)")
    source.add_argument("--sample", help="sample id within --dataset (e.g. CRC_S04)")
    source.add_argument("--input", help="Space Ranger outs folder, .h5ad or CSV (read with bundle.io.spots.read_spots)")
    source.add_argument(
        "--input-mpp",
        type=float,
        default=None,
        help="um per full-resolution pixel of --input's positions (default: from its scale factors)",
    )
    parser.add_argument("--output", required=True, help="pyramidal TIFF to write (e.g. outputs/synthetic.tif)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the config's)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the config's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the slide's noise (default 0)")
    parser.add_argument("--overlap", type=float, default=0.5, help="window overlap in [0, 1) (default 0.5)")
    parser.add_argument("--no-blend", action="store_true", help="naive tiling: non-overlapping windows, no blending")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per network forward (default 16)")
    parser.add_argument(
        "--region",
        type=float,
        nargs=4,
        metavar=("X0", "Y0", "X1", "Y1"),
        default=None,
        help="synthesise only this rectangle, in the spots' micrometre coordinates",
    )
    parser.add_argument(
        "--tissue-distance-um",
        type=float,
        default=None,
        help="windows whose centre is farther from every spot are background (default: spot pitch)",
    )
    parser.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="output um/px: the model's pixel size divided by a whole number (default: the model's)",
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    parser.add_argument("--tile-size", type=int, default=256, help="TIFF tile size (default 256)")
    parser.add_argument("--workdir", default=None, help="folder for temporary files (default: the system's)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's; 1 is often fastest on a busy shared CPU)",
    )
    parser.add_argument("--thumbnail", default=None, help="also save a PNG thumbnail (at most 1024 px) of the slide")
    parser.add_argument("--summary-json", default=None, help="also write the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)  # fmt: skip
    if bool(args.dataset) == bool(args.input):
        parser.error("give either --dataset (with --sample) or --input.")
    if args.dataset and not args.sample:
        parser.error("--dataset needs --sample (a sample id of its datalist.json, e.g. CRC_S04).")
    return args


def load_pipeline(args: argparse.Namespace) -> tuple[Any, Any]:
    """The configs' sampling pipeline with the two checkpoints; returns ``(pipeline, parsed config)``."""
    from bundle.sampling.generation import read_inference_config

    config_files = args.config_file or [str(ROOT / "configs" / "inference.json"), str(ROOT / "configs" / "demo.json")]
    print(f"configs: {', '.join(config_files)}")
    overrides = {
        "bundle_root": str(ROOT),
        "model_path": args.model_path,
        "autoencoder_path": args.autoencoder_path,
        "device": args.device,
    }
    config = read_inference_config(config_files, overrides)
    return config.get_parsed_content("pipeline"), config


def read_spots(args: argparse.Namespace, info: dict[str, Any]) -> dict[str, Any]:
    """The spots of ``--dataset``/``--sample`` or ``--input``, in the checkpoint's gene panel."""
    from bundle.sampling.slide_io import spots_from_dataset, spots_from_input

    genes = list(info["gene_panel"])
    if args.dataset:
        return spots_from_dataset(args.dataset, args.sample, genes)
    return spots_from_input(args.input, genes, info.get("normalization"), args.input_mpp)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    import torch

    from bundle.sampling.slide import synthesize_slide
    from bundle.sampling.slide_io import format_summary, save_thumbnail

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipeline, config = load_pipeline(args)
    info = pipeline.info
    spots = read_spots(args, info)
    fov = info.get("patch_fov_um") or config.get_parsed_content("patch_fov_um")
    print(f"model: {len(info['gene_panel'])} genes, {pipeline.network.num_neighbors} neighbours, {float(fov):g} um "
          f"patches; spots: {len(spots['positions_um'])} of sample {spots['sample']}; loaded in "
          f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    summary = synthesize_slide(
        pipeline, spots["positions_um"], spots["expression"], args.output, patch_fov_um=float(fov),
        neighbors=spots["neighbors"], mpp=args.mpp, overlap=args.overlap, blend=not args.no_blend,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
        batch_size=args.batch_size, tissue_distance_um=args.tissue_distance_um, region_um=args.region,
        tile_size=args.tile_size, quality=args.quality, progress=not args.quiet, workdir=args.workdir,
    )  # fmt: skip
    print(format_summary(summary))
    if args.thumbnail:
        print(f"thumbnail: {save_thumbnail(args.output, args.thumbnail)}")
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
