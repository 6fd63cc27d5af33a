"""``import bundle`` must not pull in heavy optional libraries beyond what ``import monai`` itself loads."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("scanpy", "anndata", "mlflow", "cucim", "openslide", "squidpy", "diffusers")


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return set(filter(None, last.split(",")))


def test_import_bundle_stays_light():
    baseline = _loaded_after("import monai")  # MONAI 1.6 itself imports mlflow and openslide when present
    # every module of the package, found by walking it (new modules are covered without editing this test)
    loaded = _loaded_after(
        "import importlib, pkgutil, bundle\n"
        "for m in pkgutil.walk_packages(bundle.__path__, 'bundle.'):\n"
        "    importlib.import_module(m.name)"
    )
    assert loaded - baseline == set(), f"import bundle loaded {sorted(loaded - baseline)} beyond import monai"
    assert not {"scanpy", "anndata", "cucim"} & loaded


def test_walk_finds_every_module():
    import pkgutil
    from pathlib import Path

    import bundle

    names = {m.name for m in pkgutil.walk_packages(bundle.__path__, "bundle.")}
    files = {
        "bundle." + ".".join(p.relative_to(Path(bundle.__file__).parent).with_suffix("").parts)
        for p in Path(bundle.__file__).parent.rglob("*.py")
    }
    assert {n.removesuffix(".__init__") for n in files} - {"bundle"} == names


def test_probe_sees_heavy_modules():
    # guards the test above: the same probe reports scanpy once something imports it
    assert "scanpy" in _loaded_after("import bundle, scanpy")
