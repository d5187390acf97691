"""The built-in default: the reward job on synthetic crowded scenes.

Run: python -m dipr1_jax.launch --config=configs/default.py [--config.grpo.beta=0.02 ...]
"""

from dipr1_jax.config import Config


def get_config() -> Config:
    return Config()
