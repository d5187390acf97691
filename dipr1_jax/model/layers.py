"""Small NNX building blocks with logical-axis metadata on every parameter.

Each ``nnx.Param`` carries ``logical_axes`` (one name per dimension); the rules
in ``dipr1_jax.sharding`` turn them into PartitionSpecs. Matmuls run in the
compute ``dtype``; normalisations and rotary embeddings in float32.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dipr1_jax.sharding import constrain

_INIT = jax.nn.initializers.normal(stddev=0.02)


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


INITS = {"normal": _INIT, "zeros": jax.nn.initializers.zeros, "ones": jax.nn.initializers.ones}


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str | None], dtype,
          init: str = "normal", fan_in: int = 0) -> nnx.Param:
    """A Param with ``logical_axes`` and ``init`` (name in ``INITS``) metadata; the latter lets
    ``create_model`` re-create it shard by shard without tracing the modules. ``fan_in``
    (matrices of ``Dense``): inputs per output, for ``create_model(init="fan_in")``."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    shape = tuple(int(s) for s in shape)
    key = rngs.params() if init == "normal" else None
    value = INITS[init](key, shape, dtype)
    return nnx.Param(value, logical_axes=tuple(axes), init=init, fan_in=int(fan_in))


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` with a multi-dimensional kernel ``[*in_shape, *out_shape]``."""

    def __init__(self, in_shape, out_shape, in_axes, out_axes, *, bias: bool, dtype: str,
                 param_dtype: str, rngs: nnx.Rngs):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        pd = _dtype(param_dtype)
        self.n_in = len(in_shape)
        self.dtype = _dtype(dtype)
        self.kernel = param(rngs, in_shape + out_shape, tuple(in_axes) + tuple(out_axes), pd,
                            fan_in=math.prod(in_shape))
        self.bias = param(rngs, out_shape, out_axes, pd, "zeros") if bias else None

    def __call__(self, x):
        k = self.kernel[...].astype(self.dtype)
        y = jnp.tensordot(x.astype(self.dtype), k, axes=self.n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """Qwen RMSNorm: normalise in float32, cast back, multiply by the weight."""

    def __init__(self, dim: int, eps: float, *, dtype: str, param_dtype: str):
        self.eps = eps
        self.dtype = _dtype(dtype)
        self.scale = param(None, (dim,), ("norm",), _dtype(param_dtype), "ones")

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(self.dtype) * y.astype(self.dtype)).astype(self.dtype)


class LayerNorm(nnx.Module):
    """torch ``LayerNorm`` (Qwen2-VL vision): float32 statistics, weight and bias."""

    def __init__(self, dim: int, eps: float, *, dtype: str, param_dtype: str):
        self.eps = eps
        self.dtype = _dtype(dtype)
        pd = _dtype(param_dtype)
        self.scale = param(None, (dim,), ("norm",), pd, "ones")
        self.bias = param(None, (dim,), ("norm",), pd, "zeros")

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def make_norm(kind: str, dim: int, eps: float, dtype: str, param_dtype: str):
    cls = RMSNorm if kind == "rms" else LayerNorm
    return cls(dim, eps, dtype=dtype, param_dtype=param_dtype)


def activation(name: str):
    if name == "silu":
        return jax.nn.silu
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unsupported activation {name!r}")


class GatedMLP(nnx.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, dim, hidden, *, act, bias, axes=("embed", "mlp"), act_axes=None,
                 dtype, param_dtype, rngs):
        e, m = axes
        kw = dict(bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Dense((dim,), (hidden,), (e,), (m,), **kw)
        self.up_proj = Dense((dim,), (hidden,), (e,), (m,), **kw)
        self.down_proj = Dense((hidden,), (dim,), (m,), (e,), **kw)
        self.act = act
        self.act_axes = act_axes

    def __call__(self, x):
        h = activation(self.act)(self.gate_proj(x)) * self.up_proj(x)
        if self.act_axes is not None:
            h = constrain(h, self.act_axes)
        return self.down_proj(h)


class MLP(nnx.Module):
    """Qwen2-VL vision MLP: ``fc2(act(fc1(x)))``."""

    def __init__(self, dim, hidden, *, act, axes, dtype, param_dtype, rngs):
        e, m = axes
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense((dim,), (hidden,), (e,), (m,), **kw)
        self.fc2 = Dense((hidden,), (dim,), (m,), (e,), **kw)
        self.act = act

    def __call__(self, x):
        return self.fc2(activation(self.act)(self.fc1(x)))


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """``x * cos + rotate_half(x) * sin`` in float32; cos/sin broadcast over heads
    (``x`` is ``[..., T, heads, head_dim]``, cos/sin ``[..., T, head_dim]``)."""
    x32 = x.astype(jnp.float32)
    c, s = cos[..., None, :], sin[..., None, :]
    return (x32 * c + rotate_half(x32) * s).astype(x.dtype)


def remat_call(fn, policy):
    """``fn(module, x, *rest)`` rematerialised under ``jax.checkpoint(policy)``; ``fn``
    itself when ``policy`` is None. Functional: the module is split, and its state passed
    in and merged inside, nothing written back (``nnx.remat`` writes the state back, which
    fails for parameters from an outer trace: the frozen vision tower of a train step, the
    model closed over by the sampler's decode loop). ``rest`` (masks, rotary tables, the
    KV cache, Python ints) is closed over."""
    if policy is None:
        return fn

    def call(module, x, *rest):
        graphdef, state = nnx.split(module)
        return jax.checkpoint(lambda st, h: fn(nnx.merge(graphdef, st), h, *rest),
                              policy=policy)(state, x)
    return call


def remat_policy(name: str):
    """jax.checkpoint policy by name (None = no remat)."""
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "dots":
        return jax.checkpoint_policies.checkpoint_dots
    if name == "dots_no_batch":
        return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    if name == "save_block_outputs":
        return jax.checkpoint_policies.save_only_these_names("block_out")
    raise ValueError(f"unknown remat policy {name!r}")
