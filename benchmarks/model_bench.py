"""Forward+backward step time of the NNX Qwen-VL port.

CPU mode (default): for the ``tiny`` and ``bench-100m`` (~94M parameters)
presets, the same random weights (transformers model saved, then loaded with
``load_hf``) and the same inputs are timed in JAX and in transformers/torch;
the printed ratio is torch time / JAX time (> 1: JAX faster). It also reports
the JAX compile time with and without ``scan_layers``.

    JAX_PLATFORMS=cpu python benchmarks/model_bench.py [--steps 5]

Device mode: a random-weight 3B-class config (``qwen2.5-vl-3b`` by default)
in bf16 compute on the first accelerator; prints step time, tokens/s and MFU
= 6 * params * tokens / time / peak (params: all parameters; tokens: text
tokens, image tokens included), and the compile time with and without layer
scan.

    python benchmarks/model_bench.py --device [--preset qwen2.5-vl-3b] [--batch 4]

``--attention auto|xla|cudnn|splash`` picks ``model.attention`` (both modes; auto: cudnn
on a CUDA GPU, splash on TPU, xla on CPU); ``--models`` the CPU presets.
"""

from __future__ import annotations

import argparse
import os

# torch's OpenMP threads spin-wait by default; on a loaded 2-core machine that makes the
# torch baseline measure the load (see BUILD_NOTES, Benchmarks/Trainer).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from dipr1_jax.model import attention as attn  # noqa: E402
from dipr1_jax.model import create_model, load_hf, param_table, preset, to_hf_dict, vision  # noqa: E402

# Dense bf16 peak (TFLOP/s) by device kind.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "TPU v4": 275.0, "TPU v5e": 197.0,
               "TPU v5p": 459.0, "TPU v6": 918.0}


def make_inputs(cfg, batch: int, text_len: int, grid_hw: tuple[int, int], seed: int = 0):
    """Rows ``[text, <vs>, image tokens, <ve>, text]``: one ``grid_hw`` image per row."""
    rng = np.random.default_rng(seed)
    h, w = grid_hw
    n_img = h * w // cfg.vision.spatial_merge_size ** 2
    head = text_len // 4
    rows = []
    for _ in range(batch):
        row = list(rng.integers(0, min(1000, cfg.text.vocab_size), head))
        row += [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
        row += list(rng.integers(0, min(1000, cfg.text.vocab_size), text_len - head))
        rows.append(row)
    ids = np.asarray(rows, np.int32)
    mask = np.ones_like(ids)
    grid = np.asarray([[1, h, w]] * batch, np.int32)
    pix = rng.standard_normal((batch * h * w, cfg.vision.patch_dim)).astype(np.float32)
    return ids, mask, pix, grid


def jax_step_fn(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, r, ids, mask, pix, grid):
        logits = nnx.merge(graphdef, p, r)(ids, mask, pix, grid)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
        m = mask[:, 1:].astype(jnp.float32)
        return jnp.sum(ce * m) / jnp.sum(m)

    return jax.jit(jax.value_and_grad(loss)), params, rest


def time_it(fn, steps: int) -> float:
    fn()  # warm-up after compile
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def n_params(cfg) -> int:
    return sum(int(np.prod(e.hf_shape)) * len(e.hf) for e in param_table(cfg))


def compile_time(model, args) -> float:
    step, params, rest = jax_step_fn(model)
    t = time.perf_counter()
    step.lower(params, rest, *args).compile()
    return time.perf_counter() - t


def cpu_bench(name: str, batch: int, text_len: int, grid_hw, steps: int,
              attention: str = "auto") -> None:
    import torch
    import transformers
    cfg = preset(name)
    hc = transformers.AutoConfig.for_model(**to_hf_dict(cfg))
    torch.manual_seed(0)
    hf = transformers.AutoModelForImageTextToText.from_config(hc, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = load_hf(d, attention=attention)
    hf.train()
    ids, mask, pix, grid = make_inputs(cfg, batch, text_len, grid_hw)
    targs = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 pixel_values=torch.tensor(pix), image_grid_thw=torch.tensor(grid, dtype=torch.long),
                 mm_token_type_ids=torch.tensor((ids == cfg.image_token_id).astype(np.int64)),
                 labels=torch.tensor(ids, dtype=torch.long))

    def torch_step():
        hf.zero_grad(set_to_none=True)
        out = hf(**targs)
        out.loss.backward()
        return float(out.loss)

    step, params, rest = jax_step_fn(model)
    args = [jnp.asarray(x) for x in (ids, mask, pix, grid)]
    t0 = time.perf_counter()
    step.lower(params, rest, *args).compile()
    t_compile = time.perf_counter() - t0

    def jax_step():
        loss, grads = step(params, rest, *args)
        jax.block_until_ready(grads)
        return float(loss)

    lj, lt = jax_step(), torch_step()
    tj, tt = time_it(jax_step, steps), time_it(torch_step, steps)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        scan_model = load_hf(d, scan_layers=True, attention=attention)
    t_scan = compile_time(scan_model, args)
    tokens = ids.size
    print(f"{name:11s} attention={attention} params={n_params(cfg) / 1e6:7.2f}M batch={batch} "
          f"tokens={tokens} "
          f"patches={pix.shape[0]} | loss jax={lj:.5f} torch={lt:.5f} | step jax={tj * 1e3:8.1f} ms "
          f"torch={tt * 1e3:8.1f} ms | torch/jax = {tt / tj:5.2f}x | compile loop={t_compile:5.1f} s "
          f"scan={t_scan:5.1f} s", flush=True)


def parts_bench(model, args, steps: int) -> None:
    """Where a step's time goes: the vision tower alone (forward+backward of a
    scalar of its output) and the decoder + loss alone (image tokens replaced by
    text tokens, no vision tower), each compiled and timed on its own."""
    ids, mask, pix, grid = args
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    text_ids = jnp.where(ids == model.cfg.image_token_id, 100, ids)

    def vision_loss(p, r):
        out = nnx.merge(graphdef, p, r).encode_images(pix, grid)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    def text_loss(p, r):
        logits = nnx.merge(graphdef, p, r)(text_ids, mask)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], text_ids[:, 1:])
        return jnp.mean(ce)

    for label, fn in (("vision tower", vision_loss), ("decoder + loss", text_loss)):
        step = jax.jit(jax.value_and_grad(fn))
        compiled = step.lower(params, rest).compile()

        def run(compiled=compiled):
            jax.block_until_ready(compiled(params, rest))

        run()
        print(f"  part: {label:15s} fwd+bwd {time_it(run, steps) * 1e3:8.1f} ms", flush=True)


def device_bench(name: str, batch: int, text_len: int, grid_hw, steps: int, remat: str,
                 scan_modes, parts: bool = False, attention: str = "auto") -> None:
    dev = jax.devices()[0]
    kind = dev.device_kind
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    print(f"device: {kind} ({dev.platform}), jax {jax.__version__}; peak bf16 "
          f"{peak} TFLOP/s; attention={attention} (-> {attn.resolve(attention)})", flush=True)
    for scan in scan_modes:
        cfg = preset(name, dtype="bfloat16", param_dtype="float32", remat=remat,
                     scan_layers=scan, vision_max_patches=grid_hw[0] * grid_hw[1],
                     attention=attention)
        t0 = time.perf_counter()
        model = create_model(cfg, seed=0)
        jax.block_until_ready(nnx.state(model))
        t_init = time.perf_counter() - t0
        print(f"  scan={scan}: init {t_init:.1f} s; compiling", flush=True)
        ids, mask, pix, grid = make_inputs(cfg, batch, text_len, grid_hw)
        args = [jnp.asarray(x) for x in (ids, mask, pix, grid)]
        step, params, rest = jax_step_fn(model)
        t0 = time.perf_counter()
        compiled = step.lower(params, rest, *args).compile()
        t_compile = time.perf_counter() - t0
        print(f"  compiled in {t_compile:.1f} s", flush=True)

        def run():
            loss, grads = compiled(params, rest, *args)
            jax.block_until_ready(grads)
            return loss

        loss = float(run())
        t = time_it(run, steps)
        n = n_params(cfg)
        tokens = ids.size
        flops = 6.0 * n * tokens
        mfu = flops / t / (peak * 1e12) if peak else float("nan")
        print(f"[{kind}] {name} attention={attention} scan={scan} remat={remat} "
              f"vision={vision.WINDOW_IMPL} params={n / 1e9:.3f}B batch={batch} "
              f"seq={ids.shape[1]} tokens={tokens} patches={pix.shape[0]} | init {t_init:.1f} s "
              f"compile {t_compile:.1f} s | step {t * 1e3:.1f} ms, {tokens / t:,.0f} tok/s, "
              f"MFU(6ND) {100 * mfu:.1f}% | loss {loss:.4f}", flush=True)
        if parts:
            parts_bench(model, args, steps)
        model = params = rest = compiled = None  # free before the next mode


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", action="store_true", help="accelerator mode (3B-class config)")
    ap.add_argument("--preset", default="qwen2.5-vl-3b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text-len", type=int, default=768)
    ap.add_argument("--grid", type=int, nargs=2, default=(32, 32),
                    help="image patch grid h w (32 32 = 448x448 px, 256 image tokens)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--models", default="tiny,bench-100m", help="CPU mode: presets to time")
    ap.add_argument("--remat", default="full")
    ap.add_argument("--scan", choices=["both", "on", "off"], default="both")
    ap.add_argument("--window-impl", choices=["blocked", "masked"], default="blocked",
                    help="vision windowed blocks: window slots (default) or dense masked scores")
    ap.add_argument("--attention", choices=attn.BACKENDS, default="auto",
                    help="model.attention backend (model/attention.py); auto: cudnn on GPU, "
                         "splash on TPU, xla on CPU")
    ap.add_argument("--parts", action="store_true",
                    help="--device: also time the vision tower and the decoder + loss alone")
    a = ap.parse_args(argv)
    vision.WINDOW_IMPL = a.window_impl
    if a.device:
        modes = {"both": (True, False), "on": (True,), "off": (False,)}[a.scan]
        device_bench(a.preset, a.batch, a.text_len, tuple(a.grid), a.steps, a.remat, modes,
                     a.parts, a.attention)
        return
    print(f"CPU: jax {jax.__version__} on {jax.devices()[0].device_kind}; ratio = torch/jax "
          "(median step time, forward+backward, same weights and inputs)", flush=True)
    models = a.models.split(",")
    if "tiny" in models:
        cpu_bench("tiny", batch=2, text_len=32, grid_hw=(8, 8), steps=a.steps,
                  attention=a.attention)
    if "bench-100m" in models:
        cpu_bench("bench-100m", batch=2, text_len=96, grid_hw=(16, 16), steps=a.steps,
                  attention=a.attention)


if __name__ == "__main__":
    main()
