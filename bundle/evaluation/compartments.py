"""Compartment agreement: does the probe's classifier give a generated patch its conditioning spot's label?"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["compartment_agreement"]


def _confusion(true: Sequence[int], pred: Sequence[int], num: int) -> list[list[int]]:
    matrix = np.zeros((num, num), np.int64)
    for t, p in zip(true, pred):
        matrix[t, p] += 1
    return matrix.tolist()


def compartment_agreement(
    classes: Sequence[str], labels: Sequence[str], real_pred: np.ndarray, generated_pred: np.ndarray
) -> dict[str, Any]:
    """How often the classifier gives the conditioning spot's label to its real and its generated patch.

    Args:
        classes: the classifier's label names (index = predicted value).
        labels: the evaluated spots' true labels (names); labels the classifier never saw count as misses.
        real_pred: predicted label indices of the real patches.
        generated_pred: predicted label indices of the generated patches.

    Returns:
        ``real_accuracy`` (the ceiling), ``generated_agreement``, ``chance`` (frequency of the most common true
        label), per-label counts and confusion matrices (rows: true label of the spot, columns: predicted label).
    """
    names = list(classes) + sorted(set(labels) - set(classes))
    index = {n: i for i, n in enumerate(names)}
    true = np.asarray([index[v] for v in labels])
    real_pred = np.asarray(real_pred)
    generated_pred = np.asarray(generated_pred)
    counts = np.bincount(true, minlength=len(names))
    per_class = {}
    for i, name in enumerate(names):
        mask = true == i
        if mask.any():
            per_class[name] = {
                "n": int(mask.sum()),
                "real_accuracy": float((real_pred[mask] == i).mean()),
                "generated_agreement": float((generated_pred[mask] == i).mean()),
            }
    return {
        "classes": names,
        "real_accuracy": float((real_pred == true).mean()),
        "generated_agreement": float((generated_pred == true).mean()),
        "chance": float(counts.max() / counts.sum()),
        "majority_label": names[int(counts.argmax())],
        "per_class": per_class,
        "confusion_real": _confusion(true, real_pred, len(names)),
        "confusion_generated": _confusion(true, generated_pred, len(names)),
        "num_spots": int(len(true)),
    }
