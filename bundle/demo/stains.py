"""Beer-Lambert H&E colour model: per-slide stain vectors, 8-bit stain levels and their RGB lookup table."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Beer-Lambert stain vectors (optical density per unit concentration, R, G, B), close to Macenko estimates on
# colorectal TCGA tiles; perturbed per slide.
_HAEMATOXYLIN_OD = (0.52, 0.76, 0.39)
_EOSIN_OD = (0.27, 0.84, 0.47)


@dataclass
class StainModel:
    """Beer-Lambert colour model: stain concentrations quantised to 8 bits each, RGB through a 65536-entry table."""

    lut: np.ndarray  # (65536, 3) uint8, index = haem_level << 8 | eosin_level
    h_max: float = 2.4
    e_max: float = 1.6

    @classmethod
    def draw(
        cls, rng: np.random.Generator, stain_jitter: float = 1.0, h_max: float = 2.4, e_max: float = 1.6
    ) -> StainModel:
        """Perturb the stain vectors, stain strengths and glass colour for one slide and build the table."""
        h_vec = np.asarray(_HAEMATOXYLIN_OD) + rng.normal(0.0, 0.025 * stain_jitter, 3)
        e_vec = np.asarray(_EOSIN_OD) + rng.normal(0.0, 0.025 * stain_jitter, 3)
        h_vec = h_vec / np.linalg.norm(h_vec) * (1.0 + rng.uniform(-0.12, 0.12) * stain_jitter)
        e_vec = e_vec / np.linalg.norm(e_vec) * (1.0 + rng.uniform(-0.15, 0.15) * stain_jitter)
        glass = 242.0 + rng.uniform(-4.0, 4.0) * stain_jitter + rng.normal(0.0, 1.5, 3) * stain_jitter
        levels = np.arange(256, dtype=np.float64)
        h_conc = (levels * h_max / 255.0)[:, None, None]
        e_conc = (levels * e_max / 255.0)[None, :, None]
        optical_density = h_conc * h_vec + e_conc * e_vec  # (256, 256, 3)
        lut = np.clip(np.round(np.clip(glass, 225, 252) * 10.0 ** (-optical_density)), 0, 255).astype(np.uint8)
        return cls(lut.reshape(-1, 3), h_max, e_max)

    @staticmethod
    def _quantise(rng: np.random.Generator, values: np.ndarray, maximum: float) -> np.ndarray:
        levels = values * np.float32(255.0 / maximum) + rng.random(values.shape, dtype=np.float32)  # dithered
        return np.clip(levels, 0.0, 255.0).astype(np.uint8)

    def quantise_haem(self, rng: np.random.Generator, values: np.ndarray) -> np.ndarray:
        return self._quantise(rng, values, self.h_max)

    def quantise_eosin(self, rng: np.random.Generator, values: np.ndarray) -> np.ndarray:
        return self._quantise(rng, values, self.e_max)

    def haem_levels(self, kernel: np.ndarray) -> np.ndarray:
        return np.clip(np.round(kernel * (255.0 / self.h_max)), 0, 255).astype(np.uint8)

    def to_rgb(self, rng: np.random.Generator, haem: np.ndarray, eosin: np.ndarray, grain: int = 3) -> np.ndarray:
        """RGB pixels of 8-bit stain levels, after adding a little sensor-like grain (``0..grain-1`` levels)."""
        for channel in (haem, eosin):
            noise = rng.integers(0, grain, size=(min(509, channel.shape[0]), channel.shape[1]), dtype=np.uint8)
            np.minimum(channel, 255 - grain, out=channel)
            for start in range(0, channel.shape[0], noise.shape[0]):
                block = channel[start : start + noise.shape[0]]
                block += noise[: block.shape[0]]
        index = haem.astype(np.uint16) << 8
        index |= eosin
        return self.lut[index]
