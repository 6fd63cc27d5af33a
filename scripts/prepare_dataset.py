"""Build a training dataset folder from a manifest of (spatial transcriptomics, slide) samples.

Example (the built-in demo data):

    python scripts/make_demo_data.py --output-dir demo_data
    python scripts/prepare_dataset.py --manifest demo_data/manifest.csv --output-dir datasets/demo

The manifest is a CSV with columns sample_id,st_path,slide_path (or sample_id,hest_root) and optional
mpp,split,patient,metadata_path,layer,technology (paths relative to the manifest). See docs/data.md and, for the
her2st sections, docs/real_data.md.
"""

from __future__ import annotations

import argparse
import sys
import time

from bundle.geometry import PITCH_TOLERANCE
from bundle.io.dataset import MAX_BACKGROUND_SHARE, prepare_dataset
from bundle.io.gene_panel import load_gene_panel
from bundle.io.slides import SUPPORTED_BACKENDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="CSV: sample_id,st_path,slide_path[,mpp,split,patient,...]")
    parser.add_argument("--output-dir", required=True, help="dataset folder to write")
    parser.add_argument(
        "--fov-um", type=float, default=128.0, help="patch field of view in um (default 128 = 512 px at 40x)"
    )
    parser.add_argument("--genes", default=None, help="gene panel file (gene_panel.json or one gene per line)")
    parser.add_argument("--n-top-genes", type=int, default=256, help="panel size when --genes is not given")
    parser.add_argument("--min-counts", type=int, default=100, help="drop spots with fewer total counts")
    parser.add_argument("--target-sum", type=float, default=1e4, help="normalize_total target before log1p")
    parser.add_argument("--backend", default=None, choices=SUPPORTED_BACKENDS, help="slide reader")
    parser.add_argument(
        "--spot-spacing-um", type=float, default=None, help="array pitch in um (default: the technology's)"
    )
    parser.add_argument(
        "--pitch-tolerance",
        type=float,
        default=PITCH_TOLERANCE,
        help="refuse a pixel size this share away from the one fitted to the spot array (0: skip the check)",
    )
    parser.add_argument(
        "--split-by",
        default="patient",
        choices=("patient", "sample"),
        help="'sample' allows one patient's sections in several splits (serial sections), recorded in dataset.json",
    )
    parser.add_argument(
        "--min-spot-fraction",
        type=float,
        default=0.0,
        help="select only genes detected in at least this share of training spots (e.g. 0.1 on shallow data)",
    )
    parser.add_argument("--include-genes", nargs="*", default=None, help="genes added to the selected panel")
    parser.add_argument(
        "--slide-cache-dir", default=None, help="where plain images are converted (default: <output-dir>_slides)"
    )
    parser.add_argument(
        "--max-background-share",
        type=float,
        default=MAX_BACKGROUND_SHARE,
        help="refuse a sample whose share of in-tissue spots on background exceeds this (1: never)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    genes = load_gene_panel(args.genes) if args.genes else None
    summary = prepare_dataset(
        args.manifest,
        args.output_dir,
        fov_um=args.fov_um,
        genes=genes,
        n_top_genes=args.n_top_genes,
        min_counts=args.min_counts,
        target_sum=args.target_sum,
        backend=args.backend,
        spot_spacing_um=args.spot_spacing_um or None,
        max_background_share=args.max_background_share,
        overwrite=args.overwrite,
        pitch_tolerance=args.pitch_tolerance or None,
        split_by=args.split_by,
        include_genes=args.include_genes,
        slide_cache_dir=args.slide_cache_dir,
        min_spot_fraction=args.min_spot_fraction,
    )
    print(f"wrote {args.output_dir} ({summary['total_kept']} spots) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
