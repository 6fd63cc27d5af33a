"""The ``python -m monai.bundle run`` command line of this bundle's configs: the first ``initialize`` step
(:func:`guard_command_line`) makes a refused input end the output with the bundle's own message, and refuses
``--key None`` overrides that MONAI would silently drop.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CONFIG_WRAPPERS = ("Failed to evaluate", "Failed to instantiate")
FULL_TRACEBACK_ENV = "ST_LDM_FULL_TRACEBACK"


def config_error_cause(error: BaseException) -> BaseException:
    """The error a config entry raised, under MONAI's wrappers (``RuntimeError: Failed to evaluate ConfigExpression``
    or ``Failed to instantiate``, possibly nested); ``error`` itself when it is no such wrapper."""
    while isinstance(error, RuntimeError) and str(error).startswith(CONFIG_WRAPPERS) and error.__cause__ is not None:
        error = error.__cause__
    return error


def print_config_error(kind: type, error: BaseException, tb: Any, previous: Any = sys.__excepthook__) -> None:
    """``sys.excepthook`` of a bundle run: an error raised in a config entry is printed with its own traceback only,
    so the last line is the bundle's message and not MONAI's wrapper (``ST_LDM_FULL_TRACEBACK=1``: the whole chain,
    as Python prints it). Other errors go to ``previous``."""
    cause = config_error_cause(error)
    if cause is error or os.environ.get(FULL_TRACEBACK_ENV, "") not in ("", "0"):
        previous(kind, error, tb)
        return
    sys.stderr.write(
        f"(MONAI's config wrapper around this error is left out: set {FULL_TRACEBACK_ENV}=1 for its traceback)\n"
    )
    traceback.print_exception(type(cause), cause, cause.__traceback__)


def is_bundle_command_line(argv: Sequence[str] | None = None) -> bool:
    """Whether this process is ``python -m monai.bundle ...``."""
    argv = sys.argv if argv is None else argv
    return bool(argv) and Path(argv[0]).parts[-3:] == ("monai", "bundle", "__main__.py")


def dropped_none_overrides(values: Mapping[str, Any], argv: Sequence[str]) -> list[str]:
    """Keys of ``values`` given as ``--key None`` (or ``--key=None``) in ``argv`` whose config value is not None."""
    given = {a[2:-5] for a in argv if a.startswith("--") and a.endswith("=None")}
    given |= {a[2:] for a, b in zip(argv, argv[1:]) if a.startswith("--") and b == "None"}
    return [key for key, value in values.items() if key in given and value is not None]


def guard_command_line(values: Mapping[str, Any]) -> None:
    """First step of the inference and evaluation configs (``initialize``) on ``python -m monai.bundle run``.

    Installs :func:`print_config_error` as ``sys.excepthook``, so a refused input ends the output with the bundle's
    message; and refuses ``--key None`` for the settings in ``values`` whose config value is not None: MONAI's command
    line drops overrides whose value is None, so the config's value would apply without a word (``--num_spots None``
    would generate the default 16 spots). Does nothing in other processes.

    Args:
        values: setting name -> the value the merged config gives it.
    """
    if not is_bundle_command_line():
        return
    if sys.excepthook is not print_config_error:
        sys.excepthook = print_config_error
    dropped = dropped_none_overrides(values, sys.argv)
    if dropped:
        fixes = [
            (
                f"--{k} all (or 0) for every spot"
                if k.endswith(("num_spots", "num_eval_spots", "max_train_spots"))
                else f'"{k}": null in a JSON file added to --config_file'
            )
            for k in dropped
        ]
        raise ValueError(
            f"{', '.join(f'--{k} None' for k in dropped)}: MONAI's command line ignores overrides whose value is None, so "
            f"the config's {', '.join(f'{k}={values[k]!r}' for k in dropped)} would apply; use {'; '.join(fixes)}."
        )
