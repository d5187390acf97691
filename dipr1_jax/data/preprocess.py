"""Qwen2-VL / Qwen2.5-VL image preprocessing and box frame mapping (numpy + Pillow).

Equal to transformers' ``Qwen2VLImageProcessorPil`` (tested to 1e-5):

1. ``smart_resize``: both sides a multiple of ``factor = patch_size *
   merge_size`` (28), pixel count within ``[min_pixels, max_pixels]``, aspect
   ratio kept as closely as possible.
2. Pillow bicubic resize of the uint8 RGB image to that size.
3. ``x / 255``, then ``(x - mean) / std`` with the OpenAI CLIP statistics.
4. Patch flattening: the frame is duplicated ``temporal_patch_size`` (2)
   times, cut into 14x14 patches ordered by 2x2 merge window (row-major over
   windows, then row-major inside a window), each flattened as ``[C, T, 14,
   14]`` -> ``pixel_values [grid_h * grid_w, C * T * 14 * 14]`` (1176 wide).
5. ``image_grid_thw = [1, grid_h, grid_w]``; the language model sees
   ``grid_t * grid_h * grid_w / merge_size**2`` ``<|image_pad|>`` tokens.

Boxes (DESIGN.md section 2): records carry x1y1x2y2 in ORIGINAL pixels; the
model reads and writes boxes in pixels of the RESIZED image. Coordinates are
continuous (pixel ``i`` spans ``[i, i + 1)``), so the maps are pure scalings:
``x_model = x_orig * resized_w / orig_w`` (likewise y) and back.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

# OpenAI CLIP statistics, as in transformers.image_utils.OPENAI_CLIP_MEAN / _STD.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    """Image-processor settings of the target checkpoint (Qwen2.5-VL defaults)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"VisionSpec.{name}: must be a positive int, got {v!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"VisionSpec: min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(resized_height, resized_width) as the Qwen2-VL processor computes it."""
    if height <= 0 or width <= 0:
        raise ValueError(f"smart_resize: image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"smart_resize: aspect ratio {max(height, width) / min(height, width):.1f} "
                         "exceeds 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def resized_size(height: int, width: int, spec: VisionSpec = VisionSpec()) -> tuple[int, int]:
    return smart_resize(height, width, spec.factor, spec.min_pixels, spec.max_pixels)


def grid_thw(height: int, width: int, spec: VisionSpec = VisionSpec()) -> tuple[int, int, int]:
    """``(grid_t, grid_h, grid_w)`` of an original ``height x width`` image."""
    rh, rw = resized_size(height, width, spec)
    return 1, rh // spec.patch_size, rw // spec.patch_size


def num_image_tokens(grid: tuple[int, int, int] | np.ndarray, spec: VisionSpec = VisionSpec()) -> int:
    t, h, w = (int(v) for v in grid)
    return t * h * w // (spec.merge_size ** 2)


_MEAN = np.asarray(IMAGE_MEAN, np.float32)
_STD = np.asarray(IMAGE_STD, np.float32)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> float32 ``[3, H, W]``: ``(x / 255 - mean) / std``."""
    x = image.astype(np.float32) * np.float32(1.0 / 255.0)
    x -= _MEAN
    x /= _STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def patchify(chw: np.ndarray, spec: VisionSpec = VisionSpec()) -> np.ndarray:
    """float ``[3, H, W]`` (H, W multiples of ``spec.factor``) -> ``[gh * gw, patch_dim]``."""
    c, h, w = chw.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    if h % (p * m) or w % (p * m):
        raise ValueError(f"patchify: {h}x{w} is not a multiple of {p * m}")
    gh, gw = h // p, w // p
    x = chw.reshape(c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    return x.reshape(gh * gw, c * t * p * p)


def unpatchify(pixel_values: np.ndarray, grid_thw, spec: VisionSpec = VisionSpec()) -> np.ndarray:
    """Inverse of ``patchify(normalize(image))``: ``[gh * gw, patch_dim]`` with
    ``grid_thw = (1, gh, gw)`` -> uint8 ``[gh * patch, gw * patch, 3]`` (the resized model
    input; un-normalized, rounded, clipped; the temporal copies are averaged)."""
    t_grid, gh, gw = (int(v) for v in np.asarray(grid_thw).reshape(-1))
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    x = np.asarray(pixel_values, np.float32)
    if t_grid != 1 or gh % m or gw % m or x.shape != (gh * gw, spec.patch_dim):
        raise ValueError(f"unpatchify: grid_thw {(t_grid, gh, gw)} and pixel_values {x.shape} "
                         f"do not describe one image (need t == 1, [gh * gw, {spec.patch_dim}])")
    x = x.reshape(gh // m, gw // m, m, m, 3, t, p, p).mean(axis=5)  # (Gh, Gw, mh, mw, C, p, p)
    chw = x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)
    hwc = (chw.transpose(1, 2, 0) * _STD + _MEAN) * 255.0
    return np.clip(np.rint(hwc), 0, 255).astype(np.uint8)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pillow bicubic resize of uint8 ``[H, W, 3]`` (a no-op when the size matches)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def preprocess_image(image: np.ndarray, spec: VisionSpec = VisionSpec()) -> dict[str, np.ndarray]:
    """uint8 ``[H, W, 3]`` -> ``pixel_values [P, patch_dim]`` float32, ``image_grid_thw [3]``,
    ``resized_size [2]`` (h, w)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"preprocess_image: expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    rh, rw = resized_size(image.shape[0], image.shape[1], spec)
    pixels = patchify(normalize(resize_image(image, rh, rw)), spec)
    return {
        "pixel_values": pixels,
        "image_grid_thw": np.asarray([1, rh // spec.patch_size, rw // spec.patch_size], np.int32),
        "resized_size": np.asarray([rh, rw], np.int32),
    }


# ----------------------------------------------------------------------------- box frames

def box_scale(orig_hw, resized_hw) -> np.ndarray:
    """``(sx, sy) = (resized_w / orig_w, resized_h / orig_h)`` as float32 ``[2]``."""
    (oh, ow), (rh, rw) = orig_hw, resized_hw
    return np.asarray([rw / ow, rh / oh], np.float32)


def boxes_to_model_frame(boxes: np.ndarray, orig_hw, resized_hw) -> np.ndarray:
    """x1y1x2y2 in original pixels -> resized (model input) pixels. float32 ``[..., 4]``."""
    (oh, ow), (rh, rw) = orig_hw, resized_hw
    s = np.asarray([rw / ow, rh / oh, rw / ow, rh / oh], np.float64)
    return (np.asarray(boxes, np.float64) * s).astype(np.float32)


def boxes_to_original(boxes: np.ndarray, orig_hw, resized_hw) -> np.ndarray:
    """x1y1x2y2 in resized (model) pixels -> original pixels. float32 ``[..., 4]``."""
    (oh, ow), (rh, rw) = orig_hw, resized_hw
    s = np.asarray([ow / rw, oh / rh, ow / rw, oh / rh], np.float64)
    return (np.asarray(boxes, np.float64) * s).astype(np.float32)


def boxes_to_original_batch(boxes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Batch form for model outputs: ``boxes [B, K, 4]`` (model frame), ``scale [B, 2]``
    (sx, sy) from the batch -> original pixels."""
    s = np.asarray(scale, np.float64)[:, None, :]
    b = np.asarray(boxes, np.float64)
    return np.concatenate([b[..., 0:1] / s[..., 0:1], b[..., 1:2] / s[..., 1:2],
                           b[..., 2:3] / s[..., 0:1], b[..., 3:4] / s[..., 1:2]], -1).astype(np.float32)


def clip_boxes(boxes: np.ndarray, height: float, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Clips x1y1x2y2 boxes to the image; returns (clipped, keep) where ``keep`` marks
    boxes that still have positive area (boxes wholly outside the image do not)."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    b[:, 0::2] = np.clip(b[:, 0::2], 0, width)
    b[:, 1::2] = np.clip(b[:, 1::2], 0, height)
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return b, keep
