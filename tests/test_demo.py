"""`cgrpo demo` writes the report, plots and metrics.json (tiny random policy, two iterations)."""

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from cgrpo.cli import app
from cgrpo.config import save_config
from cgrpo.data import miniworld as mw
from cgrpo.eval.mini import HeldoutSet
from tests.test_grpo import tiny_config

# A small final evaluation for the tiny world (4 held-out subjects): 2 subjects x 5 kinds x 1 x 2 images.
SMALL = ["--eval-subjects", "2", "--eval-prompts-per-kind", "1", "--eval-images-per-prompt", "2"]


def _fresh_policy_rewards(config, heldout, lora=None):
    """Mean rewards of a freshly loaded policy (plus ``lora``) on the demo's final set, computed here
    without the demo's code path: the base must be the LoRA switched off, the trained one the saved LoRA."""
    from cgrpo.demo import heldout_examples
    from cgrpo.train.components import build_policy, build_rewards
    from cgrpo.train.heldout import evaluate_heldout
    from cgrpo.train.sampling import schedule

    with_lora = dataclasses.replace(config.policy.lora, enabled=lora is not None)
    policy = build_policy(dataclasses.replace(config.policy, lora=with_lora))
    if lora is not None:
        policy.load_lora(lora)
    identity, prompt = build_rewards(config)
    examples = heldout_examples(config, heldout)
    sigmas = schedule(policy, heldout.steps, config.sampling.shift)
    result = evaluate_heldout(
        policy,
        examples,
        identity,
        prompt,
        sigmas,
        seed=heldout.seed,
        images_per_prompt=heldout.images_per_prompt,
    )
    return result.summary()


def test_demo_measures_base_and_trained_on_the_final_heldout_set(tiny_policy_dir, tmp_path):
    config = tiny_config(tiny_policy_dir, tmp_path / "unused", "train.lr=5e-2", "train.clip_range=0.2")
    save_config(config, tmp_path / "demo.yaml")
    out = tmp_path / "demo"
    args = ["demo", "--config", str(tmp_path / "demo.yaml"), "--output-dir", str(out), "--steps", "2", *SMALL]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    heldout = HeldoutSet(2, 1, 2)
    assert metrics["changes"]["all/id"]["n"] == heldout.images == 20
    assert "20 held-out images (2 subjects" in metrics["measured_on"]
    base = _fresh_policy_rewards(config, heldout)
    trained = _fresh_policy_rewards(config, heldout, lora=out / "final")
    # The two LoRA steps move the tiny policy's rewards by ~1e-4, far above the 1e-7 the checks allow.
    assert max(abs(trained[r] - base[r]) for r in ("id", "prompt")) > 1e-4
    for reward in ("id", "prompt"):
        assert metrics["base"][reward] == pytest.approx(base[reward], abs=1e-7)
        assert metrics["trained"][reward] == pytest.approx(trained[reward], abs=1e-7)
        assert metrics["changes"][f"all/{reward}"]["base"] == pytest.approx(base[reward], abs=1e-7)
    # The run's own (smaller) held-out evaluation is kept beside it.
    assert metrics["run_heldout"]["base"]["id"] != metrics["base"]["id"]
    assert f"{metrics['base']['id']:.4f}" in (out / "report.md").read_text()
    for option, value in (("--eval-images-per-prompt", "0"), ("--eval-subjects", "-1")):
        bad = CliRunner().invoke(app, [*args, option, value])
        assert bad.exit_code == 2 and option in bad.output


def test_demo_report(tiny_policy_dir, tmp_path):
    config = tiny_config(tiny_policy_dir, tmp_path / "unused")
    save_config(config, tmp_path / "demo.yaml")
    out = tmp_path / "demo"
    args = ["demo", "--config", str(tmp_path / "demo.yaml"), "--output-dir", str(out)]
    args += ["--steps", "2", "--seed", "3", "--eval-subjects", "0"]  # the run's own held-out images
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["base"]) >= {"id", "prompt"} and set(metrics["trained"]) >= {"id", "prompt"}
    assert metrics["iterations"] == 2 and metrics["seed"] == 3
    report = (out / "report.md").read_text()
    for png in ("reward_curves.png", "conflict_rate.png", "grid_reference_base_trained.png"):
        assert (out / png).stat().st_size > 1000
        assert png in report
    assert f"{metrics['base']['id']:.4f}" in report
    # The paired changes re-score the saved evaluation images: they agree with the trainer's evaluation.
    changes = metrics["changes"]
    assert abs(changes["all/id"]["base"] - metrics["base"]["id"]) < 1e-5
    assert abs(changes["all/prompt"]["trained"] - metrics["trained"]["prompt"]) < 1e-5
    delta = changes["all/prompt"]["trained"] - changes["all/prompt"]["base"]
    assert abs(changes["all/prompt"]["change"] - delta) < 1e-6 and changes["all/prompt"]["ci95"] >= 0
    assert changes["property-change/id"]["n"] >= 2 and "grid_property_edits.png" in report
    assert (out / "grid_property_edits.png").stat().st_size > 1000
    assert metrics["world_version"] == mw.WORLD_VERSION == 3 and metrics["base"]["id_ci95"] > 0


def test_demo_compare_trains_a_second_config_beside_it(tiny_policy_dir, tmp_path):
    config = tiny_config(tiny_policy_dir, tmp_path / "unused")
    save_config(config, tmp_path / "demo.yaml")
    naive = tiny_config(
        tiny_policy_dir,
        tmp_path / "unused",
        "advantage.synergy=none",
        "advantage.schedule=static",
        "method=naive_1to1",
    )
    save_config(naive, tmp_path / "naive.yaml")
    out = tmp_path / "demo"
    args = ["demo", "--config", str(tmp_path / "demo.yaml"), "--output-dir", str(out), "--steps", "2", *SMALL]
    result = CliRunner().invoke(app, [*args, "--compare", str(tmp_path / "naive.yaml")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    compare = metrics["compare"]
    assert compare["method"] == "naive"
    naive_summary = json.loads((out / "naive" / "summary.json").read_text())
    assert (out / "naive" / "config.yaml").exists() and naive_summary["base"] == metrics["run_heldout"][
        "base"
    ]
    # The comparison run's final images were drawn in its own process; they are its saved LoRA's.
    trained = _fresh_policy_rewards(naive, HeldoutSet(2, 1, 2), lora=out / "naive" / "final")
    assert compare["changes"]["all/id"]["trained"] == pytest.approx(trained["id"], abs=1e-7)
    assert compare["changes"]["all/id"]["base"] == metrics["changes"]["all/id"]["base"]
    assert "naive" in (out / "report.md").read_text()
    missing = CliRunner().invoke(app, [*args, "--compare", "no_such_config"])
    assert missing.exit_code == 2 and "no_such_config" in missing.output
