"""Small shared helpers: the one coordinate conversion of the project, atomic file writes, JSON I/O."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

__all__ = [
    "xy_to_rowcol",
    "rowcol_to_xy",
    "atomic_path",
    "write_json_atomic",
    "read_json",
    "save_npy_atomic",
    "unwrap_network",
    "replace_dir",
]


def xy_to_rowcol(location_xy: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Convert a spot centre from ``(x, y)`` to ``(row, column)``.

    AnnData ``obsm["spatial"]``, HEST and the datalist hold ``(x, y) = (column, row)`` in level-0 pixels;
    MONAI's ``WSIReader.get_data(location=...)`` and numpy indexing take ``(row, column)``. This is the only
    place in the project where the two orders meet.

    Args:
        location_xy: ``(x, y)`` pair.

    Returns:
        ``(row, column)`` = ``(y, x)``.
    """
    if len(location_xy) != 2:
        raise ValueError(f"location must be an (x, y) pair, got {location_xy!r}.")
    x, y = location_xy
    return y, x


def rowcol_to_xy(location_rowcol: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Inverse of :func:`xy_to_rowcol`: ``(row, column)`` to ``(x, y)``."""
    return xy_to_rowcol(location_rowcol)  # swapping the pair is its own inverse


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, on error delete it.

    Readers never see a half-written file: the rename is atomic on one file system.

    Args:
        path: final destination.
        suffix: suffix of the temporary file (some writers pick the format from it). Defaults to ``path``'s suffix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix if suffix is None else suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, naming the file in the error when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSON file {str(path)!r} does not exist.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); fix or regenerate it.") from e


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save ``array`` as ``.npy`` atomically (memory-mappable with ``np.load(path, mmap_mode="r")``)."""
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)
    return Path(path)


def unwrap_network(module: nn.Module) -> nn.Module:
    """Return the network inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished folder ``new`` onto ``target``, removing an old ``target`` only after the move."""
    new, target = Path(new), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
