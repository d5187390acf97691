"""Run-directory writers and console lines for the SFT / GRPO / eval loops.

DESIGN section 8: ``--workdir`` holds ``config.json``, ``metrics.jsonl`` (one
JSON object per logged step or evaluation, the last with ``"final": true``),
``samples.jsonl`` and TensorBoard event files. :class:`RunWriter` owns those
files; only process 0 writes (``is_main=False`` makes every method a no-op).
Each JSONL record is written and flushed in one call, so a killed run loses
nothing already logged; a line cut short by a kill is repaired when the run is
reopened (``purge_step`` also drops records of steps the resumed run redoes).

:func:`step_line`, :func:`eval_table` and :func:`format_duration` build the
console text; they are pure and never raise on missing keys or NaN.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from dipr1_jax import fsio

_RESERVED = ("step", "kind", "time", "final")


class WorkdirError(OSError):
    """The run directory cannot be created or written."""


def _jsonable(x: Any) -> Any:
    """Plain-Python copy of ``x``: numpy/jax scalars unwrapped, NaN/inf -> None."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic) or hasattr(x, "__array__"):
        a = np.asarray(x)
        if a.ndim:
            return [_jsonable(v) for v in a]
        v = a.item()
        if not isinstance(v, (bool, int, float, str)):
            v = float(a.astype(np.float64)) if a.dtype.kind in "fV" else str(v)
        return _jsonable(v)
    return str(x)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            yield from _flatten(v, key)
        else:
            yield key, v


def _number(v: Any) -> float | None:
    """A finite float, or None for anything else (None, NaN, strings, bools)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _checked(metrics: Mapping[str, Any]) -> dict:
    clash = [k for k in _RESERVED if k in metrics]
    if clash:
        raise ValueError(f"RunWriter: metric names {clash} are reserved")
    return _jsonable(metrics)


class Phases:
    """How a run's records divide into consecutive phases (the pipeline's base, sft, grpo,
    control): ``of(record)`` is a record's phase index into ``names``. Resuming at
    ``(phase, step)`` keeps the records up to that point; each phase's TensorBoard
    events go to ``WORKDIR/tensorboard/<name>/`` (a run of its own: TensorBoard purges
    by step across all tags of a run, and each phase counts its own steps)."""

    def __init__(self, names: Sequence[str], of):
        self.names = tuple(names)
        self.of = of


def _keeps(purge_step: int | None, phases: Phases | None, resume_phase: int):
    """The predicate of the records a run resumed at ``(resume_phase, purge_step)`` keeps:
    those before it, never the ``final`` record (the resumed run writes its own)."""
    if purge_step is None:
        return None
    of = phases.of if phases is not None else (lambda r: 0)
    return lambda r: (r.get("step") is not None and not r.get("final")
                      and (of(r), r["step"]) < (resume_phase, purge_step))


def _repair(path: str, keep=None) -> None:
    """Drop a torn last line and (with ``keep``, a resumed run) the records ``keep``
    rejects: what the resumed run will redo."""
    if not fsio.exists(path):
        return
    data = fsio.read_bytes(path)
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail:
        try:
            json.loads(tail)
            lines.append(tail)
        except ValueError:
            warnings.warn(f"{path}: dropping truncated last line ({len(tail)} bytes)")
    if keep is not None:
        recs = [json.loads(ln) for ln in lines if ln.strip()]
        lines = [json.dumps(r).encode() for r in recs if keep(r)]
    new = b"".join(ln + b"\n" for ln in lines)
    if new != data:  # atomically: other processes of a multi-host run may be reading it
        fsio.write_bytes(path, new)


class _Lines:
    """An append-only JSONL file. Local: appended and flushed record by record (a kill
    loses nothing logged). On an object store (``gs://``), which cannot append: kept in
    memory and rewritten whole at ``flush()`` and at most every ``REMOTE_FLUSH_SECONDS``
    while logging (the loops flush before every checkpoint, so what a checkpoint covers
    is written first)."""

    def __init__(self, path: str):
        self.path = path
        self.remote = fsio.is_remote(path)
        if self.remote:
            self._data = bytearray(fsio.read_bytes(path) if fsio.exists(path) else b"")
            self._dirty, self._last = False, time.monotonic()
        else:
            self._f = open(path, "a", encoding="utf-8")

    def append(self, text: str) -> None:
        if not self.remote:
            self._f.write(text)
            self._f.flush()
            return
        self._data += text.encode("utf-8")
        self._dirty = True
        if time.monotonic() - self._last >= REMOTE_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.remote:
            if not self._f.closed:
                self._f.flush()
                os.fsync(self._f.fileno())
        elif self._dirty:
            fsio.write_bytes(self.path, bytes(self._data))
            self._dirty, self._last = False, time.monotonic()

    def close(self) -> None:
        self.flush()
        if not self.remote:
            self._f.close()


REMOTE_FLUSH_SECONDS = 30.0


def ensure_writable(workdir: str) -> None:
    """Creates ``workdir`` (a local path or a ``gs://`` URI); ``WorkdirError`` unless a
    file can be written there (or no filesystem package handles its scheme)."""
    try:
        fsio.check_writable(workdir)
    except (OSError, fsio.MissingBackendError, ValueError) as e:
        raise WorkdirError(f"run directory {workdir!r} is not writable: {e}") from e


def logged_eval(workdir: str, name: str) -> dict | None:
    """The summary of evaluation ``name`` last logged in ``WORKDIR/metrics.jsonl``."""
    found = [r["eval"][name] for r in read_metrics(workdir)
             if r.get("kind") == "eval" and name in r.get("eval", {})]
    return found[-1] if found else None


class RunWriter:
    """``config.json``, ``metrics.jsonl``, ``samples.jsonl`` and TensorBoard of one run."""

    def __init__(self, workdir: str | os.PathLike, *, is_main: bool = True,
                 tensorboard: bool = True, purge_step: int | None = None,
                 phases: Phases | None = None, resume_phase: int = 0):
        """``purge_step``: a resumed run continues at this step (of ``resume_phase`` when
        the run has ``phases``); the records and events from there on are dropped."""
        self.workdir = os.fspath(workdir)
        self.is_main = is_main
        self._last_step: int | None = None
        self._metrics = self._samples = None
        self._phases, self._resume = phases, (resume_phase, purge_step)
        self._tensorboard = tensorboard
        self._tb: dict[int, Any] = {}  # phase index -> tensorboardX SummaryWriter
        if not is_main:
            return
        ensure_writable(self.workdir)
        paths = [fsio.join(self.workdir, n) for n in ("metrics.jsonl", "samples.jsonl")]
        keep = _keeps(purge_step, phases, resume_phase)
        for p in paths:
            _repair(p, keep)
        self._metrics, self._samples = (_Lines(p) for p in paths)
        if tensorboard and phases is None:
            self._board(0)  # (the phases' writers open with their first event)

    def _board(self, phase: int):
        """The TensorBoard writer of ``phase`` (the workdir itself without phases)."""
        if phase not in self._tb:
            from tensorboardX import SummaryWriter
            logdir = self.workdir
            purge = self._resume[1]
            if fsio.is_remote(logdir):
                fsio.register_tensorboardx()  # event files as whole objects
            if self._phases is not None:
                logdir = fsio.join(self.workdir, "tensorboard", self._phases.names[phase])
                if purge is not None:  # earlier phases keep all; later ones start over
                    purge = (None if phase < self._resume[0]
                             else purge if phase == self._resume[0] else 0)
            # tensorboardX names files by the second: a unique suffix keeps a reopened
            # run (same second) from overwriting the earlier file; names sort by time.
            self._tb[phase] = SummaryWriter(logdir=logdir, purge_step=purge,
                                            filename_suffix=f".{time.time_ns()}")
        return self._tb[phase]

    def write_config(self, config: Mapping[str, Any]) -> None:
        if not self.is_main:
            return
        fsio.write_text(fsio.join(self.workdir, "config.json"), json.dumps(
            _jsonable(config), sort_keys=True, indent=2, allow_nan=False) + "\n")

    def _append(self, f: _Lines, records: Sequence[dict]) -> None:
        f.append("".join(json.dumps(_jsonable(r), allow_nan=False) + "\n" for r in records))

    def log(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
        """One ``metrics.jsonl`` record; numeric leaves also to TensorBoard as ``kind/key``."""
        if not self.is_main:
            return
        step = int(step)
        record = {"step": step, "kind": kind, "time": time.time(), **_checked(metrics)}
        self._append(self._metrics, [record])
        self._last_step = step
        self._scalars(step, record)
        if kind == "eval" and self._metrics.remote:  # (rare, and what a resume reads back)
            self.flush()

    def _scalars(self, step: int | None, record: dict) -> None:
        if not self._tensorboard or step is None or self._metrics is None:
            return
        tb = None
        for key, v in _flatten(record):
            if key not in _RESERVED and _number(v) is not None:
                if tb is None:
                    tb = self._board(self._phases.of(record) if self._phases else 0)
                tag = re.sub(r"[^A-Za-z0-9_./-]", "_", f"{record['kind']}/{key}")
                tb.add_scalar(tag, _number(v), global_step=step)

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append ``rows`` (e.g. prompt, completion, rewards) to ``samples.jsonl``."""
        if not self.is_main:
            return
        self._append(self._samples, [{"step": int(step), **row} for row in rows])

    def final(self, payload: Mapping[str, Any], *, step: int | None = None) -> None:
        """The run's last ``metrics.jsonl`` record, marked ``"final": true``."""
        if not self.is_main:
            return
        step = self._last_step if step is None else int(step)
        record = {"step": step, "kind": "final", "time": time.time(),
                  **_checked(payload), "final": True}
        self._append(self._metrics, [record])
        self._scalars(step, record)
        self.flush()

    def flush(self) -> None:
        """Everything logged so far to storage (fsync locally; the objects rewritten on
        ``gs://``)."""
        for f in (self._metrics, self._samples):
            if f is not None:
                f.flush()
        for tb in self._tb.values():
            tb.flush()

    def close(self) -> None:
        if not self.is_main or self._metrics is None:
            return
        for f in (self._metrics, self._samples, *self._tb.values()):
            if f is not None:
                f.close()
        self._metrics = self._samples = None
        self._tb = {}

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """All records of ``workdir/metrics.jsonl``; a torn last line is skipped with a warning."""
    path = fsio.join(os.fspath(workdir), "metrics.jsonl")
    if not fsio.exists(path):
        return []
    lines = fsio.read_text(path).split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError as e:
            if any(rest.strip() for rest in lines[i + 1:]):
                raise ValueError(f"{path}:{i + 1}: invalid JSON record: {e}") from None
            warnings.warn(f"{path}:{i + 1}: skipping truncated last line")
    return out


def format_duration(seconds: float | None) -> str:
    """``45s``, ``3m12s``, ``1h02m``, ``2d03h``; ``-`` for None/NaN/negative."""
    s = _number(seconds)
    if s is None or s < 0:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _fmt(v: Any, how: str = "g") -> str:
    """``g``: 4 significant digits; ``i``: integer; ``s``: seconds. ``-`` if not finite."""
    x = _number(v)
    if x is None:
        return "-"
    if how == "s":
        return f"{x:.1f}s" if x < 60 else format_duration(x)
    return f"{x:.0f}" if how == "i" or abs(x) >= 1e4 else f"{x:.4g}"


# step_line sections: (label, accepted keys after flattening nested dicts with "/", format).
_REWARD = ("reward", "reward/total", "reward/mean")
_PARTS = (("fmt", "reward/format"), ("look", "reward/look"), ("acc", "reward/accuracy"),
          ("cnt", "reward/count"))
_GROUPS = (
    (("loss", ("loss",), "g"), ("kl", ("kl",), "g"), ("clip", ("clip_fraction", "clip"), "g")),
    (("len", ("completion_len", "len"), "i"),),
    (("tok/s", ("tokens_per_s", "tok_per_s"), "i"),),
    (("rollout", ("time/rollout", "rollout_s"), "s"), ("reward", ("time/reward", "reward_s"), "s"),
     ("update", ("time/update", "update_s"), "s")),
)


def step_line(step: int, total_steps: int, metrics: Mapping[str, Any], *,
              elapsed_s: float | None, eta_s: float | None, kind: str = "grpo") -> str:
    """One compact console line for a training step; only keys present are shown.

    Keys (nested dicts are joined with ``/``): ``reward`` (or ``reward/total``),
    ``reward/{format,look,accuracy,count}``, ``loss``, ``kl``, ``clip_fraction``,
    ``completion_len``, ``tokens_per_s``, ``time/{rollout,reward,update}`` (seconds).
    """
    m = dict(_flatten(_jsonable(metrics)))
    first = lambda keys: next((m[k] for k in keys if k in m), None)  # noqa: E731
    parts = [f"{kind} {step}/{total_steps}"]
    comps = [f"{lab} {_fmt(m[k])}" for lab, k in _PARTS if k in m]
    if any(k in m for k in _REWARD) or comps:
        parts.append(f"reward {_fmt(first(_REWARD))}" + (f" ({' '.join(comps)})" if comps else ""))
    for group in _GROUPS:
        items = [(lab, _fmt(first(keys), how)) for lab, keys, how in group
                 if any(k in m for k in keys)]
        items = [f"{v} {lab}" if lab == "tok/s" else f"{lab} {v}" for lab, v in items]
        if items:
            parts.append(" ".join(items))
    parts.append(f"{format_duration(elapsed_s)} eta {format_duration(eta_s)}")
    return " | ".join(parts)


def eval_table(rows: Mapping[str, Mapping[str, Any]],
               keys: Sequence[str] = ("format_rate", "precision", "recall", "f1",
                                      "count_mae", "reward")) -> str:
    """Fixed-width table: one row per model name, one column per key (``-`` if missing)."""
    def cell(v: Any) -> str:
        x = _number(_jsonable(v))
        if x is None:
            return "-"
        return str(int(x)) if isinstance(v, (int, np.integer)) else f"{x:.4f}"

    body = [[str(name)] + [cell(dict(_flatten(r)).get(k)) for k in keys]
            for name, r in rows.items()]
    header = ["model", *keys]
    widths = [max(len(c[i]) for c in [header, *body]) for i in range(len(header))]
    fmt_row = lambda cs: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cs, widths)))
    lines = [fmt_row(header), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + [fmt_row(r) for r in body])
