"""The self-contained HTML report of an evaluation (inline CSS, SVG and base64 PNGs), one function per section."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundle.utils import atomic_path

__all__ = ["summary_numbers", "spread_over_labels", "write_report"]


def summary_numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of ``metrics`` (the report's summary table and the MLflow metrics), None left out."""
    out: dict[str, Any] = {}
    real = metrics.get("realism", {})
    inception = real.get("inception", {})
    for key in ("fid", "kid_mean", "kid_std"):
        out[key] = inception.get(key)
    for name, res in real.get("encoders", {}).items():
        out[f"fid_{name}"] = res.get("fid")
        out[f"kid_mean_{name}"] = res.get("kid_mean")
    fid = metrics.get("fidelity", {})
    for key in (
        "ceiling_r_mean",
        "fidelity_r_mean",
        "fidelity_fraction",
        "ceiling_r_mean_readable",
        "fidelity_r_mean_readable",
        "fidelity_fraction_readable",
        "num_readable_genes",
        "fidelity_p_value",
    ):
        out[key] = fid.get(key)
    for group in ("top_ceiling", "top_hvg"):
        chosen = fid.get("top_genes", {}).get(group, {})
        out[f"ceiling_r_mean_{group}"] = chosen.get("ceiling_r_mean")
        out[f"fidelity_r_mean_{group}"] = chosen.get("fidelity_r_mean")
    comp = metrics.get("compartments", {})
    out["compartment_real_accuracy"] = comp.get("real_accuracy")
    out["compartment_generated_agreement"] = comp.get("generated_agreement")
    out["compartment_chance"] = comp.get("chance")
    edits = metrics.get("edits", {})
    out["edit_directionality"] = edits.get("overall_fraction")
    out["edit_p_value"] = edits.get("overall_p_value")
    for name, res in edits.get("edits", {}).items():
        out[f"edit_{name}_fraction"] = res.get("fraction")
    seeds = edits.get("probe_seeds")
    if seeds:
        out["edit_directionality_probe_mean"] = seeds["overall"]["mean"]
        for name, res in seeds["edits"].items():
            out[f"edit_{name}_probe_mean"] = res["mean"]
    out["num_spots"] = metrics.get("settings", {}).get("num_spots")
    return {
        k: float(v)
        for k, v in out.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
    }


_DESCRIPTIONS = {
    "fid": "Fréchet Inception distance, real vs generated patches (lower is better; 0 = same distribution)",
    "kid_mean": "kernel Inception distance (unbiased; about 0 when the two sets are alike)",
    "kid_std": "standard deviation of KID over subsets",
    "ceiling_r_mean": "probe's mean per-gene Pearson r on REAL patches of the evaluated spots: what images can tell",
    "fidelity_r_mean": "same probe on GENERATED patches, against the expression that conditioned them",
    "fidelity_fraction": "fidelity r / ceiling r (1 = generated tissue carries as much expression signal as real)",
    "ceiling_r_mean_readable": "ceiling r over the genes the probe can read (ceiling r above the threshold)",
    "fidelity_r_mean_readable": "fidelity r over those genes",
    "fidelity_fraction_readable": "fidelity / ceiling over those genes",
    "num_readable_genes": "genes with ceiling r above the threshold",
    "fidelity_p_value": "permutation p-value of the mean fidelity r (spots shuffled)",
    "ceiling_r_mean_top_ceiling": "mean ceiling r over the top-N genes by ceiling r (optimistic: chosen by it)",
    "fidelity_r_mean_top_ceiling": "mean fidelity r over the same top-N genes by ceiling r",
    "ceiling_r_mean_top_hvg": "mean ceiling r over the N most variable genes of the evaluated spots",
    "fidelity_r_mean_top_hvg": "mean fidelity r over the N most variable genes of the evaluated spots",
    "compartment_real_accuracy": "classifier accuracy on real patches of the evaluated spots (ceiling)",
    "compartment_generated_agreement": "generated patches labelled as the conditioning spot's compartment",
    "compartment_chance": "frequency of the most common label (always guessing it)",
    "edit_directionality": "edits whose probe reading moved the right way, all edits pooled (chance 0.5)",
    "edit_p_value": "one-sided sign test of the pooled directionality against 0.5",
    "edit_directionality_probe_mean": "pooled edit directionality averaged over the probes of edit_probe_seeds",
    "num_spots": "spots evaluated (of the split in the header)",
}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return html.escape(str(value))


def _png_data_uri(image: np.ndarray) -> str:
    """A ``(3, H, W)`` uint8 image as a ``data:image/png;base64,...`` URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.asarray(image, np.uint8).transpose(1, 2, 0))).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _gene_bars_svg(genes: Sequence[str], ceiling: Sequence[float | None], fidelity: Sequence[float | None]) -> str:
    """Inline SVG: per gene (sorted by ceiling r), a grey bar for the ceiling and a coloured bar for the fidelity."""
    order = sorted(range(len(genes)), key=lambda i: -(ceiling[i] if ceiling[i] is not None else -2))
    row, label_w, bar_w = 16, 90, 300
    height = row * len(order) + 40
    zero = label_w + bar_w / 2
    parts = [
        f'<svg width="{label_w + bar_w + 120}" height="{height}" ' f'role="img" aria-label="per-gene Pearson r">',
        f'<line x1="{zero}" y1="20" x2="{zero}" y2="{height - 10}" stroke="#444" stroke-width="1"/>',
        f'<text x="{label_w}" y="12" font-size="10">r = -1</text><text x="{zero - 6}" y="12" font-size="10">0</text>'
        f'<text x="{label_w + bar_w - 20}" y="12" font-size="10">r = 1</text>',
    ]
    for k, i in enumerate(order):
        y = 22 + k * row
        parts.append(
            f'<text x="{label_w - 4}" y="{y + 10}" font-size="10" text-anchor="end">{html.escape(str(genes[i]))}</text>'
        )
        for j, (value, colour) in enumerate(((ceiling[i], "#9a9a9a"), (fidelity[i], "#c2185b"))):
            if value is None:
                continue
            w = abs(value) * bar_w / 2
            x = zero if value >= 0 else zero - w
            parts.append(
                f'<rect x="{x:.1f}" y="{y + j * 6}" width="{w:.1f}" height="6" fill="{colour}">'
                f"<title>{html.escape(str(genes[i]))} {('ceiling', 'generated')[j]} r = {value:.3f}</title></rect>"
            )
        c, f = ceiling[i], fidelity[i]
        parts.append(f'<text x="{label_w + bar_w + 6}" y="{y + 10}" font-size="10">{_fmt(c, 2)} / {_fmt(f, 2)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _confusion_html(names: Sequence[str], matrix: Sequence[Sequence[int]], caption: str) -> str:
    matrix = np.asarray(matrix)
    rows = []
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    for i, name in enumerate(names):
        total = max(1, int(matrix[i].sum()))
        cells = []
        for j in range(len(names)):
            share = matrix[i, j] / total
            colour = f"rgba(194,24,91,{share:.2f})" if i != j else f"rgba(46,125,50,{share:.2f})"
            cells.append(f'<td style="background:{colour}">{int(matrix[i, j])}</td>')
        rows.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    return (
        f'<table class="confusion"><caption>{html.escape(caption)}</caption><tr><th>true \\ predicted</th>{head}</tr>'
        f"{''.join(rows)}</table>"
    )


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0 16px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
caption{text-align:left;font-weight:600;padding:4px 0}
.confusion td{text-align:right;min-width:28px}.note{color:#555;font-size:13px}
.warn{background:#fff3e0;padding:8px;border-left:4px solid #ef6c00}
.spots{display:flex;flex-wrap:wrap;gap:10px}.spot{border:1px solid #ddd;padding:4px;font-size:11px;width:262px}
.spot img{width:128px;height:128px;image-rendering:pixelated}.pair{display:flex;gap:4px}
"""


def spread_over_labels(labels: Sequence[str], num: int) -> list[int]:
    """Up to ``num`` indices taken in turn from each label (labels by frequency, spots in list order); sorted."""
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    queues = sorted(by_label.values(), key=lambda q: (-len(q), q[0]))
    picked: list[int] = []
    depth = 0
    while len(picked) < min(num, len(labels)):
        for queue in queues:
            if depth < len(queue) and len(picked) < num:
                picked.append(queue[depth])
        depth += 1
    return sorted(picked)


def _settings_text(settings: Mapping[str, Any], key: str) -> str:
    value = settings.get(key)
    return "n/a" if value is None else html.escape(str(value))


def _td(value: Any) -> str:
    return f"<td class='num'>{_fmt(value)}</td>"


def _header_section(settings: Mapping[str, Any]) -> list[str]:
    """The page head, the title and the line naming the model, dataset, spots and sampler."""

    def st(key: str) -> str:
        return _settings_text(settings, key)

    return [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Expression-to-tissue evaluation</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Expression-to-tissue evaluation</h1>",
        f"<p class='note'>{st('created')} &middot; model {st('model_path')} (iteration {st('iteration')}) &middot; "
        f"dataset {st('dataset_dir')} &middot; {st('num_spots')} {st('split')} spots &middot; "
        f"{st('num_inference_steps')} steps, guidance {st('guidance_scale')}, seed {st('seed')}</p>",
    ]


def _description(key: str) -> str:
    if key in _DESCRIPTIONS:
        return _DESCRIPTIONS[key]
    if key.startswith("fid_"):
        return f"FID in the features of the encoder {key[4:]}"
    if key.startswith("kid_mean_"):
        return f"KID in the features of the encoder {key[9:]}"
    if key.startswith("edit_") and key.endswith("_fraction"):
        return f"directionality of the edit {key[5:-9]}"
    if key.startswith("edit_") and key.endswith("_probe_mean"):
        return f"directionality of the edit {key[5:-11]}, averaged over the probes of edit_probe_seeds"
    return ""


def _summary_section(metrics: Mapping[str, Any]) -> list[str]:
    """The table of :func:`summary_numbers` with what each number means."""
    out = ["<h2>Summary</h2><table><tr><th>metric</th><th>value</th><th>meaning</th></tr>"]
    for key, value in summary_numbers(metrics).items():
        shown = _fmt(int(value)) if key.startswith("num_") else _fmt(value)
        out.append(
            f"<tr><td>{html.escape(key)}</td><td class='num'>{shown}</td><td>{html.escape(_description(key))}</td></tr>"
        )
    out.append("</table>")
    return out


def _realism_section(realism: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    """FID/KID overall and per group, one table per extractor (or why Inception was skipped)."""
    esc = html.escape
    out = ["<h2>Realism</h2>"]
    inception = realism.get("inception", {})
    if "skipped" in inception:
        out.append(f"<p class='warn'>{esc(str(inception['skipped']))}</p>")
    blocks = [("Inception", inception)] if "skipped" not in inception else []
    blocks += [(f"encoder {name}", res) for name, res in realism.get("encoders", {}).items()]
    for title, res in blocks:
        out.append(
            f"<table><caption>{esc(title)}: FID {_fmt(res.get('fid'))}, KID {_fmt(res.get('kid_mean'))} &plusmn; "
            f"{_fmt(res.get('kid_std'))} ({_fmt(res.get('n_real'))} real, {_fmt(res.get('n_fake'))} generated)"
            "</caption>"
            "<tr><th>group</th><th>FID</th><th>KID</th><th>n real</th><th>n generated</th></tr>"
        )
        for group, g in (res.get("per_group") or {}).items():
            g = g if isinstance(g, Mapping) else {}
            out.append(
                f"<tr><td>{esc(str(group))}</td>{_td(g.get('fid'))}{_td(g.get('kid_mean'))}{_td(g.get('n_real'))}"
                f"{_td(g.get('n_fake'))}</tr>"
            )
        out.append("</table>")
    out.append(f"<p class='note'>Groups: {esc(str(settings.get('labels', '')))}. See docs/evaluation_metrics.md.</p>")
    return out


def _fidelity_section(fidelity: Mapping[str, Any], probe: Mapping[str, Any]) -> list[str]:
    """The probe, the mean ceiling and fidelity r, and the per-gene bars."""
    esc = html.escape
    out = [
        "<h2>Biological fidelity: per-gene probe r</h2>",
        f"<p class='note'>Probe: {esc(str(probe.get('kind', '')))} trained on {esc(str(probe.get('train_spots', '')))} "
        "real training patches. Grey: Pearson r on real patches of the evaluated spots (ceiling); magenta: on generated "
        f"patches against the conditioning expression. Mean ceiling {_fmt(fidelity.get('ceiling_r_mean'))}, mean fidelity "
        f"{_fmt(fidelity.get('fidelity_r_mean'))} ({_fmt(fidelity.get('fidelity_fraction'))} of the ceiling); over the "
        f"{fidelity.get('num_readable_genes', 0)} genes with ceiling r &gt; {_fmt(fidelity.get('threshold'), 2)}: "
        f"{_fmt(fidelity.get('fidelity_fraction_readable'))} of the ceiling.</p>",
    ]
    out.extend(_top_genes_table(fidelity.get("top_genes") or {}))
    if fidelity.get("genes"):
        out.append(_gene_bars_svg(fidelity["genes"], fidelity["ceiling_r"], fidelity["fidelity_r"]))
    return out


def _top_genes_table(top: Mapping[str, Any]) -> list[str]:
    """Mean ceiling and fidelity r over the top-N genes by ceiling r and over the N most variable genes."""
    if not top:
        return []
    out = [
        f"<table><caption>Top {_fmt(top.get('num'))} genes</caption><tr><th>group</th><th>chosen by</th>"
        "<th>n</th><th>mean ceiling r</th><th>mean fidelity r</th><th>fidelity / ceiling</th></tr>"
    ]
    for key, name in (("top_ceiling", "top by ceiling r"), ("top_hvg", "most variable")):
        group = top.get(key) or {}
        out.append(
            f"<tr><td>{name}</td><td>{html.escape(str(group.get('chosen_by', '')))}</td>{_td(group.get('num_genes'))}"
            f"{_td(group.get('ceiling_r_mean'))}{_td(group.get('fidelity_r_mean'))}"
            f"{_td(group.get('fidelity_fraction'))}</tr>"
        )
    out.append("</table>")
    return out


def _files_section(outputs: Mapping[str, Any]) -> list[str]:
    """Links to the figure and the per-gene table written next to the report (relative links; nothing is loaded)."""
    items = []
    if outputs.get("real_vs_generated"):
        name = html.escape(Path(outputs["real_vs_generated"]).name)
        items.append(
            f"<li><a href='{name}'>{name}</a>: real | generated patches of {_fmt(outputs.get('real_vs_generated_rows'))} "
            "spots, a few per label, grouped by label</li>"
        )
    if outputs.get("per_gene"):
        name = html.escape(Path(outputs["per_gene"]).name)
        items.append(
            f"<li><a href='{name}'>{name}</a>: ceiling and fidelity r of every gene, highest ceiling first</li>"
        )
    return ["<h2>Files next to this report</h2><ul>", *items, "</ul>"] if items else []


def _compartments_section(compartments: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    """Real accuracy, generated agreement and chance, and the two confusion matrices (nothing without labels)."""
    if not compartments:
        return []
    esc = html.escape
    comp = compartments
    return [
        "<h2>Compartment agreement</h2>",
        f"<p class='note'>Labels: {esc(str(settings.get('labels', '')))}. Real accuracy (ceiling) "
        f"{_fmt(comp.get('real_accuracy'))}, generated agreement {_fmt(comp.get('generated_agreement'))}, chance "
        f"(always '{esc(str(comp.get('majority_label', '')))}') {_fmt(comp.get('chance'))}.</p>",
        _confusion_html(
            comp["classes"],
            comp["confusion_generated"],
            "generated patches: true label of the conditioning spot vs predicted",
        ),
        _confusion_html(comp["classes"], comp["confusion_real"], "real patches (ceiling)"),
    ]


def _scored(res: Mapping[str, Any]) -> str:
    """``n (of eligible)`` for an edit's record; ``n`` alone for records without ``eligible``."""
    n, eligible = res.get("n", 0), res.get("eligible")
    return f"{n} (of {eligible})" if eligible is not None else str(n)


def _spread_cell(spread: Mapping[str, Any] | None) -> str:
    """``mean (min-max)`` of an edit's rates under several probes, as a table cell."""
    if not spread or spread.get("mean") is None:
        return "<td class='num'>n/a</td>"
    return f"<td class='num'>{_fmt(spread['mean'], 2)} ({_fmt(spread['min'], 2)}-{_fmt(spread['max'], 2)})</td>"


def _readability_cell(res: Mapping[str, Any]) -> str:
    """``0.91`` or ``0.12 (not readable)``: the probe's r for the edit's genes on real patches."""
    if res.get("real_r") is None:
        return "<td class='num'>n/a</td>" if "real_r" in res else "<td></td>"
    flag = "" if res.get("readable") else " (not readable)"
    return f"<td class='num'>{_fmt(res['real_r'], 2)}{flag}</td>"


def _edits_section(edits: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    """One row per edit and the pooled row, and the edits dropped (nothing when no edit was scored)."""
    if not edits:
        return []
    esc = html.escape
    seeds = edits.get("probe_seeds")
    by_seed = f"<th>fraction under {len(seeds['seeds'])} probes: mean (range)</th>" if seeds else ""
    out = [
        "<h2>Edit directionality</h2>",
        "<table><tr><th>edit</th><th>genes in panel</th><th>spots scored (of those it acts on)</th>"
        f"<th>moved right way</th><th>fraction</th>{by_seed}"
        "<th>mean signed shift (sd)</th><th>sign-test p</th><th>probe reads the genes on real patches (r)</th></tr>",
    ]
    for name, res in edits.get("edits", {}).items():
        genes = res.get("genes", [])
        shown = ", ".join(genes[:6]) + (f" +{len(genes) - 6}" if len(genes) > 6 else "")
        spread = _spread_cell(seeds["edits"].get(name)) if seeds else ""
        out.append(
            f"<tr><td>{esc(name)}</td><td>{esc(shown)}</td><td class='num'>{_scored(res)}</td>"
            f"<td class='num'>{_fmt(res.get('moved'))}</td><td class='num'>{_fmt(res.get('fraction'))}</td>{spread}"
            f"{_td(res.get('mean_signed_shift'))}{_td(res.get('p_value'))}{_readability_cell(res)}</tr>"
        )
    spread = _spread_cell(seeds["overall"]) if seeds else ""
    out.append(
        f"<tr><th>all</th><td></td><td class='num'>{edits.get('overall_n', 0)}</td><td></td>"
        f"{_td(edits.get('overall_fraction'))}{spread}<td></td>{_td(edits.get('overall_p_value'))}<td></td></tr></table>"
    )
    unreadable = [name for name, res in edits.get("edits", {}).items() if res.get("readable") is False]
    if unreadable:
        out.append(
            f"<p class='note'>Not readable: {esc(', '.join(unreadable))}. On the real patches of these spots the "
            f"probe's reading of the edited genes follows their measured level with r below "
            f"{_fmt(settings.get('ceiling_threshold'), 2)}, so whether the tissue moved can hardly be read either: "
            "their rates say little about the model.</p>"
        )
    if seeds:
        out.append(
            f"<p class='note'>The same patches read by CNN probes trained with the seeds "
            f"{', '.join(str(s) for s in seeds['seeds'])} (the first is the probe of the other columns); the probe's "
            "seed moves a rate about as much as the choice of spots does.</p>"
        )
    if settings.get("edit_min_shift") is not None:
        out.append(
            f"<p class='note'>Each edit is scored on up to {settings.get('num_edit_spots')} spots where it moves the "
            f"spot's own edited genes by at least {settings['edit_min_shift']:g} (log1p units, on average).</p>"
        )
    dropped = settings.get("edits_dropped") or []
    if dropped:
        out.append(f"<p class='note'>Dropped (no gene of the set in the panel): {esc(', '.join(dropped))}.</p>")
    return out


def _patches_section(
    real_images: np.ndarray | None,
    generated_images: np.ndarray | None,
    spot_captions: Sequence[Mapping[str, Any]] | None,
    num_spots: int,
) -> list[str]:
    """Real and generated patches side by side for up to ``num_spots`` spots, taken in turn from each label."""
    if real_images is None or generated_images is None or not len(real_images):
        return []
    esc = html.escape
    labels = [str(c.get("label", "")) for c in spot_captions] if spot_captions is not None else [""] * len(real_images)
    shown = spread_over_labels(labels, num_spots)
    out = [
        f"<h2>Real (left) and generated (right) patches, {len(shown)} spots</h2>"
        "<p class='note'>Taken in turn from each label, in the order of the split's list.</p><div class='spots'>"
    ]
    for i in shown:
        cap = dict(spot_captions[i]) if spot_captions is not None else {}
        out.append(
            f"<div class='spot'><div class='pair'><img alt='real' src='{_png_data_uri(real_images[i])}'>"
            f"<img alt='generated' src='{_png_data_uri(generated_images[i])}'></div>"
            f"{esc(str(cap.get('sample', '')))} {esc(str(cap.get('barcode', '')))}<br>"
            f"label <b>{esc(str(cap.get('label', '')))}</b>; probe: real {esc(str(cap.get('real_label', 'n/a')))}, "
            f"generated {esc(str(cap.get('generated_label', 'n/a')))}</div>"
        )
    out.append("</div>")
    return out


def _settings_section(settings: Mapping[str, Any]) -> list[str]:
    """Every setting as JSON, and the end of the page."""
    out = ["<h2>Settings</h2><table>"]
    for key, value in settings.items():
        out.append(f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(json.dumps(value, default=str))}</td></tr>")
    out.append("</table></body></html>")
    return out


def write_report(
    path: str | os.PathLike,
    metrics: Mapping[str, Any],
    real_images: np.ndarray | None = None,
    generated_images: np.ndarray | None = None,
    spot_captions: Sequence[Mapping[str, Any]] | None = None,
    num_spots: int = 24,
) -> Path:
    """Write the self-contained HTML report (inline CSS, SVG and base64 PNGs; no external resource), atomically.

    It ends with plain links to the files of ``metrics["outputs"]`` written next to it (``real_vs_generated.png``,
    ``per_gene.csv``); the page loads neither.

    Args:
        path: destination, e.g. ``outputs/eval/report.html``.
        metrics: the dictionary written to ``metrics.json``.
        real_images: ``(N, 3, H, W)`` uint8 real patches of the evaluated spots.
        generated_images: the generated patches of the same spots.
        spot_captions: per spot ``{"barcode", "sample", "label", "real_label", "generated_label"}``.
        num_spots: spots shown side by side.
    """
    settings = metrics.get("settings", {})
    out = [
        *_header_section(settings),
        *_summary_section(metrics),
        *_realism_section(metrics.get("realism", {}), settings),
        *_fidelity_section(metrics.get("fidelity", {}), metrics.get("probe", {})),
        *_compartments_section(metrics.get("compartments", {}), settings),
        *_edits_section(metrics.get("edits", {}), settings),
        *_patches_section(real_images, generated_images, spot_captions, num_spots),
        *_files_section(metrics.get("outputs", {})),
        *_settings_section(settings),
    ]
    path = Path(path)
    with atomic_path(path, suffix=".html") as tmp:
        tmp.write_text("\n".join(out), encoding="utf-8")
    return path
