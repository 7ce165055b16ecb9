"""The one sampler (cgrpo.train.sampling): the ODE path is the plain Euler loop, and evaluation images are
seeded per item, so the trainer's held-out evaluation and `cgrpo eval` generate the same images."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cgrpo.data.miniworld import MiniWorld, vocabulary
from cgrpo.eval import runner
from cgrpo.eval.mini import mini_task
from cgrpo.sde import flux_sigmas
from cgrpo.testing.policies import tiny_policy_for_tests
from cgrpo.train.heldout import evaluate_heldout
from cgrpo.train.sampling import item_seed, ode_sample, rollout, schedule, seeded_noise

IMAGE_SIZE = 16  # the tiny policy's


@pytest.fixture(scope="module")
def policy():
    return tiny_policy_for_tests(seed=0, vocabulary=vocabulary()).eval()


@pytest.fixture(scope="module")
def examples():
    world = MiniWorld(image_size=IMAGE_SIZE)
    return list(world.eval_set(num_subjects=2, prompts_per_kind=1))


def _euler(policy, cond, sigmas, x):
    """The textbook loop: x <- x + (s_next - s) * v(x, s)."""
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        x = x + (s_next - s) * policy.velocity(x, torch.full((len(x),), s), cond)
    return x


@settings(max_examples=12, deadline=None)
@given(
    num_steps=st.integers(1, 5),
    shift=st.sampled_from([None, 1.0, 3.0]),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_ode_sampler_is_the_euler_loop(policy, num_steps, shift, batch, seed):
    sigmas = flux_sigmas(num_steps, image_seq_len=policy.latent_shape[0], shift=shift)
    g = torch.Generator().manual_seed(seed)
    cond = policy.condition(["a red star"] * batch, torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g))
    noise = policy.initial_noise(batch, g)
    with torch.no_grad():
        expected = _euler(policy, cond, sigmas, noise)
    assert torch.equal(ode_sample(policy, cond, sigmas, noise), expected)
    # A rollout with zero SDE steps is the same path, and records no log-probability.
    no_sde = torch.zeros(num_steps, dtype=torch.bool)
    trajectory = rollout(policy, cond, sigmas, no_sde, torch.Generator(), initial_noise=noise)
    assert torch.equal(trajectory.final, expected) and not trajectory.log_probs.any()
    # The step hook sees the states the rollout stores, before each step.
    seen = []
    ode_sample(policy, cond, sigmas, noise, on_step=lambda t, x, v: seen.append(x.clone()))
    assert torch.equal(torch.stack(seen, dim=1), trajectory.latents[:, :-1])


def test_seeded_noise_is_per_item(policy):
    both = seeded_noise(policy, [5, 9])
    assert torch.equal(both[1:], seeded_noise(policy, [9]))
    assert torch.equal(
        both, torch.cat([policy.initial_noise(1, torch.Generator().manual_seed(s)) for s in (5, 9)])
    )
    assert not torch.equal(both[0], both[1])


def _zeros(images, references, prompts, subjects):
    return torch.zeros(len(images))


def _heldout_images(policy, examples, sigmas, seed, images_per_prompt, micro_batch=0):
    result = evaluate_heldout(
        policy, examples, _zeros, _zeros, sigmas, seed, images_per_prompt, micro_batch=micro_batch
    )
    return result.images


def test_trainer_heldout_and_cgrpo_eval_generate_the_same_images(policy, examples, tmp_path):
    """The trainer's held-out images are `cgrpo eval mini`'s: same cases, same per-item seeds, same pixels."""
    seed, per_prompt = 3, 2
    sigmas = schedule(policy, 3)  # the trainer's eval schedule (FLUX's shift at the policy's token count)
    assert torch.equal(sigmas, flux_sigmas(3, image_seq_len=policy.latent_shape[0]))  # cgrpo eval's
    trainer = _heldout_images(policy, examples, sigmas, seed, per_prompt)

    task = mini_task(tmp_path, image_size=IMAGE_SIZE, num_subjects=2, prompts_per_kind=1)
    items = runner.build_items(task.cases, per_prompt, seed)
    assert [(i.case.subject, i.case.prompt) for i in items] == [
        (e.subject_id, e.prompt) for e in examples for _ in range(per_prompt)
    ]

    def generate(batch):
        references = torch.stack([task.reference(i.case.subject) for i in batch])
        return runner.generate_images(
            policy, [i.case.prompt for i in batch], references, [i.seed for i in batch], sigmas
        )

    assert torch.equal(generate(items), trainer)  # one batch each: bit for bit
    in_threes = torch.cat([generate(items[i : i + 3]) for i in range(0, len(items), 3)])
    torch.testing.assert_close(in_threes, trainer, atol=1e-5, rtol=1e-5)  # batching: float rounding only


def test_heldout_images_do_not_depend_on_batching_or_order(policy, examples):
    sigmas = schedule(policy, 3)
    whole = _heldout_images(policy, examples, sigmas, seed=0, images_per_prompt=2)
    micro = _heldout_images(policy, examples, sigmas, seed=0, images_per_prompt=2, micro_batch=3)
    torch.testing.assert_close(micro, whole, atol=1e-5, rtol=1e-5)
    reversed_order = _heldout_images(policy, examples[::-1], sigmas, seed=0, images_per_prompt=2)
    torch.testing.assert_close(
        reversed_order,
        whole.view(len(examples), 2, *whole.shape[1:]).flip(0).flatten(0, 1),
        atol=1e-5,
        rtol=1e-5,
    )
    # The first image of each example is the same whether one or two are drawn per prompt.
    single = _heldout_images(policy, examples, sigmas, seed=0, images_per_prompt=1)
    torch.testing.assert_close(single, whole[::2], atol=1e-5, rtol=1e-5)
    # Another seed, other images; image k of an example comes from item_seed(seed, subject, prompt, k).
    assert not torch.allclose(_heldout_images(policy, examples, sigmas, seed=1, images_per_prompt=1), single)
    e = examples[0]
    cond = policy.condition([e.prompt], e.reference[None])
    first = policy.decode(
        ode_sample(policy, cond, sigmas, seeded_noise(policy, [item_seed(0, e.subject_id, e.prompt, 1)]))
    )
    torch.testing.assert_close(first, whole[1:2], atol=1e-5, rtol=1e-5)


def test_schedule_is_the_policys_own_unless_a_shift_is_asked(policy):
    class WithOwnSchedule:
        latent_shape = (16, 48)

        def sigmas(self, num_steps=None):
            return torch.linspace(1, 0, (num_steps or 7) + 1)

    own = WithOwnSchedule()
    assert torch.equal(schedule(own, 4), torch.linspace(1, 0, 5))
    assert torch.equal(schedule(own, 4, shift=3.0), flux_sigmas(4, image_seq_len=16, shift=3.0))
    assert torch.equal(schedule(policy, 4), flux_sigmas(4, image_seq_len=policy.latent_shape[0]))
