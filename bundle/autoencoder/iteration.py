"""The stage-1 training iteration: :class:`AutoencoderKLIteration` (generator and patch-discriminator steps for
MONAI's ``SupervisedTrainer``) and its :func:`kl_divergence` term.

The autoencoder is trained on H&E patches scaled to ``[-1, 1]`` with an L1 reconstruction loss, a KL penalty, a
least-squares patch-GAN loss (Isola et al., "Image-to-Image Translation with Conditional Adversarial Networks", CVPR
2017) and, where its weights are available locally, a perceptual loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.losses import PatchAdversarialLoss
from torch import nn

from bundle.memory import amp_dtype, autocast


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL divergence of ``N(z_mu, z_sigma^2)`` from ``N(0, 1)``, summed over latent elements, averaged over the batch.

    Args:
        z_mu: posterior mean ``(B, C, *spatial)``.
        z_sigma: posterior standard deviation ``(B, C, *spatial)``, positive.
    """
    variance = z_sigma.pow(2)
    per_element = z_mu.pow(2) + variance - torch.log(variance) - 1.0
    return 0.5 * per_element.sum(dim=tuple(range(1, z_mu.ndim))).mean()


class AutoencoderKLIteration:
    """One training iteration of a KL autoencoder with an adversarial patch discriminator, for ``SupervisedTrainer``.

    Use it as ``SupervisedTrainer(iteration_update=AutoencoderKLIteration(...), network=autoencoder,
    optimizer=generator_optimizer, loss_function=...)``; the trainer's ``loss_function`` and ``inferer`` are not used.
    Each call makes a generator step, then a discriminator step:

    1. generator (``engine.network``, ``engine.optimizer``): ``reconstruction, z_mu, z_sigma = autoencoder(images)``;
       ``loss = L1 + kl_weight * KL + perceptual_weight * perceptual + adv_weight * adversarial``, where the
       adversarial term asks the discriminator to call the reconstructions real (least squares);
    2. discriminator (``discriminator``, ``d_optimizer``): ``adv_weight * (loss(fake) + loss(real)) / 2`` on the
       detached reconstructions and the images.

    The adversarial term and the discriminator step are off while ``engine.state.iteration < adv_start_iteration``
    (ignite counts iterations from 1), as the discriminator would otherwise learn from blurry early reconstructions;
    its weights do not change then. With ``amp`` (by default the trainer's ``amp`` and ``amp_kwargs``) the forward
    passes of both steps run under ``torch.autocast`` on the images' device, CPU or CUDA
    (``amp_kwargs={"dtype": torch.bfloat16}`` for bf16), and the losses in float32; the parameters and their gradients
    stay float32. The trainer's ``scaler`` (the ``GradScaler`` MONAI creates for ``amp``) is used only for float16:
    then it scales both backward passes and is updated once per iteration. bf16 runs without loss scaling.

    The ``discriminator`` and ``perceptual_loss`` are moved to the images' device on the first call. The returned
    dictionary (``engine.state.output``) holds ``"image"``, ``"pred"`` (the reconstructions, detached, float32), ``"loss"`` (the
    total generator loss, a detached 0-dim tensor) and the floats ``"recon_loss"``, ``"kl_loss"``,
    ``"perceptual_loss"``, ``"adv_loss"`` (the generator's adversarial term, unweighted) and ``"d_loss"``. The
    events ``FORWARD_COMPLETED``, ``LOSS_COMPLETED``, ``BACKWARD_COMPLETED`` and ``MODEL_COMPLETED`` fire as in the
    stock iteration. Keep the trainer's default ``decollate=True``: the output is then split into one dictionary per
    image (scalars replicated, the 0-dim loss as a float), which is what ``from_engine(["loss"], first=True)`` (the
    ``output_transform`` of ``StatsHandler`` in bundle configs and of ``--tracking mlflow``) expects; on an undecollated
    dictionary it returns a 1-tuple, which ``StatsHandler`` ignores with a warning.

    Args:
        discriminator: the patch discriminator, e.g. ``monai.networks.nets.PatchDiscriminator``; its last output is
            taken as the logits.
        d_optimizer: optimiser of the discriminator's parameters.
        kl_weight: weight of the KL term. Defaults to 1e-6.
        adv_weight: weight of the adversarial terms (generator and discriminator); 0 disables the discriminator.
            Defaults to 0.01.
        perceptual_loss: a module ``(reconstruction, images) -> loss`` such as ``monai.losses.PerceptualLoss`` (its
            weights must be available locally), or None for none. Defaults to None.
        perceptual_weight: weight of the perceptual term. Defaults to 0.001.
        adv_start_iteration: first iteration (counted from 1) with the adversarial term and discriminator step.
            Defaults to 0 (always on).
        image_key: batch key of the images ``(B, C, *spatial)`` in ``[-1, 1]``. Defaults to ``"image"``.
        max_grad_norm: if given, clip the gradient norm of the autoencoder and of the discriminator to it before each
            optimiser step. Defaults to None.
        amp: autocast the forward passes; None follows the trainer's ``amp``. Give it (with ``amp_kwargs``) when the
            trainer's ``amp`` is False so that MONAI creates no ``GradScaler`` (bf16, see
            :func:`bundle.memory.monai_amp`). Defaults to None.
        amp_kwargs: arguments of ``torch.autocast`` besides the device type, e.g. ``{"dtype": torch.bfloat16}``; None
            follows the trainer's ``amp_kwargs``. Defaults to None.
    """

    def __init__(
        self,
        discriminator: nn.Module,
        d_optimizer: torch.optim.Optimizer,
        kl_weight: float = 1e-6,
        adv_weight: float = 0.01,
        perceptual_loss: nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        perceptual_weight: float = 0.001,
        adv_start_iteration: int = 0,
        image_key: str = "image",
        max_grad_norm: float | None = None,
        amp: bool | None = None,
        amp_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(discriminator, nn.Module):
            raise ValueError(f"discriminator must be a torch.nn.Module, got {type(discriminator).__name__}.")
        if not isinstance(d_optimizer, torch.optim.Optimizer):
            raise ValueError(f"d_optimizer must be a torch.optim.Optimizer, got {type(d_optimizer).__name__}.")
        weights = {"kl_weight": kl_weight, "adv_weight": adv_weight, "perceptual_weight": perceptual_weight}
        for name, value in weights.items():
            if not (math.isfinite(float(value)) and float(value) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
        if int(adv_start_iteration) != adv_start_iteration or adv_start_iteration < 0:
            raise ValueError(f"adv_start_iteration must be an int >= 0, got {adv_start_iteration}.")
        if max_grad_norm is not None and not float(max_grad_norm) > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}.")
        if perceptual_loss is not None and not callable(perceptual_loss):
            raise ValueError(
                f"perceptual_loss must be a callable module or None, got {type(perceptual_loss).__name__}."
            )
        self.discriminator = discriminator
        self.d_optimizer = d_optimizer
        self.kl_weight = float(kl_weight)
        self.adv_weight = float(adv_weight)
        self.perceptual_loss = perceptual_loss
        self.perceptual_weight = float(perceptual_weight)
        self.adv_start_iteration = int(adv_start_iteration)
        self.image_key = image_key
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.amp = None if amp is None else bool(amp)
        self.amp_kwargs = None if amp_kwargs is None else dict(amp_kwargs)
        self.adversarial_loss = PatchAdversarialLoss(criterion="least_squares")
        self._device: torch.device | None = None

    def adversarial_active(self, iteration: int) -> bool:
        """Whether the adversarial term and the discriminator step run at ``iteration`` (counted from 1)."""
        return self.adv_weight > 0 and iteration >= self.adv_start_iteration

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        output = self.discriminator(images.contiguous())
        return (output[-1] if isinstance(output, (list, tuple)) else output).float()

    @staticmethod
    def _backward(loss: torch.Tensor, scaler: Any) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def _step(self, optimizer: torch.optim.Optimizer, params: Iterable, scaler: Any) -> None:
        if self.max_grad_norm is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(list(params), self.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()

    def _precision(self, engine: Any, device: torch.device) -> tuple[Any, Callable[[], AbstractContextManager]]:
        """The loss scaler (float16 only; None otherwise) and a factory of the autocast context of this step."""
        use_amp = bool(engine.amp) if self.amp is None else self.amp
        amp_kwargs = dict(engine.amp_kwargs or {}) if self.amp_kwargs is None else self.amp_kwargs
        float16 = use_amp and amp_dtype(device, amp_kwargs) == torch.float16
        scaler = getattr(engine, "scaler", None) if float16 else None
        if scaler is not None and not scaler.is_enabled():
            scaler = None
        return scaler, lambda: autocast(device, use_amp, amp_kwargs)

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        """Run one generator and one discriminator step and return the outputs for the handlers.

        Args:
            engine: a ``SupervisedTrainer`` whose ``network`` is the autoencoder and ``optimizer`` its optimiser.
            batchdata: a batch dictionary with the images ``(B, C, *spatial)`` under ``image_key``.
        """
        if not isinstance(batchdata, Mapping) or self.image_key not in batchdata:
            raise ValueError(
                f"batchdata must be a dictionary with the key {self.image_key!r} (image_key), got "
                f"{list(batchdata) if isinstance(batchdata, Mapping) else type(batchdata).__name__}."
            )
        if getattr(engine, "accumulation_steps", 1) != 1:
            raise ValueError(
                f"AutoencoderKLIteration does not implement gradient accumulation; build the SupervisedTrainer with "
                f"accumulation_steps=1 (got {engine.accumulation_steps})."
            )
        images = batchdata[self.image_key]
        if isinstance(images, MetaTensor):
            images = images.as_tensor()
        images = images.to(device=engine.state.device, non_blocking=engine.non_blocking, **engine.to_kwargs)
        if self._device != images.device:
            self.discriminator.to(images.device)
            if isinstance(self.perceptual_loss, nn.Module):
                self.perceptual_loss.to(images.device)
            self._device = images.device
        autoencoder, optimizer = engine.network, engine.optimizer
        scaler, autocasting = self._precision(engine, images.device)
        set_to_none = getattr(engine, "optim_set_to_none", False)
        adversarial = self.adversarial_active(engine.state.iteration)

        # 1. generator step
        autoencoder.train()
        optimizer.zero_grad(set_to_none=set_to_none)
        with autocasting():
            reconstruction, z_mu, z_sigma = autoencoder(images)
        engine.state.output = {"image": images, "pred": reconstruction}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        reconstruction32 = reconstruction.float()
        with autocasting():
            recon_loss = F.l1_loss(reconstruction32, images.float())
            kl_loss = kl_divergence(z_mu.float(), z_sigma.float())
            loss = recon_loss + self.kl_weight * kl_loss
            perceptual = torch.zeros((), device=images.device)
            if self.perceptual_loss is not None:
                perceptual = self.perceptual_loss(reconstruction32, images.float()).float().mean()
                loss = loss + self.perceptual_weight * perceptual
            g_adv = torch.zeros((), device=images.device)
            if adversarial:
                logits = self._logits(reconstruction)
                g_adv = self.adversarial_loss(logits, target_is_real=True, for_discriminator=False)
                loss = loss + self.adv_weight * g_adv
        engine.state.output["loss"] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        self._backward(loss, scaler)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        self._step(optimizer, autoencoder.parameters(), scaler)

        # 2. discriminator step: fake and real in separate forward/backward passes (separate batch-norm statistics;
        #    one forward per backward keeps DistributedDataParallel happy)
        d_loss = torch.zeros((), device=images.device)
        if adversarial:
            self.discriminator.train()
            self.d_optimizer.zero_grad(set_to_none=set_to_none)
            for batch, is_real in ((reconstruction.detach(), False), (images, True)):
                with autocasting():
                    logits = self._logits(batch)
                    part = (
                        0.5
                        * self.adv_weight
                        * self.adversarial_loss(logits, target_is_real=is_real, for_discriminator=True)
                    )
                self._backward(part, scaler)
                d_loss = d_loss + part.detach()
            self._step(self.d_optimizer, self.discriminator.parameters(), scaler)
        if scaler is not None:
            scaler.update()

        engine.state.output = {
            "image": images,
            "pred": reconstruction32.detach(),
            "loss": loss.detach(),
            "recon_loss": recon_loss.item(),
            "kl_loss": kl_loss.item(),
            "perceptual_loss": perceptual.item(),
            "adv_loss": g_adv.item(),
            "d_loss": d_loss.item(),
        }
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
