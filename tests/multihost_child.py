"""A launch process for tests/test_multihost.py: ``python tests/multihost_child.py DEVICES
[launch flags]`` runs ``python -m dipr1_jax.launch`` on DEVICES simulated CPU devices with
a stand-in reward, so that GRPO from a random-init policy gets non-zero advantages.

The stand-in reward is a fixed function of the completion text (its characters' code sum
mod 7, over 7): deterministic, different within groups, and the same whichever process
scores a completion. The real rewards give a random-init policy nothing (no completion
has the format), and a GRPO update from zero advantages only moves the parameters by
Adam-normalised noise, which cannot show two runs agree.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(sys.argv[1])}"
sys.argv = [sys.argv[0]] + sys.argv[2:]

import numpy as np  # noqa: E402

import dipr1_jax.train.loop as loop  # noqa: E402
from dipr1_jax import launch  # noqa: E402
from dipr1_jax.train.evaluate import REWARD_KEYS  # noqa: E402


def text_reward(texts, batch, group_size, cfg):
    r = np.array([(sum(map(ord, t)) % 7) / 7.0 for t in texts], np.float64)
    r = r.reshape(-1, group_size)
    return {k: r if k in ("total", "format") else np.zeros_like(r) for k in REWARD_KEYS}


loop.score_completions = text_reward



def preemption_probe(coordinator: str, process_id: int, marker: str) -> None:
    """``... DEVICES preemption HOST:PORT ID MARKER``: two processes step in lockstep (a
    cross-process sum per step) under ``checkpoint.Preemption``, as the loops do; each
    writes ``MARKER`` once it has started, and prints the step it stopped after."""
    import time

    import jax
    from jax.experimental import multihost_utils

    from dipr1_jax import multihost
    from dipr1_jax.train.checkpoint import Preemption

    multihost.initialize("on", coordinator, 2, process_id)
    with Preemption() as pre:
        for step in range(1, 400):
            multihost_utils.process_allgather(np.int32(step))  # keeps the processes in step
            time.sleep(0.05)
            if step == 3:
                open(marker, "w").close()
            if pre.should_stop(step):
                print(f"stopped after step {step} (synced {pre._synced})", flush=True)
                return
    print("never stopped", flush=True)


def to_global_probe(coordinator: str, process_id: int) -> None:
    """``... 4 to_global HOST:PORT ID``: each process passes its own rows (different
    lengths, patch counts and box counts per process) to ``multihost.to_global`` on
    several mesh layouts, and prints (JSON) what every process then sees of the global
    arrays."""
    import json

    from dipr1_jax import multihost
    from dipr1_jax.config import MeshSection
    from dipr1_jax.train import state as st

    multihost.initialize("on", coordinator, 2, process_id)
    p = process_id
    T, K = 3 + 2 * p, 1 + p  # prompt length and boxes differ per process
    ids = np.arange(4 * T, dtype=np.int32).reshape(4, T) + 1000 * p
    mask = np.ones((4, T), np.int32)
    grid = np.array([[1, 1, 1 + p]] * 4, np.int32)  # 4 patches on process 0, 8 on 1
    pv = (np.arange(int(grid.prod(-1).sum()), dtype=np.float32)[:, None] + 100 * p) * [1, -1]
    boxes = np.full((4, K, 4), p + 1.0, np.float32)
    out = {}
    for layout in [(1, 8, 1), (2, 2, 2), (1, 1, 8)]:
        mesh = st.build_mesh(MeshSection(*layout))
        g = multihost.to_global({"input_ids": ids, "attention_mask": mask, "gt_boxes": boxes,
                                 "pixel_values": pv, "image_grid_thw": grid}, mesh,
                                pad_values={"input_ids": -1})
        out[str(layout)] = {k: multihost.to_host(v, local=False).tolist() for k, v in g.items()}
        out[str(layout)]["mine"] = multihost.to_host(g["input_ids"], local=True).tolist()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["preemption"]:
        preemption_probe(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif sys.argv[1:2] == ["to_global"]:
        to_global_probe(sys.argv[2], int(sys.argv[3]))
    else:
        launch.run()
