"""The multi-subject results table re-scores every run's held-out images and pairs them with the base's."""

import json

import torch

from cgrpo.eval import multi_runs
from cgrpo.train import grpo, recipe


def _run(policy_dir, out, method_overrides):
    overrides = [
        f"output_dir={out}",
        f"policy.options={{path: {policy_dir}}}",
        "data.options={image_size: 16, num_train_subjects: 12, num_test_subjects: 6, subjects: 2, "
        "train: {prompts_per_subject: 2}, eval: {num_subjects: 6, prompts_per_kind: 1}}",
        "train.iterations=1",
        "train.prompts_per_iteration=2",
        "train.group_size=2",
        "train.train_steps=1",
        "sampling.num_steps=3",
        "eval.num_steps=2",
        "eval.every=0",
        "checkpoint.every=0",
        "log.tensorboard=false",
        *method_overrides,
    ]
    grpo.run(recipe.load_config("grpo", None, overrides))


def test_table_pairs_each_run_with_the_base_images(tiny_policy_dir, tmp_path):
    runs = tmp_path / "runs"
    _run(tiny_policy_dir, runs / "mean_s0", ["advantage.multi_subject=mean"])
    _run(tiny_policy_dir, runs / "weakest_s0", ["advantage.multi_subject=weakest"])
    multi_runs.main([str(runs), str(tmp_path / "out"), "--methods", "mean", "weakest"])

    results = json.loads((tmp_path / "out" / "multi_subject.json").read_text())
    assert set(results) == {"mean/0", "weakest/0"}
    summary = json.loads((runs / "mean_s0" / "summary.json").read_text())
    entry = results["mean/0"]
    # the re-scored means are the trainer's own held-out numbers
    for key in ("id", "id_0", "id_1", "id_min", "prompt"):
        assert abs(entry["base"][key] - summary["base"][key]) < 1e-5, key
        assert abs(entry["trained"][key] - summary["trained"][key]) < 1e-5, key
    change = entry["change"]["id"]["mean"]
    assert abs(change - (entry["trained"]["id"] - entry["base"]["id"])) < 1e-6
    # both runs of seed 0 share the base row
    assert results["weakest/0"]["base"] == entry["base"]
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.count("| base | all |") == 1 and "| weakest | 0 |" in table
    assert (tmp_path / "out" / "grid.png").stat().st_size > 0
    assert torch.load(sorted((runs / "mean_s0" / "samples").glob("eval-step-*.pt"))[-1]).ndim == 4
