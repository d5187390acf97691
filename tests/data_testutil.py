"""Helpers for the data tests: tiny images and annotation files."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def write_image(path: str, width: int, height: int, seed: int = 0) -> np.ndarray:
    """Writes a random RGB image (PNG is lossless, JPEG lossy) and returns its pixels."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def write_text(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
