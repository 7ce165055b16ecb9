"""FLUX sigmas (vs diffusers), Euler ODE and SDE steps with log-probs, step selection."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from cgrpo.sde import (
    flux_mu,
    flux_sigmas,
    ode_step,
    sde_step_with_logprob,
    sde_window,
    select_steps,
    steps_to_mask,
)

FORMS = ("flow_grpo", "dance_grpo")


# --------------------------------------------------------------------------------------------------------
# sigmas
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_steps", "image_seq_len", "base_shift", "max_shift"),
    [
        (25, 4096, 0.5, 1.15),
        (10, 64, 0.5, 1.15),
        (28, 1024, 0.5, 1.15),
        (1, 256, 0.5, 1.15),
        (16, 2048, 0.3, 0.9),
    ],
)
def test_flux_sigmas_match_diffusers_dynamic_shift(num_steps, image_seq_len, base_shift, max_shift):
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=base_shift,
        max_shift=max_shift,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    mu = flux_mu(image_seq_len, base_shift=base_shift, max_shift=max_shift)
    # the way diffusers' FluxPipeline calls it
    scheduler.set_timesteps(
        num_inference_steps=num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu
    )
    ours = flux_sigmas(num_steps, image_seq_len, base_shift=base_shift, max_shift=max_shift)
    assert ours.dtype == torch.float32 and ours.shape == (num_steps + 1,)
    torch.testing.assert_close(ours, scheduler.sigmas, atol=2e-7, rtol=0)


@pytest.mark.parametrize(("num_steps", "shift"), [(10, 1.0), (10, 3.0), (25, 3.0), (40, 0.5)])
def test_flux_sigmas_match_diffusers_static_shift(num_steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_inference_steps=num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps))
    torch.testing.assert_close(flux_sigmas(num_steps, shift=shift), scheduler.sigmas, atol=2e-7, rtol=0)


def test_flux_sigmas_properties():
    sig = flux_sigmas(25, 4096)
    assert sig[0] == 1.0 and sig[-1] == 0.0
    assert (sig[1:] < sig[:-1]).all()
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    # larger images are shifted towards noise (FLUX's resolution-dependent shift)
    assert (flux_sigmas(25, 4096)[1:-1] > flux_sigmas(25, 256)[1:-1]).all()
    # a static shift wins over image_seq_len
    torch.testing.assert_close(
        flux_sigmas(8, 4096, shift=1.0), torch.cat([torch.linspace(1, 1 / 8, 8), torch.zeros(1)])
    )
    with pytest.raises(ValueError, match="image_seq_len"):
        flux_sigmas(10)
    with pytest.raises(ValueError, match="num_steps"):
        flux_sigmas(0, 256)
    with pytest.raises(ValueError, match="shift"):
        flux_sigmas(10, shift=0.0)


# --------------------------------------------------------------------------------------------------------
# ODE / SDE steps
# --------------------------------------------------------------------------------------------------------


def _inputs(batch=3, shape=(4, 5), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, *shape, generator=g).to(dtype)
    velocity = torch.randn(batch, *shape, generator=g).to(dtype)
    return sample, velocity


def test_ode_step_is_euler():
    x, v = _inputs()
    torch.testing.assert_close(ode_step(v, 0.8, 0.6, x), x - 0.2 * v)
    sig = torch.tensor([0.9, 0.5, 0.3])
    sig_next = torch.tensor([0.8, 0.1, 0.0])
    expected = x + (sig_next - sig)[:, None, None] * v
    torch.testing.assert_close(ode_step(v, sig, sig_next, x), expected)


@pytest.mark.parametrize("formulation", FORMS)
def test_sde_log_prob_is_the_gaussian_density_averaged_over_dims(formulation):
    x, v = _inputs(batch=4, shape=(3, 8))
    sigma = torch.tensor([1.0, 0.8, 0.5, 0.2])
    sigma_next = torch.tensor([0.9, 0.7, 0.3, 0.0])
    gen = torch.Generator().manual_seed(1)
    step = sde_step_with_logprob(v, sigma, sigma_next, x, 0.7, generator=gen, formulation=formulation)
    assert step.log_prob.shape == (4,) and step.std.shape == (4,)
    normal = torch.distributions.Normal(step.mean.double(), step.std.double()[:, None, None])
    expected = normal.log_prob(step.prev_sample.double()).mean(dim=(1, 2))
    torch.testing.assert_close(step.log_prob.double(), expected, atol=1e-5, rtol=1e-6)
    # and with scipy, independently of torch, on one sample
    from scipy.stats import norm

    i = 2
    sp = norm.logpdf(step.prev_sample[i].numpy(), step.mean[i].numpy(), step.std[i].item()).mean()
    assert step.log_prob[i].item() == pytest.approx(sp, abs=1e-4)


def test_sde_flow_grpo_mean_and_std_closed_form():
    x, v = _inputs()
    a, s, sn = 0.7, 0.6, 0.45
    dt = sn - s
    g = a * math.sqrt(s / (1 - s))
    step = sde_step_with_logprob(v, s, sn, x, a, generator=torch.Generator().manual_seed(0))
    mean = x * (1 + g**2 / (2 * s) * dt) + v * (1 + g**2 * (1 - s) / (2 * s)) * dt  # Flow-GRPO's expansion
    torch.testing.assert_close(step.mean, mean)
    torch.testing.assert_close(step.std, torch.full((3,), g * math.sqrt(-dt)))
    # sigma = 1 uses sigma_next in the denominator (Flow-GRPO's sigmas[1])
    first = sde_step_with_logprob(v, 1.0, 0.9, x, a, generator=torch.Generator().manual_seed(0))
    g1 = a * math.sqrt(1.0 / (1 - 0.9))
    torch.testing.assert_close(first.std, torch.full((3,), g1 * math.sqrt(0.1)))
    assert torch.isfinite(first.log_prob).all() and torch.isfinite(first.mean).all()


def test_sde_dance_grpo_mean_from_the_score():
    x, v = _inputs()
    eta, s, sn = 0.3, 0.6, 0.45
    x0_hat = x - s * v
    score = -(x - (1 - s) * x0_hat) / s**2  # score of N((1 - s) x0, s^2) at x
    mean = x + (v - 0.5 * eta**2 * score) * (sn - s)
    step = sde_step_with_logprob(v, s, sn, x, eta, formulation="dance_grpo", generator=torch.Generator())
    torch.testing.assert_close(step.mean, mean)
    torch.testing.assert_close(step.std, torch.full((3,), eta * math.sqrt(s - sn)))


@pytest.mark.parametrize("formulation", FORMS)
def test_reevaluation_with_prev_sample_is_identical(formulation):
    x, v = _inputs(batch=5, shape=(16, 12))
    gen = torch.Generator().manual_seed(7)
    sampled = sde_step_with_logprob(v, 0.7, 0.6, x, 0.7, generator=gen, formulation=formulation)
    again = sde_step_with_logprob(
        v, 0.7, 0.6, x, 0.7, prev_sample=sampled.prev_sample, formulation=formulation
    )
    assert torch.equal(again.log_prob, sampled.log_prob)
    assert torch.equal(again.prev_sample, sampled.prev_sample)
    # a changed velocity changes the log-prob of the stored transition
    other = sde_step_with_logprob(v + 0.05, 0.7, 0.6, x, 0.7, prev_sample=sampled.prev_sample)
    assert not torch.allclose(other.log_prob, sampled.log_prob)


def test_seeded_noise_is_reproducible_and_dtype_independent():
    x, v = _inputs()
    a = sde_step_with_logprob(v, 0.5, 0.4, x, generator=torch.Generator().manual_seed(3))
    b = sde_step_with_logprob(v, 0.5, 0.4, x, generator=torch.Generator().manual_seed(3))
    c = sde_step_with_logprob(v, 0.5, 0.4, x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.prev_sample, b.prev_sample) and not torch.equal(a.prev_sample, c.prev_sample)
    h = sde_step_with_logprob(
        v.bfloat16(), 0.5, 0.4, x.bfloat16(), generator=torch.Generator().manual_seed(3)
    )
    noise_a = (a.prev_sample - a.mean) / a.std[:, None, None]
    noise_h = (h.prev_sample - h.mean) / h.std[:, None, None]
    torch.testing.assert_close(noise_a, noise_h, atol=1e-4, rtol=1e-4)


def test_bfloat16_inputs_compute_in_float32():
    x, v = _inputs(batch=2, shape=(64, 16))
    xb, vb = x.bfloat16(), v.bfloat16()
    gen = torch.Generator().manual_seed(0)
    step = sde_step_with_logprob(vb, 0.9, 0.85, xb, 0.7, generator=gen)
    assert step.prev_sample.dtype == step.log_prob.dtype == step.mean.dtype == torch.float32
    ref = sde_step_with_logprob(vb.float(), 0.9, 0.85, xb.float(), 0.7, prev_sample=step.prev_sample)
    assert torch.equal(step.log_prob, ref.log_prob)
    assert torch.isfinite(step.log_prob).all()


def test_sampled_noise_has_the_transition_std():
    x = torch.zeros(4, 20000)
    v = torch.ones(4, 20000)
    sigma = torch.tensor([0.95, 0.7, 0.4, 0.1])
    sigma_next = sigma - 0.05
    for formulation in FORMS:
        step = sde_step_with_logprob(
            v, sigma, sigma_next, x, 0.7, generator=torch.Generator().manual_seed(0), formulation=formulation
        )
        residual = step.prev_sample - step.mean
        torch.testing.assert_close(residual.std(dim=1), step.std, rtol=0.03, atol=0)
        # average log-density of N(0, s^2) samples: -log s - 1/2 log(2 pi) - 1/2
        expected = -torch.log(step.std) - 0.5 * math.log(2 * math.pi) - 0.5
        torch.testing.assert_close(step.log_prob, expected, atol=0.02, rtol=0)


@pytest.mark.parametrize("formulation", FORMS)
def test_noise_level_zero_is_the_ode_step(formulation):
    x, v = _inputs()
    step = sde_step_with_logprob(v, 0.6, 0.5, x, 0.0, formulation=formulation)
    torch.testing.assert_close(step.prev_sample, ode_step(v, 0.6, 0.5, x), atol=0, rtol=0)
    assert torch.equal(step.log_prob, torch.zeros(3)) and torch.equal(step.std, torch.zeros(3))
    # and the mean converges to the ODE step as the noise vanishes (the correction is O(noise^2))
    gaps = []
    for a in (0.1, 0.01, 0.001):
        mean = sde_step_with_logprob(
            v, 0.6, 0.5, x, a, formulation=formulation, generator=torch.Generator()
        ).mean
        gaps.append((mean - ode_step(v, 0.6, 0.5, x)).abs().max().item())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-5


@pytest.mark.parametrize("formulation", FORMS)
def test_sde_preserves_the_marginals_of_the_flow(formulation):
    # 1-D Gaussian data x0 ~ N(0, s0^2): the exact velocity is linear and
    # x_sigma ~ N(0, (1 - sigma)^2 s0^2 + sigma^2).
    # Without the score correction (or with its sign flipped) the injected noise would inflate the variance.
    s0, num_steps = 0.5, 100

    def velocity(x, s):
        return (s - (1 - s) * s0**2) / ((1 - s) ** 2 * s0**2 + s**2) * x

    gen = torch.Generator().manual_seed(0)
    sigmas = flux_sigmas(num_steps, shift=1.0)
    x = torch.randn(20000, 1, generator=gen)
    for t in range(num_steps):
        s, sn = float(sigmas[t]), float(sigmas[t + 1])
        if t < num_steps - 1:
            x = sde_step_with_logprob(
                velocity(x, s), s, sn, x, 0.7, generator=gen, formulation=formulation
            ).prev_sample
        else:
            x = ode_step(velocity(x, s), s, sn, x)
        if t == 49:
            assert x.var().item() == pytest.approx((1 - sn) ** 2 * s0**2 + sn**2, rel=0.05)
    assert x.var().item() == pytest.approx(s0**2, rel=0.05)
    assert abs(x.mean().item()) < 0.02


def test_cps_closed_form_and_ode_limit():
    x, v = _inputs()
    eta, s, sn = 0.7, 0.6, 0.45
    gen = torch.Generator().manual_seed(0)
    step = sde_step_with_logprob(v, s, sn, x, eta, formulation="cps", generator=gen)
    x0_hat, noise_hat = x - s * v, x + (1 - s) * v
    angle = math.pi * eta / 2
    torch.testing.assert_close(step.mean, (1 - sn) * x0_hat + sn * math.cos(angle) * noise_hat)
    torch.testing.assert_close(step.std, torch.full((3,), sn * math.sin(angle)))
    # eta = 0 is exactly the Euler ODE step (DDIM), with no density
    ode = sde_step_with_logprob(v, s, sn, x, 0.0, formulation="cps")
    torch.testing.assert_close(ode.prev_sample, ode_step(v, s, sn, x))
    # the log-prob is the Gaussian density of the drawn state
    normal = torch.distributions.Normal(step.mean.double(), step.std.double()[:, None, None])
    expected = normal.log_prob(step.prev_sample.double()).mean(dim=(1, 2))
    torch.testing.assert_close(step.log_prob.double(), expected, atol=1e-5, rtol=1e-6)


def test_cps_keeps_the_coefficients_of_the_next_noise_level():
    # With the exact velocity of one data point x0 (v = noise - x0), a CPS step lands on
    # (1 - sigma_next) x0 + sigma_next * fresh unit noise: mean (1 - sigma_next) x0, std sigma_next.
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((1, 50000), 0.3)
    noise = torch.randn(1, 50000, generator=gen)
    for s, sn in ((1.0, 0.8), (0.6, 0.3), (0.2, 0.05)):
        x = (1 - s) * x0 + s * noise
        step = sde_step_with_logprob(noise - x0, s, sn, x, 0.9, formulation="cps", generator=gen)
        out = step.prev_sample
        assert out.mean().item() == pytest.approx((1 - sn) * 0.3, abs=0.01)
        assert out.std().item() == pytest.approx(sn, rel=0.02)
    # Flow-GRPO's Euler-Maruyama step over a coarse interval does not: it leaves extra noise
    s, sn = 0.6, 0.3
    x = (1 - s) * x0 + s * noise
    em = sde_step_with_logprob(noise - x0, s, sn, x, 0.9, generator=gen).prev_sample
    assert em.std().item() > 1.1 * sn


def test_cps_validation():
    x, v = _inputs()
    with pytest.raises(ValueError, match="eta"):
        sde_step_with_logprob(v, 0.5, 0.4, x, 1.5, formulation="cps")
    with pytest.raises(ValueError, match="sigma_next > 0"):
        sde_step_with_logprob(v, 0.5, 0.0, x, 0.5, formulation="cps")


def test_log_prob_gradient_reaches_the_velocity():
    x, v = _inputs()
    stored = sde_step_with_logprob(v, 0.7, 0.6, x, generator=torch.Generator().manual_seed(0)).prev_sample
    v = v.clone().requires_grad_(True)
    step = sde_step_with_logprob(v, 0.7, 0.6, x, prev_sample=stored)
    step.log_prob.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


@settings(max_examples=40, deadline=None)
@given(
    s=st.floats(0.02, 1.0),
    frac=st.floats(0.05, 0.95),
    a=st.floats(0.05, 1.5),
    formulation=st.sampled_from(FORMS),
)
def test_per_sample_sigmas_equal_scalar_calls(s, frac, a, formulation):
    x, v = _inputs(batch=2, shape=(6,))
    sn = s * frac
    stored = x + 0.1 * v
    batched = sde_step_with_logprob(
        v, torch.tensor([s, 0.5]), torch.tensor([sn, 0.4]), x, a, prev_sample=stored, formulation=formulation
    )
    single = sde_step_with_logprob(v[:1], s, sn, x[:1], a, prev_sample=stored[:1], formulation=formulation)
    torch.testing.assert_close(batched.log_prob[:1], single.log_prob)
    torch.testing.assert_close(batched.mean[:1], single.mean)
    assert torch.isfinite(batched.log_prob).all()


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((0.5, 0.6), {}, "sigma_next < sigma"),
        ((0.5, 0.5), {}, "sigma_next < sigma"),
        ((1.2, 0.5), {}, "sigma <= 1"),
        ((0.5, -0.1), {}, "0 <= sigma_next"),
        ((0.5, 0.4), {"noise_level": -1.0}, "noise_level"),
        ((0.5, 0.4), {"formulation": "ddim"}, "formulation"),
        ((torch.tensor([0.5, 0.4]), 0.3), {}, "B = 3"),
    ],
)
def test_sde_step_validation(args, kwargs, message):
    x, v = _inputs()
    with pytest.raises(ValueError, match=message):
        sde_step_with_logprob(v, *args, x, **kwargs)
    with pytest.raises(ValueError, match="same shape"):
        sde_step_with_logprob(v[:, :2], 0.5, 0.4, x)


# --------------------------------------------------------------------------------------------------------
# step selection
# --------------------------------------------------------------------------------------------------------


def test_select_steps_all_excludes_the_last_step():
    assert select_steps(25).tolist() == list(range(24))
    assert select_steps(2).tolist() == [0]
    assert select_steps(25).dtype == torch.long


def test_select_steps_random_is_sorted_distinct_and_seeded():
    draws = [select_steps(25, "random", k=14, generator=torch.Generator().manual_seed(i)) for i in range(20)]
    for d in draws:
        assert d.dtype == torch.long and len(d) == 14 and len(set(d.tolist())) == 14
        assert (d[1:] > d[:-1]).all() and d.min() >= 0 and d.max() <= 23
    assert len({tuple(d.tolist()) for d in draws}) > 1
    again = select_steps(25, "random", k=14, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, draws[0])
    # every trainable step shows up, never the last
    seen = set().union(*(set(d.tolist()) for d in draws))
    assert seen == set(range(24))
    with pytest.raises(ValueError, match="k must be"):
        select_steps(25, "random", k=25)
    with pytest.raises(ValueError, match="k must be"):
        select_steps(25, "random")


def test_select_steps_window():
    assert select_steps(10, "window", window_start=3, window_size=4).tolist() == [3, 4, 5, 6]
    with pytest.raises(ValueError, match="within the first"):
        select_steps(10, "window", window_start=6, window_size=4)
    with pytest.raises(ValueError, match="window_start"):
        select_steps(10, "window")
    with pytest.raises(ValueError, match="strategy"):
        select_steps(10, "every")
    with pytest.raises(ValueError, match="num_steps"):
        select_steps(1)


def test_sde_window_slides_and_wraps():
    # T = 10: 9 trainable steps, window of 4 -> starts 0..5
    starts = [sde_window(i, 10, 4)[0].item() for i in range(8)]
    assert starts == [0, 1, 2, 3, 4, 5, 0, 1]
    assert sde_window(7, 10, 4, wrap=False).tolist() == [5, 6, 7, 8]
    assert [sde_window(i, 10, 4, shift_every=2)[0].item() for i in range(5)] == [0, 0, 1, 1, 2]
    assert [sde_window(i, 10, 4, stride=2)[0].item() for i in range(5)] == [0, 2, 4, 0, 2]
    assert [sde_window(i, 10, 2, stride=3, start=1)[0].item() for i in range(4)] == [1, 4, 7, 1]
    for i in range(30):
        w = sde_window(i, 25, 5, stride=3)
        assert len(w) == 5 and w.max() <= 23 and (w[1:] - w[:-1] == 1).all()
    with pytest.raises(ValueError, match="does not fit"):
        sde_window(0, 10, 10)


def test_steps_to_mask():
    mask = steps_to_mask(torch.tensor([0, 3, 4]), 6)
    assert mask.dtype == torch.bool and mask.tolist() == [True, False, False, True, True, False]
    assert not steps_to_mask(torch.tensor([], dtype=torch.long), 4).any()
    with pytest.raises(ValueError):
        steps_to_mask(torch.tensor([6]), 6)
