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


# ---------------------------------------------------------------- image features under jit

@pytest.fixture(scope="module")
def tiny_model():
    from dipr1_jax.model import create_model
    return create_model(preset("tiny"), seed=0)


def test_too_few_image_embedding_rows_raise_eagerly_and_give_nan_under_jit(good, tiny_model):
    """The image-pad tokens of the batch (24 + 6 = 30) outnumber the embedding rows
    given: eagerly, embed raises naming both counts; under jit (no host callback, so the
    program stays cacheable) the tokens without a row get NaN, never another image's
    rows, and the rows that exist are used in order."""
    import jax
    import jax.numpy as jnp
    ids, _, _, _ = good
    n_tok = int((ids == mt.IMG).sum())
    assert n_tok == 30
    hidden = tiny_model.cfg.text.hidden_size
    few = jax.random.normal(jax.random.key(1), (n_tok - 4, hidden))
    with pytest.raises(ValueError, match=f"hold {n_tok} image tokens but only {n_tok - 4} "
                                         "image-embedding rows"):
        tiny_model.embed(jnp.asarray(ids), few)
    embed = jax.jit(lambda i, img: tiny_model.embed(i, img))
    got = np.asarray(embed(jnp.asarray(ids), few))[ids == mt.IMG]
    np.testing.assert_array_equal(got[:n_tok - 4], np.asarray(few, got.dtype))
    assert np.isnan(got[n_tok - 4:]).all()
    assert "callback" not in str(jax.make_jaxpr(lambda i, img: tiny_model.embed(i, img))(
        jnp.asarray(ids), few))
    # More rows than tokens is legitimate (patch counts padded to buckets): the extra
    # rows are unused, the token rows take the leading embedding rows in order.
    img = jax.random.normal(jax.random.key(0), (n_tok + 8, hidden))
    out = np.asarray(embed(jnp.asarray(ids), img))
    np.testing.assert_array_equal(out[ids == mt.IMG], np.asarray(img[:n_tok], out.dtype))
    exact = np.asarray(embed(jnp.asarray(ids), img[:n_tok]))
    np.testing.assert_array_equal(out, exact)


def test_decode_path_embed_has_no_check(tiny_model):
    """embed without images (the sampler's decode loop) traces no image scatter (its
    cumsum over image tokens) and nothing of the check; with images it does."""
    import jax
    import jax.numpy as jnp
    jaxpr = str(jax.make_jaxpr(lambda i: tiny_model.embed(i))(jnp.zeros((4, 1), jnp.int32)))
    assert "callback" not in jaxpr and "cond" not in jaxpr and "cumsum" not in jaxpr
    with_img = str(jax.make_jaxpr(lambda i, e: tiny_model.embed(i, e))(
        jnp.zeros((4, 3), jnp.int32), jnp.zeros((2, tiny_model.cfg.text.hidden_size))))
    assert "cumsum" in with_img  # (the check above is not vacuous)


def test_image_embeds_argument_equals_pixel_path(good, tiny_model):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from dipr1_jax.model import model_token_logprobs
    ids, mask, pv, grid = (jnp.asarray(x) for x in good)
    graphdef, state = nnx.split(tiny_model)

    @mt._jit
    def both(state, ids, mask, pv, grid):
        model = nnx.merge(graphdef, state)
        img = model.encode_images(pv, grid)
        # Extra all-zero rows, as when the patch count is padded to a bucket.
        img_padded = jnp.concatenate([img, jnp.zeros((8, img.shape[1]), img.dtype)])
        return (model.hidden_states(ids, mask, pv, grid),
                model.hidden_states(ids, mask, image_grid_thw=grid, image_embeds=img_padded),
                model_token_logprobs(model, ids, mask, pv, grid, chunk_size=16),
                model_token_logprobs(model, ids, mask, image_grid_thw=grid, image_embeds=img,
                                     chunk_size=16),
                model.hidden_states(ids, mask, image_grid_thw=grid, image_embeds=img * 0.5))

    out = both(state, ids, mask, pv, grid)
    h_pix, h_emb, lp_pix, lp_emb, h_other = (np.asarray(x) for x in out)
    np.testing.assert_array_equal(h_emb, h_pix)
    np.testing.assert_array_equal(lp_emb, lp_pix)
    assert np.isfinite(h_pix).all()
    # Other features give other states: the given features are really used.
    assert np.abs(h_other - h_pix).max() > 1e-3


def test_image_embeds_argument_errors(good, tiny_model):
    import jax.numpy as jnp
    ids, mask, pv, grid = good
    img = jnp.zeros((30, tiny_model.cfg.text.hidden_size))
    with pytest.raises(ValueError, match="not both"):
        tiny_model.hidden_states(ids, mask, pv, grid, image_embeds=img)
    with pytest.raises(ValueError, match="image_embeds given without image_grid_thw"):
        tiny_model.hidden_states(ids, mask, image_embeds=img)
    with pytest.raises(ValueError, match="image_embeds has only 29 rows"):
        tiny_model.hidden_states(ids, mask, image_grid_thw=grid, image_embeds=img[:29])
