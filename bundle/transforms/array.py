"""Array transforms: one spot's slide patch and expression vector. Dictionary wrappers are in ``dictionary.py``."""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import RandomizableTransform, Transform
from monai.utils import TransformBackends, ensure_tuple_rep

from bundle.geometry import xy_to_rowcol
from bundle.io.slides import get_wsi_reader, level_for_mpp, open_slide, read_rgb_into
from bundle.io.spots import check_counts

__all__ = [
    "LoadWSIPatch",
    "LoadExpression",
    "NormalizeExpression",
    "SelectGenes",
    "SpatialContext",
    "RandHEStainJitter",
]


class LoadWSIPatch(Transform):
    """Read the patch centred on a spot, defined by its field of view in micrometres and its output size in pixels.

    The pyramid level is the coarsest one that is at least as fine as the requested pixel size
    (``fov_um / size``); the region read there is resized (antialiased) to ``size``. Regions past the slide's
    border are filled with ``fill_value``. Opened slides are kept (up to ``max_open_slides``) and reused, per
    process: each DataLoader worker holds its own handles, which are never pickled, and a worker forked after the
    main process opened a slide reopens it instead of reading through the inherited handle (a forked file handle
    shares its file position with the parent, so concurrent reads through it return another read's bytes).

    The backend's pixels are copied once, into a channel-first array (tifffile tiles are decoded straight into it),
    so the patch is a contiguous, writable tensor that batches without a further transposition.

    Args:
        fov_um: field of view ``(height, width)`` in micrometres (one number for a square).
        size: output ``(height, width)`` in pixels (one number for a square).
        backend: ``"cucim"``, ``"openslide"``, ``"tifffile"`` (tile-level reads) or None for the best available.
        fill_value: value for pixels outside the slide. Defaults to 255 (white glass).
        max_open_slides: slide handles kept open per process. Defaults to 64.
        meta: return a ``MetaTensor`` carrying the slide path, level, location and pixel size (True) or a plain
            ``torch.Tensor`` with the same pixels (False, cheaper to build and to batch). None (default) follows
            ``monai.data.meta_obj.get_track_meta()``, which is True unless switched off.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        fov_um: float | Sequence[float],
        size: int | Sequence[int],
        backend: str | None = "cucim",
        fill_value: int = 255,
        max_open_slides: int = 64,
        meta: bool | None = None,
    ) -> None:
        self.fov_um = tuple(float(v) for v in ensure_tuple_rep(fov_um, 2))
        self.size = tuple(int(v) for v in ensure_tuple_rep(size, 2))
        if min(self.fov_um) <= 0:
            raise ValueError(f"fov_um must be positive micrometres, got {fov_um!r}.")
        if min(self.size) <= 0:
            raise ValueError(f"size must be positive pixels, got {size!r}.")
        if max_open_slides < 1:
            raise ValueError(f"max_open_slides must be >= 1, got {max_open_slides}.")
        self.reader_backend = backend
        self.fill_value = fill_value
        self.max_open_slides = max_open_slides
        self.meta = meta
        self._reader = None
        self._slides: OrderedDict[str, tuple] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_reader"], state["_slides"] = None, OrderedDict()  # handles are per process
        return state

    @property
    def reader(self):
        if self._reader is None:
            self._reader = get_wsi_reader(self.reader_backend, channel_dim=-1, dtype=np.uint8)
        return self._reader

    def _slide(self, path: str) -> tuple:
        """``(wsi, level sizes, downsamples, reads)`` of an open slide; ``reads`` caches :meth:`_plan` per mpp."""
        if self._pid != os.getpid():  # forked: the inherited handles belong to the parent; drop them, unclosed
            self._reader, self._slides, self._pid = None, OrderedDict(), os.getpid()
        if path in self._slides:
            self._slides.move_to_end(path)
            return self._slides[path]
        wsi = open_slide(path, self.reader)
        count = self.reader.get_level_count(wsi)
        sizes = [tuple(int(v) for v in self.reader.get_size(wsi, level)) for level in range(count)]
        entry = (wsi, sizes, [sizes[0][0] / s[0] for s in sizes], {})
        self._slides[path] = entry
        if len(self._slides) > self.max_open_slides:
            _, (old, *_) = self._slides.popitem(last=False)
            close = getattr(old, "close", None)
            if callable(close):
                close()
        return entry

    def target_mpp(self) -> tuple[float, float]:
        """Pixel size ``(y, x)`` of the output patch in um/px."""
        return self.fov_um[0] / self.size[0], self.fov_um[1] / self.size[1]

    def _plan(self, downsamples: Sequence[float], mpp: float) -> tuple[int, float, tuple[int, int]]:
        """Level, its downsample and the region to read there (level pixels) for a slide of level-0 pixel ``mpp``."""
        level = level_for_mpp(downsamples, mpp, min(self.target_mpp()))
        ds = downsamples[level]
        return level, ds, tuple(max(1, int(round(f / (mpp * ds)))) for f in self.fov_um)

    def __call__(self, path: str | os.PathLike, location: Sequence[float], mpp: float) -> torch.Tensor:
        """Read the patch centred on ``location``.

        Args:
            path: slide file.
            location: spot centre as ``(x, y)`` level-0 pixels (AnnData ``obsm["spatial"]`` order).
            mpp: level-0 pixel size of the slide in um/px (recorded in the datalist by ``prepare_dataset``).

        Returns:
            ``(3, H, W)`` uint8 tensor; a ``MetaTensor`` with the slide path, level, location and pixel size in its
            meta unless metadata is off (see ``meta``).
        """
        if mpp is None or not float(mpp) > 0:
            raise ValueError(f"mpp (level-0 um/px of {str(path)!r}) must be positive, got {mpp!r}.")
        mpp = float(mpp)
        path = str(path)
        wsi, sizes, downsamples, reads = self._slide(path)
        plan = reads.get(mpp)
        if plan is None:
            plan = reads[mpp] = self._plan(downsamples, mpp)
        level, ds, region = plan
        cy, cx = xy_to_rowcol(location)
        # top-left corner of the region, in level pixels
        top = int(math.floor(int(round(float(cy) - region[0] * ds / 2.0)) / ds))
        left = int(math.floor(int(round(float(cx) - region[1] * ds / 2.0)) / ds))
        image = torch.from_numpy(self._read(wsi, sizes[level], ds, level, (top, left), region))
        if region != self.size:
            resized = F.interpolate(
                image[None].float(), size=self.size, mode="bilinear", antialias=True, align_corners=False
            )
            image = resized[0].round_().clamp_(0, 255).to(torch.uint8)
        if not (get_track_meta() if self.meta is None else self.meta):
            return image
        meta = {
            "filename_or_obj": path,
            "location": [float(v) for v in location],
            "level": level,
            "mpp": min(self.target_mpp()),
            "fov_um": list(self.fov_um),
        }
        return MetaTensor(image, meta=meta)

    def _read(self, wsi, level_size, ds, level, top_left, region) -> np.ndarray:
        """``(3, h, w)`` uint8 pixels of ``region`` level pixels from ``top_left``, padding what lies past the border."""
        top, left = top_left
        out = np.empty((3, region[0], region[1]), dtype=np.uint8)
        r0, c0 = max(top, 0), max(left, 0)
        r1, c1 = min(top + region[0], level_size[0]), min(left + region[1], level_size[1])
        if (r0, c0, r1, c1) != (top, left, top + region[0], left + region[1]):
            out.fill(self.fill_value)
        if r1 > r0 and c1 > c0:
            # channel-last view of the inside part: the reader writes (h, w, 3) pixels through it
            inside = out[:, r0 - top : r1 - top, c0 - left : c1 - left].transpose(1, 2, 0)
            read_rgb_into(self.reader, wsi, level, r0, c0, ds, inside)
        return out


class LoadExpression(Transform):
    """Read one spot's expression vector (a row) from a memory-mapped ``.npy`` expression store.

    The store is opened lazily, once per process, with ``np.load(..., mmap_mode="r")``.

    Args:
        store: path of the ``(num_spots, num_genes)`` float32 ``.npy`` file (``expression.npy`` of a dataset).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, store: str | os.PathLike) -> None:
        self.store = str(store)
        self._array: np.ndarray | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            if not Path(self.store).is_file():
                raise FileNotFoundError(
                    f"Expression store {self.store!r} does not exist; run scripts/prepare_dataset.py to create it."
                )
            self._array = np.load(self.store, mmap_mode="r")
        return self._array

    def __call__(self, row: int | Sequence[int] | np.ndarray) -> torch.Tensor:
        """Return row(s) ``row`` as float32: ``(num_genes,)`` for one index, ``(n, num_genes)`` for several."""
        index = np.asarray(row, dtype=np.int64)
        n = self.array.shape[0]
        if index.size and (index.min() < 0 or index.max() >= n):
            raise IndexError(f"expression row {row!r} is outside the store {self.store!r} ({n} spots).")
        return torch.from_numpy(np.array(self.array[index], dtype=np.float32))


class NormalizeExpression(Transform):
    """Library-size normalise then ``log1p`` one spot's raw counts (scanpy's ``normalize_total`` + ``log1p``).

    Args:
        target_sum: total each spot is scaled to before the log. Defaults to 1e4.
        log1p: apply ``log(1 + x)`` after scaling. Defaults to True.
        validate: raise if the input is not raw counts (negative or non-integer). Defaults to True.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, target_sum: float = 1e4, log1p: bool = True, validate: bool = True) -> None:
        if not target_sum > 0:
            raise ValueError(f"target_sum must be positive, got {target_sum}.")
        self.target_sum = float(target_sum)
        self.log1p = log1p
        self.validate = validate

    def __call__(self, counts: NdarrayOrTensor, library_size: float | NdarrayOrTensor | None = None) -> torch.Tensor:
        """Normalise ``counts`` (..., G).

        Args:
            counts: raw counts of the panel genes, last axis = genes.
            library_size: total counts of the spot over *all* genes (as the dataset records it). Defaults to the sum
                of ``counts``, which is only right when ``counts`` holds every gene.
        """
        if isinstance(counts, np.ndarray) and not counts.flags.writeable:
            counts = np.array(counts)  # e.g. a row of a read-only memory-mapped store
        if self.validate:
            check_counts(counts)
        counts = torch.as_tensor(counts, dtype=torch.float32)
        if library_size is None:
            total = counts.sum(dim=-1, keepdim=True)
        else:
            total = torch.as_tensor(library_size, dtype=torch.float32).reshape(*counts.shape[:-1], 1)
        scaled = counts * (self.target_sum / total.clamp_min(1.0))
        return torch.log1p(scaled) if self.log1p else scaled


class SelectGenes(Transform):
    """Reorder/subset the last axis of an expression array from one gene list (``source_genes``) to another.

    Args:
        source_genes: gene names of the input's last axis, in order.
        genes: gene names wanted, in the output order (e.g. the checkpoint's panel).

    Raises:
        ValueError: when a wanted gene is not in ``source_genes`` (the message names them).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, source_genes: Sequence[str], genes: Sequence[str]) -> None:
        source = [str(g) for g in source_genes]
        if len(set(source)) != len(source):
            dup = sorted({g for g in source if source.count(g) > 1})
            raise ValueError(f"source_genes has duplicated names {dup[:10]}; make gene names unique first.")
        position = {g: i for i, g in enumerate(source)}
        missing = [str(g) for g in genes if str(g) not in position]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(genes)} panel genes are absent from the data: {missing[:20]}"
                f"{' ...' if len(missing) > 20 else ''}. Use data measured on these genes, or a panel built from it."
            )
        self.genes = [str(g) for g in genes]
        self.indices = torch.as_tensor([position[g] for g in self.genes], dtype=torch.long)
        self.num_source = len(source)

    def __call__(self, expression: NdarrayOrTensor) -> NdarrayOrTensor:
        if expression.shape[-1] != self.num_source:
            raise ValueError(
                f"expression has {expression.shape[-1]} genes on its last axis but source_genes lists {self.num_source}."
            )
        if isinstance(expression, np.ndarray):
            return np.take(expression, self.indices.numpy(), axis=-1)
        return torch.index_select(expression, -1, self.indices.to(expression.device))


class SpatialContext(Transform):
    """Stack a spot's expression with its hex-lattice neighbours' expression: ``(G,)`` to ``(1 + K, G)``.

    Neighbour rows come from the dataset's expression store; a missing neighbour (row ``-1``: off the array, not in
    tissue or dropped by QC) is filled with the spot's own expression, so the network sees a smooth neighbourhood.

    Args:
        store: expression store (``expression.npy``) of the dataset.
        num_neighbors: K, number of neighbour slots (6 on the Visium hexagonal lattice).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, store: str | os.PathLike, num_neighbors: int = 6) -> None:
        if num_neighbors < 1:
            raise ValueError(f"num_neighbors must be >= 1, got {num_neighbors}.")
        self.loader = LoadExpression(store)
        self.num_neighbors = num_neighbors

    def __call__(self, expression: NdarrayOrTensor, neighbors: Sequence[int] | NdarrayOrTensor) -> torch.Tensor:
        centre = torch.as_tensor(expression, dtype=torch.float32)
        rows = np.asarray(neighbors, dtype=np.int64).reshape(-1)
        if rows.size != self.num_neighbors:
            raise ValueError(f"expected {self.num_neighbors} neighbour rows, got {rows.size} ({rows.tolist()}).")
        out = centre.unsqueeze(0).repeat(1 + self.num_neighbors, 1)
        present = np.flatnonzero(rows >= 0)
        if present.size:
            out[1 + torch.as_tensor(present)] = self.loader(rows[present]).to(out.dtype)
        return out


class RandHEStainJitter(RandomizableTransform):
    """Random H&E stain augmentation in colour-deconvolved space (Tellez et al., 2018, "H&E stain augmentation").

    The RGB patch is turned into optical density, split into haematoxylin, eosin and residual concentrations with
    the Ruifrok-Johnston stain vectors, each concentration is scaled by ``U(1 - sigma, 1 + sigma)`` and shifted by
    ``U(-bias, bias)``, and the result is turned back into RGB. Unlike hue jitter, it changes staining intensity the
    way scanners and labs do while keeping tissue structure.

    Args:
        prob: probability of applying it. Defaults to 0.5.
        sigma: maximum relative change of each stain's concentration. Defaults to 0.05.
        bias: maximum additive change of each stain's concentration. Defaults to 0.05.
    """

    backend = [TransformBackends.TORCH]

    # Ruifrok & Johnston (2001) stain OD vectors: haematoxylin, eosin, DAB (as residual)
    _STAINS = ((0.650, 0.704, 0.286), (0.072, 0.990, 0.105), (0.268, 0.570, 0.776))

    def __init__(self, prob: float = 0.5, sigma: float = 0.05, bias: float = 0.05) -> None:
        super().__init__(prob)
        if sigma < 0 or bias < 0:
            raise ValueError(f"sigma and bias must be >= 0, got sigma={sigma}, bias={bias}.")
        self.sigma, self.bias = sigma, bias
        stains = torch.tensor(self._STAINS, dtype=torch.float32)
        self._rgb_from_hed = stains / stains.norm(dim=1, keepdim=True)
        self._hed_from_rgb = torch.linalg.inv(self._rgb_from_hed)
        self._alpha = np.ones(3)
        self._beta = np.zeros(3)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            self._alpha = self.R.uniform(1 - self.sigma, 1 + self.sigma, 3)
            self._beta = self.R.uniform(-self.bias, self.bias, 3)

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        """Jitter a ``(3, H, W)`` uint8 (0-255) or float (0-1) RGB patch; returns the same type and range."""
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        tensor = torch.as_tensor(img)
        is_uint8 = tensor.dtype == torch.uint8
        rgb = tensor.float() / 255.0 if is_uint8 else tensor.float()
        od = -torch.log(rgb.clamp(1.0 / 255.0, 1.0)).permute(1, 2, 0)  # (H, W, 3)
        hed = od @ self._hed_from_rgb
        hed = hed * torch.as_tensor(self._alpha, dtype=torch.float32) + torch.as_tensor(self._beta, dtype=torch.float32)
        out = torch.exp(-(hed @ self._rgb_from_hed)).clamp(0.0, 1.0).permute(2, 0, 1)
        if is_uint8:
            out = (out * 255.0).round().to(torch.uint8)
        out = out.to(tensor.dtype) if not is_uint8 else out
        if isinstance(img, MetaTensor):
            return MetaTensor(out, meta=img.meta)
        return out.numpy() if isinstance(img, np.ndarray) else out
