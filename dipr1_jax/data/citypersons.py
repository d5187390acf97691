"""CityPersons reader (official per-image ``gtBboxCityPersons`` JSON files).

Layout (as in ``gtBbox_cityPersons_trainval.zip`` and Cityscapes
``leftImg8bit_trainvaltest.zip``)::

    <ann_dir>/<split>/<city>/<city>_<seq>_<frame>_gtBboxCityPersons.json
    <image_dir>/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png

Each JSON: ``{"imgHeight": 1024, "imgWidth": 2048, "objects": [{"label":
"pedestrian", "bbox": [x, y, w, h], "bboxVis": [x, y, w, h], "instanceId":
24000}, ...]}``. Labels: pedestrian, rider, sitting person, person (other),
person group, ignore.

Following the official evaluation protocol, ``positive_labels`` (default
pedestrian only) are ground truth and every other label is an ignore region.
With ``reasonable=True`` positives that fail the "reasonable" filter
(height >= 50 px and visibility >= 0.65) become ignore regions too (they are
neither rewarded nor penalised). ``visibility`` is ``area(bboxVis) /
area(bbox)``. Errors name the file and the object index (the files are
pretty-printed JSON, so an object spans many lines).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from dipr1_jax.data.records import (
    RecordList, Reporter, parse_xywh, record_from_rows, require_image, stack,
)

LABELS = ("pedestrian", "rider", "sitting person", "person (other)", "person group", "ignore")
# Official class ids of the CityPersons evaluation code (ignore = 0).
LABEL_IDS = {"ignore": 0, "pedestrian": 1, "rider": 2, "sitting person": 3,
             "person (other)": 4, "person group": 5}
ANN_SUFFIX = "_gtBboxCityPersons.json"
IMAGE_SUFFIX = "_leftImg8bit.png"
REASONABLE_MIN_HEIGHT = 50.0
REASONABLE_MIN_VISIBILITY = 0.65


def read_citypersons(
    ann_dir: str,
    image_dir: str,
    *,
    reasonable: bool = False,
    positive_labels: tuple[str, ...] = ("pedestrian",),
    on_error: str = "raise",
    check_images: bool = True,
) -> RecordList:
    """Reads every ``*_gtBboxCityPersons.json`` under ``ann_dir`` (sorted)."""
    bad = [l for l in positive_labels if l not in LABEL_IDS or l == "ignore"]
    if bad:
        raise ValueError(f"read_citypersons: unknown positive labels {bad}; known: {LABELS[:-1]}")
    rep = Reporter(on_error, f"read_citypersons({ann_dir})")
    if not os.path.isdir(ann_dir):
        raise FileNotFoundError(f"read_citypersons: annotation folder not found: {ann_dir}")
    files = []
    for root, _, names in os.walk(ann_dir):
        files += [os.path.join(root, n) for n in names if n.endswith(ANN_SUFFIX)]
    files.sort()
    records = []
    for path in files:
        rel = os.path.relpath(path, ann_dir)
        image_path = os.path.join(image_dir, rel[: -len(ANN_SUFFIX)] + IMAGE_SUFFIX)
        rec = _read_file(path, image_path, reasonable, positive_labels, check_images, rep)
        if rec is not None:
            records.append(rec)
    return rep.finish(records)


def _read_file(path, image_path, reasonable, positive_labels, check_images, rep):
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        rep.error(f"{path}:{e.lineno}", f"not valid JSON ({e.msg})", "malformed file")
        return None
    if not isinstance(obj, dict):
        rep.error(path, "expected a JSON object", "malformed file")
        return None
    w, h, objects = obj.get("imgWidth"), obj.get("imgHeight"), obj.get("objects")
    if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
        rep.error(path, f"imgWidth/imgHeight must be positive integers, got {w!r}/{h!r}",
                  "malformed file")
        return None
    if not isinstance(objects, list):
        rep.error(path, "'objects' must be a list", "malformed file")
        return None
    if check_images and not require_image(image_path, path, rep):
        return None
    rows = []
    for i, o in enumerate(objects):
        where = f"{path} (objects[{i}])"
        if not isinstance(o, dict):
            rep.error(where, "each object must be a JSON object", "malformed box")
            continue
        label = o.get("label")
        if label not in LABEL_IDS:
            rep.error(where, f"unknown label {label!r} (expected one of {LABELS})", "unknown label")
            continue
        if "bbox" not in o:
            rep.error(where, "missing 'bbox'", "malformed box")
            continue
        box = parse_xywh(o["bbox"], where, rep, "bbox")
        if box is None:
            continue
        vis_box, visibility = (math.nan,) * 4, math.nan
        if "bboxVis" in o:
            v = o["bboxVis"]
            # A zero-size bboxVis is legal (fully occluded): visibility 0.
            if isinstance(v, list) and len(v) == 4 and all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
                for t in v) and v[2] >= 0 and v[3] >= 0:
                vis_box = (v[0], v[1], v[0] + v[2], v[1] + v[3])
                visibility = (v[2] * v[3]) / ((box[2] - box[0]) * (box[3] - box[1]))
            else:
                rep.error(where, f"bboxVis must be [x, y, w, h] with w, h >= 0, got {v!r}",
                          "malformed box")
                continue
        ignore = label not in positive_labels
        if reasonable and not ignore:
            too_small = (box[3] - box[1]) < REASONABLE_MIN_HEIGHT
            occluded = not (visibility >= REASONABLE_MIN_VISIBILITY)  # NaN counts as occluded
            ignore = too_small or occluded
        rows.append({"box": box, "label": label, "cat": LABEL_IDS[label], "ignore": ignore,
                     "vis": vis_box, "visibility": visibility})
    image_id = os.path.basename(image_path)[: -len(IMAGE_SUFFIX)]
    return record_from_rows(
        rows, image_id=image_id, width=w, height=h, image_path=image_path, source=path, line=0,
        visible_boxes=stack(rows, "vis", np.float32, 4),
        visibility=stack(rows, "visibility", np.float32),
    )
