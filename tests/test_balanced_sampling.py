"""Cluster-balanced sampling of training spots (``balance_power``): rare expression clusters drawn more often."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from bundle.evaluation.labels import expression_clusters
from bundle.training import balanced_sampler, refuse_balanced_distributed
from tests.helpers import CONFIGS, tiny_train_overrides


def training_entries(dataset) -> list[dict]:
    return json.loads((dataset / "datalist.json").read_text())["training"]


def cluster_labels(dataset, entries, num_clusters: int) -> np.ndarray:
    store = np.load(dataset / "expression.npy")
    expression = store[[e["expression"] for e in entries]].astype(np.float64)
    return expression_clusters(expression, expression[:1], num_clusters=num_clusters)[0]


def draw_shares(sampler, labels: np.ndarray, num_clusters: int, rounds: int = 200) -> np.ndarray:
    drawn = np.concatenate([np.fromiter(iter(sampler), int) for _ in range(rounds)])
    return np.bincount(labels[drawn], minlength=num_clusters) / len(drawn)


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_clusters_are_drawn_by_size_to_the_power(demo_dataset, power):
    entries = training_entries(demo_dataset)
    k = 4
    labels = cluster_labels(demo_dataset, entries, k)
    sizes = np.bincount(labels, minlength=k).astype(float)
    assert sizes.max() >= 2 * sizes.min()  # the demo's clusters are unequal, so balancing has something to change
    sampler = balanced_sampler(entries, demo_dataset / "expression.npy", power=power, num_clusters=k, seed=0)
    assert isinstance(sampler, torch.utils.data.WeightedRandomSampler) and len(sampler) == len(entries)
    expected = sizes ** (1 - power) / np.sum(sizes ** (1 - power))
    shares = draw_shares(sampler, labels, k)
    np.testing.assert_allclose(shares, expected, atol=0.02)
    assert shares[np.argmin(sizes)] > sizes.min() / sizes.sum() + 0.02  # the rarest cluster gains


def test_sampler_is_seeded_and_off_when_power_is_none_or_zero(demo_dataset):
    entries = training_entries(demo_dataset)
    store = demo_dataset / "expression.npy"
    first = list(balanced_sampler(entries, store, power=0.5, num_clusters=3, seed=7))
    assert first == list(balanced_sampler(entries, store, power=0.5, num_clusters=3, seed=7))
    assert first != list(balanced_sampler(entries, store, power=0.5, num_clusters=3, seed=8))
    assert balanced_sampler(entries, store, power=None) is None
    assert balanced_sampler(entries, store, power=0) is None


def test_bad_settings_are_refused_by_their_config_keys(demo_dataset):
    entries = training_entries(demo_dataset)
    store = demo_dataset / "expression.npy"
    with pytest.raises(ValueError, match=r"balance_power must be None or within \[0, 1\]"):
        balanced_sampler(entries, store, power=1.5)
    with pytest.raises(ValueError, match="balance_clusters=100000 is more than the"):
        balanced_sampler(entries, store, power=0.5, num_clusters=100000)
    with pytest.raises(ValueError, match="balance_power=0.5 is not supported by multi_gpu_train.json"):
        refuse_balanced_distributed(0.5)
    refuse_balanced_distributed(None)


def config_with(demo_dataset, tmp_path, *names: str, **changes) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in names])
    overrides = tiny_train_overrides(bundle_root=str(tmp_path), dataset_dir=str(demo_dataset), cache_rate=0.0)
    for key, value in {**overrides, **changes}.items():
        parser[key] = value
    return parser


@pytest.mark.parametrize("power", [None, 0.5])
def test_train_config_loaders_use_the_sampler(demo_dataset, tmp_path, power):
    parser = config_with(demo_dataset, tmp_path, "train.json", balance_power=power, balance_clusters=3)
    # the cached-latent loader, over a stand-in for the latent dataset (building it needs a stage-1 checkpoint)
    parser["latent_cache"] = True
    parser["train#latent_dataset"] = "$list(range(len(@train_datalist)))"
    for key in ("train#dataloader", "train#latent_dataloader"):
        loader = parser.get_parsed_content(key)
        if power is None:
            assert isinstance(loader.sampler, torch.utils.data.RandomSampler), key
        else:
            assert isinstance(loader.sampler, torch.utils.data.WeightedRandomSampler), key
            assert len(loader.sampler) == len(training_entries(demo_dataset))


def test_torchrun_config_refuses_balancing(demo_dataset, tmp_path):
    parser = config_with(demo_dataset, tmp_path, "train.json", "multi_gpu_train.json", balance_power=0.5)
    with pytest.raises(RuntimeError) as excinfo:  # MONAI's expression error, caused by the refusal
        parser.get_parsed_content("initialize")
    cause = excinfo.value.__cause__
    assert isinstance(cause, ValueError) and "balance_power=0.5 is not supported by multi_gpu_train.json" in str(cause)
