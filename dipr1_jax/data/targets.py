"""SFT targets: Think-Look-Answer completions built from ground truth (DESIGN.md section 2).

    text = build_target(gt_boxes, "detection", visibility=vis, style="compact")
    ids = target_ids(tokenizer, text, tokenizer.im_end_token_id)  # text ids + EOS

Layout (what ``rewards.parse``'s strict format accepts)::

    <think>T</think>\\n<look>L</look>\\n<answer>A</answer>

Rules (all deterministic, so the same GT always gives the same text):

* ``<think>``: ``"No {plural}."`` for K = 0, else ``"{K} {noun}, {crowded|sparse},
  {H} hard."`` with H the number of hard instances (below) and "crowded" when
  K >= ``CROWDED_COUNT`` or two GT boxes overlap with IoU >= ``CROWDED_IOU``.
* ``<look>``: the hard instances, hardest first, at most ``max_look``. With
  ``visibility``: those with visibility < ``HARD_VISIBILITY``, by visibility
  ascending. Without: those whose area is < ``HARD_AREA_RATIO`` x the median GT
  area of the image, by area ascending. Ties keep reading order. May be ``[]``.
* ``<answer>``: detection: every GT box in reading order: row band
  ``floor(y_center / median GT height)`` top to bottom, then x1, y1, x2, y2
  ascending. Counting: the integer K.
* ``style="json"``: ``{"bbox_2d": [x1, y1, x2, y2], "label": "person"}`` entries
  (look entries without the label), as the prompt asks; ``style="compact"``:
  bare ``[[x1,y1,x2,y2],...]`` without spaces (far fewer tokens).
* Coordinates: integers when the float32 value is integral, else the shortest
  decimal that parses back to the same float32, so the target's boxes equal the
  GT bit for bit and score IoU 1 (R_acc = 1 with soft TP). ``decimals=n`` rounds
  to n places instead (shorter; R_acc then slightly below 1); a box that
  rounding would make degenerate is written exactly.

Boxes are float ``[K, 4]`` x1y1x2y2 in the resized model frame (the pipeline's
``gt_boxes`` rows under ``gt_mask``). Parse targets with ``max_boxes >= K``:
boxes beyond it are counted but not matched, which lowers precision.
"""

from __future__ import annotations

import numpy as np

from dipr1_jax.data import prompts

STYLES = ("json", "compact")
HARD_VISIBILITY = 0.5
HARD_AREA_RATIO = 0.25
CROWDED_COUNT = 8
CROWDED_IOU = 0.3


def format_coord(v: float, decimals: int | None = None) -> str:
    """One coordinate: exact shortest float32 text, or rounded to ``decimals`` places."""
    v = np.float32(v)
    if decimals is not None:
        v = np.float32(round(float(v), decimals))
    if float(v) == int(v):
        return str(int(v))
    return np.format_float_positional(v, unique=True, trim="-")


def _box_text(box: np.ndarray, decimals: int | None, sep: str) -> str:
    if decimals is not None:
        r = np.round(box.astype(np.float64), decimals)
        if r[2] > r[0] and r[3] > r[1]:
            return "[" + sep.join(format_coord(v, decimals) for v in r) + "]"
    return "[" + sep.join(format_coord(v) for v in box) + "]"


def _list_text(boxes: np.ndarray, style: str, decimals: int | None, label: str | None) -> str:
    if style == "compact":
        return "[" + ",".join(_box_text(b, decimals, ",") for b in boxes) + "]"
    tail = f', "label": "{label}"' if label is not None else ""
    return "[" + ", ".join('{"bbox_2d": ' + _box_text(b, decimals, ", ") + tail + "}"
                           for b in boxes) + "]"


def _areas(boxes: np.ndarray) -> np.ndarray:
    b = boxes.astype(np.float64)
    return np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)


def reading_order(boxes: np.ndarray) -> np.ndarray:
    """Indices of ``boxes`` in reading order (row band by median height, then x1, y1, x2, y2)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(b) == 0:
        return np.zeros((0,), np.int64)
    band_h = max(float(np.median(b[:, 3] - b[:, 1])), 1.0)
    band = np.floor((b[:, 1] + b[:, 3]) / 2 / band_h)
    return np.lexsort((b[:, 3], b[:, 2], b[:, 1], b[:, 0], band))  # last key is primary


def hard_indices(boxes: np.ndarray, visibility: np.ndarray | None = None,
                 max_look: int = 3) -> np.ndarray:
    """Indices of the hard instances, hardest first (see the module doc); at most ``max_look``."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    order = reading_order(b)
    if len(b) == 0 or max_look <= 0:
        return np.zeros((0,), np.int64)
    if visibility is not None:
        key = np.asarray(visibility, np.float64).reshape(-1)[order]
        hard = key < HARD_VISIBILITY
    else:
        key = _areas(b)[order]
        hard = key < HARD_AREA_RATIO * np.median(key)
    perm = np.argsort(key, kind="stable")  # hardest first; ties keep reading order
    return order[perm][hard[perm]][:max_look]


def _crowded(boxes: np.ndarray) -> bool:
    if len(boxes) >= CROWDED_COUNT:
        return True
    if len(boxes) < 2:
        return False
    b = boxes.astype(np.float64)
    w = np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0])
    h = np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1])
    inter = np.maximum(w, 0) * np.maximum(h, 0)
    a = _areas(b)
    union = a[:, None] + a[None, :] - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    np.fill_diagonal(iou, 0.0)
    return bool(iou.max() >= CROWDED_IOU)


def build_target(gt_boxes, task: str = "detection", *, visibility=None, style: str = "json",
                 max_look: int = 3, category: str = "person",
                 decimals: int | None = None) -> str:
    """The Think-Look-Answer target text for one image's GT (see the module doc)."""
    if style not in STYLES:
        raise ValueError(f"build_target: style must be one of {STYLES}, got {style!r}")
    if task not in prompts.TASKS:
        raise ValueError(f"build_target: task must be one of {prompts.TASKS}, got {task!r}")
    boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    k = len(boxes)
    if visibility is not None and np.asarray(visibility).reshape(-1).shape[0] != k:
        raise ValueError(f"build_target: visibility has {np.asarray(visibility).size} entries, "
                         f"boxes {k}")
    plural = prompts.PLURALS.get(category, category + "s")
    hard = hard_indices(boxes, visibility, max_look)
    if k == 0:
        think = f"No {plural}."
    else:
        n_hard = len(hard_indices(boxes, visibility, k))
        think = (f"{k} {category if k == 1 else plural}, "
                 f"{'crowded' if _crowded(boxes) else 'sparse'}, {n_hard} hard.")
    look = _list_text(boxes[hard], style, decimals, None)
    if task == "counting":
        answer = str(k)
    else:
        answer = _list_text(boxes[reading_order(boxes)], style, decimals, category)
    return f"<think>{think}</think>\n<look>{look}</look>\n<answer>{answer}</answer>"


def target_ids(tokenizer, text: str, eos_id: int | None = None) -> np.ndarray:
    """int32 ids of ``text`` followed by ``eos_id`` (default: the tokenizer's ``<|im_end|>``)."""
    if eos_id is None:
        eos_id = tokenizer.im_end_token_id
    return np.asarray(list(tokenizer.encode(text)) + [int(eos_id)], np.int32)


def targets_for_batch(batch: dict, style: str = "json", max_look: int = 3,
                      category: str = "person", decimals: int | None = None) -> list[str]:
    """One target per row of a pipeline batch ('' for rows whose ``valid`` is False).

    Reads ``gt_boxes [B, K, 4]``, ``gt_mask [B, K]``, ``task [B]`` (prompts.TASK_IDS),
    ``valid [B]`` and, when present, ``visibility [B, K]``.
    """
    boxes, mask = np.asarray(batch["gt_boxes"]), np.asarray(batch["gt_mask"], bool)
    tasks, valid = np.asarray(batch["task"]), np.asarray(batch["valid"], bool)
    vis = batch.get("visibility")
    out = []
    for i in range(boxes.shape[0]):
        if not valid[i]:
            out.append("")
            continue
        m = mask[i]
        out.append(build_target(boxes[i][m], prompts.TASKS[int(tasks[i])],
                                visibility=None if vis is None else np.asarray(vis[i])[m],
                                style=style, max_look=max_look, category=category,
                                decimals=decimals))
    return out
