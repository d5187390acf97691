"""Vision-tower forward time: window-blocked vs dense masked windowed blocks.

For the vision towers of the ``tiny`` (56 px window = 2x2 merge units, 16-patch slots)
and ``bench-100m`` (112 px window = 4x4 units, 64-patch slots, 3 of 4 blocks windowed)
presets, random weights, one square image per grid size in the per-image layout
(``vision_max_patches`` = the image's patch count, as training and the sampler use it),
times the jitted forward (compile excluded; best of ``--reps``) with
``window_impl="masked"`` (dense ``P x P`` scores with a window mask, the implementation
before window slots) and ``"blocked"`` (window slots), and prints the ratio
masked / blocked (> 1: blocked faster) and the largest output difference. The
full-attention blocks are dense in both; ``--all-windowed`` makes every block windowed
to show the gain per windowed block (Qwen2.5-VL has 28 windowed blocks of 32).

    JAX_PLATFORMS=cpu python benchmarks/vision_bench.py [--grids 32 48 64] [--reps 3]
        [--presets tiny bench-100m] [--all-windowed]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from dipr1_jax.model import VisionTower, preset  # noqa: E402


def time_forward(tower, pix, grid, reps: int):
    graphdef, state = nnx.split(tower)
    f = jax.jit(lambda s, p, g: nnx.merge(graphdef, s)(p, g))
    t0 = time.perf_counter()
    out = jax.block_until_ready(f(state, pix, grid))
    compile_s = time.perf_counter() - t0
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(state, pix, grid))
        best = min(best, time.perf_counter() - t0)
    return best, compile_s, np.asarray(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "bench-100m"])
    ap.add_argument("--grids", nargs="+", type=int, default=[32, 48, 64],
                    help="square image sizes in patches (multiples of 2)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--all-windowed", action="store_true",
                    help="no full-attention blocks (fullatt_block_indexes=()): the per-block "
                         "gain of the windowed blocks alone")
    args = ap.parse_args(argv)
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s), "
          f"{os.cpu_count()} CPUs")
    head = (f"{'preset':<11} {'grid':>6} {'patches':>7} {'slots':>5} {'masked ms':>10} "
            f"{'blocked ms':>10} {'ratio':>6} {'max|diff|':>9}  compile s (masked/blocked)")
    print(head)
    print("-" * len(head))
    for name in args.presets:
        base = preset(name)
        for g in args.grids:
            p = g * g
            cfg = dataclasses.replace(base, vision_max_patches=p)
            if args.all_windowed:
                cfg = dataclasses.replace(cfg, vision=dataclasses.replace(
                    cfg.vision, fullatt_block_indexes=()))
            rng = np.random.default_rng(0)
            pix = jnp.asarray(rng.standard_normal((p, cfg.vision.patch_dim)), jnp.float32)
            grid = jnp.asarray([[1, g, g]], jnp.int32)
            res = {}
            for impl in ("masked", "blocked"):
                tower = VisionTower(cfg, nnx.Rngs(0), window_impl=impl)
                res[impl] = time_forward(tower, pix, grid, args.reps)
            slots = VisionTower(cfg, nnx.Rngs(0)).num_window_slots(p, 1)
            (tm, cm, om), (tb, cb, ob) = res["masked"], res["blocked"]
            diff = float(np.abs(om - ob).max())
            print(f"{name:<11} {g:>3}x{g:<2} {p:>7} {slots:>5} {tm * 1e3:>10.1f} "
                  f"{tb * 1e3:>10.1f} {tm / tb:>6.2f} {diff:>9.1e}  {cm:.1f}/{cb:.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
