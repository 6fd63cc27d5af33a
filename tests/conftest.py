"""Shared fixtures: the real public files in ../shared/realdata and a small demo dataset."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small demo study (2 slides: one train, one val) written by the simulator."""
    from bundle.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, num_slides=2, seed=3, size_um=900.0)
    return root


@pytest.fixture(scope="session")
def demo_dataset(demo_root, tmp_path_factory) -> Path:
    """The demo study prepared into a dataset folder (64 um patches, 48-gene panel)."""
    from bundle.io.dataset import prepare_dataset

    out = tmp_path_factory.mktemp("dataset") / "demo"
    prepare_dataset(demo_root / "manifest.csv", out, fov_um=64.0, n_top_genes=48, min_counts=50, verbose=False)
    return out


@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory) -> Path:
    """pytorch-fid's FID Inception with random (variance-preserving) weights, saved under the standard file name."""
    import torch
    from torch import nn

    from bundle.evaluation import extractors

    torch.manual_seed(0)
    net = extractors.build_fid_inception()
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("fid_weights") / extractors.INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def her2st_root(tmp_path_factory) -> Path:
    """Small real crops of two her2st sections (C2 and C5, 49 spots each) in the published layout; skips without
    the shared her2st folder."""
    from tests.helpers import her2st_crop

    root = tmp_path_factory.mktemp("her2st")
    for section in ("C2", "C5"):
        her2st_crop(section, root)
    return root
