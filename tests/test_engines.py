"""Unit tests for bundle.engines: latent-diffusion training through MONAI's stock SupervisedTrainer."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler
from monai.utils import CommonKeys
from torch import nn

from bundle.engines import LatentDiffusionPrepareBatch
from bundle.networks import GeneConditionedUNet
from tests.helpers import tiny_autoencoder
from tests.helpers import tiny_network as tiny_network_of

NUM_GENES = 12
LATENT_CHANNELS = 3


def tiny_network() -> GeneConditionedUNet:
    return tiny_network_of(NUM_GENES, latent_channels=LATENT_CHANNELS, num_tokens=4)


def random_batches(num_batches: int = 2, batch_size: int = 2) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(num_batches):
        expression = torch.rand(batch_size, NUM_GENES, generator=gen) * 5
        expression[0] = -1.0  # one dropped (unconditional) condition per batch, as RandDropConditiond makes
        batches.append({"image": torch.rand(batch_size, 3, 32, 32, generator=gen) * 2 - 1, "expression": expression})
    return batches


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_supervised_trainer_trains_unet_and_encoder_not_autoencoder(prediction_type):
    torch.manual_seed(0)
    autoencoder = tiny_autoencoder().train()  # the prepare-batch must freeze it
    network = tiny_network()
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    prepare_batch = LatentDiffusionPrepareBatch(autoencoder, scale_factor=0.5, scheduler=scheduler)
    assert prepare_batch.prediction_type == prediction_type
    assert prepare_batch.num_train_timesteps == 1000
    assert not autoencoder.training
    assert not any(p.requires_grad for p in autoencoder.parameters())

    autoencoder_before = {k: v.clone() for k, v in autoencoder.state_dict().items()}
    unet_before = {k: v.clone() for k, v in network.unet.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in network.gene_encoder.state_dict().items()}
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        # 3 iterations: MONAI zero-initialises the UNet's output conv and attention proj_out, so gradients reach the
        # gene encoder only from the third step on (step 1 moves the output conv, step 2 proj_out)
        train_data_loader=random_batches(3),
        epoch_length=3,
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=1e-3),
        loss_function=nn.MSELoss(),
        prepare_batch=prepare_batch,
        inferer=DiffusionInferer(scheduler),
        decollate=False,  # keep state.output a dict of batch tensors
    )
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.run()

    assert trainer.state.iteration == 3
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert trainer.state.output[CommonKeys.IMAGE].shape == (2, LATENT_CHANNELS, 16, 16)  # latents, not images
    assert not autoencoder.training
    for key, value in autoencoder.state_dict().items():
        assert torch.equal(value, autoencoder_before[key]), key
    assert any(not torch.equal(v, unet_before[k]) for k, v in network.unet.state_dict().items())
    assert any(not torch.equal(v, encoder_before[k]) for k, v in network.gene_encoder.state_dict().items())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_targets_latents_and_condition(prediction_type):
    autoencoder = tiny_autoencoder()
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    prepare_batch = LatentDiffusionPrepareBatch(
        autoencoder, num_train_timesteps=100, scale_factor=0.25, condition_name="expression", scheduler=scheduler
    )
    batch = random_batches(1, batch_size=3)[0]
    torch.manual_seed(1)
    latents, target, args, kwargs = prepare_batch(batch, torch.device("cpu"))
    torch.manual_seed(1)  # encode_stage_2_inputs samples from the posterior: repeat its random draw
    with torch.no_grad():
        expected_latents = autoencoder.encode_stage_2_inputs(batch["image"]) * 0.25
    assert torch.allclose(latents, expected_latents)
    assert args == ()
    assert set(kwargs) == {"noise", "timesteps", "condition"}
    assert kwargs["noise"].shape == latents.shape == (3, LATENT_CHANNELS, 16, 16)
    assert kwargs["timesteps"].shape == (3,) and kwargs["timesteps"].max() < 100
    assert torch.equal(kwargs["condition"], batch["expression"])
    expected = {
        "epsilon": kwargs["noise"],
        "v_prediction": scheduler.get_velocity(latents, kwargs["noise"], kwargs["timesteps"]),
        "sample": latents,
    }[prediction_type]
    assert torch.allclose(target, expected)
    if prediction_type == "v_prediction":
        assert not torch.allclose(target, kwargs["noise"])


def test_no_condition_and_defaults():
    prepare_batch = LatentDiffusionPrepareBatch(tiny_autoencoder(), num_train_timesteps=10, condition_name=None)
    assert prepare_batch.prediction_type == "epsilon"
    _, target, _, kwargs = prepare_batch({"image": torch.rand(2, 3, 32, 32)})
    assert set(kwargs) == {"noise", "timesteps"}
    assert torch.equal(target, kwargs["noise"])


def test_autoencoder_kept_in_eval_mode():
    autoencoder = tiny_autoencoder()
    prepare_batch = LatentDiffusionPrepareBatch(autoencoder, num_train_timesteps=10, condition_name=None)
    autoencoder.train()  # e.g. something called .train() on a container holding it
    prepare_batch({"image": torch.rand(1, 3, 32, 32)})
    assert not autoencoder.training


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"autoencoder": nn.Linear(2, 2)}, "autoencoder.*encode_stage_2_inputs"),
        ({"num_train_timesteps": None}, "num_train_timesteps is required"),
        ({"num_train_timesteps": 0}, "num_train_timesteps must be at least 1"),
        ({"scheduler": DDPMScheduler(num_train_timesteps=50)}, "num_train_timesteps=10.*num_train_timesteps=50"),
        ({"prediction_type": "x0"}, "prediction_type must be one of"),
        ({"prediction_type": "v_prediction"}, "v_prediction.*scheduler"),
        (
            {"num_train_timesteps": 50, "prediction_type": "v_prediction", "scheduler": DDPMScheduler(50)},
            "prediction_type='v_prediction'.*scheduler.prediction_type='epsilon'",
        ),
        ({"scale_factor": 0.0}, "scale_factor"),
        ({"scheduler": RFlowScheduler(num_train_timesteps=10)}, "RFlowScheduler"),
    ],
)
def test_init_errors(kwargs, message):
    arguments = {"autoencoder": tiny_autoencoder(), "num_train_timesteps": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        LatentDiffusionPrepareBatch(**arguments)


def test_batch_without_image():
    prepare_batch = LatentDiffusionPrepareBatch(tiny_autoencoder(), num_train_timesteps=10)
    with pytest.raises(ValueError, match="'image'"):
        prepare_batch({"img": torch.rand(1, 3, 32, 32), "expression": torch.rand(1, NUM_GENES)})
