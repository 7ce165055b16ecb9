"""Rectified-flow sampling math: FLUX sigmas, Euler ODE steps and SDE steps with log-probabilities.

Convention: ``x_sigma = (1 - sigma) * x_0 + sigma * noise`` (Eq. 3), sampling runs from ``sigma = 1``
(noise) to ``sigma = 0`` (data) over ``T`` steps, step ``t`` goes from ``sigmas[t]`` to ``sigmas[t + 1]``, and
the model predicts the velocity ``v = noise - x_0``. Real step indices count from ``0`` (noisiest).

The SDE (Appendix B.1, Eq. 13) keeps the marginals of the ODE ``dx = v dsigma``:
``dx = (v - g^2 / 2 * score) dsigma + g dW``, integrated backwards in sigma, with the score estimated from
the velocity: ``x0_hat = x - sigma * v``, ``noise_hat = x + (1 - sigma) * v``,
``score = -noise_hat / sigma``. One Euler-Maruyama step with ``dt = sigma_next - sigma < 0`` is the Gaussian
``N(mean, (g * sqrt(-dt))^2)`` with ``mean = x + (v + g^2 / (2 sigma) * (x + (1 - sigma) v)) * dt``.
The two Euler-Maruyama formulations differ only in the diffusion coefficient ``g``:

- ``flow_grpo`` (Flow-GRPO): ``g = noise_level * sqrt(sigma / (1 - sigma))``;
- ``dance_grpo`` (DanceGRPO's ``eta``): ``g = noise_level``, constant.

A third formulation, ``cps`` (coefficients-preserving sampling, Wang & Yu 2025, arXiv 2509.05952), is not an
Euler-Maruyama step: it re-noises the predicted clean sample so that the next state is exactly
``(1 - sigma_next) * x0_hat + sigma_next * noise`` with unit-variance noise,
``mean = (1 - sigma_next) x0_hat + sigma_next cos(pi eta / 2) noise_hat``,
``std = sigma_next sin(pi eta / 2)``. Over a coarse step the Euler-Maruyama SDE overshoots the next noise
level (tests: std > 1.1 sigma_next for 0.6 -> 0.3); CPS keeps every state at the noise level its sigma says.
The price: its fresh noise does not shrink with the step size, so it does not keep the marginals of data with
spread. On 1-D Gaussian data with the exact velocity, 10 steps and ``eta = 0.7`` end at 55% of the data's
variance (``flow_grpo`` with ``a = 0.7``: 92%; 100 steps: 71% and 100%).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

Tensor = torch.Tensor

FORMULATIONS = ("flow_grpo", "dance_grpo", "cps")
STRATEGIES = ("all", "random", "window")


# --------------------------------------------------------------------------------------------------------
# Sigma schedule
# --------------------------------------------------------------------------------------------------------


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift ``mu``: the line through ``(base_seq_len, base_shift)`` and
    ``(max_seq_len, max_shift)`` evaluated at ``image_seq_len`` (extrapolated outside, as diffusers does)."""
    if max_seq_len == base_seq_len:
        raise ValueError("max_seq_len and base_seq_len must differ")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def flux_sigmas(
    num_steps: int,
    image_seq_len: int | None = None,
    shift: float | None = None,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> Tensor:
    """Noise levels of a ``num_steps``-step rectified-flow sampler, as FLUX samples them.

    The base schedule is ``linspace(1, 1 / num_steps, num_steps)``. It is then shifted either

    - statically (``shift`` given; ``image_seq_len`` is then ignored):
      ``s' = shift * s / (1 + (shift - 1) * s)`` (``shift = 1`` keeps the linear schedule; SD3 uses 3), or
    - by FLUX's resolution-dependent shift (``shift=None``, ``image_seq_len`` required, the number of latent
      tokens, 4096 for a 1024x1024 FLUX image): ``s' = e^mu / (e^mu + (1 / s - 1))`` with
      ``mu = flux_mu(image_seq_len, ...)``.

    This equals diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(...), mu=mu)``
    as ``FluxPipeline`` calls it (tested).

    Returns:
        ``[num_steps + 1]`` float32, ``sigmas[0] = 1`` down to ``sigmas[-1] = 0``.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    if shift is not None:
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
        shifted = shift * base / (1.0 + (shift - 1.0) * base)
    else:
        if image_seq_len is None:
            raise ValueError(
                "pass image_seq_len (number of latent tokens) for FLUX's dynamic shift, or a static shift"
            )
        exp_mu = math.exp(flux_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift))
        shifted = exp_mu / (exp_mu + (1.0 / base - 1.0))
    return torch.cat([shifted, shifted.new_zeros(1)]).to(torch.float32)


# --------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------


def _sigma_column(sigma: float | Tensor, batch: int, ndim: int, device: torch.device, name: str) -> Tensor:
    """A sigma given as a float, a 0-d or a ``[B]`` tensor, as float32 ``[B, 1, ..., 1]`` (``ndim`` dims)."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    if s.ndim == 0:
        s = s.expand(batch)
    if s.shape != (batch,):
        raise ValueError(
            f"{name} must be a float or a [B] tensor with B = {batch}, got shape {tuple(s.shape)}"
        )
    return s.reshape(batch, *([1] * (ndim - 1)))


def ode_step(velocity: Tensor, sigma: float | Tensor, sigma_next: float | Tensor, sample: Tensor) -> Tensor:
    """Euler step of the flow ODE: ``sample + (sigma_next - sigma) * velocity``.

    ``velocity`` and ``sample``: ``[B, ...]``; ``sigma``, ``sigma_next``: floats or ``[B]``.
    Returns float32 ``[B, ...]``.
    """
    if velocity.shape != sample.shape:
        raise ValueError(
            f"velocity {tuple(velocity.shape)} and sample {tuple(sample.shape)} must have the same shape"
        )
    b, nd, dev = sample.shape[0], sample.ndim, sample.device
    s = _sigma_column(sigma, b, nd, dev, "sigma")
    s_next = _sigma_column(sigma_next, b, nd, dev, "sigma_next")
    return sample.float() + (s_next - s) * velocity.float()


class SDEStep(NamedTuple):
    """One SDE transition (all float32).

    - ``prev_sample``: ``[B, ...]`` the next state (drawn, or the one passed in);
    - ``log_prob``: ``[B]`` Gaussian log-density of ``prev_sample``, averaged over the non-batch dims;
    - ``mean``: ``[B, ...]`` mean of the transition (differentiable w.r.t. the velocity);
    - ``std``: ``[B]`` standard deviation of the transition, ``g * sqrt(sigma - sigma_next)``.
    """

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


def sde_step_with_logprob(
    velocity: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    sample: Tensor,
    noise_level: float = 0.7,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    formulation: str = "flow_grpo",
) -> SDEStep:
    """One Euler-Maruyama step of the marginal-preserving SDE and the log-probability of its result.

    Args:
        velocity: ``[B, ...]`` model output ``v`` at ``(sample, sigma)``; any float dtype (bf16 is fine:
            everything is computed in float32).
        sigma, sigma_next: current and next noise level, floats or ``[B]`` tensors, with
            ``0 <= sigma_next < sigma <= 1``.
        sample: ``[B, ...]`` current state ``x_sigma``.
        noise_level: ``a`` of Flow-GRPO / ``eta`` of DanceGRPO, >= 0.
        prev_sample: a stored next state; if given, no noise is drawn and its log-prob under the current
            velocity is returned (the training-time re-evaluation of a rollout transition).
        generator: ``torch.Generator`` for the noise (drawn in float32 on the generator's device, then
            moved to ``sample``'s device), so a seed reproduces the noise on CPU whatever the dtypes.
        formulation: ``"flow_grpo"`` — ``g = noise_level * sqrt(sigma / (1 - sigma))``. At ``sigma = 1``
            that is infinite; Flow-GRPO then uses ``sigma_max = sigmas[1]``, the next-largest level, in
            the denominator. Here the denominator uses ``sigma_next`` when ``sigma == 1``, which is
            ``sigmas[1]`` at the first step of any schedule starting at 1 (finite because
            ``sigma_next < 1``). ``"dance_grpo"`` — DanceGRPO's constant ``g = noise_level``.
            ``"cps"`` — coefficients-preserving sampling (module docstring); ``noise_level`` is its
            ``eta`` in ``[0, 1]`` and ``sigma_next`` must be > 0 (its std is ``sigma_next sin(pi eta / 2)``).

    Returns:
        :class:`SDEStep`. For the Euler-Maruyama formulations
        ``mean = x + (v + g^2 / (2 sigma) * (x + (1 - sigma) v)) * dt`` with ``dt = sigma_next - sigma``;
        for ``flow_grpo`` this is Flow-GRPO's
        ``x (1 + g^2 dt / (2 sigma)) + v (1 + g^2 (1 - sigma) / (2 sigma)) dt``. The log-prob is
        ``log N(prev_sample; mean, std^2)`` per element, averaged over all non-batch dims; the stored
        ``prev_sample`` is treated as a constant, so gradients flow only through ``velocity``.

    ``noise_level = 0`` is the deterministic Euler ODE step: ``prev_sample = mean = ode_step(...)`` (or the
    given ``prev_sample``), ``std = 0`` and ``log_prob`` is all zeros because a point mass has no density —
    such a step carries no policy gradient and must not be trained.

    The last step of a schedule (``sigma_next = 0``) is allowed: its std is finite, but the noise it adds
    stays in the final sample (about ``noise_level * sigma`` for ``flow_grpo``), which should be clean.
    Keep that step deterministic in rollouts; :func:`select_steps` and :func:`sde_window` only return
    steps among the first ``T - 1``.
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {', '.join(FORMULATIONS)}; got {formulation!r}")
    if not (math.isfinite(noise_level) and noise_level >= 0):
        raise ValueError(f"noise_level must be a finite number >= 0, got {noise_level!r}")
    if velocity.shape != sample.shape:
        raise ValueError(
            f"velocity {tuple(velocity.shape)} and sample {tuple(sample.shape)} must have the same shape"
        )
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample {tuple(prev_sample.shape)} must have the shape of sample {tuple(sample.shape)}"
        )
    b, nd, device = sample.shape[0], sample.ndim, sample.device
    s = _sigma_column(sigma, b, nd, device, "sigma")
    s_next = _sigma_column(sigma_next, b, nd, device, "sigma_next")
    if bool(((s <= 0) | (s > 1) | (s_next < 0) | (s_next >= s)).any()):
        raise ValueError(
            f"an SDE step needs 0 <= sigma_next < sigma <= 1, got sigma={s.flatten().tolist()} "
            f"and sigma_next={s_next.flatten().tolist()}"
        )
    x, v = sample.float(), velocity.float()
    dt = s_next - s  # < 0: sampling runs towards sigma = 0

    if formulation == "cps":
        if noise_level > 1:
            raise ValueError(f"noise_level (eta) of cps must lie in [0, 1], got {noise_level}")
        if noise_level > 0 and bool((s_next <= 0).any()):
            raise ValueError("a cps step with noise needs sigma_next > 0; keep the last step deterministic")
        angle = 0.5 * math.pi * noise_level
        x0_hat, noise_hat = x - s * v, x + (1.0 - s) * v
        mean = (1.0 - s_next) * x0_hat + s_next * math.cos(angle) * noise_hat
        std = s_next * math.sin(angle)  # [B, 1, ..., 1]
    else:
        if formulation == "flow_grpo":
            # sigma == 1 only at the first step; sigma_next < 1 there keeps g finite (Flow-GRPO's sigmas[1]).
            denominator = 1.0 - torch.where(s >= 1.0, s_next, s)
            g = noise_level * torch.sqrt(s / denominator)
        else:
            g = torch.full_like(s, noise_level)
        # Drift of the reverse SDE: v - g^2/2 * score, with score = -(x + (1 - sigma) v) / sigma.
        mean = x + (v + g.square() / (2.0 * s) * (x + (1.0 - s) * v)) * dt
        std = g * torch.sqrt(-dt)  # [B, 1, ..., 1]
    std_b = std.reshape(b)

    if noise_level == 0:
        out = mean if prev_sample is None else prev_sample.float()
        return SDEStep(out, torch.zeros(b, dtype=torch.float32, device=device), mean, std_b)

    if prev_sample is None:
        noise_device = generator.device if generator is not None else device
        noise = torch.randn(sample.shape, generator=generator, dtype=torch.float32, device=noise_device)
        prev_sample = mean + std * noise.to(device)
    prev = prev_sample.detach().float()

    log_density = (
        -(prev - mean).square() / (2.0 * std.square()) - torch.log(std) - 0.5 * math.log(2.0 * math.pi)
    )
    log_prob = log_density.mean(dim=tuple(range(1, nd))) if nd > 1 else log_density
    return SDEStep(prev, log_prob, mean, std_b)


# --------------------------------------------------------------------------------------------------------
# Which steps are stochastic / trained
# --------------------------------------------------------------------------------------------------------


def _check_num_steps(num_steps: int) -> int:
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(
            f"num_steps must be an integer >= 2 (the last step is never trained), got {num_steps!r}"
        )
    return num_steps - 1  # trainable steps: the first T - 1


def select_steps(
    num_steps: int,
    strategy: str = "all",
    k: int | None = None,
    generator: torch.Generator | None = None,
    window_start: int | None = None,
    window_size: int | None = None,
) -> Tensor:
    """Real step indices to train in one iteration (Algorithm 1, line 10), a sorted LongTensor.

    Steps are drawn from the first ``T - 1`` steps: the last one lands on ``sigma = 0`` and is kept
    deterministic (noise there would stay in the final image; see :func:`sde_step_with_logprob`). The paper
    trains 14 of the 24 SDE steps of T = 25.

    - ``"all"``: ``0 .. T - 2``;
    - ``"random"``: ``k`` distinct steps drawn uniformly with ``generator`` (fresh each iteration);
    - ``"window"``: ``window_size`` consecutive steps from ``window_start`` (see :func:`sde_window`).
    """
    trainable = _check_num_steps(num_steps)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if strategy == "all":
        return torch.arange(trainable, dtype=torch.long)
    if strategy == "random":
        if k is None or not 1 <= k <= trainable:
            raise ValueError(
                f"k must be between 1 and num_steps - 1 = {trainable} for strategy 'random', got {k!r}"
            )
        perm = torch.randperm(trainable, generator=generator, device=generator.device if generator else "cpu")
        return perm[:k].sort().values.long().cpu()
    if window_start is None or window_size is None:
        raise ValueError("strategy 'window' needs window_start and window_size")
    if window_size < 1 or window_start < 0 or window_start + window_size > trainable:
        raise ValueError(
            f"the window [{window_start}, {window_start + window_size}) must lie within the first "
            f"num_steps - 1 = {trainable} steps"
        )
    return torch.arange(window_start, window_start + window_size, dtype=torch.long)


def sde_window(
    iteration: int,
    num_steps: int,
    window_size: int,
    shift_every: int = 1,
    stride: int = 1,
    start: int = 0,
    wrap: bool = True,
) -> Tensor:
    """MixGRPO's sliding SDE window: the steps that are sampled with the SDE (and trained) at ``iteration``.

    The window of ``window_size`` consecutive steps starts at ``start`` and moves ``stride`` steps later
    every ``shift_every`` iterations, within the first ``T - 1`` steps. When it reaches the end it starts
    again at ``start`` (``wrap=True``) or stays at the last position (``wrap=False``). All other steps are
    ODE steps. Returns a sorted LongTensor of real step indices (use :func:`steps_to_mask` for ``[T]``).
    """
    trainable = _check_num_steps(num_steps)
    if iteration < 0 or shift_every < 1 or stride < 1:
        raise ValueError(
            f"need iteration >= 0, shift_every >= 1, stride >= 1; got {iteration}, {shift_every}, {stride}"
        )
    if not 1 <= window_size <= trainable or not 0 <= start <= trainable - window_size:
        raise ValueError(
            f"window_size {window_size} starting at {start} does not fit in the first "
            f"num_steps - 1 = {trainable} steps"
        )
    positions = (trainable - window_size - start) // stride + 1
    moves = iteration // shift_every
    moves = moves % positions if wrap else min(moves, positions - 1)
    first = start + moves * stride
    return torch.arange(first, first + window_size, dtype=torch.long)


def steps_to_mask(steps: Tensor, num_steps: int) -> Tensor:
    """Bool ``[num_steps]`` mask that is True at the given real step indices (e.g. a rollout's SDE steps)."""
    steps = torch.as_tensor(steps, dtype=torch.long)
    if steps.numel() and (int(steps.min()) < 0 or int(steps.max()) >= num_steps):
        raise ValueError(f"steps must lie in [0, {num_steps}), got {steps.tolist()}")
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[steps.cpu()] = True
    return mask
