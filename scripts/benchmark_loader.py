"""Patch-loading throughput: raw readers against LoadWSIPatchd and MONAI's PatchWSIDataset, on the same spots.

Prints a Markdown table (patches/s and the ratio to the raw reader of the same backend), for the demo slide and the
real Aperio SVS in the shared test data. Example:

    python scripts/benchmark_loader.py --num-patches 200 --size 224

After a warm-up epoch, every loader is timed for ``--rounds`` epochs, each paired with an epoch of the raw reader
over the same spots: in one process batch by batch (each loader batch next to the raw reads of its own 16 spots, in
alternating order), with DataLoader workers epoch by epoch. The table gives the loader's median patches/s, the median
and range over rounds of the raw-to-loader time ratio, and, in one process, the same ratio in CPU time of the process,
which other programs on a shared machine disturb less than wall-clock time. The main process runs torch with
``--torch-threads`` threads (1 by default, as DataLoader workers do): on a busy machine, OpenMP threads spin-waiting
for a core can make each multi-threaded ``torch.stack`` of a batch take a tenth of a second.

The demo slide is generated into a temporary folder unless --demo-dir points at existing demo data.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bundle.io.slides import TiffZarrWSIReader, available_backends, read_slide_info

BATCH = 16  # DataLoader batch size


def raw_reader(backend: str, path: str, size: int):
    """``(read, close)``: ``read(locations_xy)`` reads every patch with the library's own call, level 0, no MONAI.

    The slide is opened once, outside the timed reads, as the loaders keep their handles open.
    """
    half = size // 2
    if backend == "cucim":
        from cucim import CuImage

        slide = CuImage(path)

        def read(locations_xy):
            for x, y in locations_xy:
                np.asarray(slide.read_region((int(x) - half, int(y) - half), (size, size), 0))

        return read, lambda: None
    if backend == "openslide":
        import openslide

        slide = openslide.OpenSlide(path)

        def read(locations_xy):
            for x, y in locations_xy:
                np.asarray(slide.read_region((int(x) - half, int(y) - half), 0, (size, size)).convert("RGB"))

        return read, slide.close
    import tifffile
    import zarr

    tif = tifffile.TiffFile(path)
    array = zarr.open(tif.aszarr(series=0, level=0), mode="r")

    def read(locations_xy):
        for x, y in locations_xy:
            np.asarray(array[int(y) - half : int(y) - half + size, int(x) - half : int(x) - half + size])

    return read, tif.close


def run_loader(dataset, workers: int):
    from monai.data import DataLoader

    loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers, persistent_workers=workers > 0)
    for _ in loader:  # warm-up epoch: worker start-up and slide opening
        pass
    return loader


def paired_epoch(loader, read, locations_xy: np.ndarray, flip: bool) -> np.ndarray:
    """Wall-clock and CPU seconds of one raw-reader epoch and one loader epoch over the same spots, side by side.

    In one process, batch by batch: each loader batch is timed next to the raw reads of its own spots, the two in
    alternating order (``flip`` swaps it). With workers, which read ahead while the main process waits, the two whole
    epochs are timed one after the other (the raw epoch first when ``flip``), and the main process's CPU time says
    nothing (NaN).

    Returns:
        ``[raw wall, loader wall, raw CPU, loader CPU]`` seconds.
    """
    if loader.num_workers:
        times = timed_pair(lambda: read(locations_xy), lambda: [None for _ in loader], raw_first=flip)
        times[2:] = np.nan
        return times
    total = np.zeros(4)
    batches = iter(loader)
    for i in range(0, len(locations_xy), BATCH):
        raw_first = bool((i // BATCH + flip) % 2)
        total += timed_pair(lambda: read(locations_xy[i : i + BATCH]), lambda: next(batches), raw_first)
    return total


def timed_pair(raw, loader, raw_first: bool) -> np.ndarray:
    """``[raw wall, loader wall, raw CPU, loader CPU]`` seconds of ``raw()`` and ``loader()``, run one after the other."""
    if raw_first:
        t_raw = seconds(raw)
        t_loader = seconds(loader)
    else:
        t_loader = seconds(loader)
        t_raw = seconds(raw)
    return np.array([t_raw[0], t_loader[0], t_raw[1], t_loader[1]])


def seconds(fn) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def benchmark_slide(
    name: str, path: str, locations_xy: np.ndarray, mpp: float, size: int, backends: list[str], rounds: int
) -> list:
    from monai.data import Dataset, PatchWSIDataset

    from bundle.transforms import LoadWSIPatchd

    n = len(locations_xy)
    rows = []
    entries = [{"image": path, "location": [float(x), float(y)], "mpp": mpp} for x, y in locations_xy]
    for backend in backends:
        read, close = raw_reader(backend, path, size)
        read(locations_xy)  # warm-up
        loaders = {}
        for label, meta, workers, fov in (
            ("LoadWSIPatchd, MetaTensor, DataLoader 0 workers", True, 0, 1),
            ("LoadWSIPatchd, plain tensor (meta=False), DataLoader 0 workers", False, 0, 1),
            ("LoadWSIPatchd, MetaTensor, DataLoader 2 workers", True, 2, 1),
            ("LoadWSIPatchd, 2x field of view resized, MetaTensor, 0 workers", True, 0, 2),
        ):
            transform = LoadWSIPatchd("image", fov_um=size * mpp * fov, size=size, backend=backend, meta=meta)
            loaders[label] = run_loader(Dataset(entries, transform=transform), workers)
        reader = TiffZarrWSIReader() if backend == "tifffile" else backend
        patch_data = [{"image": path, "location": [int(y), int(x)]} for x, y in locations_xy]
        dataset = PatchWSIDataset(patch_data, patch_size=size, patch_level=0, include_label=False, reader=reader)
        loaders["MONAI PatchWSIDataset, 0 workers"] = run_loader(dataset, 0)
        pairs: dict = {label: [] for label in loaders}
        for r in range(rounds):
            for label, loader in loaders.items():
                pairs[label].append(paired_epoch(loader, read, locations_xy, flip=bool(r % 2)))
        close()
        raw_wall = float(np.median([t[0] for timings in pairs.values() for t in timings]))
        rows.append((name, backend, "raw read_region (level 0)", n / raw_wall, (1.0, 1.0, 1.0), 1.0))
        for label, timings in pairs.items():
            t = np.array(timings)
            ratios = t[:, 0] / t[:, 1]
            ratio_cpu = float(np.median(t[:, 2] / t[:, 3]))
            summary = (float(np.median(ratios)), float(ratios.min()), float(ratios.max()))
            rows.append((name, backend, label, n / float(np.median(t[:, 1])), summary, ratio_cpu))
        del loaders  # ends the persistent workers
    return rows


def tissue_locations(path: str, num: int, size: int, seed: int) -> np.ndarray:
    """Random patch centres on tissue (not white glass), at least half a patch from the border."""
    import tifffile

    image = tifffile.imread(path, key=0)
    grey = image.mean(axis=2)
    rng = np.random.default_rng(seed)
    half = size // 2
    out = []
    while len(out) < num:
        x = rng.integers(half, image.shape[1] - half)
        y = rng.integers(half, image.shape[0] - half)
        if grey[y, x] < 215:
            out.append((x, y))
    return np.asarray(out, dtype=float)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-patches", type=int, default=200)
    parser.add_argument("--size", type=int, default=224, help="patch side in pixels")
    parser.add_argument("--demo-dir", default=None, help="existing demo data (default: generate one slide)")
    parser.add_argument(
        "--svs", default=str(Path(__file__).resolve().parents[2] / "shared/realdata/slides/cmu-1-small-region.svs")
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per loader, each paired with a raw run")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch threads of the main process (0: leave torch's default)"
    )
    args = parser.parse_args(argv)
    import torch

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    backends = available_backends()
    slides = []
    with tempfile.TemporaryDirectory() as tmp:
        demo_dir = Path(args.demo_dir) if args.demo_dir else Path(tmp) / "demo"
        if not args.demo_dir:
            from bundle.demo import make_demo_dataset

            make_demo_dataset(demo_dir, num_slides=1, seed=args.seed)
        demo_slide = sorted(demo_dir.glob("*/slide.tif"))[0]
        slides.append(("demo 40x JPEG TIFF", str(demo_slide)))
        if Path(args.svs).is_file():
            slides.append(("CMU-1 SVS (real, 20x)", args.svs))
        rows = []
        for name, path in slides:
            info = read_slide_info(path, backend="tifffile")
            locations = tissue_locations(path, args.num_patches, args.size, args.seed)
            rows += benchmark_slide(name, path, locations, info.mpp, args.size, backends, args.rounds)
    print(
        f"\n{args.num_patches} patches of {args.size}x{args.size} px per epoch; one warm-up epoch, then {args.rounds} "
        f"rounds, each loader epoch paired with a raw-reader epoch; torch threads in the main process: "
        f"{torch.get_num_threads()}\n"
    )
    print("| slide | backend | loader | patches/s | ratio to raw reader | ratio range | CPU-time ratio |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, backend, what, rate, (ratio, low, high), ratio_cpu in rows:
        cpu = "-" if np.isnan(ratio_cpu) else f"{ratio_cpu:.2f}"
        print(f"| {name} | {backend} | {what} | {rate:.0f} | {ratio:.2f} | {low:.2f}-{high:.2f} | {cpu} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
