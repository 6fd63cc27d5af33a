"""Autoencoder checkpoints and the latent scale factor.

After training, :func:`finalize_autoencoder` computes the latent scale factor ``1 / std(latents)`` once
(:func:`compute_scale_factor`) and writes it into the autoencoder checkpoint (:func:`save_autoencoder_checkpoint`),
which is the single place stage 2 and inference read it from (:func:`load_autoencoder_checkpoint`,
:func:`read_scale_factor`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from torch import nn

from bundle.autoencoder.networks import build_autoencoder
from bundle.checkpoints import load_checkpoint, load_state_strict
from bundle.utils import atomic_path, unwrap_network

# keys of an autoencoder checkpoint written by save_autoencoder_checkpoint
_CKPT_WEIGHTS, _CKPT_SCALE, _CKPT_KWARGS = "autoencoder", "scale_factor", "network_kwargs"
_HOW_TO_GET_ONE = (
    "train stage 1 (the autoencoder) and finalise it with bundle.autoencoder.finalize_autoencoder, or import a Stable "
    "Diffusion VAE with `python scripts/import_sd_vae.py --vae-dir DIR --output {path}`"
)


def compute_scale_factor(
    autoencoder: nn.Module,
    data_loader: Iterable,
    device: str | torch.device,
    max_batches: int = 8,
    image_key: str = "image",
) -> float:
    """Latent scale factor ``1 / std(latents)`` (Rombach et al. 2022, section 4.3.2 and appendix G).

    The latents are ``autoencoder.encode_stage_2_inputs(images)`` (posterior samples, as the diffusion stage sees
    them) of the first ``max_batches`` batches, computed in eval mode without gradients; the standard deviation is
    taken over all their elements. The autoencoder's train/eval mode is restored afterwards.

    Args:
        autoencoder: the trained autoencoder (on ``device``).
        data_loader: yields batch dictionaries with images under ``image_key`` (or image tensors).
        device: device to move the images to.
        max_batches: number of batches to use, at least 1. Defaults to 8.
        image_key: batch key of the images. Defaults to ``"image"``.
    """
    if int(max_batches) != max_batches or max_batches < 1:
        raise ValueError(f"max_batches must be a positive int, got {max_batches}.")
    model = unwrap_network(autoencoder)
    was_training = model.training
    model.eval()
    latents = []
    try:
        with torch.no_grad():
            for index, batch in enumerate(data_loader):
                if index >= max_batches:
                    break
                if isinstance(batch, Mapping):
                    if image_key not in batch:
                        raise ValueError(f"batch has no key {image_key!r} (image_key); its keys are {list(batch)}.")
                    batch = batch[image_key]
                images = batch.as_tensor() if isinstance(batch, MetaTensor) else torch.as_tensor(batch)
                latents.append(model.encode_stage_2_inputs(images.to(device)).detach().flatten().double().cpu())
    finally:
        model.train(was_training)
    if not latents:
        raise ValueError("data_loader yielded no batches; the scale factor needs at least one batch of images.")
    std = float(torch.cat(latents).std())
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"the latents' standard deviation is {std}; check the autoencoder and the images.")
    return 1.0 / std


def _check_scale_factor(value: Any, what: str) -> float:
    try:
        scale = float(value)
    except (TypeError, ValueError):
        scale = float("nan")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}.")
    return scale


def _check_loadable(value: Any, where: str) -> Any:
    """Return ``value`` with tuples as lists; raise unless ``torch.load(weights_only=True)`` can read it back."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, (list, tuple)):
        return [_check_loadable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has a non-string key {key!r}; use string keys.")
            out[key] = _check_loadable(item, f"{where}[{key!r}]")
        return out
    raise ValueError(
        f"{where} is a {type(value).__name__}, which torch.load(weights_only=True) cannot read; store numbers, "
        f"strings, lists, dictionaries or tensors."
    )


def save_autoencoder_checkpoint(
    path: str | os.PathLike,
    autoencoder: nn.Module,
    scale_factor: float,
    network_kwargs: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the autoencoder, its latent scale factor and constructor arguments to ``path`` atomically.

    The file holds ``{"autoencoder": state_dict, "scale_factor": float, "network_kwargs": dict | None, **extra}``
    and is written to a temporary file in the same folder, then renamed, so readers never see half a file. It loads
    with ``torch.load(path, weights_only=True)``.

    Args:
        path: destination file, e.g. ``models/autoencoder.pt``.
        autoencoder: the autoencoder (wrappers such as ``DistributedDataParallel`` are unwrapped).
        scale_factor: latent scale factor, positive (see :func:`compute_scale_factor`).
        network_kwargs: constructor arguments of the autoencoder, so that :func:`load_autoencoder_checkpoint` can
            build it; defaults to ``autoencoder.init_kwargs`` when it has them (:class:`SDCompatibleAutoencoderKL`).
        extra: further entries (numbers, strings, lists, dictionaries, tensors), e.g. the training iteration.
    """
    scale = _check_scale_factor(scale_factor, "scale_factor")
    model = unwrap_network(autoencoder)
    if network_kwargs is None:
        network_kwargs = getattr(model, "init_kwargs", None)
    kwargs = _check_loadable(dict(network_kwargs), "network_kwargs") if network_kwargs is not None else None
    extra = _check_loadable(dict(extra or {}), "extra")
    clashes = sorted(set(extra) & {_CKPT_WEIGHTS, _CKPT_SCALE, _CKPT_KWARGS})
    if clashes:
        raise ValueError(f"extra must not contain the reserved keys {clashes}; rename them.")
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    checkpoint = {_CKPT_WEIGHTS: state, _CKPT_SCALE: scale, _CKPT_KWARGS: kwargs, **extra}
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)


def _read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict:
    hint = _HOW_TO_GET_ONE.format(path=path)
    checkpoint = load_checkpoint(path, "autoencoder checkpoint", hint, map_location=map_location, mmap=mmap)
    if not isinstance(checkpoint.get(_CKPT_WEIGHTS), Mapping):
        raise ValueError(
            f"{str(path)!r} is not an autoencoder checkpoint: expected a dictionary with the state dict under "
            f"{_CKPT_WEIGHTS!r}, found {list(checkpoint)}; write it with bundle.autoencoder.save_autoencoder_checkpoint."
        )
    return checkpoint


def _checkpoint_scale_factor(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> float:
    if checkpoint.get(_CKPT_SCALE) is None:
        raise ValueError(
            f"{str(path)!r} holds no latent scale factor ({_CKPT_SCALE!r}); compute it once after stage 1 with "
            f"bundle.autoencoder.finalize_autoencoder (or compute_scale_factor + save_autoencoder_checkpoint)."
        )
    return _check_scale_factor(checkpoint[_CKPT_SCALE], f"the scale factor in {str(path)!r}")


def load_autoencoder_checkpoint(
    path: str | os.PathLike, autoencoder: nn.Module | None = None, map_location: Any = "cpu"
) -> tuple[nn.Module, float]:
    """Load an autoencoder checkpoint written by :func:`save_autoencoder_checkpoint` (``weights_only=True``).

    Args:
        path: checkpoint file.
        autoencoder: network to load the weights into; None builds it from the checkpoint's ``network_kwargs``
            (:func:`build_autoencoder`) and moves it to ``map_location`` when that is a device.
        map_location: passed to ``torch.load``. Defaults to ``"cpu"``.

    Returns:
        The autoencoder (in eval mode) and the latent scale factor.
    """
    checkpoint = _read_checkpoint(path, map_location)
    scale = _checkpoint_scale_factor(checkpoint, path)
    kwargs = checkpoint.get(_CKPT_KWARGS)
    if autoencoder is None:
        if not kwargs:
            raise ValueError(
                f"{str(path)!r} has no network_kwargs to build the autoencoder from; pass autoencoder= built with the "
                f"settings the checkpoint was trained with (or save it with network_kwargs)."
            )
        autoencoder = build_autoencoder(kwargs)
        if isinstance(map_location, (str, torch.device)):
            autoencoder = autoencoder.to(map_location)
    load_state_strict(unwrap_network(autoencoder), checkpoint[_CKPT_WEIGHTS], f"checkpoint {str(path)!r}", kwargs)
    autoencoder.eval()
    return autoencoder, scale


def read_scale_factor(path: str | os.PathLike) -> float:
    """Read the latent scale factor stored in an autoencoder checkpoint.

    Args:
        path: checkpoint written by :func:`save_autoencoder_checkpoint`.
    """
    return _checkpoint_scale_factor(_read_checkpoint(path, "cpu", mmap=True), path)


def finalize_autoencoder(
    autoencoder: nn.Module,
    data_loader: Iterable,
    device: str | torch.device,
    path: str | os.PathLike,
    network_kwargs: Mapping[str, Any] | None = None,
    max_batches: int = 8,
    image_key: str = "image",
    extra: Mapping[str, Any] | None = None,
) -> float:
    """Compute the latent scale factor of a trained autoencoder and save both to ``path``; return the factor.

    Args:
        autoencoder: the trained autoencoder (on ``device``).
        data_loader: training images (see :func:`compute_scale_factor`).
        device: device of the autoencoder.
        path: checkpoint to write, e.g. ``models/autoencoder.pt``.
        network_kwargs: the autoencoder's constructor arguments (see :func:`save_autoencoder_checkpoint`).
        max_batches: batches used for the scale factor. Defaults to 8.
        image_key: batch key of the images. Defaults to ``"image"``.
        extra: further checkpoint entries.
    """
    scale = compute_scale_factor(autoencoder, data_loader, device, max_batches=max_batches, image_key=image_key)
    save_autoencoder_checkpoint(path, autoencoder, scale, network_kwargs=network_kwargs, extra=extra)
    return scale
