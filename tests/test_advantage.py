"""Group normalisation (Eq. 8), SARS (Eq. 10-11) and its Table 3 variants, TDW schedules (Eq. 12)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cgrpo.advantage import (
    conflict_mask,
    conflict_rate,
    group_normalize,
    group_stats,
    sars,
    synergy_term,
    tdw_weights,
)

FAST = settings(max_examples=60, deadline=None)
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
adv = st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False, width=32)


# --------------------------------------------------------------------------------------------------------
# group_normalize
# --------------------------------------------------------------------------------------------------------


def _reference_normalize(rewards: np.ndarray, group_size: int, eps: float, global_std: bool) -> np.ndarray:
    groups = rewards.astype(np.float64).reshape(-1, group_size)
    mean = groups.mean(axis=1, keepdims=True)
    std = rewards.astype(np.float64).std() if global_std else groups.std(axis=1, keepdims=True)  # ddof 0
    out = (groups - mean) / (std + eps)
    constant = groups.max(axis=1) == groups.min(axis=1)
    out[constant] = 0.0
    return out.reshape(-1)


@FAST
@given(
    data=st.data(),
    group_size=st.integers(2, 6),
    num_groups=st.integers(1, 4),
    global_std=st.booleans(),
)
def test_group_normalize_matches_numpy(data, group_size, num_groups, global_std):
    values = data.draw(st.lists(finite, min_size=group_size * num_groups, max_size=group_size * num_groups))
    rewards = torch.tensor(values, dtype=torch.float32)
    out = group_normalize(rewards, group_size, std="global" if global_std else "group")
    expected = _reference_normalize(rewards.numpy(), group_size, 1e-6, global_std)
    assert out.dtype == torch.float32 and out.shape == rewards.shape
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_group_normalize_has_zero_mean_unit_std_per_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, -1.0, 0.5, 0.25, 4.0])
    out = group_normalize(rewards, 4).reshape(2, 4).double()
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        out.std(dim=1, correction=0), torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0
    )
    # explicit value of the first entry: (1 - 3) / std([1, 2, 3, 6])
    assert out[0, 0].item() == pytest.approx(-2.0 / np.std([1, 2, 3, 6]), rel=1e-5)


def test_zero_variance_group_gives_exact_zeros():
    # 0.1 is not representable: the float mean of a constant group need not equal its members exactly.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.3, 0.4], dtype=torch.float32)
    for mode in ("group", "global"):
        out = group_normalize(rewards, 3, std=mode, eps=0.0)
        assert torch.equal(out[:3], torch.zeros(3)), mode
        assert torch.isfinite(out).all() and (out[3:] != 0).all()
    assert torch.equal(group_normalize(torch.full((8,), 3.3), 4, eps=0.0), torch.zeros(8))


def test_global_std_uses_the_whole_batch():
    rewards = torch.tensor([0.0, 1.0, 10.0, 30.0])
    out = group_normalize(rewards, 2, std="global", eps=0.0)
    batch_std = float(np.std([0.0, 1.0, 10.0, 30.0]))
    expected = torch.tensor([-0.5, 0.5, -10.0, 10.0]) / batch_std
    torch.testing.assert_close(out, expected)


def test_non_finite_rewards_raise_naming_count_and_indices():
    rewards = torch.tensor([0.1, float("nan"), 0.3, 0.4, float("inf"), 0.2])
    with pytest.raises(ValueError, match=r"2 non-finite value\(s\).*\[1, 4\]"):
        group_normalize(rewards, 3)


def test_valid_mask_excludes_samples_and_zeroes_them():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 100.0, 5.0, 6.0, float("inf"), 7.0])
    valid = torch.isfinite(rewards) & (rewards < 50)
    out = group_normalize(rewards, 4, valid=valid, eps=0.0)
    assert torch.isfinite(out).all()
    assert out[1] == 0 and out[3] == 0 and out[6] == 0
    # group 0: statistics of [1, 3] only; group 1: of [5, 6, 7]
    torch.testing.assert_close(out[[0, 2]], torch.tensor([-1.0, 1.0]))
    expected = (torch.tensor([5.0, 6.0, 7.0]) - 6.0) / float(np.std([5.0, 6.0, 7.0]))
    torch.testing.assert_close(out[[4, 5, 7]], expected)
    stats = group_stats(rewards, 4, valid=valid)
    torch.testing.assert_close(stats.mean, torch.tensor([2.0, 6.0]))
    torch.testing.assert_close(stats.std, torch.tensor([1.0, float(np.std([5.0, 6.0, 7.0]))]))
    assert stats.num_valid.tolist() == [2, 3]


def test_group_with_fewer_than_two_valid_samples_gives_zeros():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    valid = torch.tensor([True, False, False, True, True, True])
    out = group_normalize(rewards, 3, valid=valid)
    assert torch.equal(out[:3], torch.zeros(3))
    assert (out[3:] != 0).sum() == 2  # the middle of [4, 5, 6] is exactly its mean
    none_valid = group_stats(rewards, 3, valid=torch.tensor([False] * 3 + [True] * 3))
    assert math.isnan(none_valid.mean[0]) and none_valid.num_valid[0] == 0


def test_valid_but_non_finite_still_raises():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 4.0])
    with pytest.raises(ValueError, match="marked valid"):
        group_normalize(rewards, 2, valid=torch.tensor([True, True, True, True]))


def test_group_normalize_bfloat16_input():
    rewards = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.bfloat16)
    out = group_normalize(rewards, 4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, group_normalize(rewards.float(), 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rewards": torch.zeros(5), "group_size": 2}, "not a multiple"),
        ({"rewards": torch.zeros(2, 2), "group_size": 2}, "1-D"),
        ({"rewards": torch.zeros(4), "group_size": 0}, "group_size"),
        ({"rewards": torch.zeros(4), "group_size": 2, "std": "batch"}, "std must be"),
        ({"rewards": torch.zeros(4), "group_size": 2, "valid": torch.ones(4)}, "bool"),
        ({"rewards": torch.zeros(4), "group_size": 2, "valid": torch.ones(3, dtype=torch.bool)}, "shape"),
    ],
)
def test_group_normalize_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_normalize(**kwargs)


# --------------------------------------------------------------------------------------------------------
# SARS
# --------------------------------------------------------------------------------------------------------


def _sars1(a, b, w_id=0.5, w_prompt=0.5, alpha=0.5, synergy="tanh"):
    return sars(torch.tensor([a]), torch.tensor([b]), w_id, w_prompt, alpha, synergy).item()


def test_sars_sign_cases_tanh():
    lin = lambda a, b: 0.5 * a + 0.5 * b  # noqa: E731
    # both positive: bonus alpha * tanh(ab)
    assert _sars1(1.0, 2.0) == pytest.approx(lin(1, 2) + 0.5 * math.tanh(2.0))
    # mixed: tanh(ab) < 0 is added -> penalty
    assert _sars1(1.2, -1.0) == pytest.approx(lin(1.2, -1.0) + 0.5 * math.tanh(-1.2))
    assert _sars1(-0.5, 2.0) == pytest.approx(lin(-0.5, 2.0) + 0.5 * math.tanh(-1.0))
    # both negative: tanh(ab) > 0 is subtracted -> penalty
    assert _sars1(-1.0, -2.0) == pytest.approx(lin(-1, -2) - 0.5 * math.tanh(2.0))
    # zeros count as non-positive; the product is 0 so there is no synergy term
    assert _sars1(0.0, -2.0) == pytest.approx(lin(0, -2))
    assert _sars1(0.0, 0.0) == 0.0
    assert _sars1(0.0, 3.0) == pytest.approx(lin(0, 3))


def test_sars_turns_specialist_failures_negative():
    # Fig. 7(b): the naive sums of a "prompt failure" and an "ID failure" are small positives;
    # SARS makes them negative.
    for a_id, a_prompt in [(1.2, -1.0), (-1.0, 1.16)]:
        naive = _sars1(a_id, a_prompt, synergy="none")
        assert naive > 0
        assert _sars1(a_id, a_prompt) < 0


@FAST
@given(a=adv, b=adv, w=st.floats(0.0, 1.0), alpha=st.floats(0.0, 2.0))
def test_sars_tanh_stays_within_alpha_of_linear(a, b, w, alpha):
    shaped = _sars1(a, b, 1 - w, w, alpha)
    linear = _sars1(a, b, 1 - w, w, alpha, synergy="linear")
    assert abs(shaped - linear) <= alpha + 1e-6
    both_positive = a > 0 and b > 0
    if both_positive:
        assert shaped >= linear - 1e-7
    else:
        assert shaped <= linear + 1e-7  # every non-synergistic sample is penalised (or left alone)


@FAST
@given(a1=adv, a2=adv, b=st.floats(1e-3, 4.0), w=st.floats(0.0, 1.0), alpha=st.floats(0.0, 2.0))
def test_sars_tanh_monotone_in_each_advantage_when_the_other_is_positive(a1, a2, b, w, alpha):
    lo, hi = min(a1, a2), max(a1, a2)
    assert _sars1(lo, b, 1 - w, w, alpha) <= _sars1(hi, b, 1 - w, w, alpha) + 1e-6
    assert _sars1(b, lo, w, 1 - w, alpha) <= _sars1(b, hi, w, 1 - w, alpha) + 1e-6


def test_sars_figure3_cross_section_shape():
    # Fig. 3: A_prompt = 1; SARS lies above the linear line for A_id > 0 and below it for A_id < 0.
    a_id = torch.linspace(-3, 3, 61)
    ones = torch.ones_like(a_id)
    diff = sars(a_id, ones, 0.5, 0.5) - sars(a_id, ones, 0.5, 0.5, synergy="none")
    assert (diff[a_id > 0] > 0).all() and (diff[a_id < 0] < 0).all() and diff[30].abs() < 1e-7


def test_sars_variants_explicit_values():
    a = torch.tensor([1.0, 2.0, -1.0, -2.0, 0.0])
    b = torch.tensor([3.0, -1.0, 2.0, -0.5, 0.0])
    lin = 0.5 * a + 0.5 * b
    alpha = 0.4
    # min / max: lin + alpha * min(a, b) / max(a, b) in every case
    torch.testing.assert_close(sars(a, b, 0.5, 0.5, alpha, "min"), lin + alpha * torch.minimum(a, b))
    torch.testing.assert_close(sars(a, b, 0.5, 0.5, alpha, "max"), lin + alpha * torch.maximum(a, b))
    # harmonic: S = 2ab / (|a| + |b|), inserted in Eq. 11 like tanh
    s = torch.tensor([2 * 3 / 4, 2 * -2 / 3, 2 * -2 / 3, 2 * 1 / 2.5, 0.0])
    sign = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0])
    torch.testing.assert_close(sars(a, b, 0.5, 0.5, alpha, "harmonic"), lin + sign * alpha * s)
    torch.testing.assert_close(synergy_term(a, b, "harmonic"), s)
    for name in ("none", "linear"):
        torch.testing.assert_close(sars(a, b, 0.5, 0.5, alpha, name), lin)


def test_sars_variants_penalise_double_failure_and_max_rewards_specialists():
    both_bad = (torch.tensor([-1.0]), torch.tensor([-0.5]))
    specialist = (torch.tensor([2.0]), torch.tensor([-1.0]))
    for name in ("tanh", "min", "max", "harmonic"):
        assert sars(*both_bad, 0.5, 0.5, 0.5, name) < sars(*both_bad, 0.5, 0.5, 0.5, "none"), name
    for name in ("tanh", "min", "harmonic"):
        assert sars(*specialist, 0.5, 0.5, 0.5, name) < sars(*specialist, 0.5, 0.5, 0.5, "none"), name
    assert sars(*specialist, 0.5, 0.5, 0.5, "max") > sars(*specialist, 0.5, 0.5, 0.5, "none")


@FAST
@given(a=adv, b=adv)
def test_harmonic_synergy_is_bounded_and_finite(a, b):
    s = synergy_term(torch.tensor([a]), torch.tensor([b]), "harmonic").item()
    m = min(abs(a), abs(b))
    assert math.isfinite(s)
    assert m - 1e-5 <= abs(s) <= 2 * m + 1e-5
    assert s * a * b >= 0  # the sign of the product, like tanh(ab)


def test_sars_zero_alpha_is_linear():
    a, b = torch.randn(16), torch.randn(16)
    for name in ("tanh", "min", "max", "harmonic"):
        torch.testing.assert_close(sars(a, b, 0.3, 0.7, 0.0, name), 0.3 * a + 0.7 * b)


def test_sars_shapes_per_step_weights():
    n, t = 6, 4
    a, b = torch.randn(n), torch.randn(n)
    w_prompt = torch.linspace(0.7, 0.3, t)[None]  # [1, T]
    out = sars(a[:, None], b[:, None], 1 - w_prompt, w_prompt)
    assert out.shape == (n, t)
    for j in range(t):
        wp = float(w_prompt[0, j])
        torch.testing.assert_close(out[:, j], sars(a, b, 1 - wp, wp))
    # [N] advantages with 2-D weights are per-sample, also when N == T
    sq = torch.rand(n, n)
    torch.testing.assert_close(sars(a, b, 1 - sq, sq), sars(a[:, None], b[:, None], 1 - sq, sq))
    # [N, T] advantages with [N, T] weights
    a2, b2 = torch.randn(n, t), torch.randn(n, t)
    w2 = torch.rand(n, t)
    assert sars(a2, b2, 1 - w2, w2).shape == (n, t)
    with pytest.raises(ValueError, match="do not broadcast"):
        sars(a2, b2, torch.rand(n + 1, t), 0.5)


def test_sars_bfloat16_inputs():
    a, b = torch.randn(8), torch.randn(8)
    out = sars(a.bfloat16(), b.bfloat16(), 0.5, 0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sars(a.bfloat16().float(), b.bfloat16().float(), 0.5, 0.5))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"synergy": "cubic"}, "synergy must be one of"),
        ({"alpha": -0.1}, "alpha must be"),
        ({"alpha": float("nan")}, "alpha must be"),
    ],
)
def test_sars_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sars(torch.zeros(2), torch.zeros(2), 0.5, 0.5, **kwargs)
    with pytest.raises(ValueError, match="same shape"):
        sars(torch.zeros(2), torch.zeros(3), 0.5, 0.5)


def test_conflict_mask_and_rate():
    a = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0, 0.0, 2.0, -0.1])
    b = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 0.0, -3.0, 0.2])
    assert conflict_mask(a, b).tolist() == [False, True, True, False, False, False, True, True]
    assert conflict_rate(a, b) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        conflict_rate(torch.zeros(0), torch.zeros(0))


# --------------------------------------------------------------------------------------------------------
# TDW
# --------------------------------------------------------------------------------------------------------


def test_tdw_paper_phases_for_t25():
    w_id, w_prompt = tdw_weights(torch.arange(25), 25)
    assert w_prompt.dtype == torch.float32 and w_prompt.shape == (25,)
    assert torch.equal(w_prompt[:6], torch.full((6,), 0.7))
    assert torch.equal(w_prompt[22:], torch.full((3,), 0.3))
    assert w_prompt[0] == pytest.approx(0.7) and w_prompt[-1] == pytest.approx(0.3)
    assert w_prompt[14] == pytest.approx(0.5)  # t_c = 14: the midpoint
    for step in range(6, 22):  # the transition phase, Eq. 12 with lam = 0.8, t_c = 14
        expected = 0.3 + 0.4 * (1 - 1 / (1 + math.exp(-0.8 * (step - 14))))
        assert w_prompt[step].item() == pytest.approx(expected, abs=1e-7)
    torch.testing.assert_close(w_id + w_prompt, torch.ones(25))
    assert (w_prompt[1:] <= w_prompt[:-1]).all()  # prompt weight never rises


def test_tdw_phase_boundaries_are_nearly_continuous():
    # The sigmoid meets the constant phases within 0.4 * sigmoid(-6.4) = 6.6e-4 (measured) with the defaults.
    _, at_start = tdw_weights(6, 25)
    _, at_end = tdw_weights(21, 25)
    jump_start = 0.7 - at_start.item()
    jump_end = 0.4 * (1 - 1 / (1 + math.exp(-0.8 * (22 - 14))))  # the curve at 22 minus w_min
    assert 0 < jump_start < 7e-4 and 0 < jump_end < 7e-4
    assert jump_start == pytest.approx(jump_end, rel=1e-4)  # symmetric around t_c
    assert at_end.item() - 0.3 < 2e-3  # step 21 -> 22: 0.0015
    # between neighbouring steps the largest change is around t_c and stays below 0.08
    _, w = tdw_weights(torch.arange(25), 25)
    assert (w[:-1] - w[1:]).max() < 0.08


def test_tdw_scales_with_num_steps():
    # T = 50 is T = 25 with every step doubled: same curve over the same fraction of the trajectory.
    _, w25 = tdw_weights(torch.arange(25), 25)
    _, w50 = tdw_weights(torch.arange(0, 50, 2), 50)
    torch.testing.assert_close(w50, w25)
    # T = 10: prompt phase below 2.4, identity phase from 8.8, centre 5.6, slope 2.0
    _, w10 = tdw_weights(torch.arange(10), 10)
    assert torch.equal(w10[:3], torch.full((3,), 0.7)) and w10[9] == pytest.approx(0.3)
    for step in range(3, 9):
        expected = 0.3 + 0.4 * (1 - 1 / (1 + math.exp(-2.0 * (step - 5.6))))
        assert w10[step].item() == pytest.approx(expected, abs=1e-7)
    assert (w10[1:] <= w10[:-1]).all()


def test_tdw_inverted_mirrors_the_paper_schedule():
    steps = torch.arange(25)
    _, paper = tdw_weights(steps, 25)
    inv_id, inv = tdw_weights(steps, 25, schedule="inverted")
    torch.testing.assert_close(inv, 1.0 - paper)  # w_max + w_min = 1 with the defaults
    assert inv[0] == pytest.approx(0.3) and inv[-1] == pytest.approx(0.7)
    assert (inv[1:] >= inv[:-1]).all()
    torch.testing.assert_close(inv_id + inv, torch.ones(25))
    _, paper2 = tdw_weights(steps, 25, w_max=0.9, w_min=0.2)
    _, inv2 = tdw_weights(steps, 25, schedule="inverted", w_max=0.9, w_min=0.2)
    torch.testing.assert_close(inv2, 1.1 - paper2)


def test_tdw_linear_and_static():
    _, lin = tdw_weights(torch.arange(11), 11, schedule="linear")
    torch.testing.assert_close(lin, torch.linspace(0.7, 0.3, 11))
    w_id, w_prompt = tdw_weights([0, 3, 9], 10, schedule="static", ratio=(1.0, 1.5))
    torch.testing.assert_close(w_id, torch.full((3,), 0.4))
    torch.testing.assert_close(w_prompt, torch.full((3,), 0.6))
    w_id, w_prompt = tdw_weights(4, 10, schedule="static")
    assert w_id.shape == () and w_id.item() == 0.5 and w_prompt.item() == 0.5


def test_tdw_keeps_the_shape_of_steps_and_uses_real_indices():
    steps = torch.tensor([[20, 3], [14, 0]])
    w_id, w_prompt = tdw_weights(steps, 25)
    assert w_id.shape == (2, 2)
    _, sorted_w = tdw_weights(torch.tensor([0, 3, 14, 20]), 25)
    # shuffled order: the weight follows the step, not its position in the list
    assert w_prompt[0, 0] == sorted_w[3] and w_prompt[1, 0] == sorted_w[2] and w_prompt[0, 1] == sorted_w[1]
    empty_id, empty_prompt = tdw_weights([], 25)
    assert empty_id.shape == empty_prompt.shape == (0,)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((25, 25), {}, r"\[0, 25\)"),
        ((-1, 25), {}, r"\[0, 25\)"),
        ((torch.tensor([0.5]), 25), {}, "integer"),
        ((0, 25), {"w_min": 0.8, "w_max": 0.7}, "w_min <= w_max"),
        ((0, 25), {"w_max": 1.2}, "w_min <= w_max <= 1"),
        ((0, 25), {"schedule": "cosine"}, "schedule must be"),
        ((0, 25), {"schedule": "static", "ratio": (0, 0)}, "ratio"),
        ((0, 25), {"schedule": "static", "ratio": (1, -1)}, "ratio"),
        ((0, 0), {}, "num_steps"),
    ],
)
def test_tdw_validation(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tdw_weights(*args, **kwargs)


# --------------------------------------------------------------------------------------------------------
# A pure trade: inside a group the prompt reward falls exactly as identity rises (docs/mini-world.md)
# --------------------------------------------------------------------------------------------------------


@FAST
@given(
    r_id=st.lists(st.floats(0.0, 1.0), min_size=8, max_size=8).filter(lambda r: max(r) - min(r) > 0.01),
    cost=st.floats(0.05, 5.0),
    offset=st.floats(-1.0, 1.0),
)
def test_a_pure_trade_carries_no_naive_signal_and_only_penalties_under_static_sars(r_id, cost, offset):
    # Group normalisation erases the rewards' scales: with r_prompt = offset - cost * r_id the two normalised
    # advantages are exact opposites, whatever the cost, so the naive 1:1 sum is zero for every rollout and
    # SARS at equal weights only subtracts its synergy term.
    ids = torch.tensor(r_id, dtype=torch.float64)
    a_id = group_normalize(ids, 8, eps=0.0)
    a_prompt = group_normalize(offset - cost * ids, 8, eps=0.0)
    torch.testing.assert_close(a_prompt, -a_id, atol=1e-5, rtol=1e-5)
    assert sars(a_id, a_prompt, 1.0, 1.0, synergy="none").abs().max() < 1e-4
    assert (sars(a_id, a_prompt, 0.5, 0.5, alpha=0.5) <= 1e-5).all()


def test_a_lone_edit_among_copies_gains_on_tdw_prompt_steps_only():
    # One rollout draws the asked edit (prompt up, identity down), seven copies (docs/mini-world.md).
    r_id = torch.tensor([0.65] + [1.0] * 7)
    r_prompt = torch.tensor([0.93] + [0.36] * 7)
    w_id, w_prompt = tdw_weights(torch.arange(9), 10)
    a_id, a_prompt = group_normalize(r_id, 8, eps=0.0), group_normalize(r_prompt, 8, eps=0.0)
    assert float(a_prompt[0]) == pytest.approx(math.sqrt(7), rel=1e-4)  # 7/8 of a deviation over sqrt(7)/8
    edit = sars(a_id[:1], a_prompt[:1], w_id[None], w_prompt[None], alpha=0.5)[0]  # [9] steps
    torch.testing.assert_close(
        edit, (w_prompt - w_id) * math.sqrt(7) - 0.5 * math.tanh(7.0), atol=1e-3, rtol=1e-3
    )
    # the demo's eps (0.02) keeps a little of the rewards' scales; the signs per step stay the same
    a_id, a_prompt = group_normalize(r_id, 8, eps=0.02), group_normalize(r_prompt, 8, eps=0.02)
    edit = sars(a_id[:1], a_prompt[:1], w_id[None], w_prompt[None], alpha=0.5)[0]
    assert (edit[:6] > 0).all() and (edit[6:] < 0).all()
