"""`cgrpo analyze exploration`: rollout statistics that say where GRPO's learning signal comes from."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from cgrpo.data.miniworld import MiniWorld
from cgrpo.eval.exploration import asked_property_score, explore, images_for_interval
from cgrpo.rewards.mini import MiniIdentityReward, MiniPromptReward, reward_breakdown
from cgrpo.sde import flux_sigmas


def test_asked_property_score_takes_the_weakest_asked_attribute():
    nan = float("nan")
    breakdown = {
        "color": torch.tensor([0.9, nan, nan, 0.2]),
        "pattern": torch.tensor([0.3, 0.8, nan, nan]),
        "upside_down": torch.tensor([nan, nan, nan, nan]),
    }
    score = asked_property_score(breakdown)
    assert (
        score[0] == pytest.approx(0.3) and score[1] == pytest.approx(0.8) and score[3] == pytest.approx(0.2)
    )
    assert math.isnan(score[2])


def test_images_for_interval_is_the_normal_sample_size():
    # n = (1.96 * 0.2 / 0.01)^2 = 1536.64 -> 1537
    assert images_for_interval(0.2) == 1537
    assert images_for_interval(0.05, half_width=0.05) == 4


def test_explore_counts_hits_and_flat_groups_consistently(tiny_policy_dir):
    from cgrpo.policy.mini import mini

    policy = mini(tiny_policy_dir)
    world = MiniWorld(image_size=16, num_train_subjects=4, num_test_subjects=6)
    examples = list(world.eval_set(num_subjects=3))
    sigmas = flux_sigmas(4, image_seq_len=policy.latent_shape[0])
    sde = torch.tensor([True, True, False, False])
    result = explore(
        policy,
        examples,
        MiniIdentityReward(),
        MiniPromptReward(),
        sigmas,
        sde,
        group_size=3,
        breakdown=reward_breakdown,
        hit_threshold=-1.0,  # every asked property counts as drawn
    )
    assert result["all"]["groups"] == len(examples)
    assert set(result["kinds"]) == {e.kind for e in examples}
    prop = result["kinds"]["property"]
    assert prop["property_hit_rate"] == 1.0 and prop["property_groups_without_hit"] == 0.0
    assert "property_hit_rate" not in result["kinds"]["plain"]
    for block in result["kinds"].values():
        assert 0.0 <= block["flat_groups_id"] <= 1.0 and block["group_std_id"] >= 0.0
    again = explore(
        policy, examples, MiniIdentityReward(), MiniPromptReward(), sigmas, sde, group_size=3, seed=0
    )
    assert again["all"]["rollout_id"] == pytest.approx(result["all"]["rollout_id"])  # seeded rollouts


def test_analyze_exploration_command_writes_json(tmp_path, tiny_policy_dir):
    from cgrpo.cli import app

    out = tmp_path / "explore.json"
    result = CliRunner().invoke(
        app,
        [
            "analyze",
            "exploration",
            "configs/mini/customized_grpo.yaml",
            f"policy.options.path={tiny_policy_dir}",
            "data.options.image_size=16",
            "train.group_size=2",
            "sampling.num_steps=3",
            "sampling.sde_steps=2",
            "train.train_steps=2",
            "--num-subjects",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["all"]["groups"] == 10 and data["settings"]["group_size"] == 2
    assert "property_hit_rate" in data["kinds"]["property"]
