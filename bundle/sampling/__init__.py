"""From expression to tissue: the diffusers-style sampler, per-spot generation, counterfactual edits and whole
synthetic slides.

Modules: :mod:`~bundle.sampling.pipeline` (the sampler), :mod:`~bundle.sampling.generation` (per-spot generation for
``configs/inference.json``), :mod:`~bundle.sampling.edits` (expression edits), :mod:`~bundle.sampling.edit_grid`
(counterfactual edit grids), :mod:`~bundle.sampling.grids` (PNG grids of patches), :mod:`~bundle.sampling.slide`
(whole-slide synthesis), :mod:`~bundle.sampling.slide_plan` (its input checks and layout),
:mod:`~bundle.sampling.slide_io` (its spots, thumbnail and summary) and :mod:`~bundle.sampling.seams` (the seam
metric).
"""
