"""Generation (configs/inference.json, bundle.sampling.generation, scripts/edit_expression.py) with tiny saved
checkpoints."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from tests.helpers import CONFIGS, ROOT, TINY_TRAIN, tiny_architecture

MANIFEST_COLUMNS = [
    "spot_id",
    "png",
    "sample",
    "spot_index",
    "seed",
    "x_um",
    "y_um",
    "edits",
    "guidance_scale",
    "expression_guidance_scale",
    "num_inference_steps",
    "scheduler",
    "eta",
    "model_path",
    "autoencoder_path",
    "model_iteration",
    "input",
    "device",
]
NORMALIZATION = {"method": "normalize_total+log1p", "target_sum": 10000.0, "null_value": -1.0}


def _cause(error: BaseException, kind: type) -> BaseException | None:
    """``error`` or the first exception of its chain that is a ``kind`` (config expressions wrap errors)."""
    while error is not None:
        if isinstance(error, kind):
            return error
        error = error.__cause__ or error.__context__
    return None


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread; on a shared CPU, more threads than free cores cost seconds a call."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(demo_root, tmp_path_factory) -> dict:
    """Tiny random-weight checkpoints saved as training saves them (with the architecture they record), and a config
    layer with fast settings."""
    from monai.networks.nets import AutoencoderKL

    from bundle.autoencoder import save_autoencoder_checkpoint
    from bundle.checkpoints import build_network, save_model
    from bundle.io.spots import read_spaceranger

    root = tmp_path_factory.mktemp("tiny_bundle")
    spaceranger = demo_root / "CRC_S02" / "spaceranger"
    measured = list(read_spaceranger(spaceranger).var_names)
    genes = measured[:10] + [g for g in ("PTPRC", "CD3E", "CD74", "MKI67") if g in measured and g not in measured[:10]]
    layer = root / "tiny.json"
    layer.write_text(json.dumps({"num_inference_steps": 2, "progress": False}))

    torch.manual_seed(0)
    extra = {
        "normalization": NORMALIZATION,
        "num_neighbors": 6,
        "prediction_type": "v_prediction",
        "latent_shape": [3, 8, 8],
        "patch_size": 16,
        "patch_fov_um": 64.0,
        "iteration": 1,
        "architecture": tiny_architecture(6),
    }
    network = build_network({**extra, "gene_panel": genes})
    for name, p in network.unet.named_parameters():  # MONAI zero-initialises output layers: make the condition show
        torch.nn.init.normal_(p, std=1.0 if name.startswith("out.") else 0.2)
    model_path = save_model(root / "models" / "model.pt", network, genes, 0.5, extra)
    ae_kwargs = dict(TINY_TRAIN["autoencoder_kwargs"])
    autoencoder = AutoencoderKL(**ae_kwargs)
    autoencoder_path = save_autoencoder_checkpoint(root / "models" / "autoencoder.pt", autoencoder, 0.5, ae_kwargs)
    return {
        "root": root,
        "layer": layer,
        "genes": genes,
        "spaceranger": spaceranger,
        "model_path": model_path,
        "autoencoder_path": autoencoder_path,
    }


def run_inference(tiny: dict, output_dir: Path, check: bool = False, **override) -> Path:
    """Run configs/inference.json (+ the tiny layer) as ``python -m monai.bundle run`` does; return output_dir."""
    settings = {
        "bundle_root": str(tiny["root"]),
        "input": str(tiny["spaceranger"]),
        "output_dir": str(output_dir),
        "num_spots": 3,
        "batch_size": 2,
        **override,
    }
    workflow = ConfigWorkflow(
        workflow_type="infer",
        config_file=[str(CONFIGS / "inference.json"), str(tiny["layer"])],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        **settings,
    )
    workflow.initialize()
    if check:
        missing = workflow.check_properties()
        assert not missing, f"missing bundle properties: {missing}"
    workflow.run()
    workflow.finalize()
    return Path(output_dir)


def read_manifest(folder: Path) -> list[dict]:
    with (folder / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def pixels(folder: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    return {row["spot_id"]: np.asarray(Image.open(folder / row["png"])) for row in read_manifest(folder)}


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory) -> Path:
    return run_inference(tiny, tmp_path_factory.mktemp("runs") / "reference", check=True)


def test_spaceranger_run_writes_pngs_and_manifest(reference_run, tiny):
    rows = read_manifest(reference_run)
    assert list(rows[0]) == MANIFEST_COLUMNS and len(rows) == 3
    assert sorted(p.name for p in reference_run.glob("*.png")) == sorted(r["png"] for r in rows)
    for _spot, image in pixels(reference_run).items():
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert [int(r["seed"]) for r in rows] == [int(r["spot_index"]) for r in rows]  # seed 0 + row in the input
    assert rows[0]["spot_index"] == "0" and rows[0]["sample"] == "CRC_S02" and float(rows[0]["x_um"]) > 0
    assert {r["scheduler"] for r in rows} == {"ddim"} and rows[0]["num_inference_steps"] == "2"
    assert rows[0]["model_path"] == str(tiny["model_path"].resolve())
    assert json.loads((reference_run / "generation.json").read_text())["num_patches"] == 3
    assert not list(reference_run.parent.glob(".*partial*"))


def assert_same_patch(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to the rounding of batched float arithmetic: at most a few values one grey level apart."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).sum() <= 3, f"patches differ in {(diff > 0).sum()} values (max {diff.max()})"


def test_same_seed_same_png_in_any_batch_and_other_seed_differs(reference_run, tiny, tmp_path):
    reference = pixels(reference_run)
    again = pixels(run_inference(tiny, tmp_path / "run"))
    assert again.keys() == reference.keys()
    for spot in reference:  # same batches, same device: bit for bit
        np.testing.assert_array_equal(again[spot], reference[spot])
    # one spot a batch, written over the previous result (a folder with a manifest.csv is replaced)
    one_by_one = pixels(run_inference(tiny, tmp_path / "run", batch_size=1))
    for spot in reference:
        assert_same_patch(one_by_one[spot], reference[spot])
    other = pixels(run_inference(tiny, tmp_path / "run", seed=5, batch_size=3))
    assert all(not np.array_equal(other[s], reference[s]) for s in reference)
    indices = [int(r["spot_index"]) for r in read_manifest(reference_run)]
    assert [int(r["seed"]) for r in read_manifest(tmp_path / "run")] == [5 + i for i in indices]


def test_read_spots_normalises_like_training(tiny, tmp_path):
    import scanpy as sc

    from bundle.io.spots import read_spaceranger, read_spots
    from bundle.sampling.generation import build_conditions

    genes = tiny["genes"]
    spots = read_spots(tiny["spaceranger"], genes, NORMALIZATION)
    adata = read_spaceranger(tiny["spaceranger"])
    reference = adata.copy()
    sc.pp.normalize_total(reference, target_sum=1e4)  # library size over all measured genes
    sc.pp.log1p(reference)
    np.testing.assert_allclose(spots.expression, reference[:, genes].X.toarray(), rtol=1e-5, atol=1e-5)
    assert spots.ids == list(adata.obs_names) and spots.neighbors.shape == (len(spots), 6)
    assert spots.sample == "CRC_S02" and spots.positions_um.shape == (len(spots), 2)
    # the 55 um spot diameter in scalefactors_json gives the pixel size: the lattice is 100 um
    i = int(np.flatnonzero(spots.neighbors[:, 1] >= 0)[0])  # slot 1: the next spot of the same row
    j = int(spots.neighbors[i, 1])
    assert np.hypot(*(spots.positions_um[i] - spots.positions_um[j])) == pytest.approx(100.0, rel=0.02)

    # the same spots from an h5ad and from CSVs (all genes, counts) give the same expression
    h5ad = tmp_path / "sample.h5ad"
    adata.write_h5ad(h5ad)
    from_h5ad = read_spots(h5ad, genes, NORMALIZATION)
    np.testing.assert_array_equal(from_h5ad.expression, spots.expression)
    np.testing.assert_array_equal(from_h5ad.neighbors, spots.neighbors)
    table = adata.to_df().astype(int)
    table.to_csv(tmp_path / "counts.csv")  # index column = barcodes
    from_csv = read_spots(tmp_path / "counts.csv", genes, NORMALIZATION)
    assert from_csv.ids == spots.ids and from_csv.neighbors is None and from_csv.positions_um is None
    np.testing.assert_allclose(from_csv.expression, spots.expression, rtol=1e-6, atol=1e-6)
    alone = build_conditions(from_csv, 6)
    assert torch.equal(alone, alone[:, :1].expand_as(alone))  # each spot stands in for its neighbours
    np.testing.assert_allclose(build_conditions(spots, 6)[:, 0], alone[:, 0], atol=1e-6)
    # already-normalised values are used as they are
    normalised = reference[:, genes].to_df()
    normalised.to_csv(tmp_path / "normalised.csv")
    as_is = read_spots(tmp_path / "normalised.csv", genes, NORMALIZATION, normalized=True)
    np.testing.assert_allclose(as_is.expression, spots.expression, atol=1e-5)
    with pytest.raises(ValueError, match="non-integer values.*normalized=True"):
        read_spots(tmp_path / "normalised.csv", genes, NORMALIZATION)


def test_h5ad_and_csv_inputs_generate(tiny, reference_run, tmp_path):
    import logging

    from bundle.io.spots import read_spaceranger, read_spots
    from bundle.sampling.generation import build_conditions

    adata = read_spaceranger(tiny["spaceranger"])
    reference = read_manifest(reference_run)
    wanted = [r["spot_id"] for r in reference]
    adata.write_h5ad(tmp_path / "sample.h5ad")
    out = run_inference(tiny, tmp_path / "h5ad", input=str(tmp_path / "sample.h5ad"), spots=wanted[1:], num_spots=None)
    assert [r["spot_id"] for r in read_manifest(out)] == wanted[1:]
    for spot, image in pixels(out).items():  # same spots, same neighbours, same seeds: the same patches
        assert_same_patch(image, pixels(reference_run)[spot])

    table = adata.to_df().astype(int)
    table.insert(0, "spot_id", table.index)
    table.to_csv(tmp_path / "spots.csv", index=False)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logging.getLogger("bundle.sampling.generation").addHandler(handler)
    try:
        out = run_inference(tiny, tmp_path / "csv", input=str(tmp_path / "spots.csv"), num_spots=2)
    finally:
        logging.getLogger("bundle.sampling.generation").removeHandler(handler)
    rows = read_manifest(out)
    assert len(rows) == 2 and rows[0]["sample"] == "spots" and rows[0]["x_um"] == ""
    assert any("stands in for its 6 missing neighbours" in r.getMessage() for r in records)
    # with array coordinates the CSV's spots get their hex neighbours: the Space Ranger conditions
    table["array_row"], table["array_col"] = adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()
    table.to_csv(tmp_path / "spots_xy.csv", index=False)
    with_xy = read_spots(tmp_path / "spots_xy.csv", tiny["genes"], NORMALIZATION)
    from_spaceranger = read_spots(tiny["spaceranger"], tiny["genes"], NORMALIZATION)
    torch.testing.assert_close(build_conditions(with_xy, 6), build_conditions(from_spaceranger, 6), atol=1e-6, rtol=0)


def test_missing_panel_gene_refused_and_nothing_written(tiny, tmp_path):
    from bundle.io.spots import read_spaceranger

    table = read_spaceranger(tiny["spaceranger"]).to_df().astype(int)
    dropped = tiny["genes"][3]
    table.drop(columns=[dropped]).to_csv(tmp_path / "short.csv")
    out = tmp_path / "runs" / "short"
    with pytest.raises(Exception) as info:
        run_inference(tiny, out, input=str(tmp_path / "short.csv"))
    error = _cause(info.value, ValueError)
    assert error is not None and dropped in str(error) and "panel genes" in str(error)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_inference_builds_the_network_the_checkpoint_records(tiny):
    """configs/demo.json (layered on top) sets the demo model's architecture: the network still follows the checkpoint."""
    from bundle.checkpoints import load_model

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), str(CONFIGS / "demo.json")])
    parser.update({"bundle_root": str(tiny["root"]), "model_path": str(tiny["model_path"])})
    network = parser.get_parsed_content("network_def")
    saved = torch.load(tiny["model_path"], map_location="cpu", weights_only=True)["network"]
    assert {k: tuple(v.shape) for k, v in network.state_dict().items()} == {k: tuple(v.shape) for k, v in saved.items()}
    info = load_model(tiny["model_path"], network, genes=tiny["genes"], architecture=tiny_architecture(6))
    assert network.num_genes == len(tiny["genes"]) == len(info["gene_panel"]) and network.num_neighbors == 6
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)


def test_wrong_architecture_unknown_spot_and_foreign_output_dir_refused(tiny, tmp_path):
    from bundle.checkpoints import build_network, load_model

    # the configs build the network from the checkpoint; a network built otherwise is refused before any weight loads
    other = {**tiny_architecture(6), "cross_attention_dim": 32}
    network = build_network({"architecture": other, "latent_shape": [3, 8, 8], "gene_panel": tiny["genes"]})
    with pytest.raises(Exception) as info:
        load_model(tiny["model_path"], network, architecture=other)
    error = _cause(info.value, ValueError)
    assert error is not None and "cross_attention_dim" in str(error) and "other network settings" in str(error)
    with pytest.raises(Exception) as info:
        run_inference(tiny, tmp_path / "spots", spots=["NOT-A-BARCODE"])
    assert "NOT-A-BARCODE" in str(_cause(info.value, ValueError))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(Exception) as info:
        run_inference(tiny, foreign)
    assert _cause(info.value, FileExistsError) is not None
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not list(tmp_path.glob(".*partial*"))


def test_expression_guidance_from_the_config(tiny, reference_run, tmp_path):
    from bundle.expression_guidance import ExpressionReader, save_expression_reader

    reader_path = tiny["root"] / "models" / "expression_reader.pt"
    with pytest.raises(Exception) as info:
        run_inference(tiny, tmp_path / "no_reader", expression_guidance_scale=50.0)
    assert "expression_reader.pt" in str(_cause(info.value, FileNotFoundError))
    assert not (tmp_path / "no_reader").exists()
    torch.manual_seed(0)
    reader = ExpressionReader(3, len(tiny["genes"]), len(tiny["genes"]))
    save_expression_reader(tmp_path / "other_autoencoder.pt", reader, tiny["genes"], 0.25)
    with pytest.raises(Exception) as info:
        run_inference(tiny, tmp_path / "other", expression_guidance_scale=50.0,
                      expression_reader_path=str(tmp_path / "other_autoencoder.pt"))  # fmt: skip
    assert "another autoencoder" in str(_cause(info.value, ValueError))
    save_expression_reader(reader_path, reader, tiny["genes"], 0.5)
    try:
        off = run_inference(tiny, tmp_path / "off", expression_guidance_scale=0.0)
        guided = run_inference(tiny, tmp_path / "guided", expression_guidance_scale=5000.0)
    finally:
        reader_path.unlink()
    assert {r["expression_guidance_scale"] for r in read_manifest(guided)} == {"5000.0"}
    reference, plain, steered = pixels(reference_run), pixels(off), pixels(guided)
    for spot in plain:
        assert_same_patch(plain[spot], reference[spot])  # scale 0 is the sampler without guidance
    assert any(not np.array_equal(steered[s], plain[s]) for s in plain)


def test_ddpm_scheduler_and_edits(tiny, reference_run, tmp_path):
    from bundle.io.spots import read_spots
    from bundle.sampling.generation import spot_datalist

    out = run_inference(tiny, tmp_path / "ddpm", scheduler="ddpm", num_spots=2, edits=["CD3E*8"])
    rows = read_manifest(out)
    assert {r["scheduler"] for r in rows} == {"ddpm"} and {r["edits"] for r in rows} == {"CD3E*8"} and len(rows) == 2
    spots = read_spots(tiny["spaceranger"], tiny["genes"], NORMALIZATION)
    plain = spot_datalist(spots, 6, num_spots=2)
    edited = spot_datalist(spots, 6, num_spots=2, edits="CD3E*8")
    cd3e = tiny["genes"].index("CD3E")
    for a, b in zip(plain, edited):
        expected = torch.log1p(torch.expm1(a["condition"][:, cd3e]) * 8)
        torch.testing.assert_close(b["condition"][:, cd3e], expected, rtol=1e-5, atol=1e-6)
        others = [i for i in range(len(tiny["genes"])) if i != cd3e]
        assert torch.equal(a["condition"][:, others], b["condition"][:, others])
    with pytest.raises(Exception) as info:
        run_inference(tiny, tmp_path / "bad", scheduler="euler")
    assert "ddim" in str(_cause(info.value, ValueError))


def test_edit_script_writes_grid_and_refuses_unknown_genes(tiny, reference_run, tmp_path):
    import importlib.util

    from PIL import Image

    spec = importlib.util.spec_from_file_location("edit_expression", ROOT / "scripts" / "edit_expression.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    base = [
        "--config-file",
        str(CONFIGS / "inference.json"),
        str(tiny["layer"]),
        "--bundle-root",
        str(tiny["root"]),
        "--input",
        str(tiny["spaceranger"]),
        "--num-spots",
        "3",
    ]
    grid = tmp_path / "grid.png"
    edits = ["--edit", "immune*4", "--edit", "CD3E=3,MKI67*2"]
    assert script.main(base + edits + ["--output", str(grid), "--no-labels"]) == 0
    image = np.asarray(Image.open(grid))
    assert image.shape == (3 * 16 + 2 * 2, 3 * 16 + 2 * 2, 3)  # rows: original + 2 edits; columns: 3 spots
    description = json.loads(grid.with_suffix(".json").read_text())
    assert description["rows"] == ["original", "immune*4", "CD3E=3,MKI67*2"]
    assert set(description["edits"][0]["genes"]) == {"PTPRC", "CD3E", "CD74"} & set(tiny["genes"])
    assert description["edits"][1]["genes"] == ["CD3E", "MKI67"]
    reference = read_manifest(reference_run)
    assert [s["seed"] for s in description["spots"]] == [int(r["seed"]) for r in reference]
    original = pixels(reference_run)[reference[0]["spot_id"]]  # the original row is the inference patch
    assert_same_patch(image[:16, :16], original)
    for column in range(3):  # setting CD3E changes every spot's patch (the seed is the same)
        tiles = [image[r * 18 : r * 18 + 16, column * 18 : column * 18 + 16] for r in (0, 2)]
        assert not np.array_equal(*tiles)
    with pytest.raises(ValueError, match="NOTAGENE"):
        script.main(base + ["--edit", "NOTAGENE*2", "--output", str(tmp_path / "bad.png")])
    assert not (tmp_path / "bad.png").exists()


def test_slide_script_synthesises_from_a_spaceranger_folder(tiny, tmp_path):
    import importlib.util

    import tifffile

    spec = importlib.util.spec_from_file_location("synthesize_slide", ROOT / "scripts" / "synthesize_slide.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from bundle.io.spots import read_spots

    x, y = read_spots(tiny["spaceranger"], tiny["genes"], NORMALIZATION).positions_um.mean(axis=0)
    output, summary = tmp_path / "slide.tif", tmp_path / "summary.json"
    args = ["--config-file", str(CONFIGS / "inference.json"), str(CONFIGS / "demo.json"), str(tiny["layer"])]
    args += ["--model-path", str(tiny["model_path"]), "--autoencoder-path", str(tiny["autoencoder_path"])]
    args += ["--input", str(tiny["spaceranger"]), "--region", str(x - 64), str(y - 64), str(x + 64), str(y + 64)]
    args += ["--output", str(output), "--summary-json", str(summary), "--device", "cpu", "--quiet"]
    with pytest.raises(RuntimeError) as info:  # demo.json samples with expression guidance: no reader, no slide
        script.main(args)
    assert "expression_reader.pt" in str(_cause(info.value, FileNotFoundError)) and not output.exists()
    from bundle.expression_guidance import ExpressionReader, save_expression_reader

    reader_path = tiny["model_path"].parent / "expression_reader.pt"
    torch.manual_seed(0)
    save_expression_reader(reader_path, ExpressionReader(3, len(tiny["genes"]), 4), tiny["genes"], 0.5)
    try:  # guided per window, as demo.json sets
        assert script.main(args + ["--thumbnail", str(tmp_path / "thumb.png")]) == 0
    finally:
        reader_path.unlink()
    written = json.loads(summary.read_text())
    assert written["num_inference_steps"] == 2 and written["mpp"] == pytest.approx(4.0)  # the tiny layer's steps
    assert written["expression_guidance_scale"] == 70.0
    assert tifffile.imread(output).shape == (*written["shape"], 3) and (tmp_path / "thumb.png").is_file()
