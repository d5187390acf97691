"""COCO-format JSON reader (the generic path; any category subset).

Uses ``images[].{id, file_name, width, height}``, ``annotations[].{id,
image_id, category_id, bbox: [x, y, w, h], iscrowd, ignore}`` and
``categories[].{id, name}``. ``iscrowd == 1`` or ``ignore == 1`` (the
convention of CrowdHuman/CityPersons COCO conversions) make an ignore region.
``categories`` selects a subset by name or id; annotations of other
categories are not part of the task and are left out (their number is
reported in ``records.dropped["other category"]``). Errors name the file and
the annotation / image index and id. Every image listed becomes a record,
with or without annotations.
"""

from __future__ import annotations

import json
import os

from dipr1_jax.data.records import RecordList, Reporter, parse_xywh, record_from_rows, require_image


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_coco(
    json_path: str,
    image_dir: str,
    *,
    categories: list | tuple | None = None,
    on_error: str = "raise",
    check_images: bool = True,
) -> RecordList:
    """Reads a COCO detection JSON into records (images in file order)."""
    rep = Reporter(on_error, f"read_coco({json_path})")
    try:
        with open(json_path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}:{e.lineno}: not valid JSON ({e.msg})") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(obj.get(key), list):
            raise ValueError(f"{json_path}: top-level {key!r} must be a list")

    cats = {}
    for i, c in enumerate(obj["categories"]):
        if not (isinstance(c, dict) and _is_int(c.get("id")) and isinstance(c.get("name"), str)):
            raise ValueError(f"{json_path} (categories[{i}]): needs integer 'id' and string 'name'")
        cats[c["id"]] = c["name"]
    if categories is None:
        wanted = set(cats)
    else:
        wanted = set()
        for c in categories:
            ids = [k for k, v in cats.items() if c == v or (_is_int(c) and c == k)]
            if not ids:
                raise ValueError(f"{json_path}: category {c!r} not in the file's categories "
                                 f"{sorted(cats.values())}")
            wanted.update(ids)

    images, order = {}, []
    for i, im in enumerate(obj["images"]):
        where = f"{json_path} (images[{i}], id={im.get('id') if isinstance(im, dict) else None!r})"
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            rep.error(where, "image entry needs 'id' and string 'file_name'", "malformed image")
            continue
        w, h = im.get("width"), im.get("height")
        if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
            rep.error(where, f"width/height must be positive integers, got {w!r}/{h!r}",
                      "malformed image")
            continue
        if im["id"] in images:
            rep.error(where, f"duplicate image id {im['id']!r}", "duplicate image")
            continue
        path = os.path.join(image_dir, im["file_name"])
        if check_images and not require_image(path, where, rep):
            continue
        images[im["id"]] = {"path": path, "w": w, "h": h, "rows": [], "where": where}
        order.append(im["id"])
    known_ids = {im.get("id") for im in obj["images"] if isinstance(im, dict)}

    for i, a in enumerate(obj["annotations"]):
        where = f"{json_path} (annotations[{i}], id={a.get('id') if isinstance(a, dict) else None!r})"
        if not isinstance(a, dict) or "image_id" not in a or "bbox" not in a:
            rep.error(where, "annotation needs 'image_id' and 'bbox'", "malformed box")
            continue
        if a["image_id"] not in known_ids:
            rep.error(where, f"unknown image_id {a['image_id']!r}", "unknown image")
            continue
        if a.get("category_id") not in cats:
            rep.error(where, f"unknown category_id {a.get('category_id')!r}", "unknown label")
            continue
        if a["category_id"] not in wanted:
            rep.drop("other category")
            continue
        if a["image_id"] not in images:  # its image was skipped (skip mode), already counted
            continue
        box = parse_xywh(a["bbox"], where, rep, "bbox")
        if box is None:
            continue
        ignore = bool(a.get("iscrowd", 0)) or bool(a.get("ignore", 0))
        images[a["image_id"]]["rows"].append(
            {"box": box, "label": cats[a["category_id"]], "cat": a["category_id"],
             "ignore": ignore})

    records = [
        record_from_rows(im["rows"], image_id=str(k), width=im["w"], height=im["h"],
                         image_path=im["path"], source=json_path, line=0,
                         attrs={"coco_id": k})
        for k in order for im in (images[k],)
    ]
    return rep.finish(records)
