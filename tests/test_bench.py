"""``cgrpo bench`` on a tiny setting: every benchmark runs, the JSON has the figures, the plot exists.
(The real numbers come from ``cgrpo bench [--quick]`` and are committed in benchmarks/results/.)"""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from cgrpo import bench

TINY = {
    "prompts": 1,
    "group_size": 2,
    "num_steps": 3,
    "train_steps": 1,
    "reps": 1,
    "scaling_group_sizes": [2, 4],
    "scaling_train_steps": [1, 2],
    "scaling_reps": 1,
    "micro_number": 10,
}


def test_run_benchmarks_writes_every_result(tmp_path):
    threads = torch.get_num_threads()
    results = bench.run_benchmarks(out_dir=tmp_path, setting=TINY)
    assert torch.get_num_threads() == threads  # restored
    for key in ("trainer_overhead_ratio", "sars_tdw_overhead", "rollout_throughput_ratio"):
        assert isinstance(results[key], float) and results[key] == results[key], key
    assert results["trainer_overhead_ratio"] > 0.5 and results["rollout_throughput_ratio"] > 0.2
    overhead = results["trainer_overhead"]
    assert {"rollout", "reward", "train"} <= set(overhead["iteration_breakdown_wall_s"])
    assert results["sars_tdw"]["paper_table8"]["overhead"] == pytest.approx(0.0705, abs=1e-4)
    micro = results["sars_tdw"]["advantage_compute_us"]
    assert micro["sars_tdw"] > 0 and micro["naive"] > 0
    scaling = results["scaling"]
    assert scaling["group_size"]["values"] == [2, 4] and len(scaling["group_size"]["cpu_s"]) == 2
    assert scaling["train_steps"]["values"] == [1, 2] and len(scaling["train_steps"]["wall_s"]) == 2
    assert all(s > 0 for s in scaling["group_size"]["cpu_s"] + scaling["train_steps"]["cpu_s"])
    for name in ("bench", "trainer_overhead", "sars_tdw_overhead", "rollout_throughput", "scaling"):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data, name
    assert json.loads((tmp_path / "scaling.json").read_text())["environment"]["setting"]["group_size"] == 2
    assert (tmp_path / "scaling.png").stat().st_size > 1000


def test_interleaving_alternates_the_order():
    calls = []
    bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]


def test_bench_command_is_a_typer_command():
    app = typer.Typer()
    app.command("bench")(bench.bench_command)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["bench", "--help"])
    assert result.exit_code == 0 and "--quick" in result.output and "--out-dir" in result.output
