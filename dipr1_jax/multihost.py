"""Multi-host (multi-process) JAX: start-up, host collectives and global batches.

A job on a TPU pod runs one process per host; each process sees its own devices
(``jax.local_devices()``) and the mesh spans all of them. This module holds what
the trainer needs for that, and is a no-op on one process:

* :func:`initialize` calls ``jax.distributed.initialize`` from the launch flags
  (``--coordinator_address``, ``--num_processes``, ``--process_id``) or, on a
  multi-host Cloud TPU slice, from the TPU environment (``--distributed=auto``).
  It must run before anything touches a JAX backend.
* Host collectives on small numpy values: :func:`allgather` (``[P, ...]``, one row
  per process), :func:`sync_max`, :func:`from_main` (process 0's value everywhere),
  :func:`check_same` (fail loudly when the processes disagree).
* :func:`to_global`: a batch dict of numpy arrays onto the mesh. With
  ``local=True`` each process passes ITS OWN rows (its disjoint shard of the
  global batch, process-major: process p holds global rows
  ``[p * B_local, (p + 1) * B_local)``) and the global arrays are built with
  ``jax.make_array_from_process_local_data``; shapes are first agreed across
  processes (the longest prompt / completion / box axis, padded on the side the
  layout pads). ``pixel_values`` (patches of all images of the batch,
  concatenated in row order, no batch axis) is gathered into the same compact
  layout a single process would build (process 0's patches, then process 1's,
  ..., then zero padding), so the image-token scatter is unchanged. With
  ``local=False`` every process passes the same full batch (the held-out set,
  which every process reads whole) and the arrays are cut from it.
* :func:`to_host`: a global array back to numpy: the rows of this process
  (``local=True``) or all of it.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

# Keys whose [B, T] layout is padded on the left (the pipeline's prompt layout).
LEFT_PADDED = ("input_ids", "attention_mask")


def _tpu_multihost_env() -> bool:
    """A Cloud TPU VM of a multi-host slice (several worker hostnames)."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1 or bool(
        os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
    """``jax.distributed.initialize`` when asked (``mode='on'``), or with ``mode='auto'``
    when a coordinator is given or the TPU environment names several hosts. Returns
    whether it ran. On CPU the cross-process collectives use gloo."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--distributed={mode!r}: expected auto, on or off")
    wanted = mode == "on" or (mode == "auto" and (bool(coordinator_address)
                                                  or _tpu_multihost_env()))
    if not wanted:
        return False
    if bool(coordinator_address) != (num_processes is not None and process_id is not None):
        if coordinator_address or num_processes is not None or process_id is not None:
            raise ValueError("--coordinator_address, --num_processes and --process_id go "
                             "together (or give none of them on a TPU slice, where JAX "
                             "reads them from the environment)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {}
    if coordinator_address:
        kw = dict(coordinator_address=coordinator_address, num_processes=int(num_processes),
                  process_id=int(process_id))
    jax.distributed.initialize(**kw)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True


def is_multi() -> bool:
    return jax.process_count() > 1


def is_main() -> bool:
    return jax.process_index() == 0


# ----------------------------------------------------------------------------- host collectives
def allgather(x) -> np.ndarray:
    """``[num_processes, *x.shape]``: every process's ``x`` (same shape and dtype
    everywhere), in process order. One process: ``x[None]``."""
    x = np.asarray(x)
    if not is_multi():
        return x[None]
    from jax.experimental import multihost_utils
    # As raw bytes: a device round trip would turn float64 / int64 into 32 bits.
    raw = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    got = np.asarray(multihost_utils.process_allgather(raw, tiled=False))
    return np.ascontiguousarray(got).view(x.dtype).reshape((jax.process_count(),) + x.shape)


def sync_max(values: Sequence[int]) -> np.ndarray:
    """The elementwise maximum over processes of an int vector."""
    return allgather(np.asarray(values, np.int64)).max(axis=0)


def from_main(value: bool) -> bool:
    """Process 0's ``value`` on every process (e.g. a wall-clock decision)."""
    if not is_multi():
        return value
    return bool(allgather(np.int32(bool(value)))[0])


def broadcast_str(text: str, limit: int = 4096) -> str:
    """Process 0's string on every process (at most ``limit`` UTF-8 bytes)."""
    if not is_multi():
        return text
    raw = text.encode()[:limit]
    buf = np.zeros(limit + 4, np.uint8)
    buf[:4] = np.frombuffer(np.int32(len(raw)).tobytes(), np.uint8)
    buf[4:4 + len(raw)] = np.frombuffer(raw, np.uint8)
    got = allgather(buf)[0]
    n = int(np.frombuffer(got[:4].tobytes(), np.int32)[0])
    return got[4:4 + n].tobytes().decode()


def check_same(text: str, what: str) -> None:
    """Raises when the processes do not all hold the same ``text`` (compared by hash)."""
    if not is_multi():
        return
    h = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int64)
    got = allgather(h)[:, 0]
    if not np.all(got == got[0]):
        differ = [int(i) for i in np.nonzero(got != got[0])[0]]
        raise RuntimeError(f"multi-host: processes {differ} disagree with process 0 on {what}")


# ----------------------------------------------------------------------------- global batches
def batch_spec(mesh, ndim: int, batch_axis: int, shape=None) -> P:
    """``batch_axis`` over the mesh's batch axes (those that divide it, given ``shape``)."""
    from dipr1_jax import sharding as shd
    axes = [None] * ndim
    axes[batch_axis] = "batch"
    return shd.logical_to_spec(tuple(axes), shape, mesh)


def _pad_to(x: np.ndarray, shape: Sequence[int], left_axis: int | None, value) -> np.ndarray:
    """``x`` padded with ``value`` up to ``shape`` (on the left of ``left_axis``, else right)."""
    pads = []
    for a, (n, m) in enumerate(zip(x.shape, shape)):
        extra = int(m) - n
        pads.append((extra, 0) if a == left_axis else (0, extra))
    if not any(p != (0, 0) for p in pads):
        return x
    return np.pad(x, pads, constant_values=value)


def _patch_counts(grid: np.ndarray, batch_axis: int) -> np.ndarray:
    """Patches per leading index (``[]`` for a plain batch, ``[n_micro]`` for micro-batches)."""
    per_row = np.asarray(grid).prod(-1)  # [..., B]
    return per_row.sum(axis=batch_axis).astype(np.int64)


def _compact(blocks, idx):
    """``blocks [..., n_proc * W, D]`` -> ``[..., len, D]`` by ``idx`` (-1: a zero row)."""
    xp = np if isinstance(blocks, np.ndarray) else jnp
    taken = xp.take_along_axis(blocks, xp.maximum(idx, 0)[..., None], axis=-2)
    return xp.where((idx >= 0)[..., None], taken, 0).astype(blocks.dtype)


def _pixel_layout(pv: np.ndarray, grid: np.ndarray, batch_axis: int, dividing: int = 1):
    """This process's patches padded to the processes' common width (a multiple of
    ``dividing``), and ``idx [..., n_proc * width]``: for each patch of the compact
    single-process layout, its row in the process-blocked array (-1: padding)."""
    lead = pv.shape[:-2]
    width = int(sync_max([pv.shape[-2]])[0])
    width = -(-width // dividing) * dividing
    pv = _pad_to(pv, lead + (width, pv.shape[-1]), None, 0)
    nproc = jax.process_count()
    counts = allgather(_patch_counts(grid, batch_axis).reshape(-1)).reshape((nproc,) + lead)
    idx = np.full(lead + (nproc * width,), -1, np.int32)
    for li in np.ndindex(*lead) if lead else [()]:
        at = 0
        for p in range(nproc):
            n = int(counts[(p,) + li])
            idx[li + (slice(at, at + n),)] = p * width + np.arange(n)
            at += n
    return pv, idx


def _global_pixels(pv: np.ndarray, grid: np.ndarray, mesh, batch_axis: int):
    """Every process's patches -> one replicated ``[..., P, D]`` array in the compact
    single-process layout (see the module docstring), gathered on the devices."""
    pv, idx = _pixel_layout(pv, grid, batch_axis, jax.local_device_count())
    lead = pv.shape[:-2]
    spec = P(*([None] * len(lead)), batch_spec(mesh, 1, 0)[0], None)
    blocks = jax.make_array_from_process_local_data(
        NamedSharding(mesh, spec), pv, lead + (idx.shape[-1], pv.shape[-1]))
    rep = NamedSharding(mesh, P())
    return jax.jit(_compact, out_shardings=rep)(blocks, replicated(idx, mesh))


def _host_pixels(pv: np.ndarray, grid: np.ndarray, batch_axis: int) -> np.ndarray:
    """Every process's patches gathered on the host, in the compact layout."""
    pv, idx = _pixel_layout(pv, grid, batch_axis)
    blocks = np.moveaxis(allgather(pv), 0, -3)  # [..., n_proc, W, D]
    return _compact(blocks.reshape(idx.shape + pv.shape[-1:]), idx)


def to_global(tree: dict, mesh, *, batch_axis: int = 0, local: bool = True,
              pad_values: dict | None = None) -> dict:
    """A batch dict of numpy arrays -> global ``jax.Array`` s on ``mesh`` (multi-process).

    ``local=True``: each process holds its own rows (see the module docstring);
    ``local=False``: every process holds the same full batch. ``pad_values``: the
    fill of each key when its shape is raised to the processes' maximum (default 0;
    ``input_ids`` / ``completion`` want the pad token)."""
    pad_values = pad_values or {}
    if not local:
        out = {}
        for key, value in tree.items():
            value = np.asarray(value)
            if key == "pixel_values":
                spec = P()
            else:
                spec = (batch_spec(mesh, value.ndim, batch_axis, value.shape)
                        if value.ndim > batch_axis else P())
            sh = NamedSharding(mesh, spec)
            out[key] = jax.make_array_from_callback(value.shape, sh, lambda i, v=value: v[i])
        return out
    keys = sorted(k for k in tree if k != "pixel_values")
    arrays = {k: np.asarray(tree[k]) for k in keys}
    # Agree on every non-batch dimension (the longest prompt, completion, box list).
    dims = [d for k in keys for a, d in enumerate(arrays[k].shape) if a != batch_axis]
    agreed = iter(sync_max(dims).tolist()) if dims else iter(())
    nproc = jax.process_count()
    padded = {}
    for k in keys:
        x = arrays[k]
        target = [n if a == batch_axis else next(agreed) for a, n in enumerate(x.shape)]
        left = batch_axis + 1 if k in LEFT_PADDED else None
        padded[k] = _pad_to(x, target, left, pad_values.get(k, 0))
    rows = padded["image_grid_thw" if "image_grid_thw" in padded else keys[0]].shape[
        batch_axis] * nproc
    if _splits_over_processes(mesh, rows):
        out = {}
        for k, x in padded.items():
            gshape = list(x.shape)
            gshape[batch_axis] *= nproc
            spec = batch_spec(mesh, x.ndim, batch_axis)
            out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x,
                                                            tuple(gshape))
        if "pixel_values" in tree:
            out["pixel_values"] = _global_pixels(np.asarray(tree["pixel_values"]),
                                                 np.asarray(tree["image_grid_thw"]), mesh,
                                                 batch_axis)
        return out
    # A batch too small to split over the devices (e.g. a micro-batch of 4 prompts on 8
    # devices) is replicated, as on one process: every process needs every row.
    full = {k: np.concatenate(list(allgather(x)), axis=batch_axis) for k, x in padded.items()}
    if "pixel_values" in tree:
        full["pixel_values"] = _host_pixels(np.asarray(tree["pixel_values"]),
                                            np.asarray(tree["image_grid_thw"]), batch_axis)
    return to_global(full, mesh, batch_axis=batch_axis, local=False)


def _splits_over_processes(mesh, rows: int) -> bool:
    """Whether ``rows`` split over the batch mesh axes so that process p's devices hold
    exactly the p-th contiguous block of rows (then each process can pass its own rows)."""
    axes = batch_spec(mesh, 2, 0)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if rows % n or n % jax.process_count():
        return False
    return process_major(mesh, axes)


def process_major(mesh, axes=("data", "fsdp")) -> bool:
    """Whether, along the mesh ``axes`` (flattened in order), every block is held by one
    process only and the processes come in order with equal shares."""
    names = list(mesh.axis_names)
    rest = [a for a in names if a not in axes]
    devs = np.transpose(mesh.devices, [names.index(a) for a in axes] + [names.index(a) for a in rest])
    blocks = devs.reshape(int(np.prod([mesh.shape[a] for a in axes])) if axes else 1, -1)
    owner = []
    for row in blocks:
        procs = {d.process_index for d in row}
        if len(procs) != 1:
            return False
        owner.append(procs.pop())
    per = len(owner) // jax.process_count()
    return per > 0 and owner == [p for p in range(jax.process_count()) for _ in range(per)]


def to_host(x, local: bool = True, batch_axis: int = 0) -> np.ndarray:
    """A (global) array as numpy: with ``local`` only this process's rows of
    ``batch_axis`` (process-major blocks), else the whole array."""
    if not is_multi():
        return np.asarray(x)
    from jax.experimental import multihost_utils
    full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    if not local:
        return full
    n = full.shape[batch_axis] // jax.process_count()
    return np.take(full, np.arange(n) + jax.process_index() * n, axis=batch_axis)


def replicated(x, mesh):
    """A global array replicated over ``mesh`` from a value every process holds the same
    (numpy or a process-local array); a global array is returned unchanged."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda i: x[i])
