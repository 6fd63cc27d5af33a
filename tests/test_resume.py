"""Kill a training run in the middle and restart it: it resumes from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import CONFIGS, ROOT, TINY_TRAIN


def bundle_command(tiny_config, root, dataset) -> list[str]:
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        json.dumps([str(CONFIGS / "train.json"), str(tiny_config)]),
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        "--logging_file",
        str(CONFIGS / "logging.conf"),
        "--bundle_root",
        str(root),
        "--dataset_dir",
        str(dataset),
    ]


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(demo_dataset, tmp_path):
    tiny = {**TINY_TRAIN, "num_iterations": 160, "epoch_length": 4, "val_interval": 1000, "sample_interval": 1000}
    tiny_config = tmp_path / "tiny.json"
    tiny_config.write_text(json.dumps(tiny))
    root = tmp_path / "bundle"
    cmd = bundle_command(tiny_config, root, demo_dataset)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ckpt_dir = root / "outputs" / "diffusion_checkpoints"

    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        done = sorted(int(p.stem.split("_")[-1]) for p in ckpt_dir.glob("checkpoint_*.pt")) if ckpt_dir.is_dir() else []
        if done and done[-1] >= 8:
            break
        time.sleep(0.2)
    assert first.poll() is None, "the first run ended before it could be killed:\n" + first.communicate()[0][-3000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (root / "models" / "model.pt").exists()  # killed before the end
    saved = max(int(p.stem.split("_")[-1]) for p in ckpt_dir.glob("checkpoint_*.pt"))
    assert 8 <= saved < 160 and saved % 4 == 0

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert "resuming from" in log
    epochs = [
        int(line.split("Epoch[")[1].split("]")[0])
        for line in log.splitlines()
        if "SupervisedTrainer - INFO - Epoch[" in line and "Complete" in line
    ]
    assert epochs and epochs[0] == saved // 4 + 1  # the first epoch run is the one after the checkpoint, not epoch 1
    assert "stage 1: using the autoencoder" in log  # stage 1 was complete and is not retrained
    model = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert model["iteration"] == 160
    # the command line's merged configuration is kept next to the run and in MLflow
    executed = json.loads((root / "outputs" / "executed_config.json").read_text())
    assert executed["num_iterations"] == 160 and executed["dataset_dir"] == str(demo_dataset)
    import mlflow
    from monai.utils import path_to_sqlite_uri

    client = mlflow.MlflowClient(path_to_sqlite_uri(str(root / "outputs" / "mlruns.db")))
    runs = client.search_runs([client.get_experiment_by_name("st_ldm").experiment_id])
    finished = [r for r in runs if not r.info.run_name.endswith("_autoencoder") and r.info.status == "FINISHED"]
    assert any("executed_config.json" in [a.path for a in client.list_artifacts(r.info.run_id)] for r in finished)
