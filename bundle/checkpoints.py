"""Checkpoints of this bundle: ``models/model.pt`` (EMA weights, gene panel, architecture) save/load, the model's
recorded settings, the newest resumable training checkpoint of a folder, and strict state-dict loading that names
the weights that do not fit (shared with the autoencoder checkpoints).

Every checkpoint is written atomically and read by :func:`load_checkpoint`: ``torch.load(..., weights_only=True)``
behind checks that refuse an empty, truncated or foreign file, or one holding code, with a message naming the file.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bundle.utils import atomic_path, plain, unwrap_network

MODEL_HINT = (
    "train one (python -m monai.bundle run training --config_file configs/train.json) or pass "
    "--model_path <the models/model.pt of a training run>"
)
_ZIP_MAGIC = b"PK\x03\x04"


def _format_problem(path: Path) -> str | None:
    """What makes ``path`` unlike a file ``torch.save`` writes (a zip archive with a ``data.pkl``), or None."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with path.open("rb") as f:
        head = f.read(16)
    if not zipfile.is_zipfile(path):
        if head.startswith(_ZIP_MAGIC):
            return (
                f"is truncated or damaged (an incomplete zip archive of {size} bytes; copied or written only in part?)"
            )
        if head.startswith(b"version https://git-lfs"):
            return "is a Git LFS pointer file, not the checkpoint itself (fetch it with git lfs pull)"
        if head[:1] == b"\x80":
            return (
                "is a plain pickle or an old-format torch file, not the zip archive torch.save writes (it was not "
                "unpickled: unpickling can run code)"
            )
        return f"is not a torch checkpoint (torch.save writes a zip archive; this file starts with {head!r})"
    with zipfile.ZipFile(path) as archive:
        if not any(name.endswith("data.pkl") for name in archive.namelist()):
            return "is a zip archive but not a torch checkpoint (it holds no data.pkl)"
    return None


def _load_problem(error: Exception) -> str:
    """The refusal for a ``torch.load(weights_only=True)`` error, without torch's advice (turning weights_only off)."""
    message = str(error)
    names = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if isinstance(error, pickle.UnpicklingError) and names:
        return (
            f"holds Python objects ({', '.join(dict.fromkeys(names))}) that torch.load(weights_only=True) refuses "
            "because unpickling them runs code (it was not loaded)"
        )
    first = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    if "weights_only" in first or "zipfile" in first:
        first = type(error).__name__
    return f"is damaged: torch cannot read it ({first[:200]})"


def load_checkpoint(
    path: str | os.PathLike,
    what: str,
    hint: str,
    map_location: Any = "cpu",
    mmap: bool = False,
    required: Sequence[str] = (),
) -> dict[str, Any]:
    """Read a checkpoint of this bundle with ``torch.load(weights_only=True)``; refuse anything else, naming the file.

    An absent, empty, truncated or non-torch file, one holding Python objects other than tensors, numbers, strings,
    lists and dictionaries (code that unpickling would run: it is never run), one that is not a dictionary or lacks
    the ``required`` keys, is refused with a message that names the file, says what is wrong and ends with ``hint``.
    Nothing of torch's error is chained, so its advice to turn ``weights_only`` off is never shown.

    Args:
        path: the checkpoint.
        what: what it should be, for the message (``"model checkpoint"``, ``"autoencoder checkpoint"``, ...).
        hint: what to do instead (e.g. how to write such a checkpoint).
        map_location: passed to ``torch.load``.
        mmap: memory-map the tensors instead of reading them (cheap for checking a large checkpoint).
        required: keys the checkpoint must hold.

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        ValueError: for every other problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist; {hint}.")
    problem = _format_problem(path)
    if problem is None:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except Exception as error:  # noqa: B902 - any reading error of the file is the same refusal
            problem = _load_problem(error)
        else:
            if not isinstance(state, Mapping):
                problem = f"holds a {type(state).__name__}, not a dictionary"
            else:
                missing = [key for key in required if key not in state]
                if not missing:
                    return dict(state)
                problem = f"has no {', '.join(map(repr, missing))} (its keys: {summarize_keys(map(str, state), 6)})"
    article = "an" if what[:1].lower() in "aeiou" else "a"
    raise ValueError(f"{what} {str(path)!r} {problem}; it is not {article} {what} of this bundle: {hint}.")


MODEL_KEYS = ("network", "gene_panel", "scale_factor", "latent_shape")


def read_model_info(path: str | os.PathLike) -> dict[str, Any]:
    """The entries of ``models/model.pt`` other than the weights (gene panel, normalisation, latent shape, ...).

    The inference configs read the gene panel and the number of neighbours from here, so that the network they build
    fits the checkpoint.
    """
    state = load_checkpoint(path, "model checkpoint", MODEL_HINT, mmap=True, required=MODEL_KEYS)
    return {k: v for k, v in state.items() if k != "network"}


def latest_checkpoint(folder: str | os.PathLike, prefix: str = "checkpoint") -> str | None:
    """The newest ``<prefix>*.pt`` in ``folder`` (by the iteration number ending its name), or None.

    Used to resume a killed run: the configs pass it to a ``CheckpointLoader`` that is disabled when it is None.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.glob(f"{prefix}*.pt"):
        numbers = re.findall(r"(\d+)\.pt$", path.name)
        found.append((int(numbers[-1]) if numbers else -1, path.stat().st_mtime, path))
    return str(max(found)[2]) if found else None


def save_model(
    path: str | os.PathLike,
    network: nn.Module,
    genes: Sequence[str],
    scale_factor: float,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the model-zoo ``models/model.pt`` atomically: network weights plus the gene panel and scale factor.

    Args:
        path: destination.
        network: network whose weights are saved (the EMA copy after training).
        genes: gene panel the network was trained on; inference refuses other panels.
        scale_factor: latent scale factor of the autoencoder used.
        extra: more entries (normalisation, number of neighbours, iteration, ...).
    """
    state = {
        "network": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "gene_panel": list(genes),
        "scale_factor": float(scale_factor),
        **(extra or {}),
    }
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)
    return Path(path)


def summarize_keys(keys: Iterable[str], limit: int = 8) -> str:
    """The first ``limit`` of ``keys`` in sorted order, then how many more there are, for error messages."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str, kwargs: Any) -> None:
    """``model.load_state_dict(state, strict=True)`` with an error that names the keys that do not fit.

    Args:
        model: the network to load into.
        state: the state dict of a checkpoint.
        what: name of the checkpoint, for the message.
        kwargs: the network settings the checkpoint records, for the message.

    Raises:
        ValueError: naming the weights missing from the checkpoint, those not in the network and those of another
            shape.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} (network {tuple(own[k].shape)}, checkpoint {tuple(state[k].shape)})"
        for k in own
        if k in state and tuple(own[k].shape) != tuple(state[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {summarize_keys(missing)}")
    if unexpected:
        problems.append(f"not in the network: {summarize_keys(unexpected)}")
    if shapes:
        problems.append(f"different shapes: {summarize_keys(shapes, 4)}")
    if problems:
        raise ValueError(
            f"the network does not match {what}: {'; '.join(problems)}. The config's network settings must "
            f"match the ones the checkpoint was saved with ({kwargs}); for the autoencoder, build it from "
            f"the checkpoint with load_autoencoder_checkpoint(path) (autoencoder=None)."
        )
    model.load_state_dict(state, strict=True)


def load_model(
    path: str | os.PathLike,
    network: nn.Module,
    genes: Sequence[str] | None = None,
    architecture: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load ``models/model.pt`` into ``network`` (``weights_only=True``), checking the gene panel when given.

    Args:
        path: the checkpoint.
        network: the network built from the config (``network_def``).
        genes: genes of the expression data that will condition it; refused unless they are the checkpoint's panel.
        architecture: the config's architecture settings (the ``architecture`` entry that training records); a
            difference is refused, naming the setting, before any weight is loaded.

    Returns:
        the checkpoint's other entries (``gene_panel``, ``scale_factor``, ...).
    """
    from bundle.io.gene_panel import check_gene_panel

    path = Path(path)
    state = load_checkpoint(path, "model checkpoint", MODEL_HINT, required=MODEL_KEYS)
    if genes is not None:
        check_gene_panel(state["gene_panel"], list(genes), what="the expression data")
    recorded = state.get("architecture")
    if architecture is not None and recorded is not None:
        differ = [k for k in recorded if k in architecture and plain(architecture[k]) != plain(recorded[k])]
        if differ:
            details = "; ".join(f"{k}: checkpoint {recorded[k]!r}, config {architecture[k]!r}" for k in differ)
            raise ValueError(
                f"{str(path)!r} was trained with other network settings than the config's ({details}). Use the "
                "config the model was trained with (for the demo model add configs/demo.json to --config_file)."
            )
    load_state_strict(unwrap_network(network), state["network"], f"model checkpoint {str(path)!r}", recorded)
    return {k: v for k, v in state.items() if k != "network"}


def build_network(info: dict[str, Any]) -> nn.Module:
    """The stage-2 network that ``models/model.pt`` holds weights for, built from the settings training recorded.

    ``configs/train.json``'s ``network_def`` is the one definition of the network; training records its settings
    (``architecture``, ``latent_shape``, ``gene_panel``, ``num_neighbors``) in the checkpoint, so the inference and
    evaluation configs need no copy of it: ``"network_def": "$bundle.checkpoints.build_network(@model_info)"``.

    Args:
        info: the checkpoint's entries, as :func:`read_model_info` returns them.
    """
    from monai.networks.nets import DiffusionModelUNet

    from bundle.networks import GeneConditionedUNet, GeneCondNet

    arch = info.get("architecture")
    if not arch or "unet_kwargs" not in arch:
        raise ValueError(
            "the model checkpoint records no network architecture (it predates version 0.3.0): retrain it with "
            "configs/train.json, which records the settings inference builds the network from."
        )
    latent_channels = int(info["latent_shape"][0])
    unet = DiffusionModelUNet(
        in_channels=latent_channels,
        out_channels=latent_channels,
        with_conditioning=True,
        cross_attention_dim=int(arch["cross_attention_dim"]),
        **arch["unet_kwargs"],
    )
    encoder = GeneCondNet(
        num_genes=len(info["gene_panel"]),
        cross_attention_dim=int(arch["cross_attention_dim"]),
        num_tokens=int(arch["num_context_tokens"]),
        hidden_dim=int(arch["gene_encoder_hidden_dim"]),
        num_layers=int(arch.get("gene_encoder_num_layers", 2)),
        num_neighbors=int(arch.get("num_neighbors", info.get("num_neighbors", 6))),
    )
    return GeneConditionedUNet(
        encoder, unet, add_condition_to_time_embedding=bool(arch.get("add_condition_to_time_embedding", True))
    )
