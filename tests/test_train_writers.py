"""Tests for dipr1_jax.train.writers: run-directory files, TensorBoard, console text."""

import glob
import json
import math
import os

import numpy as np
import pytest

from dipr1_jax import fsio
from dipr1_jax.train import writers as W
from fake_gcs import fake_gcs  # noqa: F401  (fixture)


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f.read().splitlines()]


def _write_run(workdir):
    with W.RunWriter(workdir) as w:
        w.write_config({"b": 2, "a": {"lr": 1e-5}})
        w.log(1, {"loss": np.float32(0.5), "kl": 0.25, "n": np.int64(7)})
        w.log(2, {"loss": float("nan"), "kl": np.float64(0.125), "note": "hi"})
        w.log(2, {"eval": {"base": {"f1": 0.75, "count_mae": np.float32("inf")},
                           "sft": {"f1": 0.8125}}}, kind="eval")
        w.log_samples(2, [{"completion": "<answer>[]</answer>", "reward": np.float32(1.5)}])
        w.final({"best_f1": 0.8125})


def test_metrics_jsonl_round_trip(tmp_path):
    _write_run(tmp_path)
    recs = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 2, 2]
    assert [r["kind"] for r in recs] == ["train", "train", "eval", "final"]
    assert recs[0]["loss"] == 0.5 and recs[0]["kl"] == 0.25 and recs[0]["n"] == 7
    assert isinstance(recs[0]["n"], int)
    assert recs[1]["loss"] is None and recs[1]["kl"] == 0.125 and recs[1]["note"] == "hi"
    assert recs[2]["eval"] == {"base": {"f1": 0.75, "count_mae": None}, "sft": {"f1": 0.8125}}
    assert all(abs(r["time"] - recs[0]["time"]) < 60 for r in recs)
    assert recs[-1]["final"] is True and recs[-1]["best_f1"] == 0.8125
    assert not any(r.get("final") for r in recs[:-1])
    assert W.read_metrics(tmp_path) == recs
    # The file is strict JSON (no NaN/Infinity tokens).
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    cfg_text = (tmp_path / "config.json").read_text()
    assert json.loads(cfg_text) == {"a": {"lr": 1e-5}, "b": 2}
    assert cfg_text.index('"a"') < cfg_text.index('"b"') and "\n  " in cfg_text
    samples = _lines(tmp_path / "samples.jsonl")
    assert samples == [{"step": 2, "completion": "<answer>[]</answer>", "reward": 1.5}]


def test_jax_scalars_are_converted(tmp_path):
    import jax.numpy as jnp
    with W.RunWriter(tmp_path, tensorboard=False) as w:
        w.log(3, {"a": jnp.float32(2.5), "b": jnp.bfloat16(1.5), "c": jnp.array([1, 2]),
                  "d": jnp.float32(jnp.nan)})
    (rec,) = W.read_metrics(tmp_path)
    assert (rec["a"], rec["b"], rec["c"], rec["d"]) == (2.5, 1.5, [1, 2], None)
    assert glob.glob(str(tmp_path / "events.out.tfevents*")) == []


def test_log_is_flushed_immediately(tmp_path):
    w = W.RunWriter(tmp_path, tensorboard=False)
    w.log(5, {"x": 1.0})
    # Read while the writer is still open: the record must already be on disk.
    assert [r["x"] for r in _lines(tmp_path / "metrics.jsonl")] == [1.0]
    w.close()


def test_reserved_metric_names_rejected(tmp_path):
    with W.RunWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match="reserved"):
            w.log(1, {"step": 3})
    assert W.read_metrics(tmp_path) == []


def test_tensorboard_scalars_read_back(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator
    _write_run(tmp_path)
    assert glob.glob(str(tmp_path / "events.out.tfevents*"))
    acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/kl", "train/n", "eval/eval/base/f1",
            "eval/eval/sft/f1", "final/best_f1"} <= tags
    assert "eval/eval/base/count_mae" not in tags  # inf skipped
    assert not any(t.endswith(("/step", "/time", "/note", "/final")) for t in tags)

    def series(tag):
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    loss = series("train/loss")
    assert [s for s, _ in loss] == [1]  # the NaN at step 2 was skipped
    assert loss[0][1] == pytest.approx(0.5, rel=1e-6)
    kl = series("train/kl")
    assert [s for s, _ in kl] == [1, 2]
    assert [v for _, v in kl] == pytest.approx([0.25, 0.125], rel=1e-6)
    assert series("train/n") == [(1, pytest.approx(7.0))]
    assert series("eval/eval/sft/f1") == [(2, pytest.approx(0.8125, rel=1e-6))]
    assert series("final/best_f1") == [(2, pytest.approx(0.8125, rel=1e-6))]


def test_unwritable_workdir_fails_at_construction(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad = blocker / "run"
    with pytest.raises(W.WorkdirError, match="a_file/run") as info:
        W.RunWriter(bad)
    assert isinstance(info.value, OSError)
    with pytest.raises(OSError, match="a_file"):
        W.RunWriter(blocker)


def test_non_main_process_writes_nothing(tmp_path):
    run = tmp_path / "run"
    with W.RunWriter(run, is_main=False) as w:
        w.write_config({"a": 1})
        w.log(1, {"loss": 1.0})
        w.log_samples(1, [{"x": 1}])
        w.final({"f1": 1.0})
        w.flush()
    assert not run.exists()
    assert os.listdir(tmp_path) == []
    # Even an unwritable path is fine off the main process.
    blocker = tmp_path / "f"
    blocker.write_text("")
    W.RunWriter(blocker / "run", is_main=False).close()


def test_read_metrics_tolerates_truncated_last_line(tmp_path):
    with W.RunWriter(tmp_path, tensorboard=False) as w:
        w.log(1, {"loss": 1.0})
        w.log(2, {"loss": 0.5})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "kind": "train", "lo')
    with pytest.warns(UserWarning, match="truncated"):
        recs = W.read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 1.0), (2, 0.5)]
    # A bad line in the middle is an error naming the file and line.
    path.write_text('{"step": 1}\n{bad\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        W.read_metrics(tmp_path)
    assert W.read_metrics(tmp_path / "missing") == []


def test_reopen_repairs_torn_line_and_purges(tmp_path):
    with W.RunWriter(tmp_path, tensorboard=False) as w:
        for s in (1, 2, 3):
            w.log(s, {"loss": float(s)})
        w.log_samples(3, [{"x": 3}])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    with pytest.warns(UserWarning, match="truncated"):
        w = W.RunWriter(tmp_path, tensorboard=False)
    w.log(4, {"loss": 4.0})
    w.close()
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    # Resuming from a checkpoint at step 3 drops the records of steps >= 3.
    with W.RunWriter(tmp_path, tensorboard=False, purge_step=3) as w:
        w.log(3, {"loss": 30.0})
    assert [(r["step"], r["loss"]) for r in W.read_metrics(tmp_path)] == [
        (1, 1.0), (2, 2.0), (3, 30.0)]
    assert _lines(tmp_path / "samples.jsonl") == []


def test_purge_step_also_purges_tensorboard(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator
    with W.RunWriter(tmp_path) as w:
        for s in (1, 2, 3, 4):
            w.log(s, {"loss": float(s)})
    with W.RunWriter(tmp_path) as w:  # reopened within the same second
        w.log(5, {"loss": 5.0})
    with W.RunWriter(tmp_path, purge_step=3) as w:
        w.log(3, {"loss": 30.0})
    assert len(glob.glob(str(tmp_path / "events.out.tfevents*"))) == 3
    acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert got == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert [r["step"] for r in W.read_metrics(tmp_path)] == [1, 2, 3]


def test_phases_purge_each_phase_from_the_resume_point(tmp_path):
    """A run with phases (the pipeline) resumed at (phase 1, step 3): earlier phases keep
    all their records and events, phase 1 keeps its steps before 3, later phases none;
    each phase's events are a TensorBoard run of their own, so its purge cannot hide the
    other phases' steps."""
    from tensorboard.backend.event_processing import event_accumulator
    from dipr1_jax.train.modes import pipeline_phases
    phases = pipeline_phases(sft_steps=4)

    def attempt(w, sft=range(1, 5), grpo=range(1, 6), control=range(5, 8)):
        w.log(0, {"eval": {"base": {"f1": 0.1}}}, kind="eval")
        for s in sft:
            w.log(s, {"loss": float(s)}, kind="sft")
        w.log(4, {"eval": {"sft": {"f1": 0.2}}}, kind="eval")
        w.log(4, {"eval": {"sft/ood": {"f1": 0.3}}}, kind="eval")
        for s in grpo:
            w.log(s, {"loss": 10.0 + s}, kind="grpo")
            w.log_samples(s, [{"rollout": 0, "text": f"g{s}"}])
        w.log(2, {"eval": {"sft+grpo@2": {"f1": 0.4}}}, kind="eval")
        for s in control:
            w.log(s, {"loss": 100.0 + s}, kind="sft")
        w.log(7, {"eval": {"sft-continued": {"f1": 0.5}}}, kind="eval")
        w.log_samples(7, [{"eval": "sft-continued", "text": "c"}])
        w.final({"eval": {}})

    with W.RunWriter(tmp_path, phases=phases) as w:
        attempt(w)
    with W.RunWriter(tmp_path, phases=phases, purge_step=3, resume_phase=2) as w:
        attempt(w, sft=(), grpo=range(3, 6), control=(5,))
    recs = W.read_metrics(tmp_path)
    got = [(r["kind"], r["step"], *r.get("eval", {})) for r in recs]
    assert got == [("eval", 0, "base"), *[("sft", s) for s in range(1, 5)],
                   ("eval", 4, "sft"), ("eval", 4, "sft/ood"), ("grpo", 1), ("grpo", 2),
                   ("eval", 2, "sft+grpo@2"),
                   # the resumed attempt (its base and sft evaluations logged again here
                   # only because this test logs them; the pipeline reads them back)
                   ("eval", 0, "base"), ("eval", 4, "sft"), ("eval", 4, "sft/ood"),
                   ("grpo", 3), ("grpo", 4), ("grpo", 5), ("eval", 2, "sft+grpo@2"),
                   ("sft", 5), ("eval", 7, "sft-continued"),
                   ("final", 7)]
    samples = _lines(tmp_path / "samples.jsonl")
    assert [s["text"] for s in samples] == ["g1", "g2", "g3", "g4", "g5", "c"]
    assert sorted(os.listdir(tmp_path / "tensorboard")) == ["base", "control", "grpo", "sft"]
    assert glob.glob(str(tmp_path / "events.out.tfevents*")) == []

    def scalars(phase, tag):
        acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard" / phase),
                                                 size_guidance={"scalars": 0})
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    assert scalars("sft", "sft/loss") == [(s, float(s)) for s in range(1, 5)]
    assert scalars("grpo", "grpo/loss") == [(s, 10.0 + s) for s in range(1, 6)]
    assert scalars("control", "sft/loss") == [(5, 105.0)]  # 6 and 7 purged (a later phase)


def test_pipeline_phases_of_records():
    from dipr1_jax.train.modes import PIPELINE_PHASES, pipeline_phases
    of = pipeline_phases(sft_steps=150).of
    cases = {"base": {"kind": "eval", "step": 0, "eval": {"base/citypersons@person": {}}},
             "sft": {"kind": "sft", "step": 150},
             "grpo": {"kind": "eval", "step": 4, "eval": {"sft+grpo@4": {}}},
             "control": {"kind": "sft", "step": 151}}
    for phase, rec in cases.items():
        assert PIPELINE_PHASES[of(rec)] == phase, rec
    assert PIPELINE_PHASES[of({"step": 6, "rollout": 1, "text": "x"})] == "grpo"
    assert PIPELINE_PHASES[of({"step": 150, "eval": "sft", "text": "x"})] == "sft"
    assert PIPELINE_PHASES[of({"step": 9, "eval": "sft-continued/uavdt", "text": "x"})] \
        == "control"


def test_run_writer_on_a_bucket(fake_gcs, monkeypatch):
    """A ``gs://`` workdir (objects cannot be appended): metrics.jsonl and samples.jsonl
    are rewritten whole at flush (and every REMOTE_FLUSH_SECONDS), a resumed writer
    purges and repairs them there, TensorBoard events are whole objects, and nothing
    is written to a local ``gs:`` folder (the fixture checks)."""
    from tensorboard.backend.event_processing import event_accumulator
    run = "gs://bucket/runs/r1"
    monkeypatch.setattr(W, "REMOTE_FLUSH_SECONDS", 1e9)
    w = W.RunWriter(run)
    w.write_config({"lr": 0.5})
    for s in (1, 2, 3):
        w.log(s, {"loss": float(s)})
    w.log_samples(3, [{"text": "x"}])
    assert not fsio.exists(f"{run}/metrics.jsonl")  # in memory until a flush
    w.flush()
    assert [r["step"] for r in W.read_metrics(run)] == [1, 2, 3]
    monkeypatch.setattr(W, "REMOTE_FLUSH_SECONDS", 0.0)
    w.log(4, {"loss": 4.0})  # the time since the last flush is over: written at once
    assert [r["step"] for r in W.read_metrics(run)] == [1, 2, 3, 4]
    w.close()
    assert json.loads(fake_gcs.read(f"{run}/config.json")) == {"lr": 0.5}
    # A torn last line (an interrupted upload of another writer) and a resume at step 3.
    fsio.write_bytes(f"{run}/metrics.jsonl",
                     fake_gcs.read(f"{run}/metrics.jsonl") + b'{"step": 5, "lo')
    with pytest.warns(UserWarning, match="truncated"):
        w = W.RunWriter(run, purge_step=3)
    w.log(3, {"loss": 30.0})
    w.close()
    assert [(r["step"], r["loss"]) for r in W.read_metrics(run)] == [
        (1, 1.0), (2, 2.0), (3, 30.0)]
    assert fake_gcs.read(f"{run}/samples.jsonl") == b""
    events = [u for u in fake_gcs.objects(run) if "tfevents" in u]
    assert len(events) == 2
    acc = event_accumulator.EventAccumulator(fake_gcs.local(run), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (1, 1.0), (2, 2.0), (3, 30.0)]


def test_unwritable_bucket_and_missing_backend_are_workdir_errors(monkeypatch):
    def no_backend(path):
        raise fsio.MissingBackendError(f"{path}: no filesystem backend; pip install gcsfs")

    monkeypatch.setattr(fsio, "check_writable", no_backend)
    with pytest.raises(W.WorkdirError, match="gs://b/run.*pip install gcsfs"):
        W.ensure_writable("gs://b/run")


def test_format_duration():
    assert W.format_duration(0) == "0s"
    assert W.format_duration(45.4) == "45s"
    assert W.format_duration(59.6) == "1m00s"
    assert W.format_duration(192) == "3m12s"
    assert W.format_duration(3720) == "1h02m"
    assert W.format_duration(2 * 86400 + 3 * 3600 + 5) == "2d03h"
    assert W.format_duration(float("nan")) == "-"
    assert W.format_duration(None) == "-"
    assert W.format_duration(-1) == "-"


def test_step_line_full():
    m = {"reward": np.float32(1.234), "reward/format": 0.98, "reward/look": 0.12,
         "reward/accuracy": 0.45, "kl": 0.0012, "clip_fraction": 0.03,
         "completion_len": 84.3, "tokens_per_s": 1234.4, "time/rollout": 1.23,
         "time/reward": 0.1, "time/update": 0.84}
    line = W.step_line(12, 200, m, elapsed_s=65, eta_s=192)
    assert line == ("grpo 12/200 | reward 1.234 (fmt 0.98 look 0.12 acc 0.45) | "
                    "kl 0.0012 clip 0.03 | len 84 | 1234 tok/s | "
                    "rollout 1.2s reward 0.1s update 0.8s | 1m05s eta 3m12s")
    assert "\n" not in line


def test_step_line_missing_keys_nan_and_nesting():
    line = W.step_line(3, 10, {"reward": {"total": float("nan"), "look": 0.5}, "kl": 0.5},
                       elapsed_s=None, eta_s=float("nan"), kind="sft")
    assert line == "sft 3/10 | reward - (look 0.5) | kl 0.5 | - eta -"
    line = W.step_line(1, 5, {"loss": 2.0}, elapsed_s=1, eta_s=4)
    assert line == "grpo 1/5 | loss 2 | 1s eta 4s"
    assert "reward" not in line and "tok/s" not in line
    assert W.step_line(0, 0, {}, elapsed_s=0, eta_s=0) == "grpo 0/0 | 0s eta 0s"


def test_eval_table():
    rows = {
        "base": {"format_rate": 0.5, "precision": 0.25, "recall": float("nan"),
                 "f1": None, "count_mae": 12.5, "reward": np.float32(1.0)},
        "sft+grpo": {"format_rate": 1.0, "precision": 0.875, "recall": 0.5, "f1": 0.625,
                     "count_mae": 3, "reward": 2.5},
        "sft": {"f1": 0.5},
    }
    table = W.eval_table(rows)
    lines = table.split("\n")
    assert len(lines) == 2 + 3
    assert len({len(line) for line in lines}) == 1  # fixed width
    header = lines[0].split()
    assert header == ["model", "format_rate", "precision", "recall", "f1", "count_mae", "reward"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    base, sg, sft = (line.split() for line in lines[2:])
    assert base == ["base", "0.5000", "0.2500", "-", "-", "12.5000", "1.0000"]
    assert sg == ["sft+grpo", "1.0000", "0.8750", "0.5000", "0.6250", "3", "2.5000"]
    assert sft == ["sft", "-", "-", "-", "0.5000", "-", "-"]
    # Columns are right-aligned: every cell of a column ends where its header ends.
    for col in header[1:]:
        end = lines[0].index(col) + len(col)
        for line in lines[2:]:
            assert line[end - 1] != " " and (end == len(line) or line[end] == " ")
    # Custom key subset and order.
    small = W.eval_table(rows, keys=("f1", "recall")).split("\n")
    assert small[0].split() == ["model", "f1", "recall"]
    assert small[3].split() == ["sft+grpo", "0.6250", "0.5000"]
    assert math.isnan(rows["base"]["recall"])  # input not modified
