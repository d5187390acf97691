"""Helpers for the model parity tests: tiny random transformers Qwen-VL checkpoints and
processor-shaped inputs (no downloads)."""

from __future__ import annotations

import os

import numpy as np

from dipr1_jax import tokens

IMG = tokens.TINY_IMAGE_TOKEN_ID
VSTART = tokens.TINY_VISION_START_TOKEN_ID
VEND = tokens.TINY_VISION_END_TOKEN_ID
PAD = tokens.TINY_PAD_TOKEN_ID


def hf_config(kind: str = "qwen2_5_vl", *, tie: bool = True, window: int = 56,
              fullatt=(1,), depth: int = 2, layers: int = 2, vocab: int = tokens.TINY_VOCAB_SIZE,
              hidden: int = 64, heads: int = 4, kv_heads: int = 2, vis_hidden: int = 32,
              vis_heads: int = 2):
    """A tiny transformers Qwen2.5-VL / Qwen2-VL config (eager attention)."""
    import transformers
    hd = hidden // heads
    sec = [hd // 2 - 2 * (3 * hd // 16), 3 * hd // 16, 3 * hd // 16]
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                rms_norm_eps=1e-6, max_position_embeddings=4096, bos_token_id=None,
                eos_token_id=tokens.TINY_EOS_TOKEN_ID, pad_token_id=PAD,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": sec})
    ids = dict(image_token_id=IMG, video_token_id=tokens.TINY_VIDEO_TOKEN_ID,
               vision_start_token_id=VSTART, vision_end_token_id=VEND, tie_word_embeddings=tie)
    if kind == "qwen2_5_vl":
        vision = dict(depth=depth, hidden_size=vis_hidden, intermediate_size=2 * vis_hidden,
                      num_heads=vis_heads, out_hidden_size=hidden, window_size=window,
                      fullatt_block_indexes=list(fullatt))
        cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    else:
        vision = dict(depth=depth, embed_dim=vis_hidden, hidden_size=hidden, num_heads=vis_heads,
                      mlp_ratio=4)
        cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    cfg._attn_implementation = "eager"
    return cfg


def hf_model(cfg, seed: int = 0):
    import torch
    import transformers
    torch.manual_seed(seed)
    cls = (transformers.Qwen2_5_VLForConditionalGeneration if cfg.model_type == "qwen2_5_vl"
           else transformers.Qwen2VLForConditionalGeneration)
    model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    # Random init gives near-zero biases and unit norms; perturb every tensor so that
    # biases, norm weights and layouts are all exercised by the parity tests.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def save_checkpoint(model, path: str, max_shard_size=None) -> str:
    os.makedirs(path, exist_ok=True)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    return path


def build_batch(grids, texts, *, padding: str = "left", seed: int = 0, patch_dim: int = 1176,
                merge: int = 2, images_per_row=None):
    """Token rows ``[text, <vs>, <img>*n, <ve>, text, ...]`` padded to one length.

    ``grids``: list of (t, h, w) per image in order; ``images_per_row``: how many of them
    each row holds (default one each); ``texts``: per row, the lengths of the text runs
    (len = images in the row + 1). Returns numpy input_ids, attention_mask, pixel_values,
    image_grid_thw.
    """
    rng = np.random.default_rng(seed)
    images_per_row = images_per_row or [1] * len(texts)
    rows, gi = [], 0
    for r, runs in enumerate(texts):
        k = images_per_row[r]
        assert len(runs) == k + 1
        row = list(rng.integers(0, tokens.TINY_NUM_REGULAR, runs[0]))
        for j in range(k):
            t, h, w = grids[gi]
            gi += 1
            row += [VSTART] + [IMG] * (t * h * w // merge ** 2) + [VEND]
            row += list(rng.integers(0, tokens.TINY_NUM_REGULAR, runs[j + 1]))
        rows.append(row)
    T = max(map(len, rows))
    ids = np.full((len(rows), T), PAD, np.int64)
    mask = np.zeros((len(rows), T), np.int64)
    for r, row in enumerate(rows):
        if padding == "left":
            ids[r, T - len(row):] = row
            mask[r, T - len(row):] = 1
        else:
            ids[r, :len(row)] = row
            mask[r, :len(row)] = 1
    grid = np.asarray(grids, np.int64).reshape(-1, 3)
    n = int(grid.prod(-1).sum())
    pixels = rng.standard_normal((n, patch_dim)).astype(np.float32)
    return ids, mask, pixels, grid


def hf_forward(model, ids, mask, pixels=None, grid=None):
    """transformers logits (numpy) for numpy inputs."""
    import torch
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if pixels is not None:
        kw.update(pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
                  mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)))
    with torch.no_grad():
        return model(**kw).logits.float().numpy()


# ---------------------------------------------------------------- jitted JAX side

def _jit(fn, **kw):
    """jax.jit at XLA backend optimisation level 0: numerics are unchanged and CPU
    compiles of these tiny models are 2-3x faster (the test budget is compile-bound)."""
    import jax
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kw)


def _outputs(graphdef, state, ids, mask, pix, grid):
    from flax import nnx
    model = nnx.merge(graphdef, state)
    logits = model(ids, mask, pix, grid)
    img = None if pix is None else model.encode_images(pix, grid)
    pos, deltas = model.get_rope_index(ids, mask, grid)
    return logits, img, pos, deltas


_outputs_jit = None


def jax_outputs(model, ids, mask, pix=None, grid=None):
    """(logits, image embeddings, position ids, rope deltas) of the JAX model, as numpy."""
    global _outputs_jit
    import jax
    import jax.numpy as jnp
    from flax import nnx
    if _outputs_jit is None:
        _outputs_jit = _jit(_outputs, static_argnums=0)
    graphdef, state = nnx.split(model)
    conv = lambda x: None if x is None else jnp.asarray(x)
    out = _outputs_jit(graphdef, state, conv(ids), conv(mask), conv(pix), conv(grid))
    return jax.tree.map(np.asarray, out)
