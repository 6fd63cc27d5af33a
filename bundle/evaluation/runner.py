"""The evaluation run: :func:`evaluate` and its named steps, from loading the spots to the report and the MLflow run.

For every spot of the scored split (``validation`` or ``test``; or a seeded subset of them) :func:`evaluate` generates
a patch from the spot's expression (seed ``seed + index of the spot in the split's list``), loads the real patch of the
spot, then scores realism, biological fidelity, compartment agreement and edit directionality, and writes
``metrics.json``, ``report.html``, ``per_gene.csv``, ``real_vs_generated.png`` and an MLflow run. Its settings come
grouped (:mod:`bundle.evaluation.settings`).

Under ``torchrun`` (``configs/multi_gpu_evaluate.json``) every rank reads the spots and generates its share of the
batches (the evaluated patches first, then the edited ones); rank 0 gathers them and alone scores and writes the
outputs, while the other ranks return once their patches are handed over.
"""

from __future__ import annotations

import datetime
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.distributed import rank
from bundle.evaluation.compartments import compartment_agreement
from bundle.evaluation.edits import edit_directionality, edit_readability, edit_spots, probe_seed_summary, usable_edits
from bundle.evaluation.fidelity import probe_scores, write_per_gene_table
from bundle.evaluation.figure import write_real_vs_generated
from bundle.evaluation.generation import Generator, cached_array, generate_patches, generated_size, key_hash
from bundle.evaluation.image_realism import RealismExtractors, load_realism_extractors, realism
from bundle.evaluation.labels import spot_labels
from bundle.evaluation.probe import Probe, train_encoder_probe, train_probe
from bundle.evaluation.report import summary_numbers, write_report
from bundle.evaluation.settings import (
    DataSettings,
    EditSettings,
    GenerationSettings,
    OutputSettings,
    ProbeSettings,
    RealismSettings,
)
from bundle.evaluation.spots import load_conditions, load_real_patches, select_spots, split_sizes
from bundle.evaluation.tracking import log_evaluation
from bundle.utils import jsonable, read_json, write_json_atomic

__all__ = ["EvaluationSpots", "evaluate"]

logger = logging.getLogger(__name__)


@dataclass
class EvaluationSpots:
    """The evaluated spots and the probe's training spots, loaded.

    Attributes:
        dataset_dir: the dataset folder.
        split: the datalist split the evaluated spots come from (``validation`` or ``test``).
        genes: the dataset's gene panel.
        entries: datalist entries of the evaluated spots.
        seeds: generation seed of each evaluated spot (``seed`` + its index in the split's list).
        spot_ids: ``<sample>/<barcode>`` of each evaluated spot.
        conditions: ``(N, 1 + K, G)`` conditions of the evaluated spots.
        expression: ``(N, G)`` their own expression.
        labels: their labels (compartment or cluster).
        label_source: a sentence saying where the labels come from.
        real: ``(N, 3, S, S)`` uint8 real patches.
        train_expression: ``(M, G)`` expression of the probe's training spots.
        train_labels: their labels.
        train_images: their real patches at the probe's input size (None when a trained probe was given).
    """

    dataset_dir: Path
    split: str
    genes: list[str]
    entries: list[dict[str, Any]]
    seeds: list[int]
    spot_ids: list[str]
    conditions: np.ndarray
    expression: np.ndarray
    labels: list[str]
    label_source: str
    real: np.ndarray
    train_expression: np.ndarray
    train_labels: list[str]
    train_images: np.ndarray | None = None


@dataclass
class _EditPlan:
    """The edits scored for directionality (``scored``: ``num_edit_spots``, ``edit_min_shift``, ``edits``,
    ``edits_dropped`` for the settings record), the spots each is scored on (``picks``, indices into the evaluated
    spots; empty when none) and their generated patches (None on ranks other than 0)."""

    scored: dict[str, Any]
    gene_sets: Mapping[str, Any] | None = None
    picks: dict[str, np.ndarray] = field(default_factory=dict)
    patches: dict[str, np.ndarray | None] = field(default_factory=dict)


@dataclass
class _Laps:
    """Seconds spent in each step, for ``metrics["timings"]``."""

    start: float = field(default_factory=time.perf_counter)
    last: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.last = self.start

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.last, 2)
        self.last = now

    def total(self) -> dict[str, float]:
        return {**self.timings, "total": round(time.perf_counter() - self.start, 2)}


def _prepare_extractors(
    realism_settings: RealismSettings, probe_settings: ProbeSettings, device: str | torch.device
) -> tuple[RealismExtractors, bool]:
    """The realism extractors (loaded now unless given, so that missing weights stop the run first) and whether the
    probe is the encoder probe."""
    extractors = realism_settings.extractors
    if extractors is None:
        extractors = load_realism_extractors(
            realism_settings.inception_weights,
            realism_settings.require_inception,
            realism_settings.encoder_path,
            device,
        )
    kind = probe_settings.kind
    use_encoder_probe = kind == "encoder" or (kind == "auto" and bool(extractors.encoders))
    if use_encoder_probe and not extractors.encoders:
        raise ValueError("probe_type='encoder' needs encoder_path (a pathology encoder's weights or TorchScript file).")
    return extractors, use_encoder_probe


def _check_inputs(generator: Generator, data: DataSettings) -> list[str]:
    """The dataset's gene panel, after checking it against the model's and the generated size against ``patch_size``."""
    from bundle.io.gene_panel import check_gene_panel, load_gene_panel

    dataset_dir = Path(data.dataset_dir)
    panel = load_gene_panel(dataset_dir / "gene_panel.json")
    if data.genes is not None:
        check_gene_panel(list(data.genes), panel, what=f"the dataset {str(dataset_dir)!r}")
    size = generated_size(generator)
    if size is not None and size != int(data.patch_size):
        raise ValueError(
            f"the model generates {size}-px patches but patch_size is {data.patch_size}; set patch_size to {size} (and "
            "patch_fov_um to the training field of view) so real and generated patches match."
        )
    return list(panel)


def _load_spots(data: DataSettings, probe_settings: ProbeSettings, genes: list[str], seed: int) -> EvaluationSpots:
    """Choose the evaluated and the probe's training spots and read their conditions, labels and real patches."""
    dataset_dir = Path(data.dataset_dir)
    eval_entries, eval_index = select_spots(dataset_dir, data.split, data.num_spots, seed)
    train_entries, _ = select_spots(dataset_dir, "training", probe_settings.max_train_spots, seed)
    store = dataset_dir / "expression.npy"
    conditions, expression = load_conditions(eval_entries, store, data.num_neighbors)
    _, train_expression = load_conditions(train_entries, store, 0)
    train_labels, eval_labels, label_source = spot_labels(
        train_entries, eval_entries, train_expression, expression, data.labels, data.num_clusters, seed
    )
    real = load_real_patches(eval_entries, data.patch_fov_um, data.patch_size, data.wsi_backend)
    train_images = None
    if probe_settings.trained is None:
        probe_size = probe_settings.input_size(data.patch_size)
        train_images = load_real_patches(
            train_entries, data.patch_fov_um, data.patch_size, data.wsi_backend, output_size=probe_size
        )
    logger.info(
        "evaluating %d %s spots (%d training spots for the probe)", len(eval_entries), data.split, len(train_entries)
    )
    return EvaluationSpots(
        dataset_dir=dataset_dir,
        split=data.split,
        genes=genes,
        entries=eval_entries,
        seeds=[int(seed) + int(i) for i in eval_index],
        spot_ids=[f"{e.get('sample')}/{e.get('barcode')}" for e in eval_entries],
        conditions=conditions,
        expression=expression,
        labels=eval_labels,
        label_source=label_source,
        real=real,
        train_expression=train_expression,
        train_labels=train_labels,
        train_images=train_images,
    )


def _patch_cache(
    spots: EvaluationSpots, generation: GenerationSettings, output_dir: Path
) -> Callable[[str, Mapping[str, Any], Callable[[], np.ndarray]], tuple[np.ndarray, bool]]:
    """``cache(name, key_part, compute) -> (patches, from_cache)``: generated patches kept in ``<output_dir>/generated``
    under the generator's key, the dataset, the spots and the seeds (no cache without ``generation.cache_key``)."""
    base_key = None
    if generation.cache_key is not None:
        base_key = {
            "generator": dict(generation.cache_key),
            "dataset": str(spots.dataset_dir.resolve()),
            "spots": key_hash({"ids": spots.spot_ids}),
            "seeds": key_hash({"s": spots.seeds}),
        }

    def cache(name: str, key_part: Mapping[str, Any], compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
        key = None if base_key is None else {**base_key, **key_part}
        return cached_array(output_dir / "generated", name, key, compute, generation.regenerate)

    return cache


def _generate_evaluated(
    generator: Generator, spots: EvaluationSpots, generation: GenerationSettings, cache: Callable
) -> tuple[np.ndarray | None, bool]:
    """The generated patches of the evaluated spots (from the cache when there) and whether they came from it; the
    patches are None on ranks other than 0 under torchrun."""
    generated, cached = cache(
        spots.split,
        {"what": spots.split},
        lambda: generate_patches(generator, spots.conditions, spots.seeds, generation.batch_size, sharded=True),
    )
    if generated is not None and generated.shape != spots.real.shape:
        raise ValueError(
            f"generated patches {generated.shape[1:]} and real patches {spots.real.shape[1:]} differ; set patch_size "
            "to the size the model generates."
        )
    logger.info("generated patches %s", "read from the cache" if cached else "generated")
    return generated, cached


def _score_realism(
    spots: EvaluationSpots,
    generated: np.ndarray,
    extractors: RealismExtractors,
    settings: RealismSettings,
    data: DataSettings,
    output_dir: Path,
    seed: int,
) -> dict[str, Any]:
    """FID/KID of the generated against the real patches, with the real patches' features cached per dataset."""
    reference = {
        "dataset": spots.dataset_dir,
        "spot_ids": spots.spot_ids,
        "split": spots.split,
        "datalist_mtime_ns": (spots.dataset_dir / "datalist.json").stat().st_mtime_ns,
        "fov_um": float(data.patch_fov_um),
    }
    return realism(
        spots.real, generated, spots.labels, extractors, settings, output_dir / "feature_cache", reference, seed
    )


def _fit_probe(
    settings: ProbeSettings,
    spots: EvaluationSpots,
    extractors: RealismExtractors,
    use_encoder_probe: bool,
    feature_batch_size: int,
    patch_size: int,
    seed: int,
    device: str | torch.device,
) -> Probe:
    """The given probe, or one trained here on the real training patches (encoder probe or CNN)."""
    if settings.trained is not None:
        return settings.trained
    if use_encoder_probe:
        name, extractor = next(iter(extractors.encoders.items()))
        return train_encoder_probe(
            extractor,
            name,
            spots.train_images,
            spots.train_expression,
            spots.genes,
            spots.train_labels,
            feature_batch_size,
            seed,
        )
    return _train_cnn_probe(settings, spots, patch_size, seed, device)


def _train_cnn_probe(
    settings: ProbeSettings, spots: EvaluationSpots, patch_size: int, seed: int, device: str | torch.device
) -> Probe:
    """The CNN probe trained with ``seed`` on the real training patches."""
    return train_probe(
        spots.train_images,
        spots.train_expression,
        spots.genes,
        spots.train_labels,
        settings.epochs,
        settings.batch_size,
        settings.learning_rate,
        settings.width,
        settings.input_size(patch_size),
        seed,
        device,
    )


def _score_probe(
    probe: Probe, spots: EvaluationSpots, generated: np.ndarray, settings: ProbeSettings, seed: int
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], np.ndarray]:
    """Fidelity, compartment agreement, per spot the caption of the report (labels given by the probe), and the
    probe's expression predictions on the real patches."""
    pred_real, label_real = probe.predict(spots.real)
    pred_gen, label_gen = probe.predict(generated)
    fidelity = probe_scores(
        probe,
        spots.real,
        generated,
        spots.expression,
        settings.ceiling_threshold,
        seed=seed,
        predictions=(pred_real, pred_gen),
        top_genes=settings.top_genes,
    )
    compartments = (
        compartment_agreement(probe.classes, spots.labels, label_real, label_gen) if label_real is not None else {}
    )
    names = probe.classes
    captions = [
        {
            "sample": e.get("sample"),
            "barcode": e.get("barcode"),
            "label": spots.labels[i],
            "real_label": names[label_real[i]] if label_real is not None else None,
            "generated_label": names[label_gen[i]] if label_gen is not None else None,
        }
        for i, e in enumerate(spots.entries)
    ]
    return fidelity, compartments, captions, pred_real


def _generate_edits(
    generator: Generator, spots: EvaluationSpots, settings: EditSettings, batch_size: int, cache: Callable, seed: int
) -> _EditPlan:
    """The edits that touch the panel, for each a seeded choice of the spots it acts on (:func:`edit_spots`) and its
    patches of those spots (cached): the patches :func:`edit_directionality` would generate."""
    from bundle.sampling.edits import apply_edits, parse_edit, resolve_edit

    edits = list(settings.edits or [])
    kept = usable_edits(edits, spots.genes, settings.gene_sets) if edits else []
    scored = {
        "num_edit_spots": int(settings.num_spots or 0) if kept else 0,
        "edit_min_shift": float(settings.min_shift),
        "edit_probe_seeds": int(settings.probe_seeds),
        "edits": kept,
        "edits_dropped": [e for e in edits if e not in kept],
    }
    plan = _EditPlan(scored, settings.gene_sets)
    if not (kept and settings.num_spots):
        return plan
    for name in kept:
        edit = parse_edit(name)
        pick = edit_spots(
            edit,
            spots.conditions,
            spots.expression,
            spots.genes,
            settings.num_spots,
            seed + 1,
            settings.gene_sets,
            settings.min_shift,
        )
        plan.picks[name] = pick
        if not len(pick):
            continue  # the edit acts on no evaluated spot: it is reported unscored, nothing is generated
        idx = resolve_edit(edit, spots.genes, settings.gene_sets)
        edited = apply_edits(spots.conditions[pick], spots.genes, [edit], settings.gene_sets)
        # the edited genes belong to the cache key: one edit name means other genes with another gene-set file
        key = {"what": f"edit {name}", "pick": pick.tolist(), "edited_genes": [spots.genes[i] for i in idx]}
        compute = functools.partial(
            generate_patches,
            generator,
            edited,
            [spots.seeds[i] for i in pick],
            batch_size,
            f"edit {name}",
            sharded=True,
        )
        plan.patches[name] = cache(f"edit_{name}", key, compute)[0]
    return plan


def _score_edits(
    generator: Generator, probe: Probe, spots: EvaluationSpots, generated: np.ndarray, plan: _EditPlan, batch_size: int
) -> dict[str, Any]:
    """Directionality of the planned edits (:func:`_generate_edits`) on their spots, from their generated patches."""
    if not plan.picks:
        return {}

    def generated_edit(name: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        return plan.patches[name] if name in plan.patches else compute()

    return edit_directionality(
        generator,
        probe,
        spots.conditions,
        spots.expression,
        spots.genes,
        plan.scored["edits"],
        spots.seeds,
        generated,
        batch_size,
        generated_edit,
        plan.gene_sets,
        plan.picks,
        plan.scored["edit_min_shift"],
    )


def _check_probe_seeds(edits: EditSettings, probe: ProbeSettings, use_encoder_probe: bool) -> None:
    """Refuse ``edit_probe_seeds`` above 1 where the probe cannot be retrained with other seeds (before any patch is
    generated)."""
    if edits.probe_seeds == 1:
        return
    if probe.trained is not None:
        raise ValueError(
            f"edit_probe_seeds {edits.probe_seeds} retrains the evaluation's CNN probe with other seeds, but a trained "
            "probe was passed in (ProbeSettings.trained), which cannot be retrained; set edit_probe_seeds to 1."
        )
    if use_encoder_probe:
        raise ValueError(
            f"edit_probe_seeds {edits.probe_seeds} retrains the CNN probe with other seeds; the encoder probe (ridge "
            "regression on a pathology encoder's features) has no seed to vary. Set edit_probe_seeds to 1, or "
            "probe_type to 'cnn'."
        )


def _score_edits_with_probe_seeds(
    edit_result: dict[str, Any],
    generator: Generator,
    settings: ProbeSettings,
    spots: EvaluationSpots,
    generated: np.ndarray,
    plan: _EditPlan,
    num_probes: int,
    batch_size: int,
    patch_size: int,
    seed: int,
    device: str | torch.device,
) -> dict[str, Any]:
    """``edit_result`` with ``probe_seeds``: the same edited patches read by CNN probes trained with the seeds ``seed``
    (the evaluation's probe, whose result ``edit_result`` is) to ``seed + num_probes - 1``
    (:func:`probe_seed_summary`)."""
    if num_probes == 1 or not edit_result:
        return edit_result
    results, seeds = [edit_result], [int(seed)]
    for extra in range(int(seed) + 1, int(seed) + num_probes):
        logger.info("edit directionality: probe seed %d (%d of %d)", extra, len(seeds) + 1, num_probes)
        reader = _train_cnn_probe(settings, spots, patch_size, extra, device)
        results.append(_score_edits(generator, reader, spots, generated, plan, batch_size))
        seeds.append(extra)
    return {**edit_result, "probe_seeds": probe_seed_summary(results, seeds)}


def _settings_record(
    generator: Generator,
    spots: EvaluationSpots,
    data: DataSettings,
    output_dir: Path,
    seed: int,
    edits_scored: Mapping[str, Any],
    run: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``settings`` of ``metrics.json``: the dataset, generator, spots and edits, then ``run`` (probe, cache,
    extractors, device and the settings the caller records)."""
    info = dict(getattr(generator, "info", {}) or {})
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset_dir": str(spots.dataset_dir.resolve()),
        "output_dir": str(output_dir.resolve()),
        "iteration": info.get("iteration"),
        "num_inference_steps": getattr(generator, "num_inference_steps", None),
        "guidance_scale": getattr(generator, "guidance_scale", None),
        "seed": int(seed),
        "split": spots.split,
        "num_spots": len(spots.entries),
        "split_sizes": split_sizes(read_json(spots.dataset_dir / "datalist.json")),
        **edits_scored,
        "patch_fov_um": float(data.patch_fov_um),
        "patch_size": int(data.patch_size),
        "num_neighbors": int(data.num_neighbors),
        "num_genes": len(spots.genes),
        "labels": spots.label_source,
        **run,
    }


def _write_tables_and_figure(
    metrics: dict[str, Any], spots: EvaluationSpots, generated: np.ndarray, output: OutputSettings, seed: int
) -> list[Path]:
    """Write ``per_gene.csv`` and (unless ``figure_spots_per_label`` is 0) ``real_vs_generated.png``; record every
    output file in ``metrics["outputs"]`` and return the two files written."""
    output_dir = Path(output.output_dir)
    written = [write_per_gene_table(output_dir / "per_gene.csv", metrics["fidelity"])]
    outputs: dict[str, Any] = {
        "metrics": str((output_dir / "metrics.json").resolve()),
        "report": str((output_dir / "report.html").resolve()),
        "per_gene": str(written[0].resolve()),
        "real_vs_generated": None,
    }
    if int(output.figure_spots_per_label or 0) > 0:
        figure = write_real_vs_generated(
            output_dir / "real_vs_generated.png",
            spots.real,
            generated,
            spots.labels,
            output.figure_spots_per_label,
            seed,
        )
        written.append(Path(figure["path"]))
        outputs["real_vs_generated"] = str(Path(figure["path"]).resolve())
        outputs["real_vs_generated_rows"] = figure["rows"]
        outputs["real_vs_generated_spots"] = {k: [spots.spot_ids[i] for i in v] for k, v in figure["spots"].items()}
    metrics["outputs"] = outputs
    return written


def _write_outputs(
    metrics: dict[str, Any],
    spots: EvaluationSpots,
    generated: np.ndarray,
    captions: list[dict[str, Any]],
    output: OutputSettings,
    seed: int,
) -> None:
    """Write ``metrics.json``, ``report.html``, ``per_gene.csv`` and ``real_vs_generated.png`` to the output folder
    and, with a tracking URI, the MLflow run."""
    output_dir = Path(output.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / "metrics.json"
    report_path = output_dir / "report.html"
    run_name = output.run_name or "eval_" + time.strftime("%Y%m%d_%H%M%S")
    if output.tracking_uri:
        metrics["settings"]["mlflow"] = {
            "tracking_uri": output.tracking_uri,
            "experiment": output.experiment_name,
            "run_name": run_name,
        }
    extra_files = _write_tables_and_figure(metrics, spots, generated, output, seed)
    write_json_atomic(metrics_path, jsonable(metrics))
    write_report(report_path, metrics, spots.real, generated, captions, output.num_report_spots)
    if output.tracking_uri:
        run_id = log_evaluation(
            metrics, output.tracking_uri, output.experiment_name, run_name, [metrics_path, report_path, *extra_files]
        )
        metrics["settings"]["mlflow"]["run_id"] = run_id
        write_json_atomic(metrics_path, jsonable(metrics))
    logger.info(
        "evaluation written to %s (%s)", report_path, ", ".join(f"{k} {v:.3g}" for k, v in metrics["summary"].items())
    )


def evaluate(
    generator: Generator,
    data: DataSettings,
    output: OutputSettings,
    generation: GenerationSettings | None = None,
    probe: ProbeSettings | None = None,
    realism: RealismSettings | None = None,
    edits: EditSettings | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Evaluate ``generator`` on the spots of the dataset's ``data.split`` (validation or test); write ``metrics.json``,
    ``report.html``, ``per_gene.csv``, ``real_vs_generated.png`` and an MLflow run.

    Missing Inception weights stop the run first (unless ``realism.require_inception`` is False), before patches are
    read or generated. See docs/evaluation.md for what is measured and how to read it.

    Args:
        generator: ``generator(condition, generator=[torch.Generator]) -> (B, 3, H, W)`` in [0, 1]; usually
            ``bundle.sampling.generation.load_pipeline(...)``.
        data: the dataset, the model's patches and the spots (:class:`DataSettings`).
        output: where the results go (:class:`OutputSettings`).
        generation: batch size and cache of the generated patches (None: the defaults).
        probe: the probe, given or trained here (None: the defaults).
        realism: FID/KID extractors and settings (None: the defaults).
        edits: edits scored for directionality (None: the defaults).
        seed: seed of the spot choice, per-spot generation seeds (``seed + index``), probe, clustering and KID.
        device: device of the probe and feature extractors.

    Returns:
        the metrics dictionary (also in ``<output_dir>/metrics.json``); under torchrun, an empty dictionary on ranks
        other than 0.
    """
    generation, probe = generation or GenerationSettings(), probe or ProbeSettings()
    realism, edits = realism or RealismSettings(), edits or EditSettings()
    laps = _Laps()
    extractors, use_encoder_probe = _prepare_extractors(realism, probe, device)
    _check_probe_seeds(edits, probe, use_encoder_probe)
    laps("load_extractors")
    spots = _load_spots(data, probe, _check_inputs(generator, data), seed)
    laps("load_real_patches")
    output_dir = Path(output.output_dir)
    cache = _patch_cache(spots, generation, output_dir)
    generated, cached = _generate_evaluated(generator, spots, generation, cache)
    laps("generate")
    edit_plan = _generate_edits(generator, spots, edits, generation.batch_size, cache, seed)
    laps("generate_edits")
    if rank() != 0:  # no collective follows: the other ranks need not wait for rank 0's scoring
        logger.info("rank %d: its patches are handed to rank 0, which scores them and writes the outputs", rank())
        return {}
    realism_result = _score_realism(spots, generated, extractors, realism, data, output_dir, seed)
    laps("realism")
    trained = _fit_probe(
        probe, spots, extractors, use_encoder_probe, realism.feature_batch_size, data.patch_size, seed, device
    )
    laps("train_probe")
    fidelity, compartments, captions, pred_real = _score_probe(trained, spots, generated, probe, seed)
    laps("fidelity")
    edit_result = _score_edits(generator, trained, spots, generated, edit_plan, generation.batch_size)
    if edit_result:
        readable = edit_readability(trained, pred_real, spots.expression, edit_result["edits"], probe.ceiling_threshold)
        for name, res in edit_result["edits"].items():
            res.update(readable[name])
    laps("edits")
    edit_result = _score_edits_with_probe_seeds(
        edit_result,
        generator,
        probe,
        spots,
        generated,
        edit_plan,
        edits.probe_seeds,
        generation.batch_size,
        data.patch_size,
        seed,
        device,
    )
    if edits.probe_seeds > 1:
        laps("edit_probe_seeds")
    run = {
        "probe_type": trained.kind,
        "ceiling_threshold": float(probe.ceiling_threshold),
        "top_genes": probe.top_genes,
        "generated_from_cache": bool(cached),
        "inception_weights": extractors.inception_weights,
        "encoders": sorted(extractors.encoders),
        "device": str(device),
        **jsonable(dict(output.record or {})),
    }
    record = _settings_record(generator, spots, data, output_dir, seed, edit_plan.scored, run)
    metrics: dict[str, Any] = {
        "settings": record,
        "realism": realism_result,
        "fidelity": fidelity,
        "probe": {"kind": trained.kind, **jsonable(trained.info), "classes": trained.classes},
        "compartments": compartments,
        "edits": edit_result,
        "timings": laps.total(),
    }
    metrics["summary"] = summary_numbers(metrics)
    _write_outputs(metrics, spots, generated, captions, output, seed)
    return metrics
