"""absl flags for configs: ``--config=configs/x.py`` plus ``--config.a.b=v``.

Every leaf field of :class:`dipr1_jax.config.Config` becomes a typed absl flag
(float, int, bool, enum for ``Literal`` fields, list for tuples), so
``--help`` lists them all with their defaults and absl rejects unknown names
and unparsable values. Range checks run when the overridden config is
rebuilt; all errors end as one line naming the flag (see ``parse_flags``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import typing
from typing import Any, Literal

from absl import flags

from dipr1_jax.config import Config, ConfigError, leaf_fields, optional_inner, replace_paths

PREFIX = "config"
_HELP_FLAGS = {"-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml"}


def define_config_flags(default: Config | None = None, flag_values=flags.FLAGS) -> None:
    """Defines ``--config`` and ``--config.<path>`` for every leaf of ``default``."""
    default = default if default is not None else Config()
    if PREFIX in flag_values:
        return
    flags.DEFINE_string(
        PREFIX, None,
        "Experiment file (e.g. configs/default.py) defining get_config() -> Config. "
        "Without it the built-in defaults are used.",
        flag_values=flag_values)
    for path, ann, value, help_text in leaf_fields(default, with_help=True):
        name = f"{PREFIX}.{path}"
        origin = typing.get_origin(ann)
        doc = help_text or path
        inner = optional_inner(ann)
        if inner is not None:
            flags.DEFINE(_OptionalParser(inner), name, value, doc + " ('none' for None)",
                         flag_values=flag_values)
        elif origin is Literal:
            flags.DEFINE_enum(name, value, [str(a) for a in typing.get_args(ann)], doc,
                              flag_values=flag_values)
        elif ann is bool:
            flags.DEFINE_bool(name, value, doc, flag_values=flag_values)
        elif ann is int:
            flags.DEFINE_integer(name, value, doc, flag_values=flag_values)
        elif ann is float:
            flags.DEFINE_float(name, value, doc, flag_values=flag_values)
        elif origin is tuple:
            flags.DEFINE_list(name, [str(v) for v in value], doc, flag_values=flag_values)
        else:
            flags.DEFINE_string(name, str(value), doc, flag_values=flag_values)


class _OptionalParser(flags.ArgumentParser):
    """Parses ``X | None`` flags: 'none' (any case) or '' is None, else an ``X``."""

    def __init__(self, inner):
        self.inner = inner
        self.syntactic_help = f"{getattr(inner, '__name__', inner)} or 'none'"

    def parse(self, argument):
        if argument is None or (isinstance(argument, str) and argument.strip().lower()
                                in ("", "none")):
            return None
        if not isinstance(argument, str):
            return argument
        try:
            if self.inner is bool:
                if argument.lower() in ("true", "1"):
                    return True
                if argument.lower() in ("false", "0"):
                    return False
                raise ValueError(argument)
            return self.inner(argument)
        except ValueError:
            raise ValueError(f"expected {self.syntactic_help}, got {argument!r}") from None

    def flag_type(self):
        return self.syntactic_help


def load_config_file(path: str) -> Config:
    """Imports ``path`` and returns its ``get_config()``; errors name the file.

    ``path:ARG`` (ml_collections style, e.g. ``configs/qwen25vl.py:3b-grpo-v4-32``) calls
    ``get_config("ARG")`` instead."""
    spec_arg = None
    if not os.path.isfile(path) and ":" in path:
        file, _, arg = path.rpartition(":")
        if os.path.isfile(file):
            path, spec_arg = file, arg
    if not os.path.isfile(path):
        raise ConfigError(f"--config={path}: no such file")
    spec = importlib.util.spec_from_file_location("_dipr1_experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ConfigError as e:
        raise ConfigError(f"--config={path}: {e}") from None
    except Exception as e:  # user code: report it, with its type
        raise ConfigError(f"--config={path}: failed to load: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config={path}: defines no get_config()")
    where = path if spec_arg is None else f"{path}:{spec_arg}"
    try:
        cfg = module.get_config() if spec_arg is None else module.get_config(spec_arg)
    except ConfigError as e:
        raise ConfigError(f"--config={where}: {e}") from None
    except TypeError as e:  # ``path:ARG`` for a get_config() that takes no argument
        if spec_arg is None:
            raise
        raise ConfigError(f"--config={where}: {e}") from None
    if not isinstance(cfg, Config):
        raise ConfigError(f"--config={where}: get_config() returned {type(cfg).__name__}, "
                          "expected dipr1_jax.config.Config")
    return cfg


def _convert(value: Any, ann: Any) -> Any:
    origin = typing.get_origin(ann)
    if origin is tuple:
        args = typing.get_args(ann)
        elem = args[0]
        return tuple(elem(v) for v in value)
    if origin is Literal:
        for a in typing.get_args(ann):
            if str(a) == value:
                return a
    return value


def config_from_flags(flag_values=flags.FLAGS) -> Config:
    """The config of ``--config`` (or the defaults) with every given override applied."""
    path = flag_values[PREFIX].value
    cfg = load_config_file(path) if path else Config()
    given: dict[str, Any] = {}
    for leaf, ann, _ in leaf_fields(cfg):
        flag = flag_values[f"{PREFIX}.{leaf}"]
        if not flag.present:
            continue
        try:
            given[leaf] = _convert(flag.value, ann)
        except (ConfigError, ValueError, TypeError) as e:
            raise ConfigError(f"--{PREFIX}.{leaf}={flag.value}: {e}") from None
    try:  # all at once: fields valid only together (data.name + data.root) may be given
        return replace_paths(cfg, given)
    except (ConfigError, ValueError, TypeError) as together:
        error = together
    # Name the flags at fault: apply the overrides section by section (a section is
    # validated as a whole), the first one that fails is reported with its flags.
    sections: dict[str, dict[str, Any]] = {}
    for leaf, value in given.items():
        sections.setdefault(leaf.rpartition(".")[0], {})[leaf] = value
    shown = lambda leaves: " ".join(  # noqa: E731
        f"--{PREFIX}.{k}={flag_values[f'{PREFIX}.{k}'].value}" for k in leaves)
    for group in sections.values():
        try:
            cfg = replace_paths(cfg, group)
        except (ConfigError, ValueError, TypeError) as e:
            raise ConfigError(f"{shown(group)}: {e}") from None
    raise ConfigError(f"{shown(given)}: {error}") from None


def parse_flags(argv: list[str], flag_values=flags.FLAGS) -> list[str]:
    """absl flags parser for ``app.run`` that reports errors on one line, exit 2."""
    try:
        return flag_values(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except SystemExit:
        # absl exits 1 after printing --help/--helpfull; asking for help is no error.
        if any(a.split("=")[0] in _HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise
