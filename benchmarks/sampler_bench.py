"""Rollout throughput: our sampler vs transformers generate, and vs no prefix sharing.

    python benchmarks/sampler_bench.py                       # tiny and bench-100m, CPU
    python benchmarks/sampler_bench.py --presets=tiny --new-tokens=64
    python benchmarks/sampler_bench.py --device              # GPU/TPU: decode tok/s, BW bound

CPU mode, for each preset: B prompts (an image of 16x16 patches plus text,
left-padded) x G completions x N new tokens, every row forced to decode all N
tokens (no stop token), temperature 1. In one run it times

  (a) ``dipr1_jax.sampler.generate(group_size=G)``: one prefill per prompt;
  (b) the same sampler without prefix sharing: each prompt repeated G times,
      ``group_size=1`` (B*G prefills);
  (c) transformers ``generate(num_return_sequences=G, do_sample=True)`` on the
      same inputs and the same weights (exported with ``save_hf``).

and prints tokens/s and the ratios a/c and a/b. Compilation is excluded (one
warm-up call each). ``--device`` times prefill and decode of a 3B-class
random-weight config (bf16) on the accelerator and reports decode tokens/s and
the fraction of the memory-bandwidth bound (weights + KV cache read per step).
"""

from __future__ import annotations

import argparse
import os

# torch's OpenMP threads spin-wait by default; on a loaded 2-core machine that makes the
# torch baseline measure the load (see BUILD_NOTES, Benchmarks/Trainer).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import model_testutil as mt  # noqa: E402

from dipr1_jax import sampler  # noqa: E402
from dipr1_jax.model import create_model, preset, save_hf  # noqa: E402

NEVER = [-1]  # a stop id no token equals: every row decodes all N tokens


def _inputs(B, grid=(1, 16, 16), seed=0):
    texts = [[5 + 3 * b, 12 + 2 * b] for b in range(B)]
    return mt.build_batch([grid] * B, texts, seed=seed)


def _time(fn, repeats):
    fn()  # warm-up / compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def cpu_bench(name, B, G, N, repeats, skip_hf, grid_hw=(16, 16)):
    import torch
    import transformers
    per_image = int(np.prod(grid_hw))
    # Per-image vision attention (the flat layout's mask is quadratic in all patches).
    cfg = preset(name, vision_max_patches=per_image)
    model = create_model(cfg, seed=0)
    ids, mask, pv, grid = _inputs(B, grid=(1,) + tuple(grid_hw))
    kw = dict(max_new_tokens=N, temperature=1.0, eos_token_ids=NEVER, pad_token_id=mt.PAD)

    def ours():
        sampler.generate(model, ids, mask, pv, grid, group_size=G, rng=jax.random.key(0), **kw)

    rep_ids, rep_mask = np.repeat(ids, G, 0), np.repeat(mask, G, 0)
    rep_pv = np.concatenate([pv[i * per_image:(i + 1) * per_image] for i in range(B)
                             for _ in range(G)])
    rep_grid = np.repeat(grid, G, 0)

    def unshared():
        sampler.generate(model, rep_ids, rep_mask, rep_pv, rep_grid, group_size=1,
                         rng=jax.random.key(0), **kw)

    t_a = _time(ours, repeats)
    t_b = _time(unshared, repeats)
    tokens = B * G * N
    print(f"[{name}] {B} prompts x G={G} x {N} new tokens, prompt {ids.shape[1]} tokens "
          f"({int(grid[0].prod() // 4)} image tokens each)")
    print(f"  (a) ours, prefix shared     {t_a:8.2f} s  {tokens / t_a:9.1f} tok/s")
    print(f"  (b) ours, no prefix sharing {t_b:8.2f} s  {tokens / t_b:9.1f} tok/s   a/b = {t_b / t_a:.2f}x")
    if skip_hf:
        return
    with tempfile.TemporaryDirectory() as d:
        save_hf(model, d)
        hf = transformers.AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
    torch.manual_seed(0)
    args = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
                mm_token_type_ids=torch.tensor((ids == mt.IMG).astype(np.int64)),
                do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N,
                min_new_tokens=N, num_return_sequences=G, eos_token_id=None,
                pad_token_id=mt.PAD)

    def hf_gen():
        with torch.no_grad():
            out = hf.generate(**args)
        assert out.shape == (B * G, ids.shape[1] + N)

    t_c = _time(hf_gen, max(1, repeats - 1))
    print(f"  (c) transformers generate   {t_c:8.2f} s  {tokens / t_c:9.1f} tok/s   a/c = {t_c / t_a:.2f}x")


_PEAK_BW = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "TPU v5e": 0.82e12,
            "TPU v5p": 2.76e12, "TPU v4": 1.2e12}


def _device_inputs(cfg, B, grid=(1, 28, 28)):
    """The CPU-mode prompts with the tiny special ids mapped to ``cfg``'s (a 3B preset uses
    Qwen's real ids: the image tokens must be recognised as such)."""
    ids, mask, pv, grid_thw = _inputs(B, grid=grid)
    out = ids.copy()
    for tiny, real in ((mt.IMG, cfg.image_token_id), (mt.VSTART, cfg.vision_start_token_id),
                       (mt.VEND, cfg.vision_end_token_id)):
        out[ids == tiny] = real
    return out, mask, pv, grid_thw


def device_bench(name, B, G, N, peak_bw, hf=True):
    kind = jax.devices()[0].device_kind
    if not peak_bw:
        peak_bw = next((v for k, v in _PEAK_BW.items() if k.lower() in kind.lower()), 3.35e12)
    cfg = preset(name, dtype="bfloat16", param_dtype="bfloat16", vision_max_patches=28 * 28)
    t0 = time.perf_counter()
    model = create_model(cfg, seed=0)
    print(f"  init {time.perf_counter() - t0:.1f} s", flush=True)
    ids, mask, pv, grid = _device_inputs(cfg, B)
    ids_p, mask_p, pv_p, grid_p = sampler._pad_inputs(ids, mask, pv, grid, sampler.PROMPT_BUCKET,
                                                      sampler.PATCH_BUCKET, mt.PAD)
    from flax import nnx
    graphdef, state = nnx.split(model)
    T = ids_p.shape[1]
    cache_len = T + N

    def prefill():
        return jax.block_until_ready(sampler._prefill(
            graphdef, state, jnp.asarray(ids_p), jnp.asarray(mask_p), jnp.asarray(pv_p),
            jnp.asarray(grid_p), cache_len=cache_len, group_size=G))

    def decode():
        cache, cm, lg, npos = prefill()
        t = time.perf_counter()
        out = sampler._decode(graphdef, state, cache, cm, lg, npos,
                              jax.random.split(jax.random.key(0), B * G), max_new_tokens=N,
                              temperature=1.0, top_k=0, top_p=1.0, eos_ids=(-1,), pad_id=mt.PAD)
        jax.block_until_ready(out)
        return time.perf_counter() - t

    t0 = time.perf_counter()
    prefill()
    print(f"  prefill compiled+ran in {time.perf_counter() - t0:.1f} s", flush=True)
    t_pre = min(_t(prefill) for _ in range(3))
    t0 = time.perf_counter()
    decode()
    print(f"  decode compiled+ran in {time.perf_counter() - t0:.1f} s", flush=True)
    t_dec = min(decode() for _ in range(3))
    n_params = sum(x.size for x in jax.tree.leaves(state))
    dec_params = n_params - sum(x.size for x in jax.tree.leaves(nnx.state(model.visual)))
    t_cfg = cfg.text
    kv_bytes_full = 2 * t_cfg.num_layers * B * G * cache_len * t_cfg.num_kv_heads * t_cfg.head_dim * 2
    bytes_per_step = dec_params * 2 + kv_bytes_full / 2  # cache is half full on average
    step = t_dec / N
    print(f"[{name} bf16 on {jax.devices()[0].device_kind}] params {n_params / 1e9:.2f}B, "
          f"{B} prompts x G={G}, prompt {T} tokens, {N} new tokens")
    print(f"  prefill {1e3 * t_pre:.1f} ms; decode {t_dec:.2f} s = {1e3 * step:.2f} ms/step, "
          f"{B * G * N / t_dec:.0f} tok/s")
    print(f"  memory-bandwidth bound: {bytes_per_step / 1e9:.2f} GB/step -> "
          f"{bytes_per_step / step / 1e12:.2f} TB/s = {bytes_per_step / step / peak_bw:.1%} "
          f"of {peak_bw / 1e12:.2f} TB/s peak", flush=True)
    # End to end through the public entry point (host padding and transfers included).
    kw = dict(group_size=G, max_new_tokens=N, temperature=1.0, eos_token_ids=NEVER,
              pad_token_id=mt.PAD, rng=jax.random.key(0))
    t_gen = _time(lambda: jax.block_until_ready(
        sampler.generate(model, ids, mask, pv, grid, **kw).tokens), 2)
    print(f"  (a) generate() end to end {t_gen:.2f} s, {B * G * N / t_gen:.0f} tok/s", flush=True)
    if not hf:
        return
    import subprocess
    cmd = [sys.executable, os.path.abspath(__file__), "--device-hf", "--device-preset", name,
           "--batch", str(B), "--group", str(G), "--new-tokens", str(N)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    line = [x for x in res.stdout.splitlines() if x.startswith("HF_GENERATE_SECONDS")]
    if res.returncode or not line:
        print(f"  (c) transformers generate failed (rc {res.returncode}):\n"
              + (res.stdout + res.stderr)[-3000:])
        return
    t_hf = float(line[0].split()[1])
    print(f"  (c) transformers generate (torch, bf16, same device, num_return_sequences=G) "
          f"{t_hf:.2f} s, {B * G * N / t_hf:.0f} tok/s   a/c = {t_hf / t_gen:.2f}x", flush=True)


def device_hf(name, B, G, N):
    """Child process: transformers ``generate`` of the same architecture (random weights)."""
    import torch
    import transformers
    from dipr1_jax.model import to_hf_dict
    cfg = preset(name)
    hc = transformers.AutoConfig.for_model(**to_hf_dict(cfg))
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: dry runs of this script
    with torch.device(dev):
        hf = transformers.AutoModelForImageTextToText.from_config(hc, dtype=torch.bfloat16).eval()
    ids, mask, pv, grid = _device_inputs(cfg, B)
    args = dict(input_ids=torch.tensor(ids, device=dev), attention_mask=torch.tensor(mask, device=dev),
                pixel_values=torch.tensor(pv, device=dev, dtype=torch.bfloat16),
                image_grid_thw=torch.tensor(grid, device=dev),
                mm_token_type_ids=torch.tensor((ids == cfg.image_token_id).astype(np.int64), device=dev),
                do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N,
                min_new_tokens=N, num_return_sequences=G, eos_token_id=None, pad_token_id=mt.PAD)

    def gen():
        with torch.no_grad():
            out = hf.generate(**args)
        if dev == "cuda":
            torch.cuda.synchronize()
        assert out.shape == (B * G, ids.shape[1] + N), out.shape

    print(f"HF_GENERATE_SECONDS {_time(gen, 2):.4f}", flush=True)


def _t(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,bench-100m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--grid", type=int, nargs=2, default=(16, 16),
                    help="image patch grid h w (image tokens = h*w/4); CPU mode")
    ap.add_argument("--device", action="store_true")
    ap.add_argument("--device-preset", default="qwen2.5-vl-3b")
    ap.add_argument("--device-hf", action="store_true",
                    help="internal: the transformers half of --device, run in a child process")
    ap.add_argument("--no-hf", action="store_true", help="--device without transformers")
    ap.add_argument("--peak-bw", type=float, default=0.0,
                    help="peak memory bandwidth, bytes/s (default: from the device kind)")
    args = ap.parse_args()
    if args.device_hf:
        device_hf(args.device_preset, args.batch, args.group, args.new_tokens)
        return
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    if args.device:
        device_bench(args.device_preset, args.batch, args.group, args.new_tokens, args.peak_bw,
                     hf=not args.no_hf)
        return
    for name in args.presets.split(","):
        cpu_bench(name, args.batch, args.group, args.new_tokens, args.repeats, args.skip_hf,
                  tuple(args.grid))


if __name__ == "__main__":
    main()
