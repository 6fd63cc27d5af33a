"""Realism metrics for generated H&E patches: feature extractors, FID, KID and a per-dataset feature cache.

Features come from one of two extractors (:func:`load_feature_extractor`):

* ``"inception"``: pytorch-fid's FID InceptionV3 (pool3, 2048-d), built from ``pytorch_fid.inception``'s classes and
  loaded from the local file ``pt_inception-2015-12-05-6726825d.pth`` (:func:`inception_weights_path`). Nothing is ever
  downloaded; the weights are the ones behind published FID numbers, so values are comparable with papers at equal
  sample counts.
* a path to a user-supplied encoder (TorchScript or a pickled ``nn.Module``), for example a pathology foundation model.

:func:`frechet_distance` goes through ``pytorch_fid.fid_score.calculate_frechet_distance``;
:func:`kernel_inception_distance` is the unbiased polynomial-kernel MMD^2 of torch-fidelity / torchmetrics, averaged
over random subsets. :func:`realism_metrics` computes both overall and per group (e.g. per slide or tissue class).
See docs/evaluation_metrics.md.

``import bundle.metrics`` is light: pytorch-fid (and torchvision), scipy and scikit-learn are imported when used.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bundle.utils import read_json, save_npy_atomic, write_json_atomic

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "FeatureExtractor",
    "InceptionFeatureExtractor",
    "EncoderFeatureExtractor",
    "inception_weights_path",
    "build_fid_inception",
    "load_feature_extractor",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "kernel_inception_distance",
    "kid_subset_size",
    "file_fingerprint",
    "feature_cache_key",
    "cached_features",
    "realism_metrics",
]

logger = logging.getLogger(__name__)

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
"""File name of pytorch-fid's FID Inception weights (TensorFlow's 2015-12-05 Inception ported to PyTorch)."""

INCEPTION_WEIGHTS_URL = (
    f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_WEIGHTS_FILE}"
)
"""Where pytorch-fid publishes :data:`INCEPTION_WEIGHTS_FILE`."""

INCEPTION_INPUT_SIZE = 299
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_CACHE_VERSION = 1
_FLOAT_RANGE_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------------------------------------
# feature extractors
# --------------------------------------------------------------------------------------------------------------------


class FeatureExtractor(nn.Module):
    """Map images ``(B, 3, H, W)`` float in ``[0, 1]`` to features ``(B, D)``.

    Attributes:
        name: short name of the extractor (``"inception"`` or the encoder file's stem), for cache keys and reports.
        num_features: ``D``.
        weights_path: the file the weights came from (``None`` if unknown).
    """

    def __init__(self, name: str, num_features: int, weights_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.name = name
        self.num_features = int(num_features)
        self.weights_path = None if weights_path is None else Path(weights_path)
        self._fingerprint: dict[str, Any] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Device of the extractor's first parameter or buffer (CPU when it has none)."""
        for tensor in list(self.parameters()) + list(self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def fingerprint(self) -> dict[str, Any]:
        """Identify the extractor for cache keys: name, feature size and the weights file's size and SHA-256."""
        if self._fingerprint is None:
            weights = None if self.weights_path is None else file_fingerprint(self.weights_path)
            self._fingerprint = {"name": self.name, "num_features": self.num_features, "weights": weights}
        return dict(self._fingerprint)


class InceptionFeatureExtractor(FeatureExtractor):
    """pytorch-fid's FID InceptionV3 up to the final average pool (``InceptionV3(output_blocks=[3])``).

    The forward pass is that of ``pytorch_fid.inception.InceptionV3`` with ``resize_input=True`` and
    ``normalize_input=True``: bilinear resize to 299x299 (``align_corners=False``), scale ``[0, 1]`` to ``[-1, 1]``,
    then the four blocks, giving ``(B, 2048)`` pool3 features.

    Args:
        inception: the FID Inception network built by :func:`build_fid_inception` with its weights loaded.
        weights_path: the weights file, for the fingerprint.
    """

    def __init__(self, inception: nn.Module, weights_path: str | os.PathLike | None = None) -> None:
        super().__init__(name="inception", num_features=2048, weights_path=weights_path)
        # the same four blocks as pytorch_fid.inception.InceptionV3.__init__
        self.blocks = nn.Sequential(
            nn.Sequential(
                inception.Conv2d_1a_3x3,
                inception.Conv2d_2a_3x3,
                inception.Conv2d_2b_3x3,
                nn.MaxPool2d(kernel_size=3, stride=2),
            ),
            nn.Sequential(inception.Conv2d_3b_1x1, inception.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2)),
            nn.Sequential(
                inception.Mixed_5b,
                inception.Mixed_5c,
                inception.Mixed_5d,
                inception.Mixed_6a,
                inception.Mixed_6b,
                inception.Mixed_6c,
                inception.Mixed_6d,
                inception.Mixed_6e,
            ),
            nn.Sequential(inception.Mixed_7a, inception.Mixed_7b, inception.Mixed_7c, nn.AdaptiveAvgPool2d((1, 1))),
        )
        for param in self.parameters():
            param.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pool3 features ``(B, 2048)`` of images ``(B, 3, H, W)`` in ``[0, 1]``."""
        size = (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE)
        x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        x = 2 * x - 1
        return self.blocks(x).flatten(1)


class EncoderFeatureExtractor(FeatureExtractor):
    """A user-supplied encoder: resize to ``input_size``, ImageNet-normalise, encode, pool to ``(B, D)``.

    Encoder outputs accepted: ``(B, D)``; ``(B, D, H, W)`` (averaged over ``H, W``, e.g. ``(B, D, 1, 1)``);
    ``(B, N, D)`` token sequences (averaged over the ``N`` tokens, or the first, class token with
    ``token_pool="cls"``); a tuple or list whose first element is one of these.

    Args:
        encoder: the network.
        name: name for reports and cache keys.
        input_size: side of the square images the encoder takes.
        weights_path: the file the encoder came from, for the fingerprint.
        token_pool: ``"mean"`` or ``"cls"``, how ``(B, N, D)`` outputs are pooled.
        num_features: ``D``; found by a dry run on one blank image when ``None``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        name: str,
        input_size: int = 224,
        weights_path: str | os.PathLike | None = None,
        token_pool: str = "mean",
        num_features: int | None = None,
    ) -> None:
        if token_pool not in ("mean", "cls"):
            raise ValueError(f"token_pool must be 'mean' or 'cls', got {token_pool!r}.")
        if int(input_size) < 1:
            raise ValueError(f"input_size must be a positive number of pixels, got {input_size!r}.")
        super().__init__(name=name, num_features=0, weights_path=weights_path)
        self.encoder = encoder
        self.input_size = int(input_size)
        self.token_pool = token_pool
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for param in self.parameters():
            param.requires_grad_(False)
        self.eval()
        if num_features is None:
            with torch.inference_mode():
                num_features = self(torch.zeros(1, 3, self.input_size, self.input_size)).shape[1]
        self.num_features = int(num_features)

    def train(self, mode: bool = True) -> EncoderFeatureExtractor:
        """Set the mode; a ``torch.export`` encoder keeps the mode it was exported in (it cannot switch)."""
        self.training = mode
        try:
            self.encoder.train(mode)
        except NotImplementedError:
            pass
        return self

    def _pool(self, out: Any) -> torch.Tensor:
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"encoder {self.name!r} returned a {type(out).__name__}; it must return a tensor (B, D), (B, D, H, W) "
                "or (B, N, D) (or a tuple whose first element is one). Wrap it in a module that returns the embedding."
            )
        if out.ndim == 2:
            return out
        if out.ndim == 4:
            return out.mean(dim=(2, 3))
        if out.ndim == 3:
            return out[:, 0] if self.token_pool == "cls" else out.mean(dim=1)
        raise ValueError(
            f"encoder {self.name!r} returned shape {tuple(out.shape)}; expected (B, D), (B, D, H, W) or (B, N, D)."
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``(B, D)`` of images ``(B, 3, H, W)`` in ``[0, 1]``."""
        x = images
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return self._pool(self.encoder(x)).float()


def inception_weights_path(weights: str | os.PathLike | None = None) -> Path:
    """Locate pytorch-fid's FID Inception weights file; never downloads.

    Args:
        weights: explicit path of the file (``inception_weights`` in the config), or a folder holding it under its
            standard name; it must exist. ``None`` looks in
            torch's hub cache, ``torch.hub.get_dir()/checkpoints/`` + :data:`INCEPTION_WEIGHTS_FILE`, where pytorch-fid
            itself would have saved it.

    Returns:
        The path of the file.

    Raises:
        FileNotFoundError: the file is not there; the message says what to download from where and where to put it.
    """
    hub_path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            path = path / INCEPTION_WEIGHTS_FILE
        if path.is_file():
            return path
        where = f"inception_weights = {str(path)!r} does not exist"
    else:
        if hub_path.is_file():
            return hub_path
        where = f"it is not in torch's hub cache ({hub_path}) and no inception_weights path was given"
    raise FileNotFoundError(
        f"FID needs pytorch-fid's Inception weights file {INCEPTION_WEIGHTS_FILE}, but {where}. Nothing is downloaded "
        f"at run time: download it from {INCEPTION_WEIGHTS_URL} (about 92 MB) and either put it at {hub_path} (torch's "
        "hub cache; set TORCH_HOME to move it) or pass its path as inception_weights in the config "
        "(weights=... in load_feature_extractor)."
    )


def _import_pytorch_fid_inception() -> Any:
    try:
        from pytorch_fid import inception as fid_inception
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"the 'inception' feature extractor needs pytorch-fid ({e}); "
            "install it with `pip install 'pytorch-fid>=0.3'`."
        ) from e
    return fid_inception


def build_fid_inception() -> nn.Module:
    """pytorch-fid's ``fid_inception_v3()`` without its download: the FID Inception network with untrained weights.

    torchvision's Inception3 with 1008 classes and no auxiliary head (built through pytorch-fid's ``_inception_v3``,
    which passes ``init_weights=False``, so no slow truncated-normal initialisation), with the blocks that differ in
    TensorFlow's graph swapped for pytorch-fid's ``FIDInception*`` blocks.
    """
    fi = _import_pytorch_fid_inception()
    net = fi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = fi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fi.FIDInceptionE_1(1280)
    net.Mixed_7c = fi.FIDInceptionE_2(2048)
    return net


def _not_fid_weights(path: Path) -> str:
    return (
        f"{str(path)!r} is not pytorch-fid's FID Inception weights file; download {INCEPTION_WEIGHTS_FILE} from "
        f"{INCEPTION_WEIGHTS_URL} and point inception_weights (or torch's hub cache) at it"
    )


def _read_fid_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """Read the weights file (``weights_only=True``: tensors only, no code runs) and check it is a state dict."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(f"{_not_fid_weights(path)} (it could not be read as a PyTorch state dict: {e}).") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{_not_fid_weights(path)} (it holds a {type(state).__name__}, not a state dict of tensors).")
    return state


def _load_fid_state_dict(net: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load ``state`` into ``net`` after checking that its keys and shapes are the FID Inception's."""
    expected = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    found = {k: v.shape for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if missing or unexpected or mismatched:
        details = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected)):
            if keys:
                details.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        if mismatched:
            k = mismatched[0]
            details.append(
                f"{len(mismatched)} shape mismatches (e.g. {k}: {tuple(found[k])} instead of {tuple(expected[k])})"
            )
        raise ValueError(f"{_not_fid_weights(path)}: {'; '.join(details)}.")
    # keys and shapes are checked above; strict=False only lets files without num_batches_tracked load
    net.load_state_dict(state, strict=False)


def _load_encoder_module(path: Path) -> nn.Module:
    """Load a ``torch.export`` program (``.pt2``), a TorchScript file, or else a pickled ``nn.Module``.

    Only the last runs code stored in the file, so it comes with a warning.
    """
    if path.suffix == ".pt2":
        try:
            return torch.export.load(str(path)).module()
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
            raise ValueError(
                f"encoder file {str(path)!r} could not be read as a torch.export program ({e}); export it with "
                "torch.export.save(torch.export.export(model, (example,), dynamic_shapes=...), path)."
            ) from e
    try:
        with warnings.catch_warnings():
            # torch >= 2.9 deprecates TorchScript; existing exports still load
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated.*", category=FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as jit_error:
        warnings.warn(
            f"{str(path)!r} is not TorchScript; loading it as a pickled nn.Module with torch.load(weights_only=False), "
            "which executes code stored in the file. Only use encoder files you trust (or export the encoder with "
            "torch.export / torch.jit.script).",
            UserWarning,
            stacklevel=3,
        )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"encoder file {str(path)!r} is neither TorchScript ({jit_error}) nor a pickled nn.Module ({e}); "
                "save it with torch.jit.script(model).save(path), torch.export.save(...) to a .pt2 file, or "
                "torch.save(model, path)."
            ) from e
    if not isinstance(obj, nn.Module):
        raise TypeError(
            f"encoder file {str(path)!r} holds a {type(obj).__name__}, not an nn.Module. A state dict alone does not "
            "say which network to build: save the whole module (torch.save(model, path)) or an export "
            "(torch.jit.script(model).save(path), or torch.export.save to a .pt2 file)."
        )
    return obj


def load_feature_extractor(
    name: str | os.PathLike = "inception",
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    input_size: int | None = None,
    token_pool: str = "mean",
) -> FeatureExtractor:
    """Build the feature extractor for FID/KID.

    Args:
        name: ``"inception"`` for pytorch-fid's FID InceptionV3 (pool3, 2048-d), or the path of a user encoder: a
            ``torch.export`` program (``.pt2``, exported with a dynamic batch dimension), a TorchScript file or a
            pickled ``nn.Module`` (loaded with ``weights_only=False``, which runs code from the file: a warning says
            so), mapping ImageNet-normalised ``(B, 3, S, S)`` images to ``(B, D)``, ``(B, D, 1, 1)`` or ``(B, N, D)``.
        weights: for ``"inception"``, the weights file (``None``: torch's hub cache; see
            :func:`inception_weights_path`).
            Ignored, with a warning, for a user encoder (the file is the encoder).
        device: where the extractor runs.
        input_size: user encoders only: side ``S`` the images are resized to (default 224). The Inception always
            resizes to 299 as pytorch-fid does.
        token_pool: user encoders only: ``"mean"`` or ``"cls"`` pooling of ``(B, N, D)`` outputs.

    Returns:
        The extractor in eval mode on ``device``.

    Raises:
        FileNotFoundError: the Inception weights or the encoder file is missing (the message says what to do).
        ValueError: the weights file is not pytorch-fid's FID Inception weights, or the encoder file cannot be read.
    """
    if str(name) == "inception":
        if input_size not in (None, INCEPTION_INPUT_SIZE):
            raise ValueError(
                f"input_size={input_size} does not apply to 'inception': pytorch-fid's FID Inception always resizes "
                f"to {INCEPTION_INPUT_SIZE}; leave input_size unset."
            )
        path = inception_weights_path(weights)
        state = _read_fid_state_dict(path)
        net = build_fid_inception()
        _load_fid_state_dict(net, state, path)
        extractor: FeatureExtractor = InceptionFeatureExtractor(net, weights_path=path)
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"feature extractor {str(name)!r} is neither 'inception' nor an existing file; pass 'inception' or the "
                "path of a TorchScript / pickled nn.Module image encoder."
            )
        if weights is not None:
            warnings.warn(
                f"weights={str(weights)!r} is ignored for the user encoder {str(path)!r} (it applies to 'inception').",
                UserWarning,
                stacklevel=2,
            )
        encoder = _load_encoder_module(path)
        extractor = EncoderFeatureExtractor(
            encoder,
            name=path.stem,
            input_size=224 if input_size is None else input_size,
            weights_path=path,
            token_pool=token_pool,
        )
    return extractor.to(device).eval()


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


# --------------------------------------------------------------------------------------------------------------------
# FID and KID
# --------------------------------------------------------------------------------------------------------------------


def _check_features(features: Any, what: str, min_samples: int = 2) -> np.ndarray:
    arr = np.asarray(features, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (num_images, num_features), got shape {arr.shape}.")
    if arr.shape[0] < min_samples:
        raise ValueError(
            f"{what} has {arr.shape[0]} sample(s); at least {min_samples} are needed (a covariance or an unbiased "
            "estimate needs two). Generate or select more images."
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite values; check the images and the feature extractor.")
    return arr


def feature_statistics(features: np.ndarray) -> dict[str, Any]:
    """Mean and covariance of features, as pytorch-fid computes them.

    Args:
        features: ``(N, D)`` with ``N >= 2``.

    Returns:
        ``{"mu": (D,) float64, "sigma": (D, D) float64 (np.cov, rowvar=False), "n": N}``.
    """
    arr = _check_features(features, "features")
    return {"mu": arr.mean(axis=0), "sigma": np.atleast_2d(np.cov(arr, rowvar=False)), "n": int(arr.shape[0])}


def _frechet_eigh(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Same formula, Tr((S1 S2)^1/2) from the eigenvalues of the symmetric S1^1/2 S2 S1^1/2 (about 3x faster)."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_from_statistics(
    stats_a: Mapping[str, Any], stats_b: Mapping[str, Any], method: str = "pytorch-fid"
) -> float:
    """Fréchet distance between two Gaussians given as :func:`feature_statistics` dicts.

    Args:
        stats_a: ``{"mu", "sigma"}`` of one set.
        stats_b: the other.
        method: ``"pytorch-fid"`` (``pytorch_fid.fid_score.calculate_frechet_distance``, scipy ``sqrtm``; the
            reference) or ``"eigh"`` (same quantity through symmetric eigendecompositions, faster for D=2048 on CPU,
            equal to within rounding). If the installed SciPy no longer accepts pytorch-fid's ``sqrtm(disp=False)``
            call (SciPy >= 1.18), ``"pytorch-fid"`` falls back to ``"eigh"`` with a warning.

    Returns:
        ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2)``.
    """
    mu1, mu2 = np.atleast_1d(stats_a["mu"]).astype(np.float64), np.atleast_1d(stats_b["mu"]).astype(np.float64)
    s1, s2 = np.atleast_2d(stats_a["sigma"]).astype(np.float64), np.atleast_2d(stats_b["sigma"]).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"feature statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}; both "
            "sets must come from the same feature extractor."
        )
    if method == "eigh":
        return _frechet_eigh(mu1, s1, mu2, s2)
    if method != "pytorch-fid":
        raise ValueError(f"method must be 'pytorch-fid' or 'eigh', got {method!r}.")
    try:
        from pytorch_fid.fid_score import calculate_frechet_distance
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"FID needs pytorch-fid ({e}); install it with `pip install 'pytorch-fid>=0.3'`.") from e
    printed = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            # pytorch-fid 0.3 calls scipy.linalg.sqrtm(..., disp=False), deprecated in SciPy 1.16
            warnings.filterwarnings("ignore", message=".*disp.*", category=DeprecationWarning)
            value = calculate_frechet_distance(mu1, s1, mu2, s2)
    except TypeError as e:
        if "disp" not in str(e):
            raise
        warnings.warn(
            f"pytorch-fid's calculate_frechet_distance does not run with this SciPy ({e}); using the equivalent "
            "eigendecomposition formula instead.",
            RuntimeWarning,
            stacklevel=2,
        )
        return _frechet_eigh(mu1, s1, mu2, s2)
    except ValueError as e:
        raise ValueError(
            f"FID failed in pytorch-fid ({e}): the covariance product is numerically unstable, usually from too few "
            "samples for the feature size. Use more images, or method='eigh'."
        ) from e
    if printed.getvalue().strip():
        logger.warning("pytorch-fid: %s", printed.getvalue().strip())
    return float(value)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray, method: str = "pytorch-fid") -> float:
    """Fréchet (Inception) distance between two feature sets.

    Means and covariances (``np.cov``, ``rowvar=False``) go to ``pytorch_fid.fid_score.calculate_frechet_distance``.
    FID is biased upward for small ``N`` (the bias shrinks roughly like 1/N): compare values only at equal sample
    counts.

    Args:
        features_a: ``(N_a, D)``, ``N_a >= 2``.
        features_b: ``(N_b, D)``, ``N_b >= 2``.
        method: see :func:`frechet_distance_from_statistics`.

    Returns:
        The distance (>= 0 up to rounding).
    """
    a = _check_features(features_a, "features_a")
    b = _check_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"features_a has {a.shape[1]} features and features_b {b.shape[1]}; use one extractor for both sets."
        )
    return frechet_distance_from_statistics(feature_statistics(a), feature_statistics(b), method=method)


def kid_subset_size(n_a: int, n_b: int, subset_size: int = 1000) -> int:
    """Effective KID subset size: ``subset_size`` capped at ``min(n_a, n_b)``."""
    if subset_size < 2:
        raise ValueError(f"KID subset_size must be >= 2, got {subset_size}.")
    return int(min(subset_size, n_a, n_b))


def _unbiased_mmd2(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 of torch-fidelity's ``mmd2(mmd_est='unbiased')``: within-set sums without the diagonal."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    features_a: np.ndarray,
    features_b: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
) -> tuple[float, float]:
    """Kernel Inception Distance as torch-fidelity and torchmetrics define it.

    For each of ``num_subsets`` subsets, ``m`` rows of each set are drawn without replacement (one
    ``np.random.RandomState(seed)``, ``a`` then ``b``, as torch-fidelity draws them) and the unbiased MMD^2 with the
    polynomial kernel ``k(x, y) = (gamma <x, y> + coef0) ** degree`` (``gamma`` default ``1 / D``) is computed;
    the result is the mean and the (population) standard deviation over subsets. ``m = min(subset_size, N_a, N_b)``
    (see :func:`kid_subset_size`; logged when capped). When ``m`` equals both set sizes every subset is the whole set,
    so it is computed once (std 0).

    Args:
        features_a: ``(N_a, D)``.
        features_b: ``(N_b, D)``.
        num_subsets: number of random subsets.
        subset_size: requested subset size (torch-fidelity's default 1000).
        seed: seed of the subset draws.
        degree: polynomial degree.
        gamma: kernel scale; ``None`` is ``1 / D``.
        coef0: kernel offset.

    Returns:
        ``(kid_mean, kid_std)``. Unbiased: about 0 (and possibly slightly negative) for samples of one distribution.
    """
    from sklearn.metrics.pairwise import polynomial_kernel

    a = _check_features(features_a, "features_a")
    b = _check_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"features_a has {a.shape[1]} features and features_b {b.shape[1]}; use one extractor for both sets."
        )
    if num_subsets < 1:
        raise ValueError(f"KID num_subsets must be >= 1, got {num_subsets}.")
    m = kid_subset_size(len(a), len(b), subset_size)
    if m < subset_size:
        logger.info("KID subset size capped from %d to %d (sizes %d and %d)", subset_size, m, len(a), len(b))
    gamma = 1.0 / a.shape[1] if gamma is None else float(gamma)

    def mmd2(x: np.ndarray, y: np.ndarray) -> float:
        kw = {"degree": degree, "gamma": gamma, "coef0": coef0}
        k_xx, k_xy, k_yy = polynomial_kernel(x, x, **kw), polynomial_kernel(x, y, **kw), polynomial_kernel(y, y, **kw)
        return _unbiased_mmd2(k_xx, k_xy, k_yy)

    if m == len(a) == len(b):
        return mmd2(a, b), 0.0
    rng = np.random.RandomState(seed)
    values = np.empty(num_subsets, dtype=np.float64)
    for i in range(num_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        values[i] = mmd2(x, y)
    return float(values.mean()), float(values.std())


# --------------------------------------------------------------------------------------------------------------------
# feature cache
# --------------------------------------------------------------------------------------------------------------------


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """``{"file": name, "size": bytes, "sha256": hex}`` of a file (for cache keys; the content, not the location)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot fingerprint {str(path)!r}: it is not a file.")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"file": path.name, "size": path.stat().st_size, "sha256": digest.hexdigest()}


def _jsonable(obj: Any) -> Any:
    """``obj`` with paths, numpy values and sets turned into JSON types; anything else unknown is an error."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_jsonable(v) for v in obj), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(
        f"cache key value {obj!r} of type {type(obj).__name__} is not JSON-like; use strings, numbers, lists or dicts."
    )


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
    return _jsonable(
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
    canonical = _jsonable(dict(key))
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


# --------------------------------------------------------------------------------------------------------------------
# realism report
# --------------------------------------------------------------------------------------------------------------------


def _fid_kid(
    real: np.ndarray, fake: np.ndarray, subset_size: int, num_subsets: int, seed: int, fid_method: str
) -> dict[str, Any]:
    kid_mean, kid_std = kernel_inception_distance(
        real, fake, num_subsets=num_subsets, subset_size=subset_size, seed=seed
    )
    return {
        "fid": frechet_distance(real, fake, method=fid_method),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "kid_subset_size": kid_subset_size(len(real), len(fake), subset_size),
        "n_real": int(len(real)),
        "n_fake": int(len(fake)),
    }


def realism_metrics(
    real_features: np.ndarray,
    fake_features: np.ndarray,
    groups_real: Sequence[Hashable] | np.ndarray | None = None,
    groups_fake: Sequence[Hashable] | np.ndarray | None = None,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    min_group_size: int = 10,
    seed: int = 0,
    fid_method: str = "pytorch-fid",
) -> dict[str, Any]:
    """FID and KID between real and generated features, overall and per group.

    Args:
        real_features: ``(N_real, D)``.
        fake_features: ``(N_fake, D)`` from the same extractor.
        groups_real: one label per real row (e.g. slide id or tissue class), or ``None`` for no per-group metrics.
        groups_fake: one label per generated row; given together with ``groups_real``.
        kid_subset_size: KID subset size, capped at the smaller set (the effective size is reported).
        kid_subsets: number of KID subsets.
        min_group_size: a group gets metrics only with at least this many rows on both sides (and >= 2).
        seed: seed of the KID subset draws.
        fid_method: see :func:`frechet_distance_from_statistics`.

    Returns:
        JSON-serialisable ``{"fid", "kid_mean", "kid_std", "kid_subset_size", "kid_subsets", "n_real", "n_fake",
        "per_group": {group: {"fid", "kid_mean", "kid_std", "kid_subset_size", "n_real", "n_fake"}},
        "skipped_groups": {group: reason}}`` with group labels as strings; ``per_group`` and ``skipped_groups`` are
        empty without groups.
    """
    real = _check_features(real_features, "real_features")
    fake = _check_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"real_features have {real.shape[1]} features and fake_features {fake.shape[1]}; use one extractor."
        )
    result: dict[str, Any] = _fid_kid(real, fake, kid_subset_size, kid_subsets, seed, fid_method)
    result["kid_subsets"] = int(kid_subsets)
    result["per_group"] = {}
    result["skipped_groups"] = {}
    if groups_real is None and groups_fake is None:
        return result
    if groups_real is None or groups_fake is None:
        raise ValueError("give both groups_real and groups_fake (one label per row) or neither.")
    labels_real = np.asarray([str(g) for g in groups_real], dtype=object)
    labels_fake = np.asarray([str(g) for g in groups_fake], dtype=object)
    for what, labels, feats in (("groups_real", labels_real, real), ("groups_fake", labels_fake, fake)):
        if len(labels) != len(feats):
            raise ValueError(f"{what} has {len(labels)} labels for {len(feats)} feature rows; give one label per row.")
    need = max(int(min_group_size), 2)
    for group in sorted(set(labels_real) | set(labels_fake)):
        n_real, n_fake = int((labels_real == group).sum()), int((labels_fake == group).sum())
        if n_real < need or n_fake < need:
            reason = f"{n_real} real and {n_fake} generated samples; each side needs at least {need} (min_group_size)"
            result["skipped_groups"][group] = reason
            continue
        try:
            result["per_group"][group] = _fid_kid(
                real[labels_real == group], fake[labels_fake == group], kid_subset_size, kid_subsets, seed, fid_method
            )
        except ValueError as e:
            result["skipped_groups"][group] = f"metrics failed: {e}"
    return result
