"""Multi-process training (configs/multi_gpu_train.json) under torchrun, on the CPU with the gloo backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from tests.helpers import CONFIGS, ROOT, TINY_TRAIN

WORLD_SIZE = 2

# written by each rank after training (appended to the run list by the test's override file)
RECORD = (
    "$json.dump({"
    "'rank': dist.get_rank(), 'world_size': dist.get_world_size(), 'backend': dist.get_backend(), "
    "'indices': [int(i) for i in @train#sampler], 'dataset_size': len(@train#dataset), "
    "'loader_uses_sampler': @train#dataloader.sampler is @train#sampler, "
    "'val_loader_uses_sampler': isinstance(@validate#dataloader.sampler, torch.utils.data.DistributedSampler), "
    "'last_batch_sum': float(@train#trainer.state.batch['expression'].sum()), "
    "'network_is_ddp': isinstance(@network, torch.nn.parallel.DistributedDataParallel), "
    "'autoencoder_is_ddp': isinstance(@autoencoder, torch.nn.parallel.DistributedDataParallel), "
    "'discriminator_is_ddp': isinstance(@discriminator, torch.nn.parallel.DistributedDataParallel), "
    "'ema_is_ddp': isinstance(@ema_network, torch.nn.parallel.DistributedDataParallel), "
    "'ema_type': type(@ema_network).__name__, "
    "'network_sum': float(sum(p.double().sum() for p in @network.parameters())), "
    "'ema_sum': float(sum(p.double().sum() for p in @ema_network.parameters())), "
    "'autoencoder_sum': float(sum(p.double().sum() for p in @autoencoder.parameters())), "
    "'discriminator_sum': float(sum(p.double().sum() for p in @discriminator.parameters())), "
    "'lr': @optimizer.defaults['lr'], 'base_lr': @learning_rate, "
    "'iteration': @train#trainer.state.iteration, "
    "'final_saver_enabled': [h for h in @train#handlers if type(h).__name__ == 'FinalModelSaver'][0].enabled"
    "}, open(@bundle_root + '/ddp_rank' + str(dist.get_rank()) + '.json', 'w'))"
)


def test_backend_and_helpers_without_process_group(tmp_path):
    from bundle import distributed

    assert not dist.is_initialized()
    assert distributed.backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    assert distributed.rank() == 0 and distributed.world_size() == 1 and not distributed.is_distributed()
    assert distributed.rank0_first(lambda a, b=0: a + b, 2, b=3) == 5
    distributed.barrier()  # a no-op without a process group


def test_patch_wraps_networks_and_keeps_ema_plain():
    """Parse-level checks of the patch (no process group needed)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    for name in ("network", "autoencoder", "discriminator"):
        assert parser[name]["_target_"] == "torch.nn.parallel.DistributedDataParallel"
    assert "@network.module" in parser["ema_network"]
    assert parser["train#dataloader#shuffle"] is False and parser["train#dataloader#sampler"] == "@train#sampler"
    run = parser["training"]
    assert "@is_not_rank0" in run[1] and "barrier" in run[2] and "@train#trainer.run()" in run[3]
    # the patch changes no handler by its list position (nor copies one): it only adds what differs, by id
    patch = ConfigParser.load_config_file(str(CONFIGS / "multi_gpu_train.json"))
    assert not any("handlers" in key for key in patch) and "world_size" in patch["extra_diffusion_params"]
    assert not any("#handlers#" in str(value) for value in parser["train#handlers"])


@pytest.mark.slow
def test_torchrun_two_processes_gloo(demo_dataset, tmp_path):
    root = tmp_path / "bundle"
    root.mkdir()
    tiny = dict(TINY_TRAIN)
    tiny["+imports"] = ["$import json"]
    tiny["+training"] = [RECORD]  # `run training` runs the `training` list
    tiny_file = tmp_path / "tiny.json"
    tiny_file.write_text(json.dumps(tiny))
    configs = [str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json"), str(tiny_file)]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(WORLD_SIZE),
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        json.dumps(configs),
        "--bundle_root",
        str(root),
        "--dataset_dir",
        str(demo_dataset),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MKL_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"torchrun failed ({elapsed:.0f} s):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"

    models = root / "models"
    assert sorted(p.name for p in models.iterdir()) == ["autoencoder.pt", "expression_reader.pt", "model.pt"]
    model = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert model["iteration"] == TINY_TRAIN["num_iterations"]
    assert not any(k.startswith("module.") for k in model["network"])  # the unwrapped EMA copy was saved
    ckpts = list((root / "outputs" / "diffusion_checkpoints").glob("checkpoint*.pt"))
    assert len(ckpts) == 1
    assert not any(
        k.startswith("module.") for k in torch.load(ckpts[0], map_location="cpu", weights_only=True)["network"]
    )

    records = [json.loads((root / f"ddp_rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert [r["rank"] for r in records] == list(range(WORLD_SIZE))
    for r in records:
        assert r["world_size"] == WORLD_SIZE and r["backend"] == "gloo"
        assert r["network_is_ddp"] and r["autoencoder_is_ddp"] and r["discriminator_is_ddp"]
        assert not r["ema_is_ddp"] and r["ema_type"] == "GeneConditionedUNet"
        assert r["loader_uses_sampler"] and r["val_loader_uses_sampler"]
        assert r["lr"] == pytest.approx(r["base_lr"] * WORLD_SIZE)
        assert r["iteration"] == TINY_TRAIN["num_iterations"]
        assert r["final_saver_enabled"] == (r["rank"] == 0)
    # each rank trained on its own shard of the data ...
    size = records[0]["dataset_size"]
    shards = [set(r["indices"]) for r in records]
    assert len(records[0]["indices"]) == len(records[1]["indices"]) == -(-size // WORLD_SIZE)
    assert len(shards[0] & shards[1]) <= (-size) % WORLD_SIZE  # even_divisible pads with at most world_size - 1 repeats
    assert len(shards[0] | shards[1]) == size
    assert records[0]["last_batch_sum"] != records[1]["last_batch_sum"]
    # ... while DDP kept the weights (and so the EMA copies) identical on every rank
    for key in ("network_sum", "ema_sum", "autoencoder_sum", "discriminator_sum"):
        assert records[0][key] == pytest.approx(records[1][key], rel=1e-6, abs=1e-6), key
