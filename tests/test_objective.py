"""Clipped GRPO surrogate (Eq. 7), its diagnostics and the optional KL penalties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cgrpo.objective import PolicyLoss, clipped_policy_loss, gaussian_mean_kl, kl_k3, log_ratio_scale
from cgrpo.sde import sde_step_with_logprob


def _reference_loss(log_prob, old, adv, eps, adv_clip):
    a = adv.double().clamp(-adv_clip, adv_clip)
    ratio = torch.exp(log_prob.double() - old.double())
    per = torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps, 1 + eps))
    return per.mean()


def test_unchanged_policy_gives_ratio_one_and_minus_mean_advantage():
    log_prob = torch.randn(8, 5) - 3.0
    adv = torch.randn(8, 5)
    out = clipped_policy_loss(log_prob, log_prob.clone(), adv)
    assert isinstance(out, PolicyLoss)
    assert out.ratio_mean.item() == 1.0 and out.ratio_min.item() == 1.0 and out.ratio_max.item() == 1.0
    assert out.clip_fraction.item() == 0.0 and out.approx_kl.item() == 0.0
    assert out.loss.item() == pytest.approx(-adv.mean().item(), abs=1e-7)
    # advantages beyond adv_clip are clamped first
    big = torch.tensor([10.0, -7.0, 1.0, 0.5])
    lp = torch.zeros(4)
    out = clipped_policy_loss(lp, lp, big, adv_clip=5.0)
    assert out.loss.item() == pytest.approx(-(5.0 - 5.0 + 1.0 + 0.5) / 4)
    assert out.adv_clip_fraction.item() == 0.5


def test_clip_fraction_counts_entries_outside_the_clip_range():
    eps = 1e-3
    old = torch.zeros(10)
    # log-ratios well inside, and well outside, [log(1 - eps), log(1 + eps)]
    delta = torch.tensor([0.0, 1e-4, -1e-4, 5e-4, -5e-4, 2e-3, -2e-3, 0.1, -0.1, 3e-3])
    out = clipped_policy_loss(old + delta, old, torch.ones(10), clip_range=eps)
    assert out.clip_fraction.item() == pytest.approx(0.5)
    assert out.approx_kl.item() == pytest.approx(0.5 * (delta.double() ** 2).mean().item(), rel=1e-5)


@settings(max_examples=50, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 12),
    eps=st.sampled_from([1e-4, 1e-2, 0.2]),
)
def test_loss_matches_the_eq7_reference(data, n, eps):
    floats = st.floats(-0.25, 0.25, allow_nan=False, width=32)
    delta = torch.tensor(data.draw(st.lists(floats, min_size=n, max_size=n)))
    adv = torch.tensor(data.draw(st.lists(st.floats(-8, 8, width=32), min_size=n, max_size=n)))
    old = torch.full((n,), -2.0)
    out = clipped_policy_loss(old + delta, old, adv, clip_range=eps, adv_clip=5.0)
    expected = _reference_loss(old + delta, old, adv, eps, 5.0)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_gradient_is_cut_only_where_the_ratio_is_clipped_in_the_advantage_direction():
    eps = 0.01
    old = torch.zeros(4)
    # A > 0 and ratio above 1 + eps: clipped (no gradient); A > 0 and ratio below 1 - eps: not clipped;
    # A < 0 and ratio below 1 - eps: clipped; A < 0 and ratio above 1 + eps: not clipped.
    lp = torch.tensor([0.1, -0.1, -0.1, 0.1], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    clipped_policy_loss(lp, old, adv, clip_range=eps).loss.backward()
    ratio = torch.exp(lp.detach())
    expected = torch.tensor([0.0, -ratio[1].item() / 4, 0.0, ratio[3].item() / 4])
    torch.testing.assert_close(lp.grad, expected)


def test_per_sample_advantages_broadcast_over_steps_even_when_b_equals_t():
    b = t = 3
    lp = torch.randn(b, t)
    old = lp + 0.01 * torch.randn(b, t)
    adv = torch.tensor([1.0, -2.0, 0.5])
    out = clipped_policy_loss(lp, old, adv, clip_range=0.2)
    ref = _reference_loss(lp, old, adv[:, None].expand(b, t), 0.2, 5.0)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    per_step = clipped_policy_loss(lp, old, adv[:, None].expand(b, t).clone(), clip_range=0.2)
    assert per_step.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        clipped_policy_loss(lp, old, torch.ones(4))


def test_bfloat16_log_probs():
    lp = torch.randn(6, 2)
    out = clipped_policy_loss(lp.bfloat16(), lp.bfloat16(), torch.ones(6))
    assert out.loss.dtype == torch.float32 and out.loss.item() == pytest.approx(-1.0)


def test_k3_kl():
    lp = torch.randn(5)
    assert torch.equal(kl_k3(lp, lp), torch.zeros(5))
    ref = lp + torch.tensor([0.5, -0.5, 1.0, -1.0, 0.0])
    d = (ref - lp).double()
    torch.testing.assert_close(kl_k3(lp, ref).double(), torch.exp(d) - d - 1, atol=1e-6, rtol=1e-6)
    assert (kl_k3(lp, ref) >= 0).all()


def test_kl_penalty_is_added_with_its_coefficient():
    lp = torch.randn(4, 3)
    adv = torch.randn(4)
    ref = lp + 0.3
    base = clipped_policy_loss(lp, lp, adv)
    with_kl = clipped_policy_loss(lp, lp, adv, ref_log_prob=ref, kl_coef=0.1)
    k = kl_k3(lp, ref).mean()
    assert with_kl.kl.item() == pytest.approx(k.item())
    assert with_kl.loss.item() == pytest.approx(base.loss.item() + 0.1 * k.item(), rel=1e-6)
    # a KL given but not weighted is reported, not added
    reported = clipped_policy_loss(lp, lp, adv, ref_log_prob=ref)
    assert reported.loss.item() == base.loss.item() and reported.kl.item() > 0
    precomputed = clipped_policy_loss(lp, lp, adv, kl=torch.full((4, 3), 2.0), kl_coef=0.5)
    assert precomputed.loss.item() == pytest.approx(base.loss.item() + 1.0, rel=1e-6)


def test_gaussian_mean_kl_equals_the_kl_of_the_sde_transitions():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    v_ref = v + 0.1 * torch.randn(3, 4, 6, generator=g)
    sigma = torch.tensor([0.9, 0.5, 0.2])
    step = sde_step_with_logprob(v, sigma, sigma - 0.1, x, 0.7, generator=g)
    ref = sde_step_with_logprob(v_ref, sigma, sigma - 0.1, x, 0.7, prev_sample=step.prev_sample)
    kl = gaussian_mean_kl(step.mean, ref.mean, step.std)
    s = step.std.double()[:, None, None]
    exact = torch.distributions.kl_divergence(
        torch.distributions.Normal(step.mean.double(), s), torch.distributions.Normal(ref.mean.double(), s)
    ).mean(dim=(1, 2))
    assert kl.shape == (3,)
    torch.testing.assert_close(kl.double(), exact, rtol=1e-5, atol=1e-9)
    assert torch.equal(gaussian_mean_kl(step.mean, step.mean, step.std), torch.zeros(3))


def test_squared_error_log_ratio_is_flow_grpo_cps_surrogate():
    """The scaled log-ratio equals that of -mean((x_next - mean)^2), computed here in float64 from the
    transitions' means; its gradient is the density's times 2 std^2 per sample."""
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    v_new = (v + 0.05 * torch.randn(3, 5, 4, generator=g)).requires_grad_()
    sigma = torch.tensor([0.95, 0.6, 0.25])
    old = sde_step_with_logprob(v, sigma, sigma - 0.1, x, 0.7, generator=g, formulation="cps")
    new = sde_step_with_logprob(
        v_new, sigma, sigma - 0.1, x, 0.7, prev_sample=old.prev_sample, formulation="cps"
    )
    scale = log_ratio_scale(new.std, "squared_error")
    torch.testing.assert_close(scale, 2 * new.std.square())
    x_next = old.prev_sample.double()
    surrogate = [-(x_next - m.double()).square().mean(dim=(1, 2)) for m in (new.mean, old.mean)]
    # float32 log-densities near -1 leave their differences (2e-3 to 1e-2 here) a relative error under 1e-4
    torch.testing.assert_close(
        ((new.log_prob - old.log_prob) * scale).double(), surrogate[0] - surrogate[1], rtol=1e-3, atol=0
    )
    (grad_density,) = torch.autograd.grad(new.log_prob.sum(), v_new, retain_graph=True)
    (grad_scaled,) = torch.autograd.grad((new.log_prob * scale).sum(), v_new)
    torch.testing.assert_close(grad_scaled, grad_density * scale[:, None, None])
    assert torch.equal(log_ratio_scale(new.std), torch.ones(3))
    with pytest.raises(ValueError, match="log_prob must be one of"):
        log_ratio_scale(new.std, "cps")


def test_diagnostics_are_detached():
    lp = torch.randn(4, requires_grad=True)
    out = clipped_policy_loss(lp, lp.detach() - 0.01, torch.ones(4), ref_log_prob=lp.detach(), kl_coef=0.1)
    assert out.loss.requires_grad
    for name in PolicyLoss._fields[1:]:
        value = getattr(out, name)
        assert not value.requires_grad and value.ndim == 0, name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_range": 0.0}, "clip_range"),
        ({"adv_clip": -1.0}, "adv_clip"),
        ({"kl_coef": -0.1}, "kl_coef"),
        ({"kl_coef": 0.1}, "needs ref_log_prob or kl"),
        ({"ref_log_prob": torch.zeros(4), "kl": torch.zeros(4)}, "not both"),
        ({"kl": torch.zeros(5), "kl_coef": 0.1}, "shape of log_prob"),
    ],
)
def test_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        clipped_policy_loss(torch.zeros(4), torch.zeros(4), torch.ones(4), **kwargs)
    with pytest.raises(ValueError, match="differ in shape"):
        clipped_policy_loss(torch.zeros(4), torch.zeros(3), torch.ones(4))
