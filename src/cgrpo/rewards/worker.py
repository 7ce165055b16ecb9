"""Score rewards in a background thread so that scoring overlaps the next rollout.

``RewardWorker`` is one thread with a FIFO queue: calls submitted to it run one at a time, in submission
order, and each returns a :class:`concurrent.futures.Future`. ``AsyncReward(reward)`` wraps a reward around a
worker: ``submit(images, references, prompts, subjects)`` returns a ``Future[Tensor[N]]`` at once, and
``.result()`` gives the scores or re-raises the reward's own exception. An ``AsyncReward`` is still a Reward
(calling it blocks until its scores are ready).

Typical use in a trainer::

    id_reward = AsyncReward(build("dino_seg", ...))
    pending = id_reward.submit(images, references, prompts, subjects)   # returns immediately
    next_batch = rollout(...)                                           # runs while the GPU scores
    scores = pending.result()

Several ``AsyncReward`` objects may share one ``RewardWorker`` (``AsyncReward(r, worker=w)``) to score on
one thread -- e.g. two rewards on one GPU, in order -- or each own a worker to score in parallel. torch
releases the GIL inside its kernels, so a reward's forward passes really overlap Python work on the main
thread.

Submitted tensors are detached and cloned (lists are copied) at submission, so the caller may reuse or
modify its buffers right away.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch

from cgrpo.rewards.base import ImageBatch, Reward

_STOP = object()


class RewardWorker:
    """One daemon thread running submitted calls in FIFO order; ``submit_call(fn, *args) -> Future``."""

    def __init__(self, name: str = "reward-worker", max_pending: int = 0) -> None:
        """``max_pending`` > 0 bounds the queue: ``submit_call`` then blocks while that many calls wait."""
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit_call(self, fn: Callable, /, *args, **kwargs) -> Future:
        """Queue ``fn(*args, **kwargs)``; its Future holds the return value or the exception it raised."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardWorker is closed; create a new one to submit more work")
            self._queue.put((future, fn, args, kwargs))
        return future

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():  # cancelled while waiting
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as error:  # handed to the caller, never lost in the thread
                future.set_exception(error)
            else:
                future.set_result(result)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, wait: bool = True) -> None:
        """Stop accepting work; queued calls still run. ``wait`` blocks until they have finished."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        if wait:
            self._thread.join()

    def __enter__(self) -> RewardWorker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _snapshot(images: ImageBatch) -> ImageBatch:
    if isinstance(images, torch.Tensor):
        return images.detach().clone()
    return list(images)


class AsyncReward:
    """A reward that scores on a background :class:`RewardWorker`; ``submit(...) -> Future[Tensor[N]]``."""

    def __init__(self, reward: Reward, worker: RewardWorker | None = None) -> None:
        self.reward = reward
        self.name = getattr(reward, "name", type(reward).__name__)
        self._owns_worker = worker is None
        self.worker = worker if worker is not None else RewardWorker(name=f"reward-{self.name}")

    @property
    def stats(self) -> dict:
        """The wrapped reward's counters (e.g. DINO-Seg fallbacks), if it keeps any."""
        return getattr(self.reward, "stats", {})

    def submit(
        self,
        images: ImageBatch,
        references: ImageBatch,
        prompts: Sequence[str],
        subjects: Sequence[str] | None = None,
    ) -> Future:
        """Queue one scoring call; returns at once. ``.result()`` gives ``Tensor[N]`` or raises its error."""
        return self.worker.submit_call(
            self.reward,
            _snapshot(images),
            _snapshot(references),
            list(prompts),
            list(subjects) if subjects is not None else None,
        )

    def __call__(
        self,
        images: ImageBatch,
        references: ImageBatch,
        prompts: Sequence[str],
        subjects: Sequence[str] | None = None,
    ) -> torch.Tensor:
        return self.submit(images, references, prompts, subjects).result()

    def close(self, wait: bool = True) -> None:
        """Close the worker if this object created it (a shared worker is closed by its owner)."""
        if self._owns_worker:
            self.worker.close(wait)

    def __enter__(self) -> AsyncReward:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
