"""Plain-Python reference implementations of DESIGN.md sections 3 and 4.

Written straight from the definitions, with loops and no numpy, to check the
vectorised kernels against. Boxes are 4-tuples of floats (x1, y1, x2, y2).
"""

from __future__ import annotations

import math


def area(b):
    w = b[2] - b[0]
    h = b[3] - b[1]
    if not (math.isfinite(w) and math.isfinite(h)) or w <= 0 or h <= 0:
        return 0.0
    return w * h


def intersection(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if not (math.isfinite(w) and math.isfinite(h)) or w <= 0 or h <= 0:
        return 0.0
    return w * h


def iou(a, b):
    """IoU; 0 when either box is degenerate."""
    if area(a) <= 0 or area(b) <= 0:
        return 0.0
    inter = intersection(a, b)
    return inter / (area(a) + area(b) - inter)


def ioa(g, l):
    """area(g ∩ l) / area(g); 0 when either box is degenerate."""
    if area(g) <= 0 or area(l) <= 0:
        return 0.0
    return intersection(g, l) / area(g)


def match(preds, gts, tau):
    """Sequential greedy: highest IoU first, ties to lower pred then lower GT index.

    Returns a list of (pred_index, gt_index, iou).
    """
    pairs = []
    for i, p in enumerate(preds):
        for k, g in enumerate(gts):
            v = iou(p, g)
            if v >= tau:
                pairs.append((-v, i, k))
    pairs.sort()
    used_p, used_g, out = set(), set(), []
    for neg_v, i, k in pairs:
        if i in used_p or k in used_g:
            continue
        used_p.add(i)
        used_g.add(k)
        out.append((i, k, -neg_v))
    return out


def ignored(preds, gts, regions, tau):
    """Indices of the stored predictions absorbed by ignore regions: left
    unmatched by the regular GT and IoA(pred, region) >= tau for some region."""
    matched = {i for i, _, _ in match(preds, gts, tau)}
    return [i for i, p in enumerate(preds)
            if i not in matched and any(ioa(p, r) >= tau for r in regions)]


def accuracy(preds, n_pred_total, gts, tau, soft, w_p, regions=()):
    n_gt = len(gts)
    n_pred_total -= len(ignored(preds, gts, regions, tau))
    if n_pred_total == 0 and n_gt == 0:
        return 1.0
    if n_pred_total == 0 or n_gt == 0:
        return 0.0
    m = match(preds, gts, tau)
    tp = sum(v for _, _, v in m) if soft else float(len(m))
    return w_p * tp / n_pred_total + (1 - w_p) * tp / n_gt


def count(c_hat, c):
    return max(0.0, 1.0 - abs(c_hat - c) / max(c, 1))


def look_group(group, gts, tau, tau_look, lam):
    """R_look for each rollout of one group.

    group: list of dicts with "answer" (stored boxes), "look" (stored boxes)
    and "look_total" (look boxes including unstored ones).
    """
    G = len(group)
    K = len(gts)
    d = [[0.0] * K for _ in range(G)]
    m_iou = [[0.0] * K for _ in range(G)]
    for i, c in enumerate(group):
        for _, k, v in match(c["answer"], gts, tau):
            d[i][k] = 1.0
            m_iou[i][k] = v
    u = []
    for k in range(K):
        p = sum(d[i][k] for i in range(G)) / G
        var = 0.0
        if lam:
            mean = sum(m_iou[i][k] for i in range(G)) / G
            var = sum((m_iou[i][k] - mean) ** 2 for i in range(G)) / G
        u.append(p * (1 - p) + lam * var)
    total_u = sum(u)
    out = []
    for c in group:
        if total_u <= 0:
            out.append(0.0)
            continue
        covered = [any(ioa(g, l) >= tau_look for l in c["look"]) for g in gts]
        lr = sum(u[k] for k in range(K) if covered[k]) / total_u
        useful = 0
        for l in c["look"]:
            if any(u[k] > 0 and ioa(gts[k], l) >= tau_look for k in range(K)):
                useful += 1
        lp = useful / c["look_total"] if c["look_total"] > 0 else 0.0
        out.append(0.0 if lr + lp == 0 else 2 * lr * lp / (lr + lp))
    return out


def rewards_group(group, gts, cfg, is_count=False, regions=()):
    """All rewards of one group. Each completion is a dict with keys
    format (bool), answer (list of stored boxes), answer_total, look,
    look_total, count (int or -1). ``regions`` are the image's ignore regions:
    an answer they absorb leaves #pred and c_hat (not the look reward)."""
    looks = look_group(group, gts, cfg.iou_threshold, cfg.look_ioa_threshold,
                       cfg.look_iou_var_weight)
    out = []
    for c, look in zip(group, looks):
        fmt = 1.0 if c["format"] else 0.0
        acc = accuracy(c["answer"], c["answer_total"], gts, cfg.iou_threshold, cfg.soft_tp,
                       cfg.precision_weight, regions)
        n_kept = c["answer_total"] - len(ignored(c["answer"], gts, regions, cfg.iou_threshold))
        c_hat = c["count"] if (is_count and c["count"] >= 0) else n_kept
        cnt = count(c_hat, len(gts))
        if is_count:
            total = cfg.w_format * fmt + cfg.w_look * look + cfg.w_count_prompt * cnt
        else:
            total = (cfg.w_format * fmt + cfg.w_look * look + cfg.w_acc * acc
                     + cfg.w_count * cnt)
        out.append({"format": fmt, "look": look, "accuracy": acc, "count": cnt, "total": total})
    return out


def advantages(rewards, scale="group"):
    G = len(rewards)
    mean = sum(rewards) / G
    if scale == "none" or G == 1:
        return [r - mean for r in rewards]
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (G - 1))
    return [(r - mean) / (std + 1e-4) for r in rewards]


def grpo_loss(logp, old_logp, ref_logp, adv, mask, cfg):
    """Loss over sequences: logp etc. are lists of per-token lists, adv a list."""
    per_seq_sum, per_seq_n = [], []
    for s in range(len(logp)):
        tot, n = 0.0, 0
        for t in range(len(logp[s])):
            if not mask[s][t]:
                continue
            rho = math.exp(logp[s][t] - old_logp[s][t])
            clipped = min(max(rho, 1 - cfg.eps_low), 1 + cfg.eps_high)
            term = -min(rho * adv[s], clipped * adv[s])
            if cfg.beta > 0:
                x = ref_logp[s][t] - logp[s][t]
                term += cfg.beta * (math.exp(x) - x - 1)
            tot += term
            n += 1
        per_seq_sum.append(tot)
        per_seq_n.append(n)
    if cfg.aggregation == "token-mean":
        return sum(per_seq_sum) / sum(per_seq_n)
    if cfg.aggregation == "seq-mean-token-mean":
        means = [t / n for t, n in zip(per_seq_sum, per_seq_n) if n > 0]
        return sum(means) / len(means)
    norm = cfg.norm_length if cfg.norm_length > 0 else len(logp[0])
    return sum(per_seq_sum) / (len(logp) * norm)
