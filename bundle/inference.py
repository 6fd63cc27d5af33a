"""Loading a trained model for generation: ``models/model.pt`` + ``models/autoencoder.pt`` -> a sampling pipeline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bundle.sampling import ExpressionToTissuePipeline

__all__ = ["read_model_info", "load_pipeline"]


def read_model_info(path: str | os.PathLike) -> dict[str, Any]:
    """The entries of ``models/model.pt`` other than the weights (gene panel, normalisation, latent shape, ...).

    The inference configs read the gene panel and the number of neighbours from here, so that the network they build
    fits the checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"model checkpoint {str(path)!r} does not exist: train one first (python -m monai.bundle run training "
            "--config_file configs/train.json) or pass --model_path <models/model.pt>."
        )
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for key in ("gene_panel", "scale_factor", "latent_shape"):
        if key not in state:
            raise ValueError(f"{str(path)!r} has no {key!r}: it is not a models/model.pt written by configs/train.json.")
    return {k: v for k, v in state.items() if k != "network"}


def load_pipeline(
    model_path: str | os.PathLike,
    autoencoder_path: str | os.PathLike,
    network: nn.Module,
    scheduler,
    device: str | torch.device = "cpu",
    num_inference_steps: int = 50,
    guidance_scale: float | None = 3.0,
    eta: float = 0.0,
    architecture: dict[str, Any] | None = None,
    batched_guidance: bool = True,
) -> ExpressionToTissuePipeline:
    """Build an :class:`ExpressionToTissuePipeline` from the two model-zoo checkpoints.

    Args:
        model_path: ``models/model.pt`` (EMA weights, gene panel, scale factor, latent shape).
        autoencoder_path: ``models/autoencoder.pt`` (the autoencoder is built from the settings it records).
        network: the config's ``network_def`` (weights are loaded into it; a mismatch is refused with the names).
        scheduler: a MONAI scheduler configured like training (``num_train_timesteps``, schedule, prediction type).
        device: where to run.
        num_inference_steps: default denoising steps.
        guidance_scale: default classifier-free guidance scale.
        eta: DDIM noise.
        architecture: the config's architecture settings, compared with the ones training recorded.
        batched_guidance: CFG as one batched forward (default) or two.
    """
    from bundle.autoencoder import load_autoencoder_checkpoint
    from bundle.training import load_model

    info = load_model(model_path, network, architecture=architecture)
    prediction = info.get("prediction_type")
    if prediction is not None and getattr(scheduler, "prediction_type", prediction) != prediction:
        raise ValueError(
            f"{str(model_path)!r} was trained with prediction_type={prediction!r} but the scheduler uses "
            f"{scheduler.prediction_type!r}; set prediction_type to {prediction!r}."
        )
    autoencoder, scale_factor = load_autoencoder_checkpoint(autoencoder_path, map_location=device)
    if abs(scale_factor - float(info["scale_factor"])) > 1e-6 * max(1.0, abs(scale_factor)):
        raise ValueError(
            f"{str(autoencoder_path)!r} (scale factor {scale_factor:.6g}) is not the autoencoder that {str(model_path)!r} "
            f"was trained with (scale factor {float(info['scale_factor']):.6g}); use the pair from the same training run."
        )
    network = network.to(device).eval()
    for module in (network, autoencoder):
        module.requires_grad_(False)
    pipeline = ExpressionToTissuePipeline(
        network,
        autoencoder,
        scheduler,
        scale_factor=scale_factor,
        latent_shape=info["latent_shape"],
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        eta=eta,
        batched_guidance=batched_guidance,
    )
    pipeline.info = info
    return pipeline
