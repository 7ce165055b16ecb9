"""A minimal deterministic Euler ODE sampler for any :class:`~cgrpo.policy.base.Policy` (SFT previews, evals).

FLUX-style schedule (:func:`cgrpo.sde.flux_sigmas`): ``T`` sigmas ``linspace(1, 1/T, T)`` then a final 0,
warped by a static time shift ``s' = shift * s / (1 + (shift - 1) * s)`` (``shift > 1`` spends more steps at
high noise). One Euler step is ``x <- x + (s_next - s) * v(x, s)`` with ``v = noise - x0``.
"""

from __future__ import annotations

import torch

from cgrpo.policy.base import Conditioning, Policy
from cgrpo.sde import flux_sigmas

__all__ = ["flux_sigmas", "sample_ode"]


@torch.no_grad()
def sample_ode(
    policy: Policy,
    cond: Conditioning,
    num_steps: int,
    generator: torch.Generator | None = None,
    sigmas: torch.Tensor | None = None,
    shift: float = 1.0,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate the flow ODE from noise to clean latents ``[B, N, C]`` (float32).

    ``sigmas`` ``[T + 1]`` overrides the FLUX schedule; ``latents`` ``[B, N, C]`` overrides the initial noise
    (otherwise drawn from ``generator``).
    """
    if sigmas is None:
        sigmas = flux_sigmas(num_steps, shift=shift)
    if latents is None:
        latents = policy.initial_noise(len(cond), generator=generator)
    x = latents.float()
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        v = policy.velocity(x, torch.full((x.shape[0],), sigma), cond).to(x.device)
        x = x + (sigma_next - sigma) * v
    return x
