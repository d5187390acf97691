"""Evaluation report: several models or checkpoints side by side, as JSON and Markdown.

    results = evaluate_models({"base": base_images, "dip-r1@2k": rl_images})
    paths = write_report("eval/", results, baseline="base",
                         examples=[ReportExample("000123", image, gt, pred, look_boxes=look, model="dip-r1@2k")])

``report.json`` is the source of truth (full-precision numbers, ``null`` for a
metric that does not apply, e.g. AP without scores); ``read_report`` loads it
back unchanged. ``report.md`` shows the same numbers rounded to ``digits``
decimals (``digits=None`` prints them in full): one row per model, one column
per metric (``metrics=`` picks the columns), optionally a second table of differences to a baseline model, and
example images drawn by ``dipr1_jax.viz`` (GT, predicted, look, ignore boxes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from dipr1_jax import fsio
from dipr1_jax import metrics as metrics_lib
from dipr1_jax import viz

FORMAT_VERSION = 1
MISSING = "n/a"


@dataclasses.dataclass
class ReportExample:
    """One image to draw into the report (boxes in the pixel frame of ``image``)."""

    name: str
    image: Any  # array, PIL image or path
    gt_boxes: Any = None
    pred_boxes: Any = None
    look_boxes: Any = None
    ignore_boxes: Any = None
    pred_scores: Any = None
    model: str = ""


def evaluate_models(
    predictions: Mapping[str, Sequence[metrics_lib.EvalImage]], **evaluate_kwargs: Any
) -> dict[str, dict[str, Any]]:
    """``metrics.evaluate`` for each model, in the given order."""
    return {name: metrics_lib.evaluate(images, **evaluate_kwargs) for name, images in predictions.items()}


def _clean(value: Any, where: str) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a number, got a bool")
    if hasattr(value, "item"):  # numpy / jax scalars
        value = value.item()
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    raise ValueError(f"{where}: expected a number or None, got {type(value).__name__}")


def build_report(
    results: Mapping[str, Mapping[str, Any]],
    *,
    title: str = "Evaluation report",
    metrics: Sequence[str] | None = None,
    baseline: str | None = None,
) -> dict[str, Any]:
    """The JSON-ready report dict (without examples).

    ``results`` maps model name -> metric -> value; JSON keeps every metric of
    every model (missing ones as null); ``metrics`` picks the Markdown columns
    (default: all, in ``metrics.SUMMARY_KEYS`` order, then any others).
    """
    if not results:
        raise ValueError("no results to report")
    models = [str(m) for m in results]
    seen: list[str] = []
    for r in results.values():
        seen += [k for k in r if k not in seen]
    order = list(metrics_lib.SUMMARY_KEYS)
    all_metrics = [k for k in order if k in seen] + [k for k in seen if k not in order]
    columns = all_metrics if metrics is None else list(metrics)
    unknown = [k for k in columns if k not in seen]
    if unknown:
        raise ValueError(f"columns {unknown} are not metrics of any model (have {all_metrics})")
    table = {
        str(name): {k: _clean(r.get(k), f"model {name!r}, metric {k!r}") for k in all_metrics}
        for name, r in results.items()
    }
    metrics = all_metrics
    report: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "title": title,
        "models": models,
        "metrics": metrics,
        "columns": columns,
        "results": table,
    }
    if baseline is not None:
        if baseline not in table:
            raise ValueError(f"baseline {baseline!r} is not one of the models {models}")
        base = table[baseline]
        report["baseline"] = baseline
        report["differences"] = {
            name: {
                k: (None if row[k] is None or base[k] is None else row[k] - base[k]) for k in metrics
            }
            for name, row in table.items()
            if name != baseline
        }
    return report


def format_value(value: float | int | None, digits: int | None = 4) -> str:
    if value is None:
        return MISSING
    if isinstance(value, int):
        return str(value)
    if digits is None:
        return repr(float(value))
    return f"{value:.{digits}f}"


def _table(rows: Mapping[str, Mapping[str, Any]], metrics: Sequence[str], digits: int | None) -> list[str]:
    lines = ["| model | " + " | ".join(metrics) + " |", "| --- | " + " | ".join(["---:"] * len(metrics)) + " |"]
    for name, row in rows.items():
        cells = [format_value(row[k], digits) for k in metrics]
        lines.append(f"| {_escape(name)} | " + " | ".join(cells) + " |")
    return lines


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(report: Mapping[str, Any], digits: int | None = 4) -> str:
    metrics = report["columns"]
    out = [f"# {report['title']}", ""]
    out += _table(report["results"], metrics, digits)
    if "differences" in report and report["differences"]:
        out += ["", f"## Difference to {_escape(report['baseline'])}", ""]
        out += _table(report["differences"], metrics, digits)
    examples = report.get("examples") or []
    if examples:
        out += ["", "## Examples", ""]
        out.append(
            "Boxes: GT green, prediction red, look blue, ignore region amber "
            "(original image pixels)."
        )
        for ex in examples:
            label = ex["name"] + (f" ({ex['model']})" if ex.get("model") else "")
            out += ["", f"### {_escape(label)}", "", f"![{label}]({ex['png']})"]
    return "\n".join(out) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def write_report(
    out_dir: str | os.PathLike,
    results: Mapping[str, Mapping[str, Any]],
    *,
    title: str = "Evaluation report",
    metrics: Sequence[str] | None = None,
    baseline: str | None = None,
    examples: Sequence[ReportExample] = (),
    digits: int | None = 4,
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and ``examples/*.png`` into ``out_dir``
    (a local path or a ``gs://`` URI; each file written whole, see ``fsio``).

    Returns ``{"json": path, "markdown": path, "images": [paths]}``.
    """
    out_dir = os.fspath(out_dir)
    fsio.makedirs(out_dir)
    report = build_report(results, title=title, metrics=metrics, baseline=baseline)
    images, entries, used = [], [], set()
    for ex in examples:
        stem = _slug(f"{ex.name}__{ex.model}" if ex.model else ex.name)
        n, base = 1, stem
        while stem in used:
            n, stem = n + 1, f"{base}_{n}"
        used.add(stem)
        rel = f"examples/{stem}.png"
        images.append(
            viz.save_png(
                fsio.join(out_dir, rel),
                ex.image,
                gt_boxes=ex.gt_boxes,
                pred_boxes=ex.pred_boxes,
                look_boxes=ex.look_boxes,
                ignore_boxes=ex.ignore_boxes,
                pred_scores=ex.pred_scores,
            )
        )
        entries.append({"name": ex.name, "model": ex.model, "png": rel})
    report["examples"] = entries
    json_path = fsio.join(out_dir, "report.json")
    md_path = fsio.join(out_dir, "report.md")
    fsio.write_text(json_path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    fsio.write_text(md_path, render_markdown(report, digits))
    return {"json": json_path, "markdown": md_path, "images": images}


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """Load a ``report.json`` (a path to the file or to its directory)."""
    path = os.fspath(path)
    if fsio.isdir(path):
        path = fsio.join(path, "report.json")
    try:
        report = json.loads(fsio.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if report.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported report format {report.get('format_version')!r}")
    return report
