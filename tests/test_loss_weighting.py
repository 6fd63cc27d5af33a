"""Stage-2 loss and noise options (bundle.engines): min-SNR-gamma weights, offset noise, logit-normal timesteps."""

from __future__ import annotations

import math

import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDPMScheduler
from torch import nn

from bundle.engines import DiffusionLoss, LatentDiffusionPrepareBatch, min_snr_weights
from tests.helpers import tiny_autoencoder, tiny_network

NUM_GENES = 12


def scheduler_of(prediction_type: str = "epsilon", steps: int = 1000) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=steps,
        schedule="scaled_linear_beta",
        beta_start=0.0015,
        beta_end=0.0195,
        prediction_type=prediction_type,
    )


def cached_batch(batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "latent_mean": torch.randn(batch_size, 3, 8, 8, generator=gen),
        "latent_std": torch.rand(batch_size, 3, 8, 8, generator=gen) * 0.1,
        "expression": torch.rand(batch_size, NUM_GENES, generator=gen),
    }


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_the_hand_formula(prediction_type):
    alphas_cumprod = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.001], dtype=torch.float64)
    timesteps = torch.tensor([0, 1, 2, 3, 4, 2])
    gamma = 5.0
    weights = min_snr_weights(alphas_cumprod, timesteps, gamma, prediction_type)
    for weight, t in zip(weights.tolist(), timesteps.tolist()):
        a = float(alphas_cumprod[t])
        snr = a / (1 - a)  # 999, 9, 1, 0.111, 0.001
        expected = {
            "epsilon": min(snr, gamma) / snr,
            "v_prediction": min(snr, gamma) / (snr + 1),
            "sample": min(snr, gamma),
        }[prediction_type]
        assert weight == pytest.approx(expected, rel=1e-6)
    if prediction_type == "epsilon":  # clamped at low noise, 1 where SNR <= gamma
        assert weights[0] == pytest.approx(5 / 999) and weights[2:].tolist() == pytest.approx([1, 1, 1, 1])


def test_prepare_batch_weights_reach_the_loss_as_weighted_mse():
    scheduler = scheduler_of("v_prediction")
    prepare = LatentDiffusionPrepareBatch(tiny_autoencoder(), scale_factor=0.5, scheduler=scheduler, min_snr_gamma=5.0)
    torch.manual_seed(0)
    _, target, _, kwargs = prepare(cached_batch())
    weights = prepare.loss_weights(target)
    assert torch.allclose(weights, min_snr_weights(scheduler.alphas_cumprod, kwargs["timesteps"], 5.0, "v_prediction"))
    pred = torch.randn_like(target)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert DiffusionLoss(prepare)(pred, target) == pytest.approx(float((weights * per_sample).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="did not make for this iteration"):
        DiffusionLoss(prepare)(pred, target.clone())  # a target from elsewhere is never weighted silently


def test_without_min_snr_the_loss_is_mse_and_defaults_are_unchanged():
    scheduler = scheduler_of()
    prepare = LatentDiffusionPrepareBatch(tiny_autoencoder(), scheduler=scheduler)
    assert (prepare.min_snr_gamma, prepare.offset_noise, prepare.timestep_sampling) == (None, 0.0, "uniform")
    torch.manual_seed(1)
    latents, target, _, kwargs = prepare(cached_batch())
    torch.manual_seed(1)  # the default draws exactly what MONAI's DiffusionPrepareBatch draws
    z = cached_batch()["latent_mean"] + cached_batch()["latent_std"] * torch.randn(4, 3, 8, 8)
    assert torch.allclose(latents, z)
    assert torch.equal(kwargs["noise"], torch.randn(4, 3, 8, 8))
    assert torch.equal(kwargs["timesteps"], torch.randint(0, 1000, (4,)).long())
    pred = torch.randn_like(target)
    assert prepare.loss_weights(target) is None
    assert torch.equal(DiffusionLoss(prepare)(pred, target), nn.MSELoss()(pred, target))


def test_offset_noise_is_one_offset_per_sample_and_channel():
    prepare = LatentDiffusionPrepareBatch(tiny_autoencoder(), scheduler=scheduler_of(), offset_noise=0.1)
    latents = torch.zeros(64, 3, 8, 8)
    torch.manual_seed(2)
    noise = prepare.get_noise(latents)
    torch.manual_seed(2)
    base = torch.randn(64, 3, 8, 8)
    offset = torch.randn(64, 3, 1, 1)
    assert noise.shape == latents.shape
    assert torch.allclose(noise, base + 0.1 * offset)
    shift = noise - base
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # constant over space
    assert 0.05 < float(shift[:, :, 0, 0].std()) < 0.15  # and varying over samples and channels


def test_logit_normal_timesteps_favour_the_middle():
    steps = 1000
    prepare = LatentDiffusionPrepareBatch(
        tiny_autoencoder(), scheduler=scheduler_of(steps=steps), timestep_sampling="logit_normal"
    )
    torch.manual_seed(3)
    timesteps = prepare.get_timesteps(torch.zeros(20000, 1))
    assert timesteps.dtype == torch.long and int(timesteps.min()) >= 0 and int(timesteps.max()) < steps
    middle = float(((timesteps >= 250) & (timesteps < 750)).float().mean())
    # P(0.25 < sigmoid(u) < 0.75) for u ~ N(0, 1) is erf(logit(0.75) / sqrt(2)) = 0.728, against 0.5 for uniform
    assert middle == pytest.approx(math.erf(math.log(3) / math.sqrt(2)), abs=0.01)
    shifted = LatentDiffusionPrepareBatch(
        tiny_autoencoder(), scheduler=scheduler_of(steps=steps), timestep_sampling="logit_normal", logit_mean=1.0
    )
    assert float(shifted.get_timesteps(torch.zeros(20000, 1)).float().mean()) > float(timesteps.float().mean()) + 100


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_snr_gamma": 0.0}, "min_snr_gamma must be positive"),
        ({"min_snr_gamma": 5.0, "scheduler": None, "num_train_timesteps": 10}, "min_snr_gamma needs the training"),
        ({"offset_noise": -0.1}, "offset_noise must be >= 0"),
        ({"timestep_sampling": "cosine"}, "timestep_sampling must be one of"),
        ({"timestep_sampling": "logit_normal", "logit_std": 0.0}, "timestep_logit_std must be positive"),
    ],
)
def test_option_errors_name_the_option(kwargs, message):
    arguments = {"autoencoder": tiny_autoencoder(), "scheduler": scheduler_of(), **kwargs}
    with pytest.raises(ValueError, match=message):
        LatentDiffusionPrepareBatch(**arguments)
    with pytest.raises(ValueError, match="must have loss_weights"):
        DiffusionLoss(nn.Identity())


def test_supervised_trainer_runs_every_option_together():
    torch.manual_seed(0)
    scheduler = scheduler_of("v_prediction")
    prepare = LatentDiffusionPrepareBatch(
        tiny_autoencoder(),
        scale_factor=0.5,
        scheduler=scheduler,
        min_snr_gamma=5.0,
        offset_noise=0.05,
        timestep_sampling="logit_normal",
    )
    network = tiny_network(NUM_GENES, latent_channels=3)
    loss = DiffusionLoss(prepare)
    seen = []
    original = loss.forward

    def recording_forward(pred, target):
        value = original(pred, target)
        seen.append((value, prepare.loss_weights(target)))
        return value

    loss.forward = recording_forward
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        epoch_length=2,
        train_data_loader=[cached_batch(seed=s) for s in range(2)],
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=1e-3),
        loss_function=loss,
        prepare_batch=prepare,
        inferer=DiffusionInferer(scheduler),
        decollate=False,
    )
    trainer.run()
    assert trainer.state.iteration == 2 and len(seen) == 2
    for value, weights in seen:
        assert math.isfinite(float(value.detach())) and weights.shape == (4,) and bool((weights > 0).all())
    assert float(trainer.state.output["loss"].detach()) == pytest.approx(float(seen[-1][0].detach()))
