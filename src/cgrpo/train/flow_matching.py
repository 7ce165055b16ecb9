"""Training noise levels for flow matching (SFT's regression, RPO's Diffusion-DPO terms)."""

from __future__ import annotations

from typing import Literal

import torch

SigmaSampling = Literal["logit_normal", "uniform"]


def sample_sigmas(
    batch_size: int,
    sampling: SigmaSampling,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[B]`` noise levels in (0, 1): uniform (Diffusion-DPO's timesteps), or logit-normal
    ``sigmoid(N(logit_mean, logit_std))`` (SD3 / FLUX: most samples at mid noise, where the velocity is
    hardest to predict). One ``torch.rand`` or ``torch.randn`` call of ``batch_size`` on ``generator``."""
    if sampling == "uniform":
        return torch.rand(batch_size, generator=generator)
    if sampling != "logit_normal":
        raise ValueError(f"unknown sigma sampling {sampling!r}; expected logit_normal or uniform")
    normal = torch.randn(batch_size, generator=generator)
    return torch.sigmoid(logit_mean + logit_std * normal)
