"""Window-blocked attention of the Qwen2.5-VL vision tower (``window_impl="blocked"``).

The windowed blocks gather patches into static window slots and attend per slot. Checked
here: the slot layout against a numpy transcription of transformers' window tiling (every
window lands whole in one slot, alone with its own patches), the static slot counts against
brute force, the blocked tower against the dense masked one (``window_impl="masked"``) in
both layouts, forward and gradients, sharded per-image rows, and transformers' vision tower
with 4x4-unit windows (the real 112 px window) on grids that are not multiples of it.
"""

import dataclasses

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import nnx

import model_testutil as U
from dipr1_jax import sharding as S
from dipr1_jax.model import VisionTower, load_hf, preset
from dipr1_jax.model import vision as V

MERGE = 2


def _cfg(window: int, depth: int = 2, fullatt=(1,), max_patches: int = 0):
    cfg = preset("tiny")
    vis = dataclasses.replace(cfg.vision, window_size=window, depth=depth,
                              fullatt_block_indexes=tuple(fullatt))
    return dataclasses.replace(cfg, vision=vis, vision_max_patches=max_patches)


def _reference_windows(grids, win):
    """transformers' windows as sets of flat patch indices: each frame's merged grid is
    tiled by ``win x win`` windows from the top left; patches come image by image, frame by
    frame, 2x2 merge blocks in raster order (numpy transcription of get_window_index)."""
    windows, start = [], 0
    for t, h, w in grids:
        hb, wb = h // MERGE, w // MERGE
        for f in range(t):
            by_win = {}
            for blk in range(hb * wb):
                key = ((blk // wb) // win, (blk % wb) // win)
                first = start + (f * hb * wb + blk) * MERGE ** 2
                by_win.setdefault(key, set()).update(range(first, first + MERGE ** 2))
            windows += [frozenset(s) for s in by_win.values()]
        start += t * h * w
    return windows


def _slot_windows(tower, grids, num_patches):
    """The windows as the slot layout groups them: sets of flat patch indices sharing a
    slot and an owner; also returns the Windows and the layout."""
    grid = jnp.asarray(np.asarray(grids, np.int32).reshape(-1, 3))
    lay = tower._layout(grid, num_patches)
    win = tower.windows(grid, num_patches, lay)
    gather, scatter, mask, valid = (np.asarray(a) for a in win)
    index = np.asarray(lay["index"])
    W = mask.shape[-1]
    groups = {}
    for g, p in zip(*np.nonzero(valid)):
        d = scatter[g, p]
        assert gather[g, d] == p, "gather is not the inverse of scatter"
        slot = g * (gather.shape[1] // W) + d // W
        # the patches this one attends to: same slot, mask row
        peers = np.nonzero(mask[slot, 0, d % W])[0] + (d // W) * W
        groups.setdefault((g, d // W, min(peers)), set()).add(int(index[g, p]))
        assert mask[slot, 0, d % W, d % W]
    n_valid = int(valid.sum())
    assert len(set(zip(*np.nonzero(valid)))) == n_valid
    assert len({(g, scatter[g, p]) for g, p in zip(*np.nonzero(valid))}) == n_valid, \
        "two patches share a slot position"
    return [frozenset(s) for s in groups.values()], win, lay


GRID_SETS = {
    "square_multiple": [(1, 16, 16)],
    "non_multiple_two_sizes": [(1, 10, 14), (1, 6, 4)],
    "three_unit_rows": [(1, 6, 38), (1, 38, 6)],  # 3-unit bottom row / right column
    "frames_and_small": [(2, 10, 10), (1, 2, 2), (3, 6, 6)],
    "wide": [(1, 2, 62)],
}


@pytest.mark.parametrize("window", [56, 112])
@pytest.mark.parametrize("layout", ["flat", "per_image"])
@pytest.mark.parametrize("name", list(GRID_SETS))
def test_slots_hold_exactly_the_transformers_windows(window, layout, name):
    grids = GRID_SETS[name]
    win = window // 28
    sizes = [t * h * w for t, h, w in grids]
    per_image = max(sizes) + 8 if layout == "per_image" else 0
    per_image += -per_image % 4
    tower = VisionTower(_cfg(window, max_patches=per_image), nnx.Rngs(0))
    n = sum(sizes) + 16  # padding patches past the last image
    padded = grids + [(0, 0, 0)]  # and an all-zero image row
    got, win_layout, _ = _slot_windows(tower, padded, n)
    ref = _reference_windows(grids, win)
    assert sorted(map(sorted, got)) == sorted(map(sorted, ref))
    assert len(got) == len(ref)
    slots = tower.num_window_slots(n, len(padded))
    assert win_layout.mask.shape[0] == slots * (len(padded) if per_image else 1)


def _all_grids(units):
    for t in range(1, units + 1):
        for h in range(1, units // t + 1):
            for w in range(1, units // (t * h) + 1):
                yield t, h, w


def _slots_of(grids_units, win):
    """Slots used by images given as merged (t, h, w), from the layout's class counts."""
    a = np.asarray(grids_units).reshape(-1, 3)
    _, _, sl = V._window_classes(np, a[:, 0], a[:, 1], a[:, 2], win)
    return int(sum(s.sum() for s in sl))


@pytest.mark.parametrize("win", [1, 2, 3, 4])
def test_static_slot_counts_bound_every_grid(win):
    """max_image_slots is the exact maximum over all grids (brute force), and the flat
    bound covers random batches of several images."""
    for units in (1, 5, 16, 37, 64):
        worst = max(_slots_of(g, win) for g in _all_grids(units))
        assert V.max_image_slots(units, win) == worst
    rng = np.random.default_rng(win)
    for _ in range(300):
        k = int(rng.integers(2, 5))
        grids = []
        for _ in range(k):
            t = int(rng.choice([1, 1, 1, 2, 5]))
            grids.append((t, int(rng.integers(1, 12)), int(rng.integers(1, 40))))
        units = sum(t * h * w for t, h, w in grids) + int(rng.integers(0, 20))
        assert _slots_of(grids, win) <= V.window_slots(units, win, k, per_image=False)
    # no window ever is bigger than a slot, and the packing is never worse than one window
    # per slot
    for g in _all_grids(40):
        t, h, w = g
        assert _slots_of(g, win) <= t * -(-h // win) * -(-w // win)


def _tower_pair(cfg, seed=0):
    """Two towers with the same weights: blocked and masked windowed blocks."""
    a = VisionTower(cfg, nnx.Rngs(seed), window_impl="blocked")
    b = VisionTower(cfg, nnx.Rngs(seed), window_impl="masked")
    # perturb biases and norm weights so every parameter matters
    for t in (a, b):
        state = nnx.state(t, nnx.Param)
        leaves = jax.tree.leaves(state)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        new = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
        nnx.update(t, jax.tree.unflatten(jax.tree.structure(state), new))
    return a, b


def _encode(tower, pix, grid):
    graphdef, state = nnx.split(tower)
    f = U._jit(lambda s, p, g: nnx.merge(graphdef, s)(p, g))
    return np.asarray(f(state, jnp.asarray(pix), jnp.asarray(grid)))


def _inputs(grids, extra=0, zero_rows=0, seed=0):
    n = sum(t * h * w for t, h, w in grids)
    rng = np.random.default_rng(seed)
    pix = rng.standard_normal((n + extra, 1176)).astype(np.float32)
    grid = np.asarray(list(grids) + [(0, 0, 0)] * zero_rows, np.int32)
    return pix, grid, n


@pytest.mark.parametrize("window,layout,grids", [
    (112, "flat", "non_multiple_two_sizes"),
    (112, "per_image", "three_unit_rows"),
    (112, "per_image", "frames_and_small"),
    (56, "flat", "frames_and_small"),
    (56, "per_image", "square_multiple"),
])
def test_blocked_matches_masked(window, layout, grids):
    grids = GRID_SETS[grids]
    pix, grid, n = _inputs(grids, extra=12, zero_rows=1)
    per_image = 0 if layout == "flat" else max(t * h * w for t, h, w in grids)
    cfg = _cfg(window, max_patches=per_image + (-per_image % 4))
    blocked, masked = _tower_pair(cfg)
    a, b = _encode(blocked, pix, grid), _encode(masked, pix, grid)
    real = n // 4
    assert np.abs(a[:real]).max() > 0.05
    assert np.abs(a[:real] - b[:real]).max() <= 1e-5
    # windowing is active: all-full-attention blocks give something else
    full_cfg = dataclasses.replace(cfg, vision=dataclasses.replace(
        cfg.vision, fullatt_block_indexes=(0, 1)))
    full = _encode(_tower_pair(full_cfg)[1], pix, grid)
    assert np.abs(a[:real] - full[:real]).max() > 1e-3


def test_blocked_gradients_match_masked():
    """Backward through the slot gather/scatter equals the masked path's (per-image
    layout, non-multiple grids, padding rows)."""
    grids = GRID_SETS["non_multiple_two_sizes"] + [(2, 6, 10)]
    pix, grid, _ = _inputs(grids, extra=8, zero_rows=1, seed=3)
    cfg = _cfg(112, depth=3, fullatt=(2,), max_patches=144)
    blocked, masked = _tower_pair(cfg, seed=4)

    def grads(tower):
        graphdef, params, rest = nnx.split(tower, nnx.Param, ...)

        def loss(p, x, g):
            out = nnx.merge(graphdef, p, rest)(x, g)
            w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
            return jnp.sum(out * w)
        return U._jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, jnp.asarray(pix),
                                                               jnp.asarray(grid))

    (la, (ga, gxa)), (lb, (gb, gxb)) = grads(blocked), grads(masked)
    assert abs(float(la) - float(lb)) <= 1e-5 * abs(float(lb))
    flat_a, flat_b = jax.tree.leaves(ga), jax.tree.leaves(gb)
    scale = max(float(jnp.abs(x).max()) for x in flat_b)
    assert scale > 0
    assert max(float(jnp.abs(x - y).max()) for x, y in zip(flat_a, flat_b)) <= 1e-5 * scale
    assert float(jnp.abs(gxa - gxb).max()) <= 1e-5 * float(jnp.abs(gxb).max())


@pytest.fixture(scope="module")
def hf_window112(tmp_path_factory):
    """A tiny transformers Qwen2.5-VL with the real 112 px window (4x4 merge units) and
    three vision blocks (two windowed)."""
    hf = U.hf_model(U.hf_config("qwen2_5_vl", window=112, fullatt=(1,), depth=3), seed=7)
    return hf, U.save_checkpoint(hf, str(tmp_path_factory.mktemp("win112")))


def _hf_vision(hf, pix, grid, all_full=False):
    vis = hf.model.visual
    saved = vis.fullatt_block_indexes
    if all_full:
        vis.fullatt_block_indexes = list(range(len(vis.blocks)))
    try:
        with torch.no_grad():
            return vis(torch.tensor(pix), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    finally:
        vis.fullatt_block_indexes = saved


@pytest.mark.parametrize("max_patches", [0, 256])
def test_blocked_matches_transformers_with_real_window(hf_window112, max_patches):
    hf, path = hf_window112
    model = load_hf(path, vision_max_patches=max_patches)
    assert model.visual.window_impl == "blocked"
    grids = [(1, 10, 22), (1, 6, 4), (2, 10, 10), (1, 16, 16)]  # 5x11 units: edge windows
    pix, grid, n = _inputs(grids, extra=20, zero_rows=1, seed=5)
    ref = _hf_vision(hf, pix[:n], grid[:len(grids)])
    img = _encode(model.visual, pix, grid)
    assert img.shape == (pix.shape[0] // 4, ref.shape[1])
    assert np.abs(img[:len(ref)] - ref).max() <= 1e-4
    full = _hf_vision(hf, pix[:n], grid[:len(grids)], all_full=True)
    assert np.abs(full - ref).max() > 1e-3  # the windows change the reference


def test_sharded_per_image_rows_match_unsharded(hf_window112):
    """Per-image rows split over (data, fsdp) on the 2x2x2 CPU mesh give the same features."""
    _, path = hf_window112
    mesh = S.make_mesh(data=2, fsdp=2, tensor=2)
    grids = [(1, 10, 22), (1, 6, 4), (1, 8, 8), (1, 12, 6)]  # 4 rows: divisible by 4
    pix, grid, n = _inputs(grids, extra=0, seed=6)
    plain = _encode(load_hf(path, vision_max_patches=224).visual, pix, grid)
    model = load_hf(path, mesh=mesh, vision_max_patches=224)
    with jax.set_mesh(mesh):
        out = _encode(model.visual, pix, grid)
    assert np.abs(out - plain).max() <= 1e-5
    assert np.abs(plain).max() > 0.05


def test_window_impl_is_validated():
    with pytest.raises(ValueError, match="window_impl"):
        VisionTower(_cfg(56), nnx.Rngs(0), window_impl="dense")


def test_full_only_configs_do_not_build_windows():
    """Qwen2-VL (window_size 0) and all-full Qwen2.5-VL keep the dense masks only."""
    for cfg in (_cfg(0, fullatt=()), _cfg(56, fullatt=(0, 1))):
        tower = VisionTower(cfg, nnx.Rngs(0))
        full, windowed, _ = tower.attention_masks(jnp.asarray([[1, 4, 4]]), 16)
        assert not isinstance(windowed, V.Windows)
        assert windowed.shape == full.shape == (1, 16, 16)
    full, windowed, _ = VisionTower(_cfg(56), nnx.Rngs(0)).attention_masks(
        jnp.asarray([[1, 4, 4]]), 16)
    assert isinstance(windowed, V.Windows)

