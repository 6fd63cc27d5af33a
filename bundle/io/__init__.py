"""Reading and writing the files this bundle meets.

Modules: :mod:`bundle.io.slides` (whole-slide readers and pixel sizes), :mod:`bundle.io.spots` (Space Ranger, h5ad
and CSV spots, raw counts and their normalisation, ``read_spots`` for generation), :mod:`bundle.io.gene_panel`
(``gene_panel.json`` and panel selection), :mod:`bundle.io.dataset` (the dataset builder) and :mod:`bundle.io.tiff`
(pyramidal TIFF writing).
"""
