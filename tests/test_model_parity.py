"""Float32 parity of the NNX Qwen2.5-VL / Qwen2-VL port against transformers (torch CPU).

Tiny random checkpoints are created with transformers, saved, and loaded with
``load_hf``; logits, vision-tower outputs, M-RoPE position ids and greedy
next tokens are compared on several batches (window attention that really
windows, non-square images, two images of different sizes in one batch and in
one row, left and right padding, processor-made pixels, text only).
"""

import numpy as np
import pytest
import torch

import jax.numpy as jnp

import model_testutil as U
from dipr1_jax.model import load_hf, get_rope_index

TOL = 1e-4

CASES = {
    "v25_tied_window": dict(kind="qwen2_5_vl", tie=True, window=56, fullatt=(1,)),
    "v25_untied_3blocks": dict(kind="qwen2_5_vl", tie=False, window=56, fullatt=(0,), depth=3),
    "v2_untied": dict(kind="qwen2_vl", tie=False),
    "v2_tied": dict(kind="qwen2_vl", tie=True),
}


def _batch_two_sizes_left():
    return U.build_batch([(1, 8, 12), (1, 6, 4)], [[3, 5], [2, 4]], padding="left", seed=1)


def _batch_two_in_one_row_right():
    return U.build_batch([(1, 4, 6), (1, 10, 4), (1, 6, 6)], [[2, 3, 4], [5, 1]],
                         padding="right", seed=2, images_per_row=[2, 1])


def _batch_processor():
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil
    rng = np.random.default_rng(3)
    proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 168)
    ims = [Image.fromarray(rng.integers(0, 255, (100, 150, 3), dtype=np.uint8)),
           Image.fromarray(rng.integers(0, 255, (90, 60, 3), dtype=np.uint8))]
    out = proc(images=ims, return_tensors="np")
    grid = out["image_grid_thw"]
    ids, mask, _, _ = U.build_batch([tuple(g) for g in grid], [[4, 6], [1, 2]],
                                    padding="left", seed=3)
    return ids, mask, out["pixel_values"].astype(np.float32), grid


BATCHES = {
    "two_sizes_left": _batch_two_sizes_left,
    "two_in_one_row_right": _batch_two_in_one_row_right,
    "processor": _batch_processor,
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, transformers model, JAX model loaded from its saved checkpoint)."""
    kw = dict(CASES[request.param])
    kind = kw.pop("kind")
    hf = U.hf_model(U.hf_config(kind, **kw), seed=len(request.param))
    path = U.save_checkpoint(hf, str(tmp_path_factory.mktemp(request.param)))
    return request.param, hf, load_hf(path), path


def _pad_patches(batch):
    """The same batch with patches padded to a static bucket and an all-zero image row."""
    ids, mask, pix, grid = batch
    pix = np.concatenate([pix, np.ones((36, pix.shape[1]), np.float32)])
    grid = np.concatenate([grid, np.zeros((1, 3), grid.dtype)])
    return ids, mask, pix, grid


BATCHES["two_sizes_left_padded_patches"] = lambda: _pad_patches(_batch_two_sizes_left())


# Every config runs the two hand-built batches; the processor-made and the padded-patch
# variants run on the windowed Qwen2.5-VL config and the untied Qwen2-VL one (CPU compile
# time is the budget).
PAIRS = [(c, b) for c in CASES for b in BATCHES
         if c in ("v25_tied_window", "v2_untied") or b in ("two_sizes_left", "two_in_one_row_right")]


@pytest.mark.parametrize("case,batch", PAIRS, indirect=["case"])
def test_logits_and_vision_match_transformers(case, batch):
    name, hf, model, _ = case
    ids, mask, pix, grid = BATCHES[batch]()
    n_real = int((grid.prod(-1)).sum())
    ref = U.hf_forward(hf, ids, mask, pix[:n_real], grid[grid[:, 0] > 0])
    out, img, _, _ = U.jax_outputs(model, ids, mask, pix, grid)
    assert out.shape == ref.shape == ids.shape + (hf.config.text_config.vocab_size,)
    valid = mask.astype(bool)  # logits at padding positions are meaningless in both
    err = np.abs(out - ref)[valid].max()
    assert err <= TOL, f"max abs logit error {err}"
    assert (out.argmax(-1)[valid] == ref.argmax(-1)[valid]).all()
    last = np.array([np.nonzero(r)[0][-1] for r in valid])
    rows = np.arange(len(ids))
    assert (out[rows, last].argmax(-1) == ref[rows, last].argmax(-1)).all()  # greedy next token
    # vision tower on its own
    with torch.no_grad():
        vref = hf.model.visual(torch.tensor(pix[:n_real]),
                               grid_thw=torch.tensor(grid[grid[:, 0] > 0])).pooler_output.numpy()
    assert img.shape[0] * 4 == pix.shape[0] and img.shape[1] == vref.shape[1]
    assert np.abs(img[:len(vref)] - vref).max() <= TOL


@pytest.mark.parametrize("case,batch", [(c, b) for c in ("v25_tied_window", "v2_untied")
                                        for b in ("two_in_one_row_right",
                                                  "two_sizes_left_padded_patches")],
                         indirect=["case"])
def test_per_image_vision_layout_matches_transformers(case, batch):
    """vision_max_patches: patches regrouped one row per image (attention cost
    images * P^2) give the same image features and logits."""
    _, hf, _, path = case
    model = load_hf(path, vision_max_patches=96)
    ids, mask, pix, grid = BATCHES[batch]()
    assert grid.prod(-1).max() <= 96
    n_real = int((grid.prod(-1)).sum())
    real_grid = grid[grid[:, 0] > 0]
    ref = U.hf_forward(hf, ids, mask, pix[:n_real], real_grid)
    out, img, _, _ = U.jax_outputs(model, ids, mask, pix, grid)
    assert np.abs(out - ref)[mask.astype(bool)].max() <= TOL
    with torch.no_grad():
        vref = hf.model.visual(torch.tensor(pix[:n_real]),
                               grid_thw=torch.tensor(real_grid)).pooler_output.numpy()
    assert np.abs(img[:len(vref)] - vref).max() <= TOL


def test_text_only_batch(case):
    _, hf, model, _ = case
    ids, mask, _, _ = U.build_batch([], [[7], [12]], padding="right", seed=4,
                                    images_per_row=[0, 0])
    ref = U.hf_forward(hf, ids, mask)
    out = U.jax_outputs(model, ids, mask)[0]
    valid = mask.astype(bool)
    assert np.abs(out - ref)[valid].max() <= TOL


def test_window_attention_changes_the_reference():
    """The windowed configs really window: making every block full-attention changes the
    transformers vision output, so the parity above covers the window masks."""
    kw = dict(CASES["v25_tied_window"])
    hf = U.hf_model(U.hf_config(kw.pop("kind"), **kw))
    _, _, pix, grid = _batch_two_sizes_left()
    vis = hf.model.visual
    with torch.no_grad():
        windowed = vis(torch.tensor(pix), grid_thw=torch.tensor(grid)).pooler_output.numpy()
        saved = vis.fullatt_block_indexes
        vis.fullatt_block_indexes = list(range(len(vis.blocks)))
        try:
            full = vis(torch.tensor(pix), grid_thw=torch.tensor(grid)).pooler_output.numpy()
        finally:
            vis.fullatt_block_indexes = saved
    assert np.abs(windowed - full).max() > 1e-3


_rope = U._jit(lambda i, m, g: get_rope_index(i, m, g, image_token_id=U.IMG,
                                               spatial_merge_size=2))


def _hf_rope(hf, ids, mask, grid):
    pos, deltas = hf.model.get_rope_index(
        torch.tensor(ids), torch.tensor((ids == U.IMG).astype(np.int64)),
        image_grid_thw=None if grid is None else torch.tensor(grid),
        attention_mask=torch.tensor(mask))
    return pos.numpy(), deltas.numpy().reshape(-1)


@pytest.mark.parametrize("batch", ["two_sizes_left", "two_in_one_row_right", "mixed"])
def test_rope_index_matches_transformers(case, batch):
    _, hf, _, _ = case
    if batch == "mixed":  # a row without images between rows with images, left padding
        ids, mask, _, grid = U.build_batch([(1, 6, 10), (1, 4, 4)], [[3, 2], [9], [1, 1]],
                                           padding="left", seed=5, images_per_row=[1, 0, 1])
    else:
        ids, mask, _, grid = BATCHES[batch]()
    ref_pos, ref_d = _hf_rope(hf, ids, mask, grid)
    pos, d = _rope(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(grid))
    np.testing.assert_array_equal(np.asarray(pos), ref_pos)
    np.testing.assert_array_equal(np.asarray(d), ref_d)
