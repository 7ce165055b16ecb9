"""`cgrpo demo` writes the report, plots and metrics.json (tiny random policy, two iterations)."""

import json

from typer.testing import CliRunner

from cgrpo.cli import app
from cgrpo.config import save_config
from cgrpo.data import miniworld as mw
from tests.test_grpo import tiny_config


def test_demo_report(tiny_policy_dir, tmp_path):
    config = tiny_config(tiny_policy_dir, tmp_path / "unused")
    save_config(config, tmp_path / "demo.yaml")
    out = tmp_path / "demo"
    args = ["demo", "--config", str(tmp_path / "demo.yaml"), "--output-dir", str(out)]
    args += ["--steps", "2", "--seed", "3"]
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
    assert metrics["world_version"] == mw.WORLD_VERSION == 2 and metrics["base"]["id_ci95"] > 0


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
    args = ["demo", "--config", str(tmp_path / "demo.yaml"), "--output-dir", str(out), "--steps", "2"]
    result = CliRunner().invoke(app, [*args, "--compare", str(tmp_path / "naive.yaml")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    compare = metrics["compare"]
    assert compare["method"] == "naive"
    naive_summary = json.loads((out / "naive" / "summary.json").read_text())
    assert (out / "naive" / "config.yaml").exists() and naive_summary["base"] == metrics["base"]
    assert abs(compare["changes"]["all/id"]["trained"] - naive_summary["trained"]["id"]) < 1e-5
    assert "naive" in (out / "report.md").read_text()
    missing = CliRunner().invoke(app, [*args, "--compare", "no_such_config"])
    assert missing.exit_code == 2 and "no_such_config" in missing.output
