"""Checkpoints and resume (issue 10): real child processes killed with SIGKILL or told to stop
with SIGTERM, resumed with the same command, end bitwise equal to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from dipr1_jax.train.checkpoint import Checkpointer, config_diff
from dipr1_jax.train.writers import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny budgets and shapes: every child process runs the same programs, which the persistent
# compilation cache of the module shares between them.
COMMON = [
    "--config.model.preset=tiny", "--config.mesh.devices=1", "--config.eval.batch_size=4",
    "--config.data.synthetic_eval_size=4", "--config.eval.num_draw=0",
    "--config.data.synthetic_width=112", "--config.data.synthetic_height=84",
    "--config.data.synthetic_max_people=1", "--config.log.samples_every=2",
    "--config.log.memory_plan=false",
]
# SFT children (a GRPO child compiles twice as much; the GRPO loop's resume is checked
# in-process in test_train_guard.py, sharing test_train_modes' compiled programs).
SFT = COMMON + ["--config.mode=sft", "--config.sft.steps=6", "--config.sft.batch_size=4",
                "--config.checkpoint.every=2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def launch(args, workdir, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "dipr1_jax.launch", *args, f"--workdir={workdir}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


def start(args, workdir, env):
    return subprocess.Popen([sys.executable, "-m", "dipr1_jax.launch", *args,
                             f"--workdir={workdir}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)


def wait_for_step(proc, workdir, kind, step, since=0.0, timeout=600):
    """Polls metrics.jsonl until a ``kind`` record of ``step`` written after ``since``
    (a ``time.time()``) is there."""
    path = os.path.join(workdir, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, f"child exited early:\n{proc.stdout.read()}"
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if (rec.get("kind") == kind and rec.get("step") == step
                            and rec.get("time", 0) > since):
                        return
        time.sleep(0.02)
    raise TimeoutError(f"no {kind} step {step} in {path}")


def export_tensors(workdir):
    from safetensors.numpy import load_file
    return load_file(os.path.join(workdir, "export", "model.safetensors"))


def untimed(evals):
    return {name: {k: v for k, v in summary.items() if k != "seconds"}
            for name, summary in evals.items()}


def assert_same_run(ref, other, kind, steps):
    a, b = export_tensors(ref), export_tensors(other)
    assert sorted(a) == sorted(b)
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f"parameters differ: {different[:5]}"
    ra, rb = read_metrics(ref), read_metrics(other)
    # Each training step logged exactly once (the replayed steps are not duplicated) ...
    assert [r["step"] for r in rb if r["kind"] == kind] == list(range(1, steps + 1))
    # ... with the same losses, and the same evaluations.
    la = [r["loss"] for r in ra if r["kind"] == kind]
    lb = [r["loss"] for r in rb if r["kind"] == kind]
    assert la == lb
    ea = [untimed(r["eval"]) for r in ra if r["kind"] == "eval"]
    eb = [untimed(r["eval"]) for r in rb if r["kind"] == "eval"]
    assert ea == eb and len(ea) == 2
    assert untimed([r for r in rb if r.get("final")][-1]["eval"]) == untimed(ra[-1]["eval"])
    assert sum(1 for r in rb if r.get("final")) == 1


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory, env):
    workdir = str(tmp_path_factory.mktemp("sft_ref"))
    out = launch(SFT, workdir, env)
    assert out.returncode == 0, out.stdout + out.stderr
    return workdir


def checkpoint_entries(workdir):
    d = os.path.join(workdir, "checkpoints")
    return os.listdir(d) if os.path.isdir(d) else []


def wait_until(proc, predicate, what, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        assert proc.poll() is None, f"child exited before {what}:\n{proc.stdout.read()}"
        time.sleep(0.005)
    raise TimeoutError(what)


def test_killed_and_preempted_run_resumes_bitwise(sft_reference, tmp_path, env):
    """One SFT run stopped three ways, resumed each time with the same command, ends
    bitwise equal to the uninterrupted run: SIGKILL between checkpoints, SIGKILL during an
    asynchronous save, SIGTERM (checkpoint and exit 143). Then a changed config is refused."""
    workdir = str(tmp_path / "run")
    ckdir = os.path.join(workdir, "checkpoints")
    # 1. SIGKILL between checkpoints: checkpoint 2 complete, step 3 done (to be replayed).
    proc = start(SFT, workdir, env)
    wait_for_step(proc, workdir, "sft", 3)
    wait_until(proc, lambda: "2" in checkpoint_entries(workdir), "checkpoint 2")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert Checkpointer(ckdir, every=2, keep=3).steps() == [2]
    # 2. Resumed, then SIGKILL while checkpoint 4 is being written (orbax's temporary folder).
    proc = start(SFT, workdir, env)
    wait_until(proc, lambda: any(e.startswith("4.") for e in checkpoint_entries(workdir)),
               "the save of checkpoint 4")
    proc.send_signal(signal.SIGKILL)
    text, _ = proc.communicate(timeout=60)
    assert "resuming from checkpoint" in text and "sft step 2 of 6" in text
    assert Checkpointer(ckdir, every=2, keep=3).steps() == [2]  # the torn save is not a step
    # 3. Resumed again, then SIGTERM: the step finishes, a checkpoint is written, exit 143.
    t0 = time.time()
    proc = start(SFT, workdir, env)
    wait_for_step(proc, workdir, "sft", 3, since=t0)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, text
    steps = Checkpointer(ckdir, every=2, keep=3).steps()
    assert steps[0] == 2 and 3 <= steps[-1] < 6, steps
    assert f"preempted: stopped after sft step {steps[-1]}" in text
    assert not os.path.exists(os.path.join(workdir, "export"))
    # 4. Resumed to the end.
    out = launch(SFT, workdir, env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"sft step {steps[-1]} of 6" in out.stdout
    assert_same_run(sft_reference, workdir, "sft", 6)
    # 5. A different config refuses to resume (before building anything) and names the field.
    out = launch(SFT + ["--config.sft.optim.learning_rate=0.5"], workdir, env)
    assert out.returncode == 2
    assert "sft.optim.learning_rate: 0.001 -> 0.5" in out.stderr
    assert "force_resume" in out.stderr and "parameters) on" not in out.stdout


def test_config_diff_names_fields_and_ignores_checkpoint_policy():
    a = {"sft": {"steps": 6, "optim": {"learning_rate": 1e-3}}, "checkpoint": {"every": 2}}
    b = {"sft": {"steps": 7, "optim": {"learning_rate": 1e-3}}, "checkpoint": {"every": 5}}
    assert config_diff(a, b) == ["sft.steps: 6 -> 7"]
    assert config_diff(a, a) == []
    # A field newer than the saved config: equal at its default, a difference otherwise.
    assert config_diff(a, {**a, "eval": {"ood": ""}}) == []
    assert config_diff(a, {**a, "eval": {"ood": "x:y:z"}}) == ["eval.ood: '<absent>' -> 'x:y:z'"]


def test_unreadable_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    from dipr1_jax.train.state import TrainState

    ck = Checkpointer(str(tmp_path / "ck"), every=1, keep=3)
    s1 = TrainState(jnp.int32(1), {"w": jnp.arange(6.0)}, ())
    s2 = TrainState(jnp.int32(2), {"w": jnp.arange(6.0) * 2}, ())
    ck.save(s1, {"kind": "sft", "n": 1})
    ck.save(s2, {"kind": "sft", "n": 2})
    ck.wait()
    assert ck.steps() == [1, 2]
    # Truncate every file of the newest checkpoint's state.
    for dirpath, _, files in os.walk(tmp_path / "ck" / "2" / "state"):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 3)
    got = Checkpointer(str(tmp_path / "ck"), every=1, keep=3).restore(s1)
    assert got is not None
    state, extra = got
    assert int(state.step) == 1 and extra["n"] == 1
    assert np.array_equal(np.asarray(state.params["w"]), np.arange(6.0))
    assert "checkpoint" in (out := capsys.readouterr().out) and "/2 is unreadable" in out


def test_unwritable_workdir_fails_before_any_compute(tmp_path, env):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = launch(SFT, str(blocker / "run"), env, timeout=300)
    assert out.returncode == 2
    assert "not writable" in out.stderr
    assert "parameters) on" not in out.stdout  # no model was built


def test_missing_dataset_fails_before_the_model_loads(tmp_path, env):
    out = launch(SFT + ["--config.data.name=crowdhuman",
                        f"--config.data.root={tmp_path}/no_such_dir"],
                 str(tmp_path / "run"), env, timeout=300)
    assert out.returncode == 2
    assert f"data.root='{tmp_path}/no_such_dir' is not a directory" in out.stderr
    assert "parameters) on" not in out.stdout  # no model was built
