"""DIP-R1 reward kernels: box geometry, greedy matching, parsing, rewards."""

from dipr1_jax.rewards.boxes import box_area, box_ioa, box_iou
from dipr1_jax.rewards.dip import (accuracy_reward, count_reward, dip_rewards, ignored_answers,
                                   look_reward)
from dipr1_jax.rewards.matching import match_greedy, match_pairs
from dipr1_jax.rewards.parse import ParsedCompletions, parse_completions, parse_one

__all__ = [
    "box_area", "box_ioa", "box_iou", "match_greedy", "match_pairs", "parse_completions",
    "parse_one", "ParsedCompletions", "dip_rewards", "accuracy_reward", "count_reward",
    "look_reward", "ignored_answers",
]
