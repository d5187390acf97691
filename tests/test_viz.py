"""viz.draw_boxes: the colours of actual pixels on and around box edges."""

import numpy as np
import pytest
from PIL import Image

from dipr1_jax import viz

BG = (50, 60, 70)
GT = [[10, 10, 40, 60]]  # pixel columns 10..39, rows 10..59
PRED = [[50.4, 5.0, 90.0, 30.6]]  # columns 50..89, rows 5..30
LOOK = [[20, 65, 70, 78]]
IGNORE = [[92, 40, 100, 80]]  # touches the right/bottom border: clipped


def _image(h=80, w=100):
    a = np.zeros((h, w, 3), np.uint8)
    a[:] = BG
    return a


def px(img, x, y):
    return img.getpixel((x, y))


def test_box_edges_have_their_colours_and_interiors_are_untouched():
    src = _image()
    out = viz.draw_boxes(src, gt_boxes=GT, pred_boxes=PRED, look_boxes=LOOK, ignore_boxes=IGNORE, width=2)
    assert out.size == (100, 80 + viz.LEGEND_HEIGHT)
    g, p, lk, ig = (viz.COLORS[k] for k in ("gt", "pred", "look", "ignore"))
    assert len({g, p, lk, ig, BG}) == 5
    # GT: outermost pixels and the second ring (width 2), then background inside and outside
    for x, y in [(10, 35), (11, 35), (39, 35), (38, 35), (25, 10), (25, 11), (25, 59), (25, 58), (10, 10), (39, 59)]:
        assert px(out, x, y) == g, (x, y)
    for x, y in [(12, 35), (37, 35), (25, 12), (25, 57), (9, 35), (40, 35), (25, 9), (25, 60), (25, 35)]:
        assert px(out, x, y) == BG, (x, y)
    # prediction with fractional coordinates: floor(x1), ceil(x2) - 1
    for x, y in [(50, 20), (89, 20), (70, 5), (70, 30)]:
        assert px(out, x, y) == p, (x, y)
    for x, y in [(49, 20), (90, 20), (70, 4), (70, 31), (70, 18)]:
        assert px(out, x, y) == BG, (x, y)
    # look box (its top edge crosses nothing), ignore region clipped at the image border
    for x, y in [(20, 70), (69, 70), (45, 65), (45, 77)]:
        assert px(out, x, y) == lk, (x, y)
    for x, y in [(92, 60), (99, 60), (95, 40), (95, 79)]:
        assert px(out, x, y) == ig, (x, y)
    # the input array is not modified
    assert (src == np.array(BG, np.uint8)).all()


def test_predictions_are_drawn_on_top():
    out = viz.draw_boxes(_image(), gt_boxes=[[10, 10, 40, 40]], pred_boxes=[[10, 10, 40, 40]], legend=False, width=1)
    assert out.size == (100, 80)
    assert px(out, 10, 20) == viz.COLORS["pred"]
    out = viz.draw_boxes(_image(), gt_boxes=[[10, 10, 40, 40]], look_boxes=[[10, 10, 40, 40]], legend=False)
    assert px(out, 10, 20) == viz.COLORS["look"]


def test_png_round_trip_and_input_forms(tmp_path):
    path = viz.save_png(tmp_path / "sub" / "a.png", _image(), gt_boxes=GT, pred_boxes=PRED, pred_scores=[0.87])
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.convert("RGB").getpixel((10, 35)) == viz.COLORS["gt"]
        assert im.convert("RGB").getpixel((89, 20)) == viz.COLORS["pred"]
    gray = np.full((30, 40), 0.5)  # floats in [0, 1], grayscale
    out = viz.draw_boxes(gray, gt_boxes=[[0, 0, 10, 10]], legend=False)
    assert px(out, 5, 5) == (128, 128, 128) and px(out, 0, 5) == viz.COLORS["gt"]
    out = viz.draw_boxes(path, legend=False)  # from a file
    assert px(out, 10, 35) == viz.COLORS["gt"]
    # degenerate, non-finite and fully outside boxes are skipped, never raise
    out = viz.draw_boxes(_image(), pred_boxes=[[5, 5, 5, 9], [np.nan, 0, 3, 3], [200, 200, 210, 210]], legend=False)
    assert (np.asarray(out) == np.array(BG, np.uint8)).all()


def test_bad_input():
    with pytest.raises(ValueError, match=r"gt_boxes must have shape \[N, 4\]"):
        viz.draw_boxes(_image(), gt_boxes=[[1, 2, 3]])
    with pytest.raises(ValueError, match="pred_scores has 2 entries for 1 boxes"):
        viz.draw_boxes(_image(), pred_boxes=PRED, pred_scores=[0.1, 0.2])
    with pytest.raises(ValueError, match="image must be"):
        viz.draw_boxes(np.zeros((4, 4, 2)))
