"""Import a Stable Diffusion VAE from a local diffusers folder as the bundle's stage-1 autoencoder checkpoint.

Example::

    python scripts/import_sd_vae.py --vae-dir ~/sd-v1-5/vae --output models/autoencoder.pt

The folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``); nothing is downloaded.
The checkpoint stores the MONAI weights, the network's arguments and the folder's ``scaling_factor`` as the latent
scale factor, and loads with ``bundle.autoencoder.load_autoencoder_checkpoint``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing the package


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, convert the VAE and write the checkpoint.

    Args:
        argv: command-line arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The process exit status (0 on success, 2 for a bad folder or weights).
    """
    from bundle.autoencoder import import_sd_vae, read_scale_factor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae-dir", required=True, help="diffusers AutoencoderKL folder (or a pipeline with vae/)")
    parser.add_argument("--output", default="models/autoencoder.pt", help="checkpoint to write (default: %(default)s)")
    parser.add_argument(
        "--use-combined-linear", action="store_true", help="store attention q/k/v as one qkv layer (MONAI option)"
    )
    parser.add_argument(
        "--use-flash-attention", action="store_true", help="build the network with torch's fused attention"
    )
    args = parser.parse_args(argv)
    try:
        path = import_sd_vae(
            args.vae_dir,
            args.output,
            use_combined_linear=args.use_combined_linear,
            use_flash_attention=args.use_flash_attention,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} (latent scale factor {read_scale_factor(path):g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
