"""The probe: an image-to-expression regressor (and compartment classifier) trained on real training patches only.

Either a small MONAI ResNet trained from scratch (:func:`train_probe`) or ridge and logistic regression on a frozen
encoder's features (:func:`train_encoder_probe`); both give a :class:`Probe`. scikit-learn is imported when used.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from bundle.evaluation.features import extract_features_in_chunks
from bundle.evaluation.spots import resize_images

__all__ = ["Probe", "probe_network", "train_probe", "train_encoder_probe"]

logger = logging.getLogger(__name__)


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
        extractor: a :mod:`bundle.evaluation.extractors` feature extractor (images in [0, 1] to ``(B, D)``).
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
    features = extract_features_in_chunks(extractor, images, batch_size)
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
        f = scaler.transform(extract_features_in_chunks(extractor, batch, batch_size))
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
