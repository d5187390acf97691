"""Vision tower of Qwen2.5-VL / Qwen2-VL as an NNX module.

Input: the flat patch sequence the HF image processor produces,
``pixel_values [N, C * temporal_patch * patch * patch]`` (patches of all
images concatenated; may be zero-padded past the last image so that ``N`` is a
static bucket size, a multiple of ``spatial_merge_size**2``) and
``grid_thw [I, 3]`` (extra all-zero rows are padding images).

The Conv3d patch embedding is one matmul over the flattened patches. Attention
is split per image (and per frame) like ``cu_seqlens`` in transformers, and
non-full-attention blocks of Qwen2.5-VL additionally attend only inside their
``window_size`` window; both are expressed as masks over the static patch
sequence, so no token permutation is needed (attention inside a segment does
not depend on token order, and the 2x2 merger groups stay contiguous).
With ``ModelConfig.vision_max_patches = P`` the patches are regrouped into one
row per image (``[num_images, P]``, P >= the largest image), so attention costs
``num_images * P^2`` instead of ``N^2`` for the whole batch; the default (0)
keeps one flat row.
Output: merged image embeddings ``[N / merge**2, out_hidden_size]`` in the
order of the image tokens of the prompt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dipr1_jax.model import layers as L
from dipr1_jax.model.config import ModelConfig
from dipr1_jax.model.rope import vision_cos_sin, vision_layout
from dipr1_jax.sharding import constrain


class VisionAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        v = cfg.vision
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.qkv = L.Dense((v.hidden_size,), (3, v.num_heads, v.head_dim),
                           ("v_embed",), ("qkv", "v_heads", "head_dim"), bias=True, **kw)
        self.proj = L.Dense((v.num_heads, v.head_dim), (v.hidden_size,),
                            ("v_heads", "head_dim"), ("v_embed",), bias=True, **kw)
        self.scale = v.head_dim ** -0.5

    def __call__(self, x, cos, sin, mask):
        qkv = self.qkv(x)  # [G, P, 3, heads, hd]
        q, k, val = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        q = L.apply_rotary(q, cos, sin)
        k = L.apply_rotary(k, cos, sin)
        out = jax.nn.dot_product_attention(q, k, val, mask=mask[:, None], scale=self.scale)
        return self.proj(out)


class VisionBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        v = cfg.vision
        norm = lambda: L.make_norm(v.norm, v.hidden_size, 1e-6, cfg.dtype, cfg.param_dtype)
        self.norm1 = norm()
        self.norm2 = norm()
        self.attn = VisionAttention(cfg, rngs)
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        if v.gated_mlp:
            self.mlp = L.GatedMLP(v.hidden_size, v.intermediate_size, act=v.hidden_act, bias=True,
                                  axes=("v_embed", "v_mlp"), **kw)
        else:
            self.mlp = L.MLP(v.hidden_size, v.intermediate_size, act=v.hidden_act,
                             axes=("v_embed", "v_mlp"), **kw)

    def __call__(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        x = x + self.mlp(self.norm2(x))
        return x


class PatchMerger(nnx.Module):
    """norm -> group each m x m block into one vector -> Linear -> GELU -> Linear."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        v = cfg.vision
        self.unit = v.spatial_merge_size ** 2
        d = v.hidden_size * self.unit
        kw = dict(bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.ln_q = L.make_norm(v.norm, v.hidden_size, 1e-6, cfg.dtype, cfg.param_dtype)
        self.mlp_0 = L.Dense((d,), (d,), ("merge_in",), ("v_mlp",), **kw)
        self.mlp_2 = L.Dense((d,), (v.out_hidden_size,), ("v_mlp",), ("embed",), **kw)

    def __call__(self, x):
        x = self.ln_q(x)
        x = x.reshape(x.shape[0] // self.unit, -1)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


class VisionTower(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        v = cfg.vision
        self.cfg = cfg
        self.patch_embed = L.Dense((v.patch_dim,), (v.hidden_size,), ("patch",), ("v_embed",),
                                   bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                   rngs=rngs)
        self.blocks = nnx.List([VisionBlock(cfg, rngs) for _ in range(v.depth)])
        self.merger = PatchMerger(cfg, rngs)

    def masks(self, grid_thw, num_patches: int):
        """(full, window) attention masks ``[G, P, P]`` and the patch layout (``G = 1,
        P = num_patches`` in the flat layout; one row per image with
        ``vision_max_patches``)."""
        v = self.cfg.vision
        win = v.window_size // v.spatial_merge_size // v.patch_size if v.window_size else 0
        lay = vision_layout(grid_thw, num_patches, v.spatial_merge_size, win,
                            per_image=self.cfg.vision_max_patches)
        same = lambda a: a[:, :, None] == a[:, None, :]
        valid = lay["valid"][:, :, None] & lay["valid"][:, None, :]
        full = same(lay["image"]) & same(lay["frame"]) & valid
        window = full & same(lay["win"]) if win else full
        return full, window, lay

    def _check(self, pixel_values):
        v = self.cfg.vision
        n = pixel_values.shape[0]
        unit = v.spatial_merge_size ** 2
        if n % unit:
            raise ValueError(f"pixel_values has {n} patches, not a multiple of "
                             f"spatial_merge_size**2={unit}")
        if pixel_values.shape[1] != v.patch_dim:
            raise ValueError(f"pixel_values has {pixel_values.shape[1]} values per patch, the "
                             f"vision config expects {v.patch_dim} (channels*temporal*patch^2)")

    def _blocks(self, pixel_values, grid_thw):
        """Block outputs ``[G, P, hidden]`` and the layout."""
        v = self.cfg.vision
        self._check(pixel_values)
        full, window, lay = self.masks(grid_thw, pixel_values.shape[0])
        cos, sin = vision_cos_sin(lay["row"], lay["col"], v.head_dim, v.rope_theta)
        x = jnp.take(pixel_values, lay["index"], axis=0)  # [G, P, patch_dim]
        x = self.patch_embed(x)
        axes = ("vision_images", "vision_tokens", "act_embed")
        x = constrain(x, axes)
        policy = L.remat_policy(self.cfg.remat)
        for i, blk in enumerate(self.blocks):
            mask = full if (not v.window_size or i in v.fullatt_block_indexes) else window
            if policy is None:
                x = blk(x, cos, sin, mask)
            else:
                x = nnx.remat(lambda b, *a: b(*a), policy=policy)(blk, x, cos, sin, mask)
            x = constrain(x, axes)
        return x, lay

    def hidden_states(self, pixel_values, grid_thw):
        """Block outputs ``[N, hidden_size]`` before the merger, in patch order (flat
        layout only; for parity checks)."""
        if self.cfg.vision_max_patches:
            raise ValueError("hidden_states needs the flat layout (vision_max_patches=0)")
        return self._blocks(pixel_values, grid_thw)[0][0]

    def __call__(self, pixel_values, grid_thw):
        """Merged image embeddings ``[N / merge**2, out_hidden_size]`` in patch order."""
        x, lay = self._blocks(pixel_values, grid_thw)
        g, p, d = x.shape
        unit = self.cfg.vision.spatial_merge_size ** 2
        merged = self.merger(x.reshape(g * p, d)).reshape(g, p // unit, -1)
        if not self.cfg.vision_max_patches:
            return merged[0]
        # per-image rows back to the flat order of the image tokens
        n_out = pixel_values.shape[0] // unit
        dest = jnp.where(lay["valid"][:, ::unit], lay["index"][:, ::unit] // unit, n_out)
        out = jnp.zeros((n_out, merged.shape[-1]), merged.dtype)
        return out.at[dest.reshape(-1)].set(merged.reshape(-1, merged.shape[-1]), mode="drop")
