"""Host-side parsing of Think-Look-Answer completions into padded box arrays.

Robust by contract: ``parse_completions`` never raises on any string (a
broken completion scores 0, it does not stop training). See DESIGN.md
section 2 for the format. Rules, in order:

* ``format_ok`` is 1 only when the text is exactly ``<think>..</think>``
  ``<look>..</look>`` ``<answer>..</answer>`` (whitespace around the tags
  allowed, no other tag inside), the think text is non-empty, and both the
  look and answer bodies parse completely.
* A body parses completely when it is JSON (optionally inside a ```json
  fence, optionally without the outer ``[ ]``) whose entries are all either
  ``{"bbox_2d": [x1, y1, x2, y2], ...}`` or a bare ``[x1, y1, x2, y2]``, with
  finite numbers, ``x2 > x1`` and ``y2 > y1``. An answer may also be a single
  non-negative integer (counting prompts). An empty body is an empty list.
* Boxes are still salvaged from bodies that do not parse completely (invalid
  entries dropped, or ``[a, b, c, d]`` found by a regular expression when the
  JSON itself is broken), so accuracy can give partial credit, but
  ``format_ok`` is 0. A body is read from its opening tag to its closing tag,
  or to the end of the text when the completion was truncated.
* Boxes beyond ``max_boxes`` (``max_look``) are not stored but are counted in
  ``answer_total`` (``look_total``) and ``answer_overflow`` (``look_overflow``),
  so precision still sees them.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple, Sequence

import numpy as np

_TAG = re.compile(r"</?(?:think|look|answer)>")
_ORDER = ["<think>", "</think>", "<look>", "</look>", "<answer>", "</answer>"]
_FENCE = re.compile(r"\A\s*```(?:json|JSON)?\s*(.*?)\s*```\s*\Z", re.S)
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_QUAD = re.compile(r"\[\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM
                   + r")\s*,\s*(" + _NUM + r")\s*\]")
_INT32_MAX = 2**31 - 1


class ParsedCompletions(NamedTuple):
    """Padded arrays for ``N`` completions (a pytree: pass it to jitted code).

    ``format_ok [N]`` bool; ``answer_boxes [N, P, 4]`` float32;
    ``answer_mask [N, P]`` bool; ``answer_total [N]`` int32 (valid answer boxes,
    including those beyond P); ``look_boxes [N, L, 4]``; ``look_mask [N, L]``;
    ``look_total [N]``; ``count [N]`` int32 (the integer answer, or -1);
    ``answer_overflow [N]`` / ``look_overflow [N]`` int32 (boxes not stored).
    """

    format_ok: np.ndarray
    answer_boxes: np.ndarray
    answer_mask: np.ndarray
    answer_total: np.ndarray
    look_boxes: np.ndarray
    look_mask: np.ndarray
    look_total: np.ndarray
    count: np.ndarray
    answer_overflow: np.ndarray
    look_overflow: np.ndarray

    def summary(self) -> dict[str, int]:
        """Counts worth logging: format failures and truncated box lists."""
        return {
            "completions": int(self.format_ok.shape[0]),
            "format_ok": int(np.sum(self.format_ok)),
            "answer_overflow_rows": int(np.sum(self.answer_overflow > 0)),
            "answer_overflow_boxes": int(np.sum(self.answer_overflow)),
            "look_overflow_rows": int(np.sum(self.look_overflow > 0)),
        }


_NUM_TYPES = (int, float)  # exact types: bool is not a coordinate
_EMPTY = np.zeros((0, 4), np.float64)


def _valid(arr: np.ndarray) -> np.ndarray:
    """Rows that are finite boxes with x2 > x1 and y2 > y1."""
    with np.errstate(invalid="ignore"):
        return (np.all(np.isfinite(arr), axis=1) & (arr[:, 2] > arr[:, 0])
                & (arr[:, 3] > arr[:, 1]))


def _to_array(quads: list) -> np.ndarray:
    """``[n, 4]`` float64; ints too large for a double become inf (then invalid)."""
    try:
        return np.array(quads, np.float64).reshape(-1, 4)
    except OverflowError:
        out = np.empty((len(quads), 4))
        for i, q in enumerate(quads):
            for j, v in enumerate(q):
                try:
                    out[i, j] = float(v)
                except OverflowError:
                    out[i, j] = np.inf
        return out


def _boxes(entries: list) -> tuple[np.ndarray, bool]:
    """Valid boxes of a JSON list and whether every entry was one."""
    quads = []
    for e in entries:
        if type(e) is dict:
            e = e.get("bbox_2d")
        if (type(e) is list and len(e) == 4 and type(e[0]) in _NUM_TYPES
                and type(e[1]) in _NUM_TYPES and type(e[2]) in _NUM_TYPES
                and type(e[3]) in _NUM_TYPES):
            quads.append(e)
    if not quads:
        return _EMPTY, not entries
    arr = _to_array(quads)
    ok = _valid(arr)
    return arr[ok], bool(ok.all()) and len(quads) == len(entries)


def _loads(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except Exception:  # ValueError, RecursionError, huge-int limits: all mean "not JSON"
        return False, None


def _salvage(text: str) -> np.ndarray:
    """``[a, b, c, d]`` number quads found anywhere in broken JSON (valid boxes only)."""
    quads = _QUAD.findall(text)
    if not quads:
        return _EMPTY
    arr = np.array(quads, np.float64)  # float("1e400") is inf: dropped below
    return arr[_valid(arr)]


def parse_body(body: str, allow_count: bool) -> tuple[np.ndarray, bool, int]:
    """``(boxes, complete, count)`` of one tag body; ``count`` is -1 unless an integer."""
    fenced = _FENCE.match(body)
    text = fenced.group(1) if fenced else body
    stripped = text.strip()
    if not stripped:
        return _EMPTY, True, -1
    ok, value = _loads(stripped)
    if not ok or isinstance(value, dict):
        ok, value = _loads("[" + stripped + "]")
    if not ok:
        return _salvage(stripped), False, -1
    if allow_count and isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= _INT32_MAX:
            return _EMPTY, True, int(value)
        return _EMPTY, False, -1
    if not isinstance(value, list):
        return _EMPTY, False, -1
    if len(value) == 4 and all(not isinstance(v, (list, dict)) for v in value):
        value = [value]  # a single bare box
    boxes, complete = _boxes(value)
    return boxes, complete, -1


def _body(text: str, tag: str) -> str | None:
    start = text.find(f"<{tag}>")
    if start < 0:
        return None
    start += len(tag) + 2
    end = text.find(f"</{tag}>", start)
    return text[start:] if end < 0 else text[start:end]


def _strict_format(text: str) -> bool:
    """Exactly the six tags in order, only whitespace outside them, non-empty think."""
    tags = list(_TAG.finditer(text))
    if [m.group() for m in tags] != _ORDER:
        return False
    outside = (text[:tags[0].start()], text[tags[1].end():tags[2].start()],
               text[tags[3].end():tags[4].start()], text[tags[5].end():])
    if any(s.strip() for s in outside):
        return False
    return bool(text[tags[0].end():tags[1].start()].strip())


def parse_one(text: Any) -> tuple[bool, np.ndarray, np.ndarray, int]:
    """``(format_ok, answer_boxes [n, 4], look_boxes [m, 4], count)``. Never raises."""
    try:
        if not isinstance(text, str):
            return False, _EMPTY, _EMPTY, -1
        answer = _body(text, "answer")
        look = _body(text, "look")
        a_boxes, a_ok, count = parse_body(answer, True) if answer is not None else (_EMPTY, False, -1)
        l_boxes, l_ok, _ = parse_body(look, False) if look is not None else (_EMPTY, False, -1)
        return _strict_format(text) and a_ok and l_ok, a_boxes, l_boxes, count
    except Exception:  # the contract: a completion never raises  # pragma: no cover
        return False, _EMPTY, _EMPTY, -1


def _pack(rows: Sequence[np.ndarray], width: int) -> tuple[np.ndarray, ...]:
    n = len(rows)
    boxes = np.zeros((n, width, 4), np.float32)
    mask = np.zeros((n, width), bool)
    total = np.zeros((n,), np.int32)
    for i, row in enumerate(rows):
        k = min(len(row), width)
        if k:
            with np.errstate(over="ignore"):  # finite doubles beyond float32 become inf
                boxes[i, :k] = row[:k]
            mask[i, :k] = True
        total[i] = min(len(row), _INT32_MAX)
    # Coordinates that overflow float32 are not usable boxes: drop them as padding.
    bad = ~np.all(np.isfinite(boxes), axis=-1) & mask
    if bad.any():
        mask &= ~bad
        boxes[bad] = 0.0
        total -= bad.sum(-1).astype(np.int32)
    return boxes, mask, total, (total - mask.sum(-1)).astype(np.int32)


def parse_completions(texts: Sequence[Any], max_boxes: int = 128,
                      max_look: int = 32) -> ParsedCompletions:
    """Parses ``N`` completions into padded arrays (see :class:`ParsedCompletions`)."""
    results = [parse_one(t) for t in texts]
    a_boxes, a_mask, a_total, a_over = _pack([r[1] for r in results], max_boxes)
    l_boxes, l_mask, l_total, l_over = _pack([r[2] for r in results], max_look)
    return ParsedCompletions(
        format_ok=np.array([r[0] for r in results], bool).reshape(len(results)),
        answer_boxes=a_boxes, answer_mask=a_mask, answer_total=a_total,
        look_boxes=l_boxes, look_mask=l_mask, look_total=l_total,
        count=np.array([r[3] for r in results], np.int32).reshape(len(results)),
        answer_overflow=a_over, look_overflow=l_over,
    )
