"""Transforms for (slide patch, expression) pairs, as array + dictionary pairs in MONAI's style.

Modules: :mod:`bundle.transforms.array` (one spot's slide patch, expression vector, neighbourhood and stain
augmentation) and :mod:`bundle.transforms.dictionary` (their dictionary wrappers). Both are re-exported here.
"""

from __future__ import annotations

from bundle.transforms.array import (
    LoadExpression,
    LoadWSIPatch,
    NormalizeExpression,
    RandHEStainJitter,
    SelectGenes,
    SpatialContext,
)
from bundle.transforms.dictionary import (
    LoadExpressiond,
    LoadWSIPatchd,
    NormalizeExpressiond,
    RandDropConditiond,
    RandHEStainJitterd,
    SelectGenesd,
    SpatialContextd,
)
