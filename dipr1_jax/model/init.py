"""Random-weight model creation, directly sharded (jit init, no host round trip)."""

from __future__ import annotations

import jax
from flax import nnx

from dipr1_jax import sharding as shd
from dipr1_jax.model.config import ModelConfig
from dipr1_jax.model.qwen_vl import QwenVL


def create_model(cfg: ModelConfig, seed: int = 0, mesh=None) -> QwenVL:
    """``QwenVL(cfg)`` with random weights, created inside one jitted init; with a ``mesh``
    every parameter is produced directly with its NamedSharding as output sharding."""
    abstract = nnx.eval_shape(lambda: QwenVL(cfg, nnx.Rngs(seed)))
    graphdef, abs_state = nnx.split(abstract)

    def init():
        return nnx.state(QwenVL(cfg, nnx.Rngs(seed)))

    # The init program is random-number generation only; on CPU, LLVM's optimisation of
    # the unrolled threefry code costs ~3x the compile time for no run-time benefit.
    opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    if mesh is None:
        state = jax.jit(init, compiler_options=opts)()
    else:
        with jax.set_mesh(mesh):
            state = jax.jit(init, out_shardings=shd.state_shardings(abs_state, mesh),
                            compiler_options=opts)()
    return nnx.merge(graphdef, state)
