"""The experiment configs (``configs/``): each loads the way the launch loads it, validates,
lays its mesh over exactly its target's devices, and its memory plan on that target mesh
(``tools/print_config_plans.py``: an AbstractMesh, the target's device memory) fits.

A plan of the 3B / 7B model takes ~15 s to trace here, so the eight plans are the ones
``tools/print_config_plans.py --write`` stored in ``configs/qwen25vl_plans.json``: each
holds the config and target it was computed for, which must match the config as it is now
(a changed config fails until its plan is recomputed; a field added to ``Config`` since
fails only when a config sets it off its default), and one plan is recomputed here and must
equal the stored one (a changed estimate fails too). ``--check`` recomputes all eight.
"""

import importlib.util
import os

import pytest

from dipr1_jax import cli
from dipr1_jax.config import ConfigError, parse_ood

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    spec = importlib.util.spec_from_file_location(
        "print_config_plans", os.path.join(ROOT, "tools", "print_config_plans.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = _tool()
CONFIGS = TOOL.config_module()
HEADROOM = TOOL.HEADROOM  # share of a device a plan may use
LIVE = "7b-grpo-v4-32"  # the plan recomputed here: GRPO (KV cache, micro-batches), TP x4


def test_every_config_file_loads_through_the_launch_loader():
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.endswith(".py") and name != "qwen25vl.py":
            assert cli.load_config_file(os.path.join(ROOT, "configs", name)) is not None
    path = os.path.join(ROOT, "configs", "qwen25vl.py")
    assert len(CONFIGS.VARIANTS) == 8
    with pytest.raises(ConfigError, match="needs a variant: .*3b-grpo-v4-32"):
        cli.load_config_file(path)
    with pytest.raises(ConfigError, match="qwen25vl.py:3b-grpo-v5"):
        cli.load_config_file(path + ":3b-grpo-v5")
    with pytest.raises(ConfigError, match="default.py:x: .*argument"):  # takes none
        cli.load_config_file(os.path.join(ROOT, "configs", "default.py") + ":x")


@pytest.mark.parametrize("variant", CONFIGS.VARIANTS)
def test_variant_is_laid_out_for_its_target(variant):
    size, mode, target = variant.split("-", 2)
    cfg = TOOL.load(variant)  # cli.load_config_file: what --config=...:VARIANT runs
    t = CONFIGS.TARGETS[target]
    assert cfg.mode == mode and cfg.model.preset == f"qwen2.5-vl-{size}"
    m = cfg.mesh
    assert m.devices == t.devices and m.data * m.fsdp * m.tensor == t.devices
    assert TOOL.target_mesh(cfg, t.devices).size == t.devices
    shard = m.data * m.fsdp
    if mode == "grpo":  # whole groups, one or more prompts per batch shard
        assert cfg.train.batch_size % cfg.train.micro_batch_size == 0
        assert cfg.train.micro_batch_size % shard == 0
    else:
        assert cfg.sft.batch_size % shard == 0
    assert cfg.model.dtype == "bfloat16" and cfg.model.param_dtype == "float32"
    assert cfg.model.scan_layers and cfg.model.remat == "full"
    # CrowdHuman in domain; the three out-of-domain sets, UAVDT prompted for vehicles.
    assert (cfg.data.name, cfg.data.train_split, cfg.data.eval_split) == ("crowdhuman", "train",
                                                                          "val")
    assert [(s.name, s.split, s.category) for s in parse_ood(cfg.eval.ood)] == [
        ("citypersons", "val", ""), ("widerped", "val", ""), ("uavdt", "test", "vehicle")]
    # Images within the per-image vision layout's bound.
    assert cfg.data.max_pixels // (14 * 14) <= cfg.model.vision_max_patches


@pytest.mark.parametrize("variant", CONFIGS.VARIANTS)
def test_stored_memory_plan_is_of_this_config_and_fits_the_target_device(variant):
    cfg = TOOL.load(variant)
    t = CONFIGS.TARGETS[variant.split("-", 2)[2]]
    p = TOOL.stored()[variant]
    changed = TOOL.changes(cfg, t, p)
    assert not changed, (f"{variant} changed since its memory plan was stored ({changed}): "
                         "rerun JAX_PLATFORMS=cpu python tools/print_config_plans.py --write")
    assert p["kind"] == cfg.mode and p["devices"] == t.devices
    assert p["device_bytes"] == t.device_bytes
    assert p["mesh"] == {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
    # A plan of the whole job: the components add up, activations traced (not skipped),
    # the GRPO rollout's KV cache counted.
    assert p["activations"] > 0 and (p["kv_cache"] > 0) == (cfg.mode == "grpo")
    assert p["total"] >= p["params"] + p["optimizer"] + p["reference"] + p["held"] \
        + max(p["activations"], p["kv_cache"])
    assert p["total"] <= HEADROOM * t.device_bytes, p["table"]


def test_recomputed_memory_plan_equals_the_stored_one():
    cfg, target, plans = TOOL.target_plans(LIVE)
    p, stored = plans[0], TOOL.stored()[LIVE]
    assert p.param_count > 8e9  # the 7B model (8.29B parameters with the vision tower)
    assert abs(p.total / stored["total"] - 1) <= TOOL.TOLERANCE, (
        f"the memory plan of {LIVE} changed ({stored['total']} -> {p.total} bytes): rerun "
        "JAX_PLATFORMS=cpu python tools/print_config_plans.py --write\n" + p.format())
    assert TOOL.changes(cfg, target, stored) == []
    assert p.total <= HEADROOM * target.device_bytes, p.format()
