"""Generation, evaluation and whole-slide synthesis under torchrun (configs/multi_gpu_inference.json,
configs/multi_gpu_evaluate.json, scripts/synthesize_slide.py) with 2 gloo processes on the CPU, against one process."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from bundle import distributed
from bundle.sampling.generation import merge_rank_rows, shard_datalist
from tests.helpers import CONFIGS, ROOT, TINY_AUTOENCODER, tiny_architecture, tiny_autoencoder, tiny_network

WORLD_SIZE = 2
NORMALIZATION = {"method": "normalize_total+log1p", "target_sum": 10000.0, "null_value": -1.0}
# settings both runs share (one process in this process, two under torchrun)
INFERENCE = {"num_inference_steps": 2, "progress": False, "num_threads": 1, "num_spots": 5, "batch_size": 2}
EVALUATION = {
    "patch_fov_um": 64.0,
    "patch_size": 16,
    "num_inference_steps": 2,
    "val_batch_size": 2,
    "num_eval_spots": 8,
    "num_edit_spots": 2,  # one batch: the second rank gets no edited patch to generate
    "edits": ["immune*4", "hypoxia*0"],
    "probe_epochs": 1,
    "probe_width": 4,
    "probe_max_train_spots": 32,
    "require_inception": False,
    "tracking_uri": None,
    "run_name": "eval",
    "num_report_spots": 4,
    "figure_spots_per_label": 1,
}
REGION = ["300", "300", "500", "500"]  # um: inside both demo arrays


@pytest.fixture(scope="module")
def tiny(demo_root, demo_dataset, tmp_path_factory) -> dict:
    """Checkpoints of a tiny untrained model (16-px patches) for the demo dataset's panel, and the layers of settings."""
    from bundle.autoencoder import save_autoencoder_checkpoint
    from bundle.checkpoints import save_model

    genes = json.loads((demo_dataset / "gene_panel.json").read_text())["genes"]
    root = tmp_path_factory.mktemp("multi_gpu")
    models = root / "models"
    extra = {"normalization": NORMALIZATION, "num_neighbors": 6, "prediction_type": "v_prediction"}
    extra.update(latent_shape=[3, 8, 8], patch_size=16, patch_fov_um=64.0, architecture=tiny_architecture(6))
    save_model(models / "model.pt", tiny_network(len(genes), num_neighbors=6, randomize=True), genes, 0.5, extra)
    save_autoencoder_checkpoint(models / "autoencoder.pt", tiny_autoencoder(), 0.5, network_kwargs=TINY_AUTOENCODER)
    layers = {}
    for name, settings in (("inference", INFERENCE), ("evaluation", EVALUATION)):
        layers[name] = root / f"{name}.json"
        layers[name].write_text(json.dumps(settings))
    return {"root": root, "layers": layers, "input": demo_root / "CRC_S02" / "spaceranger", "dataset": demo_dataset}


def bundle_settings(tiny: dict, **settings) -> dict:
    models = tiny["root"] / "models"
    paths = {"model_path": models / "model.pt", "autoencoder_path": models / "autoencoder.pt"}
    return {"bundle_root": str(tiny["root"]), **{k: str(v) for k, v in paths.items()}, **settings}


def in_one_thread(run, *args):
    """``run(*args)`` on one torch thread, as OMP_NUM_THREADS=1 gives each torchrun process: the same arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(*args)
    finally:
        torch.set_num_threads(threads)


def run_one_process(configs: list[str], settings: dict) -> None:
    """The configs as ``python -m monai.bundle run`` runs them, in this process, on the CPU, on one thread."""
    workflow = ConfigWorkflow(
        workflow_type="infer",
        config_file=configs,
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        **copy.deepcopy({**settings, "device": "cpu"}),
    )
    for step in (workflow.initialize, workflow.run, workflow.finalize):
        in_one_thread(step)


def torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 <args>`` on the CPU (gloo); returns the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, as the one-process runs, whatever this machine has
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun_bundle(configs: list[str], settings: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    args = ["-m", "monai.bundle", "run", "--config_file", json.dumps(configs)]
    for key, value in settings.items():
        args += [f"--{key}", str(value)]
    return torchrun(args, timeout)


def succeeded(proc: subprocess.CompletedProcess, seconds: float) -> None:
    assert proc.returncode == 0, f"torchrun failed ({seconds:.0f} s):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


def read_manifest(folder: Path) -> list[dict]:
    with (folder / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def pixels(folder: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    return {row["png"]: np.asarray(Image.open(folder / row["png"])) for row in read_manifest(folder)}


# --- pure parts --------------------------------------------------------------------------------------------------


def test_shard_deals_blocks_round_robin_and_unshard_restores_the_order():
    assert distributed.shard(7, 0, 2, block=2) == [0, 1, 4, 5] and distributed.shard(7, 1, 2, block=2) == [2, 3, 6]
    assert distributed.shard(5, 1, 2) == [1, 3] and distributed.shard(3, 2, 3, block=4) == []  # a rank without items
    assert distributed.shard(4) == [0, 1, 2, 3]  # one process: everything
    for count in range(9):
        for world in (1, 2, 3):
            for block in (1, 2, 5):
                parts = [distributed.shard(count, r, world, block) for r in range(world)]
                assert sorted(sum(parts, [])) == list(range(count))
                assert distributed.unshard(parts, block) == list(range(count))
    with pytest.raises(ValueError, match="rank 0 returned 1 items"):
        distributed.unshard([[0], [1, 2]], block=2)
    for args, match in (((-1, 0, 1), "count"), ((3, 2, 2), "rank"), ((3, 0, 0), "world_size"), ((3, 0, 1, 0), "block")):
        with pytest.raises(ValueError, match=match):
            distributed.shard(*args)


def test_one_process_helpers_and_torchrun_variables(monkeypatch):
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.gather_objects(3) == [3]
    items = [{"spot_id": f"s{i}", "seed": 10 + i} for i in range(3)]
    assert shard_datalist(items, block=2) == [{**item, "position": i} for i, item in enumerate(items)]
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launch_rank() == (0, 1, 0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launch_rank() == (1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 is not in"):
        distributed.launch_rank()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="not whole numbers"):
        distributed.launch_rank()


def test_merge_rank_rows_orders_by_position_and_refuses_unsharded_rows():
    parts = [{"rows": [{"png": "a"}, {"png": "c"}], "positions": [0, 2]}, {"rows": [{"png": "b"}], "positions": [1]}]
    assert [row["png"] for row in merge_rank_rows(parts)] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="not sharded"):
        merge_rank_rows([{"rows": [{"png": "a"}], "positions": [None]}, {"rows": [], "positions": []}])
    with pytest.raises(ValueError, match="same spot"):
        merge_rank_rows([{"rows": [{"png": "a"}], "positions": [0]}, {"rows": [{"png": "a"}], "positions": [0]}])


def test_patches_layer_on_the_configs_without_replacing_their_inputs():
    """Parse-level: the patches add to ``initialize``, shard the dataset and keep what demo/her2st layers set."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / n) for n in ("inference.json", "her2st.json", "multi_gpu_inference.json")])
    assert "guard_command_line" in parser["initialize"][0] and "init_process_group" in parser["initialize"][-3]
    assert "shard_datalist(@datalist" in parser["dataset#data"] and "run_generation" in parser["run"][0]
    assert "her2st" in parser["input"] and "destroy_process_group" in parser["finalize"][0]
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / n) for n in ("evaluate.json", "demo.json", "multi_gpu_evaluate.json")])
    assert "check_writable" in parser["initialize"][1] and "init_process_group" in parser["initialize"][-3]
    assert "rank0_first" in parser["dataset_dir"] and parser["run"] == "@evaluating"


def test_slide_script_refuses_mismatched_outputs(capsys):
    script = slide_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--dataset", "d", "--sample", "A", "B", "--output", "a.tif"])
    assert "--output got 1 path(s) for 2 slide(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--input", "x", "y", "--output", "a.tif", "a.tif"])
    assert "names a file twice" in capsys.readouterr().err
    args = script.parse_args(["--dataset", "d", "--sample", "A", "B", "--output", "a.tif", "b.tif"])
    assert [job["output"] for job in script.slide_jobs(args)] == ["a.tif", "b.tif"]


# --- two torchrun processes against one process ----------------------------------------------------------------


@pytest.mark.slow
def test_generation_two_processes_match_one(tiny, tmp_path):
    """5 spots in batches of 2: rank 0 generates batches 0 and 2, rank 1 batch 1; one manifest, same PNGs."""
    configs = [str(CONFIGS / "inference.json"), str(tiny["layers"]["inference"])]
    settings = bundle_settings(tiny, input=str(tiny["input"]))
    one, two = tmp_path / "one", tmp_path / "two"
    run_one_process(configs, {**settings, "output_dir": str(one)})
    start = time.monotonic()
    proc = torchrun_bundle(configs + [str(CONFIGS / "multi_gpu_inference.json")], {**settings, "output_dir": str(two)})
    succeeded(proc, time.monotonic() - start)

    assert read_manifest(two) == read_manifest(one) and len(read_manifest(one)) == INFERENCE["num_spots"]
    reference, generated = pixels(one), pixels(two)
    assert generated.keys() == reference.keys()
    for name, image in reference.items():  # the same batches with the same seeds: bit for bit
        np.testing.assert_array_equal(generated[name], image, err_msg=name)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    summary = json.loads((two / "generation.json").read_text())
    assert summary["num_patches"] == INFERENCE["num_spots"] and summary["world_size"] == WORLD_SIZE
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.slow
def test_generation_failure_on_a_rank_commits_nothing(tiny, tmp_path):
    """Rank 0 fails in its batch while rank 1 has no spot (2 spots, one batch): the previous result stays as it was."""
    failing = tmp_path / "failing.json"
    failing.write_text(
        json.dumps(
            {
                "prepare_batch": "$bundle.sampling.generation.SpotPrepareBatch() if dist.get_rank() else (lambda *a, **k: 1 / 0)"
            }
        )
    )
    configs = [str(CONFIGS / n) for n in ("inference.json", "multi_gpu_inference.json")]
    configs[1:1] = [str(tiny["layers"]["inference"])]
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.csv").write_text("spot_id,png\nprevious,old.png\n")
    (out / "old.png").write_bytes(b"previous result")
    settings = bundle_settings(tiny, input=str(tiny["input"]), output_dir=str(out), num_spots=2)
    start = time.monotonic()
    proc = torchrun_bundle(configs + [str(failing)], settings)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"the run should have failed ({time.monotonic() - start:.0f} s):\n{output[-4000:]}"
    assert "ZeroDivisionError" in output and "generation failed on rank(s) {0:" in output
    assert "rank 1 of 2 has no spot to generate" in output
    assert sorted(p.name for p in out.iterdir()) == ["manifest.csv", "old.png"]
    assert (out / "old.png").read_bytes() == b"previous result" and "previous" in (out / "manifest.csv").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failing.json", "out"]  # no staging folder left


def comparable_metrics(folder: Path) -> dict:
    """metrics.json without what differs between any two runs (creation time, output paths, timings)."""
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["probe"].pop("seconds")
    for key in ("created", "output_dir"):
        metrics["settings"].pop(key)
    for key in ("timings", "outputs"):
        metrics.pop(key)
    return metrics


@pytest.mark.slow
def test_evaluation_two_processes_match_one(tiny, tmp_path):
    """8 evaluated spots in 4 batches of 2 shared by two ranks, 2 edited spots in one batch (rank 1 gets none)."""
    from PIL import Image

    configs = [str(CONFIGS / "evaluate.json"), str(tiny["layers"]["evaluation"])]
    settings = bundle_settings(tiny, dataset_dir=str(tiny["dataset"]))
    run_one_process(configs, {**settings, "output_dir": str(tmp_path / "one")})
    start = time.monotonic()
    proc = torchrun_bundle(
        configs + [str(CONFIGS / "multi_gpu_evaluate.json")], {**settings, "output_dir": str(tmp_path / "two")}
    )
    succeeded(proc, time.monotonic() - start)

    one, two = tmp_path / "one" / "eval", tmp_path / "two" / "eval"
    reference = comparable_metrics(one)
    assert comparable_metrics(two) == reference  # generated patches identical, so every score is too
    assert reference["settings"]["num_spots"] == 8 and 2 <= reference["edits"]["num_spots"] <= 4
    assert (two / "per_gene.csv").read_text() == (one / "per_gene.csv").read_text()
    np.testing.assert_array_equal(
        np.asarray(Image.open(two / "real_vs_generated.png")), np.asarray(Image.open(one / "real_vs_generated.png"))
    )
    cached = sorted(p.name for p in (one / "generated").glob("*.npy"))
    assert len(cached) == 3 and sorted(p.name for p in (two / "generated").glob("*.npy")) == cached
    for name in cached:  # the validation patches and those of the two edits
        np.testing.assert_array_equal(np.load(two / "generated" / name), np.load(one / "generated" / name))
    assert (two / "report.html").is_file()


def slide_levels(path: Path) -> list[np.ndarray]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return [page.asarray() for page in tif.pages]


@pytest.mark.slow
def test_slides_two_processes_match_one(tiny, tmp_path):
    """Two slides: one process synthesises both, under torchrun each rank one; the slides are the same."""
    script = slide_script()
    models = tiny["root"] / "models"
    samples = ["CRC_S01", "CRC_S02"]
    args = [
        "--config-file",
        str(CONFIGS / "inference.json"),
        str(CONFIGS / "demo.json"),
        str(tiny["layers"]["inference"]),
    ]
    args += ["--model-path", str(models / "model.pt"), "--autoencoder-path", str(models / "autoencoder.pt")]
    args += ["--dataset", str(tiny["dataset"]), "--sample", *samples, "--region", *REGION]
    args += ["--steps", "2", "--threads", "1", "--quiet", "--expression-guidance-scale", "0"]  # no reader here

    def outputs(name: str) -> list[str]:
        files = [str(tmp_path / f"{name}_{s}.tif") for s in samples]
        return ["--output", *files, "--summary-json", *[f.replace(".tif", ".json") for f in files]]

    assert in_one_thread(script.main, args + outputs("one") + ["--device", "cpu"]) == 0
    start = time.monotonic()
    proc = torchrun([str(ROOT / "scripts" / "synthesize_slide.py"), *args, *outputs("two")])
    succeeded(proc, time.monotonic() - start)
    assert "rank 1 of 2: 1 of 2 slide(s) ['CRC_S02']" in proc.stdout

    for sample in samples:
        one, two = slide_levels(tmp_path / f"one_{sample}.tif"), slide_levels(tmp_path / f"two_{sample}.tif")
        assert len(one) == len(two) >= 1
        for level_one, level_two in zip(one, two):
            np.testing.assert_array_equal(level_two, level_one, err_msg=sample)
        summaries = [json.loads((tmp_path / f"{n}_{sample}.json").read_text()) for n in ("one", "two")]
        for summary in summaries:
            for key in ("path", "timings_s", "memory_mb"):
                summary.pop(key)
        assert summaries[0] == summaries[1]


def slide_script():
    spec = importlib.util.spec_from_file_location("synthesize_slide", ROOT / "scripts" / "synthesize_slide.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script
