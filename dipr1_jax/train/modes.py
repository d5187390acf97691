"""Launch modes: ``pipeline`` (base -> SFT -> SFT+GRPO, compared), ``sft``, ``grpo``, ``eval``.

Each mode owns one run directory (``--workdir``; DESIGN.md section 8):
``config.json``, ``metrics.jsonl`` (the last object has ``"final": true`` and
the final evaluation(s)), ``samples.jsonl``, TensorBoard events, ``export/``
(the trained policy as a Hugging Face directory) and ``report/`` (drawings).
"""

from __future__ import annotations

import json
import os
import re
import time

import jax
from absl import logging

from dipr1_jax import fsio, multihost
from dipr1_jax.config import Config, parse_ood, replace_path, to_dict
from dipr1_jax.train import data as train_data
from dipr1_jax.train import state as st
from dipr1_jax.train.loop import GRPOLoop, Run, SFTLoop
from dipr1_jax.train.policy import export_policy as _export_policy, load_policy, training_info
from dipr1_jax.train.checkpoint import Checkpointer, Preempted, Preemption, check_resumable
from dipr1_jax.train.writers import (Phases, RunWriter, ensure_writable, eval_table,
                                     logged_eval, read_metrics)

def export_policy(run: Run, model, out_dir: str) -> str:
    d = run.cfg.data
    return _export_policy(model, run.tokenizer, out_dir, d.min_pixels, d.max_pixels,
                          prompt_style=d.prompt_style)


TABLE_KEYS = ("format_rate", "precision", "recall", "f1", "count_mae", "reward")


def open_writer(cfg: Config, workdir: str, purge_step: int | None = None,
                phases: Phases | None = None, resume_phase: int = 0) -> RunWriter:
    writer = RunWriter(workdir, is_main=jax.process_index() == 0,
                       tensorboard=cfg.log.tensorboard, purge_step=purge_step,
                       phases=phases, resume_phase=resume_phase)
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
            report_dir=fsio.join(run.workdir, "report") if jax.process_index() == 0 else None,
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
    train_data.check_data(cfg)  # a missing dataset fails before any compute
    train_data.check_ood(cfg)
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
        ckpt = Checkpointer(fsio.join(workdir, "checkpoints"), every=cfg.checkpoint.every,
                            keep=cfg.checkpoint.keep)
        attempted = ckpt.latest() is not None or _attempted(workdir)
        if attempted:
            check_resumable(workdir, to_dict(cfg), cfg.checkpoint.force_resume)
    mesh, model, tokenizer = _load(cfg, workdir, init_path)
    run = Run(cfg, workdir, None, tokenizer, mesh)
    loop = loop_cls(run, model)
    loop.ckpt = ckpt
    resumed = loop.resume()
    # An attempt stopped before its first checkpoint starts over, keeping only its
    # "before" evaluation (logged at step 0), which is read back.
    restart = ckpt is not None and resumed is None and attempted
    run.writer = open_writer(cfg, workdir, 1 if restart else
                             None if resumed is None else resumed + 1)
    before = None
    if resumed is not None:
        print(f"resuming from checkpoint {ckpt.directory}/{resumed} ({loop.kind} step "
              f"{resumed} of {loop.total_steps})", flush=True)
    if resumed is not None or restart:
        before = reuse_eval(workdir, before_name)
    evals = {before_name: before if before is not None else evaluate(run, model, before_name)}
    evaluate_ood(run, model, before_name, 0, evals, reuse=resumed is not None or restart)
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
    export_policy(run, model, fsio.join(workdir, "export"))
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


PIPELINE_PHASES = ("base", "sft", "grpo", "control")
_EVAL_PHASE = {"base": 0, "sft": 1, "sft+grpo": 2, "sft-continued": 3}


def pipeline_phases(sft_steps: int) -> Phases:
    """The pipeline's records by phase: evaluations by their name (``sft@50``,
    ``sft+grpo/citypersons``: the part before ``@`` or ``/``), SFT steps up to
    ``sft.steps`` (the control's continue the count), GRPO steps and rollout samples."""
    def of(r: dict) -> int:
        kind = r.get("kind")
        name = next(iter(r.get("eval") or {}), None) if kind == "eval" else r.get("eval")
        if isinstance(name, str):  # an evaluation record or an evaluation's sample
            return _EVAL_PHASE.get(re.split(r"[@/]", name, maxsplit=1)[0], 3)
        if kind == "sft":
            return 1 if r.get("step", 0) <= sft_steps else 3
        return 3 if kind == "final" else 2
    return Phases(PIPELINE_PHASES, of)


def _attempted(workdir: str) -> bool:
    """Whether ``workdir`` holds records of an earlier attempt (killed or finished).
    Process 0 (the one that writes them) decides for all: what follows is collective."""
    try:
        found = bool(read_metrics(workdir))
    except (OSError, ValueError):
        found = True  # unreadable: check_resumable / the writer's repair will say why
    return multihost.from_main(found)


def _boundary(run: Run, preemption: Preemption, phase: str) -> None:
    """Between the pipeline's phases everything done so far is checkpointed: a SIGTERM
    that came during an evaluation or an export exits here."""
    if preemption.requested:  # (on several processes only set at a loop's sync point)
        run.writer.flush()
        print(f"preempted: stopped after the {phase} phase; rerun the same command to "
              f"continue", flush=True)
        raise Preempted(-1, phase)


def run_pipeline(cfg: Config, workdir: str) -> dict:
    """Base eval -> SFT -> eval -> GRPO from the SFT policy -> eval (+ the SFT control).

    With ``checkpoint.enabled`` each training phase checkpoints into
    ``WORKDIR/checkpoints/{sft,grpo,control}/<step>/``, and rerunning the same command
    continues from the newest checkpoint of the latest phase that has one: the finished
    phases are restored from their last checkpoint (bitwise, so GRPO starts from the same
    SFT policy), and the evaluations already logged for them are read back from
    ``metrics.jsonl`` instead of being run again."""
    cfg = resolve(cfg)
    ensure_writable(workdir)  # before any compute
    c = cfg.checkpoint
    ckpts = {}
    at = None  # the resume point (phase index, step), None for a fresh run
    if c.enabled:
        ckpts = {p: Checkpointer(fsio.join(workdir, "checkpoints", p), every=c.every,
                                 keep=c.keep) for p in PIPELINE_PHASES[1:]}
        for i, p in reversed(list(enumerate(PIPELINE_PHASES))):
            if i and ckpts[p].latest() is not None:
                at = (i, ckpts[p].latest())
                break
        if at is None and _attempted(workdir):
            at = (0, 0)  # an attempt stopped before its first checkpoint: start over
        if at is not None:
            check_resumable(workdir, to_dict(cfg), c.force_resume)
    mesh, model, tokenizer = _load(cfg, workdir)
    run = Run(cfg, workdir, None, tokenizer, mesh)
    run.writer = open_writer(cfg, workdir, None if at is None else at[1] + 1,
                             phases=pipeline_phases(cfg.sft.steps),
                             resume_phase=0 if at is None else at[0])
    if at is not None:
        where = (f"checkpoint {ckpts[PIPELINE_PHASES[at[0]]].directory}/{at[1]} "
                 f"({PIPELINE_PHASES[at[0]]} step {at[1]})" if at[0] else
                 "the start (no checkpoint yet; logged evaluations are reused)")
        print(f"resuming the pipeline from {where}", flush=True)
    reuse = at is not None

    def phase_eval(m, name: str, step: int) -> None:
        prev = reuse_eval(workdir, name) if reuse else None
        evals[name] = prev if prev is not None else evaluate(run, m, name, step)
        evaluate_ood(run, m, name, step, evals, reuse=reuse)

    def train_phase(loop, index: int, name: str, export_dir: str):
        """Trains (or restores) phase ``index``, evaluates its policy as ``name`` and
        exports it; returns the loop and the policy."""
        loop = _phase_loop(loop, ckpts.get(PIPELINE_PHASES[index]), preemption)
        loop.train(on_eval=_periodic(run, name))
        loop.finish()
        policy = loop.model()
        phase_eval(policy, name, loop.step)
        _export_once(run, policy, export_dir, redo=at is None or at[0] <= index)
        return loop, policy

    evals: dict = {}
    with Preemption() as preemption:
        phase_eval(model, "base", 0)
        _boundary(run, preemption, "base")
        sft, sft_model = train_phase(SFTLoop(run, model), 1, "sft",
                                     fsio.join(workdir, "export", "sft"))
        _boundary(run, preemption, "sft")
        grpo, _ = train_phase(GRPOLoop(run, sft_model), 2, "sft+grpo",
                              fsio.join(workdir, "export"))
        extra = {"seconds": {"sft": sft.elapsed, "grpo": grpo.elapsed}}
        if cfg.control:
            _boundary(run, preemption, "grpo")
            # Control: SFT continued from its own state for the wall time GRPO took.
            before = sft.step
            if ckpts:
                sft.ckpt = ckpts["control"]
                if sft.resume() is not None:
                    print(f"control: restored checkpoint {sft.ckpt.directory}/{sft.step} "
                          f"({sft.budget_used:.0f}s of its {grpo.elapsed:.0f}s budget spent)",
                          flush=True)
            sft.train(seconds=grpo.elapsed)
            sft.finish()
            control = sft.model()
            phase_eval(control, "sft-continued", sft.step)
            extra["control_sft_steps"] = sft.step - before
        sft.preemption = grpo.preemption = None
    for ck in ckpts.values():
        ck.close()
    _finish(run, evals, extra)
    if jax.process_index() == 0:
        fsio.makedirs(fsio.join(workdir, "report"))
        fsio.write_text(fsio.join(workdir, "report", "summary.json"),
                        json.dumps({"eval": evals, **extra}, indent=2))
    logging.info("pipeline done: %s", workdir)
    return evals


def _phase_loop(loop, ckpt, preemption):
    """``loop`` checkpointing to ``ckpt``, restored from its newest checkpoint (a finished
    phase's last one: its ``train`` then does nothing) and stopping on ``preemption``."""
    loop.ckpt = ckpt
    loop.preemption = preemption
    step = loop.resume()
    if step is not None:
        print(f"{loop.kind}: restored checkpoint {ckpt.directory}/{step} (step {step} of "
              f"{loop.total_steps})", flush=True)
    return loop


def _export_once(run: Run, model, out_dir: str, redo: bool) -> None:
    """Exports ``model`` unless a resumed run already has that export complete (the
    training-info file is written last)."""
    from dipr1_jax.train.policy import TRAINING_FILE
    if redo or not fsio.isfile(fsio.join(out_dir, TRAINING_FILE)):
        export_policy(run, model, out_dir)


MODES = {"pipeline": run_pipeline, "sft": run_sft, "grpo": run_grpo, "eval": run_eval}
