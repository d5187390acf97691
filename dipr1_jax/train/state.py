"""Train state: the policy split into trainable and frozen parameters, optax AdamW, shardings.

The model is split once (``nnx.split``) into a static graph definition and two
parameter groups, ``visual`` (the vision tower) and ``text`` (everything
else). ``freeze_vision`` moves ``visual`` out of the trainable set: it then
gets no gradient and no optimizer state. Step functions are pure: they take
``TrainState`` (donated), the frozen parameters and a batch, and return a new
state; the model object is rebuilt inside with ``nnx.merge``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dipr1_jax import sharding as shd
from dipr1_jax.config import MeshSection, OptimSection


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: Any  # {"visual": nnx.State, "text": nnx.State} minus the frozen groups
    opt_state: Any


class Policy(NamedTuple):
    """A model as ``graphdef`` + parameter groups (``{"visual": ..., "text": ...}``)."""

    graphdef: Any
    groups: dict

    @staticmethod
    def from_model(model) -> "Policy":
        graphdef, visual, text = nnx.split(model, nnx.PathContains("visual"), ...)
        return Policy(graphdef, {"visual": visual, "text": text})

    def split(self, freeze_vision: bool) -> tuple[dict, dict]:
        """``(trainable, frozen)`` parameter groups."""
        if freeze_vision:
            return {"text": self.groups["text"]}, {"visual": self.groups["visual"]}
        return dict(self.groups), {}


def merge(graphdef, trainable: dict, frozen: dict):
    """The ``QwenVL`` of a graph definition and its parameter groups."""
    groups = {**frozen, **trainable}
    return nnx.merge(graphdef, groups["visual"], groups["text"])


def make_optimizer(cfg: OptimSection, total_steps: int) -> optax.GradientTransformation:
    """AdamW, linear warmup from lr / (warmup + 1) then cosine decay to ``end_lr_ratio``."""
    lr = cfg.learning_rate
    warmup = cfg.warmup_steps
    decay = max(total_steps, warmup + 1)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=lr / (warmup + 1), peak_value=lr, warmup_steps=warmup, decay_steps=decay,
        end_value=lr * cfg.end_lr_ratio)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    return optax.chain(*parts), schedule


def keep_if_finite(loss, grad_norm, state: "TrainState", params, opt_state):
    """The non-finite guard of both steps: ``(params, opt_state, skipped)`` where a step
    whose loss or gradient norm is not finite keeps the previous parameters and optimizer
    state (``skipped`` = 1.0; the step still counts)."""
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    pick = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    return (jax.tree.map(pick, params, state.params), jax.tree.map(pick, opt_state, state.opt_state),
            1.0 - ok.astype(jnp.float32))


def build_mesh(cfg: MeshSection):
    """The device mesh of the config, or None on a single device."""
    devices = jax.devices()
    if cfg.devices:
        if cfg.devices > len(devices):
            raise ValueError(f"mesh.devices={cfg.devices} but only {len(devices)} devices exist")
        devices = devices[:cfg.devices]
    if len(devices) == 1:
        return None
    mesh = shd.make_mesh(cfg.data, cfg.fsdp, cfg.tensor, devices=devices)
    if jax.process_count() > 1:
        from dipr1_jax import multihost
        if not multihost.process_major(mesh):
            # Each process feeds the batch rows its own devices hold: keep every process's
            # devices together along the batch axes (the topology-aware order of
            # jax.make_mesh may interleave hosts there).
            order = sorted(devices, key=lambda d: (d.process_index, d.id))
            mesh = jax.sharding.Mesh(np.asarray(order).reshape(mesh.devices.shape),
                                     mesh.axis_names, axis_types=mesh.axis_types)
            if not multihost.process_major(mesh):
                logging.warning("mesh %s: a process's devices span several batch shards "
                                "(tensor axis across hosts?); batches are gathered on every "
                                "host instead of read as disjoint shards", dict(mesh.shape))
    return mesh


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


class HashableTree:
    """A pytree of shardings usable as an ``lru_cache`` key (by structure and leaves)."""

    def __init__(self, tree):
        self.tree = tree
        leaves, treedef = jax.tree.flatten(tree)
        self._key = (treedef, tuple(leaves))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, HashableTree) and self._key == other._key


def hashable_shardings(tree) -> HashableTree:
    return HashableTree(shardings_of(tree))


def opt_state_shardings(optimizer: optax.GradientTransformation, trainable, mesh):
    """Shardings of ``optimizer.init(trainable)``: every parameter-shaped leaf (AdamW's
    ``mu`` / ``nu``) sharded like its parameter, everything else (counts) replicated.
    ``trainable`` may hold arrays or ShapeDtypeStructs with shardings."""
    rep = NamedSharding(mesh, P())

    def param_sharding(x):
        s = getattr(x, "sharding", None)
        return s if isinstance(s, NamedSharding) and s.mesh == mesh else rep

    abstract = jax.eval_shape(optimizer.init, trainable)
    return optax.tree_map_params(optimizer, lambda _, p: param_sharding(p), abstract,
                                 trainable, transform_non_params=lambda _: rep)


def init_state(trainable: dict, optimizer: optax.GradientTransformation, mesh=None) -> TrainState:
    """A step-0 state; optimizer moments take the parameters' shardings (so FSDP shards
    AdamW's state too), scalars (step, optimizer counts) are replicated over the mesh."""
    if mesh is None:
        return TrainState(jnp.zeros((), jnp.int32), trainable, jax.jit(optimizer.init)(trainable))
    rep = NamedSharding(mesh, P())
    opt_state = jax.jit(optimizer.init, out_shardings=opt_state_shardings(
        optimizer, trainable, mesh))(trainable)
    state = TrainState(jnp.zeros((), jnp.int32), trainable, opt_state)
    return jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        else jax.device_put(x, rep), state)


def put_batch(tree: dict, mesh, batch_axis: int = 0, pad_id: int = 0) -> dict:
    """Host arrays onto the mesh: the prompt axis (``batch_axis``) split over
    ``('data', 'fsdp')`` when it divides, everything else replicated.

    On several processes ``tree`` holds this process's rows only and the global
    arrays are assembled from every process's part (``multihost.to_global``;
    ``pad_id`` fills token arrays raised to the longest process's length)."""
    from dipr1_jax import multihost

    if multihost.is_multi():
        return multihost.to_global(tree, mesh, batch_axis=batch_axis, local=True,
                                   pad_values={"input_ids": pad_id, "completion": pad_id})
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    out = {}
    for key, value in tree.items():
        value = np.asarray(value)
        axes = [None] * value.ndim
        if key != "pixel_values" and value.ndim > batch_axis:
            axes[batch_axis] = "batch"
        spec = shd.logical_to_spec(tuple(axes), value.shape, mesh)
        out[key] = jax.device_put(value, NamedSharding(mesh, spec))
    return out


def replicated(mesh):
    return None if mesh is None else NamedSharding(mesh, P())
