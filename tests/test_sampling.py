"""The expression-to-tissue sampler: input checks, determinism for a seed, classifier-free guidance."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from bundle.handlers import save_pair_grid
from bundle.networks import GeneConditionedUNet, GeneCondNet
from bundle.sampling.grids import pair_rows, save_image_grid
from bundle.sampling.pipeline import ExpressionToTissuePipeline, seeded_generators
from tests.helpers import tiny_autoencoder, tiny_unet


@pytest.fixture(scope="module")
def pipeline():
    torch.manual_seed(0)
    autoencoder = tiny_autoencoder(seed=0)
    unet = tiny_unet(in_channels=3, cross_attention_dim=16)
    for p in unet.parameters():  # MONAI zero-initialises output layers; make the condition visible in the output
        torch.nn.init.normal_(p, std=0.05)
    network = GeneConditionedUNet(GeneCondNet(5, 16, num_tokens=2, hidden_dim=16, num_neighbors=6), unet)
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", clip_sample=False)
    return ExpressionToTissuePipeline(
        network,
        autoencoder,
        scheduler,
        scale_factor=0.5,
        latent_shape=(3, 8, 8),
        num_inference_steps=3,
        guidance_scale=3.0,
    )


def test_same_seed_same_patch_and_range(pipeline):
    condition = torch.rand(2, 7, 5)
    a = pipeline(condition, generator=torch.Generator().manual_seed(4))
    b = pipeline(condition, generator=torch.Generator().manual_seed(4))
    c = pipeline(condition, generator=torch.Generator().manual_seed(5))
    assert a.shape == (2, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_guidance_and_condition_change_the_output(pipeline):
    condition = torch.rand(2, 7, 5)
    seed = 7
    guided = pipeline(condition, guidance_scale=3.0, generator=torch.Generator().manual_seed(seed))
    unguided = pipeline(condition, guidance_scale=1.0, generator=torch.Generator().manual_seed(seed))
    other = pipeline(condition * 5, guidance_scale=3.0, generator=torch.Generator().manual_seed(seed))
    assert not torch.allclose(guided, unguided)
    assert not torch.allclose(guided, other)


def test_check_inputs_teach(pipeline):
    with pytest.raises(ValueError, match="5-gene panel"):
        pipeline(torch.rand(1, 7, 4))
    with pytest.raises(ValueError, match=r"uses 6 neighbouring spots.*SpatialContextd"):
        pipeline(torch.rand(1, 5))
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipeline(torch.rand(1, 7, 5), num_inference_steps=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipeline(torch.rand(1, 7, 5), guidance_scale=-1.0)
    with pytest.raises(ValueError, match="scale_factor"):
        ExpressionToTissuePipeline(pipeline.network, pipeline.autoencoder, pipeline.scheduler, 0.0, (3, 8, 8))


def test_pair_grid_written(tmp_path):
    real, fake = torch.zeros(3, 3, 4, 4), torch.ones(3, 3, 4, 4)
    path = save_pair_grid(real, fake, tmp_path / "g.png", columns=2)
    from PIL import Image

    grid = torch.from_numpy(__import__("numpy").asarray(Image.open(path)))
    assert grid[0, 0].tolist() == [0, 0, 0] and grid[6, 0].tolist() == [255, 255, 255]  # real row, then generated
    with pytest.raises(ValueError, match="differ in shape"):
        save_pair_grid(real, fake[:2], tmp_path / "h.png")


def test_image_grid_layout_groups_and_labels(tmp_path):
    import numpy as np
    from PIL import Image

    rows = [torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)]
    plain = np.asarray(Image.open(save_image_grid(rows, tmp_path / "plain.png")))
    assert plain.shape == (3 * 4 + 2 * 2, 2 * 4 + 2, 3)
    assert plain[0, 0].tolist() == [0, 0, 0] and plain[4, 0].tolist() == [255] * 3 and plain[6, 0].tolist() == [255] * 3
    assert plain[12, 0].tolist() == [128] * 3  # third row, after two gaps
    # real above generated, groups of two rows twice the gap apart; the last group padded with white patches
    real, fake = torch.zeros(3, 3, 4, 4), torch.full((3, 3, 4, 4), 0.5)
    grouped = pair_rows(real, fake, columns=2)
    assert len(grouped) == 4 and all(r.shape == (2, 3, 4, 4) for r in grouped)
    image = np.asarray(Image.open(save_image_grid(grouped, tmp_path / "pairs.png", rows_per_group=2)))
    assert image.shape == (4 * 4 + 2 + 4 + 2, 10, 3)
    assert image[14, 0].tolist() == [0, 0, 0] and image[12, 0].tolist() == [255] * 3  # group 2 starts after 4 px
    assert (image[14:, 6:] == 255).all()  # no fourth spot: white
    labelled = np.asarray(Image.open(save_image_grid(rows, tmp_path / "l.png", ["a", "b", "c"], ["s1", "s2"])))
    assert labelled.shape[0] == plain.shape[0] + 14 and labelled.shape[1] > plain.shape[1]
    with pytest.raises(ValueError, match="one shape"):
        save_image_grid([torch.zeros(2, 3, 4, 4), torch.zeros(1, 3, 4, 4)], tmp_path / "bad.png")


def test_per_sample_generators_do_not_depend_on_batch(pipeline):
    condition = torch.rand(3, 7, 5)
    batch = pipeline(condition, generator=seeded_generators([11, 12, 13]))
    alone = pipeline(condition[1:2], generator=seeded_generators([12]))
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one per sample"):
        pipeline(condition, generator=seeded_generators([1, 2]))


def test_ddpm_is_seeded_per_sample_and_two_forward_cfg_matches(pipeline):
    ddpm = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", clip_sample=False)
    sampler = ExpressionToTissuePipeline(
        pipeline.network, pipeline.autoencoder, ddpm, 0.5, (3, 8, 8), num_inference_steps=4
    )
    assert sampler.stochastic and not pipeline.stochastic
    condition = torch.rand(2, 7, 5)
    a = sampler(condition, generator=seeded_generators([3, 4]))
    b = sampler(condition[1:], generator=seeded_generators([4]))
    torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=0)
    c = sampler(condition, generator=seeded_generators([3, 5]))
    torch.testing.assert_close(a[:1], c[:1], atol=1e-5, rtol=0)
    assert not torch.allclose(a[1:], c[1:])
    sampler.batched_guidance = False
    torch.testing.assert_close(sampler(condition, generator=seeded_generators([3, 4])), a, atol=1e-5, rtol=0)
