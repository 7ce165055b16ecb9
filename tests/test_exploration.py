"""`cgrpo analyze exploration`: rollout statistics that say where GRPO's learning signal comes from."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from cgrpo.data import miniworld as mw
from cgrpo.data.miniworld import MiniWorld
from cgrpo.eval.exploration import asked_property_score, edit_advantages, explore, images_for_interval
from cgrpo.rewards.mini import MiniIdentityReward, MiniPromptReward, recolor_scores, reward_breakdown
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


def test_edit_advantages_compares_hits_and_misses_of_mixed_groups_only():
    hits = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    advantage = torch.tensor([[1.0, -0.2, -0.4], [9.0, 9.0, 9.0], [9.0, 9.0, 9.0]])
    r_id = torch.tensor([[0.6, 0.8, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    r_prompt = torch.tensor([[0.9, 0.3, 0.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = edit_advantages(hits, advantage, r_id, r_prompt)
    assert out["mixed_groups"] == 1  # groups of all misses or all hits compare nothing
    assert out["hit_advantage"] == pytest.approx(1.0) and out["miss_advantage"] == pytest.approx(-0.3)
    assert out["hit_id"] == pytest.approx(0.6) and out["miss_id"] == pytest.approx(0.9)
    assert out["hit_prompt"] == pytest.approx(0.9) and out["miss_prompt"] == pytest.approx(0.4)
    none = edit_advantages(hits[1:2], advantage[1:2], r_id[1:2], r_prompt[1:2])
    assert none["mixed_groups"] == 0 and math.isnan(none["hit_advantage"])
    # per step: an edit favoured on the first step and pushed away on the second, its mean in between
    by_step = torch.stack([advantage + 1.0, advantage - 1.0], dim=2)  # [groups, G, 2]
    stepped = edit_advantages(hits, advantage, r_id, r_prompt, by_step)
    assert stepped["hit_advantage_by_step"] == pytest.approx([2.0, 0.0])
    assert stepped["miss_advantage_by_step"] == pytest.approx([0.7, -1.3])
    assert "hit_advantage_by_step" not in edit_advantages(
        hits[1:2], advantage[1:2], r_id[1:2], r_prompt[1:2], by_step[1:2]
    )


@pytest.fixture
def rollout_setup(tiny_policy_dir):
    """A tiny mini policy, a small world, and a 4-step schedule whose first 2 steps are stochastic."""
    from cgrpo.policy.mini import mini

    policy = mini(tiny_policy_dir)
    world = MiniWorld(image_size=16, num_train_subjects=4, num_test_subjects=6)
    sigmas = flux_sigmas(4, image_seq_len=policy.latent_shape[0])
    return policy, world, sigmas, torch.tensor([True, True, False, False])


def test_explore_counts_hits_and_flat_groups_consistently(rollout_setup):
    policy, world, sigmas, sde = rollout_setup
    examples = list(world.eval_set(num_subjects=3))
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
        advantage=lambda r_id, r_prompt: torch.zeros(len(r_id), 2),
        recolors=recolor_scores,
    )
    assert result["all"]["groups"] == len(examples)
    assert set(result["kinds"]) == {e.kind for e in examples}
    prop = result["kinds"]["property"]
    assert prop["property_hit_rate"] == 1.0 and prop["property_groups_without_hit"] == 0.0
    assert prop["asked_hit_rate"] == 1.0 and result["kinds"]["context"]["asked_hit_rate"] == 1.0
    # no group holds both a drawn and a missed rollout: nothing to compare, and no NaN in the JSON
    assert prop["property_mixed_groups"] == 0 and "property_hit_advantage" not in prop
    assert "property_hit_rate" not in result["kinds"]["plain"]
    # the recolour rates cover exactly the rollouts of prompts that name a colour
    recolours = [e for e in examples if mw.parse_prompt(e.prompt).color]
    assert result["all"]["recolor_rollouts"] == 3 * len(recolours) > 0
    assert result["all"]["recolor_asked_rate"] == 1.0 == result["all"]["recolor_other_rate"]
    assert "recolor_rollouts" not in result["kinds"]["plain"]
    for block in result["kinds"].values():
        assert 0.0 <= block["flat_groups_id"] <= 1.0 and block["group_std_id"] >= 0.0
        assert 0.0 <= block["conflict_rate"] <= 1.0
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
    assert "property_hit_advantage" not in data["kinds"]["plain"]  # plain prompts ask for nothing
    assert "asked_hit_advantage" not in data["kinds"]["plain"]
    assert (
        "property_hit_rate" not in data["kinds"]["placement"]
        and "asked_hit_rate" in data["kinds"]["placement"]
    )


def test_explore_reports_the_advantage_of_rollouts_that_draw_the_asked_property(rollout_setup):
    policy, world, sigmas, sde = rollout_setup
    examples = [e for e in world.eval_set(num_subjects=4) if e.kind == "property"]
    seen = {}

    def two_steps(r_id, r_prompt):  # a stand-in advantage on 2 trainable steps whose mean is 2 * prompt
        seen["n"] = len(r_id)
        return torch.stack([r_prompt, 3 * r_prompt], dim=1)

    result = explore(
        policy,
        examples,
        MiniIdentityReward(),
        MiniPromptReward(),
        sigmas,
        sde,
        group_size=4,
        breakdown=reward_breakdown,
        hit_threshold=0.0,
        advantage=two_steps,
    )
    block = result["kinds"]["property"]
    assert seen["n"] == 4 * len(examples)
    for prefix in ("property", "asked"):  # property prompts ask for nothing but a property
        assert block[f"{prefix}_mixed_groups"] >= 1, "the tiny policy draws some asked properties, not all"
        # the step mean of each rollout's advantage, read on the same rollouts as its rewards
        assert block[f"{prefix}_hit_advantage"] == pytest.approx(2 * block[f"{prefix}_hit_prompt"])
        assert block[f"{prefix}_miss_advantage"] == pytest.approx(2 * block[f"{prefix}_miss_prompt"])
        # and step by step: the stand-in's two steps are 1x and 3x the prompt reward
        for side in ("hit", "miss"):
            prompt = block[f"{prefix}_{side}_prompt"]
            assert block[f"{prefix}_{side}_advantage_by_step"] == pytest.approx([prompt, 3 * prompt])


def test_explore_conflict_rate_is_the_share_of_opposite_advantages(rollout_setup):
    policy, world, sigmas, sde = rollout_setup
    examples = list(world.eval_set(num_subjects=2))
    prompt = MiniPromptReward()

    def against(*args):  # an "identity" reward that is the prompt reward reversed: every sample conflicts
        return -torch.as_tensor(prompt(*args))

    same = explore(policy, examples, prompt, prompt, sigmas, sde, group_size=3)
    opposite = explore(policy, examples, against, prompt, sigmas, sde, group_size=3)
    assert same["all"]["conflict_rate"] == 0.0
    flat = opposite["all"]["flat_groups_prompt"]
    assert opposite["all"]["conflict_rate"] >= 1.0 - flat - 1e-6 and opposite["all"]["conflict_rate"] > 0.5
