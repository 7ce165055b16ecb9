"""Group rollouts: SDE sampling that stores every transition and its log-probability.

A rollout of N = B * G samples over T steps keeps the states ``x_0 (noise) ... x_T (clean)`` so that the
training pass can re-evaluate the log-probability of exactly the transitions that were sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cgrpo.policy.base import Conditioning, Policy
from cgrpo.sde import ode_step, sde_step_with_logprob


@dataclass
class Trajectory:
    """States and log-probs of N rollouts.

    - ``latents``: ``[N, T + 1, L, C]`` float32, ``latents[:, t]`` is the state before step t;
    - ``log_probs``: ``[N, T]`` float32 log-prob of transition t under the rollout policy (0 on ODE steps);
    - ``sigmas``: ``[T + 1]`` noise levels, ``sigmas[t] -> sigmas[t + 1]`` is step t;
    - ``sde_steps``: ``[T]`` bool, which steps were stochastic (only those can be trained).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    sde_steps: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


@torch.no_grad()
def rollout(
    policy: Policy,
    cond: Conditioning,
    sigmas: torch.Tensor,
    sde_steps: torch.Tensor,
    generator: torch.Generator,
    noise_level: float = 0.7,
    formulation: str = "flow_grpo",
    micro_batch: int = 0,
    initial_noise: torch.Tensor | None = None,
) -> Trajectory:
    """Sample ``len(cond)`` trajectories; SDE on ``sde_steps`` (``[T]`` bool), Euler ODE elsewhere.

    All randomness comes from ``generator`` (CPU), so a seed reproduces the rollout exactly on CPU.
    """
    num_samples = len(cond)
    num_steps = len(sigmas) - 1
    latents = policy.initial_noise(num_samples, generator) if initial_noise is None else initial_noise.float()
    states = [latents]
    log_probs = torch.zeros(num_samples, num_steps)
    chunk = micro_batch or num_samples
    for t in range(num_steps):
        sigma, sigma_next = float(sigmas[t]), float(sigmas[t + 1])
        velocity = torch.cat(
            [
                policy.velocity(
                    latents[i : i + chunk],
                    torch.full((min(chunk, num_samples - i),), sigma),
                    cond.index(slice(i, i + chunk)),
                )
                for i in range(0, num_samples, chunk)
            ]
        )
        if bool(sde_steps[t]):
            step = sde_step_with_logprob(
                velocity,
                sigma,
                sigma_next,
                latents,
                noise_level=noise_level,
                generator=generator,
                formulation=formulation,
            )
            latents, log_probs[:, t] = step.prev_sample.float(), step.log_prob.float()
        else:
            latents = ode_step(velocity, sigma, sigma_next, latents).float()
        states.append(latents)
    return Trajectory(torch.stack(states, dim=1), log_probs, sigmas.float(), sde_steps.bool())


@torch.no_grad()
def sample_images(
    policy: Policy,
    cond: Conditioning,
    sigmas: torch.Tensor,
    generator: torch.Generator,
    micro_batch: int = 0,
) -> torch.Tensor:
    """Deterministic ODE samples (evaluation): images ``[N, 3, H, W]`` in [0, 1]."""
    no_sde = torch.zeros(len(sigmas) - 1, dtype=torch.bool)
    trajectory = rollout(policy, cond, sigmas, no_sde, generator, micro_batch=micro_batch)
    return policy.decode(trajectory.final)
