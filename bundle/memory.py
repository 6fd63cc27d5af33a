"""Precision and memory options of training and sampling: autocast on any device and activation checkpointing.

MONAI's engines (``SupervisedTrainer``, ``SupervisedEvaluator``) run their ``amp`` option as
``torch.autocast("cuda")`` with a ``torch.cuda.amp.GradScaler``: on the CPU that autocast is disabled (the step runs
in float32, with a warning), and on a GPU the loss of a bf16 step is scaled although bf16 has float32's exponent range
and needs no loss scaling. The configs therefore give the engines ``amp`` only where loss scaling is needed (float16
on CUDA, :func:`monai_amp`) and autocast themselves, on the device the tensors are on:

- :class:`AutocastInferer` wraps an engine's inferer (the network's forward under autocast, its output in float32);
- :func:`autocast` is the context both it and :class:`bundle.autoencoder.AutoencoderKLIteration` and
  :class:`bundle.sampling.pipeline.ExpressionToTissuePipeline` use.

:func:`activation_checkpointing` recomputes the activations of a network's resnet and attention blocks in the
backward pass instead of keeping them (``torch.utils.checkpoint``, non-reentrant): less memory for more compute. The
blocks keep their parameters and names, so state dicts and checkpoints are the same with it on or off.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from monai.inferers import Inferer
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "AutocastInferer",
    "activation_checkpointing",
    "amp_dtype",
    "autocast",
    "checkpointed_blocks",
    "default_block_types",
    "monai_amp",
]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def amp_dtype(device: str | torch.device, amp_kwargs: Mapping[str, Any] | None = None) -> torch.dtype:
    """The dtype autocast uses on ``device`` with ``amp_kwargs``: its ``dtype``, else torch's default for the device
    type (float16 on CUDA, bfloat16 on the CPU)."""
    dtype = (amp_kwargs or {}).get("dtype")
    return dtype if dtype is not None else torch.get_autocast_dtype(torch.device(device).type)


def autocast(
    device: str | torch.device, enabled: bool = True, amp_kwargs: Mapping[str, Any] | None = None
) -> AbstractContextManager:
    """``torch.autocast`` for the type of ``device`` (``"cpu"``, ``"cuda"``, ...) with ``amp_kwargs`` (e.g.
    ``{"dtype": torch.bfloat16}``), or a null context when not ``enabled``."""
    if not enabled:
        return nullcontext()
    return torch.autocast(torch.device(device).type, **dict(amp_kwargs or {}))


def monai_amp(amp: bool, amp_kwargs: Mapping[str, Any] | None, device: str | torch.device) -> bool:
    """The ``amp`` to give MONAI's engines: True only for float16 autocast on CUDA, the one case that needs MONAI's
    ``GradScaler``. With bf16 (or on the CPU) the engines get False and the autocast comes from
    :class:`AutocastInferer` (and the stage-1 iteration's own ``amp``)."""
    device = torch.device(device)
    return bool(amp) and device.type == "cuda" and amp_dtype(device, amp_kwargs) == torch.float16


def _float32(output: Any) -> Any:
    """``output`` with its bf16/float16 tensors (also inside tuples, lists and dicts) cast to float32."""
    if isinstance(output, torch.Tensor):
        return output.float() if output.dtype in _LOW_PRECISION else output
    if isinstance(output, (tuple, list)):
        return type(output)(_float32(v) for v in output)
    if isinstance(output, dict):
        return {k: _float32(v) for k, v in output.items()}
    return output


class AutocastInferer(Inferer):
    """Run another inferer (and so the network's forward) under autocast on the inputs' device; outputs in float32.

    The engine's loss and metrics then see float32 predictions, as without autocast. Give the engine ``amp=False``
    (or :func:`monai_amp`): MONAI's own ``amp`` would add ``torch.autocast("cuda")`` and a ``GradScaler``.

    Args:
        inferer: the inferer to wrap, e.g. ``monai.inferers.DiffusionInferer``.
        enabled: autocast on or off (off: the wrapped inferer unchanged). Defaults to True.
        amp_kwargs: arguments of ``torch.autocast`` besides the device type, e.g. ``{"dtype": torch.bfloat16}``.
    """

    def __init__(self, inferer: Inferer, enabled: bool = True, amp_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if not callable(inferer):
            raise ValueError(f"inferer must be callable (a MONAI Inferer), got {type(inferer).__name__}.")
        self.inferer, self.enabled, self.amp_kwargs = inferer, bool(enabled), dict(amp_kwargs or {})

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        with autocast(inputs.device, self.enabled, self.amp_kwargs):
            output = self.inferer(inputs, network, *args, **kwargs)
        return _float32(output) if self.enabled else output


# --- activation checkpointing ---------------------------------------------------------------------------------------


class _Checkpointed:
    """Mixin of the block classes :func:`activation_checkpointing` gives a network's blocks: ``forward`` through
    ``torch.utils.checkpoint`` while training with gradients, the block's own ``forward`` otherwise."""

    _checkpointed_base: type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
        return super().forward(*args, **kwargs)


_CHECKPOINTED_CLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    if cls not in _CHECKPOINTED_CLASSES:
        _CHECKPOINTED_CLASSES[cls] = type(
            f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {"_checkpointed_base": cls, "__module__": __name__}
        )
    return _CHECKPOINTED_CLASSES[cls]


def default_block_types() -> tuple[type, ...]:
    """The blocks checkpointed by default: MONAI's ``AutoencoderKL`` resnet blocks and (non-local) attention blocks,
    and ``DiffusionModelUNet``'s resnet blocks and spatial transformers."""
    from monai.networks.blocks import SpatialAttentionBlock
    from monai.networks.nets.autoencoderkl import AEKLResBlock
    from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock, SpatialTransformer

    return (AEKLResBlock, SpatialAttentionBlock, DiffusionUNetResnetBlock, SpatialTransformer)


def checkpointed_blocks(network: nn.Module) -> list[str]:
    """Names of the blocks of ``network`` that run under activation checkpointing."""
    return [name for name, module in network.named_modules() if isinstance(module, _Checkpointed)]


def _outer_blocks(module: nn.Module, block_types: tuple[type, ...]) -> Iterable[nn.Module]:
    """The modules of ``block_types`` under ``module``, not descending into one already found."""
    for child in module.children():
        if isinstance(child, block_types):
            yield child
        else:
            yield from _outer_blocks(child, block_types)


def activation_checkpointing(
    network: nn.Module, enabled: bool = True, block_types: Iterable[type] | None = None
) -> nn.Module:
    """Turn activation checkpointing of ``network``'s blocks on (or off) in place and return ``network``.

    Each block of ``block_types`` (default :func:`default_block_types`; nested ones count once, the outer one is
    checkpointed) keeps its parameters, buffers and names: its class becomes a subclass whose ``forward`` runs the
    original one through ``torch.utils.checkpoint(..., use_reentrant=False)`` when the block is in training mode and
    gradients are enabled, so the activations inside the block are recomputed in the backward pass instead of kept.
    Evaluation and ``torch.no_grad`` forwards are unchanged. Works through ``DistributedDataParallel`` wrappers and is
    kept by ``copy.deepcopy``; a network with checkpointed blocks cannot be pickled whole (save its ``state_dict``).

    Args:
        network: the network (or a wrapper such as ``DistributedDataParallel``).
        enabled: True to checkpoint the blocks, False to restore their classes. Defaults to True.
        block_types: the block classes to checkpoint. Defaults to :func:`default_block_types`.
    """
    if not isinstance(network, nn.Module):
        raise ValueError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
    if not enabled:
        for module in network.modules():
            if isinstance(module, _Checkpointed):
                module.__class__ = module._checkpointed_base
        return network
    types = tuple(default_block_types() if block_types is None else block_types)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise ValueError(f"block_types must be torch.nn.Module subclasses, got {types}.")
    for block in _outer_blocks(network, types):
        if not isinstance(block, _Checkpointed):
            block.__class__ = _checkpointed_class(type(block))
    return network
