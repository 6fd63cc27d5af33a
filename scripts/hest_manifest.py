"""Write a manifest for HEST-1k samples (one HEST root, samples named by id), split by patient.

Example (the COLON MAP colorectal-cancer samples of HEST-1k, downloaded under data/hest):

    python scripts/hest_manifest.py --hest-root data/hest --ids MISC33 MISC34 ... --output data/hest/manifest.csv
    python scripts/prepare_dataset.py --manifest data/hest/manifest.csv --output-dir datasets/hest_crc

Each sample's metadata/<id>.json gives its patient and technology; patients are assigned to train / val / test by a
seeded shuffle (--val-fraction, --test-fraction, --seed), so a patient's sections stay in one split. See
docs/real_data.md.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from bundle.io.hest import write_hest_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hest-root", required=True, help="HEST-1k folder with st/, wsis/, metadata/")
    parser.add_argument("--ids", nargs="+", required=True, help="sample ids (e.g. MISC33 MISC34 ...)")
    parser.add_argument("--output", required=True, help="manifest CSV to write")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="share of patients for validation")
    parser.add_argument("--test-fraction", type=float, default=0.15, help="share of patients for testing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient shuffle")
    args = parser.parse_args(argv)
    splits = write_hest_manifest(
        args.hest_root, args.ids, args.output, args.val_fraction, args.test_fraction, args.seed
    )
    counts = Counter(splits.values())
    print(f"wrote {args.output}: {dict(sorted(counts.items()))} samples per split")
    return 0


if __name__ == "__main__":
    sys.exit(main())
