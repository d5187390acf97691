"""Training loops (SFT, GRPO, evaluation) and their run-directory writers."""
