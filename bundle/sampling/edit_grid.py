"""Counterfactual edit grids (``scripts/edit_expression.py``): spots generated as measured and once per row of edits,
with the same per-spot seeds, so that the rows differ by the edits alone; and the effect of each row on the edited
genes, for the JSON that describes the grid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from bundle.sampling.edits import parse_edit, resolve_edit


def parse_edit_rows(texts: Sequence[str]) -> list[list[str]]:
    """``["immune*4", "a*2,b*0"]`` -> ``[["immune*4"], ["a*2", "b*0"]]`` (one grid row per ``--edit``)."""
    rows = [[part.strip() for part in text.split(",") if part.strip()] for text in texts]
    empty = [t for t, r in zip(texts, rows) if not r]
    if empty:
        raise ValueError(f"--edit {empty[0]!r} holds no edit; write e.g. --edit immune*4 or --edit 'immune*4,stroma*0'")
    return rows


def edited_genes(
    rows: Sequence[Sequence[str]], genes: Sequence[str], gene_sets: Mapping[str, Sequence[str]] | None = None
) -> list[list[str]]:
    """The panel genes each row of edits changes (in the order the edits name them); refuses unknown targets."""
    touched = []
    for row in rows:
        row_genes: list[str] = []
        for text in row:
            found = [genes[i] for i in resolve_edit(parse_edit(text), genes, gene_sets)]
            row_genes += [g for g in found if g not in row_genes]
        touched.append(row_genes)
    return touched


def row_labels(rows: Sequence[Sequence[str]]) -> list[str]:
    """``"original"``, then each row's edits as written canonically (``"immune*4,CD3E=3"``)."""
    return ["original"] + [",".join(str(parse_edit(t)) for t in row) for row in rows]


def generate_variants(
    pipeline,
    variants: Sequence[np.ndarray],
    seeds: Sequence[int],
    num_inference_steps: int,
    guidance_scale: float | None,
    batch_size: int,
    log=None,
) -> torch.Tensor:
    """Patches ``(R, S, 3, H, W)`` for ``R`` variants of the conditions ``(S, ...)`` of ``S`` spots, spot ``s`` seeded
    with ``seeds[s]`` in every variant, ``batch_size`` patches per pipeline call; ``log(text)`` reports progress."""
    from bundle.sampling.pipeline import seeded_generators

    conditions = torch.from_numpy(np.concatenate(variants))
    all_seeds = list(seeds) * len(variants)
    batch_size = max(1, int(batch_size))
    images = []
    for first in range(0, len(conditions), batch_size):
        chunk = slice(first, first + batch_size)
        generator = seeded_generators(all_seeds[chunk])
        images.append(
            pipeline(
                conditions[chunk],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
            ).cpu()
        )
        if log is not None:
            log(f"generated {min(first + batch_size, len(conditions))}/{len(conditions)} patches")
    return torch.cat(images).reshape(len(variants), len(seeds), *images[0].shape[1:])


def edit_effects(
    labels: Sequence[str], touched: Sequence[Sequence[str]], variants: Sequence[np.ndarray], genes: Sequence[str]
) -> list[dict[str, Any]]:
    """Per edited row: its label, the genes it changes and their mean log-normalised value over the spots (centre
    spots only) before and after the edit. ``variants[0]`` is the original, ``variants[i + 1]`` row ``i``."""

    def mean_of(conditions: np.ndarray, names: Sequence[str]) -> float:
        return round(float(conditions[:, 0][:, [list(genes).index(g) for g in names]].mean()), 4)

    return [
        {
            "row": i + 1,
            "edit": labels[i + 1],
            "genes": list(touched[i]),
            "mean_log1p_before": mean_of(variants[0], touched[i]),
            "mean_log1p_after": mean_of(variants[i + 1], touched[i]),
        }
        for i in range(len(touched))
    ]
