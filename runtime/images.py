"""Image conversion, rounding exactly as diffusers' ``numpy_to_pil``."""

from __future__ import annotations

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8, rounding half to even as ``np.round`` (and diffusers) does."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)
