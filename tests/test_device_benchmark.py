"""scripts/device_benchmark.py stays runnable without a GPU: --smoke runs every section on the CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.helpers import ROOT

SECTIONS = ("device", "stage2_training", "speed_levers", "stage1_training", "sampling", "whole_slide", "loader")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_device_benchmark_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/device_benchmark.py"), "--smoke", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "device_benchmark.json").read_text())
    assert report["errors"] == {} and report["skipped"] == []
    assert set(SECTIONS) <= set(report["sections"])
    assert report["device"]["smoke"] is True and _positive(report["device"]["measured_bf16_matmul_tflops"])

    stage2 = report["sections"]["stage2_training"]
    assert {row["unet"] for row in stage2} == {"monai", "diffusers"}
    for row in stage2:
        assert _positive(row["images_per_s"]) and _positive(row["unet_gflops_per_step"])
        assert row["latent"] == [4, 32, 32]  # demo sizes in --smoke (demo.json: one downsampling)
    levers = report["sections"]["speed_levers"]
    assert levers[0]["lever"].startswith("0.5.0 path") and all(row["lever"].startswith("+ ") for row in levers[1:])
    assert levers[0]["speedup_vs_current"] == 1.0 and all(_positive(row["speedup_vs_current"]) for row in levers)
    assert [row["adversarial"] for row in report["sections"]["stage1_training"]] == [False, True]
    assert all(row["image"] == [3, 64, 64] for row in report["sections"]["sampling"])
    slide = report["sections"]["whole_slide"]
    assert slide["windows"] > 0 and _positive(slide["windows_per_s"])
    loader = report["sections"]["loader"]
    assert loader[0]["ratio_to_raw"] == 1.0 and all(_positive(row["ratio_to_step_images_per_s"]) for row in loader)

    markdown = (tmp_path / "device_benchmark.md").read_text()
    for title in ("Stage-2 training step", "Speed levers", "Stage-1 training", "Sampling", "Whole slide", "Loader"):
        assert f"## {title}" in markdown
    assert "failed" not in markdown


def test_device_benchmark_needs_cuda_without_smoke(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the full benchmark would run")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/device_benchmark.py"), "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "--smoke" in result.stderr
    assert not (tmp_path / "device_benchmark.json").exists()


def test_datasheet_peaks_match_device_names():
    import importlib.util

    spec = importlib.util.spec_from_file_location("device_benchmark", ROOT / "scripts/device_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.datasheet_peak("NVIDIA H200") == pytest.approx(989.4e12)
    assert module.datasheet_peak("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert module.datasheet_peak("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert module.datasheet_peak("NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)
    assert module.datasheet_peak("CPU (x86_64)") is None
