"""Rollout engine: prefill each prompt once, decode G completions per prompt.

``generate`` runs two jitted programs:

* **prefill** over ``[B, T_prompt]`` (left-padded): the vision tower once per
  image, M-RoPE positions, the image-token scatter and the decoder over the
  prompt, writing a KV cache of ``T_prompt + max_new_tokens`` slots. Its last
  logits, the cache, the cache mask and the next M-RoPE position are then
  repeated to ``B * G`` rows (row ``b * G + g``, prompt-major, as the rewards
  expect), so the G completions of a group share one prefill.
* **decode**: a ``lax.while_loop`` that samples one token per row per step
  (temperature, top-k, top-p, per-row PRNG keys), feeds it back through the
  decoder with the cache (donated), and stops early once every row has emitted
  a stop token, or after ``max_new_tokens``. New tokens take M-RoPE position
  ``max(prompt positions) + 1 + step`` on all three sections, as
  transformers does after an image prompt.

Log-probs are those of the sampling distribution before truncation:
``log_softmax(logits / temperature)`` (raw logits when temperature is 0), in
float32, the quantity GRPO uses as ``old_logp`` when mu = 1.

Prompt lengths and patch counts are padded up to buckets (``PROMPT_BUCKET``,
``PATCH_BUCKET`` multiples) so that a run compiles once per bucket;
``compile_log()`` lists the compilations.
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from dipr1_jax import multihost
from dipr1_jax.sharding import constrain

PROMPT_BUCKET = 64  # prompt lengths are padded (on the left) to a multiple of this
PATCH_BUCKET = 256  # pixel_values rows are padded to a multiple of this (x merge**2)

_COMPILES: list[dict] = []
_SEEN: set = set()


class SampleOutput(NamedTuple):
    """``tokens [B, G, T]`` (``pad_token_id`` after a row's end), ``lengths [B, G]``
    (tokens up to and including the stop token), ``logprobs [B, G, T]`` float32
    (0 after the end), ``texts`` (``B`` lists of ``G`` strings, when a
    tokenizer was given), and ``nonfinite [B, G]``: rows whose logits turned
    NaN/inf (a diverged policy or a corrupt image); such a row stops at that
    step (its tokens so far are kept, the rest is padding) and should be
    dropped from the update, not scored."""

    tokens: np.ndarray
    lengths: np.ndarray
    logprobs: np.ndarray
    texts: list | None = None
    nonfinite: np.ndarray | None = None


def compile_log() -> list[dict]:
    """One entry per compiled (program, shape bucket) of this process."""
    return list(_COMPILES)


def _note_compile(kind: str, key: tuple) -> None:
    if (kind, key) in _SEEN:
        return
    _SEEN.add((kind, key))
    _COMPILES.append({"program": kind, "key": key})
    logging.info("sampler: compiling %s for %s (%d compilations so far)", kind, key,
                 len(_COMPILES))


def sample_token(logits, key, temperature: float, top_k: int = 0, top_p: float = 1.0,
                 suppress: tuple = ()):
    """One token per row from ``logits [N, V]`` and its float32 log-prob.

    Token ids in ``suppress`` are never emitted. ``temperature == 0`` is
    greedy (first max). Otherwise the logits are divided by the temperature,
    cut to the ``top_k`` largest (0: all) and to the smallest prefix of the
    sorted distribution whose mass reaches ``top_p``, and sampled. The log-prob
    is that of the untruncated tempered distribution (what a teacher-forced
    forward of the policy computes). ``key``: one PRNG key per row.
    """
    u = None
    if temperature != 0:
        u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(key)
    return _sample_with_uniform(logits, u, temperature, top_k, top_p, suppress)


def _sample_with_uniform(logits, u, temperature, top_k=0, top_p=1.0, suppress=()):
    """:func:`sample_token` with the row's uniform ``u [N]`` in [0, 1) given."""
    logits = logits.astype(jnp.float32)
    banned = jnp.asarray(suppress, jnp.int32) if suppress else None
    if temperature == 0:
        logp = jax.nn.log_softmax(logits, axis=-1)
        pick = logits if banned is None else logits.at[:, banned].set(-jnp.inf)
        tok = jnp.argmax(pick, axis=-1)
        return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    scaled = logits / temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)
    masked = scaled if banned is None else scaled.at[:, banned].set(-jnp.inf)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        masked = jnp.where(scaled < kth, -jnp.inf, masked)
    if top_p < 1.0:
        sorted_desc = -jnp.sort(-masked, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each entry
        keep = before < top_p  # the first entry is always kept
        cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        masked = jnp.where(masked < cutoff, -jnp.inf, masked)
    # Inverse-CDF sampling: one uniform per row instead of a Gumbel variate per
    # vocabulary entry (the PRNG cost of categorical dominates CPU decode steps).
    probs = jax.nn.softmax(masked, axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = (1.0 - u)[:, None] * cdf[:, -1:]  # (0, 1] of the mass
    # First index with cdf >= u: it has positive mass, so truncated tokens never appear.
    tok = jnp.minimum(jnp.sum(cdf < u, axis=-1), logits.shape[-1] - 1)
    return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def _constrain_cache(cache):
    from dipr1_jax.model.decoder import KVCache
    return KVCache(constrain(cache.k, KVCache.AXES), constrain(cache.v, KVCache.AXES), cache.index)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "group_size"))
def _prefill(graphdef, state, input_ids, attention_mask, pixel_values, image_grid_thw, *,
             cache_len: int, group_size: int):
    model = nnx.merge(graphdef, state)
    B, T = input_ids.shape
    img = None if pixel_values is None else model.encode_images(pixel_values, image_grid_thw)
    pos, _ = model.get_rope_index(input_ids, attention_mask,
                                  None if pixel_values is None else image_grid_thw)
    emb = model.embed(input_ids, img)
    cache = _constrain_cache(model.init_cache(B, cache_len))
    cache_mask = jnp.zeros((B, cache_len), bool).at[:, :T].set(attention_mask.astype(bool))
    hidden, cache = model.decoder(emb, pos, cache_mask, cache)
    last = model.decoder.logits(hidden[:, -1])  # left padding: the last slot is real
    next_pos = jnp.max(pos, axis=(0, 2)) + 1

    def rep(x, axis):
        return jnp.repeat(x, group_size, axis=axis)

    from dipr1_jax.model.decoder import KVCache
    cache = _constrain_cache(KVCache(rep(cache.k, 1), rep(cache.v, 1), cache.index))
    return cache, rep(cache_mask, 0), rep(last, 0), rep(next_pos, 0)


@functools.partial(jax.jit, donate_argnames=("cache",),
                   static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k",
                                    "top_p", "eos_ids", "pad_id", "suppress"))
def _decode(graphdef, state, cache, cache_mask, logits, next_pos, keys, skip, *,
            max_new_tokens: int,
            temperature: float, top_k: int, top_p: float, eos_ids: tuple, pad_id: int,
            suppress: tuple = ()):
    N = logits.shape[0]
    eos = jnp.asarray(eos_ids, jnp.int32)
    t0 = cache.index  # first generated slot (== padded prompt length)
    # Every row's uniforms for all steps at once, from its own key (the PRNG is not
    # re-run inside the loop).
    uniforms = None if temperature == 0 else jax.vmap(
        lambda k: jax.random.uniform(k, (max_new_tokens,), jnp.float32))(keys)

    def cond(c):
        i, done = c[0], c[5]
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(c):
        i, cache, cache_mask, logits, tokens, done, lengths, logps, bad = c
        u = None if uniforms is None else jax.lax.dynamic_index_in_dim(uniforms, i, axis=1,
                                                                       keepdims=False)
        tok, lp = _sample_with_uniform(logits, u, temperature, top_k, top_p, suppress)
        broken = ~done & ~jnp.all(jnp.isfinite(logits), axis=-1)
        bad, done = bad | broken, done | broken
        tok = jnp.where(done, pad_id, tok).astype(jnp.int32)
        lp = jnp.where(done, 0.0, lp)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
        logps = jax.lax.dynamic_update_slice(logps, lp[:, None], (0, i))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.any(tok[:, None] == eos[None, :], axis=-1)
        cache_mask = jax.lax.dynamic_update_slice(cache_mask, jnp.ones((N, 1), bool), (0, t0 + i))
        pos = jnp.broadcast_to((next_pos + i)[None, :, None], (3, N, 1))
        # The model is built inside the loop's trace: nnx transforms in the decoder
        # (nnx.scan over scan_layers) refuse Variables of the enclosing trace.
        model = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # fresh Variables
        hidden, cache = model.decoder(model.embed(tok[:, None]), pos, cache_mask, cache)
        cache = _constrain_cache(cache)
        logits = model.decoder.logits(hidden[:, 0])
        return i + 1, cache, cache_mask, logits, tokens, done, lengths, logps, bad

    init = (jnp.int32(0), cache, cache_mask, logits,
            jnp.full((N, max_new_tokens), pad_id, jnp.int32), skip,
            jnp.zeros((N,), jnp.int32), jnp.zeros((N, max_new_tokens), jnp.float32),
            jnp.zeros((N,), bool))
    out = jax.lax.while_loop(cond, body, init)
    # The final cache is returned (and dropped by the caller) so that the donated
    # input cache can be aliased through the loop instead of copied.
    return out[4], out[6], out[7], out[0], out[1], out[8]


def _pad_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, prompt_bucket,
                patch_bucket, pad_id):
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask) if attention_mask is not None else np.ones_like(ids)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"generate: input_ids {ids.shape} and attention_mask {mask.shape} "
                         "must both be [B, T]")
    if ids.shape[1] == 0:
        raise ValueError("generate: empty prompts (T == 0)")
    row_valid = mask.any(axis=1)
    bad = row_valid & (mask[:, -1] == 0)
    if np.any(bad):
        rows = np.nonzero(bad)[0].tolist()
        raise ValueError(f"generate: prompts must be left-padded; rows {rows} end in padding")
    # Batch padding rows (mask all 0): attend to their last slot only, so that the
    # prefill stays finite; they are marked done before the first decode step.
    mask = mask.copy()
    mask[~row_valid, -1] = 1
    B, T = ids.shape
    Tb = _round_up(T, prompt_bucket)
    if Tb > T:
        ids = np.concatenate([np.full((B, Tb - T), pad_id, ids.dtype), ids], 1)
        mask = np.concatenate([np.zeros((B, Tb - T), mask.dtype), mask], 1)
    pv = grid = None
    if pixel_values is not None:
        pv = np.asarray(pixel_values)
        grid = np.asarray(image_grid_thw)
        n = pv.shape[0]
        nb = _round_up(n, patch_bucket)
        if nb > n:
            pv = np.concatenate([pv, np.zeros((nb - n,) + pv.shape[1:], pv.dtype)], 0)
    return ids.astype(np.int32), mask.astype(np.int32), pv, grid, row_valid


def generate(model, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *,
             group_size: int, max_new_tokens: int, temperature: float, top_p: float = 1.0,
             top_k: int = 0, eos_token_ids: Sequence[int] | int, rng,
             pad_token_id: int | None = None, tokenizer: Any = None,
             suppress_token_ids: Sequence[int] | None = None,
             prompt_bucket: int = PROMPT_BUCKET, patch_bucket: int = PATCH_BUCKET,
             cache_length: int | None = None, mesh=None,
             local_rows: bool = True) -> SampleOutput:
    """Samples ``group_size`` completions for each of ``B`` left-padded prompts.

    Args:
      model: a ``dipr1_jax.model.QwenVL`` (sharded or not; with a mesh, call
        under ``jax.set_mesh(mesh)``).
      input_ids, attention_mask: ``[B, T]`` left-padded prompts. A row whose mask is
        all 0 is batch padding (the pipeline's ``valid == False``): it produces no
        tokens (length 0, all ``pad_token_id``) and is never flagged non-finite.
      pixel_values, image_grid_thw: as the Qwen processor returns them (or None).
      group_size: G completions per prompt.
      max_new_tokens: decode budget (the KV cache holds prompt + this).
      temperature: 0 for greedy; top_p / top_k truncate the distribution.
      eos_token_ids: stop token id(s).
      rng: a ``jax.random`` key; row ``b * G + g`` uses its own split of it.
      pad_token_id: fills tokens after a row's end and pads prompts to their bucket
        (default: ``model.cfg.pad_token_id``, the id the data pipeline pads with,
        or the first stop id when the config has none).
      tokenizer: optional, with ``decode``; then ``texts`` holds the decoded
        completions (up to, not including, the stop token).
      suppress_token_ids: ids never sampled. Default: the model's image,
        video and vision start/end tokens, since a generated image-pad token
        would misalign the image scatter of the training forward.
      prompt_bucket, patch_bucket: prompt lengths and patch counts are padded up
        to multiples of these (one compilation per bucket).
      cache_length: KV-cache slots (default: the bucketed prompt length plus
        ``max_new_tokens``). A fixed value must hold the longest bucketed prompt
        plus ``max_new_tokens``; the decode program is then compiled once for
        all prompt buckets.
      mesh, local_rows: multi-process runs only (ignored on one process). The
        prompts are this process's rows of the global batch (``local_rows=True``,
        as the training data is read) or the same full batch on every process
        (``False``, the held-out set); the global arrays are built on ``mesh``
        (``multihost.to_global``) and the output holds the same rows as the input.
        Row ``b * G + g`` of the GLOBAL batch draws from its own split of ``rng``,
        so the completions do not depend on the number of processes.

    Returns: :class:`SampleOutput` of numpy arrays.
    """
    if group_size < 1 or max_new_tokens < 1:
        raise ValueError(f"generate: group_size ({group_size}) and max_new_tokens "
                         f"({max_new_tokens}) must be >= 1")
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"generate: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                         f"{temperature}, {top_p}, {top_k}")
    eos = tuple(int(e) for e in (eos_token_ids if isinstance(eos_token_ids, (list, tuple))
                                 else [eos_token_ids]))
    if not eos:
        raise ValueError("generate: eos_token_ids is empty")
    if pad_token_id is None:  # one policy with the data pipeline: the model's pad id
        pad_token_id = model.cfg.pad_token_id if model.cfg.pad_token_id >= 0 else eos[0]
    pad = int(pad_token_id)
    if suppress_token_ids is None:
        c = model.cfg
        suppress_token_ids = (c.image_token_id, c.video_token_id, c.vision_start_token_id,
                              c.vision_end_token_id)
    suppress = tuple(sorted({int(t) for t in suppress_token_ids if t is not None}))
    if pixel_values is not None:
        from dipr1_jax.model.qwen_vl import check_inputs
        check_inputs(model.cfg, input_ids, pixel_values, image_grid_thw)
    if pixel_values is not None and not model.cfg.vision_max_patches and len(pixel_values) > 8192:
        logging.warning("sampler: %d patches in the flat vision layout (an N^2 attention mask); "
                        "set ModelConfig.vision_max_patches to the largest image's patch count",
                        len(pixel_values))
    ids, mask, pv, grid, row_valid = _pad_inputs(input_ids, attention_mask, pixel_values,
                                                 image_grid_thw, prompt_bucket, patch_bucket, pad)
    multi = multihost.is_multi()
    B_local = ids.shape[0]
    if multi:
        if mesh is None:
            raise ValueError("generate: a multi-process run needs mesh=")
        arrays = {"input_ids": ids, "attention_mask": mask, "row_valid": row_valid}
        if pv is not None:
            arrays.update(pixel_values=pv, image_grid_thw=grid)
        placed = multihost.to_global(arrays, mesh, local=local_rows,
                                     pad_values={"input_ids": pad})
        row_valid = multihost.to_host(placed.pop("row_valid"), local=False)
        ids, mask = placed["input_ids"], placed["attention_mask"]
        pv, grid = placed.get("pixel_values"), placed.get("image_grid_thw")
    B, T = ids.shape
    cache_len = T + max_new_tokens
    if cache_length is not None:
        if cache_length < cache_len:
            raise ValueError(f"generate: cache_length={cache_length} cannot hold the prompt "
                             f"({T} tokens after bucketing) plus max_new_tokens={max_new_tokens}"
                             f" = {cache_len}")
        cache_len = int(cache_length)
    graphdef, state = nnx.split(model)
    shape_key = (B, T, None if pv is None else pv.shape[0], None if grid is None else grid.shape[0])
    _note_compile("prefill", shape_key + (cache_len, group_size))
    t_start = time.perf_counter()
    put = ((lambda x: multihost.replicated(x, mesh)) if multi else jnp.asarray)
    cache, cache_mask, logits, next_pos = _prefill(
        graphdef, state, put(ids), put(mask),
        None if pv is None else put(pv), None if grid is None else put(grid),
        cache_len=cache_len, group_size=group_size)
    N = B * group_size
    keys = jax.random.split(rng, N)
    _note_compile("decode", (N, cache_len, max_new_tokens, float(temperature), int(top_k),
                             float(top_p), eos, suppress))
    skip = np.repeat(~np.asarray(row_valid), group_size)
    if multi:
        keys = multihost.replicated(jax.random.key_data(keys), mesh)
        keys = jax.random.wrap_key_data(keys)
    tokens, lengths, logps, steps, _, bad = _decode(
        graphdef, state, cache, cache_mask, logits, next_pos, keys, put(skip),
        max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
        top_p=float(top_p), eos_ids=eos, pad_id=pad, suppress=suppress)
    if multi:  # this process's rows (or all of them), in the input's row order
        fetch = lambda x: multihost.to_host(x, local=local_rows)  # noqa: E731
        B = B_local
    else:
        fetch = np.asarray
    tokens, lengths, logps, bad = (fetch(x) for x in (tokens, lengths, logps, bad))
    if bad.any():
        rows = np.nonzero(bad)[0]
        logging.warning("sampler: non-finite logits in %d of %d rows (prompts %s): those rows "
                        "stopped early and are flagged in SampleOutput.nonfinite", rows.size,
                        bad.size, sorted({int(r) // group_size for r in rows}))
    logging.info("sampler: %d x %d completions, %d decode steps in %.2fs", B, group_size,
                 int(steps), time.perf_counter() - t_start)
    G = group_size
    out = SampleOutput(tokens.reshape(B, G, -1), lengths.reshape(B, G), logps.reshape(B, G, -1),
                       nonfinite=bad.reshape(B, G))
    if tokenizer is not None:
        texts = []
        for b in range(B):
            row = []
            for g in range(G):
                n = int(out.lengths[b, g])
                toks = out.tokens[b, g, :n].tolist()
                if toks and toks[-1] in eos:
                    toks = toks[:-1]
                row.append(tokenizer.decode(toks))
            texts.append(row)
        out = out._replace(texts=texts)
    return out
