"""Reward computation: jitted jnp kernels vs per-sample Python and numpy baselines.

    python benchmarks/rewards_bench.py [--batch 8 --group 8 --gt 100 --repeats 5]

Workload: B x G completions (default 8 x 8 = 64), about 100 GT boxes per image
and about 100 predicted answer boxes per completion (simulated detectors with
recall 0.9-1.0 plus false positives), in the resized frame. All rewards of
DESIGN.md section 3 (format, look, accuracy, count, total) are computed by

  (a) the jitted kernels (``dip_rewards`` + ``group_advantages``), timed with
      the host parse excluded and included;
  (b) the per-sample plain-Python reference of ``tests/reference.py``;
  (c) a per-sample numpy implementation (vectorised IoU/IoA, greedy over the
      sorted valid pairs; scipy has no greedy matcher, its Hungarian
      ``linear_sum_assignment`` optimises a different objective).

All three are checked to agree before timing. Each is timed ``--repeats``
times in this run (median), and the ratios are printed. The machine is
shared: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import reference as ref  # noqa: E402

from dipr1_jax.config import RewardConfig  # noqa: E402
from dipr1_jax.demo import make_batch  # noqa: E402
from dipr1_jax.grpo import group_advantages  # noqa: E402
from dipr1_jax.rewards import dip_rewards, parse_completions  # noqa: E402


def _np_iou(a, b):
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)
    union = area(a)[:, None] + area(b)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0), inter, area


def _np_match(pred, gt, tau):
    """(gt_matched_iou [K], matched bool [K]) by sequential greedy over sorted pairs."""
    iou, _, _ = _np_iou(pred, gt)
    p_idx, g_idx = np.nonzero(iou >= tau)
    vals = iou[p_idx, g_idx]
    order = np.lexsort((g_idx, p_idx, -vals))
    used_p = np.zeros(len(pred), bool)
    used_g = np.zeros(len(gt), bool)
    m_iou = np.zeros(len(gt))
    for j in order:
        p, g = p_idx[j], g_idx[j]
        if not used_p[p] and not used_g[g]:
            used_p[p] = used_g[g] = True
            m_iou[g] = vals[j]
    return m_iou, used_g


def numpy_rewards(parsed, gt, gt_mask, G, cfg):
    """Per-sample numpy implementation of all rewards; returns total [B, G]."""
    B = gt.shape[0]
    total = np.zeros((B, G))
    for b in range(B):
        g = gt[b][gt_mask[b]].astype(np.float64)
        m_iou, m = np.zeros((G, len(g))), np.zeros((G, len(g)), bool)
        for i in range(G):
            n = b * G + i
            pred = parsed.answer_boxes[n][parsed.answer_mask[n]].astype(np.float64)
            m_iou[i], m[i] = _np_match(pred, g, cfg.iou_threshold)
        p = m.mean(0)
        u = p * (1 - p) + cfg.look_iou_var_weight * m_iou.var(0)
        for i in range(G):
            n = b * G + i
            n_pred, n_gt = parsed.answer_total[n], len(g)
            tp = m_iou[i].sum() if cfg.soft_tp else float(m[i].sum())
            if n_pred == 0 and n_gt == 0:
                acc = 1.0
            elif n_pred == 0 or n_gt == 0:
                acc = 0.0
            else:
                acc = cfg.precision_weight * tp / n_pred + (1 - cfg.precision_weight) * tp / n_gt
            look = parsed.look_boxes[n][parsed.look_mask[n]].astype(np.float64)
            lr_lp = 0.0
            if u.sum() > 0 and len(look):
                _, inter, area = _np_iou(g, look)
                ag = area(g)
                with np.errstate(invalid="ignore", divide="ignore"):
                    ioa = np.where((ag[:, None] > 0) & (area(look)[None, :] > 0), inter / ag[:, None], 0)
                cover = ioa >= cfg.look_ioa_threshold
                lr = (u * cover.any(1)).sum() / u.sum()
                lp = (cover & (u[:, None] > 0)).any(0).sum() / parsed.look_total[n]
                lr_lp = 0.0 if lr + lp == 0 else 2 * lr * lp / (lr + lp)
            cnt = max(0.0, 1 - abs(n_pred - n_gt) / max(n_gt, 1))
            total[b, i] = (cfg.w_format * parsed.format_ok[n] + cfg.w_look * lr_lp
                           + cfg.w_acc * acc + cfg.w_count * cnt)
    return total


def python_rewards(parsed, gt, gt_mask, G, cfg):
    B = gt.shape[0]
    total = np.zeros((B, G))
    for b in range(B):
        gts = [tuple(map(float, x)) for x in gt[b][gt_mask[b]]]
        group = []
        for i in range(G):
            n = b * G + i
            group.append({
                "format": bool(parsed.format_ok[n]),
                "answer": [tuple(map(float, x)) for x in parsed.answer_boxes[n][parsed.answer_mask[n]]],
                "answer_total": int(parsed.answer_total[n]),
                "look": [tuple(map(float, x)) for x in parsed.look_boxes[n][parsed.look_mask[n]]],
                "look_total": int(parsed.look_total[n]), "count": int(parsed.count[n])})
        total[b] = [r["total"] for r in ref.rewards_group(group, gts, cfg)]
    return total


def _time(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--gt", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    B, G = args.batch, args.group
    cfg = RewardConfig(max_boxes=128, max_look=32)
    gt, mask, texts, _ = make_batch(args.seed, B, G, args.gt, 896, min_gt=int(0.9 * args.gt),
                                    recall_range=(0.9, 1.0), broken_rate=0.0)
    parsed = parse_completions(texts, cfg.max_boxes, cfg.max_look)
    print(f"workload: {B}x{G} = {B * G} completions, GT/image mean {mask.sum(1).mean():.0f}, "
          f"predicted/completion mean {parsed.answer_total.mean():.0f}, "
          f"look/completion mean {parsed.look_total.mean():.1f}; "
          f"jax {jax.__version__} on {jax.default_backend()}")

    def jnp_path(p):
        r = dip_rewards(p, gt, mask, G, cfg)
        return jax.block_until_ready((r, group_advantages(r["total"])))

    r_jnp = np.asarray(jnp_path(parsed)[0]["total"])  # compiles
    r_py = python_rewards(parsed, gt, mask, G, cfg)
    r_np = numpy_rewards(parsed, gt, mask, G, cfg)
    err_py, err_np = np.abs(r_jnp - r_py).max(), np.abs(r_jnp - r_np).max()
    print(f"agreement: max |jnp - python| = {err_py:.2e}, max |jnp - numpy| = {err_np:.2e}")
    assert err_py < 1e-4 and err_np < 1e-4, "implementations disagree: timings are meaningless"

    reps = args.repeats
    t_kernel = _time(lambda: jnp_path(parsed), max(reps, 20))
    t_with_parse = _time(lambda: jnp_path(parse_completions(texts, cfg.max_boxes, cfg.max_look)),
                         max(reps, 10))
    t_parse = _time(lambda: parse_completions(texts, cfg.max_boxes, cfg.max_look), max(reps, 10))
    t_py = _time(lambda: python_rewards(parsed, gt, mask, G, cfg), reps)
    t_np = _time(lambda: numpy_rewards(parsed, gt, mask, G, cfg), reps)
    n = B * G
    rows = [("(a) jitted kernels, parse excluded", t_kernel),
            ("(a) jitted kernels, parse included", t_with_parse),
            ("    host parse alone", t_parse),
            ("(b) per-sample Python reference", t_py),
            ("(c) per-sample numpy", t_np)]
    for name, t in rows:
        print(f"{name:<38} {1e3 * t:9.2f} ms  ({1e3 * t / n:7.3f} ms/completion)")
    print(f"ratio (b)/(a) parse excluded: {t_py / t_kernel:8.1f}x")
    print(f"ratio (b)/(a) parse included: {(t_py + t_parse) / t_with_parse:8.1f}x "
          f"(both sides parse the same text)")
    print(f"ratio (c)/(a) parse excluded: {t_np / t_kernel:8.1f}x")
    print(f"ratio (c)/(a) parse included: {(t_np + t_parse) / t_with_parse:8.1f}x")


if __name__ == "__main__":
    main()
