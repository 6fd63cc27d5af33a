"""Helpers that the training configs call: the built-in demo dataset, resumption, fixed validation spots, export."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bundle.utils import atomic_path


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
    from bundle.demo import make_demo_dataset
    from bundle.io.dataset import prepare_dataset

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


def validation_subset(datalist: Sequence[dict], num_spots: int | None, seed: int = 0) -> list[dict]:
    """A fixed, seeded subset of ``num_spots`` validation entries, in their datalist order (all when ``num_spots`` is
    None, 0 or at least the list's length).

    Every validation pass reads the same spots, so a real cohort's thousands of validation spots (each a patch read and
    encoded per pass) do not make validation cost more than training; the evaluation config scores all of them.
    """
    datalist = list(datalist)
    if num_spots is not None and int(num_spots) < 0:
        raise ValueError(f"num_val_spots must be None or 0 (every spot) or a positive number, got {num_spots}.")
    if not num_spots or int(num_spots) >= len(datalist):
        return datalist
    chosen = np.sort(np.random.default_rng(seed).choice(len(datalist), size=int(num_spots), replace=False))
    return [datalist[i] for i in chosen]


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


def balanced_sampler(
    datalist: Sequence[dict],
    expression_store: str | os.PathLike,
    power: float | None = 0.5,
    num_clusters: int = 8,
    seed: int = 0,
) -> torch.utils.data.WeightedRandomSampler | None:
    """A sampler that draws rare tissue more often: spots weighted by their expression cluster's size to ``-power``.

    The training spots are clustered by :func:`bundle.evaluation.labels.expression_clusters` (k-means on the PCA of
    their expression, as the evaluation labels spots without ground truth), and spot ``i`` in a cluster of ``n`` spots
    is drawn with weight ``n ** -power``: ``power`` 0.5 is square-root sampling, 1 draws every cluster equally often,
    None or 0 switches balancing off (returns None, so the data loader shuffles as usual). An epoch still has
    ``len(datalist)`` draws, with replacement, from a generator seeded with ``seed``.

    Args:
        datalist: training entries, each with its ``expression`` row in ``expression_store``.
        expression_store: the dataset's ``expression.npy``.
        power: exponent of the cluster size (config key ``balance_power``), in [0, 1].
        num_clusters: k-means clusters (config key ``balance_clusters``).
        seed: k-means and sampler seed.
    """
    if power is None or float(power) == 0.0:
        return None
    if not 0.0 < float(power) <= 1.0:
        raise ValueError(f"balance_power must be None or within [0, 1] (0.5: square-root sampling), got {power}.")
    datalist = list(datalist)
    if len(datalist) < num_clusters:
        raise ValueError(
            f"balance_clusters={num_clusters} is more than the {len(datalist)} training spots; "
            "lower balance_clusters or set balance_power to None."
        )
    from bundle.evaluation.labels import expression_clusters

    store = np.load(expression_store, mmap_mode="r")
    expression = np.asarray(store[[int(entry["expression"]) for entry in datalist]], np.float64)
    labels, _ = expression_clusters(expression, expression[:1], num_clusters=num_clusters, seed=seed)
    sizes = np.bincount(labels, minlength=num_clusters).astype(np.float64)
    weights = sizes[labels] ** -float(power)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.utils.data.WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double), num_samples=len(datalist), replacement=True, generator=generator
    )


def refuse_balanced_distributed(power: float | None) -> None:
    """Refuse ``balance_power`` under torchrun: each rank's DistributedSampler shard is drawn uniformly."""
    if power:
        raise ValueError(
            f"balance_power={power} is not supported by multi_gpu_train.json (its DistributedSampler draws each rank's "
            "shard uniformly); set --balance_power None or train in one process."
        )
