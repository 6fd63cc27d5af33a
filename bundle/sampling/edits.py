"""Counterfactual expression edits: scale, silence or set named genes or gene sets of a spot's expression.

An edit is written ``TARGET*FACTOR`` (scale the counts, e.g. ``immune*4``; ``*0`` silences) or ``TARGET=VALUE`` (set
the normalised value, e.g. ``CD3E=3``). ``TARGET`` is a gene of the model's panel or a named gene set: the
built-in sets are the demo study's programmes (:data:`bundle.demo.GENE_PROGRAMMES`: ``epithelial``, ``tumour``,
``stroma``, ``immune``, ``adipose``, ``necrosis``, ``hypoxia``, ``mucosa``, which use real marker genes) and more can
be read from a JSON file ``{"set name": ["GENE", ...]}`` or a GMT file.

Scaling happens in count space: expression stored as ``log1p(normalize_total)`` is mapped back with ``expm1``,
multiplied, and logged again, so ``immune*4`` means four times the immune transcripts, as a biologist would read it.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "GeneEdit",
    "apply_edits",
    "builtin_gene_sets",
    "edit_direction",
    "parse_edit",
    "read_gene_sets",
    "resolve_edit",
]

_EDIT = re.compile(r"^\s*(?P<target>[^*=\s]+)\s*(?P<op>[*=])\s*(?P<value>[-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class GeneEdit:
    """One edit: ``op`` is ``"scale"`` (counts times ``value``) or ``"set"`` (normalised value := ``value``)."""

    target: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.target}{'*' if self.op == 'scale' else '='}{self.value:g}"


def parse_edit(text: str) -> GeneEdit:
    """Parse ``"immune*4"``, ``"hypoxia*0"`` or ``"CD3E=2.5"`` into a :class:`GeneEdit`."""
    match = _EDIT.match(str(text))
    if match is None:
        raise ValueError(
            f"cannot read the edit {text!r}: write TARGET*FACTOR (e.g. 'immune*4', 'hypoxia*0') or TARGET=VALUE "
            "(e.g. 'CD3E=2.5'), where TARGET is a gene of the panel or a gene set."
        )
    try:
        value = float(match["value"])
    except ValueError:
        raise ValueError(f"the edit {text!r} has no number after {match['op']!r}.") from None
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"the edit {text!r} needs a finite, non-negative number (expression cannot be negative).")
    return GeneEdit(match["target"], "scale" if match["op"] == "*" else "set", value)


def builtin_gene_sets() -> dict[str, list[str]]:
    """The named gene sets every edit can use (the demo study's programmes)."""
    from bundle.demo import GENE_PROGRAMMES

    return {name: list(genes) for name, genes in GENE_PROGRAMMES.items()}


def read_gene_sets(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read gene sets from a JSON file (``{"name": [genes]}``) or a GMT file (name, description, genes; tab-separated)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gene-set file {str(path)!r} does not exist.")
    if path.suffix.lower() == ".gmt":
        sets = {}
        for line in path.read_text().splitlines():
            fields = [f.strip() for f in line.split("\t")]
            if len(fields) >= 3 and fields[0]:
                sets[fields[0]] = [g for g in fields[2:] if g]
        if not sets:
            raise ValueError(
                f"{str(path)!r} holds no gene set: a GMT line is NAME<tab>DESCRIPTION<tab>GENE<tab>GENE..."
            )
        return sets
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f'{str(path)!r} is not valid JSON ({err}); write {{"set name": ["GENE", ...]}}.') from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f'{str(path)!r} must map set names to lists of genes, e.g. {{"immune": ["CD3E", "PTPRC"]}}.')
    return {str(k): [str(g) for g in v] for k, v in data.items()}


def resolve_edit(
    edit: GeneEdit, genes: Sequence[str], gene_sets: Mapping[str, Sequence[str]] | None = None
) -> list[int]:
    """Panel indices that ``edit`` changes; raises ``ValueError`` naming the target when none of it is in the panel."""
    index = {g: i for i, g in enumerate(genes)}
    sets = builtin_gene_sets() if gene_sets is None else dict(gene_sets)
    if edit.target in index:
        return [index[edit.target]]
    if edit.target in sets:
        members = [index[g] for g in sets[edit.target] if g in index]
        if not members:
            raise ValueError(
                f"none of the genes of the set {edit.target!r} ({', '.join(sets[edit.target][:8])}...) is in the model's "
                f"{len(genes)}-gene panel; edit genes of the panel instead."
            )
        return members
    close = difflib.get_close_matches(edit.target, list(index) + list(sets), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"{edit.target!r} is neither a gene of the model's {len(genes)}-gene panel nor a known gene set "
        f"({', '.join(sorted(sets))}).{hint}"
    )


def apply_edits(
    expression: np.ndarray,
    genes: Sequence[str],
    edits: Sequence[GeneEdit | str],
    gene_sets: Mapping[str, Sequence[str]] | None = None,
) -> np.ndarray:
    """Return a copy of log1p-normalised ``expression`` (``(..., G)`` in panel order) with ``edits`` applied in order.

    Works on a spot ``(G,)``, a batch ``(B, G)`` or a batch with neighbours ``(B, 1 + K, G)`` (all positions edited).
    """
    expression = np.asarray(expression, dtype=np.float32)
    if expression.shape[-1] != len(genes):
        raise ValueError(f"expression has {expression.shape[-1]} genes but the panel has {len(genes)}.")
    out = expression.copy()
    for edit in edits:
        edit = parse_edit(edit) if isinstance(edit, str) else edit
        idx = resolve_edit(edit, genes, gene_sets)
        if edit.op == "scale":
            out[..., idx] = np.log1p(np.expm1(np.maximum(out[..., idx], 0.0)) * edit.value)
        else:
            out[..., idx] = edit.value
    return out


def edit_direction(edit: GeneEdit | str, before: float | None = None) -> int:
    """+1 when ``edit`` raises expression, -1 when it lowers it, 0 when it leaves it (a ``set`` needs ``before``)."""
    edit = parse_edit(edit) if isinstance(edit, str) else edit
    if edit.op == "scale":
        return int(np.sign(edit.value - 1.0))
    if before is None:
        raise ValueError(f"the direction of {edit} depends on the value before the edit; pass before=.")
    return int(np.sign(edit.value - before))
