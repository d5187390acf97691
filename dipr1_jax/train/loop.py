"""The SFT and GRPO loops: plain Python around the jitted steps (big_vision style).

One GRPO iteration (DESIGN.md section 8): a batch of B prompts -> ``sampler.generate``
(G completions each) -> ``parse_completions`` -> ``dip_rewards`` [B, G] ->
``group_advantages`` -> ``mu`` jitted updates over micro-batches of whole
groups. Batch padding rows (``valid == False``) and groups with a row the
sampler flagged ``nonfinite`` do not train and do not count in any metric.

``Run`` carries what the loops share (config, mesh, tokenizer, writer, the
held-out batches); ``SFTLoop`` / ``GRPOLoop`` own a train state and advance
it by steps (or, for the SFT control of the pipeline, by wall time).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dipr1_jax import multihost, sampler
from dipr1_jax.config import Config, to_dict
from dipr1_jax.data.targets import target_ids, targets_for_batch
from dipr1_jax.grpo import group_advantages, loss_denominator
from dipr1_jax.model.qwen_vl import check_inputs
from dipr1_jax.train import batch as tb
from dipr1_jax.train import state as st
from dipr1_jax.train.evaluate import score_completions
from dipr1_jax.train.grpo_step import make_grpo_step, make_logprob_fn
from dipr1_jax.train.sft_step import make_sft_step
from dipr1_jax.train.writers import RunWriter, step_line

REWARD_KEYS = ("format", "look", "accuracy", "count")


class NonFiniteError(FloatingPointError):
    """Too many non-finite steps in a row (``train.max_bad_steps``)."""


@dataclasses.dataclass
class Run:
    cfg: Config
    workdir: str
    writer: RunWriter
    tokenizer: Any
    mesh: Any = None
    eval_data: list | None = None
    ood_data: dict = dataclasses.field(default_factory=dict)  # eval.ood name -> batches

    @property
    def eos_ids(self) -> list[int]:
        return sorted({self.tokenizer.im_end_token_id, self.tokenizer.eos_token_id})

    def mesh_context(self):
        import contextlib
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()


def _rows(x) -> np.ndarray:
    """Every process's rows of ``x`` (``[B_local, ...]``), in global row order."""
    x = np.asarray(x)
    return multihost.allgather(x).reshape((-1,) + x.shape[1:])


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(x).item() if np.ndim(x) == 0 else np.asarray(x),
                        jax.device_get(tree))


class _Loop:
    """State shared by both loops: the split policy, its optimizer and train state."""

    kind = ""

    def __init__(self, run: Run, model, optim, total_steps: int, freeze_vision: bool):
        self.run = run
        self.model_cfg = model.cfg
        self.policy = st.Policy.from_model(model)
        trainable, self.frozen = self.policy.split(freeze_vision)
        # Own copies: the state is donated to the step, the model's arrays may live on.
        trainable = jax.tree.map(jnp.copy, trainable)
        self.optim, self.total_steps = optim, total_steps
        self.optimizer, self.schedule = st.make_optimizer(optim, total_steps)
        self.state = st.init_state(trainable, self.optimizer, run.mesh)
        self.state_shardings = (st.hashable_shardings(self.state) if run.mesh is not None
                                else None)
        self.elapsed = 0.0
        self.ckpt = None  # a checkpoint.Checkpointer (the sft / grpo modes set one)
        self.bad_steps = 0  # non-finite (skipped) steps in a row
        self.preemption = None  # a checkpoint.Preemption while train() runs under one
        self.budget_used = 0.0  # seconds of a time budget spent (the pipeline's control)

    # -- checkpoints -------------------------------------------------------------------
    def _extra(self) -> dict:
        """What a checkpoint needs besides the train state (JSON)."""
        data = self.data.get_state()
        # Each process's iterator position is the same (its shard is in the dataset, not
        # in the state), so process 0's state restores every process; checked here.
        multihost.check_same(json.dumps(data, sort_keys=True, default=str),
                             "the data iterator state")
        return {"kind": self.kind, "data": data, "elapsed": self.elapsed,
                "bad_steps": self.bad_steps, "budget_used": self.budget_used,
                "config": to_dict(self.run.cfg)}

    def _load_extra(self, extra: dict) -> None:
        self.data.set_state(extra["data"])
        self.elapsed = float(extra["elapsed"])
        self.bad_steps = int(extra.get("bad_steps", 0))
        self.budget_used = float(extra.get("budget_used", 0.0))

    def _guard(self, m: dict) -> None:
        """The non-finite guard: the step skipped its update (``keep_if_finite``); count it,
        say why, and stop after ``train.max_bad_steps`` such steps in a row."""
        if not m.get("skipped"):
            self.bad_steps = 0
            return
        self.bad_steps += 1
        reason = f"non-finite loss {m.get('loss')} / grad norm {m.get('grad_norm')}"
        m["skip_reason"] = reason
        print(f"warning: {self.kind} step {self.step} skipped (no update): {reason} "
              f"({self.bad_steps} in a row)", flush=True)
        limit = self.run.cfg.train.max_bad_steps
        if self.bad_steps >= limit:
            last = self.ckpt.latest() if self.ckpt is not None else None
            where = (f"{self.ckpt.directory}/{last} (kept)" if last is not None
                     else "none written yet")
            self.run.writer.log(self.step, m, kind=self.kind)
            self.run.writer.flush()
            raise NonFiniteError(
                f"{self.kind}: {self.bad_steps} non-finite steps in a row, the last at step "
                f"{self.step} ({reason}); stopping (train.max_bad_steps={limit}). "
                f"Last good checkpoint: {where}. Lower the learning rate or check the data "
                f"of these steps, then rerun the same command to continue from it.")

    def resume(self) -> int | None:
        """Continues from the newest readable checkpoint, if any; returns its step."""
        if self.ckpt is None:
            return None
        got = self.ckpt.restore(self.state)
        if got is None:
            return None
        state, extra = got
        if extra.get("kind") != self.kind:
            raise ValueError(f"{self.ckpt.directory}: a {extra.get('kind')!r} checkpoint, "
                             f"not {self.kind!r}")
        self.state = state
        self._load_extra(extra)
        return self.step

    def checkpoint(self, force: bool = False) -> None:
        if self.ckpt is not None:
            if self.run.writer is not None:  # the logs a checkpoint covers are stored first
                self.run.writer.flush()
            self.ckpt.save(self.state, self._extra(), force=force)

    def _after_step(self, i: int, total: int, on_eval) -> None:
        """Periodic evaluation, then a checkpoint when due, then a preemption exit: an
        evaluation logged at step k is always covered by the checkpoint of step k."""
        self._maybe_eval(on_eval, i, total)
        if self.ckpt is not None and self.ckpt.due(self.step):
            self.checkpoint()
        if self.preemption is not None and self.preemption.should_stop(self.step):
            self._preempt()

    def _preempt(self):
        from dipr1_jax.train.checkpoint import Preempted
        self.checkpoint(force=True)
        where = "no checkpoint (checkpointing is off)"
        if self.ckpt is not None:
            self.ckpt.wait()
            where = f"{self.ckpt.directory}/{self.step}"
        self.run.writer.flush()
        print(f"preempted: stopped after {self.kind} step {self.step}; checkpoint {where}; "
              f"rerun the same command to continue", flush=True)
        raise Preempted(self.step, where)

    def finish(self) -> None:
        """The last checkpoint (the end of training), written before returning."""
        if self.ckpt is not None:
            self.checkpoint(force=True)
            self.ckpt.wait()

    @property
    def step(self) -> int:
        return int(self.state.step)

    def model(self):
        return st.merge(self.policy.graphdef, self.state.params, self.frozen)

    def _maybe_eval(self, on_eval, i: int, total: int) -> None:
        every = self.run.cfg.eval.every
        if on_eval is not None and every and self.step % every == 0 and i != total - 1:
            on_eval(self)

    def _log(self, i: int, total: int, metrics: dict, eta: float | None = None) -> None:
        """Logs step ``i`` of ``total`` of this call (``eta``: seconds left, if known)."""
        cfg = self.run.cfg
        step = self.step
        if step % cfg.log.every and i != total - 1:
            return
        done = i + 1
        per_step = self.elapsed / max(step, 1)
        if eta is None:
            eta = per_step * (total - done)
        shown_total = step + round(eta / per_step) if per_step > 0 else step
        self.run.writer.log(step, metrics, kind=self.kind)
        print(step_line(step, shown_total, metrics, elapsed_s=self.elapsed, eta_s=eta,
                        kind=self.kind), flush=True)


class SFTLoop(_Loop):
    kind = "sft"

    def __init__(self, run: Run, model):
        c = run.cfg
        super().__init__(run, model, c.sft.optim, c.sft.steps, c.sft.freeze_vision)
        self.long_targets = 0  # examples skipped for sft.max_target_tokens
        from dipr1_jax.train.data import train_iterator
        self.data = train_iterator(c.data, run.tokenizer, c.sft.batch_size, c.seed,
                                   "sft.batch_size")
        self.step_fn = make_sft_step(self.policy.graphdef, self.optim, self.total_steps,
                                     chunk=c.model.logprob_chunk,
                                     state_shardings=self.state_shardings)

    def _extra(self) -> dict:
        return {**super()._extra(), "long_targets": self.long_targets}

    def _load_extra(self, extra: dict) -> None:
        super()._load_extra(extra)
        self.long_targets = int(extra.get("long_targets", 0))

    def batch(self) -> dict:
        c = self.run.cfg
        batch = next(self.data)
        texts = targets_for_batch(batch, style=c.sft.target_style, max_look=c.sft.max_look,
                                  category=c.data.category)
        tok = self.run.tokenizer
        ids = [target_ids(tok, t, tok.im_end_token_id) if v else np.zeros((0,), np.int32)
               for t, v in zip(texts, batch["valid"])]
        cap = c.sft.max_target_tokens
        if cap:  # too long for the planned step: the row trains nothing (like padding)
            long = [b for b, t in enumerate(ids) if len(t) > cap]
            for b in long:
                logging.info("sft: %s skipped: its target has %d tokens > "
                             "sft.max_target_tokens=%d", batch["image_id"][b], len(ids[b]), cap)
                ids[b] = np.zeros((0,), np.int32)
            self.long_targets += int(_rows(np.asarray([len(long)])).sum())
        out = tb.sft_batch(batch, ids, tok.pad_token_id)
        # The image-token / patch counts, checked here on the host (the jitted step only
        # turns a mismatch into NaN features; see qwen_vl.scatter_image_embeds).
        check_inputs(self.model_cfg, out["input_ids"], out["pixel_values"],
                     out["image_grid_thw"])
        return out

    def train(self, steps: int | None = None, seconds: float | None = None, on_eval=None) -> None:
        """``steps`` updates, or as many as fit in ``seconds`` of wall time; ``on_eval(loop)``
        every ``eval.every`` steps (not after the last: the caller evaluates the result).
        A time budget counts on across a resume (``budget_used`` is checkpointed)."""
        total = steps if steps is not None else self.run.cfg.sft.steps
        with self.run.mesh_context():
            i = self.step if seconds is None else 0  # a resumed loop continues at its step
            start = time.perf_counter() - (self.budget_used if seconds is not None else 0.0)
            # (a time budget is process 0's clock: every process runs the same steps)
            while (i < total) if seconds is None else multihost.from_main(
                    time.perf_counter() - start < seconds):
                t0 = time.perf_counter()
                b = st.put_batch(self.batch(), self.run.mesh,
                                 pad_id=self.run.tokenizer.pad_token_id)
                self.state, m = self.step_fn(self.state, self.frozen, b)
                m = _host(m)
                dt = time.perf_counter() - t0
                self.elapsed += dt
                m["tokens_per_s"] = m["tokens"] / max(dt, 1e-9)
                m["time/update"] = dt
                if self.run.cfg.sft.max_target_tokens:
                    m["long_targets"] = self.long_targets  # skipped so far (all processes)
                self._guard(m)
                left = None
                if seconds is not None:  # a time budget: show progress against it
                    self.budget_used = time.perf_counter() - start
                    left = m["budget_left_s"] = max(0.0, seconds - self.budget_used)
                self._log(i, total if seconds is None else i + 1, m, left)
                self._after_step(i, total, on_eval if seconds is None else None)
                i += 1


class GRPOLoop(_Loop):
    kind = "grpo"

    def __init__(self, run: Run, model):
        c = run.cfg
        super().__init__(run, model, c.train.optim, c.train.steps, c.train.freeze_vision)
        from dipr1_jax.train.data import train_iterator
        self.data = train_iterator(c.data, run.tokenizer, c.train.batch_size, c.seed + 1,
                                   "train.batch_size")
        n = jax.process_count()
        if c.train.micro_batch_size % n:
            raise ValueError(f"train.micro_batch_size={c.train.micro_batch_size} does not "
                             f"split over {n} processes (use a multiple of {n})")
        g = self.policy.graphdef
        self.step_fn = make_grpo_step(g, self.optim, self.total_steps, c.grpo,
                                      temperature=c.rollout.temperature,
                                      chunk=c.model.logprob_chunk,
                                      state_shardings=self.state_shardings)
        self.logprob_fn = make_logprob_fn(g, temperature=c.rollout.temperature,
                                          chunk=c.model.logprob_chunk)
        # Reference policy: the initial parameters, frozen (none when beta == 0).
        self.ref = (jax.tree.map(jnp.copy, self.state.params) if c.grpo.beta > 0 else None)
        self.key = jax.random.key(c.seed + 7)
        self.dropped_groups = 0

    def _extra(self) -> dict:
        return {**super()._extra(), "dropped_groups": self.dropped_groups}

    def _load_extra(self, extra: dict) -> None:
        super()._load_extra(extra)
        self.dropped_groups = int(extra["dropped_groups"])

    def rollout(self, batch: dict) -> tuple[Any, dict]:
        c = self.run.cfg
        out = sampler.generate(
            self.model(), batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
            batch["image_grid_thw"], group_size=c.grpo.group_size,
            max_new_tokens=c.rollout.max_new_tokens, temperature=c.rollout.temperature,
            top_p=c.rollout.top_p, top_k=c.rollout.top_k, eos_token_ids=self.run.eos_ids,
            rng=jax.random.fold_in(self.key, self.step), pad_token_id=self.run.tokenizer.pad_token_id,
            tokenizer=self.run.tokenizer, mesh=self.run.mesh, local_rows=True)
        return out

    def score(self, batch: dict, out) -> tuple[dict, np.ndarray]:
        """Rewards ``[B, G]`` per component and the rows that train."""
        c = self.run.cfg
        G = c.grpo.group_size
        r = score_completions([t for row in out.texts for t in row], batch, G, c.rewards)
        bad_group = np.asarray(out.nonfinite).any(axis=1) | ~np.all(
            np.isfinite(r["total"]), axis=1)
        bad_reward = ~np.isfinite(r["total"]) & np.asarray(batch["valid"], bool)[:, None]
        for b, g in zip(*np.nonzero(bad_reward)):
            logging.warning("grpo step %d: non-finite reward %s for %s rollout %d (group "
                            "dropped): %r", self.step + 1, r["total"][b, g],
                            batch["image_id"][b], g, out.texts[b][g])
        keep_group = np.asarray(batch["valid"], bool) & ~bad_group
        self.dropped_groups += int(_rows(np.asarray(batch["valid"], bool) & bad_group).sum())
        keep = np.broadcast_to(keep_group[:, None], r["total"].shape)
        return r, keep

    def iteration(self, i: int, total: int) -> dict:
        c = self.run.cfg
        t0 = time.perf_counter()
        batch = next(self.data)
        out = self.rollout(batch)
        t1 = time.perf_counter()
        r, keep = self.score(batch, out)
        keep_local = keep
        total_r = np.where(keep, r["total"], 0.0)
        adv = np.asarray(group_advantages(total_r, c.grpo.scale_rewards))
        adv = np.where(keep, adv, 0.0)
        t2 = time.perf_counter()
        train = tb.rollout_batch(batch, out.tokens, out.lengths, adv, keep)
        # The whole (global) batch's denominator: a sum over rows, so over processes.
        denom = float(_rows(np.asarray(
            loss_denominator(train["completion_mask"], c.grpo, keep), np.float64)[None]).sum())
        B = train["input_ids"].shape[0] * jax.process_count()  # prompts in the global batch
        n_micro = B // c.train.micro_batch_size if c.train.micro_batch_size else 1
        mbs = st.put_batch(tb.split_micro_batches(train, n_micro), self.run.mesh, batch_axis=1,
                           pad_id=self.run.tokenizer.pad_token_id)
        if self.ref is not None:
            mbs["ref_logp"] = self.logprob_fn(self.ref, self.frozen, mbs)
        if c.grpo.mu > 1:
            mbs["old_logp"] = self.logprob_fn(self.state.params, self.frozen, mbs)
        m = {}
        if denom > 0:
            for _ in range(c.grpo.mu):  # each update passes the non-finite guard
                self.state, m = self.step_fn(self.state, self.frozen, mbs, jnp.float32(denom))
                m = _host(m)
                self._guard(m)
        t3 = time.perf_counter()
        dt = t3 - t0
        self.elapsed += dt
        # Metrics over the global batch (every process's rows; one process: its own).
        r_local = r
        r = {k: _rows(v) for k, v in r.items()}
        keep, adv, all_lengths = _rows(keep), _rows(adv), _rows(out.lengths)
        kept = keep[:, 0]
        lengths = all_lengths[keep]
        m.update({
            "reward": float(r["total"][keep].mean()) if keep.any() else float("nan"),
            **{f"reward/{k}": float(r[k][keep].mean()) if keep.any() else float("nan")
               for k in REWARD_KEYS},
            "adv_mean": float(adv[keep].mean()) if keep.any() else 0.0,
            "adv_std": float(adv[keep].std()) if keep.any() else 0.0,
            "zero_std_groups": float((r["total"][kept].std(axis=1) == 0).mean())
            if kept.any() else 0.0,
            "completion_len": float(lengths.mean()) if lengths.size else 0.0,
            "tokens_per_s": float(all_lengths.sum()) / max(t1 - t0, 1e-9),
            "dropped_groups": self.dropped_groups,
            "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2,
        })
        self._log(i, total, m)
        self._samples(batch, out, r_local, keep_local)
        return m

    def _samples(self, batch, out, r, keep) -> None:
        c = self.run.cfg
        if not c.log.samples_every or self.step % c.log.samples_every or not c.log.num_samples:
            return
        rows = []
        for b in range(out.tokens.shape[0]):
            for g in range(out.tokens.shape[1]):
                if len(rows) >= c.log.num_samples or not keep[b, g]:
                    continue
                rows.append({"image_id": str(batch["image_id"][b]), "rollout": g,
                             "text": out.texts[b][g], "num_gt": int(batch["num_gt"][b]),
                             **{k: float(r[k][b, g]) for k in REWARD_KEYS + ("total",)}})
        self.run.writer.log_samples(self.step, rows)

    def train(self, steps: int | None = None, on_eval=None) -> None:
        total = self.run.cfg.train.steps if steps is None else steps
        with self.run.mesh_context():
            for i in range(self.step, total):  # a resumed loop continues at its step
                self.iteration(i, total)
                self._after_step(i, total, on_eval)
        if self.dropped_groups:
            logging.warning("grpo: %d groups dropped (non-finite logits or rewards)",
                            self.dropped_groups)
