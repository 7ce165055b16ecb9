"""Rewards: ``build(name, **options)`` returns a callable ``(images, references, prompts) -> Tensor[N]``."""

from cgrpo.rewards.base import REWARDS, Reward, build, check, describe, names, register, to_pil, to_tensor

__all__ = ["REWARDS", "Reward", "build", "check", "describe", "names", "register", "to_pil", "to_tensor"]
