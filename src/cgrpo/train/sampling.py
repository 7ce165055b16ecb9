"""The one sampler: GRPO rollouts (SDE steps with log-probabilities), deterministic ODE samples and per-item
seeded noise, for training, the held-out evaluation, ``cgrpo eval``, ``cgrpo sample`` and the analyses.

One denoising loop (:func:`_denoise`) runs every caller. Step t goes from ``sigmas[t]`` to ``sigmas[t + 1]``:
an Euler ODE step ``x <- x + (s_next - s) * v(x, s)`` (``v = noise - x0``), or on the ``sde_steps`` an SDE
step that draws noise and records its log-probability (:func:`cgrpo.sde.sde_step_with_logprob`). The
schedule always comes from the caller (:func:`schedule` gives the usual one).

Initial noise: rollouts draw it for the whole batch from one generator (training: the state of the run's
generator decides it). Evaluation draws it per item from the item's own seed (:func:`item_seed`,
:func:`seeded_noise`), so an image does not depend on the batch it is generated in, on the order or on
the micro-batch: the trainer's held-out evaluation and ``cgrpo eval`` give the same image for the same
policy, prompt, reference and seed.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cgrpo.policy.base import Conditioning, Policy
from cgrpo.sde import flux_sigmas, ode_step, sde_step_with_logprob

__all__ = [
    "StepHook",
    "Trajectory",
    "item_seed",
    "ode_sample",
    "rollout",
    "sample_images",
    "schedule",
    "seeded_images",
    "seeded_noise",
]

StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``hook(t, latents, velocity)``: the state ``[B, N, C]`` before step t and the velocity predicted there."""


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


# --- schedule and noise ----------------------------------------------------------------------------------


def schedule(policy: Policy, num_steps: int | None = None, shift: float | None = None) -> torch.Tensor:
    """``[T + 1]`` sigmas: the policy's schedule (:meth:`Policy.sigmas`: FLUX's dynamic shift at its token
    count unless the backbone has its own, e.g. UNO's) unless a static ``shift`` is asked for, which gives
    FLUX's sigmas with that shift.

    ``num_steps`` None: the policy's default step count (with ``shift``: 28)."""
    if shift is None:
        return policy.sigmas(num_steps)
    return flux_sigmas(num_steps or 28, image_seq_len=policy.latent_shape[0], shift=shift)


def item_seed(seed: int, subject: str, prompt: str, k: int) -> int:
    """A seed for one image, stable across runs, machines and Python versions (CRC-32, not ``hash``)."""
    return zlib.crc32(f"{seed}|{subject}|{prompt}|{k}".encode()) & 0x7FFFFFFF


def seeded_noise(policy: Policy, seeds: Sequence[int]) -> torch.Tensor:
    """Initial noise ``[B, N, C]`` (float32, CPU): row i drawn from a generator seeded with ``seeds[i]``."""
    return torch.cat([policy.initial_noise(1, torch.Generator().manual_seed(int(s))) for s in seeds])


# --- sampling --------------------------------------------------------------------------------------------


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
    latents = policy.initial_noise(total, generator)[rows] if initial_noise is None else initial_noise
    states: list[torch.Tensor] = []
    _, log_probs = _denoise(
        policy,
        cond,
        sigmas,
        latents,
        sde_steps=sde_steps,
        generator=generator,
        noise_level=noise_level,
        formulation=formulation,
        micro_batch=micro_batch,
        shard=(rows, total),
        states=states,
    )
    return Trajectory(torch.stack(states, dim=1), log_probs, sigmas.float(), sde_steps.bool())


@torch.no_grad()
def ode_sample(
    policy: Policy,
    cond: Conditioning,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    micro_batch: int = 0,
    on_step: StepHook | None = None,
) -> torch.Tensor:
    """Integrate the flow ODE from ``noise`` ``[B, N, C]`` along ``sigmas`` ``[T + 1]`` to clean latents
    ``[B, N, C]`` (float32). ``on_step`` sees the state and the velocity of every step (the analyses)."""
    final, _ = _denoise(policy, cond, sigmas, noise, micro_batch=micro_batch, on_step=on_step)
    return final


@torch.no_grad()
def sample_images(
    policy: Policy, cond: Conditioning, sigmas: torch.Tensor, noise: torch.Tensor, micro_batch: int = 0
) -> torch.Tensor:
    """Deterministic ODE samples from ``noise`` ``[B, N, C]``: images ``[B, 3, H, W]`` in [0, 1]."""
    return policy.decode(ode_sample(policy, cond, sigmas, noise, micro_batch=micro_batch))


@torch.no_grad()
def seeded_images(
    policy: Policy, cond: Conditioning, seeds: Sequence[int], sigmas: torch.Tensor, micro_batch: int = 0
) -> torch.Tensor:
    """The evaluation images ``[B, 3, H, W]``: ODE samples whose row i starts from the noise of ``seeds[i]``
    (see the module docstring: independent of batching, order and micro-batch)."""
    return sample_images(policy, cond, sigmas, seeded_noise(policy, seeds), micro_batch=micro_batch)


def _denoise(
    policy: Policy,
    cond: Conditioning,
    sigmas: torch.Tensor,
    latents: torch.Tensor,
    sde_steps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_level: float = 0.0,
    formulation: str = "flow_grpo",
    micro_batch: int = 0,
    shard: tuple[slice, int] | None = None,
    states: list[torch.Tensor] | None = None,
    on_step: StepHook | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoising loop of every sampler -> (final latents ``[B, N, C]``, log-probs ``[B, T]``).

    ``sde_steps`` ``[T]`` bool (None: all ODE); ``shard`` as in :func:`rollout`; ``states``, when given,
    collects the T + 1 states.
    """
    num_samples, num_steps = len(cond), len(sigmas) - 1
    rows, total = shard if shard is not None else (slice(0, num_samples), num_samples)
    # Noise comes from a CPU generator; the model may be on GPU.
    latents = latents.float().to(cond.prompt_embeds.device)
    if states is not None:
        states.append(latents)
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
        if on_step is not None:
            on_step(t, latents, velocity)
        stochastic = sde_steps is not None and bool(sde_steps[t])
        if stochastic and noise_level == 0:  # a deterministic "SDE" step draws no noise
            step = sde_step_with_logprob(velocity, sigma, sigma_next, latents, 0.0, formulation=formulation)
            latents, log_probs[:, t] = step.prev_sample.float(), step.log_prob.float()
        elif stochastic and num_samples == total:  # all rows here: the generator draws directly
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
        elif stochastic:
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
        if states is not None:
            states.append(latents)
    return latents, log_probs


def _global_noise(generator: torch.Generator, total: int, shape: torch.Size) -> torch.Tensor:
    return torch.randn((total, *shape), generator=generator, dtype=torch.float32, device=generator.device)
