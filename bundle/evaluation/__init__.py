"""Evaluation of a trained expression-to-tissue model on a prepared dataset's validation (or test) split.

``configs/evaluate.json`` calls :func:`evaluate`, which, for every spot of the scored split (``eval_split``:
``validation`` or ``test``; or a seeded subset of them):

1. **generates** a patch from the spot's expression (seed ``seed + index of the spot in the split's list``, so a
   spot gets the same patch in any run and any subset) and loads the real patch of the spot at the model's field of
   view and size. Generated patches are cached in ``<eval_dir>/generated/`` under a key of the checkpoints (path,
   size, modification time), sampler settings and spots; a rerun reuses them unless ``regenerate`` is set;
2. measures **realism**: FID and KID between the real and the generated patches in Inception features,
   overall and per group (the spots' compartment or expression cluster), and in the features of any user-supplied
   pathology encoder (``fid_<encoder name>``). Reference features of the real patches are cached per dataset;
3. measures **biological fidelity** with a probe trained on real training patches only: its per-gene Pearson r on
   real patches of the evaluated spots is the ceiling, its r on the generated patches (against the expression that conditioned
   them) the fidelity; a classification head gives compartment agreement; edits (``immune*4``, ``hypoxia*0``, ...)
   check that the probe's reading of the edited genes moves the way the edit asked;
4. writes ``metrics.json``, a self-contained ``report.html``, ``per_gene.csv``, the figure ``real_vs_generated.png``
   and an MLflow run (experiment ``st_ldm``).

Modules, one job each:

* :mod:`~bundle.evaluation.settings`: the grouped settings of :func:`evaluate` (data, generation, probe, realism,
  edits, output), e.g. ``bundle.evaluation.settings.DataSettings``;
* :mod:`~bundle.evaluation.runner`: :func:`evaluate` and its steps;
* :mod:`~bundle.evaluation.spots`: the choice of spots, their real patches and conditions;
* :mod:`~bundle.evaluation.generation`: the generated patches and their cache;
* :mod:`~bundle.evaluation.labels`: compartment or cluster labels of the spots;
* :mod:`~bundle.evaluation.probe`: the image-to-expression probe;
* :mod:`~bundle.evaluation.fidelity`: per-gene ceiling and fidelity r;
* :mod:`~bundle.evaluation.compartments`: compartment agreement;
* :mod:`~bundle.evaluation.edits`: edit directionality;
* :mod:`~bundle.evaluation.image_realism`: FID/KID of the generated patches;
* :mod:`~bundle.evaluation.extractors`: the FID Inception (offline) and user encoders;
* :mod:`~bundle.evaluation.features`: feature extraction and the reference-feature cache;
* :mod:`~bundle.evaluation.metrics`: the FID and KID maths;
* :mod:`~bundle.evaluation.report`: the HTML report;
* :mod:`~bundle.evaluation.figure`: the figure of real and generated patches grouped by label;
* :mod:`~bundle.evaluation.tracking`: the MLflow run.

scikit-learn, scipy, pytorch-fid, PIL and mlflow are imported inside the functions that use them.
"""

from __future__ import annotations

from bundle.evaluation.compartments import compartment_agreement
from bundle.evaluation.edits import (
    DEFAULT_EDITS,
    DEFAULT_MIN_SHIFT,
    edit_directionality,
    edit_readability,
    edit_spots,
    probe_seed_summary,
    usable_edits,
)
from bundle.evaluation.fidelity import pearson_per_column, probe_scores, top_gene_summary, write_per_gene_table
from bundle.evaluation.figure import figure_spots, write_real_vs_generated
from bundle.evaluation.generation import checkpoint_fingerprint, generate_patches
from bundle.evaluation.image_realism import RealismExtractors, load_realism_extractors, realism
from bundle.evaluation.labels import expression_clusters, ground_truth_labels, spot_labels
from bundle.evaluation.probe import Probe, train_encoder_probe, train_probe
from bundle.evaluation.report import write_report
from bundle.evaluation.runner import evaluate
from bundle.evaluation.spots import load_conditions, load_real_patches, select_spots
from bundle.evaluation.tracking import log_to_mlflow

__all__ = [
    "DEFAULT_EDITS",
    "Probe",
    "RealismExtractors",
    "checkpoint_fingerprint",
    "select_spots",
    "load_real_patches",
    "load_conditions",
    "generate_patches",
    "ground_truth_labels",
    "expression_clusters",
    "spot_labels",
    "train_probe",
    "train_encoder_probe",
    "pearson_per_column",
    "probe_scores",
    "top_gene_summary",
    "write_per_gene_table",
    "figure_spots",
    "write_real_vs_generated",
    "compartment_agreement",
    "usable_edits",
    "edit_directionality",
    "edit_spots",
    "probe_seed_summary",
    "edit_readability",
    "DEFAULT_MIN_SHIFT",
    "load_realism_extractors",
    "realism",
    "write_report",
    "log_to_mlflow",
    "evaluate",
]
