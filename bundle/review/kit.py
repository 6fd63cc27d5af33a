"""Export of a blinded review kit: real and generated patches mixed under random names, the page, and the key.

``export_review_kit`` mixes ``num`` real and ``num`` generated patches, re-encodes them as plain PNGs under random
names in ``<kit>/images/`` and writes ``<kit>/index.html``, a self-contained page (no server, no network) on which a
reviewer calls every patch "Real" or "Synthetic" with a confidence and optional tissue-feature scores, then saves the
answers as ``answers_<reviewer>.json``. Which patch is which is written only to the key file, kept outside the kit.
The page is ``page.html`` next to this module (package data) with the title and the kit data filled in. This module
also defines the key and answers formats and the answer scales that :mod:`bundle.review.scoring` checks.
"""

from __future__ import annotations

import datetime
import functools
import importlib.resources
import json
import os
import random
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundle.utils import atomic_path, check_writable, staging_dir

__all__ = [
    "IMAGE_SUFFIXES",
    "KEY_FORMAT",
    "ANSWERS_FORMAT",
    "LABELS",
    "CALLS",
    "CONFIDENCE_LEVELS",
    "FEATURE_LEVELS",
    "DEFAULT_FEATURES",
    "list_images",
    "export_review_kit",
    "render_review_page",
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
    and the key is only written once the kit is complete, so a failure leaves neither half-written. The
    key is readable by its owner only (``0600``); the kit gets the usual permissions (``0666``/``0777`` less the umask).

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
        NotADirectoryError, PermissionError: a kit folder or key that cannot be written (checked before the
            sources are read).
        NoSpaceError: the disk filled up (the message names the kit folder or key; nothing is left half-written).
    """
    output_dir, key_path = Path(output_dir), Path(key_path)
    sources = {"real": Path(real_dir), "generated": Path(generated_dir)}
    num = _check_request(sources, num, output_dir, key_path, size)
    _check_destination(output_dir, key_path, overwrite)  # before the sources are read
    pools = _image_pools(sources, num)

    if seed is None:
        seed = secrets.randbelow(2**31)
    items = _draw_items(pools, num, seed)
    names = _random_names(len(items))
    kit_id = secrets.token_hex(8)

    key = _key_record(kit_id, seed, num, sources, output_dir, features, names, items)
    # the key is private (0600 whatever the umask: it holds the answers of the review) and appears only once the kit
    # is in place; the kit folder is staged (stale staging folders of killed exports removed) and gets the umask's
    # permissions
    with atomic_path(key_path, mode=0o600) as tmp_key:
        tmp_key.write_text(json.dumps(key, indent=2) + "\n", encoding="utf-8")
        with staging_dir(output_dir, "review kit folder") as staging:
            sizes = _stage_kit(staging, kit_id, names, items, size, features, title)
    return {
        "kit_id": kit_id,
        "kit_dir": str(output_dir),
        "key_path": str(key_path),
        "num_images": len(items),
        "seed": seed,
        "warnings": _size_warnings(sizes),
    }


def _check_request(sources: dict[str, Path], num: int, output_dir: Path, key_path: Path, size: int | None) -> int:
    """Refuse a bad ``num`` or ``size``, a key inside the kit folder or a folder as key, and a source folder inside
    the kit folder.

    Returns:
        ``num`` as an int.
    """
    if int(num) != num or num < 1:
        raise ValueError(f"num must be a positive whole number of patches per class, got {num!r}.")
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size!r}.")
    if _is_within(key_path, output_dir):
        raise ValueError(
            f"The key {str(key_path)!r} would be inside the kit folder {str(output_dir)!r}, which is sent to the "
            "reviewers; write the key outside it (e.g. next to the kit folder)."
        )
    if key_path.is_dir():
        raise ValueError(f"The key path {str(key_path)!r} is a folder; give a file name such as review_key.json.")
    for what, folder in sources.items():
        if _is_within(folder, output_dir):
            raise ValueError(
                f"The {what} image folder {str(folder)!r} is inside the kit folder {str(output_dir)!r}; "
                "choose a kit folder outside the source images."
            )
    return int(num)


def _image_pools(sources: dict[str, Path], num: int) -> dict[str, list[Path]]:
    """The images of each source folder (``"real"``, ``"generated"``); a clear error when one holds fewer than
    ``num``."""
    pools = {label: list_images(folder, label) for label, folder in sources.items()}
    for label, folder in sources.items():
        if len(pools[label]) < num:
            raise ValueError(
                f"The {label} image folder {str(folder)!r} holds {len(pools[label])} images, fewer than --num {num}; "
                f"lower --num or add images."
            )
    return pools


def _check_destination(output_dir: Path, key_path: Path, overwrite: bool) -> None:
    """Refuse a kit folder or key that cannot be written, a kit path that is a file, and, without ``overwrite``, a
    non-empty kit folder or an existing key."""
    check_writable(output_dir, "review kit folder")
    check_writable(key_path, "review key")
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


def _draw_items(pools: dict[str, list[Path]], num: int, seed: int) -> list[tuple[Path, str]]:
    """``num`` images of each label drawn from ``pools`` and shuffled together: ``(path, label)`` in display order."""
    rng = random.Random(seed)
    items = [(path, label) for label in LABELS for path in rng.sample(pools[label], num)]
    rng.shuffle(items)
    return items


def _stage_kit(
    staging: Path,
    kit_id: str,
    names: Sequence[str],
    items: Sequence[tuple[Path, str]],
    size: int | None,
    features: Sequence[tuple[str, str]],
    title: str,
) -> dict[str, set[tuple[int, int]]]:
    """Write the kit's ``images/`` (clean PNGs under ``names``) and ``index.html`` into ``staging``.

    Returns:
        The image sizes ``(w, h)`` written for each label.
    """
    (staging / "images").mkdir()
    sizes: dict[str, set[tuple[int, int]]] = {label: set() for label in LABELS}
    for name, (path, label) in zip(names, items):
        sizes[label].add(_clean_png(path, staging / "images" / name, size))
    (staging / "index.html").write_text(
        render_review_page(kit_id, names, features=features, title=title), encoding="utf-8"
    )
    return sizes


def _key_record(
    kit_id: str,
    seed: int,
    num: int,
    sources: dict[str, Path],
    output_dir: Path,
    features: Sequence[tuple[str, str]],
    names: Sequence[str],
    items: Sequence[tuple[Path, str]],
) -> dict[str, Any]:
    """The key's JSON content: the kit's provenance and, per image name, its label and source path."""
    return {
        "format": KEY_FORMAT,
        "kit_id": kit_id,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "num_per_class": num,
        "real_dir": str(sources["real"].resolve()),
        "generated_dir": str(sources["generated"].resolve()),
        "kit_dir": str(output_dir.resolve()),
        "features": [key for key, _ in features],
        "images": {name: {"label": label, "source": str(path.resolve())} for name, (path, label) in zip(names, items)},
    }


def _size_warnings(sizes: dict[str, set[tuple[int, int]]]) -> list[str]:
    """A warning when real and generated patches have different sizes (reviewers could tell them apart by size)."""
    if sizes["real"] == sizes["generated"]:
        return []
    return [
        f"real patches have sizes {sorted(sizes['real'])} and generated ones {sorted(sizes['generated'])} (w, h); "
        "reviewers can tell them apart by size: export again with --size."
    ]


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
    return _page_template().replace("__TITLE__", title_html).replace("__KIT_DATA__", data_json)


@functools.lru_cache(maxsize=1)
def _page_template() -> str:
    """``page.html`` (package data): the review page with ``__TITLE__`` and ``__KIT_DATA__`` still to fill in."""
    return (importlib.resources.files("bundle.review") / "page.html").read_text(encoding="utf-8")
