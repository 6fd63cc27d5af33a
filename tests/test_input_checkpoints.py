"""Checkpoints and command lines users get wrong: a corrupt, empty, truncated or code-holding ``model.pt``,
``autoencoder.pt`` or resume checkpoint is refused naming the file (never with torch's advice to turn
``weights_only`` off); "every spot" is expressible on MONAI's command line (which drops ``None`` overrides); and a
refused input of a generation run ends the output with the bundle's own message, not MONAI's wrapper."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import CONFIGS, ROOT, TINY_TRAIN, tiny_architecture

NORMALIZATION = {"method": "normalize_total+log1p", "target_sum": 10000.0, "null_value": -1.0}
BROKEN_KINDS = ("empty", "random_bytes", "truncated", "pickled_object", "plain_pickle")
# what each kind of broken file is called in the message
KIND_WORDS = {
    "empty": "is empty",
    "random_bytes": "not a torch checkpoint",
    "truncated": "truncated",
    "pickled_object": "holds Python objects",
    "plain_pickle": "plain pickle",
}
TORCH_ADVICE = ("weights_only=False", "`weights_only` set to `False`", "_use_new_zipfile_serialization", "safe_globals")


class RunsCodeWhenUnpickled:
    """An object whose unpickling would create the file ``marker`` (it must never happen)."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def make_broken(kind: str, good: Path, folder: Path) -> tuple[Path, Path]:
    """A broken copy of the checkpoint ``good`` in ``folder`` (same file name); returns it and the marker file that
    code in it would create."""
    import pickle

    folder.mkdir(parents=True, exist_ok=True)
    path, marker = folder / good.name, folder / "code_ran.txt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random_bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "pickled_object":  # a torch zip archive whose pickle calls code
        torch.save(
            {**torch.load(good, map_location="cpu", weights_only=True), "x": RunsCodeWhenUnpickled(marker)}, path
        )
    elif kind == "plain_pickle":
        path.write_bytes(pickle.dumps({"network": RunsCodeWhenUnpickled(marker)}))
    else:
        raise ValueError(kind)
    return path, marker


def assert_clear_refusal(error: BaseException, path: Path, kind: str, what: str) -> None:
    message = str(error)
    assert str(path) in message, message
    assert KIND_WORDS[kind] in message, message
    assert re.search(rf"it is not an? {what} of this bundle", message), message
    for advice in TORCH_ADVICE:
        assert advice not in message, message
    # nothing chained: the traceback shows no torch error (and its advice) after or before the bundle's message
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__), repr(error.__cause__)


@pytest.fixture(scope="module")
def tiny(demo_root, tmp_path_factory) -> dict:
    """Tiny random-weight checkpoints saved as training saves them, a config layer with fast settings, and the demo
    validation sample's Space Ranger folder."""
    from monai.networks.nets import AutoencoderKL

    from bundle.autoencoder import save_autoencoder_checkpoint
    from bundle.checkpoints import build_network, save_model
    from bundle.io.spots import read_spaceranger

    root = tmp_path_factory.mktemp("tiny_ckpt_bundle")
    spaceranger = demo_root / "CRC_S02" / "spaceranger"
    genes = list(read_spaceranger(spaceranger).var_names)[:12]
    layer = root / "tiny.json"
    layer.write_text(json.dumps({"num_inference_steps": 1, "progress": False, "batch_size": 64, "device": "cpu"}))
    extra = {
        "normalization": NORMALIZATION,
        "num_neighbors": 6,
        "prediction_type": "v_prediction",
        "latent_shape": [3, 4, 4],
        "patch_size": 8,
        "patch_fov_um": 64.0,
        "iteration": 1,
        "architecture": tiny_architecture(6),
    }
    torch.manual_seed(0)
    network = build_network({**extra, "gene_panel": genes})
    model_path = save_model(root / "models" / "model.pt", network, genes, 0.5, extra)
    ae_kwargs = dict(TINY_TRAIN["autoencoder_kwargs"])
    autoencoder_path = save_autoencoder_checkpoint(
        root / "models" / "autoencoder.pt", AutoencoderKL(**ae_kwargs), 0.5, ae_kwargs
    )
    return {
        "root": root,
        "layer": layer,
        "genes": genes,
        "spaceranger": spaceranger,
        "model_path": model_path,
        "autoencoder_path": autoencoder_path,
    }


# item 7: every checkpoint the bundle loads


@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_broken_model_checkpoint_is_refused_naming_the_file(tiny, tmp_path, kind):
    from bundle.checkpoints import build_network, load_model, read_model_info

    path, marker = make_broken(kind, tiny["model_path"], tmp_path / "models")
    with pytest.raises(ValueError) as info:
        read_model_info(path)
    assert_clear_refusal(info.value, path, kind, "model checkpoint")
    assert "--model_path" in str(info.value)
    network = build_network(read_model_info(tiny["model_path"]))
    with pytest.raises(ValueError) as info:
        load_model(path, network)
    assert_clear_refusal(info.value, path, kind, "model checkpoint")
    assert not marker.exists(), "code in the checkpoint ran"


@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_broken_autoencoder_checkpoint_is_refused_naming_the_file(tiny, tmp_path, kind):
    from bundle.autoencoder import load_autoencoder_checkpoint, read_scale_factor

    path, marker = make_broken(kind, tiny["autoencoder_path"], tmp_path / "models")
    for load in (load_autoencoder_checkpoint, read_scale_factor):
        with pytest.raises(ValueError) as info:
            load(path)
        assert_clear_refusal(info.value, path, kind, "autoencoder checkpoint")
        assert "import_sd_vae" in str(info.value)
    assert not marker.exists(), "code in the checkpoint ran"


def _trainer_and_network():
    from ignite.engine import Engine

    torch.manual_seed(0)
    network = torch.nn.Linear(3, 2)
    return Engine(lambda engine, batch: None), network


def _resume_checkpoint(folder: Path) -> Path:
    """A real resume checkpoint: ResumableCheckpointSaver after one epoch of a trainer."""
    from bundle.checkpoints import latest_checkpoint
    from bundle.handlers import ResumableCheckpointSaver

    trainer, network = _trainer_and_network()
    ResumableCheckpointSaver(str(folder), {"network": network}).attach(trainer)
    trainer.run([0, 1], max_epochs=1)
    return Path(latest_checkpoint(folder))


@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_broken_resume_checkpoint_is_refused_naming_the_file(tmp_path, kind):
    from bundle.handlers import ResumeCheckpointLoader

    good = _resume_checkpoint(tmp_path / "saved")
    path, marker = make_broken(kind, good, tmp_path / "diffusion_checkpoints")
    trainer, network = _trainer_and_network()
    with pytest.raises(ValueError) as info:  # when attached: before training starts
        ResumeCheckpointLoader(str(path), {"network": network}).attach(trainer)
    assert_clear_refusal(info.value, path, kind, "resume checkpoint")
    assert "delete" in str(info.value)
    assert not marker.exists(), "code in the checkpoint ran"


def test_intact_resume_checkpoint_still_resumes(tmp_path):
    from bundle.handlers import ResumeCheckpointLoader

    good = _resume_checkpoint(tmp_path / "saved")
    trainer, network = _trainer_and_network()
    torch.nn.init.zeros_(network.weight)
    ResumeCheckpointLoader(str(good), {"network": network}).attach(trainer)
    trainer.run([0, 1], max_epochs=2)
    assert trainer.state.epoch == 2 and trainer.state.iteration == 4  # one more epoch after the saved one
    assert network.weight.abs().sum() > 0


def test_resume_checkpoint_without_the_objects_to_restore_is_refused(tmp_path):
    from bundle.handlers import ResumeCheckpointLoader

    path = tmp_path / "checkpoint_4.pt"
    torch.save({"model": {}}, path)
    trainer, network = _trainer_and_network()
    with pytest.raises(ValueError, match=r"checkpoint_4\.pt.* has no 'network', 'trainer'.*not a resume checkpoint"):
        ResumeCheckpointLoader(str(path), {"network": network}).attach(trainer)


def test_model_checkpoint_of_another_kind_is_refused_by_load_model(tiny, tmp_path):
    from bundle.checkpoints import build_network, load_model, read_model_info

    path = tmp_path / "model.pt"
    torch.save({"network": {}}, path)
    network = build_network(read_model_info(tiny["model_path"]))
    with pytest.raises(ValueError, match=r"model\.pt' has no 'gene_panel'"):
        load_model(path, network)
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match=r"model\.pt' holds a list, not a dictionary.*not a model checkpoint"):
        read_model_info(path)


# items 3 and 11: the real command line


def bundle_run(tiny: dict, *args: str, config: str = "inference.json", timeout: int = 300):
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        json.dumps([str(CONFIGS / config), str(tiny["layer"])]),
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        "--logging_file",
        str(CONFIGS / "logging.conf"),
        "--bundle_root",
        str(tiny["root"]),
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def in_tissue_spots(spaceranger: Path) -> int:
    from bundle.io.spots import read_spaceranger

    return int(read_spaceranger(spaceranger).n_obs)


@pytest.mark.slow
def test_num_spots_all_on_the_command_line_generates_every_spot(tiny, tmp_path):
    total = in_tissue_spots(tiny["spaceranger"])
    assert total > 16  # more than the default, so "all" is seen
    out = tmp_path / "all"
    run = bundle_run(tiny, "--input", str(tiny["spaceranger"]), "--output_dir", str(out), "--num_spots", "all")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = (out / "manifest.csv").read_text().strip().splitlines()
    assert len(rows) - 1 == total


@pytest.mark.slow
def test_num_spots_none_on_the_command_line_is_refused_not_ignored(tiny, tmp_path):
    out = tmp_path / "none"
    run = bundle_run(tiny, "--input", str(tiny["spaceranger"]), "--output_dir", str(out), "--num_spots", "None")
    assert run.returncode != 0, "--num_spots None was dropped and the default applied"
    line = last_line(run.stderr)
    assert line.startswith("ValueError: ") and "--num_spots None" in line and "--num_spots all" in line, line
    assert not out.exists()


@pytest.mark.slow
def test_probe_max_train_spots_none_on_the_command_line_is_refused(tiny, tmp_path):
    run = bundle_run(
        tiny, "--output_dir", str(tmp_path / "eval"), "--probe_max_train_spots", "None", config="evaluate.json"
    )
    assert run.returncode != 0
    line = last_line(run.stderr)
    assert "--probe_max_train_spots None" in line and "4000" in line and "all" in line, line


@pytest.mark.parametrize("value", [0, "all", "ALL", "none", None])
def test_every_spot_values_of_num_spots_and_num_eval_spots(demo_root, value):
    from monai.bundle import ConfigParser

    from bundle.io.spots import read_spots
    from bundle.sampling.generation import parse_num_spots, select_spots

    assert parse_num_spots(value) is None
    spots = read_spots(demo_root / "CRC_S02" / "spaceranger", ["EPCAM"], NORMALIZATION)
    assert len(spots) > 16 and len(select_spots(spots, num_spots=value)) == len(spots)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "evaluate.json"))
    parser["num_eval_spots"] = value
    parser["probe_max_train_spots"] = value
    assert parser.get_parsed_content("evaluation#data#num_spots") is None
    assert parser.get_parsed_content("evaluation#probe#max_train_spots") is None


@pytest.mark.parametrize("value", [-1, 2.5, "some", "16x"])
def test_bad_num_spots_is_refused_with_the_value(value):
    from bundle.sampling.generation import parse_num_spots

    with pytest.raises(ValueError, match=rf"num_spots must be .*'all'.*got {value!r}"):
        parse_num_spots(value)


@pytest.mark.slow
def test_missing_input_ends_with_the_bundles_message(tiny, tmp_path):
    missing = tmp_path / "no_such_sample" / "outs"
    run = bundle_run(tiny, "--input", str(missing), "--output_dir", str(tmp_path / "out"))
    assert run.returncode != 0
    line = last_line(run.stderr)
    assert line.startswith("FileNotFoundError: input ") and str(missing) in line, line
    assert "Failed to evaluate" not in run.stderr


@pytest.mark.slow
def test_corrupt_model_checkpoint_ends_with_the_bundles_message(tiny, tmp_path):
    models = tmp_path / "bundle" / "models"
    make_broken("random_bytes", tiny["model_path"], models)
    run = bundle_run(
        tiny,
        "--input",
        str(tiny["spaceranger"]),
        "--model_path",
        str(models / "model.pt"),
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert run.returncode != 0
    line = last_line(run.stderr)
    assert line.startswith("ValueError: model checkpoint ") and str(models / "model.pt") in line, line
    assert "_use_new_zipfile_serialization" not in run.stderr and "weights_only=False" not in run.stderr


@pytest.mark.slow
def test_panel_mismatch_ends_with_the_bundles_message(tiny, tmp_path):
    import pandas as pd

    from bundle.io.spots import read_spaceranger

    adata = read_spaceranger(tiny["spaceranger"])
    counts = pd.DataFrame(adata.X.toarray(), index=adata.obs_names, columns=adata.var_names)
    csv = tmp_path / "counts.csv"
    counts.drop(columns=[tiny["genes"][0]]).to_csv(csv)
    run = bundle_run(tiny, "--input", str(csv), "--output_dir", str(tmp_path / "out"))
    assert run.returncode != 0
    line = last_line(run.stderr)
    assert line.startswith("ValueError: ") and tiny["genes"][0] in line, line
    assert "Failed to evaluate" not in run.stderr


def test_config_error_is_printed_with_the_bundles_message_last(tiny, tmp_path, capsys):
    import sys as system

    from monai.bundle import ConfigParser

    from bundle.cli import config_error_cause, print_config_error

    missing = tmp_path / "models" / "model.pt"
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser["model_path"] = str(missing)
    with pytest.raises(RuntimeError, match="Failed to evaluate") as info:
        parser.get_parsed_content("gene_panel")
    cause = config_error_cause(info.value)
    assert isinstance(cause, FileNotFoundError) and str(missing) in str(cause)
    print_config_error(type(info.value), info.value, info.value.__traceback__)
    err = capsys.readouterr().err
    assert last_line(err) == f"FileNotFoundError: {cause}"
    assert "Failed to evaluate" not in err
    error = ValueError("not from a config")  # other errors: as Python prints them
    print_config_error(ValueError, error, None, previous=system.__excepthook__)
    assert last_line(capsys.readouterr().err) == "ValueError: not from a config"


def test_dropped_none_overrides_are_found_in_both_spellings():
    from bundle.cli import dropped_none_overrides, is_bundle_command_line

    argv = ["/x/monai/bundle/__main__.py", "run", "--num_spots", "None", "--layer=None", "--mpp", "None", "--seed", "1"]
    assert is_bundle_command_line(argv) and not is_bundle_command_line(["pytest"])
    values = {"num_spots": 16, "layer": "counts", "mpp": None, "seed": 1}
    assert dropped_none_overrides(values, argv) == ["num_spots", "layer"]  # mpp: None anyway, nothing lost
