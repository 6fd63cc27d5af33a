"""Importing the Stable Diffusion VAE: a local diffusers ``AutoencoderKL`` folder converted to
:class:`~bundle.autoencoder.networks.SDCompatibleAutoencoderKL` weights (:func:`convert_diffusers_vae`) and written as
an autoencoder checkpoint (:func:`import_sd_vae`), instead of training stage 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bundle.autoencoder.checkpoint import save_autoencoder_checkpoint
from bundle.autoencoder.networks import build_autoencoder
from bundle.checkpoints import load_state_strict, summarize_keys

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
            from bundle.checkpoints import load_checkpoint

            state = load_checkpoint(file, "diffusers VAE weights file", "use the vae/ folder of a diffusers model")
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

    def levels(part: str, blocks: str, sampler: tuple[str, str], level_channels: list[int], index: int) -> int:
        """Every level's resnets and (but after the last level) its down- or upsampler; returns the next index."""
        ch = level_channels[0]
        res_blocks = kwargs["num_res_blocks" if part == "encoder" else "decoder_num_res_blocks"]
        for level, out_ch in enumerate(level_channels):
            for r in range(res_blocks[level]):
                resnet(f"{part}.blocks.{index}", f"{part}.{blocks}.{level}.resnets.{r}", ch, out_ch)
                ch = out_ch
                index += 1
            if level < n - 1:
                pairs.append((f"{part}.blocks.{index}.{sampler[0]}", f"{part}.{blocks}.{level}.{sampler[1]}", "conv"))
                index += 1
        return index

    # encoder: conv_in, per level resnets (+ downsampler), mid block, norm, conv_out
    pairs.append(("encoder.blocks.0", "encoder.conv_in", "conv"))
    index = levels("encoder", "down_blocks", ("conv", "downsamplers.0.conv"), channels, 1)
    index = mid_block("encoder", index, channels[-1])
    pairs.append((f"encoder.blocks.{index}", "encoder.conv_norm_out", "norm"))
    pairs.append((f"encoder.blocks.{index + 1}", "encoder.conv_out", "conv"))

    # decoder: conv_in, mid block, per level (channels reversed) resnets (+ upsampler), norm, conv_out
    pairs.append(("decoder.blocks.0", "decoder.conv_in", "conv"))
    index = mid_block("decoder", 1, channels[-1])
    index = levels("decoder", "up_blocks", ("postconv", "upsamplers.0.conv"), channels[::-1], index)
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
            problems.append(f"expected but absent: {summarize_keys(source.absent)}")
        if unused:
            problems.append(f"unmapped: {summarize_keys(unused)}")
        raise ValueError(
            f"the weights in {str(weight_file)!r} do not fit the diffusers AutoencoderKL layout of its config.json ("
            f"{'; '.join(problems)}); check that config.json belongs to these weights."
        )
    # the rules must produce exactly the network's parameters and shapes
    load_state_strict(build_autoencoder(kwargs), state, f"the weights converted from {str(weight_file)!r}", kwargs)
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
