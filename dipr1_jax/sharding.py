"""Device mesh and logical-axis sharding rules (DESIGN.md section 6).

One mesh with named axes ``('data', 'fsdp', 'tensor')``. Model code names the
dimensions of parameters and activations with *logical* axes (``'embed'``,
``'mlp'``, ``'heads'``, ``'batch'``, ...); ``RULES`` maps each logical axis to
mesh axes: FSDP over ``fsdp`` for the model width, heads / MLP / vocab over
``tensor``, the batch over ``('data', 'fsdp')``.

A mesh axis is dropped from a dimension whose size it does not divide (e.g.
2 KV heads on a 4-way tensor axis are replicated rather than split), so every
rule set yields a valid sharding for every config; ``describe`` lists such
fallbacks.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis / axes / None (replicated)
RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vision_images", ("data", "fsdp")),
    ("vision_tokens", None),
    # decoder parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    # vision parameters
    ("patch", None),
    ("v_embed", "fsdp"),
    ("v_mlp", "tensor"),
    ("v_heads", "tensor"),
    ("qkv", None),
    ("merge_in", "fsdp"),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``('data', 'fsdp', 'tensor')`` mesh with Auto axis types.

    One of the sizes may be -1: it takes the remaining devices.
    """
    devices = list(devices) if devices is not None else jax.devices()
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one axis size may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"make_mesh: axis sizes must be >= 1 or -1, got {sizes}")
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"make_mesh: {len(devices)} devices not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"make_mesh: data*fsdp*tensor = {math.prod(sizes)} "
                         f"but {len(devices)} devices are available")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def _rule_table(rules) -> dict:
    return dict(RULES if rules is None else rules)


def logical_to_spec(axes: Iterable[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules=None) -> P:
    """PartitionSpec of logical ``axes``; with ``shape`` and ``mesh``, mesh axes that do not
    divide a dimension (or are already used by an earlier dimension) are dropped."""
    table = _rule_table(rules)
    used: set[str] = set()
    out = []
    axes = tuple(axes)
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        cands = (target,) if isinstance(target, str) else tuple(target)
        keep = []
        size = 1
        for ax in cands:
            if ax in used:
                continue
            if mesh is not None:
                if ax not in mesh.shape:
                    continue
                n = mesh.shape[ax]
                if shape is not None and shape[i] % (size * n):
                    continue
                size *= n
            keep.append(ax)
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


def current_mesh() -> Mesh | None:
    """The mesh set with ``jax.set_mesh`` (None when unset or empty)."""
    m = jax.sharding.get_abstract_mesh()
    if m is None or m.empty:
        return None
    return m


def constrain(x: jax.Array, axes: Sequence[str | None], rules=None) -> jax.Array:
    """``with_sharding_constraint`` by logical axes when a mesh is set; identity otherwise."""
    mesh = current_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, spec)


def _var_axes(var) -> tuple | None:
    try:
        return var.get_metadata().get("logical_axes")
    except AttributeError:
        return None


def state_specs(state, mesh: Mesh | None = None, rules=None):
    """PartitionSpec tree of an ``nnx.State`` whose Params carry ``logical_axes`` metadata.

    Variables without the metadata are replicated. A leading stacked-layer axis
    (``nnx.scan`` models) is matched as ``'layers'``.
    """
    from flax import nnx

    def spec(var):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        shape = tuple(value.shape)
        axes = _var_axes(var) if isinstance(var, nnx.Variable) else None
        if axes is None:
            return P()
        axes = tuple(axes)
        if len(axes) == len(shape) - 1:
            axes = ("layers",) + axes
        if len(axes) != len(shape):
            raise ValueError(f"logical axes {axes} do not match parameter shape {shape}")
        return logical_to_spec(axes, shape, mesh, rules)

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state, mesh: Mesh, rules=None):
    """NamedSharding tree matching ``state`` (see ``state_specs``)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state, mesh, rules),
                        is_leaf=lambda x: isinstance(x, P))


def describe(state, mesh: Mesh, rules=None) -> list[str]:
    """One line per parameter: path, shape, logical axes and the resulting spec."""
    from flax import nnx
    lines = []
    specs = state_specs(state, mesh, rules)
    for (path, var), (_, spec) in zip(nnx.to_flat_state(state), nnx.to_flat_state(specs)):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        lines.append(f"{'/'.join(map(str, path))} {tuple(value.shape)} "
                     f"{_var_axes(var) if isinstance(var, nnx.Variable) else None} -> {spec}")
    return lines


def shard_host_array(x: np.ndarray, mesh: Mesh, axes: Sequence[str | None], rules=None):
    """Places a host array (same value on every process) onto ``mesh`` by logical axes."""
    spec = logical_to_spec(axes, x.shape, mesh, rules)
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
