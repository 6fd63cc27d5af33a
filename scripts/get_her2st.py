"""Get the her2st sections (HER2+ breast cancer, legacy Spatial Transcriptomics) and write their manifest.

Examples:

    python scripts/get_her2st.py --dest datasets/her2st/raw
    python scripts/get_her2st.py --dest datasets/her2st/raw --local ../shared/realdata/her2st --sections C2 C5

Five sections: C2, C3, C4, C5 (serial sections of patient C) and B4 (patient B). Without --local the files are
downloaded from GitHub (almaan/her2st at a pinned commit); every file is checked against its published sha256. Without
--val/--test, C5 is the validation section and the others train; with them, the named sections go there and the rest
to train. Writes DEST/<id>/ (the section's counts, spot selection and JPEG), DEST/LICENSE_NOTICE.md (CC BY 4.0; cite
Andersson et al., Nat Commun 12, 6012 (2021)) and DEST/manifest.csv. Set ST_LDM_FULL_TRACEBACK=1 for the traceback
of a refusal.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

from bundle.cli import FULL_TRACEBACK_ENV
from bundle.io.her2st import SECTIONS, get_her2st, make_splits, summarize_section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", required=True, help="folder to write (e.g. datasets/her2st/raw)")
    parser.add_argument("--local", default=None, help="folder with the files (<id>/<files> or a repository checkout)")
    parser.add_argument("--sections", nargs="+", default=None, help=f"section ids (default: all of {list(SECTIONS)})")
    parser.add_argument("--val", nargs="+", default=None, help="sections for validation (default: C5)")
    parser.add_argument("--test", nargs="+", default=None, help="sections for testing (default: none)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing manifest and differing files")
    args = parser.parse_args(argv)
    try:
        sections = list(SECTIONS) if args.sections is None else args.sections
        splits = make_splits(sections, args.val or (), args.test or ()) if args.val or args.test else None
        manifest = get_her2st(args.dest, args.local, sections, splits, overwrite=args.overwrite)
    except (OSError, ValueError) as error:
        if os.environ.get(FULL_TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"get_her2st: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        sid, split = row["sample_id"], row["split"]
        s = summarize_section(manifest.parent / row["st_path"], sid)
        width, height = s["image_size"]
        print(
            f"{sid}  {split:<5}  {s['selected']} spots in the selection ({s['with_counts']} with counts)  "
            f"{s['genes']} genes  "
            f"image {width} x {height} px"
        )
    print(f"manifest: {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
