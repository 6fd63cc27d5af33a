"""The tissue compartments of the simulated sections and the label of glass."""

from __future__ import annotations

COMPARTMENTS: tuple[str, ...] = ("tumour", "stroma", "immune", "adipose", "necrosis", "hypoxic_rim", "normal_mucosa")
"""Tissue compartments of the simulated colorectal-cancer sections, in label order (label ``i`` = ``COMPARTMENTS[i]``,
-1 = glass)."""

GLASS = -1
"""Label of glass (no tissue) in the compartment label maps."""
