"""The jitted GRPO update (DESIGN.md section 4) and the no-gradient log-prob pass.

``make_grpo_step`` returns ``step(state, frozen, micro_batches, denom) -> (state, metrics)``:
micro-batches of whole groups are stacked on a leading axis and scanned; each
contributes ``grad(loss_sum / denom)`` where ``denom`` is the loss
denominator of the WHOLE batch (:func:`dipr1_jax.grpo.loss_denominator`), so
the accumulated gradient equals the full-batch gradient. The state is donated.

``make_logprob_fn`` returns ``fn(trainable, frozen, micro_batches) -> [M, mb, G, Tc]``:
the log-probs of the completions under given parameters, for ``old_logp``
(mu > 1: the pre-update policy) and ``ref_logp`` (beta > 0: the reference).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from dipr1_jax.config import GRPOConfig, OptimSection
from dipr1_jax.grpo import grpo_loss
from dipr1_jax.train.forward import completion_logprobs
from dipr1_jax.train.state import TrainState, keep_if_finite, make_optimizer, merge

SUM_KEYS = ("loss_sum", "tokens", "sequences", "clipped_tokens", "kl_sum", "ratio_sum", "pg_sum",
            "neg_logp_sum")


def _logprobs(graphdef, trainable, frozen, mb, temperature, chunk):
    model = merge(graphdef, trainable, frozen)
    return completion_logprobs(model, mb["input_ids"], mb["attention_mask"], mb["pixel_values"],
                               mb["image_grid_thw"], mb["completion"], mb["completion_mask"],
                               temperature=temperature, chunk_size=chunk)


@functools.lru_cache(maxsize=16)
def make_logprob_fn(graphdef, *, temperature: float, chunk: int):
    @jax.jit
    def fn(trainable, frozen, mbs):
        def body(_, mb):
            return None, _logprobs(graphdef, trainable, frozen, mb, temperature, chunk)
        return jax.lax.scan(body, None, mbs)[1]
    return fn


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def make_grpo_grads(graphdef, cfg: GRPOConfig, *, temperature: float, chunk: int):
    """``grads(trainable, frozen, micro_batches, denom) -> (grads, sums)`` (not jitted):
    the gradient of the whole batch's loss accumulated over the micro-batches."""

    def micro_loss(trainable, frozen, mb, denom):
        logp = _logprobs(graphdef, trainable, frozen, mb, temperature, chunk)
        mask = mb["completion_mask"]
        _, m = grpo_loss(logp, mb.get("old_logp"), mb.get("ref_logp"), mb["advantages"], mask,
                         cfg)
        m = {k: m[k] for k in SUM_KEYS if k in m}
        m["neg_logp_sum"] = -jnp.sum(logp * mask)
        return m["loss_sum"] / denom, m

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def grads(params, frozen, mbs, denom):
        def body(carry, mb):
            acc, sums = carry
            (_, m), g = grad_fn(params, frozen, mb, denom)
            return (_tree_add(acc, g), _tree_add(sums, m)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        first = jax.tree.map(lambda x: x[0], mbs)
        shapes = jax.eval_shape(micro_loss, params, frozen, first, denom)[1]
        sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return jax.lax.scan(body, (zeros, sums0), mbs)[0]

    return grads


@functools.lru_cache(maxsize=16)
def make_grpo_step(graphdef, optim: OptimSection, total_steps: int, cfg: GRPOConfig,
                   *, temperature: float, chunk: int, state_shardings=None):
    """The jitted GRPO update; see the module docstring. Cached like ``make_sft_step``."""
    optimizer, schedule = make_optimizer(optim, total_steps)
    accumulate = make_grpo_grads(graphdef, cfg, temperature=temperature, chunk=chunk)

    def step(state: TrainState, frozen, mbs, denom):
        grads, sums = accumulate(state.params, frozen, mbs, denom)
        loss = sums["loss_sum"] / denom
        grad_norm = optax.tree_utils.tree_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params, opt_state, skipped = keep_if_finite(loss, grad_norm, state,
                                                    params, opt_state)
        tokens = jnp.maximum(sums["tokens"], 1.0)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "clip_fraction": sums["clipped_tokens"] / tokens,
            "kl": sums["kl_sum"] / tokens,
            "ratio": sums["ratio_sum"] / tokens,
            "entropy": sums["neg_logp_sum"] / tokens,
            "tokens": sums["tokens"],
            "skipped": skipped,
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    jit_kw = dict(donate_argnums=(0,))
    if state_shardings is not None:
        jit_kw["out_shardings"] = (state_shardings.tree, None)
    return jax.jit(step, **jit_kw)
