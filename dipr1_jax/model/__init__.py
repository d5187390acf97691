"""Flax NNX port of Qwen2.5-VL / Qwen2-VL (DESIGN.md section 5).

Public API::

    from dipr1_jax.model import load_hf, save_hf, QwenVL, preset
    model = load_hf(path, param_dtype="float32", dtype="bfloat16", mesh=None)  # params / compute
    logits = model(input_ids, attention_mask, pixel_values, image_grid_thw)   # [B, T, V]
"""

from dipr1_jax.model.config import (ModelConfig, TextConfig, VisionConfig, PRESETS, preset,
                                    check_preset, matching_preset, read_hf_config, from_hf_dict,
                                    to_hf_dict)
from dipr1_jax.model.decoder import KVCache, TextDecoder
from dipr1_jax.model.vision import VisionTower
from dipr1_jax.model.qwen_vl import QwenVL, scatter_image_embeds, check_inputs
from dipr1_jax.model.rope import get_rope_index, text_position_ids
from dipr1_jax.model.hf_io import CheckpointError, load_hf, save_hf, param_table
from dipr1_jax.model.init import create_model
from dipr1_jax.model.logprobs import token_logprobs, model_token_logprobs

__all__ = [
    "ModelConfig", "TextConfig", "VisionConfig", "PRESETS", "preset", "check_preset",
    "matching_preset", "read_hf_config", "from_hf_dict", "to_hf_dict", "KVCache", "TextDecoder",
    "VisionTower", "QwenVL", "scatter_image_embeds", "check_inputs", "get_rope_index",
    "text_position_ids", "CheckpointError", "load_hf", "save_hf", "param_table", "create_model",
    "token_logprobs", "model_token_logprobs",
]
