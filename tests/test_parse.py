"""Completion parsing: the format rules of DESIGN.md section 2 and robustness."""

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dipr1_jax.config import RewardConfig
from dipr1_jax.rewards import dip_rewards, parse_completions, parse_one

GOOD = ('<think> a dense crowd at a station </think>\n'
        '<look> [{"bbox_2d": [10, 20, 30, 60]}] </look>\n'
        '<answer> [{"bbox_2d": [1, 2, 3, 4], "label": "person"}, '
        '{"bbox_2d": [10.5, 20, 30, 61], "label": "person"}] </answer>')


def test_well_formed_completion():
    fmt, ans, look, count = parse_one(GOOD)
    assert fmt is True
    assert ans.tolist() == [[1.0, 2.0, 3.0, 4.0], [10.5, 20.0, 30.0, 61.0]]
    assert look.tolist() == [[10.0, 20.0, 30.0, 60.0]]
    assert count == -1


@pytest.mark.parametrize("text, fmt, n_answer, count", [
    # Accepted variants: fenced JSON, bare lists, a missing outer list, empty look.
    ('<think>t</think><look>[]</look><answer>```json\n[{"bbox_2d": [1, 2, 3, 4]}]\n```</answer>', True, 1, -1),
    ('<think>t</think><look></look><answer>[[1, 2, 3, 4], [5, 6, 7, 8]]</answer>', True, 2, -1),
    ('<think>t</think><look>[]</look><answer>[1, 2, 3, 4]</answer>', True, 1, -1),
    ('<think>t</think><look>[]</look><answer>{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [1, 2, 5, 6]}</answer>', True, 2, -1),
    ('<think>t</think><look>[]</look><answer> 17 </answer>', True, 0, 17),
    # Broken: each makes the format reward 0; valid boxes are still salvaged.
    ('<think> </think><look>[]</look><answer>[[1, 2, 3, 4]]</answer>', False, 1, -1),
    ('<look>[]</look><think>t</think><answer>[[1, 2, 3, 4]]</answer>', False, 1, -1),
    ('<think>t</think><look>[]</look><answer>[[1, 2, 3, 4], [5, 6, 5, 8]]</answer>', False, 1, -1),
    ('<think>t</think><look>[]</look><answer>[[1, 2, 3, 4],]</answer>', False, 1, -1),
    ("<think>t</think><look>[]</look><answer>[{'bbox_2d': [1, 2, 3, 4]}]</answer>", False, 1, -1),
    ('<think>t</think><look>[]</look><answer>[[1, 2, NaN, 4], [1, 2, Infinity, 4], [0, 0, 1e400, 1]]</answer>', False, 0, -1),
    ('<think>t</think><look>[]</look><answer>[[1, 2, 3]]</answer>', False, 0, -1),
    ('<think>t</think><look>[]</look><answer>[[1, 2, 3, 4]]', False, 1, -1),  # truncated
    ('<think>t <answer></think><look>[]</look><answer>[[1, 2, 3, 4]]</answer>', False, 1, -1),  # nested tag
    ('<think>t</think><look>[]</look><answer>[[1, 2, 3, 4]]</answer> trailing', False, 1, -1),
    ('<think>t</think><look>[]</look><answer>-3</answer>', False, 0, -1),
    ('<think>t</think><look>[]</look><answer>[[true, 2, 3, 4]]</answer>', False, 0, -1),
    ('<think>t</think><look>[]</look><answer>[[' + '9' * 5000 + ', 2, 3, 4]]</answer>', False, 0, -1),
    ('no tags at all [1, 2, 3, 4]', False, 0, -1),
    ('', False, 0, -1),
])
def test_format_rules(text, fmt, n_answer, count):
    got_fmt, ans, _, got_count = parse_one(text)
    assert (got_fmt, len(ans), got_count) == (fmt, n_answer, count)


def test_non_strings_never_raise():
    for bad in (None, 3, b"<think>", ["x"]):
        fmt, ans, look, count = parse_one(bad)
        assert (fmt, ans.shape, look.shape, count) == (False, (0, 4), (0, 4), -1)


def test_overflow_is_counted_not_dropped():
    boxes = [{"bbox_2d": [i, i, i + 5, i + 5], "label": "person"} for i in range(10_000)]
    text = f"<think>many</think><look>[]</look><answer>{json.dumps(boxes)}</answer>"
    p = parse_completions([text], max_boxes=128, max_look=4)
    assert p.format_ok[0]
    assert p.answer_mask.sum() == 128 and p.answer_total[0] == 10_000
    assert p.answer_overflow[0] == 10_000 - 128
    assert p.summary()["answer_overflow_boxes"] == 10_000 - 128
    np.testing.assert_array_equal(p.answer_boxes[0, 127], [127, 127, 132, 132])


def _render(boxes, style):
    if style == 0:
        return json.dumps([{"bbox_2d": list(b), "label": "person"} for b in boxes])
    if style == 1:
        return "```json\n" + json.dumps([{"bbox_2d": list(b)} for b in boxes]) + "\n```"
    return json.dumps([list(b) for b in boxes], indent=1)


_coord = st.integers(0, 3000)


@settings(max_examples=150, deadline=None)
@given(raw=st.lists(st.tuples(_coord, _coord, st.integers(1, 900), st.integers(1, 900)), max_size=12),
       style=st.integers(0, 2), think=st.text(min_size=1).filter(lambda s: s.strip() and "<" not in s))
def test_rendered_boxes_parse_back_exactly(raw, style, think):
    boxes = [(x, y, x + w, y + h) for x, y, w, h in raw]
    text = f"<think>{think}</think>\n<look>{_render(boxes[:2], style)}</look>\n<answer>{_render(boxes, style)}</answer>"
    p = parse_completions([text], max_boxes=16, max_look=4)
    assert p.format_ok[0]
    assert p.answer_total[0] == len(boxes) and p.look_total[0] == len(boxes[:2])
    np.testing.assert_array_equal(p.answer_boxes[0, :len(boxes)], np.array(boxes, np.float32).reshape(-1, 4))


# --- fuzz: 10^5 malformed completions ---------------------------------------

_PIECES = ["<think>", "</think>", "<look>", "</look>", "<answer>", "</answer>", "<answer><answer>",
           "[", "]", "{", "}", ",", ",]", "'bbox_2d'", '"bbox_2d"', ":", " ", "\n", "```json", "```",
           "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9" * 400, "0.5", "-3", "7", "1e-400",
           "\u00e9\u4eba\U0001f600", "\x00", "\\u0000", '"label": "person"', "null", "true",
           "[[[[[[[[[[[[", "]]]]]]]]]]", "bbox_2d", "<", ">", "</", "think", "look"]


def _mutate(rng: random.Random, base: str) -> str:
    s = base
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        i = rng.randrange(len(s) + 1)
        if op == 0:  # truncate
            s = s[:i]
        elif op == 1:  # insert a piece
            s = s[:i] + rng.choice(_PIECES) + s[i:]
        elif op == 2:  # delete a span
            s = s[:i] + s[i + rng.randint(1, 20):]
        elif op == 3:  # swap a tag
            s = s.replace(rng.choice(_PIECES[:6]), rng.choice(_PIECES[:6]), 1)
        elif op == 4:  # random unicode run
            s = s[:i] + "".join(chr(rng.randrange(1, 0x2FFFF)) for _ in range(rng.randint(1, 8))) + s[i:]
        else:  # duplicate a span
            j = rng.randint(i, min(len(s), i + 40))
            s = s[:j] + s[i:j] + s[j:]
    return s


def _random_completion(rng: random.Random) -> str:
    n = rng.choice([0, 1, 3, 10, 60])
    boxes = []
    for _ in range(n):
        x, y = rng.uniform(-10, 2000), rng.uniform(-10, 2000)
        boxes.append([round(x, rng.randint(0, 3)), round(y, 2), round(x + rng.uniform(-5, 300), 1),
                      round(y + rng.uniform(-5, 300), 1)])
    answer = json.dumps([{"bbox_2d": b, "label": "person"} for b in boxes])
    look = json.dumps([{"bbox_2d": b} for b in boxes[:3]])
    if rng.random() < 0.1:
        answer = answer.replace("}]", "},]").replace('"', "'")
    return f"<think>{'crowd ' * rng.randint(0, 5)}</think><look>{look}</look><answer>{answer}</answer>"


def test_fuzz_100k_malformed_completions_never_raise_and_rewards_stay_in_range():
    rng = random.Random(1234)
    B, G, K = 125, 8, 32  # 1000 completions per chunk, 100 chunks
    cfg = RewardConfig(max_boxes=64, max_look=8)
    huge = "<think>x</think><look>[]</look><answer>" + json.dumps([[1, 1, 5, 5]] * 10_000) + "</answer>"
    gt_rng = np.random.default_rng(0)
    seen_format, total_seen = 0, 0
    for chunk in range(100):
        texts = [_mutate(rng, _random_completion(rng)) for _ in range(B * G)]
        texts[0] = huge if chunk % 10 == 0 else texts[0]
        p = parse_completions(texts, cfg.max_boxes, cfg.max_look)
        xy = gt_rng.uniform(0, 1800, (B, K, 2))
        gt = np.concatenate([xy, xy + gt_rng.uniform(1, 300, (B, K, 2))], -1).astype(np.float32)
        gt_mask = gt_rng.random((B, K)) < 0.6
        r = {k: np.asarray(v) for k, v in dip_rewards(p, gt, gt_mask, G, cfg,
                                                        is_count=gt_rng.random(B) < 0.2).items()}
        for key in ("format", "look", "accuracy", "count"):
            assert np.all(np.isfinite(r[key])) and r[key].min() >= 0 and r[key].max() <= 1 + 1e-6, key
        assert np.all(np.isfinite(r["total"])) and r["total"].max() <= 3 + 1e-5
        assert np.all(np.isfinite(p.answer_boxes)) and np.all(np.isfinite(p.look_boxes))
        seen_format += int(p.format_ok.sum())
        total_seen += len(texts)
    assert total_seen == 100_000
    # The mutator leaves a fraction well-formed: both outcomes are exercised.
    assert 0 < seen_format < total_seen
