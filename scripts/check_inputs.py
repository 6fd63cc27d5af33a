"""Check a manifest's samples before preparing a dataset: every input check, nothing written, one table.

Example (the built-in demo data):

    python scripts/make_demo_data.py --output-dir demo_data
    python scripts/check_inputs.py --manifest demo_data/manifest.csv --fov-um 64

Per sample: the pixel size and where it came from, spots in tissue / on background / with a patch leaving the slide /
with too few counts / kept, the features (genes, or probes summed to genes), the raw-count check, and the verdict
(ok, or the first line of the message dataset preparation would refuse the sample with). Exits 1 when any sample is
refused. The options mean what they mean for scripts/prepare_dataset.py.
"""

from __future__ import annotations

import argparse
import json
import sys

from bundle.geometry import PITCH_TOLERANCE
from bundle.io.check import check_inputs, format_check_table
from bundle.io.dataset import MAX_BACKGROUND_SHARE
from bundle.io.slides import SUPPORTED_BACKENDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="CSV: sample_id,st_path,slide_path[,mpp,split,patient,...]")
    parser.add_argument("--fov-um", type=float, default=128.0, help="patch field of view in um")
    parser.add_argument("--min-counts", type=int, default=100, help="spots with fewer total counts are dropped")
    parser.add_argument("--backend", default=None, choices=SUPPORTED_BACKENDS, help="slide reader")
    parser.add_argument("--spot-spacing-um", type=float, default=None, help="array pitch (default: the technology's)")
    parser.add_argument(
        "--pitch-tolerance", type=float, default=PITCH_TOLERANCE, help="pixel size vs fitted pitch (0: skip)"
    )
    parser.add_argument("--split-by", default="patient", choices=("patient", "sample"), help="as for preparation")
    parser.add_argument(
        "--max-background-share", type=float, default=MAX_BACKGROUND_SHARE, help="refusal threshold (1: off)"
    )
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    results = check_inputs(
        args.manifest,
        fov_um=args.fov_um,
        min_counts=args.min_counts,
        backend=args.backend,
        spot_spacing_um=args.spot_spacing_um or None,
        max_background_share=args.max_background_share,
        pitch_tolerance=args.pitch_tolerance or None,
        split_by=args.split_by,
    )
    print(format_check_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if any(r["verdict"] != "ok" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
