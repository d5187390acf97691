"""One GRPO iteration (rollout, rewards, update): our trainer vs TRL's GRPOTrainer, same run.

    python benchmarks/train_bench.py                          # tiny and bench-100m, CPU
    python benchmarks/train_bench.py --models tiny --iters 5
    python benchmarks/train_bench.py --device                 # qwen2.5-vl-3b, GPU (TRL too)

Both sides train the same model configuration from the same weights (our
random init, exported with ``save_hf`` and loaded by transformers), on the
same images (``SyntheticCrowds`` scenes, 112x84 by default) with the same
short Think-Look-Answer prompt (the token ids are checked equal), the same
group size G, batch of B prompts, completion length and reward (our
``parse_completions`` + ``dip_rewards`` on the decoded completions), beta =
0.04 (reference log-probs are part of the update), mu = 1, temperature 1,
no top-k/top-p, AdamW with global-norm clipping, no activation checkpointing
(TRL's default ``gradient_checkpointing=True`` is turned off to match).

* ours: ``dipr1_jax.train.loop.GRPOLoop.iteration`` (the trainer's own
  iteration, ``time/rollout``, ``time/reward``, ``time/update``), with the
  reference log-prob pass and the jitted step timed inside the update.
* TRL: ``trl.GRPOTrainer.train`` for warm-up + N optimizer steps (one
  generation batch of B*G completions per step: ``per_device_train_batch_size
  = B*G``, ``num_generations = G``); phases from wrapping ``_generate``
  (rollout: chat template, processor, ``generate``, decode),
  ``_calculate_rewards`` (reward), the no-grad
  ``_get_per_token_logps_and_entropies`` (reference log-probs) and
  ``training_step`` minus ``_prepare_inputs`` (loss forward+backward) plus the
  clip/optimizer step; "other" is the rest of the iteration (TRL: the
  processor run again for the training forward, padding, advantages, data
  loading; ours: logging).

Every completion runs its full length on both sides (ours: a stop id no token
equals; TRL: ``min_new_tokens``), so both decode and train on B*G*N tokens.
Compilation is excluded (``--warmup`` iterations of ours first); then TRL's
and our timed iterations alternate (TRL, ours, TRL, ours, ...) so both see
the same machine load, and the median of ``--iters`` iterations is printed
per phase with the ratio trl/ours (> 1: ours faster). torch runs with
``OMP_WAIT_POLICY=PASSIVE``: with libgomp's default spinning, a small linear
layer took 8 ms instead of 0.06 ms on this shared 2-core machine while another
job ran (TRL 17x slower end to end), which measures the load, not TRL.

``--device``: the ``qwen2.5-vl-3b`` architecture (the shipped tokenizer's
special ids, random weights), bf16 compute with float32 parameters on both
sides (TRL: ``bf16=True``), ours and TRL in child processes one after the
other on the same accelerator. It needs a GPU (TRL runs on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

AUTO_ITERS = {"tiny": 3, "bench-100m": 1, "qwen2.5-vl-3b": 3}
NEVER = [-1]  # a stop id no token equals: every completion decodes all N tokens
PHASES = ("rollout", "reward", "update", "other")
SUBPHASES = ("update/ref_logp", "update/policy_step")


# ----------------------------------------------------------------------------- shared set-up
def bench_config(a, name: str, device: bool):
    """The trainer config of the benchmark (the TRL side mirrors it)."""
    from dipr1_jax.config import (Config, DataSection, GRPOConfig, LogSection, MeshSection,
                                  ModelSection, RolloutSection, TrainSection)
    from dipr1_jax.data import preprocess as pp

    w, h = a.image
    rh, rw = pp.smart_resize(h, w)
    patches = (rh // 14) * (rw // 14) if a.vision_max_patches < 0 else a.vision_max_patches
    model = ModelSection(
        preset=name,
        dtype="bfloat16" if device else "float32", param_dtype="float32",
        vision_max_patches=patches)  # per-image layout by default (what training should set)
    return Config(
        mode="grpo", seed=a.seed, model=model,
        data=DataSection(prompt_style="short", synthetic_width=w, synthetic_height=h),
        rollout=RolloutSection(max_new_tokens=a.new_tokens, temperature=1.0),
        train=TrainSection(steps=a.warmup + iters_of(a, name), batch_size=a.batch),
        grpo=GRPOConfig(group_size=a.group_size, beta=a.beta),
        log=LogSection(every=10 ** 6, samples_every=0, tensorboard=False),
        mesh=MeshSection(devices=1))


def iters_of(a, name: str) -> int:
    return a.iters or AUTO_ITERS.get(name, 2)


def make_model(cfg, name: str):
    """Random-init policy of preset ``name`` with the shipped tokenizer. A preset with Qwen's
    real special ids (the 3B) gets the tokenizer's ids instead: same architecture and FLOPs."""
    from dipr1_jax import tokens
    from dipr1_jax.model import create_model, preset
    from dipr1_jax.tokenizer import load_tokenizer

    m = cfg.model
    mcfg = preset(name, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                  vision_max_patches=m.vision_max_patches)
    if mcfg.image_token_id != tokens.TINY_IMAGE_TOKEN_ID:
        mcfg = mcfg.replace(image_token_id=tokens.TINY_IMAGE_TOKEN_ID,
                            video_token_id=tokens.TINY_VIDEO_TOKEN_ID,
                            vision_start_token_id=tokens.TINY_VISION_START_TOKEN_ID,
                            vision_end_token_id=tokens.TINY_VISION_END_TOKEN_ID,
                            bos_token_id=-1, eos_token_id=tokens.TINY_EOS_TOKEN_ID,
                            pad_token_id=tokens.TINY_PAD_TOKEN_ID)
    tok = load_tokenizer(None)
    if tok.vocab_size > mcfg.text.vocab_size:
        raise ValueError(f"{name}: vocab {mcfg.text.vocab_size} < tokenizer {tok.vocab_size}")
    return create_model(mcfg, seed=cfg.seed), tok


def n_params(model) -> int:
    import jax
    from flax import nnx
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


# ----------------------------------------------------------------------------- ours
class OursBench:
    """Our trainer's GRPO iterations (``GRPOLoop.iteration``), one per ``iterate()`` call, with
    the reference log-prob pass and the jitted policy step timed inside the update."""

    def __init__(self, cfg, model, tokenizer):
        import jax

        from dipr1_jax.train.loop import GRPOLoop, Run
        from dipr1_jax.train.writers import RunWriter

        class BenchRun(Run):
            @property
            def eos_ids(self):  # full-length completions (equal work with TRL's min_new_tokens)
                return list(NEVER)

        self.cfg = cfg
        self.workdir = workdir = tempfile.mkdtemp(prefix="train_bench_ours_")
        self.run = BenchRun(cfg, workdir, RunWriter(workdir, is_main=True, tensorboard=False),
                            tokenizer)
        self.loop = GRPOLoop(self.run, model)
        self.cur: dict = {}
        self.rows: list = []
        self.warmup_s = 0.0

        def timed(key, fn):
            def wrapper(*args, **kw):
                t = time.perf_counter()
                out = jax.block_until_ready(fn(*args, **kw))
                self.cur[key] = self.cur.get(key, 0.0) + time.perf_counter() - t
                return out
            return wrapper

        self.loop.logprob_fn = timed("update/ref_logp", self.loop.logprob_fn)
        self.loop.step_fn = timed("update/policy_step", self.loop.step_fn)

    def iterate(self, warmup: bool = False) -> dict:
        c = self.cfg
        self.cur.clear()
        i = len(self.rows)
        with self.run.mesh_context():
            t0 = time.perf_counter()
            m = self.loop.iteration(i, 10 ** 9)
            total = time.perf_counter() - t0
        row = {"rollout": m["time/rollout"], "reward": m["time/reward"],
               "update": m["time/update"], "total": total, **self.cur,
               "tokens": m["completion_len"] * c.train.batch_size * c.grpo.group_size,
               "loss": m.get("loss", float("nan")), "reward_mean": m["reward"]}
        row["other"] = total - row["rollout"] - row["reward"] - row["update"]
        print(f"    ours iter {i}{' (warm-up)' if warmup else ''}: {_row_str(row)}", flush=True)
        if warmup:
            self.warmup_s += total
            self.rows.append(None)
        else:
            self.rows.append(row)
        return row

    def result(self) -> dict:
        self.run.writer.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return {"rows": [r for r in self.rows if r is not None], "warmup_s": self.warmup_s}


# ----------------------------------------------------------------------------- TRL
def _processor(export_dir: str, cfg):
    """transformers' Qwen2.5-VL processor from the export's tokenizer and the PIL image
    processor (no torchvision needed: the video processor is left out)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(export_dir)
    ip = transformers.Qwen2VLImageProcessorPil(min_pixels=cfg.data.min_pixels,
                                               max_pixels=cfg.data.max_pixels)

    class Processor(transformers.Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return Processor(image_processor=ip, tokenizer=tok, video_processor=None,
                     chat_template=tok.chat_template)


def trl_dataset(cfg, tokenizer, processor, n: int):
    """``n`` records of the training source as TRL rows (conversational prompt + image + GT in
    the model frame); checks that TRL's prompt ids and patches equal our pipeline's."""
    import datasets
    from PIL import Image

    from dipr1_jax.data import prompts
    from dipr1_jax.data.pipeline import ExampleBuilder
    from dipr1_jax.data.records import decode_image
    from dipr1_jax.train import data as train_data
    from trl.data_utils import prepare_multimodal_messages

    src = train_data.source(cfg.data, cfg.data.train_split, cfg.seed + 1)
    build = ExampleBuilder(tokenizer, train_data.pipeline_config(cfg.data, cfg.train.batch_size,
                                                                 cfg.seed + 1))
    msgs = prompts.build_messages("detection", cfg.data.category, "short")
    prompt = [{"role": "system", "content": msgs[0]["content"]},
              {"role": "user", "content": msgs[1]["content"][1]["text"]}]
    rows = []
    for i in range(n):
        rec = src[i % len(src)]
        ex = build(rec)
        img = Image.fromarray(np.asarray(decode_image(rec)))
        if i == 0:
            conv = prepare_multimodal_messages(prompt, images=[img])
            got = processor.apply_chat_template(conversation=[conv], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)
            ids = list(np.asarray(got["input_ids"][0]))
            if ids != list(ex["input_ids"]):
                raise AssertionError(f"TRL prompt ids differ from ours:\n{ids}\n"
                                     f"{list(ex['input_ids'])}")
            diff = np.abs(np.asarray(got["pixel_values"]) - ex["pixel_values"]).max()
            if diff > 1e-4:
                raise AssertionError(f"TRL pixel values differ from ours by {diff}")
        rows.append({"prompt": prompt, "image": img, "gt": ex["gt_boxes"].tolist(),
                     "task": int(ex["task"])})
    return datasets.Dataset.from_list(rows), len(ex["input_ids"])


def make_reward(cfg):
    """TRL reward function: our parser and reward kernels on the decoded completions."""
    from dipr1_jax.data.pipeline import PipelineConfig, bucket
    from dipr1_jax.rewards import dip_rewards, parse_completions

    G, rc = cfg.grpo.group_size, cfg.rewards
    buckets = PipelineConfig().box_buckets  # the pipeline's GT padding: the same compiled kernels

    def dip_reward(prompts, completions, gt, task, **kwargs):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        B = len(texts) // G
        gts = [gt[b * G] for b in range(B)]
        K = bucket(max(len(g) for g in gts), buckets)
        boxes = np.zeros((B, K, 4), np.float32)
        mask = np.zeros((B, K), bool)
        for b, g in enumerate(gts):
            boxes[b, :len(g)] = np.asarray(g, np.float32).reshape(-1, 4)
            mask[b, :len(g)] = True
        parsed = parse_completions(texts, rc.max_boxes, rc.max_look)
        r = dip_rewards(parsed, boxes, mask, G, rc,
                        is_count=np.asarray([task[b * G] == 1 for b in range(B)]),
                        ignore_boxes=np.zeros((B, buckets[0], 4), np.float32),
                        ignore_mask=np.zeros((B, buckets[0]), bool))
        return np.asarray(r["total"], np.float64).reshape(-1).tolist()

    return dip_reward


def time_trl(cfg, export_dir: str, tokenizer, warmup: int, iters: int, device: bool,
             between=None) -> dict:
    """TRL's iterations; ``between()`` runs after each timed one (outside its clock)."""
    import torch
    import transformers
    import trl

    B, G, N = cfg.train.batch_size, cfg.grpo.group_size, cfg.rollout.max_new_tokens
    processor = _processor(export_dir, cfg)
    steps = warmup + iters
    ds, prompt_len = trl_dataset(cfg, tokenizer, processor, max(B * steps, 2 * B))
    out_dir = tempfile.mkdtemp(prefix="train_bench_trl_")
    o = cfg.train.optim
    args = trl.GRPOConfig(
        output_dir=out_dir, seed=cfg.seed, use_cpu=not device, bf16=device,
        num_generations=G, per_device_train_batch_size=B * G, gradient_accumulation_steps=1,
        max_completion_length=N, generation_kwargs={"min_new_tokens": N},
        temperature=cfg.rollout.temperature, top_p=1.0, top_k=0,
        beta=cfg.grpo.beta, epsilon=cfg.grpo.eps_low, epsilon_high=cfg.grpo.eps_high,
        num_iterations=cfg.grpo.mu, loss_type="dapo", scale_rewards="group",
        learning_rate=o.learning_rate, adam_beta1=o.b1, adam_beta2=o.b2,
        weight_decay=o.weight_decay, max_grad_norm=o.grad_clip, warmup_steps=o.warmup_steps,
        lr_scheduler_type="cosine", max_steps=steps, logging_steps=10 ** 6,
        save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0, remove_unused_columns=False,
        # TRL defaults to activation checkpointing; ours recomputes nothing (model.remat).
        gradient_checkpointing=cfg.model.remat != "none")
    model = transformers.AutoModelForImageTextToText.from_pretrained(export_dir,
                                                                     dtype=torch.float32)
    reward = make_reward(cfg)
    # Compile the reward kernels outside the clock (a no-op when ours already ran them).
    reward(None, ["<answer>[]</answer>"] * (B * G), gt=[ds[0]["gt"]] * (B * G),
           task=[0] * (B * G))
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[reward], args=args,
                              train_dataset=ds, processing_class=processor)
    cur: dict = {"tokens": 0}
    marks: dict = {}

    def timed(key, fn, when=None):
        def wrapper(*a, **kw):
            if when is not None and not when():
                return fn(*a, **kw)
            t = time.perf_counter()
            out = fn(*a, **kw)
            if device:
                torch.cuda.synchronize()
            cur[key] = cur.get(key, 0.0) + time.perf_counter() - t
            if key == "rollout":
                cur["tokens"] += sum(len(c) for c in out[1])
            if key == "train_step":
                marks["train_step_end"] = time.perf_counter()
            return out
        return wrapper

    trainer._generate = timed("rollout", trainer._generate)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed(
        "update/ref_logp", trainer._get_per_token_logps_and_entropies,
        when=lambda: not torch.is_grad_enabled())
    trainer._prepare_inputs = timed("prepare", trainer._prepare_inputs)
    trainer.training_step = timed("train_step", trainer.training_step)
    rows = []

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks["end"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            r = dict(cur)
            tail = now - marks["train_step_end"]  # grad clip, optimizer, scheduler, zero_grad
            r["update/policy_step"] = r["train_step"] - r["prepare"] + tail
            r["update"] = r.get("update/ref_logp", 0.0) + r["update/policy_step"]
            r["total"] = now - marks["end"]
            r["other"] = r["total"] - r["rollout"] - r["reward"] - r["update"]
            i = len(rows)
            rows.append(r)
            print(f"    trl  iter {i}{' (warm-up)' if i < warmup else ''}: {_row_str(r)}",
                  flush=True)
            if between is not None and i >= warmup:
                between()
            cur.clear()
            cur["tokens"] = 0
            marks["end"] = time.perf_counter()

    trainer.add_callback(Clock())
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"rows": rows[warmup:], "prompt_len": prompt_len, "trl": trl.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__}


# ----------------------------------------------------------------------------- report
def _row_str(r: dict) -> str:
    parts = [f"{k} {r[k]:.2f}s" for k in PHASES[:3] if k in r]
    parts[-1] += " (" + ", ".join(f"{k.split('/')[1]} {r[k]:.2f}s" for k in SUBPHASES
                                 if k in r) + ")"
    parts += [f"{k} {r[k]:.2f}s" for k in ("other", "total")]
    return "  ".join(parts) + f"  tokens {int(r.get('tokens', 0))}"


def _median(rows, key):
    vals = [r.get(key, 0.0) for r in rows]
    return statistics.median(vals) if vals else float("nan")


def report(name: str, ours: dict, trl_res: dict | None, info: str) -> None:
    print(f"\n[{name}] {info}")
    if trl_res:
        print(f"  TRL {trl_res['trl']} (transformers {trl_res['transformers']}, torch "
              f"{trl_res['torch']}); median of {len(ours['rows'])} iterations each; "
              f"ours' warm-up (compile) {ours['warmup_s']:.1f} s")
    print(f"  {'phase':22s} {'ours (s)':>10s} {'TRL (s)':>10s} {'trl/ours':>9s}")
    for key in PHASES[:3] + SUBPHASES + PHASES[3:] + ("total",):
        a = _median(ours["rows"], key)
        label = ("  " + key.split("/")[1]) if "/" in key else key
        if trl_res:
            b = _median(trl_res["rows"], key)
            ratio = f"{b / a:8.2f}x" if a > 1e-6 else "      -"
            print(f"  {label:22s} {a:10.3f} {b:10.3f} {ratio}")
        else:
            print(f"  {label:22s} {a:10.3f}")
    tok_o = _median(ours["rows"], "tokens")
    line = f"  completion tokens per iteration: ours {tok_o:.0f}"
    if trl_res:
        line += f", TRL {_median(trl_res['rows'], 'tokens'):.0f}"
    print(line, flush=True)


# ----------------------------------------------------------------------------- modes
def bench_model(a, name: str, device: bool) -> dict:
    """Ours and TRL for preset ``name`` in this process, their timed iterations interleaved
    (ours' warm-up, TRL's warm-up, then TRL, ours, TRL, ours, ...) so both see the same
    machine load."""
    import jax

    from dipr1_jax.train.policy import export_policy  # save_hf + tokenizer files

    cfg = bench_config(a, name, device)
    model, tok = make_model(cfg, name)
    res = {"params": n_params(model), "backend": jax.default_backend(),
           "device_kind": jax.devices()[0].device_kind}
    export_dir = a.export_dir or tempfile.mkdtemp(prefix="train_bench_export_")
    if not a.skip_trl:
        # The policy's initial weights, for transformers (the loop trains its own copies).
        export_policy(model, tok, export_dir, cfg.data.min_pixels, cfg.data.max_pixels)
    print(f"  ours: GRPOLoop ({res['params'] / 1e6:.1f}M parameters, {res['backend']})",
          flush=True)
    ours = OursBench(cfg, model, tok)
    del model
    for _ in range(a.warmup):
        ours.iterate(warmup=True)
    iters = iters_of(a, name)
    if a.skip_trl:
        for _ in range(iters):
            ours.iterate()
    else:
        print("  TRL: GRPOTrainer (ours' timed iterations run between TRL's)", flush=True)
        res["trl"] = time_trl(cfg, export_dir, tok, a.trl_warmup, iters, device,
                              between=ours.iterate)
    res["ours"] = ours.result()
    if not a.export_dir:
        shutil.rmtree(export_dir, ignore_errors=True)
    return res


def _info(a, res: dict, prompt_len) -> str:
    return (f"{res['params'] / 1e6:.1f}M parameters on {res['device_kind']}; B={a.batch} prompts "
            f"x G={a.group_size} x {a.new_tokens} new tokens (all forced to full length), "
            f"{a.image[0]}x{a.image[1]} images, prompt {prompt_len} tokens, beta={a.beta}")


def _need_trl(a) -> bool:
    """False (with a note) when TRL is not installed and --skip-trl was not given."""
    import importlib.util
    if a.skip_trl:
        return False
    if importlib.util.find_spec("trl") is None:
        print("TRL is not installed (pip install -e '.[bench]'; offline machines: carry the "
              "trl, accelerate and datasets wheels): timing ours only", flush=True)
        return False
    return True


def cpu_main(a) -> None:
    import jax
    a.skip_trl = not _need_trl(a)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}; OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    for name in a.models.split(","):
        print(f"[{name}]", flush=True)
        res = bench_model(a, name, device=False)
        report(name, res["ours"], res.get("trl"),
               _info(a, res, res.get("trl", {}).get("prompt_len", "?")))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)


def _child(a, side: str, export_dir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--export-dir", export_dir,
           "--models", a.device_preset, "--batch", str(a.batch), "--group-size", str(a.group_size),
           "--new-tokens", str(a.new_tokens), "--iters", str(iters_of(a, a.device_preset)),
           "--warmup", str(a.warmup), "--trl-warmup", str(a.trl_warmup),
           "--vision-max-patches", str(a.vision_max_patches),
           "--beta", str(a.beta), "--seed", str(a.seed), "--image", str(a.image[0]),
           str(a.image[1])] + (["--allow-cpu"] if a.allow_cpu else [])
    env = dict(os.environ)
    if side != "trl":  # ours takes most of the card (this process holds a small context)
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = os.environ.get("TRAIN_BENCH_PREALLOCATE", "true")
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.85")
    print(f"  child: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=a.child_timeout)
    lines = proc.stdout.splitlines()
    for line in lines:
        if line.strip() and not line.startswith("RESULT_JSON ") and "Warning" not in line:
            print("   |" + line, flush=True)
    got = [x for x in lines if x.startswith("RESULT_JSON ")]
    if proc.returncode or not got:
        raise SystemExit(f"train_bench --device: the {side} child failed (exit {proc.returncode})")
    return json.loads(got[-1][len("RESULT_JSON "):])


def device_main(a) -> None:
    # This process only checks for the accelerator: the children need the card.
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import jax
    backend = jax.default_backend()
    if backend == "cpu" and not a.allow_cpu:
        raise SystemExit("train_bench --device needs an accelerator: jax sees only CPU devices "
                         f"({jax.devices()}). Run it on the GPU machine, or drop --device for the "
                         "CPU comparison.")
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    a.skip_trl = not _need_trl(a)
    skip_trl = a.skip_trl or not (cuda or a.allow_cpu)
    if skip_trl and not a.skip_trl:
        print("  TRL skipped: torch sees no CUDA device (TRL's GPU path needs one)", flush=True)
    print(f"device mode: {a.device_preset}, jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}", flush=True)
    export_dir = a.export_dir or tempfile.mkdtemp(prefix="train_bench_export_")
    try:
        ours = _child(a, "ours" if skip_trl else "ours+export", export_dir)
        trl_res = None if skip_trl else _child(a, "trl", export_dir)
    finally:
        if not a.export_dir:
            shutil.rmtree(export_dir, ignore_errors=True)
    report(a.device_preset, ours["ours"], trl_res and trl_res["trl"],
           _info(a, ours, (trl_res or {}).get("trl", {}).get("prompt_len", "?")))


def child_main(a) -> None:
    side = a.child
    import jax
    if jax.default_backend() == "cpu" and not a.allow_cpu:
        raise SystemExit("train_bench child: no accelerator")
    name = a.models.split(",")[0]
    if side == "trl":
        import torch
        if not torch.cuda.is_available() and not a.allow_cpu:
            raise SystemExit("train_bench child: torch sees no CUDA device")
        cfg = bench_config(a, name, device=True)
        from dipr1_jax.tokenizer import load_tokenizer
        res = {"trl": time_trl(cfg, a.export_dir, load_tokenizer(None), a.trl_warmup, a.iters,
                               device=torch.cuda.is_available())}
    else:
        cfg = bench_config(a, name, device=True)
        model, tok = make_model(cfg, name)
        res = {"params": n_params(model), "backend": jax.default_backend(),
               "device_kind": jax.devices()[0].device_kind}
        ours = OursBench(cfg, model, tok)
        for i in range(a.warmup + a.iters):
            ours.iterate(warmup=i < a.warmup)
        res["ours"] = ours.result()
        if side == "ours+export":
            from dipr1_jax.train.policy import export_policy
            t = time.perf_counter()
            export_policy(model, tok, a.export_dir, cfg.data.min_pixels, cfg.data.max_pixels)
            print(f"  exported the initial weights for TRL in {time.perf_counter() - t:.1f} s",
                  flush=True)
    print("RESULT_JSON " + json.dumps(res), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--models", default="tiny,bench-100m", help="presets, CPU mode")
    ap.add_argument("--batch", type=int, default=4, help="B prompts per iteration")
    ap.add_argument("--group-size", type=int, default=8, help="G completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=64, help="completion length (forced)")
    ap.add_argument("--iters", type=int, default=0,
                    help="timed iterations per side, median printed (0: "
                         + ", ".join(f"{k} {v}" for k, v in AUTO_ITERS.items()) + ")")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed iterations of ours first (compilation)")
    ap.add_argument("--trl-warmup", type=int, default=-1,
                    help="untimed TRL iterations first (-1: none on CPU, where nothing compiles, "
                         "1 with --device: CUDA/cuBLAS start-up)")
    ap.add_argument("--vision-max-patches", type=int, default=-1,
                    help="ours: per-image vision layout with this many patches (-1: one image's "
                         "patches; 0: the flat layout)")
    ap.add_argument("--beta", type=float, default=0.04, help="KL weight (> 0: reference pass)")
    ap.add_argument("--image", type=int, nargs=2, default=(112, 84), metavar=("W", "H"),
                    help="synthetic image size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-trl", action="store_true", help="time ours only")
    ap.add_argument("--device", action="store_true",
                    help="accelerator mode: --device-preset, ours then TRL on the same card")
    ap.add_argument("--device-preset", default="qwen2.5-vl-3b")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="let --device run on CPU (a dry run of its plumbing with a small preset)")
    ap.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "unset"],
                    help="torch's OpenMP threads: PASSIVE (default) sleeps at barriers; ACTIVE "
                         "(libgomp's spinning) is up to 100x slower for small ops on a loaded "
                         "machine")
    ap.add_argument("--child-timeout", type=int, default=1200)
    ap.add_argument("--child", choices=["ours", "ours+export", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--export-dir", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.trl_warmup < 0:
        a.trl_warmup = 1 if a.device else 0
    if a.omp_wait_policy != "unset":  # before torch (libgomp reads it once, at load)
        os.environ.setdefault("OMP_WAIT_POLICY", a.omp_wait_policy)
    if a.child:
        child_main(a)
    elif a.device:
        device_main(a)
    else:
        cpu_main(a)


if __name__ == "__main__":
    main()
