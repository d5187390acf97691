"""The DIP-R1 rewards (DESIGN.md section 3) as jitted kernels over ``[B, G, ...]``.

Groups are an explicit axis: completion ``n`` of the flat parsed arrays is
rollout ``n % G`` of prompt ``n // G``. Every function here is pure jnp and
jittable; ``dip_rewards`` is jitted with the group size and config static.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dipr1_jax.config import RewardConfig
from dipr1_jax.rewards.boxes import _pairwise, box_ioa, box_iou
from dipr1_jax.rewards.matching import match_pairs
from dipr1_jax.rewards.parse import ParsedCompletions


def _div(num, den):
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0.0)


def _float(x):
    """As a float array, keeping float64 when x64 is on (for exact parity tests)."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def accuracy_reward(tp, n_pred, n_gt, precision_weight):
    """Weighted precision-recall; 1 when both counts are 0, 0 when exactly one is."""
    n_pred = n_pred.astype(tp.dtype)
    n_gt = n_gt.astype(tp.dtype)
    value = precision_weight * _div(tp, n_pred) + (1.0 - precision_weight) * _div(tp, n_gt)
    both_empty = (n_pred == 0) & (n_gt == 0)
    one_empty = (n_pred == 0) != (n_gt == 0)
    return jnp.where(both_empty, 1.0, jnp.where(one_empty, 0.0, value))


def count_reward(c_hat, c, dtype=jnp.float32):
    c_hat = c_hat.astype(dtype)
    c = c.astype(dtype)
    return jnp.maximum(0.0, 1.0 - jnp.abs(c_hat - c) / jnp.maximum(c, 1.0))


def look_reward(gt_boxes, gt_mask, gt_matched, gt_matched_iou, look_boxes, look_mask,
                look_total, ioa_threshold, iou_var_weight):
    """Variance-guided look reward.

    Args:
      gt_boxes ``[B, K, 4]``, gt_mask ``[B, K]``; gt_matched / gt_matched_iou
      ``[B, G, K]`` (rollout i's answer matched GT k, and with which IoU);
      look_boxes ``[B, G, L, 4]``, look_mask ``[B, G, L]``, look_total ``[B, G]``
      (look boxes including those not stored).
    Returns: ``[B, G]``.
    """
    d = gt_matched.astype(gt_matched_iou.dtype)
    p = jnp.mean(d, axis=1, keepdims=True)  # [B, 1, K]
    u = p * (1.0 - p)
    if iou_var_weight:
        u = u + iou_var_weight * jnp.var(gt_matched_iou, axis=1, keepdims=True)
    u = jnp.where(gt_mask[:, None, :], u, 0.0)  # [B, 1, K]
    ioa = box_ioa(gt_boxes[:, None], look_boxes)  # [B, G, K, L]
    cover_kl = ((ioa >= ioa_threshold) & gt_mask[:, None, :, None]
                & look_mask[:, :, None, :])
    cover = jnp.any(cover_kl, axis=-1)  # [B, G, K]
    u_sum = jnp.sum(u, axis=-1)  # [B, 1]
    recall = _div(jnp.sum(u * cover, axis=-1), u_sum)  # [B, G]
    useful = jnp.any(cover_kl & (u > 0)[..., None], axis=-2)  # [B, G, L]
    precision = _div(jnp.sum(useful, axis=-1).astype(d.dtype), look_total.astype(d.dtype))
    f1 = _div(2.0 * recall * precision, recall + precision)
    return jnp.where(u_sum > 0, f1, 0.0)


def ignored_answers(answer_boxes, unmatched, ignore_boxes, ignore_mask, threshold):
    """Number of answers absorbed by ignore regions.

    Args:
      answer_boxes ``[B, G, P, 4]``; unmatched ``[B, G, P]`` bool (stored, valid
      answers that matched no regular GT); ignore_boxes ``[B, Ki, 4]``;
      ignore_mask ``[B, Ki]`` bool or None (all valid); threshold: minimum
      ``IoA = area(p ∩ r) / area(p)``.
    Returns: ``[B, G]`` int32.
    """
    ignore_boxes = _float(ignore_boxes)
    if ignore_mask is None:
        ignore_mask = jnp.ones(ignore_boxes.shape[:2], bool)
    ignore_mask = jnp.asarray(ignore_mask, bool)
    # IoA >= t tested as inter >= t * area(p): no division, so a tie at the threshold
    # (common with integer pixel boxes) is decided exactly, as numpy's division does,
    # whatever XLA does to a fused division.
    inter, area, _, ok = _pairwise(answer_boxes, ignore_boxes[:, None])  # [B, G, P, Ki]
    ioa_ok = ok & (inter >= threshold * area[..., None])
    inside = jnp.any(ioa_ok & ignore_mask[:, None, None, :], axis=-1)
    return jnp.sum(unmatched & inside, axis=-1).astype(jnp.int32)


def _group(x, b, g):
    return x.reshape((b, g) + x.shape[1:])


@functools.partial(jax.jit, static_argnames=("group_size", "cfg"))
def dip_rewards(parsed: ParsedCompletions, gt_boxes, gt_mask, group_size: int,
                cfg: RewardConfig = RewardConfig(), is_count=None, ignore_boxes=None,
                ignore_mask=None) -> dict:
    """All rewards of ``B * G`` parsed completions against their prompts' GT.

    Args:
      parsed: :class:`ParsedCompletions` with ``N = B * G`` rows, prompt-major.
      gt_boxes: ``[B, K, 4]`` in the same (resized model input) frame as the
        completions' boxes.
      gt_mask: ``[B, K]`` real GT boxes (padding and ignore regions False).
      group_size: ``G``.
      cfg: weights and thresholds.
      is_count: optional ``[B]`` bool, True for counting prompts.
      ignore_boxes: optional ``[B, Ki, 4]`` ignore regions (crowd blobs), same
        frame as ``gt_boxes`` (the pipeline's ``ignore_boxes``); never GT.
      ignore_mask: optional ``[B, Ki]`` bool, valid entries of ``ignore_boxes``
        (all valid when omitted).

    Ignore regions (DESIGN.md section 3, the same rule as
    :func:`dipr1_jax.metrics.match_image`): after matching against the regular
    GT, a stored answer box left unmatched whose IoA with some valid region,
    ``area(p ∩ r) / area(p)``, is ``>= cfg.iou_threshold`` is *ignored*: it is
    neither TP nor FP and leaves ``#pred`` of R_acc. As in the evaluation, the
    IoA threshold is the IoU threshold in use (there is no separate field).
    A region absorbs any number of answers; a matched answer stays TP however
    much it overlaps a region. Ignored answers also leave ``c_hat`` of R_count
    (``c_hat = answer_total - #ignored``): ``c = #gt`` does not count the
    people inside regions either, so an answer there must not count as an
    over-count. The integer answer of a counting prompt is taken as given.
    Answer boxes beyond ``max_boxes`` (``answer_overflow``) are counted in
    ``answer_total`` but not stored, so they cannot be tested against the
    regions: they always stay in ``#pred`` and ``c_hat``. R_look is unchanged.

    Returns:
      dict of ``[B, G]`` float arrays (float32 unless x64 inputs): ``format``, ``look``, ``accuracy``,
      ``count``, ``total``.
    """
    gt_boxes = _float(gt_boxes)
    gt_mask = jnp.asarray(gt_mask, bool)
    b = gt_boxes.shape[0]
    g = group_size
    if parsed.format_ok.shape[0] != b * g:
        raise ValueError(f"dip_rewards: {parsed.format_ok.shape[0]} completions, expected "
                         f"B * G = {b} * {g} = {b * g}")
    if ignore_boxes is None and ignore_mask is not None:
        raise ValueError("dip_rewards: ignore_mask given without ignore_boxes")
    if ignore_boxes is not None:
        ki_shape = jnp.shape(ignore_boxes)
        if len(ki_shape) != 3 or ki_shape[0] != b or ki_shape[2] != 4:
            raise ValueError(f"dip_rewards: ignore_boxes must have shape [B, Ki, 4] with B = {b}, "
                             f"got {tuple(ki_shape)}")
        if ignore_mask is not None and jnp.shape(ignore_mask) != ki_shape[:2]:
            raise ValueError(f"dip_rewards: ignore_mask must have shape {tuple(ki_shape[:2])}, "
                             f"got {tuple(jnp.shape(ignore_mask))}")
    p = jax.tree.map(lambda x: _group(jnp.asarray(x), b, g), parsed)

    iou = box_iou(p.answer_boxes, gt_boxes[:, None])  # [B, G, P, K]
    matched = match_pairs(iou, p.answer_mask, gt_mask[:, None, :], cfg.iou_threshold)
    gt_matched = jnp.any(matched, axis=-2)  # [B, G, K]
    gt_matched_iou = jnp.sum(jnp.where(matched, iou, 0.0), axis=-2)
    dtype = gt_matched_iou.dtype
    tp = jnp.sum(gt_matched_iou, -1) if cfg.soft_tp else jnp.sum(gt_matched, -1).astype(dtype)
    n_gt = jnp.broadcast_to(jnp.sum(gt_mask, -1)[:, None], (b, g))
    n_pred = p.answer_total
    if ignore_boxes is not None:
        unmatched = jnp.asarray(p.answer_mask, bool) & ~jnp.any(matched, axis=-1)  # [B, G, P]
        n_pred = n_pred - ignored_answers(p.answer_boxes, unmatched, ignore_boxes, ignore_mask,
                                          cfg.iou_threshold).astype(n_pred.dtype)

    accuracy = accuracy_reward(tp, n_pred, n_gt, cfg.precision_weight)
    look = look_reward(gt_boxes, gt_mask, gt_matched, gt_matched_iou, p.look_boxes,
                       p.look_mask, p.look_total, cfg.look_ioa_threshold,
                       cfg.look_iou_var_weight)
    fmt = p.format_ok.astype(dtype)

    if is_count is None:
        counting = jnp.zeros((b, 1), bool)
    else:
        counting = jnp.asarray(is_count, bool).reshape(b, 1)
    c_hat = jnp.where(counting & (p.count >= 0), p.count, n_pred)
    count = count_reward(c_hat, n_gt, dtype)

    total_det = (cfg.w_format * fmt + cfg.w_look * look + cfg.w_acc * accuracy
                 + cfg.w_count * count)
    total_cnt = cfg.w_format * fmt + cfg.w_look * look + cfg.w_count_prompt * count
    total = jnp.where(counting, total_cnt, total_det)
    return {"format": fmt, "look": look, "accuracy": accuracy, "count": count, "total": total}
