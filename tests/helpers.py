"""What the tests share: paths, the real-data folder, and one definition of the tiny networks every test trains.

In the spirit of diffusers' ``get_dummy_components``: tests build their networks here (or override the bundle configs
with :data:`TINY_TRAIN`), so that changing a tiny setting happens in one place. Test modules import from here, never
from each other.
"""

from __future__ import annotations

import copy
import csv
import os
import shutil
from pathlib import Path

import pytest
import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
REALDATA = Path(os.environ.get("ST_LDM_REALDATA", ROOT.parent / "shared" / "realdata"))


def realdata(*parts: str) -> Path:
    """Path of a file in the shared real-data folder; skips the test (with the reason) when it is absent."""
    path = REALDATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test file {path} is absent (set ST_LDM_REALDATA to the shared realdata folder)")
    return path


# stage 1: a one-downsampling KL autoencoder (x2), 3 latent channels, no attention
TINY_AUTOENCODER = {
    "spatial_dims": 2,
    "in_channels": 3,
    "out_channels": 3,
    "channels": [8, 8],
    "latent_channels": 3,
    "num_res_blocks": 1,
    "attention_levels": [False, False],
    "norm_num_groups": 4,
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
}
# stage 2: a two-level UNet with cross-attention at the second level
TINY_UNET = {
    "spatial_dims": 2,
    "channels": [8, 8],
    "attention_levels": [False, True],
    "num_head_channels": [0, 8],
    "num_res_blocks": 1,
    "norm_num_groups": 8,
    "transformer_num_layers": 1,
}
TINY_CROSS_ATTENTION_DIM = 16
TINY_GENE_ENCODER = {"num_tokens": 2, "hidden_dim": 32, "num_layers": 2}

# overrides of configs/train.json (and the inference/evaluation configs) for a run of seconds
TINY_TRAIN = {
    "patch_size": 32,
    "patch_fov_um": 64.0,
    "num_workers": 0,
    "cache_rate": 1.0,
    "batch_size": 4,
    "val_batch_size": 16,
    "num_sample_spots": 4,
    "autoencoder_kwargs": TINY_AUTOENCODER,
    "discriminator_kwargs": {"channels": 8, "num_layers_d": 1},
    "autoencoder_iterations": 4,
    "autoencoder_epoch_length": 2,
    "adv_start_iteration": 2,
    "cross_attention_dim": TINY_CROSS_ATTENTION_DIM,
    "num_context_tokens": TINY_GENE_ENCODER["num_tokens"],
    "gene_encoder_hidden_dim": TINY_GENE_ENCODER["hidden_dim"],
    "unet_kwargs": TINY_UNET,
    "num_iterations": 4,
    "epoch_length": 2,
    "warmup_iterations": 1,
    "sample_interval": 2,
    "num_inference_steps": 2,
    "expression_reader_iterations": 5,
}


def tiny_train_overrides(**changes) -> dict:
    """A deep copy of :data:`TINY_TRAIN` with ``changes`` applied (tests may mutate what they get)."""
    return {**copy.deepcopy(TINY_TRAIN), **copy.deepcopy(changes)}


def tiny_autoencoder(seed: int = 0, **changes) -> AutoencoderKL:
    """The tiny stage-1 autoencoder (``changes`` override :data:`TINY_AUTOENCODER`), seeded."""
    torch.manual_seed(seed)
    return AutoencoderKL(**{**TINY_AUTOENCODER, **changes})


def randomize_zero_init(module: torch.nn.Module, std: float = 0.1) -> None:
    """Give weights to the layers MONAI zero-initialises.

    A fresh ``DiffusionModelUNet`` outputs exactly 0 and ignores its context: the output convolution, every resnet
    block's second convolution and every ``SpatialTransformer``'s ``proj_out`` start at zero.
    """
    with torch.no_grad():
        for param in module.parameters():
            if not param.any():
                param.normal_(std=std)


def tiny_unet(in_channels: int = 3, cross_attention_dim: int | None = TINY_CROSS_ATTENTION_DIM, **changes):
    """The tiny stage-2 UNet (``changes`` override :data:`TINY_UNET`); no conditioning when the dim is None."""
    return DiffusionModelUNet(
        in_channels=in_channels,
        out_channels=in_channels,
        with_conditioning=cross_attention_dim is not None,
        cross_attention_dim=cross_attention_dim,
        **{**TINY_UNET, **changes},
    )


def tiny_network(
    num_genes: int, num_neighbors: int = 0, latent_channels: int = 3, seed: int = 0, randomize: bool = False, **changes
):
    """The tiny GeneCondNet-conditioned UNet; ``randomize`` fills MONAI's zero-initialised layers (outputs depend on
    the condition from the first step)."""
    from bundle.networks import GeneConditionedUNet, GeneCondNet

    torch.manual_seed(seed)
    encoder = GeneCondNet(
        num_genes, TINY_CROSS_ATTENTION_DIM, num_neighbors=num_neighbors, **{**TINY_GENE_ENCODER, **changes}
    )
    network = GeneConditionedUNet(encoder, tiny_unet(latent_channels))
    if randomize:
        randomize_zero_init(network)
    return network


def tiny_architecture(num_neighbors: int = 6) -> dict:
    """The ``architecture`` entry a tiny training run records in ``models/model.pt``."""
    return {
        "unet_kwargs": TINY_UNET,
        "cross_attention_dim": TINY_CROSS_ATTENTION_DIM,
        "num_context_tokens": TINY_GENE_ENCODER["num_tokens"],
        "gene_encoder_hidden_dim": TINY_GENE_ENCODER["hidden_dim"],
        "gene_encoder_num_layers": TINY_GENE_ENCODER["num_layers"],
        "add_condition_to_time_embedding": True,
        "num_neighbors": num_neighbors,
    }


# --- manifests and edited copies of the demo study (for input-check tests) ---


def write_manifest(path: Path, rows: list[dict]) -> Path:
    columns = ["sample_id", "st_path", "slide_path", "mpp", "split", "patient", "metadata_path", "layer", "technology"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def demo_rows(demo_root: Path) -> list[dict]:
    with (demo_root / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for col in ("st_path", "slide_path"):
            r[col] = str((demo_root / r[col]).resolve())
    return rows


def edit_positions(demo_root: Path, sample: str, out: Path, edit) -> str:
    """Copy a demo sample's Space Ranger folder to ``out`` and rewrite its tissue positions with ``edit(rows)``."""
    folder = out / sample
    shutil.copytree(demo_root / sample / "spaceranger", folder)
    positions = folder / "spatial" / "tissue_positions.csv"
    with positions.open() as f:
        rows = list(csv.DictReader(f))
    fields = list(rows[0])
    edit(rows)
    with positions.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return str(folder)


def swap_xy(rows: list[dict]) -> None:
    for r in rows:
        r["pxl_row_in_fullres"], r["pxl_col_in_fullres"] = r["pxl_col_in_fullres"], r["pxl_row_in_fullres"]


HER2ST_SECTIONS = ("B4", "C2", "C3", "C4", "C5")


def her2st_crop(section: str, dest: Path, half_width: int = 3, margin_px: int = 250, quality: int = 95) -> Path:
    """A small real crop of a her2st section, in the published layout: ``dest/<section>/`` with ``<section>.tsv.gz``
    (the spots' raw counts, every gene), ``<section>_selection.tsv`` (pixel centres shifted into the crop) and one
    JPEG of the full-resolution pixels around those spots.

    The spots are the array block of ``2 * half_width + 1`` columns and rows around the section's median spot (up to
    49 spots by default); the JPEG extends ``margin_px`` beyond the outermost spot centres. Skips when the shared
    her2st folder is absent.
    """
    import gzip

    import numpy as np
    import pandas as pd
    from PIL import Image

    source = realdata("her2st", section)
    out = Path(dest) / section
    if (out / f"{section}_selection.tsv").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    selection = pd.read_csv(source / f"{section}_selection.tsv", sep="\t")
    cx, cy = int(np.median(selection["x"])), int(np.median(selection["y"]))
    block = selection[(abs(selection["x"] - cx) <= half_width) & (abs(selection["y"] - cy) <= half_width)].copy()
    left = int(max(block["pixel_x"].min() - margin_px, 0))
    top = int(max(block["pixel_y"].min() - margin_px, 0))
    right, bottom = int(block["pixel_x"].max() + margin_px), int(block["pixel_y"].max() + margin_px)
    (jpeg,) = source.glob("*.jpg")
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(jpeg) as image:
        image.crop((left, top, right, bottom)).save(out / jpeg.name, quality=quality)
    block["pixel_x"] -= left
    block["pixel_y"] -= top
    block.to_csv(out / f"{section}_selection.tsv", sep="\t", index=False)
    names = {f"{x}x{y}" for x, y in zip(block["x"], block["y"])}
    with gzip.open(source / f"{section}.tsv.gz", "rt") as f:
        counts = pd.read_csv(f, sep="\t", index_col=0)
    counts.loc[[n for n in counts.index if n in names]].to_csv(out / f"{section}.tsv.gz", sep="\t")
    return out
