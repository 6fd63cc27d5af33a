"""configs/metadata.json: valid against the offline schema configs/meta_schema.json, and true to the network."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out

from tests.helpers import CONFIGS, ROOT

SCHEMA = CONFIGS / "meta_schema.json"
META = CONFIGS / "metadata.json"


def _meta() -> dict:
    return json.loads(META.read_text())


def _verify(meta: dict, tmp_path: Path) -> None:
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(meta))
    verify_metadata(meta_file=str(path), filepath=str(SCHEMA))


def test_metadata_symlink_is_the_top_level_file():
    assert META.is_symlink()
    assert META.resolve() == (ROOT / "metadata.json").resolve()


def test_schema_is_a_valid_json_schema():
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    jsonschema.validators.validator_for(schema).check_schema(schema)


def test_verify_metadata_passes_offline(tmp_path):
    verify_metadata(meta_file=str(META), filepath=str(SCHEMA))
    # the schema URL is never fetched when the local file is given: an unreachable URL still verifies
    meta = _meta()
    meta["schema"] = "https://unreachable.invalid/meta_schema.json"
    _verify(meta, tmp_path)


@pytest.mark.parametrize(
    "path",
    [
        ("task",),
        ("version",),
        ("required_packages_version",),
        ("network_data_format",),
        ("network_data_format", "outputs"),
        ("network_data_format", "inputs", "image", "spatial_shape"),
        ("network_data_format", "inputs", "context", "is_patch_data"),
    ],
)
def test_verify_metadata_fails_without_a_required_key(tmp_path, path):
    meta = copy.deepcopy(_meta())
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    with pytest.raises(ValueError, match=f"'{path[-1]}' is a required property"):
        _verify(meta, tmp_path)


def test_verify_metadata_fails_on_wrong_types(tmp_path):
    meta = _meta()
    meta["network_data_format"]["inputs"]["image"]["num_channels"] = "four"
    with pytest.raises(ValueError):
        _verify(meta, tmp_path)


def _parser(*configs: str, num_genes: int, **override) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in configs])
    parser.read_meta(str(META))
    parser["gene_panel"] = [f"GENE{i}" for i in range(num_genes)]
    for key, value in override.items():
        parser[key] = value
    return parser


def _inputs(parser: ConfigParser, batch: int = 2) -> dict[str, torch.Tensor]:
    c, s = parser.get_parsed_content("latent_channels"), parser.get_parsed_content("latent_size")
    k, g = parser.get_parsed_content("num_neighbors"), parser.get_parsed_content("num_genes")
    context = torch.rand(batch, 1 + k, g) * 3
    context[0] = -1.0  # one unconditional row
    return {
        "x": torch.randn(batch, c, s, s),
        "timesteps": torch.randint(0, parser.get_parsed_content("num_train_timesteps"), (batch,)),
        "context": context,
    }


@pytest.mark.slow
def test_declared_shapes_match_the_train_config_network():
    """network_data_format (the full-size network of configs/train.json) against a forward pass of network_def."""
    nf = _meta()["network_data_format"]
    image, timesteps, context = (nf["inputs"][k] for k in ("image", "timesteps", "context"))
    pred = nf["outputs"]["pred"]
    num_genes = context["spatial_shape"][0]
    parser = _parser("train.json", num_genes=num_genes)
    assert image["num_channels"] == pred["num_channels"] == parser.get_parsed_content("latent_channels")
    assert image["spatial_shape"] == pred["spatial_shape"] == [parser.get_parsed_content("latent_size")] * 2
    assert context["num_channels"] == 1 + parser.get_parsed_content("num_neighbors")
    assert timesteps["value_range"] == [0, parser.get_parsed_content("num_train_timesteps") - 1]
    assert parser.get_parsed_content("prediction_type") == "v_prediction" and "velocity" in pred["description"]

    net = parser.get_parsed_content("network_def").eval()
    inputs = _inputs(parser, batch=1)
    assert list(inputs["x"].shape[1:]) == [image["num_channels"], *image["spatial_shape"]]
    assert list(inputs["context"].shape[1:]) == [context["num_channels"], *context["spatial_shape"]]
    with torch.no_grad():
        out = net(**inputs)
    assert list(out.shape) == [1, pred["num_channels"], *pred["spatial_shape"]]
    assert str(out.dtype) == f"torch.{pred['dtype']}"
    assert str(inputs["timesteps"].dtype) == f"torch.{timesteps['dtype']}"


@pytest.mark.slow
def test_verify_net_in_out_in_process_with_tensor_forward_args():
    """MONAI's verify_net_in_out on network_def: the extra inputs must be tensors, which only a Python call can pass."""
    nf = _meta()["network_data_format"]["inputs"]
    num_genes = nf["context"]["spatial_shape"][0]
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(META),
        config_file=str(CONFIGS / "train.json"),
        device="cpu",
        extra_forward_args={
            "timesteps": torch.tensor([500]),
            "context": torch.rand(1, nf["context"]["num_channels"], num_genes),
        },
        gene_panel=[f"GENE{i}" for i in range(num_genes)],
    )


@pytest.mark.parametrize("num_genes,num_neighbors", [(12, 6), (5, 0)])
def test_demo_network_follows_the_declared_layout(num_genes, num_neighbors):
    """train.json + demo.json with a small fake panel: same layout (C = latent_channels, 1 + K spots x G genes)."""
    parser = _parser("train.json", "demo.json", num_genes=num_genes, num_neighbors=num_neighbors)
    net = parser.get_parsed_content("network_def").eval()
    inputs = _inputs(parser)
    assert inputs["context"].shape[1:] == (1 + num_neighbors, num_genes)
    with torch.no_grad():
        out = net(**inputs)
    assert out.shape == inputs["x"].shape and out.dtype == torch.float32
    with pytest.raises(ValueError):  # a condition over another gene count is refused
        net(inputs["x"], inputs["timesteps"], inputs["context"][..., :-1])
