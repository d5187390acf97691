"""The jitted SFT update: teacher-forced cross-entropy on completion tokens only.

The batch is a G = 1 train batch (:func:`dipr1_jax.train.batch.sft_batch`):
the prompt (with its image) followed by the Think-Look-Answer target built
from ground truth; the loss is the token-mean negative log-likelihood of the
target tokens (EOS included), never of prompt or image positions. Same
forward as GRPO (:mod:`dipr1_jax.train.forward`), same state layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from dipr1_jax.config import OptimSection
from dipr1_jax.train.forward import completion_logprobs
from dipr1_jax.train.state import TrainState, keep_if_finite, make_optimizer, merge


def sft_loss(graphdef, trainable, frozen, batch, chunk: int):
    """``(mean NLL over target tokens, (nll_sum, tokens, correct))``."""
    model = merge(graphdef, trainable, frozen)
    logp = completion_logprobs(model, batch["input_ids"], batch["attention_mask"],
                               batch["pixel_values"], batch["image_grid_thw"],
                               batch["completion"], batch["completion_mask"], chunk_size=chunk)
    mask = batch["completion_mask"]
    tokens = jnp.sum(mask)
    nll = -jnp.sum(jnp.where(mask > 0, logp, 0.0))
    return nll / jnp.maximum(tokens, 1.0), (nll, tokens)


@functools.lru_cache(maxsize=16)
def make_sft_step(graphdef, optim: OptimSection, total_steps: int, *, chunk: int,
                  state_shardings=None):
    """``step(state, frozen, batch) -> (state, metrics)``, jitted with the state donated.

    Cached per (graph, optimizer config, steps, chunk, shardings): loops with the same
    model and config share one compiled program per batch shape."""
    optimizer, schedule = make_optimizer(optim, total_steps)
    grad_fn = jax.value_and_grad(lambda p, f, b: sft_loss(graphdef, p, f, b, chunk), has_aux=True)

    def step(state: TrainState, frozen, batch):
        (loss, (nll, tokens)), grads = grad_fn(state.params, frozen, batch)
        grad_norm = optax.tree_utils.tree_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params, opt_state, skipped = keep_if_finite(loss, grad_norm, state,
                                                    params, opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm,
                   "lr": schedule(state.step), "tokens": tokens,
                   "perplexity": jnp.exp(loss), "skipped": skipped}
        return TrainState(state.step + 1, params, opt_state), metrics

    jit_kw = dict(donate_argnums=(0,))
    if state_shardings is not None:
        jit_kw["out_shardings"] = (state_shardings.tree, None)
    return jax.jit(step, **jit_kw)
