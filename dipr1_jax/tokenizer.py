"""The project's tokenizer: one loader for the shipped tiny tokenizer and real checkpoints.

    tok = load_tokenizer()                    # the shipped tiny BPE (dipr1_jax/assets/)
    tok = load_tokenizer("/ckpt/Qwen2.5-VL")  # a Hugging Face checkpoint directory

Both go through the same code: ``tokenizer.json`` is read with the Hugging Face
``tokenizers`` library (the Rust core that transformers' fast tokenizers wrap)
and the chat template is rendered with jinja2 in the sandboxed environment that
transformers' ``apply_chat_template`` uses (``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``, a ``tojson`` filter that does not escape HTML,
``raise_exception``, ``strftime_now``). transformers is an optional extra
(``hf``); this module does not need it, so the default job, the tests and a
real run tokenise identically whether or not it is installed. The shipped
folder is also a valid ``AutoTokenizer`` directory and ``tests/test_tokenizer.py``
checks ids, decoding and the rendered template against ``AutoTokenizer``.

Chat template lookup order in a directory: ``chat_template.jinja``, then the
``chat_template`` field of ``tokenizer_config.json`` (a string, or a list of
``{"name", "template"}`` entries from which ``default`` is used), then
``chat_template.json`` (the processor file of Qwen2-VL checkpoints).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import tokenizers

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
_REQUIRED = (IM_START, IM_END, END_OF_TEXT, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _find_chat_template(directory: str, config: dict) -> str | None:
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    json_path = os.path.join(directory, "chat_template.json")
    if os.path.isfile(json_path):
        template = _read_json(json_path).get("chat_template")
        if isinstance(template, str):
            return template
    return None


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is a dependency
        raise ImportError("apply_chat_template needs jinja2 (pip install jinja2)") from e

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """A loaded tokenizer: ``tokenizers.Tokenizer`` plus the chat template and token roles."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None,
        eos_token: str,
        pad_token: str,
        bos_token: str | None = None,
        source: str = "<memory>",
    ):
        self.backend = backend
        self.chat_template = chat_template
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        ids = {}
        for name in _REQUIRED + (eos_token, pad_token):
            i = backend.token_to_id(name)
            if i is None:
                raise ValueError(f"{source}: tokenizer has no token {name!r}")
            ids[name] = i
        self.eos_token_id: int = ids[eos_token]
        self.pad_token_id: int = ids[pad_token]
        self.im_start_token_id: int = ids[IM_START]
        self.im_end_token_id: int = ids[IM_END]
        self.image_token_id: int = ids[IMAGE_PAD]
        self.video_token_id: int = ids[VIDEO_PAD]
        self.vision_start_token_id: int = ids[VISION_START]
        self.vision_end_token_id: int = ids[VISION_END]
        # Number of ids the tokenizer can produce (regular + added). A model's
        # embedding may be larger (padded), never smaller.
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"

    # -- text <-> ids -------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in the text map to their ids,
        nothing is added around it."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    @staticmethod
    def _as_ids(ids: Iterable[int]) -> list[int]:
        if hasattr(ids, "tolist"):  # numpy / jax arrays
            ids = ids.tolist()
        out = [int(i) for i in ids]
        bad = [i for i in out if i < 0]
        if bad:
            raise ValueError(f"negative token id {bad[0]} (strip padding before decoding)")
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Ids outside the tokenizer's vocabulary (e.g. a padded
        embedding's spare rows) decode to nothing; invalid UTF-8 becomes U+FFFD."""
        return self.backend.decode(self._as_ids(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False
    ) -> list[str]:
        seqs = [self._as_ids(s) for s in sequences]
        return self.backend.decode_batch(seqs, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    # -- chat -----------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` (``{"role", "content"}``; content a string or a list of
        ``{"type": "text", "text": ...}`` / ``{"type": "image"}`` items) to prompt text."""
        if self.chat_template is None:
            raise ValueError(
                f"{self.source}: no chat template (looked for chat_template.jinja, "
                f"the chat_template field of {CONFIG_FILE}, chat_template.json)"
            )
        context = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": None,
        }
        context.update(kwargs)
        return _compile_template(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **context
        )


def _load_dir(directory: str) -> Tokenizer:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory {directory!r} does not exist")
    tok_path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(tok_path):
        present = sorted(os.listdir(directory))
        hint = ""
        if "vocab.json" in present and "merges.txt" in present:
            hint = (
                " (it has vocab.json/merges.txt only: save a tokenizer.json with "
                "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
            )
        raise FileNotFoundError(
            f"{directory!r} has no {TOKENIZER_FILE}{hint}; files there: {present[:20]}"
        )
    try:
        backend = tokenizers.Tokenizer.from_file(tok_path)
    except Exception as e:  # the Rust error names no file
        raise ValueError(f"{tok_path}: cannot load tokenizer: {e}") from None
    cfg_path = os.path.join(directory, CONFIG_FILE)
    config = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    eos = _token_str(config.get("eos_token")) or IM_END
    pad = _token_str(config.get("pad_token")) or END_OF_TEXT
    return Tokenizer(
        backend,
        chat_template=_find_chat_template(directory, config),
        eos_token=eos,
        pad_token=pad,
        bos_token=_token_str(config.get("bos_token")),
        source=directory,
    )


@functools.lru_cache(maxsize=1)
def _shipped() -> Tokenizer:
    return _load_dir(ASSETS_DIR)


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Load the shipped tiny tokenizer (``path=None``) or a checkpoint directory's.

    ``path`` may also name the ``tokenizer.json`` file itself. The shipped
    tokenizer is loaded once per process and shared.
    """
    if path is None:
        return _shipped()
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.basename(path) == TOKENIZER_FILE:
        path = os.path.dirname(path)
    return _load_dir(path)
