"""Attention backends (model/attention.py) against the xla reference, on CPU.

cudnn: its kernel needs a GPU, so ``CUDNN_IMPL="xla"`` runs the exact arguments the
cudnn backend builds (rows rolled to right padding, queries placed at their cache slots,
causal + sequence lengths) through JAX's xla implementation of
``jax.nn.dot_product_attention``: the mask translation is what is checked here; the
kernel itself is checked on the GPU by ``benchmarks/device_run.sh``. splash: the Pallas
TPU kernel in interpret mode. Outputs are compared at valid query positions (padding
rows differ by design and are never read) and gradients of a loss over valid positions.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dipr1_jax.model import attention as A
from dipr1_jax.model import create_model, preset
from dipr1_jax.model.decoder import TextDecoder, cached_attention
from dipr1_jax.model.rope import vision_layout
from model_testutil import _jit, build_batch


@pytest.fixture
def cudnn_on_cpu(monkeypatch):
    monkeypatch.setattr(A, "CUDNN_IMPL", "xla")


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(A, "_SAID", set())


def _qkv(key, B, T, S, H, K, D):
    ks = jax.random.split(jax.random.key(key), 4)
    return (jax.random.normal(ks[0], (B, T, H, D)), jax.random.normal(ks[1], (B, S, K, D)),
            jax.random.normal(ks[2], (B, S, K, D)), jax.random.normal(ks[3], (B, T, H, D)))


def _compare(f, ref, q, k, v, w, qvalid, tol=1e-5):
    """Outputs at valid queries and gradients of sum(out * w) over valid queries."""
    m = qvalid[:, :, None, None].astype(jnp.float32)

    def run(fn):
        loss = lambda *a: jnp.sum(fn(*a) * w * m)
        return _jit(lambda *a: (fn(*a), jax.grad(loss, (0, 1, 2))(*a)))(q, k, v)

    (o, g), (r, gr) = run(f), run(ref)
    assert np.all(np.isfinite(np.asarray(o)))  # padding rows too: they feed later layers
    np.testing.assert_allclose(np.asarray(o * m), np.asarray(r * m), atol=tol, rtol=tol)
    for a, b in zip(g, gr):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)
    return o, r


# ------------------------------------------------------------------ mask translation

def test_cudnn_decoder_rows_roll_to_causal_lengths(cudnn_on_cpu):
    """Left-padded prompt, full row, prompt + right-padded completion: per-call roll."""
    B, T, H, K, D = 3, 24, 4, 2, 16
    am = np.ones((B, T), bool)
    am[0, :5] = False
    am[2, :3] = False
    am[2, 17:] = False
    am = jnp.asarray(am)
    q, k, v, w = _qkv(0, B, T, T, H, K, D)
    sc = D ** -0.5
    dense = TextDecoder.make_mask(am, T)
    lo, n = A.key_range(am)
    assert lo.tolist() == [5, 0, 3] and n.tolist() == [19, 24, 14]
    m = am[:, :, None, None]
    out, ref, wrong = _jit(lambda q, k, v: (
        A.cudnn_causal(q, k, v, lo, n, None, sc), A.xla_attention(q, k, v, dense, sc),
        A.cudnn_causal(q, k, v, None, n, None, sc)))(q, k, v)  # (gradients: tests below)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(np.asarray(out * m), np.asarray(ref * m), atol=1e-5, rtol=1e-5)
    # the roll is what makes it right: lengths alone (right padding) are wrong here
    assert float(jnp.max(jnp.abs((wrong - ref) * m))) > 0.1


@pytest.mark.parametrize("where", ["prefill", "completions"])
def test_cudnn_cache_calls_place_queries_at_their_slots(cudnn_on_cpu, where):
    """train.forward's two cache calls (and the sampler's prefill): prompt at slots
    [0, Tp) of a Tp + Tc cache; completions at [Tp, Tp + Tc) over prompt + completion."""
    B, Tp, Tc, H, K, D = 3, 10, 14, 4, 2, 16
    S = Tp + Tc
    pm = np.ones((B, Tp), bool)
    pm[0, :4] = False
    pm[1, :1] = False
    cm = np.ones((B, Tc), bool)
    cm[0, 9:] = False
    cm[2, 3:] = False
    if where == "prefill":
        keys = np.concatenate([pm, np.zeros((B, Tc), bool)], 1)
        T, start, qvalid = Tp, 0, pm
    else:
        keys = np.concatenate([pm, cm], 1)
        T, start, qvalid = Tc, Tp, cm
    keys = jnp.asarray(keys)
    q, k, v, w = _qkv(1, B, T, S, H, K, D)
    sc = D ** -0.5
    index = jnp.asarray(start, jnp.int32)
    dense = TextDecoder.make_mask(keys, T, index)
    lo, n = A.key_range(keys)
    ref = lambda q, k, v: cached_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), dense, sc)
    _compare(lambda q, k, v: A.cudnn_causal(q, k, v, lo, n, index, sc), ref, q, k, v, w,
             jnp.asarray(qvalid))


def test_cudnn_rejects_a_mask_with_holes(cudnn_on_cpu):
    valid = jnp.asarray([[0, 1, 1, 1], [1, 1, 0, 1]], bool)
    f = jax.jit(lambda v: A.check_contiguous(v, *A.key_range(v)))
    with pytest.raises(Exception, match=r"rows \[1\] is not one contiguous run"):
        jax.block_until_ready(f(valid))
        jax.effects_barrier()
    f(valid[:1])  # contiguous rows pass
    jax.effects_barrier()


def test_vision_segment_ids_and_lengths():
    """Segment ids (splash) of a flat row of several images and padding; the per-image
    rows' lengths (cudnn). The kernels run on them in the model tests below."""
    ids = jax.jit(lambda g, n, p: A.segment_ids(vision_layout(g, n, 2, 0, per_image=p)),
                  static_argnums=(1, 2))
    grid = jnp.asarray([[1, 4, 6], [1, 2, 4], [1, 2, 2]])  # 36 patches + 4 padding
    assert np.asarray(ids(grid, 40, 0)[0]).tolist() == [1] * 24 + [2] * 8 + [3] * 4 + [0] * 4
    grid = jnp.asarray([[2, 2, 2], [1, 2, 4]])
    assert np.asarray(ids(grid, 16, 12)).tolist() == [[1] * 4 + [2] * 4 + [0] * 4,
                                                      [1] * 8 + [0] * 4]  # frames split


# ------------------------------------------------------------------ whole model

def _batch():
    ids, mask, pix, grid = build_batch([(1, 4, 4), (1, 4, 8)], [[3, 9], [2, 1]],
                                       padding="left", seed=3)
    assert mask[1, :5].sum() == 0  # left padding in row 1
    return tuple(jnp.asarray(x) for x in (ids, mask, pix, grid))


def _model(backend, max_patches=32, layers=1):
    """The tiny model with one decoder layer (the compiles are this file's cost)."""
    cfg = preset("tiny", vision_max_patches=max_patches, attention=backend)
    return create_model(cfg.replace(text=dataclasses.replace(cfg.text, num_layers=layers)),
                        seed=0)


def _logits_and_grads(model, ids, mask, pix, grid):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    w = jax.random.normal(jax.random.key(7), ids.shape + (model.cfg.text.vocab_size,))

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(ids, mask, pix, grid)
        return jnp.sum(logits * w * mask[:, :, None]), logits

    (_, logits), g = _jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), jax.tree.map(np.asarray, g)


@pytest.fixture(scope="module")
def xla_reference():
    return _logits_and_grads(_model("xla"), *_batch())


@pytest.mark.parametrize("backend", ["cudnn", "splash"])
def test_model_forward_and_gradients_match_xla(backend, xla_reference, monkeypatch, caplog):
    """Decoder (left padding, no cache) and vision tower of the tiny model, logits and
    gradients against xla in the per-image layout. cudnn: per-image rows (lengths);
    splash: the flat layout, both images in one row (segment ids). The windowed blocks
    fall back to xla and say so."""
    monkeypatch.setattr(A, "CUDNN_IMPL", "xla")
    monkeypatch.setattr(A, "_SAID", set())
    ids, mask, pix, grid = _batch()
    model = _model(backend, max_patches=32 if backend == "cudnn" else 0)
    with caplog.at_level(logging.INFO):
        logits, grads = _logits_and_grads(model, ids, mask, pix, grid)
    assert f"{backend} cannot express the windowed vision blocks" in caplog.text
    ref_logits, ref_grads = xla_reference
    m = np.asarray(mask, bool)
    np.testing.assert_allclose(logits[m], ref_logits[m], atol=2e-5, rtol=1e-5)
    flat, ref_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(ref_grads))
    for path, g in flat:
        r = ref_flat[path]
        g, r = np.asarray(g.get_value()), np.asarray(r.get_value())
        np.testing.assert_allclose(g, r, atol=1e-5 * max(1.0, np.abs(r).max()), rtol=1e-4,
                                   err_msg="/".join(map(str, path)))


def test_model_cache_path_cudnn_matches_xla(cudnn_on_cpu, fresh_log):
    """train.forward.completion_logprobs (prompt pass + completion pass over the KV cache),
    log-probs and gradients, cudnn translation vs xla."""
    from dipr1_jax.train.forward import completion_logprobs
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 200, (2, 9)))  # text-only prompts (the decoder is tested)
    mask = jnp.asarray(np.arange(9)[None] >= np.asarray([[0], [4]]))  # row 1 left-padded
    pix = grid = None
    G, Tc = 2, 6
    comp = jnp.asarray(rng.integers(0, 200, (2, G, Tc)))
    cmask = np.ones((2, G, Tc), bool)
    cmask[0, 1, 3:] = False
    cmask[1, 0, 1:] = False
    cmask = jnp.asarray(cmask)

    def run(backend):
        graphdef, params, rest = nnx.split(_model(backend), nnx.Param, ...)

        def loss(p):
            lp = completion_logprobs(nnx.merge(graphdef, p, rest), ids, mask, pix, grid, comp,
                                     cmask)
            return jnp.sum(lp * cmask), lp

        (_, lp), g = _jit(jax.value_and_grad(loss, has_aux=True))(params)
        return np.asarray(lp), jax.tree.leaves(jax.tree.map(np.asarray, g))

    (lp, g), (lr, gr) = run("cudnn"), run("xla")
    m = np.asarray(cmask)
    np.testing.assert_allclose(lp[m], lr[m], atol=1e-5, rtol=1e-5)
    for a, b in zip(g, gr):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, np.abs(b).max()), rtol=1e-4)


# ------------------------------------------------------------------ choice and fallback

def test_auto_resolves_per_platform():
    assert A.resolve("auto", "cpu") == "xla"
    assert A.resolve("auto", "tpu") == "splash"
    assert A.resolve("auto", "gpu", cudnn_ok=True) == "cudnn"
    assert A.resolve("auto", "gpu", cudnn_ok=False) == "xla"  # e.g. ROCm, pre-Ampere
    assert A.resolve("xla", "gpu") == "xla"
    assert preset("tiny").attention == "auto"
    assert A.choose("auto", "decoder", dtype=jnp.float32, head_dim=16) == "xla"  # this CPU
    with pytest.raises(ValueError, match="cudnn needs a CUDA GPU"):
        A.resolve("cudnn", "cpu")
    with pytest.raises(ValueError, match="splash is the Pallas TPU kernel"):
        A.resolve("splash", "gpu")
    with pytest.raises(ValueError, match="not one of"):
        A.resolve("flash", "cpu")


def test_unexpressible_layouts_fall_back_explicitly(monkeypatch, fresh_log, caplog):
    monkeypatch.setattr(A, "_cudnn_available", lambda: True)
    bf16 = jnp.bfloat16
    with caplog.at_level(logging.INFO):
        assert A.choose("cudnn", "decoder", dtype=bf16, head_dim=128, platform="gpu") == "cudnn"
        assert A.choose("cudnn", "decoder_cache", dtype=bf16, head_dim=128,
                        platform="gpu") == "cudnn"
        assert A.choose("cudnn", "vision_full", dtype=bf16, head_dim=80,
                        platform="gpu") == "cudnn"
        assert caplog.text == ""
        cases = [("cudnn", "decoder", jnp.float32, 128, "float32 compute"),
                 ("cudnn", "decoder", bf16, 84, "head_dim 84"),
                 ("cudnn", "vision_flat_multi", bf16, 80, "flat vision layout with several"),
                 ("cudnn", "vision_window", bf16, 80, "windowed vision blocks"),
                 ("splash", "decoder_cache", bf16, 128, "over a KV cache"),
                 ("splash", "vision_window", bf16, 80, "windowed vision blocks")]
        for backend, layout, dtype, hd, what in cases:
            platform = "gpu" if backend == "cudnn" else "tpu"
            caplog.clear()
            assert A.choose(backend, layout, dtype=dtype, head_dim=hd, platform=platform) == "xla"
            assert what in caplog.text and "using xla" in caplog.text
            assert caplog.records[-1].levelno == logging.WARNING  # chosen explicitly
        caplog.clear()
        monkeypatch.setattr(A, "_SAID", set())
        assert A.choose("auto", "vision_window", dtype=bf16, head_dim=80, platform="tpu") == "xla"
        assert caplog.records[-1].levelno == logging.INFO  # auto: said, not warned


def test_config_flag_reaches_the_model_config():
    from dipr1_jax.config import Config, ConfigError, ModelSection
    from dipr1_jax.train.memory import model_config
    cfg = Config()
    assert cfg.model.attention == "auto"
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="splash"))
    assert model_config(cfg).attention == "splash"
    with pytest.raises(ConfigError, match="attention"):
        ModelSection(attention="flash")
