"""The stage-1 network: :class:`SDCompatibleAutoencoderKL` and :func:`build_autoencoder`.

The first stage is MONAI's ``AutoencoderKL`` (Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion
Models", CVPR 2022). The Stable Diffusion VAE differs from it in three places (one more residual block per decoder level
than per encoder level; an encoder that outputs mean and log-variance together before a shared 1x1 ``quant_conv``; a
SiLU after the last normalisation of encoder and decoder, which MONAI omits), so it is held by
:class:`SDCompatibleAutoencoderKL`, a subclass that adds exactly those three options and is otherwise MONAI's network,
state-dict names included. :func:`build_autoencoder` builds whichever of the two stored constructor arguments describe.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import AutoencoderKL
from monai.networks.nets.autoencoderkl import Decoder, Encoder
from monai.utils import ensure_tuple_rep
from torch import nn

# constructor arguments that SDCompatibleAutoencoderKL adds to MONAI's AutoencoderKL
_EXTENSION_KWARGS = ("decoder_num_res_blocks", "encoder_out_channels", "norm_out_activation")


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
