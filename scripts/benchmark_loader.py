"""Patch-loading throughput: raw readers against LoadWSIPatchd and MONAI's PatchWSIDataset, on the same spots.

Prints a Markdown table (patches/s and the ratio to the raw reader of the same backend), for the demo slide and the
real Aperio SVS in the shared test data. Example:

    python scripts/benchmark_loader.py --num-patches 200 --size 224

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


def raw_reader(backend: str, path: str, locations_xy: np.ndarray, size: int) -> None:
    """Read every patch with the library's own call, level 0, no MONAI in between."""
    half = size // 2
    if backend == "cucim":
        from cucim import CuImage

        slide = CuImage(path)
        for x, y in locations_xy:
            np.asarray(slide.read_region((int(x) - half, int(y) - half), (size, size), 0))
    elif backend == "openslide":
        import openslide

        slide = openslide.OpenSlide(path)
        for x, y in locations_xy:
            np.asarray(slide.read_region((int(x) - half, int(y) - half), 0, (size, size)).convert("RGB"))
        slide.close()
    else:
        import tifffile
        import zarr

        with tifffile.TiffFile(path) as tif:
            array = zarr.open(tif.aszarr(series=0, level=0), mode="r")
            for x, y in locations_xy:
                np.asarray(array[int(y) - half : int(y) - half + size, int(x) - half : int(x) - half + size])


def run_loader(dataset, workers: int, batch_size: int = 16):
    from monai.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0)
    for _ in loader:  # warm-up epoch: worker start-up and slide opening
        pass
    return loader


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def benchmark_slide(name: str, path: str, locations_xy: np.ndarray, mpp: float, size: int, backends: list[str]) -> list:
    from monai.data import Dataset, PatchWSIDataset

    from bundle.transforms import LoadWSIPatchd

    n = len(locations_xy)
    rows = []
    entries = [{"image": path, "location": [float(x), float(y)], "mpp": mpp} for x, y in locations_xy]
    for backend in backends:
        base = timed(lambda: raw_reader(backend, path, locations_xy, size), repeat=3)
        rows.append((name, backend, "raw read_region (level 0)", n / base, 1.0))
        for workers in (0, 2):
            transform = LoadWSIPatchd("image", fov_um=size * mpp, size=size, backend=backend)
            loader = run_loader(Dataset(entries, transform=transform), workers)
            t = timed(lambda: [None for _ in loader], repeat=3)
            rows.append((name, backend, f"LoadWSIPatchd, DataLoader {workers} workers", n / t, base / t))
        transform = LoadWSIPatchd("image", fov_um=size * mpp * 2, size=size, backend=backend)
        loader = run_loader(Dataset(entries, transform=transform), 0)
        t = timed(lambda: [None for _ in loader], repeat=3)
        rows.append((name, backend, "LoadWSIPatchd, 2x field of view resized, 0 workers", n / t, base / t))
        reader = TiffZarrWSIReader() if backend == "tifffile" else backend
        patch_data = [{"image": path, "location": [int(y), int(x)]} for x, y in locations_xy]
        dataset = PatchWSIDataset(patch_data, patch_size=size, patch_level=0, include_label=False, reader=reader)
        loader = run_loader(dataset, 0)
        t = timed(lambda: [None for _ in loader], repeat=3)
        rows.append((name, backend, "MONAI PatchWSIDataset, 0 workers", n / t, base / t))
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
    args = parser.parse_args(argv)

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
            rows += benchmark_slide(name, path, locations, info.mpp, args.size, backends)
    print(
        f"\n{args.num_patches} patches of {args.size}x{args.size} px per row, best of 3 timed epochs after a warm-up\n"
    )
    print("| slide | backend | loader | patches/s | ratio to raw reader |")
    print("|---|---|---|---:|---:|")
    for name, backend, what, rate, ratio in rows:
        print(f"| {name} | {backend} | {what} | {rate:.0f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
