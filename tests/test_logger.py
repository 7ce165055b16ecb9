"""The metrics logger keeps every value as computed: metrics.jsonl and TensorBoard."""

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cgrpo.train.logger import MetricsLogger, read_metrics


def test_small_values_survive_in_jsonl_and_tensorboard(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=True)
    metrics = {"approx_kl": 1e-9, "clip_fraction": 0.031, "loss": torch.tensor(-2.5e-8), "bad": math.nan}
    logger.log(1, metrics, echo=False)
    logger.close()

    [record] = read_metrics(tmp_path / "metrics.jsonl")
    assert record["approx_kl"] == 1e-9
    assert record["clip_fraction"] == 0.031
    assert record["loss"] == pytest.approx(-2.5e-8, rel=1e-6)  # a float32 tensor's value
    assert record["bad"] is None  # JSON has no NaN

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    [scalar] = events.Scalars("approx_kl")
    assert scalar.step == 1
    assert scalar.value == pytest.approx(1e-9, rel=1e-6)  # TensorBoard stores float32
    assert "bad" not in events.Tags()["scalars"]
