"""Blinded pathologist review of synthetic H&E patches: export a review kit, then score the reviewers' answers.

Example::

    python scripts/review_kit.py export --real patches/real --generated patches/generated --num 50 \\
        --output review_kit --key review_key.json --seed 0
    # send the review_kit folder (never review_key.json) to each reviewer; they open review_kit/index.html
    python scripts/review_kit.py score --key review_key.json answers_alice.json answers_bob.json \\
        --output review_report.json

See docs/review_kit.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing the package

from bundle.review import export_review_kit, format_report, score_answers, write_report  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run ``export`` or ``score``.

    Args:
        argv: command-line arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The process exit status: 0 on success, 1 when the inputs are refused (the reason is printed).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="write a blinded review kit and its key")
    export.add_argument("--real", required=True, help="folder of real patches (.png / .jpg)")
    export.add_argument("--generated", required=True, help="folder of generated patches (.png / .jpg)")
    export.add_argument("--num", type=int, required=True, help="patches per class; the kit holds 2 x num")
    export.add_argument("--output", required=True, help="kit folder to write (this is what reviewers receive)")
    export.add_argument("--key", required=True, help="key JSON to write, outside the kit folder (keep it private)")
    export.add_argument("--seed", type=int, default=None, help="seed of the subset and order (default: random)")
    export.add_argument("--size", type=int, default=None, help="resize every patch to SIZE x SIZE pixels")
    export.add_argument("--title", default="Blinded H&E patch review", help="heading of the review page")
    export.add_argument("--overwrite", action="store_true", help="replace an existing kit folder and key file")

    score = commands.add_parser("score", help="score answers files against the key")
    score.add_argument("--key", required=True, help="the key JSON written by export")
    score.add_argument("answers", nargs="+", help="answers_<reviewer>.json files saved by the review page")
    score.add_argument("--output", default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)

    try:
        if args.command == "export":
            summary = export_review_kit(
                args.real,
                args.generated,
                args.num,
                args.output,
                args.key,
                seed=args.seed,
                overwrite=args.overwrite,
                size=args.size,
                title=args.title,
            )
            print(
                f"wrote {summary['kit_dir']} ({summary['num_images']} images, kit {summary['kit_id']}, "
                f"seed {summary['seed']}) and the key {summary['key_path']}"
            )
            print(f"send the folder {summary['kit_dir']} to the reviewers; keep {summary['key_path']} to yourself")
            for warning in summary["warnings"]:
                print(f"warning: {warning}", file=sys.stderr)
        else:
            report = score_answers(args.key, args.answers)
            print(format_report(report))
            if args.output:
                write_report(args.output, report)
                print(f"\nwrote {args.output}")
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
