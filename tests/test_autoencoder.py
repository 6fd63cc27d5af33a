"""Stage 1: the autoencoder's training iteration, latent scale factor, checkpoints and the diffusers VAE import."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.handlers import StatsHandler, from_engine
from monai.networks.nets import AutoencoderKL, PatchDiscriminator
from torch import nn

from bundle.autoencoder import (
    AutoencoderKLIteration,
    SDCompatibleAutoencoderKL,
    build_autoencoder,
    compute_scale_factor,
    convert_diffusers_vae,
    finalize_autoencoder,
    import_sd_vae,
    kl_divergence,
    load_autoencoder_checkpoint,
    read_scale_factor,
    save_autoencoder_checkpoint,
)
from tests.helpers import TINY_AUTOENCODER, tiny_autoencoder


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets gain nothing from intra-op threads, and on a busy 2-core machine threads wait on each other (10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_discriminator(seed: int = 1) -> PatchDiscriminator:
    torch.manual_seed(seed)
    return PatchDiscriminator(spatial_dims=2, num_layers_d=2, channels=8, in_channels=3, out_channels=1)


def blob_images(n: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    """``n`` images in [-1, 1]: a coloured disc on a coloured background, at random places."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for _ in range(n):
        cy, cx = torch.randint(4, size - 4, (2,), generator=g)
        radius = float(torch.randint(3, 6, (1,), generator=g))
        disc = (((yy - cy) ** 2 + (xx - cx) ** 2) <= radius**2).float()
        fg, bg = torch.rand(3, 1, 1, generator=g) * 2 - 1, torch.rand(3, 1, 1, generator=g) * 2 - 1
        images.append(disc * fg + (1 - disc) * bg)
    return torch.stack(images)


def image_batches(images: torch.Tensor, batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
    return [{"image": images[i : i + batch_size]} for i in range(0, len(images), batch_size)]


def make_trainer(
    autoencoder: nn.Module,
    iteration: AutoencoderKLIteration,
    batches: list,
    max_epochs: int,
    optimizer: torch.optim.Optimizer | None = None,
    decollate: bool = False,
) -> SupervisedTrainer:
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=batches,
        network=autoencoder,
        optimizer=optimizer or torch.optim.Adam(autoencoder.parameters(), lr=5e-3),
        loss_function=nn.L1Loss(),  # not used by the iteration; SupervisedTrainer requires one
        iteration_update=iteration,
        decollate=decollate,
    )


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


# ----------------------------------------------------------------------------------------------------------------------
# network
# ----------------------------------------------------------------------------------------------------------------------


def test_sd_compatible_defaults_are_monai_autoencoder():
    monai_sd = tiny_autoencoder().state_dict()
    ours = SDCompatibleAutoencoderKL(**TINY_AUTOENCODER)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in monai_sd.items()}
    assert type(build_autoencoder(TINY_AUTOENCODER)) is AutoencoderKL
    assert type(build_autoencoder({**TINY_AUTOENCODER, "norm_out_activation": True})) is SDCompatibleAutoencoderKL

    extended = SDCompatibleAutoencoderKL(**TINY_AUTOENCODER, decoder_num_res_blocks=2, encoder_out_channels=6)
    assert extended.quant_conv_mu.conv.weight.shape == (3, 6, 1, 1)
    assert extended.init_kwargs["decoder_num_res_blocks"] == [2, 2]
    x = torch.randn(2, 3, 16, 16)
    z_mu, z_sigma = extended.encode(x)
    assert z_mu.shape == z_sigma.shape == (2, 3, 8, 8)
    assert extended.decode(z_mu).shape == x.shape
    with pytest.raises(ValueError, match="decoder_num_res_blocks"):
        SDCompatibleAutoencoderKL(**TINY_AUTOENCODER, decoder_num_res_blocks=[1, 1, 1])


def test_kl_divergence_zero_for_standard_normal_and_positive_otherwise():
    mu, sigma = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert kl_divergence(mu, sigma).item() == pytest.approx(0.0, abs=1e-7)
    # one element with mu = 1: 0.5 * 1 per sample
    mu[:, 0, 0, 0] = 1.0
    assert kl_divergence(mu, sigma).item() == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------------------------
# training iteration in SupervisedTrainer
# ----------------------------------------------------------------------------------------------------------------------


def test_trainer_learns_and_discriminator_waits_for_warmup():
    autoencoder, discriminator = tiny_autoencoder(), tiny_discriminator()
    d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=1e-3)
    start = 30
    iteration = AutoencoderKLIteration(discriminator, d_optimizer, adv_start_iteration=start)
    trainer = make_trainer(autoencoder, iteration, image_batches(blob_images()), max_epochs=30)  # 60 iterations
    d_initial = flat_params(discriminator)
    records = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine):
        out = engine.state.output
        changed = not torch.equal(flat_params(discriminator), d_initial)
        records.append((engine.state.iteration, out["recon_loss"], out["adv_loss"], out["d_loss"], changed))

    trainer.run()
    assert len(records) == 60
    before = [r for r in records if r[0] < start]
    after = [r for r in records if r[0] >= start]
    assert all(r[2] == 0.0 and r[3] == 0.0 and not r[4] for r in before), "discriminator active before warm-up"
    assert all(r[2] > 0.0 and r[3] > 0.0 and r[4] for r in after), "discriminator idle after warm-up"
    first = sum(r[1] for r in records[:6]) / 6
    last = sum(r[1] for r in records[-6:]) / 6
    assert last < 0.6 * first, f"reconstruction loss did not drop by 40%: {first:.3f} -> {last:.3f}"

    out = trainer.state.output
    expected_keys = {"image", "pred", "loss", "recon_loss", "kl_loss", "perceptual_loss", "adv_loss", "d_loss"}
    assert isinstance(out, dict) and set(out) == expected_keys
    assert out["loss"].ndim == 0 and not out["loss"].requires_grad
    assert out["pred"].shape == out["image"].shape == (4, 3, 16, 16)
    assert from_engine(["loss"], first=True)(out)[0] is out["loss"]


class _MSEPerceptual(nn.Module):
    """A stand-in for PerceptualLoss with a known value."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((x - y) ** 2).mean()


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_loss_is_the_weighted_sum_and_stock_handlers_log_it():
    """With decollate=True (the default) MONAI's ``from_engine(["loss"], first=True)`` reads the loss, as
    ``StatsHandler`` and ``--tracking mlflow`` do."""
    autoencoder, discriminator = tiny_autoencoder(), tiny_discriminator()
    weights = {"kl_weight": 0.01, "adv_weight": 0.5, "perceptual_weight": 2.0}
    iteration = AutoencoderKLIteration(
        discriminator, torch.optim.SGD(discriminator.parameters(), lr=0.01), perceptual_loss=_MSEPerceptual(), **weights
    )
    trainer = make_trainer(autoencoder, iteration, image_batches(blob_images(4)), max_epochs=2, decollate=True)
    StatsHandler(name="ae_stats", tag_name="train_loss", output_transform=from_engine(["loss"], first=True)).attach(
        trainer
    )
    messages = _ListHandler()
    logging.getLogger("ae_stats").addHandler(messages)  # MONAI's loggers do not propagate to pytest's caplog
    try:
        trainer.run()
    finally:
        logging.getLogger("ae_stats").removeHandler(messages)
    out = trainer.state.output
    assert isinstance(out, list) and len(out) == 4  # one dictionary per image
    first = out[0]
    loss = from_engine(["loss"], first=True)(out)
    assert isinstance(loss, (float, torch.Tensor))  # Decollated turns the 0-dim tensor into a float
    expected = (
        first["recon_loss"]
        + weights["kl_weight"] * first["kl_loss"]
        + weights["perceptual_weight"] * first["perceptual_loss"]
        + weights["adv_weight"] * first["adv_loss"]
    )
    assert first["perceptual_loss"] > 0 and first["adv_loss"] > 0 and first["kl_loss"] > 0
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    logged = [m for m in messages.messages if "train_loss" in m]
    assert len(logged) == 2 and f"train_loss: {float(loss):.4f}" in logged[-1]


def test_without_decollate_from_engine_gives_a_tuple():
    """Documents the MONAI behaviour behind "use decollate=True": on a dictionary, from_engine returns a tuple."""
    autoencoder, discriminator = tiny_autoencoder(), tiny_discriminator()
    iteration = AutoencoderKLIteration(discriminator, torch.optim.SGD(discriminator.parameters(), lr=0.01))
    trainer = make_trainer(autoencoder, iteration, image_batches(blob_images(4)), max_epochs=1, decollate=False)
    trainer.run()
    assert isinstance(trainer.state.output, dict)
    assert isinstance(from_engine(["loss"], first=True)(trainer.state.output), tuple)


@pytest.mark.filterwarnings("ignore:.*GradScaler:FutureWarning", "ignore:.*CUDA is not available:UserWarning")
def test_amp_on_cpu_learns_with_float32_outputs():
    """The trainer's amp=True on the CPU: the step runs under bf16 autocast (tests/test_bf16.py), learns, and returns
    float32 reconstructions."""
    autoencoder, discriminator = tiny_autoencoder(), tiny_discriminator()
    iteration = AutoencoderKLIteration(discriminator, torch.optim.Adam(discriminator.parameters(), lr=1e-3))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=image_batches(blob_images(4)),
        network=autoencoder,
        optimizer=torch.optim.Adam(autoencoder.parameters(), lr=1e-3),
        loss_function=nn.L1Loss(),
        iteration_update=iteration,
        decollate=False,
        amp=True,
        amp_kwargs={"dtype": torch.bfloat16},
    )
    before = flat_params(autoencoder)
    trainer.run()
    assert trainer.state.output["pred"].dtype == torch.float32
    assert not torch.equal(flat_params(autoencoder), before)


def test_gradient_clipping_bounds_the_sgd_step():
    images = image_batches(blob_images(4))
    steps = {}
    for max_grad_norm in (None, 1e-3):
        autoencoder, discriminator = tiny_autoencoder(), tiny_discriminator()
        d_optimizer = torch.optim.SGD(discriminator.parameters(), lr=1.0)
        iteration = AutoencoderKLIteration(discriminator, d_optimizer, adv_weight=0.0, max_grad_norm=max_grad_norm)
        before = flat_params(autoencoder)
        optimizer = torch.optim.SGD(autoencoder.parameters(), lr=1.0)
        make_trainer(autoencoder, iteration, images, max_epochs=1, optimizer=optimizer).run()
        steps[max_grad_norm] = float((flat_params(autoencoder) - before).norm())
    assert steps[1e-3] <= 1e-3 * 1.001
    assert steps[None] > 10 * steps[1e-3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kl_weight": -1.0}, "kl_weight"),
        ({"adv_start_iteration": -2}, "adv_start_iteration"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"perceptual_loss": "lpips"}, "perceptual_loss"),
    ],
)
def test_iteration_rejects_bad_arguments(kwargs, match):
    discriminator = tiny_discriminator()
    with pytest.raises(ValueError, match=match):
        AutoencoderKLIteration(discriminator, torch.optim.SGD(discriminator.parameters(), lr=0.1), **kwargs)


def test_iteration_names_a_missing_image_key():
    autoencoder, discriminator = tiny_autoencoder(), tiny_discriminator()
    iteration = AutoencoderKLIteration(discriminator, torch.optim.SGD(discriminator.parameters(), lr=0.1))
    trainer = make_trainer(autoencoder, iteration, [{"img": torch.zeros(2, 3, 16, 16)}], max_epochs=1)
    with pytest.raises(ValueError, match="'image'"):
        trainer.run()


# ----------------------------------------------------------------------------------------------------------------------
# scale factor and checkpoints
# ----------------------------------------------------------------------------------------------------------------------


def test_scale_factor_is_one_over_latent_std():
    autoencoder = tiny_autoencoder()
    batches = image_batches(blob_images(12), batch_size=4)
    modes = []
    autoencoder.encoder.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    autoencoder.train()
    torch.manual_seed(5)
    scale = compute_scale_factor(autoencoder, batches, "cpu", max_batches=2)
    assert modes == [False, False], "latents not computed in eval mode (or not from 2 batches)"
    assert autoencoder.training, "train/eval mode not restored"
    autoencoder.eval()
    torch.manual_seed(5)
    with torch.no_grad():
        latents = torch.cat([autoencoder.encode_stage_2_inputs(b["image"]).flatten() for b in batches[:2]])
    assert scale == pytest.approx(1.0 / latents.double().std().item(), rel=1e-6)
    torch.manual_seed(5)
    all_three = compute_scale_factor(autoencoder, batches, "cpu", max_batches=8)
    assert all_three != pytest.approx(scale, rel=1e-6)  # max_batches is honoured
    with pytest.raises(ValueError, match="no batches"):
        compute_scale_factor(autoencoder, [], "cpu")
    with pytest.raises(ValueError, match="max_batches"):
        compute_scale_factor(autoencoder, batches, "cpu", max_batches=0)


def test_checkpoint_round_trip_is_atomic_and_weights_only(tmp_path):
    autoencoder = tiny_autoencoder(seed=3)
    path = tmp_path / "models" / "autoencoder.pt"
    scale = finalize_autoencoder(
        autoencoder, image_batches(blob_images(8)), "cpu", path, network_kwargs=TINY_AUTOENCODER
    )
    assert scale > 0
    assert sorted(p.name for p in path.parent.iterdir()) == ["autoencoder.pt"]  # no temporary file left

    raw = torch.load(path, weights_only=True)
    assert raw["scale_factor"] == pytest.approx(scale) and raw["network_kwargs"] == TINY_AUTOENCODER
    assert read_scale_factor(path) == pytest.approx(scale)

    built, built_scale = load_autoencoder_checkpoint(path)
    assert type(built) is AutoencoderKL and built_scale == pytest.approx(scale) and not built.training
    for key, value in autoencoder.state_dict().items():
        assert torch.equal(built.state_dict()[key], value), key

    into = tiny_autoencoder(seed=9)
    loaded, _ = load_autoencoder_checkpoint(path, autoencoder=into)
    assert loaded is into
    assert torch.equal(into.encoder.blocks[0].conv.weight, autoencoder.encoder.blocks[0].conv.weight)

    save_autoencoder_checkpoint(path, autoencoder, 0.5, extra={"iteration": 7})
    assert torch.load(path, weights_only=True)["iteration"] == 7
    assert read_scale_factor(path) == 0.5


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "autoencoder.pt"
    with pytest.raises(ValueError, match="extra"):
        save_autoencoder_checkpoint(path, tiny_autoencoder(), 1.0, extra={"bad": object()})
    with pytest.raises(ValueError, match="scale_factor"):
        save_autoencoder_checkpoint(path, tiny_autoencoder(), float("nan"))
    assert list(tmp_path.iterdir()) == []


def test_loading_errors_name_the_problem(tmp_path):
    autoencoder = tiny_autoencoder()
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="does not exist.*import_sd_vae"):
        load_autoencoder_checkpoint(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_scale_factor(missing)

    no_scale = tmp_path / "no_scale.pt"
    torch.save({"autoencoder": autoencoder.state_dict(), "network_kwargs": TINY_AUTOENCODER}, no_scale)
    with pytest.raises(ValueError, match="no latent scale factor.*finalize_autoencoder"):
        load_autoencoder_checkpoint(no_scale)

    not_a_checkpoint = tmp_path / "weights_only.pt"
    torch.save(autoencoder.state_dict(), not_a_checkpoint)
    with pytest.raises(ValueError, match="not an autoencoder checkpoint"):
        read_scale_factor(not_a_checkpoint)

    pickled = tmp_path / "pickled.pt"
    torch.save({"autoencoder": {}, "scale_factor": 1.0, "network": autoencoder}, pickled)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_autoencoder_checkpoint(pickled)

    path = tmp_path / "ok.pt"
    save_autoencoder_checkpoint(path, autoencoder, 0.8)  # no network_kwargs
    with pytest.raises(ValueError, match="no network_kwargs"):
        load_autoencoder_checkpoint(path)
    wider = AutoencoderKL(**{**TINY_AUTOENCODER, "channels": [8, 16]})
    with pytest.raises(ValueError, match=r"different shapes: decoder\..*must match") as info:
        load_autoencoder_checkpoint(path, autoencoder=wider)
    assert "encoder.blocks" in str(info.value)
    with_attention = AutoencoderKL(**{**TINY_AUTOENCODER, "with_decoder_nonlocal_attn": True})
    with pytest.raises(ValueError, match=r"missing from the checkpoint: decoder\.blocks\.\d+\.attn"):
        load_autoencoder_checkpoint(path, autoencoder=with_attention)


# ----------------------------------------------------------------------------------------------------------------------
# Stable Diffusion (diffusers) VAE import
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
    """A tiny randomly initialised diffusers AutoencoderKL (all weights perturbed) saved to a folder."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).eval()
    with torch.no_grad():  # move norms and biases away from their 1/0 initialisation so every mapping matters
        for param in vae.parameters():
            param.add_(0.1 * torch.randn_like(param))
    folder = tmp_path_factory.mktemp("sd_vae")
    vae.save_pretrained(folder)
    return vae, folder


def _rewrite_safetensors(folder, out_folder, edit):
    from safetensors.torch import load_file, save_file

    out_folder.mkdir()
    (out_folder / "config.json").write_text((folder / "config.json").read_text())
    state = edit(load_file(str(folder / "diffusion_pytorch_model.safetensors")))
    save_file(state, str(out_folder / "diffusion_pytorch_model.safetensors"))
    return out_folder


@pytest.mark.parametrize("use_combined_linear", [False, True])
def test_diffusers_vae_converts_exactly(diffusers_vae, use_combined_linear):
    vae, folder = diffusers_vae
    kwargs, state, scale = convert_diffusers_vae(folder, use_combined_linear=use_combined_linear)
    assert scale == pytest.approx(0.18215)
    assert kwargs["num_res_blocks"] == [1, 1] and kwargs["decoder_num_res_blocks"] == [2, 2]
    model = build_autoencoder(kwargs)
    model.load_state_dict(state)
    model.eval()
    assert hasattr(model.encoder.blocks[5].attn, "qkv") and (
        isinstance(model.encoder.blocks[5].attn.qkv, nn.Linear) == use_combined_linear
    )
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        z_mu, z_sigma = model.encode(x)
        torch.testing.assert_close(z_mu, posterior.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(z_sigma, posterior.std, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.decode(z), vae.decode(z).sample, atol=1e-5, rtol=0)


def test_diffusers_bin_and_legacy_attention_names_convert_alike(diffusers_vae, tmp_path):
    vae, folder = diffusers_vae
    _, reference, _ = convert_diffusers_vae(folder)
    bin_folder = tmp_path / "bin"
    vae.save_pretrained(bin_folder, safe_serialization=False)
    assert (bin_folder / "diffusion_pytorch_model.bin").is_file()

    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def legacy(state):
        out = {}
        for key, value in state.items():
            for new, old in new_to_old.items():
                key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
            out[key] = value
        return out

    legacy_folder = _rewrite_safetensors(folder, tmp_path / "legacy", legacy)
    for other in (bin_folder, legacy_folder):
        _, state, _ = convert_diffusers_vae(other)
        assert state.keys() == reference.keys()
        for key in reference:
            assert torch.equal(state[key], reference[key]), (other.name, key)


def test_diffusers_unmapped_or_absent_weights_raise(diffusers_vae, tmp_path):
    _, folder = diffusers_vae
    extra = _rewrite_safetensors(
        folder, tmp_path / "extra", lambda s: {**s, "encoder.extra_block.weight": torch.ones(2)}
    )
    with pytest.raises(ValueError, match=r"unmapped: encoder\.extra_block\.weight"):
        convert_diffusers_vae(extra)
    absent = _rewrite_safetensors(
        folder, tmp_path / "absent", lambda s: {k: v for k, v in s.items() if k != "decoder.conv_in.bias"}
    )
    with pytest.raises(ValueError, match=r"expected but absent: decoder\.conv_in\.bias"):
        convert_diffusers_vae(absent)


def test_diffusers_unsupported_configs_raise(diffusers_vae, tmp_path):
    _, folder = diffusers_vae
    config = json.loads((folder / "config.json").read_text())
    for change, match in (({"shift_factor": 0.1159}, "shift_factor"), ({"act_fn": "gelu"}, "act_fn")):
        out = tmp_path / next(iter(change))
        out.mkdir()
        (out / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=match):
            convert_diffusers_vae(out)
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert_diffusers_vae(tmp_path)


def test_import_script_writes_a_loadable_checkpoint(diffusers_vae, tmp_path, capsys):
    from scripts.import_sd_vae import main

    vae, folder = diffusers_vae
    output = tmp_path / "models" / "autoencoder.pt"
    assert main(["--vae-dir", str(folder), "--output", str(output)]) == 0
    assert "0.18215" in capsys.readouterr().out
    model, scale = load_autoencoder_checkpoint(output)
    assert scale == pytest.approx(0.18215) and isinstance(model, SDCompatibleAutoencoderKL)
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.decode(z), vae.decode(z).sample, atol=1e-5, rtol=0)
    assert main(["--vae-dir", str(tmp_path / "missing"), "--output", str(output)]) == 2
    assert "does not exist" in capsys.readouterr().err

    # the library call gives the same checkpoint
    again = import_sd_vae(folder, tmp_path / "again.pt")
    assert read_scale_factor(again) == pytest.approx(0.18215)
