"""``OUT/report.md``: each planned table in the paper's layout, our numbers next to the published ones.

Our numbers are the held-out rewards of each run's trained policy (the base row: of the policy before
training), mean ± standard deviation over seeds. In the mini world they are ``mini_id`` and ``mini_prompt``,
pixel-level *analogues* of DINO(-Seg) and HPSv3 on a different task: compare directions and orderings with
the paper, never values. The trade-off plot (``OUT/tradeoff.png``) shows every row's mean, with ± std bars,
and the Pareto front, through :func:`cgrpo.eval.analyses.tradeoff_analysis`.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgrpo.io import atomic_write_json, atomic_write_text
from cgrpo.reproduce.plan import MAIN, PAPER_LABELS, RUNS, Plan, Row, Table

OURS = ("id", "prompt")


@dataclass
class Cell:
    """Our value of one row and metric over seeds: mean, std (None with one seed), number of seeds."""

    mean: float
    std: float | None
    n: int

    def text(self, digits: int = 3) -> str:
        if self.n == 0 or not math.isfinite(self.mean):
            return "—"
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def row_values(plan: Plan, row: Row) -> dict[str, Cell]:
    """Our ``id``/``prompt`` of ``row`` over the plan's seeds (finished runs only)."""
    cells = {}
    for metric in OURS:
        xs = list(per_seed(plan, row.run, row.use, metric).values())
        mean = statistics.fmean(xs) if xs else math.nan
        std = statistics.stdev(xs) if len(xs) > 1 else None
        cells[metric] = Cell(mean, std, len(xs))
    return cells


def per_seed(plan: Plan, run: str, use: str, metric: str) -> dict[int, float]:
    """``{seed: value}`` of one run's ``use`` (``base``/``trained``) and metric over its finished seeds: from
    the plan's own held-out evaluation when its profile has one, else from the run's ``summary.json``."""
    from cgrpo.reproduce.heldout import heldout_value

    values = {}
    for seed in plan.seeds:
        planned = plan.run(run, seed)
        if planned is None or not planned.finished:
            continue
        if plan.profile.heldout is not None:
            value = heldout_value(plan, planned, use, metric)
        else:
            summary = json.loads((planned.output_dir / "summary.json").read_text())
            value = (summary.get(use) or {}).get(metric)
        if isinstance(value, int | float) and math.isfinite(value):
            values[seed] = float(value)
    return values


def metric_names(plan: Plan) -> tuple[str, str]:
    """Honest column names of our two numbers: the reward each run was evaluated with."""
    main = plan.run(MAIN, 0) or plan.runs[0]
    rewards = main.config.get("rewards") or main.config.get("heldout", {}).get("rewards", {})
    identity = rewards.get("identity", {}).get("name", "id")
    prompt = rewards.get("prompt", {}).get("name", "prompt")
    if plan.world == "mini":
        return f"{identity} (DINO-Seg analogue)", f"{prompt} (HPSv3 analogue)"
    return f"{identity} (held-out)", f"{prompt} (held-out)"


def _paper(value: float | None) -> str:
    return "—" if value is None else (f"{value:.2f}" if value > 2 else f"{value:.3f}")


def table_lines(plan: Plan, table: Table) -> list[str]:
    id_name, prompt_name = metric_names(plan)
    lines = [f"### Table {table.number}: {table.title}", ""]
    if not table.columns:
        header = ["Method", f"ours: {id_name} ↑", f"ours: {prompt_name} ↑"]
        header += [f"paper: {PAPER_LABELS[m]} ↑" for m in table.metrics]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in table.rows:
            cells = row_values(plan, row)
            line = [row.name, cells["id"].text(), cells["prompt"].text()]
            line += [_paper(row.paper.get(m)) for m in table.metrics]
            lines.append("| " + " | ".join(line) + " |")
    else:  # Table 5: one line per alpha, a block of columns per schedule
        header = ["Synergy coef."]
        for column in table.columns:
            header += [f"{column} ours: id ↑", f"{column} ours: prompt ↑"]
            header += [f"{column} paper: {PAPER_LABELS[m]} ↑" for m in table.metrics]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        names = list(dict.fromkeys(row.name for row in table.rows))
        for name in names:
            line = [name]
            for column in table.columns:
                row = next(r for r in table.rows if r.name == name and r.column == column)
                cells = row_values(plan, row)
                line += [cells["id"].text(), cells["prompt"].text()]
                line += [_paper(row.paper.get(m)) for m in table.metrics]
            lines.append("| " + " | ".join(line) + " |")
    runs = sorted({row.run for row in table.rows})
    lines += ["", "Runs: " + "; ".join(f"`{slug}` — {RUNS[slug].note}" for slug in runs), ""]
    return lines


# --- the paper's qualitative claims, checked on our numbers ------------------------------------------

# (claim, [(row run, use, metric, op, other run, other use)]): ours uses (id, prompt), the paper (dino, hps).
CLAIMS: list[tuple[str, list[tuple[str, str, str, str, str, str]]]] = [
    (
        "Customized-GRPO improves both rewards over the base",
        [(MAIN, "trained", "id", ">", MAIN, "base"), (MAIN, "trained", "prompt", ">", MAIN, "base")],
    ),
    (
        "Naive GRPO 1:1 degrades competitively: identity up, prompt down (vs base)",
        [
            ("naive_1to1", "trained", "id", ">", MAIN, "base"),
            ("naive_1to1", "trained", "prompt", "<", MAIN, "base"),
        ],
    ),
    (
        "Customized-GRPO beats Naive GRPO 1:1.5 on both rewards",
        [
            (MAIN, "trained", "id", ">", "naive_1to1.5", "trained"),
            (MAIN, "trained", "prompt", ">", "naive_1to1.5", "trained"),
        ],
    ),
    (
        "Naive GRPO 1:1.5 trades the other way: less identity, more prompt than 1:1",
        [
            ("naive_1to1.5", "trained", "id", "<", "naive_1to1", "trained"),
            ("naive_1to1.5", "trained", "prompt", ">", "naive_1to1", "trained"),
        ],
    ),
    (
        "Removing the synergy term (w/o SARS) lowers both rewards",
        [
            ("wo_sars", "trained", "id", "<", MAIN, "trained"),
            ("wo_sars", "trained", "prompt", "<", MAIN, "trained"),
        ],
    ),
    (
        "Removing TDW (static 1:1) lowers the prompt reward",
        [("wo_tdw", "trained", "prompt", "<", MAIN, "trained")],
    ),
    (
        "The inverted TDW schedule is worse than the standard one on both rewards (alpha 0.5)",
        [
            ("inverted_alpha_0.5", "trained", "id", "<", MAIN, "trained"),
            ("inverted_alpha_0.5", "trained", "prompt", "<", MAIN, "trained"),
        ],
    ),
    (
        "Max synergy hacks identity: more identity, less prompt than tanh",
        [
            ("synergy_max", "trained", "id", ">", MAIN, "trained"),
            ("synergy_max", "trained", "prompt", "<", MAIN, "trained"),
        ],
    ),
    (
        "Alpha past 0.5 hurts prompt following (alpha 0.8 and 1.0 vs 0.5)",
        [
            ("alpha_0.8", "trained", "prompt", "<", MAIN, "trained"),
            ("alpha_1.0", "trained", "prompt", "<", MAIN, "trained"),
        ],
    ),
    (
        "RPO overfits the reference: identity up, prompt down (vs base)",
        [("rpo", "trained", "id", ">", MAIN, "base"), ("rpo", "trained", "prompt", "<", MAIN, "base")],
    ),
]
_PAPER_METRIC = {"id": "dino", "prompt": "hps"}


def _paper_value(run: str, use: str, metric: str) -> float | None:
    from cgrpo.reproduce.plan import TABLES

    for table in TABLES.values():
        for row in table.rows:
            if row.run == run and row.use == use:
                value = row.paper.get(_PAPER_METRIC[metric])
                if value is not None:
                    return value
    return None


NOISE_FLOOR = 1e-3  # smaller differences are never read as a result
# With one seed there is no spread to compare with. Three seeds of the mini demo (120 iterations) spread by a
# std of 0.002-0.004 per reward and run, so one-seed differences below 0.005 are not read as a result.
SINGLE_SEED_FLOOR = 5e-3


def _our_cell(plan: Plan, run: str, use: str, metric: str) -> Cell | None:
    cell = row_values(plan, Row("", run, {}, use=use))[metric]  # type: ignore[arg-type]
    return cell if cell.n else None


def _paired_differences(plan: Plan, condition: tuple[str, str, str, str, str, str]) -> list[float]:
    """Per seed where both runs finished, ``run - other`` signed so that positive is the claimed way. Runs of
    one seed share their training seed (data order, first rollouts), so their difference is paired."""
    run, use, metric, op, other, other_use = condition
    x, y = per_seed(plan, run, use, metric), per_seed(plan, other, other_use, metric)
    sign = 1.0 if op == ">" else -1.0
    return [sign * (x[s] - y[s]) for s in sorted(x.keys() & y.keys())]


def _seeds_agreeing(plan: Plan, condition: tuple[str, str, str, str, str, str]) -> str:
    """``k/n``: in how many of the n seeds both runs finished the paired difference has the claimed sign."""
    diffs = _paired_differences(plan, condition)
    return f"{sum(d > 0 for d in diffs)}/{len(diffs)}" if diffs else "—"


def _paired_mean(plan: Plan, condition: tuple[str, str, str, str, str, str]) -> str:
    """Mean ± std over seeds of the paired difference, positive the claimed way (std from two seeds on)."""
    diffs = _paired_differences(plan, condition)
    if not diffs:
        return "—"
    mean = statistics.fmean(diffs)
    return f"{mean:+.3f}" if len(diffs) == 1 else f"{mean:+.3f} ± {statistics.stdev(diffs):.3f}"


def _verdict(checks: list[bool | None]) -> str:
    """``True``: as claimed, ``False``: clearly against it, ``None``: within noise or missing."""
    if any(check is False for check in checks):
        return "does not hold"
    if any(check is None for check in checks):
        return "unclear"
    return "holds"


def claim_lines(plan: Plan) -> list[str]:
    planned = {run.spec.slug for run in plan.runs}
    lines = [
        "## The paper's claims on our numbers",
        "",
        f"Ours: a difference counts when it exceeds the seeds' spread (sqrt of the summed variances) and "
        f"{NOISE_FLOOR} ({SINGLE_SEED_FLOOR} with a single seed); otherwise the claim is *unclear*. "
        "Seeds agreeing: per comparison of the claim, in how many seeds the paired difference (same training "
        "seed) points the claimed way. Paired difference: its mean ± std over seeds, positive the claimed "
        "way (the seeds' shared part cancels in it, so its std can be far below the spread above).",
        "",
        "| Claim | paper | ours | seeds agreeing | paired difference |",
        "|---|---|---|---|---|",
    ]
    shown = 0
    for text, conditions in CLAIMS:
        if not all(c[0] in planned and c[4] in planned for c in conditions):
            continue
        paper_checks: list[bool | None] = []
        our_checks: list[bool | None] = []
        for run, use, metric, op, other, other_use in conditions:
            sign = 1.0 if op == ">" else -1.0
            a, b = _paper_value(run, use, metric), _paper_value(other, other_use, metric)
            paper_checks.append(None if a is None or b is None else sign * (a - b) > 0)
            x, y = _our_cell(plan, run, use, metric), _our_cell(plan, other, other_use, metric)
            if x is None or y is None:
                our_checks.append(None)
                continue
            floor = SINGLE_SEED_FLOOR if x.std is None or y.std is None else NOISE_FLOOR
            noise = max(math.hypot(x.std or 0.0, y.std or 0.0), floor)
            diff = sign * (x.mean - y.mean)
            our_checks.append(None if abs(diff) <= noise else diff > 0)
        agreeing = ", ".join(_seeds_agreeing(plan, condition) for condition in conditions)
        paired = ", ".join(_paired_mean(plan, condition) for condition in conditions)
        verdicts = f"{_verdict(paper_checks)} | {_verdict(our_checks)}"
        lines.append(f"| {text} | {verdicts} | {agreeing} | {paired} |")
        shown += 1
    return lines + [""] if shown else []


# --- the trade-off plot ------------------------------------------------------------------------------


def tradeoff_points(plan: Plan) -> list[Path]:
    """One evaluation-style ``summary.json`` per planned row (mean, mean ± std as the interval) under
    ``OUT/points/``, the input :func:`cgrpo.eval.analyses.tradeoff_analysis` plots."""
    from cgrpo.reproduce.plan import TABLES

    rows: dict[tuple[str, str], str] = {}
    for number in plan.tables:
        for row in TABLES[number].rows:
            label = "base" if row.use == "base" else row.run
            rows.setdefault((row.run, row.use), label)
    paths = []
    for (run, use), label in rows.items():
        cells = row_values(plan, Row(label, run, {}, use=use))  # type: ignore[arg-type]
        if not all(cell.n for cell in cells.values()):
            continue
        metrics = {}
        for metric, cell in cells.items():
            spread = cell.std or 0.0
            metrics[metric] = {"mean": cell.mean, "ci_low": cell.mean - spread, "ci_high": cell.mean + spread}
        path = plan.out / "points" / label
        atomic_write_json(path / "summary.json", {"method": label, "metrics": metrics})
        paths.append(path)
    return paths


def budget_line(plan: Plan) -> str:
    """What one GRPO run of the plan trains, and the world version its data says (results of different
    versions must never be compared)."""
    grpo = [run for run in plan.runs if run.kind == "grpo"]
    if not grpo:
        return "No GRPO run in this plan."
    main = next((run for run in grpo if run.spec.slug == MAIN), grpo[0])
    train, data = main.config["train"], main.config["data"]
    line = (
        f"Each GRPO run: {train['iterations']} iterations x {train['prompts_per_iteration']} prompts x "
        f"G = {train['group_size']}, {train['train_steps']} trained denoising steps per sample; SFT and RPO "
        "get the same budget in trained (sample, step) terms."
    )
    version = data.get("options", {}).get("version")
    return line + (f" World version {version} (`data.options.version`)." if version is not None else "")


def write_report(plan: Plan, outcome: Any | None = None) -> Path:
    """Write ``OUT/report.md`` (and ``OUT/tradeoff.png`` when two or more rows have numbers)."""
    from cgrpo.reproduce.plan import TABLES

    out = plan.out
    id_name, prompt_name = metric_names(plan)
    finished = sum(run.finished for run in plan.runs)
    lines = [
        f"# Reproduction of Customized-GRPO, Tables {', '.join(map(str, plan.tables))} — {plan.world} world",
        "",
        f"Profile `{plan.profile.name}`: {len(plan.seeds)} seed(s), {len(plan.runs)} runs "
        f"({finished} finished). Ours: held-out rewards of the trained policy, mean ± std over seeds "
        f"(`{id_name}` and `{prompt_name}`). Paper: DreamBench numbers as published (arXiv 2510.18263).",
    ]
    lines += ["", budget_line(plan)]
    if plan.profile.heldout is not None:
        from cgrpo.reproduce.heldout import describe

        lines += ["", describe(plan.profile.heldout)]
    if plan.world == "mini":
        lines += [
            "",
            "The mini world's rewards are pixel-level analogues of DINO-Seg and HPSv3 on procedurally "
            "generated subjects, not the paper's metrics: compare directions and orderings, never values. "
            "CLIP-I and CLIP-T have no mini analogue.",
        ]
    if outcome is not None and getattr(outcome, "failed", None):
        lines += ["", "**Failed runs** (see `logs/`): " + ", ".join(sorted(outcome.failed))]
    lines.append("")
    for number in plan.tables:
        lines += table_lines(plan, TABLES[number])
    lines += claim_lines(plan)
    points = tradeoff_points(plan)
    if len(points) >= 2:
        from cgrpo.eval.analyses import tradeoff_analysis

        result = tradeoff_analysis(points, out, x="id", y="prompt", name="tradeoff")
        lines += [
            "## Identity vs prompt following",
            "",
            "![trade-off](tradeoff.png)",
            "",
            "Pareto front: " + ", ".join(f"`{label}`" for label in result["front"]),
            "",
        ]
    lines += ["## Runs", "", "| run | kind | seed | tables | finished |", "|---|---|---|---|---|"]
    for run in plan.runs:
        tables = ",".join(map(str, run.tables))
        done = "yes" if run.finished else "no"
        lines.append(f"| `{run.run_id}` | {run.kind} | {run.seed} | {tables} | {done} |")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
