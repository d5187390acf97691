"""Vision tower of Qwen2.5-VL / Qwen2-VL as an NNX module.

Input: the flat patch sequence the HF image processor produces,
``pixel_values [N, C * temporal_patch * patch * patch]`` (patches of all
images concatenated; may be zero-padded past the last image so that ``N`` is a
static bucket size, a multiple of ``spatial_merge_size**2``) and
``grid_thw [I, 3]`` (extra all-zero rows are padding images).

The Conv3d patch embedding is one matmul over the flattened patches. Attention
is split per image (and per frame) like ``cu_seqlens`` in transformers: the
full-attention blocks (all of Qwen2-VL's, ``fullatt_block_indexes`` of
Qwen2.5-VL) compute dense scores over the static patch sequence with a mask
("same image and frame"), so no token permutation is needed (attention inside a
segment does not depend on token order, and the 2x2 merger groups stay
contiguous). The windowed blocks of Qwen2.5-VL gather the patches into window
slots of ``W = (window_size / patch_size)**2`` patches and attend inside each
slot (``[slots, W, W]`` scores; see ``window_slots`` for the static slot
count and how the smaller edge windows are packed), then scatter the result
back to patch order. ``WINDOW_IMPL = "masked"`` (or ``VisionTower.window_impl``)
selects the old dense masked scores for the windowed blocks too (benchmarks).
With ``ModelConfig.vision_max_patches = P`` the patches are regrouped into one
row per image (``[num_images, P]``, P >= the largest image), so full attention
costs ``num_images * P^2`` instead of ``N^2`` for the whole batch; the default
(0) keeps one flat row (window slots are then shared by all images of the batch,
never mixing two windows inside one attention segment).
Output: merged image embeddings ``[N / merge**2, out_hidden_size]`` in the
order of the image tokens of the prompt.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np
import jax.numpy as jnp
from flax import nnx

from dipr1_jax.model import attention as A
from dipr1_jax.model import layers as L
from dipr1_jax.model.config import ModelConfig
from dipr1_jax.model.rope import vision_cos_sin, vision_layout
from dipr1_jax.sharding import constrain


# Attention of the windowed blocks: "blocked" (gather into window slots, [slots, W, W]
# scores) or "masked" (dense [P, P] scores with a window mask; the pre-slot implementation,
# kept for benchmarks and as a test reference). New VisionTowers copy this default into
# their ``window_impl`` attribute.
WINDOW_IMPL = "blocked"
WINDOW_IMPLS = ("blocked", "masked")


class Windows(NamedTuple):
    """Window-slot layout of patch rows ``[G, P]`` (``S`` slots of ``W`` positions per row).

    ``gather [G, S*W]``: the row position of the patch in each slot position (0 where
    the position is padding); ``scatter [G, P]``: the slot position ``slot*W + pos`` of
    each patch (0 on padding patches); ``mask [G*S, 1, W, W]``: both positions hold
    patches of the same window; ``valid [G, P]``: real patches."""

    gather: jax.Array
    scatter: jax.Array
    mask: jax.Array
    valid: jax.Array


def _window_classes(xp, t, h, w, win: int):
    """The four window classes of ``t`` frames of ``h x w`` merge units, for window side
    ``win`` (transformers' ``get_window_index`` tiles each frame from the top left):
    A full ``win x win``, B right column ``win x (w % win)``, C bottom row
    ``(h % win) x win``, D corner ``(h % win) x (w % win)``.

    All windows of a class have one size, so ``k = floor(win**2 / size)`` of them share
    a slot of ``win**2`` units. Returns per class ``(count, k, slots)`` (``xp``: numpy or
    jax.numpy; ``t, h, w``: int arrays)."""
    rf, cf, rh, rc = h // win, w // win, h % win, w % win
    w2 = win * win
    n = (t * rf * cf, t * rf * (rc > 0), t * cf * (rh > 0), t * ((rh > 0) & (rc > 0)))
    k = (0 * h + 1, w2 // (win * xp.maximum(rc, 1)),
         w2 // (win * xp.maximum(rh, 1)), w2 // xp.maximum(rh * rc, 1))
    slots = tuple(-(-ni // ki) for ni, ki in zip(n, k))
    return n, k, slots


@functools.lru_cache(maxsize=None)
def max_image_slots(units: int, win: int) -> int:
    """The largest window-slot count of one image of at most ``units`` merge units, over
    every grid ``t x h x w`` (exact: enumerates ``t`` and ``h``; for fixed ``t, h`` the count
    grows with ``w`` in steps of ``win``, so only the ``win`` largest ``w`` are tried)."""
    if units <= 0:
        return 0
    ts = np.arange(1, units + 1)
    per_t = units // ts
    t = np.repeat(ts, per_t)
    h = np.arange(len(t)) - np.repeat(np.cumsum(per_t) - per_t, per_t) + 1
    wmax = units // (t * h)
    best = 0
    for d in range(win):
        w = wmax - d
        ok = w >= 1
        _, _, sl = _window_classes(np, t[ok], h[ok], w[ok], win)
        best = max(best, int(sum(sl).max(initial=0)))
    return best


def window_slots(num_units: int, win: int, num_images: int, per_image: bool) -> int:
    """Static slot count of one attention row: exact for one image of ``num_units``
    (the per-image layout, or a flat row with one image); for a flat row of several
    images, ``num_units // fill + 3 * num_images`` where ``fill`` is the fewest units a
    full slot of a class holds (each image fills all but at most one slot of each of its
    three partial classes that well), capped at ``num_units`` (one window per unit)."""
    if per_image or num_images <= 1:
        return max(max_image_slots(num_units, win), 1)
    w2 = win * win
    sizes = [w2] + [win * r for r in range(1, win)] + [a * b for a in range(1, win)
                                                        for b in range(1, win)]
    fill = min(w2 // s * s for s in sizes)
    return max(min(num_units, num_units // fill + 3 * num_images), 1)


def window_layout(lay, grid_thw, spatial_merge_size: int, win: int, slots: int,
                  per_image: bool) -> Windows:
    """Places every patch of ``lay`` (``vision_layout``'s ids, rows ``[G, P]``) in a window
    slot: windows of class A take a slot each, those of B/C/D are packed ``k`` per slot;
    each image's slots are A, B, C, D in turn (after the previous images' in a flat
    row). A window never shares a slot with a window of another class, image or frame."""
    m = spatial_merge_size
    unit = m * m
    W = win * win * unit
    grid = jnp.asarray(grid_thw).astype(jnp.int32)
    _, k, sl = _window_classes(jnp, grid[:, 0], grid[:, 1] // m, grid[:, 2] // m, win)
    total = sl[0] + sl[1] + sl[2] + sl[3]
    base = jnp.zeros_like(total) if per_image else jnp.cumsum(total) - total
    offsets = jnp.stack([base, base + sl[0], base + sl[0] + sl[1],
                         base + sl[0] + sl[1] + sl[2]], axis=-1)  # [I, 4]
    img, f, valid = lay["image"], lay["frame"], lay["valid"]
    brow, bcol = lay["row"] // m, lay["col"] // m
    q = (lay["row"] % m) * m + lay["col"] % m
    r, c, ur, uc = brow // win, bcol // win, brow % win, bcol % win
    hb, wb = grid[img, 1] // m, grid[img, 2] // m
    rf, cf = hb // win, wb // win
    in_r, in_c = r < rf, c < cf
    cls = jnp.where(in_r, 0, 2) + jnp.where(in_c, 0, 1)
    idx = jnp.choose(cls, [(f * rf + r) * cf + c, f * rf + r, f * cf + c, f], mode="clip")
    kc = jnp.take_along_axis(jnp.stack(k, axis=-1)[img], cls[..., None], axis=-1)[..., 0]
    off = jnp.take_along_axis(offsets[img], cls[..., None], axis=-1)[..., 0]
    wc = jnp.where(in_c, win, wb % win)
    hr = jnp.where(in_r, win, hb % win)
    sub = idx % kc
    pos = sub * (hr * wc * unit) + (ur * wc + uc) * unit + q
    dest = (off + idx // kc) * W + pos
    g, p = img.shape
    dest = jnp.where(valid, dest, slots * W)  # out of range: dropped by the scatters
    rows = jnp.broadcast_to(jnp.arange(g, dtype=jnp.int32)[:, None], (g, p))
    src = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None, :], (g, p))
    gather = jnp.zeros((g, slots * W), jnp.int32).at[rows, dest].set(src, mode="drop")
    owner = jnp.full((g, slots * W), -1, jnp.int32).at[rows, dest].set(sub, mode="drop")
    owner = owner.reshape(g * slots, W)
    mask = (owner[:, :, None] == owner[:, None, :]) & (owner[:, :, None] >= 0)
    return Windows(gather=gather, scatter=jnp.where(valid, dest, 0), mask=mask[:, None],
                   valid=valid)


def window_attention(q, k, v, windows: Windows, scale: float):
    """Attention inside window slots: ``q, k, v [G, P, heads, hd]`` are gathered into
    ``[G*S, W, heads, hd]``, attend per slot, and the result goes back to patch order
    (zero on padding patches)."""
    g, p, nh, hd = q.shape
    W = windows.mask.shape[-1]
    idx = windows.gather[:, :, None, None]
    take = lambda a: jnp.take_along_axis(a, idx, axis=1).reshape(-1, W, nh, hd)
    out = jax.nn.dot_product_attention(take(q), take(k), take(v), mask=windows.mask,
                                       scale=scale)
    # clip: an image cut by a too small vision_max_patches must not turn into NaNs here
    out = jnp.take_along_axis(out.reshape(g, -1, nh, hd), windows.scatter[:, :, None, None],
                              axis=1, mode="clip")
    return jnp.where(windows.valid[:, :, None, None], out, 0).astype(q.dtype)


def _same(a):
    return a[:, :, None] == a[:, None, :]


class VisionAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        v = cfg.vision
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.qkv = L.Dense((v.hidden_size,), (3, v.num_heads, v.head_dim),
                           ("v_embed",), ("qkv", "v_heads", "head_dim"), bias=True, **kw)
        self.proj = L.Dense((v.num_heads, v.head_dim), (v.hidden_size,),
                            ("v_heads", "head_dim"), ("v_embed",), bias=True, **kw)
        self.scale = v.head_dim ** -0.5

    def __call__(self, x, cos, sin, mask):
        qkv = self.qkv(x)  # [G, P, 3, heads, hd]
        q, k, val = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        q = L.apply_rotary(q, cos, sin)
        k = L.apply_rotary(k, cos, sin)
        if isinstance(mask, Windows):
            out = window_attention(q, k, val, mask, self.scale)
        elif isinstance(mask, A.SegmentMask):  # full-attention blocks
            out = A.segment_attention(q, k, val, mask, self.scale)
        else:
            out = jax.nn.dot_product_attention(q, k, val, mask=mask[:, None], scale=self.scale)
        return self.proj(out)


class VisionBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        v = cfg.vision
        norm = lambda: L.make_norm(v.norm, v.hidden_size, 1e-6, cfg.dtype, cfg.param_dtype)
        self.norm1 = norm()
        self.norm2 = norm()
        self.attn = VisionAttention(cfg, rngs)
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        if v.gated_mlp:
            self.mlp = L.GatedMLP(v.hidden_size, v.intermediate_size, act=v.hidden_act, bias=True,
                                  axes=("v_embed", "v_mlp"), **kw)
        else:
            self.mlp = L.MLP(v.hidden_size, v.intermediate_size, act=v.hidden_act,
                             axes=("v_embed", "v_mlp"), **kw)

    def __call__(self, x, cos, sin, mask):
        """``mask``: a dense ``[G, P, P]`` mask, a ``Windows`` slot layout or the full
        blocks' ``attention.SegmentMask``."""
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        x = x + self.mlp(self.norm2(x))
        return x


class PatchMerger(nnx.Module):
    """norm -> group each m x m block into one vector -> Linear -> GELU -> Linear."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        v = cfg.vision
        self.unit = v.spatial_merge_size ** 2
        d = v.hidden_size * self.unit
        kw = dict(bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.ln_q = L.make_norm(v.norm, v.hidden_size, 1e-6, cfg.dtype, cfg.param_dtype)
        self.mlp_0 = L.Dense((d,), (d,), ("merge_in",), ("v_mlp",), **kw)
        self.mlp_2 = L.Dense((d,), (v.out_hidden_size,), ("v_mlp",), ("embed",), **kw)

    def __call__(self, x):
        x = self.ln_q(x)
        x = x.reshape(x.shape[0] // self.unit, -1)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


class VisionTower(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, window_impl: str | None = None):
        v = cfg.vision
        self.cfg = cfg
        self.window_impl = window_impl or WINDOW_IMPL
        if self.window_impl not in WINDOW_IMPLS:
            raise ValueError(f"window_impl {self.window_impl!r} is not one of {WINDOW_IMPLS}")
        self.patch_embed = L.Dense((v.patch_dim,), (v.hidden_size,), ("patch",), ("v_embed",),
                                   bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                   rngs=rngs)
        self.blocks = nnx.List([VisionBlock(cfg, rngs) for _ in range(v.depth)])
        self.merger = PatchMerger(cfg, rngs)

    def _window_merged(self) -> int:
        """Window side in merge units (0: no window attention)."""
        v = self.cfg.vision
        return v.window_size // v.spatial_merge_size // v.patch_size if v.window_size else 0

    def _layout(self, grid_thw, num_patches: int):
        v = self.cfg.vision
        return vision_layout(grid_thw, num_patches, v.spatial_merge_size, self._window_merged(),
                             per_image=self.cfg.vision_max_patches)

    def masks(self, grid_thw, num_patches: int):
        """Dense (full, window) attention masks ``[G, P, P]`` and the patch layout (``G = 1,
        P = num_patches`` in the flat layout; one row per image with
        ``vision_max_patches``). The window mask is what the ``masked`` implementation
        of the windowed blocks uses."""
        lay = self._layout(grid_thw, num_patches)
        full = self._full_mask(lay)
        window = full & _same(lay["win"]) if self._window_merged() else full
        return full, window, lay

    @staticmethod
    def _full_mask(lay):
        valid = lay["valid"][:, :, None] & lay["valid"][:, None, :]
        return _same(lay["image"]) & _same(lay["frame"]) & valid

    def num_window_slots(self, num_patches: int, num_images: int) -> int:
        """Static window-slot count per attention row (see ``window_slots``)."""
        v = self.cfg.vision
        unit = v.spatial_merge_size ** 2
        per_image = bool(self.cfg.vision_max_patches)
        units = (self.cfg.vision_max_patches if per_image else num_patches) // unit
        return window_slots(units, self._window_merged(), num_images, per_image)

    def windows(self, grid_thw, num_patches: int, lay=None) -> Windows:
        """The window-slot layout of the windowed blocks (``blocked`` implementation)."""
        lay = self._layout(grid_thw, num_patches) if lay is None else lay
        slots = self.num_window_slots(num_patches, jnp.shape(grid_thw)[0])
        return window_layout(lay, grid_thw, self.cfg.vision.spatial_merge_size,
                             self._window_merged(), slots, bool(self.cfg.vision_max_patches))

    def attention_masks(self, grid_thw, num_patches: int):
        """(full mask ``[G, P, P]``, what the windowed blocks get, layout)."""
        v = self.cfg.vision
        windowed = v.window_size and any(i not in v.fullatt_block_indexes
                                         for i in range(v.depth))
        if not windowed or self.window_impl == "masked":
            return self.masks(grid_thw, num_patches)
        lay = self._layout(grid_thw, num_patches)
        return self._full_mask(lay), self.windows(grid_thw, num_patches, lay), lay

    def _check(self, pixel_values):
        v = self.cfg.vision
        n = pixel_values.shape[0]
        unit = v.spatial_merge_size ** 2
        if n % unit:
            raise ValueError(f"pixel_values has {n} patches, not a multiple of "
                             f"spatial_merge_size**2={unit}")
        if pixel_values.shape[1] != v.patch_dim:
            raise ValueError(f"pixel_values has {pixel_values.shape[1]} values per patch, the "
                             f"vision config expects {v.patch_dim} (channels*temporal*patch^2)")

    def _blocks(self, pixel_values, grid_thw):
        """Block outputs ``[G, P, hidden]`` and the layout."""
        v = self.cfg.vision
        self._check(pixel_values)
        full, window, lay = self.attention_masks(grid_thw, pixel_values.shape[0])
        full = self._full_attention_mask(full, lay, grid_thw)
        cos, sin = vision_cos_sin(lay["row"], lay["col"], v.head_dim, v.rope_theta)
        x = jnp.take(pixel_values, lay["index"], axis=0)  # [G, P, patch_dim]
        x = self.patch_embed(x)
        axes = ("vision_images", "vision_tokens", "act_embed")
        x = constrain(x, axes)
        policy = L.remat_policy(self.cfg.remat)
        for i, blk in enumerate(self.blocks):
            mask = full if (not v.window_size or i in v.fullatt_block_indexes) else window
            if policy is None:
                x = blk(x, cos, sin, mask)
            else:
                x = L.remat_call(lambda b, h, *a: b(h, *a), policy)(blk, x, cos, sin, mask)
            x = constrain(x, axes)
        return x, lay

    def _full_attention_mask(self, full, lay, grid_thw) -> A.SegmentMask:
        """The full-attention blocks' mask for the configured attention backend (see
        ``model/attention.py``); the windowed blocks use XLA with every backend (said once)."""
        v = self.cfg.vision
        dtype, hd = L._dtype(self.cfg.dtype), v.head_dim
        windowed = v.window_size and any(i not in v.fullatt_block_indexes for i in range(v.depth))
        if windowed:
            A.choose(self.cfg.attention, "vision_window", dtype=dtype, head_dim=hd)
        if not any(i in v.fullatt_block_indexes for i in range(v.depth)) and v.window_size:
            return A.SegmentMask(full)
        multi = not self.cfg.vision_max_patches and jnp.shape(grid_thw)[0] > 1
        backend = A.choose(self.cfg.attention, "vision_flat_multi" if multi else "vision_full",
                           dtype=dtype, head_dim=hd)
        if backend == "cudnn":
            A.check_single_frame(grid_thw)
            return A.SegmentMask(full, length=jnp.sum(lay["valid"], axis=-1, dtype=jnp.int32),
                                 backend=backend)
        if backend == "splash":
            return A.SegmentMask(full, segment=A.segment_ids(lay), backend=backend)
        return A.SegmentMask(full)

    def hidden_states(self, pixel_values, grid_thw):
        """Block outputs ``[N, hidden_size]`` before the merger, in patch order (flat
        layout only; for parity checks)."""
        if self.cfg.vision_max_patches:
            raise ValueError("hidden_states needs the flat layout (vision_max_patches=0)")
        return self._blocks(pixel_values, grid_thw)[0][0]

    def __call__(self, pixel_values, grid_thw):
        """Merged image embeddings ``[N / merge**2, out_hidden_size]`` in patch order."""
        x, lay = self._blocks(pixel_values, grid_thw)
        g, p, d = x.shape
        unit = self.cfg.vision.spatial_merge_size ** 2
        merged = self.merger(x.reshape(g * p, d)).reshape(g, p // unit, -1)
        if not self.cfg.vision_max_patches:
            return merged[0]
        # per-image rows back to the flat order of the image tokens
        n_out = pixel_values.shape[0] // unit
        dest = jnp.where(lay["valid"][:, ::unit], lay["index"][:, ::unit] // unit, n_out)
        out = jnp.zeros((n_out, merged.shape[-1]), merged.dtype)
        return out.at[dest.reshape(-1)].set(merged.reshape(-1, merged.shape[-1]), mode="drop")
