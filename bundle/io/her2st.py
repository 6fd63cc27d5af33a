"""Get the her2st sections (HER2+ breast cancer, legacy Spatial Transcriptomics) and write a manifest for them.

The her2st study (Andersson et al., Nat Commun 12, 6012 (2021), doi:10.1038/s41467-021-26271-2) published raw UMI
counts, spot selections and full-resolution H&E images of its sections in the GitHub repository ``almaan/her2st``.
:func:`get_her2st` puts five of them (patient C: ``C2``..``C5``, four serial sections; patient B: ``B4``) in one folder,
one subfolder per section with its three files unchanged:

- ``<id>.tsv.gz``: raw counts, spots x genes, rows named ``"{x}x{y}"`` from the array coordinates;
- ``<id>_selection.tsv``: array ``x``, ``y``, adjusted ``new_x``, ``new_y``, spot centres ``pixel_x`` (column) and
  ``pixel_y`` (row) in full-resolution image pixels, ``selected == 1`` for spots under tissue;
- the section's JPEG (its published name, e.g. ``5714_HE_BT_C2.jpg``).

The files come from a local copy (``local=``: the per-section layout above, or a checkout of the repository) or are
downloaded from the repository at the pinned commit :data:`COMMIT` (plain git objects there, not Git LFS: the raw file
URLs serve the bytes themselves). Every file must match the sha256 recorded in :data:`SECTIONS`, and its content is
checked (gzip stream, selection columns, JPEG header) before it takes its final name. Then ``manifest.csv``
(``sample_id,st_path,slide_path,split,patient,technology``, paths relative to it) and ``LICENSE_NOTICE.md`` are
written. A failed call leaves nothing it wrote behind.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import http.client
import os
import secrets
import shutil
import time
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bundle.utils import atomic_path, check_writable, no_space_errors

REPOSITORY = "almaan/her2st"
COMMIT = "85df7411b987a7dec3feff9718b869a7a82091ec"
BASE_URL = f"https://raw.githubusercontent.com/{REPOSITORY}/{COMMIT}"
USER_AGENT = "st-he-ldm-get-her2st/1 (python-urllib)"
LICENCE = "CC BY 4.0"
CITATION = (
    "Andersson, A., Larsson, L., Stenbeck, L. et al. Spatial deconvolution of HER2-positive breast cancer delineates "
    "tumor-associated cell type interactions. Nat Commun 12, 6012 (2021). https://doi.org/10.1038/s41467-021-26271-2"
)
SELECTION_COLUMNS = ("x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected")
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("sample_id", "st_path", "slide_path", "split", "patient", "technology")
NOTICE_NAME = "LICENSE_NOTICE.md"
CHUNK = 1 << 20


def _section(sid: str, patient: str, image: str, counts_sha: str, selection_sha: str, image_sha: str) -> dict:
    """One :data:`SECTIONS` entry: the section's three files by local name, with repository path, kind and sha256."""
    return {
        "patient": patient,
        "image": image,
        "files": {
            f"{sid}.tsv.gz": {"kind": "counts", "path": f"data/ST-cnts/{sid}.tsv.gz", "sha256": counts_sha},
            f"{sid}_selection.tsv": {
                "kind": "selection",
                "path": f"data/ST-spotfiles/{sid}_selection.tsv",
                "sha256": selection_sha,
            },
            image: {"kind": "image", "path": f"data/ST-imgs/{patient}/{sid}/{image}", "sha256": image_sha},
        },
    }


#: Section id -> ``patient`` (letter), ``image`` (JPEG name) and ``files``: local file name -> ``kind``
#: (counts/selection/image), ``path`` in the repository and ``sha256`` of the file at :data:`COMMIT`.
SECTIONS: dict[str, dict] = {
    "C2": _section(
        "C2",
        "C",
        "5714_HE_BT_C2.jpg",
        "c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d",
        "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c",
        "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e",
    ),
    "C3": _section(
        "C3",
        "C",
        "5714_HE_BT_D1.jpg",
        "e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a",
        "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755",
        "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568",
    ),
    "C4": _section(
        "C4",
        "C",
        "5714_HE_BT_D2.jpg",
        "33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da",
        "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c",
        "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2",
    ),
    "C5": _section(
        "C5",
        "C",
        "5714_HE_BT_E1.jpg",
        "c0f310315ca6110d74dbdf7011e5b42432ba0b8eb5f001824764911988f39338",
        "2114cc3b4da759772112897f1e247d5443c9f8c808e6a9a952eb4fda379a194c",
        "34028ea41e376396b50c42b0a11a7e689c85be4a8022e668d0a09cc128c04c65",
    ),
    "B4": _section(
        "B4",
        "B",
        "BT10737_D2_HE.jpg",
        "e38231c2a38c9bc7e6d550eec0e527c1869ee0e525fc913e708d1323c34f5ebb",
        "192b46f3ca414c85753a01a4fb5760a697ca6c0a1aadb949c4687cc6efa9faa0",
        "3cb165614ce2a13426381e450220dccac980cc9bda6a90fb041c28ca0e2c753d",
    ),
}
#: Default split of the five sections (patient C's last serial section validates).
DEFAULT_SPLITS = {"C2": "train", "C3": "train", "C4": "train", "B4": "train", "C5": "val"}


class ChecksumError(ValueError):
    """A file's sha256 differs from the one recorded for it in :data:`SECTIONS`."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sections(sections: Iterable[str] | None) -> list[str]:
    """The section ids to get (all of :data:`SECTIONS` when None), without duplicates, in the given order.

    Raises:
        ValueError: an unknown id (the message lists the known ones), or an empty selection.
    """
    ids = list(SECTIONS) if sections is None else list(dict.fromkeys(str(s) for s in sections))
    unknown = [s for s in ids if s not in SECTIONS]
    if unknown:
        raise ValueError(f"Unknown her2st section(s) {unknown}; the known sections are {list(SECTIONS)}.")
    if not ids:
        raise ValueError(f"No her2st section selected; choose among {list(SECTIONS)}.")
    return ids


def make_splits(sections: Iterable[str], val: Iterable[str] = (), test: Iterable[str] = ()) -> dict[str, str]:
    """Splits of ``sections``: those in ``val`` and ``test`` go there, the rest to train.

    Raises:
        ValueError: a val/test id that is not among ``sections``, or one given for both.
    """
    ids = check_sections(sections)
    val, test = check_sections(val) if val else [], check_sections(test) if test else []
    both = sorted(set(val) & set(test))
    if both:
        raise ValueError(f"Section(s) {both} are given for both val and test; give each section one split.")
    outside = [s for s in val + test if s not in ids]
    if outside:
        raise ValueError(f"Section(s) {outside} get a split but are not among the selected sections {ids}.")
    return {s: "val" if s in val else "test" if s in test else "train" for s in ids}


def _resolve_splits(ids: list[str], splits: Mapping[str, str] | None) -> dict[str, str]:
    """The split of every section in ``ids`` (``splits``, default :data:`DEFAULT_SPLITS`; missing ids: train)."""
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    unknown = [s for s in splits if s not in SECTIONS]
    if unknown:
        raise ValueError(f"splits names unknown section(s) {unknown}; the known sections are {list(SECTIONS)}.")
    bad = {s: v for s, v in splits.items() if v not in SPLITS}
    if bad:
        raise ValueError(f"splits {bad}: each split must be one of {list(SPLITS)}.")
    return {s: splits.get(s, "train") for s in ids}


def _local_sources(local: Path, ids: list[str]) -> dict[tuple[str, str], Path]:
    """(section, file name) -> the file in ``local``: ``<local>/<id>/<name>`` or ``<local>/<repository path>``.

    Raises:
        FileNotFoundError: ``local`` is no folder, or it lacks a section's file (the message lists what was expected).
    """
    if not local.is_dir():
        raise FileNotFoundError(f"The local her2st copy {str(local)!r} is not a folder.")
    sources, missing = {}, {}
    for sid in ids:
        for name, info in SECTIONS[sid]["files"].items():
            candidates = (local / sid / name, local / info["path"])
            found = next((p for p in candidates if p.is_file()), None)
            if found is None:
                missing.setdefault(sid, []).append(f"{sid}/{name} or {info['path']}")
            else:
                sources[(sid, name)] = found
    if missing:
        lines = "; ".join(f"section {sid}: {', '.join(files)}" for sid, files in missing.items())
        raise FileNotFoundError(
            f"The local her2st copy {str(local)!r} lacks files of section(s) {list(missing)} (expected, relative to "
            f"it: {lines})."
        )
    return sources


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` as ``target`` (same file system and allowed), else copy it."""
    try:
        os.link(source, target)
    except OSError:
        with no_space_errors(target, f"a copy of {source.name!r}"):
            shutil.copyfile(source, target)


def _offline_hint() -> str:
    return (
        "Without network access, get the files another way and pass their folder with --local PATH "
        f"(get_her2st(local=...)): one subfolder per section (<id>/<files>) or a checkout of {REPOSITORY} at "
        f"commit {COMMIT}."
    )


def download(url: str, target: str | os.PathLike, timeout: float = 60.0, retries: int = 2) -> None:
    """Stream ``url`` into the file ``target`` with urllib, retrying network failures ``retries`` times.

    Raises:
        ConnectionError: the download failed (the message names the URL and how to work offline).
    """
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    reason, attempts = "", 0
    for attempt in range(max(0, int(retries)) + 1):
        attempts = attempt + 1
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response, open(target, "wb") as out:
                with no_space_errors(target, f"the download of {url}"):
                    shutil.copyfileobj(response, out, CHUNK)
            return
        except urllib.error.HTTPError as error:
            reason = f"HTTP {error.code} {error.reason}"
            if error.code < 500 and error.code != 429:
                break
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as error:
            reason = str(getattr(error, "reason", None) or error) or type(error).__name__
        if attempt < retries:
            time.sleep(2.0**attempt)
    raise ConnectionError(f"Could not download {url} ({reason}, {attempts} attempt(s)). {_offline_hint()}")


def _check_counts(path: Path, label: str) -> tuple[int, int]:
    """(spots, genes) of a counts table; the whole gzip stream is read, so truncation or corruption shows."""
    try:
        with gzip.open(path, "rt") as f:
            genes = len(f.readline().rstrip("\n").split("\t")) - 1
            spots = sum(1 for line in f if line.strip())
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as error:
        raise ValueError(f"{label}: the counts table is not a readable gzip file ({error}).") from error
    if genes < 1 or spots < 1:
        raise ValueError(f"{label}: the counts table has {spots} spot row(s) and {genes} gene column(s).")
    return spots, genes


def _check_selection(path: Path, label: str) -> int:
    """Number of selected spots of a selection table, after checking its columns."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            columns = reader.fieldnames or []
            selected = sum(1 for row in reader if (row.get("selected") or "").strip() == "1")
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{label}: the spot selection is not a readable tab-separated table ({error}).") from error
    missing = [c for c in SELECTION_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"{label}: the spot selection lacks the column(s) {missing}; it needs {list(SELECTION_COLUMNS)}."
        )
    return selected


def _check_image(path: Path, label: str) -> tuple[int, int]:
    """(width, height) of a JPEG, from its header (no full decode)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                kind, size = image.format, image.size
                image.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{label}: the image is not a readable JPEG ({error}).") from error
    if kind != "JPEG":
        raise ValueError(f"{label}: the image is a {kind} file, not the published JPEG.")
    return size


def check_file(path: str | os.PathLike, kind: str, sha256: str, label: str | None = None) -> Any:
    """Check one her2st file: its sha256, then its content by ``kind`` (counts/selection/image).

    Returns the content summary: (spots, genes) for counts, the selected spot count for a selection, (width, height)
    for an image.

    Raises:
        ChecksumError: the digest differs (the message names ``label``, the expected and the found digest).
        ValueError: the content check fails.
    """
    path = Path(path)
    label = label or str(path)
    found = sha256_file(path)
    if found != sha256:
        raise ChecksumError(
            f"{label}: sha256 {found} differs from the expected {sha256} (her2st commit {COMMIT[:12]}); the file is "
            "damaged, truncated or another version. Get it again."
        )
    checks = {"counts": _check_counts, "selection": _check_selection, "image": _check_image}
    return checks[kind](path, label)


def _stage(dest: Path, sid: str, name: str, source: Path | None, base_url: str, options: dict) -> Path | None:
    """Put one file, checked, under a temporary name in ``dest/sid``; None when the final file is already right."""
    info = SECTIONS[sid]["files"][name]
    target = dest / sid / name
    if target.is_file():
        if sha256_file(target) == info["sha256"]:
            return None
        if not options["overwrite"]:
            raise FileExistsError(
                f"{str(target)!r} exists and differs from the published file; pass overwrite=True (--overwrite) to "
                "replace it."
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        if source is not None:
            _link_or_copy(source, tmp)
            label = str(source)
        else:
            label = f"{base_url.rstrip('/')}/{info['path']}"
            download(label, tmp, timeout=options["timeout"], retries=options["retries"])
        check_file(tmp, info["kind"], info["sha256"], label)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _write_manifest(dest: Path, ids: list[str], splits: Mapping[str, str]) -> Path:
    """Write ``dest/manifest.csv`` atomically."""
    path = dest / "manifest.csv"
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_COLUMNS)
        for sid in ids:
            image = SECTIONS[sid]["image"]
            writer.writerow([sid, sid, f"{sid}/{image}", splits[sid], SECTIONS[sid]["patient"], "st"])
    return path


def _write_notice(dest: Path, ids: list[str]) -> Path:
    """Write ``dest/LICENSE_NOTICE.md``: source, commit, licence, citation and the files with their sha256."""
    lines = [
        "# her2st sections: source and licence",
        "",
        f"Source: https://github.com/{REPOSITORY} at commit {COMMIT} (files unchanged).",
        f"Licence: {LICENCE} (https://creativecommons.org/licenses/by/4.0/), as recorded for the dataset's Zenodo "
        "record 4751624; the GitHub repository itself carries no licence file.",
        f"Cite: {CITATION}",
        "",
        "| section | patient | file | repository path | sha256 |",
        "|---|---|---|---|---|",
    ]
    for sid in ids:
        for name, info in SECTIONS[sid]["files"].items():
            lines.append(f"| {sid} | {SECTIONS[sid]['patient']} | {sid}/{name} | {info['path']} | {info['sha256']} |")
    path = dest / NOTICE_NAME
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def _remove(paths: Iterable[Path], folders: Iterable[Path]) -> None:
    """Remove ``paths`` and then the ``folders`` left empty (deepest first)."""
    for path in paths:
        path.unlink(missing_ok=True)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:
            pass


def _new_folders(dest: Path, ids: list[str]) -> list[Path]:
    """The folders of ``dest/<id>`` (and ``dest`` and its missing parents) that do not exist yet."""
    new = [dest / sid for sid in ids if not (dest / sid).exists()]
    folder = dest
    while not folder.exists() and folder != folder.parent:
        new.append(folder)
        folder = folder.parent
    return new


def get_her2st(
    dest: str | os.PathLike,
    local: str | os.PathLike | None = None,
    sections: Iterable[str] | None = None,
    splits: Mapping[str, str] | None = None,
    overwrite: bool = False,
    *,
    base_url: str = BASE_URL,
    timeout: float = 60.0,
    retries: int = 2,
) -> Path:
    """Put the her2st ``sections`` in ``dest`` (one checked subfolder each) and write ``dest/manifest.csv``.

    Each file is copied from ``local`` (hard-linked when possible) or downloaded from ``base_url``, checked
    (:func:`check_file`) under a temporary name, and renamed to ``dest/<id>/<name>`` once every file has passed.
    A final file that already matches its sha256 is kept as it is. On any failure the files this call wrote are
    removed. Then ``LICENSE_NOTICE.md`` and the manifest (columns :data:`MANIFEST_COLUMNS`, paths relative to it,
    ``technology`` ``st``, ``patient`` the letter B or C) are written atomically.

    Args:
        dest: output folder.
        local: folder holding the files: one subfolder per section (``<id>/<name>``) or a checkout of the repository
            (``data/ST-cnts/...``). None: download.
        sections: section ids (default: all of :data:`SECTIONS`); the manifest lists them in this order.
        splits: section id -> train/val/test (default :data:`DEFAULT_SPLITS`; sections not named go to train).
        overwrite: replace an existing manifest, and files that differ from the published ones.
        base_url: where the repository's files are served (``<base_url>/<repository path>``); default: GitHub at
            :data:`COMMIT`.
        timeout: seconds a download may wait for the server.
        retries: further attempts after a failed download.

    Returns:
        The path of the manifest.

    Raises:
        FileExistsError: ``dest`` has a manifest (or a differing file) and ``overwrite`` is False.
        FileNotFoundError: ``local`` lacks a file (named with what was expected).
        ChecksumError, ValueError: a file fails its check, an unknown section or split.
        ConnectionError: a download failed.
    """
    ids = check_sections(sections)
    split_of = _resolve_splits(ids, splits)
    dest = Path(dest)
    manifest = dest / "manifest.csv"
    if manifest.exists() and not overwrite:
        raise FileExistsError(f"{str(manifest)!r} exists; pass overwrite=True (--overwrite) to write it again.")
    sources = _local_sources(Path(local), ids) if local is not None else {}
    check_writable(manifest, "her2st manifest")
    folders, staged, written = _new_folders(dest, ids), {}, []
    options = {"overwrite": overwrite, "timeout": timeout, "retries": retries}
    try:
        for sid in ids:
            for name in SECTIONS[sid]["files"]:
                tmp = _stage(dest, sid, name, sources.get((sid, name)), base_url, options)
                if tmp is not None:
                    staged[tmp] = dest / sid / name
        for tmp, target in list(staged.items()):
            os.replace(tmp, target)
            written.append(target)
            del staged[tmp]
        written.append(_write_notice(dest, ids))
        return _write_manifest(dest, ids, split_of)
    except BaseException:
        _remove([*staged, *written], folders)
        raise


def summarize_section(folder: str | os.PathLike, sid: str) -> dict[str, Any]:
    """What section ``sid`` in ``folder`` holds: ``selected`` spots of the selection table, of them ``with_counts``
    (a counts row ``"{x}x{y}"``), ``count_rows``, ``genes`` and the image's (width, height) ``image_size`` (read from
    its header)."""
    from PIL import Image

    files = {info["kind"]: Path(folder) / name for name, info in SECTIONS[sid]["files"].items()}
    with gzip.open(files["counts"], "rt") as f:
        genes = len(f.readline().rstrip("\n").split("\t")) - 1
        count_rows = {line.split("\t", 1)[0] for line in f if line.strip()}
    with open(files["selection"], newline="") as f:
        selected = [r for r in csv.DictReader(f, delimiter="\t") if (r.get("selected") or "").strip() == "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(files["image"]) as image:
            size = image.size
    with_counts = sum(1 for r in selected if f"{r['x'].strip()}x{r['y'].strip()}" in count_rows)
    return {
        "section": sid,
        "selected": len(selected),
        "with_counts": with_counts,
        "count_rows": len(count_rows),
        "genes": genes,
        "image_size": size,
    }


# the genes of the recipe's edits (ERBB2 amplicon, immune, stroma), added to the selected panel
EDIT_GENES = ("ERBB2", "GRB7", "STARD3", "PGAP3", "CD74", "PTPRC", "CD3E", "IGKC", "COL1A1", "COL1A2", "COL3A1")
# genes that published expression-from-histology results on her2st report one by one (docs/real_data.md), added so
# that the probe's ceiling can be put next to them gene by gene
COMPARISON_GENES = ("GNAS", "FASN", "SCD", "MYL12B", "FN1", "CLDN4", "POSTN", "MYL9")
# dataset preparation of the recipe (configs/her2st.json): the published sections' shallow counts and serial sections
PREPARE_SETTINGS = {
    "n_top_genes": 256,
    "min_counts": 100,
    "min_spot_fraction": 0.1,
    "split_by": "sample",
    "include_genes": EDIT_GENES + COMPARISON_GENES,
}


def ensure_her2st_dataset(root: str | os.PathLike, fov_um: float = 128.0) -> str:
    """Return the prepared her2st dataset ``root/dataset``, preparing it from ``root/raw/manifest.csv`` on first use.

    ``root/raw`` is what ``scripts/get_her2st.py --dest <root>/raw`` writes (downloaded, or copied with ``--local``).
    Preparation uses :data:`PREPARE_SETTINGS`: the 256 most variable genes among those detected in at least 10% of the
    training spots, plus :data:`EDIT_GENES` and :data:`COMPARISON_GENES`; sections of one patient may be in several
    splits (``split_by="sample"``). A prepared dataset with another field of view is refused rather than silently reused.
    """
    from bundle.io.dataset import prepare_dataset
    from bundle.utils import read_json

    root = Path(root)
    dataset = root / "dataset"
    if (dataset / "dataset.json").is_file():
        prepared = float(read_json(dataset / "dataset.json").get("fov_um", fov_um))
        if abs(prepared - float(fov_um)) > 1e-6:
            raise ValueError(
                f"{str(dataset)!r} was prepared for {prepared:g} um patches, not {float(fov_um):g} um; remove it to "
                "prepare it again."
            )
        return str(dataset)
    manifest = root / "raw" / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{str(manifest)!r} does not exist: get the her2st sections first with "
            f"`python scripts/get_her2st.py --dest {root / 'raw'}` (add --local <folder> for a copy on disk)."
        )
    prepare_dataset(manifest, dataset, fov_um=fov_um, overwrite=True, verbose=True, **PREPARE_SETTINGS)
    return str(dataset)


def validation_section(root: str | os.PathLike) -> str:
    """The folder of the first validation section of ``root/raw/manifest.csv`` (the recipe's generation input)."""
    from bundle.io.dataset import read_manifest

    manifest = Path(root) / "raw" / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{str(manifest)!r} does not exist: get the her2st sections first with "
            f"`python scripts/get_her2st.py --dest {Path(root) / 'raw'}`, or pass --input <section folder>."
        )
    rows = read_manifest(manifest, split_by="sample")
    row = next((r for r in rows if r.split == "val"), rows[-1])
    return str(row.st_path)
