"""Edit directionality: does the probe read the edited genes moving the way an edit (``immune*4``, ...) asked?

scipy is imported when the sign tests run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from bundle.evaluation.generation import Generator, generate_patches
from bundle.evaluation.probe import Probe

__all__ = ["DEFAULT_EDITS", "usable_edits", "edit_directionality"]

logger = logging.getLogger(__name__)


DEFAULT_EDITS: tuple[str, ...] = ("immune*4", "stroma*4", "tumour*4", "hypoxia*0", "immune*0")
"""Edits scored by default: raise three programmes four-fold, silence two."""


def usable_edits(
    edits: Sequence[str], genes: Sequence[str], gene_sets: Mapping[str, Sequence[str]] | None = None
) -> list[str]:
    """The edits of ``edits`` that touch the panel; a named gene set without any panel gene is dropped with a log line.

    A target that is neither a panel gene nor a known gene set is an error (a typo), not dropped.

    Args:
        edits: edit strings (``immune*4``, ``CD3E=2.5``).
        genes: the panel.
        gene_sets: the named gene sets (None: :func:`bundle.sampling.edits.builtin_gene_sets`).
    """
    from bundle.sampling.edits import builtin_gene_sets, parse_edit, resolve_edit

    sets = builtin_gene_sets() if gene_sets is None else {str(k): list(v) for k, v in gene_sets.items()}
    kept = []
    for text in edits:
        edit = parse_edit(text)
        try:
            resolve_edit(edit, genes, sets)
        except ValueError:
            if edit.target in sets:
                logger.info(
                    "edit %s dropped: none of the genes of the set %r is in the %d-gene panel",
                    text,
                    edit.target,
                    len(genes),
                )
                continue
            raise
        kept.append(str(text))
    return kept


def _edited_conditions(
    edit: Any,
    conditions: np.ndarray,
    expression: np.ndarray,
    genes: Sequence[str],
    gene_sets: Mapping[str, Sequence[str]] | None,
) -> tuple[np.ndarray, list[int], np.ndarray, np.ndarray]:
    """The edited conditions, the edited panel indices, the edit's direction per spot (+1, -1, 0) and which spots
    count (the edit changes their condition and has a direction)."""
    from bundle.sampling.edits import apply_edits, edit_direction, resolve_edit

    idx = resolve_edit(edit, genes, gene_sets)
    edited = apply_edits(conditions, genes, [edit], gene_sets)
    changed = np.abs(edited - conditions).reshape(len(conditions), -1).max(axis=1) > 1e-6
    if edit.op == "scale":
        direction = np.full(len(conditions), edit_direction(edit))
    else:
        direction = np.asarray([edit_direction(edit, float(np.mean(e[idx]))) for e in expression])
    return edited, idx, direction, changed & (direction != 0)


def _edit_target(edit: Any, genes: Sequence[str], gene_sets: Mapping[str, Sequence[str]] | None) -> dict[str, Any]:
    """``gene_set``: the set an edit names (None for a panel gene), and the genes of that set outside the panel."""
    from bundle.sampling.edits import builtin_gene_sets

    sets = builtin_gene_sets() if gene_sets is None else gene_sets
    if edit.target in genes or edit.target not in sets:
        return {"gene_set": None, "set_genes_not_in_panel": []}
    panel = set(genes)
    return {"gene_set": edit.target, "set_genes_not_in_panel": [g for g in sets[edit.target] if g not in panel]}


def edit_directionality(
    generator: Generator,
    probe: Probe,
    conditions: np.ndarray,
    expression: np.ndarray,
    genes: Sequence[str],
    edits: Sequence[str],
    seeds: Sequence[int],
    original_images: np.ndarray | None = None,
    batch_size: int = 16,
    cache: Callable[[str, Callable[[], np.ndarray]], np.ndarray] | None = None,
    gene_sets: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Does the probe read the edited genes moving the way each edit asked?

    For each spot and edit, the original and the edited condition are generated with the same seed; the probe
    predicts both, and the edit moved the tissue the right way when the mean predicted (standardised) expression of
    the edited genes changes in the edit's direction (:func:`bundle.sampling.edits.edit_direction`; a ``set`` edit's direction
    is taken against the spot's own mean of those genes). Spots where the edit leaves the condition unchanged (e.g.
    scaling genes with no counts) are skipped. The p-value is a one-sided sign test (``scipy.stats.binomtest``
    against 0.5).

    Args:
        generator: pipeline-like callable.
        probe: the probe.
        conditions: ``(N, ...)`` conditions of the spots.
        expression: ``(N, G)`` the spots' own expression (for the direction of ``set`` edits).
        genes: panel.
        edits: edit strings (already filtered with :func:`usable_edits`).
        seeds: one seed per spot.
        original_images: the unedited patches of these spots with these seeds, when already generated.
        batch_size: generation batch size.
        cache: optional ``cache(name, compute) -> array`` for the generated patches.
        gene_sets: the named gene sets the edits use (None: :func:`bundle.sampling.edits.builtin_gene_sets`).

    Returns:
        per edit (``edits``) the panel genes it changed, the gene set it named (``gene_set``, with
        ``set_genes_not_in_panel``; None for a gene), the spots scored and skipped, the fraction moved the right way,
        the mean signed shift and the sign-test p; and the pooled fraction, count and p.
    """
    from scipy.stats import binomtest

    from bundle.sampling.edits import parse_edit

    def run(name: str, cond: np.ndarray) -> np.ndarray:
        compute = lambda: generate_patches(generator, cond, seeds, batch_size, desc=f"edit {name}")  # noqa: E731
        return cache(name, compute) if cache is not None else compute()

    conditions = np.asarray(conditions, np.float32)
    if original_images is None:
        original_images = run("original", conditions)
    pred_orig, _ = probe.predict(original_images)
    results: dict[str, Any] = {}
    all_moved: list[bool] = []
    for text in edits:
        edit = parse_edit(text)
        edited, idx, direction, keep = _edited_conditions(edit, conditions, expression, genes, gene_sets)
        results[text] = {"genes": [genes[i] for i in idx], **_edit_target(edit, genes, gene_sets)}
        if not keep.any():
            results[text].update(n=0, skipped=int(len(conditions)), fraction=None, p_value=None)
            logger.info("edit %s changes none of the %d spots' conditions: not scored", text, len(conditions))
            continue
        pred_edit, _ = probe.predict(run(text, edited))
        shift = (pred_edit[:, idx] - pred_orig[:, idx]).mean(axis=1)
        moved = (np.sign(shift) == direction)[keep]
        k, n = int(moved.sum()), int(keep.sum())
        all_moved.extend(moved.tolist())
        results[text].update(
            direction=int(direction[keep][0]) if len(set(direction[keep].tolist())) == 1 else "per spot",
            n=n,
            skipped=int(len(conditions) - n),
            moved=k,
            fraction=k / n,
            mean_signed_shift=float((shift * direction)[keep].mean()),
            p_value=float(binomtest(k, n, 0.5, alternative="greater").pvalue),
        )
    k_all, n_all = int(sum(all_moved)), len(all_moved)
    return {
        "edits": results,
        "overall_fraction": k_all / n_all if n_all else None,
        "overall_n": n_all,
        "overall_p_value": float(binomtest(k_all, n_all, 0.5, alternative="greater").pvalue) if n_all else None,
        "num_spots": int(len(conditions)),
    }
