"""The one record type every reader returns, plus the shared validation helpers.

A :class:`Record` is one image with its annotations, in the ORIGINAL image frame:

====================  =====================================================
``image_id``          str, unique within a dataset
``image_path``        str or None (file on disk)
``image_bytes``       bytes or None (encoded image, e.g. from TFDS)
``image``             uint8 ``[H, W, 3]`` or None (decoded pixels, synthetic)
``width, height``     int, original size in pixels
``boxes``             float32 ``[N, 4]`` x1, y1, x2, y2 in original pixels
``labels``            str ``[N]`` class names as the dataset spells them
``ignore``            bool ``[N]``: ignore regions and ignore-flagged boxes
``category_ids``      int32 ``[N]`` dataset class ids (-1 where none)
``visible_boxes``     float32 ``[N, 4]`` or None (NaN rows where unknown)
``visibility``        float32 ``[N]`` or None: visible share of the box
``source, line``      annotation file and 1-based line (0 if not line based)
``attrs``             dict of extra per-box int/float arrays (e.g. UAVDT
                      ``occlusion``) and per-record values
====================  =====================================================

Records also answer ``record["boxes"]`` so code may treat them as dicts.

Validation policy (every reader): a malformed line or field, a box with a
negative width or height, or a missing image raises :class:`DataFormatError`
naming the file and line (or the record/object id). With ``on_error="skip"``
the offending line / box / image is skipped instead and counted in the
:class:`RecordList` that the reader returns (``records.skipped``), and one
warning summarises the counts. Boxes of zero width or height carry no area
(they can never be matched) and are dropped in both modes; they are counted in
``records.dropped``. Nothing is dropped silently.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import math
import os
from typing import Any, Iterable

import numpy as np

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")


class DataFormatError(ValueError):
    """An annotation or image is malformed. The message starts with ``file:line``."""


@dataclasses.dataclass
class Record:
    image_id: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray
    image_path: str | None = None
    image_bytes: bytes | None = None
    image: np.ndarray | None = None
    category_ids: np.ndarray | None = None
    visible_boxes: np.ndarray | None = None
    visibility: np.ndarray | None = None
    source: str = ""
    line: int = 0
    attrs: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.image_id = str(self.image_id)
        self.width, self.height = int(self.width), int(self.height)
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        n = self.boxes.shape[0]
        self.labels = np.asarray(self.labels, dtype=np.str_).reshape(-1)
        self.ignore = np.asarray(self.ignore, dtype=bool).reshape(-1)
        if self.category_ids is None:
            self.category_ids = np.full((n,), -1, np.int32)
        self.category_ids = np.asarray(self.category_ids, np.int32).reshape(-1)
        if self.visible_boxes is not None:
            self.visible_boxes = np.asarray(self.visible_boxes, np.float32).reshape(-1, 4)
        if self.visibility is not None:
            self.visibility = np.asarray(self.visibility, np.float32).reshape(-1)
        for name in ("labels", "ignore", "category_ids", "visible_boxes", "visibility"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(
                    f"record {self.image_id!r}: {name} has {value.shape[0]} entries, boxes {n}"
                )
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"record {self.image_id!r}: image size {self.width}x{self.height}")

    # dict-style access, so records and plain dicts are interchangeable.
    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default) if key in self.keys() else default

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line else (self.source or self.image_id)


class RecordList(list):
    """A list of records plus what the reader skipped or dropped, and why."""

    def __init__(self, records: Iterable[Record] = (), skipped=None, dropped=None):
        super().__init__(records)
        self.skipped: collections.Counter = skipped if skipped is not None else collections.Counter()
        self.dropped: collections.Counter = dropped if dropped is not None else collections.Counter()
        self.skip_examples: list[str] = []

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        parts = [f"{len(self)} records"]
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{v} {k}" for k, v in sorted(self.skipped.items())))
        if self.dropped:
            parts.append("dropped " + ", ".join(f"{v} {k}" for k, v in sorted(self.dropped.items())))
        return "; ".join(parts)


class Reporter:
    """Raise-or-count policy shared by the readers."""

    def __init__(self, on_error: str, name: str):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.name = name
        self.out = RecordList()

    def error(self, where: str, reason: str, kind: str) -> None:
        """A bad input. Raises, or (skip mode) counts it under ``kind``."""
        if self.on_error == "raise":
            raise DataFormatError(f"{where}: {reason}")
        self.out.skipped[kind] += 1
        if len(self.out.skip_examples) < 20:
            self.out.skip_examples.append(f"{where}: {reason}")

    def drop(self, kind: str) -> None:
        self.out.dropped[kind] += 1

    def finish(self, records: Iterable[Record]) -> RecordList:
        self.out.extend(records)
        if self.out.skipped or self.out.dropped:
            log.warning("%s: %s (first: %s)", self.name, self.out.summary(),
                        self.out.skip_examples[:3])
        return self.out


def parse_xywh(values: Any, where: str, rep: Reporter, what: str = "box"):
    """Validates an ``[x, y, w, h]`` box; returns x1y1x2y2 floats or None.

    None means the box was rejected (negative size / malformed, skip mode) or
    dropped (zero size); the reporter has counted it either way.
    """
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        rep.error(where, f"{what} must be 4 numbers [x, y, w, h], got {values!r}", "malformed box")
        return None
    try:
        x, y, w, h = (float(v) for v in values)
    except (TypeError, ValueError):
        rep.error(where, f"{what} has a non-numeric entry: {values!r}", "malformed box")
        return None
    if isinstance(values[0], bool) or not all(math.isfinite(v) for v in (x, y, w, h)):
        rep.error(where, f"{what} has a non-finite or boolean entry: {values!r}", "malformed box")
        return None
    if w < 0 or h < 0:
        rep.error(where, f"{what} has negative size (w={w:g}, h={h:g})", "negative-size box")
        return None
    if w == 0 or h == 0:
        rep.drop("zero-size box")
        return None
    return (x, y, x + w, y + h)


def image_size(path: str, where: str, rep: Reporter) -> tuple[int, int] | None:
    """(width, height) from the image header; reports a missing or unreadable file."""
    from PIL import Image

    if not os.path.isfile(path):
        rep.error(where, f"image file not found: {path}", "missing image")
        return None
    try:
        with Image.open(path) as im:
            return int(im.width), int(im.height)
    except Exception as e:  # PIL raises many types for bad files
        rep.error(where, f"cannot read image {path}: {e}", "unreadable image")
        return None


def require_image(path: str, where: str, rep: Reporter) -> bool:
    if os.path.isfile(path):
        return True
    rep.error(where, f"image file not found: {path}", "missing image")
    return False


def stack(rows: list[dict], key: str, dtype, width: int | None = None) -> np.ndarray:
    """``np.asarray([r[key] for r in rows])`` with the right shape when ``rows`` is empty."""
    shape = (len(rows),) if width is None else (len(rows), width)
    return np.asarray([r[key] for r in rows], dtype=dtype).reshape(shape)


def record_from_rows(rows: list[dict], **kwargs) -> Record:
    """A record from per-box dicts with keys ``box``, ``label``, ``ignore``, ``cat``."""
    return Record(
        boxes=stack(rows, "box", np.float32, 4),
        labels=stack(rows, "label", np.str_),
        ignore=stack(rows, "ignore", bool),
        category_ids=stack(rows, "cat", np.int32),
        **kwargs,
    )


def decode_image(record: Record | dict) -> np.ndarray:
    """The record's pixels as uint8 ``[H, W, 3]`` RGB; checks them against its size."""
    from PIL import Image

    image = record["image"] if "image" in record else None
    if image is None:
        data = record["image_bytes"] if "image_bytes" in record else None
        path = record["image_path"] if "image_path" in record else None
        try:
            if data is not None and len(data):
                with Image.open(io.BytesIO(data)) as im:
                    image = np.asarray(im.convert("RGB"))
            elif path:
                with Image.open(path) as im:
                    image = np.asarray(im.convert("RGB"))
            else:
                raise DataFormatError(f"record {record['image_id']!r}: no image, path or bytes")
        except DataFormatError:
            raise
        except Exception as e:
            raise DataFormatError(
                f"record {record['image_id']!r} ({path or 'bytes'}): cannot decode image: {e}"
            ) from e
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataFormatError(
            f"record {record['image_id']!r}: image must be uint8 [H, W, 3], got "
            f"{image.dtype} {image.shape}"
        )
    if image.shape[:2] != (int(record["height"]), int(record["width"])):
        raise DataFormatError(
            f"record {record['image_id']!r}: decoded image is {image.shape[1]}x{image.shape[0]} "
            f"but the annotation says {record['width']}x{record['height']} (boxes would be in "
            "the wrong frame)"
        )
    return image


def _text(v) -> str:
    if isinstance(v, (bytes, np.bytes_)):
        return bytes(v).decode("utf-8")
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return _text(v.item())
    return str(v)


def as_record(item: Record | dict) -> Record:
    """A :class:`Record` from a record or a dict (e.g. a TFDS example, whose strings are
    bytes). Dict keys are the record's field names; ``image`` may hold encoded bytes."""
    if isinstance(item, Record):
        return item
    if not isinstance(item, dict):
        raise TypeError(f"expected a Record or a dict, got {type(item).__name__}")
    d = dict(item)
    image = d.pop("image", None)
    if isinstance(image, (bytes, np.bytes_)) or (isinstance(image, np.ndarray) and image.dtype == object):
        d["image_bytes"], image = bytes(image.item() if isinstance(image, np.ndarray) else image), None
    known = {f.name for f in dataclasses.fields(Record)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise DataFormatError(f"record {d.get('image_id')!r}: unknown fields {unknown}")
    d["image_id"] = _text(d["image_id"])
    d["labels"] = np.asarray([_text(v) for v in d.get("labels", [])], np.str_)
    for key in ("image_path", "source"):
        if d.get(key) is not None:
            d[key] = _text(d[key])
    return Record(image=image, **d)


def find_dir(root: str, predicate) -> str | None:
    """First folder under ``root`` (root first, then depth-first, sorted) whose path
    satisfies ``predicate`` (the readers' and builders' way to locate image folders)."""
    for dirpath, dirnames, _ in os.walk(root):
        dirnames.sort()
        if predicate(dirpath):
            return dirpath
    return None
