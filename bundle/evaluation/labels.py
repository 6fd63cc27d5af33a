"""Labels of the spots (compartment or expression cluster), for per-group realism and the probe's classifier.

The dominant compartment of the demo study's ``ground_truth.csv`` (found next to the slides) when every spot has one,
otherwise k-means clusters of the first principal components of the log-normalised expression, both fitted on the
training spots and applied to the evaluated spots. scikit-learn is imported when clusters are made.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ground_truth_labels", "expression_clusters", "spot_labels"]

logger = logging.getLogger(__name__)


def ground_truth_labels(entries: Sequence[Mapping[str, Any]], column: str = "dominant") -> list[str] | None:
    """The demo study's per-spot ``dominant`` compartment, read from ``ground_truth.csv`` next to each slide.

    Returns None (and logs why) unless every entry's slide folder has the file and it lists the entry's barcode.
    """
    tables: dict[Path, dict[str, str] | None] = {}
    labels = []
    for entry in entries:
        folder = Path(entry["image"]).parent
        if folder not in tables:
            path = folder / "ground_truth.csv"
            if not path.is_file():
                tables[folder] = None
            else:
                with path.open(newline="") as f:
                    reader = csv.DictReader(f)
                    if not reader.fieldnames or column not in reader.fieldnames or "barcode" not in reader.fieldnames:
                        tables[folder] = None
                    else:
                        tables[folder] = {row["barcode"]: row[column] for row in reader}
        table = tables[folder]
        if table is None:
            logger.info(
                "no ground_truth.csv with a %r column next to %s: labels come from expression clusters",
                column,
                entry["image"],
            )
            return None
        label = table.get(str(entry.get("barcode")))
        if label is None:
            logger.info(
                "ground_truth.csv next to %s lacks the barcode %s: labels come from expression clusters",
                entry["image"],
                entry.get("barcode"),
            )
            return None
        labels.append(label)
    return labels


def expression_clusters(
    train_expression: np.ndarray, other_expression: np.ndarray, num_clusters: int = 6, seed: int = 0, num_pcs: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """k-means clusters of log-normalised expression: fitted on the training spots, applied to the others.

    PCA (``num_pcs`` components, full SVD) and k-means (``random_state=seed``, 10 starts) are both fitted on
    ``train_expression`` so the labels are deterministic and mean the same for both sets. Cluster ``0`` is the largest.

    Returns:
        integer labels of the training spots and of the other spots.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    train = np.asarray(train_expression, np.float64)
    other = np.asarray(other_expression, np.float64)
    if len(train) < num_clusters:
        raise ValueError(f"{len(train)} training spots cannot make {num_clusters} clusters; lower num_clusters.")
    n_pcs = max(1, min(num_pcs, train.shape[1], len(train) - 1))
    pca = PCA(n_components=n_pcs, svd_solver="full", random_state=seed).fit(train)
    kmeans = KMeans(n_clusters=num_clusters, n_init=10, random_state=seed).fit(pca.transform(train))
    train_labels = kmeans.labels_
    order = np.argsort(-np.bincount(train_labels, minlength=num_clusters), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(num_clusters)
    return rank[train_labels], rank[kmeans.predict(pca.transform(other))]


def spot_labels(
    train_entries: Sequence[Mapping[str, Any]],
    eval_entries: Sequence[Mapping[str, Any]],
    train_expression: np.ndarray,
    eval_expression: np.ndarray,
    source: str = "auto",
    num_clusters: int = 6,
    seed: int = 0,
) -> tuple[list[str], list[str], str]:
    """Labels of the training and evaluated spots, and a sentence saying where they come from.

    Args:
        source: ``"auto"`` (ground truth when every spot has one, else clusters), ``"ground_truth"`` or ``"clusters"``.
    """
    if source not in ("auto", "ground_truth", "clusters"):
        raise ValueError(f"labels must be 'auto', 'ground_truth' or 'clusters', got {source!r}.")
    if source in ("auto", "ground_truth"):
        train = ground_truth_labels(train_entries)
        other = ground_truth_labels(eval_entries) if train is not None else None
        if train is not None and other is not None:
            return train, other, "dominant ground-truth compartment (ground_truth.csv next to the slides)"
        if source == "ground_truth":
            raise FileNotFoundError(
                "labels='ground_truth' needs a ground_truth.csv with barcode and dominant columns next to every slide "
                "(the demo study has them); use labels='auto' or 'clusters' for other data."
            )
    train_c, other_c = expression_clusters(train_expression, eval_expression, num_clusters=num_clusters, seed=seed)
    how = (
        f"expression cluster (k-means, k={num_clusters}, seed {seed}, on the first 20 principal components of the "
        "training spots' log-normalised expression)"
    )
    return [f"cluster_{c}" for c in train_c], [f"cluster_{c}" for c in other_c], how
