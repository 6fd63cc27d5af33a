"""Dictionary wrappers of :mod:`bundle.transforms.array`; every key they do not name passes through unchanged."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform

from bundle.transforms.array import (
    LoadExpression,
    LoadWSIPatch,
    NormalizeExpression,
    RandHEStainJitter,
    SelectGenes,
    SpatialContext,
)

__all__ = [
    "LoadWSIPatchd",
    "LoadExpressiond",
    "NormalizeExpressiond",
    "SelectGenesd",
    "SpatialContextd",
    "RandDropConditiond",
    "RandHEStainJitterd",
]


class LoadWSIPatchd(MapTransform):
    """Dictionary-based :class:`bundle.transforms.LoadWSIPatch`: slide path in, ``(3, H, W)`` uint8 patch out.

    Unlike MONAI's ``PatchWSIDataset``, every other key of the datalist entry (expression row, neighbours, sample,
    barcode, ...) is kept.

    Args:
        keys: key(s) holding a slide path; each is replaced by its patch.
        fov_um: field of view in micrometres.
        size: output size in pixels.
        location_key: key with the spot centre as ``(x, y)`` level-0 pixels. Defaults to ``"location"``.
        mpp_key: key with the slide's level-0 pixel size in um/px. Defaults to ``"mpp"``.
        backend: slide reader (``"cucim"``, ``"openslide"``, ``"tifffile"`` or None for the best available).
        fill_value: value for pixels outside the slide. Defaults to 255.
        max_open_slides: slide handles kept open per process. Defaults to 64.
        meta: ``MetaTensor`` patches (True) or plain tensors (False); None follows ``get_track_meta()``. Plain
            tensors are cheaper to build and to batch, for pipelines that do not use the patch's meta.
        allow_missing_keys: don't raise exception if key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        fov_um: float | Sequence[float],
        size: int | Sequence[int],
        location_key: str = "location",
        mpp_key: str = "mpp",
        backend: str | None = "cucim",
        fill_value: int = 255,
        max_open_slides: int = 64,
        meta: bool | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadWSIPatch(
            fov_um, size, backend=backend, fill_value=fill_value, max_open_slides=max_open_slides, meta=meta
        )
        self.location_key, self.mpp_key = location_key, mpp_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            for needed in (self.location_key, self.mpp_key):
                if needed not in d:
                    raise KeyError(
                        f"LoadWSIPatchd needs key {needed!r} next to {key!r}; the entry has {sorted(map(str, d))}."
                    )
            d[key] = self.loader(d[key], d[self.location_key], d[self.mpp_key])
        return d


class LoadExpressiond(MapTransform):
    """Dictionary-based :class:`bundle.transforms.LoadExpression`: a store row index in, a float32 vector out.

    Args:
        keys: key(s) holding the row index in the expression store (``"expression"`` in a prepared datalist).
        store: the dataset's ``expression.npy``.
        allow_missing_keys: don't raise exception if key is missing.
    """

    def __init__(self, keys: KeysCollection, store: str | os.PathLike, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadExpression(store)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


class NormalizeExpressiond(MapTransform):
    """Dictionary-based :class:`bundle.transforms.NormalizeExpression` (raw counts to log-normalised values).

    Args:
        keys: key(s) of raw count vectors.
        target_sum: total each spot is scaled to before the log. Defaults to 1e4.
        log1p: apply ``log(1 + x)``. Defaults to True.
        library_size_key: key with the spot's total counts over all genes; None uses the vector's own sum.
        validate: raise on non-count input. Defaults to True.
        allow_missing_keys: don't raise exception if key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        target_sum: float = 1e4,
        log1p: bool = True,
        library_size_key: str | None = None,
        validate: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalizer = NormalizeExpression(target_sum=target_sum, log1p=log1p, validate=validate)
        self.library_size_key = library_size_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        library_size = d[self.library_size_key] if self.library_size_key is not None else None
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key], library_size)
        return d


class SelectGenesd(MapTransform):
    """Dictionary-based :class:`bundle.transforms.SelectGenes`.

    Args:
        keys: key(s) of expression arrays whose last axis follows ``source_genes``.
        source_genes: gene names of the input's last axis.
        genes: gene names wanted, in order (e.g. the checkpoint's panel).
        allow_missing_keys: don't raise exception if key is missing.
    """

    def __init__(
        self, keys: KeysCollection, source_genes: Sequence[str], genes: Sequence[str], allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.selector = SelectGenes(source_genes, genes)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.selector(d[key])
        return d


class SpatialContextd(MapTransform):
    """Dictionary-based :class:`bundle.transforms.SpatialContext`: ``(G,)`` expression to ``(1 + K, G)``.

    Args:
        keys: key(s) of the spot's (already loaded) expression vector.
        store: the dataset's ``expression.npy``.
        neighbors_key: key with the K neighbour rows (``-1`` for none). Defaults to ``"neighbors"``.
        num_neighbors: K. Defaults to 6 (hexagonal lattice).
        allow_missing_keys: don't raise exception if key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        store: str | os.PathLike,
        neighbors_key: str = "neighbors",
        num_neighbors: int = 6,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.context = SpatialContext(store, num_neighbors=num_neighbors)
        self.neighbors_key = neighbors_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.context(d[key], d[self.neighbors_key])
        return d


class RandDropConditiond(RandomizableTransform, MapTransform):
    """Replace the condition with ``null_value`` with probability ``prob`` (classifier-free guidance training).

    Args:
        keys: keys of condition arrays, dropped together.
        prob: probability of dropping. Defaults to 0.1.
        null_value: sentinel for "no condition". Keep ``-1.0``: ``monai.inferers.DiffusionInferer.sample(cfg=...)``
            builds its unconditional input with ``fill_(-1)``, and log-normalised expression is never negative.
        allow_missing_keys: don't raise exception if key is missing.
    """

    def __init__(
        self, keys: KeysCollection, prob: float = 0.1, null_value: float = -1.0, allow_missing_keys: bool = False
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if null_value >= 0:
            raise ValueError(f"null_value must be negative (expression is >= 0), got {null_value}.")
        self.null_value = null_value

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = torch.full_like(torch.as_tensor(d[key], dtype=torch.float32), self.null_value)
        return d


class RandHEStainJitterd(RandomizableTransform, MapTransform):
    """Dictionary-based :class:`bundle.transforms.RandHEStainJitter`; all keys get the same jitter.

    Args:
        keys: keys of ``(3, H, W)`` RGB patches.
        prob: probability of applying it. Defaults to 0.5.
        sigma: maximum relative change of each stain's concentration. Defaults to 0.05.
        bias: maximum additive change of each stain's concentration. Defaults to 0.05.
        allow_missing_keys: don't raise exception if key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        sigma: float = 0.05,
        bias: float = 0.05,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.jitter = RandHEStainJitter(prob=1.0, sigma=sigma, bias=bias)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.jitter.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        self.jitter.randomize()
        for key in self.key_iterator(d):
            d[key] = self.jitter(d[key], randomize=False)
        return d
