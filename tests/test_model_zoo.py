"""The MONAI model-zoo's own bundle checks that apply offline (its ``ci/verify_bundle.py``), written for this bundle.

The zoo verifies: ``configs/metadata.json`` exists and ``large_files.yml`` describes the weights to download; the
version has a changelog entry; the metadata passes the schema (here the schema file kept in the repository, see
``tests/test_metadata.py``); the configs parse. Its data-shape and TorchScript checks are excluded for this bundle,
as for the zoo's other diffusion bundles (``docs/README.md`` says why).
"""

from __future__ import annotations

import json
import re
import tomllib

import pytest
import yaml
from monai.bundle import ConfigParser, verify_metadata
from monai.bundle.config_item import ComponentLocator

import bundle
from tests.helpers import CONFIGS, ROOT

# every layering of configs a user runs (README, docs)
COMBINATIONS = [
    ["train.json"],
    ["train.json", "demo.json"],
    ["train.json", "multi_gpu_train.json"],
    ["train.json", "multi_gpu_train.json", "demo.json"],
    ["inference.json"],
    ["inference.json", "demo.json"],
    ["evaluate.json"],
    ["evaluate.json", "demo.json"],
    ["train.json", "demo.json", "demo_long.json"],
    ["inference.json", "demo.json", "demo_long.json"],
    ["evaluate.json", "demo.json", "demo_long.json"],
]


def _meta() -> dict:
    return json.loads((CONFIGS / "metadata.json").read_text())


def test_bundle_directory_and_large_files():
    assert (CONFIGS / "metadata.json").is_file()
    spec = yaml.safe_load((ROOT / "large_files.yml").read_text())
    paths = set()
    for entry in spec["large_files"]:
        assert set(entry) == {"path", "url", "hash_val", "hash_type"}, entry
        assert entry["path"].startswith("models/") and entry["hash_type"] in ("md5", "sha256")
        paths.add(entry["path"])
    # the files the inference config loads are the ones described
    parser = ConfigParser(ConfigParser.load_config_file(str(CONFIGS / "inference.json")))
    for key in ("model_path", "autoencoder_path"):
        assert parser[key].replace("$@ckpt_dir + '/", "models/").rstrip("'") in paths


def test_version_has_a_changelog_and_one_source():
    meta = _meta()
    assert meta["version"] in meta["changelog"]
    assert meta["version"] == bundle.__version__
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "bundle.__version__"}


def test_required_packages_are_dependencies():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    meta = _meta()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {canonicalize_name(Requirement(d).name): Requirement(d) for d in project["dependencies"]}
    for name, version in meta["required_packages_version"].items():
        assert canonicalize_name(name) in deps, f"{name} is pinned in metadata.json but not a dependency"
        assert deps[canonicalize_name(name)].specifier.contains(version), (name, version)
    assert deps["torch"].specifier.contains(meta["pytorch_version"])
    assert deps["monai"].specifier.contains(meta["monai_version"])
    assert deps["numpy"].specifier.contains(meta["numpy_version"])


def test_metadata_format_offline():
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(CONFIGS / "meta_schema.json"))


def _strings(obj):
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)
    elif isinstance(obj, str):
        yield obj


@pytest.mark.parametrize("names", COMBINATIONS, ids=lambda n: "+".join(c.removesuffix(".json") for c in n))
def test_configs_parse_and_every_target_and_reference_resolves(names):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / n) for n in names])
    config = parser.get()
    locator = ComponentLocator()
    for target in set(_targets(config)):
        if "." in target:  # a dotted path: the module must import and hold the name
            module, _, name = target.rpartition(".")
            assert hasattr(__import__(module, fromlist=[name]), name), f"{target} does not exist"
        else:  # a MONAI short name
            assert locator.get_component_module_name(target) is not None, f"{target} is not a MONAI component"
    for text in _strings(config):
        if text.startswith(("$", "@")):
            for ref in re.findall(r"@([A-Za-z_][\w#]*)", text):
                assert ref in parser, f"{'+'.join(names)}: {text!r} refers to the missing id {ref!r}"


def test_demo_long_widens_the_demo_and_keeps_its_model():
    """demo_long.json changes only what it says (autoencoder width, iterations) and writes to its own folders."""
    configs = {}
    for layers in (["train.json", "demo.json"], ["train.json", "demo.json", "demo_long.json"]):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / n) for n in layers])
        parser["bundle_root"] = "/root"
        configs[len(layers)] = parser
    short, long = configs[2], configs[3]
    assert long["autoencoder_kwargs"]["channels"] == [32, 64] and short["autoencoder_kwargs"]["channels"] == [16, 32]
    rest = {k: v for k, v in long["autoencoder_kwargs"].items() if k != "channels"}
    assert rest == {k: v for k, v in short["autoencoder_kwargs"].items() if k != "channels"}
    assert long["num_iterations"] == 2 * short["num_iterations"] and long["unet_kwargs"] == short["unet_kwargs"]
    assert long.get_parsed_content("ckpt_dir") == "/root/models/demo_long"
    assert long.get_parsed_content("output_dir") == "/root/outputs/demo_long"
    autoencoder = long.get_parsed_content("autoencoder_def")
    assert autoencoder.encoder.blocks[0].conv.out_channels == 32


def _targets(obj):
    if isinstance(obj, dict):
        if isinstance(obj.get("_target_"), str):
            yield obj["_target_"]
        for value in obj.values():
            yield from _targets(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _targets(value)


def test_train_config_alone_writes_nothing_into_the_bundle(tmp_path):
    """Parsing the training config's properties (as the zoo's checks do) must not generate data in the bundle folder:
    the demo study is only simulated when ``configs/demo.json`` is layered on."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser["bundle_root"] = str(tmp_path)
    before = sorted(p.name for p in ROOT.iterdir())
    assert parser.get_parsed_content("dataset_dir") == str(tmp_path) + "/datasets/mine"
    assert not any(tmp_path.iterdir()) and sorted(p.name for p in ROOT.iterdir()) == before
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "demo.json")])
    assert "ensure_demo_dataset" in parser["dataset_dir"]
