"""Memory plan: per-device bytes of a training job, estimated before anything is allocated.

    p = plan(cfg, mesh, device_bytes=device_memory())   # or plans(cfg, mesh, ...) per phase
    print(p.format())
    check(p)            # MemoryPlanError naming the flags that would make it fit

``plan`` returns a :class:`MemoryPlan` for the job's model, mesh and batch:

==================  ===========================================================================
component           how it is computed (per device)
==================  ===========================================================================
params              ``nnx.eval_shape`` of the real ``QwenVL`` (preset, or the checkpoint's
                    ``config.json``); each parameter's shard under ``sharding.state_specs`` on
                    the mesh (the layout ``create_model`` / ``load_hf`` give it). Split into
                    the trainable groups and the frozen one (``train.freeze_vision`` /
                    ``sft.freeze_vision``: the vision tower).
optimizer           ``jax.eval_shape`` of the real optax chain (``state.make_optimizer``) on
                    the trainable groups (frozen groups have none), laid out as
                    ``state.init_state`` lays it out (``state.opt_state_shardings``: AdamW
                    ``mu`` / ``nu`` sharded like their parameters, counts replicated).
                    ``update_workspace``: the update's scratch (``UPDATE_WORKSPACE`` x the
                    trainable bytes), a phase after the activations are freed, so the step
                    holds the larger of the two.
gradients           the trainable groups' bytes; twice for GRPO with several micro-batches (the
                    scan carries the accumulator while a micro-batch's gradient is made; with
                    one micro-batch XLA inlines the scan).
reference           GRPO with ``grpo.beta > 0``: a copy of the trainable groups (``GRPOLoop``;
                    frozen groups are shared).
held                what the launch path keeps alive besides the loop's state: ``_Loop``
                    trains a ``jnp.copy`` of the trainable groups while the caller
                    (``modes._train_mode`` / ``run_pipeline``) keeps the model it passed in;
                    in ``pipeline`` mode the SFT loop (parameters and AdamW state, here
                    sized like GRPO's trainable set) also stays alive during GRPO.
batch               the step's inputs (``train.batch`` layout, GRPO micro-batches stacked),
                    placed as ``state.put_batch`` does (prompt axis over ``('data', 'fsdp')``
                    when it divides, ``pixel_values`` replicated).
activations         what the backward pass of one (micro-)batch keeps, plus workspace:
                    ``residuals`` are traced from the real loss (``grpo_step`` / ``sft_step``
                    around ``forward.completion_logprobs``): ``jax.make_jaxpr`` of
                    ``jax.vjp``, as ``jax.ad_checkpoint.print_saved_residuals`` does, with the
                    model's ``remat`` policy applied by the model itself. Counted the way the
                    compiled step stores them (checked on XLA's CPU buffer assignment):
                    arguments and repeated buffers (reshapes, a jitted helper returning its
                    input) are not counted again, broadcasts are fused into their consumers,
                    a residual only the backward pass reads that is a cheap elementwise
                    function of stored ones (SiLU's ``s * (1 - s)``) is recomputed, and the
                    decoder's attention probabilities are kept twice (``_SECOND_LAYOUT``).
                    Each residual is divided by the mesh axes its batch dimension (over
                    ``('data', 'fsdp')`` when it divides, as ``sharding.RULES`` constrains
                    it) and head / MLP / vocab dimension (over ``tensor``) are split over.
                    ``model.remat``: with ``model.scan_layers`` the policy's residuals plus
                    one layer's un-rematerialised residuals (the backward recomputes a layer
                    at a time); with layers in a Python loop XLA schedules all recomputations
                    together (measured: no saving), so the plan keeps the full residuals and
                    says so. ``workspace``: the peak is the start of the backward pass (all
                    residuals + ``WORKSPACE_LOGIT_CHUNKS`` float32 logits chunks
                    ``[rows, min(logprob_chunk, Tc), vocab]`` of the log-prob pass: one kept
                    by the forward, two in the chunk's backward) or, if larger, a point of
                    the forward (the residuals made so far + twice the largest value made
                    there and not kept, e.g. a frozen vision tower's attention scores).
kv_cache            the rollout's KV cache (GRPO; ``eval``): ``2 x layers x (B*G rows) x
                    kv_heads x (prompt bucket + max_new_tokens) x head_dim`` in the compute
                    dtype, as ``sampler.generate`` allocates it (prompt padded to
                    ``sampler.PROMPT_BUCKET``), rows over ``('data', 'fsdp')`` and KV heads
                    over ``tensor`` when they divide; ``rollout_workspace`` is the prefill's
                    cache before it is repeated G times.
==================  ===========================================================================

Phases do not overlap (the update's gradients, activations and batch are freed before the
next rollout allocates its cache): ``total = params + optimizer + reference + held +
max(step transients, rollout transients)``. ``step_total`` (the update step alone) is what
``compile_step`` measures: XLA's ``argument + output - alias + temp`` of the real jitted
step, lowered on abstract arrays of the same shapes.

Batch shapes follow the data pipeline (``data/pipeline.py``): synthetic images are
``data.synthetic_width x height``; real datasets are planned at the worst case
``data.max_pixels``; prompts are the chat template's text tokens (the job's tokenizer)
plus the image tokens, rounded up to the pipeline's quarter-octave buckets; GRPO
completions are ``rollout.max_new_tokens`` long; SFT targets are planned at
``sft.max_target_tokens`` (longer targets are skipped), else ``rollout.max_new_tokens``
(``sft_target_len=`` overrides both). ``StepShapes`` can be
given explicitly.

Accuracy (XLA CPU compile, ``small`` / ``bench-100m`` presets, float32; the test checks
two of these): ``step_total`` within 10% of the compiled step for GRPO and SFT on 1 and 8
devices, with micro-batches, freeze_vision, tensor parallelism, and scanned layers with
remat. Known gaps: SFT on 8 devices with a frozen vision tower is 21% under (the compiled
peak sits in the frozen tower's forward, where XLA also keeps gathered weights and the
gathered patches alive); ``model.dtype=bfloat16`` is 30% under on CPU (the CPU backend
keeps float32 copies of bfloat16 values; not representative of a GPU). Not yet checked on
a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from dipr1_jax import sharding as shd
from dipr1_jax.config import Config

GiB = 1 << 30
MiB = 1 << 20

# Scratch of the optimizer update (clipping, AdamW, apply, the non-finite guard of
# ``state.keep_if_finite``, which holds the old and the new state until it picks one), in
# trainable-parameter bytes; a phase of its own after the activations are freed. Measured
# on the CPU compile: 1.3x in the bench-100m GRPO step, 1.5x for the update compiled alone.
UPDATE_WORKSPACE = 1.5

# Workspace at the peak (the start of the backward pass), in float32 logits chunks
# ``[rows, min(chunk, Tc), vocab]`` of the log-prob pass: the chunk's logits kept by the
# forward, and the recomputed logits and their softmax in the backward.
WORKSPACE_LOGIT_CHUNKS = 3


# ----------------------------------------------------------------------------- shapes

@dataclasses.dataclass(frozen=True)
class StepShapes:
    """The shapes a step is planned (and compiled) at.

    ``prompts`` per step (global), split into ``micro_batches`` of whole groups
    (GRPO; 1 for SFT); ``group`` completions per prompt (1 for SFT / eval);
    ``prompt_len`` the training batch's prompt bucket; ``completion_len`` the
    completion / target width; ``patches`` the ``pixel_values`` rows of one
    (micro-)batch; ``rollout_prompt_len`` the sampler's prompt bucket."""

    kind: str
    prompts: int
    micro_batches: int
    group: int
    prompt_len: int
    completion_len: int
    patches: int
    image_grid: tuple[int, int, int]
    rollout_prompt_len: int
    rollout_new_tokens: int

    @property
    def micro_prompts(self) -> int:
        return self.prompts // self.micro_batches


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def _policy_path(cfg: Config) -> str:
    if cfg.mode in ("grpo", "eval") and cfg.init_from:
        return cfg.init_from
    return cfg.model.checkpoint


def model_config(cfg: Config):
    """The ``ModelConfig`` the job builds (``train.policy.load_policy``'s runtime options)."""
    from dipr1_jax.model import preset, read_hf_config
    m = cfg.model
    rt = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
              scan_layers=m.scan_layers, vision_max_patches=m.vision_max_patches,
              attention=m.attention)
    path = _policy_path(cfg)
    return read_hf_config(path, **rt) if path else preset(m.preset, **rt)


def _image_hw(cfg: Config) -> tuple[int, int]:
    d = cfg.data
    if d.name == "synthetic":
        return d.synthetic_height, d.synthetic_width
    # Real datasets: the worst case smart_resize allows (h * w <= max_pixels).
    units = max(1, d.max_pixels // (28 * 28))
    h = max(1, math.isqrt(units))
    return 28 * h, 28 * (units // h)


def _prompt_text_len(cfg: Config, tokenizer=None) -> int:
    from dipr1_jax.data import prompts
    from dipr1_jax.tokenizer import load_tokenizer
    if tokenizer is None:
        path = _policy_path(cfg)
        has = path and os.path.isfile(os.path.join(path, "tokenizer.json"))
        tokenizer = load_tokenizer(path if has else None)
    d = cfg.data
    style = d.prompt_style
    if style == "auto":  # as the launch resolves it (modes.resolve)
        from dipr1_jax.train.modes import resolve
        style = resolve(cfg, _policy_path(cfg) or None).data.prompt_style
    tasks = ("detection", "counting") if d.task == "mixed" else (d.task,)
    out = 0
    for task in tasks:
        head, tail = prompts._template_ids(tokenizer, task, d.category, style)
        out = max(out, len(head) + len(tail))
    return out


def step_shapes(cfg: Config, kind: str, *, mcfg=None, tokenizer=None,
                prompt_text_len: int | None = None, image_size: tuple[int, int] | None = None,
                sft_target_len: int | None = None) -> StepShapes:
    """The batch shapes of ``kind`` (``grpo`` | ``sft`` | ``eval``) for this config."""
    from dipr1_jax.data import preprocess as pp
    from dipr1_jax.data.pipeline import bucket
    from dipr1_jax.sampler import PROMPT_BUCKET
    mcfg = mcfg or model_config(cfg)
    v = mcfg.vision
    spec = pp.VisionSpec(min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    h, w = image_size or _image_hw(cfg)
    rh, rw = pp.smart_resize(h, w, v.patch_size * v.spatial_merge_size, spec.min_pixels,
                             spec.max_pixels)
    grid = (1, rh // v.patch_size, rw // v.patch_size)
    per_image = int(np.prod(grid))
    img_tokens = per_image // v.spatial_merge_size ** 2
    if prompt_text_len is None:
        prompt_text_len = _prompt_text_len(cfg, tokenizer)
    tp = bucket(prompt_text_len + img_tokens, ())
    new = cfg.rollout.max_new_tokens
    if kind == "grpo":
        b = cfg.train.batch_size
        m = b // cfg.train.micro_batch_size if cfg.train.micro_batch_size else 1
        g, tc = cfg.grpo.group_size, new
        patches = _round_up((b // m) * per_image, 64)  # batch.split_micro_batches
    elif kind == "sft":
        b, m, g = cfg.sft.batch_size, 1, 1
        # batch.sft_batch buckets targets by 16; sft.max_target_tokens bounds them
        tc = _round_up(sft_target_len or cfg.sft.max_target_tokens or new, 16)
        patches = bucket(b * per_image, ())
    elif kind == "eval":
        b, m, g = cfg.eval.batch_size, 1, 1
        new = cfg.eval.max_new_tokens or new
        tc, patches = new, bucket(b * per_image, ())
    else:
        raise ValueError(f"step_shapes: kind must be grpo, sft or eval, got {kind!r}")
    return StepShapes(kind=kind, prompts=b, micro_batches=m, group=g, prompt_len=tp,
                      completion_len=tc, patches=patches, image_grid=grid,
                      rollout_prompt_len=_round_up(tp, PROMPT_BUCKET), rollout_new_tokens=new)


# ----------------------------------------------------------------------------- the plan

@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of each component (see the module docstring)."""

    kind: str
    devices: int
    mesh_shape: dict
    shapes: StepShapes
    remat: str
    params_trainable: int
    params_frozen: int
    optimizer: int
    gradients: int
    reference: int
    held: int
    batch: int
    activations: int  # residuals + workspace
    residuals: int
    workspace: int
    kv_cache: int
    rollout_workspace: int
    device_bytes: int | None = None
    update_workspace: int = 0  # the optimizer update's scratch
    param_count: int = 0
    trainable_count: int = 0
    vision_trainable: bool = True
    held_note: str = ""
    param_dtype: str = "float32"
    scan_layers: bool = False
    vision_bytes: int = 0
    notes: tuple[str, ...] = ()

    @property
    def params(self) -> int:
        return self.params_trainable + self.params_frozen

    @property
    def step_transient(self) -> int:
        """What exists only while the update step runs."""
        return self.gradients + max(self.update_workspace, self.activations) + self.batch

    @property
    def rollout_transient(self) -> int:
        return self.kv_cache + self.rollout_workspace

    @property
    def step_total(self) -> int:
        """The update step alone: its arguments (state, frozen params, batch) and its
        scratch; comparable to XLA's ``argument + output - alias + temp`` of the step."""
        return self.params + self.optimizer + self.step_transient

    @property
    def persistent(self) -> int:
        return self.params + self.optimizer + self.reference + self.held

    @property
    def total(self) -> int:
        return self.persistent + max(self.step_transient, self.rollout_transient)

    def components(self) -> list[tuple[str, int, str]]:
        s = self.shapes
        rows = s.micro_prompts * s.group
        return [
            ("params (trainable)", self.params_trainable,
             f"{self.trainable_count / 1e6:.1f}M" + ("" if self.vision_trainable
                                                     else ", vision frozen")),
            ("params (frozen)", self.params_frozen,
             f"{(self.param_count - self.trainable_count) / 1e6:.1f}M"),
            ("optimizer (AdamW mu+nu)", self.optimizer, "trainable groups only"),
            ("gradients", self.gradients,
             "accumulator + micro-batch" if self.kind == "grpo" and s.micro_batches > 1
             else "one copy"),
            ("optimizer update scratch", self.update_workspace,
             "after the backward pass (the step holds the larger of this and activations)"),
            ("reference params", self.reference,
             "grpo.beta > 0" if self.reference else "none"),
            ("held by launch path", self.held, self.held_note),
            ("batch", self.batch, f"{s.prompts} prompts x {s.group}"),
            ("activations", self.activations,
             f"{rows} rows x ({s.prompt_len}+{s.completion_len}) tok, remat={self.remat} "
             f"(residuals {_fmt(self.residuals)} + workspace {_fmt(self.workspace)})"),
            ("KV cache (rollout)", self.kv_cache,
             f"{s.prompts}x{s.group} rows x {s.rollout_prompt_len}+{s.rollout_new_tokens} slots"
             if self.kv_cache else "none"),
            ("rollout workspace", self.rollout_workspace, "prefill cache before repeat"),
        ]

    def format(self) -> str:
        lines = [f"memory plan ({self.kind}, per device, {self.devices} device(s), mesh "
                 + " ".join(f"{k}={v}" for k, v in self.mesh_shape.items()) + "):"]
        for name, b, note in self.components():
            lines.append(f"  {name:<26} {_fmt(b):>11}   {note}")
        lines.append(f"  {'update step':<26} {_fmt(self.step_total):>11}   "
                     "params + optimizer + gradients + max(update scratch, activations) "
                     "+ batch")
        cap = (f" of {_fmt(self.device_bytes)} ({100 * self.total / self.device_bytes:.0f}%)"
               if self.device_bytes else " (device memory unknown)")
        lines.append(f"  {'total (peak)':<26} {_fmt(self.total):>11}{cap}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(n: int | None) -> str:
    if n is None:
        return "?"
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB"


def device_memory(device=None) -> int | None:
    """``bytes_limit`` of the device's allocator (GPU / TPU); None where unknown (CPU)."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (backends without memory stats)
        return None
    if not stats:
        return None
    limit = stats.get("bytes_limit")
    return int(limit) if limit else None


# ----------------------------------------------------------------------------- bytes

def _nbytes(shape, dtype) -> int:
    return int(math.prod(shape)) * jnp.dtype(dtype).itemsize


def _shard_shape(shape, spec, mesh) -> tuple:
    if mesh is None:
        return tuple(shape)
    from jax.sharding import NamedSharding
    return NamedSharding(mesh, spec).shard_shape(tuple(shape))


def _state_bytes(state, mesh) -> int:
    """Per-device bytes of an abstract ``nnx.State`` laid out by ``sharding.state_specs``."""
    from flax import nnx
    specs = dict(nnx.to_flat_state(shd.state_specs(state, mesh)))
    total = 0
    for path, var in nnx.to_flat_state(state):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        spec = specs[path]
        spec = spec.get_value() if isinstance(spec, nnx.Variable) else spec
        total += _nbytes(_shard_shape(value.shape, spec, mesh), value.dtype)
    return total


def _count(state) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))


def _axis_factor(mesh, axes, size: int) -> int:
    """How many ways ``size`` is split by the logical rule of ``axes`` (drop an axis that
    does not divide, as ``sharding.logical_to_spec`` does)."""
    if mesh is None:
        return 1
    f = 1
    for ax in axes:
        n = mesh.shape.get(ax, 1)
        if size % (f * n) == 0:
            f *= n
    return f


class _Sharder:
    """Per-device bytes of an activation from its global shape (see module docstring)."""

    def __init__(self, mesh, batch_sizes, tensor_sizes):
        self.mesh = mesh
        self.batch_sizes = set(batch_sizes)
        self.tensor_sizes = set(tensor_sizes)

    def __call__(self, shape, dtype) -> int:
        b = _nbytes(shape, dtype)
        if self.mesh is None:
            return b
        div = 1
        for i in range(min(2, len(shape))):
            if shape[i] in self.batch_sizes:
                div *= _axis_factor(self.mesh, ("data", "fsdp"), shape[i])
                break
        t = self.mesh.shape.get("tensor", 1)
        if t > 1:
            for d in shape:
                if d in self.tensor_sizes and d % t == 0:
                    div *= t
                    break
        return -(-b // div)


# ----------------------------------------------------------------------------- tracing

def abstract_policy(mcfg):
    """``(graphdef, {"visual": State, "text": State})`` of ShapeDtypeStructs (nothing allocated)."""
    from flax import nnx
    from dipr1_jax.model import QwenVL
    from dipr1_jax.train.state import Policy
    model = nnx.eval_shape(lambda: QwenVL(mcfg, nnx.Rngs(0)))
    return Policy.from_model(model)


def abstract_batch(shapes: StepShapes, cfg: Config, patch_dim: int) -> dict:
    """ShapeDtypeStructs of the step's batch (GRPO: micro-batches stacked on axis 0)."""
    S = jax.ShapeDtypeStruct
    s = shapes
    mb = s.micro_prompts
    lead = (s.micro_batches,) if s.kind == "grpo" else ()
    out = {"input_ids": S(lead + (mb, s.prompt_len), jnp.int32),
           "attention_mask": S(lead + (mb, s.prompt_len), jnp.int32),
           "pixel_values": S(lead + (s.patches, patch_dim), jnp.float32),
           "image_grid_thw": S(lead + (mb, 3), jnp.int32),
           "completion": S(lead + (mb, s.group, s.completion_len), jnp.int32),
           "completion_mask": S(lead + (mb, s.group, s.completion_len), jnp.float32)}
    if s.kind == "grpo":
        out["advantages"] = S(lead + (mb, s.group), jnp.float32)
        if cfg.grpo.beta > 0:
            out["ref_logp"] = S(lead + (mb, s.group, s.completion_len), jnp.float32)
        if cfg.grpo.mu > 1:
            out["old_logp"] = S(lead + (mb, s.group, s.completion_len), jnp.float32)
    return out


def batch_shardings(batch: dict, mesh, kind: str) -> dict:
    """``state.put_batch``'s placement of an abstract batch (None without a mesh)."""
    if mesh is None:
        return {k: None for k in batch}
    from jax.sharding import NamedSharding
    axis = 1 if kind == "grpo" else 0
    out = {}
    for key, v in batch.items():
        axes = [None] * len(v.shape)
        if key != "pixel_values" and len(v.shape) > axis:
            axes[axis] = "batch"
        out[key] = NamedSharding(mesh, shd.logical_to_spec(tuple(axes), v.shape, mesh))
    return out


def _loss_fn(kind: str, graphdef, cfg: Config):
    """The per-(micro-)batch loss the real step differentiates."""
    chunk = cfg.model.logprob_chunk
    if kind == "grpo":
        from dipr1_jax.grpo import grpo_loss
        from dipr1_jax.train.grpo_step import _logprobs

        def loss(trainable, frozen, mb):
            logp = _logprobs(graphdef, trainable, frozen, mb, cfg.rollout.temperature, chunk)
            return grpo_loss(logp, mb.get("old_logp"), mb.get("ref_logp"), mb["advantages"],
                             mb["completion_mask"], cfg.grpo)[0]
        return loss
    from dipr1_jax.train.sft_step import sft_loss
    return lambda trainable, frozen, b: sft_loss(graphdef, trainable, frozen, b, chunk)[0]


_VIEWS = ("reshape", "squeeze", "expand_dims")  # free in XLA (bitcasts of one buffer)
# Elementwise ops XLA fuses into their consumers (recomputed where needed, never stored
# on their own when their operands are at hand).
_CHEAP = frozenset(("add", "sub", "mul", "neg", "convert_element_type", "select_n", "and",
                    "or", "not", "eq", "ne", "lt", "le", "gt", "ge", "integer_pow", "square",
                    "max", "min", "copy", "copy_p"))
_BROADCASTS = frozenset(("broadcast_in_dim", "iota"))


class _Scope:
    """A jaxpr with, for a jitted function's body, how its inputs / outputs map outside."""

    def __init__(self, jaxpr, parent=None, eqn=None):
        self.jaxpr, self.parent, self.eqn = jaxpr, parent, eqn
        self.producers = {v: e for e in jaxpr.eqns for v in e.outvars}

    def inner(self, eqn):
        j = eqn.params["jaxpr"]
        return _Scope(getattr(j, "jaxpr", j), self, eqn)


def _is_jit(eqn) -> bool:
    return eqn.primitive.name in ("jit", "pjit") and "jaxpr" in eqn.params


def _definition(scope: _Scope, var):
    """``(scope, eqn)`` computing ``var`` (looking through jitted functions and views), or
    ``(scope, None)`` for an input of the outermost jaxpr."""
    from jax._src import core
    while True:
        eqn = scope.producers.get(var)
        if eqn is None:
            if scope.parent is not None and var in scope.jaxpr.invars:
                nxt = scope.eqn.invars[scope.jaxpr.invars.index(var)]
                if isinstance(nxt, core.Literal):
                    return scope, None
                scope, var = scope.parent, nxt
                continue
            return scope, None
        if _is_jit(eqn):
            inner = scope.inner(eqn)
            out = inner.jaxpr.outvars[eqn.outvars.index(var)]
            if isinstance(out, core.Literal):
                return scope, None
            scope, var = inner, out
            continue
        if eqn.primitive.name in _VIEWS and not isinstance(eqn.invars[0], core.Literal):
            var = eqn.invars[0]
            continue
        return scope, eqn


def _outer(scope: _Scope, var):
    """``var`` seen from the outermost jaxpr (None when it has no name there)."""
    while scope.parent is not None:
        if var in scope.jaxpr.outvars:
            var = scope.eqn.outvars[scope.jaxpr.outvars.index(var)]
        elif var in scope.jaxpr.invars:
            var = scope.eqn.invars[scope.jaxpr.invars.index(var)]
        else:
            return None
        scope = scope.parent
    return var


def _broadcastish(scope, var, depth=0) -> bool:
    """Made by broadcasts / iotas (and cheap elementwise ops of them): fused into the
    consumers, never stored."""
    from jax._src import core
    if isinstance(var, core.Literal):
        return True
    sc, eqn = _definition(scope, var)
    if eqn is None or depth > 8:
        return False
    name = eqn.primitive.name
    if name in _BROADCASTS:
        return True
    return name in _CHEAP and all(_broadcastish(sc, v, depth + 1) for v in eqn.invars)


def _derived(scope, var, stored, depth=0) -> bool:
    """Cheap elementwise function of stored residuals / arguments / literals."""
    from jax._src import core
    if isinstance(var, core.Literal):
        return True
    outer = _outer(scope, var)
    if depth and outer is not None and outer in stored:
        return True
    sc, eqn = _definition(scope, var)
    if eqn is None:
        return _outer(sc, var) in stored
    if depth > 8 or eqn.primitive.name not in _CHEAP:
        return False
    return all(_derived(sc, v, stored, depth + 1) for v in eqn.invars)


def residuals(kind: str, policy, trainable, frozen, batch_one: dict, cfg: Config):
    """``[(aval, source, position)]``: see :func:`_trace`."""
    return _trace(kind, policy, trainable, frozen, batch_one, cfg)[0]


def _trace(kind: str, policy, trainable, frozen, batch_one: dict, cfg: Config):
    """``([(aval, source, position)], [(position, {(shape, dtype)})])``.

    The first item: the arrays the backward pass of one (micro-)batch keeps, traced
    abstractly (``jax.make_jaxpr`` of ``jax.vjp`` of the real loss, as
    ``jax.ad_checkpoint.print_saved_residuals`` does) with the model's remat policy.

    Counted as XLA stores them: a residual that is an argument (parameters, batch) or the
    same buffer as another (a jitted helper returning its input, a reshape) is not counted
    again; broadcasts (masks, rotary tables per head) are fused into their consumers; a
    residual used only by the backward pass that is a cheap elementwise function of stored
    residuals (e.g. ``s * (1 - s)`` of SiLU's sigmoid) is recomputed there.

    The second item: ``[(position, {(shape, dtype)})]`` per equation of the forward, in
    program order: where each residual appears (its ``position`` is the index of the
    equation making it) and the shapes of the values that equation computes and does not
    keep (broadcasts and views excluded): the forward's workspace, e.g. a frozen vision
    tower's attention scores."""
    from jax._src import core
    loss = _loss_fn(kind, policy.graphdef, cfg)

    def f(p, fz, b):  # gradients w.r.t. the trainable parameters only, as in the step
        fz, b = jax.lax.stop_gradient((fz, b))
        return loss(p, fz, b)

    leaves, tree = jax.tree.flatten((trainable, frozen, batch_one))

    def g(*flat):
        return jax.vjp(lambda *x: f(*jax.tree.unflatten(tree, x)), *flat)

    closed, out_shape = jax.make_jaxpr(g, return_shape=True)(*leaves)
    jaxpr = closed.jaxpr
    top = _Scope(jaxpr)
    n_res = len(jax.tree.leaves(out_shape[1]))
    res_vars = [v for v in jaxpr.outvars[len(jaxpr.outvars) - n_res:]
                if not isinstance(v, core.Literal)]
    args = set(jaxpr.invars) | set(jaxpr.constvars)
    used = {v for e in jaxpr.eqns for v in e.invars if not isinstance(v, core.Literal)}
    primal_out = {v for v in jaxpr.outvars[:len(jaxpr.outvars) - n_res]
                  if not isinstance(v, core.Literal)}
    position = {v: i for i, e in enumerate(jaxpr.eqns) for v in e.outvars}
    canon = {}
    for v in res_vars:  # one buffer per residual: look through views / forwarded inputs
        sc, eqn = _definition(top, v)
        r = v if eqn is None else (_outer(sc, eqn.outvars[0]) or v)
        canon[v] = r if (eqn is not None and len(eqn.outvars) == 1) else v
    stored = set(args)
    candidates = []
    for v in res_vars:
        r = canon[v]
        if r in args or r in stored:
            continue
        stored.add(r)
        candidates.append((v, r))
    out = []
    for v, r in candidates:
        if _broadcastish(top, v):
            stored.discard(r)
            continue
        only_backward = r not in used and r not in primal_out
        if only_backward and _derived(top, v, stored - {r}):
            continue
        sc, eqn = _definition(top, v)
        src = "?" if eqn is None else f"{eqn.primitive.name} @{_where(eqn)}"
        pos = position.get(v, 0)
        out.append((v.aval, src, pos))
        if eqn is not None and (eqn.primitive.name, _function(eqn)) in _SECOND_LAYOUT:
            out.append((v.aval, src + " (second layout)", pos))
    skip = set(res_vars) | set(canon.values())
    return out, [(i, _transients(e, skip)) for i, e in enumerate(jaxpr.eqns)]


def _transients(eqn, skip) -> set:
    """``{(shape, dtype)}`` of the values ``eqn`` computes (in the jaxprs inside it too),
    except ``skip`` (the residuals), broadcasts, views and vectors."""
    from jax._src import core
    out, todo = set(), [eqn]
    while todo:
        e = todo.pop()
        for p in e.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                j = sub.jaxpr if isinstance(sub, core.ClosedJaxpr) else sub
                if isinstance(j, core.Jaxpr):
                    todo.extend(j.eqns)
        if e.primitive.name in _BROADCASTS or e.primitive.name in _VIEWS or _is_jit(e):
            continue
        for v in e.outvars:
            shape = getattr(v.aval, "shape", ())
            if v not in skip and len(shape) >= 2:
                out.add((tuple(shape), v.aval.dtype))
    return out


# Residuals XLA keeps twice: the decoder's grouped-query attention probabilities
# (``decoder.cached_attention``) are stored for the softmax backward and again in the
# layout of the probabilities x values product (measured on the CPU compile).
_SECOND_LAYOUT = frozenset({("div", "cached_attention")})


def _function(eqn) -> str:
    from jax._src import source_info_util
    frame = source_info_util.user_frame(eqn.source_info.traceback)
    return frame.function_name if frame is not None else ""


def _where(eqn) -> str:
    from jax._src import source_info_util
    return source_info_util.summarize(eqn.source_info).split("/")[-1]


# ----------------------------------------------------------------------------- plan

def _kind_of(cfg: Config, kind: str | None) -> str:
    if kind is not None:
        return kind
    return {"sft": "sft", "grpo": "grpo", "eval": "eval"}.get(cfg.mode, "grpo")


def plan(cfg: Config, mesh=None, *, kind: str | None = None, device_bytes: int | None = None,
         shapes: StepShapes | None = None, tokenizer=None, activations: bool = True,
         **shape_kw) -> MemoryPlan:
    """The memory plan of the job's ``kind`` (``grpo`` | ``sft`` | ``eval``; default from
    ``cfg.mode``: ``pipeline`` plans GRPO, its larger phase -- use :func:`plans` for all).

    ``mesh``: the job's mesh (``state.build_mesh``; None on one device). ``device_bytes``:
    the memory of one device (:func:`device_memory`); ``shapes`` / ``shape_kw``
    (``prompt_text_len``, ``image_size``, ``sft_target_len``) override the batch shapes.
    ``activations=False`` skips the residual trace (activations planned as 0: seconds
    faster for a 3B model; for quick looks at the other components only)."""
    kind = _kind_of(cfg, kind)
    mcfg = model_config(cfg)
    shapes = shapes or step_shapes(cfg, kind, mcfg=mcfg, tokenizer=tokenizer, **shape_kw)
    policy = abstract_policy(mcfg)
    if kind == "grpo":
        freeze, optim = cfg.train.freeze_vision, cfg.train.optim
    elif kind == "sft":
        freeze, optim = cfg.sft.freeze_vision, cfg.sft.optim
    else:
        freeze, optim = True, None
    trainable, frozen = policy.split(freeze)
    if kind == "eval":
        trainable, frozen = {}, dict(policy.groups)
    t_bytes = sum(_state_bytes(g, mesh) for g in trainable.values())
    f_bytes = sum(_state_bytes(g, mesh) for g in frozen.values())
    n_all = _count(policy.groups)
    n_train = _count(trainable)

    t = mcfg.text
    kv_heads_dev = t.num_kv_heads // _axis_factor(mesh, ("tensor",), t.num_kv_heads)
    cache_dtype = jnp.dtype(mcfg.dtype)
    slots = shapes.rollout_prompt_len + shapes.rollout_new_tokens

    def cache_bytes(rows):
        dev_rows = -(-rows // _axis_factor(mesh, ("data", "fsdp"), rows))
        return 2 * t.num_layers * dev_rows * kv_heads_dev * slots * t.head_dim * \
            cache_dtype.itemsize

    kv = rollout_ws = 0
    if kind in ("grpo", "eval"):
        kv = cache_bytes(shapes.prompts * shapes.group)
        if shapes.group > 1:
            rollout_ws = cache_bytes(shapes.prompts)

    opt_bytes = grads = ref = batch_bytes = act = res_b = ws = update_ws = 0
    notes: list[str] = []
    if kind in ("grpo", "sft"):
        steps = cfg.train.steps if kind == "grpo" else cfg.sft.steps
        _, _, opt_state, _ = abstract_state(policy, freeze, optim, steps, mesh)
        opt_bytes = _tree_bytes(opt_state)
        update_ws = int(UPDATE_WORKSPACE * t_bytes)
        sharded_like_params = 2 * t_bytes
        if opt_bytes > 1.5 * sharded_like_params:
            notes.append(f"the AdamW state is not sharded like the parameters "
                         f"(state.init_state): {_fmt(opt_bytes)} per device, "
                         f"~{_fmt(sharded_like_params)} if it were")
        # GRPO with several micro-batches: the scan's accumulator and one micro-batch's
        # gradient; a one-iteration scan is inlined by XLA (one buffer), as is SFT.
        grads = t_bytes * (2 if kind == "grpo" and shapes.micro_batches > 1 else 1)
        if kind == "grpo" and cfg.grpo.beta > 0:
            ref = t_bytes
        batch = abstract_batch(shapes, cfg, mcfg.vision.patch_dim)
        sh = batch_shardings(batch, mesh, kind)
        for key, v in batch.items():
            shape = v.shape if sh[key] is None else sh[key].shard_shape(v.shape)
            batch_bytes += _nbytes(shape, v.dtype)
        one = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in batch.items()} \
            if kind == "grpo" else batch
    if kind in ("grpo", "sft") and not activations:
        notes.append("activations not planned (plan(activations=False))")
    elif kind in ("grpo", "sft"):
        v = mcfg.vision
        mb = shapes.micro_prompts
        sharder = _Sharder(mesh, (mb, mb * shapes.group),
                           (t.num_heads, t.num_kv_heads, t.intermediate_size, t.vocab_size,
                            v.num_heads, v.intermediate_size))

        def traced(pol):
            """(residual bytes, the forward's peak: residuals so far + a transient pair)."""
            tr, fz = pol.split(freeze)
            res, trans = _trace(kind, pol, tr, fz, one, cfg)
            at = [0] * (len(trans) + 1)
            for a, _, pos in res:
                at[pos] += sharder(a.shape, a.dtype)
            peak = kept = 0
            for pos, shapes_ in trans:
                big = max((sharder(sh, dt) for sh, dt in shapes_), default=0)
                peak = max(peak, kept + 2 * big)
                kept += at[pos]
            return kept, peak

        res_b, fwd_peak = traced(policy)
        if mcfg.remat != "none":
            # The backward pass recomputes one layer at a time: it holds that layer's
            # un-rematerialised residuals on top of what the policy saves.
            full = traced(abstract_policy(mcfg.replace(remat="none")))[0]
            if mcfg.scan_layers:
                res_b += full // t.num_layers
            else:
                # Layers in a Python loop: XLA schedules the recomputations of all layers
                # together (measured on the CPU compile: remat=full saved 3% of the step's
                # scratch), so the plan keeps the un-rematerialised residuals.
                res_b = full
                notes.append(f"model.remat={mcfg.remat} without model.scan_layers: XLA does "
                             "not keep the remat savings for layers in a Python loop; "
                             "planned without them (set --config.model.scan_layers=true)")
        rows = mb * shapes.group
        c = min(cfg.model.logprob_chunk, shapes.completion_len)
        logits = sharder((rows, c, t.vocab_size), jnp.float32)
        # The peak is at the start of the backward pass (every residual plus the log-prob
        # chunk's workspace), or inside the forward where a large value that is not kept
        # lives with its successor on top of the residuals made so far (e.g. a frozen
        # vision tower's attention scores and probabilities), whichever is larger.
        act = max(res_b + WORKSPACE_LOGIT_CHUNKS * logits, fwd_peak)
        ws = act - res_b

    held, note = _held(cfg, kind, t_bytes, opt_bytes)
    dev = 1 if mesh is None else int(mesh.size)  # a Mesh or an AbstractMesh
    mshape = {} if mesh is None else dict(mesh.shape)
    return MemoryPlan(kind=kind, devices=dev, mesh_shape=mshape, shapes=shapes, remat=mcfg.remat,
                      params_trainable=t_bytes, params_frozen=f_bytes, optimizer=opt_bytes,
                      gradients=grads, reference=ref, held=held, batch=batch_bytes,
                      activations=act, residuals=res_b, workspace=ws, kv_cache=kv,
                      update_workspace=update_ws,
                      rollout_workspace=rollout_ws, device_bytes=device_bytes,
                      param_count=n_all, trainable_count=n_train, vision_trainable=not freeze,
                      held_note=note, param_dtype=mcfg.param_dtype,
                      scan_layers=mcfg.scan_layers, notes=tuple(notes),
                      vision_bytes=_state_bytes(policy.groups["visual"], mesh))


def _held(cfg: Config, kind: str, t_bytes: int, opt_bytes: int) -> tuple[int, str]:
    if kind == "eval":
        return 0, "none"
    if cfg.mode == "pipeline" and kind == "grpo":
        # base model + the SFT loop's state (kept for the control run) during GRPO
        return 2 * t_bytes + opt_bytes, "initial model + SFT loop state (pipeline)"
    return t_bytes, "initial model (the loop trains a copy)"


def plans(cfg: Config, mesh=None, **kw) -> list[MemoryPlan]:
    """The plans of every phase the job's mode runs (``pipeline``: SFT and GRPO)."""
    kinds = {"pipeline": ("sft", "grpo"), "sft": ("sft",), "grpo": ("grpo",),
             "eval": ("eval",)}.get(cfg.mode, ())
    return [plan(cfg, mesh, kind=k, **kw) for k in kinds]


# ----------------------------------------------------------------------------- check

class MemoryPlanError(RuntimeError):
    """The plan does not fit the device; the message names flags that would fix it."""


def fixes(p: MemoryPlan) -> list[str]:
    """Flags that would lower the plan's total, each with its estimated saving, largest
    first (estimates: the affected components scaled, the plan not re-traced)."""
    s = p.shapes
    sec = "train" if p.kind == "grpo" else "sft"
    r = dataclasses.replace
    cands: list[tuple[MemoryPlan, str]] = []
    if p.kind == "grpo" and s.micro_prompts > 1:
        d = _smaller_divisor(s.prompts, s.micro_prompts)
        f = d / s.micro_prompts
        cands.append((r(p, activations=int(p.activations * f), residuals=int(p.residuals * f),
                        gradients=p.params_trainable * 2),
                      f"--config.train.micro_batch_size={d} (now {s.micro_prompts})"))
    if p.kind in ("grpo", "sft") and p.activations:
        layers_note = "" if p.scan_layers else " --config.model.scan_layers=true"
        if p.remat == "none" or not p.scan_layers:
            cands.append((r(p, activations=p.workspace + p.residuals // 4),
                           f"--config.model.remat=full{layers_note}"))
    if p.kind == "sft" and s.prompts > 1:
        cands.append((r(p, activations=p.activations // 2, batch=p.batch // 2),
                      f"--config.sft.batch_size={s.prompts // 2}"))
    if p.kind in ("grpo", "eval") and s.rollout_new_tokens > 1:
        new = s.rollout_new_tokens // 2
        slots = s.rollout_prompt_len + s.rollout_new_tokens
        f = (s.rollout_prompt_len + new) / slots
        cands.append((r(p, kv_cache=int(p.kv_cache * f), rollout_workspace=int(
            p.rollout_workspace * f), activations=int(p.activations * f)),
            f"--config.rollout.max_new_tokens={new}"))
    if p.kind == "grpo" and s.group > 1:
        cands.append((r(p, kv_cache=p.kv_cache // 2, activations=p.activations // 2),
                      f"--config.grpo.group_size={s.group // 2}"))
    if p.kind in ("grpo", "sft") and p.vision_trainable and p.vision_bytes:
        v = p.vision_bytes
        opt = int(p.optimizer * v / max(p.params_trainable, 1))
        cands.append((r(p, params_trainable=p.params_trainable - v, params_frozen=p.params_frozen
                        + v, optimizer=p.optimizer - opt,
                        gradients=int(p.gradients * (1 - v / max(p.params_trainable, 1))),
                        reference=max(0, p.reference - v) if p.reference else 0,
                        held=max(0, p.held - v)),
                      f"--config.{sec}.freeze_vision=true"))
    if p.reference:
        cands.append((r(p, reference=0), "--config.grpo.beta=0 (no reference copy)"))
    if p.param_dtype == "float32":
        cands.append((r(p, params_trainable=p.params_trainable // 2,
                        params_frozen=p.params_frozen // 2, optimizer=p.optimizer // 2,
                        gradients=p.gradients // 2, reference=p.reference // 2,
                        held=p.held // 2), "--config.model.param_dtype=bfloat16"))
    if p.optimizer > 3 * p.params_trainable:
        cands.append((r(p, optimizer=2 * p.params_trainable),
                      "shard the AdamW state like the parameters (a fix in "
                      "state.init_state, not a flag)"))
    ranked = sorted(((p.total - q.total, flag) for q, flag in cands), key=lambda x: -x[0])
    out = [f"{flag} (saves ~{_fmt(saved)})" for saved, flag in ranked if saved > 0]
    if p.devices > 1 and p.mesh_shape.get("fsdp", 1) < p.devices:
        out.append("--config.mesh.fsdp=-1 (shard parameters and AdamW state over all devices)")
    out.append("more devices (a larger --config.mesh.fsdp or --config.mesh.data axis)")
    return out


def _smaller_divisor(n: int, cur: int) -> int:
    """The largest divisor of ``n`` at most ``cur // 2``."""
    for d in range(cur // 2, 0, -1):
        if n % d == 0:
            return d
    return 1


def check(p: MemoryPlan, device_bytes: int | None = None) -> None:
    """Raises :class:`MemoryPlanError` when the plan's total exceeds the device memory
    (``device_bytes`` or the plan's; nothing is checked when neither is known)."""
    cap = device_bytes or p.device_bytes
    if not cap or p.total <= cap:
        return
    raise MemoryPlanError(
        f"the {p.kind} job needs about {_fmt(p.total)} per device but a device has "
        f"{_fmt(cap)}; try: " + "; ".join(fixes(p)) + "\n" + p.format())


# ----------------------------------------------------------------------------- reference

@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """XLA's memory analysis of a compiled step (per device)."""

    argument: int
    output: int
    alias: int
    temp: int

    @property
    def total(self) -> int:
        return self.argument + self.output - self.alias + self.temp


def compile_step(cfg: Config, mesh=None, *, kind: str | None = None,
                 shapes: StepShapes | None = None, compiler_options: dict | None = None,
                 tokenizer=None, **shape_kw) -> CompiledMemory:
    """Lowers and compiles the real jitted update step (``make_grpo_step`` /
    ``make_sft_step``, with the loop's state shardings on a mesh) on abstract arrays of
    the plan's shapes, and returns XLA's memory analysis. Nothing is allocated; the
    compile takes as long as the job's own."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dipr1_jax.train.grpo_step import make_grpo_step
    from dipr1_jax.train.sft_step import make_sft_step
    from dipr1_jax.train.state import HashableTree, TrainState

    kind = _kind_of(cfg, kind)
    if kind not in ("grpo", "sft"):
        raise ValueError(f"compile_step: kind must be grpo or sft, got {kind!r}")
    mcfg = model_config(cfg)
    shapes = shapes or step_shapes(cfg, kind, mcfg=mcfg, tokenizer=tokenizer, **shape_kw)
    policy = abstract_policy(mcfg)
    freeze, optim, steps = ((cfg.train.freeze_vision, cfg.train.optim, cfg.train.steps)
                            if kind == "grpo" else
                            (cfg.sft.freeze_vision, cfg.sft.optim, cfg.sft.steps))
    trainable, frozen, opt_state, _ = abstract_state(policy, freeze, optim, steps, mesh)
    batch = abstract_batch(shapes, cfg, mcfg.vision.patch_dim)
    state_sh = None
    if mesh is None:
        state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), trainable, opt_state)
    else:
        rep = NamedSharding(mesh, P())
        state = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), trainable,
                           opt_state)
        bsh = batch_shardings(batch, mesh, kind)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh[k])
                 for k, v in batch.items()}
        # the loop's out-shardings: those of its step-0 state (GRPOLoop / SFTLoop)
        state_sh = HashableTree(jax.tree.map(lambda x: x.sharding, state))
    chunk = cfg.model.logprob_chunk
    if kind == "grpo":
        step = make_grpo_step(policy.graphdef, optim, steps, cfg.grpo,
                              temperature=cfg.rollout.temperature, chunk=chunk,
                              state_shardings=state_sh)
        args = (state, frozen, batch, jax.ShapeDtypeStruct((), jnp.float32))
    else:
        step = make_sft_step(policy.graphdef, optim, steps, chunk=chunk,
                             state_shardings=state_sh)
        args = (state, frozen, batch)
    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with ctx:
        compiled = step.lower(*args).compile(compiler_options=compiler_options)
    m = compiled.memory_analysis()
    return CompiledMemory(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                          int(m.alias_size_in_bytes), int(m.temp_size_in_bytes))


def _like(tree, leaves_tree):
    """``leaves_tree``'s leaves (e.g. the shardings of ``sharding.state_shardings``) in
    ``tree``'s structure (an ``nnx.State`` keeps its Variable nodes)."""
    it = iter(jax.tree.leaves(leaves_tree))
    out = jax.tree.map(lambda _: next(it), tree)
    assert next(it, None) is None
    return out


def abstract_state(policy, freeze: bool, optim, steps: int, mesh=None):
    """``(trainable, frozen, opt_state, optimizer)`` as ShapeDtypeStructs laid out as the
    loops lay them out: parameters by ``sharding.state_shardings`` (``create_model`` /
    ``load_hf``), the optimizer state as ``state.init_state`` makes it
    (``state.opt_state_shardings``)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dipr1_jax.train.state import make_optimizer, opt_state_shardings
    trainable, frozen = policy.split(freeze)
    optimizer, _ = make_optimizer(optim, max(steps, 1))
    if mesh is None:
        return trainable, frozen, jax.eval_shape(optimizer.init, trainable), optimizer

    def place(group):
        sh = _like(group, shd.state_shardings(group, mesh))
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            group, sh)

    trainable = {k: place(v) for k, v in trainable.items()}
    frozen = {k: place(v) for k, v in frozen.items()}
    rep = NamedSharding(mesh, P())
    out_sh = opt_state_shardings(optimizer, trainable, mesh)
    shapes = jax.eval_shape(optimizer.init, trainable)

    def keep(x, s):
        ok = isinstance(s, NamedSharding) and s.mesh == mesh
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s if ok else rep)

    opt_state = jax.tree.map(keep, shapes, _like(shapes, jax.tree.leaves(out_sh)))
    return trainable, frozen, opt_state, optimizer


def _tree_bytes(tree) -> int:
    """Per-device bytes of ShapeDtypeStructs (their shard shapes where they have a
    sharding)."""
    total = 0
    for x in jax.tree.leaves(tree):
        sh = getattr(x, "sharding", None)
        total += _nbytes(x.shape if sh is None else sh.shard_shape(x.shape), x.dtype)
    return total
