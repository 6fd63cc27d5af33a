"""The settings of an evaluation, one dataclass per part, and the reading of command-line booleans.

:func:`bundle.evaluation.runner.evaluate` takes a :class:`DataSettings` (which spots, at which field of view), a
:class:`GenerationSettings`, a :class:`ProbeSettings`, a :class:`RealismSettings`, an :class:`EditSettings` and an
:class:`OutputSettings`; ``configs/evaluate.json`` builds each one as a section of its ``evaluation`` entry from the
top-level keys (``num_eval_spots``, ``probe_epochs``, ``require_inception``, ...), so command-line overrides of those
keys keep working.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bundle.evaluation.edits import DEFAULT_EDITS, DEFAULT_MIN_SHIFT

if TYPE_CHECKING:
    from bundle.evaluation.image_realism import RealismExtractors
    from bundle.evaluation.probe import Probe

__all__ = [
    "as_bool",
    "EVAL_SPLITS",
    "DataSettings",
    "GenerationSettings",
    "ProbeSettings",
    "RealismSettings",
    "EditSettings",
    "OutputSettings",
]

PROBE_KINDS = ("auto", "cnn", "encoder")
EVAL_SPLITS = ("validation", "test")
"""The datalist splits an evaluation may score (the probe always learns from ``"training"``)."""


def as_bool(value: Any, name: str) -> bool:
    """``value`` as a bool; command-line strings such as ``false``/``true``/``0``/``1`` are read as what they say.

    ``python -m monai.bundle run ... --require_inception false`` passes the string ``'false'``, which Python would
    take as True.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("false", "0", "no", "off", "none", "null", ""):
            return False
        if text in ("true", "1", "yes", "on"):
            return True
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return bool(value)


@dataclass
class DataSettings:
    """Which spots are evaluated, and how their patches, conditions and labels are read.

    Attributes:
        dataset_dir: prepared dataset folder (``datalist.json``, ``expression.npy``, ``gene_panel.json``).
        patch_fov_um: field of view of the model's patches (µm).
        patch_size: size of the model's patches (px); the generator's output size must match.
        num_neighbors: neighbour spots in the condition (the checkpoint's ``num_neighbors``; 0 for none).
        genes: the model's gene panel; must equal the dataset's (checked). None: the dataset's panel.
        wsi_backend: slide reader (None: the best available).
        num_spots: spots of ``split`` to evaluate (a seeded choice; None: all).
        labels: ``"auto"``, ``"ground_truth"`` or ``"clusters"`` (see :func:`bundle.evaluation.labels.spot_labels`).
        num_clusters: clusters when labels come from expression.
        split: the datalist split scored, ``"validation"`` or ``"test"`` (:data:`EVAL_SPLITS`; ``eval_split`` in
            ``configs/evaluate.json``). The probe and the clusters are fitted on ``"training"`` either way.
    """

    dataset_dir: str | os.PathLike
    patch_fov_um: float
    patch_size: int
    num_neighbors: int
    genes: Sequence[str] | None = None
    wsi_backend: str | None = None
    num_spots: int | None = None
    labels: str = "auto"
    num_clusters: int = 6
    split: str = "validation"

    def __post_init__(self) -> None:
        if self.split not in EVAL_SPLITS:
            allowed = ", ".join(repr(s) for s in EVAL_SPLITS)
            raise ValueError(
                f"eval_split must be one of {allowed} (the datalist.json split to score; the probe learns from "
                f"'training'), got {self.split!r}."
            )


@dataclass
class GenerationSettings:
    """How the patches of the evaluated (and edited) spots are generated and cached.

    Attributes:
        batch_size: conditions per generator call.
        regenerate: generate again even when cached patches for the same key exist (``"false"``/``"true"`` read as
            booleans).
        cache_key: what identifies the generator (checkpoints, steps, guidance) for the cache; None: no cache.
    """

    batch_size: int = 16
    regenerate: bool = False
    cache_key: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        self.regenerate = as_bool(self.regenerate, "regenerate")


@dataclass
class ProbeSettings:
    """The probe that reads expression and labels from patches.

    Attributes:
        trained: an already trained probe (e.g. to score several models with one probe); None trains one.
        kind: ``"auto"`` (encoder probe when an encoder is loaded, else the CNN), ``"cnn"`` or ``"encoder"``.
        epochs: CNN probe epochs.
        batch_size: CNN probe batch size.
        learning_rate: CNN probe peak learning rate.
        width: CNN probe width.
        image_size: probe input size (None: the patch size, capped at 128 px).
        max_train_spots: training spots for the probe (seeded choice; None: all).
        ceiling_threshold: genes with ceiling r above it are summarised separately.
        top_genes: N of the top-gene summaries: mean r over the N genes with the highest ceiling r and over the N most
            variable genes of the evaluated spots (:func:`bundle.evaluation.fidelity.top_gene_summary`).
    """

    trained: Probe | None = None
    kind: str = "auto"
    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 2e-3
    width: int = 16
    image_size: int | None = None
    max_train_spots: int | None = 4000
    ceiling_threshold: float = 0.3
    top_genes: int = 50

    def __post_init__(self) -> None:
        if self.kind not in PROBE_KINDS:
            raise ValueError(f"probe_type must be 'auto', 'cnn' or 'encoder', got {self.kind!r}.")
        if int(self.top_genes) < 1:
            raise ValueError(f"top_genes must be at least 1 (genes in each top-gene summary), got {self.top_genes}.")
        self.top_genes = int(self.top_genes)

    def input_size(self, patch_size: int) -> int:
        """Side of the patches the probe sees: ``image_size``, or the patch size capped at 128 px."""
        return int(self.image_size) if self.image_size else min(int(patch_size), 128)


@dataclass
class RealismSettings:
    """FID/KID: the feature extractors and the metric settings.

    Attributes:
        extractors: pre-loaded extractors (:func:`bundle.evaluation.image_realism.load_realism_extractors`); None
            loads them from the next three settings.
        inception_weights: Inception weights file (None: torch hub cache).
        require_inception: stop when the Inception weights are missing (False: skip realism with Inception).
        encoder_path: a pathology encoder (weights or TorchScript) for ``fid_<name>`` and the encoder probe.
        feature_batch_size: batch size of feature extraction.
        kid_subset_size: KID subset size (capped by the number of spots).
        kid_subsets: KID subsets.
        min_group_size: smallest group with per-group FID/KID.
        fid_method: ``"pytorch-fid"`` or ``"eigh"`` (faster on a CPU), see
            :func:`bundle.evaluation.metrics.frechet_distance_from_statistics`.
    """

    extractors: RealismExtractors | None = None
    inception_weights: str | os.PathLike | None = None
    require_inception: bool = True
    encoder_path: str | os.PathLike | None = None
    feature_batch_size: int = 32
    kid_subset_size: int = 100
    kid_subsets: int = 100
    min_group_size: int = 10
    fid_method: str = "pytorch-fid"


@dataclass
class EditSettings:
    """Edit directionality.

    Attributes:
        edits: edits scored (``immune*4``, ``hypoxia*0``, ...; None or empty: skip).
        num_spots: spots per edit: a seeded choice among the evaluated spots the edit acts on
            (:func:`bundle.evaluation.edits.edit_spots`).
        min_shift: an edit acts on a spot when it moves the edited genes of the spot's own expression by at least
            this much on average (log1p-normalised units; :data:`bundle.evaluation.edits.DEFAULT_MIN_SHIFT`).
        gene_sets: the named gene sets the edits may use, ``{"name": ["GENE", ...]}``; None: the built-in sets
            (:func:`bundle.sampling.edits.builtin_gene_sets`). ``configs/evaluate.json`` passes
            ``bundle.sampling.generation.load_gene_sets(@gene_sets_file)``: the built-in sets plus, overriding them,
            those of ``gene_sets_file``.
        probe_seeds: probes reading the edits: 1 scores them with the evaluation's probe only; K > 1 also trains the
            CNN probe with the seeds ``seed + 1 ... seed + K - 1`` on the same real patches and reports each edit's
            rate under every probe, with their mean and range (:func:`bundle.evaluation.edits.probe_seed_summary`).
            The probe's seed moves a rate as much as the choice of spots does.
    """

    edits: Sequence[str] | None = DEFAULT_EDITS
    num_spots: int = 64
    gene_sets: Mapping[str, Sequence[str]] | None = None
    min_shift: float = DEFAULT_MIN_SHIFT
    probe_seeds: int = 1

    def __post_init__(self) -> None:
        count = self.probe_seeds  # the command line may give "5"; a config, 5.0
        if isinstance(count, str) and count.strip().isdigit():
            count = int(count)
        elif isinstance(count, float) and count.is_integer():
            count = int(count)
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
            raise ValueError(
                f"edit_probe_seeds must be a whole number of at least 1 (probes that read the edits; 1: the "
                f"evaluation's own probe only), got {self.probe_seeds!r}."
            )
        self.probe_seeds = int(count)


@dataclass
class OutputSettings:
    """Where the results go: ``metrics.json``, ``report.html``, the caches and an MLflow run.

    Attributes:
        output_dir: folder for ``metrics.json``, ``report.html``, ``per_gene.csv``, ``real_vs_generated.png``,
            ``generated/`` and ``feature_cache/``.
        num_report_spots: spots shown side by side in the report.
        figure_spots_per_label: spots per label in ``real_vs_generated.png`` (0: no figure).
        tracking_uri: MLflow tracking URI (None: no MLflow run).
        experiment_name: MLflow experiment.
        run_name: MLflow run name (None: ``eval_<time>``).
        record: more settings to record in ``metrics.json`` (checkpoint paths, scheduler, prediction type).
    """

    output_dir: str | os.PathLike
    num_report_spots: int = 24
    figure_spots_per_label: int = 4
    tracking_uri: str | None = None
    experiment_name: str = "st_ldm"
    run_name: str | None = None
    record: Mapping[str, Any] | None = None
