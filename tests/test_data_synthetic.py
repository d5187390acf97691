"""Synthetic crowded scenes: determinism, density, exact boxes and visibility, distractors."""

import numpy as np
import pytest

from dipr1_jax.data.synthetic import SceneConfig, SyntheticCrowds, render_scene

SMALL = dict(width=160, height=120)


def test_deterministic_per_index():
    cfg = SceneConfig(difficulty="medium", **SMALL)
    a, b, c = render_scene(5, 1, cfg), render_scene(5, 1, cfg), render_scene(6, 1, cfg)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(render_scene(5, 2, cfg).image, a.image)
    ds = SyntheticCrowds(4, cfg, seed=1)
    assert len(ds) == 4 and ds[2].image_id == render_scene(2, 1, cfg).image_id
    np.testing.assert_array_equal(ds[-1].image, render_scene(3, 1, cfg).image)
    with pytest.raises(IndexError):
        ds[4]


@pytest.mark.parametrize("n", [1, 150])
def test_density_is_controlled(n):
    cfg = SceneConfig(num_people=(n, n), difficulty="hard", width=320, height=240)
    r = render_scene(0, 0, cfg)
    people = int((r.labels == "person").sum())
    assert people + r.attrs["num_outside"] == n
    assert people >= 0.9 * n


def test_boxes_are_valid_and_visible_boxes_inside_full_boxes():
    for diff in ("easy", "medium", "hard"):
        r = render_scene(1, 0, SceneConfig(difficulty=diff, **SMALL))
        assert r.image.shape == (120, 160, 3) and r.image.dtype == np.uint8
        b = r.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= 160).all() and (b[:, 3] <= 120).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert ((r.visibility >= 0) & (r.visibility <= 1)).all()
        np.testing.assert_allclose(r.attrs["occlusion"], 1 - r.visibility)
        ok = np.isfinite(r.visible_boxes).all(1)
        v = r.visible_boxes[ok]
        assert (v[:, :2] >= b[ok, :2]).all() and (v[:, 2:] <= b[ok, 2:]).all()
        # Hidden people (below min_visibility) are ignore, visible ones are not.
        people = r.labels == "person"
        np.testing.assert_array_equal(r.ignore[people], r.visibility[people] < 0.05)


def test_boxes_match_the_drawn_pixels():
    # The background is drawn before anything else, so a scene with 0 people and one with
    # people share it: the pixels that differ are exactly the people.
    for index in range(10):
        kw = dict(difficulty="easy", num_distractors=(0, 0), **SMALL)
        one = render_scene(index, 0, SceneConfig(num_people=(1, 1), **kw))
        none = render_scene(index, 0, SceneConfig(num_people=(0, 0), **kw))
        if one.num_boxes == 1:
            break
    else:
        pytest.fail("the single person was drawn outside the image in every scene")
    assert list(one.labels) == ["person"] and none.num_boxes == 0
    diff = np.any(one.image != none.image, axis=2)
    ys, xs = np.nonzero(diff)
    np.testing.assert_array_equal(one.boxes[0], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert one.visibility[0] == 1.0
    np.testing.assert_array_equal(one.visible_boxes[0], one.boxes[0])


def test_occlusion_is_measured_from_paint_order():
    for index in range(10):
        kw = dict(difficulty="hard", num_distractors=(0, 0), **SMALL)
        many = render_scene(index, 0, SceneConfig(num_people=(12, 12), **kw))
        none = render_scene(index, 0, SceneConfig(num_people=(0, 0), **kw))
        if (many.visibility < 0.9).any():
            break
    else:
        pytest.fail("no occluded scene found")
    assert (many.labels == "person").all()
    diff = np.any(many.image != none.image, axis=2)
    ys, xs = np.nonzero(diff)
    vis = many.visible_boxes[np.isfinite(many.visible_boxes).all(1)]
    # Every changed pixel belongs to some visible person: the visible boxes cover the diff.
    assert vis[:, 0].min() == xs.min() and vis[:, 1].min() == ys.min()
    assert vis[:, 2].max() == xs.max() + 1 and vis[:, 3].max() == ys.max() + 1
    covered = np.zeros_like(diff)
    for x1, y1, x2, y2 in vis.astype(int):
        covered[y1:y2, x1:x2] = True
    assert covered[diff].all()
    # The person painted last is never occluded.
    assert (many.visibility == 1.0).any()


def test_distractors_are_ignore_regions():
    labels = set()
    for index in range(30):
        r = render_scene(index, 0, SceneConfig(difficulty="hard", width=320, height=240,
                                               num_people=(5, 5)))
        for lab in ("poster", "mannequin"):
            sel = r.labels == lab
            assert r.ignore[sel].all()
            labels |= {lab} if sel.any() else set()
    assert labels == {"poster", "mannequin"}


def test_difficulty_levels_scale_density_and_size():
    stats = {}
    for diff in ("easy", "medium", "hard"):
        counts, heights = [], []
        for i in range(6):
            r = render_scene(i, 0, SceneConfig(difficulty=diff, width=320, height=240))
            p = r.labels == "person"
            counts.append(p.sum())
            heights += list(r.boxes[p, 3] - r.boxes[p, 1])
        stats[diff] = (np.mean(counts), np.median(heights))
    assert stats["easy"][0] < stats["medium"][0] < stats["hard"][0]
    assert stats["hard"][1] < stats["easy"][1]
    with pytest.raises(ValueError, match="difficulty"):
        SceneConfig(difficulty="extreme")


def test_coord_tint_blends_the_background_with_a_coordinate_map():
    kw = dict(width=96, height=72, difficulty="easy", num_people=(1, 1), num_distractors=(0, 0))
    plain = render_scene(3, 0, SceneConfig(**kw))
    tinted = render_scene(3, 0, SceneConfig(coord_tint=0.7, **kw))
    np.testing.assert_array_equal(plain.boxes, tinted.boxes)  # same scene, same rng stream
    h, w = 72, 96
    outside = np.ones((h, w), bool)  # background pixels: outside every figure's box
    for x1, y1, x2, y2 in plain.boxes.astype(int):
        outside[max(y1 - 2, 0):y2 + 2, max(x1 - 2, 0):x2 + 2] = False
    ys, xs = np.nonzero(outside)
    for y, x in list(zip(ys, xs))[::97]:
        coord = (255 * x / (w - 1), 255 * y / (h - 1), 128)
        for c in range(3):
            want = round(0.3 * float(plain.image[y, x, c]) + 0.7 * coord[c])
            assert abs(int(tinted.image[y, x, c]) - want) <= 1, (y, x, c)
    # The figure keeps its own colours (tint is painted under the people).
    x1, y1, x2, y2 = plain.boxes[0].astype(int)
    assert (np.asarray(plain.image[y1:y2, x1:x2]) == tinted.image[y1:y2, x1:x2]).mean() > 0.2
    with pytest.raises(ValueError, match="coord_tint"):
        SceneConfig(coord_tint=1.5)


def test_without_clutter_the_ground_is_flat_up_to_the_noise():
    cfg = SceneConfig(width=96, height=72, difficulty="easy", num_people=(0, 0),
                      num_distractors=(0, 0), clutter=False)
    for i in range(3):
        r = render_scene(i, 0, cfg)
        ground = r.image[-20:].reshape(-1, 3).astype(int)
        assert np.ptp(ground, axis=0).max() <= 2 * 4  # the easy preset's noise amplitude is 4
        assert r.boxes.shape == (0, 4)


def test_silhouettes_paint_people_in_one_dark_colour():
    from dipr1_jax.data.synthetic import SILHOUETTE

    kw = dict(width=96, height=72, difficulty="easy", num_people=(2, 2), num_distractors=(0, 0))
    plain = render_scene(4, 0, SceneConfig(**kw))
    dark = render_scene(4, 0, SceneConfig(silhouettes=True, **kw))
    np.testing.assert_array_equal(plain.boxes, dark.boxes)  # same figures, same places
    changed = np.any(plain.image != dark.image, axis=-1)
    assert changed.sum() > 20
    assert np.all(dark.image[changed] == SILHOUETTE)
    inside = np.zeros_like(changed)
    for x1, y1, x2, y2 in dark.boxes.astype(int):
        inside[y1:y2, x1:x2] = True
    assert not np.any(changed & ~inside)  # only figure pixels changed
