"""Reward job on very dense scenes (up to 150 people) with hard-match accuracy.

Run: python -m dipr1_jax.launch --config=configs/dense_crowd_rewards.py
"""

from dipr1_jax.config import Config, DemoConfig, GRPOConfig, RewardConfig


def get_config() -> Config:
    return Config(
        mode="reward-demo",
        rewards=RewardConfig(soft_tp=False, max_boxes=192, look_iou_var_weight=0.5),
        grpo=GRPOConfig(group_size=16),
        demo=DemoConfig(batch_size=4, max_gt=150, steps=3),
    )
