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

Several slides: several --sample ids (or several --input paths) and one --output per slide, in the same order (also
one --thumbnail / --summary-json per slide when given). Under torchrun each process synthesises slides rank,
rank + world size, ... on cuda:LOCAL_RANK (or the CPU), each slide as one process would:

    torchrun --standalone --nproc_per_node 2 scripts/synthesize_slide.py \
        --dataset datasets/demo/dataset --sample CRC_S01 CRC_S04 --output outputs/CRC_S01.tif outputs/CRC_S04.tif
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
    source.add_argument("--sample", nargs="+", help="sample id(s) within --dataset (e.g. CRC_S04), one slide each")
    source.add_argument(
        "--input",
        nargs="+",
        help="Space Ranger outs folder(s), .h5ad or CSV (bundle.io.spots.read_spots), one slide each",
    )
    source.add_argument(
        "--input-mpp",
        type=float,
        default=None,
        help="um per full-resolution pixel of --input's positions (default: from its scale factors)",
    )
    parser.add_argument(
        "--output",
        nargs="+",
        required=True,
        help="pyramidal TIFF(s) to write, one per slide (e.g. outputs/synthetic.tif)",
    )
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the config's)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the config's)")
    parser.add_argument(
        "--expression-guidance-scale", type=float, default=None, help="expression guidance (default: the config's)"
    )
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
    parser.add_argument(
        "--thumbnail", nargs="+", default=None, help="also save a PNG thumbnail (at most 1024 px), one per slide"
    )
    parser.add_argument("--summary-json", nargs="+", default=None, help="also write the summary as JSON, one per slide")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)  # fmt: skip
    if bool(args.dataset) == bool(args.input):
        parser.error("give either --dataset (with --sample) or --input.")
    if args.dataset and not args.sample:
        parser.error("--dataset needs --sample (a sample id of its datalist.json, e.g. CRC_S04).")
    if args.input and args.sample:
        parser.error("--sample goes with --dataset; with --input, each input is one slide.")
    count = len(args.sample or args.input)
    for name in ("output", "thumbnail", "summary_json"):
        given = getattr(args, name)
        if given is not None and len(given) != count:
            parser.error(
                f"--{name.replace('_', '-')} got {len(given)} path(s) for {count} slide(s); give one per slide, in the "
                "order of the slides."
            )
    if len(set(map(str, args.output))) != len(args.output):
        parser.error(f"--output names a file twice ({args.output}); give each slide its own file.")
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
        "expression_guidance_scale": args.expression_guidance_scale,
    }
    config = read_inference_config(config_files, overrides)
    return config.get_parsed_content("pipeline"), config


def read_spots(args: argparse.Namespace, info: dict[str, Any], source: str) -> dict[str, Any]:
    """The spots of sample ``source`` of ``--dataset``, or of the ``--input`` path ``source``, in the checkpoint's gene
    panel."""
    from bundle.sampling.slide_io import spots_from_dataset, spots_from_input

    genes = list(info["gene_panel"])
    if args.dataset:
        return spots_from_dataset(args.dataset, source, genes)
    return spots_from_input(source, genes, info.get("normalization"), args.input_mpp)


def slide_jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One entry per slide, in command-line order: its source (sample id or input path), output, thumbnail and
    summary file."""
    sources = args.sample or args.input
    return [
        {
            "source": source,
            "output": args.output[i],
            "thumbnail": args.thumbnail[i] if args.thumbnail else None,
            "summary_json": args.summary_json[i] if args.summary_json else None,
        }
        for i, source in enumerate(sources)
    ]


def synthesize_one(args: argparse.Namespace, pipeline: Any, fov: float, job: dict[str, Any]) -> dict[str, Any]:
    """Synthesise one slide of :func:`slide_jobs`, print its summary and write its thumbnail and summary file."""
    from bundle.sampling.slide import synthesize_slide
    from bundle.sampling.slide_io import format_summary, save_thumbnail

    start = time.perf_counter()
    info = pipeline.info
    spots = read_spots(args, info, job["source"])
    print(f"model: {len(info['gene_panel'])} genes, {pipeline.network.num_neighbors} neighbours, {fov:g} um patches; "
          f"spots: {len(spots['positions_um'])} of sample {spots['sample']}; read in "
          f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    summary = synthesize_slide(
        pipeline, spots["positions_um"], spots["expression"], job["output"], patch_fov_um=fov,
        neighbors=spots["neighbors"], mpp=args.mpp, overlap=args.overlap, blend=not args.no_blend,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
        batch_size=args.batch_size, tissue_distance_um=args.tissue_distance_um, region_um=args.region,
        tile_size=args.tile_size, quality=args.quality, progress=not args.quiet, workdir=args.workdir,
    )  # fmt: skip
    print(format_summary(summary))
    if job["thumbnail"]:
        print(f"thumbnail: {save_thumbnail(job['output'], job['thumbnail'])}")
    if job["summary_json"]:
        Path(job["summary_json"]).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    import torch

    from bundle.distributed import launch_rank, shard
    from bundle.sampling.slide import check_slide_outputs

    jobs = slide_jobs(args)
    rank, world_size, local_rank = launch_rank()
    mine = [jobs[i] for i in shard(len(jobs), rank, world_size)]
    if world_size > 1:
        names = [job["source"] for job in mine]
        print(f"rank {rank} of {world_size}: {len(mine)} of {len(jobs)} slide(s) {names}")
        if args.device is None and torch.cuda.is_available():
            args.device = f"cuda:{local_rank}"
    if not mine:
        print(f"rank {rank}: no slide to synthesise ({len(jobs)} slide(s) for {world_size} processes).")
        return 0
    check_slide_outputs([job["output"] for job in mine])
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipeline, config = load_pipeline(args)
    fov = float(pipeline.info.get("patch_fov_um") or config.get_parsed_content("patch_fov_um"))
    print(f"model loaded in {time.perf_counter() - start:.1f} s")
    for job in mine:
        synthesize_one(args, pipeline, fov, job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
