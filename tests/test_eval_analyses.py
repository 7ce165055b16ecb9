"""The analyses: reward conflict, frequency of denoising, trade-off with its Pareto front, reward-human
correlation. Each writes a PNG and a JSON whose numbers are checked against direct computations."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

from cgrpo.eval.analyses import band_energies, quadrants
from cgrpo.eval.cli import analyze_app
from cgrpo.eval.runner import write_scores
from cgrpo.train.advantage_log import log_advantages

cli = CliRunner()


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# --- conflict -------------------------------------------------------------------------------------------


def test_conflict_over_training_quadrants_and_per_step(tmp_path):
    run = tmp_path / "run"
    rates = [0.6, 0.55, 0.5, 0.45, 0.5, 0.4, 0.35, 0.4, 0.3, 0.25]
    _write_jsonl(
        run / "metrics.jsonl", [{"step": i + 1, "loss": 0.1, "conflict_rate": r} for i, r in enumerate(rates)]
    )
    a_id = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -1.0, 1.0])
    a_prompt = torch.tensor([1.0, 1.0, -0.5, -0.5, 0.3, 1.0, 2.0, float("nan")])
    log_advantages(run / "advantages.jsonl", 1, a_id, a_prompt, group_size=4)
    log_advantages(run / "advantages.jsonl", 2, -a_id, a_prompt, group_size=4)
    for t, sign in ((0, 1.0), (5, -1.0)):
        log_advantages(run / "advantages.jsonl", 2, a_id, sign * a_prompt, denoising_step=t)

    out = tmp_path / "out"
    result = cli.invoke(analyze_app, ["conflict", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "conflict.json").read_text())
    assert (out / "conflict.png").stat().st_size > 0
    assert data["training"]["mean"] == pytest.approx(np.mean(rates))
    assert data["training"]["conflict_rate"] == rates

    # By hand: iteration 1 has synergy {0, 4}, prompt failure {2}, ID failure {1, 6}, both poor {3}, a zero
    # {5} and a NaN (dropped); iteration 2 flips A_id: synergy {1, 6}, ID failure {0, 4}, ...
    first = quadrants(a_id.numpy(), a_prompt.numpy())
    assert first == {"synergy": 2, "prompt_failure": 1, "id_failure": 2, "both_poor": 1, "neutral": 1}
    q = data["quadrants"]
    assert q["n_samples"] == 14 and q["n_iterations"] == 2
    assert q["counts"] == {"synergy": 4, "prompt_failure": 2, "id_failure": 4, "both_poor": 2, "neutral": 2}
    assert q["conflict_rate"] == pytest.approx(6 / 14)
    steps = data["per_denoising_step"]
    assert steps["t"] == [0, 5]
    assert steps["conflict_rate"] == pytest.approx([3 / 7, 3 / 7])  # (-1)*: failures swap, the share stays

    missing = cli.invoke(analyze_app, ["conflict", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "metrics.jsonl" in missing.output


# --- frequency ------------------------------------------------------------------------------------------


def test_band_energies_split_the_variance_and_separate_structure_from_detail():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    smooth = (0.5 + 0.4 * torch.sin(2 * torch.pi * x / 16)).expand(3, 32, 32)  # 1/16 cycles per pixel
    checker = ((x + y) % 2).expand(3, 32, 32)  # Nyquist
    images = torch.stack([smooth, checker, torch.rand(3, 32, 32)])
    low, high = band_energies(images, cutoff=0.125)
    luma = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    variance = ((luma - luma.mean(dim=(1, 2), keepdim=True)) ** 2).sum(dim=(1, 2))
    torch.testing.assert_close(low + high, variance, rtol=1e-4, atol=1e-4)  # Parseval
    assert high[0] < 1e-6 * low[0]
    assert low[1] < 1e-6 * high[1]


def test_frequency_analysis_of_a_tiny_policy(tmp_path):
    from cgrpo.testing.policies import tiny_policy_for_tests

    policy_dir = tmp_path / "policy"
    tiny_policy_for_tests().save_pretrained(policy_dir)
    out = tmp_path / "freq"
    args = ["frequency", "--out", str(out), "-P", f"path={policy_dir}", "--source", "mini"]
    result = cli.invoke(analyze_app, [*args, "--num-pairs", "3", "--steps", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "frequency.json").read_text())
    assert data["num_pairs"] == 3 and data["num_steps"] == 3 and len(data["sigmas"]) == 3
    for band in ("low", "high"):
        assert len(data[f"{band}_energy"]) == 3
        # The last prediction is the final image.
        assert data[f"{band}_normalised"][-1] == pytest.approx(1.0)
        assert data[f"{band}_converged"][-1] == pytest.approx(1.0)
    assert (out / "frequency.png").is_file() and (out / "frequency_progression.png").is_file()


# --- trade-off ------------------------------------------------------------------------------------------


def _eval_dir(path: Path, method: str, values: dict[str, float]) -> Path:
    path.mkdir(parents=True)
    metrics = {m: {"mean": v, "ci_low": v - 0.01, "ci_high": v + 0.01, "n": 100} for m, v in values.items()}
    summary = {"method": method, "n_images": 100, "metrics": metrics, "per_category": {}, "labels": {}}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def _run_dir(path: Path, base: tuple[float, float], trained: tuple[float, float]) -> Path:
    path.mkdir(parents=True)
    summary = {
        "base": {"id": base[0], "prompt": base[1]},
        "trained": {"id": trained[0], "prompt": trained[1]},
    }
    (path / "summary.json").write_text(json.dumps(summary))
    middle = [(base[0] + trained[0]) / 2, (base[1] + trained[1]) / 2]
    records = [
        {"step": 5, "loss": 0.0, "conflict_rate": 0.5, "eval/id": middle[0], "eval/prompt": middle[1]},
        {"step": 10, "loss": 0.0, "conflict_rate": 0.4, "eval/id": trained[0], "eval/prompt": trained[1]},
    ]
    _write_jsonl(path / "metrics.jsonl", records)
    return path


def test_tradeoff_front_of_runs_and_of_evaluations(tmp_path):
    runs = [
        _run_dir(tmp_path / "naive_1to1", (0.76, 0.79), (0.86, 0.41)),
        _run_dir(tmp_path / "naive_1to1.5", (0.76, 0.79), (0.80, 0.76)),
        _run_dir(tmp_path / "customized_grpo", (0.76, 0.79), (0.81, 0.83)),
    ]
    out = tmp_path / "tradeoff"
    result = cli.invoke(analyze_app, ["tradeoff", *map(str, runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "tradeoff.json").read_text())
    assert data["front"] == ["customized_grpo", "naive_1to1"]
    labels = [p["label"] for p in data["points"] if p["final"]]
    assert labels == ["naive_1to1 (base)", "naive_1to1", "naive_1to1.5", "customized_grpo"]  # one shared base
    assert "customized_grpo @ 5" in [p["label"] for p in data["points"]]  # the run's path, not on the front
    assert (out / "tradeoff.png").stat().st_size > 0

    evals = [
        _eval_dir(tmp_path / "e_base", "UNO (Base)", {"dino": 0.760, "clip_t": 0.304, "hpsv3": 7.87}),
        _eval_dir(tmp_path / "e_rpo", "RPO", {"dino": 0.852, "clip_t": 0.237, "hpsv3": 4.47}),
        _eval_dir(tmp_path / "e_ours", "Customized-GRPO", {"dino": 0.812, "clip_t": 0.301, "hpsv3": 8.32}),
    ]
    result = cli.invoke(analyze_app, ["tradeoff", *map(str, evals), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "tradeoff.json").read_text())["front"] == ["Customized-GRPO", "RPO"]
    result = cli.invoke(analyze_app, ["tradeoff", *map(str, evals), "--out", str(out), "--y", "clip_t"])
    assert json.loads((out / "tradeoff.json").read_text())["front"] == [
        "UNO (Base)",
        "Customized-GRPO",
        "RPO",
    ]
    result = cli.invoke(analyze_app, ["tradeoff", str(evals[0]), "--out", str(out), "--x", "nope"])
    assert result.exit_code == 2 and "nope" in result.output


# --- correlation ----------------------------------------------------------------------------------------


def _scores_file(folder: Path, method: str, n: int, rng: np.random.Generator) -> tuple[Path, list[dict]]:
    rows = []
    for i in range(n):
        rows.append(
            {
                "method": method,
                "subject": f"s{i % 5}",
                "class": "toy",
                "category": "object",
                "kind": "context",
                "prompt": f"prompt {i}",
                "seed": 1000 + i,
                "image": f"images/s{i % 5}/prompt-{i}/0.png",
                "reference": "/refs/x.png",
                "dino": float(rng.uniform(0.4, 0.9)),
                "hpsv3": float(rng.uniform(2, 10)),
            }
        )
    write_scores(folder / "scores.csv", rows, ["dino", "hpsv3"])
    return folder / "scores.csv", rows


def test_correlation_with_ratings_equals_scipy(tmp_path):
    rng = np.random.default_rng(0)
    scores, rows = _scores_file(tmp_path / "eval", "ours", 40, rng)
    human = tmp_path / "human" / "ratings.csv"
    human.parent.mkdir()
    truth = {"identity": [], "prompt": []}
    with human.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "reference", "prompt", "criterion", "human_score"])
        for i, row in enumerate(rows):
            # Paths as the app may write them: relative to the eval folder, or absolute.
            image = row["image"] if i % 2 else str((tmp_path / "eval" / row["image"]).resolve())
            ratings_id = [5 * row["dino"] + rng.normal(0, 0.5) for _ in range(3)]
            ratings_prompt = [row["hpsv3"] / 2 + rng.normal(0, 1.0) for _ in range(3)]
            for r_id, r_prompt in zip(ratings_id, ratings_prompt, strict=True):
                writer.writerow([image, row["reference"], row["prompt"], "identity", r_id])
                writer.writerow([image, row["reference"], row["prompt"], "prompt following", r_prompt])
            truth["identity"].append(np.mean(ratings_id))
            truth["prompt"].append(np.mean(ratings_prompt))

    out = tmp_path / "corr"
    args = ["correlation", "--human", str(human), "--scores", str(scores), "--out", str(out)]
    result = cli.invoke(analyze_app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "correlation.json").read_text())
    assert data["n_matched"] == 40 and data["measure"] == "mean_rating"
    entries = {(e["metric"], e["criterion"]): e for e in data["results"]}
    for metric in ("dino", "hpsv3"):
        for criterion in ("identity", "prompt"):
            entry = entries[(metric, criterion)]
            x = [r[metric] for r in rows]
            assert entry["n"] == 40
            assert entry["pearson"]["value"] == pytest.approx(
                stats.pearsonr(x, truth[criterion]).statistic, abs=1e-5
            )
            assert entry["spearman"]["value"] == pytest.approx(
                stats.spearmanr(x, truth[criterion]).statistic, abs=1e-6
            )
            assert entry["pearson"]["ci_low"] <= entry["pearson"]["value"] <= entry["pearson"]["ci_high"]
    assert entries[("dino", "identity")]["pearson"]["value"] > 0.7
    table = (out / "correlation.md").read_text()
    assert "| DINO |" in table and "ID preservation Pears." in table
    assert f"{entries[('dino', 'identity')]['spearman']['value']:.2f}" in table
    assert (out / "correlation.png").is_file()


def test_correlation_with_pairwise_votes(tmp_path):
    rng = np.random.default_rng(1)
    scores_a, rows_a = _scores_file(tmp_path / "a", "base", 12, rng)
    scores_b, rows_b = _scores_file(tmp_path / "b", "ours", 12, rng)
    votes, pairs = [], []
    for i, (a, b) in enumerate(zip(rows_a, rows_b, strict=True)):
        pairs.append({"pair_id": i, "image_a": str(tmp_path / "a" / a["image"]), "image_b": "elsewhere.png"})
        for annotator in range(3):
            # People agree with DINO on identity, except one dissenting vote per pair; pair 0 is a tie.
            better = "a" if a["dino"] > b["dino"] else "b"
            winner = "tie" if i == 0 else (better if annotator < 2 else {"a": "b", "b": "a"}[better])
            common = {"pair_id": i, "subject": a["subject"], "prompt": a["prompt"], "seed": a["seed"]}
            votes.append(
                {
                    **common,
                    "method_a": "base",
                    "method_b": "ours",
                    "annotator": f"u{annotator}",
                    "criterion": "identity",
                    "winner": winner,
                }
            )
    human = tmp_path / "results.json"
    human.write_text(json.dumps({"votes": votes, "pairs": pairs}))
    # Both sides share subject/prompt/seed, so method B's rows must be matched by metadata.
    for row in rows_b:
        row["seed"] = rows_a[rows_b.index(row)]["seed"]
    write_scores(scores_b, rows_b, ["dino", "hpsv3"])

    out = tmp_path / "corr"
    args = ["correlation", "--human", str(human), "--scores", str(scores_a), "--scores", str(scores_b)]
    result = cli.invoke(analyze_app, [*args, "--out", str(out), "--metrics", "dino"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "correlation.json").read_text())
    assert data["measure"] == "win_rate" and data["n_matched"] == 24
    entry = data["results"][0]
    assert entry["metric"] == "dino" and entry["criterion"] == "identity"
    assert entry["pairwise_agreement"] == {"value": 1.0, "n_pairs": 11}
    # Win rates: 2/3 for the better image of each pair, 1/3 for the other, 1/2 for the tied pair.
    assert sorted(set(np.round(entry["y"], 4))) == [0.3333, 0.5, 0.6667]
    assert entry["pearson"]["value"] == pytest.approx(stats.pearsonr(entry["x"], entry["y"]).statistic)


def test_stepwise_advantages_end_at_the_final_images_advantages(tmp_path):
    from cgrpo import rewards
    from cgrpo.advantage import group_normalize
    from cgrpo.data.miniworld import MiniWorld
    from cgrpo.eval.analyses import conflict_analysis, stepwise_advantages
    from cgrpo.sde import flux_sigmas
    from cgrpo.testing.policies import tiny_policy_for_tests
    from cgrpo.train.sampling import rollout

    policy, group = tiny_policy_for_tests(), 4
    examples = list(MiniWorld(image_size=16, num_train_subjects=0, num_test_subjects=2).eval_set(2, 1))[:2]
    prompts = [e.prompt for e in examples for _ in range(group)]
    references = torch.stack([e.reference for e in examples]).repeat_interleave(group, dim=0)
    cond = policy.condition([e.prompt for e in examples], references[::group]).repeat_interleave(group)
    sigmas = flux_sigmas(3, image_seq_len=policy.latent_shape[0])
    sde = torch.tensor([True, True, False])
    trajectory = rollout(policy, cond, sigmas, sde, torch.Generator().manual_seed(0))
    identity, prompt = rewards.build("mini_id"), rewards.build("mini_prompt")

    per_step = stepwise_advantages(
        policy, trajectory, cond, identity, prompt, references, prompts, None, group
    )
    assert [t for t, _, _ in per_step] == [0, 1, 2]
    final = policy.decode(trajectory.final)
    expected = group_normalize(identity(final, references, prompts).float(), group)
    torch.testing.assert_close(per_step[-1][1], expected, atol=1e-4, rtol=1e-4)

    for t, a_id, a_prompt in per_step:
        log_advantages(tmp_path / "advantages.jsonl", 1, a_id, a_prompt, group_size=group, denoising_step=t)
    data = conflict_analysis(tmp_path)
    assert data["per_denoising_step"]["t"] == [0, 1, 2]
    assert data["per_denoising_step"]["n_samples"] == [8, 8, 8]


def test_correlation_reads_the_apps_export_with_its_embedded_scores(tmp_path):
    from cgrpo.humaneval.export import FORMAT, write_results

    rng = np.random.default_rng(3)
    pairs = []
    for i in range(10):
        dino_a, dino_b = rng.uniform(0.5, 0.9, size=2)
        pair = {
            "pair_id": f"{i:016x}",
            "subject": "dog",
            "prompt": f"p{i}",
            "seed": i,
            "method_a": "ours",
            "method_b": "uno",
            "scores_a": {"dino": dino_a},
            "scores_b": {"dino": dino_b},
            "votes": [],
        }
        for annotator in range(2):
            choice = "a" if (dino_a > dino_b) == (annotator == 0 or i % 3 > 0) else "b"
            vote = {"annotator": f"u{annotator}", "criterion": "identity", "choice": choice}
            pair["votes"].append({**vote, "a_on_left": True, "elapsed_ms": 900, "created_at": "2025-01-01"})
        pairs.append(pair)
    # The app's own JSON and CSV exports of these votes.
    export = write_results({"format": FORMAT, "pairs": pairs}, tmp_path / "results.json")
    vote_csv = write_results({"format": FORMAT, "pairs": pairs}, tmp_path / "results.csv")

    results = []
    for human in (export, vote_csv):
        out = tmp_path / human.suffix[1:]
        result = cli.invoke(analyze_app, ["correlation", "--human", str(human), "--out", str(out)])
        assert result.exit_code == 0, result.output
        results.append(json.loads((out / "correlation.json").read_text()))
    for data in results:
        assert data["n_matched"] == 20 and data["scores"] == "embedded in the human-evaluation export"
        entry = data["results"][0]
        assert (entry["metric"], entry["criterion"], entry["n"]) == ("dino", "identity", 20)
        # Pairs 0, 3, 6, 9 split 1-1 (no majority); the others agree with DINO unanimously.
        assert entry["pairwise_agreement"] == {"value": 1.0, "n_pairs": 6}
    assert results[0]["results"][0]["spearman"] == results[1]["results"][0]["spearman"]
