"""The default (real-size) path on the CPU: configs/train.json with its default networks and 512-px patches of 128 um,
then configs/inference.json and configs/evaluate.json on the model it writes.

Only the run length is cut: batch 1, two iterations of each stage (the adversarial term and the discriminator step
in the second stage-1 iteration), one validation spot, one sample-grid spot, 2 DDIM steps, two generated and two
evaluated spots (no edits). Each command runs as ``python -m monai.bundle run`` in a fresh process, whose wall time
and peak resident set size are printed (run pytest with ``-s`` to see them); they are not asserted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import CONFIGS, ROOT

pytestmark = pytest.mark.slow

PATCH_SIZE, FOV_UM = 512, 128.0  # train.json's defaults, not overridden below
TWO_ITERATIONS = {
    "num_workers": 0,
    "batch_size": 1,
    "val_batch_size": 1,
    "num_val_spots": 1,
    "num_sample_spots": 1,
    "autoencoder_iterations": 2,
    "autoencoder_epoch_length": 2,
    "adv_start_iteration": 2,
    "scale_factor_batches": 1,
    "num_iterations": 2,
    "epoch_length": 2,
    "warmup_iterations": 1,
    "sample_interval": 2,
    "num_inference_steps": 2,
    "expression_reader_iterations": 0,  # its latent cache would encode every training spot 8 times at 512 px
}
MEASURED: dict[str, tuple[float, float]] = {}


def bundle_run(config: str, root: Path, **override) -> None:
    """``python -m monai.bundle run`` of ``configs/<config>`` with ``bundle_root`` ``root`` and ``--key value``
    overrides, in a fresh process logging to ``root/<config>.log``; records its wall time and peak RSS (``wait4``)
    and prints them."""
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / config)]
    command += ["--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf")]
    for key, value in {"bundle_root": str(root), **override}.items():
        command += [f"--{key}", value if isinstance(value, str) else repr(value)]
    log = root / f"{Path(config).stem}.log"
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds, peak_mib = time.perf_counter() - start, usage.ru_maxrss / 1024.0
    MEASURED[config] = (seconds, peak_mib)
    print(f"\n[default size] {config}: {seconds:.0f} s wall, peak RSS {peak_mib:.0f} MiB")
    assert process.returncode == 0, f"{config} failed (exit {process.returncode}):\n{log.read_text()[-6000:]}"


@pytest.fixture(scope="module")
def dataset_128um(demo_root, tmp_path_factory) -> Path:
    """The demo study prepared for 128-um patches (train.json's field of view): spots whose 128-um patch fits."""
    from bundle.io.dataset import prepare_dataset

    out = tmp_path_factory.mktemp("dataset") / "demo128"
    prepare_dataset(demo_root / "manifest.csv", out, fov_um=FOV_UM, n_top_genes=48, min_counts=50, verbose=False)
    return out


@pytest.fixture(scope="module")
def trained(dataset_128um, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("default_size")
    bundle_run("train.json", root, dataset_dir=str(dataset_128um), **TWO_ITERATIONS)
    return root


def finite_metrics(tracking_db: Path) -> dict[str, list[float]]:
    """Every metric of every MLflow run in ``tracking_db``: name -> values."""
    import mlflow
    from monai.utils import path_to_sqlite_uri

    client = mlflow.MlflowClient(path_to_sqlite_uri(str(tracking_db)))
    experiment = client.get_experiment_by_name("st_ldm")
    values: dict[str, list[float]] = {}
    for run in client.search_runs([experiment.experiment_id]):
        for key in run.data.metrics:
            values.setdefault(key, []).extend(m.value for m in client.get_metric_history(run.info.run_id, key))
    return values


def test_training_at_the_default_sizes(trained, dataset_128um):
    from PIL import Image

    from bundle.autoencoder import load_autoencoder_checkpoint

    models, outputs = trained / "models", trained / "outputs"
    autoencoder, scale_factor = load_autoencoder_checkpoint(models / "autoencoder.pt")
    assert autoencoder.latent_channels == 4 and math.isfinite(scale_factor) and scale_factor > 0
    model = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    genes = json.loads((dataset_128um / "gene_panel.json").read_text())["genes"]
    train_config = json.loads((CONFIGS / "train.json").read_text())
    assert model["gene_panel"] == genes and model["iteration"] == 2
    assert model["patch_size"] == PATCH_SIZE and model["patch_fov_um"] == FOV_UM
    assert model["latent_shape"] == [4, 64, 64] and model["scale_factor"] == pytest.approx(scale_factor)
    assert model["architecture"]["unet_kwargs"] == train_config["unet_kwargs"]
    assert model["architecture"]["cross_attention_dim"] == train_config["cross_attention_dim"]
    weights = model["network"]
    assert weights and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    assert list((outputs / "autoencoder_checkpoints").glob("checkpoint*.pt"))
    assert list((outputs / "diffusion_checkpoints").glob("checkpoint*.pt"))
    grid = np.asarray(Image.open(outputs / "samples" / "grid_latest.png"))
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.shape[0] >= 2 * PATCH_SIZE and grid.shape[1] >= PATCH_SIZE

    metrics = finite_metrics(outputs / "mlruns.db")
    for key in ("autoencoder_loss", "train_loss", "val_loss"):
        assert metrics.get(key) and all(math.isfinite(v) for v in metrics[key]), (key, metrics.get(key))


def test_inference_writes_512_px_patches(trained, demo_root):
    from PIL import Image

    out = trained / "outputs" / "patches"
    bundle_run(
        "inference.json",
        trained,
        input=str(demo_root / "CRC_S02" / "spaceranger"),
        output_dir=str(out),
        num_spots=2,
        batch_size=2,
        num_inference_steps=2,
        progress=False,
    )
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    for png in pngs:
        pixels = np.asarray(Image.open(png))
        assert pixels.shape == (PATCH_SIZE, PATCH_SIZE, 3) and pixels.dtype == np.uint8


def test_evaluation_at_the_default_size(trained, dataset_128um):
    bundle_run(
        "evaluate.json",
        trained,
        dataset_dir=str(dataset_128um),
        num_eval_spots=2,
        val_batch_size=2,
        num_inference_steps=2,
        require_inception=False,
        probe_max_train_spots=8,
        probe_epochs=1,
        probe_width=4,
        edits=[],
        min_group_size=1,
    )
    eval_dir = trained / "outputs" / "eval"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["settings"]["num_spots"] == 2 and metrics["settings"]["num_inference_steps"] == 2
    generated = [np.load(p) for p in sorted((eval_dir / "generated").glob("*.npy"))]
    assert len(generated) == 1  # the evaluated spots (no edits: each would generate them again)
    for patches in generated:
        assert patches.shape == (2, 3, PATCH_SIZE, PATCH_SIZE) and patches.dtype == np.uint8
    assert (eval_dir / "report.html").is_file()
    total = sum(seconds for seconds, _ in MEASURED.values())
    peak = max(mib for _, mib in MEASURED.values())
    print(f"\n[default size] all commands: {total:.0f} s wall, largest peak RSS {peak:.0f} MiB")
