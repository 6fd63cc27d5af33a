"""Expression guidance: steer sampling towards latents that read as the requested expression.

Classifier-free guidance only amplifies what the denoiser learned to tie to its condition. Within a compartment
(immune cells in stroma, their absence in tumour) that tie is weak on a short budget, so a spot whose expression is
edited is drawn much like the original. Expression guidance adds a second, explicit pull, in the spirit of
classifier guidance (Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021) applied to the
predicted clean sample (Bansal et al., "Universal Guidance for Diffusion Models", CVPR 2023 workshops):

1. :class:`ExpressionReader` is a small CNN that reads a clean (scaled) latent and predicts the spot's expression
   programmes: the leading principal components of the training spots' standardised log expression, each scaled to
   unit variance. :func:`fit_expression_reader` trains it on the stage-2 latent cache (every training spot in its 8
   flips/rotations) after the diffusion model, holding out a tenth of the spots to measure, per component, how well
   tissue reveals it (Pearson r). Components are weighted by that r squared (zero when r <= 0), so unreadable
   programmes exert no pull.
2. At each sampling step, :func:`guide_output` turns the network's output into the predicted clean latent ``x0``,
   moves ``x0`` down the gradient of the weighted squared error between the reader's programmes and the target
   spot's (``x0 - scale * grad``), and expresses the result again as the network's prediction type, so that the
   scheduler's step is unchanged. The UNet is not differentiated: only the reader is.

The reader is saved next to the model as ``models/expression_reader.pt`` with the gene panel and the autoencoder's
scale factor, which loading checks. ``expression_guidance_scale`` (0 = off) turns it on in the inference and
evaluation configs (``docs/fidelity.md`` measures it).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bundle.checkpoints import load_checkpoint, load_state_strict
from bundle.utils import atomic_path

__all__ = [
    "ExpressionReader",
    "fit_expression_reader",
    "guide_output",
    "load_expression_reader",
    "save_expression_reader",
    "train_expression_reader",
]

logger = logging.getLogger(__name__)

READER_HINT = (
    "train one with the model (expression_reader_iterations > 0 in configs/train.json, the default) or run "
    "scripts/train_expression_reader.py for an existing model; or set expression_guidance_scale to 0"
)
_READER_KEYS = ("reader", "config", "gene_panel", "scale_factor")


class ExpressionReader(nn.Module):
    """Reads a clean scaled latent ``(B, C, h, w)`` as ``(B, num_components)`` unit-variance expression programmes.

    The programmes are fixed at construction (buffers): ``gene_mean`` and ``gene_std`` standardise the centre spot's
    normalised expression, ``components`` ``(K, G)`` projects it, ``score_std`` scales each component to unit variance
    on the training spots, and ``weights`` ``(K,)`` are the guidance weights (held-out r squared).

    Args:
        latent_channels: channels of the latents.
        num_genes: genes of the panel.
        num_components: programmes read.
        channels: widths of the two convolutional stages (each halves the latent size).
    """

    def __init__(
        self, latent_channels: int, num_genes: int, num_components: int, channels: Sequence[int] = (64, 128)
    ) -> None:
        super().__init__()
        if num_components < 1 or num_components > num_genes:
            raise ValueError(f"num_components must be in [1, {num_genes}] (the panel's genes), got {num_components}.")
        c1, c2 = (int(c) for c in channels)
        self.features = nn.Sequential(
            nn.Conv2d(latent_channels + 1, c1, 3, padding=1),
            nn.GroupNorm(8, c1),
            nn.SiLU(),
            nn.Conv2d(c1, c1, 3, stride=2, padding=1),
            nn.GroupNorm(8, c1),
            nn.SiLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.GroupNorm(8, c2),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(c2, num_components)
        self.config = {
            "latent_channels": int(latent_channels),
            "num_genes": int(num_genes),
            "num_components": int(num_components),
            "channels": [c1, c2],
        }
        self.register_buffer("gene_mean", torch.zeros(num_genes))
        self.register_buffer("gene_std", torch.ones(num_genes))
        self.register_buffer("components", torch.eye(num_components, num_genes))
        self.register_buffer("score_std", torch.ones(num_components))
        self.register_buffer("weights", torch.ones(num_components))

    def forward(self, latents: torch.Tensor, noise_level: torch.Tensor | float | None = None) -> torch.Tensor:
        """Programmes ``(B, K)`` read from (noisy) latents; ``noise_level`` is ``sqrt(1 - alpha_bar_t)`` per sample
        (0, the default, for clean latents), given to the network as a constant extra channel."""
        level = torch.zeros((), device=latents.device) if noise_level is None else torch.as_tensor(noise_level)
        level = (
            level.to(latents.device, latents.dtype).reshape(-1, 1, 1, 1).expand(latents.shape[0], 1, *latents.shape[2:])
        )
        return self.head(self.features(torch.cat([latents, level], dim=1)))

    def programmes(self, expression: torch.Tensor) -> torch.Tensor:
        """The unit-variance programmes ``(B, K)`` of expression ``(B, G)`` or, with neighbours, ``(B, 1 + N, G)``
        (the centre spot, index 0, is read)."""
        centre = expression[:, 0] if expression.ndim == 3 else expression
        standard = (centre.float() - self.gene_mean) / self.gene_std
        return standard @ self.components.T / self.score_std

    def set_programmes(self, expression: np.ndarray, num_components: int | None) -> None:
        """Fit the programmes to training expression ``(N, G)``: standardise, then the ``num_components`` leading
        principal components, or every gene itself when ``num_components`` is None; each scaled to unit variance."""
        x = np.asarray(expression, dtype=np.float64)
        mean, std = x.mean(0), x.std(0)
        std[std < 1e-6] = 1.0
        standard = (x - mean) / std
        if num_components is None:
            components = np.eye(x.shape[1])
        else:
            _, _, vt = np.linalg.svd(standard - standard.mean(0), full_matrices=False)
            components = vt[:num_components]
        scores = standard @ components.T
        self.gene_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.gene_std.copy_(torch.as_tensor(std, dtype=torch.float32))
        self.components.copy_(torch.as_tensor(components, dtype=torch.float32))
        self.score_std.copy_(torch.as_tensor(np.maximum(scores.std(0), 1e-6), dtype=torch.float32))

    def guidance_loss(
        self, latents: torch.Tensor, targets: torch.Tensor, noise_level: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """Per-sample squared error ``(B,)`` between the programmes read from ``latents`` and ``targets``, weighted by
        ``weights`` and divided by their sum (so that the guidance scale does not grow with the panel)."""
        weights = self.weights / self.weights.sum().clamp(min=1e-8)
        return 0.5 * ((self(latents, noise_level) - targets) ** 2 * weights).sum(1)


def fit_expression_reader(
    latents: np.ndarray,
    expression: np.ndarray,
    scale_factor: float,
    num_components: int | None = 16,
    iterations: int = 1500,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    holdout: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    alphas_cumprod: torch.Tensor | np.ndarray | None = None,
    clean_fraction: float = 0.25,
) -> tuple[ExpressionReader, dict[str, Any]]:
    """Train an :class:`ExpressionReader` on cached latents.

    Args:
        latents: the latent cache ``(N, V, 2C, h, w)`` (posterior mean then log-variance per variant,
            :mod:`bundle.latent_cache`); the posterior means are read, times ``scale_factor``.
        expression: the training spots' normalised expression ``(N, G)`` (centre spots, datalist order).
        scale_factor: the autoencoder's latent scale factor (the sampler's latents are scaled by it).
        num_components: programmes to read (principal components of the standardised expression).
        iterations: optimiser steps.
        batch_size: spots per step (each in a random variant).
        learning_rate: AdamW learning rate.
        holdout: fraction of spots held out to measure each programme's readability (its guidance weight).
        seed: random seed (split, initialisation, batches).
        device: where to train.
        alphas_cumprod: the training noise schedule; when given, each latent is noised to a random training timestep
            (``clean_fraction`` of them are kept clean), so that the reader reads the sampler's noisy latents.
        clean_fraction: share of clean latents per batch when ``alphas_cumprod`` is given.

    Returns:
        The reader (eval mode, on CPU) and a summary: held-out Pearson r per programme, their weights, the spots used.
    """
    latents_n, expression = len(latents), np.asarray(expression, dtype=np.float32)
    if latents_n != len(expression):
        raise ValueError(f"the latent cache has {latents_n} spots but the expression has {len(expression)} rows.")
    if latents_n < 20:
        raise ValueError(f"an expression reader needs at least 20 training spots, got {latents_n}.")
    if not 0 < holdout < 0.5:
        raise ValueError(f"holdout must be in (0, 0.5), got {holdout}.")
    rng = np.random.default_rng(seed)
    order = rng.permutation(latents_n)
    num_held = max(2, int(round(holdout * latents_n)))
    held, fit = np.sort(order[:num_held]), np.sort(order[num_held:])
    channels = latents.shape[2] // 2
    torch.manual_seed(seed)
    reader = ExpressionReader(
        channels, expression.shape[1], expression.shape[1] if num_components is None else num_components
    )
    reader.set_programmes(expression[fit], num_components)
    reader = reader.to(device)
    targets = reader.programmes(torch.as_tensor(expression, device=device)).detach()
    optimizer = torch.optim.AdamW(reader.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, iterations))
    num_variants = latents.shape[1]
    alpha_bars = None if alphas_cumprod is None else torch.as_tensor(alphas_cumprod, dtype=torch.float32, device=device)

    def noised(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if alpha_bars is None:
            return x0, torch.zeros(len(x0), device=device)
        steps = torch.as_tensor(rng.integers(0, len(alpha_bars), size=len(x0)), device=device)
        a = alpha_bars[steps]
        a = torch.where(torch.as_tensor(rng.random(len(x0)) < clean_fraction, device=device), torch.ones_like(a), a)
        level = (1 - a).sqrt()
        return a.sqrt().view(-1, 1, 1, 1) * x0 + level.view(-1, 1, 1, 1) * torch.randn_like(x0), level

    def batch(indices: np.ndarray, variants: np.ndarray) -> torch.Tensor:
        rows = np.stack([np.asarray(latents[i, v, :channels], dtype=np.float32) for i, v in zip(indices, variants)])
        return torch.as_tensor(rows, device=device) * float(scale_factor)

    start = time.perf_counter()
    reader.train()
    for _ in range(int(iterations)):
        picked = rng.choice(fit, size=min(batch_size, len(fit)), replace=False)
        variants = rng.integers(0, num_variants, size=len(picked))
        loss = F.mse_loss(reader(*noised(batch(picked, variants))), targets[picked])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    reader.eval()
    with torch.no_grad():
        predicted = np.concatenate(
            [
                reader(batch(held[i : i + 256], np.zeros(len(held[i : i + 256]), int))).cpu().numpy()
                for i in range(0, len(held), 256)
            ]
        )
    from bundle.evaluation.fidelity import pearson_per_column

    r = np.nan_to_num(pearson_per_column(predicted, targets[held].cpu().numpy()), nan=0.0)  # constant: no weight
    reader.weights.copy_(torch.as_tensor(np.clip(r, 0.0, None) ** 2, dtype=torch.float32))
    summary = {
        "heldout_r": [round(float(v), 4) for v in r],
        "weights": [round(float(v), 4) for v in reader.weights.cpu()],
        "num_fit_spots": int(len(fit)),
        "num_heldout_spots": int(len(held)),
        "iterations": int(iterations),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return reader.cpu(), summary


def save_expression_reader(
    path: str | os.PathLike,
    reader: ExpressionReader,
    genes: Sequence[str],
    scale_factor: float,
    summary: dict[str, Any] | None = None,
) -> Path:
    """Write ``models/expression_reader.pt`` atomically: weights, programmes, gene panel, scale factor, summary."""
    state = {
        "reader": {k: v.detach().cpu() for k, v in reader.state_dict().items()},
        "config": dict(reader.config),
        "gene_panel": list(genes),
        "scale_factor": float(scale_factor),
        "summary": dict(summary or {}),
    }
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_expression_reader(
    path: str | os.PathLike,
    genes: Sequence[str] | None = None,
    scale_factor: float | None = None,
    device: str | torch.device = "cpu",
) -> ExpressionReader:
    """Load a reader written by :func:`save_expression_reader`; refuse one made for another panel or autoencoder."""
    state = load_checkpoint(path, "expression reader", READER_HINT, required=_READER_KEYS)
    if genes is not None and list(state["gene_panel"]) != list(genes):
        raise ValueError(
            f"expression reader {str(path)!r} was trained on another gene panel ({len(state['gene_panel'])} genes) "
            f"than the model ({len(genes)} genes); train it again for this model ({READER_HINT})."
        )
    if scale_factor is not None and abs(float(state["scale_factor"]) - float(scale_factor)) > 1e-6 * max(
        1.0, abs(float(scale_factor))
    ):
        raise ValueError(
            f"expression reader {str(path)!r} was trained on the latents of another autoencoder (scale factor "
            f"{float(state['scale_factor']):.6g}, the model's is {float(scale_factor):.6g}); train it again for this "
            f"model ({READER_HINT})."
        )
    config = state["config"]
    reader = ExpressionReader(
        config["latent_channels"], config["num_genes"], config["num_components"], config["channels"]
    )
    load_state_strict(reader, state["reader"], f"expression reader {str(path)!r}", config)
    reader.summary = dict(state.get("summary") or {})
    return reader.to(device).eval().requires_grad_(False)


def train_expression_reader(
    path: str | os.PathLike,
    dataset,
    expression_store: str | os.PathLike,
    genes: Sequence[str],
    scale_factor: float,
    iterations: int = 1000,
    num_components: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    scheduler=None,
) -> dict[str, Any] | None:
    """The training config's last step: fit the reader on the latent cache and save it to ``path`` (rank 0).

    Args:
        path: where to write the reader (``models/expression_reader.pt``).
        dataset: the :class:`bundle.latent_cache.LatentCacheDataset` of the training spots (its cache and datalist);
            None (the config's entry disabled) writes nothing.
        expression_store: the dataset's ``expression.npy`` (rows named by each item's ``expression`` index).
        genes: the gene panel.
        scale_factor: the autoencoder's latent scale factor.
        iterations: optimiser steps; 0 writes nothing.
        num_components: programmes read (None: every gene, the default; an integer: leading principal components).
        seed: random seed.
        device: where to train.
        scheduler: the training noise scheduler (the reader learns to read latents at its noise levels).

    Returns:
        The summary (:func:`fit_expression_reader`), or None when nothing was written (on every rank but 0, too).
    """
    from bundle import distributed

    if dataset is None or int(iterations) <= 0:
        return None
    summary = None
    if distributed.rank() == 0:
        store = np.load(expression_store, mmap_mode="r")
        rows = [int(item["expression"]) for item in dataset.data]
        reader, summary = fit_expression_reader(
            dataset.latents,
            np.asarray(store[rows]),
            scale_factor,
            num_components,
            int(iterations),
            seed=seed,
            device=device,
            alphas_cumprod=getattr(scheduler, "alphas_cumprod", None),
        )
        save_expression_reader(path, reader, genes, scale_factor, summary)
        r = np.asarray(summary["heldout_r"])
        print(
            f"expression reader: held-out r median {np.median(r):.3f} over {len(r)} programmes, "
            f"{summary['seconds']} s -> {path}"
        )
    distributed.barrier()
    return summary


def _alpha_bar(scheduler, t: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    return scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)[int(t)]


def guide_output(
    reader: ExpressionReader,
    output: torch.Tensor,
    latents: torch.Tensor,
    t: int | torch.Tensor,
    targets: torch.Tensor,
    scale: float,
    scheduler,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The network ``output`` at ``latents`` (step ``t``) with expression guidance towards ``targets``.

    The noise prediction becomes ``eps + scale * sqrt(1 - alpha_bar_t) * grad``, where ``grad`` is the gradient with
    respect to ``x_t`` of the reader's weighted squared error at noise level ``sqrt(1 - alpha_bar_t)``: classifier
    guidance with ``-loss`` as the log-likelihood. The result is returned in the scheduler's prediction type.

    Args:
        reader: the expression reader.
        output: the (CFG-combined) network output ``(B, C, h, w)`` in the scheduler's ``prediction_type``.
        latents: the noisy latents ``x_t``.
        t: the timestep.
        targets: ``(B, K)`` programmes of the requested expression (:meth:`ExpressionReader.programmes`).
        scale: guidance scale (0 leaves ``output`` unchanged).
        scheduler: the sampling scheduler (its ``alphas_cumprod`` and ``prediction_type``).
        mask: ``(B,)`` booleans, False for samples not to guide (e.g. the null condition).
    """
    if not scale:
        return output
    kind = str(getattr(scheduler, "prediction_type", "epsilon"))
    a = _alpha_bar(scheduler, t, latents.device)
    sa, sb = a.sqrt(), (1 - a).sqrt()
    if kind == "v_prediction":
        eps = sb * latents + sa * output
    elif kind == "epsilon":
        eps = output
    elif kind == "sample":
        eps = (latents - sa * output) / sb
    else:
        raise ValueError(f"expression guidance does not support prediction_type {kind!r}.")
    with torch.enable_grad():
        x = latents.detach().float().requires_grad_(True)
        loss = reader.guidance_loss(x, targets.to(x.device), sb.expand(x.shape[0]))
        (grad,) = torch.autograd.grad(loss.sum(), x)
    if mask is not None:
        grad = grad * mask.to(grad.device, grad.dtype).view(-1, *([1] * (grad.ndim - 1)))
    eps = eps + float(scale) * sb * grad
    if kind == "epsilon":
        return eps
    x0 = (latents - sb * eps) / sa
    return x0 if kind == "sample" else sa * eps - sb * x0
