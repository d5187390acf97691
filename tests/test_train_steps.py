"""The trainer's equalities: sampler vs teacher-forced log-probs, vision once per prompt vs
per completion, micro-batched vs full-batch gradients, batch padding rows masked everywhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dipr1_jax import sampler
from dipr1_jax.config import GRPOConfig
from dipr1_jax.data.pipeline import PipelineConfig, make_dataset
from dipr1_jax.data.synthetic import SceneConfig, SyntheticCrowds
from dipr1_jax.grpo import grpo_loss, loss_denominator
from dipr1_jax.model import create_model, model_token_logprobs, preset
from dipr1_jax.tokenizer import load_tokenizer
from dipr1_jax.train import batch as tb
from dipr1_jax.train import state as st
from dipr1_jax.train.forward import completion_logprobs
from dipr1_jax.train.grpo_step import make_grpo_grads
from model_testutil import _jit

G = 3
TEMP = 0.9


def _generate(model, tok, batch):
    """The rollouts every test here compares: G completions of 12 tokens, key 3."""
    return sampler.generate(model, batch["input_ids"], batch["attention_mask"],
                            batch["pixel_values"], batch["image_grid_thw"], group_size=G,
                            max_new_tokens=12, temperature=TEMP,
                            eos_token_ids=[tok.im_end_token_id], rng=jax.random.key(3),
                            pad_token_id=tok.pad_token_id)


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer(None)
    model = create_model(preset("tiny"), seed=0)
    src = SyntheticCrowds(2, SceneConfig(width=112, height=84, difficulty="easy"), seed=4)
    # 2 images in a batch of 3: the third row is batch padding (valid False).
    cfg = PipelineConfig(batch_size=3, shuffle=False, num_epochs=1, prompt_style="short")
    batch = next(iter(make_dataset(src, cfg, tok)))
    assert batch["valid"].tolist() == [True, True, False]
    return tok, model, batch, _generate(model, tok, batch)


def _train_batch(batch, out, adv=None):
    keep = np.broadcast_to(batch["valid"][:, None], out.lengths.shape)
    if adv is None:
        adv = np.random.default_rng(0).normal(size=out.lengths.shape).astype(np.float32)
    return tb.rollout_batch(batch, out.tokens, out.lengths, adv, keep)


def test_padding_row_generates_nothing(setup):
    _, _, _, out = setup
    assert np.all(out.lengths[2] == 0) and not out.nonfinite.any()
    assert np.all(out.lengths[:2] > 0)


def test_sampler_logprobs_equal_teacher_forced(setup):
    _, model, batch, out = setup
    t = _train_batch(batch, out)
    fn = nnx.jit(lambda m, t: completion_logprobs(
        m, t["input_ids"], t["attention_mask"], t["pixel_values"], t["image_grid_thw"],
        t["completion"], t["completion_mask"], temperature=TEMP))
    lp = np.asarray(fn(model, t))
    m = t["completion_mask"] > 0
    assert m.sum() > 10
    np.testing.assert_allclose(lp[m], out.logprobs[m], atol=1e-4)
    # A wrong position offset would break it: shifting the completion changes the values.
    assert np.abs(lp[m][1:] - out.logprobs[m][:-1]).max() > 1e-2


def test_vision_once_equals_per_completion_forward(setup):
    _, model, batch, out = setup
    t = _train_batch(batch, out)
    cfg = GRPOConfig(beta=0.0)
    policy = st.Policy.from_model(model)
    params, frozen = policy.split(False)
    B, Gs, Tc = t["completion"].shape
    Tp = t["input_ids"].shape[1]

    def once(m):
        return completion_logprobs(m, t["input_ids"], t["attention_mask"], t["pixel_values"],
                                   t["image_grid_thw"], t["completion"], t["completion_mask"],
                                   temperature=TEMP)

    ids, mask, pv, grid = tb.joined_rows(t)
    # Padding rows carry no image: give the per-row reference only the rows' own patches.
    def per_row(m):
        lp = model_token_logprobs(m, ids, mask, pv, grid, temperature=TEMP)
        return lp[:, Tp - 1:Tp - 1 + Tc].reshape(B, Gs, Tc)

    def loss_fn(fn):
        def loss(p):
            logp = fn(st.merge(policy.graphdef, p, frozen))
            return grpo_loss(logp, None, None, t["advantages"], t["completion_mask"], cfg)[0]
        return _jit(jax.value_and_grad(loss))(params)

    l1, g1 = loss_fn(once)
    l2, g2 = loss_fn(per_row)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5, atol=1e-6)
    flat1, flat2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
    assert len(flat1) == len(flat2)
    for a, b in zip(flat1, flat2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # The vision tower gets a gradient (it is shared by the G rows of a group).
    vis = jax.tree.leaves(g1["visual"])
    assert max(float(jnp.abs(x).max()) for x in vis) > 0


def _grads(model, cfg):
    policy = st.Policy.from_model(model)
    params, frozen = policy.split(False)
    fn = _jit(make_grpo_grads(policy.graphdef, cfg, temperature=TEMP, chunk=8))
    return lambda t, n, denom: fn(params, frozen, tb.split_micro_batches(t, n), denom)


def test_micro_batches_equal_full_batch(setup):
    _, model, batch, out = setup
    cfg = GRPOConfig(beta=0.0)
    # Three prompts (two real ones plus the padding row), split 1 x 3 vs 3 x 1.
    t = _train_batch(batch, out)
    keep = np.broadcast_to(batch["valid"][:, None], out.lengths.shape)
    denom = float(loss_denominator(t["completion_mask"], cfg, keep))
    grads = _grads(model, cfg)
    full, s_full = grads(t, 1, denom)
    micro, s_micro = grads(t, 3, denom)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(micro)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(float(s_full["loss_sum"]), float(s_micro["loss_sum"]), rtol=1e-5)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(full)) > 0


def test_padding_row_is_inert_in_the_dr_grpo_denominator(setup):
    _, model, batch, out = setup
    cfg = GRPOConfig(beta=0.0, aggregation="seq-mean-token-sum-norm")
    t = _train_batch(batch, out)
    keep = np.broadcast_to(batch["valid"][:, None], out.lengths.shape)
    denom = float(loss_denominator(t["completion_mask"], cfg, keep))
    assert denom == 2 * G * t["completion"].shape[-1]  # padding rows are not counted
    grads = _grads(model, cfg)
    full, s_full = grads(t, 1, denom)
    # The batch without its padding row gives the same loss and gradient.
    real = {k: (v if k == "pixel_values" else v[:2]) for k, v in t.items()}
    denom2 = float(loss_denominator(real["completion_mask"], cfg))
    assert denom2 == denom
    two, s_two = grads(real, 1, denom2)
    np.testing.assert_allclose(float(s_two["loss_sum"]), float(s_full["loss_sum"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(two)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-7)


def test_sampler_with_scanned_layers_gives_the_same_rollouts(setup, tmp_path):
    """``model.scan_layers`` (and remat) in the sampler's decode loop: ``nnx.scan`` refused
    the Variables of the enclosing trace ("Cannot extract graph node from different trace
    level"), so every evaluation and rollout of a scanned model failed. The same weights
    (saved and loaded back scanned) decode the same tokens as the layer loop."""
    from dipr1_jax.model import load_hf, save_hf
    tok, model, batch, out = setup
    save_hf(model, str(tmp_path / "m"))
    for remat in ("none", "full"):
        scanned = load_hf(str(tmp_path / "m"), scan_layers=True, remat=remat)
        again = _generate(scanned, tok, batch)
        np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(out.tokens))
        np.testing.assert_allclose(np.asarray(again.logprobs), np.asarray(out.logprobs),
                                   rtol=1e-4, atol=1e-5)


def test_remat_with_a_frozen_vision_tower_changes_nothing(setup):
    """``model.remat`` (jax.checkpoint around every block) with ``freeze_vision``: the
    frozen tower's parameters come from outside the gradient trace, and the sampler's
    decode loop closes over the model; both used to fail ("Cannot mutate Param from a
    different trace level"). Rematerialisation must change neither rollouts nor grads."""
    import dataclasses
    tok, model, batch, out = setup
    rm = create_model(dataclasses.replace(preset("tiny"), remat="full"), seed=0)
    again = _generate(rm, tok, batch)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(out.tokens))
    cfg = GRPOConfig(beta=0.0)
    t = _train_batch(batch, out)
    keep = np.broadcast_to(batch["valid"][:, None], out.lengths.shape)
    denom = float(loss_denominator(t["completion_mask"], cfg, keep))
    got = []
    for m in (model, rm):
        policy = st.Policy.from_model(m)
        params, frozen = policy.split(True)  # the vision tower frozen
        assert not any("visual" in str(k) for k in params)
        fn = _jit(make_grpo_grads(policy.graphdef, cfg, temperature=TEMP, chunk=8))
        got.append(fn(params, frozen, tb.split_micro_batches(t, 1), denom))
    (g0, s0), (g1, s1) = got
    np.testing.assert_allclose(float(s1["loss_sum"]), float(s0["loss_sum"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-8)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g1)) > 0


def test_sft_targets_over_the_cap_do_not_train(tmp_path):
    """``sft.max_target_tokens``: an example whose target is longer becomes a row that
    trains nothing (no completion tokens), the others are unchanged, and the loop counts
    the skipped ones; the same data without the cap keeps every row."""
    from dipr1_jax.train import modes
    from dipr1_jax.train.loop import SFTLoop
    from test_train_modes import tiny_config

    def first_batch(cap, name):
        cfg = tiny_config(**{"sft.max_target_tokens": cap, "data.synthetic_max_people": 6,
                             "sft.batch_size": 8})
        run, model = modes._prepare(cfg, str(tmp_path / name))
        loop = SFTLoop(run, model)
        return loop.batch(), loop

    full, _ = first_batch(0, "a")
    lengths = full["completion_mask"][:, 0].sum(-1).astype(int)
    cap = int(np.median(lengths))
    over = lengths > cap
    assert over.any() and not over.all(), lengths  # the test needs both kinds of rows
    capped, loop = first_batch(cap, "b")
    got = capped["completion_mask"][:, 0].sum(-1).astype(int)
    np.testing.assert_array_equal(got, np.where(over, 0, lengths))
    np.testing.assert_array_equal(capped["input_ids"], full["input_ids"])  # same data
    assert loop.long_targets == int(over.sum())
    assert capped["completion"].shape[-1] <= max(16, -(-cap // 16) * 16)  # bucketed by 16
