"""Shared test setup: one torch thread per pytest-xdist worker (2 workers on a 2-core machine)."""

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub from a test
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
