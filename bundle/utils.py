"""Small shared helpers: the one coordinate conversion of the project, atomic file writes, JSON I/O."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn


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
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=path.suffix if suffix is None else suffix, dir=path.parent
    )
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


def memmap_array(folder: Path, name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A zero-filled ``np.memmap`` in ``folder`` (``.npy`` layout)."""
    return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=tuple(int(v) for v in shape))


def plain(value: Any) -> Any:
    """Tuples as lists, recursively, so that settings from JSON and Python compare equal."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types, recursively: the one conversion used for every JSON file the bundle writes.

    Mappings become dicts with string keys; lists, tuples, numpy arrays and tensors become lists; sets become sorted
    lists; numpy scalars become Python numbers; paths become strings; NaN and infinities become ``None`` (JSON has no
    such numbers); anything else unknown becomes its ``str``.
    """
    import math

    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, np.ndarray) or type(value).__name__ == "Tensor":
        return jsonable(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)`` for a temporary file beside ``path``, then rename it over ``path``.

    The file gets the permissions of any newly created file (``0o666`` less the umask), not the private ones of the
    temporary file, so a shared demo folder stays readable.
    """
    with atomic_path(path) as tmp:
        write(str(tmp))
        mask = os.umask(0o022)  # read the umask by setting it and setting it back
        os.umask(mask)
        tmp.chmod(0o666 & ~mask)
    return Path(path)
