"""Evaluation (bundle/evaluation/, configs/evaluate.json): fidelity, agreement and edit scores move the right way."""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bundle import evaluation as E
from bundle.demo import COMPARTMENTS
from bundle.evaluation import settings as S
from tests.helpers import CONFIGS, TINY_AUTOENCODER, tiny_architecture, tiny_autoencoder, tiny_network

FOV_UM, SIZE = 64.0, 32


@pytest.fixture
def empty_hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache, so that the Inception weights are missing whatever this machine has cached."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("TORCH_HUB", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch_home" / "hub"


@pytest.fixture(scope="module")
def spots(demo_dataset):
    """Validation and training spots of the demo dataset with their real patches, conditions and labels."""
    val, val_index = E.select_spots(demo_dataset, "validation")
    train, _ = E.select_spots(demo_dataset, "training")
    store = demo_dataset / "expression.npy"
    conditions, expression = E.load_conditions(val, store, 6)
    _, train_expression = E.load_conditions(train, store, 0)
    train_labels, val_labels, how = E.spot_labels(train, val, train_expression, expression)
    genes = json.loads((demo_dataset / "gene_panel.json").read_text())["genes"]
    return {
        "val": val,
        "val_index": val_index,
        "conditions": conditions,
        "expression": expression,
        "real": E.load_real_patches(val, FOV_UM, SIZE),
        "train_real": E.load_real_patches(train, FOV_UM, SIZE),
        "train_expression": train_expression,
        "train_labels": train_labels,
        "val_labels": val_labels,
        "labels_from": how,
        "genes": genes,
    }


@pytest.fixture(scope="module")
def probe(spots):
    return E.train_probe(
        spots["train_real"],
        spots["train_expression"],
        spots["genes"],
        spots["train_labels"],
        epochs=10,
        width=16,
        batch_size=16,
        seed=0,
    )


class Oracle:
    """A stand-in generator: returns the real patch of the validation spot whose expression is nearest the condition.

    With ``permutation`` it returns the patch of another spot (``permutation[nearest]``): the same images, with the
    link between condition and tissue broken.
    """

    def __init__(self, expression: np.ndarray, patches: np.ndarray, permutation: np.ndarray | None = None) -> None:
        self.expression = torch.as_tensor(expression)
        self.patches = torch.as_tensor(patches).float() / 255.0
        self.permutation = permutation
        self.calls = 0

    def __call__(self, condition: torch.Tensor, generator=None) -> torch.Tensor:
        self.calls += 1
        assert isinstance(generator, list) and len(generator) == len(condition)
        centre = condition[:, 0] if condition.ndim == 3 else condition
        nearest = torch.cdist(centre.float(), self.expression).argmin(dim=1).numpy()
        if self.permutation is not None:
            nearest = self.permutation[nearest]
        return self.patches[nearest]


def test_labels_come_from_the_demo_ground_truth(spots):
    assert "ground-truth" in spots["labels_from"]
    assert set(spots["val_labels"]) <= set(COMPARTMENTS) | {"background"}
    train_c, val_c = E.expression_clusters(spots["train_expression"], spots["expression"], num_clusters=3, seed=0)
    again = E.expression_clusters(spots["train_expression"], spots["expression"], num_clusters=3, seed=0)
    assert np.array_equal(train_c, again[0]) and np.array_equal(val_c, again[1])  # deterministic
    assert np.bincount(train_c).argmax() == 0 and set(val_c) <= {0, 1, 2}


def test_fidelity_and_agreement_conditioned_beat_shuffled(spots, probe):
    n = len(spots["val"])
    seeds = [int(i) for i in spots["val_index"]]
    oracle = Oracle(spots["expression"], spots["real"])
    shuffled = Oracle(spots["expression"], spots["real"], np.random.default_rng(0).permutation(n))
    results = {}
    for name, gen in (("conditioned", oracle), ("shuffled", shuffled)):
        generated = E.generate_patches(gen, spots["conditions"], seeds, batch_size=16)
        assert generated.shape == spots["real"].shape and generated.dtype == np.uint8
        scores = E.probe_scores(probe, spots["real"], generated, spots["expression"], num_permutations=50)
        _, real_pred = probe.predict(spots["real"])
        _, gen_pred = probe.predict(generated)
        agreement = E.compartment_agreement(probe.classes, spots["val_labels"], real_pred, gen_pred)
        results[name] = (scores, agreement)
    (cond, cond_agree), (shuf, shuf_agree) = results["conditioned"], results["shuffled"]
    assert cond["ceiling_r_mean"] > 0.2, "the probe learnt nothing from the real training patches"
    # the oracle hands back the real patch: fidelity reaches the ceiling, and shuffling destroys it
    assert cond["fidelity_r_mean"] == pytest.approx(cond["ceiling_r_mean"], abs=1e-6)
    assert cond["fidelity_fraction"] == pytest.approx(1.0, abs=1e-6)
    assert shuf["fidelity_r_mean"] < cond["fidelity_r_mean"] - 0.2 and abs(shuf["fidelity_r_mean"]) < 0.2
    assert cond["fidelity_p_value"] < 0.05 < shuf["fidelity_p_value"]
    assert cond_agree["generated_agreement"] == cond_agree["real_accuracy"] > cond_agree["chance"]
    assert shuf_agree["generated_agreement"] < cond_agree["generated_agreement"] - 0.15
    confusion = np.asarray(cond_agree["confusion_generated"])
    assert confusion.sum() == n and np.trace(confusion) == round(cond_agree["generated_agreement"] * n)
    assert len(cond["ceiling_r"]) == len(spots["genes"])


class Darkener:
    """Generator whose patches darken as the mean immune expression of the condition rises (``sign=-1``: lighten)."""

    def __init__(self, immune: list[int], sign: float = 1.0) -> None:
        self.immune, self.sign = immune, sign

    def __call__(self, condition: torch.Tensor, generator=None) -> torch.Tensor:
        centre = condition[:, 0] if condition.ndim == 3 else condition
        level = centre[:, self.immune].mean(dim=1)
        value = (0.5 - self.sign * 0.1 * level).clamp(0.0, 1.0)
        return value.view(-1, 1, 1, 1).expand(-1, 3, 8, 8).clone()


def darkness_probe(genes: list[str], immune: list[int]) -> E.Probe:
    """A probe that reads darkness as immune expression and nothing else."""

    def predictor(images: torch.Tensor):
        out = np.zeros((len(images), len(genes)), np.float32)
        out[:, immune] = (1.0 - images.mean(dim=(1, 2, 3))).numpy()[:, None]
        return out, None

    return E.Probe(
        "darkness", genes, [], np.zeros(len(genes), np.float32), np.ones(len(genes), np.float32), None, predictor
    )


def test_edit_directionality_known_answer():
    genes = ["PTPRC", "CD3E", "CD74", "COL1A1", "EPCAM", "ACTB"]
    immune = [0, 1, 2]
    rng = np.random.default_rng(0)
    expression = rng.uniform(0.5, 2.0, size=(12, len(genes))).astype(np.float32)
    conditions = np.repeat(expression[:, None], 7, axis=1)
    expression[0, immune] = 0.0  # a spot without immune counts: scaling cannot change it, so it is skipped
    conditions[0][:, immune] = 0.0
    probe = darkness_probe(genes, immune)
    edits = E.usable_edits(["immune*4", "immune*0", "adipose*2"], genes)
    assert edits == ["immune*4", "immune*0"]  # no adipose gene in this panel: dropped
    with pytest.raises(ValueError, match="neither a gene"):
        E.usable_edits(["imune*4"], genes)
    seeds = list(range(12))
    right = E.edit_directionality(Darkener(immune), probe, conditions, expression, genes, edits, seeds)
    wrong = E.edit_directionality(Darkener(immune, sign=-1.0), probe, conditions, expression, genes, edits, seeds)
    for name in edits:
        assert right["edits"][name]["fraction"] == 1.0 and wrong["edits"][name]["fraction"] == 0.0
        assert right["edits"][name]["n"] == 11 and right["edits"][name]["skipped"] == 1
    assert right["overall_fraction"] == 1.0 and wrong["overall_fraction"] == 0.0
    assert right["overall_p_value"] < 1e-5 and wrong["overall_p_value"] == pytest.approx(1.0)
    assert right["edits"]["immune*4"]["direction"] == 1 and right["edits"]["immune*0"]["direction"] == -1
    # a "set" edit takes its direction from the spot's own level (here above every spot's: up)
    raised = E.edit_directionality(Darkener(immune), probe, conditions, expression, genes, ["CD3E=3"], seeds)
    assert raised["edits"]["CD3E=3"]["fraction"] == 1.0 and raised["edits"]["CD3E=3"]["n"] == 12


class CountingDarkener(Darkener):
    """:class:`Darkener` that counts the patches it draws."""

    drawn = 0

    def __call__(self, condition: torch.Tensor, generator=None) -> torch.Tensor:
        self.drawn += len(condition)
        return super().__call__(condition, generator)


def test_edits_scored_where_they_act():
    """A silencing edit skips spots that barely express the genes (min_shift); picks choose and bound the spots."""
    genes = ["PTPRC", "CD3E", "CD74", "COL1A1", "EPCAM", "ACTB"]
    immune = [0, 1, 2]
    expression = np.random.default_rng(1).uniform(1.0, 2.0, size=(20, len(genes))).astype(np.float32)
    expression[:4, immune] = 0.3  # low immune: x4 moves it by 0.58 log units, silencing by only 0.3
    conditions = np.repeat(expression[:, None], 3, axis=1)
    probe, edits, seeds = darkness_probe(genes, immune), ["immune*4", "immune*0"], list(range(20))
    out = E.edit_directionality(Darkener(immune), probe, conditions, expression, genes, edits, seeds, min_shift=0.5)
    assert out["min_shift"] == 0.5 and out["num_spots"] == 20
    assert out["edits"]["immune*4"]["eligible"] == 20 and out["edits"]["immune*4"]["n"] == 20
    assert out["edits"]["immune*0"]["eligible"] == 16 and out["edits"]["immune*0"]["skipped"] == 4
    assert out["edits"]["immune*0"]["n"] == 16 and out["overall_n"] == 36
    # the choice: a seeded subset of the spots each edit acts on, the same spots where they act on the same ones
    picks = {e: E.edit_spots(e, conditions, expression, genes, 6, seed=3, min_shift=0.5) for e in edits}
    assert all(len(p) == 6 and list(p) == sorted(p) for p in picks.values())
    assert not set(picks["immune*0"].tolist()) & {0, 1, 2, 3}
    assert list(E.edit_spots("immune*0", conditions, expression, genes, 6, seed=3, min_shift=0.5)) == list(
        picks["immune*0"]
    )
    assert len(E.edit_spots("immune*0", conditions, expression, genes, None, min_shift=0.5)) == 16
    assert len(E.edit_spots("immune*0", conditions, expression, genes, None, min_shift=5.0)) == 0
    drawer = CountingDarkener(immune)
    chosen = E.edit_directionality(drawer, probe, conditions, expression, genes, edits, seeds, picks=picks)
    union = set(picks["immune*4"].tolist()) | set(picks["immune*0"].tolist())
    assert chosen["num_spots"] == len(union) and drawer.drawn == len(union) + 12  # originals once, then each edit
    assert all(chosen["edits"][e]["n"] == 6 and chosen["edits"][e]["fraction"] == 1.0 for e in edits)


def test_probe_seed_summary_and_setting():
    """Each edit's rates under several probes, with their mean and range; the setting takes whole numbers >= 1."""

    def result(fractions: dict, overall: float) -> dict:
        return {"edits": {k: {"fraction": v} for k, v in fractions.items()}, "overall_fraction": overall}

    runs = [
        result({"immune*4": 0.75, "hypoxia*0": None}, 0.75),
        result({"immune*4": 0.5, "hypoxia*0": None}, 0.5),
        result({"immune*4": 1.0, "hypoxia*0": None}, 1.0),
    ]
    summary = E.probe_seed_summary(runs, [7, 8, 9])
    assert summary["seeds"] == [7, 8, 9]
    assert summary["edits"]["immune*4"] == {"fractions": [0.75, 0.5, 1.0], "mean": 0.75, "min": 0.5, "max": 1.0}
    assert summary["edits"]["hypoxia*0"]["mean"] is None  # not scored (acts on no spot) under any probe
    assert summary["overall"]["mean"] == 0.75 and summary["overall"]["min"] == 0.5
    with pytest.raises(ValueError, match="one edit-directionality result per probe seed"):
        E.probe_seed_summary(runs, [7, 8])
    assert S.EditSettings().probe_seeds == 1 and S.EditSettings(probe_seeds="3").probe_seeds == 3
    for bad in (0, 1.5, True, "five", None, float("inf")):
        with pytest.raises(ValueError, match="edit_probe_seeds must be a whole number of at least 1"):
            S.EditSettings(probe_seeds=bad)


def test_edit_readability_on_real_patches():
    """An edit is readable when the probe's reading of its genes on real patches follows their measured level."""
    genes = ["PTPRC", "CD3E", "COL1A1", "ACTB"]
    rng = np.random.default_rng(0)
    expression = rng.uniform(0.0, 3.0, size=(50, 4)).astype(np.float32)
    mean, std = expression.mean(axis=0), expression.std(axis=0)
    probe = E.Probe("cnn", genes, [], mean, std, None, lambda x: (None, None))
    predictions = (expression - mean) / std
    predictions[:, 2] = rng.normal(size=50)  # the probe reads nothing of COL1A1
    results = {"immune*4": {"genes": ["PTPRC", "CD3E"]}, "stroma*4": {"genes": ["COL1A1"]}, "x*2": {"genes": []}}
    out = E.edit_readability(probe, predictions, expression, results, threshold=0.3)
    assert out["immune*4"]["real_r"] == pytest.approx(1.0) and out["immune*4"]["readable"]
    assert abs(out["stroma*4"]["real_r"]) < 0.3 and not out["stroma*4"]["readable"]
    assert out["x*2"] == {"real_r": None, "readable": False}


def test_settings_and_patch_cache(tmp_path):
    from bundle.evaluation.generation import cached_array, generated_size, safe_name

    assert (
        S.GenerationSettings(regenerate="false").regenerate is False and S.GenerationSettings(regenerate="1").regenerate
    )
    with pytest.raises(ValueError, match="probe_type must be"):
        S.ProbeSettings(kind="resnet")
    with pytest.raises(ValueError, match="eval_split must be one of 'validation', 'test'.*got 'training'"):
        S.DataSettings(".", FOV_UM, SIZE, 6, split="training")
    assert S.DataSettings(".", FOV_UM, SIZE, 6).split == "validation" and S.ProbeSettings().top_genes == 50
    with pytest.raises(ValueError, match="top_genes must be at least 1"):
        S.ProbeSettings(top_genes=0)
    assert S.ProbeSettings().input_size(512) == 128 and S.ProbeSettings(image_size=48).input_size(512) == 48
    assert S.ProbeSettings().input_size(64) == 64
    assert S.EditSettings().edits == E.DEFAULT_EDITS and S.RealismSettings().require_inception
    assert safe_name("edit immune*4") == "edit_immune_4" and safe_name("***") == "x"
    assert generated_size(Darkener([0])) is None  # a plain callable: no decoder to ask

    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return np.full((2, 3, 4, 4), len(calls), np.uint8)

    key = {"generator": "g", "what": "validation"}
    first, cached = cached_array(tmp_path, "validation", key, compute, regenerate=False)
    again, cached_again = cached_array(tmp_path, "validation", dict(reversed(list(key.items()))), compute, False)
    assert not cached and cached_again and len(calls) == 1 and np.array_equal(first, again)
    assert json.loads(next(tmp_path.glob("validation-*.json")).read_text()) == key
    _, cached = cached_array(tmp_path, "validation", key, compute, regenerate=True)
    assert not cached and len(calls) == 2
    _, cached = cached_array(tmp_path, "validation", None, compute, regenerate=False)  # no key: no cache
    assert not cached and len(calls) == 3 and len(list(tmp_path.glob("*.npy"))) == 1


NEXT_TO_REPORT = {"real_vs_generated.png", "per_gene.csv"}


def _self_contained(text: str) -> None:
    """Everything the page shows is inline; its only other references are links to the files written next to it."""
    references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", text, flags=re.I)
    assert references and all(ref.startswith("data:") or ref in NEXT_TO_REPORT for ref in references), references
    assert not re.search(r"""src\s*=\s*["'](?!data:)""", text, flags=re.I)
    assert "http://" not in text and "<link" not in text.lower() and "<script" not in text.lower()
    assert "url(" not in text


def test_evaluate_oracle_vs_shuffled_reports(demo_dataset, spots, probe, tmp_path, empty_hub):
    from mlflow import MlflowClient

    n = len(spots["val"])
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    common = dict(
        data=S.DataSettings(demo_dataset, FOV_UM, SIZE, 6, genes=spots["genes"]),
        probe=S.ProbeSettings(trained=probe),
        realism=S.RealismSettings(require_inception=False, kid_subsets=5),
        edits=S.EditSettings(["immune*4", "hypoxia*0", "adipose*4"], num_spots=6),
    )
    oracle = Oracle(spots["expression"], spots["real"])
    good = E.evaluate(
        oracle,
        output=S.OutputSettings(tmp_path / "good", tracking_uri=uri, run_name="eval_good"),
        generation=S.GenerationSettings(cache_key={"g": "oracle"}),
        **common,
    )
    calls = oracle.calls
    shuffled = Oracle(spots["expression"], spots["real"], np.random.default_rng(1).permutation(n))
    bad = E.evaluate(
        shuffled, output=S.OutputSettings(tmp_path / "bad", tracking_uri=uri, run_name="eval_bad"), **common
    )

    assert good["fidelity"]["fidelity_r_mean"] > bad["fidelity"]["fidelity_r_mean"] + 0.2
    assert good["compartments"]["generated_agreement"] > bad["compartments"]["generated_agreement"]
    assert "not computed" in good["realism"]["inception"]["skipped"]
    assert "pt_inception-2015-12-05-6726825d.pth" in good["realism"]["inception"]["skipped"]
    assert "fid" not in good["summary"]

    # metrics.json: every part and the settings
    saved = json.loads((tmp_path / "good" / "metrics.json").read_text())
    assert {"settings", "realism", "fidelity", "probe", "compartments", "edits", "summary", "timings"} <= set(saved)
    for key in ("dataset_dir", "seed", "num_spots", "labels", "edits", "edits_dropped", "mlflow"):
        assert key in saved["settings"], key
    assert saved["settings"]["num_spots"] == n and saved["settings"]["edits_dropped"] == []
    assert saved["settings"]["split"] == "validation" and saved["settings"]["split_sizes"]["validation"] == n
    outputs = saved["outputs"]
    assert Path(outputs["real_vs_generated"]).is_file() and Path(outputs["per_gene"]).is_file()
    assert sum(map(len, outputs["real_vs_generated_spots"].values())) == outputs["real_vs_generated_rows"]
    assert set(saved["edits"]["edits"]) == {"immune*4", "hypoxia*0", "adipose*4"}
    for key in (
        "ceiling_r_mean",
        "fidelity_r_mean",
        "fidelity_fraction",
        "compartment_generated_agreement",
        "compartment_chance",
        "edit_directionality",
        "num_spots",
    ):
        assert key in saved["summary"], key
    assert saved["settings"]["mlflow"]["run_id"]

    # the report: self-contained and carrying the summary numbers
    report = (tmp_path / "good" / "report.html").read_text()
    _self_contained(report)
    assert f"{good['summary']['fidelity_r_mean']:.3f}" in report
    assert f"{good['summary']['compartment_generated_agreement']:.3f}" in report
    assert "not computed" in report and report.count("<img") == 2 * min(24, n)
    immune = saved["edits"]["edits"]["immune*4"]
    assert f"{immune['n']} (of {immune['eligible']})" in report and "by at least 0.5 (log1p units" in report
    # the probe reads immune tissue on real demo patches; the readability of every edit is recorded and shown
    assert immune["readable"] and immune["real_r"] > 0.5, immune
    assert all({"real_r", "readable"} <= set(res) for res in saved["edits"]["edits"].values())
    assert "probe reads the genes on real patches (r)" in report and f"{immune['real_r']:.2f}" in report

    # MLflow: both runs with their metrics and artifacts
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("st_ldm")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"eval_good", "eval_bad"}
    logged = runs["eval_good"].data.metrics
    assert logged["fidelity_r_mean"] == pytest.approx(good["summary"]["fidelity_r_mean"])
    assert logged["compartment_chance"] == pytest.approx(good["summary"]["compartment_chance"])
    assert any(k.startswith("fidelity_r/") for k in logged)
    assert runs["eval_good"].data.params["num_spots"] == str(n)
    artifacts = {a.path for a in client.list_artifacts(runs["eval_good"].info.run_id)}
    assert {"metrics.json", "report.html"} <= artifacts

    # rerun with the same generator key: nothing is generated again, the numbers are the same
    again = E.evaluate(
        oracle,
        output=S.OutputSettings(tmp_path / "good"),
        generation=S.GenerationSettings(cache_key={"g": "oracle"}),
        **common,
    )
    assert oracle.calls == calls and again["settings"]["generated_from_cache"]
    assert again["fidelity"]["fidelity_r_mean"] == pytest.approx(good["fidelity"]["fidelity_r_mean"])
    assert again["edits"]["overall_fraction"] == good["edits"]["overall_fraction"]


def test_edit_rates_under_several_probe_seeds(demo_dataset, spots, probe, tmp_path, empty_hub, monkeypatch):
    """edit_probe_seeds 3: the same edited patches read by CNN probes of seeds 5, 6, 7, without generating again; a
    probe that cannot be retrained is refused before anything is generated."""
    data = S.DataSettings(demo_dataset, FOV_UM, SIZE, 6, genes=spots["genes"], num_spots=40)
    realism = S.RealismSettings(require_inception=False, kid_subsets=5)
    edits = S.EditSettings(["immune*4", "immune*0"], num_spots=8, probe_seeds=3)
    oracle = Oracle(spots["expression"], spots["real"])
    with pytest.raises(ValueError, match="a trained probe was passed in"):
        E.evaluate(
            oracle,
            data,
            S.OutputSettings(tmp_path / "given"),
            probe=S.ProbeSettings(trained=probe),
            realism=realism,
            edits=edits,
        )
    assert oracle.calls == 0 and not (tmp_path / "given").exists()

    trained_with = []

    def recording_train_probe(*args, **kwargs):
        trained_with.append(args[9])  # the seed
        return E.train_probe(*args, **kwargs)

    monkeypatch.setattr("bundle.evaluation.runner.train_probe", recording_train_probe)
    settings = S.ProbeSettings(epochs=2, width=4, batch_size=64, max_train_spots=200)
    metrics = E.evaluate(
        oracle, data, S.OutputSettings(tmp_path / "eval"), probe=settings, realism=realism, edits=edits, seed=5
    )
    calls = oracle.calls
    single = E.evaluate(
        oracle,
        data,
        S.OutputSettings(tmp_path / "single"),
        probe=settings,
        realism=realism,
        edits=S.EditSettings(["immune*4", "immune*0"], num_spots=8),
        seed=5,
    )
    assert oracle.calls == 2 * calls  # the extra probes read the patches already generated
    assert trained_with == [5, 6, 7, 5]  # the evaluation's probe, the two extra ones, then the single-probe run's
    by_seed = metrics["edits"]["probe_seeds"]
    assert by_seed["seeds"] == [5, 6, 7] and metrics["settings"]["edit_probe_seeds"] == 3
    assert "probe_seeds" not in single["edits"] and single["settings"]["edit_probe_seeds"] == 1
    for name in ("immune*4", "immune*0"):
        rates = by_seed["edits"][name]["fractions"]
        # the first probe is the evaluation's own: its rate is the edit's rate, as without extra probes
        assert rates[0] == metrics["edits"]["edits"][name]["fraction"] == single["edits"]["edits"][name]["fraction"]
        assert by_seed["edits"][name]["mean"] == pytest.approx(np.mean(rates))
        assert metrics["summary"][f"edit_{name}_probe_mean"] == pytest.approx(np.mean(rates))
    assert metrics["summary"]["edit_directionality_probe_mean"] == pytest.approx(by_seed["overall"]["mean"])
    assert "timings" in metrics and "edit_probe_seeds" in metrics["timings"]
    report = (tmp_path / "eval" / "report.html").read_text()
    assert "fraction under 3 probes: mean (range)" in report and "seeds 5, 6, 7" in report


@pytest.fixture(scope="module")
def test_split_dataset(demo_dataset, tmp_path_factory) -> Path:
    """A copy of the demo dataset whose validation spots are its test spots (validation list empty)."""
    import shutil

    folder = tmp_path_factory.mktemp("test_split") / "demo"
    shutil.copytree(demo_dataset, folder)
    datalist = json.loads((folder / "datalist.json").read_text())
    datalist["test"], datalist["validation"] = datalist["validation"], []
    (folder / "datalist.json").write_text(json.dumps(datalist))
    return folder


def test_empty_split_is_refused(demo_dataset, spots, tmp_path, empty_hub):
    oracle = Oracle(spots["expression"], spots["real"])
    with pytest.raises(
        ValueError, match=r"has no 'test' spots \(its datalist.json holds training \d+, validation \d+, test 0\)"
    ) as info:
        E.evaluate(
            oracle,
            S.DataSettings(demo_dataset, FOV_UM, SIZE, 6, split="test"),
            S.OutputSettings(tmp_path / "eval"),
            realism=S.RealismSettings(require_inception=False),
        )
    assert str(demo_dataset) in str(info.value) and oracle.calls == 0


def _check_top_genes(fidelity: dict, num: int) -> None:
    """Per-gene lists cover the panel, means are means of the per-gene r where defined, top sets are the top ones."""
    genes = fidelity["genes"]
    ceiling = np.array([np.nan if v is None else v for v in fidelity["ceiling_r"]])
    generated = np.array([np.nan if v is None else v for v in fidelity["fidelity_r"]])
    assert len(ceiling) == len(generated) == len(fidelity["expression_sd"]) == len(genes)
    assert fidelity["ceiling_r_mean"] == pytest.approx(np.nanmean(ceiling))
    assert fidelity["fidelity_r_mean"] == pytest.approx(np.nanmean(generated))
    top = fidelity["top_genes"]
    assert top["num"] == num
    ranked = {"top_ceiling": -np.nan_to_num(ceiling, nan=-2.0), "top_hvg": -np.asarray(fidelity["expression_sd"])}
    for key, order in ranked.items():
        index = [genes.index(g) for g in top[key]["genes"]]
        assert len(index) == num and set(index) == set(np.argsort(order, kind="stable")[:num].tolist()), key
        assert top[key]["ceiling_r_mean"] == pytest.approx(np.nanmean(ceiling[index]))
        assert top[key]["fidelity_r_mean"] == pytest.approx(np.nanmean(generated[index]))


def _check_figure(path: Path, outputs: dict, labels: list[str], per_label: int, size: int) -> None:
    """The PNG has one row per chosen spot, groups of rows per label, a real and a generated column."""
    from PIL import Image

    groups = E.figure_spots(labels, per_label, seed=0)
    rows = sum(len(index) for _, index, _ in groups)
    assert outputs["real_vs_generated_rows"] == rows and len(outputs["real_vs_generated_spots"]) == len(groups)
    gap, header = 2, 14  # bundle.sampling.grids.save_image_grid: 2-px gaps, twice between groups, a column-label row
    image = Image.open(path)
    assert image.height == header + rows * (size + gap) - gap + (len(groups) - 1) * gap
    assert (image.width - 2 * size - gap) > 0  # a left margin holds the labels


def test_figure_spot_choice_and_refused_inputs(tmp_path):
    from bundle.sampling.grids import save_image_grid

    labels = ["cluster_10", "cluster_2", "cluster_2", "cluster_2", "cluster_10", "cluster_1"]
    groups = E.figure_spots(labels, 2, seed=0)
    assert [g[0] for g in groups] == ["cluster_1", "cluster_2", "cluster_10"]  # natural order of the names
    assert [(len(index), count) for _, index, count in groups] == [(1, 1), (2, 3), (2, 2)]
    assert groups == E.figure_spots(labels, 2, seed=0) and all(index == sorted(index) for _, index, _ in groups)
    real = np.zeros((6, 3, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="differ in shape"):
        E.write_real_vs_generated(tmp_path / "f.png", real, real[:, :, :4, :4], labels)
    with pytest.raises(ValueError, match=r"group sizes \[2, 2\] must be positive and add up to the 3 rows"):
        save_image_grid([torch.zeros(2, 3, 4, 4)] * 3, tmp_path / "g.png", rows_per_group=[2, 2])


def test_evaluate_test_split_gene_sets_and_figure(test_split_dataset, spots, probe, tmp_path, empty_hub):
    """One run on the test split: split recorded, edits resolved through the given gene sets, per-gene table, top-gene
    summaries, the figure of real and generated patches grouped by label."""
    genes = spots["genes"]
    oracle = Oracle(spots["expression"], spots["real"])
    own_sets = {"myset": [genes[3], genes[7], "NOT_A_GENE"], "immune": [genes[5]]}
    metrics = E.evaluate(
        oracle,
        S.DataSettings(test_split_dataset, FOV_UM, SIZE, 6, num_spots=24, split="test"),
        S.OutputSettings(tmp_path / "eval", figure_spots_per_label=2),
        probe=S.ProbeSettings(trained=probe, top_genes=10),
        realism=S.RealismSettings(require_inception=False),
        edits=S.EditSettings(["myset*4", "immune*4"], num_spots=4, gene_sets=own_sets),
    )
    settings = metrics["settings"]
    assert settings["split"] == "test" and settings["num_spots"] == 24
    assert settings["split_sizes"] == {
        "training": len(spots["train_labels"]),
        "validation": 0,
        "test": len(spots["val"]),
    }
    test_ids = {f"{e['sample']}/{e['barcode']}" for e in spots["val"]}
    for ids in metrics["outputs"]["real_vs_generated_spots"].values():
        assert set(ids) <= test_ids
    # the edits edit the genes of the given sets, not the built-in programmes
    edits = metrics["edits"]["edits"]
    assert edits["myset*4"]["genes"] == [genes[3], genes[7]] and edits["myset*4"]["gene_set"] == "myset"
    assert edits["myset*4"]["set_genes_not_in_panel"] == ["NOT_A_GENE"] and edits["immune*4"]["genes"] == [genes[5]]
    # per-gene results and the top-gene summaries
    _check_top_genes(metrics["fidelity"], 10)
    for key in ("ceiling_r_mean_top_ceiling", "fidelity_r_mean_top_ceiling", "fidelity_r_mean_top_hvg"):
        assert key in metrics["summary"], key
    table = (tmp_path / "eval" / "per_gene.csv").read_text().splitlines()
    assert table[0].startswith("gene,ceiling_r,fidelity_r") and len(table) == 1 + len(genes)
    shown = [float(line.split(",")[1]) for line in table[1:] if line.split(",")[1]]
    assert shown == sorted(shown, reverse=True)
    # the figure, linked from the report
    labels = [spots["val_labels"][i] for i in np.sort(np.random.default_rng(0).choice(len(spots["val"]), 24, False))]
    _check_figure(tmp_path / "eval" / "real_vs_generated.png", metrics["outputs"], labels, 2, SIZE)
    report = (tmp_path / "eval" / "report.html").read_text()
    _self_contained(report)
    assert "href='real_vs_generated.png'" in report and "24 test spots" in report


def test_encoder_probe_and_encoder_fid(demo_dataset, spots, tmp_path, empty_hub):
    """With encoder_path: ridge probe on the frozen encoder's features and fid_<encoder name> in the summary."""
    torch.manual_seed(0)
    encoder = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()
    path = tmp_path / "tiny_encoder.pt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
        torch.jit.script(encoder).save(str(path))
    oracle = Oracle(spots["expression"], spots["real"])
    metrics = E.evaluate(
        oracle,
        S.DataSettings(demo_dataset, FOV_UM, SIZE, 6),
        S.OutputSettings(tmp_path / "eval"),
        realism=S.RealismSettings(
            require_inception="false", encoder_path=path, kid_subsets=5, feature_batch_size=64, fid_method="eigh"
        ),
        edits=S.EditSettings([]),
    )
    assert metrics["realism"]["encoders"]["tiny_encoder"]["fid_method"] == "eigh"
    assert metrics["probe"]["kind"] == "encoder:tiny_encoder" and metrics["settings"]["encoders"] == ["tiny_encoder"]
    assert metrics["fidelity"]["fidelity_r_mean"] == pytest.approx(metrics["fidelity"]["ceiling_r_mean"], abs=1e-6)
    # the oracle hands back the real patches themselves: the two sets are identical, so FID is (numerically) 0
    assert abs(metrics["summary"]["fid_tiny_encoder"]) < 1e-3
    # the encoder probe (ridge regression) has no seed to vary: several probe seeds are refused before any work
    with pytest.raises(ValueError, match="the encoder probe .* has no seed to vary"):
        E.evaluate(
            oracle,
            S.DataSettings(demo_dataset, FOV_UM, SIZE, 6),
            S.OutputSettings(tmp_path / "seeds"),
            realism=S.RealismSettings(require_inception="false", encoder_path=path),
            edits=S.EditSettings(probe_seeds=2),
        )
    assert not (tmp_path / "seeds").exists()
    assert "fid" not in metrics["summary"] and "kid_mean_tiny_encoder" in metrics["summary"]
    with pytest.raises(ValueError, match="require_inception must be true or false"):
        E.load_realism_extractors(require_inception="maybe")


# --- the config, end to end, with a tiny model ------------------------------------------------------------------

TINY = {
    "patch_fov_um": FOV_UM,
    "patch_size": 16,
    "num_inference_steps": 2,
    "val_batch_size": 32,
    "num_eval_spots": 24,
    "num_edit_spots": 4,
    "edits": ["immune*4", "hypoxia*0"],
    "probe_epochs": 1,
    "probe_width": 4,
    "kid_subsets": 5,
    "min_group_size": 5,
}


@pytest.fixture(scope="module")
def tiny_model(demo_dataset, tmp_path_factory) -> Path:
    """models/model.pt + models/autoencoder.pt of a tiny untrained model (16-px patches) for the demo dataset.

    The config builds the network from the architecture the checkpoint records (``bundle.checkpoints.build_network``).
    """
    from bundle.autoencoder import save_autoencoder_checkpoint
    from bundle.checkpoints import save_model

    genes = json.loads((demo_dataset / "gene_panel.json").read_text())["genes"]
    folder = tmp_path_factory.mktemp("tiny_models")
    # MONAI zero-initialises output layers: randomize them so that the condition is visible in the output
    network = tiny_network(len(genes), num_neighbors=6, randomize=True)
    save_autoencoder_checkpoint(folder / "autoencoder.pt", tiny_autoencoder(), 0.5, network_kwargs=TINY_AUTOENCODER)
    save_model(
        folder / "model.pt",
        network,
        genes,
        0.5,
        extra={
            "num_neighbors": 6,
            "prediction_type": "v_prediction",
            "latent_shape": [3, 8, 8],
            "patch_fov_um": FOV_UM,
            "patch_size": 16,
            "iteration": 3,
            "architecture": tiny_architecture(num_neighbors=6),
        },
    )
    return folder


def run_evaluate(tiny_model: Path, dataset: Path, output_dir: Path, **override):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        workflow_type="infer",
        config_file=str(CONFIGS / "evaluate.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        **copy.deepcopy(
            {
                **TINY,
                "model_path": str(tiny_model / "model.pt"),
                "autoencoder_path": str(tiny_model / "autoencoder.pt"),
                "dataset_dir": str(dataset),
                "output_dir": str(output_dir),
                "device": "cpu",
                **override,
            }
        ),
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return json.loads((output_dir / "eval" / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Matrix is singular")  # FID of 8 patches in 2048 dimensions
def test_config_end_to_end(tiny_model, demo_dataset, test_split_dataset, tmp_path, empty_hub, fid_weights):
    # missing Inception weights stop the run before anything is read or generated (MONAI wraps the error of a
    # config expression in a RuntimeError "from" it; the FileNotFoundError with the instructions is its cause)
    with pytest.raises(Exception) as info:
        run_evaluate(tiny_model, demo_dataset, tmp_path / "strict")
    error = info.value
    while not isinstance(error, FileNotFoundError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, FileNotFoundError) and "pt_inception-2015-12-05-6726825d.pth" in str(error)
    assert "inception_weights" in str(error)
    assert not (tmp_path / "strict" / "eval").exists()

    # offline: realism with Inception skipped, everything else computed; "immune" read from a gene-set file
    genes = json.loads((demo_dataset / "gene_panel.json").read_text())["genes"]
    sets_file = tmp_path / "sets.json"
    sets_file.write_text(json.dumps({"immune": [genes[2], genes[9]]}))
    metrics = run_evaluate(
        tiny_model,
        demo_dataset,
        tmp_path / "offline",
        require_inception=False,
        gene_sets_file=str(sets_file),
        edit_probe_seeds=2,
    )
    assert metrics["settings"]["edit_probe_seeds"] == 2 and metrics["edits"]["probe_seeds"]["seeds"] == [0, 1]
    assert metrics["edits"]["edits"]["immune*4"]["genes"] == [genes[2], genes[9]]
    assert metrics["settings"]["gene_sets_file"] == str(sets_file) and metrics["settings"]["split"] == "validation"
    assert Path(metrics["outputs"]["real_vs_generated"]).is_file()
    assert "not computed" in metrics["realism"]["inception"]["skipped"]
    assert metrics["settings"]["num_spots"] == 24 and metrics["settings"]["iteration"] == 3
    assert metrics["settings"]["num_inference_steps"] == 2 and metrics["settings"]["model_path"].endswith("model.pt")
    assert len(metrics["fidelity"]["ceiling_r"]) == 48 and 4 <= metrics["edits"]["num_spots"] <= 8
    assert all(e["n"] == min(4, e["eligible"]) for e in metrics["edits"]["edits"].values())
    assert metrics["settings"]["num_edit_spots"] == 4 and metrics["settings"]["edit_min_shift"] == 0.5
    cached = sorted(p.name for p in (tmp_path / "offline" / "eval" / "generated").glob("*.npy"))
    assert len(cached) == 3  # validation patches + two edits
    _self_contained((tmp_path / "offline" / "eval" / "report.html").read_text())

    # with (random) Inception weights: FID/KID, reference features cached. 8 spots and no per-group FID: the Inception
    # takes about half a second per patch and each 2048-d FID about 20-40 s on two busy CPU cores
    metrics = run_evaluate(
        tiny_model,
        test_split_dataset,
        tmp_path / "offline",
        eval_split="test",
        require_inception=True,
        inception_weights=str(fid_weights),
        num_eval_spots=8,
        min_group_size=100,
        edits=[],
    )
    inception = metrics["realism"]["inception"]
    assert inception["fid"] > 0 and inception["n_real"] == inception["n_fake"] == 8
    assert metrics["settings"]["split"] == "test" and metrics["settings"]["split_sizes"]["validation"] == 0
    assert metrics["summary"]["fid"] == pytest.approx(inception["fid"])
    assert inception["per_group"] == {} and set(inception["skipped_groups"]) == set(
        metrics["compartments"]["per_class"]
    )
    assert metrics["settings"]["inception_weights"] == str(fid_weights) and metrics["edits"] == {}
    assert len(list((tmp_path / "offline" / "eval" / "feature_cache").glob("features-*.npy"))) == 1
