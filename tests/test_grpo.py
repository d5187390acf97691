"""GRPO advantages and loss against the plain-Python reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from dipr1_jax.config import GRPOConfig
from dipr1_jax.grpo import finalize_metrics, group_advantages, grpo_loss

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@settings(max_examples=80, deadline=None)
@given(r=st.lists(st.lists(st.floats(-5, 5), min_size=4, max_size=4), min_size=1, max_size=3),
       scale=st.sampled_from(["group", "none"]))
def test_group_advantages_match_reference(r, scale):
    got = np.asarray(group_advantages(np.array(r), scale))
    for b, row in enumerate(r):
        np.testing.assert_allclose(got[b], ref.advantages(row, scale), rtol=1e-4, atol=1e-4)


def test_identical_rewards_give_zero_advantage_and_g1_is_safe():
    assert np.all(np.asarray(group_advantages(np.full((2, 8), 3.0))) == 0)
    assert np.all(np.asarray(group_advantages(np.array([[1.0], [2.0]]))) == 0)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(np.ones((1, 2)), "std")


def _case(seed, B=2, G=3, T=7):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-2, 0.5, (B, G, T))
    old = logp + rng.normal(0, 0.3, (B, G, T))
    refp = logp + rng.normal(0, 0.3, (B, G, T))
    adv = rng.normal(0, 1, (B, G))
    lengths = rng.integers(0, T + 1, (B, G))
    lengths[0, 0] = T
    mask = (np.arange(T) < lengths[..., None]).astype(np.float64)
    return logp, old, refp, adv, mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(4))
def test_loss_matches_reference(mode, seed):
    cfg = GRPOConfig(aggregation=mode, eps_low=0.2, eps_high=0.28, beta=0.04,
                     norm_length=0 if seed % 2 else 11)
    logp, old, refp, adv, mask = _case(seed)
    with jax.enable_x64(True):
        loss, m = grpo_loss(logp, old, refp, adv, mask, cfg)
        loss = float(loss)
    flat = lambda x: x.reshape(-1, x.shape[-1]).tolist()
    want = ref.grpo_loss(flat(logp), flat(old), flat(refp), adv.reshape(-1).tolist(),
                         flat(mask), cfg)
    assert loss == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert float(m["loss_sum"] / m["loss_denom"]) == pytest.approx(loss)


@pytest.mark.parametrize("mode", MODES)
def test_micro_batch_accumulation_is_exact(mode):
    cfg = GRPOConfig(aggregation=mode)
    logp, old, refp, adv, mask = _case(7, B=4, G=2, T=5)
    full, _ = grpo_loss(logp, old, refp, adv, mask, cfg)
    sums, denoms = 0.0, 0.0
    for lo, hi in ((0, 1), (1, 4)):  # uneven micro-batches
        _, m = grpo_loss(logp[lo:hi], old[lo:hi], refp[lo:hi], adv[lo:hi], mask[lo:hi], cfg)
        sums += m["loss_sum"]
        denoms += m["loss_denom"]
    assert float(sums / denoms) == pytest.approx(float(full), rel=1e-5)


def test_mu1_ratio_is_one_and_gradient_is_the_policy_gradient():
    logp, _, refp, adv, mask = _case(3)
    cfg = GRPOConfig(beta=0.04)
    loss, m = grpo_loss(logp, None, refp, adv, mask, cfg)
    fm = finalize_metrics(m)
    assert float(fm["ratio"]) == 1.0 and float(fm["clip_fraction"]) == 0.0
    grad = jax.grad(lambda lp: grpo_loss(lp, None, refp, adv, mask, cfg)[0])(jnp.asarray(logp, jnp.float32))
    # d/dlogp of [-A * exp(logp - sg(logp)) + beta * k3] / N = [-A + beta * (1 - exp(ref - logp))] / N
    want = (-adv[..., None] + cfg.beta * (1 - np.exp(refp - logp))) * mask / mask.sum()
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-6)


def test_clip_fraction_counts_tokens_outside_the_trust_region():
    logp = np.log(np.array([[[1.5, 0.5, 1.0, 1.1]]]))
    old = np.zeros_like(logp)
    mask = np.ones_like(logp)
    cfg = GRPOConfig(beta=0.0)
    # A > 0: only ratio 1.5 > 1.2 is clipped; A < 0: only ratio 0.5 < 0.8 is.
    for adv, clipped_token in ((1.0, 0), (-1.0, 1)):
        _, m = grpo_loss(logp, old, None, np.array([[adv]]), mask, cfg)
        assert float(m["clipped_tokens"]) == 1.0
        grad = jax.grad(lambda lp: grpo_loss(lp, old, None, np.array([[adv]]), mask, cfg)[0])(
            jnp.asarray(logp, jnp.float32))
        assert float(grad[0, 0, clipped_token]) == 0.0  # clipped tokens carry no gradient


def test_beta_without_reference_is_a_clear_error():
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(np.zeros((1, 2, 3)), None, None, np.zeros((1, 2)), np.ones((1, 2, 3)), GRPOConfig())
