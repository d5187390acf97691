"""Where the policy comes from and where it goes: HF checkpoint or random init; HF export.

``load_policy(cfg, mesh, path)`` returns ``(model, tokenizer, source)``:

* ``path`` (``--config.init_from``, or ``--config.model.checkpoint``) names a
  Hugging Face Qwen2.5-VL / Qwen2-VL directory (``config.json``, safetensors,
  ``tokenizer.json``, chat template) -- an export of this project is one. The
  weights are loaded straight into sharded arrays and the tokenizer comes
  from the same directory (the shipped tokenizer when the directory has none
  and the model uses its ids).
* Empty: random init of ``--config.model.preset`` with the shipped tokenizer
  (the ``tiny`` / ``small`` / ``bench-100m`` presets share its ids).

``export_policy(model, tokenizer, out_dir)`` writes the policy as a Hugging
Face directory (config.json + safetensors + tokenizer files) that
transformers loads and generates from.

Both directories may be ``gs://`` URIs (``dipr1_jax.fsio``): a remote checkpoint is
first copied to the local cache (``fsio.local_dir``), then loaded from there.
"""

from __future__ import annotations

import json
import os

from absl import logging

from dipr1_jax import fsio
from dipr1_jax.config import Config
from dipr1_jax.model import create_model, load_hf, preset, save_hf
from dipr1_jax.tokenizer import load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "preprocessor_config.json", "generation_config.json")


def _runtime(cfg: Config, vision_max_patches: int) -> dict:
    m = cfg.model
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                scan_layers=m.scan_layers, attention=m.attention,
                vision_max_patches=m.vision_max_patches or vision_max_patches)


def _check_ids(model, tokenizer, where: str) -> None:
    c = model.cfg
    pairs = [("image_token_id", tokenizer.image_token_id),
             ("vision_start_token_id", tokenizer.vision_start_token_id),
             ("vision_end_token_id", tokenizer.vision_end_token_id)]
    bad = [f"{name}: model {getattr(c, name)} vs tokenizer {tid}" for name, tid in pairs
           if getattr(c, name) != tid]
    if tokenizer.vocab_size > c.text.vocab_size:
        bad.append(f"tokenizer has {tokenizer.vocab_size} ids, model vocab {c.text.vocab_size}")
    if bad:
        raise ValueError(f"{where}: model and tokenizer disagree: " + "; ".join(bad))


def load_policy(cfg: Config, mesh=None, path: str | None = None, vision_max_patches: int = 0):
    """``(model, tokenizer, description)``; see the module docstring."""
    path = cfg.model.checkpoint if path is None else path
    rt = _runtime(cfg, vision_max_patches)
    if path:
        if not fsio.isdir(path):
            raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
        if not fsio.isfile(fsio.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
        local = fsio.local_dir(path)  # itself when local; a cached copy of a gs:// directory
        model = load_hf(local, mesh=mesh, **rt)
        has_tok = os.path.isfile(os.path.join(local, "tokenizer.json"))
        tokenizer = load_tokenizer(local if has_tok else None)
        if not has_tok:
            logging.warning("%s has no tokenizer.json: using the shipped tokenizer", path)
        _check_ids(model, tokenizer, path)
        return model, tokenizer, f"checkpoint {path}"
    mcfg = preset(cfg.model.preset, **rt)
    model = create_model(mcfg, seed=cfg.seed, mesh=mesh, init=cfg.model.init)
    tokenizer = load_tokenizer(None)
    _check_ids(model, tokenizer, f"preset {cfg.model.preset}")
    return model, tokenizer, f"random init of preset {cfg.model.preset}"


def _preprocessor_config(model, min_pixels: int, max_pixels: int) -> dict:
    from dipr1_jax.data import preprocess as pp
    v = model.cfg.vision
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": ("Qwen2_5_VLProcessor" if model.cfg.model_type == "qwen2_5_vl"
                            else "Qwen2VLProcessor"),
        "min_pixels": int(min_pixels), "max_pixels": int(max_pixels),
        "size": {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)},
        "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
        "merge_size": v.spatial_merge_size,
        "image_mean": list(pp.IMAGE_MEAN), "image_std": list(pp.IMAGE_STD),
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "do_convert_rgb": True,
    }


TRAINING_FILE = "dipr1_jax_training.json"


def training_info(path: str) -> dict:
    """What the export at ``path`` was trained with (``TRAINING_FILE``; {} when absent)."""
    f = fsio.join(path, TRAINING_FILE)
    if not fsio.isfile(f):
        return {}
    try:
        info = json.loads(fsio.read_text(f))
    except (OSError, ValueError) as e:
        logging.warning("%s: unreadable (%s); ignored", f, e)
        return {}
    return info if isinstance(info, dict) else {}


def export_policy(model, tokenizer, out_dir: str, min_pixels: int = 56 * 56,
                  max_pixels: int = 28 * 28 * 1280, prompt_style: str = "") -> str:
    """Writes ``out_dir`` as a Hugging Face directory: weights, tokenizer files, and a
    ``preprocessor_config.json`` with the pipeline's resize bounds when the tokenizer's
    directory has none, so AutoTokenizer / AutoImageProcessor and the model class load it.
    ``prompt_style`` (the prompts the policy was trained on) goes to ``TRAINING_FILE``, so
    ``grpo`` / ``eval`` from this export prompt it the same way (``data.prompt_style=auto``).
    ``out_dir`` may be a ``gs://`` URI; every file is written whole (``fsio``)."""
    import jax

    fsio.makedirs(out_dir)
    save_hf(model, out_dir)
    if jax.process_index() == 0:
        src = tokenizer.source  # a local directory (a remote one was copied before loading)
        same = not fsio.is_remote(out_dir) and os.path.abspath(src) == os.path.abspath(out_dir)
        for name in TOKENIZER_FILES:
            f = os.path.join(src, name)
            if os.path.isfile(f) and not same:
                fsio.copy(f, fsio.join(out_dir, name))
        pre = fsio.join(out_dir, "preprocessor_config.json")
        if not fsio.isfile(pre):
            fsio.write_text(pre, json.dumps(_preprocessor_config(model, min_pixels, max_pixels),
                                            indent=2))
        if prompt_style:
            fsio.write_text(fsio.join(out_dir, TRAINING_FILE),
                            json.dumps({"prompt_style": prompt_style}, indent=2))
    return out_dir
