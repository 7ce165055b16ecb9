"""``cgrpo reproduce``: the plan (tables, overrides, paper numbers, budgets), the runner (resumable, parallel,
deduplicated), the report, the SFT baseline's LoRA mode, and the UNO plan with tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cgrpo.config import load_config, read_yaml, to_dict
from cgrpo.reproduce import plan as plan_module
from cgrpo.reproduce.plan import (
    MAIN,
    RUNS,
    TABLES,
    Plan,
    ablation_yaml,
    build_plan,
    configs_dir,
    estimate_seconds,
    heldout_seconds,
    makespan,
)
from cgrpo.train.config import GRPOConfig

PAPER = Path("/work/shared/paper/customized-grpo-arxiv-2510.18263.txt")


# --- the plan ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", ["mini", "uno"])
def test_every_row_resolves_to_a_valid_config_and_runs_are_shared(world):
    plan = build_plan(world, "2,3,4,5", seeds=2)
    assert {row.run for t in TABLES.values() for row in t.rows} <= set(RUNS)
    # 20 GRPO runs + SFT + RPO per seed; the main run is trained once per seed for all four tables
    assert len(plan.runs) == 2 * 22
    main = [r for r in plan.runs if r.spec.slug == MAIN]
    assert [r.seed for r in main] == [0, 1] and all(r.tables == [2, 3, 4, 5] for r in main)
    assert len({r.run_id for r in plan.runs}) == len(plan.runs)
    for run in plan.runs:  # validated when built; the GRPO overrides really land in the config
        if run.kind == "grpo":
            for override in RUNS[run.spec.slug].overrides:
                key, value = override.split("=", 1)
                section, name = key.split(".")
                assert run.config[section][name] == yaml.safe_load(value), (run.run_id, override)
    # seeds differ only in the seed (and the output dir)
    a, b = main[0].config, main[1].config
    assert {k for k in a if a[k] != b[k]} == {"seed", "output_dir"}


def test_rows_name_the_paper_settings():
    cfg = {r.spec.slug: r.config for r in build_plan("mini", "2,3,4,5").runs if r.seed == 0}
    assert cfg["naive_1to1.5"]["advantage"] == {**cfg["naive_1to1.5"]["advantage"], "synergy": "none"}
    assert cfg["naive_1to1.5"]["advantage"]["ratio"] == [1.0, 1.5]
    assert (
        cfg["wo_tdw"]["advantage"]["schedule"] == "static" and cfg["wo_tdw"]["advantage"]["synergy"] == "tanh"
    )
    assert (
        cfg["wo_sars"]["advantage"]["schedule"] == "paper"
        and cfg["wo_sars"]["advantage"]["synergy"] == "none"
    )
    assert (cfg["bounds_0.9_0.1"]["advantage"]["w_max"], cfg["bounds_0.9_0.1"]["advantage"]["w_min"]) == (
        0.9,
        0.1,
    )
    assert cfg["inverted_alpha_0.8"]["advantage"]["schedule"] == "inverted"
    assert cfg["inverted_alpha_0.8"]["advantage"]["alpha"] == 0.8
    main = cfg[MAIN]["advantage"]
    assert (main["synergy"], main["alpha"], main["schedule"], main["w_max"], main["w_min"]) == (
        "tanh",
        0.5,
        "paper",
        0.7,
        0.3,
    )
    # Table 5's alpha = 0 row (standard TDW) is the w/o-SARS run, as the identical paper numbers say
    t5 = {(r.name, r.column): r for r in TABLES[5].rows}
    assert t5[("alpha = 0.0", "Standard TDW")].run == "wo_sars"
    assert t5[("alpha = 0.5", "Standard TDW")].run == MAIN


def test_paper_numbers_spot_checks():
    t2 = {r.name: r.paper for r in TABLES[2].rows}
    assert t2["Naive GRPO (1:1)"] == {"dino": 0.861, "clip_i": 0.912, "clip_t": 0.235, "hps": 4.12}
    assert t2["Customized-GRPO"]["hps"] == 8.32 and t2["RPO"]["dino"] == 0.852
    assert {r.name: r.paper["dino"] for r in TABLES[3].rows}["Max(A_id, A_prompt)"] == 0.884
    assert {r.name: r.paper["hps"] for r in TABLES[4].rows}["0.9 : 0.1"] == 7.27
    t5 = {(r.name, r.column): r.paper for r in TABLES[5].rows}
    assert t5[("alpha = 1.0", "Inverted TDW")] == {"dino": 0.620, "hps": 5.41}


@pytest.mark.skipif(not PAPER.is_file(), reason="the paper text is not on this machine")
def test_every_paper_number_is_in_the_paper_text():
    text = PAPER.read_text()
    for number in (2, 3, 4):
        for row in TABLES[number].rows:
            p = row.paper
            line = f"{p['dino']:.3f}\t{p['clip_i']:.3f}\t{p['clip_t']:.3f}\t{p['hps']:.2f}"
            assert line in text, (number, row.name, line)
    rows = {(r.name, r.column): r.paper for r in TABLES[5].rows}
    for name in dict.fromkeys(r.name for r in TABLES[5].rows):
        s, i = rows[(name, "Standard TDW")], rows[(name, "Inverted TDW")]
        line = f"{s['dino']:.3f}\t{s['hps']:.2f}\t{i['dino']:.3f}\t{i['hps']:.2f}"
        assert line in text, (name, line)


@pytest.mark.parametrize("world", ["mini", "uno"])
def test_ablation_yamls_are_in_sync_with_the_plan(world):
    directory = configs_dir() / world / "ablations"
    base = configs_dir() / world / ("customized_grpo.yaml" if world == "mini" else "paper.yaml")
    for spec in RUNS.values():
        if spec.kind != "grpo" or spec.slug == MAIN:
            continue
        path = directory / f"{spec.slug}.yaml"
        assert path.read_text() == ablation_yaml(world, spec), f"regenerate {path} (write_ablation_configs)"
        from_file = to_dict(load_config(GRPOConfig, path))
        expected = to_dict(
            load_config(
                GRPOConfig, base, [*spec.overrides, f"method={spec.slug}", from_file_output(from_file)]
            )
        )
        assert from_file == expected


def from_file_output(config: dict) -> str:
    return f"output_dir={config['output_dir']}"


def test_mini_baseline_configs_share_the_grpo_setup():
    mini = configs_dir() / "mini"
    grpo = read_yaml(mini / "customized_grpo.yaml")
    rpo = read_yaml(mini / "rpo.yaml")
    sft = read_yaml(mini / "sft_baseline.yaml")
    assert rpo["data"] == grpo["data"] and rpo["rewards"] == grpo["rewards"]
    assert rpo["policy"] == grpo["policy"]
    assert sft["data"]["dataset"] == grpo["data"] and sft["model"]["lora"] == grpo["policy"]["lora"]
    assert sft["heldout"]["num_steps"] == grpo["eval"]["num_steps"]
    for name in ("naive_1to1", "naive_1to1.5"):  # the top-level baselines are the plan's naive runs
        top = load_config(GRPOConfig, mini / f"{name}.yaml").advantage
        assert top == load_config(GRPOConfig, mini / "ablations" / f"{name}.yaml").advantage


def test_budgets_and_time_estimates():
    full, quick = build_plan("mini"), build_plan("mini", quick=True)
    by_slug = {r.spec.slug: r for r in full.runs if r.seed == 0}
    t = by_slug[MAIN].config["train"]
    terms = t["iterations"] * t["prompts_per_iteration"] * t["group_size"] * t["train_steps"]
    sft, rpo = by_slug["sft"].config, by_slug["rpo"].config
    assert sft["optim"]["steps"] * sft["optim"]["batch_size"] == terms
    assert rpo["pairs"]["prompts"] == t["iterations"] * t["prompts_per_iteration"]
    assert rpo["pairs"]["candidates"] == t["group_size"]
    assert sft["data"]["dataset"] == by_slug[MAIN].config["data"]
    assert rpo["eval"]["seed"] == by_slug[MAIN].config["eval"]["seed"]
    evaluations = [heldout_seconds(full.profile.heldout)] * (len(full.runs) + 1)  # and the base
    hours = (makespan([estimate_seconds(r) for r in full.runs], 2) + makespan(evaluations, 2)) / 3600
    minutes = makespan([estimate_seconds(r) for r in quick.runs], 2) / 60
    assert len(full.seeds) == 3 and hours <= 3.0
    assert len(quick.seeds) == 1 and minutes <= 20.0
    assert makespan([3, 3, 2, 2], 2) == 5


def test_report_states_the_run_budget_and_world_version():
    from cgrpo.data.miniworld import WORLD_VERSION
    from cgrpo.reproduce.report import budget_line

    full = build_plan("mini")
    t = next(r for r in full.runs if r.spec.slug == MAIN).config["train"]
    line = budget_line(full)
    assert f"{t['iterations']} iterations x {t['prompts_per_iteration']} prompts" in line
    assert f"World version {WORLD_VERSION}" in line


def test_claim_verdicts_respect_seed_noise():
    from cgrpo.reproduce.report import _verdict

    assert _verdict([True, True]) == "holds"
    assert _verdict([True, None]) == "unclear"
    assert _verdict([None, False]) == "does not hold"


def _trainers_numbers(plan: Plan) -> Plan:
    """``plan`` reading each run's own ``summary.json`` (its profile's held-out set removed)."""
    import dataclasses

    plan.profile = dataclasses.replace(plan.profile, heldout=None)
    return plan


def test_claims_are_read_from_the_runs_summaries(tmp_path):
    from cgrpo.reproduce.report import claim_lines

    plan = _trainers_numbers(build_plan("mini", "2,3,5", seeds=2, out=tmp_path))
    # (id, prompt) per run, the same for both seeds but for a small seed wobble
    values = {
        MAIN: (0.75, 0.78),
        "naive_1to1": (0.78, 0.74),
        "naive_1to1.5": (0.76, 0.77),
        "synergy_max": (0.80, 0.70),
        "alpha_0.8": (0.75, 0.7795),  # within the seeds' spread of the main run
        "alpha_1.0": (0.76, 0.75),
    }
    for run in plan.runs:
        identity, prompt = values.get(run.spec.slug, (0.74, 0.76))
        wobble = 0.001 * run.seed
        summary = {
            "base": {"id": 0.73, "prompt": 0.76},
            "trained": {"id": identity + wobble, "prompt": prompt},
        }
        (run.output_dir).mkdir(parents=True)
        (run.output_dir / "summary.json").write_text(json.dumps(summary))
    verdicts, seeds_agreeing, paired = {}, {}, {}
    for line in claim_lines(plan)[6:]:
        if line.startswith("|"):
            claim, paper, ours, agreeing, difference = [cell.strip() for cell in line.strip("|").split("|")]
            verdicts[claim] = (paper, ours)
            seeds_agreeing[claim] = agreeing
            paired[claim] = difference
    assert verdicts["Customized-GRPO improves both rewards over the base"] == ("holds", "holds")
    assert verdicts["Naive GRPO 1:1 degrades competitively: identity up, prompt down (vs base)"][1] == "holds"
    assert verdicts["Naive GRPO 1:1.5 trades the other way: less identity, more prompt than 1:1"] == (
        "holds",
        "holds",
    )
    assert verdicts["Max synergy hacks identity: more identity, less prompt than tanh"] == ("holds", "holds")
    assert verdicts["Alpha past 0.5 hurts prompt following (alpha 0.8 and 1.0 vs 0.5)"][1] == "unclear"
    assert verdicts["Removing the synergy term (w/o SARS) lowers both rewards"][1] == "holds"
    # paired per-seed reading: alpha 0.8's prompt equals the main run's minus 0.0005 in both seeds
    assert seeds_agreeing["Alpha past 0.5 hurts prompt following (alpha 0.8 and 1.0 vs 0.5)"] == "2/2, 2/2"
    assert seeds_agreeing["RPO overfits the reference: identity up, prompt down (vs base)"] == "2/2, 0/2"
    trade = "Naive GRPO 1:1.5 trades the other way: less identity, more prompt than 1:1"
    assert seeds_agreeing[trade] == "2/2, 2/2"
    # the paired difference's mean and std over seeds: identity 0.78 - 0.76 (the same wobble cancels),
    # prompt 0.77 - 0.74, both the claimed way; vs the base the wobble stays: 0.75 + 0.001 s - 0.73, s = 0, 1
    assert paired[trade] == "+0.020 ± 0.000, +0.030 ± 0.000"
    assert paired["Customized-GRPO improves both rewards over the base"] == "+0.021 ± 0.001, +0.020 ± 0.000"

    # one seed: no spread, so differences below the single-seed floor are unclear
    one = _trainers_numbers(build_plan("mini", "2,3,5", seeds=1, out=tmp_path))
    lines = "\n".join(claim_lines(one))
    assert f"| {trade} | holds | holds | 1/1, 1/1 | +0.020, +0.030 |" in lines
    alpha = "Alpha past 0.5 hurts prompt following (alpha 0.8 and 1.0 vs 0.5)"
    assert f"| {alpha} | holds | unclear | 1/1, 1/1 | +0.001, +0.030 |" in lines


def test_full_profile_evaluates_every_policy_on_one_larger_heldout_set(tmp_path):
    from cgrpo.reproduce.heldout import eval_command, pending

    full = build_plan("mini", out=tmp_path)
    heldout = full.profile.heldout
    assert heldout is not None and heldout.images >= 1000  # 80 images give +-0.04 per mean
    assert build_plan("mini", quick=True).profile.heldout is None
    run = full.run(MAIN, 1)
    command = eval_command(full, run)
    assert command[command.index("--lora") + 1] == str(run.output_dir)
    assert command[command.index("--num-subjects") + 1] == str(heldout.num_subjects)
    assert command[command.index("--images-per-prompt") + 1] == str(heldout.images_per_prompt)
    assert "--lora" not in eval_command(full, None)
    # the base first, then only the finished runs that are not evaluated yet
    assert [name for name, _ in pending(full)] == ["base"]
    run.output_dir.mkdir(parents=True)
    (run.output_dir / "summary.json").write_text("{}")
    assert [name for name, _ in pending(full)] == ["base", run.run_id]
    (tmp_path / "heldout" / "base").mkdir(parents=True)
    (tmp_path / "heldout" / "base" / "summary.json").write_text("{}")
    assert [name for name, _ in pending(full)] == [run.run_id]


def test_report_reads_the_plan_heldout_evaluation_not_the_trainers(tmp_path):
    from cgrpo.reproduce.heldout import heldout_dir
    from cgrpo.reproduce.report import row_values

    plan = build_plan("mini", "2", seeds=2, out=tmp_path)

    def write(directory: Path, identity: float, prompt: float) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        metrics = {"mini_id": {"mean": identity}, "mini_prompt": {"mean": prompt}}
        (directory / "summary.json").write_text(json.dumps({"metrics": metrics}))

    for run in plan.runs:  # the trainers' own numbers, which the report must not read
        run.output_dir.mkdir(parents=True)
        trainer = {"base": {"id": 0.1, "prompt": 0.1}, "trained": {"id": 0.2, "prompt": 0.2}}
        (run.output_dir / "summary.json").write_text(json.dumps(trainer))
    write(heldout_dir(plan, None), 0.70, 0.60)
    for seed, identity in ((0, 0.74), (1, 0.76)):
        write(heldout_dir(plan, plan.run(MAIN, seed)), identity, 0.65)
    main_row = next(r for r in TABLES[2].rows if r.run == MAIN and r.use == "trained")
    base_row = next(r for r in TABLES[2].rows if r.use == "base")
    cells = row_values(plan, main_row)
    assert cells["id"].mean == pytest.approx(0.75) and cells["id"].n == 2
    assert cells["prompt"].mean == pytest.approx(0.65)
    base = row_values(plan, base_row)
    assert base["id"].mean == pytest.approx(0.70) and base["prompt"].std == 0.0
    # a run without its held-out evaluation has no number yet
    assert row_values(plan, next(r for r in TABLES[2].rows if r.run == "wo_tdw"))["id"].n == 0


def test_bad_arguments_name_the_option():
    with pytest.raises(ValueError, match="--tables"):
        build_plan("mini", "2,7")
    with pytest.raises(ValueError, match="world"):
        build_plan("sd3")
    with pytest.raises(FileNotFoundError, match="grpo base config"):
        build_plan("mini", base_configs={"grpo": "/nonexistent.yaml"})


# --- running it: a tiny world --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A tiny policy directory and a GRPO base config for it (the SFT/RPO configs are the packaged ones)."""
    from cgrpo.data.miniworld import vocabulary
    from cgrpo.testing.policies import tiny_policy_for_tests

    root = tmp_path_factory.mktemp("tiny")
    tiny_policy_for_tests(seed=0, vocabulary=vocabulary()).save_pretrained(root / "policy")
    config = read_yaml(configs_dir() / "mini" / "customized_grpo.yaml")
    config["policy"] = {
        "name": "mini",
        "options": {"path": str(root / "policy")},
        "lora": {"rank": 4, "alpha": 4},
    }
    config["data"]["options"] = {
        "image_size": 16,
        "num_train_subjects": 20,
        "num_test_subjects": 4,
        "train": {"prompts_per_subject": 2},
        "eval": {"num_subjects": 2, "prompts_per_kind": 1},
    }
    config["train"].update(group_size=3, train_steps=2)
    config["sampling"]["num_steps"] = 4
    if config["sampling"].get("sde_steps") is not None:  # the main config's stochastic prefix, scaled down
        config["sampling"]["sde_steps"] = 3
    config["eval"]["num_steps"] = 3
    (root / "grpo.yaml").write_text(yaml.safe_dump(config))
    return root


def _invoke(*args):
    import typer
    from typer.testing import CliRunner

    from cgrpo.reproduce.cli import reproduce_command

    app = typer.Typer()
    app.command()(reproduce_command)
    return CliRunner().invoke(app, list(map(str, args)), terminal_width=240)


def test_reproduce_quick_end_to_end_then_skips_finished_runs(tiny_world, tmp_path, monkeypatch):
    from cgrpo.train import grpo

    constructed: list[bool] = []

    class CountingTrainer(grpo.GRPOTrainer):
        def __init__(self, config, resume=False, **kw):
            constructed.append(resume)
            super().__init__(config, resume=resume, **kw)

    monkeypatch.setattr(grpo, "GRPOTrainer", CountingTrainer)
    out = tmp_path / "repro"
    args = ("--quick", "--iterations", 2, "--tables", "2,3", "--jobs", 1, "--out", out)
    args += ("--grpo-config", tiny_world / "grpo.yaml")

    dry = _invoke(*args, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "10 of 10 runs to train" in dry.output and not out.exists()

    # --no-run writes the plan and a report of what is finished (nothing yet), and trains nothing
    planned = _invoke(*args, "--no-run")
    assert planned.exit_code == 0, planned.output
    assert not constructed and "report of the 0 finished runs" in planned.output
    assert "(0 finished)" in (out / "report.md").read_text()

    first = _invoke(*args)
    assert first.exit_code == 0, first.output
    assert len(constructed) == 8  # 8 GRPO runs: tables 2 and 3 share the base, naive 1:1.5 and the main run
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["runs"]) == 10 and (out / "commands.sh").is_file()
    summaries = {
        r["slug"]: json.loads((Path(r["output_dir"]) / "summary.json").read_text()) for r in plan["runs"]
    }
    # every run started from the same base and was evaluated identically: one base, bit for bit
    bases = {json.dumps(s["base"], sort_keys=True) for s in summaries.values()}
    assert len(bases) == 1

    report = (out / "report.md").read_text()
    assert "### Table 2" in report and "### Table 3" in report and "### Table 4" not in report
    assert (
        "paper: DINO ↑" in report and "paper: HPS-v3 ↑" in report and "mini_id (DINO-Seg analogue)" in report
    )
    assert "| Naive GRPO (1:1) |" in report and "| 0.861 | 0.912 | 0.235 | 4.12 |" in report
    assert "| UNO (Base) |" in report and "The paper's claims" in report
    assert "Each GRPO run: 2 iterations x 2 prompts x G = " in report  # --iterations and the quick batch
    assert (out / "tradeoff.png").is_file() and "Pareto front" in report

    # a second invocation trains nothing
    constructed.clear()
    second = _invoke(*args)
    assert second.exit_code == 0, second.output
    assert constructed == [] and "0 trained, 10 already finished" in second.output

    # an interrupted GRPO run (checkpoint, no summary) resumes from its checkpoint
    main = next(r for r in plan["runs"] if r["slug"] == MAIN)
    (Path(main["output_dir"]) / "summary.json").unlink()
    third = _invoke(*args)
    assert third.exit_code == 0, third.output
    assert constructed == [True] and "1 trained, 9 already finished" in third.output


def _subset(plan: Plan, runs) -> Plan:
    return Plan(plan.world, plan.profile, plan.tables, plan.seeds, plan.out, list(runs), plan.base_configs)


def test_parallel_workers_report_failures_and_go_on(tmp_path):
    """The subprocess pool: a failing run (an unknown kind) is reported with its log; the others go on."""
    from cgrpo.reproduce.plan import PlannedRun, RunSpec
    from cgrpo.reproduce.runner import execute

    runs = [
        PlannedRun(RunSpec(f"broken{i}", "bogus"), 0, {"output_dir": str(tmp_path / f"b{i}")})  # type: ignore[arg-type]
        for i in range(2)
    ]
    plan = _subset(build_plan("mini", "4", quick=True, out=tmp_path), runs)
    events = []
    outcome = execute(plan, jobs=2, on_event=lambda event, run, detail: events.append(event))
    assert sorted(outcome.failed) == sorted(r.run_id for r in runs) and not outcome.finished
    assert events.count("start") == 2 and events.count("fail") == 2
    assert "unknown run kind 'bogus'" in (tmp_path / "logs" / f"{runs[0].run_id}.log").read_text()


def test_heldout_evaluations_run_in_subprocesses_and_feed_the_report(tiny_world, tmp_path):
    """A plan with a held-out set: one tiny run trained, then the base and that run evaluated by
    ``cgrpo eval mini`` subprocesses; the report's numbers are those evaluations', and a second call
    evaluates nothing."""
    import dataclasses

    from cgrpo.eval.mini import HeldoutSet
    from cgrpo.reproduce.heldout import heldout_dir
    from cgrpo.reproduce.report import row_values
    from cgrpo.reproduce.runner import evaluate_heldout, execute

    full = build_plan(
        "mini", "2", quick=True, iterations=1, out=tmp_path, base_configs={"grpo": tiny_world / "grpo.yaml"}
    )
    plan = _subset(full, [full.run(MAIN, 0)])
    plan.profile = dataclasses.replace(plan.profile, heldout=HeldoutSet(2, 1, 1, steps=3))
    assert execute(plan, jobs=1).finished == [plan.runs[0].run_id]
    events: list[tuple[str, str]] = []
    failed = evaluate_heldout(plan, jobs=2, on_event=lambda event, name, _: events.append((event, name)))
    assert failed == {}, failed
    assert sorted(events) == sorted(
        [(e, n) for e in ("start", "done") for n in ("base", plan.runs[0].run_id)]
    )
    trained = json.loads((heldout_dir(plan, plan.runs[0]) / "summary.json").read_text())
    assert trained["n_images"] == 10  # 2 subjects x 5 kinds x 1 prompt x 1 image
    row = next(r for r in TABLES[2].rows if r.run == MAIN and r.use == "trained")
    assert row_values(plan, row)["id"].mean == pytest.approx(trained["metrics"]["mini_id"]["mean"])
    assert evaluate_heldout(plan, jobs=2, on_event=lambda *a: events.append(a)) == {} and len(events) == 4


@pytest.mark.slow
def test_parallel_workers_train_in_subprocesses(tiny_world, tmp_path):
    from cgrpo.reproduce.runner import execute

    full = build_plan(
        "mini", "2", quick=True, iterations=1, out=tmp_path, base_configs={"grpo": tiny_world / "grpo.yaml"}
    )
    plan = _subset(full, [r for r in full.runs if r.spec.slug in ("naive_1to1", "wo_tdw")])
    outcome = execute(plan, jobs=2)
    assert sorted(outcome.finished) == sorted(r.run_id for r in plan.runs), outcome.failed
    assert all(r.finished for r in plan.runs)
    assert (tmp_path / "logs" / f"{plan.runs[0].run_id}.log").is_file()


def test_sft_baseline_lora_mode_resumes_and_reports(tiny_world, tmp_path):
    """SFT baseline: a fresh LoRA on a registered policy, the RL data, held-out rewards in summary.json."""
    from cgrpo.train.checkpoint import read_checkpoint
    from cgrpo.train.sft import SFTConfig, run_sft

    grpo = read_yaml(tiny_world / "grpo.yaml")
    data = plan_module.sync_from_grpo(
        "sft",
        read_yaml(configs_dir() / "mini" / "sft_baseline.yaml"),
        to_dict(load_config(GRPOConfig, tiny_world / "grpo.yaml")),
    )
    assert data["model"]["options"] == grpo["policy"]["options"]
    overrides = [
        f"output_dir={tmp_path / 'sft'}",
        "optim.steps=4",
        "optim.batch_size=4",
        "save_every=2",
        "eval_every=0",
        "num_threads=0",
        "progress=false",
    ]
    from cgrpo.config import apply_overrides, from_dict

    config = from_dict(SFTConfig, apply_overrides(data, overrides))
    final = run_sft(config)
    assert (final / "adapter_model.safetensors").is_file()  # the adapter only, like GRPO's final/
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert set(summary) == {"base", "trained"} and summary["base"] != summary["trained"]
    # the checkpoint holds the adapter only (the frozen base is rebuilt from the config)
    weights, _ = read_checkpoint(tmp_path / "sft" / "checkpoints" / "step-000002")
    assert weights and all(".lora_" in name for name in weights)
    # resume from the step-2 checkpoint: the same base numbers are reported
    (tmp_path / "sft" / "summary.json").unlink()
    run_sft(config, resume=True)
    assert json.loads((tmp_path / "sft" / "summary.json").read_text())["base"] == summary["base"]


# --- the UNO plan with tiny models ---------------------------------------------------------------------


def test_uno_plan_builds_and_its_baselines_run_with_tiny_models(tmp_path):
    from PIL import Image

    from cgrpo.reproduce.runner import run_spec, write_run_files
    from cgrpo.testing import rewards as tiny_rewards
    from cgrpo.testing.policies import save_tiny_uno

    policy_options = save_tiny_uno(tmp_path / "uno", seed=0, lora_rank=4)
    dino_seg = tiny_rewards.save_tiny_dino_seg(tmp_path / "dino_seg")
    hpsv3 = tiny_rewards.save_tiny_hpsv3(tmp_path / "hpsv3")
    lines = []
    for i, (subject, prompt, colour) in enumerate(
        [("dog", "a dog on the beach", 40), ("cup", "a cup in the snow", 200)]
    ):
        for name, shade in (("ref", colour), ("target", 255 - colour)):
            Image.new("RGB", (40, 40), (shade, 90, 30)).save(tmp_path / f"{subject}_{name}.png")
        lines.append(
            json.dumps(
                {
                    "id": str(i),
                    "reference": f"{subject}_ref.png",
                    "target": f"{subject}_target.png",
                    "subject_class": subject,
                    "prompt": prompt,
                }
            )
        )
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    grpo = read_yaml(configs_dir() / "uno" / "paper.yaml")
    grpo.update(device="cpu")
    grpo["policy"] = {
        "name": "uno",
        "options": {**policy_options, "image_size": 32},
        "lora": {"rank": 4, "alpha": 4},
    }
    grpo["data"]["options"] = {
        "path": str(tmp_path / "train.jsonl"),
        "image_size": 32,
        "eval_path": str(tmp_path / "train.jsonl"),
    }
    grpo["rewards"]["identity"]["options"] = {**dino_seg, "batch_size": 4}
    grpo["rewards"]["prompt"]["options"] = {**hpsv3, "batch_size": 4}
    grpo["sampling"].update(num_steps=3, micro_batch=2)
    grpo["train"].update(prompts_per_iteration=1, group_size=2, train_steps=2, micro_batch=2)
    grpo["eval"]["num_steps"] = 2
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(grpo))

    plan = build_plan(
        "uno",
        "2,3,4,5",
        quick=True,
        iterations=1,
        out=tmp_path / "repro",
        base_configs={"grpo": tmp_path / "grpo.yaml"},
    )
    assert len(plan.runs) == 22 and all(estimate_seconds(r) is None for r in plan.runs)
    write_run_files(plan)
    assert len(list((tmp_path / "repro" / "configs").glob("*.yaml"))) == 22
    commands = (tmp_path / "repro" / "commands.sh").read_text()
    assert "cgrpo rpo" in commands and "cgrpo sft" in commands and "cgrpo train" in commands
    by_slug = {r.spec.slug: r for r in plan.runs}
    sft, rpo = by_slug["sft"].config, by_slug["rpo"].config
    assert (
        sft["model"]["policy"] == "uno"
        and sft["model"]["options"]["flux_path"] == policy_options["flux_path"]
    )
    assert rpo["rewards"]["prompt"]["options"]["checkpoint"] == hpsv3["checkpoint"]
    assert rpo["pairs"]["candidates"] == 2 and rpo["train"]["steps"] == 1
    # the two baselines run on the tiny UNO (VAE latents, T5 + CLIP, UNO's merged LoRA under a fresh adapter)
    rpo_summary = run_spec("rpo", {**rpo, "pairs": {**rpo["pairs"], "prompts": 1}})
    sft_summary = run_spec("sft", {**sft, "optim": {**sft["optim"], "batch_size": 2, "steps": 1}})
    assert rpo_summary["base"] == sft_summary["base"]
