import dataclasses

import pytest

from dipr1_jax.config import Config, ConfigError, GRPOConfig, RewardConfig, leaf_fields, replace_path


def test_defaults_are_valid_and_hashable():
    cfg = Config()
    assert hash(cfg) == hash(Config())
    assert cfg.rewards.iou_threshold == 0.5
    # DESIGN.md's beta is GRPOConfig's default; the default job anchors harder (config.py).
    assert GRPOConfig().beta == 0.04 and cfg.grpo.beta == 0.5


@pytest.mark.parametrize("kwargs, field", [
    ({"beta": -0.1}, "GRPOConfig.beta"),
    ({"eps_low": 1.5}, "GRPOConfig.eps_low"),
    ({"aggregation": "mean"}, "GRPOConfig.aggregation"),
    ({"group_size": 2.5}, "GRPOConfig.group_size"),
    ({"mu": True}, "GRPOConfig.mu"),
])
def test_bad_grpo_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        GRPOConfig(**kwargs)


def test_reward_ranges():
    with pytest.raises(ConfigError, match="RewardConfig.iou_threshold"):
        RewardConfig(iou_threshold=0.0)
    with pytest.raises(ConfigError, match="must be finite"):
        RewardConfig(w_look=float("nan"))
    assert RewardConfig(w_acc=2).w_acc == 2.0 and isinstance(RewardConfig(w_acc=2).w_acc, float)


def test_replace_path_revalidates_and_rejects_unknown():
    cfg = replace_path(Config(), "grpo.beta", 0.02)
    assert cfg.grpo.beta == 0.02 and cfg.rewards == Config().rewards
    with pytest.raises(ConfigError, match="no field 'bta'"):
        replace_path(Config(), "grpo.bta", 0.02)
    with pytest.raises(ConfigError, match="GRPOConfig.beta"):
        replace_path(Config(), "grpo.beta", -1.0)


def test_leaf_fields_cover_every_section():
    paths = {p for p, _, _ in leaf_fields(Config())}
    for section in ("rewards", "grpo", "demo"):
        sub = getattr(Config(), section)
        for f in dataclasses.fields(sub):
            assert f"{section}.{f.name}" in paths


def test_optional_fields_are_type_checked():
    from dipr1_jax.data.pipeline import PipelineConfig
    assert PipelineConfig(num_epochs=None).num_epochs is None
    assert PipelineConfig(num_epochs=3).num_epochs == 3
    with pytest.raises(ConfigError, match="num_epochs: expected int or None"):
        PipelineConfig(num_epochs="3")


def test_optional_flags_parse_none_and_values():
    import dataclasses as dc
    from absl import flags
    from dipr1_jax import cli
    from dipr1_jax.config import _Validated

    @dc.dataclass(frozen=True)
    class Section(_Validated):
        limit: int | None = None
        scale: float | None = 1.5

    @dc.dataclass(frozen=True)
    class Root(_Validated):
        s: Section = dc.field(default_factory=Section)

    fv = flags.FlagValues()
    cli.define_config_flags(Root(), flag_values=fv)
    fv(["prog", "--config.s.limit=7", "--config.s.scale=none"])
    assert fv["config.s.limit"].value == 7 and fv["config.s.scale"].value is None
    with pytest.raises(flags.IllegalFlagValueError, match="int or 'none'"):
        fv(["prog", "--config.s.limit=seven"])
    with pytest.raises(ConfigError, match="Section.limit: expected int or None"):
        Section(limit=2.5)
