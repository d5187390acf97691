"""Entry point: ``python -m dipr1_jax.launch [--config=configs/x.py] [--config.a.b=v ...]``.

Modes (``--config.mode``):
  pipeline     (default) on synthetic crowds, no downloads: evaluate the
               random-init model, SFT it, evaluate, GRPO from the SFT policy,
               evaluate, and print base -> SFT -> SFT+GRPO (plus a control:
               SFT continued for GRPO's wall time).
  sft          SFT from --config.model.checkpoint (or random init), exported.
  grpo         GRPO from --config.init_from (an export or HF directory) or
               --config.model.checkpoint, exported.
  eval         greedy evaluation of --config.init_from on the held-out split.
  reward-demo  the reward pipeline on synthetic scenes with simulated
               rollouts (no model).

``--workdir=DIR`` (default ``runs/<mode>-<time>``) receives config.json,
metrics.jsonl, samples.jsonl, TensorBoard events, export/ and report/.

Multi-host: one process per host, each running the same command. On a Cloud TPU
slice ``jax.distributed`` starts from the TPU environment; elsewhere pass
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``. Batch sizes
stay global (each process reads its own slice of every batch); only process 0
writes the workdir's logs, every process takes part in checkpoints, and a
preemption notice stops all of them after the same step.

Every config field is a flag; ``--help`` lists them. Bad values fail with one
line naming the flag.

``sft`` and ``grpo`` write orbax checkpoints to ``WORKDIR/checkpoints/<step>/``,
``pipeline`` to ``WORKDIR/checkpoints/{sft,grpo,control}/<step>/``
(``--config.checkpoint.every``, ``.keep``); rerunning the same command on the same
workdir continues from the newest one, bit for bit, reading back the evaluations
already logged (a workdir whose config differs is refused unless
``--config.checkpoint.force_resume``). With the default workdir, add the
``--workdir=runs/...`` it printed. SIGTERM (a preemption
notice) finishes the current step, checkpoints and exits 143; a second SIGTERM
exits at once. A step whose loss or gradient is not finite is skipped.

Exit status: 0 done; 2 bad flags, missing files, unwritable workdir, a refused
resume or a memory plan over the device's memory (the message names the flags that
would fit it); 3 ``train.max_bad_steps`` non-finite steps in a row (the message
names the last good checkpoint); 143 stopped by SIGTERM after writing a checkpoint.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

from dipr1_jax import cli
from dipr1_jax.config import Config, ConfigError

cli.define_config_flags(Config())
flags.adopt_module_key_flags(cli)  # so that --help lists every --config.* flag
flags.DEFINE_string("workdir", None, "run directory (default: runs/<mode>-<time>)")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed.initialize: auto = when --coordinator_address is given or "
                  "the Cloud TPU environment names several hosts; on = always (JAX detects "
                  "the cluster); off = never")
flags.DEFINE_string("coordinator_address", None,
                    "multi-process: host:port of process 0's coordinator (with "
                    "--num_processes and --process_id; not needed on a TPU slice)")
flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
flags.DEFINE_integer("process_id", None, "multi-process: this process's index")


def run_reward_demo(cfg: Config) -> dict:
    import jax
    import numpy as np

    from dipr1_jax.demo import make_batch
    from dipr1_jax.grpo import group_advantages
    from dipr1_jax.rewards import dip_rewards, parse_completions

    d, g = cfg.demo, cfg.grpo.group_size
    print(f"reward-demo: {jax.device_count()} {jax.default_backend()} device(s); "
          f"B={d.batch_size} prompts x G={g} rollouts, up to {d.max_gt} people per "
          f"{d.image_size}px image, {d.steps} steps", flush=True)
    totals = {k: [] for k in ("format", "look", "accuracy", "count", "total")}
    corr, parse_s, kernel_s = [], [], []
    for step in range(d.steps):
        gt, mask, texts, recall = make_batch(d.seed + step, d.batch_size, g, d.max_gt, d.image_size)
        t0 = time.perf_counter()
        parsed = parse_completions(texts, cfg.rewards.max_boxes, cfg.rewards.max_look)
        t1 = time.perf_counter()
        r = dip_rewards(parsed, gt, mask, g, cfg.rewards)
        adv = group_advantages(r["total"], cfg.grpo.scale_rewards)
        jax.block_until_ready(adv)
        t2 = time.perf_counter()
        r = {k: np.asarray(v) for k, v in r.items()}
        for k in totals:
            totals[k].append(float(r[k].mean()))
        # Within each group, does the reward rank the better simulated detector higher?
        a = np.asarray(adv)
        c = np.corrcoef(recall.reshape(-1), a.reshape(-1))[0, 1] if a.std() > 0 else 0.0
        corr.append(float(c))
        parse_s.append(t1 - t0)
        kernel_s.append(t2 - t1)
        s = parsed.summary()
        print(f"step {step}: total {r['total'].mean():.3f} | format {r['format'].mean():.3f} "
              f"look {r['look'].mean():.3f} acc {r['accuracy'].mean():.3f} "
              f"count {r['count'].mean():.3f} | corr(recall, adv) {c:+.2f} | "
              f"parse {1e3 * (t1 - t0):.1f} ms, kernels {1e3 * (t2 - t1):.1f} ms"
              f"{' (incl. compile)' if step == 0 else ''} | "
              f"{s['format_ok']}/{s['completions']} well-formed, "
              f"{s['answer_overflow_rows']} over max_boxes", flush=True)
    steady = kernel_s[1:] or kernel_s
    summary = {k: float(np.mean(v)) for k, v in totals.items()}
    summary.update(corr_recall_advantage=float(np.mean(corr)),
                   parse_ms=1e3 * float(np.median(parse_s)),
                   kernel_ms=1e3 * float(np.median(steady)))
    print("summary: " + ", ".join(f"{k}={v:.3f}" for k, v in summary.items()), flush=True)
    return summary


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    try:
        cfg = cli.config_from_flags(flags.FLAGS)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.mode == "reward-demo":
        run_reward_demo(cfg)
        return 0
    from dipr1_jax import multihost
    F = flags.FLAGS
    try:
        multihost.initialize(F.distributed, F.coordinator_address, F.num_processes,
                             F.process_id)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dipr1_jax.train.modes import MODES
    from dipr1_jax.train.checkpoint import Preempted, ResumeError
    from dipr1_jax.train.memory import MemoryPlanError
    from dipr1_jax.train.writers import WorkdirError

    # (every process must use process 0's default: their clocks differ)
    workdir = flags.FLAGS.workdir or multihost.broadcast_str(os.path.join(
        "runs", f"{cfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}"))
    resume_hint = (f"--workdir={workdir}" if not flags.FLAGS.workdir else None)
    import jax
    if resume_hint and jax.process_index() == 0 and cfg.mode != "eval":
        print(f"run directory {workdir} (after an interruption, add {resume_hint} to "
              f"the command to continue from its checkpoints)", flush=True)
    try:
        MODES[cfg.mode](cfg, workdir)
    except Preempted:
        if resume_hint:
            print(f"to continue: the same command with {resume_hint}", flush=True)
        raise
    except (WorkdirError, FileNotFoundError, ConfigError, ResumeError, MemoryPlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the non-finite guard gave up (train.max_bad_steps)
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


def run() -> None:
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
