"""Helpers for the data tests: tiny images and a stand-in tokenizer.

``ByteTokenizer`` follows the interface of ``dipr1_jax.tokenizer.load_tokenizer``
(encode / decode / apply_chat_template / special-token ids) with the ids of
``dipr1_jax/tokens.py``: one token per UTF-8 byte for ordinary text, the
special tokens as single ids. It is used only where the shared tokenizer is
not available, and its chat template is written here from the Qwen2-VL
template text independently of the package's prompt code.
"""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image

from dipr1_jax import tokens


def write_image(path: str, width: int, height: int, seed: int = 0) -> np.ndarray:
    """Writes a random RGB image (PNG is lossless, JPEG lossy) and returns its pixels."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def write_text(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class ByteTokenizer:
    special = tokens.TINY_SPECIAL_TOKENS
    image_token_id = tokens.TINY_IMAGE_TOKEN_ID
    eos_token_id = tokens.TINY_EOS_TOKEN_ID
    pad_token_id = tokens.TINY_PAD_TOKEN_ID
    vision_start_token_id = tokens.TINY_VISION_START_TOKEN_ID
    vision_end_token_id = tokens.TINY_VISION_END_TOKEN_ID
    _split = re.compile("(" + "|".join(re.escape(t) for t in tokens.TINY_SPECIAL_TOKENS) + ")")

    def encode(self, text: str) -> list[int]:
        ids = []
        for part in self._split.split(text):
            if part in self.special:
                ids.append(self.special[part])
            else:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids) -> str:
        inv = {v: k for k, v in self.special.items()}
        out, buf = [], bytearray()
        for i in ids:
            if int(i) in inv:
                out.append(buf.decode("utf-8", "replace"))
                buf = bytearray()
                out.append(inv[int(i)])
            else:
                buf.append(int(i))
        out.append(buf.decode("utf-8", "replace"))
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt=True) -> str:
        text = ""
        for m in messages:
            content = m["content"]
            if isinstance(content, list):
                content = "".join(
                    "<|vision_start|><|image_pad|><|vision_end|>" if c["type"] == "image"
                    else c["text"] for c in content)
            text += f"<|im_start|>{m['role']}\n{content}<|im_end|>\n"
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return text


def get_tokenizer():
    """The shared tokenizer when it has landed, else the byte stand-in."""
    try:
        from dipr1_jax.tokenizer import load_tokenizer
    except ImportError:
        return ByteTokenizer()
    return load_tokenizer(None)
