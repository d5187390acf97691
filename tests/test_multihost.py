"""Multi-host data parallelism (issue 10 item 5): 2 processes x 4 CPU devices on loopback
(``jax.distributed`` over gloo) train exactly what 1 process x 8 devices trains.

Both runs are real ``dipr1_jax.launch`` processes (``tests/multihost_child.py``: GRPO from
a random-init tiny policy with a stand-in text reward, so the updates are real). Each of
the two processes reads its own half of every batch, scores its own rollouts, and builds
the global arrays from its part; the losses, rewards and final parameters must match the
single process's, only process 0 writes the logs, and the checkpoint both processes wrote
restores to the final parameters.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dipr1_jax.train.writers import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, "tests", "multihost_child.py")

# Data parallel over the 8 devices (the processes' axis on a pod). Global batch 16 prompts
# x G 2 in micro-batches of 8 prompts (each process gives 4 to each micro-batch), 3 GRPO
# steps, checkpoints at steps 2 and 3.
FLAGS = [
    "--config.mode=grpo", "--config.model.preset=tiny", "--config.train.steps=3",
    "--config.mesh.data=8", "--config.mesh.fsdp=1",
    "--config.train.batch_size=16", "--config.train.micro_batch_size=8",
    "--config.grpo.group_size=2", "--config.rollout.max_new_tokens=8",
    "--config.rollout.temperature=1.0", "--config.grpo.beta=0.04",
    "--config.train.optim.warmup_steps=0", "--config.eval.batch_size=8",
    "--config.data.synthetic_eval_size=8", "--config.eval.num_draw=1",
    "--config.data.synthetic_width=112", "--config.data.synthetic_height=84",
    "--config.data.synthetic_max_people=1", "--config.log.samples_every=1",
    "--config.log.memory_plan=false", "--config.checkpoint.every=2",
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return {**env, "PYTHONPATH": ROOT}


def _spawn(devices: int, workdir: str, extra=(), log=None):
    return subprocess.Popen([sys.executable, CHILD, str(devices), *FLAGS, *extra,
                             f"--workdir={workdir}"], cwd=ROOT, env=_env(), text=True,
                            stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT)


def _run_two(workdir: str, tmp, extra=(), timeout=900):
    port = _port()
    logs = [open(os.path.join(tmp, f"proc{p}.log"), "w+") for p in range(2)]
    procs = [_spawn(4, workdir, [f"--coordinator_address=127.0.0.1:{port}",
                                 "--num_processes=2", f"--process_id={p}", *extra], logs[p])
             for p in range(2)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = []
    for f in logs:
        f.seek(0)
        out.append(f.read())
        f.close()
    return codes, out


def _params(export_dir: str) -> dict:
    from safetensors.numpy import load_file
    out = {}
    for name in sorted(os.listdir(export_dir)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(export_dir, name)))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one = str(tmp_path_factory.mktemp("one_by_eight"))
    two = str(tmp_path_factory.mktemp("two_by_four"))
    logs = str(tmp_path_factory.mktemp("logs"))
    # The reference runs while the two processes start (the machine has 2 cores).
    ref = _spawn(8, one)
    codes, outs = _run_two(two, logs)
    ref_out, _ = ref.communicate(timeout=900)
    assert ref.returncode == 0, ref_out[-4000:]
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outs)
    return one, two, outs


def _steps(workdir):
    return [r for r in read_metrics(workdir) if r.get("kind") == "grpo"]


def test_two_processes_train_what_one_process_trains(runs):
    one, two, _ = runs
    a, b = _steps(one), _steps(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        # Same prompts, same rollout keys -> the same completions and rewards ...
        for k in ("reward", "reward/format", "completion_len", "adv_std", "zero_std_groups"):
            assert x[k] == y[k], (x["step"], k, x[k], y[k])
        assert x["adv_std"] > 0.1  # the stand-in reward gives real advantages
        # ... and the same loss and gradient up to float summation order (the micro-
        # batches hold other rows: process 0's and process 1's halves of each).
        for k in ("loss", "grad_norm", "kl"):
            np.testing.assert_allclose(y[k], x[k], rtol=2e-4, atol=1e-7, err_msg=k)
        assert x["grad_norm"] > 1e-3
    assert b[-1]["kl"] > 0  # the policy moved away from its reference
    pa, pb = _params(os.path.join(one, "export")), _params(os.path.join(two, "export"))
    assert pa.keys() == pb.keys() and len(pa) > 10
    for k in pa:
        np.testing.assert_allclose(pb[k], pa[k], rtol=0, atol=2e-5, err_msg=k)


def test_only_process_zero_writes_and_both_checkpoint(runs):
    one, two, outs = runs
    assert "jax.distributed: process 1 of 2" in outs[1]
    # One line per step and evaluation, as the single process wrote.
    kinds = lambda w: [(r.get("kind"), r.get("step")) for r in read_metrics(w)]  # noqa: E731
    assert kinds(two) == kinds(one)
    samples = [json.loads(line)["step"] for line in open(os.path.join(two, "samples.jsonl"))]
    ref = [json.loads(line)["step"] for line in open(os.path.join(one, "samples.jsonl"))]
    assert samples == ref
    # The checkpoint both processes wrote holds the single process's final state
    # (restored here onto one device: the 2-process one has other device ids).
    import orbax.checkpoint as ocp
    from jax.sharding import SingleDeviceSharding
    target = None
    trees = []
    for w in (one, two):
        with ocp.CheckpointManager(os.path.join(w, "checkpoints"),
                                   item_names=("state", "extra")) as m:
            assert m.all_steps() == [2, 3]
            r = m.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                     extra=ocp.args.JsonRestore()))
        if target is None:
            dev = SingleDeviceSharding(jax.devices()[0])
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                                  r.state)
        trees.append((jax.tree.map(np.asarray, r.state), r.extra))
    (sa, ea), (sb, eb) = trees
    assert ea["data"] == eb["data"] and ea["dropped_groups"] == eb["dropped_groups"] == 0
    la, lb = jax.tree.leaves(sa), jax.tree.leaves(sb)
    assert len(la) == len(lb) > 10
    for x, y in zip(la, lb):
        np.testing.assert_allclose(y, x, rtol=0, atol=2e-5)


def test_sigterm_on_one_process_stops_both_after_the_same_step(tmp_path):
    """JAX's preemption sync point (not a Python handler, which would hide SIGTERM from it)
    makes every process stop after the same step when one of them is told to stop."""
    port = _port()
    markers = [str(tmp_path / f"started{p}") for p in range(2)]
    procs = [subprocess.Popen([sys.executable, CHILD, "4", "preemption", f"127.0.0.1:{port}",
                               str(p), markers[p]], cwd=ROOT, env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for p in range(2)]
    try:
        t0 = time.time()
        while not all(os.path.exists(m) for m in markers):
            assert time.time() - t0 < 120 and all(p.poll() is None for p in procs), \
                [p.communicate()[0][-2000:] for p in procs if p.poll() is not None]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    stops = [[line for line in o.splitlines() if line.startswith("stopped after")] for o in outs]
    assert all(len(s) == 1 for s in stops), outs
    assert stops[0] == stops[1] and "synced True" in stops[0][0], stops
    assert [p.returncode for p in procs] == [0, 0]


def test_global_batches_from_process_local_rows():
    """``multihost.to_global``: the global arrays are process 0's rows then process 1's,
    shapes raised to the longer process's (prompts padded on the left), and the patches in
    the compact single-process order, for a layout that splits the batch over the
    processes, one that splits it 2 x 2 with tensor parallelism, and one that cannot
    split it (tensor over all 8 devices: gathered and replicated)."""
    port = _port()
    procs = [subprocess.Popen([sys.executable, CHILD, "4", "to_global", f"127.0.0.1:{port}",
                               str(p)], cwd=ROOT, env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for p in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    res = [json.loads(next(line for line in o.splitlines() if line.startswith("RESULT "))[7:])
           for o in outs]
    ids = [np.arange(4 * t).reshape(4, t) + 1000 * p for p, t in ((0, 3), (1, 5))]
    want_ids = np.concatenate([np.pad(ids[0], ((0, 0), (2, 0)), constant_values=-1), ids[1]])
    want_mask = np.concatenate([np.pad(np.ones((4, 3)), ((0, 0), (2, 0))), np.ones((4, 5))])
    want_boxes = np.zeros((8, 2, 4))
    want_boxes[:4, :1], want_boxes[4:] = 1.0, 2.0
    real = np.concatenate([np.arange(4.0), np.arange(8.0) + 100])[:, None] * [1, -1]
    for p in range(2):
        for layout, got in res[p].items():
            np.testing.assert_array_equal(got["input_ids"], want_ids, err_msg=layout)
            np.testing.assert_array_equal(got["attention_mask"], want_mask, err_msg=layout)
            np.testing.assert_array_equal(got["gt_boxes"], want_boxes, err_msg=layout)
            pv = np.asarray(got["pixel_values"])
            np.testing.assert_array_equal(pv[:12], real, err_msg=layout)
            assert not pv[12:].any(), layout
            np.testing.assert_array_equal(got["mine"], want_ids[4 * p:4 * p + 4], err_msg=layout)
