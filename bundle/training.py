"""Helpers that the training configs call: the built-in demo dataset, resumption, fixed validation spots, export."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bundle.utils import atomic_path, unwrap_network

__all__ = [
    "ensure_demo_dataset",
    "latest_checkpoint",
    "fixed_batch",
    "FinalModelSaver",
    "save_model",
    "load_model",
    "count_parameters",
]


def ensure_demo_dataset(
    root: str | os.PathLike, fov_um: float = 128.0, num_slides: int = 4, seed: int = 0, n_top_genes: int = 128
) -> str:
    """Return the built-in demo dataset folder under ``root``, generating and preparing it on first use.

    ``root/raw`` holds the simulated study (Space Ranger folders, slides) and ``root/dataset`` the prepared dataset.
    Both are reused when present.

    Args:
        root: folder for the demo study and its dataset.
        fov_um: patch field of view the dataset's QC uses.
        num_slides: slides to simulate (the last one is the validation slide).
        seed: simulator seed.
        n_top_genes: gene panel size.
    """
    from bundle.data import prepare_dataset
    from bundle.demo import make_demo_dataset

    root = Path(root)
    dataset = root / "dataset"
    if (dataset / "datalist.json").is_file():
        return str(dataset)
    raw = root / "raw"
    manifest = raw / "manifest.csv"
    if not manifest.is_file():
        make_demo_dataset(raw, num_slides=num_slides, seed=seed, overwrite=raw.exists())
    prepare_dataset(manifest, dataset, fov_um=fov_um, n_top_genes=n_top_genes, overwrite=True, verbose=True)
    return str(dataset)


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


def fixed_batch(dataset, num: int, keys: Sequence[str] = ("image", "expression")) -> dict[str, torch.Tensor]:
    """Stack the first ``num`` items of ``dataset`` (deterministic transforms expected) for sample grids."""
    num = min(num, len(dataset))
    if num < 1:
        raise ValueError("the dataset for the sample grid is empty: the dataset needs a validation split.")
    items = [dataset[i] for i in range(num)]
    return {k: torch.stack([torch.as_tensor(item[k]).float() for item in items]) for k in keys}


def count_parameters(network: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


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
    from bundle.autoencoder import _load_state_strict
    from bundle.data import check_gene_panel

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Model checkpoint {str(path)!r} does not exist; train the model first (configs/train.json).")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if genes is not None:
        check_gene_panel(state["gene_panel"], list(genes), what="the expression data")
    recorded = state.get("architecture")
    if architecture is not None and recorded is not None:
        differ = [k for k in recorded if k in architecture and _plain(architecture[k]) != _plain(recorded[k])]
        if differ:
            details = "; ".join(f"{k}: checkpoint {recorded[k]!r}, config {architecture[k]!r}" for k in differ)
            raise ValueError(
                f"{str(path)!r} was trained with other network settings than the config's ({details}). Use the "
                "config the model was trained with (for the demo model add configs/demo.json to --config_file)."
            )
    _load_state_strict(unwrap_network(network), state["network"], f"model checkpoint {str(path)!r}", recorded)
    return {k: v for k, v in state.items() if k != "network"}


class FinalModelSaver:
    """On ``COMPLETED``, export the (EMA) network to ``models/model.pt`` with its gene panel and scale factor.

    Args:
        path: destination (``<bundle_root>/models/model.pt``).
        network: the network to export (the EMA copy).
        genes: gene panel.
        scale_factor: latent scale factor.
        extra: more entries to store.
        enabled: set False on non-zero ranks.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        network: nn.Module,
        genes: Sequence[str],
        scale_factor: float,
        extra: dict[str, Any] | None = None,
        enabled: bool = True,
    ) -> None:
        self.path, self.network, self.genes, self.scale_factor = path, network, genes, scale_factor
        self.extra, self.enabled = dict(extra or {}), enabled

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        if self.enabled:
            save_model(self.path, self.network, self.genes, self.scale_factor, {**self.extra, "iteration": engine.state.iteration})


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively, so that settings from JSON and Python compare equal."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_executed_config(output_dir: str | os.PathLike, argv: Sequence[str] | None = None) -> list[str]:
    """Write the configuration of this ``python -m monai.bundle run`` call, for MLflow, and return ``[path]``.

    The config files named by ``--config_file`` are merged in order and the other ``--key value`` overrides of the
    command line applied, as ``monai.bundle`` does, then exported (unresolved) to
    ``<output_dir>/executed_config.json``. Outside that command line (e.g. ``ConfigWorkflow`` in Python) there is
    nothing to record and the list is empty.

    Args:
        output_dir: folder for ``executed_config.json``.
        argv: command line to read (defaults to ``sys.argv``).
    """
    import ast
    import sys

    from monai.bundle import ConfigParser

    argv = list(sys.argv if argv is None else argv)
    if "--config_file" not in argv[:-1]:
        return []

    def value(text: str):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text

    files = value(argv[argv.index("--config_file") + 1])
    parser = ConfigParser()
    parser.read_config(files if isinstance(files, (list, tuple)) else [files])
    skip = {"--config_file", "--meta_file", "--logging_file", "--tracking", "--workflow_type", "--args_file"}
    i = 0
    while i < len(argv):
        if argv[i].startswith("--") and argv[i] not in skip and i + 1 < len(argv):
            parser[argv[i][2:]] = value(argv[i + 1])
            i += 2
        else:
            i += 1
    path = Path(output_dir) / "executed_config.json"
    with atomic_path(path, suffix=".json") as tmp:
        ConfigParser.export_config_file(parser.get(), str(tmp), fmt="json", indent=4)
    return [str(path)]
