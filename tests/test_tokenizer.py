"""The shipped tiny tokenizer and the one loader used for it and for real checkpoints."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dipr1_jax import tokens
from dipr1_jax.tokenizer import ASSETS_DIR, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAGS = ["<think>", "</think>", "<look>", "</look>", "<answer>", "</answer>"]

COMPLETION = (
    "<think> A crowded street with 3 people walking; one is occluded. </think>\n"
    '<look> [{"bbox_2d": [120, 45, 180, 210]}] </look>\n'
    '<answer> [{"bbox_2d": [10, 20, 64, 200], "label": "person"}, '
    '{"bbox_2d": [120, 45, 180, 210], "label": "person"}] </answer>'
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_special_tokens_at_tiny_ids(tok):
    for name, i in tokens.TINY_SPECIAL_TOKENS.items():
        assert tok.token_to_id(name) == i, name
        assert tok.encode(name) == [i], name
        assert tok.decode([i]) == name
    assert tok.eos_token_id == tokens.TINY_EOS_TOKEN_ID == tok.token_to_id("<|im_end|>")
    assert tok.pad_token_id == tokens.TINY_PAD_TOKEN_ID == tok.token_to_id("<|endoftext|>")
    assert tok.image_token_id == tokens.TINY_IMAGE_TOKEN_ID
    assert tok.video_token_id == tokens.TINY_VIDEO_TOKEN_ID
    assert tok.vision_start_token_id == tokens.TINY_VISION_START_TOKEN_ID
    assert tok.vision_end_token_id == tokens.TINY_VISION_END_TOKEN_ID
    # regular tokens fill 0..999 exactly; the model's 1024 rows cover every id
    assert tok.backend.get_vocab_size(with_added_tokens=False) == tokens.TINY_NUM_REGULAR
    assert sorted(tok.backend.get_vocab().values()) == list(range(tok.vocab_size))
    assert tok.vocab_size == tokens.TINY_NUM_REGULAR + len(tokens.TINY_SPECIAL_TOKENS)
    assert tok.vocab_size <= tokens.TINY_VOCAB_SIZE


def test_shipped_tokenizer_is_shared(tok):
    assert load_tokenizer() is tok


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_exact_on_unicode(s):
    t = load_tokenizer()
    ids = t.encode(s)
    if not any(name in s for name in tokens.TINY_SPECIAL_TOKENS):
        assert all(0 <= i < tokens.TINY_NUM_REGULAR for i in ids)
    assert t.decode(ids) == s


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=30), st.sampled_from(sorted(tokens.TINY_SPECIAL_TOKENS))), max_size=8))
def test_round_trip_with_special_tokens_mixed_in(parts):
    t = load_tokenizer()
    s = "".join(parts)
    ids = t.encode(s)
    assert t.decode(ids) == s
    n_special = sum(1 for i in ids if i >= tokens.TINY_NUM_REGULAR)
    assert n_special == sum(s.count(name) for name in tokens.TINY_SPECIAL_TOKENS)
    plain = s
    for name in tokens.TINY_SPECIAL_TOKENS:
        plain = plain.replace(name, "")
    assert t.decode(ids, skip_special_tokens=True) == plain


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="0123456789", min_size=1, max_size=40), st.sampled_from(["", " ", "[", ", ", "x="]))
def test_digits_one_per_token(digits, prefix):
    t = load_tokenizer()
    ids = t.encode(prefix + digits)
    pieces = [t.decode([i]) for i in ids]
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digit_pieces == list(digits)


def test_no_regular_token_holds_two_digits(tok):
    for i in range(tokens.TINY_NUM_REGULAR):
        assert sum(c.isdigit() for c in tok.decode([i])) <= 1, (i, tok.decode([i]))


def test_tags_are_single_tokens(tok):
    tag_ids = {}
    for tag in TAGS:
        ids = tok.encode(tag)
        assert len(ids) == 1, (tag, ids)
        tag_ids[tag] = ids[0]
        # ... also after a space or a newline, as they appear in completions
        assert tok.encode(" " + tag)[-1] == ids[0]
        assert tok.encode("x\n" + tag)[-1] == ids[0]
    assert len(set(tag_ids.values())) == 6
    ids = tok.encode(COMPLETION)
    for tag in TAGS:
        assert ids.count(tag_ids[tag]) == 1
    assert tok.decode(ids) == COMPLETION
    # the box JSON vocabulary is learned: key and punctuation runs are single tokens
    for piece in ("bbox", '{"', '":', " [", "],", '"}', " \"", "label", "person"):
        assert len(tok.encode(piece)) == 1, piece
    box = '{"bbox_2d": [120, 45, 180, 210]}'
    assert len(tok.encode(box)) <= 10 + 16  # 10 digits + the 16 pieces around them


def test_decode_accepts_arrays_and_padded_vocab_ids(tok):
    ids = np.asarray(tok.encode("hello world"), dtype=np.int32)
    assert tok.decode(ids) == "hello world"
    # the tiny model's spare rows 1008..1023 decode to nothing, never raise
    assert tok.decode(list(ids) + [1010, 1023]) == "hello world"
    assert tok.batch_decode([ids, [tok.im_start_token_id] + list(ids)], skip_special_tokens=True) == [
        "hello world",
        "hello world",
    ]
    with pytest.raises(ValueError, match="negative token id"):
        tok.decode([5, -1])


def test_chat_template_with_image_matches_hand_written(tok):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "img.jpg"},
                {"type": "text", "text": "Detect every person."},
            ],
        }
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Detect every person.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages) == expected
    ids = tok.encode(expected)
    assert ids.count(tok.image_token_id) == 1
    assert ids[ids.index(tok.image_token_id) - 1] == tok.vision_start_token_id
    assert ids[ids.index(tok.image_token_id) + 1] == tok.vision_end_token_id


def test_chat_template_system_and_multi_turn(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How many?"},
        {"role": "assistant", "content": "<answer> 3 </answer>"},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHow many?<|im_end|>\n"
        "<|im_start|>assistant\n<answer> 3 </answer><|im_end|>\n"
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert tok.apply_chat_template(messages) == expected + "<|im_start|>assistant\n"


def test_build_script_is_deterministic_and_matches_shipped_files(tmp_path):
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "build_tokenizer.py"), "--out", str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(tmp_path / name, "rb") as f:
            built = f.read()
        with open(os.path.join(ASSETS_DIR, name), "rb") as f:
            shipped = f.read()
        assert built == shipped, name


def test_directory_load_is_the_same_path(tok, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ASSETS_DIR, name), tmp_path / name)
    other = load_tokenizer(tmp_path)
    assert other is not tok
    assert type(other) is type(tok)
    assert other.encode(COMPLETION) == tok.encode(COMPLETION)
    assert other.apply_chat_template([{"role": "user", "content": "hi"}]) == tok.apply_chat_template(
        [{"role": "user", "content": "hi"}]
    )
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("abc") == tok.encode("abc")


def test_checkpoint_style_template_files(tmp_path):
    """Qwen2-VL checkpoints keep the template in chat_template.json; newer ones in .jinja."""
    shutil.copy(os.path.join(ASSETS_DIR, "tokenizer.json"), tmp_path / "tokenizer.json")
    t = load_tokenizer(tmp_path)  # no tokenizer_config.json: Qwen roles by default
    assert t.eos_token_id == tokens.TINY_EOS_TOKEN_ID and t.pad_token_id == tokens.TINY_PAD_TOKEN_ID
    with pytest.raises(ValueError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "x"}])
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J{{ messages[0]['content'] }}"}))
    assert load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "Jx"
    (tmp_path / "chat_template.jinja").write_text("K{{ messages[0]['content'] | tojson }}{{ eos_token }}")
    assert load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "<é>"}]) == 'K"<é>"<|im_end|>'


def test_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json") as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value) and "config.json" in str(e.value)
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: cannot load"):
        load_tokenizer(tmp_path)


def test_parity_with_transformers_autotokenizer(tok):
    """The shipped folder is an AutoTokenizer directory and both agree (independent reference)."""
    import transformers  # in the `test` extra
    ref = transformers.AutoTokenizer.from_pretrained(ASSETS_DIR)
    assert ref.eos_token_id == tok.eos_token_id and ref.pad_token_id == tok.pad_token_id
    assert len(ref) == tok.vocab_size
    texts = [
        COMPLETION,
        "Hello, World! 12345 ünïcödé e\u0301 日本語 🙂\t\n\n  spaces",
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>",
        "",
    ]
    for text in texts:
        ids = tok.encode(text)
        assert ref.encode(text, add_special_tokens=False) == ids
        for skip in (False, True):
            assert ref.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)
    convs = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find people."}]}],
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "video"}]},
            {"role": "assistant", "content": "b"},
        ],
    ]
    for conv in convs:
        for gen in (True, False):
            assert ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen) == (
                tok.apply_chat_template(conv, add_generation_prompt=gen)
            )
