"""Rollout engine: greedy parity with transformers generate, log-probs, sampling rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_testutil as mt
from dipr1_jax import sampler, tokens
from dipr1_jax.model import load_hf
from dipr1_jax.sharding import make_mesh

EOS = tokens.TINY_EOS_TOKEN_ID
PAD = tokens.TINY_PAD_TOKEN_ID


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    hf = mt.hf_model(mt.hf_config("qwen2_5_vl", window=56, fullatt=(1,)), seed=3)
    path = mt.save_checkpoint(hf, str(tmp_path_factory.mktemp("sampler_ckpt")))
    return hf, path


@pytest.fixture(scope="module")
def model(ckpt):
    return load_hf(ckpt[1])


@pytest.fixture(scope="module")
def batch():
    # Three prompts, images of different (non-square) sizes, left padding.
    return mt.build_batch([(1, 4, 6), (1, 8, 4), (1, 4, 4)], [[3, 5], [1, 2], [6, 9]], seed=5)


def _hf_generate(hf, ids, mask, pv, grid, n):
    import torch
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
                          mm_token_type_ids=torch.tensor((ids == mt.IMG).astype(np.int64)),
                          do_sample=False, max_new_tokens=n, min_new_tokens=n,
                          eos_token_id=None, pad_token_id=PAD)
    return out[:, ids.shape[1]:].numpy()


def test_greedy_matches_transformers_generate(ckpt, model, batch):
    hf, _ = ckpt
    ids, mask, pv, grid = batch
    n = 40
    want = _hf_generate(hf, ids, mask, pv, grid, n)
    # A stop id that never occurs keeps every row decoding for all n steps, like HF above.
    out = sampler.generate(model, ids, mask, pv, grid, group_size=2, max_new_tokens=n,
                           temperature=0.0, eos_token_ids=[tokens.TINY_VOCAB_SIZE - 1],
                           rng=jax.random.key(0), pad_token_id=PAD, suppress_token_ids=[])
    assert out.tokens.shape == (3, 2, n) and np.all(out.lengths == n)
    for g in range(2):
        np.testing.assert_array_equal(out.tokens[:, g], want)


def _teacher_forced_logp(model, ids, mask, pv, grid, out, temperature):
    # The per-completion layout of the trainer's joined batch (every row carries its own
    # copy of its prompt and image), through the model's public call.
    from dipr1_jax.train import batch as tb
    B, G, T = out.tokens.shape
    prompts = {"input_ids": ids, "attention_mask": mask, "pixel_values": pv,
               "image_grid_thw": grid}
    train = tb.rollout_batch(prompts, out.tokens, out.lengths, np.zeros((B, G), np.float32),
                             np.ones((B, G), bool))
    full, full_mask, pv_rows, grids = tb.joined_rows(train)
    logits = np.asarray(model(full, full_mask, pv_rows, grids))
    logp = jax.nn.log_softmax(jnp.asarray(logits[:, ids.shape[1] - 1:-1]) / temperature, -1)
    picked = np.take_along_axis(np.asarray(logp), full[:, ids.shape[1]:, None], -1)[..., 0]
    return picked.reshape(B, G, T), train["completion_mask"].astype(bool)


def test_sampled_logprobs_equal_teacher_forced_recomputation(model, batch):
    ids, mask, pv, grid = batch
    out = sampler.generate(model, ids, mask, pv, grid, group_size=3, max_new_tokens=24,
                           temperature=0.9, top_k=200, top_p=0.95, eos_token_ids=[EOS],
                           rng=jax.random.key(1), pad_token_id=PAD)
    # Image/vision special tokens are suppressed by default (they would corrupt the
    # image scatter of a training forward).
    specials = [mt.IMG, mt.VSTART, mt.VEND, tokens.TINY_VIDEO_TOKEN_ID]
    assert not np.isin(out.tokens, specials).any()
    want, valid = _teacher_forced_logp(model, ids, mask, pv, grid, out, 0.9)
    np.testing.assert_allclose(out.logprobs[valid], want[valid], atol=1e-4)
    assert np.all(out.logprobs[~valid] == 0) and np.all(out.tokens[~valid] == PAD)
    # Rows that stopped: the stop token is the last counted token.
    for b, g in zip(*np.nonzero(out.lengths < 24)):
        assert out.tokens[b, g, out.lengths[b, g] - 1] == EOS


def test_fixed_key_reproducible_and_keys_differ(model, batch):
    ids, mask, pv, grid = batch
    kw = dict(group_size=4, max_new_tokens=12, temperature=1.0, eos_token_ids=[EOS], pad_token_id=PAD)
    a = sampler.generate(model, ids, mask, pv, grid, rng=jax.random.key(7), **kw)
    b = sampler.generate(model, ids, mask, pv, grid, rng=jax.random.key(7), **kw)
    c = sampler.generate(model, ids, mask, pv, grid, rng=jax.random.key(8), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    # The G completions of a group differ from each other (per-row keys).
    assert len({tuple(a.tokens[0, g]) for g in range(4)}) > 1


def test_early_exit_when_all_rows_stop(model, batch):
    ids, mask, pv, grid = batch
    # Greedy's first token, used as the stop id: every row stops after one token.
    first = sampler.generate(model, ids, mask, pv, grid, group_size=1, max_new_tokens=1,
                             temperature=0.0, eos_token_ids=[EOS], rng=jax.random.key(0))
    stops = sorted(set(first.tokens[:, 0, 0].tolist()))
    out = sampler.generate(model, ids, mask, pv, grid, group_size=2, max_new_tokens=50,
                           temperature=0.0, eos_token_ids=stops, rng=jax.random.key(0),
                           pad_token_id=PAD)
    assert np.all(out.lengths == 1) and np.all(out.tokens[..., 1:] == PAD)


@pytest.mark.parametrize("top_k, top_p, n_suppress", [(5, 1.0, 0), (0, 0.6, 0), (8, 0.5, 0),
                                                      (0, 1.0, 2)])
def test_truncation_never_leaves_the_allowed_set(top_k, top_p, n_suppress):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (1, 64)).astype(np.float32)
    temperature = 0.7
    # Allowed set computed independently in numpy, by the definitions.
    z = logits[0] / temperature
    order = np.argsort(-z, kind="stable")
    suppress = tuple(int(i) for i in order[:n_suppress])  # the most likely tokens
    z = np.where(np.isin(np.arange(64), suppress), -np.inf, z)
    order = np.argsort(-z, kind="stable")
    allowed = set(order[:top_k].tolist()) if top_k else set(range(64)) - set(suppress)
    zk = np.where(np.isin(np.arange(64), list(allowed)), z, -np.inf)
    p = np.exp(zk - zk.max()); p /= p.sum()
    order_p = np.argsort(-p, kind="stable")
    mass, keep = 0.0, set()
    for i in order_p:
        if mass >= top_p:
            break
        keep.add(int(i)); mass += p[i]
    allowed &= keep
    n = 4000
    keys = jax.random.split(jax.random.key(3), n)
    toks, _ = jax.jit(lambda k: sampler.sample_token(jnp.repeat(jnp.asarray(logits), n, 0), k,
                                                      temperature, top_k, top_p, suppress))(keys)
    toks = np.asarray(toks)
    assert set(toks.tolist()) <= allowed
    # And the kept tokens appear in proportion to their renormalised probability.
    q = np.zeros(64); q[list(allowed)] = p[list(allowed)]; q /= q.sum()
    freq = np.bincount(toks, minlength=64) / n
    assert np.abs(freq - q).max() < 4 * np.sqrt(q.max() * (1 - q.min()) / n) + 0.01


def test_sharded_greedy_equals_unsharded(ckpt, model, batch):
    ids, mask, pv, grid = batch
    kw = dict(group_size=2, max_new_tokens=16, temperature=0.0,
              eos_token_ids=[tokens.TINY_VOCAB_SIZE - 1], rng=jax.random.key(0), pad_token_id=PAD)
    ref = sampler.generate(model, ids, mask, pv, grid, **kw)
    mesh = make_mesh(2, 2, 2)
    with jax.set_mesh(mesh):
        sharded = load_hf(ckpt[1], mesh=mesh)
        out = sampler.generate(sharded, ids, mask, pv, grid, **kw)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)


def _compiled():
    """Programs in the jitted prefill / decode caches (the functions' own counters, not
    the sampler's bookkeeping): a call that adds none compiled nothing."""
    return sampler._prefill._cache_size(), sampler._decode._cache_size()


def test_bucketing_bounds_compilations(model, batch):
    ids, mask, pv, grid = batch
    kw = dict(group_size=2, max_new_tokens=4, temperature=0.0, eos_token_ids=[EOS],
              rng=jax.random.key(0), pad_token_id=PAD)
    before = _compiled()
    outs = []
    for extra in (0, 3, 7):  # three prompt lengths inside one 64-token bucket
        pad = np.full((ids.shape[0], extra), PAD, ids.dtype)
        outs.append(sampler.generate(model, np.concatenate([pad, ids], 1),
                                     np.concatenate([np.zeros_like(pad), mask], 1), pv, grid, **kw))
        if extra == 0:
            first = _compiled()
    # One prefill + one decode at most for the bucket, and nothing after the first call.
    assert all(f - b <= 1 for f, b in zip(first, before))
    assert _compiled() == first
    for o in outs[1:]:
        np.testing.assert_array_equal(o.tokens, outs[0].tokens)  # extra left padding is inert


def test_fixed_cache_length_same_tokens_one_decode_compile(model, batch):
    ids, mask, pv, grid = batch
    kw = dict(group_size=2, max_new_tokens=6, temperature=0.0, eos_token_ids=[EOS],
              rng=jax.random.key(0), pad_token_id=PAD)
    ref = sampler.generate(model, ids, mask, pv, grid, **kw)
    T = -(-ids.shape[1] // 64) * 64
    prefill0, decode0 = _compiled()
    outs = []
    for extra in (0, 64):  # two prompt buckets, one cache size
        pad = np.full((ids.shape[0], extra), PAD, ids.dtype)
        outs.append(sampler.generate(model, np.concatenate([pad, ids], 1),
                                     np.concatenate([np.zeros_like(pad), mask], 1), pv, grid,
                                     cache_length=T + 64 + 6 + 10, **kw))
    prefill1, decode1 = _compiled()
    assert prefill1 - prefill0 == 2  # one prefill per prompt bucket (the counter is live) ...
    assert decode1 - decode0 == 1  # ... but a single decode program for the cache size
    for o in outs:
        np.testing.assert_array_equal(o.tokens, ref.tokens)
        np.testing.assert_allclose(o.logprobs, ref.logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="cache_length"):
        sampler.generate(model, ids, mask, pv, grid, cache_length=T + 5, **kw)


def test_nonfinite_logits_stop_and_flag_only_the_broken_rows(ckpt, batch, caplog):
    """A NaN image (per-image vision layout: it cannot leak into other prompts) breaks
    its prompt's G rows: they stop at once, are flagged and logged; the other prompts
    decode exactly as in a clean run. All-NaN weights flag every row."""
    ids, mask, pv, grid = batch
    model = load_hf(ckpt[1], vision_max_patches=32)
    kw = dict(group_size=2, max_new_tokens=8, temperature=0.0, eos_token_ids=[EOS],
              rng=jax.random.key(0), pad_token_id=PAD)
    clean = sampler.generate(model, ids, mask, pv, grid, **kw)
    assert not clean.nonfinite.any()
    bad_pv = pv.copy()
    bad_pv[:24] = np.nan  # the first image (grid 1x4x6) only
    with caplog.at_level("WARNING"):
        out = sampler.generate(model, ids, mask, bad_pv, grid, **kw)
    np.testing.assert_array_equal(out.nonfinite, [[True, True], [False, False], [False, False]])
    assert np.all(out.lengths[0] == 0) and np.all(out.tokens[0] == PAD)
    assert np.all(out.logprobs[0] == 0)
    np.testing.assert_array_equal(out.tokens[1:], clean.tokens[1:])
    assert "non-finite logits in 2 of 6 rows (prompts [0])" in caplog.text
    model.decoder.norm.scale[...] = jnp.full_like(model.decoder.norm.scale[...], jnp.nan)
    out = sampler.generate(model, ids, mask, pv, grid, **kw)
    assert out.nonfinite.all() and np.all(out.lengths == 0)


def test_bad_inputs_are_clear_errors(model, batch):
    ids, mask, pv, grid = batch
    right = mt.build_batch([(1, 4, 6), (1, 4, 4)], [[3, 5], [1, 2]], padding="right", seed=1)
    with pytest.raises(ValueError, match="left-padded"):
        sampler.generate(model, *right, group_size=1, max_new_tokens=2, temperature=0.0,
                         eos_token_ids=[EOS], rng=jax.random.key(0))
    with pytest.raises(ValueError, match="top_p"):
        sampler.generate(model, ids, mask, pv, grid, group_size=1, max_new_tokens=2,
                         temperature=1.0, top_p=0.0, eos_token_ids=[EOS], rng=jax.random.key(0))
