"""Qwen2 decoder (GQA with qkv bias, RMSNorm, SwiGLU, M-RoPE) with an optional KV cache.

``TextDecoder.__call__(inputs_embeds, position_ids, attention_mask, cache=None)``
takes embeddings (image features already scattered in), explicit M-RoPE
``position_ids [3, B, T]`` and the key mask, and returns the final-normed
hidden states plus the updated cache. The causal structure is by sequence
index (as in transformers), not by position id.

KV cache (``KVCache``): keys/values ``[layers, B, kv_heads, S_max, head_dim]``
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

from dipr1_jax.model import attention as A
from dipr1_jax.model import layers as L
from dipr1_jax.model.config import ModelConfig
from dipr1_jax.model.rope import mrope_cos_sin
from dipr1_jax.sharding import constrain

_ACT = ("batch", "seq", "act_embed")


class KVCache(NamedTuple):
    """Keys/values ``[layers, B, kv_heads, S_max, head_dim]``: heads before slots, so
    the decode-step attention is a plain batched matmul over the cache (no transpose
    copy of it per step)."""

    k: jax.Array
    v: jax.Array
    index: jax.Array  # int32 scalar: next write slot

    AXES = ("layers", "batch", "act_kv_heads", None, None)  # logical sharding axes

    @staticmethod
    def init(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        t = cfg.text
        dtype = dtype or L._dtype(cfg.dtype)
        shape = (t.num_layers, batch, t.num_kv_heads, max_len, t.head_dim)
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
        """``kv``: None (no cache), or ``(k, v, layer)`` with ``k``/``v`` the stacked
        ``[layers, B, Hkv, S, D]`` cache and ``layer`` this layer's index (updated in
        place), or ``(k, v, None)`` with this layer's ``[B, Hkv, S, D]`` slice (scan)."""
        q = L.apply_rotary(self.q_proj(x), cos, sin)
        k = L.apply_rotary(self.k_proj(x), cos, sin)
        v = self.v_proj(x)
        q = constrain(q, ("batch", "seq", "act_heads", None))
        if kv is None:
            out = A.decoder_attention(q, k, v, mask, self.scale)
            return self.o_proj(out), None
        ck, cv, layer = kv
        k, v = (jnp.swapaxes(a, 1, 2).astype(ck.dtype) for a in (k, v))  # [B, Hkv, T, D]
        if layer is None:
            ck = jax.lax.dynamic_update_slice(ck, k, (0, 0, index, 0))
            cv = jax.lax.dynamic_update_slice(cv, v, (0, 0, index, 0))
            k, v = ck, cv
        else:
            ck = jax.lax.dynamic_update_slice(ck, k[None], (layer, 0, 0, index, 0))
            cv = jax.lax.dynamic_update_slice(cv, v[None], (layer, 0, 0, index, 0))
            k, v = ck[layer], cv[layer]
        if mask.backend == "xla":
            out = cached_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask.dense, self.scale)
        else:  # [B, S, Hkv, D] for the fused kernels
            k, v = (jnp.swapaxes(a, 1, 2).astype(q.dtype) for a in (k, v))
            out = A.decoder_attention(q, k, v, mask, self.scale)
        return self.o_proj(out), (ck, cv, layer)


def cached_attention(q, k, v, mask, scale):
    """Grouped-query attention of ``q [B, T, H, D]`` over a cache ``k, v [B, Hkv, S, D]``
    with ``mask [B, 1, T, S]``; scores and softmax in float32, as
    ``jax.nn.dot_product_attention`` computes them. Returns ``[B, T, H, D]``."""
    B, T, H, D = q.shape
    hkv = k.shape[1]
    qg = q.reshape(B, T, hkv, H // hkv, D)
    f32 = jnp.float32
    s = jnp.einsum("btgrd,bgsd->bgrts", qg, k, preferred_element_type=f32) * scale
    s = jnp.where(mask[:, :, None], s, jnp.finfo(f32).min)  # mask [B, 1, 1, T, S]
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrts,bgsd->btgrd", p, v)
    return out.reshape(B, T, H, D)


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
        x = constrain(inputs_embeds.astype(L._dtype(cfg.dtype)), _ACT)
        mask, x, position_ids, attention_mask, unroll = self._attention_mask(
            attention_mask, x, position_ids, T, index)
        cos, sin = mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section)
        policy = L.remat_policy(cfg.remat)
        fn = L.remat_call(_call_layer, policy)
        if cfg.scan_layers:
            kvs = (cache.k, cache.v) if cache is not None else None

            @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
            def body(layer, x, kv):
                x, kv = fn(layer, x, cos, sin, mask, None if kv is None else (*kv, None), index)
                return x, None if kv is None else kv[:2]

            x, kv_out = body(self.layers, x, kvs)
            if cache is not None:
                cache = KVCache(kv_out[0], kv_out[1], cache.index + T)
        else:
            # The stacked cache is threaded through the layers and updated in place
            # (no per-layer slice copies or re-stacking of the whole cache per call).
            kv = None if cache is None else (cache.k, cache.v)
            for i, layer in enumerate(self.layers):
                x, kv = fn(layer, x, cos, sin, mask, None if kv is None else (*kv[:2], i), index)
            if cache is not None:
                cache = KVCache(kv[0], kv[1], cache.index + T)
        if unroll is not None:
            x = A.roll_rows(x, -unroll)
        x = self.norm(x)
        return x, cache

    def _attention_mask(self, attention_mask, x, position_ids, T: int, index):
        """The layers' ``DecoderMask`` for the configured attention backend (see
        ``model/attention.py``). cudnn without a cache rolls every row left by its first
        valid slot once here (embeddings, positions, mask; ``unroll`` undoes it on the
        output), so the layers see right-padded causal rows. Returns
        ``(mask, x, position_ids, attention_mask, unroll)``."""
        t = self.cfg.text
        if index is not None and T == 1:  # decode step: cached_attention, as always
            backend = "xla"
        else:
            backend = A.choose(self.cfg.attention, "decoder" if index is None else "decoder_cache",
                               dtype=x.dtype, head_dim=t.head_dim)
        if backend == "xla":
            return (A.DecoderMask(self.make_mask(attention_mask, T, index)), x, position_ids,
                    attention_mask, None)
        valid = attention_mask.astype(bool)
        if backend == "splash":
            return (A.DecoderMask(self.make_mask(attention_mask, T, index), valid=valid,
                                  backend=backend), x, position_ids, attention_mask, None)
        lo, length = A.key_range(valid)
        A.check_contiguous(valid, lo, length)
        unroll = None
        if index is None:
            x = constrain(A.roll_rows(x, lo), _ACT)
            position_ids = jax.vmap(lambda p: A.roll_rows(p, lo))(position_ids)
            attention_mask = A.roll_rows(attention_mask, lo)
            unroll, lo = lo, None
        mask = A.DecoderMask(self.make_mask(attention_mask, T, index), valid=None, lo=lo,
                             length=length, q_start=index, backend=backend)
        return mask, x, position_ids, attention_mask, unroll
