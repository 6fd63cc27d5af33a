"""Scoring of a review kit's answers: per-reviewer accuracy, sensitivity, specificity, a one-sided exact binomial test
against guessing, confidence and tissue-feature means, and inter-rater agreement (Cohen's and Fleiss' kappa).

``score_answers`` reads the key written by :func:`bundle.review.kit.export_review_kit` and any number of answers
files, and reports per reviewer, pooled over all reviewers, and between reviewers; ``format_report`` renders the
report as text. See docs/review_kit.md.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundle.review.kit import CALLS, CONFIDENCE_LEVELS, FEATURE_LEVELS, KEY_FORMAT, LABELS
from bundle.utils import read_json, write_json_atomic

__all__ = [
    "load_key",
    "load_answers",
    "score_answers",
    "format_report",
    "write_report",
    "kappa_label",
    "cohen_kappa",
    "fleiss_kappa",
    "ratings_table",
]


def load_key(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a review-kit key written by :func:`export_review_kit`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: malformed JSON or not a review-kit key (the message names the file).
    """
    key = read_json(path)
    images = key.get("images") if isinstance(key, dict) else None
    if not isinstance(key, dict) or key.get("format") != KEY_FORMAT or not isinstance(images, dict) or not images:
        raise ValueError(
            f"{str(path)!r} is not a review-kit key (format {KEY_FORMAT!r}); pass the file written by export --key."
        )
    for name, entry in images.items():
        if not isinstance(entry, dict) or entry.get("label") not in LABELS:
            raise ValueError(
                f"Key {str(path)!r}: image {name!r} has no label 'real' or 'generated'; the key is damaged."
            )
    return key


def _check_level(value: Any, levels: int, what: str, where: str) -> int | None:
    """``value`` as an int in ``1..levels`` or ``None``; a clear error otherwise."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value != int(value)
        or not 1 <= value <= levels
    ):
        raise ValueError(f"{where}: {what} must be a whole number from 1 to {levels} or null, got {value!r}.")
    return int(value)


def load_answers(path: str | os.PathLike, key: dict[str, Any]) -> dict[str, Any]:
    """Read one reviewer's answers file and check it against ``key``.

    Args:
        path: an ``answers_<reviewer>.json`` saved by the kit's page.
        key: the kit's key (:func:`load_key`).

    Returns:
        ``{"reviewer", "file", "saved_at", "answers": {image: {"call", "confidence", "features"}}}`` holding only the
        images with a call (``"real"`` / ``"synthetic"``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: malformed JSON, another kit's answers, unknown or repeated image names, or invalid values (the
            message names the file).
    """
    where = repr(str(path))
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("answers"), list) or "kit_id" not in data:
        raise ValueError(
            f"{where} is not a review-kit answers file (expected an object with 'kit_id', 'reviewer' and an "
            "'answers' list); pass the answers_<reviewer>.json saved by the kit's page."
        )
    if data["kit_id"] != key["kit_id"]:
        raise ValueError(
            f"{where} holds answers for kit {data['kit_id']!r}, but the key is for kit {key['kit_id']!r}; "
            "score it with the key of the kit that reviewer was sent."
        )
    reviewer = str(data.get("reviewer") or "").strip()
    if not reviewer:
        raise ValueError(f"{where} has no reviewer name; add a 'reviewer' field.")
    answers: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    unknown: list[str] = []
    for i, entry in enumerate(data["answers"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise ValueError(f"{where}: answer #{i} is not an object with an 'image' name.")
        name = entry["image"]
        if name not in key["images"]:
            unknown.append(name)
            continue
        if name in seen:
            raise ValueError(f"{where}: image {name!r} is answered twice; keep one answer per image.")
        seen.add(name)
        call = entry.get("call")
        if call is None:
            continue
        if call not in CALLS:
            raise ValueError(f"{where}: image {name!r} has call {call!r}; expected 'real', 'synthetic' or null.")
        confidence = _check_level(entry.get("confidence"), CONFIDENCE_LEVELS, "confidence", f"{where}, image {name!r}")
        raw_features = entry.get("features") or {}
        if not isinstance(raw_features, dict):
            raise ValueError(f"{where}, image {name!r}: 'features' must be an object of scores.")
        features = {
            f: _check_level(v, FEATURE_LEVELS, f"feature {f!r}", f"{where}, image {name!r}")
            for f, v in raw_features.items()
        }
        answers[name] = {"call": call, "confidence": confidence, "features": features}
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ValueError(
            f"{where} names {len(unknown)} image(s) that are not in the key ({shown}); "
            "check that the answers and the key come from the same kit."
        )
    return {"reviewer": reviewer, "file": str(path), "saved_at": data.get("saved_at"), "answers": answers}


def _mean(values: Sequence[float]) -> float | None:
    """Mean, ``None`` for no values."""
    return float(np.mean(values)) if len(values) else None


def _ratio(num: int, den: int) -> float | None:
    """``num / den``, ``None`` when ``den`` is 0."""
    return num / den if den else None


def _finite(value: float | None) -> float | None:
    """``value``, or ``None`` when it is missing or not finite (JSON has no NaN)."""
    return None if value is None or not math.isfinite(value) else float(value)


def _feature_means(entries: list[tuple[str, dict[str, Any]]], features: Sequence[str]) -> dict[str, Any]:
    """Mean score of each feature on real and on synthetic patches; ``entries`` are ``(label, answer)`` pairs."""
    out = {}
    for f in features:
        real = [a["features"][f] for label, a in entries if label == "real" and a["features"].get(f) is not None]
        synth = [a["features"][f] for label, a in entries if label == "generated" and a["features"].get(f) is not None]
        out[f] = {"real": _mean(real), "synthetic": _mean(synth), "n_real": len(real), "n_synthetic": len(synth)}
    return out


def _reviewer_stats(answers: dict[str, dict[str, Any]], key: dict[str, Any], features: Sequence[str]) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity, binomial test, confidence and feature means of one reviewer."""
    from scipy.stats import binomtest

    labels = {name: key["images"][name]["label"] for name in answers}
    correct = {name: (a["call"] == "synthetic") == (labels[name] == "generated") for name, a in answers.items()}
    n = len(answers)
    k = sum(correct.values())
    tp = sum(1 for name, a in answers.items() if labels[name] == "generated" and a["call"] == "synthetic")
    n_gen = sum(1 for name in answers if labels[name] == "generated")
    tn = sum(1 for name, a in answers.items() if labels[name] == "real" and a["call"] == "real")
    n_real = n - n_gen
    conf_right = [a["confidence"] for name, a in answers.items() if correct[name] and a["confidence"] is not None]
    conf_wrong = [a["confidence"] for name, a in answers.items() if not correct[name] and a["confidence"] is not None]
    return {
        "num_answered": n,
        "num_correct": k,
        "accuracy": _ratio(k, n),
        "sensitivity": _ratio(tp, n_gen),
        "specificity": _ratio(tn, n_real),
        "num_real_answered": n_real,
        "num_synthetic_answered": n_gen,
        "binomial_p": float(binomtest(k, n, 0.5, alternative="greater").pvalue) if n else None,
        "mean_confidence_correct": _mean(conf_right),
        "mean_confidence_incorrect": _mean(conf_wrong),
        "features": _feature_means([(labels[name], a) for name, a in answers.items()], features),
    }


def score_answers(key_path: str | os.PathLike, answer_paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Score reviewers' answers against a kit's key.

    Args:
        key_path: the key written by :func:`export_review_kit`.
        answer_paths: one ``answers_<reviewer>.json`` per reviewer.

    Returns:
        A JSON-ready report: ``kit_id``, ``num_images``, ``reviewers`` (per reviewer: ``num_answered``,
        ``accuracy``, ``sensitivity`` = synthetic patches called synthetic, ``specificity`` = real patches called
        real, ``binomial_p`` = P(accuracy >= observed | guessing, p = 0.5), mean confidence when correct / incorrect,
        mean feature scores for real and synthetic patches), ``pooled`` (all answers together) and ``agreement``
        (Cohen's kappa per pair of reviewers on the images both answered; Fleiss' kappa on the images all answered).
        Undefined values (nothing answered, kappa with no variation) are ``None``.

    Raises:
        ValueError: no answers file, answers from another kit, unknown image names, malformed files, or one reviewer
            name in two files.
    """
    if not answer_paths:
        raise ValueError("No answers file given; pass one or more answers_<reviewer>.json files.")
    key = load_key(key_path)
    reviewers = [load_answers(p, key) for p in answer_paths]
    _check_distinct_reviewers(reviewers)
    features = _feature_keys(key, reviewers)
    report_reviewers = [
        {
            "reviewer": r["reviewer"],
            "file": r["file"],
            "saved_at": r["saved_at"],
            **_reviewer_stats(r["answers"], key, features),
        }
        for r in reviewers
    ]
    return {
        "kit_id": key["kit_id"],
        "key": str(key_path),
        "num_images": len(key["images"]),
        "features": features,
        "reviewers": report_reviewers,
        "pooled": _pooled_stats(reviewers, key, features),
        "agreement": _agreement(reviewers),
    }


def _check_distinct_reviewers(reviewers: Sequence[dict[str, Any]]) -> None:
    """Refuse one reviewer name in two answers files."""
    names: dict[str, str] = {}
    for r in reviewers:
        if r["reviewer"] in names:
            raise ValueError(
                f"Reviewer {r['reviewer']!r} appears in both {names[r['reviewer']]!r} and {r['file']!r}; "
                "pass each reviewer's answers once (rename the reviewer in one file if they are two people)."
            )
        names[r["reviewer"]] = r["file"]


def _feature_keys(key: dict[str, Any], reviewers: Sequence[dict[str, Any]]) -> list[str]:
    """The key's features, then the features the key does not list in the order the answers first use them."""
    features = list(key.get("features") or [])
    for r in reviewers:
        for a in r["answers"].values():
            features += [f for f in a["features"] if f not in features]
    return features


def _pooled_stats(reviewers: Sequence[dict[str, Any]], key: dict[str, Any], features: Sequence[str]) -> dict[str, Any]:
    """Number of answers, accuracy and feature means of all reviewers' answers together."""
    entries = [(key["images"][name]["label"], a) for r in reviewers for name, a in r["answers"].items()]
    correct = sum((a["call"] == "synthetic") == (label == "generated") for label, a in entries)
    return {
        "num_answers": len(entries),
        "accuracy": _ratio(correct, len(entries)),
        "features": _feature_means(entries, features),
    }


def _agreement(reviewers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Cohen's kappa of every pair of reviewers on the images both called, Fleiss' kappa of all on the images all
    called; no pair and ``None`` with fewer than two reviewers."""
    agreement: dict[str, Any] = {"cohen_kappa": [], "fleiss_kappa": None}
    if len(reviewers) < 2:
        return agreement
    for a, b in itertools.combinations(reviewers, 2):
        common = sorted(set(a["answers"]) & set(b["answers"]))
        calls_a = [a["answers"][n]["call"] for n in common]
        calls_b = [b["answers"][n]["call"] for n in common]
        agreement["cohen_kappa"].append(
            {
                "reviewers": [a["reviewer"], b["reviewer"]],
                "num_images": len(common),
                "observed_agreement": _ratio(sum(x == y for x, y in zip(calls_a, calls_b)), len(common)),
                "kappa": _finite(cohen_kappa(calls_a, calls_b)) if common else None,
            }
        )
    common_all = sorted(set.intersection(*(set(r["answers"]) for r in reviewers)))
    table = ratings_table([[r["answers"][n]["call"] for r in reviewers] for n in common_all], CALLS)
    agreement["fleiss_kappa"] = {
        "reviewers": [r["reviewer"] for r in reviewers],
        "num_images": len(common_all),
        "kappa": _finite(fleiss_kappa(table)) if common_all else None,
    }
    return agreement


def _fmt(value: float | None, digits: int = 3) -> str:
    """A number for the text report; ``-`` for ``None``."""
    return "-" if value is None else f"{value:.{digits}f}"


def kappa_label(kappa: float | None) -> str:
    """Landis & Koch's wording for a kappa value (``"slight"``, ``"fair"``, ...)."""
    if kappa is None:
        return "undefined"
    if kappa < 0:
        return "poor"
    for bound, label in ((0.2, "slight"), (0.4, "fair"), (0.6, "moderate"), (0.8, "substantial")):
        if kappa <= bound:
            return label
    return "almost perfect"


def format_report(report: dict[str, Any]) -> str:
    """The score report as plain text: one line per reviewer, agreement, and feature means."""
    lines = [f"kit {report['kit_id']}: {report['num_images']} images, {len(report['reviewers'])} reviewer(s)", ""]
    head = f"{'reviewer':<20}{'answered':>9}{'accuracy':>10}{'sens':>7}{'spec':>7}{'binom p':>10}{'conf ok':>9}{'conf x':>8}"
    lines += [head, "-" * len(head)]
    for r in report["reviewers"]:
        p = "-" if r["binomial_p"] is None else f"{r['binomial_p']:.3g}"
        lines.append(
            f"{r['reviewer'][:19]:<20}{r['num_answered']:>9}{_fmt(r['accuracy']):>10}{_fmt(r['sensitivity'], 2):>7}"
            f"{_fmt(r['specificity'], 2):>7}{p:>10}{_fmt(r['mean_confidence_correct'], 2):>9}"
            f"{_fmt(r['mean_confidence_incorrect'], 2):>8}"
        )
    pooled = report["pooled"]
    lines.append(f"{'all reviewers':<20}{pooled['num_answers']:>9}{_fmt(pooled['accuracy']):>10}")
    lines += [
        "",
        "accuracy near 0.5: the reviewers cannot tell synthetic from real; sens = synthetic called synthetic,",
        "spec = real called real; binom p = P(accuracy >= observed) when guessing (small p: they can tell).",
    ]
    agreement = report["agreement"]
    if agreement["fleiss_kappa"] is not None:
        lines += ["", "agreement (real / synthetic calls):"]
        for c in agreement["cohen_kappa"]:
            lines.append(
                f"  Cohen's kappa {c['reviewers'][0]} vs {c['reviewers'][1]}: {_fmt(c['kappa'])} "
                f"({kappa_label(c['kappa'])}; {c['num_images']} images, raw agreement {_fmt(c['observed_agreement'])})"
            )
        fk = agreement["fleiss_kappa"]
        lines.append(
            f"  Fleiss' kappa, all reviewers: {_fmt(fk['kappa'])} ({kappa_label(fk['kappa'])}; {fk['num_images']} images)"
        )
    if report["features"]:
        lines += [
            "",
            "mean tissue-feature scores (1-5), all reviewers:",
            f"  {'feature':<20}{'real':>8}{'synthetic':>11}",
        ]
        for f, m in pooled["features"].items():
            lines.append(
                f"  {f:<20}{_fmt(m['real'], 2):>8}{_fmt(m['synthetic'], 2):>11}   (n = {m['n_real']} / {m['n_synthetic']})"
            )
    return "\n".join(lines)


def write_report(path: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Write the score report as JSON (atomically)."""
    return write_json_atomic(path, report)


# ---------------------------------------------------------------------------------------------------------- kappa


def cohen_kappa(rater_a: Sequence[Hashable], rater_b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters' categorical ratings of the same items.

    ``kappa = (p_o - p_e) / (1 - p_e)`` with ``p_o`` the observed agreement and ``p_e = sum_c p_a(c) p_b(c)`` the
    agreement expected by chance from each rater's category frequencies.

    Args:
        rater_a: ratings of rater A, one per item.
        rater_b: ratings of rater B, same items in the same order.

    Returns:
        Kappa; ``nan`` when both raters use one and the same category throughout (``p_e = 1``).
    """
    if len(rater_a) != len(rater_b):
        raise ValueError(f"Both raters must rate the same items: got {len(rater_a)} and {len(rater_b)} ratings.")
    n = len(rater_a)
    if n == 0:
        raise ValueError("Cohen's kappa needs at least one rated item.")
    p_o = sum(a == b for a, b in zip(rater_a, rater_b)) / n
    categories = set(rater_a) | set(rater_b)
    p_e = sum((list(rater_a).count(c) / n) * (list(rater_b).count(c) / n) for c in categories)
    return float("nan") if math.isclose(p_e, 1.0) else (p_o - p_e) / (1.0 - p_e)


def ratings_table(ratings: Sequence[Sequence[Hashable]], categories: Sequence[Hashable]) -> np.ndarray:
    """Count table for :func:`fleiss_kappa`: ``table[i, j]`` = number of raters who put item ``i`` in category ``j``.

    Args:
        ratings: per item, the ratings of all raters.
        categories: the possible categories (columns, in this order).
    """
    column = {c: j for j, c in enumerate(categories)}
    table = np.zeros((len(ratings), len(categories)), dtype=np.int64)
    for i, item in enumerate(ratings):
        for r in item:
            if r not in column:
                raise ValueError(f"Rating {r!r} of item {i} is not one of the categories {list(categories)}.")
            table[i, column[r]] += 1
    return table


def fleiss_kappa(table: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Fleiss' kappa (Fleiss 1971) of a fixed number of raters per item.

    ``P_i = (sum_j n_ij^2 - n) / (n (n - 1))``, ``P_bar = mean_i P_i``, ``p_j = sum_i n_ij / (N n)``,
    ``P_e = sum_j p_j^2``, ``kappa = (P_bar - P_e) / (1 - P_e)``.

    Args:
        table: ``(items, categories)`` counts; every row sums to the number of raters ``n`` >= 2 (see
            :func:`ratings_table`).

    Returns:
        Kappa; ``nan`` when every rating falls in one category (``P_e = 1``).
    """
    t = np.asarray(table, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(
            f"Fleiss' kappa needs an (items, categories) table with at least one item, got shape {t.shape}."
        )
    n = t.sum(axis=1)
    if not np.allclose(n, n[0]) or n[0] < 2:
        raise ValueError("Every item must be rated by the same number of raters, at least 2 (rows of the table).")
    n = n[0]
    p_j = t.sum(axis=0) / (t.shape[0] * n)
    p_i = ((t**2).sum(axis=1) - n) / (n * (n - 1))
    p_bar, p_e = p_i.mean(), float((p_j**2).sum())
    return float("nan") if math.isclose(p_e, 1.0) else float((p_bar - p_e) / (1.0 - p_e))
