"""Feature extractors for FID/KID: pytorch-fid's FID Inception, loaded offline, and user-supplied image encoders.

:func:`load_feature_extractor` builds one of two extractors:

* ``"inception"``: pytorch-fid's FID InceptionV3 (pool3, 2048-d), built from ``pytorch_fid.inception``'s classes and
  loaded from the local file ``pt_inception-2015-12-05-6726825d.pth`` (:func:`inception_weights_path`). Nothing is ever
  downloaded; the weights are the ones behind published FID numbers, so values are comparable with papers at equal
  sample counts.
* a path to a user-supplied encoder (``torch.export`` program, TorchScript or a pickled ``nn.Module``), for example a
  pathology foundation model.

pytorch-fid (and torchvision) are imported when the Inception is built. See docs/evaluation_metrics.md.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "FeatureExtractor",
    "InceptionFeatureExtractor",
    "EncoderFeatureExtractor",
    "inception_weights_path",
    "build_fid_inception",
    "load_feature_extractor",
    "file_fingerprint",
]


INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
"""File name of pytorch-fid's FID Inception weights (TensorFlow's 2015-12-05 Inception ported to PyTorch)."""


INCEPTION_WEIGHTS_URL = (
    f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_WEIGHTS_FILE}"
)
"""Where pytorch-fid publishes :data:`INCEPTION_WEIGHTS_FILE`."""


INCEPTION_INPUT_SIZE = 299


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


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
    from bundle.checkpoints import load_checkpoint

    try:  # the bundle's loader: tensors only, no code runs, and no advice to turn weights_only off
        state = load_checkpoint(path, "weights file", "a state dict saved with torch.save")
    except ValueError as e:
        raise ValueError(f"{_not_fid_weights(path)} (it could not be read as a PyTorch state dict: {e}).") from None
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
