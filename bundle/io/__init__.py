"""Reading and writing the files this bundle meets: slides, spot tables and counts, gene panels, prepared datasets,
pyramidal TIFFs."""
