"""Reward kernels against the plain-Python reference (tests/reference.py)."""

import math

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as ref
from dipr1_jax.config import RewardConfig
from dipr1_jax.rewards import ParsedCompletions, box_ioa, box_iou, dip_rewards, match_greedy

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Boxes from several regimes: small integer grids (exact ties, identical and
# touching boxes), coordinates in the thousands, and degenerate boxes.
_small = st.tuples(*[st.integers(0, 12)] * 4).map(lambda t: tuple(float(v) for v in t))
_grid = st.tuples(st.integers(0, 10), st.integers(0, 10), st.integers(1, 6), st.integers(1, 6)
                  ).map(lambda t: (float(t[0]), float(t[1]), float(t[0] + t[2]), float(t[1] + t[3])))
_big = st.tuples(st.floats(0, 4000), st.floats(0, 4000), st.floats(0.5, 900), st.floats(0.5, 900)
                 ).map(lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3]))
_degenerate = st.tuples(st.floats(0, 100), st.floats(0, 100), st.floats(-5, 0)).map(
    lambda t: (t[0], t[1], t[0] + t[2], t[1] + 3.0))
BOX = st.one_of(_grid, _grid, _small, _big, _degenerate)


def _pad(rows, width):
    out = np.zeros((len(rows), width, 4))
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        r = r[:width]
        if r:
            out[i, :len(r)] = r
            mask[i, :len(r)] = True
    return out, mask


@st.composite
def reward_case(draw, B=2, G=4, K=6, P=6, L=4):
    gts = [draw(st.lists(BOX, max_size=K)) for _ in range(B)]
    comps = []
    for b in range(B):
        for _ in range(G):
            # Answers mix copies of GT (exact ties), jitter-free duplicates and new boxes;
            # up to P + 2 boxes so that overflow beyond P is exercised.
            pool = st.one_of(BOX, st.sampled_from(gts[b])) if gts[b] else BOX
            answer = draw(st.lists(pool, max_size=P + 2))
            look = draw(st.lists(pool, max_size=L + 1))
            comps.append({"format": draw(st.booleans()), "answer_all": answer,
                          "look_all": look, "count": draw(st.integers(-1, 9))})
    is_count = draw(st.lists(st.booleans(), min_size=B, max_size=B))
    return gts, comps, is_count


def _to_arrays(gts, comps, K, P, L):
    a_boxes, a_mask = _pad([c["answer_all"] for c in comps], P)
    l_boxes, l_mask = _pad([c["look_all"] for c in comps], L)
    a_total = np.array([len(c["answer_all"]) for c in comps], np.int32)
    l_total = np.array([len(c["look_all"]) for c in comps], np.int32)
    parsed = ParsedCompletions(
        format_ok=np.array([c["format"] for c in comps]), answer_boxes=a_boxes,
        answer_mask=a_mask, answer_total=a_total, look_boxes=l_boxes, look_mask=l_mask,
        look_total=l_total, count=np.array([c["count"] for c in comps], np.int32),
        answer_overflow=a_total - a_mask.sum(-1), look_overflow=l_total - l_mask.sum(-1))
    gt_boxes, gt_mask = _pad(gts, K)
    return parsed, gt_boxes, gt_mask


def _reference(gts, comps, G, P, L, cfg, is_count):
    out = []
    for b, gt in enumerate(gts):
        group = []
        for c in comps[b * G:(b + 1) * G]:
            group.append({"format": c["format"], "answer": c["answer_all"][:P],
                          "answer_total": len(c["answer_all"]), "look": c["look_all"][:L],
                          "look_total": len(c["look_all"]), "count": c["count"]})
        out.append(ref.rewards_group(group, gt, cfg, is_count[b]))
    return out


CONFIGS = [
    RewardConfig(),
    RewardConfig(soft_tp=False, precision_weight=0.3, iou_threshold=0.3, w_count=0.5),
    RewardConfig(look_iou_var_weight=0.7, look_ioa_threshold=0.9, iou_threshold=0.7),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@SETTINGS
@given(case=reward_case())
def test_dip_rewards_match_reference_exactly_in_float64(cfg, case):
    gts, comps, is_count = case
    B, G, K, P, L = 2, 4, 6, 6, 4
    with jax.enable_x64(True):
        parsed, gt_boxes, gt_mask = _to_arrays(gts, comps, K, P, L)
        got = dip_rewards(parsed, gt_boxes, gt_mask, G, cfg, is_count=np.array(is_count))
        got = {k: np.asarray(v) for k, v in got.items()}
    want = _reference(gts, comps, G, P, L, cfg, is_count)
    for b in range(B):
        for i in range(G):
            for key in ("format", "look", "accuracy", "count", "total"):
                assert got[key][b, i] == pytest.approx(want[b][i][key], abs=1e-6), (key, b, i)


@SETTINGS
@given(case=reward_case())
def test_dip_rewards_float32_close_to_reference(case):
    gts, comps, is_count = case
    parsed, gt_boxes, gt_mask = _to_arrays(gts, comps, 6, 6, 4)
    parsed = parsed._replace(answer_boxes=parsed.answer_boxes.astype(np.float32),
                             look_boxes=parsed.look_boxes.astype(np.float32))
    got = dip_rewards(parsed, gt_boxes.astype(np.float32), gt_mask, 4, RewardConfig(),
                      is_count=np.array(is_count))
    assert got["total"].dtype == np.float32
    # Feed the reference the float32-rounded boxes the kernel saw.
    r32 = lambda rows: [[tuple(float(np.float32(v)) for v in b) for b in r] for r in rows]
    gts32 = r32(gts)
    comps32 = [dict(c, answer_all=r32([c["answer_all"]])[0], look_all=r32([c["look_all"]])[0])
               for c in comps]
    want = _reference(gts32, comps32, 4, 6, 4, RewardConfig(), is_count)
    for b in range(2):
        for i in range(4):
            # float32 rounding can only flip a match at a near-tie; such cases are
            # vanishingly rare at these coordinates, so the bound stays tight.
            assert float(got["total"][b, i]) == pytest.approx(want[b][i]["total"], abs=2e-5)


@SETTINGS
@given(a=st.lists(st.one_of(BOX, st.tuples(*[st.sampled_from([math.nan, math.inf, -math.inf, 1.0, 7.0])] * 4)),
                  min_size=1, max_size=7),
       b=st.lists(BOX, min_size=1, max_size=7))
def test_box_iou_and_ioa_match_reference(a, b):
    with jax.enable_x64(True):
        iou = np.asarray(box_iou(np.array(a), np.array(b)))
        ioa = np.asarray(box_ioa(np.array(a), np.array(b)))
    assert np.all(np.isfinite(iou)) and np.all(np.isfinite(ioa))
    for n, x in enumerate(a):
        for m, y in enumerate(b):
            assert iou[n, m] == pytest.approx(ref.iou(x, y), abs=1e-9)
            assert ioa[n, m] == pytest.approx(ref.ioa(x, y), abs=1e-9)


@SETTINGS
@given(preds=st.lists(BOX, max_size=9), gts=st.lists(BOX, max_size=9),
       tau=st.sampled_from([0.1, 0.5, 0.75, 1.0]))
def test_match_greedy_matches_sequential_reference(preds, gts, tau):
    P, K = 9, 9
    with jax.enable_x64(True):
        (pb, pm), (gb, gm) = _pad([preds], P), _pad([gts], K)
        iou = box_iou(pb[0], gb[0])
        gt_iou, pred_matched = match_greedy(iou, pm[0], gm[0], tau)
        gt_iou, pred_matched = np.asarray(gt_iou), np.asarray(pred_matched)
    want_gt = [0.0] * K
    want_pred = [False] * P
    for i, k, v in ref.match(preds, gts, tau):
        want_gt[k] = v
        want_pred[i] = True
    assert list(pred_matched) == want_pred
    np.testing.assert_allclose(gt_iou, want_gt, atol=1e-12)


def test_ties_go_to_lower_prediction_then_lower_gt():
    iou = np.array([[0.8, 0.8], [0.8, 0.8], [0.9, 0.1]])
    gt_iou, pred = match_greedy(iou, np.ones(3, bool), np.ones(2, bool), 0.5)
    # 0.9 first: pred 2 -> gt 0. Then the 0.8 ties: pred 0 (lower) takes gt 1.
    np.testing.assert_allclose(np.asarray(gt_iou), [0.9, 0.8], rtol=1e-6)
    assert list(np.asarray(pred)) == [True, False, True]


def test_padding_never_matches_and_degenerate_gives_zero_not_nan():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 5, 9], [0, 0, 10, 10]], np.float32)
    iou = np.asarray(box_iou(boxes, boxes))
    assert iou[1, 1] == 0.0 and not np.isnan(iou).any()
    gt_iou, pred = match_greedy(iou, np.array([False, True, True]), np.array([True, True, False]))
    # Pred 0 is padding and GT 2 is padding: only pred 2 -> GT 0 can match.
    assert list(np.asarray(pred)) == [False, False, True]
    np.testing.assert_allclose(np.asarray(gt_iou), [1.0, 0.0, 0.0])


def test_look_reward_zero_when_group_agrees():
    # Every rollout finds the single GT: u_k = 0, so R_look = 0 for all.
    gt = np.array([[[0, 0, 10, 10]]], np.float32)
    a, _ = _pad([[(0, 0, 10, 10)]] * 3, 2)
    parsed = ParsedCompletions(
        format_ok=np.ones(3, bool), answer_boxes=a.astype(np.float32),
        answer_mask=np.array([[True, False]] * 3), answer_total=np.ones(3, np.int32),
        look_boxes=a.astype(np.float32), look_mask=np.array([[True, False]] * 3),
        look_total=np.ones(3, np.int32), count=-np.ones(3, np.int32),
        answer_overflow=np.zeros(3, np.int32), look_overflow=np.zeros(3, np.int32))
    r = dip_rewards(parsed, gt, np.ones((1, 1), bool), 3)
    assert np.all(np.asarray(r["look"]) == 0.0)
    assert np.allclose(np.asarray(r["accuracy"]), 1.0)


def test_wrong_group_size_is_a_clear_error():
    parsed, gt_boxes, gt_mask = _to_arrays([[]], [{"format": True, "answer_all": [],
                                                   "look_all": [], "count": -1}] * 3, 2, 2, 2)
    with pytest.raises(ValueError, match="B \\* G"):
        dip_rewards(parsed, gt_boxes, gt_mask, 2)
