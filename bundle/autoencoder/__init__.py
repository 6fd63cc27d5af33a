"""Stage 1 of the latent diffusion model: the KL autoencoder's training step, latent scale factor and checkpoints.

The first stage is MONAI's ``AutoencoderKL`` (Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion
Models", CVPR 2022) trained on H&E patches scaled to ``[-1, 1]`` with an L1 reconstruction loss, a KL penalty, a
least-squares patch-GAN loss (Isola et al., "Image-to-Image Translation with Conditional Adversarial Networks", CVPR
2017) and, where its weights are available locally, a perceptual loss. Training runs in MONAI's stock
``SupervisedTrainer`` with :class:`AutoencoderKLIteration` as its ``iteration_update``.

After training, :func:`finalize_autoencoder` computes the latent scale factor ``1 / std(latents)`` once and writes it
into the autoencoder checkpoint, which is the single place stage 2 and inference read it from
(:func:`load_autoencoder_checkpoint`, :func:`read_scale_factor`).

Instead of training, the Stable Diffusion VAE can be imported from a local diffusers folder
(:func:`convert_diffusers_vae`, :func:`import_sd_vae`). Its layout differs from MONAI's ``AutoencoderKL`` in three
places (one more residual block per decoder level than per encoder level; an encoder that outputs mean and log-variance
together before a shared 1x1 ``quant_conv``; a SiLU after the last normalisation of encoder and decoder, which MONAI
omits), so it is held by :class:`SDCompatibleAutoencoderKL`, a subclass that adds exactly those three options and is
otherwise MONAI's network, state-dict names included.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.losses import PatchAdversarialLoss
from monai.networks.blocks import Convolution
from monai.networks.nets import AutoencoderKL
from monai.networks.nets.autoencoderkl import Decoder, Encoder
from monai.utils import ensure_tuple_rep
from torch import nn

from bundle.utils import atomic_path, unwrap_network

__all__ = [
    "SDCompatibleAutoencoderKL",
    "build_autoencoder",
    "kl_divergence",
    "AutoencoderKLIteration",
    "compute_scale_factor",
    "save_autoencoder_checkpoint",
    "load_autoencoder_checkpoint",
    "read_scale_factor",
    "finalize_autoencoder",
    "convert_diffusers_vae",
    "import_sd_vae",
]

# keys of an autoencoder checkpoint written by save_autoencoder_checkpoint
_CKPT_WEIGHTS, _CKPT_SCALE, _CKPT_KWARGS = "autoencoder", "scale_factor", "network_kwargs"
# constructor arguments that SDCompatibleAutoencoderKL adds to MONAI's AutoencoderKL
_EXTENSION_KWARGS = ("decoder_num_res_blocks", "encoder_out_channels", "norm_out_activation")
_HOW_TO_GET_ONE = (
    "train stage 1 (the autoencoder) and finalise it with bundle.autoencoder.finalize_autoencoder, or import a Stable "
    "Diffusion VAE with `python scripts/import_sd_vae.py --vae-dir DIR --output {path}`"
)


# ----------------------------------------------------------------------------------------------------------------------
# network
# ----------------------------------------------------------------------------------------------------------------------


class _GroupNormSiLU(nn.GroupNorm):
    """``GroupNorm`` followed by SiLU; same parameters (and state-dict keys) as ``GroupNorm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))


class SDCompatibleAutoencoderKL(AutoencoderKL):
    """MONAI's ``AutoencoderKL`` with the three layout options that Stable Diffusion's VAE needs.

    With the options left at their defaults the network is identical to ``monai.networks.nets.AutoencoderKL`` (same
    modules, same state-dict keys, same ``encode`` / ``decode`` / ``encode_stage_2_inputs``). The options are:

    - ``decoder_num_res_blocks``: residual blocks per decoder level, independent of the encoder's ``num_res_blocks``
      (the Stable Diffusion / diffusers decoder has ``layers_per_block + 1`` per level, the encoder
      ``layers_per_block``);
    - ``encoder_out_channels``: channels of the encoder's last convolution, from which ``quant_conv_mu`` and
      ``quant_conv_log_sigma`` (1x1 convolutions) compute mean and log-variance. MONAI uses ``latent_channels``;
      diffusers computes both from ``2 * latent_channels`` channels through one 1x1 ``quant_conv``, which splits
      exactly into the two MONAI convolutions when this is ``2 * latent_channels``;
    - ``norm_out_activation``: a SiLU after the final ``GroupNorm`` of the encoder and of the decoder, before their
      output convolutions, as in Rombach et al. and diffusers. MONAI's ``AutoencoderKL`` has none there.

    The constructor arguments (those given explicitly) are kept in ``init_kwargs`` so that
    :func:`save_autoencoder_checkpoint` can store them.

    Args:
        spatial_dims: number of spatial dimensions (2 for H&E patches).
        decoder_num_res_blocks: residual blocks per decoder level, an int or one per level; ``None`` uses
            ``num_res_blocks`` (MONAI's layout).
        encoder_out_channels: output channels of the encoder; ``None`` uses ``latent_channels`` (MONAI's layout).
        norm_out_activation: apply SiLU after the final normalisation of encoder and decoder. Defaults to False
            (MONAI's layout).
        kwargs: every other argument of ``monai.networks.nets.AutoencoderKL`` (``in_channels``, ``channels``,
            ``num_res_blocks``, ``latent_channels``, ``attention_levels``, ``norm_num_groups``, ...).
    """

    def __init__(
        self,
        spatial_dims: int,
        decoder_num_res_blocks: Sequence[int] | int | None = None,
        encoder_out_channels: int | None = None,
        norm_out_activation: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(spatial_dims=spatial_dims, **kwargs)
        self.init_kwargs: dict[str, Any] = {"spatial_dims": spatial_dims, **kwargs}
        if decoder_num_res_blocks is not None or encoder_out_channels is not None:
            self._rebuild(spatial_dims, decoder_num_res_blocks, encoder_out_channels, kwargs)
        if norm_out_activation:
            self.init_kwargs["norm_out_activation"] = True
            for part in (self.encoder, self.decoder):
                norm = part.blocks[-2]  # GroupNorm, then the output convolution
                if not isinstance(norm, nn.GroupNorm):
                    raise RuntimeError(f"expected a GroupNorm before the output convolution, found {norm}.")
                silu_norm = _GroupNormSiLU(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine)
                silu_norm.load_state_dict(norm.state_dict())
                part.blocks[-2] = silu_norm

    def _rebuild(
        self,
        spatial_dims: int,
        decoder_num_res_blocks: Sequence[int] | int | None,
        encoder_out_channels: int | None,
        kwargs: dict[str, Any],
    ) -> None:
        """Rebuild the decoder and/or the encoder with the extra layout options."""
        signature = inspect.signature(AutoencoderKL.__init__)
        bound = signature.bind(self, spatial_dims=spatial_dims, **kwargs)
        bound.apply_defaults()
        args = dict(bound.arguments)
        channels = tuple(args["channels"])
        num_res_blocks = args["num_res_blocks"]
        if isinstance(num_res_blocks, int):
            num_res_blocks = ensure_tuple_rep(num_res_blocks, len(channels))
        common = {
            "spatial_dims": spatial_dims,
            "channels": channels,
            "norm_num_groups": args["norm_num_groups"],
            "norm_eps": args["norm_eps"],
            "attention_levels": args["attention_levels"],
            "include_fc": args["include_fc"],
            "use_combined_linear": args["use_combined_linear"],
            "use_flash_attention": args["use_flash_attention"],
        }
        if decoder_num_res_blocks is not None:
            if isinstance(decoder_num_res_blocks, int):
                decoder_num_res_blocks = ensure_tuple_rep(decoder_num_res_blocks, len(channels))
            decoder_num_res_blocks = tuple(int(n) for n in decoder_num_res_blocks)
            if len(decoder_num_res_blocks) != len(channels) or min(decoder_num_res_blocks) < 1:
                raise ValueError(
                    f"decoder_num_res_blocks must be a positive int or one positive int per level of channels="
                    f"{list(channels)}, got {list(decoder_num_res_blocks)}."
                )
            self.init_kwargs["decoder_num_res_blocks"] = list(decoder_num_res_blocks)
            self.decoder = Decoder(
                in_channels=args["latent_channels"],
                out_channels=args["out_channels"],
                num_res_blocks=decoder_num_res_blocks,
                with_nonlocal_attn=args["with_decoder_nonlocal_attn"],
                use_convtranspose=args["use_convtranspose"],
                **common,
            )
        if encoder_out_channels is not None:
            if int(encoder_out_channels) < 1:
                raise ValueError(f"encoder_out_channels must be a positive int or None, got {encoder_out_channels}.")
            encoder_out_channels = int(encoder_out_channels)
            self.init_kwargs["encoder_out_channels"] = encoder_out_channels
            self.encoder = Encoder(
                in_channels=args["in_channels"],
                out_channels=encoder_out_channels,
                num_res_blocks=num_res_blocks,
                with_nonlocal_attn=args["with_encoder_nonlocal_attn"],
                **common,
            )
            for name in ("quant_conv_mu", "quant_conv_log_sigma"):
                conv = Convolution(
                    spatial_dims=spatial_dims,
                    in_channels=encoder_out_channels,
                    out_channels=args["latent_channels"],
                    strides=1,
                    kernel_size=1,
                    padding=0,
                    conv_only=True,
                )
                setattr(self, name, conv)


def build_autoencoder(network_kwargs: Mapping[str, Any]) -> AutoencoderKL:
    """Build the autoencoder that ``network_kwargs`` (as stored in a checkpoint) describes.

    MONAI's ``AutoencoderKL`` when the arguments are all MONAI's, :class:`SDCompatibleAutoencoderKL` when they use
    ``decoder_num_res_blocks``, ``encoder_out_channels`` or ``norm_out_activation`` (an imported Stable Diffusion VAE).

    Args:
        network_kwargs: constructor arguments.
    """
    if not isinstance(network_kwargs, Mapping) or "spatial_dims" not in network_kwargs:
        raise ValueError(
            f"network_kwargs must be a dictionary of AutoencoderKL arguments with at least 'spatial_dims', got "
            f"{network_kwargs!r}."
        )
    if any(network_kwargs.get(name) not in (None, False) for name in _EXTENSION_KWARGS):
        return SDCompatibleAutoencoderKL(**network_kwargs)
    return AutoencoderKL(**{k: v for k, v in network_kwargs.items() if k not in _EXTENSION_KWARGS})


# ----------------------------------------------------------------------------------------------------------------------
# training step
# ----------------------------------------------------------------------------------------------------------------------


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
    its weights do not change then. With ``engine.amp`` on a CUDA device both steps run under
    ``torch.autocast("cuda", **engine.amp_kwargs)`` (pass ``amp_kwargs={"dtype": torch.bfloat16}`` for bf16) and the
    losses in float32; ``engine.scaler`` (created by the trainer) scales both backward passes and is updated once per
    iteration. On the CPU the step runs in float32 whatever ``engine.amp`` says.

    The ``discriminator`` and ``perceptual_loss`` are moved to the images' device on the first call. The returned
    dictionary (``engine.state.output``) holds ``"image"``, ``"pred"`` (the reconstructions, detached), ``"loss"`` (the
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
        use_amp = bool(engine.amp) and images.device.type == "cuda"
        scaler = engine.scaler if use_amp and engine.scaler is not None and engine.scaler.is_enabled() else None
        autocast = (lambda: torch.autocast("cuda", **engine.amp_kwargs)) if use_amp else nullcontext
        set_to_none = getattr(engine, "optim_set_to_none", False)
        adversarial = self.adversarial_active(engine.state.iteration)

        # 1. generator step
        autoencoder.train()
        optimizer.zero_grad(set_to_none=set_to_none)
        with autocast():
            reconstruction, z_mu, z_sigma = autoencoder(images)
        engine.state.output = {"image": images, "pred": reconstruction}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        with autocast():
            recon_loss = F.l1_loss(reconstruction.float(), images.float())
            kl_loss = kl_divergence(z_mu.float(), z_sigma.float())
            loss = recon_loss + self.kl_weight * kl_loss
            perceptual = torch.zeros((), device=images.device)
            if self.perceptual_loss is not None:
                perceptual = self.perceptual_loss(reconstruction.float(), images.float()).float().mean()
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
                with autocast():
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
            "pred": reconstruction.detach(),
            "loss": loss.detach(),
            "recon_loss": recon_loss.item(),
            "kl_loss": kl_loss.item(),
            "perceptual_loss": perceptual.item(),
            "adv_loss": g_adv.item(),
            "d_loss": d_loss.item(),
        }
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


# ----------------------------------------------------------------------------------------------------------------------
# latent scale factor and checkpoints
# ----------------------------------------------------------------------------------------------------------------------


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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"autoencoder checkpoint {str(path)!r} does not exist; {_HOW_TO_GET_ONE.format(path=path)}."
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ValueError(
            f"{str(path)!r} cannot be read with torch.load(weights_only=True) ({error}); write autoencoder checkpoints "
            f"with bundle.autoencoder.save_autoencoder_checkpoint."
        ) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(_CKPT_WEIGHTS), Mapping):
        found = list(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{str(path)!r} is not an autoencoder checkpoint: expected a dictionary with the state dict under "
            f"{_CKPT_WEIGHTS!r}, found {found}; write it with bundle.autoencoder.save_autoencoder_checkpoint."
        )
    return checkpoint


def _checkpoint_scale_factor(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> float:
    if checkpoint.get(_CKPT_SCALE) is None:
        raise ValueError(
            f"{str(path)!r} holds no latent scale factor ({_CKPT_SCALE!r}); compute it once after stage 1 with "
            f"bundle.autoencoder.finalize_autoencoder (or compute_scale_factor + save_autoencoder_checkpoint)."
        )
    return _check_scale_factor(checkpoint[_CKPT_SCALE], f"the scale factor in {str(path)!r}")


def _names(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str, kwargs: Any) -> None:
    """``model.load_state_dict(state)`` with an error that names the keys that do not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} (network {tuple(own[k].shape)}, checkpoint {tuple(state[k].shape)})"
        for k in own
        if k in state and tuple(own[k].shape) != tuple(state[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {_names(missing)}")
    if unexpected:
        problems.append(f"not in the network: {_names(unexpected)}")
    if shapes:
        problems.append(f"different shapes: {_names(shapes, 4)}")
    if problems:
        raise ValueError(
            f"the network does not match {what}: {'; '.join(problems)}. The config's network settings must "
            f"match the ones the checkpoint was saved with ({kwargs}); for the autoencoder, build it from "
            f"the checkpoint with load_autoencoder_checkpoint(path) (autoencoder=None)."
        )
    model.load_state_dict(state, strict=True)


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
    _load_state_strict(unwrap_network(autoencoder), checkpoint[_CKPT_WEIGHTS], f"checkpoint {str(path)!r}", kwargs)
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


# ----------------------------------------------------------------------------------------------------------------------
# Stable Diffusion (diffusers) VAE import
# ----------------------------------------------------------------------------------------------------------------------

_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
# attention parameter names of diffusers checkpoints saved before diffusers 0.15 -> current names
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _resolve_vae_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"VAE folder {str(folder)!r} does not exist or is not a folder.")
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"  # the root of a Stable Diffusion pipeline folder
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} has no config.json; pass a diffusers AutoencoderKL folder (config.json + "
            f"diffusion_pytorch_model.safetensors), e.g. the 'vae' folder of a Stable Diffusion download."
        )
    return folder


def _read_diffusers_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    for name in _WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
        return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}, file
    raise FileNotFoundError(f"{str(folder)!r} holds none of the weight files {list(_WEIGHT_FILES)}.")


def _modernise_attention_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename legacy attention parameters (``query`` ... ``proj_attn``) and squeeze 1x1-conv attention weights."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if "attentions" in parts:
            at = parts.index("attentions") + 2  # <block>.attentions.<n>.<param name>.<weight|bias>
            if at < len(parts) - 1 and parts[at] in _LEGACY_ATTENTION_NAMES:
                parts[at] = _LEGACY_ATTENTION_NAMES[parts[at]]
                key = ".".join(parts)
            if key.endswith(".weight") and value.ndim > 2 and "group_norm" not in key:
                value = value.reshape(value.shape[0], value.shape[1])
        out[key] = value
    return out


def _diffusers_kwargs(config: Mapping[str, Any], use_combined_linear: bool, use_flash_attention: bool) -> dict:
    """MONAI constructor arguments for a diffusers ``AutoencoderKL`` config; raise for what cannot be held."""
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ValueError(f"config.json describes a {class_name!r}; only diffusers 'AutoencoderKL' folders convert.")
    channels = [int(c) for c in config.get("block_out_channels", (64,))]
    n = len(channels)
    down = list(config.get("down_block_types", ["DownEncoderBlock2D"] * n))
    up = list(config.get("up_block_types", ["UpDecoderBlock2D"] * n))
    problems = []
    if down != ["DownEncoderBlock2D"] * n:
        problems.append(f"down_block_types={down} (only DownEncoderBlock2D, {n} of them)")
    if up != ["UpDecoderBlock2D"] * n:
        problems.append(f"up_block_types={up} (only UpDecoderBlock2D, {n} of them)")
    if config.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn={config['act_fn']!r} (only 'silu')")
    if not config.get("mid_block_add_attention", True):
        problems.append("mid_block_add_attention=false (MONAI's mid block always has attention)")
    for name in ("shift_factor", "latents_mean", "latents_std"):
        if config.get(name) is not None:
            problems.append(f"{name}={config[name]} (this pipeline scales latents by one factor, no shift)")
    if problems:
        raise ValueError("cannot convert this diffusers VAE to MONAI's AutoencoderKL: " + "; ".join(problems) + ".")
    latent_channels = int(config.get("latent_channels", 4))
    layers = int(config.get("layers_per_block", 1))
    return {
        "spatial_dims": 2,
        "in_channels": int(config.get("in_channels", 3)),
        "out_channels": int(config.get("out_channels", 3)),
        "channels": channels,
        "num_res_blocks": [layers] * n,
        "attention_levels": [False] * n,
        "latent_channels": latent_channels,
        "norm_num_groups": int(config.get("norm_num_groups", 32)),
        "norm_eps": 1e-6,
        "with_encoder_nonlocal_attn": True,
        "with_decoder_nonlocal_attn": True,
        "include_fc": True,
        "use_combined_linear": bool(use_combined_linear),
        "use_flash_attention": bool(use_flash_attention),
        "decoder_num_res_blocks": [layers + 1] * n,
        "encoder_out_channels": 2 * latent_channels,
        "norm_out_activation": True,
    }


def _module_pairs(kwargs: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(MONAI module, diffusers module, kind)`` for every weighted module, walking both layouts level by level.

    Kinds: ``conv`` (MONAI ``Convolution`` wrapper, parameters under ``.conv``), ``norm`` (``GroupNorm``), ``linear``.
    """
    channels = list(kwargs["channels"])
    n = len(channels)
    pairs: list[tuple[str, str, str]] = []

    def resnet(monai: str, diffusers: str, in_ch: int, out_ch: int) -> None:
        for name in ("norm1", "norm2"):
            pairs.append((f"{monai}.{name}", f"{diffusers}.{name}", "norm"))
        for name in ("conv1", "conv2"):
            pairs.append((f"{monai}.{name}", f"{diffusers}.{name}", "conv"))
        if in_ch != out_ch:
            pairs.append((f"{monai}.nin_shortcut", f"{diffusers}.conv_shortcut", "conv"))

    def attention(monai: str, diffusers: str) -> None:
        pairs.append((f"{monai}.norm", f"{diffusers}.group_norm", "norm"))
        pairs.append((f"{monai}.attn", diffusers, "attention"))

    def mid_block(part: str, index: int, ch: int) -> int:
        resnet(f"{part}.blocks.{index}", f"{part}.mid_block.resnets.0", ch, ch)
        attention(f"{part}.blocks.{index + 1}", f"{part}.mid_block.attentions.0")
        resnet(f"{part}.blocks.{index + 2}", f"{part}.mid_block.resnets.1", ch, ch)
        return index + 3

    # encoder: conv_in, per level resnets (+ downsampler), mid block, norm, conv_out
    index = 0
    pairs.append((f"encoder.blocks.{index}", "encoder.conv_in", "conv"))
    index += 1
    ch = channels[0]
    for level in range(n):
        for r in range(kwargs["num_res_blocks"][level]):
            resnet(f"encoder.blocks.{index}", f"encoder.down_blocks.{level}.resnets.{r}", ch, channels[level])
            ch = channels[level]
            index += 1
        if level < n - 1:
            pairs.append((f"encoder.blocks.{index}.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv", "conv"))
            index += 1
    index = mid_block("encoder", index, ch)
    pairs.append((f"encoder.blocks.{index}", "encoder.conv_norm_out", "norm"))
    pairs.append((f"encoder.blocks.{index + 1}", "encoder.conv_out", "conv"))

    # decoder: conv_in, mid block, per level (channels reversed) resnets (+ upsampler), norm, conv_out
    reversed_channels = channels[::-1]
    pairs.append(("decoder.blocks.0", "decoder.conv_in", "conv"))
    index = mid_block("decoder", 1, reversed_channels[0])
    ch = reversed_channels[0]
    for level in range(n):
        for r in range(kwargs["decoder_num_res_blocks"][level]):
            resnet(f"decoder.blocks.{index}", f"decoder.up_blocks.{level}.resnets.{r}", ch, reversed_channels[level])
            ch = reversed_channels[level]
            index += 1
        if level < n - 1:
            pairs.append((f"decoder.blocks.{index}.postconv", f"decoder.up_blocks.{level}.upsamplers.0.conv", "conv"))
            index += 1
    pairs.append((f"decoder.blocks.{index}", "decoder.conv_norm_out", "norm"))
    pairs.append((f"decoder.blocks.{index + 1}", "decoder.conv_out", "conv"))
    return pairs


class _Source:
    """The diffusers state dict, recording which keys were read and which were asked for but absent."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = state
        self.used: set[str] = set()
        self.absent: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.state:
            self.absent.append(key)
            return torch.empty(0)
        self.used.add(key)
        return self.state[key]


def convert_diffusers_vae(
    folder: str | os.PathLike, use_combined_linear: bool = False, use_flash_attention: bool = False
) -> tuple[dict[str, Any], dict[str, torch.Tensor], float]:
    """Convert a local diffusers ``AutoencoderKL`` folder (e.g. Stable Diffusion's VAE) to MONAI's layout.

    The folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``, or the ``.fp16``
    variants; a pipeline root with a ``vae/`` subfolder works too). Nothing is downloaded. The mapping is derived from
    the config by walking both networks level by level:

    - convolutions: ``<diffusers>.{weight,bias}`` -> ``<MONAI>.conv.{weight,bias}``; resnet ``conv_shortcut`` ->
      ``nin_shortcut``; ``downsamplers.0.conv`` -> ``AEKLDownsample.conv``, ``upsamplers.0.conv`` ->
      ``Upsample.postconv`` (both libraries pad the downsampling asymmetrically and upsample by nearest neighbour);
    - attention (one head in both): ``group_norm`` -> ``norm``; ``to_q/to_k/to_v`` -> ``attn.to_q/to_k/to_v``, or
      concatenated in q, k, v order into ``attn.qkv`` with ``use_combined_linear``; ``to_out.0`` -> ``attn.out_proj``;
      legacy names ``query/key/value/proj_attn`` are accepted;
    - ``quant_conv`` (``2L -> 2L`` channels, mean first) -> ``quant_conv_mu`` (its first ``L`` output rows) and
      ``quant_conv_log_sigma`` (the last ``L``); without a ``quant_conv`` (``use_quant_conv: false``) these become
      exact channel selections, and a missing ``post_quant_conv`` becomes the identity.

    The result needs :class:`SDCompatibleAutoencoderKL` (``decoder_num_res_blocks = layers_per_block + 1``,
    ``encoder_out_channels = 2 * latent_channels``, ``norm_out_activation=True``); :func:`build_autoencoder` picks it
    from the returned arguments.
    Posterior mean, log-variance and decoder output equal diffusers' up to float rounding.

    Args:
        folder: the diffusers VAE folder.
        use_combined_linear: store the attention's q, k, v projections as one ``qkv`` linear layer. Defaults to False.
        use_flash_attention: build the network with ``use_flash_attention`` (no effect on the weights).

    Returns:
        The network's constructor arguments, its state dict, and the folder's ``scaling_factor`` (0.18215 for SD 1.x
        and 2.x, diffusers' default when the config has none).

    Raises:
        ValueError: for a layout that MONAI's AutoencoderKL cannot hold, or for weights that the rules leave unmapped
            or expect but do not find (named).
    """
    folder = _resolve_vae_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    kwargs = _diffusers_kwargs(config, use_combined_linear, use_flash_attention)
    weights, weight_file = _read_diffusers_weights(folder)
    source = _Source(_modernise_attention_names(weights))
    latent = kwargs["latent_channels"]
    state: dict[str, torch.Tensor] = {}
    for monai, diffusers, kind in _module_pairs(kwargs):
        if kind == "attention":
            names = ("to_q", "to_k", "to_v")
            projections = [source[f"{diffusers}.{name}.{p}"] for p in ("weight", "bias") for name in names]
            if use_combined_linear:
                state[f"{monai}.qkv.weight"] = torch.cat(projections[:3], dim=0)
                state[f"{monai}.qkv.bias"] = torch.cat(projections[3:], dim=0)
            else:
                for i, name in enumerate(("to_q", "to_k", "to_v")):
                    state[f"{monai}.{name}.weight"] = projections[i]
                    state[f"{monai}.{name}.bias"] = projections[i + 3]
            state[f"{monai}.out_proj.weight"] = source[f"{diffusers}.to_out.0.weight"]
            state[f"{monai}.out_proj.bias"] = source[f"{diffusers}.to_out.0.bias"]
            continue
        target = f"{monai}.conv" if kind == "conv" else monai
        for p in ("weight", "bias"):
            state[f"{target}.{p}"] = source[f"{diffusers}.{p}"]

    # quant convolutions: diffusers' quant_conv acts on [mean | log-variance] channels and is split by output row
    encoder_out = kwargs["encoder_out_channels"]
    if "quant_conv.weight" in source or "quant_conv.bias" in source:
        weight, bias = source["quant_conv.weight"], source["quant_conv.bias"]
    else:
        weight, bias = torch.eye(encoder_out).reshape(encoder_out, encoder_out, 1, 1), torch.zeros(encoder_out)
    state["quant_conv_mu.conv.weight"], state["quant_conv_log_sigma.conv.weight"] = weight[:latent], weight[latent:]
    state["quant_conv_mu.conv.bias"], state["quant_conv_log_sigma.conv.bias"] = bias[:latent], bias[latent:]
    if "post_quant_conv.weight" in source or "post_quant_conv.bias" in source:
        state["post_quant_conv.conv.weight"] = source["post_quant_conv.weight"]
        state["post_quant_conv.conv.bias"] = source["post_quant_conv.bias"]
    else:
        state["post_quant_conv.conv.weight"] = torch.eye(latent).reshape(latent, latent, 1, 1)
        state["post_quant_conv.conv.bias"] = torch.zeros(latent)

    unused = sorted(set(source.state) - source.used)
    if source.absent or unused:
        problems = []
        if source.absent:
            problems.append(f"expected but absent: {_names(source.absent)}")
        if unused:
            problems.append(f"unmapped: {_names(unused)}")
        raise ValueError(
            f"the weights in {str(weight_file)!r} do not fit the diffusers AutoencoderKL layout of its config.json ("
            f"{'; '.join(problems)}); check that config.json belongs to these weights."
        )
    # the rules must produce exactly the network's parameters and shapes
    _load_state_strict(build_autoencoder(kwargs), state, f"the weights converted from {str(weight_file)!r}", kwargs)
    return kwargs, state, float(config.get("scaling_factor", 0.18215))


def import_sd_vae(
    folder: str | os.PathLike,
    output_path: str | os.PathLike,
    use_combined_linear: bool = False,
    use_flash_attention: bool = False,
) -> Path:
    """Convert a local diffusers VAE folder and write it as an autoencoder checkpoint.

    The checkpoint's scale factor is the folder's ``scaling_factor`` (the value Stable Diffusion was trained with),
    so the diffusion stage can use the imported VAE without a stage-1 run. To fit latents of H&E patches instead,
    recompute it with :func:`finalize_autoencoder` on the loaded network.

    Args:
        folder: the diffusers VAE folder (see :func:`convert_diffusers_vae`).
        output_path: checkpoint to write, e.g. ``models/autoencoder.pt``.
        use_combined_linear: see :func:`convert_diffusers_vae`.
        use_flash_attention: see :func:`convert_diffusers_vae`.

    Returns:
        The checkpoint path.
    """
    kwargs, state, scale = convert_diffusers_vae(folder, use_combined_linear, use_flash_attention)
    model = build_autoencoder(kwargs)
    model.load_state_dict(state, strict=True)
    source = {"format": "diffusers", "folder": str(Path(folder).resolve())}
    return save_autoencoder_checkpoint(output_path, model, scale, network_kwargs=kwargs, extra={"source": source})
