"""Qwen2.5-VL / Qwen2-VL for conditional generation (NNX).

Public call (the contract external checks use)::

    logits = model(input_ids, attention_mask, pixel_values, image_grid_thw)  # [B, T, V] f32

with the arrays the transformers Qwen processor produces. Position ids
(M-RoPE) are derived inside from ``input_ids``, ``attention_mask`` and
``image_grid_thw``.

Pieces for the sampler / trainer::

    img = model.encode_images(pixel_values, image_grid_thw)      # once per prompt
    pos, deltas = model.get_rope_index(input_ids, attention_mask, image_grid_thw)
    emb = model.embed(input_ids, img)                              # image-token scatter
    hidden, cache = model.decoder(emb, pos, mask, cache)           # optional KV cache
    logits = model.decoder.logits(hidden)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dipr1_jax.model.config import ModelConfig
from dipr1_jax.model.decoder import KVCache, TextDecoder
from dipr1_jax.model.rope import get_rope_index
from dipr1_jax.model.vision import VisionTower


def scatter_image_embeds(inputs_embeds, input_ids, image_embeds, image_token_id: int):
    """Replaces the embeddings of image-pad tokens, in row-major order, by the rows of
    ``image_embeds`` (the ``masked_scatter`` of transformers, with static shapes)."""
    is_img = input_ids == image_token_id
    idx = jnp.cumsum(is_img.reshape(-1)).reshape(is_img.shape) - 1
    idx = jnp.clip(idx, 0, image_embeds.shape[0] - 1)
    picked = jnp.take(image_embeds.astype(inputs_embeds.dtype), idx, axis=0)
    return jnp.where(is_img[..., None], picked, inputs_embeds)


class QwenVL(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.visual = VisionTower(cfg, rngs)
        self.decoder = TextDecoder(cfg, rngs)

    def encode_images(self, pixel_values, image_grid_thw):
        """Merged image features ``[N_patches / merge**2, hidden]`` (static ``N_patches``)."""
        return self.visual(pixel_values, image_grid_thw)

    def get_rope_index(self, input_ids, attention_mask, image_grid_thw):
        """``(position_ids [3, B, T], rope_deltas [B])``."""
        return get_rope_index(input_ids, attention_mask, image_grid_thw,
                              image_token_id=self.cfg.image_token_id,
                              spatial_merge_size=self.cfg.vision.spatial_merge_size)

    def embed(self, input_ids, image_embeds=None):
        emb = self.decoder.embed(input_ids)
        if image_embeds is not None:
            emb = scatter_image_embeds(emb, input_ids, image_embeds, self.cfg.image_token_id)
        return emb

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None,
                      image_grid_thw=None):
        """Final-normed decoder hidden states ``[B, T, hidden]``. Called eagerly (concrete
        arrays, not under jit), the inputs are checked first (:func:`check_inputs`)."""
        if pixel_values is not None and image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        args = (input_ids, pixel_values, image_grid_thw)
        if not any(isinstance(a, jax.core.Tracer) or not getattr(a, "is_fully_addressable", True)
                   for a in args):  # (multi-host global arrays cannot be read here)
            check_inputs(self.cfg, input_ids, pixel_values, image_grid_thw)
        input_ids = jnp.asarray(input_ids)
        img = None if pixel_values is None else self.encode_images(pixel_values, image_grid_thw)
        pos, _ = self.get_rope_index(input_ids, attention_mask,
                                     image_grid_thw if pixel_values is not None else None)
        emb = self.embed(input_ids, img)
        hidden, _ = self.decoder(emb, pos, attention_mask)
        return hidden

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
        """Logits ``[B, T, vocab]`` in float32."""
        return self.decoder.logits(
            self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw))

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        return KVCache.init(self.cfg, batch, max_len, dtype)


def check_inputs(cfg: ModelConfig, input_ids, pixel_values, image_grid_thw) -> None:
    """Host-side consistency checks of concrete inputs (clear errors instead of silent
    garbage): image-token count vs. grid sizes vs. number of patches, and every image
    within ``vision_max_patches`` (per-image layout)."""
    import numpy as np
    ids = np.asarray(input_ids)
    n_tok = int((ids == cfg.image_token_id).sum())
    if pixel_values is None:
        if n_tok:
            raise ValueError(f"input_ids hold {n_tok} image tokens but no pixel_values were given")
        return
    grid = np.asarray(image_grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be [num_images, 3], got shape {grid.shape}")
    m2 = cfg.vision.spatial_merge_size ** 2
    patches = int(grid.prod(-1).sum())
    if patches > np.shape(pixel_values)[0]:
        raise ValueError(f"image_grid_thw describes {patches} patches but pixel_values has only "
                         f"{np.shape(pixel_values)[0]}")
    if n_tok != patches // m2:
        raise ValueError(f"input_ids hold {n_tok} image tokens but image_grid_thw describes "
                         f"{patches // m2} merged patches")
    if cfg.vision_max_patches:
        per_image = grid.prod(-1)
        over = np.nonzero(per_image > cfg.vision_max_patches)[0]
        if over.size:
            i = int(over[0])
            raise ValueError(f"image {i} has {int(per_image[i])} patches (grid "
                             f"{grid[i].tolist()}) but ModelConfig.vision_max_patches is "
                             f"{cfg.vision_max_patches}: raise it or resize the image "
                             "(it would be cut silently)")
