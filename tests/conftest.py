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


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    """A tiny random mini-world policy saved with ``save_pretrained`` (loaded back through ``mini(path)``)."""
    from cgrpo.data.miniworld import vocabulary
    from cgrpo.testing.policies import tiny_policy_for_tests

    path = tmp_path_factory.mktemp("policy")
    tiny_policy_for_tests(seed=0, vocabulary=vocabulary()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory):
    """Saved once: a tiny random mini policy (its folder) and tiny CLIP and DINO models (their options)."""
    from cgrpo.testing.policies import tiny_policy_for_tests
    from cgrpo.testing.rewards import save_tiny_clip, save_tiny_dino

    root = tmp_path_factory.mktemp("models")
    tiny_policy_for_tests().save_pretrained(root / "policy")
    return {
        "policy": root / "policy",
        "clip": save_tiny_clip(root / "clip"),
        "dino": save_tiny_dino(root / "dino"),
    }


@pytest.fixture(scope="session")
def seg_models(tmp_path_factory):
    """Options of a tiny random ``dino_seg`` reward (GroundingDINO + SAM + DINOv2), saved once."""
    from cgrpo.testing.rewards import save_tiny_dino_seg

    return save_tiny_dino_seg(tmp_path_factory.mktemp("tiny-dino-seg"))
