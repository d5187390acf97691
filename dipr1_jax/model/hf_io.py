"""Hugging Face checkpoint I/O: ``load_hf`` and ``save_hf``.

``load_hf(path, param_dtype=..., dtype=..., mesh=None)`` (parameter and compute
dtypes, named as in ``ModelConfig``) reads ``config.json`` and single-file or
sharded (``model.safetensors.index.json``) safetensors, maps each tensor name
and layout onto the NNX parameter tree and creates every parameter directly
in its shards with ``jax.make_array_from_callback``: each device's block is
read from the memory-mapped file (only the needed rows when the layout is a
plain transpose), so no host copy of the whole model is ever built.

``save_hf(model, path)`` writes ``config.json`` and safetensors (sharded with
an index past ``max_shard_bytes``) in the layout transformers loads.

Both take a local path or a ``gs://`` URI (``dipr1_jax.fsio``): ``save_hf`` writes
each file whole (atomic: a temporary file then a rename, or one object upload);
``load_hf`` of a URI first copies the directory's files into the local cache
(``fsio.local_dir``; safetensors are memory-mapped, which needs a local file).

Names: the released (pre-v5) layout ``model.layers.* / visual.* / lm_head``;
the v5 in-memory prefixes ``model.language_model.`` and ``model.visual.`` are
accepted on load. A tied checkpoint may carry a redundant ``lm_head.weight``;
it is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from dipr1_jax import fsio
from dipr1_jax import sharding as shd
from dipr1_jax.model.config import ModelConfig, check_preset, read_hf_config, to_hf_dict
from dipr1_jax.model.qwen_vl import QwenVL


class CheckpointError(ValueError):
    """A checkpoint does not match the config: names the tensor(s) and shapes."""


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple  # NNX state path of the parameter
    hf: tuple[str, ...]  # one name, or one per layer for a stacked (scanned) parameter
    hf_shape: tuple[int, ...]  # shape of each HF tensor
    view: tuple[int, ...] | None = None  # hf.reshape(view) ...
    perm: tuple[int, ...] | None = None  # ... .transpose(perm) == our layout
    stacked: bool = False  # leading layer axis over ``hf`` (nnx.scan models)

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        if self.view is not None:
            x = x.reshape(self.view)
        if self.perm is not None:
            x = x.transpose(self.perm)
        return x

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.perm is not None:
            x = x.transpose(np.argsort(self.perm))
        return x.reshape(self.hf_shape)


def param_table(cfg: ModelConfig) -> list[Entry]:
    """Every parameter of ``QwenVL(cfg)``: NNX path, HF name(s), HF shape and layout map."""
    t, v = cfg.text, cfg.vision
    out: list[Entry] = []
    D, N, K, hd, F = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, t.intermediate_size
    E, Nv, hv, Fv = v.hidden_size, v.num_heads, v.head_dim, v.intermediate_size

    def add(path, hf, hf_shape, view=None, perm=None):
        out.append(Entry(tuple(path), hf if isinstance(hf, tuple) else (hf,), tuple(hf_shape),
                         None if view is None else tuple(view), perm))

    def dense(path, name, n_out, n_in, out_split=None, bias=True):
        """nn.Linear [n_out, n_in] -> kernel [n_in, *out_split]."""
        split = out_split or (n_out,)
        add(path + ("kernel",), f"{name}.weight", (n_out, n_in), split + (n_in,),
            (len(split),) + tuple(range(len(split))))
        if bias:
            add(path + ("bias",), f"{name}.bias", (n_out,), split)

    def dense_in_split(path, name, n_out, in_split, bias):
        """nn.Linear [n_out, prod(in_split)] -> kernel [*in_split, n_out]."""
        add(path + ("kernel",), f"{name}.weight", (n_out, math.prod(in_split)),
            (n_out,) + in_split, tuple(range(1, len(in_split) + 1)) + (0,))
        if bias:
            add(path + ("bias",), f"{name}.bias", (n_out,))

    def norm(path, name, dim, layer_norm):
        add(path + ("scale",), f"{name}.weight", (dim,))
        if layer_norm:
            add(path + ("bias",), f"{name}.bias", (dim,))

    # vision tower
    vp = ("visual",)
    ln = v.norm == "layer"
    add(vp + ("patch_embed", "kernel"), "visual.patch_embed.proj.weight",
        (E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
        (E, v.patch_dim), (1, 0))
    for i in range(v.depth):
        bp, bn = vp + ("blocks", i), f"visual.blocks.{i}"
        norm(bp + ("norm1",), f"{bn}.norm1", E, ln)
        norm(bp + ("norm2",), f"{bn}.norm2", E, ln)
        add(bp + ("attn", "qkv", "kernel"), f"{bn}.attn.qkv.weight", (3 * E, E),
            (3, Nv, hv, E), (3, 0, 1, 2))
        add(bp + ("attn", "qkv", "bias"), f"{bn}.attn.qkv.bias", (3 * E,), (3, Nv, hv))
        dense_in_split(bp + ("attn", "proj"), f"{bn}.attn.proj", E, (Nv, hv), True)
        if v.gated_mlp:
            dense(bp + ("mlp", "gate_proj"), f"{bn}.mlp.gate_proj", Fv, E)
            dense(bp + ("mlp", "up_proj"), f"{bn}.mlp.up_proj", Fv, E)
            dense(bp + ("mlp", "down_proj"), f"{bn}.mlp.down_proj", E, Fv)
        else:
            dense(bp + ("mlp", "fc1"), f"{bn}.mlp.fc1", Fv, E)
            dense(bp + ("mlp", "fc2"), f"{bn}.mlp.fc2", E, Fv)
    m4 = E * v.spatial_merge_size ** 2
    norm(vp + ("merger", "ln_q"), "visual.merger.ln_q", E, ln)
    dense(vp + ("merger", "mlp_0"), "visual.merger.mlp.0", m4, m4)
    dense(vp + ("merger", "mlp_2"), "visual.merger.mlp.2", v.out_hidden_size, m4)

    # decoder
    dp = ("decoder",)
    add(dp + ("embed_tokens",), "model.embed_tokens.weight", (t.vocab_size, D))
    start = len(out)
    for i in range(t.num_layers):
        lp, name = dp + ("layers", i), f"model.layers.{i}"
        norm(lp + ("input_layernorm",), f"{name}.input_layernorm", D, False)
        norm(lp + ("post_attention_layernorm",), f"{name}.post_attention_layernorm", D, False)
        dense(lp + ("self_attn", "q_proj"), f"{name}.self_attn.q_proj", N * hd, D, (N, hd))
        dense(lp + ("self_attn", "k_proj"), f"{name}.self_attn.k_proj", K * hd, D, (K, hd))
        dense(lp + ("self_attn", "v_proj"), f"{name}.self_attn.v_proj", K * hd, D, (K, hd))
        dense_in_split(lp + ("self_attn", "o_proj"), f"{name}.self_attn.o_proj", D, (N, hd), False)
        for proj, (o, i_) in (("gate_proj", (F, D)), ("up_proj", (F, D)), ("down_proj", (D, F))):
            dense(lp + ("mlp", proj), f"{name}.mlp.{proj}", o, i_, bias=False)
    if cfg.scan_layers:
        per_layer = out[start:]
        del out[start:]
        n_per = len(per_layer) // t.num_layers
        for j in range(n_per):
            e0 = per_layer[j]
            names = tuple(per_layer[j + n_per * i].hf[0] for i in range(t.num_layers))
            path = dp + ("layers",) + e0.path[3:]
            out.append(Entry(path, names, e0.hf_shape, e0.view, e0.perm, stacked=True))
    norm(dp + ("norm",), "model.norm", D, False)
    if not t.tie_word_embeddings:
        dense(dp + ("lm_head",), "lm_head", t.vocab_size, D, bias=False)
    return out


def _normalize_name(name: str) -> str:
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


class _Reader:
    """Lazy, memory-mapped access to the tensors of a checkpoint directory."""

    def __init__(self, path: str):
        from safetensors import safe_open
        self._open = safe_open
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        self.files: dict[str, str] = {}
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map")
            for name, fname in weight_map.items():
                full = os.path.join(path, fname)
                if not os.path.isfile(full):
                    raise CheckpointError(f"{index}: tensor {name} is in {fname}, which is missing")
                self.files[_normalize_name(name)] = (full, name)
        elif os.path.isfile(single):
            with safe_open(single, "np") as f:
                for name in f.keys():
                    self.files[_normalize_name(name)] = (single, name)
        else:
            raise CheckpointError(f"{path}: neither model.safetensors nor "
                                  "model.safetensors.index.json found")
        self._handles: dict[str, Any] = {}

    def _handle(self, fname):
        if fname not in self._handles:
            self._handles[fname] = self._open(fname, "np")
        return self._handles[fname]

    def shape(self, name: str) -> tuple[int, ...]:
        fname, raw = self.files[name]
        return tuple(self._handle(fname).get_slice(raw).get_shape())

    def read(self, name: str, index=None) -> np.ndarray:
        fname, raw = self.files[name]
        sl = self._handle(fname).get_slice(raw)
        return sl[index] if index is not None else sl[:]

    def close(self):
        self._handles.clear()


def _check(reader: _Reader, table: Sequence[Entry], tied: bool, path: str) -> None:
    expected = {n: e.hf_shape for e in table for n in e.hf}
    present = set(reader.files)
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected) - ({"lm_head.weight"} if tied else set()))
    bad = [f"{n}: checkpoint shape {reader.shape(n)}, config expects {expected[n]}"
           for n in sorted(set(expected) & present) if reader.shape(n) != expected[n]]
    msgs = []
    if missing:
        msgs.append(f"missing tensors ({len(missing)}): " + ", ".join(
            f"{n} {expected[n]}" for n in missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if extra:
        msgs.append(f"unexpected tensors ({len(extra)}): " + ", ".join(
            f"{n} {reader.shape(n)}" for n in extra[:20]) + (" ..." if len(extra) > 20 else ""))
    if bad:
        msgs.append("shape mismatches: " + "; ".join(bad[:20]))
    if msgs:
        raise CheckpointError(f"{path}: checkpoint does not match config.json: " + " | ".join(msgs))


def abstract_model(cfg: ModelConfig):
    """(graphdef, abstract state) of ``QwenVL(cfg)`` without allocating parameters."""
    model = nnx.eval_shape(lambda: QwenVL(cfg, nnx.Rngs(0)))
    return nnx.split(model)


def _shardings(state, mesh):
    if mesh is None:
        dev = SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: dev, state)
    return shd.state_shardings(state, mesh)


def _block_reader(reader: _Reader, e: Entry, dtype) -> Callable:
    """Callback ``index -> np.ndarray`` producing one shard of ``e`` in our layout."""
    stacked = e.stacked
    pure_transpose = e.view is None
    cache: dict[str, np.ndarray] = {}

    def one(name, idx):
        if pure_transpose:
            # read only the block: our dim i is HF dim perm[i]
            perm = e.perm or tuple(range(len(e.hf_shape)))
            hf_idx = [slice(None)] * len(e.hf_shape)
            for i, s in enumerate(idx):
                hf_idx[perm[i]] = s
            block = reader.read(name, tuple(hf_idx))
            return block.transpose(perm) if e.perm is not None else block
        if name not in cache:
            cache.clear()
            cache[name] = e.to_ours(reader.read(name))
        return cache[name][tuple(idx)]

    def cb(index):
        index = tuple(index)
        if stacked:
            layers = range(len(e.hf))[index[0]]
            blocks = [one(e.hf[l], index[1:]) for l in layers]
            return np.stack(blocks).astype(dtype)
        return np.asarray(one(e.hf[0], index)).astype(dtype)

    return cb


def load_hf(path: str, *, dtype: str | None = None, param_dtype: str | None = None, mesh=None,
            expect_preset: str | None = None, **runtime) -> QwenVL:
    """Loads a HF Qwen2-VL / Qwen2.5-VL checkpoint directory into a (sharded) ``QwenVL``.

    ``param_dtype``: dtype of the parameters (``'float32'`` / ``'bfloat16'``; default
    float32). ``dtype``: compute dtype of matmuls and activations, as
    ``ModelConfig.dtype`` (default: ``param_dtype``). Other ``runtime`` keys
    (``remat``, ``scan_layers``, ``vision_max_patches``, ``attention``) go to the ModelConfig. With
    a ``mesh`` every parameter is created with its NamedSharding. ``expect_preset``
    (e.g. ``'qwen2.5-vl-7b'``): fail, naming each differing field, unless
    config.json has that preset's architecture.
    """
    if "dtype_compute" in runtime:
        raise TypeError("load_hf: dtype_compute= was renamed; use dtype= for the compute dtype "
                        "and param_dtype= for the parameters (as in ModelConfig)")
    if fsio.is_remote(path):
        if not fsio.isdir(path):
            raise FileNotFoundError(f"{path}: not a directory")
        path = fsio.local_dir(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory")
    param_dtype = param_dtype or "float32"
    cfg = read_hf_config(path, dtype=dtype or param_dtype, param_dtype=param_dtype, **runtime)
    if expect_preset is not None:
        check_preset(cfg, expect_preset)
    reader = _Reader(path)
    table = param_table(cfg)
    _check(reader, table, cfg.text.tie_word_embeddings, path)
    graphdef, state = abstract_model(cfg)
    shardings = _shardings(state, mesh)
    flat = dict(nnx.to_flat_state(state))
    flat_sh = dict(nnx.to_flat_state(shardings)) if mesh is not None else None
    np_dtype = jnp.dtype(param_dtype)
    seen = set()
    for e in table:
        key = e.path
        if key not in flat:
            raise CheckpointError(f"internal: no parameter at {key} for {e.hf[0]}")
        var = flat[key]
        shape = tuple(var.get_value().shape)
        if e.stacked:
            want = (len(e.hf),) + tuple(e.to_ours(np.empty(e.hf_shape, np.int8)).shape)
        else:
            want = tuple(e.to_ours(np.empty(e.hf_shape, np.int8)).shape)
        if want != shape:
            raise CheckpointError(f"internal: {e.hf[0]} maps to {want}, parameter is {shape}")
        sh = flat_sh[key] if flat_sh is not None else SingleDeviceSharding(jax.local_devices()[0])
        if isinstance(sh, nnx.Variable):
            sh = sh.get_value()
        arr = jax.make_array_from_callback(shape, sh, _block_reader(reader, e, np_dtype))
        var.set_value(arr)
        seen.add(key)
    unset = [k for k in flat if k not in seen]
    if unset:
        raise CheckpointError(f"internal: parameters without a checkpoint tensor: {unset[:5]}")
    reader.close()
    state = nnx.from_flat_state(flat)
    return nnx.merge(graphdef, state)


def save_hf(model: QwenVL, path: str, max_shard_bytes: int = 5 * 2 ** 30,
            dtype: str | None = None) -> None:
    """Writes ``config.json`` + safetensors that transformers loads (sharded past
    ``max_shard_bytes``, with ``model.safetensors.index.json``).

    Shards are planned from the parameter shapes and written one at a time, so the
    host holds at most one shard. Every process must call it (sharded parameters are
    gathered); only process 0 writes. ``path`` may be a ``gs://`` URI (``fsio``).
    """
    from safetensors.numpy import save_file
    cfg = model.cfg
    out_dtype = jnp.dtype(dtype or cfg.param_dtype)
    writer = jax.process_index() == 0
    if writer:
        fsio.makedirs(path)
        hf_cfg = to_hf_dict(cfg)
        hf_cfg["dtype"] = str(out_dtype.name)
        fsio.write_text(fsio.join(path, "config.json"), json.dumps(hf_cfg, indent=2))
    # plan: tensor name -> shard number
    plan, size, n = {}, 0, 0
    for e in param_table(cfg):
        nbytes = math.prod(e.hf_shape) * out_dtype.itemsize
        for name in e.hf:
            if size and size + nbytes > max_shard_bytes:
                n, size = n + 1, 0
            plan[name] = n
            size += nbytes
    total_shards = n + 1
    fname = (lambda i: "model.safetensors") if total_shards == 1 else (
        lambda i: f"model-{i + 1:05d}-of-{total_shards:05d}.safetensors")
    meta = {"format": "pt"}

    def write_shard(tensors: dict[str, np.ndarray], i: int) -> None:
        with fsio.staged(fsio.join(path, fname(i))) as tmp:
            save_file(tensors, tmp, metadata=meta)

    current: dict[str, np.ndarray] = {}
    shard, total = 0, 0
    for name, t in hf_tensors(cfg, nnx.state(model, nnx.Param), out_dtype):
        if plan[name] != shard:
            if writer:
                write_shard(current, shard)
            current, shard = {}, plan[name]
        current[name] = t
        total += t.nbytes
    if writer:
        write_shard(current, shard)
        if total_shards > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: fname(v) for k, v in plan.items()}}
            fsio.write_text(fsio.join(path, "model.safetensors.index.json"),
                            json.dumps(index, indent=2))


def hf_tensors(cfg: ModelConfig, state, dtype=None):
    """Yields ``(hf_name, host array in the HF layout)`` for every parameter of ``state``
    (a ``QwenVL`` Param state, or any tree of the same structure such as its gradients)."""
    flat = dict(nnx.to_flat_state(state))
    for e in param_table(cfg):
        value = flat[e.path]
        value = value.get_value() if isinstance(value, nnx.Variable) else value
        host = np.asarray(jax.device_get(_gather(value)))
        if dtype is not None:
            host = host.astype(dtype)
        parts = [host[i] for i in range(len(e.hf))] if e.stacked else [host]
        for name, part in zip(e.hf, parts):
            yield name, np.ascontiguousarray(e.to_hf(part))


def _gather(x: jax.Array) -> jax.Array:
    """A fully replicated (host-fetchable) copy of ``x`` (multi-process safe)."""
    if jax.process_count() == 1 or x.is_fully_replicated:
        return x
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(x, tiled=True)
