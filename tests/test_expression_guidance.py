"""Expression guidance: the latent expression reader (programmes, training, checkpoint) and the guided sampling step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDIMScheduler

from bundle.expression_guidance import (
    ExpressionReader,
    fit_expression_reader,
    guide_output,
    load_expression_reader,
    save_expression_reader,
    train_expression_reader,
)
from bundle.sampling.pipeline import ExpressionToTissuePipeline
from tests.helpers import tiny_autoencoder, tiny_network

GENES = [f"G{i}" for i in range(6)]


def readable_cache(num_spots: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A latent cache ``(N, 8, 2C, 8, 8)`` whose channel 0 brightness is gene 0's expression (in every variant), and
    expression whose genes 1-5 are noise that the latents do not carry."""
    rng = np.random.default_rng(seed)
    expression = rng.normal(1.0, 0.5, size=(num_spots, len(GENES))).astype(np.float32)
    latents = rng.normal(0.0, 0.1, size=(num_spots, 8, 6, 8, 8)).astype(np.float32)
    latents[:, :, 0] += expression[:, 0, None, None, None]
    latents[:, :, 3:] = -4.0  # log-variance
    return latents, expression


@pytest.fixture(scope="module")
def fitted():
    latents, expression = readable_cache()
    reader, summary = fit_expression_reader(
        latents, expression, scale_factor=1.0, num_components=None, iterations=150, batch_size=32, seed=0
    )
    return reader, summary, latents, expression


def test_programmes_are_standardised_genes_or_principal_components():
    rng = np.random.default_rng(1)
    expression = rng.normal(2.0, [0.5, 1.0, 2.0, 0.1, 1.0, 3.0], size=(200, 6)).astype(np.float32)
    genes = ExpressionReader(3, 6, 6)
    genes.set_programmes(expression, None)
    scores = genes.programmes(torch.as_tensor(expression)).numpy()
    np.testing.assert_allclose(scores.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(scores.std(0), 1.0, atol=1e-3)
    standard = (expression - expression.mean(0)) / expression.std(0)
    np.testing.assert_allclose(scores, standard, atol=1e-4)  # every gene is its own programme
    pca = ExpressionReader(3, 6, 2)
    pca.set_programmes(expression, 2)
    scores = pca.programmes(torch.as_tensor(expression)).numpy()
    np.testing.assert_allclose(scores.std(0), 1.0, atol=1e-3)
    assert abs(np.corrcoef(scores.T)[0, 1]) < 1e-3  # principal components are uncorrelated
    with_neighbours = torch.as_tensor(np.stack([expression[:4], expression[4:8] * 0 - 1], axis=1))
    torch.testing.assert_close(pca.programmes(with_neighbours), pca.programmes(torch.as_tensor(expression[:4])))
    with pytest.raises(ValueError, match="num_components"):
        ExpressionReader(3, 6, 7)


def test_reader_learns_what_latents_carry_and_weights_only_that(fitted):
    reader, summary, latents, expression = fitted
    r = summary["heldout_r"]
    assert r[0] > 0.9, r  # gene 0 is written into the latents
    assert max(abs(v) for v in r[1:]) < 0.6, r  # genes 1-5 are not
    weights = reader.weights.numpy()
    assert weights[0] > 0.8 and weights[0] > 3 * weights[1:].max()
    assert summary["num_fit_spots"] + summary["num_heldout_spots"] == len(expression)
    with pytest.raises(ValueError, match="96 spots but the expression has 95"):
        fit_expression_reader(latents, expression[:95], 1.0, iterations=1)
    with pytest.raises(ValueError, match="at least 20"):
        fit_expression_reader(latents[:10], expression[:10], 1.0, iterations=1)


def test_noise_aware_reader_trains_on_noised_latents():
    latents, expression = readable_cache(seed=2)
    schedule = DDIMScheduler(num_train_timesteps=1000).alphas_cumprod
    reader, summary = fit_expression_reader(
        latents, expression, 1.0, None, iterations=150, batch_size=32, alphas_cumprod=schedule
    )
    assert summary["heldout_r"][0] > 0.8  # still reads clean latents
    x = torch.as_tensor(latents[:8, 0, :3])
    assert not torch.allclose(reader(x, 0.0), reader(x, 0.9))  # the noise level is an input


def test_checkpoint_round_trip_and_refusals(fitted, tmp_path):
    reader = fitted[0]
    path = save_expression_reader(tmp_path / "expression_reader.pt", reader, GENES, 0.5, fitted[1])
    loaded = load_expression_reader(path, GENES, 0.5)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), reader(x))
    assert loaded.summary["heldout_r"] == fitted[1]["heldout_r"]
    with pytest.raises(ValueError, match="another gene panel"):
        load_expression_reader(path, GENES[::-1], 0.5)
    with pytest.raises(ValueError, match="another autoencoder"):
        load_expression_reader(path, GENES, 0.25)
    with pytest.raises(FileNotFoundError, match="expression reader .*does not exist.*expression_guidance_scale to 0"):
        load_expression_reader(tmp_path / "missing.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        load_expression_reader(broken)
    assert train_expression_reader(tmp_path / "none.pt", None, "x.npy", GENES, 0.5) is None
    assert not (tmp_path / "none.pt").exists()


def scheduler(kind: str) -> DDIMScheduler:
    sched = DDIMScheduler(num_train_timesteps=1000, prediction_type=kind, clip_sample=False)
    sched.set_timesteps(10)
    return sched


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_guidance_is_classifier_guidance_in_every_prediction_type(fitted, kind):
    reader = fitted[0].requires_grad_(False)
    sched = scheduler(kind)
    torch.manual_seed(0)
    latents, output = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    targets = torch.randn(3, len(GENES))
    t = 600
    a = sched.alphas_cumprod[t]
    sa, sb = a.sqrt(), (1 - a).sqrt()
    to_eps = {"epsilon": lambda o: o, "v_prediction": lambda o: sb * latents + sa * o}
    to_eps["sample"] = lambda o: (latents - sa * o) / sb
    guided = guide_output(reader, output, latents, t, targets, 2.0, sched)
    x = latents.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reader.guidance_loss(x, targets, sb.expand(3)).sum(), x)
    torch.testing.assert_close(to_eps[kind](guided) - to_eps[kind](output), 2.0 * sb * grad, rtol=1e-4, atol=1e-6)
    assert guide_output(reader, output, latents, t, targets, 0.0, sched) is output
    masked = guide_output(reader, output, latents, t, targets, 2.0, sched, mask=torch.tensor([True, False, True]))
    torch.testing.assert_close(masked[1], output[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(masked[0], output[0])


def test_guidance_moves_the_reading_towards_the_target(fitted):
    """Steps along the guided noise prediction bring the reader's programme of gene 0 towards the target."""
    reader = fitted[0]
    sched = scheduler("epsilon")
    latents = torch.as_tensor(fitted[2][:4, 0, :3])
    targets = reader(latents).detach()
    targets[:, 0] += 2.0
    x = latents.clone()
    for t in (20, 10, 5):
        a = sched.alphas_cumprod[t]
        eps = torch.zeros_like(x)
        guided = guide_output(reader, eps, x, t, targets, 50.0, sched)
        x = x - (1 - a).sqrt() / a.sqrt() * (guided - eps)  # the predicted clean latent moves by -sb/sa * d_eps
    before = (reader(latents)[:, 0] - targets[:, 0]).abs()
    after = (reader(x)[:, 0] - targets[:, 0]).abs()
    assert (after < before).all(), (before, after)


def tiny_pipeline(reader=None, scale: float = 0.0) -> ExpressionToTissuePipeline:
    return ExpressionToTissuePipeline(
        tiny_network(len(GENES), randomize=True),
        tiny_autoencoder(seed=0),
        DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", clip_sample=False),
        scale_factor=1.0,
        latent_shape=(3, 8, 8),
        num_inference_steps=3,
        guidance_scale=2.0,
        expression_reader=reader,
        expression_guidance_scale=scale,
    )


def test_pipeline_guidance_on_off_null_rows_and_settings(fitted):
    reader = fitted[0]
    condition = torch.rand(3, len(GENES)) * 3
    condition[2] = -1.0  # the null condition is not guided
    seeds = [1, 2, 3]

    def run(pipe):
        from bundle.sampling.pipeline import seeded_generators

        return pipe(condition, generator=seeded_generators(seeds))

    plain = run(tiny_pipeline())
    torch.testing.assert_close(run(tiny_pipeline(reader, 0.0)), plain)
    guided = run(tiny_pipeline(reader, 500.0))
    assert not torch.allclose(guided[:2], plain[:2])
    torch.testing.assert_close(guided[2], plain[2])
    pipe = tiny_pipeline()
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="expression_guidance_scale must be a finite number >= 0"):
            pipe.set_expression_guidance(reader, bad)
    with pytest.raises(ValueError, match="needs an expression reader"):
        pipe.set_expression_guidance(None, 1.0)
    with pytest.raises(ValueError, match="reads 4 genes but the model has 6"):
        pipe.set_expression_guidance(ExpressionReader(3, 4, 4), 1.0)
