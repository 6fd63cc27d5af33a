"""Realism of generated patches: FID/KID against the real patches in Inception and user-encoder features.

:func:`load_realism_extractors` loads the extractors before any expensive work, so that missing Inception weights stop
a run before it starts; :func:`realism` computes :func:`bundle.evaluation.metrics.realism_metrics` in each
extractor's features, with the real patches' features cached per dataset.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.evaluation.extractors import load_feature_extractor
from bundle.evaluation.features import cached_features, extract_features_in_chunks, feature_cache_key
from bundle.evaluation.generation import safe_name
from bundle.evaluation.metrics import realism_metrics
from bundle.evaluation.settings import RealismSettings, as_bool
from bundle.utils import jsonable

__all__ = ["RealismExtractors", "load_realism_extractors", "realism"]

logger = logging.getLogger(__name__)


@dataclass
class RealismExtractors:
    """Feature extractors for realism, loaded before any expensive work.

    Attributes:
        inception: the Inception extractor, or None when it is skipped.
        inception_skipped: why Inception realism is not computed (and how to get the weights), or None.
        encoders: user-supplied encoders by name (``fid_<name>`` in the report).
    """

    inception: Any = None
    inception_skipped: str | None = None
    encoders: dict[str, Any] = field(default_factory=dict)
    inception_weights: str | None = None


def load_realism_extractors(
    inception_weights: str | os.PathLike | None = None,
    require_inception: bool = True,
    encoder_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    device: str | torch.device = "cpu",
) -> RealismExtractors:
    """Load the Inception extractor (and any encoders) first, so that missing weights stop a run before it starts.

    Args:
        inception_weights: path of ``pt_inception-2015-12-05-6726825d.pth``; None looks in torch's hub cache.
        require_inception: raise the FileNotFoundError of :func:`bundle.evaluation.extractors.load_feature_extractor`
            (which says how to get the weights) when the weights are missing; False skips realism with Inception and
            records why.
        encoder_path: weights or TorchScript file(s) of pathology encoders.
        device: where features are computed.
    """
    require_inception = as_bool(require_inception, "require_inception")
    out = RealismExtractors()
    try:
        out.inception = load_feature_extractor("inception", weights=inception_weights, device=device)
        out.inception_weights = None if out.inception.weights_path is None else str(out.inception.weights_path)
    except FileNotFoundError as err:
        if require_inception:
            raise
        out.inception_skipped = (
            f"FID/KID with Inception not computed: {err} (require_inception is false, so the run went on without it; "
            "see docs/evaluation_metrics.md)"
        )
        logger.warning("%s", out.inception_skipped)
    paths = (
        []
        if encoder_path is None
        else [encoder_path] if isinstance(encoder_path, (str, os.PathLike)) else list(encoder_path)
    )
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"encoder_path {str(path)!r} does not exist; pass the encoder's weights or TorchScript file, or null."
            )
        extractor = load_feature_extractor(str(path), device=device)
        out.encoders[safe_name(extractor.name)] = extractor
    return out


def realism(
    real_images: np.ndarray,
    generated_images: np.ndarray,
    groups: Sequence[str],
    extractors: RealismExtractors,
    settings: RealismSettings | None = None,
    cache_dir: str | os.PathLike | None = None,
    reference: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """FID / KID between real and generated patches in Inception (and encoder) features, overall and per group.

    Args:
        real_images: ``(N, 3, H, W)`` uint8 real patches.
        generated_images: ``(M, 3, H, W)`` uint8 generated patches.
        groups: one label per spot (the same spots on both sides), for the per-group metrics.
        extractors: from :func:`load_realism_extractors`.
        settings: feature batch size, KID subsets, smallest group with per-group metrics (on both sides) and FID
            method (``"pytorch-fid"``, as papers report, or ``"eigh"``, the same quantity about 3x faster for 2048-d
            features on a CPU); None: the defaults of :class:`bundle.evaluation.settings.RealismSettings`.
        cache_dir: folder of the reference-feature cache (None: no cache).
        reference: ``{"dataset": folder, "spot_ids": [...], **extra}`` identifying the real patches; with
            ``cache_dir``, their features are cached with ``bundle.evaluation.features.cached_features`` under
            ``bundle.evaluation.features.feature_cache_key`` (dataset, spots, extractor weights, image size, extra).
        seed: seed of the KID subsets.

    Returns:
        ``{"inception": {...} | {"skipped": why}, "encoders": {name: {...}}}`` where each ``{...}`` is
        ``bundle.evaluation.metrics.realism_metrics``' output plus ``seconds``.
    """
    settings = settings or RealismSettings()
    batch_size = settings.feature_batch_size
    groups = [str(g) for g in groups]

    def one(extractor: Any) -> dict[str, Any]:
        start = time.perf_counter()
        compute = lambda: extract_features_in_chunks(extractor, real_images, batch_size)  # noqa: E731
        if cache_dir is not None and reference is not None:
            extra = {k: v for k, v in reference.items() if k not in ("dataset", "spot_ids")}
            key = feature_cache_key(
                reference["dataset"], list(reference["spot_ids"]), extractor, int(real_images.shape[-1]), **extra
            )
            real_f = cached_features(cache_dir, key, compute)
        else:
            real_f = compute()
        fake_f = extract_features_in_chunks(extractor, generated_images, batch_size)
        result = realism_metrics(
            real_f,
            fake_f,
            groups,
            groups,
            kid_subset_size=settings.kid_subset_size,
            kid_subsets=settings.kid_subsets,
            min_group_size=settings.min_group_size,
            seed=seed,
            fid_method=settings.fid_method,
        )
        result = jsonable(result)
        result["fid_method"] = settings.fid_method
        result["seconds"] = round(time.perf_counter() - start, 2)
        return result

    out: dict[str, Any] = {"encoders": {}}
    if extractors.inception is not None:
        out["inception"] = one(extractors.inception)
    else:
        out["inception"] = {"skipped": extractors.inception_skipped or "no Inception extractor was loaded"}
    for name, extractor in extractors.encoders.items():
        out["encoders"][name] = one(extractor)
    return out
