"""Customized-GRPO: RL post-training of subject-driven image generators."""

__version__ = "0.1.0"
