"""Launch modes end to end on the tiny preset: pipeline, grpo from an export, eval; the run
directory's files (metrics.jsonl, samples.jsonl, TensorBoard events, export/, report/)."""

import json
import os
import subprocess
import sys

import pytest

from dipr1_jax.config import Config, replace_path
from dipr1_jax.train import modes
from dipr1_jax.train.writers import read_metrics

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


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    evals = modes.run_pipeline(tiny_config(), workdir)
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
    acc = EventAccumulator(workdir)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "grpo/reward" in tags and "sft/loss" in tags
    steps = [e.step for e in acc.Scalars("grpo/reward")]
    assert steps == list(range(1, 13))
    records = [r for r in read_metrics(workdir) if r["kind"] == "grpo"]
    for event, rec in zip(acc.Scalars("grpo/loss"), records):
        assert event.value == pytest.approx(rec["loss"], rel=1e-6, abs=1e-9)


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


def test_launch_reports_a_missing_init_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dipr1_jax.launch", "--config.mode=eval",
                          f"--config.init_from={tmp_path}/nope", f"--workdir={tmp_path}/w"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2
    assert "nope" in out.stderr and "does not exist" in out.stderr
