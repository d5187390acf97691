"""Model configuration of the Qwen2-VL / Qwen2.5-VL port (DESIGN.md section 5).

``ModelConfig`` holds the architecture (what ``config.json`` describes) plus the
runtime options of the JAX port (compute/parameter dtype, remat policy, layer
scan). Architecture fields are read from a Hugging Face ``config.json`` (the
flat pre-v5 layout of the released checkpoints and the nested v5 layout both
work) and written back in the nested layout transformers 5 saves.

Presets cover the released sizes and ``tiny`` (CPU tests, the built-in default
job; it uses the special-token ids of ``dipr1_jax/tokens.py``). Values of the
released presets are the published ``config.json`` values; ``check_preset``
compares a loaded config against one and names every differing field.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from dipr1_jax import fsio, tokens
from dipr1_jax.config import ConfigError, _Validated

ModelType = Literal["qwen2_5_vl", "qwen2_vl"]
Remat = Literal["none", "full", "dots", "dots_no_batch", "save_block_outputs"]
DType = Literal["float32", "bfloat16"]
Attention = Literal["auto", "xla", "cudnn", "splash"]


@dataclasses.dataclass(frozen=True)
class VisionConfig(_Validated):
    """Vision tower. Qwen2.5-VL: RMSNorm + SwiGLU + window attention;
    Qwen2-VL: LayerNorm + QuickGELU MLP, full attention (``window_size=0``)."""

    depth: int = 32
    hidden_size: int = 1280  # width of the blocks (Qwen2-VL calls it embed_dim)
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 2048  # merger output = decoder hidden size
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int = 112  # pixels; 0 = no window attention (Qwen2-VL)
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: Literal["silu", "quick_gelu", "gelu"] = "silu"
    norm: Literal["rms", "layer"] = "rms"
    gated_mlp: bool = True  # SwiGLU (2.5) or fc1/act/fc2 (2)
    rope_theta: float = 10000.0
    tokens_per_second: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    def validate(self):
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
                     "patch_size", "temporal_patch_size", "spatial_merge_size", "in_channels"):
            self._require(getattr(self, name) >= 1, name, "must be >= 1")
        self._require(self.hidden_size % self.num_heads == 0, "hidden_size",
                      f"must be divisible by num_heads={self.num_heads}")
        self._require(self.head_dim % 4 == 0, "hidden_size",
                      "head_dim (hidden_size / num_heads) must be divisible by 4 (2D rotary)")
        self._require(self.window_size >= 0, "window_size", "must be >= 0")
        if self.window_size:
            unit = self.spatial_merge_size * self.patch_size
            self._require(self.window_size % unit == 0 and self.window_size >= unit, "window_size",
                          f"must be a positive multiple of spatial_merge_size*patch_size={unit}")
        self._require(all(0 <= i < self.depth for i in self.fullatt_block_indexes),
                      "fullatt_block_indexes", f"must index blocks 0..{self.depth - 1}")


@dataclasses.dataclass(frozen=True)
class TextConfig(_Validated):
    """Qwen2 decoder: GQA, qkv bias, RMSNorm, SwiGLU, M-RoPE."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_layers: int = 36
    num_heads: int = 16
    num_kv_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = True
    hidden_act: Literal["silu"] = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_position_embeddings"):
            self._require(getattr(self, name) >= 1, name, "must be >= 1")
        self._require(self.hidden_size % self.num_heads == 0, "hidden_size",
                      f"must be divisible by num_heads={self.num_heads}")
        self._require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                      f"must divide num_heads={self.num_heads}")
        self._require(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        self._require(self.head_dim % 2 == 0, "hidden_size", "head_dim must be even")
        self._require(len(self.mrope_section) == 3 and sum(self.mrope_section) == self.head_dim // 2,
                      "mrope_section", f"must be 3 ints summing to head_dim/2={self.head_dim // 2}")


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Validated):
    model_type: ModelType = "qwen2_5_vl"
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643  # -1: none (only written back to config.json)
    eos_token_id: int = 151645
    pad_token_id: int = -1
    # Runtime options of the port (not part of config.json).
    dtype: DType = "float32"  # compute dtype of matmuls/activations
    param_dtype: DType = "float32"
    remat: Remat = "none"  # jax.checkpoint policy of each decoder / vision block
    scan_layers: bool = False  # nnx.scan over stacked decoder layers
    # Vision attention layout: 0 = one flat row over all patches of the batch (N^2 mask);
    # P > 0 = one row per image padded to P patches (a static bucket >= the largest image).
    vision_max_patches: int = 0
    # Attention backend of the decoder (training forward, prefill) and the vision tower
    # (model/attention.py): auto = cudnn on a CUDA GPU, splash on TPU, xla elsewhere.
    attention: Attention = "auto"

    def validate(self):
        unit = self.vision.spatial_merge_size ** 2
        self._require(self.vision_max_patches >= 0 and self.vision_max_patches % unit == 0,
                      "vision_max_patches", f"must be 0 or a positive multiple of {unit}")
        self._require(self.vision.out_hidden_size == self.text.hidden_size, "vision",
                      f"vision.out_hidden_size must equal text.hidden_size={self.text.hidden_size}")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id",
                     "vision_end_token_id"):
            self._require(0 <= getattr(self, name) < self.text.vocab_size, name,
                          f"must be a token id below vocab_size={self.text.vocab_size}")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


# --------------------------------------------------------------------------- presets

def _v25(hidden, inter, layers, heads, kv, vocab, tie, vis_inter, rope_max=128000):
    return ModelConfig(
        model_type="qwen2_5_vl",
        vision=VisionConfig(depth=32, hidden_size=1280, intermediate_size=vis_inter, num_heads=16,
                            out_hidden_size=hidden, window_size=112,
                            fullatt_block_indexes=(7, 15, 23, 31), hidden_act="silu", norm="rms",
                            gated_mlp=True, tokens_per_second=2),
        text=TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                        num_layers=layers, num_heads=heads, num_kv_heads=kv, rms_norm_eps=1e-6,
                        rope_theta=1000000.0, max_position_embeddings=rope_max,
                        tie_word_embeddings=tie))


def _v2(hidden, inter, layers, heads, kv, vocab, tie):
    return ModelConfig(
        model_type="qwen2_vl",
        vision=VisionConfig(depth=32, hidden_size=1280, intermediate_size=5120, num_heads=16,
                            out_hidden_size=hidden, window_size=0, fullatt_block_indexes=(),
                            hidden_act="quick_gelu", norm="layer", gated_mlp=False),
        text=TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                        num_layers=layers, num_heads=heads, num_kv_heads=kv, rms_norm_eps=1e-6,
                        rope_theta=1000000.0, max_position_embeddings=32768,
                        tie_word_embeddings=tie))


def _tiny():
    return ModelConfig(
        model_type="qwen2_5_vl",
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                            out_hidden_size=64, window_size=56, fullatt_block_indexes=(1,)),
        text=TextConfig(vocab_size=tokens.TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                        num_layers=2, num_heads=4, num_kv_heads=2, rms_norm_eps=1e-6,
                        rope_theta=10000.0, mrope_section=(2, 3, 3), max_position_embeddings=4096,
                        tie_word_embeddings=True),
        image_token_id=tokens.TINY_IMAGE_TOKEN_ID, video_token_id=tokens.TINY_VIDEO_TOKEN_ID,
        vision_start_token_id=tokens.TINY_VISION_START_TOKEN_ID,
        vision_end_token_id=tokens.TINY_VISION_END_TOKEN_ID,
        bos_token_id=-1, eos_token_id=tokens.TINY_EOS_TOKEN_ID,
        pad_token_id=tokens.TINY_PAD_TOKEN_ID)


# The default job trains ``small`` from scratch on small images (a 4 x 4 grid of image
# tokens). theta 1e4 as usual: a low theta (50, tried in session 3) rotates every
# frequency pair by radians over the prompt, which leaves attention no position-free
# channel to find the image tokens by content; the default scenes carry absolute
# position in their pixels instead (``data.synthetic_coord_tint``; BUILD_NOTES,
# "The default job").
ROPE_THETA_SMALL = 10000.0


def _small():
    """~1.2M parameters: the built-in default job (CPU, minutes). Same ids as ``tiny``."""
    return _tiny().replace(
        vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                            out_hidden_size=128, window_size=56, fullatt_block_indexes=(1,)),
        text=TextConfig(vocab_size=tokens.TINY_VOCAB_SIZE, hidden_size=128, intermediate_size=384,
                        num_layers=4, num_heads=4, num_kv_heads=2, rms_norm_eps=1e-6,
                        rope_theta=ROPE_THETA_SMALL, mrope_section=(2, 7, 7),
                        max_position_embeddings=4096, tie_word_embeddings=True))


def _bench_100m():
    """~100M parameters (CPU benchmark): 8-layer 640-wide decoder, 4-block vision tower."""
    return ModelConfig(
        model_type="qwen2_5_vl",
        vision=VisionConfig(depth=4, hidden_size=256, intermediate_size=688, num_heads=4,
                            out_hidden_size=640, window_size=112, fullatt_block_indexes=(3,)),
        text=TextConfig(vocab_size=32768, hidden_size=640, intermediate_size=2560, num_layers=8,
                        num_heads=10, num_kv_heads=2, mrope_section=(8, 12, 12),
                        rope_theta=1000000.0, tie_word_embeddings=False),
        image_token_id=tokens.TINY_IMAGE_TOKEN_ID, video_token_id=tokens.TINY_VIDEO_TOKEN_ID,
        vision_start_token_id=tokens.TINY_VISION_START_TOKEN_ID,
        vision_end_token_id=tokens.TINY_VISION_END_TOKEN_ID,
        bos_token_id=-1, eos_token_id=tokens.TINY_EOS_TOKEN_ID,
        pad_token_id=tokens.TINY_PAD_TOKEN_ID)


PRESETS = {
    "tiny": _tiny,
    "small": _small,
    "bench-100m": _bench_100m,
    "qwen2-vl-2b": lambda: _v2(1536, 8960, 28, 12, 2, 151936, True),
    "qwen2-vl-7b": lambda: _v2(3584, 18944, 28, 28, 4, 152064, False),
    "qwen2.5-vl-3b": lambda: _v25(2048, 11008, 36, 16, 2, 151936, True, 3420),
    "qwen2.5-vl-7b": lambda: _v25(3584, 18944, 28, 28, 4, 152064, False, 3420),
    "qwen2.5-vl-32b": lambda: _v25(5120, 27648, 64, 40, 8, 152064, False, 3456),
    "qwen2.5-vl-72b": lambda: _v25(8192, 29568, 80, 64, 8, 152064, False, 3456),
}


def preset(name: str, **runtime: Any) -> ModelConfig:
    """A preset by name (``tiny``, ``qwen2.5-vl-3b``, ...), with runtime overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]().replace(**runtime) if runtime else PRESETS[name]()


def _architecture(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    for k in ("dtype", "param_dtype", "remat", "scan_layers", "vision_max_patches", "attention",
              "bos_token_id", "eos_token_id", "pad_token_id"):
        d.pop(k)
    return d


def flatten_dict(d: dict, prefix: str = "") -> dict:
    """``{'a.b': leaf}`` of a nested dict."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_preset(cfg: ModelConfig, name: str) -> None:
    """Raises ConfigError naming every architecture field where ``cfg`` differs from preset."""
    want = flatten_dict(_architecture(preset(name)))
    got = flatten_dict(_architecture(cfg))
    diff = [f"{k}: config.json has {got[k]!r}, preset has {want[k]!r}"
            for k in want if got[k] != want[k]]
    if diff:
        raise ConfigError(f"config differs from preset {name!r}: " + "; ".join(diff))


def matching_preset(cfg: ModelConfig) -> str | None:
    """Name of the released/tiny preset whose architecture equals ``cfg``, else None."""
    arch = _architecture(cfg)
    for name in PRESETS:
        if _architecture(preset(name)) == arch:
            return name
    return None


# --------------------------------------------------------------------------- config.json

def _get(d: dict, *names, default=None, required=False, where=""):
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    if required:
        raise ConfigError(f"{where}: missing field {' / '.join(names)}")
    return default


def from_hf_dict(raw: dict, where: str = "config.json", **runtime: Any) -> ModelConfig:
    """ModelConfig from a parsed ``config.json`` (flat pre-v5 or nested v5 layout)."""
    model_type = raw.get("model_type")
    if model_type not in ("qwen2_5_vl", "qwen2_vl"):
        raise ConfigError(f"{where}: model_type {model_type!r} is not 'qwen2_5_vl' or 'qwen2_vl'")
    text = dict(raw)
    text.update(raw.get("text_config") or {})
    vis = raw.get("vision_config")
    if not isinstance(vis, dict):
        raise ConfigError(f"{where}: missing vision_config")
    if text.get("use_sliding_window"):
        raise ConfigError(f"{where}: use_sliding_window=true is not supported by the port")
    rope = dict(text.get("rope_scaling") or {})
    rope.update(text.get("rope_parameters") or {})
    rope_theta = _get(rope, "rope_theta", default=_get(text, "rope_theta", default=1000000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ConfigError(f"{where}: rope_type {rope_type!r} is not supported (default/mrope only)")
    heads = _get(text, "num_attention_heads", required=True, where=where)
    hidden = _get(text, "hidden_size", required=True, where=where)
    section = tuple(rope.get("mrope_section", (16, 24, 24)))
    tie = bool(raw.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
    tcfg = TextConfig(
        vocab_size=_get(text, "vocab_size", required=True, where=where),
        hidden_size=hidden,
        intermediate_size=_get(text, "intermediate_size", required=True, where=where),
        num_layers=_get(text, "num_hidden_layers", required=True, where=where),
        num_heads=heads,
        num_kv_heads=_get(text, "num_key_value_heads", default=heads),
        rms_norm_eps=float(_get(text, "rms_norm_eps", default=1e-6)),
        rope_theta=float(rope_theta),
        mrope_section=section,
        max_position_embeddings=_get(text, "max_position_embeddings", default=32768),
        tie_word_embeddings=tie,
        hidden_act=_get(text, "hidden_act", default="silu"),
    )
    vrope = vis.get("rope_parameters") or {}
    vtheta = float(_get(vrope, "rope_theta", default=10000.0))
    if model_type == "qwen2_5_vl":
        vcfg = VisionConfig(
            depth=_get(vis, "depth", required=True, where=where + " vision_config"),
            hidden_size=_get(vis, "hidden_size", required=True, where=where + " vision_config"),
            intermediate_size=_get(vis, "intermediate_size", required=True,
                                   where=where + " vision_config"),
            num_heads=_get(vis, "num_heads", required=True, where=where + " vision_config"),
            out_hidden_size=_get(vis, "out_hidden_size", default=hidden),
            patch_size=_get(vis, "patch_size", "spatial_patch_size", default=14),
            temporal_patch_size=_get(vis, "temporal_patch_size", default=2),
            spatial_merge_size=_get(vis, "spatial_merge_size", default=2),
            in_channels=_get(vis, "in_channels", "in_chans", default=3),
            window_size=_get(vis, "window_size", default=112),
            fullatt_block_indexes=tuple(_get(vis, "fullatt_block_indexes", default=())),
            hidden_act=_get(vis, "hidden_act", default="silu"),
            norm="rms", gated_mlp=True, rope_theta=vtheta,
            tokens_per_second=_get(vis, "tokens_per_second", default=2),
        )
    else:
        embed = _get(vis, "embed_dim", required=True, where=where + " vision_config")
        vcfg = VisionConfig(
            depth=_get(vis, "depth", required=True, where=where + " vision_config"),
            hidden_size=embed,
            intermediate_size=int(embed * _get(vis, "mlp_ratio", default=4)),
            num_heads=_get(vis, "num_heads", required=True, where=where + " vision_config"),
            out_hidden_size=_get(vis, "hidden_size", default=hidden),
            patch_size=_get(vis, "patch_size", "spatial_patch_size", default=14),
            temporal_patch_size=_get(vis, "temporal_patch_size", default=2),
            spatial_merge_size=_get(vis, "spatial_merge_size", default=2),
            in_channels=_get(vis, "in_channels", "in_chans", default=3),
            window_size=0, fullatt_block_indexes=(),
            hidden_act=_get(vis, "hidden_act", default="quick_gelu"),
            norm="layer", gated_mlp=False, rope_theta=vtheta,
        )
    return ModelConfig(
        model_type=model_type, vision=vcfg, text=tcfg,
        image_token_id=_get(raw, "image_token_id", default=151655),
        video_token_id=_get(raw, "video_token_id", default=151656),
        vision_start_token_id=_get(raw, "vision_start_token_id", default=151652),
        vision_end_token_id=_get(raw, "vision_end_token_id", default=151653),
        bos_token_id=_token_id(text.get("bos_token_id")),
        eos_token_id=_token_id(text.get("eos_token_id")),
        pad_token_id=_token_id(text.get("pad_token_id")),
        **runtime)


def _token_id(x) -> int:
    if isinstance(x, list):
        x = x[0] if x else None
    return -1 if x is None else int(x)


def read_hf_config(path: str, **runtime: Any) -> ModelConfig:
    """Reads ``<path>/config.json`` (``path`` local or a ``gs://`` URI); errors name the file."""
    fname = fsio.join(path, "config.json")
    if not fsio.isfile(fname):
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        raw = json.loads(fsio.read_text(fname))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{fname}: invalid JSON at line {e.lineno}: {e.msg}") from None
    try:
        return from_hf_dict(raw, where=fname, **runtime)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(fname) else f"{fname}: {msg}") from None


def to_hf_dict(cfg: ModelConfig) -> dict:
    """The nested (transformers 5) ``config.json`` dict of ``cfg``."""
    t, v = cfg.text, cfg.vision
    text = {
        "model_type": f"{cfg.model_type}_text",
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
        "hidden_act": t.hidden_act, "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings, "use_sliding_window": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                            "mrope_section": list(t.mrope_section)},
        "attention_dropout": 0.0, "tie_word_embeddings": t.tie_word_embeddings,
    }
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(cfg, name)
        text[name] = None if value < 0 else value
    common = {"depth": v.depth, "num_heads": v.num_heads, "patch_size": v.patch_size,
              "temporal_patch_size": v.temporal_patch_size, "in_channels": v.in_channels,
              "spatial_merge_size": v.spatial_merge_size, "hidden_act": v.hidden_act,
              "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}}
    if cfg.model_type == "qwen2_5_vl":
        vision = dict(common, model_type="qwen2_5_vl_vision", hidden_size=v.hidden_size,
                      intermediate_size=v.intermediate_size, out_hidden_size=v.out_hidden_size,
                      window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
                      tokens_per_second=v.tokens_per_second)
        arch = "Qwen2_5_VLForConditionalGeneration"
    else:
        if v.intermediate_size % v.hidden_size:
            raise ConfigError("qwen2_vl export needs intermediate_size = mlp_ratio * hidden_size")
        vision = dict(common, model_type="qwen2_vl_vision", embed_dim=v.hidden_size,
                      hidden_size=v.out_hidden_size, mlp_ratio=v.intermediate_size // v.hidden_size)
        arch = "Qwen2VLForConditionalGeneration"
    return {
        "architectures": [arch], "model_type": cfg.model_type,
        "text_config": text, "vision_config": vision,
        "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
        "dtype": cfg.param_dtype,
    }
