"""WiderPedestrian (WIDER Person challenge) text-format reader.

Annotation file: one line per image, whitespace separated::

    img00001.jpg 1 592 300 38 76 2 100 120 30 80
    img00002.jpg

i.e. the image name followed by zero or more ``label x y w h`` groups, label
1 = pedestrian, 2 = cyclist. Optional ignore file: ``name x y w h [x y w h
...]`` per line, giving ignore regions (several lines for one image add up).
Images are ``<image_dir>/<name>``; sizes come from the image headers.
An ignore line for an image the annotation file does not list is an error.
"""

from __future__ import annotations

import math
import os

from dipr1_jax.data.records import RecordList, Reporter, image_size, parse_xywh, record_from_rows

LABELS = {1: "pedestrian", 2: "cyclist"}


def _numbers(tokens, where, rep):
    try:
        vals = [float(t) for t in tokens]
    except ValueError:
        rep.error(where, f"non-numeric field in {' '.join(tokens)!r}", "malformed line")
        return None
    if not all(math.isfinite(v) for v in vals):
        rep.error(where, "non-finite number", "malformed line")
        return None
    return vals


def _read_ignore(ignore_file, rep) -> dict[str, list]:
    regions: dict[str, list] = {}
    with open(ignore_file, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            tokens = text.split()
            if not tokens:
                continue
            where = f"{ignore_file}:{lineno}"
            name, rest = tokens[0], tokens[1:]
            if len(rest) % 4:
                rep.error(where, f"expected name then groups of 4 numbers (x y w h), got "
                          f"{len(rest)} numbers", "malformed line")
                continue
            vals = _numbers(rest, where, rep)
            if vals is None:
                continue
            for j in range(0, len(vals), 4):
                box = parse_xywh(vals[j:j + 4], f"{where} (region {j // 4})", rep, "ignore box")
                if box is not None:
                    regions.setdefault(name, []).append((box, where))
    return regions


def read_widerped(
    ann_file: str,
    image_dir: str,
    ignore_file: str | None = None,
    *,
    on_error: str = "raise",
) -> RecordList:
    """Reads a WiderPedestrian annotation file (and optional ignore file)."""
    rep = Reporter(on_error, f"read_widerped({ann_file})")
    ignore = _read_ignore(ignore_file, rep) if ignore_file else {}
    records, seen = [], {}
    with open(ann_file, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            tokens = text.split()
            if not tokens:
                continue
            where = f"{ann_file}:{lineno}"
            name, rest = tokens[0], tokens[1:]
            if name in seen:
                rep.error(where, f"duplicate image {name!r} (first on line {seen[name]})",
                          "duplicate image")
                continue
            if len(rest) % 5:
                rep.error(where, f"expected name then groups of 5 fields (label x y w h), got "
                          f"{len(rest)} fields", "malformed line")
                continue
            vals = _numbers(rest, where, rep)
            if vals is None:
                continue
            image_path = os.path.join(image_dir, name)
            size = image_size(image_path, where, rep)
            if size is None:
                continue
            seen[name] = lineno
            rows = []
            for j in range(0, len(vals), 5):
                bwhere = f"{where} (box {j // 5})"
                label = vals[j]
                if label not in LABELS:
                    rep.error(bwhere, f"unknown label {rest[j]!r} (1 pedestrian, 2 cyclist)",
                              "unknown label")
                    continue
                box = parse_xywh(vals[j + 1:j + 5], bwhere, rep)
                if box is not None:
                    rows.append({"box": box, "label": LABELS[int(label)], "cat": int(label),
                                 "ignore": False})
            for box, _ in ignore.get(name, []):
                rows.append({"box": box, "label": "ignore", "cat": 0, "ignore": True})
            records.append(record_from_rows(
                rows, image_id=name, width=size[0], height=size[1], image_path=image_path,
                source=ann_file, line=lineno))
    for name in sorted(set(ignore) - set(seen)):
        rep.error(ignore[name][0][1], f"ignore regions for image {name!r}, which the annotation "
                  f"file {ann_file} does not list", "orphan ignore line")
    return rep.finish(records)
