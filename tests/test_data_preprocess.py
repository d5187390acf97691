"""Preprocessing parity with transformers' Qwen2VLImageProcessorPil, box frames, prompts."""

import os

import numpy as np
import pytest
from PIL import Image

from dipr1_jax.data import preprocess as pp
from dipr1_jax.data import prompts

import transformers.models.qwen2_vl.image_processing_pil_qwen2_vl as hf_ip  # noqa: E402


@pytest.mark.parametrize("h,w", [(1, 1), (27, 29), (100, 150), (480, 640), (1080, 1920), (2000, 13),
                                 (4000, 3000), (56, 56), (57, 83)])
@pytest.mark.parametrize("min_px,max_px", [(56 * 56, 28 * 28 * 1280), (28 * 28 * 4, 28 * 28 * 16)])
def test_smart_resize_matches_transformers(h, w, min_px, max_px):
    ref = hf_ip.smart_resize(h, w, factor=28, min_pixels=min_px, max_pixels=max_px)
    assert pp.smart_resize(h, w, 28, min_px, max_px) == tuple(ref)


@pytest.mark.parametrize("h,w,min_px,max_px", [
    (60, 90, 56 * 56, 28 * 28 * 32),      # round to the nearest multiple of 28
    (20, 30, 28 * 28 * 8, 28 * 28 * 32),  # upscale to min_pixels
    (300, 170, 56 * 56, 28 * 28 * 24),    # downscale to max_pixels
    (112, 56, 56 * 56, 28 * 28 * 32),     # exact multiple: no resampling
])
def test_pixel_values_match_transformers(h, w, min_px, max_px):
    rng = np.random.default_rng(h * 1000 + w)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    spec = pp.VisionSpec(min_pixels=min_px, max_pixels=max_px)
    ours = pp.preprocess_image(image, spec)
    proc = hf_ip.Qwen2VLImageProcessorPil(min_pixels=min_px, max_pixels=max_px)
    ref = proc(images=[Image.fromarray(image)], return_tensors="np")
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"][0])
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert ours["pixel_values"].shape[1] == 1176 == spec.patch_dim
    np.testing.assert_allclose(ours["pixel_values"], ref["pixel_values"], atol=1e-5, rtol=0)
    n_ref = proc.get_number_of_image_patches(h, w) // 4
    assert pp.num_image_tokens(ours["image_grid_thw"], spec) == n_ref
    assert tuple(ours["resized_size"]) == tuple(v * 14 for v in ref["image_grid_thw"][0][1:])


def test_patch_layout_by_hand():
    # A 28x28 image: 2x2 patches of 14 px forming one merge window. Patch (row r, col c)
    # must be row r*2+c, and within a row the layout is [C, T, 14, 14] with T duplicated.
    spec = pp.VisionSpec(min_pixels=28 * 28, max_pixels=28 * 28)
    chw = np.zeros((3, 28, 28), np.float32)
    for r in range(2):
        for c in range(2):
            for ch in range(3):
                chw[ch, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = 10 * (r * 2 + c) + ch
    chw[0, 14, 1] = -1.0  # patch (1, 0), channel 0, row 0, column 1
    flat = pp.patchify(chw, spec)
    assert flat.shape == (4, 3 * 2 * 14 * 14)
    for k in range(4):
        block = flat[k].reshape(3, 2, 14, 14)
        for ch in range(3):
            expect = np.full((14, 14), 10 * k + ch, np.float32)
            if k == 2 and ch == 0:
                expect[0, 1] = -1.0
            np.testing.assert_array_equal(block[ch, 0], expect)
            np.testing.assert_array_equal(block[ch, 1], expect)


def test_box_round_trip_and_frame():
    orig_hw, resized_hw = (300, 170), pp.smart_resize(300, 170, 28, 56 * 56, 28 * 28 * 24)
    # 308x168 rounded exceeds 18816 px: beta = sqrt(51000/18816) = 1.646;
    # floor(300/beta/28) = 6, floor(170/beta/28) = 3.
    assert resized_hw == (168, 84)
    boxes = np.asarray([[17, 30, 85, 150], [0, 0, 170, 300]], np.float32)
    model = pp.boxes_to_model_frame(boxes, orig_hw, resized_hw)
    # x scales by 84/170, y by 168/300.
    np.testing.assert_allclose(model, [[8.4, 16.8, 42, 84], [0, 0, 84, 168]], rtol=1e-6)
    np.testing.assert_allclose(pp.boxes_to_original(model, orig_hw, resized_hw), boxes, rtol=1e-6)
    scale = pp.box_scale(orig_hw, resized_hw)
    np.testing.assert_allclose(scale, [84 / 170, 168 / 300], rtol=1e-6)
    np.testing.assert_allclose(pp.boxes_to_original_batch(model[None], scale[None])[0], boxes,
                               rtol=1e-5)


def test_mapped_box_lands_on_the_object_in_the_resized_image():
    # A bright rectangle on a dark, non-square image; after preprocessing, the bright
    # patches must sit inside the GT box mapped to the model frame (swapping x and y,
    # or using the original frame, would put them elsewhere).
    h, w = 400, 250
    image = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = 150, 60, 230, 180
    image[y1:y2, x1:x2] = 255
    spec = pp.VisionSpec(min_pixels=56 * 56, max_pixels=28 * 28 * 40)
    out = pp.preprocess_image(image, spec)
    rh, rw = (int(v) for v in out["resized_size"])
    resized = pp.resize_image(image, rh, rw)
    mb = pp.boxes_to_model_frame(np.asarray([[x1, y1, x2, y2]], np.float32), (h, w), (rh, rw))[0]
    ys, xs = np.nonzero(resized[..., 0] > 128)
    assert abs(xs.min() - mb[0]) <= 1 and abs(xs.max() + 1 - mb[2]) <= 1
    assert abs(ys.min() - mb[1]) <= 1 and abs(ys.max() + 1 - mb[3]) <= 1
    # The same holds in pixel_values: a patch is bright iff its centre is inside the box.
    gh, gw = out["image_grid_thw"][1:]
    vals = out["pixel_values"].reshape(gh // 2, gw // 2, 2, 2, 3, 2, 14, 14)
    grid = vals.transpose(0, 2, 1, 3, 4, 5, 6, 7).reshape(gh, gw, 3, 2, 14, 14)[:, :, 0, 0, 7, 7]
    for r in range(gh):
        for c in range(gw):
            cx, cy = c * 14 + 7.5, r * 14 + 7.5
            inside = mb[0] + 2 < cx < mb[2] - 2 and mb[1] + 2 < cy < mb[3] - 2
            outside = not (mb[0] - 2 < cx < mb[2] + 2 and mb[1] - 2 < cy < mb[3] + 2)
            if inside:
                assert grid[r, c] > 1.5
            elif outside:
                assert grid[r, c] < -1.5


def test_clip_boxes():
    b, keep = pp.clip_boxes(np.asarray([[-5, 2, 10, 20], [50, 50, 60, 60], [3, 3, 4, 4]]), 30, 40)
    np.testing.assert_array_equal(b, [[0, 2, 10, 20], [40, 30, 40, 30], [3, 3, 4, 4]])
    assert list(keep) == [True, False, True]


def test_prompts_ask_for_think_look_answer():
    for task in prompts.TASKS:
        msgs = prompts.build_messages(task)
        text = " ".join(m["content"] if isinstance(m["content"], str) else
                        " ".join(c.get("text", "") for c in m["content"]) for m in msgs)
        for tag in ("<think>", "</think>", "<look>", "</look>", "<answer>", "</answer>", "bbox_2d"):
            assert tag in text, (task, tag)
    assert prompts.question("detection").startswith("Locate every person in the image")
    assert "How many people" in prompts.question("counting")
    with pytest.raises(ValueError, match="unknown task"):
        prompts.question("segmentation")


def test_encode_prompt_equals_transformers_expansion():
    import transformers
    from dipr1_jax.tokenizer import ASSETS_DIR, load_tokenizer

    tok = load_tokenizer()
    hf_tok = transformers.AutoTokenizer.from_pretrained(ASSETS_DIR)
    n = 37
    ours = prompts.encode_prompt(tok, n, "detection")
    # The transformers processor expands the placeholder in the text before tokenising.
    text = prompts.prompt_text(tok, "detection").replace("<|image_pad|>", "<|image_pad|>" * n)
    ref = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ours.tolist() == list(ref)
    assert int((ours == tok.image_token_id).sum()) == n
    assert os.path.isdir(ASSETS_DIR)
