"""Random-weight model creation, directly sharded, with small cached init programs.

The modules are only traced abstractly (``nnx.eval_shape``); each parameter is
then produced by a tiny jitted program ``key -> array`` (normal(0.02) / zeros /
ones, per the Param's ``init`` metadata) whose output sharding is the
parameter's NamedSharding. Programs are cached per (shape, dtype, init,
sharding), so a 36-layer model compiles ~15 of them. Keys are ``rbg`` (RngBitGenerator). (One jitted init of the
whole model compiled for over 9 minutes on an H200 for a 3B config.)
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from dipr1_jax import sharding as shd
from dipr1_jax.model.config import ModelConfig
from dipr1_jax.model.layers import INITS
from dipr1_jax.model.qwen_vl import QwenVL


INIT_SCHEMES = ("hf", "fan_in")


@functools.lru_cache(maxsize=None)
def _init_program(shape, dtype, init: str, sharding, std: float = 0.0):
    initializer = jax.nn.initializers.normal(std) if std else INITS[init]
    return jax.jit(lambda key: initializer(key, shape, dtype), out_shardings=sharding)


def create_model(cfg: ModelConfig, seed: int = 0, mesh=None, init: str = "hf") -> QwenVL:
    """``QwenVL(cfg)`` with random weights (unit norms, zero biases); with a ``mesh`` every
    parameter is created directly in its shards.

    ``init``: ``hf`` draws every matrix from normal(0.02) (transformers'
    ``initializer_range``, tuned for widths in the thousands); ``fan_in`` draws the
    ``Dense`` kernels from normal(1 / sqrt(fan_in)) (LeCun), which keeps the signal
    through narrow towers trained from scratch: with normal(0.02) each of the
    ``small`` preset's 64- to 256-wide vision layers shrinks the signal, and the image
    features vary across images by a std of 0.016 (0.53 with ``fan_in``), too little
    for the decoder to pick up (BUILD_NOTES, "The default job"). Embeddings stay
    normal(0.02)."""
    if init not in INIT_SCHEMES:
        raise ValueError(f"create_model: init must be one of {INIT_SCHEMES}, got {init!r}")
    abstract = nnx.eval_shape(lambda: QwenVL(cfg, nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    if mesh is not None:
        sh_flat = dict(nnx.to_flat_state(shd.state_shardings(state, mesh)))
    # RngBitGenerator keys: much cheaper to compile than threefry (and the fast path on TPU)
    base = jax.random.key(seed, impl="rbg")
    for i, (path, var) in enumerate(flat):
        abs_value = var.get_value()
        meta = var.get_metadata()
        kind = meta.get("init", "normal")
        fan_in = meta.get("fan_in", 0)
        std = fan_in ** -0.5 if (init == "fan_in" and kind == "normal" and fan_in) else 0.0
        sharding = sh_flat[path] if mesh is not None else None
        if isinstance(sharding, nnx.Variable):
            sharding = sharding.get_value()
        prog = _init_program(tuple(abs_value.shape), abs_value.dtype, kind, sharding, std)
        var.set_value(prog(jax.random.fold_in(base, i)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
