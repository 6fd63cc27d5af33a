"""Small shared helpers: the one coordinate conversion of the project, atomic file writes, JSON I/O."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

logger = logging.getLogger(__name__)


def current_umask() -> int:
    """The process's umask (from ``/proc`` where possible: setting it to read it races with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class NoSpaceError(OSError):
    """A write failed for lack of space (``ENOSPC``) or quota (``EDQUOT``); the message names the location."""


@contextmanager
def no_space_errors(path: str | os.PathLike, what: str = "the output") -> Iterator[None]:
    """Re-raise a full disk (``ENOSPC``) or exhausted quota (``EDQUOT``) inside the block as a :class:`NoSpaceError`
    that names ``path`` and what was being written (the OS error names neither)."""
    try:
        yield
    except NoSpaceError:
        raise
    except OSError as error:
        if error.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        cause = "disk quota exceeded" if error.errno != errno.ENOSPC else "disk full"
        raise NoSpaceError(
            error.errno,
            f"No space left on the device holding {str(path)!r} while writing {what} ({cause}); free space there or "
            "choose an output location on another disk. Nothing was left half-written.",
        ) from error


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Fail early, before any input is read, when ``path`` (a file or folder to create or replace) cannot be written.

    The folder that will receive ``path`` is its parent, or the nearest existing ancestor when folders are still to
    be made: it must be a folder, and a file must be creatable in it (tried for real with a hidden probe file,
    removed at once, so read-only mounts, immutable folders and missing rights are all found, also for root).

    Raises:
        NotADirectoryError: a file stands where a folder of ``path`` should be.
        PermissionError: no file can be created there (no rights, read-only file system).
    """
    path = Path(path)
    folder = path.parent
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(
            f"The {what} {str(path)!r} cannot be created: {str(folder)!r} is a file, not a folder; choose another "
            "location."
        )
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as error:
        raise PermissionError(
            f"The {what} {str(path)!r} is not writable: cannot create files in {str(folder)!r} ({error.strerror}); "
            "choose a writable location or fix the folder's permissions."
        ) from error


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, on error delete it.

    Readers never see a half-written file: the rename is atomic on one file system. The file gets the permissions of
    any newly created file (``0o666`` less the umask), not the private ones of the temporary file, unless ``mode`` is
    given. A full disk is reported naming ``path`` (:func:`no_space_errors`).

    Args:
        path: final destination.
        suffix: suffix of the temporary file (some writers pick the format from it). Defaults to ``path``'s suffix.
        mode: permission bits of the file (e.g. ``0o600`` for a file only its owner may read). Defaults to
            ``0o666 & ~umask``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with no_space_errors(path, f"{path.name!r}"):
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=path.suffix if suffix is None else suffix, dir=path.parent
        )
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            tmp_path.chmod(0o666 & ~current_umask() if mode is None else mode)
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


STAGING_MARK = ".partial-"  # staging folders are named ``.<target name>.partial-<host>-<pid>-<random>``


def _process_running(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists but belongs to someone else
        return True
    return True


def remove_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Remove the staging folders of ``target`` left by killed runs on this machine; return what was removed.

    A staging folder is stale when the process its name records no longer runs on this host. Folders of running
    processes, of other hosts (a shared file system: their process ids mean nothing here) and of other targets are
    kept. Each removal is logged.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(
        rf"^\.{re.escape(target.name)}{re.escape(STAGING_MARK)}(?:(?P<host>.+)-)?(?P<pid>\d+)-[0-9a-f]+$"
    )
    host, removed = socket.gethostname(), []
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir() or match["host"] not in (None, host):
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _process_running(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        logger.warning(
            f"removed stale staging folder {str(entry)!r} left by process {pid}, which is no longer running (a killed "
            f"run writing {str(target)!r})."
        )
    return removed


class StagingDir:
    """A hidden staging folder beside ``target`` that replaces ``target`` only when everything is written.

    :meth:`create` first removes stale staging folders of the same target (:func:`remove_stale_staging`), then makes
    ``.<target name>.partial-<host>-<pid>-<random>`` as an ordinary folder (permissions from the umask).
    :meth:`commit` moves it onto ``target`` (:func:`replace_dir`); :meth:`discard` deletes it. For code that cannot
    use the :func:`staging_dir` context manager (e.g. event handlers).
    """

    def __init__(self, target: str | os.PathLike, what: str = "output folder") -> None:
        self.target, self.what = Path(target), what
        self.path: Path | None = None

    def create(self) -> Path:
        remove_stale_staging(self.target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        name = f".{self.target.name}{STAGING_MARK}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        with no_space_errors(self.target, f"the {self.what}"):
            (self.target.parent / name).mkdir()
        self.path = self.target.parent / name
        return self.path

    def commit(self) -> None:
        if self.path is None:
            raise RuntimeError(f"no staging folder of {str(self.target)!r} to commit.")
        with no_space_errors(self.target, f"the {self.what}"):
            replace_dir(self.path, self.target)
        self.path = None

    def discard(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


@contextmanager
def staging_dir(target: str | os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """Yield a fresh staging folder for ``target``; on success it replaces ``target``, on error it is deleted.

    Stale staging folders of ``target`` left by killed runs are removed first (and logged); a full disk inside the
    block is reported naming ``target`` (:func:`no_space_errors`). So ``target`` is either the complete new result or
    untouched, and no hidden folder outlives a failed run.
    """
    staging = StagingDir(target, what)
    path = staging.create()
    try:
        with no_space_errors(target, f"the {what}"):
            yield path
        staging.commit()
    except BaseException:
        staging.discard()
        raise


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

    The file gets the permissions of any newly created file (``0o666`` less the umask), as with :func:`atomic_path`.
    """
    with atomic_path(path) as tmp:
        write(str(tmp))
    return Path(path)


def named_rows(builtin: Mapping[str, dict], selected: list[str], extra: Sequence[str], error: Callable[[str], Any]):
    """The rows of an ablation script: the built-in ``name -> row`` plus each ``NAME=JSON`` of ``extra`` (its JSON
    object is the row, ``desc`` defaulting to the name; appended to ``selected`` when missing there). ``error(message)``
    reports a malformed spec or an unknown selected row (``argparse.ArgumentParser.error``)."""
    rows = dict(builtin)
    for spec in extra:
        name, sep, text = spec.partition("=")
        if not sep:
            error(f"--row {spec!r}: give NAME=JSON")
            continue
        try:
            rows[name] = {"desc": name, **json.loads(text)}
        except json.JSONDecodeError as exc:
            error(f"--row {name}: not JSON ({exc})")
            continue
        if name not in selected:
            selected.append(name)
    unknown = [r for r in selected if r not in rows]
    if unknown:
        error(f"unknown rows {unknown}; --list shows the built-in ones, --row adds one")
    return rows
