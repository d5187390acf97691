"""Host-side training batches: prompts joined with their completions (numpy).

A *train batch* is a dict of numpy arrays, the input of the jitted steps:

==================  ===================  =============================================
key                 shape                meaning
==================  ===================  =============================================
input_ids           [B, Tp] int32        left-padded prompts (pipeline layout)
attention_mask      [B, Tp] int32        1 on prompt tokens; a batch-padding row gets
                                         its last slot only (keeps the forward finite)
pixel_values        [P, patch_dim]       the prompts' images, concatenated in row order
image_grid_thw      [B, 3] int32         (0, 0, 0) for padding rows
completion          [B, G, Tc] int32     sampled tokens or SFT targets, pad after the end
completion_mask     [B, G, Tc] float32   1 up to and including the stop token; 0 for
                                         rows that do not train (padding, dropped groups)
advantages          [B, G] float32       GRPO only (0 where the row does not train)
old_logp, ref_logp  [B, G, Tc] float32   GRPO only, when mu > 1 / beta > 0
==================  ===================  =============================================

The same prompt tokens, completion tokens and M-RoPE positions are what the
sampler used (see :mod:`dipr1_jax.train.forward`). :func:`joined_rows` builds
the equivalent per-completion layout (each of the ``B * G`` rows carries its
own copy of the prompt and image), the form public trainers use; tests use it
as the reference for the vision-once forward.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PROMPT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def prompt_part(batch: dict) -> dict:
    """The prompt arrays of a pipeline batch, padding rows made safe for the forward."""
    mask = np.asarray(batch["attention_mask"], np.int32).copy()
    empty = ~mask.any(axis=1)
    mask[empty, -1] = 1
    return {"input_ids": np.asarray(batch["input_ids"], np.int32), "attention_mask": mask,
            "pixel_values": np.asarray(batch["pixel_values"], np.float32),
            "image_grid_thw": np.asarray(batch["image_grid_thw"], np.int32)}


def completion_mask(lengths: np.ndarray, width: int, keep: np.ndarray | None = None) -> np.ndarray:
    """float32 ``[..., width]``: 1 for the first ``lengths`` tokens of rows where ``keep``."""
    m = (np.arange(width) < np.asarray(lengths)[..., None]).astype(np.float32)
    if keep is not None:
        m *= np.asarray(keep, np.float32)[..., None]
    return m


def rollout_batch(batch: dict, tokens: np.ndarray, lengths: np.ndarray, advantages: np.ndarray,
                  keep: np.ndarray) -> dict:
    """A GRPO train batch from a pipeline batch and the sampler's ``[B, G, Tc]`` output.

    ``keep [B, G]``: rows that train (valid prompts of groups not dropped)."""
    out = prompt_part(batch)
    keep = np.asarray(keep, bool)
    out["completion"] = np.asarray(tokens, np.int32)
    out["completion_mask"] = completion_mask(lengths, tokens.shape[-1], keep)
    out["advantages"] = np.where(keep, np.asarray(advantages, np.float32), 0.0).astype(np.float32)
    return out


def sft_batch(batch: dict, targets: Sequence[np.ndarray], pad_id: int, bucket: int = 16) -> dict:
    """A G = 1 train batch whose completions are the target ids (EOS included).

    ``targets[b]`` is empty for padding rows. The target width is padded up to a
    multiple of ``bucket`` (bounded compilations)."""
    B = len(targets)
    width = _round_up(max((len(t) for t in targets), default=1), bucket)
    comp = np.full((B, 1, width), pad_id, np.int32)
    lengths = np.zeros((B, 1), np.int32)
    for b, t in enumerate(targets):
        comp[b, 0, :len(t)] = t
        lengths[b, 0] = len(t)
    out = prompt_part(batch)
    out["completion"] = comp
    out["completion_mask"] = completion_mask(lengths, width)
    return out


def image_rows(grid: np.ndarray) -> np.ndarray:
    """Start offsets ``[B + 1]`` of each row's patches in ``pixel_values``."""
    return np.concatenate([[0], np.cumsum(np.asarray(grid).prod(-1))]).astype(np.int64)


def split_micro_batches(tb: dict, num: int, patch_bucket: int = 64) -> dict:
    """Stacks ``num`` micro-batches of whole prompts (groups are never split) on a new
    leading axis. ``pixel_values`` rows are split by image and padded to one size."""
    B = tb["input_ids"].shape[0]
    if B % num:
        raise ValueError(f"split_micro_batches: {B} prompts do not split into {num} micro-batches")
    mb = B // num
    offs = image_rows(tb["image_grid_thw"])
    spans = [(offs[i * mb], offs[(i + 1) * mb]) for i in range(num)]
    width = _round_up(max(e - s for s, e in spans), patch_bucket)
    pv = np.zeros((num, width) + tb["pixel_values"].shape[1:], tb["pixel_values"].dtype)
    for i, (s, e) in enumerate(spans):
        pv[i, :e - s] = tb["pixel_values"][s:e]
    out = {"pixel_values": pv}
    for key, value in tb.items():
        if key != "pixel_values":
            value = np.asarray(value)
            out[key] = value.reshape((num, mb) + value.shape[1:])
    return out


def joined_rows(tb: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-completion layout of a train batch: ``(ids [B*G, Tp+Tc], mask, pixel_values,
    image_grid_thw [B*G, 3])``, every row with its own copy of its prompt and image."""
    ids, mask = tb["input_ids"], tb["attention_mask"]
    comp, cmask = tb["completion"], tb["completion_mask"]
    B, G, Tc = comp.shape
    full = np.concatenate([np.repeat(ids, G, 0), comp.reshape(B * G, Tc)], 1)
    full_mask = np.concatenate([np.repeat(mask, G, 0), cmask.reshape(B * G, Tc).astype(mask.dtype)], 1)
    offs = image_rows(tb["image_grid_thw"])
    pv = np.concatenate([tb["pixel_values"][offs[b]:offs[b + 1]] for b in range(B) for _ in range(G)])
    grid = np.repeat(tb["image_grid_thw"], G, 0)
    return full.astype(np.int32), full_mask.astype(np.int32), pv, grid
