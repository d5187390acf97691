"""Typed, validated configuration.

Every config is a frozen dataclass validated in ``__post_init__`` (types and
ranges), so a bad value fails at construction with a message that names the
field. ``Config`` is the root; experiment files in ``configs/`` define
``get_config() -> Config``. ``flags.py`` turns every leaf field into an absl
flag ``--config.<section>.<field>`` for sweeps.

Frozen dataclasses are hashable, so a config can be a static argument of
``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a help text (shown by ``--help``)."""
    return dataclasses.field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field."""


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
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
    return True


def _describe(annotation: Any) -> str:
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
            if ann is float and isinstance(value, int) and not isinstance(value, bool):
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


@dataclasses.dataclass(frozen=True)
class Config(_Validated):
    mode: Literal["reward-demo"] = _f("reward-demo", "what launch runs")
    rewards: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    demo: DemoConfig = dataclasses.field(default_factory=DemoConfig)


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


def replace_path(cfg: Any, path: str, value: Any) -> Any:
    """A copy of ``cfg`` with the dotted ``path`` set to ``value`` (re-validated)."""
    head, _, rest = path.partition(".")
    names = [f.name for f in dataclasses.fields(cfg)]
    if head not in names:
        raise ConfigError(f"{type(cfg).__name__} has no field {head!r} (fields: {', '.join(names)})")
    if rest:
        return dataclasses.replace(cfg, **{head: replace_path(getattr(cfg, head), rest, value)})
    return dataclasses.replace(cfg, **{head: value})
