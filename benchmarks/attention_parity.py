"""Parity of the fused attention backends with the xla reference on the accelerator.

Issue 11 item 1: each backend of ``dipr1_jax/model/attention.py`` against ``xla``,
outputs and gradients, on the card the device script runs on (``cudnn`` on a CUDA GPU,
``splash`` on TPU; ``auto`` picks it). bf16 inputs; both the fused backend and XLA in
bf16 are compared with an float32 XLA reference of the same inputs, and the fused
backend passes when its error is at most ``2 x`` XLA-bf16's error plus 1e-3
(it computes the same function at the same precision). Cases, at 3B shapes:

* decoder rows without a cache: left-padded prompts, a full row, prompt + right-padded
  completion (B=4, T=1024, 16 query / 2 KV heads, head_dim 128);
* decoder over a KV cache, the completion pass of ``train.forward`` (queries at slots
  ``[Tp, Tp + Tc)``) and the prompt pass (queries at ``[0, Tp)`` of a ``Tp + Tc`` cache);
* vision full-attention blocks, per-image rows (G=4, P=1024, 16 heads, head_dim 80);
* the tiny model end to end in bf16 (decoder roll, vision lengths), logits and gradients.

    python benchmarks/attention_parity.py                  # on the device
    JAX_PLATFORMS=cpu python benchmarks/attention_parity.py --cpu-dry-run

``--cpu-dry-run`` runs the script itself on CPU at small shapes: cudnn's translated
masks through JAX's xla implementation, splash in Pallas interpret mode. Exit status 1
when a case fails.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from dipr1_jax.model import attention as A  # noqa: E402
from dipr1_jax.model import create_model, preset  # noqa: E402
from dipr1_jax.model.decoder import TextDecoder, cached_attention  # noqa: E402

BF16 = jnp.bfloat16


def _err(a, b, m):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    m = np.broadcast_to(np.asarray(m, bool), a.shape)
    return float(np.max(np.abs(a - b)[m])) if m.any() else 0.0


def _check(tag, name, fused, ref, args, qmask, failures):
    """Outputs at valid queries and gradients (of a loss over valid queries) of ``fused``
    vs ``ref`` in bf16, both against ``ref`` in float32."""
    ks = jax.random.split(jax.random.key(1), 1)
    m = jnp.asarray(qmask)[:, :, None, None].astype(jnp.float32)

    def run(fn, dtype):
        a = [x.astype(dtype) for x in args]
        w = jax.random.normal(ks[0], a[0].shape, jnp.float32)
        loss = lambda *x: jnp.sum(fn(*x).astype(jnp.float32) * w * m)
        out, g = jax.jit(lambda *x: (fn(*x), jax.grad(loss, tuple(range(len(x))))(*x)))(*a)
        return out, g

    o32, g32 = run(ref, jnp.float32)
    ob, gb = run(ref, BF16)
    of, gf = run(fused, BF16)
    om = np.asarray(m) > 0
    e_x, e_f = _err(ob, o32, om), _err(of, o32, om)
    ok = e_f <= 2 * e_x + 1e-3
    ge_x = max(_err(a, b, True) / (np.abs(np.asarray(b)).max() + 1e-9) for a, b in zip(gb, g32))
    ge_f = max(_err(a, b, True) / (np.abs(np.asarray(b)).max() + 1e-9) for a, b in zip(gf, g32))
    gok = ge_f <= 2 * ge_x + 1e-3
    finite = bool(np.all(np.isfinite(np.asarray(of, np.float32))))
    status = "ok" if (ok and gok and finite) else "FAIL"
    print(f"[{tag}] {name:34s} out max|err| vs f32: fused {e_f:.2e}, xla-bf16 {e_x:.2e} | "
          f"grad rel err: fused {ge_f:.2e}, xla-bf16 {ge_x:.2e} | finite {finite} -> {status}",
          flush=True)
    if status != "ok":
        failures.append(name)


def _qkv(key, B, T, S, H, K, D):
    k = jax.random.split(jax.random.key(key), 3)
    return [jax.random.normal(k[0], (B, T, H, D)), jax.random.normal(k[1], (B, S, K, D)),
            jax.random.normal(k[2], (B, S, K, D))]


def decoder_cases(tag, backend, small, failures):
    B, T, H, K, D = (3, 48, 4, 2, 16) if small else (4, 1024, 16, 2, 128)
    sc = D ** -0.5
    am = np.ones((B, T), bool)
    am[0, : T // 5] = False                         # left-padded prompt
    am[B - 1, : T // 9] = False                     # prompt + right-padded completion
    am[B - 1, T - T // 4:] = False
    am = jnp.asarray(am)
    dense = TextDecoder.make_mask(am, T)
    ref = lambda q, k, v: A.xla_attention(q, k, v, dense, sc)
    if backend == "cudnn":
        lo, n = A.key_range(am)
        fused = lambda q, k, v: A.cudnn_causal(q, k, v, lo, n, None, sc)
    else:
        fused = lambda q, k, v: A.splash_attention(q, k, v, am, causal=True, scale=sc)
    _check(tag, f"decoder {backend} (no cache)", fused, ref, _qkv(0, B, T, T, H, K, D), am,
           failures)
    if backend != "cudnn":
        return  # splash: cache calls use xla (attention.py)
    Tp, Tc = (10, 22) if small else (256, 512)
    S = Tp + Tc
    pm = np.ones((B, Tp), bool)
    pm[0, : Tp // 3] = False
    cm = np.ones((B, Tc), bool)
    cm[0, Tc // 2:] = False
    cm[1, 3:] = False
    for where, keys, T_, start, qv in (
            ("completion pass", np.concatenate([pm, cm], 1), Tc, Tp, cm),
            ("prompt pass", np.concatenate([pm, np.zeros_like(cm)], 1), Tp, 0, pm)):
        keys = jnp.asarray(keys)
        index = jnp.asarray(start, jnp.int32)
        dense = TextDecoder.make_mask(keys, T_, index)
        lo, n = A.key_range(keys)
        ref = lambda q, k, v, d=dense: cached_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2),
                                                        d, sc)
        fused = lambda q, k, v, lo=lo, n=n, i=index: A.cudnn_causal(q, k, v, lo, n, i, sc)
        _check(tag, f"decoder cudnn ({where})", fused, ref, _qkv(1, B, T_, S, H, K, D), qv,
               failures)


def vision_case(tag, backend, small, failures):
    G, P, H, D = (2, 40, 2, 16) if small else (4, 1024, 16, 80)
    sc = D ** -0.5
    lengths = np.asarray([P, P // 3 * 2] + [P // 4] * (G - 2))[:G]
    valid = jnp.asarray(np.arange(P)[None] < lengths[:, None])
    dense = (valid[:, :, None] & valid[:, None, :])[:, None]
    ref = lambda q, k, v: A.xla_attention(q, k, v, dense, sc)
    if backend == "cudnn":
        n = jnp.asarray(lengths, jnp.int32)
        fused = lambda q, k, v: A.cudnn_segments(q, k, v, n, sc)
    else:
        seg = valid.astype(jnp.int32)
        fused = lambda q, k, v: A.splash_attention(q, k, v, seg, causal=False, scale=sc,
                                                   batch_axis="vision_images",
                                                   head_axes=(None, None))
    _check(tag, f"vision {backend} (per-image rows)", fused, ref, _qkv(2, G, P, P, H, H, D),
           valid, failures)


def model_case(tag, backend, failures):
    """The tiny model in bf16: logits at valid positions and parameter gradients."""
    rng = np.random.default_rng(0)
    cfg = preset("tiny", dtype="bfloat16", vision_max_patches=32)
    row = lambda k, n_img: ([int(x) for x in rng.integers(0, 200, k)]
                            + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img
                            + [cfg.vision_end_token_id] + [5, 6])
    rows = [row(9, 4 * 4 // 4), row(3, 4 * 8 // 4)]  # images of 16 and 32 patches
    T = max(map(len, rows))
    ids = np.zeros((2, T), np.int32)
    mask = np.zeros((2, T), np.int32)
    for r, x in enumerate(rows):
        ids[r, T - len(x):], mask[r, T - len(x):] = x, 1
    grid = np.asarray([[1, 4, 4], [1, 4, 8]], np.int32)
    pix = rng.standard_normal((48, cfg.vision.patch_dim)).astype(np.float32)
    args = [jnp.asarray(x) for x in (ids, mask, pix, grid)]
    w = jax.random.normal(jax.random.key(3), (2, T, cfg.text.vocab_size))

    def run(att, dtype):
        model = create_model(cfg.replace(attention=att, dtype=dtype), seed=0)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(*args)
            return jnp.sum(logits * w * args[1][:, :, None]), logits

        (_, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return np.asarray(logits), [np.asarray(x) for x in jax.tree.leaves(g)]

    l32, g32 = run("xla", "float32")
    lx, gx = run("xla", "bfloat16")
    lf, gf = run(backend, "bfloat16")
    m = mask.astype(bool)[:, :, None]
    e_x, e_f = _err(lx, l32, m), _err(lf, l32, m)
    rel = lambda gs: max(_err(a, b, True) / (np.abs(b).max() + 1e-9) for a, b in zip(gs, g32))
    ge_x, ge_f = rel(gx), rel(gf)
    ok = e_f <= 2 * e_x + 1e-3 and ge_f <= 2 * ge_x + 1e-3
    print(f"[{tag}] {'tiny model ' + backend + ' (bf16)':34s} logits max|err| vs f32: fused "
          f"{e_f:.2e}, xla-bf16 {e_x:.2e} | grad rel err: fused {ge_f:.2e}, xla-bf16 "
          f"{ge_x:.2e} -> {'ok' if ok else 'FAIL'}", flush=True)
    if not ok:
        failures.append("tiny model")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="CPU: small shapes, cudnn translation via xla, splash interpreted")
    ap.add_argument("--backend", default="auto", choices=A.BACKENDS)
    a = ap.parse_args(argv)
    dev = jax.devices()[0]
    tag = dev.device_kind
    if a.cpu_dry_run:
        A.CUDNN_IMPL = "xla"
        backends = ["cudnn", "splash"] if a.backend == "auto" else [a.backend]
    else:
        backends = [A.resolve(a.backend)]
    print(f"attention parity on {tag} ({dev.platform}), jax {jax.__version__}: "
          f"{', '.join(backends)} vs xla", flush=True)
    failures: list[str] = []
    for b in backends:
        if b == "xla":
            print(f"[{tag}] auto resolves to xla here: nothing to compare", flush=True)
            continue
        decoder_cases(tag, b, a.cpu_dry_run, failures)
        vision_case(tag, b, a.cpu_dry_run, failures)
        model_case(tag, b, failures)
    verdict = "all ok" if not failures else "FAILED: " + ", ".join(failures)
    print(f"[{tag}] attention parity: {verdict}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
