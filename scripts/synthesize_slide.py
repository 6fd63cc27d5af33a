"""Generate a synthetic whole slide (pyramidal TIFF) for a Visium array with a trained model.

The demo model on the demo validation array CRC_S04 (a 1.2 mm x 1.2 mm region; drop --region for the whole array):

    python scripts/synthesize_slide.py --config-file configs/inference.json configs/demo.json \\
        --dataset datasets/demo/dataset --sample CRC_S04 --region 400 300 1600 1500 \\
        --output outputs/synthetic_CRC_S04.tif --steps 25 --seed 0

Spots come from a prepared dataset folder (``--dataset`` + ``--sample``: positions are the datalist's ``location`` x
``mpp`` in slide micrometres, expression the dataset's log-normalised ``expression.npy``) or from a Space Ranger
folder, ``.h5ad`` or CSV (``--input``, read with ``bundle.io.spots.read_spots`` and normalised like the training
data). The configs give ``network_def`` and ``sample_scheduler``; the gene panel and the number of neighbours come from
the checkpoint. See docs/whole_slide.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARCHITECTURE_KEYS = (
    "unet_kwargs",
    "cross_attention_dim",
    "num_context_tokens",
    "gene_encoder_hidden_dim",
    "num_neighbors",
)


def default_config_files() -> list[str]:
    """``configs/inference.json`` (or ``configs/train.json`` where it does not exist) plus ``configs/demo.json``."""
    first = ROOT / "configs" / "inference.json"
    if not first.is_file():
        first = ROOT / "configs" / "train.json"
    return [str(first), str(ROOT / "configs" / "demo.json")]


def load_model(
    config_files: list[str], model_path: str, autoencoder_path: str, device: str
) -> tuple[Any, dict[str, Any], Any]:
    """Build the pipeline from the configs' ``network_def`` and ``sample_scheduler`` and the two checkpoints.

    Returns:
        ``(pipeline, model info, parsed config)``.
    """
    from monai.bundle import ConfigParser

    from bundle.checkpoints import read_model_info
    from bundle.sampling.generation import load_pipeline

    for file in config_files:
        if not Path(file).is_file():
            raise FileNotFoundError(f"config file {file!r} does not exist; pass existing files to --config-file.")
    info = read_model_info(model_path)
    parser = ConfigParser()
    parser.read_config(config_files)
    parser["bundle_root"] = str(ROOT)
    parser["model_path"], parser["autoencoder_path"] = str(model_path), str(autoencoder_path)
    parser["gene_panel"] = list(info["gene_panel"])  # the network's width follows the checkpoint's panel
    if info.get("num_neighbors") is not None:
        parser["num_neighbors"] = int(info["num_neighbors"])
    network = parser.get_parsed_content("network_def", lazy=False)
    scheduler = parser.get_parsed_content("sample_scheduler", lazy=False)
    if "architecture" in parser:
        architecture = parser.get_parsed_content("architecture")
    else:
        architecture = {key: parser.get_parsed_content(key) for key in ARCHITECTURE_KEYS if key in parser}
    steps = parser.get_parsed_content("num_inference_steps") if "num_inference_steps" in parser else 50
    guidance = parser.get_parsed_content("guidance_scale") if "guidance_scale" in parser else 3.0
    eta = parser.get_parsed_content("eta") if "eta" in parser else 0.0
    pipeline = load_pipeline(
        model_path,
        autoencoder_path,
        network,
        scheduler,
        device=device,
        num_inference_steps=int(steps),
        guidance_scale=guidance,
        eta=float(eta),
        architecture=architecture,
    )
    return pipeline, info, parser


def spots_from_dataset(dataset: str | Path, sample: str, genes: list[str]) -> dict[str, Any]:
    """Positions (slide micrometres), expression and neighbour indices of one sample of a prepared dataset folder."""
    from bundle.io.gene_panel import check_gene_panel, load_gene_panel
    from bundle.utils import read_json

    dataset = Path(dataset)
    for name in ("datalist.json", "expression.npy", "gene_panel.json"):
        if not (dataset / name).is_file():
            raise FileNotFoundError(
                f"{str(dataset / name)!r} does not exist: --dataset must be a folder written by "
                "scripts/prepare_dataset.py (datalist.json, expression.npy, gene_panel.json)."
            )
    check_gene_panel(genes, load_gene_panel(dataset / "gene_panel.json"), what=f"dataset {str(dataset)!r}")
    datalist = read_json(dataset / "datalist.json")
    items = [item for split in datalist.values() if isinstance(split, list) for item in split]
    selected = [item for item in items if item.get("sample") == sample]
    if not selected:
        samples = sorted({str(item.get("sample")) for item in items})
        raise ValueError(f"sample {sample!r} is not in {str(dataset / 'datalist.json')!r}; its samples are {samples}.")
    store = np.load(dataset / "expression.npy", mmap_mode="r")
    rows = np.array([int(item["expression"]) for item in selected])
    positions = np.array([[float(v) * float(item["mpp"]) for v in item["location"]] for item in selected])
    index_of_row = {int(row): i for i, row in enumerate(rows)}
    neighbors = np.array(
        [[index_of_row.get(int(r), -1) for r in item.get("neighbors", [-1] * 6)] for item in selected], dtype=np.int64
    )
    return {
        "positions_um": positions,
        "expression": np.asarray(store[rows], dtype=np.float32),
        "neighbors": neighbors if neighbors.ndim == 2 and neighbors.shape[1] >= 6 else None,
        "sample": sample,
    }


def spots_from_input(path: str, genes: list[str], normalization: Any, mpp: float | None = None) -> dict[str, Any]:
    """Spots of a Space Ranger folder, ``.h5ad`` or CSV through ``bundle.io.spots.read_spots``."""
    import bundle.inference

    read_spots = getattr(bundle.inference, "read_spots", None)
    if read_spots is None:
        raise SystemExit(
            "--input needs bundle.io.spots.read_spots, which this version of the bundle does not have; prepare the "
            "sample with scripts/prepare_dataset.py and use --dataset <folder> --sample <id>."
        )
    spots = read_spots(path, genes, normalization, mpp=mpp)
    if spots.positions_um is None:
        raise SystemExit(f"{path!r} has no spot positions; whole-slide synthesis needs them (tissue_positions.csv).")
    return {
        "positions_um": np.asarray(spots.positions_um, dtype=np.float64),
        "expression": np.asarray(spots.expression, dtype=np.float32),
        "neighbors": None if spots.neighbors is None else np.asarray(spots.neighbors),
        "sample": spots.sample,
    }


def save_thumbnail(slide: str | Path, path: str | Path, max_size: int = 1024) -> Path:
    """Save the smallest pyramid level of ``slide``, shrunk to at most ``max_size`` pixels, as a PNG."""
    import tifffile
    from PIL import Image

    with tifffile.TiffFile(slide) as tif:
        image = Image.fromarray(tif.pages[len(tif.pages) - 1].asarray())
    image.thumbnail((max_size, max_size), Image.LANCZOS)
    path = Path(path)
    image.save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config-file",
        nargs="+",
        default=None,
        help="config files, later ones override earlier ones (default: configs/inference.json, or "
        "configs/train.json where it does not exist, plus configs/demo.json)",
    )
    parser.add_argument("--model-path", default=str(ROOT / "models" / "model.pt"), help="models/model.pt")
    parser.add_argument(
        "--autoencoder-path", default=str(ROOT / "models" / "autoencoder.pt"), help="models/autoencoder.pt"
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    import torch

    from bundle.sampling.slide import synthesize_slide

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config_files = args.config_file or default_config_files()
    print(f"configs: {', '.join(config_files)}")
    start = time.perf_counter()
    pipeline, info, config = load_model(config_files, args.model_path, args.autoencoder_path, device)
    genes = list(info["gene_panel"])
    if args.dataset:
        spots = spots_from_dataset(args.dataset, args.sample, genes)
    else:
        spots = spots_from_input(args.input, genes, info.get("normalization"), args.input_mpp)
    fov = info.get("patch_fov_um") or config.get_parsed_content("patch_fov_um")
    print(f"model: {len(genes)} genes, {pipeline.network.num_neighbors} neighbours, {float(fov):g} um patches; "
          f"spots: {len(spots['positions_um'])} of sample {spots['sample']}; loaded in "
          f"{time.perf_counter() - start:.1f} s")  # fmt: skip

    summary = synthesize_slide(
        pipeline,
        spots["positions_um"],
        spots["expression"],
        args.output,
        patch_fov_um=float(fov),
        neighbors=spots["neighbors"],
        mpp=args.mpp,
        overlap=args.overlap,
        blend=not args.no_blend,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        batch_size=args.batch_size,
        tissue_distance_um=args.tissue_distance_um,
        region_um=args.region,
        tile_size=args.tile_size,
        quality=args.quality,
        progress=not args.quiet,
        workdir=args.workdir,
    )
    height, width = summary["shape"]
    timings = summary["timings_s"]
    print(
        f"wrote {summary['path']}: {width} x {height} px at {summary['mpp']:g} um/px "
        f"({width * summary['mpp'] / 1000:.2f} x {height * summary['mpp'] / 1000:.2f} mm, {len(summary['levels'])} "
        f"levels), origin (x, y) = ({summary['origin_um'][0]:.1f}, {summary['origin_um'][1]:.1f}) um\n"
        f"windows: {summary['windows']} over tissue of {summary['grid'][0]} x {summary['grid'][1]}, "
        f"{'blended, overlap ' + format(summary['overlap'], 'g') if summary['blend'] else 'naive tiling'}; "
        f"{summary['num_inference_steps']} steps, guidance {summary['guidance_scale']}, seed {summary['seed']}\n"
        f"seam score: {summary['seam_score']:.3f} (1 = no visible seams)\n"
        f"time: {timings['total']:.1f} s (denoise {timings['denoise']:.1f} s, decode {timings['decode']:.1f} s, "
        f"write {timings['write']:.1f} s); peak RSS {summary['memory_mb']['process_peak_rss']:.0f} MB"
    )
    if args.thumbnail:
        print(f"thumbnail: {save_thumbnail(args.output, args.thumbnail)}")
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
