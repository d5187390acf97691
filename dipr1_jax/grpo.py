"""GRPO objective (DESIGN.md section 4): group advantages and the clipped loss.

Pure jittable functions. ``grpo_loss`` returns sums and denominators so that
gradient accumulation over micro-batches is exact: accumulate
``metrics["loss_sum"]`` (and its gradient) and divide by the accumulated
``metrics["loss_denom"]`` once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dipr1_jax.config import GRPOConfig

ADV_EPS = 1e-4


def group_advantages(rewards: jnp.ndarray, scale: str = "group") -> jnp.ndarray:
    """``A_i = (r_i - mean_G r) / (std_G r + 1e-4)`` over the last axis ``G``.

    ``std`` uses ddof=1 (as TRL and VLM-R1); with ``G == 1`` the advantage is 0.
    ``scale="none"`` (Dr.GRPO) only centres.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if scale not in ("group", "none"):
        raise ValueError(f"group_advantages: scale must be 'group' or 'none', got {scale!r}")
    g = rewards.shape[-1]
    centred = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
    if scale == "none" or g == 1:
        return centred
    std = jnp.std(rewards, axis=-1, keepdims=True, ddof=1)
    return centred / (std + ADV_EPS)


def loss_denominator(mask, cfg: GRPOConfig = GRPOConfig(), valid=None):
    """The loss denominator of a whole batch (``mask [..., T]``, ``valid [...]`` rows that
    count: batch padding and dropped groups do not). Micro-batches divide their
    ``loss_sum`` by this, so the accumulated gradient is the full-batch one."""
    mask = jnp.asarray(mask, jnp.float32)
    rows = jnp.ones(mask.shape[:-1], jnp.float32) if valid is None else jnp.asarray(
        valid, jnp.float32)
    if cfg.aggregation == "token-mean":
        return jnp.sum(mask * rows[..., None])
    if cfg.aggregation == "seq-mean-token-mean":
        return jnp.sum((jnp.sum(mask, -1) > 0) * rows)
    if cfg.aggregation == "seq-mean-token-sum-norm":
        norm = cfg.norm_length if cfg.norm_length > 0 else mask.shape[-1]
        return jnp.sum(rows) * norm
    raise ValueError(f"loss_denominator: unknown aggregation {cfg.aggregation!r}")


def grpo_loss(logp: jnp.ndarray, old_logp: jnp.ndarray | None, ref_logp: jnp.ndarray | None,
              advantages: jnp.ndarray, mask: jnp.ndarray,
              cfg: GRPOConfig = GRPOConfig(), valid=None) -> tuple[jnp.ndarray, dict]:
    """Clipped GRPO loss with the k3 KL penalty.

    Args:
      logp: ``[..., T]`` log-probs of the completion tokens under the policy.
      old_logp: ``[..., T]`` under the sampling policy, or None for mu = 1
        (then ``rho == 1`` exactly and only its gradient is used).
      ref_logp: ``[..., T]`` under the reference model; may be None when
        ``cfg.beta == 0``.
      advantages: ``[...]`` one per sequence (e.g. ``[B, G]``).
      mask: ``[..., T]`` completion tokens (1) versus padding (0).
      cfg: eps_low, eps_high, beta, aggregation, norm_length.
      valid: optional ``[...]`` rows that count (batch padding rows and dropped
        groups are False); their tokens must also be 0 in ``mask``. Only
        Dr.GRPO's denominator (rows x norm) needs it.

    Returns:
      ``(loss, metrics)`` where ``loss == metrics["loss_sum"] / metrics["loss_denom"]``
      and metrics holds sums and denominators: ``loss_sum``, ``loss_denom``,
      ``tokens``, ``sequences``, ``clipped_tokens``, ``kl_sum``,
      ``ratio_sum``, ``pg_sum``.
    """
    logp = jnp.asarray(logp, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    old = jax.lax.stop_gradient(logp if old_logp is None else jnp.asarray(old_logp, jnp.float32))
    adv = jnp.asarray(advantages, jnp.float32)[..., None]
    ratio = jnp.exp(logp - old)
    clipped_ratio = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    unclipped = ratio * adv
    clipped = clipped_ratio * adv
    pg = -jnp.minimum(unclipped, clipped)
    is_clipped = (clipped < unclipped).astype(jnp.float32)

    if cfg.beta > 0:
        if ref_logp is None:
            raise ValueError("grpo_loss: cfg.beta > 0 needs ref_logp")
        delta = jnp.asarray(ref_logp, jnp.float32) - logp
        kl = jnp.exp(delta) - delta - 1.0
    else:
        kl = jnp.zeros_like(logp)
    per_token = pg + cfg.beta * kl

    seq_tokens = jnp.sum(mask, axis=-1)
    has_tokens = (seq_tokens > 0).astype(jnp.float32)
    n_seq = jnp.sum(has_tokens)
    if cfg.aggregation == "token-mean":
        loss_sum = jnp.sum(per_token * mask)
        denom = jnp.sum(mask)
    elif cfg.aggregation == "seq-mean-token-mean":
        per_seq = jnp.sum(per_token * mask, axis=-1) / jnp.maximum(seq_tokens, 1.0)
        loss_sum = jnp.sum(per_seq * has_tokens)
        denom = n_seq
    elif cfg.aggregation == "seq-mean-token-sum-norm":
        loss_sum = jnp.sum(per_token * mask)
        denom = loss_denominator(mask, cfg, valid)
    else:
        raise ValueError(f"grpo_loss: unknown aggregation {cfg.aggregation!r}")
    loss = loss_sum / jnp.maximum(denom, 1e-8)
    metrics = {
        "loss_sum": loss_sum,
        "loss_denom": denom,
        "tokens": jnp.sum(mask),
        "sequences": n_seq,
        "clipped_tokens": jnp.sum(is_clipped * mask),
        "kl_sum": jnp.sum(kl * mask),
        "ratio_sum": jnp.sum(ratio * mask),
        "pg_sum": jnp.sum(pg * mask),
    }
    return loss, metrics


def finalize_metrics(metrics: dict) -> dict:
    """Means from (accumulated) sums: loss, clip fraction, mean KL, mean ratio."""
    tokens = jnp.maximum(metrics["tokens"], 1.0)
    return {
        "loss": metrics["loss_sum"] / jnp.maximum(metrics["loss_denom"], 1e-8),
        "clip_fraction": metrics["clipped_tokens"] / tokens,
        "kl": metrics["kl_sum"] / tokens,
        "ratio": metrics["ratio_sum"] / tokens,
        "pg_loss": metrics["pg_sum"] / tokens,
    }
