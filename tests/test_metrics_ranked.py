"""AP against pycocotools and MR^-2 against a direct implementation of its definition."""

import contextlib
import io
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dipr1_jax import metrics as M
from test_metrics import r_counts, random_image, to_eval


# --------------------------------------------------------------------------
# pycocotools reference
# --------------------------------------------------------------------------


def _xywh(b):
    return [b[0], b[1], b[2] - b[0], b[3] - b[1]]


def coco_ap(cases, max_dets=10**6):
    """Per-threshold AP from pycocotools; our ignore regions become iscrowd=1 GT."""
    images, anns, dets = [], [], []
    for n, c in enumerate(cases):
        images.append({"id": n, "width": 400, "height": 300})
        regions = [(g, int(m)) for g, m in zip(c["gts"], c["ignore_mask"])] + [(r, 1) for r in c["ignore_boxes"]]
        for g, crowd in regions:
            b = _xywh(g)
            anns.append(
                {"id": len(anns) + 1, "image_id": n, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": crowd}
            )
        for p, s in zip(c["preds"], c["scores"]):
            dets.append({"image_id": n, "category_id": 1, "bbox": _xywh(p), "score": s})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [max_dets]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, 0, 0, 0]  # [T, R] for area "all", our maxDets
    return [float(np.mean(row)) if (row > -1).any() else math.nan for row in prec]


@pytest.mark.parametrize("integer", [False, True])
def test_ap_matches_pycocotools_on_random_cases(integer):
    rng = np.random.default_rng(11 + integer)
    checked = 0
    for trial in range(30):
        cases = [random_image(rng, n, True, integer) for n in range(int(rng.integers(1, 6)))]
        if sum(len(c["preds"]) for c in cases) == 0:  # pycocotools.loadRes rejects an empty result list
            continue
        if integer and trial % 2:  # ties in score too: pycocotools' stable order must be reproduced
            for c in cases:
                c["scores"] = [round(s, 1) for s in c["scores"]]
        ref = coco_ap(cases)
        got = M.average_precision([to_eval(c) for c in cases])
        if all(math.isnan(x) for x in ref):
            assert all(math.isnan(x) for x in got["ap"])
            continue
        assert got["ap"] == pytest.approx(ref, abs=1e-6)
        assert got["ap_50"] == pytest.approx(ref[0], abs=1e-6)
        assert got["ap_75"] == pytest.approx(ref[5], abs=1e-6)
        assert got["ap_50_95"] == pytest.approx(float(np.mean(ref)), abs=1e-6)
        checked += 1
    assert checked >= 20


def test_ap_max_dets_matches_pycocotools():
    rng = np.random.default_rng(5)
    for _ in range(10):
        cases = [random_image(rng, n, True, crowded=True) for n in range(3)]
        if sum(len(c["preds"]) for c in cases) == 0:
            continue
        ref = coco_ap(cases, max_dets=4)
        got = M.average_precision([to_eval(c) for c in cases], max_dets=4)
        assert got["ap"] == pytest.approx(ref, abs=1e-6, nan_ok=True)


def test_ap_hand_case():
    # 2 GT; detections by score: TP, FP, TP -> precision 1, 0.5, 0.667; envelope 1 up to recall .5,
    # 0.667 up to recall 1: AP = (51 * 1 + 50 * 2/3) / 101.
    img = M.EvalImage.create(
        0,
        [[0, 0, 10, 10], [50, 50, 60, 60], [20, 0, 30, 10]],
        [[0, 0, 10, 10], [20, 0, 30, 10]],
        scores=[0.9, 0.8, 0.7],
    )
    ap = M.average_precision([img], [0.5])
    assert ap["ap_50"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)
    assert math.isnan(M.average_precision([M.EvalImage.create(0, [[0, 0, 1, 1]], [], scores=[1.0])])["ap_50"])


def test_ap_exact_iou_tie_goes_to_the_later_gt_as_in_pycocotools():
    # A ties between G1 and G2 (IoU 2/3 each); B fits only G2. pycocotools' loop gives A the later
    # GT (G2), so B is a false positive: precision 1, 0.5 -> AP50 = 51/101 at recall .5 only.
    case = dict(
        image_id=0,
        gts=[[0.0, 0.0, 10.0, 10.0], [4.0, 0.0, 14.0, 10.0]],
        preds=[[2.0, 0.0, 12.0, 10.0], [5.0, 0.0, 15.0, 10.0]],
        scores=[0.9, 0.8],
        ignore_mask=[False, False],
        ignore_boxes=[],
    )
    ref = coco_ap([case])
    got = M.average_precision([to_eval(case)])
    assert ref[0] == pytest.approx(51 / 101)
    assert got["ap"] == pytest.approx(ref, abs=1e-12)


# --------------------------------------------------------------------------
# MR^-2: direct implementation of the definition
# --------------------------------------------------------------------------


def reference_mr2(cases):
    """Sweep the score threshold over every distinct score; at each, re-match the kept
    detections from scratch (pycocotools rule, IoU 0.5, ignore regions by IoA) and record
    (FPPI, miss rate); add the no-detection point (0, 1). At each of the 9 reference FPPIs
    10^-2, 10^-1.75, ..., 10^0 take the lowest miss rate reachable with FPPI <= f, floor it at
    1e-10, and return the geometric mean."""
    n_images = len(cases)
    n_gt = sum(1 for c in cases for m in c["ignore_mask"] if not m)
    points = [(0.0, 1.0)]
    for s in sorted({s for c in cases for s in c["scores"]}, reverse=True):
        tp = fp = 0
        for c in cases:
            keep = [i for i, x in enumerate(c["scores"]) if x >= s]
            preds = [c["preds"][i] for i in keep]
            scores = [c["scores"][i] for i in keep]
            gts = [g for g, m in zip(c["gts"], c["ignore_mask"]) if not m]
            ignores = [g for g, m in zip(c["gts"], c["ignore_mask"]) if m] + c["ignore_boxes"]
            a, b, _ = r_counts(preds, scores, gts, ignores, 0.5)
            tp, fp = tp + a, fp + b
        points.append((fp / n_images, 1.0 - tp / n_gt))
    logs = []
    for i in range(9):
        f = 10.0 ** (-2.0 + 0.25 * i)
        mr = min(m for x, m in points if x <= f)
        logs.append(math.log(max(mr, 1e-10)))
    return math.exp(sum(logs) / 9)


def test_mr2_matches_direct_definition():
    rng = np.random.default_rng(21)
    checked = 0
    for trial in range(16):
        n_images = int(rng.choice([1, 3, 10, 30]))
        cases = [random_image(rng, n, True) for n in range(n_images)]
        if sum(1 for c in cases for m in c["ignore_mask"] if not m) == 0:
            assert math.isnan(M.log_average_miss_rate([to_eval(c) for c in cases]))
            continue
        ref = reference_mr2(cases)
        got = M.log_average_miss_rate([to_eval(c) for c in cases])
        assert got == pytest.approx(ref, rel=1e-9, abs=1e-12)
        assert M.evaluate([to_eval(c) for c in cases])["mr_2"] == pytest.approx(ref, rel=1e-9)
        checked += 1
    assert checked >= 12


def test_mr2_extremes():
    gt = [[0, 0, 10, 20], [30, 0, 40, 20]]
    perfect = [M.EvalImage.create(0, gt, gt, scores=[0.9, 0.8])]
    assert M.log_average_miss_rate(perfect) == pytest.approx(1e-10)
    nothing = [M.EvalImage.create(0, np.zeros((0, 4)), gt, scores=[])]
    assert M.log_average_miss_rate(nothing) == 1.0
    # one image, a false positive ranked first: FPPI jumps to 1 at once, so the miss rate is 1
    # at every reference point below 1 and 0 at FPPI 1 (floored): exp((8 log 1 + log 1e-10) / 9)
    fp_first = [M.EvalImage.create(0, [[100, 100, 110, 110]] + gt, gt, scores=[0.99, 0.9, 0.8])]
    assert M.log_average_miss_rate(fp_first) == pytest.approx(math.exp(math.log(1e-10) / 9))
    fppi, mr = M.miss_rate_curve(fp_first)
    assert fppi.tolist() == [0.0, 1.0, 1.0, 1.0] and mr.tolist() == [1.0, 1.0, 0.5, 0.0]
