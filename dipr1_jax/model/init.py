"""Random-weight model creation, directly sharded (jit init, no host round trip)."""

from __future__ import annotations

import jax
from flax import nnx

from dipr1_jax import sharding as shd
from dipr1_jax.model.config import ModelConfig
from dipr1_jax.model.qwen_vl import QwenVL


def create_model(cfg: ModelConfig, seed: int = 0, mesh=None) -> QwenVL:
    """``QwenVL(cfg)`` with random weights; with a ``mesh`` every parameter is created
    inside one jitted init with its NamedSharding as output sharding."""
    if mesh is None:
        return QwenVL(cfg, nnx.Rngs(seed))
    abstract = nnx.eval_shape(lambda: QwenVL(cfg, nnx.Rngs(seed)))
    graphdef, abs_state = nnx.split(abstract)
    shardings = shd.state_shardings(abs_state, mesh)

    def init():
        return nnx.state(QwenVL(cfg, nnx.Rngs(seed)))

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
