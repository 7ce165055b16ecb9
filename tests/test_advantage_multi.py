"""n-objective SARS for images of K subjects: aggregate modes, pairwise synergy, column-wise normalisation."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cgrpo.advantage import (
    MULTI_SARS_MODES,
    SYNERGIES,
    conflict_mask,
    conflict_rate,
    group_normalize,
    group_normalize_columns,
    multi_conflict_mask,
    multi_conflict_rate,
    multi_sars,
    pairwise_conflict_rates,
    sars,
    synergy_term,
)

FAST = settings(max_examples=60, deadline=None)
adv = st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False, width=32)
# Exact zeros matter: they sit on the boundary of Eq. 11's polarity rule.
adv_or_zero = st.one_of(st.just(0.0), adv)


def _tensor(data, shape):
    values = data.draw(st.lists(adv_or_zero, min_size=math.prod(shape), max_size=math.prod(shape)))
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


def _weights(data, n):
    """TDW-like weights in one of the shapes sars accepts for [N] advantages: scalar, [1, T], [N, 1], [N]."""
    kind = data.draw(st.sampled_from(["scalar", "per_step", "per_sample_2d", "per_sample_1d"]))
    if kind == "scalar":
        w = data.draw(st.floats(0.0, 1.0))
        return 1.0 - w, w
    shape = {"per_step": (1, data.draw(st.integers(1, 5))), "per_sample_2d": (n, 1), "per_sample_1d": (n,)}[
        kind
    ]
    w_prompt = torch.rand(shape, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    return 1.0 - w_prompt, w_prompt


def _pairwise_reference(ids, prompt, w_id, w_prompt, alpha, synergy):
    """The definition, one sample at a time in float64 Python: split linear part + mean of per-pair Eq. 11."""
    objectives = [*ids, prompt]
    linear = sum(w_id / len(ids) * a for a in ids) + w_prompt * prompt
    shaped = []
    for a, b in itertools.combinations(objectives, 2):
        s = synergy_term(torch.tensor([a]), torch.tensor([b]), synergy).item()
        shaped.append(alpha * s if (a > 0 or b > 0) else -alpha * s)
    return linear + sum(shaped) / len(shaped)


# --------------------------------------------------------------------------------------------------------
# K = 1 is Eq. 10-11 exactly; mean / weakest are SARS on the aggregate
# --------------------------------------------------------------------------------------------------------


@FAST
@given(
    data=st.data(),
    n=st.integers(1, 6),
    alpha=st.floats(0.0, 2.0),
    synergy=st.sampled_from(SYNERGIES),
    mode=st.sampled_from(MULTI_SARS_MODES),
)
def test_one_subject_is_exactly_sars(data, n, alpha, synergy, mode):
    a_id, a_prompt = _tensor(data, (n,)), _tensor(data, (n,))
    w_id, w_prompt = _weights(data, n)
    out = multi_sars(a_id[:, None], a_prompt, w_id, w_prompt, alpha, synergy, mode)
    expected = sars(a_id, a_prompt, w_id, w_prompt, alpha, synergy)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert torch.equal(out, expected)


@FAST
@given(data=st.data(), n=st.integers(1, 4), t=st.integers(1, 4), synergy=st.sampled_from(SYNERGIES))
def test_one_subject_is_exactly_sars_for_per_step_advantages(data, n, t, synergy):
    a_id, a_prompt = _tensor(data, (n, t)), _tensor(data, (n, t))
    w_prompt = torch.rand(n, t, generator=torch.Generator().manual_seed(n * 10 + t))
    for mode in MULTI_SARS_MODES:
        out = multi_sars(a_id[..., None], a_prompt, 1 - w_prompt, w_prompt, 0.7, synergy, mode)
        assert torch.equal(out, sars(a_id, a_prompt, 1 - w_prompt, w_prompt, 0.7, synergy)), mode


@FAST
@given(
    data=st.data(),
    n=st.integers(1, 5),
    k=st.integers(1, 4),
    alpha=st.floats(0.0, 2.0),
    synergy=st.sampled_from(SYNERGIES),
)
def test_mean_and_weakest_are_sars_on_the_aggregate(data, n, k, alpha, synergy):
    a_ids, a_prompt = _tensor(data, (n, k)), _tensor(data, (n,))
    w_id, w_prompt = _weights(data, n)
    mean = multi_sars(a_ids, a_prompt, w_id, w_prompt, alpha, synergy, "mean")
    weakest = multi_sars(a_ids, a_prompt, w_id, w_prompt, alpha, synergy, "weakest")
    assert torch.equal(mean, sars(a_ids.mean(dim=1), a_prompt, w_id, w_prompt, alpha, synergy))
    assert torch.equal(weakest, sars(a_ids.amin(dim=1), a_prompt, w_id, w_prompt, alpha, synergy))


# --------------------------------------------------------------------------------------------------------
# pairwise
# --------------------------------------------------------------------------------------------------------


def test_pairwise_closed_form_two_subjects():
    # K = 2: objectives (id1, id2, prompt), pairs (id1, id2), (id1, prompt), (id2, prompt).
    alpha, w_id, w_prompt = 0.6, 0.4, 0.6
    a_ids = torch.tensor([[1.0, -1.0], [-1.0, -0.5], [2.0, 0.5], [0.0, 0.0]])
    a_prompt = torch.tensor([2.0, -2.0, 1.0, -1.0])
    out = multi_sars(a_ids, a_prompt, w_id, w_prompt, alpha, "tanh", "pairwise")
    th = math.tanh
    expected = [
        # every pair has a positive member: +alpha * tanh(product) for each
        0.2 * 1 + 0.2 * -1 + 0.6 * 2 + alpha * (th(-1) + th(2) + th(-2)) / 3,
        # all three non-positive: -alpha * tanh(product) for each
        0.2 * -1 + 0.2 * -0.5 + 0.6 * -2 - alpha * (th(0.5) + th(2) + th(1)) / 3,
        # all positive: bonuses
        0.2 * 2 + 0.2 * 0.5 + 0.6 * 1 + alpha * (th(1) + th(2) + th(0.5)) / 3,
        # products are 0: no shaping
        0.6 * -1,
    ]
    torch.testing.assert_close(out, torch.tensor(expected))
    # min variant: S = min(a, b) * polarity sign, so each pair adds alpha * min(a, b) (see synergy_term)
    out_min = multi_sars(a_ids, a_prompt, w_id, w_prompt, alpha, "min", "pairwise")
    lin = 0.2 * a_ids.sum(dim=1) + 0.6 * a_prompt
    mins = torch.tensor([(-1 + 1 - 1) / 3, (-1 - 2 - 2) / 3, (0.5 + 1 + 0.5) / 3, (0 - 1 - 1) / 3])
    torch.testing.assert_close(out_min, lin + alpha * mins)


@FAST
@given(
    data=st.data(),
    n=st.integers(1, 4),
    k=st.integers(1, 4),
    alpha=st.floats(0.0, 2.0),
    w=st.floats(0.0, 1.0),
    synergy=st.sampled_from(SYNERGIES),
)
def test_pairwise_matches_the_definition(data, n, k, alpha, w, synergy):
    a_ids, a_prompt = _tensor(data, (n, k)), _tensor(data, (n,))
    out = multi_sars(a_ids, a_prompt, 1 - w, w, alpha, synergy, "pairwise")
    for i in range(n):
        # synergy "none"/"linear": S = 0 in every pair, so the reference is the linear part
        expected = _pairwise_reference(a_ids[i].tolist(), a_prompt[i].item(), 1 - w, w, alpha, synergy)
        assert out[i].item() == pytest.approx(expected, abs=1e-5)


def test_pairwise_polarity_rule_on_the_subject_pair():
    # With a_prompt = 0 the two subject-prompt pairs have product 0 and add nothing, so the shaping is the
    # (id1, id2) pair's alone, divided by the 3 pairs.
    alpha = 0.9
    cases = {(1.5, 2.0): +1, (1.5, -2.0): -1, (-1.5, -2.0): -1, (-1.5, 2.0): -1}
    for (x, y), sign in cases.items():
        out = multi_sars(torch.tensor([[x, y]]), torch.tensor([0.0]), 0.5, 0.5, alpha, "tanh", "pairwise")
        shaping = out.item() - 0.25 * (x + y)
        expected = (alpha if (x > 0 or y > 0) else -alpha) * math.tanh(x * y) / 3
        assert shaping == pytest.approx(expected, abs=1e-6)
        assert math.copysign(1.0, shaping) == sign  # a bonus only when both subjects are above their mean


@FAST
@given(
    data=st.data(),
    n=st.integers(1, 4),
    k=st.integers(1, 4),
    alpha=st.floats(0.0, 2.0),
    w=st.floats(0.0, 1.0),
)
def test_pairwise_tanh_shaping_bounds_and_signs(data, n, k, alpha, w):
    a_ids, a_prompt = _tensor(data, (n, k)), _tensor(data, (n,))
    shaped = multi_sars(a_ids, a_prompt, 1 - w, w, alpha, "tanh", "pairwise")
    linear = multi_sars(a_ids, a_prompt, 1 - w, w, alpha, "none", "pairwise")
    shaping = shaped - linear
    objectives = torch.cat([a_ids, a_prompt[:, None]], dim=1)
    positives = (objectives > 0).sum(dim=1)
    assert (shaping.abs() <= alpha + 1e-5).all()  # averaged over pairs: the scale does not grow with K
    # a bonus needs a pair that is positive on both sides; if every objective is positive it is one
    assert (shaping[positives < 2] <= 1e-6).all()
    assert (shaping[positives == k + 1] >= -1e-6).all()


def test_pairwise_and_weakest_penalise_a_missing_subject_that_mean_hides():
    # Sample 0 keeps subject 1 very well and loses subject 2; sample 1 keeps both at the group mean.
    a_ids = torch.tensor([[2.0, -2.0], [0.0, 0.0]])
    a_prompt = torch.tensor([1.0, 1.0])
    mean = multi_sars(a_ids, a_prompt, 0.5, 0.5, mode="mean")
    assert mean[0] == mean[1]
    for mode in ("weakest", "pairwise"):
        out = multi_sars(a_ids, a_prompt, 0.5, 0.5, mode=mode)
        assert out[0] < out[1], mode


# --------------------------------------------------------------------------------------------------------
# Properties of every mode
# --------------------------------------------------------------------------------------------------------


@FAST
@given(
    data=st.data(),
    n=st.integers(1, 4),
    k=st.integers(2, 4),
    alpha=st.floats(0.0, 2.0),
    synergy=st.sampled_from(SYNERGIES),
    mode=st.sampled_from(MULTI_SARS_MODES),
)
def test_permuting_the_subjects_changes_nothing(data, n, k, alpha, synergy, mode):
    a_ids, a_prompt = _tensor(data, (n, k)), _tensor(data, (n,))
    w_id, w_prompt = _weights(data, n)
    perm = torch.tensor(data.draw(st.permutations(range(k))))
    out = multi_sars(a_ids, a_prompt, w_id, w_prompt, alpha, synergy, mode)
    permuted = multi_sars(a_ids[:, perm], a_prompt, w_id, w_prompt, alpha, synergy, mode)
    torch.testing.assert_close(permuted, out, atol=1e-6, rtol=1e-6)


@FAST
@given(data=st.data(), n=st.integers(1, 4), k=st.integers(1, 4), c=st.floats(0.0, 3.0))
def test_synergy_none_is_the_linear_part(data, n, k, c):
    a_ids, a_prompt = _tensor(data, (n, k)), _tensor(data, (n,))
    b_ids, b_prompt = _tensor(data, (n, k)), _tensor(data, (n,))
    w_prompt = torch.rand(1, 3)
    w_id = 1 - w_prompt
    for mode in MULTI_SARS_MODES:
        for name in ("none", "linear"):
            naive = multi_sars(a_ids, a_prompt, w_id, w_prompt, 0.5, name, mode)
            for synergy in SYNERGIES:  # alpha = 0 removes every synergy variant
                zero = multi_sars(a_ids, a_prompt, w_id, w_prompt, 0.0, synergy, mode)
                torch.testing.assert_close(zero, naive, atol=1e-6, rtol=0)
        # positively homogeneous in the advantages (min is too)
        scaled = multi_sars(c * a_ids, c * a_prompt, w_id, w_prompt, 0.5, "none", mode)
        torch.testing.assert_close(scaled, c * multi_sars(a_ids, a_prompt, w_id, w_prompt, 0.5, "none", mode))
    f = lambda x, y: multi_sars(x, y, w_id, w_prompt, 0.5, "none", "mean")  # noqa: E731
    torch.testing.assert_close(f(a_ids + b_ids, a_prompt + b_prompt), f(a_ids, a_prompt) + f(b_ids, b_prompt))
    # the split sum sum_k (w_id / K) a_id_k + w_prompt a_prompt, shared by mean and pairwise
    expected = (w_id[..., None] / k * a_ids[:, None, :]).sum(dim=-1) + w_prompt * a_prompt[:, None]
    torch.testing.assert_close(f(a_ids, a_prompt), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(
        f(a_ids, a_prompt), multi_sars(a_ids, a_prompt, w_id, w_prompt, 0.5, "none", "pairwise")
    )
    weakest = multi_sars(a_ids, a_prompt, w_id, w_prompt, 0.5, "none", "weakest")
    torch.testing.assert_close(weakest, w_id * a_ids.amin(dim=1, keepdim=True) + w_prompt * a_prompt[:, None])


# --------------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MULTI_SARS_MODES)
def test_per_step_weights_broadcast_like_sars(mode):
    n, k, t = 6, 3, 4
    g = torch.Generator().manual_seed(0)
    a_ids, a_prompt = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    w_prompt = torch.linspace(0.7, 0.3, t)[None]  # [1, T]
    out = multi_sars(a_ids, a_prompt, 1 - w_prompt, w_prompt, mode=mode)
    assert out.shape == (n, t)
    for j in range(t):
        wp = float(w_prompt[0, j])
        assert torch.equal(out[:, j], multi_sars(a_ids, a_prompt, 1 - wp, wp, mode=mode))
    # [N, 1, K] advantages with [1, T] weights: the same
    assert torch.equal(multi_sars(a_ids[:, None], a_prompt[:, None], 1 - w_prompt, w_prompt, mode=mode), out)
    # per-step advantages [N, T, K] with [N, T] weights
    per_step = torch.randn(n, t, k, generator=g)
    w2 = torch.rand(n, t, generator=g)
    assert multi_sars(per_step, torch.randn(n, t, generator=g), 1 - w2, w2, mode=mode).shape == (n, t)
    # 1-D weights are per sample for [N] advantages (as in sars), also when N == T
    w1 = torch.rand(n, generator=g)
    out1 = multi_sars(a_ids, a_prompt, 1 - w1, w1, mode=mode)
    assert out1.shape == (n,)
    torch.testing.assert_close(
        out1, multi_sars(a_ids, a_prompt, (1 - w1)[:, None], w1[:, None], mode=mode)[:, 0]
    )
    with pytest.raises(ValueError, match="do not broadcast"):
        multi_sars(a_ids, a_prompt, torch.rand(n + 1), 0.5, mode=mode)


def test_bfloat16_inputs_are_upcast():
    a_ids, a_prompt = torch.randn(8, 2), torch.randn(8)
    for mode in MULTI_SARS_MODES:
        out = multi_sars(a_ids.bfloat16(), a_prompt.bfloat16(), 0.5, 0.5, mode=mode)
        assert out.dtype == torch.float32
        expected = multi_sars(a_ids.bfloat16().float(), a_prompt.bfloat16().float(), 0.5, 0.5, mode=mode)
        assert torch.equal(out, expected)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((torch.zeros(4, 2), torch.zeros(4)), {"mode": "median"}, "mode must be one of"),
        ((torch.zeros(4, 2), torch.zeros(4)), {"synergy": "cubic"}, "synergy must be one of"),
        ((torch.zeros(4, 2), torch.zeros(4)), {"alpha": -0.1}, "alpha must be"),
        ((torch.zeros(4, 2), torch.zeros(4)), {"alpha": float("inf")}, "alpha must be"),
        ((torch.zeros(4, 2), torch.zeros(4)), {"alpha": "big"}, "alpha must be"),
        ((torch.zeros(4), torch.zeros(4)), {}, r"a_ids must be \[N, K\]"),
        ((torch.zeros(4, 0), torch.zeros(4)), {}, "K >= 1"),
        ((torch.zeros(4, 2), torch.zeros(2)), {}, r"without its subject axis, \(4,\), got \(2,\)"),
        ((torch.zeros(4, 2), torch.zeros(4, 1)), {}, "without its subject axis"),
    ],
)
def test_multi_sars_validation(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        multi_sars(*args, 0.5, 0.5, **kwargs)


# --------------------------------------------------------------------------------------------------------
# group_normalize_columns
# --------------------------------------------------------------------------------------------------------


def test_group_normalize_columns_normalises_each_column_on_its_own():
    g = torch.Generator().manual_seed(1)
    rewards = torch.rand(8, 3, generator=g)
    out = group_normalize_columns(rewards, 4)
    assert out.shape == (8, 3) and out.dtype == torch.float32
    for k in range(3):
        assert torch.equal(out[:, k], group_normalize(rewards[:, k], 4))
    # the scale of one subject's rewards does not leak into another subject's advantages
    scaled = rewards.clone()
    scaled[:, 2] *= 100.0
    assert torch.equal(group_normalize_columns(scaled, 4)[:, :2], out[:, :2])
    glob = group_normalize_columns(rewards, 4, std="global", eps=0.0)
    for k in range(3):
        assert torch.equal(glob[:, k], group_normalize(rewards[:, k], 4, eps=0.0, std="global"))


def test_group_normalize_columns_valid_masks():
    rewards = torch.tensor([[1.0, 0.0], [2.5, float("nan")], [3.0, 1.0], [9.0, 2.0]])
    per_sample = torch.tensor([True, False, True, True])
    out = group_normalize_columns(rewards, 4, valid=per_sample)
    for k in range(2):
        assert torch.equal(out[:, k], group_normalize(rewards[:, k], 4, valid=per_sample))
    assert (out[1] == 0).all()
    per_column = torch.tensor([[True, True], [True, False], [True, True], [False, True]])
    out = group_normalize_columns(rewards, 4, valid=per_column)
    for k in range(2):
        assert torch.equal(out[:, k], group_normalize(rewards[:, k], 4, valid=per_column[:, k]))
    assert out[3, 0] == 0 and out[1, 1] == 0 and out[1, 0] != 0


@pytest.mark.parametrize(
    ("rewards", "kwargs", "message"),
    [
        (torch.tensor([[1.0, 2.0], [3.0, float("inf")]]), {}, r"column 1 \(of 2\).*1 non-finite.*\[1\]"),
        (torch.zeros(4), {}, r"2-D tensor \[N, K\]"),
        (torch.zeros(4, 0), {}, "K >= 1"),
        (torch.zeros(5, 2), {}, "not a multiple"),
        (torch.zeros(4, 2), {"std": "batch"}, "std must be"),
        (torch.zeros(4, 2), {"eps": -1.0}, "eps must be"),
        (torch.zeros(4, 2), {"valid": torch.ones(4)}, "bool"),
        (torch.zeros(4, 2), {"valid": torch.ones(2, dtype=torch.bool)}, r"valid must have shape \[N\]"),
    ],
)
def test_group_normalize_columns_validation(rewards, kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_normalize_columns(rewards, 2, **kwargs)


# --------------------------------------------------------------------------------------------------------
# Conflict statistics
# --------------------------------------------------------------------------------------------------------


def test_multi_conflict_with_one_subject_is_conflict_mask():
    a, b = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0, 2.0]), torch.tensor([1.0, -1.0, 1.0, -1.0, 3.0, -0.5])
    assert torch.equal(multi_conflict_mask(a[:, None], b), conflict_mask(a, b))
    assert multi_conflict_rate(a[:, None], b) == conflict_rate(a, b)
    rates = pairwise_conflict_rates(a[:, None], b)
    assert rates[0, 1].item() == pytest.approx(conflict_rate(a, b))


def test_multi_conflict_counts_any_opposite_pair():
    a_ids = torch.tensor([[1.0, -1.0], [1.0, 2.0], [-1.0, -2.0], [0.0, 1.0]])
    a_prompt = torch.tensor([1.0, 1.0, 0.5, 0.0])
    assert multi_conflict_mask(a_ids, a_prompt).tolist() == [True, False, True, False]
    assert multi_conflict_rate(a_ids, a_prompt) == pytest.approx(0.5)
    rates = pairwise_conflict_rates(a_ids, a_prompt)
    expected = torch.tensor([[0.0, 0.25, 0.25], [0.25, 0.0, 0.5], [0.25, 0.5, 0.0]])
    torch.testing.assert_close(rates, expected)
    with pytest.raises(ValueError, match="empty"):
        multi_conflict_rate(torch.zeros(0, 2), torch.zeros(0))
    with pytest.raises(ValueError, match="empty"):
        pairwise_conflict_rates(torch.zeros(0, 2), torch.zeros(0))
