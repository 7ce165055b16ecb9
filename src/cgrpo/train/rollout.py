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
    shard: tuple[slice, int] | None = None,
) -> Trajectory:
    """Sample ``len(cond)`` trajectories; SDE on ``sde_steps`` (``[T]`` bool), Euler ODE elsewhere.

    All randomness comes from ``generator`` (CPU), so a seed reproduces the rollout exactly on CPU.
    ``shard = (rows, total)``: this process rolls out rows ``rows`` of a global batch of ``total`` samples
    (``cond`` holds those rows only). The noise is still drawn for all ``total`` samples and sliced, so every
    process keeps the same generator state and 1 or W processes produce the same samples.
    """
    num_samples = len(cond)
    rows, total = shard if shard is not None else (slice(0, num_samples), num_samples)
    if len(range(total)[rows]) != num_samples:
        raise ValueError(f"shard {rows} of {total} samples does not match the {num_samples} conditions")
    num_steps = len(sigmas) - 1
    latents = policy.initial_noise(total, generator)[rows] if initial_noise is None else initial_noise.float()
    latents = latents.to(
        cond.prompt_embeds.device
    )  # noise comes from a CPU generator; the model may be on GPU
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
        if bool(sde_steps[t]) and noise_level == 0:  # a deterministic "SDE" step draws no noise
            step = sde_step_with_logprob(velocity, sigma, sigma_next, latents, 0.0, formulation=formulation)
            latents, log_probs[:, t] = step.prev_sample.float(), step.log_prob.float()
        elif bool(sde_steps[t]) and num_samples == total:  # all rows here: the generator draws directly
            step = sde_step_with_logprob(
                velocity,
                sigma,
                sigma_next,
                latents,
                noise_level,
                generator=generator,
                formulation=formulation,
            )
            latents, log_probs[:, t] = step.prev_sample.float(), step.log_prob.float()
        elif bool(sde_steps[t]):
            noise = _global_noise(generator, total, latents.shape[1:])[rows]
            # The transition's mean and std, then the sample, then its log-prob (the same arithmetic
            # sde_step_with_logprob performs when it draws the noise itself, on this process's rows).
            moments = sde_step_with_logprob(
                velocity,
                sigma,
                sigma_next,
                latents,
                noise_level,
                prev_sample=latents,
                formulation=formulation,
            )
            drawn = moments.mean + moments.std.view(-1, *([1] * (latents.ndim - 1))) * noise.to(
                latents.device
            )
            step = sde_step_with_logprob(
                velocity, sigma, sigma_next, latents, noise_level, prev_sample=drawn, formulation=formulation
            )
            latents, log_probs[:, t] = step.prev_sample.float(), step.log_prob.float()
        else:
            latents = ode_step(velocity, sigma, sigma_next, latents).float()
        states.append(latents)
    return Trajectory(torch.stack(states, dim=1), log_probs, sigmas.float(), sde_steps.bool())


def _global_noise(generator: torch.Generator, total: int, shape: torch.Size) -> torch.Tensor:
    return torch.randn((total, *shape), generator=generator, dtype=torch.float32, device=generator.device)


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
