"""Transforms for (slide patch, expression) pairs, as array + dictionary pairs in MONAI's style."""

from __future__ import annotations

from bundle.transforms.array import (
    LoadExpression,
    LoadWSIPatch,
    NormalizeExpression,
    RandHEStainJitter,
    SelectGenes,
    SpatialContext,
    check_counts,
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
