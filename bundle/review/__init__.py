"""Blinded pathologist review of synthetic H&E patches: export a review kit, score the reviewers' answers.

``export_review_kit`` mixes ``num`` real and ``num`` generated patches, re-encodes them as plain PNGs under random
names in ``<kit>/images/`` and writes ``<kit>/index.html``, a self-contained page (no server, no network) on which a
reviewer calls every patch "Real" or "Synthetic" with a confidence and optional tissue-feature scores, then saves the
answers as ``answers_<reviewer>.json``. Which patch is which is written only to the key file, kept outside the kit.

``score_answers`` reads the key and any number of answers files and reports, per reviewer, accuracy, sensitivity
(synthetic patches called synthetic), specificity (real patches called real), a one-sided exact binomial test against
guessing, mean confidence when right and when wrong and mean tissue-feature scores for real and synthetic patches;
between reviewers, Cohen's kappa for every pair and Fleiss' kappa for all of them. See docs/review_kit.md.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import random
import secrets
import shutil
import tempfile
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundle.utils import atomic_path, read_json, replace_dir, write_json_atomic

__all__ = [
    "IMAGE_SUFFIXES",
    "DEFAULT_FEATURES",
    "list_images",
    "export_review_kit",
    "render_review_page",
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

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
KEY_FORMAT = "review-kit-key/1"
ANSWERS_FORMAT = "review-kit-answers/1"
LABELS = ("real", "generated")  # labels in the key
CALLS = ("real", "synthetic")  # what a reviewer answers; "synthetic" is the right call for a "generated" patch
CONFIDENCE_LEVELS = 5
FEATURE_LEVELS = 5
DEFAULT_FEATURES: tuple[tuple[str, str], ...] = (
    ("nuclear_detail", "Nuclear detail"),
    ("architecture", "Gland / architecture"),
    ("stain_realism", "Stain realism"),
)
_FIXED_MTIME = 946684800  # 2000-01-01: every kit image gets the same timestamp, so write order tells nothing


# --------------------------------------------------------------------------------------------------------- export


def list_images(folder: str | os.PathLike, what: str = "image") -> list[Path]:
    """The ``.png`` / ``.jpg`` / ``.jpeg`` files directly inside ``folder``, sorted by name.

    Args:
        folder: folder to list (not recursive).
        what: what the folder holds, for the error messages (``"real"``, ``"generated"``).

    Returns:
        The image paths.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: it holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"The {what} image folder {str(folder)!r} does not exist or is not a folder.")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(
            f"The {what} image folder {str(folder)!r} holds no image ({'/'.join(IMAGE_SUFFIXES)}); "
            "point it at the folder with the patches."
        )
    return images


def _is_within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _clean_png(src: Path, dst: Path, size: int | None) -> tuple[int, int]:
    """Re-encode ``src`` as a plain 8-bit RGB PNG at ``dst``: pixels only, no text chunks, EXIF or colour profile.

    Returns:
        The written image's ``(width, height)``.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(src) as im:
            im = ImageOps.exif_transpose(im)  # show it the way an image viewer would, then drop the EXIF
            im = im.convert("RGBA") if im.mode in ("P", "LA", "PA") else im
            if im.mode == "RGBA":  # composite transparency on white instead of silently dropping it
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(src)!r} cannot be read as an image ({e}); remove or replace it.") from e
    clean = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")  # a fresh image carries no metadata at all
    if size is not None and clean.size != (size, size):
        clean = clean.resize((size, size), Image.Resampling.LANCZOS)
    clean.save(dst, format="PNG", compress_level=6)
    os.utime(dst, (_FIXED_MTIME, _FIXED_MTIME))
    return clean.size


def _random_names(count: int, prefix: str = "img_", nbytes: int = 6) -> list[str]:
    """``count`` distinct random PNG names such as ``img_7f3a1c09b2de.png`` (from the OS's secure generator)."""
    names: set[str] = set()
    while len(names) < count:
        names.add(f"{prefix}{secrets.token_hex(nbytes)}.png")
    return list(names)


def export_review_kit(
    real_dir: str | os.PathLike,
    generated_dir: str | os.PathLike,
    num: int,
    output_dir: str | os.PathLike,
    key_path: str | os.PathLike,
    seed: int | None = None,
    overwrite: bool = False,
    size: int | None = None,
    features: Sequence[tuple[str, str]] = DEFAULT_FEATURES,
    title: str = "Blinded H&E patch review",
) -> dict[str, Any]:
    """Write a blinded review kit (``images/`` + ``index.html``) and, separately, its key.

    ``num`` real and ``num`` generated images are drawn (a random subset when a folder holds more), shuffled together,
    re-encoded as plain PNGs (pixels only: no original name, EXIF, text chunk or colour profile; one timestamp for all)
    and saved under random names. The kit is assembled in a hidden sibling folder and renamed into place at the end,
    and the key is only written once the kit is complete, so a failure leaves neither half-written.

    Args:
        real_dir: folder of real patches (``.png`` / ``.jpg``).
        generated_dir: folder of generated patches.
        num: patches per class; the kit holds ``2 * num``.
        output_dir: the kit folder to write; this is what reviewers receive.
        key_path: JSON file for the key (random name -> ``real`` / ``generated`` + original path). Must lie outside
            ``output_dir``: never send it to reviewers.
        seed: seed of the subset and order; ``None`` draws one. The image names and the kit id are always fresh
            random values, so two kits never share an id even with the same seed.
        overwrite: replace an existing non-empty kit folder and an existing key file.
        size: resize every patch to ``size`` x ``size`` pixels (so image dimensions cannot tell the classes apart);
            ``None`` keeps the sizes.
        features: ``(key, label)`` pairs of the optional tissue-feature scores the page asks for.
        title: heading of the page.

    Returns:
        A summary: ``kit_id``, ``kit_dir``, ``key_path``, ``num_images``, ``seed`` and ``warnings`` (e.g. real and
        generated patches of different sizes).

    Raises:
        ValueError: ``num`` < 1, a folder with fewer than ``num`` images, the key inside the kit folder, a source
            folder inside the kit folder, or an unreadable image.
        FileNotFoundError: a source folder that does not exist.
        FileExistsError: an existing non-empty kit folder or an existing key without ``overwrite``.
    """
    output_dir, key_path = Path(output_dir), Path(key_path)
    real_dir, generated_dir = Path(real_dir), Path(generated_dir)
    if int(num) != num or num < 1:
        raise ValueError(f"num must be a positive whole number of patches per class, got {num!r}.")
    num = int(num)
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size!r}.")
    if _is_within(key_path, output_dir):
        raise ValueError(
            f"The key {str(key_path)!r} would be inside the kit folder {str(output_dir)!r}, which is sent to the "
            "reviewers; write the key outside it (e.g. next to the kit folder)."
        )
    if key_path.is_dir():
        raise ValueError(f"The key path {str(key_path)!r} is a folder; give a file name such as review_key.json.")
    for what, folder in (("real", real_dir), ("generated", generated_dir)):
        if _is_within(folder, output_dir):
            raise ValueError(
                f"The {what} image folder {str(folder)!r} is inside the kit folder {str(output_dir)!r}; "
                "choose a kit folder outside the source images."
            )
    pools = {"real": list_images(real_dir, "real"), "generated": list_images(generated_dir, "generated")}
    for label, folder in (("real", real_dir), ("generated", generated_dir)):
        if len(pools[label]) < num:
            raise ValueError(
                f"The {label} image folder {str(folder)!r} holds {len(pools[label])} images, fewer than --num {num}; "
                f"lower --num or add images."
            )
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"The kit path {str(output_dir)!r} exists and is not a folder; choose another path.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"The kit folder {str(output_dir)!r} exists and is not empty; pass --overwrite (overwrite=True) to "
            "replace it, or choose another folder."
        )
    if key_path.exists() and not overwrite:
        raise FileExistsError(
            f"The key file {str(key_path)!r} exists (its kit can only be scored with it); pass --overwrite "
            "(overwrite=True) to replace it, or choose another path."
        )

    if seed is None:
        seed = secrets.randbelow(2**31)
    rng = random.Random(seed)
    items = [(path, label) for label in LABELS for path in rng.sample(pools[label], num)]
    rng.shuffle(items)
    names = _random_names(len(items))
    kit_id = secrets.token_hex(8)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        (staging / "images").mkdir()
        sizes: dict[str, set[tuple[int, int]]] = {label: set() for label in LABELS}
        for name, (path, label) in zip(names, items):
            sizes[label].add(_clean_png(path, staging / "images" / name, size))
        (staging / "index.html").write_text(
            render_review_page(kit_id, names, features=features, title=title), encoding="utf-8"
        )
        key = {
            "format": KEY_FORMAT,
            "kit_id": kit_id,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seed": seed,
            "num_per_class": num,
            "real_dir": str(real_dir.resolve()),
            "generated_dir": str(generated_dir.resolve()),
            "kit_dir": str(output_dir.resolve()),
            "features": [key for key, _ in features],
            "images": {
                name: {"label": label, "source": str(path.resolve())} for name, (path, label) in zip(names, items)
            },
        }
        with atomic_path(key_path) as tmp_key:  # the key appears only once the kit is in place
            tmp_key.write_text(json.dumps(key, indent=2) + "\n", encoding="utf-8")
            replace_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    warnings: list[str] = []
    if sizes["real"] != sizes["generated"]:
        warnings.append(
            f"real patches have sizes {sorted(sizes['real'])} and generated ones {sorted(sizes['generated'])} (w, h); "
            "reviewers can tell them apart by size: export again with --size."
        )
    return {
        "kit_id": kit_id,
        "kit_dir": str(output_dir),
        "key_path": str(key_path),
        "num_images": len(items),
        "seed": seed,
        "warnings": warnings,
    }


def render_review_page(
    kit_id: str,
    images: Sequence[str],
    features: Sequence[tuple[str, str]] = DEFAULT_FEATURES,
    title: str = "Blinded H&E patch review",
) -> str:
    """The kit's self-contained ``index.html``: inline CSS and JavaScript, images referenced as ``images/<name>``.

    The only kit data in the page is a JSON block (``<script id="kit-data">``) with the kit id, the image names in
    display order, the scales and the feature list: nothing about which image is which.

    Args:
        kit_id: the kit's random id, echoed in every answers file.
        images: image file names in display order.
        features: ``(key, label)`` pairs of the optional tissue-feature scores.
        title: heading of the page.

    Returns:
        The HTML text.
    """
    data = {
        "kit_id": kit_id,
        "title": title,
        "images": list(images),
        "confidence_levels": CONFIDENCE_LEVELS,
        "feature_levels": FEATURE_LEVELS,
        "features": [{"key": key, "label": label} for key, label in features],
        "answers_format": ANSWERS_FORMAT,
    }
    data_json = json.dumps(data, indent=1).replace("<", "\\u003c")  # no "</script>" can end the block early
    title_html = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _PAGE.replace("__TITLE__", title_html).replace("__KIT_DATA__", data_json)


_PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  :root { --accent: #6a1b9a; --accent-light: #f3e5f5; --border: #c9c3d1; --muted: #666; }
  * { box-sizing: border-box; }
  body { margin: 0; font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
         color: #222; background: #faf9fb; }
  header { display: flex; align-items: baseline; gap: 1em; padding: 0.6em 1.2em; background: #fff;
           border-bottom: 1px solid var(--border); }
  header h1 { font-size: 1.25em; margin: 0; }
  header .meta { color: var(--muted); font-size: 0.85em; margin-left: auto; }
  main { padding: 1em 1.2em; }
  section[hidden] { display: none; }
  .card { background: #fff; border: 1px solid var(--border); border-radius: 8px; padding: 1em 1.2em; }
  #start-screen { max-width: 40em; }
  #start-screen input { font-size: 1.1em; padding: 0.35em 0.5em; width: 16em; }
  .layout { display: flex; gap: 1.5em; align-items: flex-start; flex-wrap: wrap; }
  .viewer { flex: 0 1 auto; background: #fff; border: 1px solid var(--border); border-radius: 8px; padding: 8px; }
  #patch { display: block; width: min(72vh, 62vw, 768px); height: auto; min-width: 256px;
           image-rendering: auto; background: #eee; }
  .panel { flex: 1 1 22em; max-width: 34em; }
  .progress-line { display: flex; justify-content: space-between; font-size: 1.05em; margin-bottom: 0.4em; }
  #progress { font-weight: 600; }
  .bar { height: 6px; background: #e5e1ea; border-radius: 3px; overflow: hidden; margin-bottom: 1em; }
  .bar div { height: 100%; background: var(--accent); width: 0; }
  h2 { font-size: 1.05em; margin: 1em 0 0.4em; }
  h3 { font-size: 0.95em; margin: 0.9em 0 0.3em; }
  .hint { color: var(--muted); font-size: 0.85em; font-weight: normal; }
  button { font: inherit; cursor: pointer; border: 1px solid var(--border); background: #fff; border-radius: 6px;
           padding: 0.35em 0.8em; }
  button:hover:not(:disabled) { border-color: var(--accent); }
  button:disabled { opacity: 0.45; cursor: default; }
  button.selected { background: var(--accent); border-color: var(--accent); color: #fff; }
  .call button { font-size: 1.15em; padding: 0.55em 1.4em; min-width: 7.5em; }
  .scale button { min-width: 2.6em; }
  .scale button.skip { min-width: 3.4em; color: var(--muted); }
  .scale button.skip.selected { background: #888; border-color: #888; color: #fff; }
  .feature { display: flex; align-items: center; gap: 0.4em; margin: 0.3em 0; }
  .feature .name { flex: 0 0 10.5em; font-size: 0.92em; }
  .feature .scale button { min-width: 2.2em; padding: 0.25em 0.5em; }
  .feature .scale button.skip { min-width: 3em; }
  kbd { font-size: 0.75em; border: 1px solid currentColor; border-radius: 3px; padding: 0 0.25em; opacity: 0.7; }
  .nav { display: flex; gap: 0.5em; margin-top: 1.2em; }
  .nav button { flex: 1; }
  #save { margin-top: 0.8em; width: 100%; padding: 0.6em; font-weight: 600; border-color: var(--accent);
          background: var(--accent-light); }
  #status { min-height: 1.4em; font-size: 0.9em; color: #2e7d32; }
  #status.warn { color: #b26a00; }
  .linkish { border: none; background: none; color: var(--accent); padding: 0; text-decoration: underline; }
  .keys { color: var(--muted); font-size: 0.8em; margin-top: 1em; }
</style>
</head>
<body>
<header>
  <h1 id="title">__TITLE__</h1>
  <span class="meta">kit <span id="kit-id"></span> &middot; <span id="reviewer-label">no reviewer</span></span>
</header>
<main>
<section id="start-screen" class="card">
  <p>You will see <strong id="count-total"></strong> H&amp;E patches, one at a time. The set mixes real patches and
     synthetic ones. For each patch, decide whether it is <strong>real</strong> or
     <strong>synthetic</strong> and how confident you are (1 = guessing, 5 = certain). The tissue-feature scores
     are optional (1 = unrealistic, 5 = fully realistic).</p>
  <p>Your answers are kept in this browser as you go, so you can close the page and come back. When you are done,
     click <em>Save answers</em> and send the downloaded <code>answers_&lt;name&gt;.json</code> file back.</p>
  <p><label>Reviewer name: <input id="reviewer" type="text" autocomplete="name" maxlength="60"></label>
     <button id="start">Start review</button></p>
  <p id="start-error" class="hint"></p>
</section>
<section id="review-screen" hidden>
  <div class="layout">
    <div class="viewer"><img id="patch" alt="patch to review"></div>
    <div class="panel card">
      <div class="progress-line"><span id="progress"></span><span id="answered" class="hint"></span></div>
      <div class="bar"><div id="bar"></div></div>
      <h2>Is this patch real or synthetic?</h2>
      <div class="call">
        <button id="btn-real" data-call="real">Real <kbd>R</kbd></button>
        <button id="btn-synthetic" data-call="synthetic">Synthetic <kbd>S</kbd></button>
      </div>
      <h3>Confidence <span class="hint">(1 = guessing, 5 = certain)</span></h3>
      <div class="scale" id="confidence"></div>
      <h3>Tissue features <span class="hint">(optional; 1 = unrealistic, 5 = fully realistic)</span></h3>
      <div id="features"></div>
      <div class="nav">
        <button id="prev">&larr; Previous</button>
        <button id="next">Next &rarr;</button>
      </div>
      <button id="save">Save answers</button>
      <div id="status"></div>
      <div class="keys">Keys: <kbd>R</kbd> real, <kbd>S</kbd> synthetic, <kbd>1</kbd>&ndash;<kbd>5</kbd> confidence,
        <kbd>&larr;</kbd> / <kbd>&rarr;</kbd> previous / next.
        <button id="switch" class="linkish">Change reviewer</button></div>
    </div>
  </div>
</section>
</main>
<script id="kit-data" type="application/json">
__KIT_DATA__
</script>
<script>
(function () {
  "use strict";
  const KIT = JSON.parse(document.getElementById("kit-data").textContent);
  const N = KIT.images.length;
  const PREFIX = "review-kit:" + KIT.kit_id + ":";
  const $ = (id) => document.getElementById(id);
  let reviewer = "";
  let index = 0;
  let answers = {};
  let memoryStore = {};  // used when localStorage is unavailable

  function storeGet(key) {
    try { return window.localStorage.getItem(PREFIX + key); } catch (e) { return memoryStore[key] || null; }
  }
  function storeSet(key, value) {
    try { window.localStorage.setItem(PREFIX + key, value); } catch (e) { memoryStore[key] = value; }
  }
  function persist() {
    storeSet("reviewer:" + reviewer, JSON.stringify({index: index, answers: answers}));
    storeSet("last-reviewer", reviewer);
  }
  function restore(name) {
    answers = {};
    index = 0;
    const raw = storeGet("reviewer:" + name);
    if (!raw) return;
    try {
      const saved = JSON.parse(raw);
      answers = saved.answers || {};
      index = Math.min(Math.max(parseInt(saved.index, 10) || 0, 0), N - 1);
    } catch (e) { answers = {}; index = 0; }
  }
  function current() {
    const name = KIT.images[index];
    if (!answers[name]) answers[name] = {call: null, confidence: null, features: {}};
    return answers[name];
  }
  function isAnswered(name) { return !!(answers[name] && answers[name].call); }
  function numAnswered() { return KIT.images.filter(isAnswered).length; }

  function scaleButtons(container, levels, withSkip, onPick) {
    const buttons = [];
    for (let v = 1; v <= levels; v++) {
      const b = document.createElement("button");
      b.textContent = String(v);
      b.dataset.value = String(v);
      b.addEventListener("click", () => onPick(v));
      container.appendChild(b);
      buttons.push(b);
    }
    if (withSkip) {
      const b = document.createElement("button");
      b.textContent = "skip";
      b.className = "skip";
      b.dataset.value = "skip";
      b.addEventListener("click", () => onPick(null));
      container.appendChild(b);
      buttons.push(b);
    }
    return buttons;
  }
  function mark(buttons, value) {
    for (const b of buttons) {
      const on = b.dataset.value === (value === null || value === undefined ? "skip" : String(value));
      b.classList.toggle("selected", on);
      b.setAttribute("aria-pressed", on ? "true" : "false");
    }
  }

  const confidenceButtons = scaleButtons($("confidence"), KIT.confidence_levels, false, (v) => {
    current().confidence = v; persist(); render();
  });
  const featureButtons = {};
  for (const f of KIT.features) {
    const row = document.createElement("div");
    row.className = "feature";
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = f.label;
    row.appendChild(label);
    const holder = document.createElement("span");
    holder.className = "scale";
    holder.id = "feature-" + f.key;
    row.appendChild(holder);
    $("features").appendChild(row);
    featureButtons[f.key] = scaleButtons(holder, KIT.feature_levels, true, (v) => {
      current().features[f.key] = v; persist(); render();
    });
  }

  function setCall(call) { current().call = call; persist(); render(); }
  function go(delta) {
    const target = index + delta;
    if (target < 0 || target >= N) return;
    index = target; persist(); render();
  }
  function status(text, warn) { $("status").textContent = text; $("status").className = warn ? "warn" : ""; }

  function render() {
    const name = KIT.images[index];
    const a = current();
    const img = $("patch");
    if (img.dataset.image !== name) {
      img.src = "images/" + name;
      img.dataset.image = name;
      if (index + 1 < N) { const pre = new Image(); pre.src = "images/" + KIT.images[index + 1]; }
    }
    $("progress").textContent = (index + 1) + " / " + N;
    const done = numAnswered();
    $("answered").textContent = done + " of " + N + " answered";
    $("bar").style.width = (100 * done / N) + "%";
    $("btn-real").classList.toggle("selected", a.call === "real");
    $("btn-synthetic").classList.toggle("selected", a.call === "synthetic");
    $("btn-real").setAttribute("aria-pressed", a.call === "real" ? "true" : "false");
    $("btn-synthetic").setAttribute("aria-pressed", a.call === "synthetic" ? "true" : "false");
    mark(confidenceButtons, a.confidence);
    for (const f of KIT.features) mark(featureButtons[f.key], a.features[f.key]);
    $("prev").disabled = index === 0;
    $("next").disabled = index === N - 1;
    $("reviewer-label").textContent = "reviewer: " + reviewer;
  }

  function start() {
    const name = $("reviewer").value.trim();
    if (!name) { $("start-error").textContent = "Please enter your name first."; $("reviewer").focus(); return; }
    reviewer = name;
    restore(reviewer);
    persist();
    $("start-screen").hidden = true;
    $("review-screen").hidden = false;
    status("", false);
    render();
  }

  function fileSafe(text) { return text.replace(/[^A-Za-z0-9_-]+/g, "_").replace(/^_+|_+$/g, "") || "reviewer"; }

  function save() {
    const list = KIT.images.map((name) => {
      const a = answers[name] || {};
      const feats = {};
      for (const f of KIT.features) feats[f.key] = (a.features && a.features[f.key]) || null;
      return {image: name, call: a.call || null, confidence: a.confidence || null, features: feats};
    });
    const payload = {
      format: KIT.answers_format,
      kit_id: KIT.kit_id,
      reviewer: reviewer,
      saved_at: new Date().toISOString(),
      num_images: N,
      num_answered: numAnswered(),
      answers: list,
    };
    const blob = new Blob([JSON.stringify(payload, null, 2)], {type: "application/json"});
    const url = URL.createObjectURL(blob);
    const link = document.createElement("a");
    link.href = url;
    link.download = "answers_" + fileSafe(reviewer) + ".json";
    document.body.appendChild(link);
    link.click();
    setTimeout(() => { URL.revokeObjectURL(url); link.remove(); }, 2000);
    const left = N - payload.num_answered;
    status(left ? "Saved " + link.download + " (" + left + " patches still unanswered)." :
                  "Saved " + link.download + ": all " + N + " patches answered. Thank you!", left > 0);
  }

  $("kit-id").textContent = KIT.kit_id;
  $("count-total").textContent = String(N);
  document.title = KIT.title + " (" + N + " patches)";
  $("reviewer").value = storeGet("last-reviewer") || "";
  $("start").addEventListener("click", start);
  $("reviewer").addEventListener("keydown", (e) => { if (e.key === "Enter") start(); });
  $("btn-real").addEventListener("click", () => setCall("real"));
  $("btn-synthetic").addEventListener("click", () => setCall("synthetic"));
  $("prev").addEventListener("click", () => go(-1));
  $("next").addEventListener("click", () => go(1));
  $("save").addEventListener("click", save);
  $("switch").addEventListener("click", () => {
    $("review-screen").hidden = true; $("start-screen").hidden = false; $("reviewer").select();
  });
  document.addEventListener("keydown", (e) => {
    if ($("review-screen").hidden || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.target && (e.target.tagName === "INPUT" || e.target.tagName === "TEXTAREA")) return;
    const k = e.key.toLowerCase();
    if (k === "r") setCall("real");
    else if (k === "s") setCall("synthetic");
    else if (/^[1-9]$/.test(k) && +k <= KIT.confidence_levels) { current().confidence = +k; persist(); render(); }
    else if (e.key === "ArrowRight") go(1);
    else if (e.key === "ArrowLeft") go(-1);
    else return;
    e.preventDefault();
  });
})();
</script>
</body>
</html>
"""


# ---------------------------------------------------------------------------------------------------------- score


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
    names: dict[str, str] = {}
    for r in reviewers:
        if r["reviewer"] in names:
            raise ValueError(
                f"Reviewer {r['reviewer']!r} appears in both {names[r['reviewer']]!r} and {r['file']!r}; "
                "pass each reviewer's answers once (rename the reviewer in one file if they are two people)."
            )
        names[r["reviewer"]] = r["file"]
    features = list(key.get("features") or [])
    for r in reviewers:  # features the key does not list, kept in order of appearance
        for a in r["answers"].values():
            features += [f for f in a["features"] if f not in features]

    report_reviewers = []
    for r in reviewers:
        stats = _reviewer_stats(r["answers"], key, features)
        report_reviewers.append({"reviewer": r["reviewer"], "file": r["file"], "saved_at": r["saved_at"], **stats})

    pooled_entries = [(key["images"][name]["label"], a) for r in reviewers for name, a in r["answers"].items()]
    pooled_n = len(pooled_entries)
    pooled_k = sum((a["call"] == "synthetic") == (label == "generated") for label, a in pooled_entries)
    pooled = {
        "num_answers": pooled_n,
        "accuracy": _ratio(pooled_k, pooled_n),
        "features": _feature_means(pooled_entries, features),
    }

    agreement: dict[str, Any] = {"cohen_kappa": [], "fleiss_kappa": None}
    if len(reviewers) >= 2:
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

    return {
        "kit_id": key["kit_id"],
        "key": str(key_path),
        "num_images": len(key["images"]),
        "features": features,
        "reviewers": report_reviewers,
        "pooled": pooled,
        "agreement": agreement,
    }


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
