"""Advantages for Customized-GRPO: group normalisation (Eq. 8), SARS (Eq. 10-11) and TDW (Eq. 12).

SARS is also generalised to images of several subjects (:func:`multi_sars`).

Pure tensor functions, no state. Shapes: ``N`` samples (``B`` prompts x ``G`` images, each group of ``G``
consecutive), ``T`` denoising steps. Equation numbers refer to the paper (arXiv 2510.18263).

Typical use in one GRPO iteration::

    a_id = group_normalize(r_id, G)                       # [N]
    a_prompt = group_normalize(r_prompt, G)               # [N]
    steps = select_steps(T, "random", k=5, generator=g)   # [K] real step indices (cgrpo.sde)
    w_id, w_prompt = tdw_weights(steps, T)                # [K] each
    adv = sars(a_id, a_prompt, w_id[None], w_prompt[None], alpha=0.5)   # [N, K]

With several subjects per image, one identity reward per subject (``S`` subjects here, as ``K`` is the
trained steps above; the multi-subject functions call the subjects ``K``)::

    a_ids = group_normalize_columns(r_ids, G)             # [N, S], each subject's column on its own
    adv = multi_sars(a_ids, a_prompt, w_id[None], w_prompt[None], mode="pairwise")  # [N, K]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

Tensor = torch.Tensor

SYNERGIES = ("tanh", "min", "max", "harmonic", "none", "linear")
SCHEDULES = ("paper", "static", "inverted", "linear")

# Appendix A, T = 25: prompt-centric phase for steps < 6, transition for 6 <= step < 22, identity phase after.
_PAPER_T = 25
_PAPER_TRANS_START = 6
_PAPER_ID_START = 22
_PAPER_T_C = 14  # not given in the paper: the middle of the transition phase, chosen here


# --------------------------------------------------------------------------------------------------------
# Group normalisation (Eq. 8)
# --------------------------------------------------------------------------------------------------------


class GroupStats(NamedTuple):
    """Per-group reward statistics, each ``[N // group_size]``.

    ``mean`` and ``std`` (population, ddof 0) are over the valid samples of the group, NaN for a group
    without valid samples; ``num_valid`` is a LongTensor.
    """

    mean: Tensor
    std: Tensor
    num_valid: Tensor


def _check_rewards(rewards: Tensor, group_size: int, valid: Tensor | None) -> Tensor:
    """Validate shapes and finiteness; return the valid mask as a bool tensor ``[N]``."""
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be a 1-D tensor [N], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    n = rewards.shape[0]
    if n % group_size != 0:
        raise ValueError(f"the number of rewards ({n}) is not a multiple of group_size ({group_size})")
    if valid is None:
        mask = torch.ones(n, dtype=torch.bool, device=rewards.device)
    else:
        if valid.shape != rewards.shape:
            raise ValueError(
                f"valid must have the shape of rewards {tuple(rewards.shape)}, got {tuple(valid.shape)}"
            )
        if valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor, got dtype {valid.dtype}")
        mask = valid.to(rewards.device)
    bad = ~torch.isfinite(rewards) & mask
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten().tolist()
        shown = ", ".join(map(str, idx[:20])) + (", ..." if len(idx) > 20 else "")
        hint = "they are marked valid" if valid is not None else "pass valid= to leave them out"
        raise ValueError(
            f"rewards contain {len(idx)} non-finite value(s) (NaN/inf) at indices [{shown}]; {hint}"
        )
    return mask


def _grouped_moments(rewards: Tensor, group_size: int, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """float64 ``[B, G]`` deviations, ``[B]`` mean, ``[B]`` population std and ``[B]`` valid counts."""
    r = rewards.detach().to(torch.float64).reshape(-1, group_size)
    m = mask.reshape(-1, group_size)
    count = m.sum(dim=1)
    denom = count.clamp(min=1).to(torch.float64)
    mean = torch.where(m, r, 0.0).sum(dim=1) / denom
    dev = torch.where(m, r - mean[:, None], 0.0)  # `where` also hides NaN of masked samples
    std = (dev.square().sum(dim=1) / denom).sqrt()
    return dev, mean, std, count


def group_stats(rewards: Tensor, group_size: int, valid: Tensor | None = None) -> GroupStats:
    """Mean, population std and number of valid samples of each group of ``group_size`` rewards.

    Args:
        rewards: ``[N]`` rewards, consecutive groups of ``group_size``.
        valid: optional bool ``[N]``; invalid samples are left out (their reward may be non-finite).

    Returns:
        ``GroupStats`` of ``[N // group_size]`` float32 tensors (``num_valid``: int64).
    """
    mask = _check_rewards(rewards, group_size, valid)
    _, mean, std, count = _grouped_moments(rewards, group_size, mask)
    empty = count == 0
    nan = torch.full_like(mean, math.nan)
    return GroupStats(torch.where(empty, nan, mean).float(), torch.where(empty, nan, std).float(), count)


def _check_normalize_options(std: str, eps: float) -> None:
    if std not in ("group", "global"):
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def group_normalize(
    rewards: Tensor,
    group_size: int,
    eps: float = 1e-6,
    std: str = "group",
    valid: Tensor | None = None,
) -> Tensor:
    """Group-relative advantages, Eq. 8: ``A_i = (r_i - mean(group)) / (std + eps)``.

    Args:
        rewards: ``[N]`` rewards; samples ``[k * group_size, (k + 1) * group_size)`` form group ``k``.
        group_size: ``G``, images per (reference, prompt) pair.
        eps: added to the std (``eps_std`` of Eq. 8).
        std: ``"group"`` — population std (ddof 0) of each group (Eq. 8); ``"global"`` — population std of
            all valid rewards of the batch (Flow-GRPO's ``global_std`` option). The mean is always the
            group's.
        valid: optional bool ``[N]`` mask. Masked samples get advantage 0 and are left out of the
            statistics (group mean/std and the global std); they may hold NaN/inf.

    Returns:
        ``[N]`` float32 advantages. A group whose valid rewards are all equal, or that has fewer than two
        valid samples, gets all zeros (never NaN). Rewards are treated as constants (no gradient).

    Raises:
        ValueError: on a non-finite reward that is not masked out (the message names how many and where),
            on shapes that do not form whole groups, or on an unknown ``std``.
    """
    _check_normalize_options(std, eps)
    mask = _check_rewards(rewards, group_size, valid)
    dev, _, group_std, count = _grouped_moments(rewards, group_size, mask)
    if std == "group":
        scale = group_std[:, None]
    else:
        values = rewards.detach().to(torch.float64)[mask]
        scale = values.std(correction=0) if values.numel() >= 2 else values.new_zeros(())
    r = rewards.detach().to(torch.float64).reshape(-1, group_size)
    m = mask.reshape(-1, group_size)
    # Exact test for a constant group: with float rounding its std is ~1e-17, not 0, and dividing that by
    # (std + eps) would give tiny non-zero "advantages" of pure rounding noise.
    r_max = torch.where(m, r, -math.inf).amax(dim=1)
    r_min = torch.where(m, r, math.inf).amin(dim=1)
    degenerate = (count < 2) | (r_max == r_min)
    adv = dev / (scale + eps).clamp(min=torch.finfo(torch.float64).tiny)
    adv = torch.where(degenerate[:, None] | ~m, 0.0, adv)
    return adv.reshape(-1).to(torch.float32)


# --------------------------------------------------------------------------------------------------------
# Synergy-aware reward shaping (Eq. 10-11)
# --------------------------------------------------------------------------------------------------------


def _either_positive(a_id: Tensor, a_prompt: Tensor) -> Tensor:
    """The first case of Eq. 11: ``A_id > 0 or A_prompt > 0`` (zero counts as non-positive)."""
    return (a_id > 0) | (a_prompt > 0)


def synergy_term(a_id: Tensor, a_prompt: Tensor, synergy: str = "tanh") -> Tensor:
    """The synergy term ``S`` that Eq. 11 adds (``+alpha*S``) or subtracts (``-alpha*S``).

    ``a_id`` and ``a_prompt`` have the same shape; the result has it too (float32). Definitions:

    - ``tanh`` (Eq. 10): ``S = tanh(a_id * a_prompt)``, bounded in [-1, 1]. Its sign is the sign of the
      product, so Eq. 11 gives a bonus only when both advantages are positive and a penalty otherwise.
    - ``harmonic``: ``S = 2 * a_id * a_prompt / (|a_id| + |a_prompt|)`` (0 when both are 0), i.e. the
      harmonic mean of ``|a_id|`` and ``|a_prompt|`` carrying the sign of the product like ``tanh``. The
      plain harmonic mean ``2ab / (a + b)`` of signed advantages has a pole on ``a = -b`` (every
      conflicted pair with equal magnitudes); this form has none and is bounded,
      ``min(|a|, |b|) <= |S| <= 2 * min(|a|, |b|)``, so it stays small whenever one objective is near
      its group mean — the "balance" property the harmonic mean is chosen for.
    - ``min`` / ``max``: ``min(a_id, a_prompt)`` / ``max(a_id, a_prompt)`` of the *signed* advantages,
      which are already <= 0 when both advantages are <= 0. Eq. 11 negates ``S`` in that case (to turn
      ``tanh``'s positive value for two failures into a penalty); applied to ``min``/``max`` that flip
      would reward a sample that fails both objectives. So ``S`` is defined here as the aggregate times
      the Eq. 11 sign (``+1`` if either advantage is positive, else ``-1``), which makes the piecewise
      Eq. 11 result exactly ``w_id*a_id + w_prompt*a_prompt + alpha * min(a_id, a_prompt)`` (resp.
      ``max``). ``max`` rewards a sample that excels in one objective only — the reward hacking the paper
      reports for it (Table 3); ``min`` penalises by the weaker objective, the conservative variant.
    - ``none`` / ``linear``: ``S = 0``, the plain weighted sum of Eq. 9.
    """
    _check_synergy(synergy)
    if a_id.shape != a_prompt.shape:
        raise ValueError(
            f"a_id and a_prompt must have the same shape, got {tuple(a_id.shape)} and {tuple(a_prompt.shape)}"
        )
    a, b = a_id.float(), a_prompt.float()
    if synergy == "tanh":
        return torch.tanh(a * b)
    if synergy == "harmonic":
        denom = a.abs() + b.abs()
        # A safe denominator (not an eps) keeps the value exact and avoids NaN gradients at a = b = 0.
        return 2 * a * b / torch.where(denom > 0, denom, torch.ones_like(denom))
    if synergy in ("min", "max"):
        agg = torch.minimum(a, b) if synergy == "min" else torch.maximum(a, b)
        sign = torch.where(_either_positive(a, b), 1.0, -1.0)
        return sign * agg
    return torch.zeros_like(a)


def sars(
    a_id: Tensor,
    a_prompt: Tensor,
    w_id: float | Tensor,
    w_prompt: float | Tensor,
    alpha: float = 0.5,
    synergy: str = "tanh",
) -> Tensor:
    """Synergy-aware advantage, Eq. 11 (Algorithm 1, lines 8 and 14-18).

    ``A = w_id*a_id + w_prompt*a_prompt + alpha*S`` if ``a_id > 0 or a_prompt > 0``, else
    ``w_id*a_id + w_prompt*a_prompt - alpha*S``, with ``S = synergy_term(a_id, a_prompt, synergy)``
    (``tanh(a_id * a_prompt)``, Eq. 10, by default; see :func:`synergy_term` for the Table 3 variants).
    ``synergy="none"`` (alias ``"linear"``) is the naive weighted sum of Eq. 9.

    Shapes: ``a_id`` and ``a_prompt`` are the same shape, ``[N]`` or ``[N, T]``. The weights are floats or
    tensors broadcastable against them by torch rules, e.g. ``[1, T]`` or ``[N, T]`` per-step TDW weights
    with ``[N, 1]`` advantages. As a convenience, ``[N]`` advantages given with 2-D weights are treated as
    per-sample ``[N, 1]``. A 1-D weight broadcasts against the *last* dimension (torch rules), so pass
    per-sample weights of ``[N, T]`` advantages as ``[N, 1]``.
    Returns float32 of the broadcast shape (``[N]`` or ``[N, T]``); bf16 inputs are upcast.

    Note on scale: with TDW weights ``w_id + w_prompt = 1``, so the weighted sum is half of an
    unnormalised 1:1 sum; ``alpha`` is relative to that normalised scale (paper default 0.5).
    """
    _check_synergy(synergy)
    alpha = _check_alpha(alpha)
    if a_id.shape != a_prompt.shape:
        raise ValueError(
            f"a_id and a_prompt must have the same shape, got {tuple(a_id.shape)} and {tuple(a_prompt.shape)}"
        )
    a, b = a_id.float(), a_prompt.float()
    wi, wp, per_sample = _weights_for(w_id, w_prompt, b)
    if per_sample:
        a, b = a[:, None], b[:, None]
    return _sars_shaped(a, b, wi, wp, alpha, synergy)


def _check_synergy(synergy: str) -> None:
    if synergy not in SYNERGIES:
        raise ValueError(f"synergy must be one of {', '.join(SYNERGIES)}; got {synergy!r}")


def _check_alpha(alpha: float) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError) as err:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}") from err
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return value


def _weights_for(w_id: float | Tensor, w_prompt: float | Tensor, adv: Tensor) -> tuple[Tensor, Tensor, bool]:
    """The weights as float32 tensors, and whether ``[N]`` advantages must become per-sample ``[N, 1]``
    (they do when a weight is 2-D). Raises when the weights do not broadcast against the advantages."""
    wi = torch.as_tensor(w_id, dtype=torch.float32, device=adv.device)
    wp = torch.as_tensor(w_prompt, dtype=torch.float32, device=adv.device)
    per_sample = adv.ndim == 1 and max(wi.ndim, wp.ndim) == 2
    shape = (*adv.shape, 1) if per_sample else adv.shape
    try:
        torch.broadcast_shapes(shape, wi.shape, wp.shape)
    except RuntimeError as err:
        raise ValueError(
            f"weights of shapes {tuple(wi.shape)} and {tuple(wp.shape)} do not broadcast against advantages "
            f"of shape {tuple(shape)}"
        ) from err
    return wi, wp, per_sample


def _sars_shaped(a: Tensor, b: Tensor, wi: Tensor, wp: Tensor, alpha: float, synergy: str) -> Tensor:
    """Eq. 11 on checked float32 tensors: the weighted sum plus the polarity-signed synergy term."""
    linear = wi * a + wp * b
    if synergy in ("none", "linear"):
        return linear
    return linear + _polarity_shaping(a, b, alpha, synergy)


def _polarity_shaping(a: Tensor, b: Tensor, alpha: float, synergy: str) -> Tensor:
    """Eq. 11's shaping of one pair of objectives: ``+alpha*S`` if either is positive, else ``-alpha*S``."""
    s = synergy_term(a, b, synergy)
    return torch.where(_either_positive(a, b), alpha * s, -alpha * s)


def conflict_mask(a_id: Tensor, a_prompt: Tensor) -> Tensor:
    """Bool mask of samples whose two advantages have strictly opposite signs (zero is no conflict).

    ``a_id``, ``a_prompt``: same shape (``[N]``); returns a bool tensor of that shape.
    """
    if a_id.shape != a_prompt.shape:
        raise ValueError(
            f"a_id and a_prompt must have the same shape, got {tuple(a_id.shape)} and {tuple(a_prompt.shape)}"
        )
    return ((a_id > 0) & (a_prompt < 0)) | ((a_id < 0) & (a_prompt > 0))


def conflict_rate(a_id: Tensor, a_prompt: Tensor) -> float:
    """Share of samples in reward conflict (:func:`conflict_mask`), the statistic of the paper's Fig. 7
    (50.2% of samples in 300 groups of 12)."""
    mask = conflict_mask(a_id, a_prompt)
    if mask.numel() == 0:
        raise ValueError("conflict_rate of an empty set of advantages is undefined")
    return float(mask.float().mean())


# --------------------------------------------------------------------------------------------------------
# Multi-subject SARS: K identity objectives (one per subject) and one prompt objective
# --------------------------------------------------------------------------------------------------------


def group_normalize_columns(
    rewards: Tensor,
    group_size: int,
    eps: float = 1e-6,
    std: str = "group",
    valid: Tensor | None = None,
) -> Tensor:
    """Eq. 8 on each column of ``[N, K]`` rewards on its own (one column per subject's identity reward).

    Every column is normalised by :func:`group_normalize` with the same arguments, so each subject's
    advantage has zero mean and unit std in its group whatever the scale of the other subjects' rewards;
    ``std="global"`` uses each column's own batch std.

    Args:
        rewards: ``[N, K]``, ``K >= 1``; rows form consecutive groups of ``group_size``.
        valid: optional bool mask, ``[N]`` (a sample left out of every column) or ``[N, K]`` (per column).

    Returns:
        ``[N, K]`` float32 advantages.

    Raises:
        ValueError: on shapes, ``std``, ``eps`` or ``valid`` as :func:`group_normalize` does; a non-finite
            reward that is not masked out is reported with its column.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 1:
        raise ValueError(
            f"rewards must be a 2-D tensor [N, K] with K >= 1 columns, got shape {tuple(rewards.shape)}"
        )
    _check_normalize_options(std, eps)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    n, k = rewards.shape
    if n % group_size != 0:
        raise ValueError(f"the number of rewards ({n}) is not a multiple of group_size ({group_size})")
    if valid is not None:
        if valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor, got dtype {valid.dtype}")
        if valid.shape == (n,):
            valid = valid[:, None].expand(n, k)
        elif valid.shape != rewards.shape:
            raise ValueError(
                f"valid must have shape [N] = ({n},) or [N, K] = {(n, k)}, got {tuple(valid.shape)}"
            )
    columns = []
    for col in range(k):
        try:
            columns.append(
                group_normalize(
                    rewards[:, col], group_size, eps, std, None if valid is None else valid[:, col]
                )
            )
        except ValueError as err:  # only the finiteness check is left to fail here: name the column
            raise ValueError(f"rewards column {col} (of {k}): {err}") from err
    return torch.stack(columns, dim=1)


def _objectives(a_ids: Tensor, a_prompt: Tensor) -> Tensor:
    """Check ``a_ids [..., K]`` against ``a_prompt [...]``; return all ``K + 1`` objectives ``[..., K + 1]``
    (subjects first, prompt last) in float32."""
    if a_ids.ndim < 2 or a_ids.shape[-1] < 1:
        raise ValueError(
            f"a_ids must be [N, K] (or [N, T, K]) with the K >= 1 subjects on the last axis, "
            f"got shape {tuple(a_ids.shape)}"
        )
    if a_prompt.shape != a_ids.shape[:-1]:
        raise ValueError(
            f"a_prompt must have the shape of a_ids without its subject axis, {tuple(a_ids.shape[:-1])}, "
            f"got {tuple(a_prompt.shape)}"
        )
    return torch.cat([a_ids.float(), a_prompt.float()[..., None]], dim=-1)


MULTI_SARS_MODES = ("mean", "weakest", "pairwise")


def multi_sars(
    a_ids: Tensor,
    a_prompt: Tensor,
    w_id: float | Tensor,
    w_prompt: float | Tensor,
    alpha: float = 0.5,
    synergy: str = "tanh",
    mode: str = "mean",
) -> Tensor:
    """SARS (Eq. 10-11) for images of ``K >= 1`` subjects: one identity advantage per subject, one prompt
    advantage. With ``K = 1`` every mode is exactly :func:`sars`.

    Modes (``MULTI_SARS_MODES``):

    - ``"mean"``: aggregate the identity advantages first, ``a = mean_k a_id_k``, then
      ``sars(a, a_prompt, ...)``. Linear part ``w_id * mean_k a_id_k = sum_k (w_id / K) * a_id_k``: TDW's
      identity weight split evenly over the subjects.
    - ``"weakest"``: ``a = min_k a_id_k``, then ``sars(a, a_prompt, ...)``. The linear part is the
      aggregate's too, ``w_id * min_k a_id_k``, not the split sum: the point of this mode is that a sample
      is only as good as its worst-kept subject, and a split sum would still pay for improving a subject
      that is already fine while another one is missing.
    - ``"pairwise"``: the split linear part of ``"mean"`` plus Eq. 11's shaping over every pair ``(i, j)``
      of the ``K + 1`` objectives (subject-subject and subject-prompt), each with the paper's polarity rule,
      ``+alpha * S_ij`` if either of the pair is positive else ``-alpha * S_ij`` with
      ``S_ij = synergy_term(o_i, o_j, synergy)``, *averaged* over the ``K (K + 1) / 2`` pairs so the
      shaping stays within ``alpha`` (for ``tanh``) whatever ``K``. With ``K = 1`` there is one pair,
      ``(a_id, a_prompt)``, and this is Eq. 11.

    ``synergy="none"`` (alias ``"linear"``) drops the shaping: the naive weighted sum of Eq. 9 on the
    mode's linear part (the same for ``"mean"`` and ``"pairwise"``).

    Shapes: subjects are the *last* axis of ``a_ids`` and ``a_prompt`` is ``a_ids`` without it —
    ``a_ids [N, K]`` with ``a_prompt [N]``, or ``[N, T, K]`` with ``[N, T]``. The weights apply to the
    advantages' shape (``a_prompt.shape``) by exactly the rule of :func:`sars`: floats, or tensors that
    broadcast by torch rules; ``[N]`` advantages given with 2-D weights are per-sample ``[N, 1]``. So
    per-step TDW is ``a_ids [N, K]``, ``a_prompt [N]``, weights ``[1, T]`` -> ``[N, T]``. A 1-D ``[T]``
    weight is *not* read as per-step (against ``[N]`` advantages it is per-sample, as in :func:`sars`,
    which keeps ``K = 1`` identical to :func:`sars` even when ``N == T``); pass ``w[None]``.
    Returns float32 of the broadcast shape; the aggregates are taken in float32 (bf16 inputs are upcast).

    Raises:
        ValueError: on an unknown ``mode`` or ``synergy``, ``alpha`` not finite and >= 0, ``a_ids`` without a
            subject axis, ``a_prompt`` not shaped like ``a_ids[..., 0]``, or weights that do not broadcast.
    """
    if mode not in MULTI_SARS_MODES:
        raise ValueError(f"mode must be one of {', '.join(MULTI_SARS_MODES)}; got {mode!r}")
    _check_synergy(synergy)
    alpha = _check_alpha(alpha)
    objectives = _objectives(a_ids, a_prompt)
    wi, wp, per_sample = _weights_for(w_id, w_prompt, objectives[..., -1])
    if per_sample:
        objectives = objectives[:, None]
    ids, b = objectives[..., :-1], objectives[..., -1]
    if mode == "weakest":
        return _sars_shaped(ids.amin(dim=-1), b, wi, wp, alpha, synergy)
    mean_id = ids.mean(dim=-1)
    if mode == "mean":
        return _sars_shaped(mean_id, b, wi, wp, alpha, synergy)
    linear = wi * mean_id + wp * b
    if synergy in ("none", "linear"):
        return linear
    num = objectives.shape[-1]
    first, second = torch.triu_indices(num, num, offset=1, device=objectives.device)
    pairs = _polarity_shaping(objectives[..., first], objectives[..., second], alpha, synergy)  # [..., P]
    return linear + pairs.mean(dim=-1)


def multi_conflict_mask(a_ids: Tensor, a_prompt: Tensor) -> Tensor:
    """Bool mask of samples where some pair of the ``K + 1`` objectives has strictly opposite signs, i.e.
    one advantage is > 0 and another < 0 (zero is no conflict). ``a_ids [N, K]``, ``a_prompt [N]`` ->
    ``[N]``; with ``K = 1`` this is :func:`conflict_mask`."""
    objectives = _objectives(a_ids, a_prompt)
    return (objectives > 0).any(dim=-1) & (objectives < 0).any(dim=-1)


def multi_conflict_rate(a_ids: Tensor, a_prompt: Tensor) -> float:
    """Share of samples in conflict by :func:`multi_conflict_mask` (Fig. 7's statistic for K subjects)."""
    mask = multi_conflict_mask(a_ids, a_prompt)
    if mask.numel() == 0:
        raise ValueError("multi_conflict_rate of an empty set of advantages is undefined")
    return float(mask.float().mean())


def pairwise_conflict_rates(a_ids: Tensor, a_prompt: Tensor) -> Tensor:
    """Conflict rate of every pair of objectives: ``[K + 1, K + 1]`` float32, symmetric, zero diagonal;
    index ``k < K`` is subject ``k``, index ``K`` the prompt. Entry ``(i, j)`` is the share of samples whose
    advantages ``i`` and ``j`` have strictly opposite signs (``(k, K)`` is :func:`conflict_rate` of subject
    ``k`` against the prompt); it shows which subject competes with which objective."""
    objectives = _objectives(a_ids, a_prompt)
    flat = objectives.reshape(-1, objectives.shape[-1])
    if flat.shape[0] == 0:
        raise ValueError("pairwise_conflict_rates of an empty set of advantages is undefined")
    pos, neg = flat > 0, flat < 0
    opposite = (pos[:, :, None] & neg[:, None, :]) | (neg[:, :, None] & pos[:, None, :])
    return opposite.float().mean(dim=0)


# --------------------------------------------------------------------------------------------------------
# Timestep-aware dynamic weighting (Eq. 12)
# --------------------------------------------------------------------------------------------------------


def _as_steps(steps: int | Sequence[int] | Tensor, num_steps: int) -> Tensor:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    t = torch.as_tensor(steps)
    if t.numel() == 0:
        return t.long()
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"steps must be integer denoising step indices, got dtype {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_steps):
        raise ValueError(
            f"steps must lie in [0, num_steps) = [0, {num_steps}); "
            f"got values from {int(t.min())} to {int(t.max())}"
        )
    return t


def _paper_w_prompt(
    step: Tensor, num_steps: int, w_max: float, w_min: float, t_c: float | None, lam: float
) -> Tensor:
    """Eq. 12 with Appendix A's phases, in float64, keyed by the real step index (0 = noisiest)."""
    scale = num_steps / _PAPER_T
    trans_start = _PAPER_TRANS_START * scale
    id_start = _PAPER_ID_START * scale
    centre = _PAPER_T_C * scale if t_c is None else float(t_c)
    slope = lam / scale  # the sigmoid spans the same fraction of the trajectory for any T
    s = step.to(torch.float64)
    transition = w_min + (w_max - w_min) * (1.0 - torch.sigmoid(slope * (s - centre)))
    w = torch.where(s < trans_start, torch.full_like(s, w_max), transition)
    return torch.where(s >= id_start, torch.full_like(s, w_min), w)


def tdw_weights(
    steps: int | Sequence[int] | Tensor,
    num_steps: int,
    schedule: str = "paper",
    w_max: float = 0.7,
    w_min: float = 0.3,
    t_c: float | None = None,
    lam: float = 0.8,
    ratio: Sequence[float] = (1.0, 1.0),
) -> tuple[Tensor, Tensor]:
    """Time-dependent weights ``(w_id, w_prompt)`` for real denoising steps, Eq. 12 (Algorithm 1, line 12).

    Args:
        steps: real step indices of the sampling trajectory, ``0`` = first (noisiest) step,
            ``num_steps - 1`` = last; an int, a sequence or an integer tensor of any shape.
        num_steps: ``T``, the number of sampling steps (25 in the paper).
        schedule:
            - ``"paper"``: Eq. 12 with Appendix A's phases for T = 25 — ``w_prompt = w_max`` for steps < 6
              (prompt-centric), ``w_min + (w_max - w_min) * (1 - sigmoid(lam * (step - t_c)))`` for
              6 <= step < 22 (transition), ``w_min`` for steps >= 22 (identity refinement). For other T the
              phase bounds and ``t_c`` scale with T (6/25, 22/25 and 14/25 of T) and ``lam`` by 25/T, so the
              curve covers the same fractions of the trajectory. Eq. 12 writes its cases in diffusion time
              (``t = T`` noisy), but its sigmoid only decreases in the step index; Appendix A's bounds are
              step indices, and that is the convention used here.
            - ``"inverted"``: the paper curve mirrored, ``w_prompt = w_max + w_min - paper(step)``, so the
              prompt weight rises over time (Table 5's "Inverted TDW").
            - ``"linear"``: ``w_prompt`` linear from ``w_max`` at step 0 to ``w_min`` at step ``T - 1``.
            - ``"static"``: constant ``w_id : w_prompt = ratio``, normalised to sum to 1 (1:1 -> 0.5/0.5,
              1:1.5 -> 0.4/0.6) so that advantages and ``alpha`` keep the scale of the TDW schedules.
        w_max, w_min: bounds of ``w_prompt`` (paper: 0.7 and 0.3, Table 4); 0 <= w_min <= w_max <= 1.
        t_c: centre of the sigmoid in steps of this ``T``. The paper gives no value; ``None`` = 14/25 of T,
            the middle of the transition phase (14 for T = 25).
        lam: sigmoid slope at T = 25 (scaled by 25/T). The paper gives no value; 0.8 makes the curve meet
            the constant phases within 7e-4 at both phase boundaries (see the tests).
        ratio: ``(w_id, w_prompt)`` for ``"static"``, two non-negative numbers with a positive sum.

    Returns:
        ``(w_id, w_prompt)``, float32 tensors shaped like ``steps``, ``w_id = 1 - w_prompt``.

    Note: the paper's public reference code looks these weights up by the position of a step in the
    shuffled list of trained steps, not by the step itself, so its weights do not follow the denoising
    time. This function takes real step indices.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if not 0.0 <= w_min <= w_max <= 1.0:
        raise ValueError(
            f"TDW bounds must satisfy 0 <= w_min <= w_max <= 1, got w_min={w_min}, w_max={w_max}"
        )
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if t_c is not None and not math.isfinite(t_c):
        raise ValueError(f"t_c must be finite or None, got {t_c!r}")
    s = _as_steps(steps, num_steps)
    device = s.device
    if schedule == "static":
        if len(ratio) != 2 or min(ratio) < 0 or sum(ratio) <= 0 or not all(map(math.isfinite, ratio)):
            raise ValueError(
                f"ratio must be two non-negative numbers (w_id, w_prompt) with a positive sum, got {ratio!r}"
            )
        w_prompt = torch.full(s.shape, ratio[1] / (ratio[0] + ratio[1]), dtype=torch.float64, device=device)
    elif schedule == "linear":
        frac = s.to(torch.float64) / max(num_steps - 1, 1)
        w_prompt = w_max + (w_min - w_max) * frac
    else:
        w_prompt = _paper_w_prompt(s, num_steps, w_max, w_min, t_c, lam)
        if schedule == "inverted":
            w_prompt = (w_max + w_min) - w_prompt
    return (1.0 - w_prompt).to(torch.float32), w_prompt.to(torch.float32)
