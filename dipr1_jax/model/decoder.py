"""Qwen2 decoder (GQA with qkv bias, RMSNorm, SwiGLU, M-RoPE) with an optional KV cache.

``TextDecoder.__call__(inputs_embeds, position_ids, attention_mask, cache=None)``
takes embeddings (image features already scattered in), explicit M-RoPE
``position_ids [3, B, T]`` and the key mask, and returns the final-normed
hidden states plus the updated cache. The causal structure is by sequence
index (as in transformers), not by position id.

KV cache (``KVCache``): keys/values ``[layers, B, S_max, kv_heads, head_dim]``
and the write index ``index`` (shared by all rows; prompts are left-padded). A
call with a cache writes its ``T`` new keys at ``index .. index+T-1`` and
attends to every cached key ``<= `` its own index; ``attention_mask`` is then the
``[B, S_max]`` validity of the cache slots (1 for written real tokens,
including the new ones).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from dipr1_jax.model import layers as L
from dipr1_jax.model.config import ModelConfig
from dipr1_jax.model.rope import mrope_cos_sin
from dipr1_jax.sharding import constrain

_ACT = ("batch", "seq", "act_embed")


class KVCache(NamedTuple):
    k: jax.Array  # [layers, B, S_max, kv_heads, head_dim]
    v: jax.Array
    index: jax.Array  # int32 scalar: next write slot

    @staticmethod
    def init(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        t = cfg.text
        dtype = dtype or L._dtype(cfg.dtype)
        shape = (t.num_layers, batch, max_len, t.num_kv_heads, t.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        t = cfg.text
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q_proj = L.Dense((t.hidden_size,), (t.num_heads, t.head_dim), ("embed",),
                              ("heads", "head_dim"), bias=True, **kw)
        self.k_proj = L.Dense((t.hidden_size,), (t.num_kv_heads, t.head_dim), ("embed",),
                              ("kv_heads", "head_dim"), bias=True, **kw)
        self.v_proj = L.Dense((t.hidden_size,), (t.num_kv_heads, t.head_dim), ("embed",),
                              ("kv_heads", "head_dim"), bias=True, **kw)
        self.o_proj = L.Dense((t.num_heads, t.head_dim), (t.hidden_size,), ("heads", "head_dim"),
                              ("embed",), bias=False, **kw)
        self.scale = t.head_dim ** -0.5

    def __call__(self, x, cos, sin, mask, kv=None, index=None):
        q = L.apply_rotary(self.q_proj(x), cos, sin)
        k = L.apply_rotary(self.k_proj(x), cos, sin)
        v = self.v_proj(x)
        q = constrain(q, ("batch", "seq", "act_heads", None))
        if kv is not None:
            ck, cv = kv
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
            kv = (k, v)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=self.scale)
        return self.o_proj(out), kv


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        t = cfg.text
        self.input_layernorm = L.RMSNorm(t.hidden_size, t.rms_norm_eps, dtype=cfg.dtype,
                                         param_dtype=cfg.param_dtype)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = L.RMSNorm(t.hidden_size, t.rms_norm_eps, dtype=cfg.dtype,
                                                  param_dtype=cfg.param_dtype)
        self.mlp = L.GatedMLP(t.hidden_size, t.intermediate_size, act=t.hidden_act, bias=False,
                              axes=("embed", "mlp"), act_axes=("batch", "seq", "act_mlp"),
                              dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv=None, index=None):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index)
        x = constrain(x + h, _ACT)
        x = x + self.mlp(self.post_attention_layernorm(x))
        x = checkpoint_name(constrain(x, _ACT), "block_out")
        return x, kv


def _call_layer(layer, x, cos, sin, mask, kv, index):
    return layer(x, cos, sin, mask, kv, index)


class TextDecoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        t = cfg.text
        self.cfg = cfg
        pd = L._dtype(cfg.param_dtype)
        self.embed_tokens = L.param(rngs, (t.vocab_size, t.hidden_size), ("vocab", "embed"), pd)
        if cfg.scan_layers:
            @nnx.split_rngs(splits=t.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(r):
                return DecoderLayer(cfg, r)
            self.layers = make(rngs)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(t.num_layers)])
        self.norm = L.RMSNorm(t.hidden_size, t.rms_norm_eps, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype)
        self.lm_head = None if t.tie_word_embeddings else L.Dense(
            (t.hidden_size,), (t.vocab_size,), ("embed",), ("vocab",), bias=False,
            dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    # ------------------------------------------------------------------ pieces
    def embed(self, input_ids):
        emb = jnp.take(self.embed_tokens[...], input_ids, axis=0)
        return constrain(emb.astype(L._dtype(self.cfg.dtype)), _ACT)

    def lm_head_kernel(self):
        """``[hidden, vocab]`` output projection (the transposed embedding when tied)."""
        if self.lm_head is None:
            return self.embed_tokens[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden):
        """float32 logits ``[..., vocab]`` from final hidden states."""
        k = self.lm_head_kernel().astype(L._dtype(self.cfg.dtype))
        out = jnp.einsum("...d,dv->...v", hidden.astype(k.dtype), k,
                         preferred_element_type=jnp.float32)
        return constrain(out, ("batch", "seq", "act_vocab")) if out.ndim == 3 else out

    @staticmethod
    def make_mask(attention_mask, q_len: int, index=None):
        """Causal x key-validity mask ``[B, 1, T, S]`` (queries start at slot ``index``)."""
        s = attention_mask.shape[1]
        start = 0 if index is None else index
        qpos = start + jnp.arange(q_len)[:, None]
        causal = jnp.arange(s)[None, :] <= qpos
        return causal[None, None] & attention_mask.astype(bool)[:, None, None, :]

    # ------------------------------------------------------------------ forward
    def __call__(self, inputs_embeds, position_ids, attention_mask, cache: KVCache | None = None):
        cfg, t = self.cfg, self.cfg.text
        B, T, _ = inputs_embeds.shape
        if attention_mask is None:
            if cache is not None:
                raise ValueError("a KV-cache call needs the [B, S_max] attention_mask of the cache")
            attention_mask = jnp.ones((B, T), bool)
        index = None if cache is None else cache.index
        mask = self.make_mask(attention_mask, T, index)
        cos, sin = mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section)
        x = constrain(inputs_embeds.astype(L._dtype(cfg.dtype)), _ACT)
        policy = L.remat_policy(cfg.remat)
        fn = _call_layer if policy is None else nnx.remat(_call_layer, policy=policy)
        new_k, new_v = [], []
        if cfg.scan_layers:
            kvs = (cache.k, cache.v) if cache is not None else None

            @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
            def body(layer, x, kv):
                x, kv = fn(layer, x, cos, sin, mask, kv, index)
                return x, kv

            x, kv_out = body(self.layers, x, kvs)
            if cache is not None:
                new_k, new_v = kv_out
        else:
            for i, layer in enumerate(self.layers):
                kv = (cache.k[i], cache.v[i]) if cache is not None else None
                x, kv = fn(layer, x, cos, sin, mask, kv, index)
                if cache is not None:
                    new_k.append(kv[0])
                    new_v.append(kv[1])
            if cache is not None:
                new_k, new_v = jnp.stack(new_k), jnp.stack(new_v)
        x = self.norm(x)
        if cache is not None:
            cache = KVCache(new_k, new_v, cache.index + T)
        return x, cache
