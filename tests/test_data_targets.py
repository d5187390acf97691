"""SFT targets (dipr1_jax.data.targets): every target scores perfectly under the rewards."""

import json

import numpy as np
import pytest

from dipr1_jax.data import pipeline as pl
from dipr1_jax.data import targets as tg
from dipr1_jax.data.synthetic import SceneConfig, SyntheticCrowds
from dipr1_jax.rewards import dip_rewards, parse_completions
from dipr1_jax.tokenizer import load_tokenizer

K_PAD = 256  # one GT width for every reward call: one compilation per batch size


def _score(texts, gts, counting):
    """Rewards of each text (G = 1) against its GT boxes; also the parsed arrays."""
    gt = np.zeros((len(texts), K_PAD, 4), np.float32)
    mask = np.zeros((len(texts), K_PAD), bool)
    for i, g in enumerate(gts):
        gt[i, :len(g)] = g
        mask[i, :len(g)] = True
    parsed = parse_completions(texts, max_boxes=K_PAD)
    r = dip_rewards(parsed, gt, mask, group_size=1, is_count=np.asarray(counting, bool))
    return {k: np.asarray(v)[:, 0] for k, v in r.items()}, parsed


def _assert_perfect(texts, gts, counting):
    r, parsed = _score(texts, gts, counting)
    bad = [t for t, f in zip(texts, r["format"]) if f < 1]
    assert not bad, bad
    for i, (g, c) in enumerate(zip(gts, counting)):
        if c:
            assert r["count"][i] == 1.0 and parsed.count[i] == len(g)
        else:
            assert r["accuracy"][i] == 1.0, texts[i]  # IoU of identical float32 boxes is exactly 1
            # bit-exact: the written coordinates parse back to the float32 GT
            n = int(parsed.answer_total[i])
            assert n == len(g)
            got = parsed.answer_boxes[i, :n]
            want = np.asarray(g, np.float32).reshape(-1, 4)
            assert np.array_equal(got[np.lexsort(got.T)], want[np.lexsort(want.T)])


@pytest.mark.parametrize("style", tg.STYLES)
def test_synthetic_records_score_one(style):
    texts, gts, counting = [], [], []
    for diff in ("easy", "medium", "hard"):
        for rec in SyntheticCrowds(3, SceneConfig(width=160, height=120, difficulty=diff), seed=1):
            keep = ~rec.ignore
            for task in ("detection", "counting"):
                texts.append(tg.build_target(rec.boxes[keep], task, visibility=rec.visibility[keep],
                                             style=style, max_look=3))
                gts.append(rec.boxes[keep])
                counting.append(task == "counting")
    assert max(len(g) for g in gts) > 100  # crowded scenes really are in the sweep
    _assert_perfect(texts, gts, counting)


@pytest.mark.parametrize("style", tg.STYLES)
def test_pipeline_batches_score_one(style):
    src = SyntheticCrowds(6, SceneConfig(width=150, height=110, difficulty="medium"), seed=2)
    cfg = pl.PipelineConfig(batch_size=4, num_epochs=1, shuffle=False, task="mixed")
    batches = list(pl.make_dataset(src, cfg))
    assert len(batches) == 2 and not batches[-1]["valid"].all()  # padding rows are exercised
    fractional = False
    for b in batches:
        texts = tg.targets_for_batch(b, style=style)
        assert [t == "" for t in texts] == (~b["valid"]).tolist()
        rows = np.flatnonzero(b["valid"])
        gts = [b["gt_boxes"][i][b["gt_mask"][i]] for i in rows]
        fractional |= any(np.any(g != np.round(g)) for g in gts)
        _assert_perfect([texts[i] for i in rows], gts, (b["task"][rows] == 1).tolist())
    assert fractional  # the resize made non-integral model-frame boxes


HAND = np.array([[10.25, 33.333332, 40.1, 50.7], [0.1, 0.2, 0.30000001, 0.4],
                 [1e-3, 7.0, 123.456, 7.5], [99.99999, 1.0, 100.0, 2.0]], np.float32)


@pytest.mark.parametrize("style", tg.STYLES)
def test_non_integral_and_empty_score_one(style):
    texts = [tg.build_target(HAND, style=style), tg.build_target(HAND, "counting", style=style),
             tg.build_target(np.zeros((0, 4)), style=style),
             tg.build_target(np.zeros((0, 4)), "counting", style=style)]
    assert "33.333332" in texts[0] and "10.25" in texts[0] and "40.1" in texts[0]
    assert texts[2].endswith("<look>[]</look>\n<answer>[]</answer>")
    assert texts[3].endswith("<answer>0</answer>") and "<think>No people.</think>" in texts[3]
    _assert_perfect(texts, [HAND, HAND, HAND[:0], HAND[:0]], [False, True, False, True])


def test_coordinates_round_trip_through_the_parser_path():
    rng = np.random.default_rng(0)
    vals = np.concatenate([rng.uniform(0, 2048, 20000), rng.uniform(0, 1, 5000),
                           rng.integers(0, 4096, 100)]).astype(np.float32)
    for v in vals:
        s = tg.format_coord(v)
        # the parser: json -> Python float/int -> float64 array -> float32
        assert np.float32(np.float64(json.loads(s))) == v, (repr(v), s)
        assert ("." in s) == (v != np.round(v))
    assert tg.format_coord(np.float32(12.0)) == "12"
    assert tg.format_coord(np.float32(0.1)) == "0.1"


# Hand-made scene: median height 30 -> row bands floor(y_center / 30):
# A (cy 25) 0, B (cy 27) 0, C (cy 65) 2, D (cy 70) 2, E (cy 102) 3.
# Reading order B, A, D, C, E; (y1, x1) order would be A, B, C, D, E.
SCENE = np.array([[50, 10, 60, 40],   # A
                  [10, 12, 20, 42],   # B
                  [30, 50, 40, 80],   # C
                  [5, 55, 15, 85],    # D
                  [70, 100, 72, 104]], np.float32)  # E: area 8 < 0.25 * median area 300


def test_reading_order_and_look_by_hand():
    assert tg.reading_order(SCENE).tolist() == [1, 0, 3, 2, 4]
    assert tg.hard_indices(SCENE).tolist() == [4]  # only the tiny one
    vis = np.array([0.9, 0.3, 0.45, 0.1, 0.6])
    assert tg.hard_indices(SCENE, vis).tolist() == [3, 1, 2]  # vis < 0.5, lowest first
    assert tg.hard_indices(SCENE, vis, max_look=2).tolist() == [3, 1]
    assert tg.hard_indices(SCENE, np.ones(5)).tolist() == []
    assert tg.build_target(SCENE, style="compact") == (
        "<think>5 people, sparse, 1 hard.</think>\n"
        "<look>[[70,100,72,104]]</look>\n"
        "<answer>[[10,12,20,42],[50,10,60,40],[5,55,15,85],[30,50,40,80],[70,100,72,104]]</answer>")
    assert tg.build_target(SCENE[:2], "counting", visibility=vis[:2]) == (
        '<think>2 people, sparse, 1 hard.</think>\n<look>[{"bbox_2d": [10, 12, 20, 42]}]</look>\n'
        "<answer>2</answer>")
    one = tg.build_target(HAND[:1], style="json")
    assert one == ('<think>1 person, sparse, 0 hard.</think>\n<look>[]</look>\n<answer>'
                   '[{"bbox_2d": [10.25, 33.333332, 40.1, 50.7], "label": "person"}]</answer>')


def test_crowded_rule():
    pair = np.array([[0, 0, 10, 20], [2, 0, 12, 20]], np.float32)  # IoU 8/12
    assert "2 people, crowded" in tg.build_target(pair)
    eight = np.array([[20 * i, 0, 20 * i + 10, 20] for i in range(8)], np.float32)
    assert "8 people, crowded" in tg.build_target(eight)
    assert "7 people, sparse" in tg.build_target(eight[:7])


def test_decimals_rounds_and_keeps_boxes_valid():
    boxes = np.array([[10.26, 33.333332, 40.14, 50.7], [5.01, 5.0, 5.04, 6.0]], np.float32)
    text = tg.build_target(boxes, style="compact", decimals=1)
    assert "[10.3,33.3,40.1,50.7]" in text
    assert "[5.01,5,5.04,6]" in text  # rounding would collapse x: written exactly
    r, _ = _score([text], [boxes], [False])
    assert r["format"][0] == 1.0 and 0.95 < r["accuracy"][0] < 1.0


def test_target_ids_round_trip_and_eos():
    tok = load_tokenizer(None)
    for style in tg.STYLES:
        for boxes in (HAND, SCENE, np.zeros((0, 4))):
            text = tg.build_target(boxes, style=style, visibility=None)
            ids = tg.target_ids(tok, text, tok.im_end_token_id)
            assert ids.dtype == np.int32 and ids[-1] == tok.im_end_token_id
            assert tok.im_end_token_id not in ids[:-1].tolist()
            assert tok.decode(ids[:-1].tolist()) == text
    assert tg.target_ids(tok, "<think>x</think>", 7)[-1] == 7


def test_batch_helper_uses_visibility_and_tasks():
    b = {"gt_boxes": np.zeros((3, 6, 4), np.float32), "gt_mask": np.zeros((3, 6), bool),
         "task": np.array([0, 1, 0], np.int32), "valid": np.array([True, True, False]),
         "visibility": np.ones((3, 6), np.float32)}
    b["gt_boxes"][:2, :5], b["gt_mask"][:2, :5] = SCENE, True
    b["visibility"][0, :5] = [0.9, 0.3, 0.45, 0.1, 0.6]
    out = tg.targets_for_batch(b, style="compact", max_look=2)
    assert out[2] == ""
    assert "<look>[[5,55,15,85],[10,12,20,42]]</look>" in out[0]
    assert out[1].endswith("<look>[]</look>\n<answer>5</answer>")  # visibility all 1
    del b["visibility"]
    assert "<look>[[70,100,72,104]]</look>" in tg.targets_for_batch(b, style="compact")[0]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="style"):
        tg.build_target(SCENE, style="yaml")
    with pytest.raises(ValueError, match="task"):
        tg.build_target(SCENE, "segmentation")
    with pytest.raises(ValueError, match="visibility"):
        tg.build_target(SCENE, visibility=np.ones(3))
