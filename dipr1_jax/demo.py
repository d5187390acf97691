"""Synthetic rollouts for the reward-only job and the reward benchmark.

Crowded ground truth (boxes of people of varied size in a square resized
frame) and G simulated completions per image from "detectors" of graded
quality: a rollout finds each person with its own recall, jitters the boxes,
adds false positives, lists some boxes it finds doubtful in ``<look>``, and a
share of rollouts breaks the output format. The text goes through the real
parser and the real reward kernels.
"""

from __future__ import annotations

import json

import numpy as np


def crowd_boxes(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``[n, 4]`` person-shaped boxes (height about 2.5 x width), perspective-scaled."""
    y_foot = rng.uniform(0.2 * size, size, n)
    h = np.clip(0.04 * size + 0.35 * size * (y_foot / size) ** 2 * rng.uniform(0.6, 1.2, n), 8, size)
    w = h / rng.uniform(2.2, 3.0, n)
    x1 = rng.uniform(0, size - w)
    y1 = np.clip(y_foot - h, 0, None)
    return np.stack([x1, y1, x1 + w, y_foot], -1).astype(np.float32)


def simulate_completion(rng: np.random.Generator, gt: np.ndarray, recall: float,
                        jitter: float, size: int, broken: bool) -> str:
    """One Think-Look-Answer completion of a simulated detector."""
    found = gt[rng.random(len(gt)) < recall]
    wh = np.maximum(found[:, 2:] - found[:, :2], 1.0)
    noisy = found + rng.normal(0, jitter, found.shape) * np.concatenate([wh, wh], -1)
    n_fp = rng.poisson(max(1.0, 0.1 * len(gt)) * (1.0 - recall))
    fps = crowd_boxes(rng, n_fp, size)
    pred = np.concatenate([noisy, fps]).round(0)
    pred = pred[rng.permutation(len(pred))]
    pred[:, 2:] = np.maximum(pred[:, 2:], pred[:, :2] + 1)
    small = np.argsort((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))[: max(1, len(gt) // 10)]
    look = gt[small[rng.random(len(small)) < 0.6]].round(0)
    answer = json.dumps([{"bbox_2d": [int(v) for v in b], "label": "person"} for b in pred])
    look_s = json.dumps([{"bbox_2d": [int(v) for v in b]} for b in look])
    text = (f"<think>A crowded street; about {len(gt)} people, several occluded.</think>\n"
            f"<look>{look_s}</look>\n<answer>{answer}</answer>")
    if broken:  # truncated mid-answer, as when max_new_tokens runs out
        text = text[: int(len(text) * rng.uniform(0.5, 0.95))]
    return text


def make_batch(seed: int, batch_size: int, group_size: int, max_gt: int, size: int,
               min_gt: int = 1, recall_range: tuple[float, float] = (0.3, 1.0),
               broken_rate: float = 0.1):
    """GT ``[B, K, 4]``, mask ``[B, K]``, ``B * G`` completion texts, per-rollout recall."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(min_gt, max_gt + 1, batch_size)
    K = int(max_gt)
    gt = np.zeros((batch_size, K, 4), np.float32)
    mask = np.zeros((batch_size, K), bool)
    texts, recalls = [], []
    for b, n in enumerate(counts):
        boxes = crowd_boxes(rng, int(n), size)
        gt[b, :n] = boxes
        mask[b, :n] = True
        for _ in range(group_size):
            recall = float(rng.uniform(*recall_range))
            texts.append(simulate_completion(rng, boxes, recall, jitter=0.08 * (1.2 - recall),
                                             size=size, broken=rng.random() < broken_rate))
            recalls.append(recall)
    return gt, mask, texts, np.array(recalls, np.float32).reshape(batch_size, group_size)
