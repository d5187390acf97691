"""The training forward: log-probs of completions with the vision tower run once per prompt.

A GRPO batch holds ``B`` prompts and ``G`` completions each. The public
trainers (TRL, VLM-R1) repeat every prompt and image G times and run the
vision tower and the decoder on each copy; here the prompt is processed once
(vision tower, image-token scatter, M-RoPE positions, and the decoder over the
prompt, whose keys/values are shared by the G completion rows of its group:
causal attention makes them independent of the completions), so gradients from
all G completions flow back into the one shared prompt computation. The joined sequence of row ``(b, g)`` is the left-padded prompt of
``b`` followed by completion ``g`` (right-padded after its stop token); the
completion tokens take M-RoPE position ``max(prompt positions) + 1 + step`` on
all three sections, exactly as :mod:`dipr1_jax.sampler` fed them, so the
teacher-forced log-probs equal the sampler's.

Log-probs are computed for completion positions only (no lm-head over the
prompt and image positions), in float32 and in sequence chunks
(:func:`dipr1_jax.model.token_logprobs`).
"""

from __future__ import annotations

import jax.numpy as jnp

from dipr1_jax.model.decoder import KVCache
from dipr1_jax.model.logprobs import token_logprobs


def encode_prompts(model, input_ids, attention_mask, pixel_values=None, image_grid_thw=None):
    """``(embeddings [B, Tp, D], positions [3, B, Tp], next_position [B])`` of the prompts."""
    img = None if pixel_values is None else model.encode_images(pixel_values, image_grid_thw)
    pos, _ = model.get_rope_index(input_ids, attention_mask,
                                  None if pixel_values is None else image_grid_thw)
    emb = model.embed(input_ids, img)
    return emb, pos, jnp.max(pos, axis=(0, 2)) + 1


def completion_logprobs(model, input_ids, attention_mask, pixel_values, image_grid_thw,
                        completion, completion_mask, *, temperature: float = 1.0,
                        chunk_size: int = 256):
    """float32 ``[B, G, Tc]``: log p(completion[b, g, t] | prompt b, completion[b, g, :t]).

    Args:
      input_ids, attention_mask: ``[B, Tp]`` left-padded prompts.
      pixel_values, image_grid_thw: the prompts' images (processor layout) or None.
      completion: ``[B, G, Tc]`` int tokens; completion_mask ``[B, G, Tc]`` (1 up to
        and including the stop token).
      temperature: the sampling temperature (the log-probs of the tempered
        distribution, as the sampler reports them).
    """
    B, G, Tc = completion.shape
    Tp = input_ids.shape[1]
    emb, pos, next_pos = encode_prompts(model, input_ids, attention_mask, pixel_values,
                                        image_grid_thw)
    # The prompt runs through the decoder once per prompt, writing its keys/values into a
    # cache of Tp + Tc slots; the cache is repeated to the G rows of the group (gradients
    # of the G completions sum into it) and the completions attend to it.
    S = Tp + Tc
    pmask = jnp.zeros((B, S), bool).at[:, :Tp].set(attention_mask.astype(bool))
    hidden_p, cache = model.decoder(emb, pos, pmask, model.init_cache(B, S))
    cache = KVCache(jnp.repeat(cache.k, G, axis=1), jnp.repeat(cache.v, G, axis=1), cache.index)
    comp = completion.reshape(B * G, Tc)
    cpos = next_pos[:, None] + jnp.arange(Tc, dtype=pos.dtype)[None]  # [B, Tc]
    cpos = jnp.broadcast_to(cpos[None, :, None], (3, B, G, Tc)).reshape(3, B * G, Tc)
    mask = jnp.concatenate([jnp.repeat(attention_mask.astype(bool), G, axis=0),
                            completion_mask.reshape(B * G, Tc).astype(bool)], axis=1)
    hidden_c, _ = model.decoder(model.embed(comp), cpos, mask, cache)
    # Token t of a completion is predicted from the hidden state before it: the prompt's
    # last one (left padding: the last slot is real) for t = 0, then the completion's.
    h = jnp.concatenate([jnp.repeat(hidden_p[:, -1:], G, axis=0), hidden_c[:, :-1]], axis=1)
    lp = token_logprobs(h, model.decoder.lm_head_kernel(), comp, chunk_size=chunk_size,
                        temperature=temperature, compute_dtype=h.dtype)
    return lp.reshape(B, G, Tc)
