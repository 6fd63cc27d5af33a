"""Precision and memory options (bundle/memory.py): bf16 autocast on the CPU in both training stages, validation and
sampling, without a GradScaler; activation checkpointing of the networks' blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.inferers import DiffusionInferer
from monai.networks.nets import PatchDiscriminator
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from bundle.autoencoder import AutoencoderKLIteration
from bundle.engines import LatentDiffusionPrepareBatch
from bundle.memory import AutocastInferer, activation_checkpointing, amp_dtype, checkpointed_blocks, monai_amp
from bundle.sampling.pipeline import ExpressionToTissuePipeline, seeded_generators
from tests.helpers import CONFIGS, TINY_AUTOENCODER, randomize_zero_init, tiny_autoencoder, tiny_network

BF16 = {"dtype": torch.bfloat16}
NUM_GENES, NUM_NEIGHBORS, SIZE = 12, 2, 16


class Precision:
    """Forward hooks on every convolution and linear layer of some modules: the dtype of each output, and the
    autocast state of the CPU while it was computed."""

    def __init__(self, *modules: nn.Module) -> None:
        self.seen: list[tuple[torch.dtype, bool, torch.dtype]] = []
        self.handles = [
            m.register_forward_hook(self.hook)
            for module in modules
            for m in module.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
        ]

    def hook(self, module, inputs, output) -> None:
        self.seen.append((output.dtype, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    def all_bf16(self) -> bool:
        return bool(self.seen) and all(s == (torch.bfloat16, True, torch.bfloat16) for s in self.seen)

    def all_float32(self) -> bool:
        return bool(self.seen) and all(dtype == torch.float32 and not on for dtype, on, _ in self.seen)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def assert_float32_finite_and_trained(module: nn.Module, before: torch.Tensor) -> None:
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in module.parameters())
    after = params(module)
    assert torch.isfinite(after).all() and not torch.equal(after, before)


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2.0 - 1.0


def conditions(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1 + NUM_NEIGHBORS, NUM_GENES, generator=torch.Generator().manual_seed(seed)) * 3.0


def test_monai_engines_get_amp_only_for_float16_on_cuda():
    """bf16 needs no loss scaling: MONAI's engines (GradScaler) get amp only for float16 on CUDA."""
    assert not monai_amp(True, BF16, "cpu") and not monai_amp(True, BF16, "cuda")
    assert monai_amp(True, {"dtype": torch.float16}, "cuda") and monai_amp(True, {}, "cuda")  # torch's CUDA default
    assert not monai_amp(False, {"dtype": torch.float16}, "cuda") and not monai_amp(True, {}, "cpu")
    assert amp_dtype("cpu") == torch.bfloat16 and amp_dtype(torch.device("cuda"), BF16) == torch.bfloat16


def test_train_config_wires_amp_on_the_cpu():
    """configs/train.json with amp true on the CPU: every engine's precision as the bundle runs it."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser["device"] = "$torch.device('cpu')"
    parser["amp"] = True
    assert parser.get_parsed_content("monai_amp") is False
    for engine in ("train#trainer", "validate#evaluator"):
        inferer = parser.get_parsed_content(f"{engine}#inferer")
        assert isinstance(inferer, AutocastInferer) and inferer.enabled and inferer.amp_kwargs == BF16
        assert isinstance(inferer.inferer, DiffusionInferer)
    assert parser.get_parsed_content("autoencoder_train#trainer#amp") is False
    assert parser.get_parsed_content("autoencoder_train#iteration#amp") is True
    assert parser.get_parsed_content("autoencoder_train#iteration#amp_kwargs") == BF16
    assert parser.get_parsed_content("sampler#amp") is True
    assert parser.get_parsed_content("sampler#amp_dtype") == torch.bfloat16
    parser["amp"] = "$torch.cuda.is_available()"  # the default: off on a machine without CUDA
    parser["autoencoder_kwargs"] = TINY_AUTOENCODER
    parser.parse()
    assert parser.get_parsed_content("train#trainer#inferer").enabled == torch.cuda.is_available()
    assert not checkpointed_blocks(parser.get_parsed_content("autoencoder_train#trainer#network"))
    parser["autoencoder_activation_checkpointing"] = True  # stage 1 only; activation_checkpointing sets both stages
    parser.parse()
    assert checkpointed_blocks(parser.get_parsed_content("autoencoder_train#trainer#network"))
    assert parser.get_parsed_content("diffusion_activation_checkpointing") is False


def cpu_trainer(network: nn.Module, batches: list, loss: nn.Module, **kwargs) -> SupervisedTrainer:
    """One epoch over ``batches`` on the CPU with AdamW; ``kwargs`` go to ``SupervisedTrainer``."""
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        epoch_length=len(batches),
        train_data_loader=batches,
        network=network,
        optimizer=torch.optim.AdamW(network.parameters(), lr=1e-3),
        loss_function=loss,
        decollate=False,
        **kwargs,
    )


def stage1_trainer(amp_kwargs: dict, trainer_amp: bool = False, iteration_amp: bool | None = True):
    """The stage-1 trainer as configs/train.json builds it (adversarial term on from the first iteration)."""
    torch.manual_seed(0)
    autoencoder = tiny_autoencoder()
    discriminator = PatchDiscriminator(spatial_dims=2, num_layers_d=1, channels=8, in_channels=3, out_channels=1)
    iteration = AutoencoderKLIteration(
        discriminator,
        torch.optim.Adam(discriminator.parameters(), lr=1e-3),
        adv_start_iteration=0,
        max_grad_norm=1.0,
        amp=iteration_amp,
        amp_kwargs=amp_kwargs if iteration_amp is not None else None,
    )
    batches = [{"image": images(seed=i)} for i in range(2)]
    trainer = cpu_trainer(
        autoencoder, batches, nn.L1Loss(), iteration_update=iteration, amp=trainer_amp, amp_kwargs=amp_kwargs
    )
    return trainer, autoencoder, discriminator


def test_stage1_step_runs_in_bf16_on_the_cpu():
    trainer, autoencoder, discriminator = stage1_trainer(BF16)
    before_ae, before_d = params(autoencoder), params(discriminator)
    ae_precision, d_precision = Precision(autoencoder), Precision(discriminator)
    trainer.run()
    assert ae_precision.all_bf16() and d_precision.all_bf16()  # encoder/decoder and discriminator convs in bf16
    out = trainer.state.output
    assert trainer.scaler is None and out["pred"].dtype == torch.float32 and out["loss"].dtype == torch.float32
    for key in ("recon_loss", "kl_loss", "adv_loss", "d_loss"):
        assert torch.isfinite(torch.tensor(out[key])) and out[key] > 0
    assert torch.isfinite(out["loss"])
    assert_float32_finite_and_trained(autoencoder, before_ae)
    assert_float32_finite_and_trained(discriminator, before_d)


@pytest.mark.filterwarnings("ignore:.*GradScaler:FutureWarning", "ignore:.*CUDA is not available:UserWarning")
@pytest.mark.parametrize("dtype, scaled", [(torch.bfloat16, False), (torch.float16, True)])
def test_stage1_uses_the_grad_scaler_for_float16_only(dtype, scaled):
    """With the trainer's own amp (as before the configs' monai_amp) and an enabled GradScaler in the engine, a bf16
    step leaves the scaler untouched; a float16 step scales its losses."""
    trainer, autoencoder, _ = stage1_trainer({"dtype": dtype}, trainer_amp=True, iteration_amp=None)
    scalers = []

    @trainer.on(Events.STARTED)
    def cpu_scaler(engine):  # MONAI builds a CUDA GradScaler in run(), disabled without CUDA
        engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        scalers.append(engine.scaler)

    precision = Precision(autoencoder)
    trainer.run()
    assert {s[0] for s in precision.seen} == {dtype}
    assert (scalers[0]._scale is not None) == scaled  # the scale tensor is made on the first scale()
    assert torch.isfinite(params(autoencoder)).all()


def stage2_parts(enabled: bool) -> dict:
    """The diffusion trainer's pieces as configs/train.json builds them, with tiny networks."""
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    torch.manual_seed(0)
    network = tiny_network(NUM_GENES, num_neighbors=NUM_NEIGHBORS, randomize=True)
    prepare = LatentDiffusionPrepareBatch(tiny_autoencoder(seed=1), scale_factor=0.5, scheduler=scheduler)
    inferer = AutocastInferer(DiffusionInferer(scheduler), enabled=enabled, amp_kwargs=BF16)
    amp = monai_amp(enabled, BF16, "cpu")
    batches = [{"image": images(seed=i), "expression": conditions(seed=i)} for i in range(2)]
    return {"network": network, "prepare_batch": prepare, "inferer": inferer, "amp": amp, "batches": batches}


def test_stage2_step_and_validation_run_in_bf16_on_the_cpu():
    parts = stage2_parts(enabled=True)
    network = parts["network"]
    trainer = cpu_trainer(
        network,
        parts["batches"],
        nn.MSELoss(),
        prepare_batch=parts["prepare_batch"],
        inferer=parts["inferer"],
        amp=parts["amp"],
        amp_kwargs=BF16,
    )
    before = params(network)
    precision = Precision(network)
    trainer.run()
    assert precision.all_bf16()  # GeneCondNet's linears, the UNet's convolutions and attention projections
    assert trainer.scaler is None and trainer.state.output["pred"].dtype == torch.float32
    loss = trainer.state.output["loss"].detach()
    assert torch.isfinite(loss) and float(loss) > 0
    assert_float32_finite_and_trained(network, before)

    precision.seen.clear()
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=parts["batches"],
        epoch_length=2,
        network=network,
        prepare_batch=parts["prepare_batch"],
        inferer=parts["inferer"],
        amp=parts["amp"],
        decollate=False,
    )
    evaluator.run()
    assert precision.all_bf16() and evaluator.state.output["pred"].dtype == torch.float32
    assert torch.isfinite(evaluator.state.output["pred"]).all()
    precision.remove()


def test_autocast_inferer_off_is_the_wrapped_inferer():
    parts = stage2_parts(enabled=False)
    network, batch = parts["network"], parts["batches"][0]
    latents, _, args, kwargs = parts["prepare_batch"](batch)
    precision = Precision(network)
    out = parts["inferer"](latents, network, *args, **kwargs)
    torch.manual_seed(0)
    assert precision.all_float32() and out.dtype == torch.float32 and not parts["amp"]
    with pytest.raises(ValueError, match="inferer must be callable"):
        AutocastInferer(None)


def tiny_pipeline(amp: bool) -> ExpressionToTissuePipeline:
    torch.manual_seed(0)
    network = tiny_network(NUM_GENES, num_neighbors=NUM_NEIGHBORS, randomize=True)
    autoencoder = tiny_autoencoder(seed=2)
    randomize_zero_init(autoencoder)
    scheduler = DDIMScheduler(num_train_timesteps=100, prediction_type="v_prediction", clip_sample=False)
    return ExpressionToTissuePipeline(
        network, autoencoder, scheduler, scale_factor=0.5, latent_shape=(3, 8, 8), num_inference_steps=4, amp=amp
    )


def test_bf16_samples_are_finite_and_close_to_float32():
    """Same seeds, same weights: bf16 autocast patches differ from float32 ones by bf16 rounding only (tolerance: mean
    absolute difference under 0.01 and max under 0.1 on the [0, 1] scale)."""
    cond = conditions(3)
    fp32, bf16 = tiny_pipeline(amp=False), tiny_pipeline(amp=True)
    bf16.network.load_state_dict(fp32.network.state_dict())
    bf16.autoencoder.load_state_dict(fp32.autoencoder.state_dict())
    reference = fp32(cond, generator=seeded_generators([5, 6, 7]))
    precision = Precision(bf16.network, bf16.autoencoder)
    sample = bf16(cond, generator=seeded_generators([5, 6, 7]))
    assert precision.all_bf16()  # the UNet at every step and the decoder
    assert sample.shape == reference.shape == (3, 3, SIZE, SIZE) and sample.dtype == torch.float32
    assert torch.isfinite(sample).all() and sample.min() >= 0 and sample.max() <= 1
    diff = (sample - reference).abs()
    assert 0 < float(diff.mean()) < 0.01 and float(diff.max()) < 0.1
    assert fp32.set_amp(True) is fp32 and fp32.amp and fp32.amp_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="amp_dtype"):
        fp32.set_amp(True, torch.float32)


# --- activation checkpointing ---------------------------------------------------------------------------------------


def gradients(network: nn.Module, loss_of) -> dict[str, torch.Tensor]:
    network.zero_grad()
    loss_of(network).backward()
    return {name: p.grad.clone() for name, p in network.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["autoencoder", "unet"])
def test_activation_checkpointing_same_gradients_state_and_recomputes(kind):
    torch.manual_seed(0)
    if kind == "autoencoder":
        network = tiny_autoencoder(with_encoder_nonlocal_attn=True, with_decoder_nonlocal_attn=True)
        x = images(2)

        def loss_of(net):
            return net.reconstruct(x).square().mean()

    else:
        network = tiny_network(NUM_GENES, num_neighbors=NUM_NEIGHBORS, randomize=True)
        x, t, c = torch.randn(2, 3, 8, 8), torch.tensor([3, 50]), conditions(2)

        def loss_of(net):
            return net(x, t, c).square().mean()

    keys = list(network.state_dict())
    reference = gradients(network, loss_of)
    assert activation_checkpointing(network) is network
    blocks = checkpointed_blocks(network)
    assert blocks and len(blocks) == len(set(blocks))
    calls = []
    block = dict(network.named_modules())[blocks[0]]
    inner = next(m for m in block.modules() if isinstance(m, nn.Conv2d))  # the block's own hooks run once
    inner.register_forward_hook(lambda *_: calls.append(1))
    checkpointed = gradients(network, loss_of)
    assert len(calls) == 2  # forward, and again in the backward pass
    assert list(network.state_dict()) == keys and checkpointed.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)
    calls.clear()
    with torch.no_grad():
        loss_of(network.eval())
    assert len(calls) == 1  # evaluation forwards are not checkpointed
    assert checkpointed_blocks(copy.deepcopy(network)) == blocks
    assert activation_checkpointing(network, enabled=False) is network and checkpointed_blocks(network) == []
    with pytest.raises(ValueError, match="block_types"):
        activation_checkpointing(network, block_types=[int])
