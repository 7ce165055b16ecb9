"""``cgrpo reproduce``: plan, run and report the paper's Tables 2-5 (wired by ``cgrpo.cli``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def reproduce_command(
    world: Annotated[
        str, typer.Option(help="mini (CPU, runs here) or uno (GPU: writes configs/commands).")
    ] = "mini",
    tables: Annotated[str, typer.Option(help="Paper tables to reproduce, comma-separated.")] = "2,3,4,5",
    seeds: Annotated[int | None, typer.Option(help="Seeds per run (default: 3, --quick: 1).")] = None,
    quick: Annotated[
        bool, typer.Option(help="Short profile: 1 seed, fewer iterations (~20 min mini).")
    ] = False,
    out: Annotated[Path, typer.Option(help="Output folder: runs/, configs/, logs/, report.md.")] = Path(
        "reproduce"
    ),
    jobs: Annotated[
        int, typer.Option(help="Runs in parallel (one torch thread each); 1 = in this process.")
    ] = 2,
    iterations: Annotated[
        int | None, typer.Option(help="GRPO iterations per run (default: the profile's).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Print the plan and its estimated time, run nothing.")
    ] = False,
    run: Annotated[
        bool | None, typer.Option("--run/--no-run", help="Train (default: yes for mini, no for uno).")
    ] = None,
    grpo_config: Annotated[Path | None, typer.Option(help="Main GRPO config (default: the world's).")] = None,
    sft_config: Annotated[
        Path | None, typer.Option(help="SFT baseline config (default: the world's).")
    ] = None,
    rpo_config: Annotated[
        Path | None, typer.Option(help="RPO baseline config (default: the world's).")
    ] = None,
) -> None:
    """Reproduce the paper's ablation tables: every run once (resumable), then OUT/report.md."""
    from rich.console import Console
    from rich.markup import escape

    from cgrpo.config import ConfigError
    from cgrpo.reproduce.plan import build_plan

    console, errors = Console(), Console(stderr=True)
    try:
        plan = build_plan(
            world,
            tables,
            seeds=seeds,
            quick=quick,
            out=out,
            iterations=iterations,
            base_configs={"grpo": grpo_config, "sft": sft_config, "rpo": rpo_config},
        )
    except (ConfigError, ValueError, FileNotFoundError) as error:
        errors.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(code=2) from None
    print_plan(plan, jobs, console)
    if dry_run:
        return
    from cgrpo.reproduce.report import write_report
    from cgrpo.reproduce.runner import evaluate_heldout, execute, write_run_files

    write_run_files(plan)
    if not (run if run is not None else world == "mini"):
        report = write_report(plan)  # the runs finished so far (none on a fresh plan)
        finished = sum(r.finished for r in plan.runs)
        console.print(
            f"wrote {out / 'plan.json'}, {out / 'configs'}/ and {out / 'commands.sh'}; "
            f"train with `cgrpo reproduce --world {world} --run ...` (resumable) or the commands one by one; "
            f"report of the {finished} finished runs: {report}"
        )
        return

    def show(event: str, name: str, detail: str) -> None:
        style = {"start": "cyan", "done": "green", "skip": "dim", "fail": "bold red"}[event]
        console.print(f"[{style}]{event:5}[/] {name} {escape(detail)}")

    try:
        outcome = execute(
            plan, jobs=jobs, on_event=lambda event, run, detail: show(event, run.run_id, detail)
        )
        failed = evaluate_heldout(plan, jobs=jobs, on_event=show)
        outcome.failed.update({f"held-out evaluation of {name}": reason for name, reason in failed.items()})
    except KeyboardInterrupt:
        report = write_report(plan)
        errors.print(
            "interrupted: finished runs are kept, checkpoints let the same command resume the others; "
            f"report of the finished runs: {report}"
        )
        raise typer.Exit(code=130) from None
    report = write_report(plan, outcome)
    console.print(
        f"{len(outcome.finished)} trained, {len(outcome.skipped)} already finished, "
        f"{len(outcome.failed)} failed; report: {report}"
    )
    if outcome.failed:
        raise typer.Exit(code=1)


def print_plan(plan, jobs: int, console) -> None:
    """The runs, which tables use them, their estimated time, and the total for ``jobs`` workers."""
    from rich.table import Table as RichTable

    from cgrpo.reproduce.plan import estimate_seconds, makespan

    table = RichTable(title=f"cgrpo reproduce — {plan.world} world, profile {plan.profile.name}")
    table.add_column("run", no_wrap=True)
    for column in ("kind", "seed", "tables", "budget", "est.", "status"):
        table.add_column(column)
    remaining = []
    unknown = False
    for run in plan.runs:
        seconds = estimate_seconds(run)
        unknown |= seconds is None
        if not run.finished:
            remaining.append(seconds or 0.0)
        budget = _budget(run.kind, run.config)
        table.add_row(
            run.run_id,
            run.kind,
            str(run.seed),
            ",".join(map(str, run.tables)),
            budget,
            "?" if seconds is None else f"{seconds / 60:.1f} min",
            "finished" if run.finished else "to run",
        )
    console.print(table)
    if unknown:
        console.print(
            f"{len(remaining)} of {len(plan.runs)} runs to train; no time estimate for this world "
            "(measure one iteration on your GPU, e.g. `cgrpo bench`)"
        )
    else:
        evaluations = _heldout_remaining(plan)
        total = makespan(remaining, jobs) + makespan(evaluations, jobs)
        evaluated = f" and {len(evaluations)} held-out evaluations" if evaluations else ""
        one_core = (sum(remaining) + sum(evaluations)) / 3600
        console.print(
            f"{len(remaining)} of {len(plan.runs)} runs to train{evaluated}: ~{one_core:.2f} h on one core, "
            f"~{total / 3600:.2f} h with --jobs {jobs} (estimate for a quiet machine)"
        )


def _heldout_remaining(plan) -> list[float]:
    """Estimated seconds of each held-out evaluation still to run (the base and every run not evaluated)."""
    from cgrpo.reproduce.heldout import evaluated
    from cgrpo.reproduce.plan import heldout_seconds

    if plan.profile.heldout is None:
        return []
    todo = [run for run in [None, *plan.runs] if not evaluated(plan, run)]
    return [heldout_seconds(plan.profile.heldout)] * len(todo)


def _budget(kind: str, c: dict) -> str:
    if kind == "grpo":
        t = c["train"]
        return f"{t['iterations']} it x {t['prompts_per_iteration']}x{t['group_size']}"
    if kind == "sft":
        return f"{c['optim']['steps']} steps x {c['optim']['batch_size']}"
    return f"{c['pairs']['prompts']}x{c['pairs']['candidates']} cand., {c['train']['steps']} steps"
