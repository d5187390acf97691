"""Draw GT, predicted, look and ignore boxes on an image (PNG for evaluation reports).

    img = draw_boxes(image, gt_boxes=gt, pred_boxes=pred, look_boxes=look)
    save_png("out.png", image, gt_boxes=gt, pred_boxes=pred)

Boxes are ``[N, 4]`` arrays ``x1, y1, x2, y2`` in the pixel frame of ``image``
(for evaluation: the original image, where metrics are computed). A box covers
pixel columns ``floor(x1) .. ceil(x2) - 1`` and rows ``floor(y1) .. ceil(y2) - 1``;
its outline is drawn on those outermost pixels, ``width`` pixels thick, inward.
Draw order is ignore, GT, look, prediction (predictions on top). With
``legend=True`` a strip is appended *below* the image, so the image pixels
themselves are only changed by box outlines.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dipr1_jax import fsio

COLORS: dict[str, tuple[int, int, int]] = {
    "gt": (0, 200, 0),  # green
    "pred": (230, 25, 25),  # red
    "look": (30, 110, 255),  # blue
    "ignore": (255, 200, 0),  # amber
}
DRAW_ORDER = ("ignore", "gt", "look", "pred")
LEGEND_HEIGHT = 16


def to_pil(image: Any) -> Image.Image:
    """RGB PIL image from a PIL image, a file path, or an array (HxW, HxWx3, HxWx4;
    uint8, or floats in [0, 1])."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or 0 in a.shape:
        raise ValueError(f"image must be HxW, HxWx3 or HxWx4, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError("image has non-finite values")
        if a.max(initial=0.0) <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    return Image.fromarray(a).convert("RGB")


def _as_boxes(boxes: Any, name: str) -> np.ndarray:
    if boxes is None:
        return np.zeros((0, 4))
    a = np.asarray(boxes, dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, 4))
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"{name} must have shape [N, 4], got {a.shape}")
    return a


def _pixel_rect(box: np.ndarray, w: int, h: int) -> tuple[int, int, int, int] | None:
    """Inclusive pixel rectangle of a box, clipped to the image; None if nothing to draw."""
    if not np.isfinite(box).all():
        return None
    x1, y1 = math.floor(box[0]), math.floor(box[1])
    x2, y2 = math.ceil(box[2]) - 1, math.ceil(box[3]) - 1
    if x2 < x1 or y2 < y1:
        return None
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, w - 1), min(y2, h - 1)
    if x2 < x1 or y2 < y1:
        return None
    return x1, y1, x2, y2


def draw_boxes(
    image: Any,
    *,
    gt_boxes: Any = None,
    pred_boxes: Any = None,
    look_boxes: Any = None,
    ignore_boxes: Any = None,
    pred_scores: Any = None,
    width: int = 2,
    legend: bool = True,
    colors: dict[str, tuple[int, int, int]] | None = None,
) -> Image.Image:
    """A new RGB image with the boxes drawn (the input is not modified)."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    colors = {**COLORS, **(colors or {})}
    canvas = to_pil(image).copy()
    w, h = canvas.size
    groups = {
        "ignore": _as_boxes(ignore_boxes, "ignore_boxes"),
        "gt": _as_boxes(gt_boxes, "gt_boxes"),
        "look": _as_boxes(look_boxes, "look_boxes"),
        "pred": _as_boxes(pred_boxes, "pred_boxes"),
    }
    scores = None
    if pred_scores is not None:
        scores = np.asarray(pred_scores, np.float64).reshape(-1)
        if scores.shape[0] != groups["pred"].shape[0]:
            raise ValueError(f"pred_scores has {scores.shape[0]} entries for {groups['pred'].shape[0]} boxes")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for kind in DRAW_ORDER:
        for i, box in enumerate(groups[kind]):
            rect = _pixel_rect(box, w, h)
            if rect is None:
                continue
            draw.rectangle(rect, outline=colors[kind], width=width)
            if kind == "pred" and scores is not None:
                draw.text((rect[0] + width + 1, rect[1] + width), f"{scores[i]:.2f}", fill=colors[kind], font=font)
    if not legend:
        return canvas
    out = Image.new("RGB", (w, h + LEGEND_HEIGHT), (255, 255, 255))
    out.paste(canvas, (0, 0))
    d = ImageDraw.Draw(out)
    x = 2
    for kind in ("gt", "pred", "look", "ignore"):
        n = len(groups[kind])
        if n == 0 and kind in ("look", "ignore"):
            continue
        d.rectangle((x, h + 4, x + 8, h + 12), fill=colors[kind])
        label = f"{kind} {n}"
        d.text((x + 11, h + 2), label, fill=(0, 0, 0), font=font)
        x += 11 + int(d.textlength(label, font=font)) + 8
    return out


def save_png(path: str | os.PathLike, image: Any, **kwargs: Any) -> str:
    """``draw_boxes(image, **kwargs)`` written as PNG to ``path`` (a local path or a
    ``gs://`` URI; written whole, see ``fsio``); returns the path."""
    path = os.fspath(path)
    fsio.makedirs(os.path.dirname(path if fsio.is_remote(path) else os.path.abspath(path)))
    buf = io.BytesIO()
    draw_boxes(image, **kwargs).save(buf, format="PNG")
    fsio.write_bytes(path, buf.getvalue())
    return path
