"""Detection and counting metrics for evaluation (host-side numpy, not the training hot path).

Inputs are per-image arrays in ORIGINAL image pixels, boxes ``x1, y1, x2, y2``:

    img = EvalImage.create(image_id, pred_boxes, gt_boxes, scores=None,
                           gt_ignore=None, ignore_boxes=None, pred_count=None)
    summary = evaluate([img, ...])   # flat dict: precision_50, ..., ap_50_95, mr_2, count_mae

Matching (one-to-one, regular GT first, ignore regions second):

* Without scores: the greedy rule of DESIGN.md section 3 (repeatedly the
  highest-IoU unmatched pair with IoU >= t; ties to the lower prediction, then
  the lower GT index), the same rule the reward kernels use.
* With scores: score-ordered as pycocotools does (highest score first, stable;
  each prediction takes the unmatched GT of highest IoU >= t, pycocotools'
  loop giving exact IoU ties to the later GT).
* Ignore regions (GT boxes flagged by ``gt_ignore`` plus separate
  ``ignore_boxes``) map to pycocotools' ``iscrowd=1`` GT, which is also how the
  Caltech / CityPersons / CrowdHuman evaluation treats them: they are never
  counted as GT (no false negatives); a prediction left unmatched by the
  regular GT whose overlap with a region, measured as IoA = area(pred ∩ region)
  / area(pred), is >= t is dropped (neither TP nor FP); a region absorbs any
  number of predictions. The IoA threshold is the IoU threshold t in use.

Metrics:

* precision / recall / F1 at IoU 0.5, and each averaged over the ten COCO
  thresholds 0.5:0.05:0.95, from counts summed over the dataset (micro).
  No prediction and no GT anywhere gives 1; otherwise an empty denominator
  gives 0 (as the R_acc reward of DESIGN.md section 3).
* AP50, AP75 and COCO AP (0.5:0.95, 101-point interpolated precision), exactly
  pycocotools' ``accumulate`` for one category and area "all"; ``max_dets``
  defaults to no cap (pycocotools uses 100, too few for crowds). NaN when the
  dataset has no GT.
* MR^-2: log-average miss rate over 9 FPPI points log-spaced in [1e-2, 1e0]
  at IoU 0.5 (Dollár et al.; CityPersons, CrowdHuman). The curve is traced
  detection by detection in score order and starts at the no-detection
  point (FPPI 0, miss rate 1); at each reference FPPI f the miss rate of the
  last point with FPPI <= f is taken, floored at 1e-10, and the geometric mean
  of the 9 values is returned. NaN when the dataset has no GT.
* Counting MAE / RMSE between the predicted count (``pred_count`` if given,
  else the number of predictions) and the number of regular GT boxes.

Bad input (non-finite boxes or scores, wrong shapes, duplicate image ids)
raises ``ValueError`` naming the image id.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

# pycocotools' thresholds, bit for bit (matching decisions compare against these floats).
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
FPPI_POINTS = np.logspace(-2.0, 0.0, 9)
MR_FLOOR = 1e-10

TP, FP, IGNORED = 1, 0, -1  # status of a prediction after matching


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def _boxes(x: Any, name: str, image_id: Hashable) -> np.ndarray:
    try:
        a = np.asarray(x if x is not None else np.zeros((0, 4)), dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"image {image_id!r}: {name} is not a numeric array: {e}") from None
    if a.size == 0:
        return np.zeros((0, 4), np.float64)
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"image {image_id!r}: {name} must have shape [N, 4], got {a.shape}")
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        raise ValueError(
            f"image {image_id!r}: {name} row {int(np.argmax(bad))} is not finite: {a[bad][0].tolist()}"
        )
    return a


def _vector(x: Any, n: int, name: str, image_id: Hashable, dtype) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"image {image_id!r}: {name} is not a numeric array: {e}") from None
    if a.ndim == 0 or a.size == 0:
        a = a.reshape(-1)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"image {image_id!r}: {name} must have shape [{n}], got {a.shape}")
    return a


@dataclasses.dataclass(frozen=True)
class EvalImage:
    """One image's validated evaluation inputs (original-image pixels, x1y1x2y2)."""

    image_id: Hashable
    pred_boxes: np.ndarray  # [N, 4]
    pred_scores: np.ndarray | None  # [N] or None
    gt_boxes: np.ndarray  # [K, 4] regular GT (ignored ones removed)
    ignore_boxes: np.ndarray  # [M, 4] ignore regions
    pred_count: int | None = None  # a counting answer, overrides len(pred_boxes)

    @classmethod
    def create(
        cls,
        image_id: Hashable,
        pred_boxes: Any,
        gt_boxes: Any,
        scores: Any = None,
        gt_ignore: Any = None,
        ignore_boxes: Any = None,
        pred_count: int | None = None,
    ) -> EvalImage:
        pred = _boxes(pred_boxes, "pred_boxes", image_id)
        gt = _boxes(gt_boxes, "gt_boxes", image_id)
        ign = _boxes(ignore_boxes, "ignore_boxes", image_id)
        sc = None
        if scores is not None:
            sc = _vector(scores, len(pred), "scores", image_id, np.float64)
            if not np.isfinite(sc).all():
                raise ValueError(f"image {image_id!r}: scores contain non-finite values")
        if gt_ignore is not None:
            mask = _vector(gt_ignore, len(gt), "gt_ignore", image_id, np.float64)
            if not np.isin(mask, (0.0, 1.0)).all():
                raise ValueError(f"image {image_id!r}: gt_ignore must be boolean (0/1)")
            mask = mask.astype(bool)
            ign = np.concatenate([gt[mask], ign], axis=0)
            gt = gt[~mask]
        if pred_count is not None:
            ok = isinstance(pred_count, (int, float, np.integer, np.floating)) and not isinstance(pred_count, bool)
            if not ok or not np.isfinite(pred_count) or int(pred_count) != pred_count or pred_count < 0:
                raise ValueError(f"image {image_id!r}: pred_count must be a non-negative integer, got {pred_count!r}")
            pred_count = int(pred_count)
        return cls(image_id, pred, sc, gt, ign, pred_count)

    def with_score_threshold(self, threshold: float | None) -> EvalImage:
        """Keep only predictions with score >= threshold (no-op without scores)."""
        if threshold is None or self.pred_scores is None:
            return self
        keep = self.pred_scores >= threshold
        return dataclasses.replace(self, pred_boxes=self.pred_boxes[keep], pred_scores=self.pred_scores[keep])


def _check_ids(images: Sequence[EvalImage]) -> None:
    seen = set()
    for img in images:
        if not isinstance(img, EvalImage):
            raise TypeError(f"expected EvalImage, got {type(img).__name__} (use EvalImage.create)")
        if img.image_id in seen:
            raise ValueError(f"image {img.image_id!r} appears twice")
        seen.add(img.image_id)


# ---------------------------------------------------------------------------
# Overlaps and matching
# ---------------------------------------------------------------------------


def _area(b: np.ndarray) -> np.ndarray:
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.clip(iw, 0, None) * np.clip(ih, 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [N, K]; degenerate boxes give 0, never NaN."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    inter = _intersection(a, b)
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def box_ioa(a: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """[N, M] share of each box of ``a`` covered by each region: area(a ∩ r) / area(a)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    regions = np.asarray(regions, np.float64).reshape(-1, 4)
    inter = _intersection(a, regions)
    area = _area(a)[:, None]
    return np.where(area > 0, inter / np.where(area > 0, area, 1.0), 0.0)


def greedy_match(iou: np.ndarray, threshold: float) -> np.ndarray:
    """DESIGN.md section 3 matching. Returns [N] GT index per prediction, -1 if unmatched."""
    n, k = iou.shape
    out = np.full(n, -1, np.int64)
    pi, gi = np.nonzero(iou >= threshold)
    if pi.size == 0:
        return out
    order = np.lexsort((gi, pi, -iou[pi, gi]))  # IoU desc, then pred index, then GT index
    gt_used = np.zeros(k, bool)
    for p, g in zip(pi[order].tolist(), gi[order].tolist()):
        if out[p] < 0 and not gt_used[g]:
            out[p] = g
            gt_used[g] = True
    return out


def score_order(scores: np.ndarray) -> np.ndarray:
    """Highest score first, stable (pycocotools' mergesort)."""
    return np.argsort(-scores, kind="mergesort")


def score_match(iou: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """pycocotools' matching on regular GT. Returns [N] GT index per prediction, -1 if unmatched."""
    n, k = iou.shape
    out = np.full(n, -1, np.int64)
    available = np.ones(k, bool)
    for d in score_order(scores).tolist():
        row = np.where(available, iou[d], -1.0)
        cand = np.flatnonzero(row >= threshold)
        if cand.size == 0:
            continue
        vals = row[cand]
        g = int(cand[np.flatnonzero(vals == vals.max())[-1]])  # exact ties: the later GT
        out[d] = g
        available[g] = False
    return out


def match_image(img: EvalImage, thresholds: Sequence[float], use_scores: bool | None = None) -> np.ndarray:
    """Status of each prediction at each threshold: [T, N] of TP / FP / IGNORED."""
    if use_scores is None:
        use_scores = img.pred_scores is not None
    if use_scores and img.pred_scores is None:
        raise ValueError(f"image {img.image_id!r}: score-ordered matching needs scores")
    iou = box_iou(img.pred_boxes, img.gt_boxes)
    ioa = box_ioa(img.pred_boxes, img.ignore_boxes).max(axis=1, initial=0.0)
    status = np.empty((len(thresholds), len(img.pred_boxes)), np.int8)
    for t, thr in enumerate(thresholds):
        m = score_match(iou, img.pred_scores, thr) if use_scores else greedy_match(iou, thr)
        s = np.where(m >= 0, TP, FP)
        s[(m < 0) & (ioa >= thr)] = IGNORED
        status[t] = s
    return status


# ---------------------------------------------------------------------------
# Precision / recall / F1
# ---------------------------------------------------------------------------


def _prf(tp: float, fp: float, n_gt: float) -> tuple[float, float, float]:
    n_pred = tp + fp
    if n_pred == 0 and n_gt == 0:
        return 1.0, 1.0, 1.0
    p = tp / n_pred if n_pred > 0 else 0.0
    r = tp / n_gt if n_gt > 0 else 0.0
    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return p, r, f


def precision_recall_f1(
    images: Sequence[EvalImage],
    thresholds: Sequence[float] = COCO_IOU_THRESHOLDS,
    score_threshold: float | None = None,
) -> dict[str, Any]:
    """Dataset P/R/F1 per IoU threshold (micro: counts summed over images).

    Returns ``{"thresholds", "tp", "fp", "n_gt", "precision", "recall", "f1"}``
    with one entry per threshold (lists), plus ``n_ignored``.
    """
    _check_ids(images)
    thresholds = [float(t) for t in thresholds]
    tp = np.zeros(len(thresholds), np.int64)
    fp = np.zeros(len(thresholds), np.int64)
    ign = np.zeros(len(thresholds), np.int64)
    n_gt = 0
    for img in images:
        img = img.with_score_threshold(score_threshold)
        st = match_image(img, thresholds)
        tp += (st == TP).sum(axis=1)
        fp += (st == FP).sum(axis=1)
        ign += (st == IGNORED).sum(axis=1)
        n_gt += len(img.gt_boxes)
    prf = [_prf(float(a), float(b), float(n_gt)) for a, b in zip(tp, fp)]
    return {
        "thresholds": thresholds,
        "tp": tp.tolist(),
        "fp": fp.tolist(),
        "n_ignored": ign.tolist(),
        "n_gt": n_gt,
        "precision": [x[0] for x in prf],
        "recall": [x[1] for x in prf],
        "f1": [x[2] for x in prf],
    }


# ---------------------------------------------------------------------------
# Score-ranked metrics: AP and MR^-2
# ---------------------------------------------------------------------------


def _ranked(images: Sequence[EvalImage], thresholds, max_dets: int | None):
    """pycocotools' accumulation: per image the top ``max_dets`` by score, then all
    images (in the given order) merged by a stable sort on score.
    Returns (status [T, D] in global score order, number of regular GT)."""
    _check_ids(images)
    statuses, scores = [], []
    n_gt = 0
    for img in images:
        if img.pred_scores is None:
            raise ValueError(f"image {img.image_id!r}: AP / MR^-2 need prediction scores")
        n_gt += len(img.gt_boxes)
        st = match_image(img, thresholds, use_scores=True)
        order = score_order(img.pred_scores)[:max_dets]
        statuses.append(st[:, order])
        scores.append(img.pred_scores[order])
    if not statuses:
        return np.zeros((len(thresholds), 0), np.int8), 0
    all_scores = np.concatenate(scores)
    order = np.argsort(-all_scores, kind="mergesort")
    return np.concatenate(statuses, axis=1)[:, order], n_gt


def _interp_ap(tp_cum: np.ndarray, fp_cum: np.ndarray, n_gt: int) -> float:
    """pycocotools' 101-point interpolated precision for one threshold."""
    nd = len(tp_cum)
    rc = tp_cum / n_gt
    pr = tp_cum / (fp_cum + tp_cum + np.spacing(1))
    pr = np.maximum.accumulate(pr[::-1])[::-1]  # precision envelope
    inds = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
    q = np.zeros(len(RECALL_THRESHOLDS))
    reached = inds < nd  # recall levels never reached keep precision 0
    q[reached] = pr[inds[reached]]
    return float(np.mean(q))


def average_precision(
    images: Sequence[EvalImage],
    thresholds: Sequence[float] = COCO_IOU_THRESHOLDS,
    max_dets: int | None = None,
) -> dict[str, Any]:
    """COCO AP per threshold, ``ap_50``, ``ap_75`` and ``ap_50_95`` (mean over ``thresholds``).

    Values are NaN when there is no regular GT in the dataset (pycocotools: -1).
    """
    thresholds = [float(t) for t in thresholds]
    status, n_gt = _ranked(images, thresholds, max_dets)
    if n_gt == 0:
        per = [math.nan] * len(thresholds)
    else:
        tp = np.cumsum(status == TP, axis=1).astype(np.float64)
        fp = np.cumsum(status == FP, axis=1).astype(np.float64)
        per = [_interp_ap(tp[t], fp[t], n_gt) for t in range(len(thresholds))]

    def at(x: float) -> float:
        hits = [i for i, t in enumerate(thresholds) if abs(t - x) < 1e-9]
        return per[hits[0]] if hits else math.nan

    return {
        "thresholds": thresholds,
        "ap": per,
        "ap_50": at(0.5),
        "ap_75": at(0.75),
        "ap_50_95": float(np.mean(per)) if per else math.nan,
    }


def _mr_curve(status: np.ndarray, n_gt: int, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    tp = np.concatenate([[0], np.cumsum(status == TP)]).astype(np.float64)
    fp = np.concatenate([[0], np.cumsum(status == FP)]).astype(np.float64)
    return fp / max(n_images, 1), 1.0 - tp / n_gt


def miss_rate_curve(
    images: Sequence[EvalImage], iou_threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """(FPPI, miss rate) after each detection in score order, starting at (0, 1)."""
    status, n_gt = _ranked(images, [iou_threshold], None)
    if n_gt == 0:
        raise ValueError("miss rate is undefined: the dataset has no regular GT box")
    return _mr_curve(status[0], n_gt, len(images))


def log_average_miss_rate(
    images: Sequence[EvalImage],
    iou_threshold: float = 0.5,
    fppi_points: Sequence[float] = tuple(FPPI_POINTS),
) -> float:
    """MR^-2 (see the module docstring); NaN without GT."""
    status, n_gt = _ranked(images, [iou_threshold], None)
    if n_gt == 0:
        return math.nan
    fppi, mr = _mr_curve(status[0], n_gt, len(images))
    # last curve point with FPPI <= f; always exists since the curve starts at FPPI 0
    idx = np.searchsorted(fppi, np.asarray(fppi_points, np.float64), side="right") - 1
    return float(np.exp(np.mean(np.log(np.maximum(mr[idx], MR_FLOOR)))))


# ---------------------------------------------------------------------------
# Counting and the one-call summary
# ---------------------------------------------------------------------------


def count_errors(pred_counts: Sequence[float], gt_counts: Sequence[float]) -> dict[str, float]:
    """MAE and RMSE between predicted and true counts."""
    p = np.asarray(pred_counts, np.float64).reshape(-1)
    g = np.asarray(gt_counts, np.float64).reshape(-1)
    if p.shape != g.shape:
        raise ValueError(f"count_errors: {p.shape[0]} predicted counts vs {g.shape[0]} true counts")
    if p.size == 0:
        return {"count_mae": math.nan, "count_rmse": math.nan}
    d = p - g
    return {"count_mae": float(np.mean(np.abs(d))), "count_rmse": float(np.sqrt(np.mean(d * d)))}


def image_counts(images: Sequence[EvalImage], score_threshold: float | None = None):
    """(predicted counts, GT counts) per image."""
    pred, gt = [], []
    for img in images:
        img = img.with_score_threshold(score_threshold)
        pred.append(img.pred_count if img.pred_count is not None else len(img.pred_boxes))
        gt.append(len(img.gt_boxes))
    return pred, gt


SUMMARY_KEYS = (
    "num_images", "num_gt", "num_pred",
    "precision_50", "recall_50", "f1_50",
    "precision_50_95", "recall_50_95", "f1_50_95",
    "ap_50", "ap_75", "ap_50_95", "mr_2",
    "count_mae", "count_rmse",
)  # fmt: skip


def evaluate(
    images: Sequence[EvalImage],
    score_threshold: float | None = None,
    max_dets: int | None = None,
) -> dict[str, float | int | None]:
    """All metrics as a flat dict (keys ``SUMMARY_KEYS``).

    ``ap_*`` and ``mr_2`` are None unless every image has scores (they rank by
    score over all predictions; ``score_threshold`` applies to P/R/F1 and counts).
    """
    images = list(images)
    _check_ids(images)
    prf = precision_recall_f1(images, COCO_IOU_THRESHOLDS, score_threshold)
    pc, gc = image_counts(images, score_threshold)
    out: dict[str, float | int | None] = {
        "num_images": len(images),
        "num_gt": prf["n_gt"],
        "num_pred": int(sum(len(i.with_score_threshold(score_threshold).pred_boxes) for i in images)),
        "precision_50": prf["precision"][0],
        "recall_50": prf["recall"][0],
        "f1_50": prf["f1"][0],
        "precision_50_95": float(np.mean(prf["precision"])),
        "recall_50_95": float(np.mean(prf["recall"])),
        "f1_50_95": float(np.mean(prf["f1"])),
        "ap_50": None,
        "ap_75": None,
        "ap_50_95": None,
        "mr_2": None,
    }
    if images and all(i.pred_scores is not None for i in images):
        ap = average_precision(images, COCO_IOU_THRESHOLDS, max_dets)
        mr = log_average_miss_rate(images)
        for key in ("ap_50", "ap_75", "ap_50_95"):
            out[key] = None if math.isnan(ap[key]) else ap[key]
        out["mr_2"] = None if math.isnan(mr) else mr
    out.update(count_errors(pc, gc))
    for key in ("count_mae", "count_rmse"):
        if out[key] is not None and math.isnan(out[key]):
            out[key] = None
    return out
