"""Realism metrics (bundle/evaluation/metrics.py, extractors.py, features.py): FID/KID against closed forms and
MONAI, the offline Inception loading, user encoders, the feature cache."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy import ndimage
from torch import nn

from bundle.evaluation.extractors import (
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_URL,
    FeatureExtractor,
    file_fingerprint,
    inception_weights_path,
    load_feature_extractor,
)
from bundle.evaluation.features import cached_features, extract_features, extract_features_in_chunks, feature_cache_key
from bundle.evaluation.metrics import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_statistics,
    kernel_inception_distance,
    kid_subset_size,
    realism_metrics,
)

# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def _random_covariance(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.5 * np.eye(d)


def _closed_form_fid(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(covmean)))


def _exact_moments_sample(rng: np.random.Generator, mu: np.ndarray, sigma: np.ndarray, n: int) -> np.ndarray:
    """A sample whose mean and np.cov are exactly ``mu`` and ``sigma``."""
    z = rng.normal(size=(n, mu.size))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return mu + z @ np.linalg.cholesky(sigma).T


def _direct_unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the KID kernel (x.y / d + 1)^3, written out from its definition."""
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    off = ~np.eye(m, dtype=bool)
    return float(kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean())


def _textures(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """``n`` smooth random colour textures, float (n, 3, size, size) in [0.15, 0.85]."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        for c in range(3):
            field = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=rng.uniform(1.5, 4.0), mode="wrap")
            field = (field - field.min()) / (np.ptp(field) + 1e-12)
            out[i, c] = 0.15 + 0.7 * field
    return out


class _TokenEncoder(nn.Module):
    """Conv stem returning a token sequence (B, N, D), like a ViT without class token."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, kernel_size=8, stride=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(2).transpose(1, 2)


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
    ).eval()


@pytest.fixture(scope="module")
def torchscript_encoder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("encoders") / "tiny_encoder.pt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
        torch.jit.script(_tiny_cnn()).save(str(path))
    return path


@pytest.fixture
def hub_dir(tmp_path, monkeypatch) -> Path:
    """An empty torch hub folder (TORCH_HOME/hub) for the duration of the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("TORCH_HUB", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert Path(torch.hub.get_dir()) == tmp_path / "torch_home" / "hub"
    return tmp_path / "torch_home" / "hub"


# --------------------------------------------------------------------------------------------------------------------
# FID and KID on known distributions
# --------------------------------------------------------------------------------------------------------------------


def test_fid_matches_closed_form_and_monai():
    from monai.metrics import FIDMetric

    rng = np.random.default_rng(0)
    d, n = 8, 20000
    mu1, mu2 = np.zeros(d), rng.normal(scale=0.5, size=d)
    s1, s2 = _random_covariance(rng, d), _random_covariance(rng, d)
    expected = _closed_form_fid(mu1, s1, mu2, s2)

    # a random sample: sampling error only (about 1% here)
    a, b = rng.multivariate_normal(mu1, s1, size=n), rng.multivariate_normal(mu2, s2, size=n)
    fid = frechet_distance(a, b)
    assert fid == pytest.approx(expected, rel=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # MONAI passes sqrtm(disp=False) too
        monai_fid = float(FIDMetric()(torch.from_numpy(b), torch.from_numpy(a)))
    assert fid == pytest.approx(monai_fid, rel=1e-8)
    assert frechet_distance(a, b, method="eigh") == pytest.approx(fid, rel=1e-8)

    # samples with exactly the population moments: equal to the closed form up to rounding
    a, b = _exact_moments_sample(rng, mu1, s1, 500), _exact_moments_sample(rng, mu2, s2, 500)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    stats = feature_statistics(a)
    assert stats["n"] == 500 and np.allclose(stats["mu"], mu1) and np.allclose(stats["sigma"], s1)
    assert frechet_distance_from_statistics(stats, feature_statistics(b)) == pytest.approx(expected, rel=1e-8)
    assert abs(frechet_distance(a, a)) < 1e-8


def test_fid_input_errors():
    a = np.zeros((1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a, np.ones((5, 4)))
    with pytest.raises(ValueError, match="same extractor|one extractor"):
        frechet_distance(np.random.rand(5, 4), np.random.rand(5, 3))
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(np.random.rand(5), np.random.rand(5))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((3, 2), np.nan), np.random.rand(3, 2))


def test_fid_falls_back_when_scipy_drops_disp(monkeypatch):
    import pytorch_fid.fid_score

    def broken(*args, **kwargs):
        raise TypeError("sqrtm() got an unexpected keyword argument 'disp'")

    monkeypatch.setattr(pytorch_fid.fid_score, "calculate_frechet_distance", broken)
    rng = np.random.default_rng(1)
    mu, s1, s2 = np.ones(4), _random_covariance(rng, 4), _random_covariance(rng, 4)
    a, b = _exact_moments_sample(rng, np.zeros(4), s1, 50), _exact_moments_sample(rng, mu, s2, 50)
    with pytest.warns(RuntimeWarning, match="eigendecomposition"):
        value = frechet_distance(a, b)
    assert value == pytest.approx(_closed_form_fid(np.zeros(4), s1, mu, s2), rel=1e-8)


def test_kid_unbiased_and_ordered():
    rng = np.random.default_rng(0)
    d = 8
    a, b = rng.normal(size=(1500, d)), rng.normal(size=(1500, d))
    same_mean, same_std = kernel_inception_distance(a, b, num_subsets=10, subset_size=300)
    near, _ = kernel_inception_distance(a, b + 0.3, num_subsets=10, subset_size=300)
    far, _ = kernel_inception_distance(a, b + 1.0, num_subsets=10, subset_size=300)
    assert same_std > 0
    assert abs(same_mean) < 0.05 * near
    assert 0 < near < far
    # deterministic for a seed
    assert kernel_inception_distance(a, b, num_subsets=5, subset_size=100, seed=3) == kernel_inception_distance(
        a, b, num_subsets=5, subset_size=100, seed=3
    )


def test_kid_equals_direct_unbiased_mmd():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(300, 6)), rng.normal(loc=0.2, size=(300, 6))
    # one subset of the full size (subset_size capped from 1000 to 300)
    mean, std = kernel_inception_distance(x, y, num_subsets=10, subset_size=1000)
    assert mean == pytest.approx(_direct_unbiased_mmd2(x, y), rel=1e-10) and std == 0.0
    assert kid_subset_size(300, 300, 1000) == 300
    # subsets drawn as torch-fidelity draws them: one RandomState, a then b
    y_long = rng.normal(loc=0.2, size=(420, 6))
    mean, std = kernel_inception_distance(x, y_long, num_subsets=1, subset_size=100, seed=7)
    rs = np.random.RandomState(7)
    ia, ib = rs.choice(300, 100, replace=False), rs.choice(420, 100, replace=False)
    assert mean == pytest.approx(_direct_unbiased_mmd2(x[ia], y_long[ib]), rel=1e-10) and std == 0.0
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(x, y, subset_size=1)


# --------------------------------------------------------------------------------------------------------------------
# the Inception: offline loading, equivalence with pytorch-fid
# --------------------------------------------------------------------------------------------------------------------


def test_inception_from_hub_cache_matches_pytorch_fid(fid_weights, hub_dir, monkeypatch):
    import pytorch_fid.inception as fid_inception

    cached = hub_dir / "checkpoints" / INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    os.symlink(fid_weights, cached)
    assert inception_weights_path() == cached

    extractor = load_feature_extractor("inception")
    assert isinstance(extractor, FeatureExtractor)
    assert extractor.name == "inception" and extractor.num_features == 2048
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, size=(1, 3, 40, 48), dtype=np.uint8))
    features = extract_features(extractor, images)  # uint8 is divided by 255
    assert features.shape == (1, 2048) and features.dtype == np.float64
    assert features.std() > 0

    # pytorch-fid's own InceptionV3, with its download replaced by the same state dict
    state = torch.load(fid_weights, map_location="cpu", weights_only=True)
    monkeypatch.setattr(fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
    reference = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    with torch.no_grad():
        expected = reference(images.float() / 255)[0].flatten(1).double().numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())

    fingerprint = extractor.fingerprint()
    assert fingerprint["weights"]["file"] == INCEPTION_WEIGHTS_FILE
    assert fingerprint["weights"]["size"] == fid_weights.stat().st_size


def test_inception_missing_and_explicit_weights(fid_weights, hub_dir, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_feature_extractor("inception")
    message = str(info.value)
    assert INCEPTION_WEIGHTS_FILE in message
    assert INCEPTION_WEIGHTS_URL in message and INCEPTION_WEIGHTS_URL.startswith("https://github.com/mseitzer/")
    assert str(hub_dir / "checkpoints" / INCEPTION_WEIGHTS_FILE) in message
    assert "inception_weights" in message

    assert inception_weights_path(fid_weights.parent) == fid_weights  # a folder holding the standard file name
    absent = tmp_path / "nowhere" / INCEPTION_WEIGHTS_FILE
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        inception_weights_path(absent)
    assert str(absent) in str(info.value) and INCEPTION_WEIGHTS_URL in str(info.value)

    explicit = tmp_path / "weights" / "fid_inception.pth"
    explicit.parent.mkdir()
    shutil.copyfile(fid_weights, explicit)
    extractor = load_feature_extractor("inception", weights=explicit)
    assert extractor.weights_path == explicit and extractor.num_features == 2048
    with pytest.raises(ValueError, match="input_size"):
        load_feature_extractor("inception", weights=explicit, input_size=224)


def test_inception_refuses_wrong_files(fid_weights, tmp_path):
    wrong_keys = tmp_path / "wrong_keys" / INCEPTION_WEIGHTS_FILE
    wrong_keys.parent.mkdir()
    torch.save({"conv.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(10)}, wrong_keys)
    with pytest.raises(ValueError, match="not pytorch-fid's FID Inception weights file") as info:
        load_feature_extractor("inception", weights=wrong_keys)
    assert "missing keys" in str(info.value) and "unexpected keys" in str(info.value)

    state = torch.load(fid_weights, map_location="cpu", weights_only=True)
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet head, not the FID graph's 1008 classes
    wrong_shape = tmp_path / "wrong_shape.pth"
    torch.save(state, wrong_shape)
    with pytest.raises(ValueError, match=r"shape mismatch.*fc\.weight"):
        load_feature_extractor("inception", weights=wrong_shape)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        load_feature_extractor("inception", weights=garbage)


# --------------------------------------------------------------------------------------------------------------------
# user encoders, image conventions, FID behaviour on images
# --------------------------------------------------------------------------------------------------------------------


def test_fid_grows_with_corruption(torchscript_encoder):
    extractor = load_feature_extractor(torchscript_encoder, input_size=64)
    assert extractor.name == "tiny_encoder" and extractor.num_features == 24
    clean = _textures(40, seed=0)
    reference = extract_features(extractor, torch.from_numpy(clean), batch_size=16)
    assert reference.shape == (40, 24)
    assert abs(frechet_distance(reference, reference)) < 1e-8

    rng = np.random.default_rng(1)
    noise = rng.normal(size=clean.shape).astype(np.float32)
    fids = []
    for sigma in (0.02, 0.05, 0.1, 0.2):
        noisy = np.clip(clean + sigma * noise, 0, 1)
        fids.append(frechet_distance(reference, extract_features(extractor, torch.from_numpy(noisy))))
    assert all(0 < lo < hi for lo, hi in zip(fids, fids[1:])), fids

    fids = []
    for sigma in (0.5, 1.0, 2.0):
        blurred = ndimage.gaussian_filter(clean, sigma=(0, 0, sigma, sigma))
        fids.append(frechet_distance(reference, extract_features(extractor, torch.from_numpy(blurred))))
    assert all(0 < lo < hi for lo, hi in zip(fids, fids[1:])), fids


def test_image_value_conventions(torchscript_encoder):
    extractor = load_feature_extractor(torchscript_encoder, input_size=32)
    rng = np.random.default_rng(0)
    as_uint8 = rng.integers(0, 256, size=(5, 3, 48, 48), dtype=np.uint8)
    from_uint8 = extract_features(extractor, torch.from_numpy(as_uint8))
    from_float = extract_features(extractor, torch.from_numpy(as_uint8.astype(np.float32) / 255), batch_size=2)
    from_numpy = extract_features(extractor, as_uint8)
    # an iterable mixing single images and batches, as a DataLoader or a generator loop yields them
    items = [torch.from_numpy(as_uint8[0]), torch.from_numpy(as_uint8[1:4]), as_uint8[4]]
    from_iterable = extract_features(extractor, items, batch_size=2)
    np.testing.assert_allclose(from_uint8, from_float, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_uint8, from_numpy)
    np.testing.assert_allclose(from_uint8, from_iterable, rtol=1e-6, atol=1e-7)

    with pytest.raises(ValueError, match="divide by 255"):
        extract_features(extractor, torch.from_numpy(as_uint8.astype(np.float32)))
    with pytest.raises(TypeError, match="uint8"):
        extract_features(extractor, torch.from_numpy(as_uint8.astype(np.int64)))
    with pytest.raises(ValueError, match="permute"):
        extract_features(extractor, torch.from_numpy(as_uint8).permute(0, 2, 3, 1))
    empty = extract_features(extractor, [])
    assert empty.shape == (0, extractor.num_features)


def test_features_in_chunks(torchscript_encoder):
    extractor = load_feature_extractor(torchscript_encoder, input_size=32)
    images = np.random.default_rng(0).integers(0, 256, size=(7, 3, 32, 32), dtype=np.uint8)
    whole = extract_features(extractor, images, batch_size=4)
    chunked = extract_features_in_chunks(extractor, images, batch_size=2, chunk=3)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-7)
    assert chunked.dtype == np.float64 and extract_features_in_chunks(extractor, images[:0], 2).shape == (0, 0)


def test_user_encoder_kinds(tmp_path):
    torch.manual_seed(0)
    tokens = _TokenEncoder().eval()
    pickled = tmp_path / "tokens.pth"
    torch.save(tokens, pickled)
    with pytest.warns(UserWarning, match="executes code"):
        extractor = load_feature_extractor(pickled, input_size=32)
    assert extractor.name == "tokens" and extractor.num_features == 6
    images = torch.rand(3, 3, 32, 32)
    expected = tokens((images - extractor.mean) / extractor.std).mean(dim=1).double()
    np.testing.assert_allclose(extract_features(extractor, images), expected.detach().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match="executes code"):
        cls = load_feature_extractor(pickled, input_size=32, token_pool="cls")
    np.testing.assert_allclose(
        extract_features(cls, images),
        tokens((images - cls.mean) / cls.std)[:, 0].double().detach().numpy(),
        rtol=1e-5,
        atol=1e-6,
    )

    exported = tmp_path / "exported_cnn.pt2"
    cnn = _tiny_cnn()
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(cnn, (torch.rand(4, 3, 32, 32),), dynamic_shapes=({0: batch},)), exported)
    extractor = load_feature_extractor(exported, input_size=32)
    assert extractor.name == "exported_cnn" and extractor.num_features == 24
    expected = cnn((images - extractor.mean) / extractor.std).flatten(1).double().detach().numpy()
    np.testing.assert_allclose(extract_features(extractor, images, batch_size=2), expected, rtol=1e-5, atol=1e-6)

    state_only = tmp_path / "state.pth"
    torch.save(tokens.state_dict(), state_only)
    with pytest.warns(UserWarning, match="executes code"), pytest.raises(TypeError, match="not an nn.Module"):
        load_feature_extractor(state_only)
    with pytest.raises(FileNotFoundError, match="neither 'inception' nor an existing file"):
        load_feature_extractor(tmp_path / "absent.pt")


# --------------------------------------------------------------------------------------------------------------------
# cache and report
# --------------------------------------------------------------------------------------------------------------------


def test_cached_features(tmp_path, torchscript_encoder):
    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return np.arange(12, dtype=np.float32).reshape(4, 3)

    extractor = load_feature_extractor(torchscript_encoder, input_size=32)
    key = feature_cache_key(tmp_path / "dataset", ["s1", "s2", "s3", "s4"], extractor, image_size=256, split="val")
    assert key["extractor"]["weights"]["sha256"] == file_fingerprint(torchscript_encoder)["sha256"]
    first = cached_features(tmp_path / "cache", key, compute)
    second = cached_features(tmp_path / "cache", dict(reversed(list(key.items()))), compute)
    assert len(calls) == 1
    assert first.dtype == np.float64 and np.array_equal(first, second)
    npy_files = sorted((tmp_path / "cache").glob("features-*.npy"))
    assert len(npy_files) == 1
    assert json.loads(npy_files[0].with_suffix(".json").read_text()) == key

    other = feature_cache_key(tmp_path / "dataset", ["s1", "s2", "s3"], extractor, image_size=256, split="val")
    cached_features(tmp_path / "cache", other, compute)
    assert len(calls) == 2 and len(list((tmp_path / "cache").glob("features-*.npy"))) == 2
    cached_features(tmp_path / "cache", {**key, "image_size": 128}, compute)
    assert len(calls) == 3

    with pytest.raises(TypeError, match="not JSON-like"):
        cached_features(tmp_path / "cache", {"bad": object()}, compute)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        cached_features(tmp_path / "cache", {"flat": True}, lambda: np.zeros(5))


def test_realism_metrics_groups():
    rng = np.random.default_rng(0)
    groups_real = ["A"] * 30 + ["B"] * 25 + ["C"] * 5
    groups_fake = ["A"] * 30 + ["B"] * 20 + ["D"] * 12
    real = rng.normal(size=(len(groups_real), 4))
    fake = rng.normal(loc=0.3, size=(len(groups_fake), 4))
    result = realism_metrics(real, fake, groups_real, groups_fake, kid_subset_size=1000, kid_subsets=5)
    assert result["n_real"] == 60 and result["n_fake"] == 62 and result["kid_subset_size"] == 60
    assert result["fid"] > 0 and result["kid_mean"] > 0
    assert set(result["per_group"]) == {"A", "B"}
    for group, n_real, n_fake in (("A", 30, 30), ("B", 25, 20)):
        entry = result["per_group"][group]
        assert set(entry) == {"fid", "kid_mean", "kid_std", "kid_subset_size", "n_real", "n_fake"}
        assert (entry["n_real"], entry["n_fake"], entry["kid_subset_size"]) == (n_real, n_fake, min(n_real, n_fake))
    assert set(result["skipped_groups"]) == {"C", "D"}
    assert "5 real" in result["skipped_groups"]["C"] and "0 real" in result["skipped_groups"]["D"]
    json.dumps(result)  # the report is JSON-serialisable

    overall = realism_metrics(real, fake, kid_subsets=5)
    assert overall["per_group"] == {} and overall["fid"] == pytest.approx(result["fid"])
    with pytest.raises(ValueError, match="both groups_real and groups_fake"):
        realism_metrics(real, fake, groups_real=groups_real)
    with pytest.raises(ValueError, match="one label per row"):
        realism_metrics(real, fake, groups_real[:-1], groups_fake)
