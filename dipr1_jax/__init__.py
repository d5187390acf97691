"""dipr1_jax: DIP-R1 (GRPO with detection rewards) for Qwen2.5-VL in JAX/Flax."""

__version__ = "0.1.0"
