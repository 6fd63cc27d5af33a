"""Text files of the demo study: UTF-8 text written atomically, and CSV documents."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

from bundle.utils import write_atomic


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A CSV document (``\\n`` line ends) of a header row and data rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
