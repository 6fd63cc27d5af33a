"""The dry run of dataset preparation (bundle.io.check, scripts/check_inputs.py): one table, nothing written."""

from __future__ import annotations

import subprocess
import sys

from bundle.io.check import CHECK_COLUMNS, check_inputs, format_check_table
from bundle.io.dataset import prepare_dataset
from tests.helpers import ROOT, demo_rows, edit_positions, realdata, swap_xy, write_manifest

QC = dict(fov_um=64.0, min_counts=50)


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_dry_run_reports_every_sample_and_writes_nothing(demo_root, tmp_path):
    rows = demo_rows(demo_root)  # CRC_S01 (train), CRC_S02 (val)
    swapped = dict(rows[1], sample_id="SWAPPED", split="train", patient="P_SWAPPED")
    swapped["st_path"] = edit_positions(demo_root, "CRC_S02", tmp_path / "st", swap_xy)
    broken = dict(
        rows[0], sample_id="BROKEN", split="train", patient="P_BROKEN", slide_path=str(realdata("slides", "broken.svs"))
    )
    manifest = write_manifest(tmp_path / "m.csv", [*rows, swapped, broken])
    before, demo_before = _tree(tmp_path), _tree(demo_root)

    results = {r["sample"]: r for r in check_inputs(manifest, **QC)}

    assert _tree(tmp_path) == before and _tree(demo_root) == demo_before  # a dry run writes nothing
    assert list(results) == ["CRC_S01", "CRC_S02", "SWAPPED", "BROKEN"]
    assert all(set(r) == set(CHECK_COLUMNS) for r in results.values())
    # the good samples: the same counts as the real preparation
    summary = prepare_dataset(write_manifest(tmp_path / "good.csv", rows), tmp_path / "ds", verbose=False, **QC)
    for sid in ("CRC_S01", "CRC_S02"):
        row, qc = results[sid], summary["samples"][sid]
        assert row["verdict"] == "ok" and row["counts"] == "raw integers" and row["features"].endswith(" genes")
        assert (row["kept"], row["on_background"], row["leaves_slide"]) == (
            qc["kept"],
            qc["on_background"],
            qc["patch_leaves_slide"],
        )
        assert row["mpp"] == round(qc["mpp"], 4) and row["mpp_source"] == qc["mpp_source"]
    # the refused ones: the first line of the message preparation would raise, and what could be measured
    assert results["SWAPPED"]["verdict"].startswith("refused: Sample 'SWAPPED':")
    assert "lie on background" in results["SWAPPED"]["verdict"] and results["SWAPPED"]["on_background"] >= 10
    assert results["BROKEN"]["verdict"].startswith("refused: ") and "broken.svs" in results["BROKEN"]["verdict"]
    table = format_check_table(list(results.values()), width=60)
    assert table.splitlines()[0] == "| " + " | ".join(CHECK_COLUMNS) + " |" and len(table.splitlines()) == 6
    assert "…" in table  # long verdicts are cut


def test_script_prints_the_table_and_exits_1_when_a_sample_is_refused(demo_root, tmp_path):
    rows = demo_rows(demo_root)
    script = [sys.executable, str(ROOT / "scripts" / "check_inputs.py"), "--fov-um", "64", "--min-counts", "50"]
    ok = subprocess.run(
        [*script, "--manifest", str(write_manifest(tmp_path / "ok.csv", rows)), "--json", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "| CRC_S01 |" in ok.stdout and (tmp_path / "r.json").is_file()
    bad = dict(rows[0], sample_id="BROKEN", slide_path=str(realdata("slides", "broken.svs")))
    refused = subprocess.run(
        [*script, "--manifest", str(write_manifest(tmp_path / "bad.csv", [bad]))], capture_output=True, text=True
    )
    assert refused.returncode == 1 and "| BROKEN |" in refused.stdout and "refused:" in refused.stdout
