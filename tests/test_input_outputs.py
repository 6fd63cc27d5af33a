"""What a run leaves behind: permissions that follow the umask, no stale staging folders, and unwritable or full
output locations named before (or when) they fail.

Names added by this change (``staging_dir``, ``check_writable``) are imported inside the tests, so that each test fails
on its own against code without them.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bundle.io.dataset import prepare_dataset
from bundle.review import export_review_kit
from bundle.sampling.generation import PatchWriter, patch_filename
from bundle.utils import atomic_path
from tests.helpers import TINY_TRAIN

HOST = socket.gethostname()
TINY_DATASET = {"fov_um": 64.0, "n_top_genes": 48, "min_counts": 50, "verbose": False}


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def umask():
    """Set a umask for the test and restore the previous one afterwards."""
    before = os.umask(0o022)

    def set_umask(value: int) -> None:
        os.umask(value)

    yield set_umask
    os.umask(before)


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def live_pid():
    """The id of a running process (a sleeping child), stopped after the test."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process.pid
    process.kill()
    process.wait()


def plant_staging(parent: Path, target: str, pid: int, host: str | None = HOST, token: str = "0123abcd") -> Path:
    """A staging folder as a run of process ``pid`` on ``host`` leaves it when killed (with a half-written file)."""
    name = f".{target}.partial-{pid}-{token}" if host is None else f".{target}.partial-{host}-{pid}-{token}"
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "half_written.npy").write_bytes(b"\x93NUMPY")
    return folder


def read_only(folder: Path) -> Path:
    """Make ``folder`` refuse new files: ``chmod 555`` for a normal user, ``chattr +i`` for root (who ignores
    permission bits); skip where neither is possible."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"running as root without chattr +i support ({done.stderr.decode().strip()}): no read-only folder")
    return folder


def writable_again(folder: Path) -> None:
    if os.geteuid() != 0:
        folder.chmod(0o755)
    else:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)


def write_images(folder: Path, prefix: str, count: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(prefix))
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{prefix}_{i}.png")
    return folder


# ------------------------------------------------------------------------------------------ a whole dataset, once


@pytest.fixture(scope="module")
def dataset_run(demo_root, tmp_path_factory) -> dict:
    """The demo study prepared under umask 022 beside stale staging folders of a dead and of a live run."""
    parent = tmp_path_factory.mktemp("datasets")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    stale = plant_staging(parent, "ds", dead_pid())
    running = plant_staging(parent, "ds", live.pid, token="4567cdef")
    before = os.umask(0o022)
    logger = logging.getLogger("bundle")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        prepare_dataset(demo_root / "manifest.csv", parent / "ds", **TINY_DATASET)
    finally:
        os.umask(before)
        logger.removeHandler(handler)
        live.kill()
        live.wait()
    return {"dataset": parent / "ds", "stale": stale, "running": running, "log": [r.getMessage() for r in records]}


# ------------------------------------------------------------------------------ item 12: permissions follow the umask


def test_dataset_folder_and_files_follow_the_umask(dataset_run):
    dataset = dataset_run["dataset"]
    assert mode(dataset) == 0o755  # not tempfile.mkdtemp's private 0700
    files = sorted(dataset.iterdir())
    assert {p.name for p in files} >= {"datalist.json", "expression.npy", "counts.npy", "spots.csv", "dataset.json"}
    assert {p.name: mode(p) for p in files} == {p.name: 0o644 for p in files}  # not mkstemp's 0600


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640)], ids=["umask022", "umask027"])
def test_checkpoint_follows_the_umask(tmp_path, umask, mask, expected):
    from monai.networks.nets import AutoencoderKL

    from bundle.autoencoder import save_autoencoder_checkpoint

    umask(mask)
    kwargs = dict(TINY_TRAIN["autoencoder_kwargs"])
    path = save_autoencoder_checkpoint(tmp_path / "models" / "autoencoder.pt", AutoencoderKL(**kwargs), 0.5, kwargs)
    assert mode(Path(path)) == expected


def test_review_kit_follows_the_umask_but_its_key_stays_private(tmp_path, umask):
    umask(0o022)
    real, generated = write_images(tmp_path / "real", "r", 2), write_images(tmp_path / "gen", "g", 2)
    kit, key = tmp_path / "kit", tmp_path / "key.json"
    export_review_kit(real, generated, 2, kit, key, seed=0)
    assert mode(kit) == 0o755 and mode(kit / "images") == 0o755 and mode(kit / "index.html") == 0o644
    assert {mode(p) for p in (kit / "images").iterdir()} == {0o644}
    assert mode(key) == 0o600  # the answers to the review: readable by its owner only, whatever the umask


# ------------------------------------------------------------------------------ item 13: stale staging folders


def test_staging_dir_removes_stale_folders_of_dead_runs_of_the_same_target_only(tmp_path, live_pid, caplog):
    from bundle.utils import staging_dir

    dead = dead_pid()
    stale = plant_staging(tmp_path, "out", dead)
    stale_old_format = plant_staging(tmp_path, "out", dead, host=None, token="89abcdef")  # before the host was added
    running = plant_staging(tmp_path, "out", live_pid, token="4567cdef")
    other_target = plant_staging(tmp_path, "other", dead)
    other_host = plant_staging(tmp_path, "out", dead, host="another-machine.lab", token="fedcba98")
    with caplog.at_level(logging.INFO, logger="bundle"):
        with staging_dir(tmp_path / "out") as staging:
            assert staging.parent == tmp_path and staging.name.startswith(".out.partial-")
            (staging / "result.txt").write_text("done")
    assert (tmp_path / "out" / "result.txt").read_text() == "done"
    assert not stale.exists() and not stale_old_format.exists()
    assert running.exists() and other_target.exists() and other_host.exists()
    removed = [r.getMessage() for r in caplog.records if "stale staging folder" in r.getMessage()]
    assert len(removed) == 2 and any(str(stale) in m and str(dead) in m for m in removed)


def test_staging_dir_failure_leaves_nothing_and_keeps_the_old_result(tmp_path):
    from bundle.utils import staging_dir

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("previous result")
    with pytest.raises(RuntimeError, match="boom"):
        with staging_dir(tmp_path / "out") as staging:
            (staging / "new.txt").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]


def test_prepare_dataset_removes_a_killed_runs_staging_folder_and_says_so(dataset_run):
    assert not dataset_run["stale"].exists()
    assert dataset_run["running"].exists()  # a run still going is left alone
    assert any("stale staging folder" in m and str(dataset_run["stale"]) in m for m in dataset_run["log"])
    assert sorted(p.name for p in dataset_run["dataset"].parent.iterdir()) == sorted(
        ["ds", dataset_run["running"].name]
    )


def test_review_kit_export_removes_a_killed_runs_staging_folder(tmp_path, live_pid):
    real, generated = write_images(tmp_path / "real", "r", 2), write_images(tmp_path / "gen", "g", 2)
    stale = plant_staging(tmp_path, "kit", dead_pid())
    running = plant_staging(tmp_path, "kit", live_pid, token="4567cdef")
    export_review_kit(real, generated, 2, tmp_path / "kit", tmp_path / "key.json", seed=0)
    assert not stale.exists() and running.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, "gen", "key.json", "kit", "real"])


def run_patch_writer(output_dir: Path, num: int = 3, on_started=None) -> None:
    """Drive a PatchWriter with a real ignite engine whose step returns ``num`` grey 8 x 8 patches."""
    from ignite.engine import Engine, Events

    batch = {
        "spot_id": [f"AAAC-{i}" for i in range(num)],
        "spot_index": torch.arange(num),
        "sample": ["s"] * num,
        "seed": torch.arange(num),
        "x_um": torch.zeros(num),
        "y_um": torch.zeros(num),
        "edits": [""] * num,
    }
    engine = Engine(lambda engine, batch: {"pred": torch.full((num, 3, 8, 8), 0.5)})
    engine.data_loader = [batch]  # what MONAI's workflows set and PatchWriter reads for its progress bar
    writer = PatchWriter(output_dir, metadata={"guidance_scale": 3.0}, progress=False)
    writer.attach(engine)
    if on_started is not None:
        engine.add_event_handler(Events.STARTED, lambda engine: on_started(writer))
    engine.run([batch], max_epochs=1)


def test_patch_writer_removes_a_killed_runs_staging_folder(tmp_path, live_pid, umask):
    umask(0o022)
    stale = plant_staging(tmp_path, "patches", dead_pid())
    running = plant_staging(tmp_path, "patches", live_pid, token="4567cdef")
    run_patch_writer(tmp_path / "patches")
    assert not stale.exists() and running.exists()
    assert len(list((tmp_path / "patches").glob("*.png"))) == 3 and mode(tmp_path / "patches") == 0o755


# ------------------------------------------------------------------------ item 14: unwritable and full outputs


def test_check_writable_refuses_a_path_under_a_file(tmp_path):
    from bundle.utils import check_writable

    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(
        NotADirectoryError, match=r"dataset folder '.*file/sub/ds' cannot be created: .*'.*file' is a file"
    ):
        check_writable(tmp_path / "file" / "sub" / "ds", "dataset folder")
    check_writable(tmp_path / "new" / "deeper" / "ds", "dataset folder")  # missing folders are fine (made later)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # and nothing is left by the check


def test_check_writable_refuses_a_read_only_folder(tmp_path):
    from bundle.utils import check_writable

    folder = read_only(tmp_path / "ro")
    try:
        with pytest.raises(PermissionError, match=r"output folder '.*ro/out' is not writable: cannot create files in"):
            check_writable(folder / "out", "output folder")
        assert list(folder.iterdir()) == []
    finally:
        writable_again(folder)


def test_prepare_dataset_checks_the_output_before_reading_any_input(tmp_path):
    (tmp_path / "file").write_text("")
    # the manifest does not even exist: the output location is refused first, before any input is read
    with pytest.raises(NotADirectoryError, match=r"dataset folder '.*file/ds' cannot be created"):
        prepare_dataset(tmp_path / "missing_manifest.csv", tmp_path / "file" / "ds", verbose=False)


def test_prepare_dataset_refuses_a_read_only_location_before_reading_inputs(tmp_path):
    folder = read_only(tmp_path / "ro")
    try:
        with pytest.raises(PermissionError, match=r"dataset folder '.*ro/ds' is not writable"):
            prepare_dataset(tmp_path / "missing_manifest.csv", folder / "ds", verbose=False)
    finally:
        writable_again(folder)


def test_review_kit_checks_the_output_before_reading_the_sources(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match=r"review kit folder '.*file/kit' cannot be created"):
        export_review_kit(tmp_path / "no_real", tmp_path / "no_gen", 2, tmp_path / "file" / "kit", tmp_path / "k.json")
    with pytest.raises(NotADirectoryError, match=r"review key '.*file/k.json' cannot be created"):
        export_review_kit(tmp_path / "no_real", tmp_path / "no_gen", 2, tmp_path / "kit", tmp_path / "file" / "k.json")


def test_patch_writer_refuses_an_unwritable_output_dir(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match=r"generation output_dir '.*file/patches' cannot be created"):
        PatchWriter(tmp_path / "file" / "patches").check_output_dir()


def test_tiff_writer_refuses_a_read_only_folder_before_writing(tmp_path):
    from bundle.io.tiff import write_pyramidal_tiff

    folder = read_only(tmp_path / "ro")
    try:
        with pytest.raises(PermissionError, match=r"TIFF file '.*ro/s.tif' is not writable"):
            write_pyramidal_tiff(folder / "s.tif", np.zeros((32, 32, 3), np.uint8), mpp=0.5, tile_size=16)
    finally:
        writable_again(folder)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) for a real ENOSPC")
def test_full_disk_in_an_atomic_write_names_the_path(tmp_path):
    """A real ENOSPC: /dev/full refuses every write with it."""
    target = tmp_path / "models" / "model.pt"
    with pytest.raises(OSError, match=r"No space left on the device holding '.*models/model.pt'") as info:
        with atomic_path(target):
            with open("/dev/full", "wb") as full:
                full.write(b"\0" * 4096)
    assert info.value.errno == errno.ENOSPC
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) for a real ENOSPC")
def test_full_disk_while_writing_patches_names_the_output(tmp_path):
    """A real ENOSPC: the first patch's file in the staging folder is a link to /dev/full."""

    def fill_the_disk(writer):
        os.symlink("/dev/full", writer.staging / patch_filename(0, "AAAC-0"))

    with pytest.raises(OSError, match=r"No space left on the device holding '.*patches'") as info:
        run_patch_writer(tmp_path / "patches", on_started=fill_the_disk)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # the staging folder is gone


def test_full_disk_while_writing_the_dataset_names_the_folder(demo_root, tmp_path, monkeypatch):
    """ENOSPC simulated at numpy's file write (no small full file system can be mounted without root)."""

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(OSError, match=r"No space left on the device holding '.*/ds'") as info:
        prepare_dataset(demo_root / "manifest.csv", tmp_path / "ds", **TINY_DATASET)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
