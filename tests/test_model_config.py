"""Model config presets and config.json reading/writing, checked against transformers."""

import json
import math

import pytest
import torch
import transformers

from dipr1_jax import tokens
from dipr1_jax.config import ConfigError
from dipr1_jax.model import (check_preset, from_hf_dict, matching_preset, param_table, preset,
                             read_hf_config, to_hf_dict)

# The released Qwen2.5-VL-3B-Instruct config.json (flat pre-v5 layout).
RELEASED_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
    "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16,
    "num_hidden_layers": 36, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280,
                      "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
                      "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
                      "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

# Parameter counts published on the Hugging Face model cards of the released checkpoints.
PUBLISHED_PARAMS = {
    "qwen2-vl-2b": 2_208_985_600,
    "qwen2-vl-7b": 8_291_375_616,
    "qwen2.5-vl-3b": 3_754_622_976,
    "qwen2.5-vl-7b": 8_292_166_656,
    "qwen2.5-vl-32b": 33.5e9,
    "qwen2.5-vl-72b": 73.4e9,
}


def _count(cfg):
    return sum(math.prod(e.hf_shape) * len(e.hf) for e in param_table(cfg))


def test_released_config_json_reads_as_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_3B))
    cfg = read_hf_config(str(tmp_path))
    check_preset(cfg, "qwen2.5-vl-3b")
    assert matching_preset(cfg) == "qwen2.5-vl-3b"
    assert cfg.text.tie_word_embeddings and cfg.vision.window_size == 112
    # transformers reads the same file to the same numbers
    hc = transformers.AutoConfig.for_model(**RELEASED_3B)
    assert hc.text_config.rope_parameters["mrope_section"] == list(cfg.text.mrope_section)
    assert hc.text_config.num_key_value_heads == cfg.text.num_kv_heads
    assert hc.vision_config.in_channels == cfg.vision.in_channels


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_preset_parameter_counts(name):
    cfg = preset(name)
    ours = _count(cfg)
    want = PUBLISHED_PARAMS[name]
    if isinstance(want, int):
        assert ours == want
    else:
        assert abs(ours - want) < 0.05e9
    # and transformers builds a model of exactly that size from our exported config.json
    hc = transformers.AutoConfig.for_model(**to_hf_dict(cfg))
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(hc)
    assert sum(p.numel() for p in model.parameters()) == ours


@pytest.mark.parametrize("name", sorted(["tiny", "bench-100m", *PUBLISHED_PARAMS]))
def test_config_json_round_trip(name):
    cfg = preset(name)
    back = from_hf_dict(json.loads(json.dumps(to_hf_dict(cfg))))
    assert back == cfg


def test_tiny_preset_uses_project_token_ids():
    cfg = preset("tiny")
    assert cfg.text.vocab_size == tokens.TINY_VOCAB_SIZE
    assert cfg.image_token_id == tokens.TINY_IMAGE_TOKEN_ID == 1006
    assert cfg.video_token_id == tokens.TINY_VIDEO_TOKEN_ID
    assert cfg.vision_start_token_id == tokens.TINY_VISION_START_TOKEN_ID
    assert cfg.vision_end_token_id == tokens.TINY_VISION_END_TOKEN_ID
    assert cfg.eos_token_id == tokens.TINY_EOS_TOKEN_ID
    assert cfg.vision.window_size and cfg.vision.fullatt_block_indexes  # windows exercised


def test_check_preset_names_the_differing_field():
    cfg = preset("qwen2.5-vl-7b")
    other = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "num_layers": 27}))
    with pytest.raises(ConfigError, match=r"text\.num_layers: config\.json has 27, preset has 28"):
        check_preset(other, "qwen2.5-vl-7b")
    assert matching_preset(other) is None


def test_bad_configs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{\n  \"model_type\": ,\n}")
    with pytest.raises(ConfigError, match=r"config\.json: invalid JSON at line 2"):
        read_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**RELEASED_3B, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        read_hf_config(str(tmp_path))
    bad = {k: v for k, v in RELEASED_3B.items() if k != "hidden_size"}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="missing field hidden_size"):
        read_hf_config(str(tmp_path))
    with pytest.raises(ConfigError, match="mrope_section"):
        from_hf_dict({**RELEASED_3B, "rope_scaling": {"type": "mrope",
                                                      "mrope_section": [16, 24, 20]}})
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("qwen3-vl")
