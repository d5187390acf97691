"""Policy evaluation: rewards and metrics from known completions (frames pinned), a real run."""

import itertools
import json

import numpy as np
import pytest
from PIL import Image

from dipr1_jax.config import RewardConfig
from dipr1_jax.data import preprocess as pp
from dipr1_jax.sampler import SampleOutput
from dipr1_jax.train.evaluate import evaluate_policy

EOS, PAD, T_MAX = 1002, 1000, 32


def tla(boxes, look=(), think="people here"):
    """A Think-Look-Answer completion (DESIGN.md section 2) with integer model-frame boxes."""
    ans = json.dumps([{"bbox_2d": [int(v) for v in b], "label": "person"} for b in boxes])
    lk = json.dumps([{"bbox_2d": [int(v) for v in b]} for b in look])
    return f"<think>{think}</think>\n<look>{lk}</look>\n<answer>{ans}</answer>"


def make_batch(gts, ignores, scale, task, valid):
    """A pipeline-layout batch (model-frame boxes) without real pixels."""
    b = len(gts)
    k = max(1, max(len(g) for g in gts))
    ki = max(1, max(len(i) for i in ignores))
    batch = {
        "input_ids": np.ones((b, 4), np.int32), "attention_mask": np.ones((b, 4), np.int32),
        "pixel_values": np.zeros((4, 1176), np.float32),
        "image_grid_thw": np.ones((b, 3), np.int32),
        "gt_boxes": np.zeros((b, k, 4), np.float32), "gt_mask": np.zeros((b, k), bool),
        "ignore_boxes": np.zeros((b, ki, 4), np.float32), "ignore_mask": np.zeros((b, ki), bool),
        "scale": np.asarray(scale, np.float32), "task": np.asarray(task, np.int32),
        "valid": np.asarray(valid, bool),
        "image_id": np.asarray([f"img{i}" if v else "" for i, v in enumerate(valid)]),
    }
    for i, (g, ig) in enumerate(zip(gts, ignores)):
        batch["gt_boxes"][i, :len(g)] = np.reshape(g, (-1, 4))
        batch["gt_mask"][i, :len(g)] = True
        batch["ignore_boxes"][i, :len(ig)] = np.reshape(ig, (-1, 4))
        batch["ignore_mask"][i, :len(ig)] = True
    return batch


def stub(texts, lengths, calls):
    def generate_fn(model, ids, mask, pv, grid, **kw):
        calls.append(kw)
        b = len(texts)
        return SampleOutput(tokens=np.full((b, 1, T_MAX), PAD, np.int32),
                            lengths=np.asarray(lengths, np.int32).reshape(b, 1),
                            logprobs=np.zeros((b, 1, T_MAX), np.float32),
                            texts=[[t] for t in texts], nonfinite=np.zeros((b, 1), bool))
    return generate_fn


GT4 = np.array([[10, 10, 30, 50], [40, 10, 60, 50], [70, 10, 90, 50], [10, 60, 30, 100]], float)
GT2 = np.array([[12, 12, 40, 40], [50, 50, 80, 90]], float)
# original = model / (sx, sy): the original frame differs from the model frame on both axes
SCALE = [[0.5, 0.75], [0.25, 2.0], [0.5, 0.75], [1.0, 1.0]]


def run(batch, texts, lengths, **kw):
    calls = []
    res = evaluate_policy(None, [batch], tokenizer=None, reward_cfg=RewardConfig(),
                          max_new_tokens=T_MAX, eos_token_ids=[EOS], pad_token_id=PAD,
                          generate_fn=stub(texts, lengths, calls), **kw)
    return res, calls


def test_known_completions_rewards_and_metrics():
    # rows: (a) exact GT, (b) garbage, (c) half the boxes, padding row (valid False) whose
    # completion would add 3 false positives, a format hit and a long length if it counted.
    batch = make_batch([GT4, GT2, GT4, []], [[], [], [], []], SCALE, [0, 0, 0, 0],
                       [True, True, True, False])
    texts = [tla(GT4), "I see some people lol [[", tla(GT4[:2]), tla(GT4[:3])]
    res, calls = run(batch, texts, [5, 3, 7, 31])
    s = res.summary
    assert calls[0]["temperature"] == 0.0 and calls[0]["group_size"] == 1
    assert s["num_images"] == 3 and s["num_detection"] == 3
    assert s["format_rate"] == pytest.approx(2 / 3)
    # TP = 4 + 0 + 2, FP = 0, #GT = 4 + 2 + 4
    assert s["precision"] == pytest.approx(1.0)
    assert s["recall"] == pytest.approx(0.6)
    assert s["f1"] == pytest.approx(0.75)
    assert s["num_gt"] == 10 and s["num_pred"] == 6
    # totals: (a) 1 + 0 + 1, (b) 0, (c) 1 + 0 + (0.5 * 1 + 0.5 * 0.5); R_look = 0 at G = 1
    assert s["reward"] == pytest.approx((2 + 0 + 1.75) / 3, abs=1e-6)
    assert s["reward_accuracy"] == pytest.approx((1 + 0 + 0.75) / 3, abs=1e-6)
    assert s["reward_look"] == 0.0
    assert s["reward_count"] == pytest.approx((1 + 0 + 0.5) / 3, abs=1e-6)
    assert s["count_mae"] == pytest.approx((0 + 2 + 2) / 3)
    assert s["completion_length"] == pytest.approx(5.0)
    assert s["truncated_rate"] == 0.0
    # Frames: metrics see original pixels (model box / scale), GT and answers alike.
    img_a, _, img_c = res.eval_images
    orig = GT4 / np.array([0.5, 0.75, 0.5, 0.75])
    np.testing.assert_allclose(img_a.gt_boxes, orig, rtol=1e-6)
    np.testing.assert_allclose(img_a.pred_boxes, orig, rtol=1e-6)
    np.testing.assert_allclose(img_c.pred_boxes, orig[:2], rtol=1e-6)
    np.testing.assert_allclose(res.eval_images[1].gt_boxes, GT2 / np.array([0.25, 2, 0.25, 2]),
                               rtol=1e-6)
    assert [x["image_id"] for x in res.samples] == ["img0", "img1", "img2"]
    assert [x["num_answer"] for x in res.samples] == [4, 0, 2]
    assert res.samples[2]["accuracy"] == pytest.approx(0.75, abs=1e-6)
    assert res.pngs == []


def test_counting_prompt_and_ignore_regions():
    # Detection row: 2 of 3 GT found plus one answer inside an ignore region (neither TP
    # nor FP, and not counted). Counting row: answers 3 for 5 people.
    ign = [[100, 0, 140, 60]]
    gt5 = np.array([[i * 20, 0, i * 20 + 10, 30] for i in range(5)], float)
    batch = make_batch([GT4[:3], gt5], [ign, []], [[2.0, 0.5], [0.5, 0.5]], [0, 1], [True, True])
    texts = [tla(list(GT4[:2]) + [[105, 5, 125, 45]]),
             "<think>a few people</think><look>[]</look><answer>3</answer>"]
    res, _ = run(batch, texts, [9, 4])
    s = res.summary
    assert s["num_detection"] == 1 and s["num_counting"] == 1
    assert s["format_rate"] == 1.0
    assert s["precision"] == pytest.approx(1.0) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(0.8)
    # count: detection 2 non-ignored answers vs 3; counting 3 vs 5 -> one MAE over both
    assert res.eval_images[0].pred_count == 2
    assert s["count_mae"] == pytest.approx(1.5)
    assert s["count_mae_counting"] == pytest.approx(2.0)
    acc = 0.5 * 1.0 + 0.5 * (2 / 3)  # the ignored answer leaves #pred
    assert s["reward_accuracy"] == pytest.approx(acc, abs=1e-6)
    assert s["reward_count"] == pytest.approx(((1 - 1 / 3) + 0.6) / 2, abs=1e-6)
    assert s["reward"] == pytest.approx(((1 + acc) + (1 + 0.6)) / 2, abs=1e-6)
    assert [x["pred_count"] for x in res.samples] == [2, 3]


def test_unpatchify_inverts_patchify():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
    pv = pp.patchify(pp.normalize(image))
    back = pp.unpatchify(pv, (1, 4, 6))
    assert back.dtype == np.uint8 and back.shape == image.shape
    assert np.abs(back.astype(int) - image.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="unpatchify"):
        pp.unpatchify(pv, (1, 4, 4))


def test_real_run_with_tiny_model_draws_model_frame_pngs(tmp_path):
    from dipr1_jax.data.pipeline import PipelineConfig, make_dataset
    from dipr1_jax.data.records import decode_image
    from dipr1_jax.data.synthetic import SceneConfig, SyntheticCrowds
    from dipr1_jax.model import create_model, preset
    from dipr1_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    source = SyntheticCrowds(4, SceneConfig(width=112, height=112, difficulty="easy"))
    batch = next(iter(make_dataset(source, PipelineConfig(batch_size=2, shuffle=False), tok)))
    model = create_model(preset("tiny"))
    res = evaluate_policy(model, itertools.islice([batch], 1), tok, reward_cfg=RewardConfig(),
                          max_new_tokens=16, eos_token_ids=[tok.im_end_token_id],
                          pad_token_id=tok.pad_token_id, name="tiny", report_dir=tmp_path)
    s = res.summary
    assert s["num_images"] == 2 and len(res.samples) == 2
    assert 1 <= s["completion_length"] <= 16
    assert 0.0 <= s["reward"] <= 3.0
    assert len(res.pngs) == 2
    for b, path in enumerate(res.pngs):
        # image ids like "synthetic/easy/0/00000000" become one flat file name
        flat = str(batch["image_id"][b]).replace("/", "_")
        assert path == str(tmp_path / "tiny" / f"{flat}.png")
        with Image.open(path) as im:
            rh, rw = (int(v) for v in batch["resized_size"][b])
            assert im.size == (rw, rh)
            drawn = np.asarray(im.convert("RGB"))
        # 112 x 112 is already a model size: the drawing is the record's own image
        # (its patches found at the right rows of pixel_values) except for box outlines.
        orig = decode_image(source[b])
        assert np.mean(np.all(np.abs(drawn.astype(int) - orig.astype(int)) <= 1, -1)) > 0.5
