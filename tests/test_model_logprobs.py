"""Chunked per-token log-probs and the KV-cache decode path of the decoder."""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import nnx

import model_testutil as U
from dipr1_jax.model import load_hf, model_token_logprobs, text_position_ids, token_logprobs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    hf = U.hf_model(U.hf_config("qwen2_5_vl", tie=True), seed=31)
    path = U.save_checkpoint(hf, str(tmp_path_factory.mktemp("lp")))
    return hf, load_hf(path), path


@pytest.fixture(scope="module")
def batch():
    return U.build_batch([(1, 8, 12), (1, 6, 4)], [[3, 5], [2, 4]], padding="left", seed=1)


def test_model_token_logprobs_match_torch_log_softmax(ckpt, batch):
    hf, model, _ = ckpt
    ids, mask, pix, grid = batch
    f = U._jit(lambda i, m, p, g: model_token_logprobs(model, i, m, p, g, chunk_size=7))
    out = np.asarray(f(*(jnp.asarray(x) for x in batch)))
    logits = torch.tensor(U.hf_forward(hf, ids, mask, pix, grid))
    ref = torch.log_softmax(logits[:, :-1].double(), -1).gather(
        -1, torch.tensor(ids[:, 1:])[..., None])[..., 0].numpy()
    assert out.shape == ids[:, 1:].shape and out.dtype == np.float32
    valid = mask[:, :-1].astype(bool)
    assert np.abs(out - ref)[valid].max() <= 1e-4


def _full(hidden, kernel, targets, temperature=1.0):
    logits = jnp.einsum("btd,dv->btv", hidden, kernel) / temperature
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]


@pytest.mark.parametrize("chunk", [1, 48, 64, 500])
def test_chunked_logprobs_and_grads_equal_unchunked(chunk):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k1, (2, 100, 16))
    w = jax.random.normal(k2, (16, 300)) * 0.5
    t = jax.random.randint(k3, (2, 100), 0, 300)
    out = token_logprobs(h, w, t, chunk_size=chunk, temperature=0.7)
    np.testing.assert_allclose(out, _full(h, w, t, 0.7), atol=1e-5)
    g = jax.grad(lambda h, w: token_logprobs(h, w, t, chunk_size=chunk).sum(), (0, 1))(h, w)
    g_ref = jax.grad(lambda h, w: _full(h, w, t).sum(), (0, 1))(h, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_chunked_logprobs_never_hold_full_logits():
    """Forward+backward scratch memory of the chunked path is bounded by a few chunks of
    logits, independent of the sequence length; the naive path holds [B, T, V]."""
    B, D, V = 2, 32, 8192

    def temp(fn, T):
        args = (jax.ShapeDtypeStruct((B, T, D), jnp.float32),
                jax.ShapeDtypeStruct((D, V), jnp.float32), jax.ShapeDtypeStruct((B, T), jnp.int32))
        c = jax.jit(jax.value_and_grad(lambda h, w, t: fn(h, w, t).sum(), (0, 1))).lower(
            *args).compile()
        return c.memory_analysis().temp_size_in_bytes

    chunked = lambda h, w, t: token_logprobs(h, w, t, chunk_size=64)
    full_bytes = B * 2048 * V * 4
    assert temp(_full, 2048) >= full_bytes  # the reference does materialise [B, T, V]
    short, long = temp(chunked, 512), temp(chunked, 2048)
    assert long < 1.5 * short
    assert long < full_bytes / 8, (long, full_bytes)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_kv_cache_decode_matches_full_forward(ckpt, batch, scan):
    """Prefill (images, left padding) into a cache, then decode 3 tokens one at a time:
    each step's logits equal transformers' full forward over the extended sequence
    (layers as a Python loop updating the stacked cache in place, and as a scan)."""
    hf, model, path = ckpt
    if scan:
        model = load_hf(path, scan_layers=True)
    ids, mask, pix, grid = batch
    B, T = ids.shape
    new = np.array([[5, 6, 7], [8, 9, 10]])
    ref = U.hf_forward(hf, np.concatenate([ids, new], 1),
                       np.concatenate([mask, np.ones_like(new)], 1), pix, grid)

    graphdef, state = nnx.split(model)

    def run(state, ids, mask, pix, grid, new):
        model = nnx.merge(graphdef, state)  # (nnx.scan needs the module traced, not closed over)
        img = model.encode_images(pix, grid)
        pos, deltas = model.get_rope_index(ids, mask, grid)
        cache = model.init_cache(B, T + 3)
        cmask = jnp.zeros((B, T + 3), bool).at[:, :T].set(mask.astype(bool))
        h, cache = model.decoder(model.embed(ids, img), pos, cmask, cache)
        outs = [model.decoder.logits(h[:, -1])]
        for i in range(3):
            cmask = cmask.at[:, T + i].set(True)
            p = text_position_ids(cmask, deltas)[:, :, T + i:T + i + 1]
            h, cache = model.decoder(model.embed(new[:, i:i + 1]), p, cmask, cache)
            outs.append(model.decoder.logits(h[:, 0]))
        return jnp.stack(outs, 1), cache.index

    out, index = U._jit(run)(state, *(jnp.asarray(x) for x in (ids, mask, pix, grid, new)))
    assert int(index) == T + 3
    np.testing.assert_allclose(np.asarray(out), ref[:, T - 1:T + 3], atol=1e-4)
