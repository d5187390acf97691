"""Typed, validated configuration.

Every config is a frozen dataclass validated in ``__post_init__`` (types and
ranges), so a bad value fails at construction with a message that names the
field. ``Config`` is the root; experiment files in ``configs/`` define
``get_config() -> Config``. ``cli.py`` turns every leaf field into an absl
flag ``--config.<section>.<field>`` for sweeps.

Frozen dataclasses are hashable, so a config can be a static argument of
``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a help text (shown by ``--help``)."""
    return dataclasses.field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field."""


def optional_inner(annotation: Any) -> Any:
    """``X`` for an annotation ``X | None`` (or ``Optional[X]``), else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0]
    return None


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return len(args) == len(value) and all(_type_ok(v, a) for v, a in zip(value, args))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    raise TypeError(f"config: unsupported annotation {annotation!r}")


def _describe(annotation: Any) -> str:
    inner = optional_inner(annotation)
    if inner is not None:
        return _describe(inner) + " or None"
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


class _Validated:
    """Mixin: checks field types against annotations, then calls ``validate``."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            ann = hints[f.name]
            if (ann is float or optional_inner(ann) is float) and isinstance(value, int) \
                    and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                value = float(value)
            if not _type_ok(value, ann):
                raise ConfigError(
                    f"{type(self).__name__}.{f.name}: expected {_describe(ann)}, got {value!r}"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{type(self).__name__}.{f.name}: must be finite, got {value!r}")
        self.validate()

    def validate(self) -> None:  # overridden by subclasses
        pass

    def _require(self, ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ConfigError(
                f"{type(self).__name__}.{name}: {what} (got {getattr(self, name)!r})"
            )


@dataclasses.dataclass(frozen=True)
class RewardConfig(_Validated):
    """DESIGN.md section 3. Weights, thresholds and padding sizes of the rewards."""

    iou_threshold: float = _f(0.5, "tau of the greedy matching")
    soft_tp: bool = _f(True, "TP = sum of matched IoUs (True) or number of matches")
    precision_weight: float = _f(0.5, "w_p in R_acc")
    look_ioa_threshold: float = _f(0.5, "tau_look: IoA(g, l) needed to cover g")
    look_iou_var_weight: float = _f(0.0, "optional lambda term of R_look")
    w_format: float = _f(1.0, "weight of R_format")
    w_look: float = _f(1.0, "weight of R_look")
    w_acc: float = _f(1.0, "weight of R_acc on detection prompts")
    w_count: float = _f(0.0, "weight of R_count on detection prompts")
    w_count_prompt: float = _f(1.0, "weight of R_count on counting prompts (replaces w_acc)")
    max_boxes: int = _f(128, "answer boxes kept per completion (extra are counted)")
    max_look: int = _f(32, "look boxes kept per completion (extra are counted)")

    def validate(self):
        for name in ("iou_threshold", "look_ioa_threshold"):
            v = getattr(self, name)
            self._require(0.0 < v <= 1.0, name, "must be in (0, 1]")
        self._require(0.0 <= self.precision_weight <= 1.0, "precision_weight", "must be in [0, 1]")
        for name in ("look_iou_var_weight", "w_format", "w_look", "w_acc", "w_count",
                     "w_count_prompt"):
            self._require(getattr(self, name) >= 0.0, name, "must be >= 0")
        self._require(self.max_boxes >= 1, "max_boxes", "must be >= 1")
        self._require(self.max_look >= 1, "max_look", "must be >= 1")


Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@dataclasses.dataclass(frozen=True)
class GRPOConfig(_Validated):
    """DESIGN.md section 4."""

    group_size: int = _f(8, "G completions per prompt")
    eps_low: float = _f(0.2, "lower clip: ratio >= 1 - eps_low")
    eps_high: float = _f(0.2, "upper clip: ratio <= 1 + eps_high")
    beta: float = _f(0.04, "k3 KL weight; 0 disables the reference model")
    scale_rewards: Literal["group", "none"] = _f(
        "group", "advantage scale: group std (GRPO) or none (Dr.GRPO)")
    aggregation: Aggregation = _f("token-mean", "loss aggregation over tokens and sequences")
    norm_length: int = _f(0, "Dr.GRPO constant length; 0 means the padded T")
    mu: int = _f(1, "policy iterations per rollout batch")

    def validate(self):
        self._require(self.group_size >= 1, "group_size", "must be >= 1")
        self._require(0.0 <= self.eps_low < 1.0, "eps_low", "must be in [0, 1)")
        self._require(self.eps_high >= 0.0, "eps_high", "must be >= 0")
        self._require(self.beta >= 0.0, "beta", "must be >= 0")
        self._require(self.norm_length >= 0, "norm_length", "must be >= 0")
        self._require(self.mu >= 1, "mu", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class DemoConfig(_Validated):
    """The built-in reward job on synthetic scenes (no model, no downloads)."""

    batch_size: int = _f(8, "prompts (images) per step")
    steps: int = _f(5, "reward-demo steps")
    max_gt: int = _f(100, "GT boxes per image are drawn in [1, max_gt]")
    image_size: int = _f(896, "side of the (resized) square frame boxes live in")
    seed: int = _f(0, "seed of the synthetic scenes and rollouts")

    def validate(self):
        self._require(self.batch_size >= 1, "batch_size", "must be >= 1")
        self._require(self.steps >= 1, "steps", "must be >= 1")
        self._require(self.max_gt >= 1, "max_gt", "must be >= 1")
        self._require(self.image_size >= 28, "image_size", "must be >= 28")


DATA_NAMES = ("synthetic", "crowdhuman", "citypersons", "widerped", "uavdt", "coco")


@dataclasses.dataclass(frozen=True)
class ModelSection(_Validated):
    """Which policy to train: a Hugging Face directory, or a preset with random weights."""

    preset: str = _f("small", "preset for random init (tiny, small, bench-100m, qwen2.5-vl-3b, ...)")
    checkpoint: str = _f("", "Hugging Face Qwen2.5-VL / Qwen2-VL directory (config.json, "
                             "safetensors, tokenizer.json); empty: random init of preset")
    dtype: Literal["float32", "bfloat16"] = _f("float32", "compute dtype")
    param_dtype: Literal["float32", "bfloat16"] = _f("float32", "parameter dtype")
    remat: Literal["none", "full", "dots", "dots_no_batch", "save_block_outputs"] = _f(
        "none", "rematerialisation policy per decoder layer / vision block")
    scan_layers: bool = _f(False, "nnx.scan over the decoder layers")
    vision_max_patches: int = _f(0, "per-image vision layout with this many patches per image "
                                    "(0: flat layout; set it for large images)")
    attention: Literal["auto", "xla", "cudnn", "splash"] = _f(
        "auto", "attention backend (model/attention.py): auto = cudnn on a CUDA GPU, splash "
                "on TPU, xla elsewhere")
    logprob_chunk: int = _f(256, "sequence chunk of the float32 log-prob computation")
    init: Literal["hf", "fan_in"] = _f(
        "fan_in", "random init: hf = normal(0.02) matrices (transformers); fan_in = "
                  "normal(1/sqrt(fan_in)) (narrow models trained from scratch)")

    def validate(self):
        from dipr1_jax.model.config import PRESETS
        self._require(self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}")
        self._require(self.vision_max_patches >= 0, "vision_max_patches", "must be >= 0")
        self._require(self.logprob_chunk >= 1, "logprob_chunk", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class DataSection(_Validated):
    """Training and held-out data. Readers take ``root`` (the dataset's official layout)."""

    name: str = _f("synthetic", "synthetic | crowdhuman | citypersons | widerped | uavdt | coco "
                                "| tfds:<builder>")
    root: str = _f("", "dataset directory in its official layout (readers) or TFDS data_dir")
    train_split: str = _f("train", "split used for training")
    eval_split: str = _f("val", "held-out split used for evaluation")
    task: Literal["detection", "counting", "mixed"] = _f("detection", "prompt task mix")
    counting_fraction: float = _f(0.5, "share of counting prompts when task=mixed")
    category: str = _f("person", "object category named in the prompts")
    prompt_style: Literal["auto", "full", "short"] = _f(
        "auto", "full: the DIP-R1 instructions; short: a few tokens (small models trained from "
                "scratch); auto: short for random init, full for checkpoints")
    min_pixels: int = _f(56 * 56, "smart_resize lower bound")
    max_pixels: int = _f(28 * 28 * 1280, "smart_resize upper bound")
    worker_count: int = _f(0, "grain worker processes (0: in the main process)")
    synthetic_train_size: int = _f(2048, "synthetic: images in the train split")
    synthetic_eval_size: int = _f(512, "synthetic: images in the held-out split")
    synthetic_width: int = _f(112, "synthetic: image width")
    synthetic_height: int = _f(112, "synthetic: image height")
    synthetic_difficulty: Literal["easy", "medium", "hard"] = _f("easy", "synthetic: crowd density")
    synthetic_max_people: int = _f(2, "synthetic: people per image are drawn in [1, this] "
                                      "(0: the difficulty's range)")
    synthetic_min_person_height: int = _f(48, "synthetic: smallest person height in pixels")
    synthetic_clutter: bool = _f(False, "synthetic: buildings, trees, cars and road marks behind "
                                       "the people (false: sky, ground and noise only)")
    synthetic_silhouettes: bool = _f(True, "synthetic: people drawn in one dark colour")
    synthetic_coord_tint: float = _f(1.0, "synthetic: blend of the background with a coordinate "
                                          "map in [0, 1] (a position cue for models trained "
                                          "from scratch; 0: off)")

    def validate(self):
        ok = self.name in DATA_NAMES or (self.name.startswith("tfds:") and len(self.name) > 5)
        self._require(ok, "name", f"must be one of {', '.join(DATA_NAMES)} or tfds:<builder>")
        self._require(0.0 <= self.counting_fraction <= 1.0, "counting_fraction", "must be in [0, 1]")
        self._require(0 < self.min_pixels <= self.max_pixels, "min_pixels",
                      "need 0 < min_pixels <= max_pixels")
        self._require(self.worker_count >= 0, "worker_count", "must be >= 0")
        for name in ("synthetic_train_size", "synthetic_eval_size"):
            self._require(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("synthetic_width", "synthetic_height"):
            self._require(getattr(self, name) >= 32, name, "must be >= 32")
        self._require(self.synthetic_max_people >= 0, "synthetic_max_people", "must be >= 0")
        self._require(self.synthetic_min_person_height >= 1, "synthetic_min_person_height",
                      "must be >= 1")
        self._require(0.0 <= self.synthetic_coord_tint <= 1.0, "synthetic_coord_tint",
                      "must be in [0, 1]")
        if self.name != "synthetic" and not self.name.startswith("tfds:"):
            self._require(bool(self.root), "root", f"data.name={self.name} needs data.root")


@dataclasses.dataclass(frozen=True)
class RolloutSection(_Validated):
    """Sampling of the G completions per prompt (GRPO)."""

    max_new_tokens: int = _f(72, "completion budget in tokens")
    temperature: float = _f(0.7, "sampling temperature (the log-probs use the same)")
    top_p: float = _f(1.0, "nucleus truncation")
    top_k: int = _f(0, "top-k truncation (0: off)")

    def validate(self):
        self._require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        self._require(self.temperature > 0, "temperature", "must be > 0 (GRPO samples)")
        self._require(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        self._require(self.top_k >= 0, "top_k", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class OptimSection(_Validated):
    """optax AdamW with linear warmup + cosine decay and global-norm clipping."""

    learning_rate: float = _f(1e-3, "peak learning rate")
    warmup_steps: int = _f(10, "linear warmup steps")
    end_lr_ratio: float = _f(0.1, "final / peak learning rate of the cosine decay")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    b1: float = _f(0.9, "Adam beta1")
    b2: float = _f(0.99, "Adam beta2")
    grad_clip: float = _f(1.0, "global-norm clip (0: off)")

    def validate(self):
        self._require(self.learning_rate > 0, "learning_rate", "must be > 0")
        self._require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self._require(0.0 <= self.end_lr_ratio <= 1.0, "end_lr_ratio", "must be in [0, 1]")
        self._require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self._require(0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0, "b1", "betas in [0, 1)")
        self._require(self.grad_clip >= 0, "grad_clip", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainSection(_Validated):
    """The GRPO loop."""

    steps: int = _f(60, "GRPO iterations")
    batch_size: int = _f(4, "prompts per step (global)")
    micro_batch_size: int = _f(0, "prompts per gradient micro-batch (whole groups; 0: all)")
    freeze_vision: bool = _f(False, "no gradients / optimizer state for the vision tower")
    max_bad_steps: int = _f(5, "SFT and GRPO: stop after this many non-finite steps in a row "
                               "(each one is skipped: no update)")
    optim: OptimSection = dataclasses.field(
        default_factory=lambda: OptimSection(learning_rate=1e-4, warmup_steps=5))

    def validate(self):
        self._require(self.steps >= 0, "steps", "must be >= 0")
        self._require(self.batch_size >= 1, "batch_size", "must be >= 1")
        self._require(self.micro_batch_size >= 0, "micro_batch_size", "must be >= 0")
        self._require(self.max_bad_steps >= 1, "max_bad_steps", "must be >= 1")
        if self.micro_batch_size:
            self._require(self.batch_size % self.micro_batch_size == 0, "micro_batch_size",
                          f"must divide batch_size={self.batch_size}")


@dataclasses.dataclass(frozen=True)
class SFTSection(_Validated):
    """Supervised fine-tuning on Think-Look-Answer targets built from ground truth."""

    steps: int = _f(300, "SFT steps")
    batch_size: int = _f(16, "examples per step")
    target_style: Literal["json", "compact"] = _f(
        "compact", "json: {bbox_2d, label} entries as the prompt asks; compact: bare lists")
    max_look: int = _f(2, "look boxes in a target (the hardest GT instances)")
    max_target_tokens: int = _f(
        0, "an example whose target is longer does not train (counted as long_targets, "
        "its image id logged): bounds the step's shape; 0: no cap")
    freeze_vision: bool = _f(False, "no gradients / optimizer state for the vision tower")
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)

    def validate(self):
        self._require(self.steps >= 0, "steps", "must be >= 0")
        self._require(self.batch_size >= 1, "batch_size", "must be >= 1")
        self._require(self.max_look >= 0, "max_look", "must be >= 0")
        self._require(self.max_target_tokens >= 0, "max_target_tokens", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class EvalSection(_Validated):
    """Greedy evaluation on the held-out split."""

    every: int = _f(0, "evaluate every N training steps (0: only before and after)")
    batch_size: int = _f(16, "prompts per evaluation batch")
    num_images: int = _f(0, "held-out images used (0: the whole split)")
    max_new_tokens: int = _f(0, "decode budget (0: rollout.max_new_tokens)")
    num_draw: int = _f(4, "images drawn into report/ per evaluation")
    ood: str = _f("", "out-of-domain sets evaluated wherever the held-out split is evaluated "
                      "before and after training: comma-separated name[@category]:root:split "
                      "entries (readers of data.name; category: the object named in the prompt, "
                      "default data.category), e.g. citypersons:/data/citypersons:val,"
                      "uavdt@vehicle:/data/uavdt:test; logged as <eval name>/<name>")

    def validate(self):
        for name in ("every", "num_images", "max_new_tokens", "num_draw"):
            self._require(getattr(self, name) >= 0, name, "must be >= 0")
        self._require(self.batch_size >= 1, "batch_size", "must be >= 1")
        try:
            parse_ood(self.ood)
        except ValueError as e:
            raise ConfigError(f"EvalSection.ood: {e} (got {self.ood!r})") from None


OOD_NAMES = tuple(n for n in DATA_NAMES if n != "synthetic")


@dataclasses.dataclass(frozen=True)
class OODSet:
    """One ``eval.ood`` entry: the reader ``name``, its ``root`` and ``split``, and the
    ``category`` the prompts name ("" : ``data.category``)."""

    name: str
    root: str
    split: str
    category: str = ""


def parse_ood(text: str) -> tuple[OODSet, ...]:
    """The entries of ``eval.ood`` (``name[@category]:root:split``, comma-separated). The
    name ends at the first ``:`` and the split starts after the last one, so a root may
    hold ``:`` (``gs://...``) but no ``,``. Raises ValueError naming the bad entry."""
    out, seen = [], set()
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        head, _, rest = entry.partition(":")
        root, _, split = rest.rpartition(":")
        name, _, category = head.partition("@")
        if not (name and root.strip() and split):
            raise ValueError(f"entry {entry!r} is not name[@category]:root:split")
        if name not in OOD_NAMES:
            raise ValueError(f"entry {entry!r}: {name!r} is not one of {', '.join(OOD_NAMES)}")
        if "@" in head and not category:
            raise ValueError(f"entry {entry!r}: empty category after '@'")
        if name in seen:
            raise ValueError(f"entry {entry!r}: {name!r} is listed twice (eval names must "
                             "differ)")
        seen.add(name)
        out.append(OODSet(name, root.strip(), split.strip(), category))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class LogSection(_Validated):
    every: int = _f(1, "log training metrics every N steps")
    samples_every: int = _f(10, "write completions to samples.jsonl every N steps (0: never)")
    num_samples: int = _f(4, "completions written each time")
    tensorboard: bool = _f(True, "write TensorBoard event files")
    memory_plan: bool = _f(True, "print the per-device memory plan at start-up and refuse to "
                                 "start when it exceeds the device's memory")

    def validate(self):
        self._require(self.every >= 1, "every", "must be >= 1")
        self._require(self.samples_every >= 0, "samples_every", "must be >= 0")
        self._require(self.num_samples >= 0, "num_samples", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class CheckpointSection(_Validated):
    """orbax checkpoints of the ``sft`` and ``grpo`` modes in ``WORKDIR/checkpoints/<step>/``."""

    every: int = _f(50, "save every N steps (asynchronously) and at the end (0: only at the end)")
    keep: int = _f(3, "keep the last N checkpoints")
    enabled: bool = _f(True, "write checkpoints and resume from them")
    force_resume: bool = _f(False, "resume although the workdir's config differs from this one")

    def validate(self):
        self._require(self.every >= 0, "every", "must be >= 0")
        self._require(self.keep >= 1, "keep", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class MeshSection(_Validated):
    """Device mesh (DESIGN.md section 6); -1 takes the remaining devices."""

    data: int = _f(1, "data-parallel axis size")
    fsdp: int = _f(-1, "fully-sharded axis size (-1: the rest)")
    tensor: int = _f(1, "tensor-parallel axis size")
    devices: int = _f(0, "use the first N devices (0: all)")

    def validate(self):
        self._require(self.devices >= 0, "devices", "must be >= 0")
        for name in ("data", "fsdp", "tensor"):
            v = getattr(self, name)
            self._require(v >= 1 or v == -1, name, "must be >= 1 or -1")


Mode = Literal["pipeline", "sft", "grpo", "eval", "reward-demo"]


@dataclasses.dataclass(frozen=True)
class Config(_Validated):
    mode: Mode = _f("pipeline", "pipeline (base eval -> SFT -> GRPO, compared) | sft | grpo | "
                                "eval | reward-demo")
    seed: int = _f(0, "seeds data order, init, rollouts")
    init_from: str = _f("", "grpo/eval: start from this export or HF directory "
                            "(default: model.checkpoint, else random init)")
    control: bool = _f(True, "pipeline: also continue SFT for GRPO's wall time (a control)")
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    rollout: RolloutSection = dataclasses.field(default_factory=RolloutSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    sft: SFTSection = dataclasses.field(default_factory=SFTSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    log: LogSection = dataclasses.field(default_factory=LogSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    # The default job weighs R_count on detection prompts too (DESIGN.md section 3 allows
    # it; the paper's w_count is 0): without it GRPO on the small SFT policy learns to
    # answer fewer boxes (precision-weighted R_acc) and recall falls (BUILD_NOTES).
    rewards: RewardConfig = dataclasses.field(default_factory=lambda: RewardConfig(w_count=1.0))
    # The default job anchors GRPO to the SFT policy harder than DESIGN.md's beta 0.04:
    # with 0.04 the 60 noisy updates drift the small policy (KL 0.03-0.06 per token) and
    # cost more localisation than GRPO gains (F1 down on 2 of 3 seeds); 0.5 keeps KL near
    # 0.01 and F1 rises on all 3 (BUILD_NOTES "Status"). GRPOConfig() keeps 0.04.
    grpo: GRPOConfig = dataclasses.field(default_factory=lambda: GRPOConfig(beta=0.5))
    demo: DemoConfig = dataclasses.field(default_factory=DemoConfig)


def to_dict(cfg: Any) -> dict:
    """The config as a JSON-ready nested dict (``config.json`` of a run)."""
    return dataclasses.asdict(cfg)


def leaf_fields(cfg: Any, prefix: str = "", with_help: bool = False) -> list[tuple]:
    """(dotted path, annotation, value[, help]) for every non-dataclass field, depth first."""
    out = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.extend(leaf_fields(value, path + ".", with_help))
        else:
            row = (path, hints[f.name], value)
            out.append(row + (f.metadata.get("help", ""),) if with_help else row)
    return out


def replace_paths(cfg: Any, values: dict[str, Any]) -> Any:
    """A copy of ``cfg`` with every dotted path of ``values`` set, each section replaced
    (and so validated) once with all of its new values: fields that are only valid
    together (``data.name=crowdhuman`` with ``data.root``) can be set together."""
    names = [f.name for f in dataclasses.fields(cfg)]
    groups: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if head not in names:
            raise ConfigError(f"{type(cfg).__name__} has no field {head!r} "
                              f"(fields: {', '.join(names)})")
        if rest:
            groups.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in groups.items():
        direct[head] = replace_paths(getattr(cfg, head), sub)
    return dataclasses.replace(cfg, **direct) if direct else cfg


def replace_path(cfg: Any, path: str, value: Any) -> Any:
    """A copy of ``cfg`` with the dotted ``path`` set to ``value`` (re-validated)."""
    head, _, rest = path.partition(".")
    names = [f.name for f in dataclasses.fields(cfg)]
    if head not in names:
        raise ConfigError(f"{type(cfg).__name__} has no field {head!r} (fields: {', '.join(names)})")
    if rest:
        return dataclasses.replace(cfg, **{head: replace_path(getattr(cfg, head), rest, value)})
    return dataclasses.replace(cfg, **{head: value})
