"""Stage 2 on cached latents: every training patch encoded once, in its 8 dihedral variants, by the frozen autoencoder.

The autoencoder is frozen in stage 2, so the image path (read a patch, flip / rotate it, encode it every step) repeats
the same work each epoch. :class:`LatentCacheDataset` encodes every training spot once for each element of the
dihedral group D4 (the flips on both axes and the 90-degree rotations the training augmentations draw) and stores,
per spot and variant, the posterior mean and log-variance of ``AutoencoderKL.encode``. Each item then hands one random
variant's ``latent_mean`` and ``latent_std`` to :class:`bundle.engines.LatentDiffusionPrepareBatch`, which draws
``z = (mean + std * eps) * scale_factor`` every step, as ``encode_stage_2_inputs`` does on the image path.

A flip or rotation of the image is not the same flip or rotation of its latent (a convolutional encoder is not
equivariant), which is why each variant is encoded rather than transformed in latent space. The H&E stain jitter of
the image path is not applied on this path (its effect on the latents is measured in
``scripts/benchmark_latent_cache.py``). The variants are drawn uniformly (1/8 each); the image path's composition of
two random flips and a random rotation draws the identity, the axis flips and the half turn (1/6 each) twice as often
as the quarter turns and the diagonal reflections (1/12 each).

Layout of the cache folder (``<output_dir>/latent_cache``), written through a staging folder and a rename:

- ``latents.npy``: ``(N, 8, 2 * C, h, w)`` (``float16`` by default), memory-mapped; channels ``[:C]`` the posterior
  mean, ``[C:]`` the log-variance, of training spot ``n`` (datalist order) in variant ``v`` (:func:`dihedral`);
- ``info.json``: the key it was built for (the autoencoder checkpoint's SHA-256, the training spots, the slides' sizes
  and modification times, the patch settings, the dtype) and the shape. A cache whose key differs is rebuilt.

The expression and its neighbour context are not copied: they are read per step from the dataset's memory-mapped
``expression.npy`` by the same transforms as on the image path, and the condition dropout still runs per step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable, apply_transform
from torch import nn

from bundle import distributed
from bundle.utils import StagingDir, memmap_array, read_json, unwrap_network, write_json_atomic

__all__ = [
    "NUM_VARIANTS",
    "LatentCacheDataset",
    "StaleLatentCacheError",
    "dihedral",
    "ensure_latent_cache",
    "latent_cache_key",
    "latent_cache_nbytes",
    "open_latent_cache",
]

logger = logging.getLogger(__name__)

NUM_VARIANTS = 8  # the dihedral group D4 of the square patch
CACHE_FORMAT = 1
LATENTS_FILE, INFO_FILE = "latents.npy", "info.json"
_LOGVAR_RANGE = (-30.0, 20.0)  # AutoencoderKL.encode clamps the log-variance to this range
_DTYPES = ("float16", "float32")
_KEY_MEANINGS = {
    "format": "the cache format changed",
    "autoencoder_sha256": "it was built with another autoencoder checkpoint",
    "datalist_sha256": "the training spots differ (another dataset or datalist)",
    "num_spots": "the number of training spots differs",
    "slides": "a slide file changed (size or modification time)",
    "patch_fov_um": "the patch field of view differs",
    "patch_size": "the patch size differs",
    "dtype": "the storage dtype differs",
}


class StaleLatentCacheError(ValueError):
    """A latent cache that does not match the autoencoder, the training spots or the patch settings in use."""


def dihedral(images: torch.Tensor, variant: int) -> torch.Tensor:
    """Variant ``variant`` (0-7) of the dihedral group D4 applied to the last two axes of ``images``.

    Variant ``v`` flips the last (width) axis when ``v >= 4``, then rotates by ``v % 4`` quarter turns
    (``torch.rot90`` over the last two axes); variant 0 is the identity.
    """
    if not 0 <= int(variant) < NUM_VARIANTS:
        raise ValueError(f"variant must be in [0, {NUM_VARIANTS}), got {variant}.")
    if variant >= 4:
        images = torch.flip(images, dims=(-1,))
    return torch.rot90(images, int(variant) % 4, dims=(-2, -1))


def _sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def latent_cache_key(
    autoencoder_ckpt: str | os.PathLike,
    datalist: Sequence[Mapping[str, Any]],
    fov_um: float,
    size: int,
    dtype: str = "float16",
) -> dict[str, Any]:
    """What a latent cache depends on: the autoencoder checkpoint's content, the training spots, their slides' sizes
    and modification times, the patch settings and the storage dtype.

    Args:
        autoencoder_ckpt: the frozen autoencoder's checkpoint (``models/autoencoder.pt``).
        datalist: the training entries (``image``, ``location``, ``mpp``), in the order the cache rows follow.
        fov_um: patch field of view in micrometres.
        size: patch size in pixels.
        dtype: storage dtype, ``"float16"`` or ``"float32"``.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"latent cache dtype must be one of {_DTYPES}, got {dtype!r}.")
    if not Path(autoencoder_ckpt).is_file():
        raise FileNotFoundError(
            f"The autoencoder checkpoint {str(autoencoder_ckpt)!r} the latent cache is built with does not exist; "
            "train stage 1 first (or set autoencoder_ckpt)."
        )
    spots = []
    for i, entry in enumerate(datalist):
        missing = [k for k in ("image", "location", "mpp") if k not in entry]
        if missing:
            raise KeyError(f"training datalist entry {i} has no {missing}; prepare the dataset with prepare_dataset.")
        spots.append([str(entry["image"]), [float(v) for v in entry["location"]], float(entry["mpp"])])
    slides = {}
    for path in sorted({s[0] for s in spots}):
        stat = os.stat(path)
        slides[path] = [stat.st_size, stat.st_mtime_ns]
    return {
        "format": CACHE_FORMAT,
        "autoencoder_sha256": _sha256_file(autoencoder_ckpt),
        "datalist_sha256": _sha256_json(spots),
        "num_spots": len(spots),
        "slides": _sha256_json(slides),
        "patch_fov_um": float(fov_um),
        "patch_size": int(size),
        "dtype": dtype,
    }


def latent_cache_nbytes(num_spots: int, latent_channels: int, latent_size: int, dtype: str = "float16") -> int:
    """Size in bytes of the ``latents.npy`` of ``num_spots`` spots (8 variants, mean and log-variance)."""
    itemsize = np.dtype(dtype).itemsize
    return int(num_spots) * NUM_VARIANTS * 2 * int(latent_channels) * int(latent_size) ** 2 * itemsize


def open_latent_cache(folder: str | os.PathLike, key: Mapping[str, Any] | None = None) -> tuple[np.ndarray, dict]:
    """Open a finished latent cache read-only: ``(latents memmap, info)``.

    Args:
        folder: the cache folder.
        key: the :func:`latent_cache_key` it must have been built for; None skips the check.

    Raises:
        FileNotFoundError: no finished cache in ``folder``.
        StaleLatentCacheError: the cache was built for another key; the message names what differs.
    """
    folder = Path(folder)
    if not (folder / INFO_FILE).is_file() or not (folder / LATENTS_FILE).is_file():
        raise FileNotFoundError(f"No finished latent cache in {str(folder)!r} (no {INFO_FILE} / {LATENTS_FILE}).")
    info = read_json(folder / INFO_FILE)
    if key is not None:
        stored = info.get("key", {})
        differ = [name for name in key if stored.get(name) != key[name]]
        if differ:
            reasons = "; ".join(_KEY_MEANINGS.get(name, name) for name in differ)
            raise StaleLatentCacheError(
                f"The latent cache {str(folder)!r} does not match this run: {reasons} ({', '.join(differ)}). Delete "
                "the folder, or let LatentCacheDataset rebuild it (it does so whenever the key differs)."
            )
    latents = np.load(folder / LATENTS_FILE, mmap_mode="r")
    if list(latents.shape) != list(info.get("shape", [])):
        raise StaleLatentCacheError(
            f"The latent cache {str(folder)!r} holds an array of shape {list(latents.shape)} but its {INFO_FILE} "
            f"says {info.get('shape')}; delete the folder to rebuild it."
        )
    return latents, info


def _encode_shard(
    latents: np.ndarray,
    rows: Sequence[int],
    datalist: Sequence[Mapping[str, Any]],
    autoencoder: nn.Module,
    image_transform: Callable,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> None:
    """Encode the spots ``rows`` of ``datalist`` in all 8 variants into ``latents`` (a writable memmap)."""
    from monai.data import DataLoader, Dataset

    entries = [{**datalist[r], "cache_row": r} for r in rows]
    loader = DataLoader(Dataset(entries, image_transform), batch_size=batch_size, num_workers=num_workers)
    channels = latents.shape[2] // 2
    done, start = 0, time.monotonic()
    last_report = start
    with torch.no_grad():
        for batch in loader:
            images = torch.as_tensor(batch["image"]).to(device=device, dtype=torch.float32)
            block = torch.empty((images.shape[0], NUM_VARIANTS, 2 * channels, *latents.shape[3:]))
            for variant in range(NUM_VARIANTS):
                mean, std = autoencoder.encode(dihedral(images, variant))
                block[:, variant, :channels] = mean.float().cpu()
                block[:, variant, channels:] = 2.0 * torch.log(std.float().cpu())
            index = torch.as_tensor(batch["cache_row"]).numpy()
            latents[index] = block.numpy().astype(latents.dtype)
            done += len(index)
            if time.monotonic() - last_report > 30.0:
                last_report = time.monotonic()
                logger.info(f"latent cache: encoded {done}/{len(rows)} spots ({last_report - start:.0f} s)")
    latents.flush()


def ensure_latent_cache(
    folder: str | os.PathLike,
    key: Mapping[str, Any],
    datalist: Sequence[Mapping[str, Any]],
    autoencoder: nn.Module,
    image_transform: Callable,
    batch_size: int = 16,
    num_workers: int = 0,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, dict]:
    """Open the latent cache in ``folder`` when it was built for ``key``, else (re)build it; return it as
    :func:`open_latent_cache` does.

    Under ``torchrun`` every rank must call it (it uses collectives): rank 0 decides whether to rebuild and creates
    the staging folder and the memory-mapped array, every rank encodes its shard of the spots
    (:func:`bundle.distributed.shard`), then rank 0 writes ``info.json`` and renames the staging folder onto
    ``folder``. The ranks must share ``folder`` (one machine, or a shared file system across nodes, as resuming
    from rank 0's checkpoints already needs).

    Args:
        folder: the cache folder (``<output_dir>/latent_cache``).
        key: :func:`latent_cache_key` of this run.
        datalist: the training entries, in cache-row order.
        autoencoder: the frozen autoencoder (``encode(images) -> (mean, std)``), on ``device``.
        image_transform: turns an entry into ``{"image": (3, H, W) float in [-1, 1], ...}`` without augmentation.
        batch_size: patches encoded at once (each in 8 variants, one after the other).
        num_workers: DataLoader workers reading the patches.
        device: where the autoencoder runs. Defaults to the device of its parameters.
    """
    folder = Path(folder)
    reason = None
    if distributed.rank() == 0:
        try:
            open_latent_cache(folder, key)
        except (FileNotFoundError, StaleLatentCacheError) as error:
            reason = str(error)
    reason = distributed.broadcast_object(reason)
    if reason is None:
        return open_latent_cache(folder, key)
    model = unwrap_network(autoencoder).eval()
    if device is None:
        device = next(model.parameters()).device
    shape = (len(datalist), NUM_VARIANTS, *_latent_shape(model, image_transform, datalist, device, key["dtype"]))
    start = time.monotonic()
    staging = StagingDir(folder, "latent cache") if distributed.rank() == 0 else None
    path = None
    if staging is not None:
        logger.info(f"building the latent cache {str(folder)!r} ({reason})")
        path = staging.create()
        memmap_array(path, Path(LATENTS_FILE).stem, shape, dtype=key["dtype"]).flush()
    path = Path(distributed.broadcast_object(None if path is None else str(path)))
    try:
        latents = np.load(path / LATENTS_FILE, mmap_mode="r+")
        rows = distributed.shard(len(datalist), block=batch_size)
        _encode_shard(latents, rows, datalist, model, image_transform, batch_size, num_workers, torch.device(device))
        del latents
        distributed.barrier()
        if staging is not None:
            seconds = time.monotonic() - start
            info = {"key": dict(key), "shape": list(shape), "variants": "dihedral D4", "build_seconds": seconds}
            write_json_atomic(path / INFO_FILE, info)
            staging.commit()
            logger.info(f"latent cache {str(folder)!r}: {shape[0]} spots x 8 variants in {seconds:.1f} s")
    except BaseException:
        if staging is not None:
            staging.discard()
        raise
    distributed.barrier()
    return open_latent_cache(folder, key)


def _latent_shape(model: nn.Module, image_transform: Callable, datalist, device, dtype) -> tuple[int, int, int]:
    """``(2 * C, h, w)`` of one cache row, from encoding the first spot."""
    if not datalist:
        raise ValueError("the training datalist is empty: there is nothing to cache; check the dataset's splits.")
    image = torch.as_tensor(apply_transform(image_transform, dict(datalist[0]))["image"])
    with torch.no_grad():
        mean, _ = model.encode(image[None].to(device=device, dtype=torch.float32))
    return 2 * mean.shape[1], mean.shape[2], mean.shape[3]


class LatentCacheDataset(Randomizable, torch.utils.data.Dataset):
    """Training items on cached latents: ``{"latent_mean", "latent_std", <the entry's other keys>}`` of a random
    dihedral variant, then ``transform`` (the expression loaders and the condition dropout).

    The constructor builds the cache when needed (:func:`ensure_latent_cache`; under ``torchrun`` on every rank), like
    MONAI's ``CacheDataset`` fills its cache. Items leave out the entry's ``image`` (the slide path): the latent
    stands for it. ``latent_std`` is ``exp(logvar / 2)`` of the stored log-variance, in float32.

    Args:
        data: the training datalist (``image``, ``location``, ``mpp``, ``expression``, ``neighbors``, ...).
        transform: applied to each item (e.g. ``LoadExpressiond``, ``SpatialContextd``, ``RandDropConditiond``).
        cache_dir: the cache folder (``<output_dir>/latent_cache``).
        autoencoder: the frozen autoencoder, on ``device``.
        autoencoder_ckpt: its checkpoint file (its SHA-256 is part of the key: another autoencoder rebuilds).
        fov_um: patch field of view in micrometres.
        size: patch size in pixels.
        backend: slide reader for building (see ``LoadWSIPatchd``).
        dtype: storage dtype, ``"float16"`` (default) or ``"float32"``.
        batch_size: patches encoded at once while building.
        num_workers: DataLoader workers reading patches while building.
        device: where the autoencoder runs while building.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        transform: Callable | None,
        cache_dir: str | os.PathLike,
        autoencoder: nn.Module,
        autoencoder_ckpt: str | os.PathLike,
        fov_um: float,
        size: int,
        backend: str | None = None,
        dtype: str = "float16",
        batch_size: int = 16,
        num_workers: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        self.data = [dict(entry) for entry in data]
        self.transform = transform
        self.cache_dir = Path(cache_dir)
        self.key = latent_cache_key(autoencoder_ckpt, self.data, fov_um, size, dtype)
        latents, self.info = ensure_latent_cache(
            self.cache_dir,
            self.key,
            self.data,
            autoencoder,
            cache_image_transform(fov_um, size, backend),
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
        )
        self.channels = latents.shape[2] // 2
        self._latents: np.ndarray | None = latents

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_latents"] = None  # reopened in each process: pickling a memmap would copy the whole array
        return state

    @property
    def latents(self) -> np.ndarray:
        if self._latents is None:
            self._latents = open_latent_cache(self.cache_dir)[0]
        return self._latents

    def __len__(self) -> int:
        return len(self.data)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        self._variant = int(self.R.randint(NUM_VARIANTS))

    def __getitem__(self, index: int) -> Any:
        self.randomize()
        row = np.array(self.latents[index, self._variant], dtype=np.float32)  # a copy: the memmap is read-only
        mean, logvar = row[: self.channels], np.clip(row[self.channels :], *_LOGVAR_RANGE)
        item = {k: v for k, v in self.data[index].items() if k != "image"}
        item["latent_mean"] = torch.from_numpy(mean)
        item["latent_std"] = torch.from_numpy(np.exp(0.5 * logvar))
        item["latent_variant"] = self._variant
        return apply_transform(self.transform, item) if self.transform is not None else item


def cache_image_transform(fov_um: float, size: int, backend: str | None = None) -> Callable:
    """The image path's deterministic part for building a cache: read the patch, scale 0-255 to [-1, 1]."""
    from monai.transforms import Compose, EnsureTyped, ScaleIntensityRanged

    from bundle.transforms import LoadWSIPatchd

    return Compose(
        [
            LoadWSIPatchd(keys="image", fov_um=fov_um, size=size, backend=backend),
            ScaleIntensityRanged(keys="image", a_min=0.0, a_max=255.0, b_min=-1.0, b_max=1.0, clip=True),
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        ]
    )
