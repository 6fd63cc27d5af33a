"""Stage 1 of the latent diffusion model: the KL autoencoder.

Modules:

- :mod:`bundle.autoencoder.networks`: MONAI's ``AutoencoderKL`` and :class:`SDCompatibleAutoencoderKL` (the three
  layout options of Stable Diffusion's VAE), built from stored arguments by :func:`build_autoencoder`;
- :mod:`bundle.autoencoder.iteration`: :class:`AutoencoderKLIteration`, the generator and patch-discriminator step
  that MONAI's stock ``SupervisedTrainer`` runs as its ``iteration_update``, and :func:`kl_divergence`;
- :mod:`bundle.autoencoder.checkpoint`: the latent scale factor (:func:`compute_scale_factor`,
  :func:`finalize_autoencoder`) and the autoencoder checkpoint that stage 2 and inference read it from
  (:func:`save_autoencoder_checkpoint`, :func:`load_autoencoder_checkpoint`, :func:`read_scale_factor`);
- :mod:`bundle.autoencoder.sd_vae`: importing the Stable Diffusion VAE from a local diffusers folder instead of
  training (:func:`convert_diffusers_vae`, :func:`import_sd_vae`).

The names below are re-exported here, as the configs use them (``bundle.autoencoder.AutoencoderKLIteration``, ...).
"""

from bundle.autoencoder.checkpoint import (
    compute_scale_factor,
    finalize_autoencoder,
    load_autoencoder_checkpoint,
    read_scale_factor,
    save_autoencoder_checkpoint,
)
from bundle.autoencoder.iteration import AutoencoderKLIteration, kl_divergence
from bundle.autoencoder.networks import SDCompatibleAutoencoderKL, build_autoencoder
from bundle.autoencoder.sd_vae import convert_diffusers_vae, import_sd_vae

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
