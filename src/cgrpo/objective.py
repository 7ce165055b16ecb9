"""The clipped GRPO policy objective (Eq. 7) and optional KL penalties to a reference policy.

Inputs are per-sample (``[B]``) or per-sample-and-step (``[B, T]``) log-probabilities of SDE transitions
(:func:`cgrpo.sde.sde_step_with_logprob`), which are *averages* over all latent dimensions. Such averaged
log-probs move very little per update, which is why the ratio clip range is tiny (Flow-GRPO uses 1e-4;
the common LLM value 0.2 never clips here).

Defaults: ``clip_range = 1e-4`` (Flow-GRPO's). Appendix A of the paper says the advantage is clipped to
"[1e-5, 1e-5]", an evident typo (an empty interval); we clamp advantages to ``[-adv_clip, adv_clip]``
with ``adv_clip = 5`` (Flow-GRPO's ``adv_clip_max``). The paper trains without KL (Section 3), hence
``kl_coef = 0``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

Tensor = torch.Tensor


class PolicyLoss(NamedTuple):
    """The loss to minimise and detached 0-d float32 diagnostics.

    - ``loss``: differentiable scalar, ``policy_loss + kl_coef * kl``;
    - ``policy_loss``: the clipped surrogate alone;
    - ``kl``: mean KL to the reference policy (0 when none was given);
    - ``clip_fraction``: share of entries with ``|ratio - 1| > clip_range``;
    - ``approx_kl``: ``0.5 * mean((log_prob - old_log_prob)^2)``, the old-to-new policy drift;
    - ``ratio_mean``, ``ratio_min``, ``ratio_max``: of ``exp(log_prob - old_log_prob)``;
    - ``adv_clip_fraction``: share of advantages that ``adv_clip`` clamped.
    """

    loss: Tensor
    policy_loss: Tensor
    kl: Tensor
    clip_fraction: Tensor
    approx_kl: Tensor
    ratio_mean: Tensor
    ratio_min: Tensor
    ratio_max: Tensor
    adv_clip_fraction: Tensor


LOG_PROBS = ("gaussian", "squared_error")


def log_ratio_scale(std: Tensor, log_prob: str = "gaussian") -> Tensor:
    """Per-sample factor on the log-probs of one SDE step before the ratio: ``[B]`` float32.

    ``gaussian``: 1, the transition's log-density. ``squared_error``: ``2 std^2``, which turns the
    log-density's log-ratio into that of Flow-GRPO's CPS surrogate ``-mean((x_next - mean)^2)`` (the
    density is ``-mean((x_next - mean)^2) / (2 std^2)`` plus a constant of the step, which the ratio
    cancels). Its gradient is the density's times ``2 std^2``: the steps near the clean image, whose
    density gradients grow as ``1 / std``, no longer outweigh the noisy ones.
    """
    if log_prob not in LOG_PROBS:
        raise ValueError(f"log_prob must be one of {', '.join(LOG_PROBS)}; got {log_prob!r}")
    s = std.detach().float()
    return torch.ones_like(s) if log_prob == "gaussian" else 2.0 * s.square()


def kl_k3(log_prob: Tensor, ref_log_prob: Tensor) -> Tensor:
    """Schulman's k3 estimator of ``KL(pi || pi_ref)`` from log-probs of samples of ``pi``, elementwise.

    ``exp(d) - d - 1`` with ``d = ref_log_prob - log_prob``: non-negative, zero iff the log-probs agree.
    Same shape as the inputs (``[B]`` or ``[B, T]``); ``ref_log_prob`` is treated as a constant.
    """
    if log_prob.shape != ref_log_prob.shape:
        raise ValueError(
            f"log_prob {tuple(log_prob.shape)} and ref_log_prob {tuple(ref_log_prob.shape)} differ in shape"
        )
    d = ref_log_prob.detach().float() - log_prob.float()
    return torch.expm1(d) - d


def gaussian_mean_kl(mean: Tensor, ref_mean: Tensor, std: float | Tensor) -> Tensor:
    """KL between the SDE transitions of the policy and of a reference, per sample, Flow-GRPO's form.

    Both transitions are Gaussians with the same isotropic ``std`` (it depends on the sigmas only), so
    their KL per dimension is ``(mean - ref_mean)^2 / (2 std^2)``; it is averaged over the non-batch dims
    like the log-probs. ``mean``, ``ref_mean``: ``[B, ...]`` (``SDEStep.mean``); ``std``: a float or ``[B]``
    (``SDEStep.std``). Returns ``[B]`` float32; ``ref_mean`` is treated as a constant.
    """
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and ref_mean {tuple(ref_mean.shape)} differ in shape")
    b = mean.shape[0]
    sq = (mean.float() - ref_mean.detach().float()).square()
    per_sample = sq.mean(dim=tuple(range(1, sq.ndim))) if sq.ndim > 1 else sq
    s = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    if s.ndim == 0:
        s = s.expand(b)
    if s.shape != (b,) or bool((s <= 0).any()):
        raise ValueError(
            f"std must be a positive float or a positive [B] tensor with B = {b}, got {s.tolist()}"
        )
    return per_sample / (2.0 * s.square())


def _align_advantages(advantages: Tensor, log_prob: Tensor) -> Tensor:
    """``[B]`` advantages with ``[B, T]`` log-probs become ``[B, 1]`` (torch would align the wrong dim)."""
    adv = advantages.float()
    if adv.ndim == 1 and log_prob.ndim == 2 and adv.shape[0] == log_prob.shape[0]:
        adv = adv[:, None]
    try:
        torch.broadcast_shapes(adv.shape, log_prob.shape)
    except RuntimeError as err:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} do not match log_prob {tuple(log_prob.shape)}; "
            "expected [B] or the shape of log_prob"
        ) from err
    if adv.ndim > log_prob.ndim:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} have more dims than log_prob {tuple(log_prob.shape)}"
        )
    return adv


def clipped_policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float = 1e-4,
    adv_clip: float | None = 5.0,
    ref_log_prob: Tensor | None = None,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
) -> PolicyLoss:
    """Clipped GRPO surrogate, the negative of Eq. 7 (to minimise).

    ``ratio = exp(log_prob - old_log_prob)``; ``A = clamp(advantages, -adv_clip, adv_clip)``;
    ``policy_loss = mean(max(-A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range)))`` over all
    entries (Eq. 7's ``1/G sum_i 1/T sum_t``). Optional KL penalty:
    ``loss = policy_loss + kl_coef * mean(kl)``.

    Args:
        log_prob: ``[B]`` or ``[B, T]`` log-probs under the current policy (differentiable).
        old_log_prob: same shape, recorded at rollout time (a constant).
        advantages: ``[B]`` (per sample, broadcast over T) or the shape of ``log_prob`` (per step, e.g. TDW).
        clip_range: ``epsilon`` of Eq. 7, > 0.
        adv_clip: clamp bound for advantages, > 0, or ``None`` for no clamping.
        ref_log_prob: log-probs of the same transitions under a frozen reference policy; the KL is then
            estimated with :func:`kl_k3`.
        kl: a precomputed per-entry KL instead (e.g. :func:`gaussian_mean_kl`, Flow-GRPO's choice), shaped
            like ``log_prob``. Give at most one of ``ref_log_prob`` and ``kl``.
        kl_coef: weight of the KL term, >= 0; with ``kl_coef > 0`` one of them is required.

    Returns:
        :class:`PolicyLoss`; all fields but ``loss`` are detached.
    """
    if log_prob.shape != old_log_prob.shape:
        raise ValueError(
            f"log_prob {tuple(log_prob.shape)} and old_log_prob {tuple(old_log_prob.shape)} differ in shape"
        )
    if log_prob.ndim not in (1, 2):
        raise ValueError(f"log_prob must be [B] or [B, T], got shape {tuple(log_prob.shape)}")
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range!r}")
    if adv_clip is not None and not adv_clip > 0:
        raise ValueError(f"adv_clip must be > 0 or None, got {adv_clip!r}")
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef!r}")
    if ref_log_prob is not None and kl is not None:
        raise ValueError("give either ref_log_prob (k3 estimate) or a precomputed kl, not both")
    if kl_coef > 0 and ref_log_prob is None and kl is None:
        raise ValueError("kl_coef > 0 needs ref_log_prob or kl")

    lp = log_prob.float()
    adv = _align_advantages(advantages, lp)
    adv_clamped = adv if adv_clip is None else adv.clamp(-adv_clip, adv_clip)
    log_ratio = lp - old_log_prob.detach().float()
    ratio = torch.exp(log_ratio)
    unclipped = -adv_clamped * ratio
    clipped = -adv_clamped * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()

    if ref_log_prob is not None:
        kl = kl_k3(lp, ref_log_prob)
    if kl is not None:
        if kl.shape != lp.shape:
            raise ValueError(f"kl {tuple(kl.shape)} must have the shape of log_prob {tuple(lp.shape)}")
        kl_mean = kl.float().mean()
    else:
        kl_mean = lp.new_zeros(())
    loss = policy_loss + kl_coef * kl_mean if kl_coef > 0 else policy_loss

    with torch.no_grad():
        r = ratio.detach()
        return PolicyLoss(
            loss=loss,
            policy_loss=policy_loss.detach(),
            kl=kl_mean.detach(),
            clip_fraction=((r - 1.0).abs() > clip_range).float().mean(),
            approx_kl=0.5 * log_ratio.detach().square().mean(),
            ratio_mean=r.mean(),
            ratio_min=r.min(),
            ratio_max=r.max(),
            adv_clip_fraction=(adv_clamped != adv).float().mean(),
        )
