"""P/R/F1, matching, counting and input checks of dipr1_jax.metrics against plain-Python references."""

import math

import numpy as np
import pytest

from dipr1_jax import metrics as M

THRESHOLDS = [float(t) for t in M.COCO_IOU_THRESHOLDS]


# --------------------------------------------------------------------------
# Plain-Python reference, written from the definitions
# --------------------------------------------------------------------------


def r_area(b):
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def r_inter(a, b):
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def r_iou(a, b):
    u = r_area(a) + r_area(b) - r_inter(a, b)
    return r_inter(a, b) / u if u > 0 else 0.0


def r_ioa(a, region):
    return r_inter(a, region) / r_area(a) if r_area(a) > 0 else 0.0


def r_greedy(preds, gts, thr):
    """DESIGN.md 3: repeatedly the highest-IoU unmatched pair >= thr; ties: lower pred, then lower GT."""
    match = {}
    used = set()
    while True:
        best = None
        for i, p in enumerate(preds):
            if i in match:
                continue
            for j, g in enumerate(gts):
                if j in used:
                    continue
                v = r_iou(p, g)
                if v >= thr and (best is None or v > best[0]):
                    best = (v, i, j)
        if best is None:
            return match
        match[best[1]] = best[2]
        used.add(best[2])


def r_score_match(preds, scores, gts, thr):
    """pycocotools' loop: by score (stable); the best available GT, exact ties to the later one."""
    order = sorted(range(len(preds)), key=lambda i: (-scores[i], i))
    match, used = {}, set()
    for d in order:
        best, m = thr, -1
        for g in range(len(gts)):
            if g in used:
                continue
            v = r_iou(preds[d], gts[g])
            if v < best:
                continue
            best, m = v, g
        if m >= 0:
            match[d] = m
            used.add(m)
    return match


def r_counts(preds, scores, gts, ignores, thr):
    match = r_greedy(preds, gts, thr) if scores is None else r_score_match(preds, scores, gts, thr)
    tp = fp = ign = 0
    for i, p in enumerate(preds):
        if i in match:
            tp += 1
        elif any(r_ioa(p, r) >= thr for r in ignores):
            ign += 1
        else:
            fp += 1
    return tp, fp, ign


def r_prf(tp, fp, ngt):
    if tp + fp == 0 and ngt == 0:
        return 1.0, 1.0, 1.0
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / ngt if ngt else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


# --------------------------------------------------------------------------
# Random cases
# --------------------------------------------------------------------------


def _rand_box(rng, w=320, h=240, integer=False):
    x1 = rng.uniform(0, w - 12)
    y1 = rng.uniform(0, h - 20)
    bw = rng.uniform(4, min(60, w / 3))
    bh = rng.uniform(8, min(90, h / 2))
    b = [x1, y1, x1 + bw, y1 + bh]
    return [float(round(v)) for v in b] if integer else b


def random_image(rng, image_id, with_scores, integer=False, crowded=None):
    """GT boxes, noisy hits / duplicates / misses, false positives, ignore regions.
    ``crowded`` images pack up to 14 people into a small canvas so that boxes overlap."""
    if crowded is None:
        crowded = bool(rng.random() < 0.5)
    w, h = (90, 80) if crowded else (320, 240)
    k = int(rng.integers(0, 15 if crowded else 9))
    gts = [_rand_box(rng, w, h, integer=integer) for _ in range(k)]
    preds = []
    for g in gts:
        for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):  # misses, hits, duplicates
            s = 0.15 * (g[2] - g[0])
            p = [g[0] + rng.normal(0, s), g[1] + rng.normal(0, s), g[2] + rng.normal(0, s), g[3] + rng.normal(0, s)]
            p[2] = max(p[2], p[0] + 2)
            p[3] = max(p[3], p[1] + 2)
            preds.append([float(round(v)) for v in p] if integer else p)
    preds += [_rand_box(rng, w, h, integer=integer) for _ in range(int(rng.integers(0, 4)))]
    ignore_mask = (rng.random(k) < 0.2).tolist()
    ignore_boxes = [_rand_box(rng, w, h, integer=integer) for _ in range(int(rng.integers(0, 3)))]
    for r in ignore_boxes:  # some predictions inside ignore regions
        if rng.random() < 0.7:
            cx, cy = (r[0] + r[2]) / 2, (r[1] + r[3]) / 2
            preds.append([cx - 2, cy - 3, cx + 2, cy + 3])
    order = rng.permutation(len(preds))
    preds = [preds[i] for i in order]
    scores = None
    if with_scores:
        scores = rng.random(len(preds)).tolist()
    return dict(
        image_id=image_id, preds=preds, gts=gts, ignore_mask=ignore_mask, ignore_boxes=ignore_boxes, scores=scores
    )


def to_eval(case):
    return M.EvalImage.create(
        case["image_id"],
        np.array(case["preds"], np.float64).reshape(-1, 4),
        np.array(case["gts"], np.float64).reshape(-1, 4),
        scores=None if case["scores"] is None else np.array(case["scores"]),
        gt_ignore=np.array(case["ignore_mask"], bool),
        ignore_boxes=np.array(case["ignore_boxes"]).reshape(-1, 4),
    )


def reference_prf(cases, thr, score_threshold=None):
    tp = fp = ngt = 0
    for c in cases:
        preds, scores = c["preds"], c["scores"]
        if scores is not None and score_threshold is not None:
            keep = [i for i, s in enumerate(scores) if s >= score_threshold]
            preds, scores = [preds[i] for i in keep], [scores[i] for i in keep]
        gts = [g for g, m in zip(c["gts"], c["ignore_mask"]) if not m]
        ignores = [g for g, m in zip(c["gts"], c["ignore_mask"]) if m] + c["ignore_boxes"]
        a, b, _ = r_counts(preds, scores, gts, ignores, thr)
        tp, fp, ngt = tp + a, fp + b, ngt + len(gts)
    return r_prf(tp, fp, ngt)


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


@pytest.mark.parametrize("with_scores", [False, True])
@pytest.mark.parametrize("integer", [False, True])
def test_prf_matches_plain_python_reference(with_scores, integer):
    rng = np.random.default_rng(1 + 2 * with_scores + integer)
    for trial in range(25):
        cases = [random_image(rng, f"img{trial}_{i}", with_scores, integer) for i in range(int(rng.integers(1, 5)))]
        got = M.precision_recall_f1([to_eval(c) for c in cases])
        for t, thr in enumerate(THRESHOLDS):
            p, r, f = reference_prf(cases, thr)
            assert got["precision"][t] == pytest.approx(p, abs=1e-12)
            assert got["recall"][t] == pytest.approx(r, abs=1e-12)
            assert got["f1"][t] == pytest.approx(f, abs=1e-12)
        summary = M.evaluate([to_eval(c) for c in cases])
        ref = [reference_prf(cases, thr) for thr in THRESHOLDS]
        assert summary["f1_50"] == pytest.approx(ref[0][2], abs=1e-12)
        assert summary["precision_50_95"] == pytest.approx(sum(x[0] for x in ref) / 10, abs=1e-12)
        assert summary["recall_50_95"] == pytest.approx(sum(x[1] for x in ref) / 10, abs=1e-12)
        assert summary["f1_50_95"] == pytest.approx(sum(x[2] for x in ref) / 10, abs=1e-12)


def test_score_threshold_filters_predictions():
    rng = np.random.default_rng(7)
    cases = [random_image(rng, i, True) for i in range(6)]
    got = M.precision_recall_f1([to_eval(c) for c in cases], [0.5], score_threshold=0.4)
    p, r, f = reference_prf(cases, 0.5, score_threshold=0.4)
    assert (got["precision"][0], got["recall"][0], got["f1"][0]) == pytest.approx((p, r, f), abs=1e-12)
    full = M.precision_recall_f1([to_eval(c) for c in cases], [0.5])
    assert got["tp"][0] + got["fp"][0] < full["tp"][0] + full["fp"][0]


def test_greedy_tie_rules_and_difference_from_score_order():
    gt = np.array([[0, 0, 10, 10]], np.float64)
    preds = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float64)
    assert M.greedy_match(M.box_iou(preds, gt), 0.5).tolist() == [0, -1]  # tie: lower prediction
    # one prediction equally overlapping two GTs: the lower GT index (greedy), the later one (COCO loop)
    gts = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float64)
    one = np.array([[0, 0, 10, 10]], np.float64)
    assert M.greedy_match(M.box_iou(one, gts), 0.5).tolist() == [0]
    assert M.score_match(M.box_iou(one, gts), np.array([1.0]), 0.5).tolist() == [1]
    # greedy takes the best pair first; score order lets a confident loose box steal the GT
    gt = np.array([[0, 0, 10, 10]], np.float64)
    preds = np.array([[0, 0, 10, 10], [0, 0, 10, 16]], np.float64)  # IoU 1.0 and 0.625
    assert M.greedy_match(M.box_iou(preds, gt), 0.5).tolist() == [0, -1]
    assert M.score_match(M.box_iou(preds, gt), np.array([0.1, 0.9]), 0.5).tolist() == [-1, 0]


def test_ignore_regions_absorb_many_predictions_but_never_count_as_gt():
    img = M.EvalImage.create(
        "a",
        pred_boxes=[[0, 0, 10, 10], [100, 100, 104, 104], [101, 101, 105, 105], [300, 300, 310, 310]],
        gt_boxes=[[0, 0, 10, 10], [90, 90, 130, 130]],
        gt_ignore=[False, True],
    )
    st = M.match_image(img, [0.5])
    assert st[0].tolist() == [M.TP, M.IGNORED, M.IGNORED, M.FP]
    out = M.precision_recall_f1([img], [0.5])
    assert out["n_gt"] == 1 and out["tp"] == [1] and out["fp"] == [1] and out["n_ignored"] == [2]
    # separate ignore boxes behave the same as flagged GT
    img2 = M.EvalImage.create(
        "b", img.pred_boxes, [[0, 0, 10, 10]], ignore_boxes=[[90, 90, 130, 130]]
    )
    assert M.match_image(img2, [0.5]).tolist() == st.tolist()
    # IoA is relative to the prediction: a big box around a small region is not ignored
    big = M.EvalImage.create("c", [[0, 0, 100, 100]], np.zeros((0, 4)), ignore_boxes=[[0, 0, 20, 20]])
    assert M.match_image(big, [0.5]).tolist() == [[M.FP]]


def test_prf_edge_cases():
    empty = M.EvalImage.create("e", np.zeros((0, 4)), np.zeros((0, 4)))
    out = M.precision_recall_f1([empty], [0.5])
    assert (out["precision"][0], out["recall"][0], out["f1"][0]) == (1.0, 1.0, 1.0)
    only_pred = M.EvalImage.create("p", [[0, 0, 5, 5]], np.zeros((0, 4)))
    out = M.precision_recall_f1([only_pred], [0.5])
    assert (out["precision"][0], out["recall"][0], out["f1"][0]) == (0.0, 0.0, 0.0)
    only_gt = M.EvalImage.create("g", np.zeros((0, 4)), [[0, 0, 5, 5]])
    out = M.precision_recall_f1([only_gt], [0.5])
    assert (out["precision"][0], out["recall"][0], out["f1"][0]) == (0.0, 0.0, 0.0)
    # degenerate predictions overlap nothing (IoU 0, never NaN) and count as false positives
    deg = M.EvalImage.create("d", [[5, 5, 5, 9], [3, 3, 1, 1]], [[0, 0, 10, 10]])
    assert M.box_iou(deg.pred_boxes, deg.gt_boxes).tolist() == [[0.0], [0.0]]
    assert M.precision_recall_f1([deg], [0.5])["fp"] == [2]


def test_counting_mae_rmse_against_plain_python():
    rng = np.random.default_rng(3)
    cases = [random_image(rng, i, False) for i in range(12)]
    imgs = [to_eval(c) for c in cases]
    imgs[3] = M.EvalImage.create(
        imgs[3].image_id, imgs[3].pred_boxes, imgs[3].gt_boxes, ignore_boxes=imgs[3].ignore_boxes, pred_count=17
    )
    diffs = []
    for i, c in enumerate(cases):
        n_gt = sum(1 for m in c["ignore_mask"] if not m)
        n_pred = 17 if i == 3 else len(c["preds"])
        diffs.append(n_pred - n_gt)
    out = M.evaluate(imgs)
    assert out["count_mae"] == pytest.approx(sum(abs(d) for d in diffs) / len(diffs), abs=1e-12)
    assert out["count_rmse"] == pytest.approx(math.sqrt(sum(d * d for d in diffs) / len(diffs)), abs=1e-12)
    assert out["ap_50"] is None and out["mr_2"] is None  # no scores: no ranked metrics
    assert M.count_errors([3, 5], [4, 1]) == pytest.approx({"count_mae": 2.5, "count_rmse": math.sqrt(8.5)})
    with pytest.raises(ValueError, match="2 predicted counts vs 1"):
        M.count_errors([1, 2], [1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pred_boxes=[[0, 0, float("nan"), 4]], gt_boxes=[[0, 0, 1, 1]]), "'im7': pred_boxes row 0 is not finite"),
        (dict(pred_boxes=[[0, 0, 1, 1]], gt_boxes=[[0, 0, 1, 1], [0, 0, np.inf, 1]]), "'im7': gt_boxes row 1"),
        (dict(pred_boxes=[[0, 0, 1]], gt_boxes=[[0, 0, 1, 1]]), r"'im7': pred_boxes must have shape \[N, 4\]"),
        (dict(pred_boxes=[[0, 0, 1, 1]], gt_boxes=[[0, 0, 1, 1]], scores=[0.1, 0.2]), r"'im7': scores must have shape \[1\]"),
        (dict(pred_boxes=[[0, 0, 1, 1]], gt_boxes=[[0, 0, 1, 1]], scores=[float("nan")]), "'im7': scores contain non-finite"),
        (dict(pred_boxes=[[0, 0, 1, 1]], gt_boxes=[[0, 0, 1, 1]], gt_ignore=[True, False]), r"'im7': gt_ignore must have shape \[1\]"),
        (dict(pred_boxes=[[0, 0, 1, 1]], gt_boxes=[[0, 0, 1, 1]], gt_ignore=[0.5]), "'im7': gt_ignore must be boolean"),
        (dict(pred_boxes=[[0, 0, 1, 1]], gt_boxes=[[0, 0, 1, 1]], ignore_boxes=[[1, 2]]), "'im7': ignore_boxes must have shape"),
        (dict(pred_boxes=[[0, 0, 1, 1]], gt_boxes="abc"), "'im7': gt_boxes is not a numeric array"),
        (dict(pred_boxes=[], gt_boxes=[], pred_count=-1), "'im7': pred_count"),
        (dict(pred_boxes=[], gt_boxes=[], pred_count="3"), "'im7': pred_count must be a non-negative integer"),
        (dict(pred_boxes=[], gt_boxes=[], pred_count=2.5), "'im7': pred_count must be a non-negative integer"),
    ],
)
def test_bad_input_names_the_image(kwargs, message):
    with pytest.raises(ValueError, match=message):
        M.EvalImage.create("im7", **kwargs)


def test_dataset_level_checks():
    a = M.EvalImage.create("x", [[0, 0, 1, 1]], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="'x' appears twice"):
        M.evaluate([a, a])
    with pytest.raises(ValueError, match="'x': AP / MR\\^-2 need prediction scores"):
        M.average_precision([a])


def test_greedy_and_score_order_can_give_different_counts():
    # A overlaps G1 (0.667) and G2 (0.538); B overlaps G1 (0.9) only. Greedy pairs B-G1 then A-G2
    # (2 TP); score order lets the confident A take G1 first and B is left over (1 TP).
    g1, g2 = [0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0]
    a, b = [2.0, 0.0, 12.0, 10.0], [0.0, 0.0, 10.0, 9.0]
    assert r_iou(b, g1) > r_iou(a, g1) > r_iou(a, g2) >= 0.5 > r_iou(b, g2)
    no_scores = M.EvalImage.create("n", [a, b], [g1, g2])
    scored = M.EvalImage.create("s", [a, b], [g1, g2], scores=[0.9, 0.1])
    assert M.precision_recall_f1([no_scores], [0.5])["tp"] == [2]
    assert M.precision_recall_f1([scored], [0.5])["tp"] == [1]
    assert r_counts([a, b], None, [g1, g2], [], 0.5)[0] == 2
    assert r_counts([a, b], [0.9, 0.1], [g1, g2], [], 0.5)[0] == 1


def test_greedy_match_equals_the_reward_kernel_matching():
    """Evaluation and the R_acc/R_look rewards use one matching rule (DESIGN.md 3)."""
    import jax

    from dipr1_jax.rewards.matching import match_pairs

    match_pairs = jax.jit(match_pairs, static_argnums=3)
    rng = np.random.default_rng(9)
    n_ties = 0
    for _ in range(40):
        # IoUs on a 1/16 grid: exact in float32 and float64, with many ties
        iou = rng.integers(0, 17, size=(12, 10)) / 16.0
        pairs = np.asarray(match_pairs(iou.astype(np.float32), np.ones(12, bool), np.ones(10, bool), 0.5))
        kernel = np.where(pairs.any(axis=1), pairs.argmax(axis=1), -1)
        ours = M.greedy_match(iou, 0.5)
        ref = r_greedy_on_matrix(iou, 0.5)
        assert ours.tolist() == ref == kernel.tolist()
        n_ties += len(np.unique(iou[iou >= 0.5])) < int((iou >= 0.5).sum())
    assert n_ties == 40


def r_greedy_on_matrix(iou, thr):
    out = [-1] * iou.shape[0]
    used = set()
    while True:
        best = None
        for i in range(iou.shape[0]):
            if out[i] >= 0:
                continue
            for j in range(iou.shape[1]):
                if j not in used and iou[i, j] >= thr and (best is None or iou[i, j] > best[0]):
                    best = (iou[i, j], i, j)
        if best is None:
            return out
        out[best[1]] = best[2]
        used.add(best[2])
