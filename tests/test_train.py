"""The training bundle (configs/train.json) run through MONAI's ConfigWorkflow with tiny overrides."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow

from tests.helpers import CONFIGS, TINY_TRAIN


def run_bundle(*config_names: str, run_id: str = "run", check: bool = False, **override) -> ConfigWorkflow:
    """Run a bundle workflow the way ``python -m monai.bundle run`` does.

    ``check`` also asserts MONAI's bundle properties; that instantiates the stage-2 trainer, which needs the
    autoencoder checkpoint, so it is only possible once stage 1 has run.
    """
    workflow = ConfigWorkflow(
        workflow_type="train",
        config_file=[str(CONFIGS / name) for name in config_names],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        run_id=run_id,
        **copy.deepcopy(override),
    )
    workflow.initialize()
    if check:
        missing = workflow.check_properties()
        assert not missing, f"missing bundle properties: {missing}"
    workflow.run()
    workflow.finalize()
    return workflow


@pytest.fixture(scope="module")
def trained_bundle(demo_dataset, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bundle")
    run_bundle(
        "train.json",
        run_id="training",
        bundle_root=str(root),
        dataset_dir=str(demo_dataset),
        num_val_spots=12,  # a fixed, seeded subset of the validation spots
        **TINY_TRAIN,
    )
    return root


def test_train_runs_both_stages(trained_bundle, demo_dataset):
    import json

    from bundle.autoencoder import load_autoencoder_checkpoint

    root = trained_bundle
    autoencoder, scale_factor = load_autoencoder_checkpoint(root / "models" / "autoencoder.pt")
    assert scale_factor > 0 and isinstance(autoencoder, torch.nn.Module)
    model = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    genes = json.loads((demo_dataset / "gene_panel.json").read_text())["genes"]
    assert model["gene_panel"] == genes
    assert model["scale_factor"] == pytest.approx(scale_factor)
    assert model["iteration"] == TINY_TRAIN["num_iterations"]
    assert model["architecture"]["unet_kwargs"] == TINY_TRAIN["unet_kwargs"]  # inference checks its config against this
    assert model["patch_size"] == TINY_TRAIN["patch_size"] and model["latent_shape"][0] == 3
    assert (root / "outputs" / "samples" / "grid_latest.png").is_file()
    assert (root / "outputs" / "samples" / "grid_iter2.png").is_file()
    assert list((root / "outputs" / "diffusion_checkpoints").glob("checkpoint*.pt"))
    from bundle.expression_guidance import load_expression_reader

    reader = load_expression_reader(root / "models" / "expression_reader.pt", genes, scale_factor)  # the last step
    assert reader.config["num_genes"] == len(genes) and reader.summary["iterations"] == 5
    assert (root / "outputs" / "latent_cache" / "latents.npy").is_file()  # built for the reader (no latent_cache)


def test_mlflow_run_has_params_metrics_and_grids(trained_bundle):
    import mlflow
    from monai.utils import path_to_sqlite_uri

    client = mlflow.MlflowClient(path_to_sqlite_uri(os.path.abspath(trained_bundle / "outputs" / "mlruns.db")))
    experiment = client.get_experiment_by_name("st_ldm")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    diffusion = next(r for name, r in runs.items() if not name.endswith("_autoencoder"))
    assert any(name.endswith("_autoencoder") for name in runs)
    assert float(diffusion.data.params["p_uncond"]) == pytest.approx(0.1)
    assert float(diffusion.data.params["scale_factor"]) > 0
    assert diffusion.data.params["num_val_spots"] == "12"  # validation passes read the seeded subset
    assert "EPCAM" in diffusion.data.params["gene_panel"] or len(diffusion.data.params["gene_panel"]) > 0
    assert "train_loss" in diffusion.data.metrics and "val_loss" in diffusion.data.metrics
    artifacts = [a.path for a in client.list_artifacts(diffusion.info.run_id, "samples")]
    assert any(p.endswith(".png") for p in artifacts)


def test_stage2_alone_reuses_the_autoencoder(trained_bundle, demo_dataset):
    ckpt = trained_bundle / "models" / "autoencoder.pt"
    before = ckpt.stat().st_mtime_ns
    out = trained_bundle / "again"
    run_bundle(
        "train.json",
        run_id="run",
        check=True,
        bundle_root=str(trained_bundle),
        output_dir=str(out),
        dataset_dir=str(demo_dataset),
        **TINY_TRAIN,
    )
    assert ckpt.stat().st_mtime_ns == before
    assert not (out / "autoencoder_checkpoints").exists()
    assert (out / "samples" / "grid_latest.png").is_file()


def test_resume_refuses_another_gene_panel(trained_bundle, demo_dataset, tmp_path):
    import json
    import shutil

    other = tmp_path / "dataset"
    shutil.copytree(demo_dataset, other)
    panel = json.loads((other / "gene_panel.json").read_text())
    panel["genes"][0], panel["genes"][1] = "NOTAGENE", panel["genes"][0]
    (other / "gene_panel.json").write_text(json.dumps(panel))
    with pytest.raises(RuntimeError) as excinfo:  # the config expression wraps the ValueError
        run_bundle(
            "train.json",
            run_id="training",
            bundle_root=str(trained_bundle),
            dataset_dir=str(other),
            **{**TINY_TRAIN, "num_iterations": 8},
        )
    cause = excinfo.value.__cause__
    assert isinstance(cause, ValueError) and "missing ['" in str(cause) and "unexpected ['NOTAGENE']" in str(cause)


def test_validation_subset_is_fixed_seeded_and_ordered():
    from bundle.training import validation_subset

    entries = [{"barcode": str(i)} for i in range(10)]
    subset = validation_subset(entries, 4, seed=3)
    assert len(subset) == 4 and subset == validation_subset(entries, 4, seed=3)  # the same spots every pass
    assert [int(e["barcode"]) for e in subset] == sorted(int(e["barcode"]) for e in subset)  # datalist order
    assert subset != validation_subset(entries, 4, seed=4)
    assert validation_subset(entries, None) == entries and validation_subset(entries, 0) == entries
    assert validation_subset(entries, 50) == entries
    with pytest.raises(ValueError, match="num_val_spots must be None or 0"):
        validation_subset(entries, -1)


def test_reader_script_fits_the_reader_of_a_trained_model(trained_bundle, demo_dataset, tmp_path):
    import json

    from bundle.expression_guidance import load_expression_reader
    from scripts.train_expression_reader import main, overrides

    ckpt_dir = tmp_path / "models"
    ckpt_dir.mkdir()
    (ckpt_dir / "autoencoder.pt").write_bytes((trained_bundle / "models" / "autoencoder.pt").read_bytes())
    settings = {**TINY_TRAIN, "expression_reader_iterations": 3, "expression_reader_components": 4}
    sets = [f"{k}={json.dumps(v)}" for k, v in settings.items()]
    common = [f"bundle_root={trained_bundle}", f"ckpt_dir={ckpt_dir}", f"dataset_dir={demo_dataset}"]
    argv = ["--config-file", str(CONFIGS / "train.json")]
    assert main(argv + [x for s in common + sets for x in ("--set", s)]) == 0
    reader = load_expression_reader(ckpt_dir / "expression_reader.pt")
    assert reader.config["num_components"] == 4 and reader.summary["iterations"] == 3
    with pytest.raises(SystemExit, match="no autoencoder checkpoint"):
        main(argv + ["--set", f"bundle_root={trained_bundle}", "--set", f"ckpt_dir={tmp_path / 'none'}"])
    with pytest.raises(SystemExit, match="write KEY=VALUE"):
        overrides(["ckpt_dir"])
    assert overrides(["a=3", "b=x/y", 'c={"d": 1}']) == {"a": 3, "b": "x/y", "c": {"d": 1}}
