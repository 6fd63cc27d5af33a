"""Counterfactual tissue: generate spots' patches from their measured expression and from edited expression.

Every spot is generated once as measured and once per edit, with the same per-spot seed, so the differences between
the rows of the grid come from the edit alone. Example (the demo model, after the README's training job):

    python scripts/edit_expression.py --config-file configs/inference.json configs/demo.json \\
        --num-spots 6 --edit immune*4 --edit tumour*0 --output outputs/edits/edit_grid.png

An edit is TARGET*FACTOR (scale the counts: immune*4, hypoxia*0) or TARGET=VALUE (set the log-normalised value,
CD3E=3), where TARGET is a gene of the model's panel or a gene set (built-in: the demo study's programmes epithelial,
tumour, stroma, immune, adipose, necrosis, hypoxia, mucosa; more with --gene-sets file.json|file.gmt). Several edits
in one row: --edit "immune*4,stroma*0". The network, schedulers and input handling come from the bundle configs
(--config-file), so this script uses the same model definition as configs/inference.json.

Writes the grid PNG (rows: original, then each edit; columns: spots) and, next to it, a JSON with the spots, seeds,
edits and the genes each edit touched.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config-file",
        nargs="+",
        default=[str(ROOT / "configs" / "inference.json")],
        help="bundle configs, merged in order (add configs/demo.json for the demo model)",
    )
    parser.add_argument("--bundle-root", default=str(ROOT), help="bundle folder (models/ and datasets/demo/ under it)")
    parser.add_argument("--input", default=None, help="Space Ranger outs/ folder, .h5ad or CSV (default: demo sample)")
    parser.add_argument("--layer", default=None, help="AnnData layer with the raw counts")
    parser.add_argument("--normalized", action="store_true", help="input is log1p(normalize_total), not counts")
    parser.add_argument("--spots", nargs="+", default=None, help="spot ids (barcodes) to show")
    parser.add_argument("--num-spots", type=int, default=6, help="spots spread over the input (without --spots)")
    parser.add_argument("--edit", action="append", required=True, help="edit(s) of one grid row, e.g. immune*4; repeat")
    parser.add_argument("--gene-sets", default=None, help="JSON {name: [genes]} or GMT file of extra gene sets")
    parser.add_argument("--seed", type=int, default=None, help="base seed (a spot's seed: seed + its row in the input)")
    parser.add_argument("--num-inference-steps", type=int, default=None, help="denoising steps (default: the config's)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument(
        "--expression-guidance-scale", type=float, default=None, help="expression guidance scale (0 = off)"
    )
    parser.add_argument("--scheduler", default=None, choices=["ddim", "ddpm"], help="sampler (default: the config's)")
    parser.add_argument("--model-path", default=None, help="models/model.pt")
    parser.add_argument("--autoencoder-path", default=None, help="models/autoencoder.pt")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=None, help="patches generated at once (default: config's)")
    parser.add_argument("--num-threads", type=int, default=None, help="CPU threads (1 is fastest on a busy CPU)")
    parser.add_argument("--output", default=str(ROOT / "outputs" / "edits" / "edit_grid.png"), help="grid PNG to write")
    parser.add_argument("--no-labels", action="store_true", help="leave out the row and column labels")
    return parser.parse_args(argv)


def read_config(args: argparse.Namespace):
    """The merged configs with the command line's settings (and the CPU threads set)."""
    from bundle.sampling.generation import read_inference_config

    overrides: dict[str, Any] = {
        "bundle_root": args.bundle_root,
        "input": args.input,
        "layer": args.layer,
        "seed": args.seed,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "expression_guidance_scale": args.expression_guidance_scale,
        "scheduler": args.scheduler,
        "model_path": args.model_path,
        "autoencoder_path": args.autoencoder_path,
        "device": args.device,
        "batch_size": args.batch_size,
        "gene_sets_file": args.gene_sets,
        "num_threads": args.num_threads,
        "normalized": True if args.normalized else None,
    }
    config = read_inference_config(args.config_file, overrides)
    num_threads = config.get_parsed_content("num_threads")
    if num_threads:
        torch.set_num_threads(int(num_threads))
    return config


def describe(args, config, output: Path, labels, images, spots, rows, seeds, effects) -> dict[str, Any]:
    """The JSON written next to the grid: rows, spots and seeds, edits and their effect, settings."""
    return {
        "grid": output.name,
        "rows": labels,
        "patch_size": list(images.shape[-2:]),
        "spots": [
            {"spot_id": spots.ids[r], "spot_index": int(r), "seed": s, "sample": spots.sample}
            for r, s in zip(rows, seeds)
        ],
        "edits": effects,
        "seed": int(config.get_parsed_content("seed")),
        "guidance_scale": config.get_parsed_content("guidance_scale"),
        "expression_guidance_scale": config.get_parsed_content("expression_guidance_scale"),
        "num_inference_steps": int(config.get_parsed_content("num_inference_steps")),
        "scheduler": str(config.get_parsed_content("scheduler")).lower(),
        "model_path": str(Path(config.get_parsed_content("model_path")).resolve()),
        "input": str(Path(spots.source).resolve()),
        "gene_sets": config.get_parsed_content("gene_sets_file"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    from bundle.sampling.edit_grid import edit_effects, edited_genes, generate_variants, parse_edit_rows, row_labels
    from bundle.sampling.edits import apply_edits
    from bundle.sampling.generation import build_conditions, select_spots, spot_seeds
    from bundle.sampling.grids import save_image_grid
    from bundle.utils import write_json_atomic

    start = time.perf_counter()
    config = read_config(args)
    # check the edits against the panel before loading anything large
    genes = list(config.get_parsed_content("model_info")["gene_panel"])
    gene_sets = config.get_parsed_content("gene_sets")  # --gene-sets, else the configs' gene_sets_file
    edit_rows = parse_edit_rows(args.edit)
    touched = edited_genes(edit_rows, genes, gene_sets)

    spots = config.get_parsed_content("spot_data")
    num_neighbors = int(config.get_parsed_content("num_neighbors"))
    rows = select_spots(spots, args.spots, None if args.spots else args.num_spots)
    seeds = spot_seeds(int(config.get_parsed_content("seed")), rows)
    if spots.neighbors is None and num_neighbors > 0:
        logging.info(f"{spots.source} gives no spot positions: each spot stands in for its missing neighbours.")
    original = build_conditions(spots, num_neighbors, rows).numpy()
    variants = [original] + [apply_edits(original, genes, row, gene_sets) for row in edit_rows]

    pipeline = config.get_parsed_content("pipeline")
    steps = int(config.get_parsed_content("num_inference_steps"))
    guidance = config.get_parsed_content("guidance_scale")
    batch_size = int(config.get_parsed_content("batch_size"))
    images = generate_variants(pipeline, variants, seeds, steps, guidance, batch_size, log=logging.info)

    labels = row_labels(edit_rows)
    output = Path(args.output)
    save_image_grid(
        list(images),
        output,
        row_labels=None if args.no_labels else labels,
        column_labels=None if args.no_labels else [spots.ids[r] for r in rows],
    )
    effects = edit_effects(labels, touched, variants, genes)
    write_json_atomic(
        output.with_suffix(".json"), describe(args, config, output, labels, images, spots, rows, seeds, effects)
    )
    print(
        f"wrote {output} ({len(variants)} rows x {len(rows)} spots) and {output.with_suffix('.json').name} in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
