"""Expression-to-tissue sampling, written like a diffusers pipeline: check inputs, numbered steps, explicit generator."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from bundle.memory import autocast

__all__ = ["ExpressionToTissuePipeline", "seeded_generators"]

Generators = torch.Generator | Sequence[torch.Generator] | None


def seeded_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One ``torch.Generator`` per sample, seeded with ``seeds[i]``: the same seed gives the same patch in any batch."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


class ExpressionToTissuePipeline:
    """Generate H&E patches for expression conditions with a trained latent diffusion model.

    Classifier-free guidance runs as one batched forward over ``[null, condition]`` (the null condition is -1
    everywhere, as in training) and combines ``uncond + scale * (cond - uncond)``.

    Randomness comes only from the generators passed in. With one generator per sample (see
    :func:`seeded_generators`) a sample's patch depends on its own seed alone, not on its position in the batch or the
    batch size; a single generator draws the batch's noise in one go (as diffusers does). Initial latents are drawn on
    the generator's device (CPU generators give the same image on any device); the step noise of stochastic samplers
    (``DDPMScheduler``, ``DDIMScheduler`` with ``eta > 0``) is drawn per sample on the model's device from a generator
    seeded by the sample's generator.

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
        eta: DDIM noise (0 = deterministic DDIM); ignored by other schedulers. Defaults to 0.0.
        batched_guidance: run the unconditional and conditional branches of CFG as one batched forward (default) or
            as two forwards (same result, for benchmarking and low-memory devices).
        amp: run the network's and the decoder's forward passes under ``torch.autocast`` in ``amp_dtype`` on the
            model's device (CPU or CUDA); their outputs, the scheduler steps and the latents stay float32. Defaults to
            False (float32). :meth:`set_amp` changes it on a built pipeline.
        amp_dtype: the autocast dtype. Defaults to ``torch.bfloat16``.
        expression_reader: an :class:`bundle.expression_guidance.ExpressionReader` for expression guidance; None
            (default) samples without it.
        expression_guidance_scale: step size of expression guidance on the predicted clean latent
            (:func:`bundle.expression_guidance.guide_output`); 0 (default) is off.
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
        eta: float = 0.0,
        batched_guidance: bool = True,
        amp: bool = False,
        amp_dtype: torch.dtype = torch.bfloat16,
        expression_reader: nn.Module | None = None,
        expression_guidance_scale: float = 0.0,
    ) -> None:
        if scale_factor <= 0:
            raise ValueError(
                f"scale_factor must be positive (read it from the autoencoder checkpoint), got {scale_factor}."
            )
        if len(latent_shape) != 3:
            raise ValueError(f"latent_shape must be (channels, height, width), got {tuple(latent_shape)}.")
        self.network, self.autoencoder, self.scheduler = network, autoencoder, scheduler
        self.scale_factor = float(scale_factor)
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.num_inference_steps, self.guidance_scale, self.null_value = num_inference_steps, guidance_scale, null_value
        self.eta, self.batched_guidance = float(eta), bool(batched_guidance)
        self.set_amp(amp, amp_dtype)
        self.set_expression_guidance(expression_reader, expression_guidance_scale)

    def set_expression_guidance(self, reader: nn.Module | None, scale: float = 0.0) -> "ExpressionToTissuePipeline":
        """Use ``reader`` with step size ``scale`` for expression guidance (``scale`` 0 or no reader: off); returns the
        pipeline."""
        scale = float(scale)
        if not scale >= 0 or scale == float("inf"):
            raise ValueError(f"expression_guidance_scale must be a finite number >= 0 (0 = off), got {scale}.")
        if scale > 0 and reader is None:
            raise ValueError("expression_guidance_scale > 0 needs an expression reader (models/expression_reader.pt).")
        reader_genes = getattr(reader, "config", {}).get("num_genes")
        num_genes = getattr(self.network, "num_genes", None)
        if reader is not None and num_genes is not None and reader_genes not in (None, num_genes):
            raise ValueError(f"the expression reader reads {reader_genes} genes but the model has {num_genes}.")
        self.expression_reader = reader
        self.expression_guidance_scale = scale if reader is not None else 0.0
        return self

    def set_amp(self, enabled: bool = True, dtype: torch.dtype = torch.bfloat16) -> "ExpressionToTissuePipeline":
        """Autocast the network and the decoder in ``dtype`` (or run them in float32 when not ``enabled``); returns the
        pipeline, so that a config can write ``load_pipeline(...).set_amp(@amp, @amp_dtype)``."""
        if enabled and dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be torch.bfloat16 or torch.float16, got {dtype}.")
        self.amp, self.amp_dtype = bool(enabled), dtype
        return self

    def _autocast(self):
        return autocast(self.device, self.amp, {"dtype": self.amp_dtype})

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def stochastic(self) -> bool:
        """Whether a denoising step draws noise (DDPM, or DDIM with ``eta > 0``)."""
        from monai.networks.schedulers import DDIMScheduler

        return not isinstance(self.scheduler, DDIMScheduler) or self.eta > 0

    def check_inputs(
        self,
        condition: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float | None,
        generator: Generators = None,
    ) -> None:
        """Raise ``ValueError`` with what to do when an input does not fit the model."""
        num_genes = getattr(self.network, "num_genes", None)
        num_neighbors = getattr(self.network, "num_neighbors", 0) or 0
        if condition.ndim not in (2, 3):
            raise ValueError(
                f"condition must be (B, num_genes) or (B, 1 + num_neighbors, num_genes), got {tuple(condition.shape)}."
            )
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
        if not torch.isfinite(condition).all():
            raise ValueError("condition contains NaN or infinite values; fill missing genes (e.g. with 0) first.")
        if num_inference_steps < 1 or num_inference_steps > self.scheduler.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in [1, {self.scheduler.num_train_timesteps}], got {num_inference_steps}."
            )
        if guidance_scale is not None and guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (1.0 = no guidance), got {guidance_scale}.")
        if isinstance(generator, Sequence) and len(generator) != condition.shape[0]:
            raise ValueError(
                f"got {len(generator)} generators for {condition.shape[0]} conditions; pass one per sample "
                "(seeded_generators(seeds)) or a single generator."
            )

    def prepare_latents(self, batch_size: int, generator: Generators = None) -> torch.Tensor:
        """Initial Gaussian latents ``(B, *latent_shape)`` on the model's device."""
        if isinstance(generator, Sequence):
            latents = [torch.randn((1, *self.latent_shape), generator=g, device=g.device) for g in generator]
            return torch.cat([x.to(self.device) for x in latents])
        gen_device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn((batch_size, *self.latent_shape), generator=generator, device=gen_device).to(self.device)

    def step_generators(self, batch_size: int, generator: Generators = None) -> list[torch.Generator | None] | None:
        """Per-sample generators on the model's device for the noise of stochastic steps (None for DDIM with eta 0)."""
        if not self.stochastic or generator is None:
            return None
        gens = list(generator) if isinstance(generator, Sequence) else [generator] * batch_size
        seeds = [int(torch.randint(0, 2**62, (1,), generator=g, device=g.device)) for g in gens]
        return seeded_generators(seeds, self.device)

    def guided_output(
        self, latents: torch.Tensor, t: int | torch.Tensor, condition: torch.Tensor, guidance_scale: float | None
    ) -> torch.Tensor:
        """Network output at timestep ``t`` with classifier-free guidance (one batched forward unless disabled)."""
        timesteps = torch.full((latents.shape[0],), int(t), device=latents.device, dtype=torch.long)
        if guidance_scale is None or guidance_scale == 1.0:
            return self._forward(latents, timesteps, condition)
        null = torch.full_like(condition, self.null_value)
        if self.batched_guidance:
            out = self._forward(
                torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), torch.cat([null, condition])
            )
            uncond, cond = out.chunk(2)
        else:
            uncond = self._forward(latents, timesteps, null)
            cond = self._forward(latents, timesteps, condition)
        return uncond + guidance_scale * (cond - uncond)

    def _forward(self, latents: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The network's output (float32), under autocast when ``amp`` is on."""
        with self._autocast():
            return self.network(latents, timesteps, condition).float()

    def step(
        self, output: torch.Tensor, t: int | torch.Tensor, latents: torch.Tensor, generators: list | None = None
    ) -> torch.Tensor:
        """One scheduler step; stochastic schedulers draw each sample's noise from its own generator."""
        kwargs = {"eta": self.eta} if "eta" in inspect.signature(self.scheduler.step).parameters else {}
        if generators is None:
            return self.scheduler.step(output, t, latents, **kwargs)[0]
        return torch.cat(
            [
                self.scheduler.step(output[i : i + 1], t, latents[i : i + 1], generator=g, **kwargs)[0]
                for i, g in enumerate(generators)
            ]
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode scaled latents to images in [0, 1]."""
        with self._autocast():
            images = self.autoencoder.decode_stage_2_outputs(latents / self.scale_factor).float()
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)

    def expression_guidance(self, condition: torch.Tensor):
        """``(output, latents, t) -> output`` that applies expression guidance towards ``condition`` (identity when
        off; samples whose condition is the null condition are not guided)."""
        reader, scale = self.expression_reader, self.expression_guidance_scale
        if reader is None or not scale:
            return lambda output, latents, t: output
        from bundle.expression_guidance import guide_output

        reader = reader.to(self.device)
        targets = reader.programmes(condition).detach()
        centre = condition[:, 0] if condition.ndim == 3 else condition
        mask = ~(centre == self.null_value).all(dim=-1)
        return lambda output, latents, t: guide_output(reader, output, latents, t, targets, scale, self.scheduler, mask)

    @torch.no_grad()
    def __call__(
        self,
        condition: torch.Tensor,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: Generators = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Generate ``(B, 3, H, W)`` patches in [0, 1] for conditions ``(B, G)`` or ``(B, 1 + K, G)``.

        Args:
            condition: normalised expression (panel order), optionally with the neighbours from ``SpatialContextd``.
            num_inference_steps: denoising steps (defaults to the pipeline's).
            guidance_scale: CFG scale (defaults to the pipeline's; 1.0 = no guidance).
            generator: a generator, one per sample, or None (global RNG).
            progress: show a progress bar over the steps.
        """
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        condition = torch.as_tensor(condition, dtype=torch.float32)
        self.check_inputs(condition, steps, scale, generator)
        condition = condition.to(self.device)
        was_training = self.network.training
        self.network.eval()
        self.autoencoder.eval()
        try:
            # 1. timesteps
            self.scheduler.set_timesteps(steps, device=self.device)
            # 2. initial latents and the generators of the step noise
            latents = self.prepare_latents(condition.shape[0], generator)
            generators = self.step_generators(condition.shape[0], generator)
            # 3. denoise
            timesteps = self.scheduler.timesteps
            if progress:
                from tqdm.auto import tqdm

                timesteps = tqdm(timesteps, desc="denoising", leave=False)
            guide = self.expression_guidance(condition)
            for t in timesteps:
                output = guide(self.guided_output(latents, t, condition, scale), latents, t)
                latents = self.step(output, t, latents, generators)
            # 4. decode and rescale to [0, 1]
            images = self.decode(latents)
        finally:
            self.network.train(was_training)
        return images
