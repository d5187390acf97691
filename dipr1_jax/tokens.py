"""Special-token ids of the ``tiny`` model config and the built-in tokenizer.

The shipped byte-level BPE tokenizer (``dipr1_jax/assets/tokenizer.json``) and
the ``tiny`` model preset agree on these ids; real checkpoints carry their own
ids in ``config.json`` / ``tokenizer.json`` (Qwen2.5-VL: 151643 and up).
Regular BPE tokens use ids ``0 .. TINY_NUM_REGULAR - 1``.
"""

TINY_VOCAB_SIZE = 1024
TINY_NUM_REGULAR = 1000

TINY_SPECIAL_TOKENS = {
    "<|endoftext|>": 1000,
    "<|im_start|>": 1001,
    "<|im_end|>": 1002,
    "<|vision_start|>": 1003,
    "<|vision_end|>": 1004,
    "<|vision_pad|>": 1005,
    "<|image_pad|>": 1006,
    "<|video_pad|>": 1007,
}

TINY_EOS_TOKEN_ID = TINY_SPECIAL_TOKENS["<|im_end|>"]
TINY_PAD_TOKEN_ID = TINY_SPECIAL_TOKENS["<|endoftext|>"]
TINY_IMAGE_TOKEN_ID = TINY_SPECIAL_TOKENS["<|image_pad|>"]
TINY_VIDEO_TOKEN_ID = TINY_SPECIAL_TOKENS["<|video_pad|>"]
TINY_VISION_START_TOKEN_ID = TINY_SPECIAL_TOKENS["<|vision_start|>"]
TINY_VISION_END_TOKEN_ID = TINY_SPECIAL_TOKENS["<|vision_end|>"]
