"""Host-side input checks of the model (`check_inputs`): each bad input is a clear error."""

import numpy as np
import pytest

import model_testutil as mt
from dipr1_jax.model import check_inputs, preset


@pytest.fixture(scope="module")
def good():
    return mt.build_batch([(1, 8, 12), (1, 6, 4)], [[3, 5], [2, 4]], padding="left", seed=1)


def test_consistent_inputs_pass(good):
    ids, mask, pv, grid = good
    check_inputs(preset("tiny"), ids, pv, grid)
    check_inputs(preset("tiny", vision_max_patches=96), ids, pv, grid)  # largest image: 96


@pytest.mark.parametrize("case, match", [
    ("no_pixels", "no pixel_values"),
    ("grid_shape", r"\[num_images, 3\]"),
    ("few_patches", "pixel_values has only"),
    ("token_count", "image tokens but image_grid_thw describes"),
    ("too_big", "image 0 has 96 patches"),
])
def test_bad_inputs_name_the_problem(good, case, match):
    ids, mask, pv, grid = good
    cfg = preset("tiny")
    if case == "no_pixels":
        pv = grid = None
    elif case == "grid_shape":
        grid = grid[:, :2]
    elif case == "few_patches":
        pv = pv[:-4]
    elif case == "token_count":
        ids = ids.copy()
        ids[0, np.nonzero(ids[0] == mt.IMG)[0][0]] = 5
    elif case == "too_big":
        cfg = preset("tiny", vision_max_patches=64)
    with pytest.raises(ValueError, match=match):
        check_inputs(cfg, ids, pv, grid)


def test_eager_model_call_checks_its_inputs(good):
    """The public ``model(...)`` call, made eagerly, refuses an image larger than the
    per-image layout instead of cutting it."""
    from dipr1_jax.model import create_model
    ids, mask, pv, grid = good
    model = create_model(preset("tiny", vision_max_patches=64), seed=0)
    with pytest.raises(ValueError, match="vision_max_patches is 64"):
        model(ids, mask, pv, grid)
