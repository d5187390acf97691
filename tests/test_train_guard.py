"""The non-finite guard (issue 10): a step with a non-finite loss or gradient is skipped (no
update, the step still counts and is logged with its reason); train.max_bad_steps of them in a
row stop the run with a message naming the step and the last good checkpoint."""

import jax
import numpy as np
import pytest

from dipr1_jax.train import modes
from dipr1_jax.train.checkpoint import Checkpointer
from dipr1_jax.train.loop import GRPOLoop, NonFiniteError, SFTLoop
from dipr1_jax.train.writers import read_metrics
from test_train_modes import tiny_config


def params_of(loop):
    return [np.asarray(x).copy() for x in jax.tree.leaves(loop.state.params)]


def test_nonfinite_steps_are_skipped_and_too_many_in_a_row_stop(tmp_path):
    cfg = tiny_config(**{"sft.steps": 6, "sft.batch_size": 4, "train.max_bad_steps": 2})
    workdir = str(tmp_path)
    run, model = modes._prepare(cfg, workdir)
    loop = SFTLoop(run, model)
    loop.ckpt = Checkpointer(f"{workdir}/checkpoints", every=3, keep=2)
    real, calls = loop.batch, []

    def batch():  # batches 2, 5 and 6 carry NaN pixels: NaN loss and gradients
        b = real()
        calls.append(1)
        if len(calls) in (2, 5, 6):
            b["pixel_values"] = np.full_like(b["pixel_values"], np.nan)
        return b

    loop.batch = batch
    loop.train(steps=1)
    p1 = params_of(loop)
    loop.train(steps=2)  # one more step: the poisoned one
    assert loop.step == 2 and loop.bad_steps == 1
    assert all(np.array_equal(a, b) for a, b in zip(p1, params_of(loop)))  # no update
    loop.train(steps=4)  # two good steps: parameters move again, the count resets
    assert loop.bad_steps == 0
    assert not all(np.array_equal(a, b) for a, b in zip(p1, params_of(loop)))
    p4 = params_of(loop)
    with pytest.raises(NonFiniteError) as info:
        loop.train(steps=6)
    msg = str(info.value)
    assert "2 non-finite steps in a row, the last at step 6" in msg
    assert f"{workdir}/checkpoints/3 (kept)" in msg and "max_bad_steps=2" in msg
    assert all(np.array_equal(a, b) for a, b in zip(p4, params_of(loop)))
    run.writer.flush()
    recs = {r["step"]: r for r in read_metrics(workdir) if r["kind"] == "sft"}
    assert [s for s, r in sorted(recs.items()) if r["skipped"]] == [2, 5, 6]
    assert recs[2]["loss"] is None and "non-finite loss" in recs[2]["skip_reason"]
    assert recs[3]["skipped"] == 0 and np.isfinite(recs[3]["loss"])


def test_grpo_loop_resumes_bitwise_from_its_checkpoint(tmp_path):
    """The GRPO loop's side of exact resume (child processes killed and resumed run SFT in
    test_train_checkpoint.py): a fresh loop restored from the step-2 checkpoint of a run
    stopped after step 3 ends equal to an uninterrupted run (data order, rollout keys,
    reference policy). Same shapes and budgets as test_train_modes' pipeline, so the
    compiled programs are shared."""
    cfg = tiny_config()

    def loop_in(name):
        run, model = modes._prepare(cfg, str(tmp_path / name))
        return GRPOLoop(run, model)

    ref = loop_in("ref")
    ref.train(steps=5)  # of the configured 12 (the schedule's length, shared compile)
    first = loop_in("a")
    first.ckpt = Checkpointer(str(tmp_path / "ck"), every=2, keep=3)
    first.train(steps=3)
    first.ckpt.wait()
    assert first.ckpt.steps() == [2]
    second = loop_in("b")  # the process after a restart
    second.ckpt = Checkpointer(str(tmp_path / "ck"), every=2, keep=3)
    assert second.resume() == 2
    second.train(steps=5)
    assert second.step == 5
    assert all(np.array_equal(a, b) for a, b in zip(params_of(ref), params_of(second)))
    assert all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(ref.state.opt_state), jax.tree.leaves(second.state.opt_state)))
    # Not vacuous: the parameters moved between the checkpoint and the end.
    assert not all(np.array_equal(a, b) for a, b in zip(params_of(first), params_of(ref)))
