"""Rotary position embeddings and position ids (all jittable, static shapes).

* ``get_rope_index``: the 3-section M-RoPE position ids of Qwen2/2.5-VL for a
  batch of token rows with images (the ``get_rope_index`` logic of
  transformers): text tokens count up by one; the tokens of an image get
  ``(start + t, start + h, start + w)`` over its merged ``t x h x w`` grid; text
  after an image resumes at ``start + max(h, w)``. Padding (``attention_mask ==
  0``, left or right) is skipped and gets position 0. ``image_grid_thw`` holds
  the grids of all images of the batch in row-major order of appearance
  (exactly what the HF processor returns); extra all-zero rows are ignored.
* ``mrope_cos_sin`` / ``vision_cos_sin``: the cos/sin tables.
* ``vision_layout``: per-patch image/frame/row/column/window ids of the
  (possibly padded) patch sequence, flat or regrouped one row per image, from
  which the vision tower builds its per-image and window attention masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mrope_cos_sin(position_ids, head_dim: int, theta: float, section):
    """cos, sin ``[B, T, head_dim]`` (float32) from ``position_ids [3, B, T]``.

    Frequency band ``i`` of the ``head_dim/2`` bands takes its position from
    section 0 (temporal), 1 (height) or 2 (width) per ``mrope_section``.
    """
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv  # [3, B, T, hd/2]
    bounds = [0]
    for n in section:
        bounds.append(bounds[-1] + n)
    freqs = jnp.concatenate([freqs[i % 3, ..., a:b] for i, (a, b) in
                             enumerate(zip(bounds[:-1], bounds[1:]))], axis=-1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def text_position_ids(attention_mask, offset=None):
    """Plain 1D positions (``cumsum(mask) - 1``, 0 on padding) broadcast to ``[3, B, T]``;
    ``offset [B]`` (the rope deltas) is added, as during decoding after a prompt."""
    m = attention_mask.astype(jnp.int32)
    pos = jnp.where(m > 0, jnp.cumsum(m, axis=1) - 1, 0)
    if offset is not None:
        pos = pos + offset[:, None]
    return jnp.broadcast_to(pos[None], (3,) + pos.shape)


def get_rope_index(input_ids, attention_mask, image_grid_thw, *, image_token_id: int,
                   spatial_merge_size: int):
    """M-RoPE ``position_ids [3, B, T]`` (int32) and ``rope_deltas [B]``.

    ``rope_deltas = max(position) + 1 - n_valid``: the offset of later
    (generated) text positions from their 1D index.
    """
    input_ids = jnp.asarray(input_ids)
    B, T = input_ids.shape
    if attention_mask is None:
        mask = jnp.ones((B, T), bool)
    else:
        mask = jnp.asarray(attention_mask).astype(bool)
    # Valid tokens first, in order (stable); positions are computed on this compact row.
    order = jnp.argsort(~mask, axis=1, stable=True)
    ids_c = jnp.take_along_axis(input_ids, order, axis=1)
    n = mask.sum(axis=1).astype(jnp.int32)
    j = jnp.arange(T, dtype=jnp.int32)[None, :]
    valid_c = j < n[:, None]
    img = (ids_c == image_token_id) & valid_c
    if image_grid_thw is None:
        img = jnp.zeros_like(img)
        grid = jnp.ones((1, 3), jnp.int32)
    else:
        grid = jnp.asarray(image_grid_thw).astype(jnp.int32)
    false_col = jnp.zeros((B, 1), bool)
    prev = jnp.concatenate([false_col, img[:, :-1]], axis=1)
    nxt = jnp.concatenate([img[:, 1:], false_col], axis=1)
    start = img & ~prev
    end = img & ~nxt
    per_row = start.sum(axis=1).astype(jnp.int32)
    row_offset = jnp.cumsum(per_row) - per_row
    g = row_offset[:, None] + jnp.cumsum(start.astype(jnp.int32), axis=1) - 1
    g = jnp.clip(g, 0, grid.shape[0] - 1)
    m = spatial_merge_size
    gh = jnp.maximum(grid[g, 1] // m, 1)
    gw = jnp.maximum(grid[g, 2] // m, 1)
    advance = jnp.maximum(grid[g, 1], grid[g, 2]) // m
    contrib = jnp.where(img, jnp.where(end, advance, 0), 1)
    contrib = jnp.where(valid_c, contrib, 0)
    base = jnp.cumsum(contrib, axis=1) - contrib  # position where this token / its image starts
    run_start = jax.lax.cummax(jnp.where(start, j, -1), axis=1)
    k = jnp.where(img, j - run_start, 0)
    ti = k // (gh * gw)
    hi = (k // gw) % gh
    wi = k % gw
    pos_c = jnp.stack([base + jnp.where(img, ti, 0), base + jnp.where(img, hi, 0),
                       base + jnp.where(img, wi, 0)])
    pos_c = jnp.where(valid_c[None], pos_c, 0)
    inv = jnp.argsort(order, axis=1)
    pos = jnp.take_along_axis(pos_c, jnp.broadcast_to(inv[None], pos_c.shape), axis=2)
    deltas = jnp.max(jnp.where(valid_c[None], pos_c, 0), axis=(0, 2)) + 1 - n
    return pos.astype(jnp.int32), deltas.astype(jnp.int32)


def vision_layout(grid_thw, num_patches: int, spatial_merge_size: int, window_merged: int,
                  per_image: int = 0):
    """Per-patch ids of the patch sequence (static shapes).

    Patches come as the HF processor emits them: image after image, frame after
    frame, ``m x m`` merge blocks in raster order, and the patches of a block in
    raster order. Two layouts:

    * ``per_image == 0``: one row ``[1, num_patches]`` over the flat sequence;
    * ``per_image == P``: one row per image, ``[num_images, P]`` (image ``g``'s
      patches first, then padding; images larger than ``P`` are cut, so ``P``
      must be at least the largest ``t*h*w``).

    Returns int32 arrays of that shape: ``index`` (flat patch index, clipped into
    range), ``image``, ``frame``, ``row``, ``col`` (patch coordinates for the 2D
    rotary), ``win`` (window id inside the frame; 0 when ``window_merged == 0``)
    and a bool ``valid`` (False on padding).
    """
    grid = jnp.asarray(grid_thw).astype(jnp.int32)
    sizes = grid[:, 0] * grid[:, 1] * grid[:, 2]
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    if per_image:
        j = jnp.arange(per_image, dtype=jnp.int32)[None, :]
        image = jnp.broadcast_to(jnp.arange(grid.shape[0], dtype=jnp.int32)[:, None],
                                 (grid.shape[0], per_image))
        i = starts[:, None] + j
        valid = j < sizes[:, None]
    else:
        i = jnp.arange(num_patches, dtype=jnp.int32)[None, :]
        image = jnp.clip(jnp.searchsorted(ends, i, side="right"), 0, grid.shape[0] - 1)
        valid = i < ends[-1]
    local = i - starts[image]
    h, w = grid[image, 1], grid[image, 2]
    hw = jnp.maximum(h * w, 1)
    frame = local // hw
    loc = local % hw
    m = spatial_merge_size
    wb = jnp.maximum(w // m, 1)
    in_col = loc % m
    in_row = (loc // m) % m
    block = loc // (m * m)
    bcol = block % wb
    brow = block // wb
    row = brow * m + in_row
    col = bcol * m + in_col
    if window_merged:
        nwin_w = (wb + window_merged - 1) // window_merged
        win = (brow // window_merged) * nwin_w + bcol // window_merged
    else:
        win = jnp.zeros_like(i)
    z = lambda a: jnp.where(valid, a, 0).astype(jnp.int32)
    index = jnp.clip(i, 0, max(num_patches - 1, 0)).astype(jnp.int32)
    return dict(index=index, image=z(image), frame=z(frame), row=z(row), col=z(col), win=z(win),
                valid=valid)


def vision_cos_sin(row, col, head_dim: int, theta: float):
    """2D rotary cos/sin ``[..., head_dim]``: the first half of the bands rotate with the
    patch row, the second with the column (the bands are repeated for both halves)."""
    spatial = head_dim // 2
    inv = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    fh = row.astype(jnp.float32)[..., None] * inv
    fw = col.astype(jnp.float32)[..., None] * inv
    f = jnp.concatenate([fh, fw], axis=-1)
    emb = jnp.concatenate([f, f], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)
