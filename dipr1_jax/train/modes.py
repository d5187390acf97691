"""Launch modes: ``pipeline`` (base -> SFT -> SFT+GRPO, compared), ``sft``, ``grpo``, ``eval``.

Each mode owns one run directory (``--workdir``; DESIGN.md section 8):
``config.json``, ``metrics.jsonl`` (the last object has ``"final": true`` and
the final evaluation(s)), ``samples.jsonl``, TensorBoard events, ``export/``
(the trained policy as a Hugging Face directory) and ``report/`` (drawings).
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import logging

from dipr1_jax import multihost
from dipr1_jax.config import Config, parse_ood, replace_path, to_dict
from dipr1_jax.train import data as train_data
from dipr1_jax.train import state as st
from dipr1_jax.train.loop import GRPOLoop, Run, SFTLoop
from dipr1_jax.train.policy import export_policy as _export_policy, load_policy, training_info
from dipr1_jax.train.checkpoint import Checkpointer, Preemption, check_resumable
from dipr1_jax.train.writers import RunWriter, ensure_writable, eval_table, logged_eval

def export_policy(run: Run, model, out_dir: str) -> str:
    d = run.cfg.data
    return _export_policy(model, run.tokenizer, out_dir, d.min_pixels, d.max_pixels,
                          prompt_style=d.prompt_style)


TABLE_KEYS = ("format_rate", "precision", "recall", "f1", "count_mae", "reward")


def open_writer(cfg: Config, workdir: str, purge_step: int | None = None) -> RunWriter:
    writer = RunWriter(workdir, is_main=jax.process_index() == 0,
                       tensorboard=cfg.log.tensorboard, purge_step=purge_step)
    writer.write_config(to_dict(cfg))
    return writer


def open_run(cfg: Config, workdir: str, tokenizer=None, mesh=None) -> Run:
    return Run(cfg, workdir, open_writer(cfg, workdir), tokenizer, mesh)


def evaluate(run: Run, model, name: str, step: int = 0, ood=None) -> dict:
    """Greedy evaluation on the held-out split (or on ``ood``, an ``eval.ood`` entry:
    ``config.OODSet``); logged as an ``eval`` object."""
    from dipr1_jax.train.evaluate import evaluate_policy

    c = run.cfg
    if ood is not None:
        if ood.name not in run.ood_data:
            run.ood_data[ood.name] = train_data.eval_batches(
                train_data.ood_section(c.data, ood), run.tokenizer, c.eval.batch_size,
                c.eval.num_images, c.seed)
        data = run.ood_data[ood.name]
    else:
        if run.eval_data is None:
            run.eval_data = train_data.eval_batches(c.data, run.tokenizer, c.eval.batch_size,
                                                    c.eval.num_images, c.seed)
        data = run.eval_data
    t0 = time.perf_counter()
    with run.mesh_context():
        res = evaluate_policy(
            model, data, run.tokenizer, reward_cfg=c.rewards,
            max_new_tokens=c.eval.max_new_tokens or c.rollout.max_new_tokens,
            eos_token_ids=run.eos_ids, pad_token_id=run.tokenizer.pad_token_id, name=name,
            report_dir=os.path.join(run.workdir, "report") if jax.process_index() == 0 else None,
            num_draw=c.eval.num_draw, mesh=run.mesh)
    summary = dict(res.summary)
    run.writer.log(step, {"eval": {name: summary}}, kind="eval")
    if res.samples:
        run.writer.log_samples(step, [{"eval": name, **s} for s in res.samples[:4]])
    print(f"eval {name} ({time.perf_counter() - t0:.1f}s):\n"
          + eval_table({name: summary}, TABLE_KEYS), flush=True)
    return summary


def evaluate_ood(run: Run, model, name: str, step: int, evals: dict,
                 reuse: bool = False) -> None:
    """Evaluates ``model`` on every ``eval.ood`` set as ``<name>/<set>`` into ``evals``;
    with ``reuse`` (a resumed run) a set's evaluation already in metrics.jsonl is read
    back instead."""
    for ood in parse_ood(run.cfg.eval.ood):
        key = f"{name}/{ood.name}"
        prev = reuse_eval(run.workdir, key) if reuse else None
        evals[key] = prev if prev is not None else evaluate(run, model, key, step, ood)


def reuse_eval(workdir: str, name: str) -> dict | None:
    """The evaluation ``name`` logged in ``workdir``'s metrics.jsonl (a resumed run reuses
    it), or None. Process 0 decides for all: an evaluation is a collective computation,
    so either every process runs it or none does."""
    prev = logged_eval(workdir, name)
    if not multihost.from_main(prev is not None):
        return None
    return prev if prev is not None else {}  # (only process 0 writes what it reads)


def resolve(cfg: Config, init_path: str | None = None) -> Config:
    """Fills the config's ``auto`` values (recorded resolved in config.json).

    ``data.prompt_style=auto``: what an export of ours was trained with (its
    ``TRAINING_FILE``), else ``full`` for a checkpoint, ``short`` for random init."""
    if cfg.data.prompt_style == "auto":
        path = init_path or cfg.model.checkpoint
        style = training_info(path).get("prompt_style") if path else None
        if style not in ("full", "short"):
            style = "full" if path else "short"
        cfg = replace_path(cfg, "data.prompt_style", style)
    return cfg


def _periodic(run: Run, name: str):
    """``on_eval`` callback of the loops: evaluates the current policy as ``name@step``."""
    return lambda loop: evaluate(run, loop.model(), f"{name}@{loop.step}", loop.step)


def memory_plan(cfg: Config, mesh) -> None:
    """Prints the per-device memory plan of the mode's phases (``train/memory.py``) and
    raises ``MemoryPlanError`` (naming the flags that would fix it) when one exceeds the
    device's memory. Runs on abstract shapes, before any parameter is loaded."""
    if not cfg.log.memory_plan or cfg.mode not in ("pipeline", "sft", "grpo"):
        return
    from dipr1_jax.train import memory as mem

    try:
        plans = mem.plans(cfg, mesh, device_bytes=mem.device_memory())
    except Exception as e:  # noqa: BLE001 - an estimate must never stop a run by itself
        logging.warning("memory plan unavailable (%s: %s); starting without it",
                        type(e).__name__, e)
        return
    for p in plans:
        print(p.format(), flush=True)
        mem.check(p)


def _load(cfg: Config, workdir: str, init_path: str | None = None):
    train_data.check_ood(cfg)  # a missing out-of-domain set fails before any compute
    mesh = st.build_mesh(cfg.mesh)
    memory_plan(cfg, mesh)
    model, tokenizer, desc = load_policy(cfg, mesh, init_path)
    n = sum(x.size for x in jax.tree.leaves(_params(model)))
    print(f"{cfg.mode}: {desc} ({n / 1e6:.2f}M parameters) on {jax.device_count()} "
          f"{jax.default_backend()} device(s); workdir {workdir}", flush=True)
    return mesh, model, tokenizer


def _prepare(cfg: Config, workdir: str, init_path: str | None = None):
    ensure_writable(workdir)  # before any compute
    mesh, model, tokenizer = _load(cfg, workdir, init_path)
    return open_run(cfg, workdir, tokenizer, mesh), model


def _params(model):
    from flax import nnx
    return nnx.state(model, nnx.Param)


def _finish(run: Run, evals: dict, extra: dict | None = None) -> None:
    payload = {"eval": evals, **(extra or {})}
    run.writer.final(payload)
    run.writer.close()
    print("final:\n" + eval_table(evals, TABLE_KEYS), flush=True)


def _train_mode(cfg: Config, workdir: str, loop_cls, init_path: str | None,
                before_name: str, after_name: str) -> dict:
    """Evaluate, train with ``loop_cls``, evaluate, export: the ``sft`` and ``grpo`` modes.

    With ``checkpoint.enabled`` the loop saves to ``WORKDIR/checkpoints/`` and a rerun
    of the same command continues from the newest checkpoint there (refusing when the
    workdir's config differs); SIGTERM checkpoints and exits with status 143."""
    cfg = resolve(cfg, init_path)
    ensure_writable(workdir)  # before any compute
    ckpt = None
    if cfg.checkpoint.enabled:
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=cfg.checkpoint.every,
                            keep=cfg.checkpoint.keep)
        if ckpt.latest() is not None:
            check_resumable(workdir, to_dict(cfg), cfg.checkpoint.force_resume)
    mesh, model, tokenizer = _load(cfg, workdir, init_path)
    run = Run(cfg, workdir, None, tokenizer, mesh)
    loop = loop_cls(run, model)
    loop.ckpt = ckpt
    resumed = loop.resume()
    run.writer = open_writer(cfg, workdir, None if resumed is None else resumed + 1)
    before = None
    if resumed is not None:
        print(f"resuming from checkpoint {ckpt.directory}/{resumed} ({loop.kind} step "
              f"{resumed} of {loop.total_steps})", flush=True)
        before = reuse_eval(workdir, before_name)
    evals = {before_name: before if before is not None else evaluate(run, model, before_name)}
    evaluate_ood(run, model, before_name, 0, evals, reuse=resumed is not None)
    with Preemption() as preemption:
        loop.preemption = preemption
        loop.train(on_eval=_periodic(run, after_name))
        loop.finish()
        loop.preemption = None
    if ckpt is not None:
        ckpt.close()
    model = loop.model()
    # A rerun of a run that had finished training keeps its logged final evaluation.
    after = (reuse_eval(workdir, after_name)
             if resumed is not None and resumed >= loop.total_steps else None)
    evals[after_name] = after if after is not None else evaluate(run, model, after_name,
                                                                 loop.step)
    evaluate_ood(run, model, after_name, loop.step, evals, reuse=after is not None)
    export_policy(run, model, os.path.join(workdir, "export"))
    _finish(run, evals)
    return evals


def run_sft(cfg: Config, workdir: str) -> dict:
    return _train_mode(cfg, workdir, SFTLoop, None, "base", "sft")


def run_grpo(cfg: Config, workdir: str) -> dict:
    return _train_mode(cfg, workdir, GRPOLoop, cfg.init_from or None, "init", "grpo")


def run_eval(cfg: Config, workdir: str) -> dict:
    cfg = resolve(cfg, cfg.init_from)
    run, model = _prepare(cfg, workdir, cfg.init_from or None)
    name = os.path.basename(os.path.normpath(cfg.init_from)) if cfg.init_from else "model"
    evals = {name: evaluate(run, model, name)}
    evaluate_ood(run, model, name, 0, evals)
    _finish(run, evals)
    return evals


def run_pipeline(cfg: Config, workdir: str) -> dict:
    """Base eval -> SFT -> eval -> GRPO from the SFT policy -> eval (+ the SFT control)."""
    cfg = resolve(cfg)
    run, model = _prepare(cfg, workdir)
    evals = {"base": evaluate(run, model, "base")}
    evaluate_ood(run, model, "base", 0, evals)
    sft = SFTLoop(run, model)
    sft.train(on_eval=_periodic(run, "sft"))
    sft_model = sft.model()
    evals["sft"] = evaluate(run, sft_model, "sft", sft.step)
    evaluate_ood(run, sft_model, "sft", sft.step, evals)
    export_policy(run, sft_model, os.path.join(workdir, "export", "sft"))
    grpo = GRPOLoop(run, sft_model)
    grpo.train(on_eval=_periodic(run, "sft+grpo"))
    grpo_model = grpo.model()
    evals["sft+grpo"] = evaluate(run, grpo_model, "sft+grpo", grpo.step)
    evaluate_ood(run, grpo_model, "sft+grpo", grpo.step, evals)
    export_policy(run, grpo_model, os.path.join(workdir, "export"))
    extra = {"seconds": {"sft": sft.elapsed, "grpo": grpo.elapsed}}
    if cfg.control:
        # Control: SFT continued from its own state for the wall time GRPO took.
        before = sft.step
        sft.train(seconds=grpo.elapsed)
        control = sft.model()
        evals["sft-continued"] = evaluate(run, control, "sft-continued", sft.step)
        evaluate_ood(run, control, "sft-continued", sft.step, evals)
        extra["control_sft_steps"] = sft.step - before
    _finish(run, evals, extra)
    with open(os.path.join(workdir, "report", "summary.json"), "w") as f:
        json.dump({"eval": evals, **extra}, f, indent=2)
    logging.info("pipeline done: %s", workdir)
    return evals


MODES = {"pipeline": run_pipeline, "sft": run_sft, "grpo": run_grpo, "eval": run_eval}
