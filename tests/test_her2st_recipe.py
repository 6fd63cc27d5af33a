"""The her2st recipe (configs/her2st.json layered on the training, inference and evaluation configs) end to end on small
real crops of two sections, with tiny networks: preparation on first use, both stages with 8 square-lattice
neighbours, generation from a legacy ST section, and evaluation of the held-out section with the breast-cancer edits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from monai.bundle import ConfigWorkflow

from tests.helpers import CONFIGS, TINY_TRAIN

EVAL = {
    "require_inception": False,
    "num_inference_steps": 2,
    "num_eval_spots": 12,
    "num_edit_spots": 4,
    "probe_epochs": 1,
    "probe_width": 4,
    "kid_subsets": 5,
    "min_group_size": 5,
    "num_clusters": 3,
    "device": "cpu",
    "patch_fov_um": TINY_TRAIN["patch_fov_um"],  # the dataset was prepared for the tiny training's field of view
}


def run(workflow_type: str, configs: list[str], **override) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=[str(CONFIGS / name) for name in configs],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        **copy.deepcopy(override),
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


@pytest.fixture(scope="module")
def her2st_bundle(her2st_root, tmp_path_factory) -> tuple[Path, Path]:
    """A bundle root trained by the recipe on the crops: C2 trains, C5 validates (patient C in both, as in the
    recipe: split_by="sample")."""
    recipe = tmp_path_factory.mktemp("her2st_recipe")
    raw = recipe / "raw"
    raw.mkdir()
    lines = ["sample_id,st_path,slide_path,split,patient,technology"]
    for section, split in (("C2", "train"), ("C5", "val")):
        jpeg = next((her2st_root / section).glob("*.jpg"))
        lines.append(f"{section},{her2st_root / section},{jpeg},{split},C,st")
    (raw / "manifest.csv").write_text("\n".join(lines) + "\n")
    root = tmp_path_factory.mktemp("bundle")
    run("train", ["train.json", "her2st.json"], run_id="training", bundle_root=str(root), her2st_dir=str(recipe),
        **TINY_TRAIN)  # fmt: skip
    return root, recipe


@pytest.mark.slow
def test_recipe_prepares_trains_and_records_eight_neighbours(her2st_bundle):
    root, recipe = her2st_bundle
    record = json.loads((recipe / "dataset" / "dataset.json").read_text())
    assert record["split_by"] == "sample" and record["num_neighbors"] == 8 and record["technologies"] == ["st"]
    panel = json.loads((recipe / "dataset" / "gene_panel.json").read_text())
    assert {"ERBB2", "GRB7", "CD74", "COL1A1"} <= set(panel["genes"])
    from bundle.checkpoints import read_model_info

    info = read_model_info(root / "models" / "her2st" / "model.pt")
    assert info["num_neighbors"] == 8 and info["architecture"]["num_neighbors"] == 8
    assert list(info["gene_panel"]) == panel["genes"]


@pytest.mark.slow
def test_recipe_generates_from_a_section_and_evaluates_the_held_out_one(her2st_bundle, her2st_root, tmp_path):
    root, recipe = her2st_bundle
    out = tmp_path / "patches"
    sets = str(CONFIGS / "gene_sets" / "breast_cancer.json")
    run("infer", ["inference.json", "her2st.json"], bundle_root=str(root), her2st_dir=str(recipe),
        output_dir=str(out), num_spots=3, num_inference_steps=2, device="cpu", gene_sets_file=sets,
        patch_fov_um=TINY_TRAIN["patch_fov_um"])  # fmt: skip
    assert len(list(out.rglob("*.png"))) >= 3
    run("infer", ["evaluate.json", "her2st.json"], bundle_root=str(root), her2st_dir=str(recipe),
        gene_sets_file=sets, **EVAL)  # fmt: skip
    metrics = json.loads((root / "outputs" / "her2st" / "eval" / "metrics.json").read_text())
    assert metrics["settings"]["split"] == "validation" and metrics["settings"]["num_spots"] == 12
    scored = set(metrics["edits"]["edits"])
    assert {"erbb2_amplicon*4", "immune*4", "stroma*4"} <= scored
    assert set(metrics["edits"]["edits"]["erbb2_amplicon*4"]["genes"]) >= {"ERBB2", "GRB7", "STARD3", "PGAP3"}
    assert Path(metrics["outputs"]["real_vs_generated"]).is_file()
