"""Engine glue for latent diffusion: a ``PrepareBatch`` that encodes images to latents with a frozen autoencoder
(or samples them from cached posteriors), and the loss that can weight each sample by its noise level.

With them, MONAI's stock ``SupervisedTrainer`` / ``SupervisedEvaluator`` and a plain ``DiffusionInferer`` train the
diffusion UNet in latent space (Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models",
CVPR 2022): AMP, events, handlers, metrics and checkpointing come from MONAI unchanged.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines.utils import DiffusionPrepareBatch
from monai.networks.schedulers import RFlowScheduler
from monai.utils import CommonKeys
from torch import nn

__all__ = ["DiffusionLoss", "LatentDiffusionPrepareBatch", "min_snr_weights"]

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
LATENT_MEAN, LATENT_STD = "latent_mean", "latent_std"  # batch keys of cached posteriors (bundle.latent_cache)


def min_snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Per-sample min-SNR-gamma loss weights (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting
    Strategy", ICCV 2023).

    With ``SNR(t) = alphas_cumprod[t] / (1 - alphas_cumprod[t])`` the weight of a sample is ``min(SNR, gamma) / SNR``
    for ``"epsilon"``, ``min(SNR, gamma) / (SNR + 1)`` for ``"v_prediction"`` and ``min(SNR, gamma)`` for
    ``"sample"``: the same per-timestep weight ``min(SNR, gamma)`` on the clean-sample error, written for each target.

    Args:
        alphas_cumprod: the training scheduler's ``alphas_cumprod`` ``(T,)``.
        timesteps: ``(B,)`` integer timesteps.
        gamma: the clamp (5.0 in the paper).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
    """
    if prediction_type not in _PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}.")
    alpha_bar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)[timesteps.long()]
    snr = alpha_bar / (1.0 - alpha_bar)
    clamped = snr.clamp(max=float(gamma))
    if prediction_type == "epsilon":
        weights = clamped / snr
    elif prediction_type == "v_prediction":
        weights = clamped / (snr + 1.0)
    else:
        weights = clamped
    return weights.float()


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

    A batch with ``"latent_mean"`` and ``"latent_std"`` (cached posteriors, :class:`bundle.latent_cache.
    LatentCacheDataset`) is not encoded: the latents are drawn as ``(mean + std * eps) * scale_factor``, the same
    posterior sample ``encode_stage_2_inputs`` draws on the image path.

    Three training options, all off by default: ``offset_noise`` adds
    ``offset_noise * N(0, 1)`` per (sample, channel), broadcast over space, to the noise (Guttenberg, "Diffusion with
    Offset Noise", 2023), so the model learns to change a patch's mean colour; ``timestep_sampling="logit_normal"``
    draws ``t = floor(T * sigmoid(u))`` with ``u ~ N(logit_mean, logit_std)`` instead of uniformly (Esser et al.,
    "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", ICML 2024), which puts more steps on
    the middle noise levels; ``min_snr_gamma`` weights each sample's loss by :func:`min_snr_weights`, which
    :class:`DiffusionLoss` reads through :meth:`loss_weights`.

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
        min_snr_gamma: min-SNR-gamma loss weighting (e.g. 5.0); None (default) weights every sample equally. Needs
            ``scheduler`` (its ``alphas_cumprod``) and :class:`DiffusionLoss` as the trainer's loss.
        offset_noise: strength of the per-(sample, channel) noise offset; 0 (default) is off.
        timestep_sampling: ``"uniform"`` (default) or ``"logit_normal"``.
        logit_mean: mean of ``u`` for ``"logit_normal"``. Defaults to 0.
        logit_std: standard deviation of ``u`` for ``"logit_normal"``. Defaults to 1.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        num_train_timesteps: int | None = None,
        scale_factor: float = 1.0,
        condition_name: str | None = "expression",
        scheduler: nn.Module | None = None,
        prediction_type: str | None = None,
        min_snr_gamma: float | None = None,
        offset_noise: float = 0.0,
        timestep_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
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
        self._check_options(scheduler, min_snr_gamma, offset_noise, timestep_sampling, logit_std)
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=condition_name)
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale_factor = float(scale_factor)
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.min_snr_gamma = None if min_snr_gamma is None else float(min_snr_gamma)
        self.offset_noise = float(offset_noise)
        self.timestep_sampling = timestep_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self._last_weights: tuple[weakref.ref, torch.Tensor] | None = None

    @staticmethod
    def _check_options(scheduler, min_snr_gamma, offset_noise, timestep_sampling, logit_std) -> None:
        if min_snr_gamma is not None:
            if not float(min_snr_gamma) > 0:
                raise ValueError(f"min_snr_gamma must be positive (e.g. 5.0) or None (off), got {min_snr_gamma}.")
            if getattr(scheduler, "alphas_cumprod", None) is None:
                raise ValueError("min_snr_gamma needs the training scheduler (with alphas_cumprod) as scheduler=.")
        if not float(offset_noise) >= 0:
            raise ValueError(f"offset_noise must be >= 0 (0 is off, e.g. 0.05), got {offset_noise}.")
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {timestep_sampling!r}.")
        if not float(logit_std) > 0:
            raise ValueError(f"the logit-normal timestep_logit_std must be positive, got {logit_std}.")

    def get_noise(self, images: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``images``, plus ``offset_noise * N(0, 1)`` per (sample, channel)."""
        noise = torch.randn_like(images)
        if self.offset_noise > 0:
            offset_shape = (*images.shape[:2], *([1] * (images.ndim - 2)))
            noise = noise + self.offset_noise * torch.randn(offset_shape, device=images.device, dtype=images.dtype)
        return noise

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        """``(B,)`` timesteps in ``[0, num_train_timesteps)``: uniform, or logit-normal (see the class)."""
        if self.timestep_sampling == "uniform":
            return super().get_timesteps(images)
        u = torch.randn(images.shape[0], device=images.device) * self.logit_std + self.logit_mean
        steps = (torch.sigmoid(u) * self.num_train_timesteps).long()
        return steps.clamp_(0, self.num_train_timesteps - 1)

    def loss_weights(self, target: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights ``(B,)`` of the batch whose target is ``target``; None without ``min_snr_gamma``.

        Raises:
            ValueError: ``min_snr_gamma`` is set but ``target`` is not the target of this object's last batch.
        """
        if self.min_snr_gamma is None:
            return None
        last = self._last_weights
        if last is None or last[0]() is not target:
            raise ValueError(
                "DiffusionLoss got a target that its prepare batch did not make for this iteration; give the "
                "trainer's prepare_batch to DiffusionLoss (loss_function=DiffusionLoss(prepare_batch))."
            )
        return last[1]

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
        """Encode ``batchdata["image"]`` to latents (or sample cached posteriors) and prepare the training inputs.

        Args:
            batchdata: a batch dictionary with ``"image"`` ``(B, C, *spatial)`` (or ``"latent_mean"`` and
                ``"latent_std"``) and, if ``condition_name`` is set, the condition under that key.
            device: device to move the tensors to.
            non_blocking: passed to ``Tensor.to``.
            kwargs: further arguments for ``Tensor.to``.

        Returns:
            latents, target, ``()``, and ``{"noise", "timesteps"[, "condition"]}`` for ``DiffusionInferer``.
        """
        latents = self.latents(batchdata, device, non_blocking, **kwargs)
        batch = super().__call__({**batchdata, CommonKeys.IMAGE: latents}, device, non_blocking, **kwargs)
        if self.min_snr_gamma is not None:
            weights = min_snr_weights(
                self.scheduler.alphas_cumprod, batch[3]["timesteps"], self.min_snr_gamma, self.prediction_type
            )
            self._last_weights = (weakref.ref(batch[1]), weights)
        return batch

    def latents(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        """The scaled latents of a batch: a posterior sample from cached ``latent_mean`` / ``latent_std`` when the
        batch has them, else ``autoencoder.encode_stage_2_inputs(image)``."""
        if isinstance(batchdata, Mapping) and LATENT_MEAN in batchdata:
            if LATENT_STD not in batchdata:
                raise ValueError(f"the batch has {LATENT_MEAN!r} but no {LATENT_STD!r}; use LatentCacheDataset items.")
            mean = batchdata[LATENT_MEAN].to(device=device, non_blocking=non_blocking, **kwargs)
            std = batchdata[LATENT_STD].to(device=device, non_blocking=non_blocking, **kwargs)
            return (mean + std * torch.randn_like(std)) * self.scale_factor
        if not isinstance(batchdata, Mapping) or CommonKeys.IMAGE not in batchdata:
            raise ValueError(
                f"batchdata must be a dictionary with the key '{CommonKeys.IMAGE}' (or cached '{LATENT_MEAN}' and "
                f"'{LATENT_STD}'), got {list(batchdata) if isinstance(batchdata, Mapping) else type(batchdata).__name__}."
            )
        if self.autoencoder.training:
            self.autoencoder.eval()
        images = batchdata[CommonKeys.IMAGE].to(device=device, non_blocking=non_blocking, **kwargs)
        with torch.no_grad():
            return self.autoencoder.encode_stage_2_inputs(images) * self.scale_factor


class DiffusionLoss(nn.Module):
    """Mean squared error between prediction and target, each sample weighted by its prepare batch's loss weights.

    ``SupervisedTrainer`` calls ``loss_function(pred, target)`` right after ``prepare_batch`` made ``target``; this
    loss asks that prepare batch for the weights of the batch whose target it is
    (:meth:`LatentDiffusionPrepareBatch.loss_weights`), so MONAI's trainer, its AMP and its events are used unchanged.
    Without weights (``min_snr_gamma`` None) it is ``torch.nn.MSELoss()``. With weights ``w`` it is
    ``mean_b(w_b * mean((pred_b - target_b) ** 2))``, computed in float32.

    Args:
        prepare_batch: the trainer's :class:`LatentDiffusionPrepareBatch`.
    """

    def __init__(self, prepare_batch: LatentDiffusionPrepareBatch) -> None:
        super().__init__()
        if not callable(getattr(prepare_batch, "loss_weights", None)):
            raise ValueError(
                f"prepare_batch ({type(prepare_batch).__name__}) must have loss_weights(target), e.g. "
                "bundle.engines.LatentDiffusionPrepareBatch."
            )
        self.prepare_batch = prepare_batch

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weights = self.prepare_batch.loss_weights(target)
        if weights is None:
            return F.mse_loss(pred, target)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        return (weights.to(per_sample.device) * per_sample).mean()
