"""UAVDT detection ground-truth reader.

Layout (``UAV-benchmark-MOTD_v1.0/GT`` and ``UAV-benchmark-M``)::

    <gt_dir>/M0101_gt_whole.txt     frame,target_id,left,top,width,height,out_of_view,occlusion,category
    <gt_dir>/M0101_gt_ignore.txt    same 9 fields; the boxes are ignore regions (-1 fields allowed)
    <image_dir>/M0101/img000001.jpg frame f -> img{f:06d}.jpg

Categories: 1 car, 2 truck, 3 bus. ``out_of_view`` (1 no, 2 medium, 3 small
share out of view) and ``occlusion`` (1 none, 2 large, 3 medium, 4 small) are
kept per box in ``record.attrs``. One record per frame that appears in either
file (``include_unannotated=True`` adds the sequence's other frames as empty
images). Image ids are ``<seq>/img<frame:06d>``. All frames of a sequence share
one size, read from the first frame's header; every frame file must exist.
The official train/test sequence split is not hard-coded: pass ``sequences``.
"""

from __future__ import annotations

import os
import re

import numpy as np

from dipr1_jax.data.records import (
    RecordList, Reporter, image_size, parse_xywh, record_from_rows, require_image, stack,
)

CATEGORIES = {1: "car", 2: "truck", 3: "bus"}
_GT_RE = re.compile(r"^(.+)_gt_whole\.txt$")
_FRAME_RE = re.compile(r"^img(\d{6})\.jpg$")


def frame_path(image_dir: str, seq: str, frame: int) -> str:
    return os.path.join(image_dir, seq, f"img{frame:06d}.jpg")


def _read_rows(path, rep, ignore_file: bool):
    """frame -> list of row dicts."""
    frames: dict[int, list] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            where = f"{path}:{lineno}"
            fields = [t.strip() for t in text.strip().split(",")]
            if len(fields) != 9:
                rep.error(where, f"expected 9 comma-separated fields (frame,target_id,left,top,"
                          f"width,height,out_of_view,occlusion,category), got {len(fields)}",
                          "malformed line")
                continue
            try:
                frame, tid = int(fields[0]), int(fields[1])
                xywh = [float(t) for t in fields[2:6]]
                oov, occ, cat = (int(t) for t in fields[6:9])
            except ValueError:
                rep.error(where, f"non-integer frame/id/flag or non-numeric box in {text.strip()!r}",
                          "malformed line")
                continue
            if frame < 1:
                rep.error(where, f"frame index must be >= 1, got {frame}", "malformed line")
                continue
            if not ignore_file and cat not in CATEGORIES:
                rep.error(where, f"unknown category {cat} (1 car, 2 truck, 3 bus)", "unknown label")
                continue
            box = parse_xywh(xywh, where, rep, "ignore region" if ignore_file else "box")
            if box is None:
                continue
            frames.setdefault(frame, []).append({
                "box": box,
                "label": "ignore" if ignore_file else CATEGORIES[cat],
                "cat": 0 if ignore_file else cat, "ignore": ignore_file,
                "target_id": tid, "out_of_view": oov, "occlusion": occ, "line": lineno,
            })
    return frames


def read_uavdt(
    gt_dir: str,
    image_dir: str,
    *,
    sequences: list[str] | tuple[str, ...] | None = None,
    include_unannotated: bool = False,
    on_error: str = "raise",
    check_images: bool = True,
) -> RecordList:
    """Reads every ``*_gt_whole.txt`` under ``gt_dir`` (or the given sequences)."""
    rep = Reporter(on_error, f"read_uavdt({gt_dir})")
    if not os.path.isdir(gt_dir):
        raise FileNotFoundError(f"read_uavdt: GT folder not found: {gt_dir}")
    found = sorted(m.group(1) for n in os.listdir(gt_dir) if (m := _GT_RE.match(n)))
    if sequences is not None:
        missing = sorted(set(sequences) - set(found))
        if missing:
            raise FileNotFoundError(f"read_uavdt: no <seq>_gt_whole.txt in {gt_dir} for {missing}")
        found = [s for s in found if s in set(sequences)]
    records = []
    for seq in found:
        whole_path = os.path.join(gt_dir, f"{seq}_gt_whole.txt")
        ignore_path = os.path.join(gt_dir, f"{seq}_gt_ignore.txt")
        whole = _read_rows(whole_path, rep, ignore_file=False)
        ign = _read_rows(ignore_path, rep, ignore_file=True) if os.path.isfile(ignore_path) else {}
        frames = set(whole) | set(ign)
        seq_dir = os.path.join(image_dir, seq)
        if include_unannotated and os.path.isdir(seq_dir):
            frames |= {int(m.group(1)) for n in os.listdir(seq_dir) if (m := _FRAME_RE.match(n))}
        if not frames:
            continue
        size = None
        for frame in sorted(frames):
            rows = whole.get(frame, []) + ign.get(frame, [])
            line = rows[0]["line"] if rows else 0
            where = f"{whole_path if frame in whole else ignore_path}:{line} (frame {frame})"
            path = frame_path(image_dir, seq, frame)
            if size is None:
                size = image_size(path, where, rep)
                if size is None:
                    continue
            elif check_images and not require_image(path, where, rep):
                continue
            records.append(record_from_rows(
                rows, image_id=f"{seq}/img{frame:06d}", width=size[0], height=size[1],
                image_path=path, source=whole_path, line=line,
                attrs={k: stack(rows, k, np.int32) for k in ("target_id", "out_of_view", "occlusion")}
                | {"sequence": seq, "frame": frame},
            ))
    return rep.finish(records)
