"""Spatial-transcriptomics-conditioned latent diffusion for H&E tissue: the bundle's custom components.

Configs reach this package with ``"$import bundle"`` and dotted ``_target_`` names such as
``bundle.transforms.LoadWSIPatchd``. Importing it stays light: scanpy, anndata, mlflow and cuCIM are
imported only inside the functions that need them.
"""

from __future__ import annotations

__version__ = "0.8.0"
