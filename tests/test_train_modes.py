"""Launch modes end to end on the tiny preset: pipeline, grpo from an export, eval; the run
directory's files (metrics.jsonl, samples.jsonl, TensorBoard events, export/, report/)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dipr1_jax import fsio
from dipr1_jax.config import Config, replace_path
from dipr1_jax.train import modes
from dipr1_jax.train.writers import read_metrics
from fake_gcs import fake_gcs  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = ("f1", "precision", "recall", "format_rate", "count_mae", "reward")


def tiny_config(**overrides) -> Config:
    cfg = Config()
    # Budgets big enough that GRPO has something to learn (the tiny policy after 150 SFT
    # steps writes the Think-Look-Answer format in a fraction of its samples), small
    # enough for CI; every mode below uses these shapes, so they share compiled programs.
    values = {
        "model.preset": "tiny", "sft.steps": 150, "sft.batch_size": 8,
        "sft.optim.learning_rate": 3e-3, "train.steps": 12, "train.batch_size": 4,
        "grpo.group_size": 8, "rollout.max_new_tokens": 48, "train.optim.learning_rate": 1e-3,
        "train.optim.warmup_steps": 0, "eval.batch_size": 4, "eval.num_draw": 1,
        "data.synthetic_eval_size": 4, "data.synthetic_max_people": 1,
        "log.samples_every": 6, "log.num_samples": 2, "log.every": 1,
        "data.synthetic_width": 112, "data.synthetic_height": 84, "mesh.devices": 1,
        # Session 3's calibration: transformers' init and the cluttered scenes, where the
        # tiny policy after 150 SFT steps keeps the format in a fraction of its samples and
        # GRPO raises it within 12 steps (with the default job's fan-in init and plain
        # scenes SFT already saturates the format, leaving GRPO nothing to show in 12).
        "model.init": "hf", "data.synthetic_clutter": True, "data.synthetic_silhouettes": False,
        "data.synthetic_coord_tint": 0.0, "data.synthetic_min_person_height": 6,
        "rollout.temperature": 1.0, "rewards.w_count": 0.0, "grpo.beta": 0.04,
        # The start-up memory plan traces the model (seconds); test_memory_plan covers it.
        "log.memory_plan": False,
    }
    values.update(overrides)
    for path, value in values.items():
        cfg = replace_path(cfg, path, value)
    return cfg


PIPELINE_CKPT = {"checkpoint.every": 6}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    # Checkpoints every 6 steps: test_pipeline_resumes_... restarts from GRPO's at step 6.
    evals = modes.run_pipeline(tiny_config(**PIPELINE_CKPT), workdir)
    return workdir, evals


def test_pipeline_writes_the_run_directory(pipeline_run):
    workdir, evals = pipeline_run
    records = read_metrics(workdir)
    final = records[-1]
    assert final.get("final") is True
    assert list(final["eval"]) == ["base", "sft", "sft+grpo", "sft-continued"]
    for name, summary in final["eval"].items():
        assert set(TABLE) <= set(summary), name
        assert summary["num_images"] == 4
        for key in TABLE:
            assert summary[key] == pytest.approx(evals[name][key], nan_ok=True), (name, key)
    kinds = [r["kind"] for r in records]
    assert kinds.count("grpo") == 12
    # 150 SFT steps, then the control's (at least one) continued SFT steps.
    sft_steps = [r["step"] for r in records if r["kind"] == "sft"]
    assert sft_steps[:150] == list(range(1, 151)) and len(sft_steps) > 150
    grpo = [r for r in records if r["kind"] == "grpo"]
    for key in ("reward", "reward/format", "kl", "clip_fraction", "entropy", "grad_norm", "lr",
                "zero_std_groups", "adv_std", "completion_len", "time/rollout"):
        assert key in grpo[0], key
    assert 0 < grpo[0]["completion_len"] <= 48
    cfg = json.load(open(os.path.join(workdir, "config.json")))
    assert cfg["data"]["prompt_style"] == "short"  # "auto" resolved for random init
    samples = [json.loads(l) for l in open(os.path.join(workdir, "samples.jsonl"))]
    train_samples = [s for s in samples if "rollout" in s]
    assert len(train_samples) == 4 and all(isinstance(s["text"], str) for s in train_samples)
    assert sorted({s["step"] for s in train_samples}) == [6, 12]
    assert os.path.isfile(os.path.join(workdir, "export", "config.json"))
    assert os.path.isfile(os.path.join(workdir, "export", "sft", "tokenizer.json"))
    for name in ("base", "sft", "sft+grpo"):
        pngs = os.listdir(os.path.join(workdir, "report", name))
        assert len(pngs) == 1 and pngs[0].endswith(".png")


def test_tensorboard_events_read_back(pipeline_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir, _ = pipeline_run

    def board(phase):  # each pipeline phase is a TensorBoard run: tensorboard/<phase>
        acc = EventAccumulator(os.path.join(workdir, "tensorboard", phase))
        acc.Reload()
        return acc

    grpo, sft = board("grpo"), board("sft")
    assert "grpo/reward" in grpo.Tags()["scalars"] and "sft/loss" in sft.Tags()["scalars"]
    assert [e.step for e in grpo.Scalars("grpo/reward")] == list(range(1, 13))
    assert [e.step for e in sft.Scalars("sft/loss")][-1] == 150  # the control's: "control"
    records = [r for r in read_metrics(workdir) if r["kind"] == "grpo"]
    for event, rec in zip(grpo.Scalars("grpo/loss"), records, strict=True):
        assert event.value == pytest.approx(rec["loss"], rel=1e-6, abs=1e-9)


def _killed_copy(src: str, dst: str, kind: str, step: int, keep_ckpt: dict) -> None:
    """``dst``: the run directory ``src`` as a process killed right after logging ``kind``
    step ``step`` leaves it: the records and samples up to that line, the checkpoints
    ``keep_ckpt`` ({phase: newest step}) and none after, and no export of later phases."""
    shutil.copytree(src, dst)
    lines = open(os.path.join(src, "metrics.jsonl")).read().splitlines(keepends=True)
    cut = next(i for i, ln in enumerate(lines)
               if json.loads(ln)["kind"] == kind and json.loads(ln)["step"] == step) + 1
    with open(os.path.join(dst, "metrics.jsonl"), "w") as f:
        f.writelines(lines[:cut])
    for phase in ("sft", "grpo", "control"):
        d = os.path.join(dst, "checkpoints", phase)
        for name in os.listdir(d):
            if phase not in keep_ckpt or int(name) > keep_ckpt[phase]:
                shutil.rmtree(os.path.join(d, name))
    in_grpo = kind == "grpo"  # else: in the control, GRPO and its export are complete
    later = ("sft+grpo", "sft-continued") if in_grpo else ("sft-continued",)
    samples = [json.loads(ln) for ln in open(os.path.join(src, "samples.jsonl"))]
    with open(os.path.join(dst, "samples.jsonl"), "w") as f:
        for s in samples:  # rollout samples up to the cut; evaluation samples before it
            if ("rollout" in s and (not in_grpo or s["step"] <= step)) or (
                    "eval" in s and not s["eval"].startswith(later)):
                f.write(json.dumps(s) + "\n")
    if in_grpo:
        for name in os.listdir(os.path.join(dst, "export")):
            if name != "sft":
                os.remove(os.path.join(dst, "export", name))
    os.remove(os.path.join(dst, "report", "summary.json"))


def test_pipeline_resumes_from_its_grpo_checkpoint_bitwise(pipeline_run, tmp_path):
    """The default command's resume: a pipeline killed after GRPO step 8 (its newest
    checkpoint: GRPO step 6) and rerun restores SFT's last checkpoint and GRPO's step 6,
    redoes steps 7-12 and ends with the uninterrupted run's parameters bit for bit; the
    base and SFT evaluations are read back, not rerun, and no step is logged twice.
    (Rerun without the control, which would spend GRPO's whole wall time again:
    ``force_resume`` lets that one field differ; the next test resumes a control.)"""
    from safetensors.numpy import load_file

    ref, evals = pipeline_run
    work = str(tmp_path / "run")
    _killed_copy(ref, work, "grpo", 8, {"sft": 150, "grpo": 6})
    out = modes.run_pipeline(tiny_config(**PIPELINE_CKPT, control=False,
                                         **{"checkpoint.force_resume": True}), work)
    a = load_file(os.path.join(ref, "export", "model.safetensors"))
    b = load_file(os.path.join(work, "export", "model.safetensors"))
    assert sorted(a) == sorted(b)
    assert [k for k in a if not np.array_equal(a[k], b[k])] == []
    ra, rb = read_metrics(ref), read_metrics(work)
    ga = [r for r in ra if r["kind"] == "grpo"]
    gb = [r for r in rb if r["kind"] == "grpo"]
    assert [r["step"] for r in gb] == list(range(1, 13))
    assert [r["loss"] for r in ga] == [r["loss"] for r in gb]
    assert [r["reward"] for r in ga] == [r["reward"] for r in gb]
    # Evaluations: base and sft read back (the same record, time stamp included) ...
    for name in ("base", "sft"):
        ea = [r for r in ra if r["kind"] == "eval" and name in r["eval"]]
        eb = [r for r in rb if r["kind"] == "eval" and name in r["eval"]]
        assert len(eb) == 1 and eb == ea, name
        assert out[name] == ea[0]["eval"][name]
    # ... sft+grpo evaluated again on the same parameters: the same numbers.
    for key in TABLE:
        assert out["sft+grpo"][key] == pytest.approx(evals["sft+grpo"][key], nan_ok=True)
    assert [r["step"] for r in rb if r["kind"] == "sft"] == list(range(1, 151))
    assert sum(1 for r in rb if r.get("final")) == 1
    rollouts = [json.loads(ln) for ln in open(os.path.join(work, "samples.jsonl"))]
    assert sorted(s["step"] for s in rollouts if "rollout" in s) == [6, 6, 12, 12]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(work, "tensorboard", "grpo"))
    acc.Reload()  # the replayed steps 7 and 8 are purged from the first attempt's events
    assert [e.step for e in acc.Scalars("grpo/loss")] == list(range(1, 13))
    assert [e.value for e in acc.Scalars("grpo/loss")] == pytest.approx(
        [r["loss"] for r in gb], rel=1e-6, abs=1e-9)


def test_pipeline_resumes_its_control_from_a_checkpoint(pipeline_run, tmp_path, capsys):
    """Killed during the control (SFT continued for GRPO's wall time): the rerun restores
    every phase from its last checkpoint, reads back base / sft / sft+grpo, and continues
    the control from its newest checkpoint with the rest of its time budget."""
    ref, _ = pipeline_run
    ra = read_metrics(ref)
    control = [r["step"] for r in ra if r["kind"] == "sft" and r["step"] > 150]
    ckpts = sorted(int(n) for n in os.listdir(os.path.join(ref, "checkpoints", "control")))
    assert len(ckpts) >= 2, ckpts  # (keep=3: periodic ones and the last)
    keep = ckpts[-2]  # a periodic checkpoint; the run "dies" one step after it
    work = str(tmp_path / "run")
    _killed_copy(ref, work, "sft", keep + 1, {"sft": 150, "grpo": 12, "control": keep})
    out = modes.run_pipeline(tiny_config(**PIPELINE_CKPT), work)
    text = capsys.readouterr().out
    assert f"resuming the pipeline from checkpoint {work}/checkpoints/control/{keep}" in text
    assert f"control: restored checkpoint {work}/checkpoints/control/{keep}" in text
    rb = read_metrics(work)
    for name in ("base", "sft", "sft+grpo"):
        ea = [r for r in ra if r["kind"] == "eval" and name in r["eval"]]
        assert [r for r in rb if r["kind"] == "eval" and name in r["eval"]] == ea, name
        assert out[name] == ea[0]["eval"][name]
    sft_b = [r for r in rb if r["kind"] == "sft"]
    assert [r["step"] for r in sft_b] == list(range(1, len(sft_b) + 1))
    # The first 150 + the control's steps up to the checkpoint are the first attempt's.
    sft_a = [r for r in ra if r["kind"] == "sft" and r["step"] <= keep]
    assert sft_b[:keep] == sft_a
    final = [r for r in rb if r.get("final")]
    assert len(final) == 1 and final[0]["control_sft_steps"] == len(sft_b) - 150
    assert control[0] == 151 and len(sft_b) > keep


def test_grpo_raises_the_training_reward(pipeline_run):
    workdir, _ = pipeline_run
    rewards = [r["reward"] for r in read_metrics(workdir) if r["kind"] == "grpo"]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.1, rewards


def test_grpo_and_eval_from_the_export_reproduce_its_evaluation(pipeline_run, tmp_path):
    workdir, evals = pipeline_run
    export = os.path.join(workdir, "export")
    # No updates (train.steps=0): the mode's load -> evaluate -> export path only.
    out = modes.run_grpo(tiny_config(init_from=export, **{"train.steps": 0}),
                         str(tmp_path / "grpo"))
    for key in TABLE:
        assert out["grpo"][key] == pytest.approx(out["init"][key], nan_ok=True), key
    # The export loads back as the same policy: greedy evaluation gives the same numbers.
    for key in TABLE:
        assert out["init"][key] == pytest.approx(evals["sft+grpo"][key], nan_ok=True), key
    assert os.path.isfile(str(tmp_path / "grpo" / "export" / "model.safetensors"))
    # data.prompt_style=auto takes the export's own (short: it was trained from random
    # init), not "full" as for an outside checkpoint; the grpo run's export passes it on.
    with open(tmp_path / "grpo" / "config.json") as f:
        assert json.load(f)["data"]["prompt_style"] == "short"
    with open(tmp_path / "grpo" / "export" / "dipr1_jax_training.json") as f:
        assert json.load(f)["prompt_style"] == "short"
    ev = modes.run_eval(tiny_config(mode="eval", init_from=export), str(tmp_path / "eval"))
    assert ev["export"]["reward"] == pytest.approx(evals["sft+grpo"]["reward"])


def test_runs_read_and_write_a_bucket(pipeline_run, fake_gcs, tmp_path, monkeypatch):
    """``gs://`` everywhere (a fake object store): ``grpo`` (no updates, no checkpoints:
    orbax writes buckets through tensorstore, which the fake cannot see) initialised from
    an export on the bucket writes its run directory and export there, and ``eval`` of
    that export gives the numbers of the local export."""
    workdir, evals = pipeline_run
    monkeypatch.setenv("DIPR1_JAX_CACHE", str(tmp_path / "cache"))
    src = os.path.join(workdir, "export")
    for name in os.listdir(src):
        if os.path.isfile(os.path.join(src, name)):
            fsio.copy(os.path.join(src, name), f"gs://b/models/export/{name}")
    off = {"train.steps": 0, "checkpoint.enabled": False}
    out = modes.run_grpo(tiny_config(init_from="gs://b/models/export", **off), "gs://b/runs/g")
    for key in TABLE:
        assert out["init"][key] == pytest.approx(evals["sft+grpo"][key], nan_ok=True), key
    objects = set(fake_gcs.objects("gs://b/runs/g"))
    for name in ("config.json", "metrics.jsonl", "export/model.safetensors",
                 "export/tokenizer.json", "export/dipr1_jax_training.json"):
        assert f"gs://b/runs/g/{name}" in objects, name
    assert any("tfevents" in o for o in objects)
    assert any(o.startswith("gs://b/runs/g/report/init/") and o.endswith(".png")
               for o in objects)
    assert read_metrics("gs://b/runs/g")[-1]["final"] is True
    ev = modes.run_eval(tiny_config(mode="eval", init_from="gs://b/runs/g/export"),
                        "gs://b/runs/e")
    assert ev["export"]["reward"] == pytest.approx(evals["sft+grpo"]["reward"])


def test_launch_reports_a_missing_init_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dipr1_jax.launch", "--config.mode=eval",
                          f"--config.init_from={tmp_path}/nope", f"--workdir={tmp_path}/w"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2
    assert "nope" in out.stderr and "does not exist" in out.stderr
