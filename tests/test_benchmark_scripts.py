"""The ablation scripts' own code paths: reconstruction scores, stage-1 checkpoints handed to stage-2 rows, tables."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from bundle.autoencoder import save_autoencoder_checkpoint
from tests.helpers import ROOT, TINY_AUTOENCODER, tiny_autoencoder


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_ae():
    return load_script("benchmark_autoencoder")


@pytest.fixture(scope="module")
def bench_fid():
    return load_script("benchmark_fidelity")


def test_psnr_ssim_of_identical_noisy_and_unrelated_patches(bench_ae):
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8)
    psnr, ssim = bench_ae.psnr_ssim(real, real.copy())
    assert psnr > 90 and ssim == pytest.approx(1.0, abs=1e-4)
    noisy = np.clip(real.astype(int) + rng.choice([-8, 8], size=real.shape), 0, 255).astype(np.uint8)
    psnr_noisy, ssim_noisy = bench_ae.psnr_ssim(real, noisy)
    mse = ((noisy.astype(float) - real) ** 2).mean(axis=(1, 2, 3))
    assert psnr_noisy == pytest.approx(np.mean(10 * np.log10(255**2 / mse)), rel=1e-9)
    assert 25 < psnr_noisy < 35 and ssim_noisy < 1.0
    psnr_other, ssim_other = bench_ae.psnr_ssim(real, rng.integers(0, 256, size=real.shape, dtype=np.uint8))
    assert psnr_other < psnr_noisy and ssim_other < ssim_noisy


def test_reconstruct_decodes_the_posterior_mean_of_a_checkpoint(bench_ae, tmp_path):
    autoencoder = tiny_autoencoder(seed=1).eval()
    path = save_autoencoder_checkpoint(tmp_path / "autoencoder.pt", autoencoder, 0.7, network_kwargs=TINY_AUTOENCODER)
    real = np.random.default_rng(1).integers(0, 256, size=(5, 3, 16, 16), dtype=np.uint8)
    recon, shape, params = bench_ae.reconstruct(path, real, batch_size=2)
    assert recon.dtype == np.uint8 and recon.shape == real.shape and shape == (3, 8, 8)
    assert params == sum(p.numel() for p in autoencoder.parameters())
    with torch.no_grad():
        x = torch.as_tensor(real).float() / 127.5 - 1
        expected = autoencoder.decode(autoencoder.encode(x)[0]).clamp(-1, 1)
    assert np.abs(recon.astype(int) - ((expected + 1) * 127.5).round().numpy().astype(int)).max() <= 1


def test_fidelity_rows_take_the_network_settings_of_their_stage1_checkpoint(bench_fid, tmp_path):
    kwargs = {**TINY_AUTOENCODER, "latent_channels": 4}
    path = save_autoencoder_checkpoint(tmp_path / "ae.pt", tiny_autoencoder(latent_channels=4), 1.0, kwargs)
    assert bench_fid.autoencoder_overrides(path) == {"autoencoder_kwargs": kwargs}
    save_autoencoder_checkpoint(tmp_path / "bare.pt", tiny_autoencoder(), 1.0)
    with pytest.raises(ValueError, match="network_kwargs"):
        bench_fid.autoencoder_overrides(tmp_path / "bare.pt")
    args = bench_fid._override_args({"autoencoder_kwargs": {"channels": [8, 8]}, "prediction_type": "epsilon"})
    assert args == ["--autoencoder_kwargs", "{'channels': [8, 8]}", "--prediction_type", "epsilon"]
    assert bench_fid._override_args({"min_snr_gamma": None}) == ["--min_snr_gamma", "$None"]


def test_tables_print_one_row_per_measured_variant(bench_ae, bench_fid):
    probe = {"compartment_real": 0.9, "compartment_recon": 0.8, "recognised": [6, 7], "ceiling_r": 0.7, "recon_r": 0.6}
    ae_row = {
        "desc": "x",
        "latent_shape": [8, 16, 16],
        "parameters": 2.5e6,
        "psnr": 24.0,
        "ssim": 0.8,
        "probe": probe,
        "train_s": 120.0,
    }
    table = bench_ae.markdown({"a": ae_row, "b": ae_row})
    assert table.count("\n") == 4 and "| a | x | 8x16x16 | 2.50 M | 24.00 | 0.800 | 0.800 / 0.900 | 6/7 |" in table
    summary = {
        "compartment_generated": 0.6,
        "compartment_real": 0.8,
        "compartment_ratio": 0.75,
        "compartments_recognised": [5, 7],
        "worst_compartment": ["immune", 0.1],
        "fidelity_r": 0.5,
        "ceiling_r": 0.7,
        "fidelity_ratio": 0.5 / 0.7,
        "edit_pooled": 0.8,
        "edits": {"immune*4": 0.7},
    }
    table = bench_fid.markdown({"r": {"desc": "d", "summary": summary, "train_s": 600.0, "evaluate_s": 90.0}})
    assert (
        "| r | d | 0.600 / 0.800 | 75% | 5/7 | immune (0.10) | 0.500 / 0.700 | 71% | 0.80 | immune*4 0.70 | 10.0 | 1.5 |"
        in table
    )
    assert math.isclose(summary["fidelity_ratio"], 0.714, abs_tol=1e-3)
    # an evaluation with edit_probe_seeds: each rate is followed by its mean over the probes
    metrics = {
        "summary": {
            "compartment_real_accuracy": 0.8,
            "compartment_generated_agreement": 0.6,
            "ceiling_r_mean": 0.7,
            "fidelity_r_mean": 0.5,
            "edit_directionality": 0.8,
            "edit_immune*4_fraction": 0.7,
            "edit_directionality_probe_mean": 0.75,
            "edit_immune*4_probe_mean": 0.65,
        },
        "compartments": {"per_class": {"immune": {"generated_agreement": 0.1}, "stroma": {"generated_agreement": 0.9}}},
    }
    seeded = bench_fid.summarise(metrics)
    assert seeded["edits"] == {"immune*4": 0.7} and seeded["edits_probe_mean"] == {"immune*4": 0.65}
    assert seeded["compartments_recognised"] == [1, 2] and seeded["worst_compartment"] == ("immune", 0.1)
    table = bench_fid.markdown({"r": {"desc": "d", "summary": seeded, "train_s": None, "evaluate_s": 90.0}})
    assert "| 0.80 (0.75) | immune*4 0.70 (0.65) | - | 1.5 |" in table


def test_named_rows_add_json_rows_and_name_bad_specs():
    from bundle.utils import named_rows

    errors = []
    selected = ["a"]
    rows = named_rows({"a": {"desc": "A"}}, selected, ['b={"train": {"x": 1}}'], errors.append)
    assert rows["b"] == {"desc": "b", "train": {"x": 1}} and selected == ["a", "b"] and not errors
    named_rows({}, ["c"], ["bad", "d={"], errors.append)
    assert [e.split(":")[0][:16] for e in errors] == ["--row 'bad'", "--row d", "unknown rows ['c"]
