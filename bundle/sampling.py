"""Expression-to-tissue sampling, written like a diffusers pipeline: check inputs, numbered steps, explicit generator."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ExpressionToTissuePipeline"]


class ExpressionToTissuePipeline:
    """Generate H&E patches for expression conditions with a trained latent diffusion model.

    Classifier-free guidance runs as one batched forward over ``[null, condition]`` (the null condition is -1
    everywhere, as in training) and combines ``uncond + scale * (cond - uncond)``.

    Args:
        network: the diffusion network (:class:`bundle.networks.GeneConditionedUNet`, usually its EMA copy).
        autoencoder: the stage-1 ``AutoencoderKL``.
        scheduler: a MONAI scheduler (``DDIMScheduler`` for few-step sampling, ``DDPMScheduler``), configured with the
            training schedule and ``prediction_type``.
        scale_factor: latent scale factor stored in the autoencoder checkpoint.
        latent_shape: ``(channels, height, width)`` of one latent.
        num_inference_steps: default number of denoising steps. Defaults to 50.
        guidance_scale: default CFG scale; 1.0 or None means no guidance. Defaults to 3.0.
        null_value: the unconditional condition value. Defaults to -1.0.
    """

    def __init__(
        self,
        network: nn.Module,
        autoencoder: nn.Module,
        scheduler,
        scale_factor: float,
        latent_shape: Sequence[int],
        num_inference_steps: int = 50,
        guidance_scale: float | None = 3.0,
        null_value: float = -1.0,
    ) -> None:
        if scale_factor <= 0:
            raise ValueError(f"scale_factor must be positive (read it from the autoencoder checkpoint), got {scale_factor}.")
        if len(latent_shape) != 3:
            raise ValueError(f"latent_shape must be (channels, height, width), got {tuple(latent_shape)}.")
        self.network, self.autoencoder, self.scheduler = network, autoencoder, scheduler
        self.scale_factor = float(scale_factor)
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.num_inference_steps, self.guidance_scale, self.null_value = num_inference_steps, guidance_scale, null_value

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def check_inputs(self, condition: torch.Tensor, num_inference_steps: int, guidance_scale: float | None) -> None:
        """Raise ``ValueError`` with what to do when an input does not fit the model."""
        num_genes = getattr(self.network, "num_genes", None)
        num_neighbors = getattr(self.network, "num_neighbors", 0) or 0
        if condition.ndim not in (2, 3):
            raise ValueError(f"condition must be (B, num_genes) or (B, 1 + num_neighbors, num_genes), got {tuple(condition.shape)}.")
        if num_genes is not None and condition.shape[-1] != num_genes:
            raise ValueError(
                f"condition has {condition.shape[-1]} genes but the model was trained on a {num_genes}-gene panel; "
                "select the panel's genes (SelectGenesd with the checkpoint's gene_panel)."
            )
        if num_neighbors and (condition.ndim != 3 or condition.shape[1] != 1 + num_neighbors):
            raise ValueError(
                f"the model uses {num_neighbors} neighbouring spots: condition must be (B, {1 + num_neighbors}, "
                f"{num_genes}) (SpatialContextd), got {tuple(condition.shape)}."
            )
        if num_inference_steps < 1 or num_inference_steps > self.scheduler.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in [1, {self.scheduler.num_train_timesteps}], got {num_inference_steps}."
            )
        if guidance_scale is not None and guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (1.0 = no guidance), got {guidance_scale}.")

    @torch.no_grad()
    def __call__(
        self,
        condition: torch.Tensor,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Generate ``(B, 3, H, W)`` patches in [0, 1] for conditions ``(B, G)`` or ``(B, 1 + K, G)``."""
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        condition = torch.as_tensor(condition, dtype=torch.float32)
        self.check_inputs(condition, steps, scale)
        device = self.device
        condition = condition.to(device)
        was_training = self.network.training
        self.network.eval()
        self.autoencoder.eval()
        try:
            # 1. timesteps
            self.scheduler.set_timesteps(steps, device=device)
            # 2. initial latents, drawn on the generator's device so that a seed gives the same image everywhere
            gen_device = generator.device if generator is not None else torch.device("cpu")
            latents = torch.randn((condition.shape[0], *self.latent_shape), generator=generator, device=gen_device)
            latents = latents.to(device)
            guided = scale is not None and scale != 1.0
            if guided:
                both = torch.cat([torch.full_like(condition, self.null_value), condition], dim=0)
            # 3. denoise
            for t in self.scheduler.timesteps:
                timesteps = torch.full((latents.shape[0] * (2 if guided else 1),), int(t), device=device, dtype=torch.long)
                if guided:
                    out = self.network(torch.cat([latents, latents], dim=0), timesteps, both)
                    uncond, cond = out.chunk(2)
                    out = uncond + scale * (cond - uncond)
                else:
                    out = self.network(latents, timesteps, condition)
                latents, _ = self.scheduler.step(out, t, latents)
            # 4. decode and rescale to [0, 1]
            images = self.autoencoder.decode_stage_2_outputs(latents / self.scale_factor)
        finally:
            self.network.train(was_training)
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)
