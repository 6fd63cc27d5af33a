"""H&E painting of a layout: stain densities per compartment at 1 um/px, nuclei stamped at full resolution, colour by
the Beer-Lambert stain model.

Compartments differ in colour, nuclear density and texture scale at 2 um/px too (collagen bundles are 6-10 um wide),
not only at full resolution: glands with lumens, crypts with goblet cells, wavy collagen, adipocyte vacuoles,
amorphous necrosis; elongated tumour nuclei oriented radially around gland lumens, spindle fibroblasts along the
collagen, dense round lymphocytes, flat adipocyte nuclei, karyorrhectic debris.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bundle.demo.compartments import COMPARTMENTS
from bundle.demo.fields import jittered_grid, lookup, resize_uint8, smooth_noise, smoothstep, stamp_disks
from bundle.demo.layout import Layout
from bundle.demo.nuclei import nucleus_bank, stamp_nuclei
from bundle.demo.stains import StainModel


def render_histology(
    rng: np.random.Generator, layout: Layout, mpp: float, factor: int, stain_jitter: float = 1.0
) -> tuple[np.ndarray, int]:
    """Paint the H&E image of a layout: stain maps at ``layout.px_um``, nuclei and colour at ``mpp``.

    Args:
        rng: random stream of the slide's image.
        layout: the slide's layout.
        mpp: output pixel size (um/px).
        factor: output pixels per layout pixel along each axis.
        stain_jitter: scale of the per-slide stain-colour variation (0 disables it).

    Returns:
        The (H, W, 3) uint8 RGB image (``H = factor * layout height``) and the number of nuclei drawn.
    """
    canvas = _Canvas.build(rng, layout)
    fibres, fibre_angle = _collagen(canvas)
    haem, eosin = _paint_stains(canvas, fibres)
    haem, eosin = _soften_edges(layout, *_add_vessels(canvas, haem, eosin))
    _tumour_nuclei(canvas, fibre_angle)
    _hypoxic_and_necrotic_nuclei(canvas)
    _stromal_nuclei(canvas, fibre_angle)
    _mucosal_nuclei(canvas)
    nuclei = canvas.nuclei
    del canvas, fibres, fibre_angle

    # to full resolution: quantised stain maps upsampled, nuclei stamped, colour by lookup table
    stains = StainModel.draw(rng, stain_jitter)
    full = (layout.labels.shape[0] * factor, layout.labels.shape[1] * factor)
    haem_full = resize_uint8(stains.quantise_haem(rng, haem), full)
    eosin_full = resize_uint8(stains.quantise_eosin(rng, eosin), full)
    del haem, eosin
    num_nuclei = _stamp_all_nuclei(rng, haem_full, nuclei, stains, mpp)
    return stains.to_rgb(rng, haem_full, eosin_full), num_nuclei


@dataclass
class _Canvas:
    """A layout seen per layout pixel (kind, lumen and dirtiness of each pixel's nearest structure seed), the random
    stream of the slide's image, and the nuclei placed so far as ``(kind, y_um, x_um, angle)`` groups."""

    rng: np.random.Generator
    layout: Layout
    kind: np.ndarray
    lumen: np.ndarray
    dirty: np.ndarray
    nuclei: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    @classmethod
    def build(cls, rng: np.random.Generator, layout: Layout) -> _Canvas:
        seeds, nearest = layout.seeds, layout.nearest
        return cls(rng, layout, seeds["kind"][nearest], seeds["lumen"][nearest].astype(np.float32),
                   seeds["dirty"][nearest])  # fmt: skip

    @property
    def shape(self) -> tuple[int, int]:
        return self.layout.labels.shape

    @property
    def px(self) -> float:
        return self.layout.px_um

    @property
    def labels(self) -> np.ndarray:
        return self.layout.labels

    @property
    def rho(self) -> np.ndarray:
        return self.layout.rho

    def noise(self, scale_um: float) -> np.ndarray:
        """A smooth random field over the layout with correlation length ~``scale_um``."""
        return smooth_noise(self.rng, self.shape, scale_um / self.px)

    def grid(self, spacing_um: float, jitter: float) -> tuple[np.ndarray, np.ndarray]:
        """Jittered grid points (um) over the whole layout."""
        h, w = self.shape
        return jittered_grid(self.rng, h * self.px, w * self.px, spacing_um, jitter)

    def at(self, grid: np.ndarray, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
        """Values of a layout map at points given in micrometres."""
        return lookup(grid, sy, sx, self.px)

    def is_label(self, name: str, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
        return self.at(self.labels, sy, sx) == COMPARTMENTS.index(name)

    def radial(self, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
        """Angle of each point seen from its nearest structure seed (nuclei stand radially around lumens)."""
        index = self.at(self.layout.nearest, sy, sx)
        return np.arctan2(sy - self.layout.seeds["y"][index], sx - self.layout.seeds["x"][index])

    def gland_epithelium(self, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
        """The basal two thirds of the epithelium of tumour glands."""
        r, lum = self.at(self.rho, sy, sx), self.at(self.lumen, sy, sx)
        return (self.at(self.kind, sy, sx) == 0) & (r > lum + 0.3 * (1 - lum)) & (r < 0.97)

    def between_glands(self, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
        return (self.at(self.kind, sy, sx) != 0) | (self.at(self.rho, sy, sx) > 1.06)

    def dirty_lumen(self, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
        return self.at(self.dirty, sy, sx) & (self.at(self.rho, sy, sx) < self.at(self.lumen, sy, sx) - 0.05)

    def crypt_base(self, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
        """The ring of basal nuclei in a mucosal crypt."""
        rho = self.at(self.rho, sy, sx)
        return (self.at(self.kind, sy, sx) == 1) & (rho > 0.8) & (rho < 0.96)

    def lamina_propria(self, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
        return (self.at(self.kind, sy, sx) != 1) | (self.at(self.rho, sy, sx) > 1.06)

    def on_membrane(self, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
        return self.at(self.layout.membrane, sy, sx) > 0.45

    def sites(
        self,
        spacing: float,
        label: str,
        keep: float,
        where: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
        jitter: float = 0.4,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nucleus positions: a jittered grid thinned to compartment ``label`` (and ``where``), each kept with
        probability ``keep``."""
        sy, sx = self.grid(spacing, jitter)
        selected = self.is_label(label, sy, sx)
        if where is not None:
            selected &= where(sy, sx)
        selected &= self.rng.random(sy.size) < keep
        return sy[selected], sx[selected]

    def add(self, kind_name: str, sy: np.ndarray, sx: np.ndarray, angle: np.ndarray | None = None) -> None:
        """Place nuclei of one kind; ``angle`` of the long axis, random when None."""
        angle = self.rng.uniform(0, math.pi, sy.size) if angle is None else angle
        self.nuclei.append((kind_name, sy, sx, angle))


def _collagen(canvas: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    """``(fibres, fibre_angle)``: wavy collagen bundles 6-10 um wide (iso-lines of a warped phase) that break up and
    end, and the direction they run in."""
    h, w = canvas.shape
    px, rng = canvas.px, canvas.rng
    y = ((np.arange(h, dtype=np.float32) + 0.5) * px)[:, None]
    x = ((np.arange(w, dtype=np.float32) + 0.5) * px)[None, :]
    theta0 = rng.uniform(0, math.pi)
    period = rng.uniform(20.0, 26.0)
    phase = (
        (x * math.cos(theta0) + y * math.sin(theta0)) / period + 4.0 * canvas.noise(200.0) + 1.0 * canvas.noise(50.0)
    )
    phase += 0.25 * canvas.noise(15.0)
    bundles = smoothstep(0.0, 0.6, np.cos(2.0 * math.pi * phase))  # ~40% of the period: 8-10 um bundles
    segments = smoothstep(-0.5, 0.4, canvas.noise(35.0))  # bundles break up and end
    fibres = bundles * segments * np.clip(0.8 + 0.35 * canvas.noise(90.0), 0.25, 1.0)
    del bundles, segments
    grad_y, grad_x = np.gradient(phase)
    return fibres, np.arctan2(grad_y, grad_x) + math.pi / 2  # bundles run along the iso-phase lines


def _paint(haem: np.ndarray, eosin: np.ndarray, mask: np.ndarray, h_value, e_value) -> None:
    """Set the stain densities under ``mask`` (values are maps or constants)."""
    haem[mask] = h_value[mask] if isinstance(h_value, np.ndarray) else h_value
    eosin[mask] = e_value[mask] if isinstance(e_value, np.ndarray) else e_value


def _paint_stains(canvas: _Canvas, fibres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin densities of every compartment at layout resolution."""
    labels = canvas.labels
    index = {name: i for i, name in enumerate(COMPARTMENTS)}
    haem = np.zeros(canvas.shape, dtype=np.float32)
    eosin = np.zeros(canvas.shape, dtype=np.float32)
    grain = canvas.noise(3.0)
    # stroma: pink collagen, paler clefts, a few vessels with red cells
    stroma_e = 0.24 + 0.34 * fibres + 0.05 * canvas.noise(7.0) + 0.02 * grain
    _paint(haem, eosin, labels == index["stroma"], np.float32(0.05) + 0.01 * grain, stroma_e)
    del stroma_e
    _paint(haem, eosin, labels == index["tumour"], *_tumour_stains(canvas, fibres, grain))
    # hypoxic rim: solid sheets of tumour cells with more eosinophilic cytoplasm
    sheet = canvas.noise(9.0)
    _paint(haem, eosin, labels == index["hypoxic_rim"], 0.19 + 0.03 * sheet, 0.40 + 0.05 * sheet + 0.03 * grain)
    _paint(haem, eosin, labels == index["necrosis"], *_necrosis_stains(canvas))
    # immune aggregates: little matrix between densely packed lymphocytes
    _paint(haem, eosin, labels == index["immune"], np.float32(0.11) + 0.02 * grain, 0.17 + 0.03 * grain)
    # adipose: empty vacuoles with thin pink membranes
    membrane = canvas.layout.membrane
    _paint(haem, eosin, labels == index["adipose"], 0.006 + 0.06 * membrane, 0.012 + 0.62 * membrane)
    _paint(haem, eosin, labels == index["normal_mucosa"], *_mucosa_stains(canvas, grain))
    return haem, eosin


def _tumour_stains(canvas: _Canvas, fibres: np.ndarray, grain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tumour: glands (lumen, crowded epithelium, debris in some lumens) in thin desmoplastic stroma."""
    rho, lumen, dirty = canvas.rho, canvas.lumen, canvas.dirty
    in_gland = canvas.kind == 0
    lumen_w = np.where(in_gland, 1.0 - smoothstep(lumen - 0.04, lumen + 0.04, rho), 0.0)
    stroma_w = np.where(in_gland, smoothstep(0.95, 1.05, rho), 1.0)
    epi_w = 1.0 - lumen_w - stroma_w
    debris_tex = np.clip(0.6 + 0.5 * canvas.noise(6.0), 0.0, None)
    tumour_h = epi_w * (0.2 + 0.03 * grain) + stroma_w * 0.05 + lumen_w * (0.02 + 0.06 * dirty * debris_tex)
    tumour_e = (
        epi_w * (0.3 + 0.04 * grain) + stroma_w * (0.26 + 0.3 * fibres) + lumen_w * (0.03 + 0.3 * dirty * debris_tex)
    )
    return tumour_h, tumour_e


def _necrosis_stains(canvas: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    """Necrosis: pale, patchy, amorphous eosinophilic material with basophilic dust and clefts."""
    patch = canvas.noise(25.0)
    clefts = smoothstep(1.3, 1.9, canvas.noise(14.0))
    necrosis_e = (0.36 + 0.09 * patch + 0.08 * canvas.noise(6.0)) * (1.0 - 0.75 * clefts)
    necrosis_h = (0.11 + 0.05 * canvas.noise(4.0)) * (1.0 - 0.75 * clefts)
    return necrosis_h, necrosis_e


def _mucosa_stains(canvas: _Canvas, grain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normal mucosa: round crypts (goblet cells, small lumen) in a cellular lamina propria."""
    rho, lumen = canvas.rho, canvas.lumen
    in_crypt = canvas.kind == 1
    crypt_lumen = np.where(in_crypt, 1.0 - smoothstep(lumen - 0.04, lumen + 0.04, rho), 0.0)
    lamina = np.where(in_crypt, smoothstep(0.95, 1.05, rho), 1.0)
    crypt_epi = 1.0 - crypt_lumen - lamina
    goblet = _goblet_cells(canvas)
    goblet *= crypt_epi
    mucosa_h = crypt_epi * (0.1 + 0.02 * grain) + lamina * (0.1 + 0.03 * canvas.noise(6.0)) + crypt_lumen * 0.05
    mucosa_e = crypt_epi * (0.27 + 0.03 * grain) + lamina * (0.27 + 0.05 * canvas.noise(8.0)) + crypt_lumen * 0.04
    mucosa_h = mucosa_h * (1.0 - goblet) + goblet * 0.15
    mucosa_e = mucosa_e * (1.0 - goblet) + goblet * 0.06
    return mucosa_h, mucosa_e


def _goblet_cells(canvas: _Canvas) -> np.ndarray:
    """Float32 map of pale goblet-cell disks in the epithelium of the mucosal crypts."""
    rng, px = canvas.rng, canvas.px
    goblet = np.zeros(canvas.shape, dtype=np.float32)
    gy, gx = canvas.grid(7.0, 0.3)
    g_rho = canvas.at(canvas.rho, gy, gx)
    g_keep = (
        canvas.is_label("normal_mucosa", gy, gx)
        & (canvas.at(canvas.kind, gy, gx) == 1)
        & (g_rho > canvas.at(canvas.lumen, gy, gx) + 0.12)
        & (g_rho < 0.76)
        & (rng.random(gy.size) < 0.85)
    )
    gy, gx = gy[g_keep], gx[g_keep]
    stamp_disks(goblet, gy / px, gx / px, rng.uniform(2.8, 3.8, gy.size) / px, 1.0)
    return goblet


def _add_vessels(canvas: _Canvas, haem: np.ndarray, eosin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stain maps with small vessels full of red blood cells in the stroma."""
    rng, px = canvas.rng, canvas.px
    vy, vx = canvas.grid(140.0, 0.45)
    v_keep = canvas.is_label("stroma", vy, vx) & (rng.random(vy.size) < 0.6)
    vy, vx = vy[v_keep], vx[v_keep]
    vessels = np.zeros(canvas.shape, dtype=np.float32)
    stamp_disks(vessels, vy / px, vx / px, rng.uniform(4.0, 10.0, vy.size) / px, 1.0)
    return haem * (1.0 - vessels) + vessels * 0.02, eosin * (1.0 - vessels) + vessels * 1.05


def _soften_edges(layout: Layout, haem: np.ndarray, eosin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Soften the 1-um steps of compartment boundaries (finer than any texture drawn), then fade to glass at the
    tissue edge."""
    from scipy import ndimage

    haem = ndimage.gaussian_filter(haem, 0.7 / layout.px_um) * layout.alpha
    eosin = ndimage.gaussian_filter(eosin, 0.7 / layout.px_um) * layout.alpha
    return haem, eosin


def _tumour_nuclei(canvas: _Canvas, fibre_angle: np.ndarray) -> None:
    """Tumour: pseudostratified, crowded, radially elongated nuclei in the basal two thirds of the epithelium;
    fibroblasts and lymphocytes in the stroma between glands; karyorrhectic debris in dirty lumens."""
    sy, sx = canvas.sites(5.6, "tumour", 0.9, canvas.gland_epithelium)
    canvas.add("tumour", sy, sx, canvas.radial(sy, sx))
    sy, sx = canvas.sites(15.0, "tumour", 0.55, canvas.between_glands)
    canvas.add("fibroblast", sy, sx, canvas.at(fibre_angle, sy, sx))
    sy, sx = canvas.sites(15.0, "tumour", 0.25, canvas.between_glands)
    canvas.add("lymphocyte", sy, sx)
    sy, sx = canvas.sites(9.0, "tumour", 0.5, canvas.dirty_lumen)
    canvas.add("debris", sy, sx)


def _hypoxic_and_necrotic_nuclei(canvas: _Canvas) -> None:
    """Hypoxic rim: sheets of rounder, pleomorphic nuclei, some pyknotic; necrosis: karyorrhectic debris and ghost
    nuclei."""
    sy, sx = canvas.sites(10.0, "hypoxic_rim", 0.95)
    pyknotic = canvas.rng.random(sy.size) < 0.14
    canvas.add("hypoxic", sy[~pyknotic], sx[~pyknotic])
    canvas.add("pyknotic", sy[pyknotic], sx[pyknotic])
    sy, sx = canvas.sites(9.0, "necrosis", 0.55)
    canvas.add("debris", sy, sx)
    sy, sx = canvas.sites(13.0, "necrosis", 0.3)
    canvas.add("ghost", sy, sx)


def _stromal_nuclei(canvas: _Canvas, fibre_angle: np.ndarray) -> None:
    """Stroma: sparse spindle fibroblasts along the collagen, a few lymphocytes and plasma cells; immune aggregates:
    densely packed small round lymphocytes; adipose: a few flat nuclei pressed against the membranes."""
    sy, sx = canvas.sites(19.0, "stroma", 0.6)
    canvas.add("fibroblast", sy, sx, canvas.at(fibre_angle, sy, sx))
    sy, sx = canvas.sites(16.0, "stroma", 0.12)
    canvas.add("lymphocyte", sy, sx)
    sy, sx = canvas.sites(20.0, "stroma", 0.05)
    canvas.add("plasma", sy, sx)
    sy, sx = canvas.sites(6.0, "immune", 0.95, jitter=0.3)
    plasma = canvas.rng.random(sy.size) < 0.05
    canvas.add("lymphocyte", sy[~plasma], sx[~plasma])
    canvas.add("plasma", sy[plasma], sx[plasma])
    sy, sx = canvas.sites(20.0, "adipose", 0.35, canvas.on_membrane)
    canvas.add("adipocyte", sy, sx)


def _mucosal_nuclei(canvas: _Canvas) -> None:
    """Normal mucosa: a regular row of basal nuclei in every crypt, plasma cells, lymphocytes and fibroblasts in the
    lamina propria."""
    sy, sx = canvas.sites(4.0, "normal_mucosa", 0.92, canvas.crypt_base, jitter=0.25)
    canvas.add("mucosa", sy, sx, canvas.radial(sy, sx))
    sy, sx = canvas.sites(9.0, "normal_mucosa", 0.5, canvas.lamina_propria)
    cell = canvas.rng.random(sy.size)
    canvas.add("plasma", sy[cell < 0.5], sx[cell < 0.5])
    canvas.add("lymphocyte", sy[(cell >= 0.5) & (cell < 0.85)], sx[(cell >= 0.5) & (cell < 0.85)])
    canvas.add("fibroblast", sy[cell >= 0.85], sx[cell >= 0.85])


def _stamp_all_nuclei(
    rng: np.random.Generator,
    haem_full: np.ndarray,
    nuclei: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    stains: StainModel,
    mpp: float,
) -> int:
    """Stamp every placed nucleus into the full-resolution 8-bit haematoxylin map (a kernel of its kind, orientation
    bin and a random variant); returns how many were drawn."""
    bank = nucleus_bank(rng, mpp)
    num_nuclei = 0
    for kind_name, sy, sx, angle in nuclei:
        kernels, n_orient, n_var = bank[kind_name]
        kernels8 = [stains.haem_levels(k) for k in kernels]
        orient = np.round((np.mod(angle, math.pi) / math.pi) * n_orient).astype(np.int64) % n_orient
        index = orient * n_var + rng.integers(0, n_var, sy.size)
        cy, cx = np.floor(sy / mpp).astype(np.int64), np.floor(sx / mpp).astype(np.int64)
        stamp_nuclei(haem_full, kernels8, cy, cx, index)
        num_nuclei += sy.size
    return num_nuclei
