"""Blinded review kit: export (blinding, refusals, atomicity), scoring (accuracy, binomial test, kappas) and a
click-through of the page in headless Chromium."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from bundle.review import (
    cohen_kappa,
    export_review_kit,
    fleiss_kappa,
    format_report,
    load_key,
    ratings_table,
    render_review_page,
    score_answers,
)
from scripts.review_kit import main as review_main

NAME_RE = re.compile(r"^img_[0-9a-f]{12}\.png$")
KIT_DATA_RE = re.compile(r'<script id="kit-data" type="application/json">(.*?)</script>', re.S)

# Fleiss (1971) as on Wikipedia ("Fleiss' kappa", worked example): 10 subjects, 14 raters, 5 categories
FLEISS_TABLE = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def _write_images(folder: Path, prefix: str, count: int, seed: int, jpg: int = 1) -> list[Path]:
    """``count`` random 32x32 colour images named ``<prefix>_<i>``, the last ``jpg`` of them JPEG with EXIF, the
    PNGs with text chunks that name their origin (all of which the kit must drop)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        im = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), mode="RGB")
        if i >= count - jpg:
            path = folder / f"{prefix}_{i:02d}.jpg"
            exif = Image.Exif()
            exif[0x010E] = f"{prefix} source image"  # ImageDescription
            im.save(path, quality=95, exif=exif)
        else:
            path = folder / f"{prefix}_{i:02d}.png"
            info = PngImagePlugin.PngInfo()
            info.add_text("Comment", f"{prefix} made by the model")
            info.add_text("Source", str(path))
            im.save(path, pnginfo=info)
        paths.append(path)
    (folder / "notes.txt").write_text("not an image")
    return paths


@pytest.fixture
def sources(tmp_path) -> tuple[Path, Path]:
    """A real folder (6 images) and a generated folder (7 images) with telltale names and metadata."""
    real, generated = tmp_path / "REALSRC", tmp_path / "GENSRC"
    _write_images(real, "REALSRC", 6, seed=1)
    _write_images(generated, "GENSRC", 7, seed=2)
    return real, generated


def _kit_data(kit: Path) -> dict:
    """The JSON block embedded in the kit's page."""
    match = KIT_DATA_RE.search((kit / "index.html").read_text())
    assert match, "index.html has no kit-data block"
    return json.loads(match.group(1))


def _leftovers(folder: Path) -> list[str]:
    """Hidden staging / temporary entries left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------------------ export


def test_export_blinds_the_kit(sources, tmp_path):
    real, generated = sources
    kit, key_path = tmp_path / "kit", tmp_path / "private" / "key.json"
    summary = export_review_kit(real, generated, 4, kit, key_path, seed=0)

    assert sorted(p.name for p in kit.iterdir()) == ["images", "index.html"]
    names = sorted(p.name for p in (kit / "images").iterdir())
    assert len(names) == 8 and len(set(names)) == 8
    assert all(NAME_RE.match(n) for n in names), names
    assert summary["num_images"] == 8 and summary["warnings"] == []

    key = load_key(key_path)
    assert key["kit_id"] == summary["kit_id"] and sorted(key["images"]) == names
    labels = [entry["label"] for entry in key["images"].values()]
    assert labels.count("real") == 4 and labels.count("generated") == 4
    for name, entry in key["images"].items():
        source = Path(entry["source"])
        assert source.parent == (real if entry["label"] == "real" else generated).resolve()
        if source.suffix == ".png":  # re-encoded losslessly: same pixels, nothing else
            assert np.array_equal(np.asarray(Image.open(kit / "images" / name)), np.asarray(Image.open(source)))

    # the page: kit id and image names, no labels, nothing external
    data = _kit_data(kit)
    assert data["kit_id"] == key["kit_id"]
    assert sorted(data["images"]) == names
    assert set(data) == {
        "kit_id",
        "title",
        "images",
        "confidence_levels",
        "feature_levels",
        "features",
        "answers_format",
    }
    assert all(NAME_RE.match(n) for n in data["images"])
    html = (kit / "index.html").read_text()
    assert not re.search(r"<script[^>]+src=|<link|<iframe|https?://|@import", html)

    # no file of the kit names its origin: not the word "generated", no source name, folder or metadata
    telltales = [b"generated", b"REALSRC", b"GENSRC", b"made by the model", b"source image", str(tmp_path).encode()]
    for path in kit.rglob("*"):
        if path.is_file():
            blob = path.read_bytes().lower()
            for word in telltales:
                assert word.lower() not in blob, f"{word!r} leaks into {path}"
    for path in (kit / "images").iterdir():
        blob = path.read_bytes()
        for chunk in (b"tEXt", b"iTXt", b"zTXt", b"eXIf", b"iCCP", b"tIME"):
            assert chunk not in blob, f"{path.name} keeps a {chunk!r} chunk"
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB" and not im.info.get("Comment")
    assert len({p.stat().st_mtime for p in (kit / "images").iterdir()}) == 1  # one timestamp: write order hidden
    assert _leftovers(tmp_path) == []


def test_export_seed_fixes_subset_but_not_names(sources, tmp_path):
    real, generated = sources
    a = export_review_kit(real, generated, 3, tmp_path / "a", tmp_path / "a.json", seed=7)
    b = export_review_kit(real, generated, 3, tmp_path / "b", tmp_path / "b.json", seed=7)
    key_a, key_b = load_key(tmp_path / "a.json"), load_key(tmp_path / "b.json")
    order_a = [key_a["images"][n]["source"] for n in _kit_data(tmp_path / "a")["images"]]
    order_b = [key_b["images"][n]["source"] for n in _kit_data(tmp_path / "b")["images"]]
    assert order_a == order_b  # same subset, same order
    assert a["kit_id"] != b["kit_id"] and not set(key_a["images"]) & set(key_b["images"])


@pytest.mark.parametrize(
    "case, message",
    [
        ("too_few_real", r"real image folder .*REALSRC.* holds 6 images, fewer than --num 7"),
        ("no_images", r"generated image folder .*empty.* holds no image"),
        ("missing_folder", r"real image folder .*nowhere.* does not exist"),
        ("key_inside_kit", r"key .* would be inside the kit folder"),
        ("num_zero", r"num must be a positive"),
        ("key_is_folder", r"key path .* is a folder"),
    ],
)
def test_export_refusals(sources, tmp_path, case, message):
    real, generated = sources
    kit, key = tmp_path / "kit", tmp_path / "key.json"
    num = 3
    if case == "too_few_real":
        num = 7
    elif case == "no_images":
        generated = tmp_path / "empty"
        generated.mkdir()
        (generated / "readme.md").write_text("no images here")
    elif case == "missing_folder":
        real = tmp_path / "nowhere"
    elif case == "key_inside_kit":
        key = kit / "sub" / "key.json"
    elif case == "num_zero":
        num = 0
    elif case == "key_is_folder":
        key = tmp_path / "keys"
        key.mkdir()
    exc = FileNotFoundError if case == "missing_folder" else ValueError
    with pytest.raises(exc, match=message):
        export_review_kit(real, generated, num, kit, key, seed=0)
    assert not kit.exists() and (case == "key_is_folder" or not key.exists()) and _leftovers(tmp_path) == []


def test_export_refuses_existing_kit_and_key(sources, tmp_path):
    real, generated = sources
    kit, key = tmp_path / "kit", tmp_path / "key.json"
    first = export_review_kit(real, generated, 2, kit, key, seed=0)
    before = sorted(p.name for p in (kit / "images").iterdir())
    with pytest.raises(FileExistsError, match=r"kit folder .*kit.* exists and is not empty; pass --overwrite"):
        export_review_kit(real, generated, 2, kit, tmp_path / "other_key.json", seed=1)
    with pytest.raises(FileExistsError, match=r"key file .*key.json.* exists .*pass --overwrite"):
        export_review_kit(real, generated, 2, tmp_path / "kit2", key, seed=1)
    assert sorted(p.name for p in (kit / "images").iterdir()) == before
    assert load_key(key)["kit_id"] == first["kit_id"]
    assert not (tmp_path / "kit2").exists() and not (tmp_path / "other_key.json").exists()

    second = export_review_kit(real, generated, 3, kit, key, seed=1, overwrite=True)
    assert len(list((kit / "images").iterdir())) == 6 and load_key(key)["kit_id"] == second["kit_id"]
    (tmp_path / "empty_kit").mkdir()  # an existing empty folder is fine
    export_review_kit(real, generated, 1, tmp_path / "empty_kit", tmp_path / "k3.json", seed=0)
    assert _leftovers(tmp_path) == []


def test_export_failure_leaves_nothing_half_written(sources, tmp_path):
    real, generated = sources
    broken = real / "REALSRC_99.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    kit, key = tmp_path / "kit", tmp_path / "key.json"
    with pytest.raises(ValueError, match=r"REALSRC_99\.png.* cannot be read as an image"):
        export_review_kit(real, generated, 7, kit, key, seed=0)  # 7 of 7 real: the broken one is drawn
    assert not kit.exists() and not key.exists() and _leftovers(tmp_path) == []

    # an existing kit and its key survive a failed --overwrite untouched
    data = broken.read_bytes()
    broken.unlink()
    good = export_review_kit(real, generated, 2, kit, key, seed=0)
    broken.write_bytes(data)
    with pytest.raises(ValueError, match="cannot be read as an image"):
        export_review_kit(real, generated, 7, kit, key, seed=0, overwrite=True)
    assert load_key(key)["kit_id"] == good["kit_id"] == _kit_data(kit)["kit_id"]
    assert len(list((kit / "images").iterdir())) == 4 and _leftovers(tmp_path) == []


def test_export_warns_about_size_and_resizes(tmp_path):
    real, generated = tmp_path / "r", tmp_path / "g"
    _write_images(real, "a", 2, seed=0, jpg=0)
    generated.mkdir()
    for i in range(2):
        Image.new("RGB", (48, 48), (200, 100, 150)).save(generated / f"b{i}.png")
    summary = export_review_kit(real, generated, 2, tmp_path / "kit", tmp_path / "key.json", seed=0)
    assert len(summary["warnings"]) == 1 and "--size" in summary["warnings"][0]
    summary = export_review_kit(real, generated, 2, tmp_path / "kit2", tmp_path / "key2.json", seed=0, size=40)
    assert summary["warnings"] == []
    assert {Image.open(p).size for p in (tmp_path / "kit2" / "images").iterdir()} == {(40, 40)}


def test_cli_export_and_errors(sources, tmp_path, capsys):
    real, generated = sources
    argv = ["export", "--real", str(real), "--generated", str(generated), "--num", "2"]
    assert (
        review_main(argv + ["--output", str(tmp_path / "kit"), "--key", str(tmp_path / "key.json"), "--seed", "3"]) == 0
    )
    assert "4 images" in capsys.readouterr().out
    assert review_main(argv + ["--output", str(tmp_path / "kit"), "--key", str(tmp_path / "kit" / "key.json")]) == 1
    assert "would be inside the kit folder" in capsys.readouterr().err


# The page of two fixed kits, byte for byte: a change of page.html or of how it is filled changes these digests (update
# them only for a change of the page made on purpose).
PAGE_CASES = [
    (
        dict(kit_id="0123456789abcdef", images=["img_aaaaaaaaaaaa.png", "img_bbbbbbbbbbbb.png"]),
        "ad359984341b142a5dddba455b740e0355f4bbe43c2cb3c9f723e8a08269f180",
    ),
    (
        dict(
            kit_id="fedcba9876543210",
            images=["img_cccccccccccc.png"],
            features=[("x", "X <&> y"), ("z</script>", "Z")],
            title="A <b>&</b> title",
        ),
        "03a88ea9952adb4029476f041655eae01a90b2fa566b5b32eb8efcc5327abd2e",
    ),
]


@pytest.mark.parametrize("kwargs, digest", PAGE_CASES)
def test_review_page_is_filled_and_unchanged(kwargs, digest):
    html = render_review_page(**kwargs)
    assert "__TITLE__" not in html and "__KIT_DATA__" not in html
    assert html.count('<script id="kit-data" type="application/json">') == 1
    assert hashlib.sha256(html.encode("utf-8")).hexdigest() == digest
    data = json.loads(KIT_DATA_RE.search(html).group(1))
    assert data["kit_id"] == kwargs["kit_id"] and data["images"] == kwargs["images"]


def test_exported_page_is_the_rendered_page(sources, tmp_path):
    real, generated = sources
    kit = tmp_path / "kit"
    export_review_kit(real, generated, 2, kit, tmp_path / "key.json", seed=0, title="Kit <1>")
    data = _kit_data(kit)
    expected = render_review_page(data["kit_id"], data["images"], title="Kit <1>")
    assert (kit / "index.html").read_bytes() == expected.encode("utf-8")
    assert "__KIT_DATA__" not in expected and "<title>Kit &lt;1&gt;</title>" in expected


# ------------------------------------------------------------------------------------------------------------- score


def _answers(
    key: dict, reviewer: str, calls: dict[str, str | None], confidence=None, features=None, kit_id=None
) -> dict:
    """An answers file as the page writes it."""
    return {
        "format": "review-kit-answers/1",
        "kit_id": kit_id or key["kit_id"],
        "reviewer": reviewer,
        "saved_at": "2025-01-01T00:00:00Z",
        "answers": [
            {
                "image": name,
                "call": call,
                "confidence": (confidence or {}).get(name),
                "features": (features or {}).get(name, {}),
            }
            for name, call in calls.items()
        ],
    }


def _dump(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def kit_key(sources, tmp_path) -> tuple[Path, dict]:
    """A 12-image kit (6 real, 6 generated) and its key."""
    real, generated = sources
    export_review_kit(real, generated, 6, tmp_path / "kit", tmp_path / "key.json", seed=5)
    return tmp_path / "key.json", load_key(tmp_path / "key.json")


def _truth(key: dict) -> dict[str, str]:
    return {n: ("synthetic" if e["label"] == "generated" else "real") for n, e in sorted(key["images"].items())}


def test_score_accuracy_binomial_and_confidence(kit_key, tmp_path):
    from scipy.stats import binomtest

    key_path, key = kit_key
    truth = _truth(key)
    names = list(truth)
    gen = [n for n in names if truth[n] == "synthetic"]
    real = [n for n in names if truth[n] == "real"]
    flip = {"real": "synthetic", "synthetic": "real"}
    # 11 of 12 answered: 2 generated called real (wrong), 1 real called synthetic (wrong), 1 real unanswered
    calls = dict(truth)
    calls[gen[0]] = calls[gen[1]] = "real"
    calls[real[0]] = flip[truth[real[0]]]
    calls[real[1]] = None
    confidence = {n: (2 if calls[n] != truth[n] else 4) for n in names}
    features = {
        gen[2]: {"nuclear_detail": 2, "stain_realism": None},
        gen[3]: {"nuclear_detail": 3},
        real[2]: {"nuclear_detail": 5},
    }
    path = _dump(tmp_path / "answers_a.json", _answers(key, "A", calls, confidence, features))

    report = score_answers(key_path, [path])
    r = report["reviewers"][0]
    assert r["reviewer"] == "A" and r["num_answered"] == 11 and r["num_correct"] == 8
    assert r["accuracy"] == pytest.approx(8 / 11)
    assert r["sensitivity"] == pytest.approx(4 / 6) and r["specificity"] == pytest.approx(4 / 5)
    assert r["binomial_p"] == pytest.approx(binomtest(8, 11, 0.5, alternative="greater").pvalue)
    assert r["binomial_p"] == pytest.approx(sum(__import__("math").comb(11, k) for k in range(8, 12)) / 2**11)
    assert r["mean_confidence_correct"] == 4 and r["mean_confidence_incorrect"] == 2
    assert r["features"]["nuclear_detail"] == {"real": 5.0, "synthetic": 2.5, "n_real": 1, "n_synthetic": 2}
    assert r["features"]["stain_realism"]["synthetic"] is None
    assert report["agreement"] == {"cohen_kappa": [], "fleiss_kappa": None}
    assert "accuracy" in format_report(report)


def test_score_agreement_matches_sklearn(kit_key, tmp_path):
    from sklearn.metrics import cohen_kappa_score

    key_path, key = kit_key
    truth = _truth(key)
    names = list(truth)
    rng = np.random.default_rng(0)
    paths, all_calls = [], []
    for i, reviewer in enumerate(["A", "B", "C"]):
        calls = {n: str(rng.choice(["real", "synthetic"])) for n in names}
        if i == 2:
            calls[names[0]] = None  # C skips one image: Fleiss uses the 11 that all answered
        all_calls.append(calls)
        paths.append(_dump(tmp_path / f"answers_{reviewer}.json", _answers(key, reviewer, calls)))
    report = score_answers(key_path, paths)
    pairs = {tuple(c["reviewers"]): c for c in report["agreement"]["cohen_kappa"]}
    assert set(pairs) == {("A", "B"), ("A", "C"), ("B", "C")}
    for (a, b), c in pairs.items():
        ca, cb = all_calls["ABC".index(a)], all_calls["ABC".index(b)]
        common = [n for n in names if ca[n] and cb[n]]
        assert c["num_images"] == len(common)
        assert c["kappa"] == pytest.approx(cohen_kappa_score([ca[n] for n in common], [cb[n] for n in common]))
    fk = report["agreement"]["fleiss_kappa"]
    assert fk["num_images"] == 11 and fk["reviewers"] == ["A", "B", "C"]
    table = ratings_table([[calls[n] for calls in all_calls] for n in names[1:]], ["real", "synthetic"])
    assert fk["kappa"] == pytest.approx(fleiss_kappa(table))

    # the CLI prints the report and writes it as JSON
    out = tmp_path / "report.json"
    assert review_main(["score", "--key", str(key_path), *map(str, paths), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["agreement"]["fleiss_kappa"]["kappa"] == pytest.approx(fk["kappa"])


def test_cohen_kappa_hand_computed_and_sklearn():
    from sklearn.metrics import cohen_kappa_score

    # 50 items: both yes 20, A yes / B no 5, A no / B yes 10, both no 15 -> p_o = 0.7, p_e = 0.5, kappa = 0.4
    a = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 3, 40).tolist(), rng.integers(0, 3, 40).tolist()
    assert cohen_kappa(x, y) == pytest.approx(cohen_kappa_score(x, y))
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert np.isnan(cohen_kappa(["real"] * 4, ["real"] * 4))
    with pytest.raises(ValueError, match="same items"):
        cohen_kappa(a, b[:-1])


def test_fleiss_kappa_textbook_example():
    assert fleiss_kappa(FLEISS_TABLE) == pytest.approx(0.20993, abs=1e-5)
    assert round(fleiss_kappa(FLEISS_TABLE), 3) == 0.210
    try:
        from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss
    except ImportError:
        pass
    else:
        assert fleiss_kappa(FLEISS_TABLE) == pytest.approx(sm_fleiss(np.array(FLEISS_TABLE), method="fleiss"))
    # two raters: Fleiss' kappa is Scott's pi, which equals Cohen's kappa when the marginals agree
    a = ["r", "r", "s", "s", "r", "s"]
    b = ["r", "s", "r", "s", "r", "s"]
    assert fleiss_kappa(ratings_table(list(zip(a, b)), ["r", "s"])) == pytest.approx(cohen_kappa(a, b))
    with pytest.raises(ValueError, match="same number of raters"):
        fleiss_kappa([[1, 1], [2, 1]])


def test_score_errors_name_the_file(kit_key, tmp_path, capsys):
    key_path, key = kit_key
    truth = _truth(key)
    other = _dump(tmp_path / "answers_other.json", _answers(key, "A", truth, kit_id="0123456789abcdef"))
    with pytest.raises(ValueError, match=r"answers_other\.json.* kit '0123456789abcdef', but the key is for kit"):
        score_answers(key_path, [other])
    unknown = _dump(tmp_path / "answers_unknown.json", _answers(key, "A", {**truth, "img_000000000000.png": "real"}))
    with pytest.raises(ValueError, match=r"answers_unknown\.json' names 1 image\(s\) that are not in the key"):
        score_answers(key_path, [unknown])
    broken = tmp_path / "answers_broken.json"
    broken.write_text('{"kit_id": "abc", "answers": [')
    with pytest.raises(ValueError, match=r"answers_broken\.json.* is not valid JSON"):
        score_answers(key_path, [broken])
    bad_call = _dump(tmp_path / "answers_bad.json", _answers(key, "A", {**truth, next(iter(truth)): "maybe"}))
    with pytest.raises(ValueError, match=r"answers_bad\.json.* call 'maybe'"):
        score_answers(key_path, [bad_call])
    good = _dump(tmp_path / "answers_a.json", _answers(key, "A", truth))
    twice = _dump(tmp_path / "answers_a2.json", _answers(key, "A", truth))
    with pytest.raises(ValueError, match=r"Reviewer 'A' appears in both"):
        score_answers(key_path, [good, twice])
    with pytest.raises(ValueError, match=r"answers_a\.json.* is not a review-kit key"):
        score_answers(good, [good])
    assert review_main(["score", "--key", str(key_path), str(other)]) == 1
    assert "score it with the key of the kit" in capsys.readouterr().err


def test_score_undefined_kappa_is_null(kit_key, tmp_path):
    key_path, key = kit_key
    same = dict.fromkeys(key["images"], "real")
    paths = [_dump(tmp_path / f"answers_{r}.json", _answers(key, r, same)) for r in ("A", "B")]
    report = score_answers(key_path, paths)
    assert report["reviewers"][0]["accuracy"] == 0.5 and report["reviewers"][0]["sensitivity"] == 0.0
    assert report["agreement"]["cohen_kappa"][0]["kappa"] is None
    assert report["agreement"]["fleiss_kappa"]["kappa"] is None
    json.dumps(report, allow_nan=False)  # valid JSON: no NaN


# ----------------------------------------------------------------------------------------------------------- browser


def _chrome(download_dir: Path, profile_dir: Path):
    """Headless Chromium driven by Debian's chromedriver; skips when either is not installed."""
    browser = next((p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p and os.path.isfile(p)), None)
    driver = next((p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver")) if p and os.path.isfile(p)), None)
    if browser is None or driver is None:
        pytest.skip("the browser test needs Chromium and its driver: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="the browser test needs selenium: pip install selenium"
    )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(download_dir), "download.prompt_for_download": False}
    )
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)  # explicit driver: no download


def _wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_browser_click_through(sources, tmp_path):
    real, generated = sources
    kit, key_path = tmp_path / "kit", tmp_path / "key.json"
    export_review_kit(real, generated, 3, kit, key_path, seed=0)
    key = load_key(key_path)
    truth = _truth(key)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _chrome(downloads, tmp_path / "profile")
    from selenium.webdriver.common.by import By

    def el(selector: str):
        return driver.find_element(By.CSS_SELECTOR, selector)

    try:
        driver.get((kit / "index.html").as_uri())
        el("#start").click()  # no name: refused with a hint
        assert "enter your name" in el("#start-error").text and el("#review-screen").get_attribute("hidden")
        el("#reviewer").send_keys("Test Reviewer")
        el("#start").click()
        n = len(truth)
        for i in range(n):
            assert el("#progress").text == f"{i + 1} / {n}"
            name = el("#patch").get_attribute("data-image")
            assert _wait_for(
                lambda: driver.execute_script("return document.getElementById('patch').naturalWidth"), what="image"
            )
            if i == 1:  # keyboard shortcuts
                el("body").send_keys("s" if truth[name] == "synthetic" else "r", "3")
            else:
                el("#btn-synthetic" if truth[name] == "synthetic" else "#btn-real").click()
                el("#confidence button[data-value='4']").click()
            if i == 0:
                el("#feature-nuclear_detail button[data-value='2']").click()
            if i < n - 1:
                el("#next").click()
        assert el("#answered").text == f"{n} of {n} answered" and el("#next").get_attribute("disabled")

        driver.refresh()  # answers survive a reload (localStorage)
        assert el("#reviewer").get_attribute("value") == "Test Reviewer"
        el("#start").click()
        assert el("#answered").text == f"{n} of {n} answered" and el("#progress").text == f"{n} / {n}"
        el("#prev").click()
        assert el("#progress").text == f"{n - 1} / {n}"

        el("#save").click()
        saved = _wait_for(lambda: list(downloads.glob("answers_*.json")), what="the answers download")
        assert [p.name for p in saved] == ["answers_Test_Reviewer.json"]
        assert "all 6 patches answered" in el("#status").text
    finally:
        driver.quit()

    answers = json.loads(saved[0].read_text())
    assert answers["reviewer"] == "Test Reviewer" and answers["kit_id"] == key["kit_id"] and answers["saved_at"]
    by_image = {a["image"]: a for a in answers["answers"]}
    assert set(by_image) == set(truth)
    assert sorted(a["confidence"] for a in by_image.values()) == [3] + [4] * (n - 1)
    report = score_answers(key_path, saved)
    r = report["reviewers"][0]
    assert r["num_answered"] == n and r["accuracy"] == 1.0
    assert r["binomial_p"] == pytest.approx(0.5**n)
    assert r["features"]["nuclear_detail"]["n_real"] + r["features"]["nuclear_detail"]["n_synthetic"] == 1
