"""The launch entry point: flags, config files, overrides and the default job."""

import os
import subprocess
import sys

import pytest
from absl import flags

from dipr1_jax import cli
from dipr1_jax.config import Config, ConfigError, leaf_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags(argv):
    fv = flags.FlagValues()
    cli.define_config_flags(Config(), flag_values=fv)
    fv(["prog"] + argv)
    return cli.config_from_flags(fv)


def test_overrides_apply_on_top_of_a_config_file():
    cfg = _flags(["--config=" + os.path.join(ROOT, "configs/dense_crowd_rewards.py"),
                  "--config.grpo.beta=0.02", "--config.rewards.soft_tp=true",
                  "--config.grpo.aggregation=seq-mean-token-sum-norm"])
    assert cfg.grpo.beta == 0.02 and cfg.grpo.group_size == 16  # file value kept
    assert cfg.rewards.soft_tp is True and cfg.rewards.max_boxes == 192
    assert cfg.grpo.aggregation == "seq-mean-token-sum-norm"


def test_range_error_names_the_flag():
    with pytest.raises(ConfigError, match=r"--config.rewards.iou_threshold=1.5: RewardConfig.iou_threshold"):
        _flags(["--config.rewards.iou_threshold=1.5"])


def test_fields_valid_only_together_can_be_given_together():
    """A section is validated once with all of its overrides: data.name=crowdhuman needs
    data.root, and each alone (in either order) is no valid section."""
    cfg = _flags(["--config.data.name=crowdhuman", "--config.data.root=/data/ch"])
    assert (cfg.data.name, cfg.data.root) == ("crowdhuman", "/data/ch")
    with pytest.raises(ConfigError, match=r"^--config.data.name=crowdhuman: .*needs data.root"):
        _flags(["--config.data.name=crowdhuman"])
    # With a valid data section, a bad value elsewhere is named alone.
    with pytest.raises(ConfigError, match=r"^--config.grpo.beta=-1(\.0)?: GRPOConfig.beta"):
        _flags(["--config.data.root=/data/ch", "--config.data.name=crowdhuman",
                "--config.grpo.beta=-1"])


def test_bad_config_files(tmp_path):
    (tmp_path / "noget.py").write_text("x = 1\n")
    (tmp_path / "wrong.py").write_text("def get_config():\n    return {'beta': 1}\n")
    (tmp_path / "boom.py").write_text("import not_a_module_xyz\n")
    (tmp_path / "invalid.py").write_text(
        "from dipr1_jax.config import GRPOConfig, Config\n"
        "def get_config():\n    return Config(grpo=GRPOConfig(beta=-2.0))\n")
    for name, msg in (("noget.py", "defines no get_config"), ("wrong.py", "returned dict"),
                      ("boom.py", "ModuleNotFoundError"), ("invalid.py", "GRPOConfig.beta"),
                      ("missing.py", "no such file")):
        with pytest.raises(ConfigError, match=msg) as e:
            _flags([f"--config={tmp_path / name}"])
        assert name in str(e.value)


def _launch(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "dipr1_jax.launch", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_lists_every_config_flag():
    out = _launch("--help")
    assert out.returncode == 0
    for path, ann, _ in leaf_fields(Config()):
        shown = f"--[no]config.{path}" if ann is bool else f"--config.{path}"
        assert shown in out.stdout


@pytest.mark.parametrize("arg, needle", [
    ("--config.grpo.beta=abc", "--config.grpo.beta=abc"),
    ("--config.grpo.bta=0.1", "config.grpo.bta"),
    ("--config.grpo.beta=-1", "GRPOConfig.beta"),
])
def test_bad_override_fails_with_one_line(arg, needle):
    out = _launch(arg)
    assert out.returncode == 2
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:")


def test_reward_demo_runs_and_rewards_rank_better_rollouts_higher():
    out = _launch("--config.mode=reward-demo", "--config.demo.steps=2", "--config.demo.batch_size=4", "--config.demo.max_gt=30")
    assert out.returncode == 0, out.stderr
    summary = [l for l in out.stdout.splitlines() if l.startswith("summary:")]
    assert len(summary) == 1
    fields = dict(kv.split("=") for kv in summary[0][len("summary: "):].split(", "))
    # Rollouts from better simulated detectors must earn higher advantages.
    assert float(fields["corr_recall_advantage"]) > 0.2
    assert 0 < float(fields["accuracy"]) < 1 and 0 < float(fields["format"]) <= 1
