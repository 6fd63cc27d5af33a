"""The simulator's gene panel: compartment programmes, housekeeping and background genes, with their ids."""

from __future__ import annotations

# Real HGNC symbols. A gene belongs to one programme only; compartments mix programmes (see _PROGRAMME_WEIGHTS).
GENE_PROGRAMMES: dict[str, tuple[str, ...]] = {
    # intestinal epithelium, shared by tumour and normal mucosa
    "epithelial": (
        "EPCAM", "KRT8", "KRT18", "KRT19", "KRT20", "CDX1", "CDX2", "CDH17", "VIL1", "ELF3", "CLDN4", "PHGR1", "TSPAN8",
    ),
    # colorectal adenocarcinoma: proliferation, stem-like / WNT targets, CEA family
    "tumour": (
        "CEACAM5", "CEACAM6", "MKI67", "TOP2A", "PCNA", "LGR5", "ASCL2", "OLFM4", "AXIN2", "MYC", "SOX9", "CCND1",
    ),
    # cancer-associated fibroblasts, extracellular matrix, vessels
    "stroma": (
        "COL1A1", "COL1A2", "COL3A1", "COL5A1", "COL6A3", "ACTA2", "TAGLN", "DCN", "LUM", "FAP", "POSTN", "SPARC",
        "FN1", "VIM", "PDGFRB", "THY1", "MMP2", "CTHRC1", "INHBA", "SFRP2", "PECAM1", "VWF", "CDH5", "PLVAP",
    ),
    # lymphoid aggregates: T cells, B cells, plasma cells, some myeloid cells
    "immune": (
        "PTPRC", "CD3E", "CD3D", "CD2", "CD8A", "CD4", "GZMB", "NKG7", "CCL5", "IL7R", "MS4A1", "CD19", "CD79A",
        "CD79B", "CR2", "CXCL13", "IGKC", "IGHG1", "IGHA1", "JCHAIN", "MZB1", "CD74", "HLA-DRA", "LYZ", "CD68",
        "CD163", "C1QA",
    ),
    # pericolic adipose tissue
    "adipose": ("ADIPOQ", "PLIN1", "PLIN4", "FABP4", "LEP", "LPL", "CD36", "CFD", "CIDEA", "RBP4", "GPD1", "PPARG"),
    # necrosis: little RNA, stress response, neutrophil debris
    "necrosis": ("HSPA1A", "HSPA1B", "DDIT3", "ATF3", "FOS", "JUN", "S100A8", "S100A9", "MT2A", "MT1X", "HMOX1"),
    # hypoxia response of viable tumour next to necrosis (HIF1A targets)
    "hypoxia": (
        "CA9", "VEGFA", "SLC2A1", "LDHA", "BNIP3", "NDRG1", "PGK1", "ADM", "ANGPTL4", "P4HA1", "ENO1", "ERO1A",
        "EGLN3", "PDK1",
    ),
    # normal colonic mucosa: goblet cells and colonocytes
    "mucosa": (
        "MUC2", "TFF3", "CA1", "CA2", "CA4", "SLC26A3", "GUCA2A", "GUCA2B", "AQP8", "CLCA1", "FCGBP", "ZG16", "SPINK4",
        "CEACAM7", "MS4A12", "CLCA4",
    ),
}  # fmt: skip


HOUSEKEEPING_GENES: tuple[str, ...] = (
    "ACTB", "GAPDH", "B2M", "RPLP0", "EEF1A1", "TPT1", "RPS18", "RPL13A", "RPS27A", "RPL32", "PPIA", "HPRT1", "TBP",
    "UBC", "YWHAZ", "TMSB4X", "FTL", "FTH1", "MALAT1", "MT-CO1", "MT-CO2", "MT-CO3", "MT-ND1", "MT-ATP6", "MT-CYB",
)  # fmt: skip
"""Genes expressed at a high, compartment-independent level."""


BACKGROUND_GENES: tuple[str, ...] = (
    "TP53", "PTEN", "RB1", "BRCA1", "BRCA2", "ATM", "MDM2", "CDKN1A", "CDKN1B", "CDK4", "CDK6", "GSK3B", "CTNNB1",
    "APC", "KRAS", "NRAS", "BRAF", "PIK3CA", "AKT1", "MTOR", "MAPK1", "MAPK3", "EGFR", "ERBB2", "SMAD3", "SMAD4",
    "TGFB1", "TGFBR2", "NOTCH1", "STAT3", "ATP5F1A", "ATP5F1B", "NDUFA4", "COX4I1", "COX7C", "UQCRH", "SDHA", "SDHB",
    "CS", "IDH1", "IDH2", "MDH1", "MDH2", "SLC25A3", "TFRC", "SRSF1", "SRSF2", "SRSF3", "HNRNPA1", "HNRNPK", "SNRPB",
    "POLR2A", "SF3B1", "DDX5", "HSP90AA1", "HSP90AB1", "HSPA8", "CCT2", "PSMA1", "PSMB1", "UBB", "UBE2D3", "EIF4A1",
    "EIF4G1", "EEF2", "PABPC1", "NPM1", "NCL", "TUBA1B", "TUBB", "ACTG1", "MYL6", "CFL1", "PFN1", "CALM1", "CALM2",
    "SOD1", "PRDX1", "TXN", "PARK7", "ARF1", "RAB7A", "RHOA", "RAC1", "CDC42", "GNAS", "SEC61B", "CANX", "CALR",
    "PDIA3",
)  # fmt: skip
"""Real, broadly expressed genes given random levels with no compartment pattern ("noise" genes)."""


def demo_gene_table() -> tuple[list[str], list[str], list[str]]:
    """The simulator's gene panel.

    Returns:
        ``(gene_ids, gene_names, gene_programme)``: synthetic but well-formed Ensembl ids (``ENSG99...``, a range
        that no real Ensembl gene uses), real HGNC symbols, and each gene's programme name (a key of
        :data:`GENE_PROGRAMMES`, ``"housekeeping"`` or ``"background"``).
    """
    names: list[str] = []
    programmes: list[str] = []
    for programme, genes in GENE_PROGRAMMES.items():
        names.extend(genes)
        programmes.extend([programme] * len(genes))
    names.extend(HOUSEKEEPING_GENES)
    programmes.extend(["housekeeping"] * len(HOUSEKEEPING_GENES))
    names.extend(BACKGROUND_GENES)
    programmes.extend(["background"] * len(BACKGROUND_GENES))
    if len(set(names)) != len(names):
        duplicated = sorted({n for n in names if names.count(n) > 1})
        raise RuntimeError(f"gene tables list these symbols more than once: {duplicated}; each gene needs one home.")
    ids = [f"ENSG99{index:09d}" for index in range(len(names))]
    return ids, names, programmes
