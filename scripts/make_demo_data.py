"""Write the synthetic colorectal-cancer Visium demo dataset (slides, Space Ranger outputs, ground truth, manifest).

Example::

    python scripts/make_demo_data.py --output-dir demo_data --num-slides 4 --seed 0
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing the package

from bundle.demo import make_demo_dataset  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, generate the dataset and print what was written.

    Args:
        argv: command-line arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The process exit status (0 on success).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="demo_data", help="destination folder (default: demo_data)")
    parser.add_argument("--num-slides", type=int, default=4, help="number of slides, 1-99 (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed; same seed, same files (default: 0)")
    parser.add_argument(
        "--size-um",
        type=float,
        nargs="+",
        default=None,
        metavar="UM",
        help="slide extent in micrometres: one number (square) or height width (default: 1600 2000)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the demo files in a non-empty folder")
    args = parser.parse_args(argv)

    kwargs = {}
    if args.size_um is not None:
        if len(args.size_um) not in (1, 2):
            parser.error(f"--size-um takes one or two numbers, got {len(args.size_um)}")
        kwargs["size_um"] = args.size_um[0] if len(args.size_um) == 1 else tuple(args.size_um)
    start = time.perf_counter()
    try:
        manifest = make_demo_dataset(
            args.output_dir, num_slides=args.num_slides, seed=args.seed, overwrite=args.overwrite, verbose=True,
            **kwargs,
        )  # fmt: skip
    except (FileExistsError, NotADirectoryError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    root = manifest.parent
    files = sorted(p for p in root.rglob("*") if p.is_file())
    size_mb = sum(p.stat().st_size for p in files) / 2**20
    print(f"wrote {len(files)} files ({size_mb:.1f} MiB) under {root} in {time.perf_counter() - start:.1f} s")
    print(f"manifest: {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
