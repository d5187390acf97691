"""Policy evaluation: greedy completions on held-out batches -> rewards, metrics, drawings.

    result = evaluate_policy(model, batches, tok, reward_cfg=cfg.reward, max_new_tokens=512,
                             eos_token_ids=[tok.im_end_token_id], pad_token_id=tok.pad_token_id,
                             name="step_2000", report_dir=workdir / "report")
    result.summary        # flat dict (None where a metric does not apply) for metrics.jsonl
    result.eval_images    # detection prompts as metrics.EvalImage (for report.evaluate_models)

``batches`` is a finite iterable of pipeline batches (``dipr1_jax.data.pipeline``
layout, e.g. one epoch of the held-out split). Per batch: ``generate`` (greedy at
the default ``temperature=0``), the completions parsed and scored with
``dip_rewards`` exactly as in training (ignore regions included), and the answer
boxes, GT and ignore regions mapped back to ORIGINAL image pixels with the
batch's ``scale`` for ``metrics`` (DESIGN.md section 2). What counts:

* Only rows whose ``valid`` is True (batch padding is dropped everywhere).
* ``reward``, ``reward_format``, ``reward_look``, ``format_rate``,
  ``completion_length``, ``truncated_rate``: means over every valid completion.
  ``reward_accuracy``: over detection prompts; ``reward_count``: over all prompts
  (R_count is defined for both). With ``group_size=1`` R_look is 0 by definition
  (no group to disagree); pass ``group_size > 1`` and ``temperature > 0`` to see it.
* ``precision`` / ``recall`` / ``f1`` (IoU 0.5, micro over the dataset; also the
  0.5:0.95 means): ``metrics.evaluate`` on detection prompts only (None if none).
  With G > 1 the metrics, samples and drawings use rollout 0 of each image.
* ``count_mae`` / ``count_rmse``: one MAE over ALL valid images, each with the
  predicted count R_count uses: the parsed integer of a counting prompt when
  there is one (>= 0), else the number of answer boxes not absorbed by an ignore
  region (IoA >= ``reward_cfg.iou_threshold``, the rule of rewards and metrics);
  the target is the number of regular GT boxes. That count is stored as the
  ``EvalImage.pred_count``, so ``metrics.evaluate(result.eval_images)`` agrees.
  ``count_mae_counting`` is the same over counting prompts only.

With ``report_dir`` the first ``num_draw`` valid images are drawn in the MODEL
frame (the image the policy saw, recovered with ``preprocess.unpatchify``): GT
green, answer red, look blue, ignore amber (``viz`` colours; no legend strip, so
the PNG is exactly the model input size), as ``report_dir/<name>/<image_id>.png``.
The combined table of several models is left to ``report.write_report``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from absl import logging

from dipr1_jax import metrics, viz
from dipr1_jax.config import RewardConfig
from dipr1_jax.data import preprocess as pp
from dipr1_jax.data.prompts import TASKS
from dipr1_jax.rewards import dip_rewards, parse_completions, parse_one

REWARD_KEYS = ("format", "look", "accuracy", "count", "total")


@dataclasses.dataclass
class EvalResult:
    """``summary``: flat metrics dict; ``samples``: the first images' texts and rewards;
    ``eval_images``: detection prompts (original frame, rollout 0); ``pngs``: drawings."""

    summary: dict
    samples: list[dict]
    eval_images: list[metrics.EvalImage] = dataclasses.field(default_factory=list)
    pngs: list[str] = dataclasses.field(default_factory=list)


def score_completions(texts: Sequence[str], batch: dict, group_size: int,
                      cfg: RewardConfig) -> dict:
    """``dip_rewards`` of ``B * G`` texts against a pipeline batch (ignore regions and
    counting prompts included): dict of ``[B, G]`` numpy arrays. Training and
    evaluation score completions with this one function."""
    parsed = parse_completions(texts, cfg.max_boxes, cfg.max_look)
    kw: dict[str, Any] = {"is_count": np.asarray(batch["task"]) == 1,
                          "ignore_boxes": np.asarray(batch["ignore_boxes"], np.float32),
                          "ignore_mask": np.asarray(batch["ignore_mask"], bool)}
    r = dip_rewards(parsed, np.asarray(batch["gt_boxes"], np.float32),
                    np.asarray(batch["gt_mask"], bool), group_size, cfg, **kw)
    return {k: np.asarray(r[k], np.float64) for k in REWARD_KEYS}


def _to_original(boxes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return pp.boxes_to_original_batch(boxes[None], np.asarray(scale)[None])[0]


def _eval_image(batch: dict, b: int, answer: np.ndarray, count: int, threshold: float):
    """Row ``b``'s EvalImage in original pixels, with the R_count prediction as pred_count."""
    s = batch["scale"][b]
    gt = _to_original(batch["gt_boxes"][b][np.asarray(batch["gt_mask"][b], bool)], s)
    ign = _to_original(batch["ignore_boxes"][b][np.asarray(batch["ignore_mask"][b], bool)], s)
    img = metrics.EvalImage.create(str(batch["image_id"][b]), _to_original(answer, s), gt,
                                   ignore_boxes=ign)
    if int(batch["task"][b]) == 1 and count >= 0:
        c_hat = int(count)
    else:
        c_hat = int(np.sum(metrics.match_image(img, [threshold])[0] != metrics.IGNORED))
    return dataclasses.replace(img, pred_count=c_hat)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "image"


def _draw(path: str, batch: dict, b: int, answer, look, spec: pp.VisionSpec) -> str:
    grid = np.asarray(batch["image_grid_thw"])
    start = int(np.prod(grid[:b], axis=1).sum())
    rows = int(np.prod(grid[b]))
    image = pp.unpatchify(np.asarray(batch["pixel_values"])[start:start + rows], grid[b], spec)
    gt = np.asarray(batch["gt_boxes"][b])[np.asarray(batch["gt_mask"][b], bool)]
    ign = np.asarray(batch["ignore_boxes"][b])[np.asarray(batch["ignore_mask"][b], bool)]
    return viz.save_png(path, image, gt_boxes=gt, pred_boxes=answer, look_boxes=look,
                        ignore_boxes=ign, legend=False)


def _mean(xs) -> float | None:
    xs = np.concatenate([np.ravel(x) for x in xs]) if len(xs) else np.zeros(0)
    return float(np.mean(xs)) if xs.size else None


def evaluate_policy(model, batches: Iterable[dict], tokenizer, *, reward_cfg: RewardConfig,
                    max_new_tokens: int, eos_token_ids, pad_token_id: int, name: str = "eval",
                    report_dir: str | os.PathLike | None = None, num_draw: int = 4,
                    num_samples: int = 8, cache_length: int | None = None, group_size: int = 1,
                    temperature: float = 0.0, rng=None,
                    spec: pp.VisionSpec = pp.VisionSpec(),
                    generate_fn: Callable | None = None, mesh=None) -> EvalResult:
    """Evaluates ``model`` on ``batches`` (see the module docstring for what is measured).

    ``generate_fn`` (default ``sampler.generate``) is called with generate's
    arguments and must return a ``SampleOutput`` with ``texts``; ``spec`` must be
    the pipeline's vision spec (only used to draw). ``mesh`` (given to ``generate_fn``
    with ``local_rows=False``): on several processes every process passes the same
    batches and gets every completion back, so all compute the same summary.
    """
    if generate_fn is None:
        from dipr1_jax import sampler
        generate_fn = sampler.generate
    rng = jax.random.key(0) if rng is None else rng
    eos = tuple(int(e) for e in np.atleast_1d(eos_token_ids))
    t0 = time.perf_counter()
    rewards: dict[str, list] = {k: [] for k in REWARD_KEYS}
    det_accuracy, lengths, truncated = [], [], []
    det_images, counts, samples, pngs = [], [], [], []
    nonfinite = n_images = 0
    for step, batch in enumerate(batches):
        G = group_size
        out = generate_fn(model, batch["input_ids"], batch["attention_mask"],
                          batch["pixel_values"], batch["image_grid_thw"], group_size=G,
                          max_new_tokens=max_new_tokens, temperature=temperature,
                          eos_token_ids=list(eos), rng=jax.random.fold_in(rng, step),
                          pad_token_id=pad_token_id, tokenizer=tokenizer,
                          cache_length=cache_length,
                          **({} if mesh is None else {"mesh": mesh, "local_rows": False}))
        if out.texts is None:
            raise ValueError("evaluate_policy: generate_fn returned no texts")
        valid = np.asarray(batch["valid"], bool)
        is_count = np.asarray(batch["task"]) == 1
        r = score_completions([t for row in out.texts for t in row], batch, G, reward_cfg)
        for k in REWARD_KEYS:
            rewards[k].append(r[k][valid])
        det_accuracy.append(r["accuracy"][valid & ~is_count])
        n_tok = np.asarray(out.lengths)[valid]
        last = np.asarray(out.tokens)[valid][..., -1]
        lengths.append(n_tok)
        truncated.append((n_tok >= max_new_tokens) & ~np.isin(last, eos))
        if out.nonfinite is not None:
            nonfinite += int(np.sum(np.asarray(out.nonfinite)[valid]))
        for b in np.flatnonzero(valid):
            text = out.texts[b][0]
            _, answer, look, count = parse_one(text)
            img = _eval_image(batch, b, answer, count, reward_cfg.iou_threshold)
            counts.append((img.pred_count, len(img.gt_boxes), bool(is_count[b])))
            if not is_count[b]:
                det_images.append(img)
            if len(samples) < num_samples:
                samples.append({"image_id": img.image_id, "task": TASKS[int(batch["task"][b])],
                                "text": text, **{k: float(r[k][b, 0]) for k in REWARD_KEYS},
                                "num_answer": len(answer), "num_look": len(look),
                                "num_gt": len(img.gt_boxes), "pred_count": img.pred_count,
                                "length": int(out.lengths[b][0])})
            if report_dir is not None and len(pngs) < num_draw:
                path = os.path.join(os.fspath(report_dir), name, _slug(img.image_id) + ".png")
                pngs.append(_draw(path, batch, b, answer, look, spec))
        n_images += int(valid.sum())
        logging.info("eval %s: batch %d, %d images, mean reward %.4f, %.1fs", name, step + 1,
                     n_images, _mean(rewards["total"]) or 0.0, time.perf_counter() - t0)

    summary: dict[str, Any] = {"num_images": n_images, "num_detection": len(det_images),
                               "num_counting": sum(c[2] for c in counts)}
    summary["format_rate"] = _mean(rewards["format"])
    if det_images:
        m = metrics.evaluate(det_images)
        summary.update(precision=m["precision_50"], recall=m["recall_50"], f1=m["f1_50"],
                       precision_50_95=m["precision_50_95"], recall_50_95=m["recall_50_95"],
                       f1_50_95=m["f1_50_95"], num_gt=m["num_gt"], num_pred=m["num_pred"])
    else:
        summary.update(dict.fromkeys(("precision", "recall", "f1", "precision_50_95",
                                      "recall_50_95", "f1_50_95", "num_gt", "num_pred")))
    ce = metrics.count_errors([c[0] for c in counts], [c[1] for c in counts])
    cc = [c for c in counts if c[2]]
    cc_mae = metrics.count_errors([c[0] for c in cc], [c[1] for c in cc])["count_mae"]
    nan_none = lambda v: None if v is None or np.isnan(v) else float(v)  # noqa: E731
    summary.update(count_mae=nan_none(ce["count_mae"]), count_rmse=nan_none(ce["count_rmse"]),
                   count_mae_counting=nan_none(cc_mae))
    summary["reward"] = _mean(rewards["total"])
    for k in ("format", "look", "count"):
        summary[f"reward_{k}"] = _mean(rewards[k])
    summary["reward_accuracy"] = _mean(det_accuracy)
    summary.update(completion_length=_mean(lengths), truncated_rate=_mean(truncated),
                   nonfinite=nonfinite, seconds=time.perf_counter() - t0)
    logging.info("eval %s: %d images in %.1fs: %s", name, n_images, summary["seconds"],
                 {k: v for k, v in summary.items() if k in ("reward", "format_rate", "f1")})
    return EvalResult(summary, samples, det_images, pngs)
