"""Checkpoint cost: save and restore the SFT train state of a preset, and the overhead of
checkpointing every N steps on a step's time, all measured in this run.

    python benchmarks/checkpoint_bench.py [--preset bench-100m --every 50 --repeats 3 --steps 6]

Workload: the real ``TrainState`` the SFT loop checkpoints (trainable parameters and
AdamW state, float32) of ``--preset`` and the loop's ``Checkpointer``
(``dipr1_jax/train/checkpoint.py``: orbax, asynchronous). Timed, median of
``--repeats``:

  * save, blocking part: what the training loop waits for (device -> host copy);
  * save, total: until the checkpoint is complete on disk;
  * restore: the newest checkpoint back onto the live state's shardings;
  * one SFT step of the preset (``--batch`` examples, the default job's image size):
    the fastest of ``--steps`` (early steps compile a program per bucketed shape);

and printed as ratios: the loop's overhead of a save every ``--every`` steps is
blocking / (every x step) (the background write overlaps the following steps).
The machine is shared: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench-100m")
    ap.add_argument("--every", type=int, default=50, help="checkpoint.every for the overhead")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2, help="SFT examples per timed step")
    ap.add_argument("--steps", type=int, default=6, help="SFT steps run (the fastest is used)")
    a = ap.parse_args()

    import jax
    import numpy as np

    from dipr1_jax.config import Config, replace_path
    from dipr1_jax.train import modes
    from dipr1_jax.train import state as st
    from dipr1_jax.train.checkpoint import Checkpointer
    from dipr1_jax.train.loop import SFTLoop

    cfg = Config(mode="sft")
    for path, value in (("model.preset", a.preset), ("mesh.devices", 1),
                        ("sft.batch_size", a.batch), ("log.memory_plan", False),
                        ("log.tensorboard", False)):
        cfg = replace_path(cfg, path, value)
    work = tempfile.mkdtemp(prefix="ckpt_bench_")
    run, model = modes._prepare(cfg, os.path.join(work, "run"))
    loop = SFTLoop(run, model)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(loop.state))
    print(f"{a.preset}: train state {nbytes / 2**20:.1f} MiB "
          f"({sum(x.size for x in jax.tree.leaves(loop.state.params)) / 1e6:.1f}M params + AdamW)",
          flush=True)

    # SFT steps: the fastest of --steps (the first steps compile one program per
    # bucketed batch shape, so neither the first nor the median is a plain step).
    steps = []
    for i in range(a.steps):
        t0 = time.perf_counter()
        loop.train(steps=loop.step + 1)
        steps.append(time.perf_counter() - t0)
    step_s = min(steps)

    blocking, total, restore = [], [], []
    for i in range(a.repeats):
        ck = Checkpointer(os.path.join(work, f"ck{i}"), every=a.every, keep=1)
        t0 = time.perf_counter()
        ck.save(loop.state, loop._extra())
        t1 = time.perf_counter()
        ck.wait()
        t2 = time.perf_counter()
        blocking.append(t1 - t0)
        total.append(t2 - t0)
        fresh = Checkpointer(os.path.join(work, f"ck{i}"), every=a.every, keep=1)
        t0 = time.perf_counter()
        got = fresh.restore(loop.state)
        jax.block_until_ready(got[0])
        restore.append(time.perf_counter() - t0)
        ok = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(loop.state),
                                                       jax.tree.leaves(got[0])))
        assert ok, "restored state differs"
        ck.close()
        fresh.close()
    b, t, r = (statistics.median(x) for x in (blocking, total, restore))
    print(f"SFT step ({a.batch} examples): {step_s:.3f} s (fastest of {a.steps}: "
          f"{', '.join(f'{x:.1f}' for x in steps)} s)")
    print(f"save, blocking: {b:.3f} s = {b / step_s:.2f} steps")
    print(f"save, total:    {t:.3f} s = {t / step_s:.2f} steps "
          f"({nbytes / 2**20 / t:.0f} MiB/s)")
    print(f"restore:        {r:.3f} s = {r / step_s:.2f} steps (bitwise equal: {ok})")
    print(f"overhead of checkpoint.every={a.every}: blocking / ({a.every} x step) = "
          f"{100 * b / (a.every * step_s):.2f}% of training time")


if __name__ == "__main__":
    main()
