"""Synthetic colorectal-cancer Visium study: H&E slides plus matching 10x Space Ranger outputs.

Real Visium slides cannot be downloaded everywhere the bundle must run, so this package simulates a small
study that exercises every reader of the bundle with real file formats:

* a pyramidal, tiled, JPEG-compressed TIFF per slide at 0.25 um/px (40x), written by
  :func:`bundle.io.tiff.write_pyramidal_tiff`;
* a Space Ranger 2.x ``outs``-style folder per slide (``filtered_feature_bc_matrix.h5`` in the 10x HDF5 v3 layout,
  ``spatial/tissue_positions.csv``, ``scalefactors_json.json``, hires and lowres PNGs) that ``scanpy.read_visium``
  loads;
* a ``ground_truth.csv`` per slide with the tissue-compartment fractions inside every spot;
* ``manifest.csv`` and ``README.md`` for the whole study.

How a slide is made (:func:`simulate_slide`):

1. **Layout** (at 1 um/px): an irregular tissue outline with a glass margin on some sides and tissue running off the
   slide on others, small tears, and seven spatially coherent compartments (:data:`COMPARTMENTS`) arranged like a
   colon wall cut through a tumour: normal mucosa on one side, pericolic fat on the other, a tumour mass between them
   in desmoplastic stroma, central necrosis inside the tumour wrapped in a hypoxic rim of viable tumour cells, and
   lymphoid aggregates at the invasive front and under the mucosa.
2. **Histology** (stain densities at 1 um/px, nuclei at 0.25 um/px): haematoxylin and eosin concentration maps per
   compartment (glands with lumens, crypts with goblet cells, wavy collagen bundles, adipocyte vacuoles, amorphous
   necrosis) are upsampled to 40x, nuclei are stamped from banks of pre-drawn kernels (elongated hyperchromatic
   tumour nuclei radially oriented around gland lumens, spindle fibroblasts along the collagen, dense round
   lymphocytes, flat adipocyte nuclei, karyorrhectic debris), then converted to RGB with the Beer-Lambert law and a
   per-slide perturbation of the stain vectors. Every compartment differs in colour, nuclear density and texture scale
   at 2 um/px too (collagen bundles are 6-10 um wide), not only at full resolution.
3. **Spots**: the Visium hexagonal lattice (55 um spots, 100 um apart) over the whole slide; a spot is in tissue when
   at least ``in_tissue_min_coverage`` of its disk is tissue.
4. **Expression**: real gene symbols in compartment programmes (:data:`GENE_PROGRAMMES`) plus housekeeping and
   background genes; counts are negative-binomial (gamma-Poisson) around a library size that depends on the
   compartments in the spot times a mixture of compartment profiles weighted by the compartment fractions.

Everything is drawn from ``numpy.random.default_rng`` streams derived from ``(seed, slide_index)``, so the same seed
gives identical counts and identical pixels.

Modules:

* :mod:`~bundle.demo.study`: :func:`make_demo_dataset`, the whole study on disk (slides in parallel processes,
  ground truth, ``README.md``, ``manifest.csv``);
* :mod:`~bundle.demo.slide`: :func:`simulate_slide` and :class:`SimulatedSlide`, one slide in memory;
* :mod:`~bundle.demo.compartments`: :data:`COMPARTMENTS` and the glass label;
* :mod:`~bundle.demo.layout`: step 1, outline, compartment label map and structure seeds;
* :mod:`~bundle.demo.histology`: step 2, stain maps and nucleus placement, with :mod:`~bundle.demo.nuclei` (nucleus
  kernels) and :mod:`~bundle.demo.stains` (Beer-Lambert colour model);
* :mod:`~bundle.demo.fields`: random fields and raster helpers shared by layout and histology;
* :mod:`~bundle.demo.visium`: step 3, spot lattice, barcodes and compartment fractions per spot;
* :mod:`~bundle.demo.genes`: the gene panel (:data:`GENE_PROGRAMMES`, housekeeping, background genes);
* :mod:`~bundle.demo.expression`: step 4, compartment profiles and negative-binomial counts;
* :mod:`~bundle.demo.spaceranger`: the Space Ranger 2.x folder writer;
* :mod:`~bundle.demo.files`: atomic text, CSV and file writes.
"""

from bundle.demo.compartments import COMPARTMENTS
from bundle.demo.genes import BACKGROUND_GENES, GENE_PROGRAMMES, HOUSEKEEPING_GENES, demo_gene_table
from bundle.demo.slide import SimulatedSlide, simulate_slide
from bundle.demo.spaceranger import write_spaceranger_outputs
from bundle.demo.study import make_demo_dataset
from bundle.demo.visium import visium_barcodes, visium_spot_lattice

__all__ = [
    "COMPARTMENTS",
    "GENE_PROGRAMMES",
    "HOUSEKEEPING_GENES",
    "BACKGROUND_GENES",
    "SimulatedSlide",
    "demo_gene_table",
    "make_demo_dataset",
    "simulate_slide",
    "visium_barcodes",
    "visium_spot_lattice",
    "write_spaceranger_outputs",
]
