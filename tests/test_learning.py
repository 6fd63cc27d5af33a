"""Evidence that stage 2 learns on the demo data and that the expression condition matters."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from monai.networks.nets import AutoencoderKL
from monai.networks.schedulers import DDPMScheduler

from bundle.engines import LatentDiffusionPrepareBatch
from bundle.networks import GeneConditionedUNet, GeneCondNet
from bundle.transforms import LoadExpressiond, LoadWSIPatchd
from tests.helpers import tiny_unet


def load_spots(dataset, demo_root):
    """Training spots of the demo dataset: 32-px patches of 64 um in [-1, 1], expression, dominant compartment."""
    entries = json.loads((dataset / "datalist.json").read_text())["training"]
    load = LoadWSIPatchd("image", fov_um=64.0, size=32, backend="tifffile")
    expr = LoadExpressiond("expression", dataset / "expression.npy")
    dominant = {}
    for truth in demo_root.glob("*/ground_truth.csv"):
        for row in csv.DictReader(truth.open()):
            dominant[(truth.parent.name, row["barcode"])] = row["dominant"]
    items = [expr(load(e)) for e in entries]
    images = torch.stack([i["image"].as_tensor().float() / 127.5 - 1.0 for i in items])
    expression = torch.stack([i["expression"] for i in items])
    labels = [dominant[(e["sample"], e["barcode"])] for e in entries]
    return images, expression, labels


@pytest.mark.slow
def test_stage2_loss_drops_and_condition_matters(demo_dataset, demo_root):
    torch.manual_seed(0)
    images, expression, labels = load_spots(demo_dataset, demo_root)
    n, genes = expression.shape
    # a fixed (randomly initialised, frozen) KL encoder gives 16x16 latents, as stage 1 would
    autoencoder = AutoencoderKL(
        spatial_dims=2,
        in_channels=3,
        out_channels=3,
        channels=(8, 8),
        latent_channels=3,
        num_res_blocks=1,
        attention_levels=(False, False),
        norm_num_groups=4,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195
    )
    prepare = LatentDiffusionPrepareBatch(autoencoder, num_train_timesteps=1000, scale_factor=1.0, scheduler=scheduler)
    with torch.no_grad():
        latents = autoencoder.encode(images)[0]  # posterior means: deterministic latents
    latents = latents / latents.std()
    unet = tiny_unet(in_channels=3, cross_attention_dim=32, channels=[16, 32], num_head_channels=[0, 16])
    network = GeneConditionedUNet(GeneCondNet(genes, 32, num_tokens=2, hidden_dim=64), unet)
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-3)

    # fixed evaluation draws: the same noise and timesteps for every comparison
    gen = torch.Generator().manual_seed(1)
    eval_noise = torch.randn(latents.shape, generator=gen)
    eval_t = torch.randint(300, 1000, (n,), generator=gen)
    # a condition from a spot whose dominant compartment differs
    rng = np.random.default_rng(0)
    other = np.array([rng.choice([j for j in range(n) if labels[j] != labels[i]]) for i in range(n)])

    def eval_loss(condition):
        network.eval()
        with torch.no_grad():
            noisy = scheduler.add_noise(latents, eval_noise, eval_t)
            pred = network(noisy, eval_t, condition)
        network.train()
        return torch.mean((pred - eval_noise) ** 2).item()

    start = eval_loss(expression)
    for _step in range(300):
        idx = torch.randint(0, n, (32,))
        condition = expression[idx].clone()
        condition[torch.rand(32) < 0.1] = -1.0  # condition dropout, as RandDropConditiond
        batch = {"image": images[idx], "expression": condition}
        # the real prepare-batch draws noise and timesteps; encode with the same deterministic latents
        _, target, _, kwargs = prepare({**batch, "image": images[idx]})
        noisy = scheduler.add_noise(latents[idx], kwargs["noise"], kwargs["timesteps"])
        loss = torch.mean((network(noisy, kwargs["timesteps"], kwargs["condition"]) - kwargs["noise"]) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    true_condition = eval_loss(expression)
    wrong_condition = eval_loss(expression[other])
    null_condition = eval_loss(torch.full_like(expression, -1.0))
    print(
        f"loss start {start:.4f} true {true_condition:.4f} other compartment {wrong_condition:.4f} null {null_condition:.4f}"
    )
    assert true_condition < 0.8 * start
    assert true_condition < wrong_condition
    assert true_condition < null_condition
