"""The built-in default: the pipeline job on synthetic crowds (base -> SFT -> SFT+GRPO).

Run: python -m dipr1_jax.launch --config=configs/default.py [--config.train.steps=100 ...]
(the same as running with no --config at all).
"""

from dipr1_jax.config import Config


def get_config() -> Config:
    return Config()
