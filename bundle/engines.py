"""Engine glue for latent diffusion: a ``PrepareBatch`` that encodes images to latents with a frozen autoencoder.

With it, MONAI's stock ``SupervisedTrainer`` / ``SupervisedEvaluator`` and a plain ``DiffusionInferer`` train the
diffusion UNet in latent space (Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models",
CVPR 2022): AMP, events, handlers, metrics and checkpointing come from MONAI unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import DiffusionPrepareBatch
from monai.networks.schedulers import RFlowScheduler
from monai.utils import CommonKeys
from torch import nn

__all__ = ["LatentDiffusionPrepareBatch"]

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class LatentDiffusionPrepareBatch(DiffusionPrepareBatch):
    """Encode ``image`` with a frozen autoencoder, then prepare ``latents, target, (), {noise, timesteps, condition}``.

    ``__call__`` encodes ``batchdata["image"]`` with ``autoencoder.encode_stage_2_inputs`` (for
    ``monai.networks.nets.AutoencoderKL`` a sample from the posterior) under ``torch.no_grad()``, multiplies by
    ``scale_factor``, and defers to ``monai.engines.utils.DiffusionPrepareBatch``, which draws noise shaped like the
    latents and random timesteps in ``[0, num_train_timesteps)``, and passes ``batchdata[condition_name]`` on as
    ``condition``. ``SupervisedTrainer`` then calls ``inferer(latents, network, noise=..., timesteps=...,
    condition=...)`` and the loss compares the prediction with the target returned here:

    - ``"epsilon"``: the noise;
    - ``"v_prediction"``: the velocity ``scheduler.get_velocity(latents, noise, timesteps)`` (Salimans & Ho,
      "Progressive Distillation for Fast Sampling of Diffusion Models", ICLR 2022);
    - ``"sample"``: the clean latents.

    The autoencoder is frozen here (``eval()`` and ``requires_grad_(False)``) and kept in eval mode on every call:
    ``SupervisedTrainer`` calls ``network.train()`` each iteration only on its diffusion ``network``, which does not
    contain the autoencoder. The autoencoder must already be on the trainer's device. Note that the engine's
    ``state.output["image"]`` then holds the latents, not the images.

    Args:
        autoencoder: first-stage model with ``encode_stage_2_inputs(images) -> latents``, e.g. ``AutoencoderKL``.
        num_train_timesteps: number of steps of the training noise scheduler. Defaults to
            ``scheduler.num_train_timesteps`` when a ``scheduler`` is given.
        scale_factor: multiplier for the latents (computed once after training the autoencoder, stored in its
            checkpoint). Defaults to 1.0.
        condition_name: batch key of the condition (the expression) passed to the network as ``context``; None for
            an unconditional model. Defaults to ``"expression"``.
        scheduler: the training noise scheduler (the one ``DiffusionInferer`` holds); required for
            ``"v_prediction"``, used to check ``prediction_type`` and ``num_train_timesteps`` otherwise.
        prediction_type: what the network predicts, one of ``"epsilon"``, ``"v_prediction"``, ``"sample"``. Defaults
            to ``scheduler.prediction_type`` when a scheduler is given, else ``"epsilon"``.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        num_train_timesteps: int | None = None,
        scale_factor: float = 1.0,
        condition_name: str | None = "expression",
        scheduler: nn.Module | None = None,
        prediction_type: str | None = None,
    ) -> None:
        if not callable(getattr(autoencoder, "encode_stage_2_inputs", None)):
            raise ValueError(
                f"autoencoder ({type(autoencoder).__name__}) must have encode_stage_2_inputs(images), e.g. "
                f"monai.networks.nets.AutoencoderKL."
            )
        if isinstance(scheduler, RFlowScheduler):
            raise ValueError(
                "scheduler is an RFlowScheduler: rectified flow needs its own target (images - noise) and timestep "
                "sampling (scheduler.sample_timesteps), which this class does not implement; use DDPMScheduler."
            )
        scheduler_steps = getattr(scheduler, "num_train_timesteps", None)
        if num_train_timesteps is None:
            if scheduler_steps is None:
                raise ValueError("num_train_timesteps is required when no scheduler is given.")
            num_train_timesteps = int(scheduler_steps)
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be at least 1, got {num_train_timesteps}.")
        if scheduler_steps is not None and scheduler_steps != num_train_timesteps:
            raise ValueError(
                f"num_train_timesteps={num_train_timesteps} differs from scheduler.num_train_timesteps="
                f"{scheduler_steps}; use the inferer's scheduler value (or leave num_train_timesteps unset)."
            )
        scheduler_type = getattr(scheduler, "prediction_type", None)
        scheduler_type = None if scheduler_type is None else str(scheduler_type)  # MONAI uses a StrEnum
        if prediction_type is None:
            prediction_type = scheduler_type or "epsilon"
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}.")
        if scheduler_type is not None and scheduler_type != prediction_type:
            raise ValueError(
                f"prediction_type={prediction_type!r} differs from scheduler.prediction_type={scheduler_type!r}; the "
                f"sampler reads the network's output as the scheduler's prediction_type, so build both from one value."
            )
        if prediction_type == "v_prediction" and not callable(getattr(scheduler, "get_velocity", None)):
            raise ValueError(
                "prediction_type='v_prediction' needs the training scheduler (with get_velocity) as scheduler=."
            )
        if not float(scale_factor) > 0:
            raise ValueError(f"scale_factor must be positive, got {scale_factor}.")
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=condition_name)
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale_factor = float(scale_factor)
        self.scheduler = scheduler
        self.prediction_type = prediction_type

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Return the regression target for (scaled) latents ``images``, ``noise`` and ``timesteps``.

        Args:
            images: clean latents ``(B, C, *spatial)``.
            noise: noise ``(B, C, *spatial)``.
            timesteps: ``(B,)`` integer timesteps.
        """
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)  # type: ignore[union-attr]
        if self.prediction_type == "sample":
            return images
        return noise

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        """Encode ``batchdata["image"]`` to latents and prepare the diffusion training inputs.

        Args:
            batchdata: a batch dictionary with ``"image"`` ``(B, C, *spatial)`` and, if ``condition_name`` is set,
                the condition under that key.
            device: device to move the tensors to.
            non_blocking: passed to ``Tensor.to``.
            kwargs: further arguments for ``Tensor.to``.

        Returns:
            latents, target, ``()``, and ``{"noise", "timesteps"[, "condition"]}`` for ``DiffusionInferer``.
        """
        if not isinstance(batchdata, Mapping) or CommonKeys.IMAGE not in batchdata:
            raise ValueError(
                f"batchdata must be a dictionary with the key '{CommonKeys.IMAGE}', got "
                f"{list(batchdata) if isinstance(batchdata, Mapping) else type(batchdata).__name__}."
            )
        if self.autoencoder.training:
            self.autoencoder.eval()
        images = batchdata[CommonKeys.IMAGE].to(device=device, non_blocking=non_blocking, **kwargs)
        with torch.no_grad():
            latents = self.autoencoder.encode_stage_2_inputs(images) * self.scale_factor
        return super().__call__({**batchdata, CommonKeys.IMAGE: latents}, device, non_blocking, **kwargs)
