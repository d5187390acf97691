"""CrowdHuman ``.odgt`` reader.

One JSON object per line::

    {"ID": "273271,c9db000d5146c15",
     "gtboxes": [{"tag": "person", "fbox": [x, y, w, h], "vbox": [...], "hbox": [...],
                  "extra": {"box_id": 0, "occ": 0}, "head_attr": {...}},
                 {"tag": "mask", "fbox": [...], "vbox": [...], "hbox": [...],
                  "extra": {"ignore": 1}}, ...]}

The image is ``<image_dir>/<ID>.jpg``; its size is read from the file header
(the annotation carries none). ``tag == "mask"`` boxes and boxes with
``extra.ignore == 1`` become ignore regions. ``box`` picks the full body
(``fbox``), visible body (``vbox``) or head (``hbox``) as ``record.boxes``;
``visible_boxes`` always holds ``vbox`` and ``visibility`` the share of the
full box that the visible box covers. Full boxes may extend past the image
border (CrowdHuman annotates the whole body); they are kept as annotated and
clipped by the preprocessing. Unknown extra fields are ignored.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

from dipr1_jax.data.records import (
    Record, RecordList, Reporter, image_size, parse_xywh, record_from_rows, stack,
)

BOX_KEYS = {"full": "fbox", "visible": "vbox", "head": "hbox"}
TAGS = ("person", "mask")


def _visibility(full, vis) -> float:
    if full is None or vis is None:
        return math.nan
    area = (full[2] - full[0]) * (full[3] - full[1])
    iw = max(0.0, min(full[2], vis[2]) - max(full[0], vis[0]))
    ih = max(0.0, min(full[3], vis[3]) - max(full[1], vis[1]))
    return iw * ih / area if area > 0 else math.nan


def read_crowdhuman(
    odgt_path: str,
    image_dir: str | Sequence[str],
    box: str = "full",
    *,
    on_error: str = "raise",
    check_images: bool = True,
    image_ext: str = ".jpg",
) -> RecordList:
    """Reads a CrowdHuman ``annotation_*.odgt`` file into records.

    Args:
      odgt_path: the ``.odgt`` file.
      image_dir: folder holding ``<ID>.jpg``, or several folders (the official train
        images come in three archives); each ID's image is looked up in order.
      box: ``"full"`` (fbox), ``"visible"`` (vbox) or ``"head"`` (hbox).
      on_error: ``"raise"`` (default) or ``"skip"`` (count and skip bad input).
      check_images: read each image header for its size. If False the size is
        unknown, so this must stay True for CrowdHuman (kept for symmetry).
    """
    if box not in BOX_KEYS:
        raise ValueError(f"read_crowdhuman: box must be one of {tuple(BOX_KEYS)}, got {box!r}")
    if not check_images:
        raise ValueError("read_crowdhuman: CrowdHuman has no sizes in the .odgt; check_images=True")
    key = BOX_KEYS[box]
    image_dirs = [image_dir] if isinstance(image_dir, (str, os.PathLike)) else list(image_dir)
    rep = Reporter(on_error, f"read_crowdhuman({odgt_path})")
    records, seen = [], {}
    with open(odgt_path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            where = f"{odgt_path}:{lineno}"
            rec = _parse_line(text, where, key, image_dirs, image_ext, rep)
            if rec is None:
                continue
            if rec.image_id in seen:
                rep.error(where, f"duplicate ID {rec.image_id!r} (first on line {seen[rec.image_id]})",
                          "duplicate image")
                continue
            seen[rec.image_id] = lineno
            rec.source, rec.line = odgt_path, lineno
            records.append(rec)
    return rep.finish(records)


def _parse_line(text, where, key, image_dirs, image_ext, rep) -> Record | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        rep.error(where, f"not valid JSON ({e.msg} at column {e.colno})", "malformed line")
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("ID"), str) or not obj["ID"]:
        rep.error(where, "expected an object with a non-empty string 'ID'", "malformed line")
        return None
    gtboxes = obj.get("gtboxes", None)
    if not isinstance(gtboxes, list):
        rep.error(where, f"'gtboxes' must be a list, got {type(gtboxes).__name__}", "malformed line")
        return None
    name = obj["ID"] + image_ext
    image_path = next((p for d in image_dirs if os.path.isfile(p := os.path.join(d, name))),
                      os.path.join(image_dirs[0], name))
    size = image_size(image_path, where, rep)
    if size is None:
        return None
    rows = []
    for i, g in enumerate(gtboxes):
        bwhere = f"{where} (ID {obj['ID']}, gtboxes[{i}])"
        if not isinstance(g, dict):
            rep.error(bwhere, "each gtbox must be an object", "malformed box")
            continue
        tag = g.get("tag")
        if tag not in TAGS:
            rep.error(bwhere, f"unknown tag {tag!r} (expected one of {TAGS})", "unknown tag")
            continue
        if key not in g:
            rep.error(bwhere, f"missing {key!r}", "malformed box")
            continue
        extra = g.get("extra", {})
        if not isinstance(extra, dict):
            rep.error(bwhere, "'extra' must be an object", "malformed box")
            continue
        b = parse_xywh(g[key], bwhere, rep, key)
        if b is None:
            continue
        vis = None
        if "vbox" in g:
            vis = b if key == "vbox" else _quiet_xywh(g["vbox"])
            if vis is None:  # kept as NaN visible box; counted, not silent
                rep.drop("unusable vbox (visible box set to NaN)")
        full = b if key == "fbox" else _quiet_xywh(g.get("fbox"))
        rows.append({
            "box": b, "label": tag, "cat": TAGS.index(tag) + 1,
            "ignore": tag == "mask" or bool(extra.get("ignore", 0)),
            "vis": vis if vis is not None else (math.nan,) * 4,
            "visibility": _visibility(full, vis),
        })
    return record_from_rows(
        rows, image_id=obj["ID"], width=size[0], height=size[1], image_path=image_path,
        visible_boxes=stack(rows, "vis", np.float32, 4),
        visibility=stack(rows, "visibility", np.float32),
    )


def _quiet_xywh(v):
    """A secondary box (for visibility only): None when absent or unusable."""
    try:
        x, y, w, h = (float(t) for t in v)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(t) for t in (x, y, w, h)) or w <= 0 or h <= 0:
        return None
    return (x, y, x + w, y + h)
