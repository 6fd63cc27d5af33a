"""Getting the her2st sections (``bundle.io.her2st`` and ``scripts/get_her2st.py``) from the real shared copy, and
downloading them with urllib from a local HTTP server that serves the repository's layout."""

from __future__ import annotations

import csv
import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bundle.io.her2st import (
    COMMIT,
    MANIFEST_COLUMNS,
    SECTIONS,
    USER_AGENT,
    ChecksumError,
    get_her2st,
    make_splits,
    sha256_file,
)
from tests.helpers import ROOT, realdata


def read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == MANIFEST_COLUMNS
        return list(reader)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def link_section(shared: Path, local: Path, sid: str) -> None:
    """``local/sid`` as a folder of symbolic links to the shared section's files (nothing copied)."""
    (local / sid).mkdir(parents=True)
    for name in SECTIONS[sid]["files"]:
        (local / sid / name).symlink_to(shared / sid / name)


def test_local_copy_manifest_and_hashes(tmp_path):
    shared = realdata("her2st")
    dest = tmp_path / "her2st" / "raw"
    manifest = get_her2st(dest, local=shared, sections=["C2", "B4"], splits={"B4": "val"})
    assert manifest == dest / "manifest.csv"
    rows = read_manifest(manifest)
    assert [(r["sample_id"], r["split"], r["patient"], r["technology"]) for r in rows] == [
        ("C2", "train", "C", "st"),
        ("B4", "val", "B", "st"),
    ]
    assert rows[0]["st_path"] == "C2" and rows[0]["slide_path"] == "C2/5714_HE_BT_C2.jpg"
    assert rows[1]["st_path"] == "B4" and rows[1]["slide_path"] == "B4/BT10737_D2_HE.jpg"
    for sid in ("C2", "B4"):
        for name, info in SECTIONS[sid]["files"].items():
            assert sha256_file(dest / sid / name) == info["sha256"] == sha256_file(shared / sid / name)
    assert sorted(p.name for p in dest.iterdir()) == ["B4", "C2", "LICENSE_NOTICE.md", "manifest.csv"]
    notice = (dest / "LICENSE_NOTICE.md").read_text()
    assert COMMIT in notice and "CC BY 4.0" in notice and "10.1038/s41467-021-26271-2" in notice
    assert not [p for p in files_under(dest) if p.name.startswith(".")]


def test_existing_manifest_refused_and_overwrite_reuses_files(tmp_path):
    dest = tmp_path / "raw"
    get_her2st(dest, local=realdata("her2st"), sections=["C5"])
    assert read_manifest(dest / "manifest.csv")[0]["split"] == "val"
    with pytest.raises(FileExistsError, match="manifest.csv"):
        get_her2st(dest, local=realdata("her2st"), sections=["C5"])
    inodes = {p: p.stat().st_ino for p in (dest / "C5").iterdir()}
    get_her2st(dest, local=realdata("her2st"), sections=["C5"], splits={"C5": "test"}, overwrite=True)
    assert {p: p.stat().st_ino for p in (dest / "C5").iterdir()} == inodes  # verified files are not copied again
    assert read_manifest(dest / "manifest.csv")[0]["split"] == "test"


def test_tampered_file_refused_and_nothing_left(tmp_path):
    shared = realdata("her2st")
    local = tmp_path / "local"
    link_section(shared, local, "C2")
    (local / "C3").mkdir()
    for name in SECTIONS["C3"]["files"]:
        shutil.copyfile(shared / "C3" / name, local / "C3" / name)
    tampered = local / "C3" / "C3_selection.tsv"
    with open(tampered, "ab") as f:
        f.write(b"\n")
    expected = SECTIONS["C3"]["files"]["C3_selection.tsv"]["sha256"]
    dest = tmp_path / "raw"
    with pytest.raises(ChecksumError) as info:
        get_her2st(dest, local=local, sections=["C2", "C3"])
    message = str(info.value)
    assert str(tampered) in message and expected in message and sha256_file(tampered) in message
    assert files_under(dest) == []  # neither C3 nor the C2 files checked before it are left


def test_section_missing_from_local_is_named(tmp_path):
    local = tmp_path / "local"
    link_section(realdata("her2st"), local, "C2")
    dest = tmp_path / "raw"
    with pytest.raises(FileNotFoundError) as info:
        get_her2st(dest, local=local, sections=["C2", "C4"])
    message = str(info.value)
    assert "['C4']" in message and "C4/C4.tsv.gz" in message and "data/ST-imgs/C/C4/5714_HE_BT_D2.jpg" in message
    assert not dest.exists()


def test_unknown_sections_and_splits_refused(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown her2st section\(s\) \['Z9'\].*'C2', 'C3', 'C4', 'C5', 'B4'"):
        get_her2st(tmp_path / "raw", local=tmp_path, sections=["C2", "Z9"])
    with pytest.raises(ValueError, match="must be one of"):
        get_her2st(tmp_path / "raw", local=tmp_path, sections=["C2"], splits={"C2": "validation"})
    assert make_splits(["C2", "C3", "B4"], val=["C3"], test=["B4"]) == {"C2": "train", "C3": "val", "B4": "test"}
    with pytest.raises(ValueError, match="not among the selected"):
        make_splits(["C2"], val=["C5"])
    assert not (tmp_path / "raw").exists()


class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and records (path, User-Agent) of each request."""

    requests: list[tuple[str, str]] = []

    def do_GET(self):  # noqa: N802 (the name http.server calls)
        self.requests.append((self.path, self.headers.get("User-Agent", "")))
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def her2st_server(tmp_path, monkeypatch):
    """A localhost HTTP server with the repository layout at ``/almaan/her2st/<commit>/``: C5 as published, B4 with a
    tampered selection; yields the base URL."""
    shared = realdata("her2st")
    root = tmp_path / "srv" / "almaan" / "her2st" / COMMIT
    for sid in ("C5", "B4"):
        for name, info in SECTIONS[sid]["files"].items():
            (root / info["path"]).parent.mkdir(parents=True, exist_ok=True)
            (root / info["path"]).symlink_to(shared / sid / name)
    tampered = root / SECTIONS["B4"]["files"]["B4_selection.tsv"]["path"]
    tampered.unlink()
    tampered.write_bytes((shared / "B4" / "B4_selection.tsv").read_bytes() + b"0")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    RecordingHandler.requests = []
    handler = functools.partial(RecordingHandler, directory=str(tmp_path / "srv"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/almaan/her2st/{COMMIT}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_from_local_server(tmp_path, her2st_server):
    dest = tmp_path / "raw"
    with pytest.raises(ChecksumError, match=f"{her2st_server}/data/ST-spotfiles/B4_selection.tsv: sha256"):
        get_her2st(dest, sections=["C5", "B4"], base_url=her2st_server, retries=0)
    assert files_under(dest) == []
    RecordingHandler.requests = []
    manifest = get_her2st(dest, sections=["C5"], base_url=her2st_server, retries=0)
    assert [r["sample_id"] for r in read_manifest(manifest)] == ["C5"]
    for name, info in SECTIONS["C5"]["files"].items():
        assert sha256_file(dest / "C5" / name) == info["sha256"]
    prefix = f"/almaan/her2st/{COMMIT}/"
    assert sorted(p for p, _ in RecordingHandler.requests) == sorted(
        prefix + info["path"] for info in SECTIONS["C5"]["files"].values()
    )
    assert {agent for _, agent in RecordingHandler.requests} == {USER_AGENT}
    with pytest.raises(ConnectionError, match=r"HTTP 404.*--local PATH"):
        get_her2st(tmp_path / "other", sections=["C2"], base_url=her2st_server, retries=0)
    assert files_under(tmp_path / "other") == []


def test_offline_download_names_url_and_local(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}/almaan/her2st/{COMMIT}"
    with pytest.raises(ConnectionError) as info:
        get_her2st(tmp_path / "raw", sections=["C2"], base_url=base, timeout=5, retries=0)
    assert f"{base}/data/ST-cnts/C2.tsv.gz" in str(info.value) and "--local" in str(info.value)
    assert files_under(tmp_path / "raw") == []


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "scripts" / "get_her2st.py"), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_cli_help():
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--dest", "--local", "--sections", "--val", "--test", "--overwrite"):
        assert option in result.stdout


def test_cli_local_run(tmp_path):
    shared = realdata("her2st")
    dest = tmp_path / "raw"
    args = ("--dest", str(dest), "--local", str(shared), "--sections", "C2", "B4", "--test", "B4")
    result = run_script(*args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["C2", "train", "187"] and "15706 genes" in lines[0] and "9274 x 9911" in lines[0]
    assert lines[1].split()[:3] == ["B4", "test", "284"] and "(283 with counts)" in lines[1]
    assert lines[-1] == f"manifest: {dest / 'manifest.csv'}"
    again = run_script(*args)
    assert again.returncode == 1
    assert "manifest.csv' exists" in again.stderr.strip().splitlines()[-1]


def test_copy_when_hard_links_fail(tmp_path, monkeypatch):
    def no_link(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    dest = tmp_path / "raw"
    get_her2st(dest, local=realdata("her2st"), sections=["C5"])
    for name, info in SECTIONS["C5"]["files"].items():
        stat = (dest / "C5" / name).stat()
        assert stat.st_nlink == 1 and stat.st_mode & 0o200  # an own, writable copy
        assert sha256_file(dest / "C5" / name) == info["sha256"]
