"""Prints the per-device memory plan (``dipr1_jax.train.memory``) of every variant of
``configs/qwen25vl.py`` on its TARGET mesh, without the target's devices.

    JAX_PLATFORMS=cpu python tools/print_config_plans.py [VARIANT ...] [--summary]
    JAX_PLATFORMS=cpu python tools/print_config_plans.py --write    # + configs/qwen25vl_plans.json
    JAX_PLATFORMS=cpu python tools/print_config_plans.py --check    # recompute, compare, fit

Each config is loaded the way ``python -m dipr1_jax.launch --config=configs/qwen25vl.py:VARIANT``
loads it (``cli.load_config_file``). The mesh is a ``jax.sharding.AbstractMesh`` of the
config's (data, fsdp, tensor) sizes over the target's device count, and the device memory is
the target's (``TARGETS``), so a v4-32 or 8-GPU layout is planned on a laptop. The plan uses
the config's ``model.preset`` (the checkpoint's architecture) instead of reading
``model.checkpoint``, which only exists on the target. ``--summary`` prints the summary
table only.

A plan takes ~10-17 s here (tracing the 3B / 7B forward and backward twice), so
``tests/test_configs.py`` checks the plans stored by ``--write`` (each with the config and
target it was computed for, which must match the config's: ``changes``) and recomputes
one; ``--check`` recomputes all eight (~2 minutes) and fails (status 1) when one differs
from the stored file by more than ``TOLERANCE`` or does not fit its device with
``HEADROOM``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(ROOT, "configs", "qwen25vl.py")
PLANS_FILE = os.path.join(ROOT, "configs", "qwen25vl_plans.json")
# A plan may use at most this share of its device (XLA's own reservations, fragmentation and
# the estimate's error; BUILD_NOTES "Memory plan" measures the estimate against XLA).
HEADROOM = 0.85
TOLERANCE = 0.02  # recomputed vs stored plan total


def config_module():
    """``configs/qwen25vl.py`` as a module (its VARIANTS, TARGETS, LAYOUTS)."""
    spec = importlib.util.spec_from_file_location("_qwen25vl_configs", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(variant: str):
    """The variant's Config, through the launch's loader."""
    from dipr1_jax import cli
    return cli.load_config_file(f"{CONFIG_FILE}:{variant}")


def target_mesh(cfg, devices: int):
    """An AbstractMesh ('data', 'fsdp', 'tensor') of the config's mesh section over
    ``devices`` devices (a -1 axis takes the rest, as ``sharding.make_mesh`` does)."""
    import math

    from jax.sharding import AbstractMesh, AxisType
    from dipr1_jax.sharding import MESH_AXES
    m = cfg.mesh
    n = m.devices or devices
    sizes = [m.data, m.fsdp, m.tensor]
    if -1 in sizes:
        sizes[sizes.index(-1)] = n // math.prod(s for s in sizes if s != -1)
    if math.prod(sizes) != n:
        raise ValueError(f"mesh data*fsdp*tensor = {math.prod(sizes)} != {n} devices")
    return AbstractMesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def target_plans(variant: str):
    """``(cfg, target, [MemoryPlan])`` of ``variant`` on its target."""
    from dipr1_jax.config import replace_path
    from dipr1_jax.train import memory as mem
    module = config_module()
    target = module.TARGETS[variant.split("-", 2)[2]]  # <size>-<mode>-<target>
    cfg = load(variant)
    planned = replace_path(cfg, "model.checkpoint", "")  # the preset: same architecture
    mesh = target_mesh(cfg, target.devices)
    return cfg, target, mem.plans(planned, mesh, device_bytes=target.device_bytes)


def _flat(cfg) -> dict:
    import json

    from dipr1_jax.config import to_dict
    from dipr1_jax.model.config import flatten_dict
    return flatten_dict(json.loads(json.dumps(to_dict(cfg))))


def changes(cfg, target, rec: dict) -> list[str]:
    """How ``cfg`` / ``target`` differ from what the stored plan ``rec`` was computed for
    (empty: the plan is current). A config field added since (absent from ``rec``) counts
    only when its value is not ``Config()``'s default."""
    from dipr1_jax.config import Config
    old, default = rec["config"], _flat(Config())
    out = [f"{k}: {old.get(k, default.get(k))!r} -> {v!r}" for k, v in _flat(cfg).items()
           if old.get(k, default.get(k)) != v]
    if rec["target"] != [target.devices, target.device_bytes]:
        out.append(f"target: {rec['target']} -> {[target.devices, target.device_bytes]}")
    return out


def record(cfg, target, p) -> dict:
    """A plan as stored in ``PLANS_FILE`` (bytes per device), with the flattened config and
    the target it was computed for."""
    return {"config": _flat(cfg), "target": [target.devices, target.device_bytes],
            "kind": p.kind, "devices": p.devices,
            "mesh": p.mesh_shape, "device_bytes": p.device_bytes, "total": p.total,
            "step_total": p.step_total, "params": p.params, "optimizer": p.optimizer,
            "gradients": p.gradients, "reference": p.reference, "held": p.held,
            "batch": p.batch, "activations": p.activations, "kv_cache": p.kv_cache,
            "table": p.format()}


def stored() -> dict:
    import json
    with open(PLANS_FILE, encoding="utf-8") as f:
        return json.load(f)


def main(argv: list[str]) -> int:
    import json

    from dipr1_jax.train import memory as mem
    summary, write, check = ("--summary" in argv, "--write" in argv, "--check" in argv)
    variants = [a for a in argv if not a.startswith("--")] or list(config_module().VARIANTS)
    rows, records, bad = [], {}, []
    old = stored() if check else {}
    for v in variants:
        t0 = time.perf_counter()
        cfg, target, plans = target_plans(v)
        for p in plans:
            rows.append((v, p))
            records[v] = record(cfg, target, p)
            if p.total > HEADROOM * target.device_bytes:
                bad.append(f"{v}: {mem._fmt(p.total)} > {HEADROOM:.0%} of "
                           f"{mem._fmt(target.device_bytes)}")
            if check:
                o = old.get(v)
                if o is None or changes(cfg, target, o) or \
                        abs(p.total / o["total"] - 1) > TOLERANCE:
                    bad.append(f"{v}: stored plan {o and mem._fmt(o['total'])} differs from "
                               f"{mem._fmt(p.total)} (or from the config): rerun with --write")
            if not summary:
                print(f"== {v}  ({target.what}; mesh data={cfg.mesh.data} fsdp={cfg.mesh.fsdp} "
                      f"tensor={cfg.mesh.tensor}; planned in {time.perf_counter() - t0:.1f}s)")
                print(p.format() + "\n", flush=True)
    print("| variant | mesh (data, fsdp, tensor) | batch per data x fsdp shard | activations | "
          "total per device | device | use |")
    print("|---|---|---|---|---|---|---|")
    for v, p in rows:
        s = p.shapes
        shard = p.mesh_shape.get("data", 1) * p.mesh_shape.get("fsdp", 1)
        per_dev = (f"{s.micro_prompts / shard:g} prompt x G={s.group} per micro-batch "
                   f"({s.micro_batches} micro-batches of {s.micro_prompts})"
                   if p.kind == "grpo" else f"{s.prompts / shard:g} example(s)")
        print(f"| {v} | {p.mesh_shape.get('data')}, {p.mesh_shape.get('fsdp')}, "
              f"{p.mesh_shape.get('tensor')} | {per_dev} | {mem._fmt(p.activations)} | "
              f"{mem._fmt(p.total)} | {mem._fmt(p.device_bytes)} | "
              f"{100 * p.total / p.device_bytes:.0f}% |")
    if write:  # the variants planned now replace theirs; the others are kept
        merged = {**(stored() if os.path.isfile(PLANS_FILE) else {}), **records}
        with open(PLANS_FILE, "w", encoding="utf-8") as f:
            json.dump(merged, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"wrote {PLANS_FILE}")
    for line in bad:
        print(f"error: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main(sys.argv[1:]))
