"""Edit directionality: does the probe read the edited genes moving the way an edit (``immune*4``, ...) asked?

scipy is imported when the sign tests run.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from bundle.evaluation.generation import Generator, generate_patches
from bundle.evaluation.probe import Probe

__all__ = [
    "DEFAULT_EDITS",
    "DEFAULT_MIN_SHIFT",
    "usable_edits",
    "edit_spots",
    "edit_directionality",
    "probe_seed_summary",
    "edit_readability",
]

logger = logging.getLogger(__name__)


DEFAULT_EDITS: tuple[str, ...] = ("immune*4", "stroma*4", "tumour*4", "hypoxia*0", "immune*0")
"""Edits scored by default: raise three programmes four-fold, silence two."""

DEFAULT_MIN_SHIFT = 0.5
"""An edit is scored on the spots where it moves the edited genes of the spot's own expression by at least this much
(mean absolute change, log1p-normalised units; 0.5 is about 1.65-fold): silencing a programme a spot barely
expresses changes nothing a probe, or a pathologist, could see."""


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
    min_shift: float = 0.0,
) -> tuple[np.ndarray, list[int], np.ndarray, np.ndarray]:
    """The edited conditions, the edited panel indices, the edit's direction per spot (+1, -1, 0) and which spots
    count: the edit changes their condition, has a direction and moves the edited genes of the spot's own expression
    by at least ``min_shift`` on average."""
    from bundle.sampling.edits import apply_edits, edit_direction, resolve_edit

    idx = resolve_edit(edit, genes, gene_sets)
    edited = apply_edits(conditions, genes, [edit], gene_sets)
    changed = np.abs(edited - conditions).reshape(len(conditions), -1).max(axis=1) > 1e-6
    if edit.op == "scale":
        direction = np.full(len(conditions), edit_direction(edit))
    else:
        direction = np.asarray([edit_direction(edit, float(np.mean(e[idx]))) for e in expression])
    own = np.asarray(expression, np.float32)
    shift = np.abs(apply_edits(own, genes, [edit], gene_sets)[:, idx] - own[:, idx]).mean(axis=1)
    return edited, idx, direction, changed & (direction != 0) & (shift >= min_shift)


def edit_spots(
    edit: Any,
    conditions: np.ndarray,
    expression: np.ndarray,
    genes: Sequence[str],
    num_spots: int | None = None,
    seed: int = 0,
    gene_sets: Mapping[str, Sequence[str]] | None = None,
    min_shift: float = DEFAULT_MIN_SHIFT,
) -> np.ndarray:
    """The spots (sorted indices) an edit is scored on: a seeded choice of ``num_spots`` among those it acts on.

    A spot counts when the edit changes its condition, has a direction and moves the edited genes of the spot's own
    expression by at least ``min_shift`` on average (:data:`DEFAULT_MIN_SHIFT`). The spots are taken in the order of
    one seeded permutation shared by all edits, so edits that act on the same spots are scored on the same spots.

    Args:
        edit: a :class:`bundle.sampling.edits.GeneEdit` or its string.
        conditions: ``(N, ...)`` conditions of the candidate spots.
        expression: ``(N, G)`` their own expression.
        genes: panel.
        num_spots: how many (None: all the spots the edit acts on).
        seed: seed of the permutation.
        gene_sets: named gene sets (None: the built-in sets).
        min_shift: the smallest mean change of the edited genes that counts.
    """
    from bundle.sampling.edits import parse_edit

    edit = parse_edit(edit) if isinstance(edit, str) else edit
    keep = _edited_conditions(edit, np.asarray(conditions, np.float32), expression, genes, gene_sets, min_shift)[3]
    order = np.random.default_rng(seed).permutation(len(keep))
    chosen = order[keep[order]]
    return np.sort(chosen if num_spots is None else chosen[: int(num_spots)])


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
    picks: Mapping[str, Sequence[int]] | None = None,
    min_shift: float = 0.0,
) -> dict[str, Any]:
    """Does the probe read the edited genes moving the way each edit asked?

    For each spot and edit, the original and the edited condition are generated with the same seed; the probe
    predicts both, and the edit moved the tissue the right way when the mean predicted (standardised) expression of
    the edited genes changes in the edit's direction (:func:`bundle.sampling.edits.edit_direction`; a ``set`` edit's
    direction is taken against the spot's own mean of those genes). An edit is scored on the spots it acts on: those
    whose condition it changes and whose own edited genes it moves by at least ``min_shift`` on average (e.g. scaling
    genes with no counts, or silencing a programme a spot barely expresses, is skipped); ``picks`` narrows each edit
    to a choice of spots (:func:`edit_spots`). The p-value is a one-sided sign test (``scipy.stats.binomtest``
    against 0.5).

    Args:
        generator: pipeline-like callable.
        probe: the probe.
        conditions: ``(N, ...)`` conditions of the spots.
        expression: ``(N, G)`` the spots' own expression (for the direction of ``set`` edits and ``min_shift``).
        genes: panel.
        edits: edit strings (already filtered with :func:`usable_edits`).
        seeds: one seed per spot.
        original_images: the unedited patches of these ``N`` spots with these seeds, when already generated.
        batch_size: generation batch size.
        cache: optional ``cache(name, compute) -> array`` for the generated patches (an edit's patches are those of
            its scored spots, in order).
        gene_sets: the named gene sets the edits use (None: :func:`bundle.sampling.edits.builtin_gene_sets`).
        picks: per edit, the indices of the spots to score it on (None: every spot it acts on).
        min_shift: the smallest mean change of the spot's own edited genes that counts as acting.

    Returns:
        per edit (``edits``) the panel genes it changed, the gene set it named (``gene_set``, with
        ``set_genes_not_in_panel``), the spots it acts on (``eligible``) and those skipped, the spots scored (``n``),
        the fraction moved the right way, the mean signed shift and the sign-test p; the pooled fraction, count and p;
        ``num_spots``: the distinct spots scored.
    """
    from scipy.stats import binomtest

    from bundle.sampling.edits import parse_edit

    conditions = np.asarray(conditions, np.float32)
    seeds = list(seeds)
    plans = {}
    for text in edits:
        edit = parse_edit(text)
        edited, idx, direction, keep = _edited_conditions(edit, conditions, expression, genes, gene_sets, min_shift)
        chosen = np.flatnonzero(keep) if picks is None else np.asarray(picks[text], dtype=int)
        plans[text] = (edit, edited, idx, direction, keep, np.sort(chosen[keep[chosen]]))
    scored = sorted(set().union(*(p[5].tolist() for p in plans.values()))) if plans else []
    row = {spot: k for k, spot in enumerate(scored)}
    if scored:
        if original_images is None:
            compute = lambda: generate_patches(  # noqa: E731
                generator, conditions[scored], [seeds[i] for i in scored], batch_size, desc="edit original"
            )
            originals = cache("original", compute) if cache is not None else compute()
        else:
            originals = np.asarray(original_images)[scored]
        pred_orig = probe.predict(originals)[0]
    results: dict[str, Any] = {}
    all_moved: list[bool] = []
    for text, (edit, edited, idx, direction, keep, chosen) in plans.items():
        eligible = int(keep.sum())
        results[text] = {
            "genes": [genes[i] for i in idx],
            **_edit_target(edit, genes, gene_sets),
            "eligible": eligible,
            "skipped": int(len(conditions) - eligible),
        }
        if not len(chosen):
            results[text].update(n=0, fraction=None, p_value=None)
            logger.info("edit %s acts on none of the %d spots: not scored", text, len(conditions))
            continue
        compute = functools.partial(
            generate_patches, generator, edited[chosen], [seeds[i] for i in chosen], batch_size, f"edit {text}"
        )
        pred_edit = probe.predict(cache(text, compute) if cache is not None else compute())[0]
        before = pred_orig[[row[i] for i in chosen]]
        shift = (pred_edit[:, idx] - before[:, idx]).mean(axis=1)
        moved = np.sign(shift) == direction[chosen]
        k, n = int(moved.sum()), len(chosen)
        all_moved.extend(moved.tolist())
        results[text].update(
            direction=int(direction[chosen][0]) if len(set(direction[chosen].tolist())) == 1 else "per spot",
            n=n,
            moved=k,
            fraction=k / n,
            mean_signed_shift=float((shift * direction[chosen]).mean()),
            p_value=float(binomtest(k, n, 0.5, alternative="greater").pvalue),
        )
    k_all, n_all = int(sum(all_moved)), len(all_moved)
    return {
        "edits": results,
        "overall_fraction": k_all / n_all if n_all else None,
        "overall_n": n_all,
        "overall_p_value": float(binomtest(k_all, n_all, 0.5, alternative="greater").pvalue) if n_all else None,
        "num_spots": len(scored),
        "min_shift": float(min_shift),
    }


def probe_seed_summary(results: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """Each edit's rate under several probes: the :func:`edit_directionality` results of the same patches read by
    probes trained with ``seeds`` (the first: the evaluation's own probe).

    Returns:
        ``seeds``; per edit (``edits``) the ``fractions`` under each probe (None where the edit was not scored) and
        their ``mean``, ``min`` and ``max``; the same for the pooled rate (``overall``).
    """
    if len(results) != len(seeds) or not results:
        raise ValueError(f"one edit-directionality result per probe seed is needed, got {len(results)} for {seeds}.")

    def spread(fractions: list[float | None]) -> dict[str, Any]:
        known = [f for f in fractions if f is not None]
        summary = {"fractions": fractions, "mean": None, "min": None, "max": None}
        if known:
            summary.update(mean=float(np.mean(known)), min=float(min(known)), max=float(max(known)))
        return summary

    names = list(results[0].get("edits", {}))
    return {
        "seeds": [int(s) for s in seeds],
        "edits": {name: spread([r["edits"][name].get("fraction") for r in results]) for name in names},
        "overall": spread([r.get("overall_fraction") for r in results]),
    }


def edit_readability(
    probe: Probe,
    real_predictions: np.ndarray,
    expression: np.ndarray,
    edit_results: Mapping[str, Any],
    threshold: float = 0.3,
) -> dict[str, dict[str, Any]]:
    """Can the probe read each edit's genes at all? An edit rate means little when it cannot.

    For each scored edit: the Pearson r, over the evaluated spots, between the mean of the edited genes in the probe's
    prediction on the REAL patches and in the spots' measured expression (standardised the probe's way); the edit is
    ``readable`` when r is at least ``threshold`` (the evaluation's ``ceiling_threshold``, the same bar as for a
    readable gene).

    Args:
        probe: the probe (for its genes, mean and standard deviation).
        real_predictions: ``(N, G)`` its standardised predictions on the real patches of the evaluated spots.
        expression: ``(N, G)`` those spots' measured expression (log-normalised).
        edit_results: ``edit_directionality(...)["edits"]`` (the ``genes`` of each edit).
        threshold: the smallest r of a readable edit.

    Returns:
        per edit ``{"real_r": r or None (constant), "readable": bool}``.
    """
    from bundle.evaluation.fidelity import pearson_per_column

    index = {g: i for i, g in enumerate(probe.genes)}
    truth = (np.asarray(expression, np.float64) - probe.mean) / probe.std
    out: dict[str, dict[str, Any]] = {}
    for name, res in edit_results.items():
        idx = [index[g] for g in res.get("genes", []) if g in index]
        if not idx or len(truth) < 3:
            out[name] = {"real_r": None, "readable": False}
            continue
        r = pearson_per_column(
            truth[:, idx].mean(axis=1, keepdims=True), np.asarray(real_predictions)[:, idx].mean(axis=1, keepdims=True)
        )[0]
        value = float(r) if np.isfinite(r) else None
        out[name] = {"real_r": value, "readable": value is not None and value >= threshold}
    return out
