"""Build the project's tiny byte-level BPE tokenizer, deterministically.

    python tools/build_tokenizer.py               # writes dipr1_jax/assets/
    python tools/build_tokenizer.py --out DIR     # writes DIR/ (tests compare bytes)

Output: ``tokenizer.json`` (a Hugging Face ``tokenizers`` file) and
``tokenizer_config.json`` (special-token roles and the Qwen2-VL style chat
template). The folder loads with ``dipr1_jax.tokenizer.load_tokenizer`` and
with ``transformers.AutoTokenizer``.

Layout (ids fixed in ``dipr1_jax/tokens.py``):
  * 0..255     the 256 byte symbols, in byte order (GPT-2 byte-to-unicode map);
  * 256..999   learned merges, in merge order;
  * 1000..1007 the Qwen special tokens (``TINY_SPECIAL_TOKENS``);
  * 1008..1023 unused (the ``tiny`` model's embedding is padded to 1024).

Pre-tokenisation is Qwen2's regex (every digit is its own pre-token, so numbers
tokenise one digit per token) with one alternative put in front: the six
Think-Look-Answer tags are whole pre-tokens, so BPE learns each as one token.
There is no Unicode normaliser (Qwen has NFC): decode(encode(s)) == s exactly.

Determinism: the corpus is generated from a fixed-seed ``random.Random``; the
trainer's merges are deterministic for a given corpus; ids are then re-assigned
canonically (bytes, then merges in order) so nothing depends on hash-map order.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models  # noqa: E402
from tokenizers import pre_tokenizers, processors, trainers  # noqa: E402

from dipr1_jax.tokens import TINY_NUM_REGULAR, TINY_SPECIAL_TOKENS  # noqa: E402

SEED = 20250529
TAGS = ("<think>", "</think>", "<look>", "</look>", "<answer>", "</answer>")

# Qwen2's pre-tokeniser regex, with the tag alternative in front.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TAG = r"</?(?:think|look|answer)>"
# A tag is one pre-token, and whitespace before a tag is its own pre-token (so
# " </think>" is " " + "</think>", not Qwen's " </" + "think" + ">").
SPLIT_PATTERN = _TAG + r"|\s+(?=" + _TAG + r")|" + QWEN_SPLIT

DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen2-VL style chat template (written for this project). Text content is
# emitted verbatim; an image item becomes <|vision_start|><|image_pad|><|vision_end|>
# (the processor later repeats <|image_pad|> once per merged patch). No
# whitespace-control dashes and no newline right after a block tag, so the
# output is the same with or without jinja's trim_blocks/lstrip_blocks.
CHAT_TEMPLATE = (
    "{% set ns = namespace(images=0, videos=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{% set ns.images = ns.images + 1 %}"
    "{% if add_vision_id %}Picture {{ ns.images }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}"
    "{% set ns.videos = ns.videos + 1 %}"
    "{% if add_vision_id %}Video {{ ns.videos }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in item %}"
    "{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

# --------------------------------------------------------------------------
# Corpus (generated, deterministic)
# --------------------------------------------------------------------------

_SCENES = (
    "a crowded street", "a busy crosswalk", "a train platform", "a shopping mall",
    "a stadium", "a city square", "a market", "a concert hall", "a parade",
    "an airport terminal", "a park", "a subway station", "a festival",
    "a university campus", "a beach", "a sidewalk at night", "a bus stop",
    "an intersection seen from a drone", "a highway seen from above",
)
_PEOPLE = (
    "people", "pedestrians", "persons", "adults", "children", "cyclists",
    "riders", "shoppers", "tourists", "commuters", "spectators", "workers",
)
_ACTIONS = (
    "walking", "standing", "sitting", "running", "waiting", "talking",
    "crossing the road", "riding bicycles", "carrying bags", "holding umbrellas",
    "looking at phones", "queuing", "dancing", "watching",
)
_PLACES = (
    "in the foreground", "in the background", "near the left edge",
    "near the right edge", "at the top of the image", "at the bottom",
    "in the center", "behind the railing", "under the trees",
    "next to the car", "far away", "close to the camera",
)
_HARD = (
    "Several of them are heavily occluded by others.",
    "Some people are very small and far from the camera.",
    "Two groups overlap, which makes the boundaries unclear.",
    "A few persons are partially hidden behind vehicles.",
    "The lighting is poor and some figures are blurry.",
    "There are reflections in the glass that look like people.",
    "Some people are cut off by the image border.",
    "A mannequin in the shop window could be mistaken for a person.",
)
_COUNT_WORDS = ("about", "roughly", "around", "at least", "nearly", "exactly")

_PROMPTS = (
    "Detect every person in the image. First think about the whole scene "
    "inside <think> </think>, then list the ambiguous regions that need a "
    "closer look inside <look> </look>, and finally output all persons as a "
    "JSON list of {\"bbox_2d\": [x1, y1, x2, y2], \"label\": \"person\"} "
    "inside <answer> </answer>.",
    "Locate all pedestrians in this image and output their bounding boxes in "
    "JSON format.",
    "Find every person, including occluded and tiny ones. Output the "
    "coordinates as [x1, y1, x2, y2].",
    "How many people are in this image? Answer with a single number inside "
    "<answer> </answer>.",
    "Please output bbox coordinates and labels of all people in the picture.",
    "Outline the position of each person and output all the coordinates in "
    "JSON format.",
)

_ENGLISH_WORDS = (
    "the of and to in is was that for it with as on be at by this had not are but "
    "from or have an they which one you were her all she there would their we him "
    "been has when who will more no if out so said what up its about into than them "
    "can only other new some could time these two may then do first any my now such "
    "like our over man me even most made after also did many before must through back "
    "years where much your way well down should because each just those people how "
    "too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three states "
    "himself few house use during without again place american around however home "
    "small found thought went say part once general high upon school every does got "
    "united left number course war until always away something fact though water "
    "less public put think almost hand enough far took head yet government system "
    "better set told nothing night end why called didn find look going asked later "
    "knew point next program city business give group toward young days let room "
    "president side social given present several order national possible rather "
    "second face per among form important often things looked early white case john "
    "become large big need four within felt along children saw best church ever "
    "least power development light thing seemed family interest want members mind "
    "country area others done turned although open god service certain kind problem "
    "began different door thus help sense means whole matter perhaps itself york "
    "times law human line above name example action company hands local show whether "
    "five history gave today either act feet across taken past quite anything seen "
    "having death week experience body word half really field am car words already "
    "themselves information tell together college shall money period held keep sure "
    "probably free real seems behind cannot miss political air question making "
    "office brought whose special heard major problems ago became federal study "
    "available known result street economic boy position reason change south board "
    "individual job society areas west close turn love community true court force "
    "full seem cost wife future age voice center woman control common policy necessary "
    "image person detect box boxes answer look region scene crowd crowded occluded "
    "visible hidden partially detection model training reward precision recall "
    "camera frame pixel width height left right top bottom coordinates label count"
).split()


def _sentence(rng: random.Random) -> str:
    n = rng.randint(5, 16)
    words = [rng.choice(_ENGLISH_WORDS) for _ in range(n)]
    words[0] = words[0].capitalize()
    text = " ".join(words)
    if rng.random() < 0.3:
        cut = rng.randint(1, n - 1)
        text = " ".join(words[:cut]) + ", " + " ".join(words[cut:])
    return text + rng.choice((".", ".", ".", "?", "!"))


def _box(rng: random.Random, w: int, h: int) -> list[int]:
    bw = rng.randint(4, max(5, w // 4))
    bh = rng.randint(8, max(9, h // 3))
    x1 = rng.randint(0, w - bw)
    y1 = rng.randint(0, h - bh)
    return [x1, y1, x1 + bw, y1 + bh]


def _box_json(boxes: list[list[int]], label: bool, rng: random.Random) -> str:
    sep = rng.choice((", ", ", ", ",\n"))
    items = []
    for b in boxes:
        coords = ", ".join(str(v) for v in b)
        if label:
            items.append('{"bbox_2d": [' + coords + '], "label": "person"}')
        else:
            items.append('{"bbox_2d": [' + coords + "]}")
    return "[" + sep.join(items) + "]"


def _think(rng: random.Random, count: int) -> str:
    parts = [
        f"The image shows {rng.choice(_SCENES)} with {rng.choice(_COUNT_WORDS)} "
        f"{count} {rng.choice(_PEOPLE)} {rng.choice(_ACTIONS)} {rng.choice(_PLACES)}.",
        rng.choice(_HARD),
    ]
    if rng.random() < 0.5:
        parts.append(
            f"Most {rng.choice(_PEOPLE)} are {rng.choice(_ACTIONS)} "
            f"{rng.choice(_PLACES)}, and a few are {rng.choice(_ACTIONS)} "
            f"{rng.choice(_PLACES)}."
        )
    if rng.random() < 0.3:
        parts.append(_sentence(rng))
    return " ".join(parts)


def _completion(rng: random.Random) -> str:
    w = rng.choice((640, 728, 812, 980, 1024, 1260, 1540, 1920))
    h = rng.choice((448, 504, 616, 700, 756, 980, 1080))
    n = rng.choice((0, 1, 2, 3, 5, 8, 12, 20, 30))
    answer = [_box(rng, w, h) for _ in range(n)]
    look = [_box(rng, w, h) for _ in range(rng.randint(0, 4))]
    nl = rng.choice(("\n", "\n", " "))
    if rng.random() < 0.15:  # counting prompt: the answer is one integer
        ans = str(n)
    else:
        ans = _box_json(answer, label=rng.random() < 0.8, rng=rng)
        if rng.random() < 0.1:
            ans = "```json\n" + ans + "\n```"
    return (
        f"<think> {_think(rng, n)} </think>{nl}"
        f"<look> {_box_json(look, label=False, rng=rng)} </look>{nl}"
        f"<answer> {ans} </answer>"
    )


def build_corpus(seed: int = SEED) -> list[str]:
    """The training texts, a pure function of ``seed``."""
    rng = random.Random(seed)
    texts: list[str] = []
    for i in range(4000):
        texts.append(_completion(rng))
        if i % 4 == 0:
            texts.append(rng.choice(_PROMPTS))
        if i % 2 == 0:
            texts.append(" ".join(_sentence(rng) for _ in range(rng.randint(1, 4))))
        if i % 10 == 0:
            texts.append(
                f"system\n{DEFAULT_SYSTEM}\nuser\n{rng.choice(_PROMPTS)}\nassistant\n"
            )
        if i % 8 == 0:  # bare numbers and lists, as in counting and bare-box answers
            texts.append(f"[{', '.join(str(v) for v in _box(rng, 1280, 720))}]")
    return texts


# --------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable unicode map, as a list indexed by byte value."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    out: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def _pre_tokenizer():
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _train_merges(corpus: list[str]) -> list[tuple[str, str]]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_NUM_REGULAR,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def build_tokenizer() -> Tokenizer:
    merges = _train_merges(build_corpus())
    vocab: dict[str, int] = {}
    for sym in _byte_symbols():
        vocab[sym] = len(vocab)
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    if len(vocab) != TINY_NUM_REGULAR:
        raise RuntimeError(
            f"trained {len(vocab)} regular tokens, expected {TINY_NUM_REGULAR}: "
            "the corpus is too small for the requested vocabulary"
        )
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=list(merges), fuse_unk=False, byte_fallback=False)
    )
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = sorted(TINY_SPECIAL_TOKENS.items(), key=lambda kv: kv[1])
    tok.add_special_tokens(
        [AddedToken(s, special=True, normalized=False, lstrip=False, rstrip=False) for s, _ in specials]
    )
    for s, i in specials:
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s} got id {tok.token_to_id(s)}, expected {i}")
    return tok


def tokenizer_config() -> dict:
    specials = sorted(TINY_SPECIAL_TOKENS.items(), key=lambda kv: kv[1])
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": [
            s for s, _ in specials if s not in ("<|im_end|>", "<|endoftext|>")
        ],
        "added_tokens_decoder": {
            str(i): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for s, i in specials
        },
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 32768,
        "split_special_tokens": False,
    }


def write(out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    tok_path = os.path.join(out_dir, "tokenizer.json")
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    text = build_tokenizer().to_str(pretty=True)
    with open(tok_path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text + "\n")
    with open(cfg_path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(tokenizer_config(), indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return [tok_path, cfg_path]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(_ROOT, "dipr1_jax", "assets"))
    args = p.parse_args(argv)
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
