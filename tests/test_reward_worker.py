"""AsyncReward / RewardWorker: scoring overlaps the caller, results keep their order, errors propagate."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cgrpo.rewards.base import Reward
from cgrpo.rewards.worker import AsyncReward, RewardWorker


class SlowReward:
    """Sleeps ``delay`` seconds, then scores each image by its mean pixel value; records the calls."""

    name = "slow"

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.threads: list[str] = []
        self.stats = {"calls": 0}

    def __call__(self, images, references, prompts, subjects=None) -> torch.Tensor:
        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)
        self.stats["calls"] += 1
        return images.mean(dim=(1, 2, 3))


class FailingReward:
    name = "failing"

    def __call__(self, images, references, prompts, subjects=None) -> torch.Tensor:
        if prompts[0] == "bad":
            raise ValueError("reward exploded on purpose")
        return torch.zeros(len(prompts))


def batch(value: float, n: int = 2):
    images = torch.full((n, 3, 4, 4), value)
    return images, images.clone(), ["a prompt"] * n


def test_submit_overlaps_the_caller_and_keeps_order():
    delay = 0.3
    reward = SlowReward(delay)
    with AsyncReward(reward) as scorer:
        assert isinstance(scorer, Reward) and scorer.name == "slow"
        start = time.perf_counter()
        first = scorer.submit(*batch(0.25))
        second = scorer.submit(*batch(0.75))
        submitted = time.perf_counter() - start
        time.sleep(delay)  # the "next rollout", running while the worker scores
        results = [first.result(timeout=10), second.result(timeout=10)]
        total = time.perf_counter() - start
    assert submitted < delay / 3, "submit must not wait for the reward"
    # Serial would be 3 * delay (two scorings + the rollout); overlapped is about 2 * delay.
    assert total < 2.7 * delay
    torch.testing.assert_close(results[0], torch.full((2,), 0.25))
    torch.testing.assert_close(results[1], torch.full((2,), 0.75))
    assert reward.threads == ["reward-slow", "reward-slow"]
    assert scorer.stats == {"calls": 2}


def test_the_reward_exception_is_raised_by_result_and_the_worker_survives():
    with AsyncReward(FailingReward()) as scorer:
        images, references, _ = batch(0.5)
        failed = scorer.submit(images, references, ["bad", "bad"])
        fine = scorer.submit(images, references, ["good", "good"])
        with pytest.raises(ValueError, match="exploded on purpose"):
            failed.result(timeout=10)
        assert fine.result(timeout=10).shape == (2,)
        with pytest.raises(ValueError, match="exploded"):
            scorer(images, references, ["bad", "bad"])  # the blocking form raises too


def test_inputs_are_snapshotted_at_submission():
    reward = SlowReward(0.1)
    with AsyncReward(reward) as scorer:
        images, references, prompts = batch(0.5)
        future = scorer.submit(images, references, prompts)
        images.fill_(1.0)  # the caller reuses its buffer right away
        torch.testing.assert_close(future.result(timeout=10), torch.full((2,), 0.5))


def test_shared_worker_runs_calls_in_order_and_close_rejects_new_work():
    order: list[int] = []
    worker = RewardWorker(name="shared")
    futures = [worker.submit_call(lambda i=i: (time.sleep(0.01), order.append(i), i)[-1]) for i in range(5)]
    a = AsyncReward(SlowReward(0.0), worker=worker)
    b = AsyncReward(FailingReward(), worker=worker)
    fa, fb = a.submit(*batch(0.1)), b.submit(*batch(0.2))
    assert [f.result(timeout=10) for f in futures] == [0, 1, 2, 3, 4] and order == [0, 1, 2, 3, 4]
    assert fa.result(timeout=10).shape == fb.result(timeout=10).shape == (2,)
    a.close()  # does not own the shared worker
    assert worker.alive
    worker.close()
    assert not worker.alive
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit_call(lambda: None)
