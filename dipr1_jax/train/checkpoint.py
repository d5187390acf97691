"""orbax checkpoints of the SFT and GRPO loops: periodic asynchronous saves, exact resume.

``WORKDIR/checkpoints/<step>/`` (orbax's step naming) holds two items:

* ``state``: the ``TrainState`` (step, trainable parameters, optimizer state),
  saved with ``StandardSave`` and restored onto the shardings of the live state;
* ``extra``: JSON with the loop's kind, the grain iterator state of its data,
  its counters (wall seconds so far, dropped groups) and the resolved config.

Nothing else is needed to continue bit for bit: frozen parameters and GRPO's
reference policy are the initial policy, which the same command reloads (the
``init_from`` / checkpoint directory, or the random init seeded by
``--config.seed``), and the rollout key is ``fold_in(key(seed + 7), step)``.

A save is atomic: orbax writes into a temporary directory and renames it when
the save is complete, so a process killed during an asynchronous save leaves
the previous checkpoint as the latest. A checkpoint that fails to restore
(truncated, corrupted) is skipped, with a warning, for the one before it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any, Mapping

import jax
from absl import logging

from dipr1_jax import fsio
from dipr1_jax.model.config import flatten_dict

ITEMS = ("state", "extra")
PREEMPTED_EXIT = 143  # 128 + SIGTERM: what the launch/ scripts read as a preemption


class ResumeError(RuntimeError):
    """The workdir holds a run that this command may not continue."""


# Fields that may change between a run and its resumption.
RESUMABLE_FIELDS = ("checkpoint.force_resume", "checkpoint.every", "checkpoint.keep")


def _defaults() -> dict:
    from dipr1_jax.config import Config, to_dict
    return flatten_dict(json.loads(json.dumps(to_dict(Config()))))


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"a.b: saved -> current"`` for every leaf that differs (JSON-normalised). A field
    the saved config predates (absent there) counts as equal when the current value is
    its default: a run written before the field existed behaved as the default does."""
    a = flatten_dict(json.loads(json.dumps(saved)))
    b = flatten_dict(json.loads(json.dumps(current)))
    defaults = _defaults()
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b))
            if k not in RESUMABLE_FIELDS and a.get(k) != b.get(k)
            and not (k not in a and k in defaults and b.get(k) == defaults[k])]


def check_resumable(workdir: str, current: Mapping[str, Any], force: bool) -> None:
    """Refuses (``ResumeError``) when ``WORKDIR/config.json`` differs from ``current``."""
    path = fsio.join(workdir, "config.json")
    if not fsio.exists(path):
        return
    saved = json.loads(fsio.read_text(path))
    diff = config_diff(saved, current)
    if not diff:
        return
    if force:
        logging.warning("resuming %s although its config differs (--config.checkpoint."
                        "force_resume): %s", workdir, "; ".join(diff))
        return
    raise ResumeError(
        f"{workdir} holds a checkpoint of a run with a different config; refusing to resume. "
        f"Differing fields ({len(diff)}): " + "; ".join(diff)
        + ". Use another --workdir, or --config.checkpoint.force_resume=true to continue anyway.")


class Checkpointer:
    """An orbax ``CheckpointManager`` over ``directory`` for one training loop."""

    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        # (orbax writes gs:// itself: arrays through tensorstore, the rest through epath)
        self.directory = directory if fsio.is_remote(directory) else os.path.abspath(directory)
        self.every = every
        self._saved: set[int] = set()  # steps this process has started saving
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
            item_names=ITEMS)

    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, state, extra: Mapping[str, Any], *, force: bool = False) -> bool:
        """Starts saving ``state`` (at ``state.step``); returns once the arrays are copied,
        the write finishes in the background (``wait``)."""
        ocp = self._ocp
        step = int(state.step)
        if step in self._saved or step in self._mgr.all_steps():
            return False  # e.g. the periodic save and the final one fall on the same step
        self._saved.add(step)
        return self._mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(dict(extra))),
            force=force)

    def restore(self, like_state) -> tuple[Any, dict] | None:
        """``(state, extra)`` of the newest checkpoint that restores, onto ``like_state``'s
        shapes, dtypes and shardings; None when there is none."""
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        for step in reversed(self.steps()):
            try:
                r = self._mgr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any failure: fall back to an older one
                logging.warning("checkpoint %s/%d does not restore (%s: %s); trying the one "
                                "before it", self.directory, step, type(e).__name__, e)
                print(f"warning: checkpoint {self.directory}/{step} is unreadable "
                      f"({type(e).__name__}); skipping it", flush=True)
                continue
            if int(r.state.step) != step:
                logging.warning("checkpoint %d holds step %d; skipping it", step, int(r.state.step))
                continue
            return r.state, dict(r.extra)
        return None

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


class Preemption:
    """SIGTERM (a preemption notice) sets ``requested``; the loop checkpoints and exits at
    the end of its current step. A second SIGTERM exits at once (status 143): the last
    complete checkpoint stays usable because saves are atomic.

    On several processes (``jax.distributed``) JAX's preemption service catches SIGTERM
    instead, and ``should_stop(step)`` is ``multihost_utils.reached_preemption_sync_point``:
    every process stops after the same step (the first one all of them reach after any
    of them got the notice), so their checkpoints agree. The loops call it after every
    step, as that protocol requires."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._synced = self._sync_service()

    @staticmethod
    def _sync_service() -> bool:
        if jax.process_count() == 1:
            return False
        from jax._src import distributed  # the service jax.distributed.initialize started
        return getattr(distributed.global_state, "preemption_sync_manager", None) is not None

    def should_stop(self, step: int) -> bool:
        if self._synced:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(int(step)):
                self.requested = True
        return self.requested

    def _handler(self, signum, frame):
        if self.requested:
            os._exit(PREEMPTED_EXIT)
        self.requested = True
        print("SIGTERM: finishing this step, then checkpoint and exit (SIGTERM again: exit "
              "now)", flush=True)

    def __enter__(self) -> "Preemption":
        # (With the sync service, installing a Python handler would hide SIGTERM from it.)
        if not self._synced and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with ``PREEMPTED_EXIT``."""

    def __init__(self, step: int, path: str):
        super().__init__(PREEMPTED_EXIT)
        self.step, self.path = step, path
