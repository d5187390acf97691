"""Attention backends of the decoder (training forward, prefill) and the vision tower.

``ModelConfig.attention`` (``--config.model.attention``) picks one:

* ``xla``: ``jax.nn.dot_product_attention`` with the dense boolean mask (decoder calls
  without a cache, vision full-attention blocks) and ``decoder.cached_attention`` over a
  KV cache: the path the port always had, kept as the reference.
* ``cudnn``: cuDNN flash attention (``jax.nn.dot_product_attention(implementation=
  "cudnn")``), given the mask in the form it supports: causal plus per-row sequence
  lengths (right padding only). The decoder's rows are a left-padded prompt followed
  by a right-padded completion, so the valid keys of a row are one contiguous range
  ``[lo, lo + n)``; each row is rolled left by ``lo`` (once per decoder call without a
  cache, per layer over a cache), which turns it into a right-padded causal row of
  length ``n``. Over a KV cache the queries start at slot ``index`` (traced): they are
  placed at their slots in an ``S``-row query array (the rows before them are zeros
  whose output is dropped; the rows past ``n`` are skipped by the kernel), so the
  top-left causal mask of cuDNN is the right one. The vision tower's full-attention
  blocks in the per-image layout are one right-padded segment per row (lengths).
* ``splash``: the Pallas TPU splash-attention kernel (``jax.experimental.pallas.ops.
  tpu.splash_attention``): a static causal / full mask and per-token segment ids
  (decoder: valid vs padding, so left padding needs no roll; vision: one id per image
  and frame, any layout). Sequences are padded to the kernel's 128-row blocks. Off TPU
  it runs in Pallas interpret mode (tests; slow). Under a mesh it runs in
  ``shard_map`` over the batch (and heads, when query and KV heads split alike).
* ``auto``: ``cudnn`` on a CUDA GPU with cuDNN >= 8.9 and compute capability >= 8.0,
  ``splash`` on TPU, ``xla`` elsewhere (CPU).

Layouts a backend cannot express use ``xla``, and say so once per process (a warning
for an explicitly chosen backend, info under ``auto``), naming the layout:

* cudnn: float32 compute (the flash kernels take bf16/fp16); head_dim not a multiple
  of 8 or above 256; the flat vision layout (``vision_max_patches=0``) with more than
  one image (several segments per row; sequence lengths describe one); the windowed
  vision blocks (a window slot packs several windows: several segments per slot).
* splash: decoder calls over a KV cache (the queries start at a traced cache slot and
  splash's causal offset is static; padding them to the cache length costs up to
  ``(S / T)^2`` the work at prefill); the windowed vision blocks (slots of
  ``W = 64`` positions: a 128-row block would do 4x the work of XLA's per-slot
  attention).
* decode steps (one query over the cache) always use ``cached_attention``.

Correctness conditions that are checked at run time rather than trusted (a
``jax.debug.callback`` inside a ``lax.cond``): cudnn needs every decoder row's valid
keys to be contiguous, and a multi-frame image (grid ``t > 1``) has several segments,
which vision lengths cannot express. (A program holding such a callback is not written
to JAX's persistent compilation cache; only the cudnn paths trace one.)

Outputs at padding queries differ between backends (xla: an average over the masked
row; cudnn: zero; splash: attention among padding tokens); they are never read (loss
masks, the last prompt slot is real) and are finite in every backend.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

BACKENDS = ("auto", "xla", "cudnn", "splash")

# Test hooks. CUDNN_IMPL="xla" runs the cudnn backend's translated masks (rolled rows,
# causal + sequence lengths, queries placed at their cache slots) through JAX's xla
# implementation of the same ``jax.nn.dot_product_attention`` arguments: what the
# cuDNN kernel is given, checkable on CPU. SPLASH_INTERPRET: None = interpret off TPU.
CUDNN_IMPL = "cudnn"
SPLASH_INTERPRET: bool | None = None
SPLASH_BLOCK = 128  # sequences are padded to a multiple of this (the kernel's block rows)

_SAID: set[str] = set()


def _say(msg: str, explicit: bool) -> None:
    """Logs ``msg`` once per process: a warning when the backend was chosen explicitly."""
    if msg in _SAID:
        return
    _SAID.add(msg)
    (logging.warning if explicit else logging.info)("attention: %s", msg)


# ----------------------------------------------------------------------------- resolution

def _cudnn_available() -> bool:
    try:
        dev = jax.devices()[0]
        if dev.platform != "gpu":
            return False
        from jax._src.lib import cuda_versions  # None on ROCm / CPU-only jaxlib
        if cuda_versions is None or cuda_versions.cudnn_get_version() < 8904:
            return False
        cc = getattr(dev, "compute_capability", None)
        return cc is None or float(cc) >= 8.0
    except Exception:  # noqa: BLE001 (any failure to probe: not available)
        return False


def resolve(backend: str, platform: str | None = None, cudnn_ok: bool | None = None) -> str:
    """The backend ``backend`` means on ``platform`` (default: JAX's default backend):
    ``auto`` -> cudnn (CUDA GPU with cuDNN flash), splash (TPU) or xla. A backend that
    cannot run on the platform is an error, not a silent substitute."""
    if backend not in BACKENDS:
        raise ValueError(f"model.attention={backend!r}: not one of {', '.join(BACKENDS)}")
    platform = platform or jax.default_backend()
    if backend == "auto":
        if platform == "gpu":
            ok = _cudnn_available() if cudnn_ok is None else cudnn_ok
            return "cudnn" if ok else "xla"
        return "splash" if platform == "tpu" else "xla"
    if backend == "cudnn" and CUDNN_IMPL == "cudnn":
        ok = (platform == "gpu" and _cudnn_available()) if cudnn_ok is None else cudnn_ok
        if not ok:
            raise ValueError(f"model.attention=cudnn needs a CUDA GPU with cuDNN >= 8.9 "
                             f"(compute capability >= 8.0); this process runs on {platform}: "
                             "use auto or xla")
    if backend == "splash" and platform == "gpu":
        raise ValueError("model.attention=splash is the Pallas TPU kernel; on a GPU use "
                         "cudnn (or auto / xla)")
    if backend == "splash" and platform != "tpu" and _interpret() is True:
        _say(f"splash on {platform} runs in Pallas interpret mode (a test path, slow)", True)
    return backend


def _interpret() -> bool:
    if SPLASH_INTERPRET is not None:
        return SPLASH_INTERPRET
    return jax.default_backend() != "tpu"


def choose(backend: str, layout: str, *, dtype=None, head_dim: int | None = None,
           platform: str | None = None) -> str:
    """The backend that runs ``layout`` (``decoder``, ``decoder_cache``, ``vision_full``,
    ``vision_flat_multi``, ``vision_window``) for the configured ``backend``: the
    resolved one, or ``xla`` with a logged reason when the layout cannot be expressed."""
    eff = resolve(backend, platform)
    explicit = backend != "auto"
    if eff == "xla":
        return "xla"
    why = None
    if eff == "cudnn":
        half = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        if CUDNN_IMPL == "cudnn" and dtype is not None and jnp.dtype(dtype) not in half:
            why = (f"{jnp.dtype(dtype).name} compute (cuDNN flash attention takes bf16/fp16; "
                   "set model.dtype=bfloat16)")
        elif head_dim is not None and (head_dim % 8 or head_dim > 256):
            why = f"head_dim {head_dim} (cuDNN needs a multiple of 8, at most 256)"
        elif layout == "vision_flat_multi":
            why = ("the flat vision layout with several images (several segments per row; "
                   "sequence lengths describe one right-padded segment: set "
                   "model.vision_max_patches)")
        elif layout == "vision_window":
            why = ("the windowed vision blocks (a window slot packs several windows, i.e. "
                   "several segments; sequence lengths describe one)")
    elif eff == "splash":
        if layout == "decoder_cache":
            why = ("decoder calls over a KV cache (prefill, train.forward's prompt and "
                   "completion passes): the queries start at a traced cache slot and splash's "
                   "causal offset is static")
        elif layout == "vision_window":
            why = ("the windowed vision blocks (slots of W positions, below splash's "
                   f"{SPLASH_BLOCK}-row blocks)")
    if why is not None:
        _say(f"{eff} cannot express {why}; using xla there", explicit)
        return "xla"
    return eff


# ----------------------------------------------------------------------------- masks

@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["dense", "valid", "lo", "length", "q_start"],
                   meta_fields=["backend"])
@dataclasses.dataclass(frozen=True)
class DecoderMask:
    """The decoder's causal x key-validity mask in every form the backends take.

    ``dense [B, 1, T, S]`` (xla, the reference); ``valid [B, S]`` key validity (splash
    segment ids); ``lo, length [B]``: the valid keys of a row are slots
    ``[lo, lo + length)`` (cudnn; ``lo`` None: already 0, the rows were rolled once
    for the whole decoder); ``q_start``: cache slot of query 0 (None: no cache).
    ``backend`` (static): the backend these calls use."""

    dense: jax.Array
    valid: jax.Array | None = None
    lo: jax.Array | None = None
    length: jax.Array | None = None
    q_start: jax.Array | None = None
    backend: str = "xla"


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["dense", "segment", "length"], meta_fields=["backend"])
@dataclasses.dataclass(frozen=True)
class SegmentMask:
    """Bidirectional attention inside segments (the vision tower's full-attention blocks):
    ``dense [G, P, P]`` (xla); ``segment [G, P]`` int32 ids, 0 on padding (splash);
    ``length [G]``: the row is one segment of that many patches from slot 0 (cudnn)."""

    dense: jax.Array
    segment: jax.Array | None = None
    length: jax.Array | None = None
    backend: str = "xla"


def key_range(valid):
    """``(lo, length)`` int32 ``[B]`` of a ``[B, S]`` key mask: first valid slot and count."""
    valid = valid.astype(bool)
    length = jnp.sum(valid, axis=-1, dtype=jnp.int32)
    lo = jnp.where(length > 0, jnp.argmax(valid, axis=-1), 0).astype(jnp.int32)
    return lo, length


def _raise_not_contiguous(rows):
    rows = np.asarray(rows)  # (under vmap the cond becomes a select: called for every batch)
    rows = np.flatnonzero(rows.reshape(-1, rows.shape[-1]).any(0)).tolist()
    if not rows:
        return
    raise ValueError(
        f"attention=cudnn: the attention_mask of batch rows {rows[:8]} is not one contiguous "
        "run of valid tokens (left-padded prompt + right-padded completion); cuDNN's "
        "sequence lengths cannot express it: use model.attention=xla (or splash)")


def check_contiguous(valid, lo, length):
    """Raises (under jit: a JaxRuntimeError when read) unless each row's valid keys are
    exactly ``[lo, lo + length)``."""
    s = jnp.arange(valid.shape[-1])[None]
    want = (s >= lo[:, None]) & (s < (lo + length)[:, None])
    bad = jnp.any(want != valid.astype(bool), axis=-1)
    jax.lax.cond(jnp.any(bad), lambda b: jax.debug.callback(_raise_not_contiguous, b),
                 lambda b: None, bad)


def _raise_multi_frame(t):
    t = int(np.max(np.asarray(t)))
    if t <= 1:  # (under vmap the cond becomes a select: called for every batch)
        return
    raise ValueError(
        f"attention=cudnn: an image with grid t={t} > 1 has one "
        "attention segment per frame, which the vision tower's sequence lengths cannot "
        "express: use model.attention=xla (or splash) for multi-frame inputs")


def check_single_frame(grid_thw):
    t = jnp.max(jnp.asarray(grid_thw)[:, 0])
    jax.lax.cond(t > 1, lambda x: jax.debug.callback(_raise_multi_frame, x),
                 lambda x: None, t)


def roll_rows(x, shift, axis: int = 1):
    """Per-row roll to the left: ``out[b, i] = x[b, (i + shift[b]) % n]`` along ``axis``."""
    n = x.shape[axis]
    idx = (jnp.arange(n, dtype=jnp.int32)[None, :] + shift[:, None]) % n
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 1 - axis))
    return jnp.take_along_axis(x, idx, axis=axis)


# ----------------------------------------------------------------------------- kernels

def xla_attention(q, k, v, mask, scale):
    """Today's path: XLA attention under a dense boolean mask ``[B, 1|H, T, S]``."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)


def cudnn_causal(q, k, v, lo, length, q_start, scale):
    """Causal attention of ``q [B, T, H, D]`` (query ``i`` at slot ``q_start + i``) over
    ``k, v [B, S, Hkv, D]`` whose valid keys are slots ``[lo, lo + length)``, as cuDNN
    takes it: rows rolled left by ``lo`` (right padding), queries at their slots of an
    ``S``-row array, top-left causal mask, sequence lengths ``length``."""
    B, T, H, D = q.shape
    S = k.shape[1]
    if q_start is not None or T != S:
        start = 0 if q_start is None else q_start
        q = jax.lax.dynamic_update_slice(jnp.zeros((B, S, H, D), q.dtype), q, (0, start, 0, 0))
    if lo is not None:
        q, k, v = (roll_rows(a, lo) for a in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                       query_seq_lengths=length, key_value_seq_lengths=length,
                                       implementation=CUDNN_IMPL)
    if lo is not None:
        out = roll_rows(out, -lo)
    if q_start is not None or T != S:
        start = 0 if q_start is None else q_start
        out = jax.lax.dynamic_slice(out, (0, start, 0, 0), (B, T, H, D))
    return out


def cudnn_segments(q, k, v, length, scale):
    """Bidirectional attention inside one right-padded segment of ``length`` per row."""
    return jax.nn.dot_product_attention(q, k, v, scale=scale, query_seq_lengths=length,
                                        key_value_seq_lengths=length,
                                        implementation=CUDNN_IMPL)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _splash_kernel(n: int, heads: int, causal: bool, interpret: bool):
    """A splash MQA kernel for ``heads`` query heads per KV head (built per trace: it
    holds arrays, which must not outlive the trace; the mask analysis is numpy)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    blk = next(b for b in (512, 256, 128, SPLASH_BLOCK) if n % b == 0)
    bs = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                       block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                       block_kv_dq=blk)
    one = sm.CausalMask((n, n)) if causal else sm.FullMask((n, n))
    mask = sm.MultiHeadMask([one] * heads)
    return sk.make_splash_mqa(mask, block_sizes=bs, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _splash_local(q, k, v, seg, causal: bool, scale: float):
    """Splash attention of one shard: ``q [B, T, H, D]``, ``k, v [B, T, Hkv, D]``,
    ``seg [B, T]`` (equal ids attend to each other)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    B, T, H, D = q.shape
    K = k.shape[2]
    n = _round_up(T, SPLASH_BLOCK)
    pad = n - T
    if pad:  # padding rows get their own id: they attend to each other, never to real ones
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)
    kernel = _splash_kernel(n, H // K, causal, _interpret())
    qg = (q * jnp.asarray(scale, q.dtype)).reshape(B, n, K, H // K, D).transpose(0, 2, 3, 1, 4)
    kg, vg = (a.transpose(0, 2, 1, 3) for a in (k, v))  # [B, K, n, D]
    ids = sk.SegmentIds(q=seg, kv=seg)
    per_group = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over KV heads
    out = jax.vmap(per_group, in_axes=(0, 0, 0, 0))(qg, kg, vg, ids)  # [B, K, R, n, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(B, n, H, D)
    return out[:, :T]


def splash_attention(q, k, v, segment, *, causal: bool, scale: float,
                     batch_axis: str = "batch", head_axes=("act_heads", "act_kv_heads")):
    """Splash attention (self-attention, ``T == S``) with segment ids ``[B, T]``; under a
    mesh in ``shard_map`` over the batch (and heads when query and KV heads split alike)."""
    from dipr1_jax.sharding import current_mesh, logical_to_spec
    if q.shape[1] != k.shape[1]:
        raise ValueError("splash_attention: self-attention only (T == S)")
    segment = segment.astype(jnp.int32)
    fn = functools.partial(_splash_local, causal=causal, scale=scale)
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return fn(q, k, v, segment)
    from jax.sharding import PartitionSpec as P
    qs = logical_to_spec((batch_axis, None, head_axes[0], None), q.shape, mesh)
    ks = logical_to_spec((batch_axis, None, head_axes[1], None), k.shape, mesh)
    if qs[2] != ks[2]:  # heads split differently: keep them whole in each shard
        qs, ks = P(qs[0], None, None, None), P(ks[0], None, None, None)
    ss = P(qs[0], None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qs, ks, ks, ss), out_specs=qs,
                         check_vma=False)(q, k, v, segment)


# ----------------------------------------------------------------------------- dispatch

def decoder_attention(q, k, v, mask: DecoderMask, scale: float):
    """Causal attention of the decoder: ``q [B, T, H, D]`` over ``k, v [B, S, Hkv, D]``
    with the backend ``mask.backend`` (``xla``: the dense mask)."""
    if mask.backend == "cudnn":
        return cudnn_causal(q, k, v, mask.lo, mask.length, mask.q_start, scale)
    if mask.backend == "splash":
        return splash_attention(q, k, v, mask.valid, causal=True, scale=scale)
    return xla_attention(q, k, v, mask.dense, scale)


def segment_attention(q, k, v, mask: SegmentMask, scale: float):
    """Bidirectional attention inside segments: ``q, k, v [G, P, heads, hd]``."""
    if mask.backend == "cudnn":
        return cudnn_segments(q, k, v, mask.length, scale)
    if mask.backend == "splash":
        return splash_attention(q, k, v, mask.segment, causal=False, scale=scale,
                                batch_axis="vision_images", head_axes=(None, None))
    return xla_attention(q, k, v, mask.dense[:, None], scale)


def segment_ids(lay):
    """int32 ``[G, P]``: one id per run of patches of one image and frame, 0 on padding."""
    key = lay["image"] * (jnp.max(lay["frame"]) + 1) + lay["frame"]
    first = jnp.ones_like(key[:, :1], bool)
    new = jnp.concatenate([first, key[:, 1:] != key[:, :-1]], axis=1)
    ids = jnp.cumsum(new, axis=1, dtype=jnp.int32)
    return jnp.where(lay["valid"], ids, 0)
