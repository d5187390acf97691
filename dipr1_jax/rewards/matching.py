"""One-to-one greedy matching on IoU (DESIGN.md section 3), vectorised.

The rule: repeatedly take the highest-IoU unmatched (prediction, GT) pair whose
IoU >= threshold; ties go to the lower prediction index, then the lower GT
index. That order is a strict total order on the pairs, and for a strict
order the sequential greedy matching equals the matching built in rounds of
*locally dominant* pairs: a pair that beats every other pair in its row and
in its column is taken by the sequential greedy too (every better pair shares
no endpoint with it), so all such pairs can be taken at once. Within a row the
tie-break is the lower GT index and within a column the lower prediction
index, which is exactly the first-occurrence rule of ``argmax``. Each round
takes at least the global best pair, so there are at most ``min(P, K)`` rounds
and usually a handful; each round is a few ``[..., P, K]`` reductions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def match_pairs(iou: jnp.ndarray, pred_mask: jnp.ndarray, gt_mask: jnp.ndarray,
                threshold: float) -> jnp.ndarray:
    """Boolean ``[..., P, K]`` matrix of the matched (prediction, GT) pairs."""
    iou = jnp.asarray(iou)
    P, K = iou.shape[-2], iou.shape[-1]
    valid = (jnp.asarray(pred_mask, bool)[..., :, None]
             & jnp.asarray(gt_mask, bool)[..., None, :]
             & (iou >= threshold))
    # Invalid pairs get -inf; every valid weight is > -inf, NaN IoUs are invalid.
    w0 = jnp.where(valid, iou, -jnp.inf)
    matched0 = jnp.zeros(jnp.broadcast_shapes(w0.shape), bool)
    if P == 0 or K == 0:
        return matched0
    cols = jnp.arange(K)
    rows = jnp.arange(P)

    def cond(state):
        w, _ = state
        return jnp.any(w > -jnp.inf)

    def first_max(w, axis, iota):
        # argmax as max + min index: two plain reductions, much faster than
        # XLA's variadic argmax reduce on CPU; same first-occurrence rule.
        is_max = w == jnp.max(w, axis=axis, keepdims=True)
        return jnp.min(jnp.where(is_max, iota, w.shape[axis]), axis=axis, keepdims=True)

    def body(state):
        w, matched = state
        live = w > -jnp.inf
        row_best = first_max(w, -1, cols)  # [..., P, 1]: lower GT index on ties
        col_best = first_max(w, -2, rows[:, None])  # [..., 1, K]: lower pred index
        new = live & (cols == row_best) & (rows[:, None] == col_best)
        used = jnp.any(new, axis=-1)[..., :, None] | jnp.any(new, axis=-2)[..., None, :]
        return jnp.where(used, -jnp.inf, w), matched | new

    _, matched = jax.lax.while_loop(cond, body, (w0, matched0))
    return matched


def match_greedy(iou: jnp.ndarray, pred_mask: jnp.ndarray, gt_mask: jnp.ndarray,
                 threshold: float = 0.5) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Greedy one-to-one matching.

    Args:
      iou: ``[..., P, K]`` IoU of predictions against GT.
      pred_mask: ``[..., P]`` real (non-padding) predictions.
      gt_mask: ``[..., K]`` real GT boxes.
      threshold: minimum IoU of a match.

    Returns:
      ``gt_matched_iou [..., K]`` (IoU of the prediction matched to each GT, 0
      when unmatched) and ``pred_matched [..., P]`` (bool).
    """
    iou = jnp.asarray(iou)
    matched = match_pairs(iou, pred_mask, gt_mask, threshold)
    gt_matched_iou = jnp.sum(jnp.where(matched, iou, 0.0), axis=-2)
    return gt_matched_iou, jnp.any(matched, axis=-1)
