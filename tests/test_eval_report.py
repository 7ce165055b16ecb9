"""``cgrpo report``: Markdown + HTML over training runs and evaluation folders, with the numbers in it."""

import json
from pathlib import Path

import numpy as np
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from cgrpo.eval.cli import report
from cgrpo.eval.runner import markdown_table, summarise
from cgrpo.train.advantage_log import log_advantages

app = typer.Typer()
app.command()(report)
app.command("noop")(lambda: None)  # two commands, so that `report` is addressed by name as in the real CLI


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size=(24, 48, 3), dtype=np.uint8)).save(path)


def _run(path: Path, method: str, base: dict, trained: dict, seed: int) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"method: {method}\nseed: {seed}\n")
    (path / "summary.json").write_text(json.dumps({"base": base, "trained": trained}))
    rng = np.random.default_rng(seed)
    records = []
    for step in range(1, 21):
        record = {"step": step, "loss": 0.01, "reward/id": 0.5 + 0.01 * step, "reward/prompt": 0.6}
        record["conflict_rate"] = float(rng.uniform(0.3, 0.6))
        if step % 10 == 0:
            fraction = step / 20
            record.update(
                {f"eval/{k}": base[k] + fraction * (trained[k] - base[k]) for k in ("id", "prompt")}
            )
        records.append(record)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _png(path / "samples" / "eval-step-000000.png", seed)
    _png(path / "samples" / "eval-step-000020.png", seed + 1)
    for step in (1, 2):
        log_advantages(path / "advantages.jsonl", step, torch.randn(16), torch.randn(16), group_size=8)
    return path


def _eval(path: Path, method: str, shift: float) -> Path:
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = [
        {"subject": f"s{i % 3}", "prompt": f"p{i}", "category": ["object", "live"][i % 2], "kind": "context",
         "dino": float(rng.uniform(0.6, 0.9) + shift), "hpsv3": float(rng.uniform(6, 9) - 10 * shift)}
        for i in range(24)
    ]  # fmt: skip
    summary = summarise(rows, ["dino", "hpsv3"], method, n_resamples=200)
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "table.md").write_text(markdown_table(summary, f"DreamBench: {method}"))
    _png(path / "samples.png", 7)
    return path


def test_report_of_two_runs_and_an_evaluation(tmp_path):
    base = {"id": 0.7012, "prompt": 0.8033, "context/id": 0.69, "context/prompt": 0.81}
    run_a = _run(
        tmp_path / "customized", "customized_grpo", base, {**base, "id": 0.7555, "prompt": 0.8244}, 1
    )
    run_b = _run(tmp_path / "naive", "naive_1to1", base, {**base, "id": 0.7811, "prompt": 0.6522}, 2)
    _eval(run_a / "eval_dreambench", "customized_grpo", 0.0)  # found inside the run
    evaluation = _eval(tmp_path / "uno_base", "UNO (Base)", -0.05)

    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(run_a), str(run_b), str(evaluation), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    html = (out / "report.html").read_text()

    # The comparison table: base and trained held-out numbers of each run, with the change.
    assert "| customized | customized_grpo | 0.7012 | 0.7555 | +0.0543 | 0.8033 | 0.8244 | +0.0211 |" in text
    assert "| naive | naive_1to1 | 0.7012 | 0.7811 | +0.0799 | 0.8033 | 0.6522 | -0.1511 |" in text
    # The evaluation numbers (means [CI]) and the trade-off plot with its front.
    summary = json.loads((evaluation / "summary.json").read_text())
    assert f"{summary['metrics']['dino']['mean']:.3f} [" in text
    assert "id vs prompt; Pareto front: `customized`, `naive`." in text
    assert (
        "context/id" in text and "Mean conflict rate" in text and "Quadrants over 32 logged samples" in text
    )

    for link in [part.split(")")[0] for part in text.split("](")[1:]]:
        assert (out / link).is_file(), link  # every figure is inside the report folder
    for name in ("tradeoff.png", "customized/reward_curves.png", "customized/conflict.png",
                 "customized/eval-step-000020.png", "customized/eval_dreambench/samples.png",
                 "uno_base/samples.png"):  # fmt: skip
        assert (out / name).is_file(), name
    assert "<table>" in html and "0.7555" in html and '<img alt="trade-off" src="tradeoff.png"' in html


def test_report_rejects_a_folder_that_is_neither(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "neither a training run" in result.output


def test_report_of_an_sft_run_shows_its_loss_and_samples(tmp_path):
    run = tmp_path / "sft"
    run.mkdir()
    records = [{"step": s, "train/loss": 1.0 / s} for s in (25, 50, 75)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _png(run / "samples" / "step_000050.png", 1)
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r" / "report.md").read_text()
    assert "Trained for 75 iterations." in text and "![loss](sft/loss.png)" in text
    assert (tmp_path / "r" / "sft" / "loss.png").is_file() and "(iteration 50)" in text
