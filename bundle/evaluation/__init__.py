"""Evaluation of a trained expression-to-tissue model on a prepared dataset's validation split.

``configs/evaluate.json`` calls :func:`evaluate`, which, for every validation spot (or a seeded subset of them):

1. **generates** a patch from the spot's expression (seed ``seed + index of the spot in the validation list``, so a
   spot gets the same patch in any run and any subset) and loads the real patch of the spot at the model's field of
   view and size. Generated patches are cached in ``<eval_dir>/generated/`` under a key of the checkpoints (path,
   size, modification time), sampler settings and spots; a rerun reuses them unless ``regenerate`` is set;
2. measures **realism** with :mod:`bundle.metrics`: FID and KID between the real and the generated validation
   patches in Inception features, overall and per group (the spots' compartment or expression cluster, see
   below), and in the features of any user-supplied pathology encoder (``fid_<encoder name>``). Reference features
   of the real patches are cached per dataset;
3. measures **biological fidelity** with a probe trained on real training patches only (a small MONAI ResNet
   trained from scratch, or ridge regression on a frozen encoder's features): its per-gene Pearson r on real
   validation patches is the ceiling, its r on the generated patches (against the expression that conditioned them)
   the fidelity; a classification head gives compartment agreement (does the generated patch look like the
   conditioning spot's compartment?); edits (``immune*4``, ``hypoxia*0``, ...) check that the probe's reading of
   the edited genes moves the way the edit asked;
4. writes ``metrics.json``, a self-contained ``report.html`` and an MLflow run (experiment ``st_ldm``).

Groups and classifier labels: the dominant compartment of the demo study's ``ground_truth.csv`` (found next to the
slides) when every spot has one, otherwise k-means clusters (``num_clusters``, ``random_state=seed``, 10 starts)
of the first 20 principal components of the log-normalised expression, both fitted on the training spots and
applied to the validation spots, so the same labels exist for training the classifier and for scoring.

Every generator is a callable with the pipeline's signature, ``generator(condition, generator=[torch.Generator])
-> (B, 3, H, W)`` in [0, 1], so an :class:`bundle.sampling.pipeline.ExpressionToTissuePipeline` and the oracle generators of
the tests go through the same code. scikit-learn, scipy and mlflow are imported inside the functions that use them.
"""

from __future__ import annotations

import base64
import csv
import datetime
import hashlib
import html
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bundle.utils import atomic_path, read_json, save_npy_atomic, write_json_atomic

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
    "compartment_agreement",
    "usable_edits",
    "edit_directionality",
    "load_realism_extractors",
    "realism",
    "write_report",
    "log_to_mlflow",
    "evaluate",
]

logger = logging.getLogger(__name__)

DEFAULT_EDITS: tuple[str, ...] = ("immune*4", "stroma*4", "tumour*4", "hypoxia*0", "immune*0")
"""Edits scored by default: raise three programmes four-fold, silence two."""

Generator = Callable[..., torch.Tensor]


# --- spots, patches, conditions -----------------------------------------------------------------------------------


def select_spots(
    dataset_dir: str | os.PathLike, split: str = "validation", num: int | None = None, seed: int = 0
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The entries of ``split`` in the dataset's ``datalist.json`` and their indices in that list.

    Args:
        dataset_dir: prepared dataset folder.
        split: ``"training"``, ``"validation"`` or ``"test"``.
        num: number of spots; None (or at least the split's size) takes them all, otherwise a seeded choice,
            returned in list order.
        seed: seed of the choice.
    """
    path = Path(dataset_dir) / "datalist.json"
    datalist = read_json(path)
    entries = datalist.get(split) if isinstance(datalist, dict) else None
    if not entries:
        raise ValueError(
            f"{str(path)!r} has no {split!r} spots; prepare the dataset with a manifest that puts at least one sample "
            f"in that split (scripts/prepare_dataset.py)."
        )
    index = np.arange(len(entries))
    if num is not None:
        if int(num) < 1:
            raise ValueError(f"the number of spots must be >= 1 or None (all), got {num}.")
        if int(num) < len(entries):
            index = np.sort(np.random.default_rng(seed).choice(len(entries), size=int(num), replace=False))
    return [dict(entries[i]) for i in index], index


def load_real_patches(
    entries: Sequence[Mapping[str, Any]],
    fov_um: float,
    size: int,
    backend: str | None = None,
    output_size: int | None = None,
) -> np.ndarray:
    """Real patches of ``entries`` as ``(N, 3, S, S)`` uint8, read like training does (:class:`LoadWSIPatchd`).

    Args:
        entries: datalist entries (``image``, ``location``, ``mpp``).
        fov_um: field of view in micrometres.
        size: patch size in pixels.
        backend: slide reader (None: the best available).
        output_size: downsample each patch to this size (area average) as it is read, to keep memory low.
    """
    from bundle.io.slides import default_backend
    from bundle.transforms import LoadWSIPatchd

    loader = LoadWSIPatchd(keys="image", fov_um=fov_um, size=size, backend=backend or default_backend())
    out_size = int(output_size or size)
    out = np.empty((len(entries), 3, out_size, out_size), np.uint8)
    for i, entry in enumerate(entries):
        patch = torch.as_tensor(loader({k: entry[k] for k in ("image", "location", "mpp")})["image"]).float()
        out[i] = resize_images(patch[None] / 255.0, out_size)[0]
    return out


def resize_images(images: torch.Tensor | np.ndarray, size: int | None) -> np.ndarray:
    """``(N, 3, H, W)`` images (float in [0, 1] or uint8) to uint8 at ``size`` (area average; None keeps the size)."""
    x = torch.as_tensor(images)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()


def load_conditions(
    entries: Sequence[Mapping[str, Any]], expression_store: str | os.PathLike, num_neighbors: int
) -> tuple[np.ndarray, np.ndarray]:
    """The conditions of ``entries`` as configs/train.json builds them, and the spots' own expression.

    Returns:
        ``(conditions, expression)``: ``(N, 1 + K, G)`` (``SpatialContextd``; ``(N, G)`` when ``num_neighbors`` is
        0) and ``(N, G)``, float32.
    """
    from bundle.transforms import LoadExpressiond, SpatialContextd

    load = LoadExpressiond(keys="expression", store=expression_store)
    context = (
        SpatialContextd(keys="expression", store=expression_store, num_neighbors=num_neighbors)
        if num_neighbors
        else None
    )
    conditions, expression = [], []
    for entry in entries:
        item = load({"expression": entry["expression"], "neighbors": entry.get("neighbors", [])})
        expression.append(torch.as_tensor(item["expression"]).float().numpy())
        if context is not None:
            item = context(item)
        conditions.append(torch.as_tensor(item["expression"]).float().numpy())
    return np.stack(conditions).astype(np.float32), np.stack(expression).astype(np.float32)


def checkpoint_fingerprint(*paths: str | os.PathLike | None) -> list[dict[str, Any]]:
    """Path, size and modification time of each file: a cache key part that changes when a checkpoint is rewritten."""
    out = []
    for path in paths:
        if path is None:
            continue
        p = Path(path)
        stat = p.stat() if p.is_file() else None
        out.append(
            {
                "path": str(p.resolve()),
                "size": stat.st_size if stat else None,
                "mtime_ns": stat.st_mtime_ns if stat else None,
            }
        )
    return out


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


def _key_hash(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _cached_array(
    cache_dir: str | os.PathLike | None,
    name: str,
    key: Mapping[str, Any] | None,
    compute: Callable[[], np.ndarray],
    regenerate: bool,
) -> tuple[np.ndarray, bool]:
    """``compute()`` cached as ``<cache_dir>/<name>-<hash of key>.npy`` (and ``.json``, the key).

    Returns:
        the array and whether it came from the cache.
    """
    if cache_dir is None or key is None:
        return compute(), False
    path = Path(cache_dir) / f"{_safe_name(name)}-{_key_hash(key)}.npy"
    if path.is_file() and not regenerate:
        try:
            return np.load(path), True
        except (OSError, ValueError) as err:
            logger.warning("ignoring the unreadable cache file %s (%s); generating again", path, err)
    array = compute()
    save_npy_atomic(path, array)
    write_json_atomic(path.with_suffix(".json"), dict(key))
    return array, False


def generate_patches(
    generator: Generator,
    conditions: np.ndarray | torch.Tensor,
    seeds: Sequence[int],
    batch_size: int = 16,
    desc: str = "generating",
) -> np.ndarray:
    """Run ``generator`` over ``conditions`` in batches with one seeded ``torch.Generator`` per spot.

    Args:
        generator: callable ``generator(condition, generator=[torch.Generator]) -> (B, 3, H, W)`` in [0, 1]
            (an :class:`bundle.sampling.pipeline.ExpressionToTissuePipeline` or any stand-in).
        conditions: ``(N, ...)`` conditions.
        seeds: one seed per spot; a spot's patch depends on its own seed only.
        batch_size: spots per call.
        desc: what the log lines call this run.

    Returns:
        ``(N, 3, H, W)`` uint8.
    """
    from bundle.sampling.pipeline import seeded_generators

    conditions = torch.as_tensor(np.asarray(conditions), dtype=torch.float32)
    if len(seeds) != len(conditions):
        raise ValueError(f"got {len(seeds)} seeds for {len(conditions)} conditions; pass one seed per spot.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    out: list[np.ndarray] = []
    start = time.perf_counter()
    for lo in range(0, len(conditions), batch_size):
        hi = min(lo + batch_size, len(conditions))
        images = generator(conditions[lo:hi], generator=seeded_generators(seeds[lo:hi]))
        images = torch.as_tensor(images).detach().float().cpu()
        if images.ndim != 4 or images.shape[0] != hi - lo or images.shape[1] != 3:
            raise ValueError(
                f"the generator returned {tuple(images.shape)} for {hi - lo} conditions; it must return (B, 3, H, W) "
                "images in [0, 1]."
            )
        out.append(resize_images(images, None))
        logger.info("%s: %d/%d patches (%.1f s)", desc, hi, len(conditions), time.perf_counter() - start)
    return np.concatenate(out)


# --- labels -----------------------------------------------------------------------------------------------------


def ground_truth_labels(entries: Sequence[Mapping[str, Any]], column: str = "dominant") -> list[str] | None:
    """The demo study's per-spot ``dominant`` compartment, read from ``ground_truth.csv`` next to each slide.

    Returns None (and logs why) unless every entry's slide folder has the file and it lists the entry's barcode.
    """
    tables: dict[Path, dict[str, str] | None] = {}
    labels = []
    for entry in entries:
        folder = Path(entry["image"]).parent
        if folder not in tables:
            path = folder / "ground_truth.csv"
            if not path.is_file():
                tables[folder] = None
            else:
                with path.open(newline="") as f:
                    reader = csv.DictReader(f)
                    if not reader.fieldnames or column not in reader.fieldnames or "barcode" not in reader.fieldnames:
                        tables[folder] = None
                    else:
                        tables[folder] = {row["barcode"]: row[column] for row in reader}
        table = tables[folder]
        if table is None:
            logger.info(
                "no ground_truth.csv with a %r column next to %s: labels come from expression clusters",
                column,
                entry["image"],
            )
            return None
        label = table.get(str(entry.get("barcode")))
        if label is None:
            logger.info(
                "ground_truth.csv next to %s lacks the barcode %s: labels come from expression clusters",
                entry["image"],
                entry.get("barcode"),
            )
            return None
        labels.append(label)
    return labels


def expression_clusters(
    train_expression: np.ndarray, other_expression: np.ndarray, num_clusters: int = 6, seed: int = 0, num_pcs: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """k-means clusters of log-normalised expression: fitted on the training spots, applied to the others.

    PCA (``num_pcs`` components, full SVD) and k-means (``random_state=seed``, 10 starts) are both fitted on
    ``train_expression`` so the labels are deterministic and mean the same for both sets. Cluster ``0`` is the largest.

    Returns:
        integer labels of the training spots and of the other spots.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    train = np.asarray(train_expression, np.float64)
    other = np.asarray(other_expression, np.float64)
    if len(train) < num_clusters:
        raise ValueError(f"{len(train)} training spots cannot make {num_clusters} clusters; lower num_clusters.")
    n_pcs = max(1, min(num_pcs, train.shape[1], len(train) - 1))
    pca = PCA(n_components=n_pcs, svd_solver="full", random_state=seed).fit(train)
    kmeans = KMeans(n_clusters=num_clusters, n_init=10, random_state=seed).fit(pca.transform(train))
    train_labels = kmeans.labels_
    order = np.argsort(-np.bincount(train_labels, minlength=num_clusters), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(num_clusters)
    return rank[train_labels], rank[kmeans.predict(pca.transform(other))]


def spot_labels(
    train_entries: Sequence[Mapping[str, Any]],
    eval_entries: Sequence[Mapping[str, Any]],
    train_expression: np.ndarray,
    eval_expression: np.ndarray,
    source: str = "auto",
    num_clusters: int = 6,
    seed: int = 0,
) -> tuple[list[str], list[str], str]:
    """Labels of the training and evaluated spots, and a sentence saying where they come from.

    Args:
        source: ``"auto"`` (ground truth when every spot has one, else clusters), ``"ground_truth"`` or ``"clusters"``.
    """
    if source not in ("auto", "ground_truth", "clusters"):
        raise ValueError(f"labels must be 'auto', 'ground_truth' or 'clusters', got {source!r}.")
    if source in ("auto", "ground_truth"):
        train = ground_truth_labels(train_entries)
        other = ground_truth_labels(eval_entries) if train is not None else None
        if train is not None and other is not None:
            return train, other, "dominant ground-truth compartment (ground_truth.csv next to the slides)"
        if source == "ground_truth":
            raise FileNotFoundError(
                "labels='ground_truth' needs a ground_truth.csv with barcode and dominant columns next to every slide "
                "(the demo study has them); use labels='auto' or 'clusters' for other data."
            )
    train_c, other_c = expression_clusters(train_expression, eval_expression, num_clusters=num_clusters, seed=seed)
    how = (
        f"expression cluster (k-means, k={num_clusters}, seed {seed}, on the first 20 principal components of the "
        "training spots' log-normalised expression)"
    )
    return [f"cluster_{c}" for c in train_c], [f"cluster_{c}" for c in other_c], how


# --- probe ------------------------------------------------------------------------------------------------------


@dataclass
class Probe:
    """An image-to-expression regressor (and optional compartment classifier) trained on real training patches.

    ``predict(images)`` takes ``(N, 3, H, W)`` uint8 (or float in [0, 1]) patches and returns the predicted
    expression, standardised per gene with the training mean and standard deviation, and the predicted label
    index (or None without a classifier).

    Attributes:
        kind: ``"cnn"`` (small MONAI ResNet trained from scratch) or ``"encoder:<name>"`` (ridge regression on frozen
            encoder features).
        genes: the panel, in output order.
        classes: label names (index = predicted label), empty without a classifier.
        mean: training mean of the expression per gene (log-normalised units).
        std: training standard deviation per gene.
        image_size: patches are resized to this before prediction (None: as given).
        predictor: ``images float (N, 3, H, W) -> (expression (N, G), label logits (N, C) or None)``.
        info: training details (epochs, spots, loss, time).
    """

    kind: str
    genes: list[str]
    classes: list[str]
    mean: np.ndarray
    std: np.ndarray
    image_size: int | None
    predictor: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray | None]]
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray | None]:
        """Standardised expression ``(N, G)`` and label indices ``(N,)`` (None without classes) for ``images``."""
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        exprs, labels = [], []
        for lo in range(0, len(x), batch_size):
            batch = torch.as_tensor(resize_images(x[lo : lo + batch_size], self.image_size)).float() / 255.0
            e, logits = self.predictor(batch)
            exprs.append(np.asarray(e, np.float32))
            if logits is not None:
                labels.append(np.asarray(logits).argmax(axis=1))
        expression = np.concatenate(exprs) if exprs else np.zeros((0, len(self.genes)), np.float32)
        return expression, (np.concatenate(labels) if labels and self.classes else None)


def _standardise(expression: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = expression.mean(axis=0)
    std = expression.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)
    return ((expression - mean) / std).astype(np.float32), mean.astype(np.float32), std.astype(np.float32)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations, drawn per patch (the dihedral group; H&E has no orientation)."""
    k = torch.randint(0, 4, (x.shape[0],), generator=generator)
    flip = torch.randint(0, 2, (x.shape[0],), generator=generator).bool()
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        xi = torch.rot90(x[i], int(k[i]), dims=(1, 2))
        out[i] = torch.flip(xi, dims=(2,)) if flip[i] else xi
    return out


def probe_network(num_outputs: int, width: int = 16, stem_stride: int = 1) -> nn.Module:
    """The probe CNN: a 2D MONAI ``ResNet`` with one basic block per stage, widths ``width * (1, 2, 4, 8)``.

    A 3x3 stem (stride ``stem_stride``) then max pooling; the head is one linear layer with ``num_outputs`` = genes +
    classes. :func:`train_probe` uses stride 2 for patches above 32 px (on the demo's 64-px patches, as accurate as
    stride 1 at a third of the cost).
    """
    from monai.networks.nets import ResNet

    return ResNet(
        block="basic",
        layers=[1, 1, 1, 1],
        block_inplanes=[width, 2 * width, 4 * width, 8 * width],
        spatial_dims=2,
        n_input_channels=3,
        conv1_t_size=3,
        conv1_t_stride=stem_stride,
        num_classes=num_outputs,
    )


def train_probe(
    images: np.ndarray,
    expression: np.ndarray,
    genes: Sequence[str],
    labels: Sequence[str] | None = None,
    epochs: int = 12,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    width: int = 16,
    image_size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Probe:
    """Train the probe CNN from scratch on real training patches: expression regression plus label classification.

    The loss is the mean squared error of the standardised expression plus the cross-entropy of the labels (when
    given). Augmentation: random flips and 90-degree rotations. AdamW with a cosine schedule; the global RNG is left
    as it was (weights and batches come from ``seed``).

    Args:
        images: ``(N, 3, H, W)`` uint8 real training patches.
        expression: ``(N, G)`` log-normalised expression of the same spots.
        genes: panel names.
        labels: ``N`` label names (compartment or cluster), or None for regression only.
        epochs: passes over the patches.
        batch_size: patches per step.
        learning_rate: peak learning rate.
        width: channels of the first ResNet stage.
        image_size: resize patches to this size first (None: as given).
        seed: seed of the weights, batch order and augmentation.
        device: where to train.
    """
    if len(images) != len(expression):
        raise ValueError(
            f"{len(images)} training patches but {len(expression)} expression rows; pass one row per patch."
        )
    if len(images) < 2:
        raise ValueError(
            f"the probe needs at least 2 training patches, got {len(images)}; the dataset needs a training split."
        )
    device = torch.device(device)
    target, mean, std = _standardise(np.asarray(expression, np.float32))
    classes = sorted(set(labels)) if labels is not None else []
    label_idx = torch.as_tensor([classes.index(v) for v in labels], dtype=torch.long) if labels is not None else None
    x_all = torch.as_tensor(resize_images(images, image_size))
    y_all = torch.as_tensor(target)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        stem_stride = 2 if x_all.shape[-1] > 32 else 1
        net = probe_network(len(genes) + len(classes), width, stem_stride).to(device)
    rng = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, math.ceil(len(x_all) / batch_size))
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    total = max(1, epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )
    sample = x_all[: min(len(x_all), 512)].float() / 255.0
    pixel_mean = sample.mean(dim=(0, 2, 3), keepdim=True).to(device)
    pixel_std = sample.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3).to(device)
    net.train()
    losses = []
    for epoch in range(max(0, int(epochs))):
        order = torch.randperm(len(x_all), generator=rng)
        epoch_loss = 0.0
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            xb = _augment(x_all[idx].float() / 255.0, rng).to(device)
            out = net((xb - pixel_mean) / pixel_std)
            loss = torch.nn.functional.mse_loss(out[:, : len(genes)], y_all[idx].to(device))
            if label_idx is not None:
                loss = loss + torch.nn.functional.cross_entropy(out[:, len(genes) :], label_idx[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_loss += float(loss.detach()) * len(idx)
        losses.append(epoch_loss / len(x_all))
        logger.info("probe epoch %d/%d: loss %.4f", epoch + 1, epochs, losses[-1])
    net.eval()
    num_genes = len(genes)

    @torch.no_grad()
    def predictor(batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        out = net((batch.to(device) - pixel_mean) / pixel_std).float().cpu().numpy()
        return out[:, :num_genes], (out[:, num_genes:] if classes else None)

    info = {
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "learning_rate": float(learning_rate),
        "width": int(width),
        "train_spots": int(len(x_all)),
        "image_size": int(x_all.shape[-1]),
        "final_loss": losses[-1] if losses else None,
        "seconds": round(time.perf_counter() - start, 2),
        "network": (
            f"monai.networks.nets.ResNet(basic, layers [1, 1, 1, 1], widths {[width * m for m in (1, 2, 4, 8)]}, "
            f"3x3 stem stride {stem_stride})"
        ),
    }
    return Probe("cnn", list(genes), classes, mean, std, image_size, predictor, info)


def train_encoder_probe(
    extractor: Any,
    name: str,
    images: np.ndarray,
    expression: np.ndarray,
    genes: Sequence[str],
    labels: Sequence[str] | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> Probe:
    """Ridge regression (``RidgeCV``) and logistic regression on a frozen encoder's features of real training patches.

    Args:
        extractor: a :mod:`bundle.metrics` feature extractor (images in [0, 1] to ``(B, D)``).
        name: encoder name for the report.
        images: ``(N, 3, H, W)`` uint8 real training patches.
        expression: ``(N, G)`` log-normalised expression.
        genes: panel names.
        labels: label names or None.
        batch_size: feature-extraction batch size.
        seed: seed of the logistic regression.
    """
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    target, mean, std = _standardise(np.asarray(expression, np.float32))
    features = _features(extractor, images, batch_size)
    scaler = StandardScaler().fit(features)
    f_train = scaler.transform(features)
    ridge = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(f_train, target)
    classes = sorted(set(labels)) if labels is not None else []
    classifier = None
    if labels is not None and len(classes) > 1:
        classifier = LogisticRegression(max_iter=2000, random_state=seed).fit(
            f_train, [classes.index(v) for v in labels]
        )

    def predictor(batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        f = scaler.transform(_features(extractor, batch, batch_size))
        if classifier is not None:
            logits = np.full((len(f), len(classes)), -np.inf)
            logits[:, classifier.classes_] = classifier.predict_log_proba(f)
        elif classes:
            logits = np.zeros((len(f), 1))
        else:
            logits = None
        return ridge.predict(f).astype(np.float32), logits

    info = {
        "train_spots": int(len(images)),
        "alpha": float(ridge.alpha_),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return Probe(f"encoder:{name}", list(genes), classes, mean, std, None, predictor, info)


def _features(extractor: Any, images: np.ndarray | torch.Tensor, batch_size: int, chunk: int = 256) -> np.ndarray:
    """Features of uint8 (or [0, 1] float) images through ``bundle.evaluation.metrics.extract_features``, a chunk at a time."""
    from bundle.evaluation.metrics import extract_features

    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    parts = []
    for lo in range(0, len(x), chunk):
        part = x[lo : lo + chunk]
        parts.append(np.asarray(extract_features(extractor, part, batch_size=batch_size), np.float64))
    return np.concatenate(parts) if parts else np.zeros((0, 0))


# --- scores -----------------------------------------------------------------------------------------------------


def pearson_per_column(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r between matching columns of ``(N, G)`` arrays; NaN where a column is constant."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cannot correlate arrays of shapes {a.shape} and {b.shape}.")
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / denom
    return np.where(denom > 1e-12, r, np.nan)


def _nanmean(values: np.ndarray) -> float | None:
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return float(a / b) if a is not None and b is not None and abs(b) > 1e-12 else None


def probe_scores(
    probe: Probe,
    real_images: np.ndarray,
    generated_images: np.ndarray,
    expression: np.ndarray,
    threshold: float = 0.3,
    num_permutations: int = 200,
    seed: int = 0,
    predictions: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Per-gene Pearson r of the probe on real (ceiling) and generated (fidelity) patches of the evaluated spots.

    Args:
        probe: trained on real training patches.
        real_images: ``(N, 3, H, W)`` real patches of the spots.
        generated_images: ``(N, 3, H, W)`` patches generated from the spots' expression.
        expression: ``(N, G)`` the spots' log-normalised expression (the truth for both).
        threshold: genes whose ceiling r exceeds this are the "readable" genes of the second summary.
        num_permutations: permutations of the spot order for the p-value of the mean fidelity r.
        seed: seed of the permutations.
        predictions: the probe's expression predictions on (real, generated) when already computed.

    Returns:
        per-gene r lists (panel order) and the summaries ``ceiling_r_mean``, ``fidelity_r_mean``,
        ``fidelity_fraction`` (= fidelity / ceiling) and the same over genes with ceiling r > ``threshold``.
    """
    if predictions is None:
        pred_real, _ = probe.predict(real_images)
        pred_gen, _ = probe.predict(generated_images)
    else:
        pred_real, pred_gen = predictions
    truth = (np.asarray(expression, np.float32) - probe.mean) / probe.std
    ceiling = pearson_per_column(pred_real, truth)
    fidelity = pearson_per_column(pred_gen, truth)
    readable = np.isfinite(ceiling) & (ceiling > threshold)
    mean_fid = _nanmean(fidelity)
    rng = np.random.default_rng(seed)
    null = [_nanmean(pearson_per_column(pred_gen, truth[rng.permutation(len(truth))])) for _ in range(num_permutations)]
    null = np.asarray([v for v in null if v is not None])
    p_value = float((1 + np.sum(null >= mean_fid)) / (1 + len(null))) if mean_fid is not None and len(null) else None
    out = {
        "genes": list(probe.genes),
        "ceiling_r": [None if not np.isfinite(v) else float(v) for v in ceiling],
        "fidelity_r": [None if not np.isfinite(v) else float(v) for v in fidelity],
        "ceiling_r_mean": _nanmean(ceiling),
        "fidelity_r_mean": mean_fid,
        "threshold": float(threshold),
        "num_readable_genes": int(readable.sum()),
        "ceiling_r_mean_readable": _nanmean(ceiling[readable]),
        "fidelity_r_mean_readable": _nanmean(fidelity[readable]),
        "fidelity_p_value": p_value,
        "num_spots": int(len(truth)),
    }
    out["fidelity_fraction"] = _ratio(out["fidelity_r_mean"], out["ceiling_r_mean"])
    out["fidelity_fraction_readable"] = _ratio(out["fidelity_r_mean_readable"], out["ceiling_r_mean_readable"])
    return out


def _confusion(true: Sequence[int], pred: Sequence[int], num: int) -> list[list[int]]:
    matrix = np.zeros((num, num), np.int64)
    for t, p in zip(true, pred):
        matrix[t, p] += 1
    return matrix.tolist()


def compartment_agreement(
    classes: Sequence[str], labels: Sequence[str], real_pred: np.ndarray, generated_pred: np.ndarray
) -> dict[str, Any]:
    """How often the classifier gives the conditioning spot's label to its real and its generated patch.

    Args:
        classes: the classifier's label names (index = predicted value).
        labels: the evaluated spots' true labels (names); labels the classifier never saw count as misses.
        real_pred: predicted label indices of the real patches.
        generated_pred: predicted label indices of the generated patches.

    Returns:
        ``real_accuracy`` (the ceiling), ``generated_agreement``, ``chance`` (frequency of the most common true
        label), per-label counts and confusion matrices (rows: true label of the spot, columns: predicted label).
    """
    names = list(classes) + sorted(set(labels) - set(classes))
    index = {n: i for i, n in enumerate(names)}
    true = np.asarray([index[v] for v in labels])
    real_pred = np.asarray(real_pred)
    generated_pred = np.asarray(generated_pred)
    counts = np.bincount(true, minlength=len(names))
    per_class = {}
    for i, name in enumerate(names):
        mask = true == i
        if mask.any():
            per_class[name] = {
                "n": int(mask.sum()),
                "real_accuracy": float((real_pred[mask] == i).mean()),
                "generated_agreement": float((generated_pred[mask] == i).mean()),
            }
    return {
        "classes": names,
        "real_accuracy": float((real_pred == true).mean()),
        "generated_agreement": float((generated_pred == true).mean()),
        "chance": float(counts.max() / counts.sum()),
        "majority_label": names[int(counts.argmax())],
        "per_class": per_class,
        "confusion_real": _confusion(true, real_pred, len(names)),
        "confusion_generated": _confusion(true, generated_pred, len(names)),
        "num_spots": int(len(true)),
    }


def usable_edits(edits: Sequence[str], genes: Sequence[str]) -> list[str]:
    """The edits of ``edits`` that touch the panel; a named gene set without any panel gene is dropped with a log line.

    A target that is neither a panel gene nor a known gene set is an error (a typo), not dropped.
    """
    from bundle.sampling.edits import builtin_gene_sets, parse_edit, resolve_edit

    sets = builtin_gene_sets()
    kept = []
    for text in edits:
        edit = parse_edit(text)
        try:
            resolve_edit(edit, genes, sets)
        except ValueError:
            if edit.target in sets:
                logger.info(
                    "edit %s dropped: none of the genes of the set %r is in the %d-gene panel",
                    text,
                    edit.target,
                    len(genes),
                )
                continue
            raise
        kept.append(str(text))
    return kept


def edit_directionality(
    generator: Generator,
    probe: Probe,
    conditions: np.ndarray,
    expression: np.ndarray,
    genes: Sequence[str],
    edits: Sequence[str],
    seeds: Sequence[int],
    original_images: np.ndarray | None = None,
    batch_size: int = 16,
    cache: Callable[[str, Callable[[], np.ndarray]], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Does the probe read the edited genes moving the way each edit asked?

    For each spot and edit, the original and the edited condition are generated with the same seed; the probe
    predicts both, and the edit moved the tissue the right way when the mean predicted (standardised) expression of
    the edited genes changes in the edit's direction (:func:`bundle.sampling.edits.edit_direction`; a ``set`` edit's direction
    is taken against the spot's own mean of those genes). Spots where the edit leaves the condition unchanged (e.g.
    scaling genes with no counts) are skipped. The p-value is a one-sided sign test (``scipy.stats.binomtest``
    against 0.5).

    Args:
        generator: pipeline-like callable.
        probe: the probe.
        conditions: ``(N, ...)`` conditions of the spots.
        expression: ``(N, G)`` the spots' own expression (for the direction of ``set`` edits).
        genes: panel.
        edits: edit strings (already filtered with :func:`usable_edits`).
        seeds: one seed per spot.
        original_images: the unedited patches of these spots with these seeds, when already generated.
        batch_size: generation batch size.
        cache: optional ``cache(name, compute) -> array`` for the generated patches.
    """
    from scipy.stats import binomtest

    from bundle.sampling.edits import apply_edits, edit_direction, parse_edit, resolve_edit

    def run(name: str, cond: np.ndarray) -> np.ndarray:
        compute = lambda: generate_patches(generator, cond, seeds, batch_size, desc=f"edit {name}")  # noqa: E731
        return cache(name, compute) if cache is not None else compute()

    conditions = np.asarray(conditions, np.float32)
    if original_images is None:
        original_images = run("original", conditions)
    pred_orig, _ = probe.predict(original_images)
    results: dict[str, Any] = {}
    all_moved: list[bool] = []
    for text in edits:
        edit = parse_edit(text)
        idx = resolve_edit(edit, genes)
        edited = apply_edits(conditions, genes, [edit])
        changed = np.abs(edited - conditions).reshape(len(conditions), -1).max(axis=1) > 1e-6
        if edit.op == "scale":
            direction = np.full(len(conditions), edit_direction(edit))
        else:
            direction = np.asarray([edit_direction(edit, float(np.mean(e[idx]))) for e in expression])
        keep = changed & (direction != 0)
        if not keep.any():
            results[text] = {
                "genes": [genes[i] for i in idx],
                "n": 0,
                "skipped": int(len(conditions)),
                "fraction": None,
                "p_value": None,
            }
            logger.info("edit %s changes none of the %d spots' conditions: not scored", text, len(conditions))
            continue
        images = run(text, edited)
        pred_edit, _ = probe.predict(images)
        shift = (pred_edit[:, idx] - pred_orig[:, idx]).mean(axis=1)
        moved = (np.sign(shift) == direction) & keep
        k, n = int(moved[keep].sum()), int(keep.sum())
        all_moved.extend(moved[keep].tolist())
        results[text] = {
            "genes": [genes[i] for i in idx],
            "direction": int(direction[keep][0]) if len(set(direction[keep].tolist())) == 1 else "per spot",
            "n": n,
            "skipped": int(len(conditions) - n),
            "moved": k,
            "fraction": k / n,
            "mean_signed_shift": float((shift * direction)[keep].mean()),
            "p_value": float(binomtest(k, n, 0.5, alternative="greater").pvalue),
        }
    k_all, n_all = int(sum(all_moved)), len(all_moved)
    return {
        "edits": results,
        "overall_fraction": k_all / n_all if n_all else None,
        "overall_n": n_all,
        "overall_p_value": float(binomtest(k_all, n_all, 0.5, alternative="greater").pvalue) if n_all else None,
        "num_spots": int(len(conditions)),
    }


# --- realism ----------------------------------------------------------------------------------------------------


@dataclass
class RealismExtractors:
    """Feature extractors for realism, loaded before any expensive work.

    Attributes:
        inception: the Inception extractor, or None when it is skipped.
        inception_skipped: why Inception realism is not computed (and how to get the weights), or None.
        encoders: user-supplied encoders by name (``fid_<name>`` in the report).
    """

    inception: Any = None
    inception_skipped: str | None = None
    encoders: dict[str, Any] = field(default_factory=dict)
    inception_weights: str | None = None


def load_realism_extractors(
    inception_weights: str | os.PathLike | None = None,
    require_inception: bool = True,
    encoder_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    device: str | torch.device = "cpu",
) -> RealismExtractors:
    """Load the Inception extractor (and any encoders) first, so that missing weights stop a run before it starts.

    Args:
        inception_weights: path of ``pt_inception-2015-12-05-6726825d.pth``; None looks in torch's hub cache.
        require_inception: raise ``bundle.metrics``' FileNotFoundError (which says how to get the weights) when the
            weights are missing; False skips realism with Inception and records why.
        encoder_path: weights or TorchScript file(s) of pathology encoders.
        device: where features are computed.
    """
    from bundle.evaluation.metrics import load_feature_extractor

    require_inception = as_bool(require_inception, "require_inception")
    out = RealismExtractors()
    try:
        out.inception = load_feature_extractor("inception", weights=inception_weights, device=device)
        out.inception_weights = None if out.inception.weights_path is None else str(out.inception.weights_path)
    except FileNotFoundError as err:
        if require_inception:
            raise
        out.inception_skipped = (
            f"FID/KID with Inception not computed: {err} (require_inception is false, so the run went on without it; "
            "see docs/evaluation_metrics.md)"
        )
        logger.warning("%s", out.inception_skipped)
    paths = (
        []
        if encoder_path is None
        else [encoder_path] if isinstance(encoder_path, (str, os.PathLike)) else list(encoder_path)
    )
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"encoder_path {str(path)!r} does not exist; pass the encoder's weights or TorchScript file, or null."
            )
        extractor = load_feature_extractor(str(path), device=device)
        out.encoders[_safe_name(extractor.name)] = extractor
    return out


def realism(
    real_images: np.ndarray,
    generated_images: np.ndarray,
    groups: Sequence[str],
    extractors: RealismExtractors,
    cache_dir: str | os.PathLike | None = None,
    reference: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    kid_subset_size: int = 100,
    kid_subsets: int = 100,
    min_group_size: int = 10,
    seed: int = 0,
    fid_method: str = "pytorch-fid",
) -> dict[str, Any]:
    """FID / KID between real and generated patches in Inception (and encoder) features, overall and per group.

    Args:
        real_images: ``(N, 3, H, W)`` uint8 real patches.
        generated_images: ``(M, 3, H, W)`` uint8 generated patches.
        groups: one label per spot (the same spots on both sides), for the per-group metrics.
        extractors: from :func:`load_realism_extractors`.
        cache_dir: folder of the reference-feature cache (None: no cache).
        reference: ``{"dataset": folder, "spot_ids": [...], **extra}`` identifying the real patches; with
            ``cache_dir``, their features are cached with ``bundle.evaluation.metrics.cached_features`` under
            ``bundle.evaluation.metrics.feature_cache_key`` (dataset, spots, extractor weights, image size, extra).
        batch_size: feature-extraction batch size.
        kid_subset_size: KID subset size (capped at the smaller set).
        kid_subsets: KID subsets.
        min_group_size: smallest group (on both sides) with per-group metrics.
        seed: seed of the KID subsets.
        fid_method: ``"pytorch-fid"`` (its ``calculate_frechet_distance``, as papers report) or ``"eigh"`` (the same
            quantity from symmetric eigendecompositions, about 3x faster for 2048-d features on a CPU).

    Returns:
        ``{"inception": {...} | {"skipped": why}, "encoders": {name: {...}}}`` where each ``{...}`` is
        ``bundle.evaluation.metrics.realism_metrics``' output plus ``seconds``.
    """
    from bundle.evaluation.metrics import cached_features, feature_cache_key, realism_metrics

    groups = [str(g) for g in groups]

    def one(extractor: Any) -> dict[str, Any]:
        start = time.perf_counter()
        compute = lambda: _features(extractor, real_images, batch_size)  # noqa: E731
        if cache_dir is not None and reference is not None:
            extra = {k: v for k, v in reference.items() if k not in ("dataset", "spot_ids")}
            key = feature_cache_key(
                reference["dataset"], list(reference["spot_ids"]), extractor, int(real_images.shape[-1]), **extra
            )
            real_f = cached_features(cache_dir, key, compute)
        else:
            real_f = compute()
        fake_f = _features(extractor, generated_images, batch_size)
        result = realism_metrics(
            real_f,
            fake_f,
            groups,
            groups,
            kid_subset_size=kid_subset_size,
            kid_subsets=kid_subsets,
            min_group_size=min_group_size,
            seed=seed,
            fid_method=fid_method,
        )
        result = _jsonable(result)
        result["fid_method"] = fid_method
        result["seconds"] = round(time.perf_counter() - start, 2)
        return result

    out: dict[str, Any] = {"encoders": {}}
    if extractors.inception is not None:
        out["inception"] = one(extractors.inception)
    else:
        out["inception"] = {"skipped": extractors.inception_skipped or "no Inception extractor was loaded"}
    for name, extractor in extractors.encoders.items():
        out["encoders"][name] = one(extractor)
    return out


def _jsonable(value: Any) -> Any:
    """Numbers, lists and dicts only (numpy scalars and arrays converted, NaN/inf as None)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    return value


# --- reports ----------------------------------------------------------------------------------------------------


def summary_numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of ``metrics`` (the report's summary table and the MLflow metrics), None left out."""
    out: dict[str, Any] = {}
    real = metrics.get("realism", {})
    inception = real.get("inception", {})
    for key in ("fid", "kid_mean", "kid_std"):
        out[key] = inception.get(key)
    for name, res in real.get("encoders", {}).items():
        out[f"fid_{name}"] = res.get("fid")
        out[f"kid_mean_{name}"] = res.get("kid_mean")
    fid = metrics.get("fidelity", {})
    for key in (
        "ceiling_r_mean",
        "fidelity_r_mean",
        "fidelity_fraction",
        "ceiling_r_mean_readable",
        "fidelity_r_mean_readable",
        "fidelity_fraction_readable",
        "num_readable_genes",
        "fidelity_p_value",
    ):
        out[key] = fid.get(key)
    comp = metrics.get("compartments", {})
    out["compartment_real_accuracy"] = comp.get("real_accuracy")
    out["compartment_generated_agreement"] = comp.get("generated_agreement")
    out["compartment_chance"] = comp.get("chance")
    edits = metrics.get("edits", {})
    out["edit_directionality"] = edits.get("overall_fraction")
    out["edit_p_value"] = edits.get("overall_p_value")
    for name, res in edits.get("edits", {}).items():
        out[f"edit_{name}_fraction"] = res.get("fraction")
    out["num_spots"] = metrics.get("settings", {}).get("num_spots")
    return {
        k: float(v)
        for k, v in out.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
    }


_DESCRIPTIONS = {
    "fid": "Fréchet Inception distance, real vs generated validation patches (lower is better; 0 = same distribution)",
    "kid_mean": "kernel Inception distance (unbiased; about 0 when the two sets are alike)",
    "kid_std": "standard deviation of KID over subsets",
    "ceiling_r_mean": "probe's mean per-gene Pearson r on REAL validation patches: what the images can tell",
    "fidelity_r_mean": "same probe on GENERATED patches, against the expression that conditioned them",
    "fidelity_fraction": "fidelity r / ceiling r (1 = generated tissue carries as much expression signal as real)",
    "ceiling_r_mean_readable": "ceiling r over the genes the probe can read (ceiling r above the threshold)",
    "fidelity_r_mean_readable": "fidelity r over those genes",
    "fidelity_fraction_readable": "fidelity / ceiling over those genes",
    "num_readable_genes": "genes with ceiling r above the threshold",
    "fidelity_p_value": "permutation p-value of the mean fidelity r (spots shuffled)",
    "compartment_real_accuracy": "classifier accuracy on real validation patches (ceiling)",
    "compartment_generated_agreement": "generated patches labelled as the conditioning spot's compartment",
    "compartment_chance": "frequency of the most common label (always guessing it)",
    "edit_directionality": "edits whose probe reading moved the right way, all edits pooled (chance 0.5)",
    "edit_p_value": "one-sided sign test of the pooled directionality against 0.5",
    "num_spots": "validation spots evaluated",
}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return html.escape(str(value))


def _png_data_uri(image: np.ndarray) -> str:
    """A ``(3, H, W)`` uint8 image as a ``data:image/png;base64,...`` URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.asarray(image, np.uint8).transpose(1, 2, 0))).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _gene_bars_svg(genes: Sequence[str], ceiling: Sequence[float | None], fidelity: Sequence[float | None]) -> str:
    """Inline SVG: per gene (sorted by ceiling r), a grey bar for the ceiling and a coloured bar for the fidelity."""
    order = sorted(range(len(genes)), key=lambda i: -(ceiling[i] if ceiling[i] is not None else -2))
    row, label_w, bar_w = 16, 90, 300
    height = row * len(order) + 40
    zero = label_w + bar_w / 2
    parts = [
        f'<svg width="{label_w + bar_w + 120}" height="{height}" ' f'role="img" aria-label="per-gene Pearson r">',
        f'<line x1="{zero}" y1="20" x2="{zero}" y2="{height - 10}" stroke="#444" stroke-width="1"/>',
        f'<text x="{label_w}" y="12" font-size="10">r = -1</text><text x="{zero - 6}" y="12" font-size="10">0</text>'
        f'<text x="{label_w + bar_w - 20}" y="12" font-size="10">r = 1</text>',
    ]
    for k, i in enumerate(order):
        y = 22 + k * row
        parts.append(
            f'<text x="{label_w - 4}" y="{y + 10}" font-size="10" text-anchor="end">{html.escape(str(genes[i]))}</text>'
        )
        for j, (value, colour) in enumerate(((ceiling[i], "#9a9a9a"), (fidelity[i], "#c2185b"))):
            if value is None:
                continue
            w = abs(value) * bar_w / 2
            x = zero if value >= 0 else zero - w
            parts.append(
                f'<rect x="{x:.1f}" y="{y + j * 6}" width="{w:.1f}" height="6" fill="{colour}">'
                f"<title>{html.escape(str(genes[i]))} {('ceiling', 'generated')[j]} r = {value:.3f}</title></rect>"
            )
        c, f = ceiling[i], fidelity[i]
        parts.append(f'<text x="{label_w + bar_w + 6}" y="{y + 10}" font-size="10">{_fmt(c, 2)} / {_fmt(f, 2)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _confusion_html(names: Sequence[str], matrix: Sequence[Sequence[int]], caption: str) -> str:
    matrix = np.asarray(matrix)
    rows = []
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    for i, name in enumerate(names):
        total = max(1, int(matrix[i].sum()))
        cells = []
        for j in range(len(names)):
            share = matrix[i, j] / total
            colour = f"rgba(194,24,91,{share:.2f})" if i != j else f"rgba(46,125,50,{share:.2f})"
            cells.append(f'<td style="background:{colour}">{int(matrix[i, j])}</td>')
        rows.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    return (
        f'<table class="confusion"><caption>{html.escape(caption)}</caption><tr><th>true \\ predicted</th>{head}</tr>'
        f"{''.join(rows)}</table>"
    )


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0 16px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
caption{text-align:left;font-weight:600;padding:4px 0}
.confusion td{text-align:right;min-width:28px}.note{color:#555;font-size:13px}
.warn{background:#fff3e0;padding:8px;border-left:4px solid #ef6c00}
.spots{display:flex;flex-wrap:wrap;gap:10px}.spot{border:1px solid #ddd;padding:4px;font-size:11px;width:262px}
.spot img{width:128px;height:128px;image-rendering:pixelated}.pair{display:flex;gap:4px}
"""


def spread_over_labels(labels: Sequence[str], num: int) -> list[int]:
    """Up to ``num`` indices taken in turn from each label (labels by frequency, spots in list order); sorted."""
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    queues = sorted(by_label.values(), key=lambda q: (-len(q), q[0]))
    picked: list[int] = []
    depth = 0
    while len(picked) < min(num, len(labels)):
        for queue in queues:
            if depth < len(queue) and len(picked) < num:
                picked.append(queue[depth])
        depth += 1
    return sorted(picked)


def write_report(
    path: str | os.PathLike,
    metrics: Mapping[str, Any],
    real_images: np.ndarray | None = None,
    generated_images: np.ndarray | None = None,
    spot_captions: Sequence[Mapping[str, Any]] | None = None,
    num_spots: int = 24,
) -> Path:
    """Write the self-contained HTML report (inline CSS, SVG and base64 PNGs; no external resource), atomically.

    Args:
        path: destination, e.g. ``outputs/eval/report.html``.
        metrics: the dictionary written to ``metrics.json``.
        real_images: ``(N, 3, H, W)`` uint8 real patches of the evaluated spots.
        generated_images: the generated patches of the same spots.
        spot_captions: per spot ``{"barcode", "sample", "label", "real_label", "generated_label"}``.
        num_spots: spots shown side by side.
    """
    settings = metrics.get("settings", {})
    summary = summary_numbers(metrics)
    esc = html.escape

    def st(key: str) -> str:
        value = settings.get(key)
        return "n/a" if value is None else esc(str(value))

    def td(value: Any) -> str:
        return f"<td class='num'>{_fmt(value)}</td>"

    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Expression-to-tissue evaluation</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Expression-to-tissue evaluation</h1>",
        f"<p class='note'>{st('created')} &middot; model {st('model_path')} (iteration {st('iteration')}) &middot; "
        f"dataset {st('dataset_dir')} &middot; {st('num_spots')} validation spots &middot; "
        f"{st('num_inference_steps')} steps, guidance {st('guidance_scale')}, seed {st('seed')}</p>",
        "<h2>Summary</h2><table><tr><th>metric</th><th>value</th><th>meaning</th></tr>",
    ]
    for key, value in summary.items():
        desc = _DESCRIPTIONS.get(key, "")
        if key.startswith("fid_"):
            desc = f"FID in the features of the encoder {key[4:]}"
        elif key.startswith("kid_mean_"):
            desc = f"KID in the features of the encoder {key[9:]}"
        elif key.startswith("edit_") and key.endswith("_fraction"):
            desc = f"directionality of the edit {key[5:-9]}"
        shown = _fmt(int(value)) if key.startswith("num_") else _fmt(value)
        out.append(f"<tr><td>{esc(key)}</td><td class='num'>{shown}</td><td>{esc(desc)}</td></tr>")
    out.append("</table>")

    realism_ = metrics.get("realism", {})
    out.append("<h2>Realism</h2>")
    inception = realism_.get("inception", {})
    if "skipped" in inception:
        out.append(f"<p class='warn'>{esc(str(inception['skipped']))}</p>")
    blocks = [("Inception", inception)] if "skipped" not in inception else []
    blocks += [(f"encoder {name}", res) for name, res in realism_.get("encoders", {}).items()]
    for title, res in blocks:
        out.append(
            f"<table><caption>{esc(title)}: FID {_fmt(res.get('fid'))}, KID {_fmt(res.get('kid_mean'))} &plusmn; "
            f"{_fmt(res.get('kid_std'))} ({_fmt(res.get('n_real'))} real, {_fmt(res.get('n_fake'))} generated)"
            "</caption>"
            "<tr><th>group</th><th>FID</th><th>KID</th><th>n real</th><th>n generated</th></tr>"
        )
        for group, g in (res.get("per_group") or {}).items():
            g = g if isinstance(g, Mapping) else {}
            out.append(
                f"<tr><td>{esc(str(group))}</td>{td(g.get('fid'))}{td(g.get('kid_mean'))}{td(g.get('n_real'))}"
                f"{td(g.get('n_fake'))}</tr>"
            )
        out.append("</table>")
    out.append(f"<p class='note'>Groups: {esc(str(settings.get('labels', '')))}. See docs/evaluation_metrics.md.</p>")

    fid = metrics.get("fidelity", {})
    probe = metrics.get("probe", {})
    out.append("<h2>Biological fidelity: per-gene probe r</h2>")
    out.append(
        f"<p class='note'>Probe: {esc(str(probe.get('kind', '')))} trained on {esc(str(probe.get('train_spots', '')))} "
        "real training patches. Grey: Pearson r on real validation patches (ceiling); magenta: on generated patches "
        f"against the conditioning expression. Mean ceiling {_fmt(fid.get('ceiling_r_mean'))}, mean fidelity "
        f"{_fmt(fid.get('fidelity_r_mean'))} ({_fmt(fid.get('fidelity_fraction'))} of the ceiling); over the "
        f"{fid.get('num_readable_genes', 0)} genes with ceiling r &gt; {_fmt(fid.get('threshold'), 2)}: "
        f"{_fmt(fid.get('fidelity_fraction_readable'))} of the ceiling.</p>"
    )
    if fid.get("genes"):
        out.append(_gene_bars_svg(fid["genes"], fid["ceiling_r"], fid["fidelity_r"]))

    comp = metrics.get("compartments", {})
    if comp:
        out.append("<h2>Compartment agreement</h2>")
        out.append(
            f"<p class='note'>Labels: {esc(str(settings.get('labels', '')))}. Real accuracy (ceiling) "
            f"{_fmt(comp.get('real_accuracy'))}, generated agreement {_fmt(comp.get('generated_agreement'))}, chance "
            f"(always '{esc(str(comp.get('majority_label', '')))}') {_fmt(comp.get('chance'))}.</p>"
        )
        out.append(
            _confusion_html(
                comp["classes"],
                comp["confusion_generated"],
                "generated patches: true label of the conditioning spot vs predicted",
            )
        )
        out.append(_confusion_html(comp["classes"], comp["confusion_real"], "real patches (ceiling)"))

    edits = metrics.get("edits", {})
    if edits:
        out.append("<h2>Edit directionality</h2>")
        out.append(
            "<table><tr><th>edit</th><th>genes in panel</th><th>spots</th><th>moved right way</th><th>fraction</th>"
            "<th>mean signed shift (sd)</th><th>sign-test p</th></tr>"
        )
        for name, res in edits.get("edits", {}).items():
            genes_ = res.get("genes", [])
            shown = ", ".join(genes_[:6]) + (f" +{len(genes_) - 6}" if len(genes_) > 6 else "")
            out.append(
                f"<tr><td>{esc(name)}</td><td>{esc(shown)}</td><td class='num'>{res.get('n', 0)}</td>"
                f"<td class='num'>{_fmt(res.get('moved'))}</td><td class='num'>{_fmt(res.get('fraction'))}</td>"
                f"{td(res.get('mean_signed_shift'))}{td(res.get('p_value'))}</tr>"
            )
        out.append(
            f"<tr><th>all</th><td></td><td class='num'>{edits.get('overall_n', 0)}</td><td></td>"
            f"{td(edits.get('overall_fraction'))}<td></td>{td(edits.get('overall_p_value'))}</tr></table>"
        )
        dropped = settings.get("edits_dropped") or []
        if dropped:
            out.append(f"<p class='note'>Dropped (no gene of the set in the panel): {esc(', '.join(dropped))}.</p>")

    if real_images is not None and generated_images is not None and len(real_images):
        labels = (
            [str(c.get("label", "")) for c in spot_captions] if spot_captions is not None else [""] * len(real_images)
        )
        shown = spread_over_labels(labels, num_spots)
        out.append(
            f"<h2>Real (left) and generated (right) patches, {len(shown)} spots</h2>"
            "<p class='note'>Taken in turn from each label, in validation-list order.</p><div class='spots'>"
        )
        for i in shown:
            cap = dict(spot_captions[i]) if spot_captions is not None else {}
            out.append(
                f"<div class='spot'><div class='pair'><img alt='real' src='{_png_data_uri(real_images[i])}'>"
                f"<img alt='generated' src='{_png_data_uri(generated_images[i])}'></div>"
                f"{esc(str(cap.get('sample', '')))} {esc(str(cap.get('barcode', '')))}<br>"
                f"label <b>{esc(str(cap.get('label', '')))}</b>; probe: real {esc(str(cap.get('real_label', 'n/a')))}, "
                f"generated {esc(str(cap.get('generated_label', 'n/a')))}</div>"
            )
        out.append("</div>")
    out.append("<h2>Settings</h2><table>")
    for key, value in settings.items():
        out.append(f"<tr><td>{esc(str(key))}</td><td>{esc(json.dumps(value, default=str))}</td></tr>")
    out.append("</table></body></html>")
    path = Path(path)
    with atomic_path(path, suffix=".html") as tmp:
        tmp.write_text("\n".join(out), encoding="utf-8")
    return path


def log_to_mlflow(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    metrics: Mapping[str, float],
    params: Mapping[str, Any],
    artifacts: Sequence[str | os.PathLike] = (),
) -> str:
    """Record an evaluation as one MLflow run (metrics, parameters, artifacts) and return its run id.

    A new experiment keeps its artifacts in ``mlruns/`` next to a SQLite store, as MONAI's ``MLFlowHandler`` does.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from monai.utils import path_to_uri

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        location = None
        if tracking_uri.startswith("sqlite:///"):
            from urllib.parse import unquote

            location = path_to_uri(Path(unquote(tracking_uri[len("sqlite:///") :])).parent / "mlruns")
        experiment_id = client.create_experiment(experiment_name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=run_name, tags={"stage": "evaluation"})
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        items = [Metric(_safe_metric(k), float(v), now, 0) for k, v in metrics.items()]
        for lo in range(0, len(items), 500):
            client.log_batch(run_id, metrics=items[lo : lo + 500])
        plist = [Param(_safe_metric(k), str(v)[:6000]) for k, v in params.items()]
        for lo in range(0, len(plist), 100):
            client.log_batch(run_id, params=plist[lo : lo + 100])
        for artifact in artifacts:
            if Path(artifact).is_file():
                client.log_artifact(run_id, str(artifact))
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def _safe_metric(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


# --- orchestration ----------------------------------------------------------------------------------------------


def _generated_size(generator: Generator) -> int | None:
    """Side of the patches an :class:`ExpressionToTissuePipeline` makes (one decode of a zero latent), else None."""
    decode, shape = getattr(generator, "decode", None), getattr(generator, "latent_shape", None)
    if decode is None or shape is None:
        return None
    device = getattr(generator, "device", torch.device("cpu"))
    with torch.no_grad():
        return int(decode(torch.zeros((1, *shape), device=device)).shape[-1])


def evaluate(
    generator: Generator,
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    patch_fov_um: float,
    patch_size: int,
    num_neighbors: int,
    genes: Sequence[str] | None = None,
    wsi_backend: str | None = None,
    seed: int = 0,
    num_eval_spots: int | None = None,
    generation_batch_size: int = 16,
    regenerate: bool = False,
    generator_key: Mapping[str, Any] | None = None,
    probe: Probe | None = None,
    probe_type: str = "auto",
    probe_epochs: int = 8,
    probe_batch_size: int = 64,
    probe_learning_rate: float = 2e-3,
    probe_width: int = 16,
    probe_image_size: int | None = None,
    probe_max_train_spots: int | None = 4000,
    labels: str = "auto",
    num_clusters: int = 6,
    ceiling_threshold: float = 0.3,
    edits: Sequence[str] | None = DEFAULT_EDITS,
    num_edit_spots: int = 32,
    extractors: RealismExtractors | None = None,
    inception_weights: str | os.PathLike | None = None,
    require_inception: bool = True,
    encoder_path: str | os.PathLike | None = None,
    feature_batch_size: int = 32,
    kid_subset_size: int = 100,
    kid_subsets: int = 100,
    min_group_size: int = 10,
    fid_method: str = "pytorch-fid",
    num_report_spots: int = 24,
    tracking_uri: str | None = None,
    experiment_name: str = "st_ldm",
    run_name: str | None = None,
    settings: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Evaluate ``generator`` on the dataset's validation spots; write ``metrics.json``, ``report.html``, an MLflow run.

    Missing Inception weights stop the run first (unless ``require_inception`` is False), before patches are read or
    generated. See the module docstring for what is measured and docs/evaluation.md for how to read it.

    Args:
        generator: ``generator(condition, generator=[torch.Generator]) -> (B, 3, H, W)`` in [0, 1]; usually
            ``bundle.sampling.generation.load_pipeline(...)``.
        dataset_dir: prepared dataset folder (``datalist.json``, ``expression.npy``, ``gene_panel.json``).
        output_dir: folder for ``metrics.json``, ``report.html``, ``generated/`` and ``feature_cache/``.
        patch_fov_um: field of view of the model's patches (µm).
        patch_size: size of the model's patches (px); the generator's output size must match.
        num_neighbors: neighbour spots in the condition (the checkpoint's ``num_neighbors``; 0 for none).
        genes: the model's gene panel; must equal the dataset's (checked). Defaults to the dataset's panel.
        wsi_backend: slide reader (None: the best available).
        seed: seed of the spot choice, per-spot generation seeds (``seed + index``), probe and clustering.
        num_eval_spots: validation spots to evaluate (None: all).
        generation_batch_size: conditions per generator call.
        regenerate: generate again even when cached patches for the same key exist.
        generator_key: what identifies the generator (checkpoints, steps, guidance) for the cache; None: no cache.
        probe: an already trained probe (e.g. to score several models with one probe); None trains one here.
        probe_type: ``"auto"`` (encoder probe when ``encoder_path`` is given, else the CNN), ``"cnn"`` or ``"encoder"``.
        probe_epochs: CNN probe epochs.
        probe_batch_size: CNN probe batch size.
        probe_learning_rate: CNN probe peak learning rate.
        probe_width: CNN probe width.
        probe_image_size: probe input size (None: ``patch_size``, capped at 128 px).
        probe_max_train_spots: training spots for the probe (seeded choice; None: all).
        labels: ``"auto"``, ``"ground_truth"`` or ``"clusters"`` (see :func:`spot_labels`).
        num_clusters: clusters when labels come from expression.
        ceiling_threshold: genes with ceiling r above it are summarised separately.
        edits: edits scored for directionality (None or empty: skip).
        num_edit_spots: spots per edit (a seeded choice among the evaluated spots).
        extractors: pre-loaded realism extractors (:func:`load_realism_extractors`); None loads them here.
        inception_weights: Inception weights file (None: torch hub cache).
        require_inception: stop when the Inception weights are missing (False: skip realism with Inception).
        encoder_path: a pathology encoder (weights or TorchScript) for ``fid_<name>`` and the encoder probe.
        feature_batch_size: batch size of feature extraction.
        kid_subset_size: KID subset size (capped by the number of spots in ``bundle.metrics``).
        kid_subsets: KID subsets.
        min_group_size: smallest group with per-group FID/KID.
        fid_method: ``"pytorch-fid"`` or ``"eigh"`` (faster on a CPU), see :func:`realism`.
        num_report_spots: spots shown side by side in the report.
        tracking_uri: MLflow tracking URI (None: no MLflow run).
        experiment_name: MLflow experiment.
        run_name: MLflow run name (default ``eval_<time>``).
        settings: more settings to record (checkpoint paths, iteration, steps, guidance).
        device: device of the probe and feature extractors.

    Returns:
        the metrics dictionary (also in ``<output_dir>/metrics.json``).
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    regenerate = as_bool(regenerate, "regenerate")

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

    if probe_type not in ("auto", "cnn", "encoder"):
        raise ValueError(f"probe_type must be 'auto', 'cnn' or 'encoder', got {probe_type!r}.")
    if extractors is None:
        extractors = load_realism_extractors(inception_weights, require_inception, encoder_path, device)
    use_encoder_probe = probe_type == "encoder" or (probe_type == "auto" and bool(extractors.encoders))
    if use_encoder_probe and not extractors.encoders:
        raise ValueError("probe_type='encoder' needs encoder_path (a pathology encoder's weights or TorchScript file).")
    t = lap("load_extractors", t0)

    output_dir = Path(output_dir)
    dataset_dir = Path(dataset_dir)
    from bundle.io.gene_panel import check_gene_panel, load_gene_panel

    panel = load_gene_panel(dataset_dir / "gene_panel.json")
    if genes is not None:
        check_gene_panel(list(genes), panel, what=f"the dataset {str(dataset_dir)!r}")
    genes = list(panel)
    size = _generated_size(generator)
    if size is not None and size != int(patch_size):
        raise ValueError(
            f"the model generates {size}-px patches but patch_size is {patch_size}; set patch_size to {size} (and "
            "patch_fov_um to the training field of view) so real and generated patches match."
        )
    eval_entries, eval_index = select_spots(dataset_dir, "validation", num_eval_spots, seed)
    train_entries, _ = select_spots(dataset_dir, "training", probe_max_train_spots, seed)
    store = dataset_dir / "expression.npy"
    conditions, expression = load_conditions(eval_entries, store, num_neighbors)
    _, train_expression = load_conditions(train_entries, store, 0)
    train_labels, eval_labels, label_source = spot_labels(
        train_entries, eval_entries, train_expression, expression, labels, num_clusters, seed
    )
    real = load_real_patches(eval_entries, patch_fov_um, patch_size, wsi_backend)
    probe_size = int(probe_image_size) if probe_image_size else min(int(patch_size), 128)
    train_images = (
        load_real_patches(train_entries, patch_fov_um, patch_size, wsi_backend, output_size=probe_size)
        if probe is None
        else None
    )
    t = lap("load_real_patches", t)
    logger.info(
        "evaluating %d validation spots (%d training spots for the probe)", len(eval_entries), len(train_entries)
    )

    seeds = [int(seed) + int(i) for i in eval_index]
    spot_ids = [f"{e.get('sample')}/{e.get('barcode')}" for e in eval_entries]
    base_key = None
    if generator_key is not None:
        base_key = {
            "generator": dict(generator_key),
            "dataset": str(dataset_dir.resolve()),
            "spots": _key_hash({"ids": spot_ids}),
            "seeds": _key_hash({"s": seeds}),
        }
    cache_dir = output_dir / "generated"
    generated, cached = _cached_array(
        cache_dir,
        "validation",
        None if base_key is None else {**base_key, "what": "validation"},
        lambda: generate_patches(generator, conditions, seeds, generation_batch_size),
        regenerate,
    )
    if generated.shape != real.shape:
        raise ValueError(
            f"generated patches {generated.shape[1:]} and real patches {real.shape[1:]} differ; set patch_size to the "
            "size the model generates."
        )
    logger.info("generated patches %s", "read from the cache" if cached else "generated")
    t = lap("generate", t)

    # realism
    reference = {
        "dataset": dataset_dir,
        "spot_ids": spot_ids,
        "split": "validation",
        "datalist_mtime_ns": (dataset_dir / "datalist.json").stat().st_mtime_ns,
        "fov_um": float(patch_fov_um),
    }
    realism_result = realism(
        real,
        generated,
        eval_labels,
        extractors,
        output_dir / "feature_cache",
        reference,
        feature_batch_size,
        kid_subset_size,
        kid_subsets,
        min_group_size,
        seed,
        fid_method,
    )
    t = lap("realism", t)

    # probe
    if probe is not None:
        pass
    elif use_encoder_probe:
        name, extractor = next(iter(extractors.encoders.items()))
        probe = train_encoder_probe(
            extractor, name, train_images, train_expression, genes, train_labels, feature_batch_size, seed
        )
    else:
        probe = train_probe(
            train_images,
            train_expression,
            genes,
            train_labels,
            probe_epochs,
            probe_batch_size,
            probe_learning_rate,
            probe_width,
            probe_size,
            seed,
            device,
        )
    t = lap("train_probe", t)
    pred_real, label_real = probe.predict(real)
    pred_gen, label_gen = probe.predict(generated)
    fidelity = probe_scores(
        probe, real, generated, expression, ceiling_threshold, seed=seed, predictions=(pred_real, pred_gen)
    )
    compartments = (
        compartment_agreement(probe.classes, eval_labels, label_real, label_gen) if label_real is not None else {}
    )
    t = lap("fidelity", t)

    # edits
    edit_result: dict[str, Any] = {}
    edits = list(edits or [])
    kept = usable_edits(edits, genes) if edits else []
    if kept and num_edit_spots:
        pick = np.sort(np.random.default_rng(seed + 1).permutation(len(eval_entries))[: int(num_edit_spots)])
        edit_seeds = [seeds[i] for i in pick]

        def cache(name: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
            key = None if base_key is None else {**base_key, "what": f"edit {name}", "pick": pick.tolist()}
            return _cached_array(cache_dir, f"edit_{name}", key, compute, regenerate)[0]

        edit_result = edit_directionality(
            generator,
            probe,
            conditions[pick],
            expression[pick],
            genes,
            kept,
            edit_seeds,
            generated[pick],
            generation_batch_size,
            cache,
        )
    t = lap("edits", t)

    info = dict(getattr(generator, "info", {}) or {})
    record = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset_dir": str(dataset_dir.resolve()),
        "output_dir": str(output_dir.resolve()),
        "iteration": info.get("iteration"),
        "num_inference_steps": getattr(generator, "num_inference_steps", None),
        "guidance_scale": getattr(generator, "guidance_scale", None),
        "seed": int(seed),
        "num_spots": len(eval_entries),
        "num_validation_spots": len(read_json(dataset_dir / "datalist.json")["validation"]),
        "num_edit_spots": int(min(num_edit_spots or 0, len(eval_entries))) if kept else 0,
        "edits": kept,
        "edits_dropped": [e for e in edits if e not in kept],
        "patch_fov_um": float(patch_fov_um),
        "patch_size": int(patch_size),
        "num_neighbors": int(num_neighbors),
        "num_genes": len(genes),
        "labels": label_source,
        "probe_type": probe.kind,
        "ceiling_threshold": float(ceiling_threshold),
        "generated_from_cache": bool(cached),
        "inception_weights": extractors.inception_weights,
        "encoders": sorted(extractors.encoders),
        "device": str(device),
        **_jsonable(dict(settings or {})),
    }
    metrics: dict[str, Any] = {
        "settings": record,
        "realism": realism_result,
        "fidelity": fidelity,
        "probe": {"kind": probe.kind, **_jsonable(probe.info), "classes": probe.classes},
        "compartments": compartments,
        "edits": edit_result,
    }
    timings["total"] = round(time.perf_counter() - t0, 2)
    metrics["timings"] = timings
    metrics["summary"] = summary_numbers(metrics)

    output_dir.mkdir(parents=True, exist_ok=True)
    names = probe.classes
    captions = [
        {
            "sample": e.get("sample"),
            "barcode": e.get("barcode"),
            "label": eval_labels[i],
            "real_label": names[label_real[i]] if label_real is not None else None,
            "generated_label": names[label_gen[i]] if label_gen is not None else None,
        }
        for i, e in enumerate(eval_entries)
    ]
    metrics_path = output_dir / "metrics.json"
    report_path = output_dir / "report.html"
    run_id = None
    if tracking_uri:
        run_name = run_name or "eval_" + time.strftime("%Y%m%d_%H%M%S")
        metrics["settings"]["mlflow"] = {
            "tracking_uri": tracking_uri,
            "experiment": experiment_name,
            "run_name": run_name,
        }
    write_json_atomic(metrics_path, _jsonable(metrics))
    write_report(report_path, metrics, real, generated, captions, num_report_spots)
    if tracking_uri:
        numbers = dict(metrics["summary"])
        for g, c, f in zip(genes, fidelity["ceiling_r"], fidelity["fidelity_r"]):
            if c is not None:
                numbers[f"ceiling_r/{g}"] = c
            if f is not None:
                numbers[f"fidelity_r/{g}"] = f
        params = {k: v for k, v in record.items() if not isinstance(v, (dict, list)) or k in ("edits", "encoders")}
        run_id = log_to_mlflow(tracking_uri, experiment_name, run_name, numbers, params, [metrics_path, report_path])
        metrics["settings"]["mlflow"]["run_id"] = run_id
        write_json_atomic(metrics_path, _jsonable(metrics))
    logger.info(
        "evaluation written to %s (%s)", report_path, ", ".join(f"{k} {v:.3g}" for k, v in metrics["summary"].items())
    )
    return metrics
