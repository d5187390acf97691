"""Per-token log-probabilities without materialising ``[B, T, V]`` logits.

The sequence is cut into chunks of ``chunk_size`` positions; each chunk's
logits ``[B, chunk, V]`` are computed in float32, turned into
``log_softmax[target]`` and dropped. The chunk body is rematerialised
(``jax.checkpoint``), so the backward pass also holds only one chunk of logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(hidden, lm_kernel, targets, *, chunk_size: int = 256,
                   temperature: float = 1.0, compute_dtype=None):
    """``log softmax(hidden @ lm_kernel / temperature)[target]`` as float32 ``[B, T]``.

    hidden ``[B, T, D]``, lm_kernel ``[D, V]``, targets ``[B, T]`` int.
    """
    B, T, D = hidden.shape
    c = max(1, min(chunk_size, T))
    n = -(-T // c)
    pad = n * c - T
    dt = compute_dtype or hidden.dtype
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n, c, D).swapaxes(0, 1)
    tg = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, c).swapaxes(0, 1)
    kernel = lm_kernel.astype(dt)

    @jax.checkpoint
    def chunk(args):
        hc, tc = args
        logits = jnp.einsum("bcd,dv->bcv", hc.astype(dt), kernel,
                            preferred_element_type=jnp.float32)
        if temperature != 1.0:
            logits = logits / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return picked - lse

    out = jax.lax.map(chunk, (h, tg))  # [n, B, c]
    return out.swapaxes(0, 1).reshape(B, n * c)[:, :T]


def model_token_logprobs(model, input_ids, attention_mask=None, pixel_values=None,
                         image_grid_thw=None, *, image_embeds=None, chunk_size: int = 256,
                         temperature: float = 1.0):
    """float32 ``[B, T-1]``: log p(input_ids[:, t+1] | input_ids[:, :t+1]).

    Images as ``pixel_values`` or as precomputed ``image_embeds`` (rows of
    ``model.encode_images``), not both; see ``QwenVL.hidden_states``."""
    hidden = model.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw,
                                 image_embeds=image_embeds)
    kernel = model.decoder.lm_head_kernel()
    return token_logprobs(hidden[:, :-1], kernel, jnp.asarray(input_ids)[:, 1:],
                          chunk_size=chunk_size, temperature=temperature,
                          compute_dtype=hidden.dtype)
