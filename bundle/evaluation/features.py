"""Features of image batches through a feature extractor, and the per-dataset cache of reference features.

:func:`extract_features` runs an extractor of :mod:`bundle.evaluation.extractors` over images (uint8 or float in
[0, 1]); :func:`extract_features_in_chunks` does it a chunk at a time for large arrays. :func:`cached_features` keeps
the features of real patches on disk under :func:`feature_cache_key` (dataset, spots, extractor weights, image size),
so a second model evaluated on the same dataset only encodes its own patches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.evaluation.extractors import FeatureExtractor
from bundle.utils import jsonable, read_json, save_npy_atomic, write_json_atomic

__all__ = ["extract_features", "extract_features_in_chunks", "feature_cache_key", "cached_features"]

logger = logging.getLogger(__name__)


_FLOAT_RANGE_TOLERANCE = 1e-3


FEATURE_CACHE_VERSION = 1


def _as_image_batch(images: Any) -> torch.Tensor:
    """Check one item of images and return it as a tensor ``(B, 3, H, W)`` of its own dtype (no copy if possible)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be tensors (B, 3, H, W) or (3, H, W), got {type(images).__name__}.")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != 3:
        hint = " (channels last? use .permute(0, 3, 1, 2))" if images.ndim == 4 and images.shape[-1] == 3 else ""
        raise ValueError(f"images must have shape (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}{hint}.")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(
            f"images have dtype {images.dtype}; pass uint8 (0..255) or float in [0, 1] (e.g. .to(torch.uint8))."
        )
    return images


def _to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """float32 in ``[0, 1]``: the dtype decides, uint8 is divided by 255, floats must already be in ``[0, 1]``."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    images = images.float()
    if images.numel():
        lo, hi = float(images.min()), float(images.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("images contain NaN or infinite values; check the generator's output.")
        if lo < -_FLOAT_RANGE_TOLERANCE or hi > 1 + _FLOAT_RANGE_TOLERANCE:
            hint = " They look like 0..255: divide by 255 or pass uint8." if hi > 2 else " Clamp or rescale them."
            raise ValueError(f"float images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}].{hint}")
    return images.clamp(0.0, 1.0)


def extract_features(
    extractor: FeatureExtractor,
    images: torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray],
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Run ``extractor`` over ``images`` in batches.

    The dtype decides the value range: ``uint8`` images are 0..255 and divided by 255; floating-point images must
    already be in ``[0, 1]`` (values up to 1e-3 outside are clamped, more is an error). Integer types other than uint8
    are refused.

    Args:
        extractor: from :func:`load_feature_extractor`.
        images: one tensor/array ``(N, 3, H, W)``, or an iterable of tensors ``(B, 3, H, W)`` or single images
            ``(3, H, W)`` (e.g. a DataLoader's image batches). Sizes may differ between batches.
        batch_size: images per forward pass.
        device: where to run; the extractor is moved there. ``None``: where the extractor is.

    Returns:
        float64 array ``(N, D)`` (``(0, D)`` when there are no images).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if device is not None:
        extractor.to(device)
    run_device = extractor.device
    extractor.eval()
    if isinstance(images, (torch.Tensor, np.ndarray)):
        images = [images]
    chunks: list[np.ndarray] = []
    with torch.inference_mode():
        for item in images:
            batch = _as_image_batch(item)
            for start in range(0, batch.shape[0], batch_size):
                x = _to_unit_float(batch[start : start + batch_size].to(run_device))
                feats = extractor(x)
                if feats.ndim != 2 or feats.shape[0] != x.shape[0]:
                    raise ValueError(
                        f"feature extractor {extractor.name!r} returned shape {tuple(feats.shape)} for {x.shape[0]} "
                        "images; it must return (B, D)."
                    )
                chunks.append(feats.detach().to("cpu", torch.float64).numpy())
    if not chunks:
        return np.zeros((0, extractor.num_features), dtype=np.float64)
    return np.concatenate(chunks, axis=0)


def extract_features_in_chunks(
    extractor: FeatureExtractor, images: np.ndarray | torch.Tensor, batch_size: int, chunk: int = 256
) -> np.ndarray:
    """Features of uint8 (or [0, 1] float) images through :func:`extract_features`, ``chunk`` images at a time.

    Only one chunk is converted to float at once, which keeps the memory of large uint8 arrays low.

    Returns:
        float64 ``(N, D)`` (``(0, 0)`` when there are no images).
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    parts = []
    for lo in range(0, len(x), chunk):
        parts.append(np.asarray(extract_features(extractor, x[lo : lo + chunk], batch_size=batch_size), np.float64))
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def _json_key(key: Any) -> Any:
    """``key`` as JSON (:func:`bundle.utils.jsonable`) after checking that it holds only JSON-like values.

    Anything else would enter the key as its ``str``, which may change between runs (``<object at 0x...>``) and make
    every lookup miss, so it is refused.
    """
    stack = [key]
    while stack:
        value = stack.pop()
        if isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend(value)
        elif not (value is None or isinstance(value, (str, int, float, np.generic, np.ndarray, os.PathLike))):
            raise TypeError(
                f"cache key value {value!r} of type {type(value).__name__} is not JSON-like; use strings, numbers, "
                "lists or dicts."
            )
    return jsonable(key)


def feature_cache_key(
    dataset: str | os.PathLike,
    spot_ids: Sequence[Hashable] | np.ndarray,
    extractor: FeatureExtractor,
    image_size: int | Sequence[int],
    **extra: Any,
) -> dict[str, Any]:
    """The key :func:`cached_features` expects for reference features of a dataset.

    Args:
        dataset: the dataset folder (resolved to an absolute path).
        spot_ids: the spots whose patches are encoded, in order (stored as count + SHA-256 of the ids).
        extractor: the feature extractor (its name, feature size, weights file size and SHA-256).
        image_size: size of the patches fed to the extractor.
        **extra: anything else that changes the features (e.g. ``split="val"``, ``magnification=20``).

    Returns:
        A JSON-serialisable dict.
    """
    ids = [str(s) for s in (spot_ids.tolist() if isinstance(spot_ids, np.ndarray) else spot_ids)]
    return _json_key(
        {
            "version": FEATURE_CACHE_VERSION,
            "dataset": str(Path(dataset).expanduser().resolve()),
            "num_spots": len(ids),
            "spot_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
            "extractor": extractor.fingerprint(),
            "image_size": image_size,
            **extra,
        }
    )


def cached_features(
    cache_dir: str | os.PathLike, key: Mapping[str, Any], compute: Callable[[], np.ndarray]
) -> np.ndarray:
    """Features cached on disk under a stable hash of ``key``; computed (and stored) only on a miss.

    ``<cache_dir>/features-<hash>.npy`` holds the array (written with :func:`bundle.utils.save_npy_atomic`) and
    ``features-<hash>.json`` the key, for people looking into the folder. The hash is the SHA-256 of the key as
    canonical JSON (sorted keys), so equal keys share a file whatever their order. Build the key with
    :func:`feature_cache_key` (dataset path, spot ids, extractor name and weights file hash/size, image size).

    Args:
        cache_dir: the cache folder (created when missing).
        key: what identifies the features; JSON-like values (paths and numpy values are converted).
        compute: returns the ``(N, D)`` features on a miss.

    Returns:
        float64 ``(N, D)`` features.
    """
    canonical = _json_key(dict(key))
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:24]
    cache_dir = Path(cache_dir)
    npy_path = cache_dir / f"features-{digest}.npy"
    json_path = cache_dir / f"features-{digest}.json"
    if npy_path.is_file():
        try:
            stored_key = read_json(json_path) if json_path.is_file() else canonical
            features = np.load(npy_path)
        except (OSError, ValueError) as e:
            logger.warning("feature cache %s is unreadable (%s); recomputing", npy_path, e)
        else:
            if stored_key == canonical and features.ndim == 2:
                logger.info("feature cache hit: %s (%d x %d)", npy_path, *features.shape)
                return features.astype(np.float64, copy=False)
            logger.warning("feature cache %s does not match its key; recomputing", npy_path)
    features = np.asarray(compute(), dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"compute() for the feature cache returned shape {features.shape}; it must return (N, D).")
    write_json_atomic(json_path, canonical)
    save_npy_atomic(npy_path, features)
    logger.info("feature cache written: %s (%d x %d)", npy_path, *features.shape)
    return features
