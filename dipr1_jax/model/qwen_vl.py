"""Qwen2.5-VL / Qwen2-VL for conditional generation (NNX).

Public call (the contract external checks use)::

    logits = model(input_ids, attention_mask, pixel_values, image_grid_thw)  # [B, T, V] f32

with the arrays the transformers Qwen processor produces. Position ids
(M-RoPE) are derived inside from ``input_ids``, ``attention_mask`` and
``image_grid_thw``.

Pieces for the sampler / trainer::

    img = model.encode_images(pixel_values, image_grid_thw)      # once per prompt
    pos, deltas = model.get_rope_index(input_ids, attention_mask, image_grid_thw)
    emb = model.embed(input_ids, img)       # image-token scatter (too few rows: error)
    hidden, cache = model.decoder(emb, pos, mask, cache)           # optional KV cache
    logits = model.decoder.logits(hidden)
    # or, with precomputed image features (e.g. shared by a prompt's G completions):
    hidden = model.hidden_states(input_ids, mask, image_grid_thw=grid, image_embeds=img)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dipr1_jax.model.config import ModelConfig
from dipr1_jax.model.decoder import KVCache, TextDecoder
from dipr1_jax.model.rope import get_rope_index
from dipr1_jax.model.vision import VisionTower


def _raise_if_too_few_rows(n_tokens, n_rows: int):
    import numpy as np
    n_tokens = int(np.max(np.asarray(n_tokens)))  # (a batch of counts under vmap)
    if n_tokens > n_rows:
        raise ValueError(
            f"image-token / image-embedding mismatch: input_ids hold {n_tokens} image tokens "
            f"but only {n_rows} image-embedding rows were given (pixel_values, image_grid_thw "
            "and the image-pad tokens of the batch disagree)")


def scatter_image_embeds(inputs_embeds, input_ids, image_embeds, image_token_id: int):
    """Replaces the embeddings of image-pad tokens, in row-major order, by the rows of
    ``image_embeds`` (the ``masked_scatter`` of transformers, with static shapes).

    ``image_embeds`` may have MORE rows than there are image tokens (patch counts are
    padded to buckets with all-zero images; the extra rows are unused). FEWER rows is
    an error: called on concrete arrays it raises a ``ValueError`` naming both counts;
    under ``jax.jit`` the image tokens without a row get NaN features, never another
    image's, so the loss or the sampled row turns non-finite (the trainer's non-finite
    guard and the sampler's ``nonfinite`` flag catch it). The trainer and the sampler
    check their batches on the host before the jitted call (``check_inputs``), which
    names the counts. (No host callback is traced here: a program holding one is never
    written to JAX's persistent compilation cache.)
    """
    is_img = input_ids == image_token_id
    n_rows = image_embeds.shape[0]
    if not isinstance(input_ids, jax.core.Tracer) and getattr(input_ids, "is_fully_addressable",
                                                              True):
        import numpy as np  # (numpy: inside a trace, jnp on constants would be traced)
        _raise_if_too_few_rows(int((np.asarray(input_ids) == image_token_id).sum()), n_rows)
    idx = jnp.maximum(jnp.cumsum(is_img.reshape(-1)).reshape(is_img.shape) - 1, 0)
    picked = jnp.take(image_embeds.astype(inputs_embeds.dtype), idx, axis=0, mode="fill",
                      fill_value=jnp.nan)
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
        """Token embeddings with the image-pad tokens replaced by ``image_embeds`` rows.
        Without ``image_embeds`` (the decode loop) nothing is checked or scattered."""
        emb = self.decoder.embed(input_ids)
        if image_embeds is not None:
            emb = scatter_image_embeds(emb, input_ids, image_embeds, self.cfg.image_token_id)
        return emb

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None,
                      image_grid_thw=None, *, image_embeds=None):
        """Final-normed decoder hidden states ``[B, T, hidden]``.

        Images come either as ``pixel_values`` (encoded here) or as precomputed
        ``image_embeds`` (the rows of :meth:`encode_images`, e.g. computed once per
        prompt and repeated for its G completions), never both; ``image_grid_thw``
        is needed either way (M-RoPE positions). Called eagerly (concrete arrays,
        not under jit), the inputs are checked first (:func:`check_inputs`)."""
        if pixel_values is not None and image_embeds is not None:
            raise ValueError("give pixel_values or image_embeds, not both")
        has_img = pixel_values is not None or image_embeds is not None
        if has_img and image_grid_thw is None:
            raise ValueError(("pixel_values" if pixel_values is not None else "image_embeds")
                             + " given without image_grid_thw")
        args = (input_ids, pixel_values, image_grid_thw, image_embeds)
        if not any(isinstance(a, jax.core.Tracer) or not getattr(a, "is_fully_addressable", True)
                   for a in args):  # (multi-host global arrays cannot be read here)
            check_inputs(self.cfg, input_ids, pixel_values, image_grid_thw,
                         image_embeds=image_embeds)
        input_ids = jnp.asarray(input_ids)
        img = image_embeds
        if pixel_values is not None:
            img = self.encode_images(pixel_values, image_grid_thw)
        pos, _ = self.get_rope_index(input_ids, attention_mask,
                                     image_grid_thw if has_img else None)
        emb = self.embed(input_ids, img)
        hidden, _ = self.decoder(emb, pos, attention_mask)
        return hidden

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
        """Logits ``[B, T, vocab]`` in float32."""
        return self.decoder.logits(
            self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw))

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        return KVCache.init(self.cfg, batch, max_len, dtype)


def check_inputs(cfg: ModelConfig, input_ids, pixel_values, image_grid_thw, *,
                 image_embeds=None) -> None:
    """Host-side consistency checks of concrete inputs (clear errors instead of silent
    garbage): image-token count vs. grid sizes vs. number of patches (or rows of
    precomputed ``image_embeds``), and every image within ``vision_max_patches``
    (per-image layout)."""
    import numpy as np
    ids = np.asarray(input_ids)
    n_tok = int((ids == cfg.image_token_id).sum())
    if pixel_values is None and image_embeds is None:
        if n_tok:
            raise ValueError(f"input_ids hold {n_tok} image tokens but no pixel_values were given")
        return
    grid = np.asarray(image_grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be [num_images, 3], got shape {grid.shape}")
    m2 = cfg.vision.spatial_merge_size ** 2
    patches = int(grid.prod(-1).sum())
    if pixel_values is not None and patches > np.shape(pixel_values)[0]:
        raise ValueError(f"image_grid_thw describes {patches} patches but pixel_values has only "
                         f"{np.shape(pixel_values)[0]}")
    if image_embeds is not None and patches // m2 > np.shape(image_embeds)[0]:
        raise ValueError(f"image_grid_thw describes {patches // m2} merged patches but "
                         f"image_embeds has only {np.shape(image_embeds)[0]} rows")
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
