"""Box geometry kernels (x1, y1, x2, y2), batched over leading axes.

Degenerate boxes (x2 <= x1 or y2 <= y1), non-finite coordinates and padding
have area 0 and give IoU / IoA 0, never NaN (the division is guarded so the
gradient is finite too).
"""

from __future__ import annotations

import jax.numpy as jnp


def box_area(b: jnp.ndarray) -> jnp.ndarray:
    """``[..., N, 4] -> [..., N]``; degenerate or non-finite boxes give 0."""
    w = jnp.maximum(b[..., 2] - b[..., 0], 0.0)
    h = jnp.maximum(b[..., 3] - b[..., 1], 0.0)
    area = w * h
    return jnp.where(jnp.isfinite(area), area, 0.0)


def _intersection(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    a = a[..., :, None, :]
    b = b[..., None, :, :]
    w = jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0])
    h = jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1])
    inter = jnp.maximum(w, 0.0) * jnp.maximum(h, 0.0)
    return jnp.where(jnp.isfinite(inter), inter, 0.0)


def _safe_div(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _pairwise(a, b):
    """Intersections ``[..., N, M]``, areas of ``a`` and the non-degenerate mask."""
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    area_a = box_area(a)
    area_b = box_area(b)
    # A degenerate box has area 0 and so intersection 0 (clipped widths); the
    # explicit mask also covers boxes that are degenerate only through NaN.
    ok = (area_a[..., :, None] > 0) & (area_b[..., None, :] > 0)
    return _intersection(a, b), area_a, area_b, ok


def box_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """Pairwise IoU: ``[..., N, 4], [..., M, 4] -> [..., N, M]`` (leading axes broadcast)."""
    inter, area_a, area_b, ok = _pairwise(a, b)
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return jnp.where(ok, _safe_div(inter, union), 0.0)


def box_ioa(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """Intersection over the area of ``a``: ``area(a_n ∩ b_m) / area(a_n)`` -> ``[..., N, M]``.

    Used for look coverage (``a`` = GT boxes, ``b`` = look boxes). 0 where
    either box is degenerate.
    """
    inter, area_a, _, ok = _pairwise(a, b)
    return jnp.where(ok, _safe_div(inter, area_a[..., :, None]), 0.0)
