"""Runs a plan: every unfinished run once, in parallel one-thread subprocesses (or in this process).

A run is finished when its ``summary.json`` exists (every trainer writes it last). Every run goes through
the recipe contract (:mod:`cgrpo.train.recipe`) with ``resume=True``: an interrupted GRPO or SFT run
continues from its newest checkpoint, an RPO run reuses its cached preference pairs (``pairs.pt``) and
retrains. Each run's resolved config goes to
``OUT/configs/<run_id>.yaml``, its console output to ``OUT/logs/<run_id>.log``. When the profile has a
held-out set, :func:`evaluate_heldout` then evaluates the base and every finished run on it
(:mod:`cgrpo.reproduce.heldout`), skipping those already evaluated.

``python -m cgrpo.reproduce.runner SPEC.json`` runs one spec (``{"kind": ..., "config": {...}}``); that is
what the parallel workers execute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cgrpo.config import save_config
from cgrpo.io import atomic_write_json
from cgrpo.reproduce.plan import Plan, PlannedRun
from cgrpo.train import recipe
from cgrpo.train.logger import log_to_stderr


def run_spec(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) one training in this process; returns its summary."""
    return recipe.get(kind).run(recipe.from_dict(kind, config), resume=True)


def write_run_files(plan: Plan) -> Path:
    """``OUT/plan.json``, ``OUT/configs/<run_id>.yaml`` and ``OUT/commands.sh`` (the equivalent commands)."""
    out = plan.out
    (out / "configs").mkdir(parents=True, exist_ok=True)
    lines = [
        "#!/usr/bin/env bash",
        "# The plan's runs as single commands (cgrpo reproduce runs them itself).",
        "set -e",
    ]
    for run in plan.runs:
        path = out / "configs" / f"{run.run_id}.yaml"
        save_config(recipe.from_dict(run.kind, run.config), path)
        lines.append(f"{recipe.command(run.kind)} {path} --resume")
    (out / "commands.sh").write_text("\n".join(lines) + "\n")
    atomic_write_json(out / "plan.json", plan.to_json())
    return out / "plan.json"


@dataclass
class Outcome:
    finished: list[str] = field(default_factory=list)  # trained now
    skipped: list[str] = field(default_factory=list)  # finished before
    failed: dict[str, str] = field(default_factory=dict)  # run_id -> reason


def execute(
    plan: Plan,
    jobs: int = 2,
    threads: int = 1,
    on_event: Callable[[str, PlannedRun, str], None] | None = None,
) -> Outcome:
    """Run every unfinished run of ``plan``; ``jobs`` > 1 runs them in parallel subprocesses with
    ``threads`` torch threads each, ``jobs == 1`` runs them one after another in this process.

    ``on_event(event, run, detail)`` is told ``start``, ``done``, ``skip`` and ``fail``. A failed run does
    not stop the others; it is reported in the outcome (and its log)."""
    notify = on_event or (lambda *_: None)
    outcome = Outcome()
    (plan.out / "logs").mkdir(parents=True, exist_ok=True)
    (plan.out / "specs").mkdir(parents=True, exist_ok=True)
    pending = []
    for run in plan.runs:
        if run.finished:
            outcome.skipped.append(run.run_id)
            notify("skip", run, "")
        else:
            pending.append(run)
    if jobs <= 1:
        for run in pending:
            _run_here(run, plan.out, outcome, notify)
    else:
        _run_parallel(pending, plan.out, jobs, threads, outcome, notify)
    return outcome


def _run_here(run: PlannedRun, out: Path, outcome: Outcome, notify) -> None:
    notify("start", run, "")
    tic = time.perf_counter()
    try:
        run_spec(run.kind, run.config)
    except Exception as error:  # one failing run must not lose the others
        (out / "logs" / f"{run.run_id}.log").write_text(traceback.format_exc())
        outcome.failed[run.run_id] = f"{type(error).__name__}: {error}"
        notify("fail", run, outcome.failed[run.run_id])
        return
    outcome.finished.append(run.run_id)
    notify("done", run, f"{time.perf_counter() - tic:.0f} s")


def _run_parallel(
    pending: Sequence[PlannedRun], out: Path, jobs: int, threads: int, outcome: Outcome, notify
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["CGRPO_TORCH_THREADS"] = str(threads)
    by_id = {run.run_id: run for run in pending}
    tasks = []
    for run in pending:
        spec = out / "specs" / f"{run.run_id}.json"
        atomic_write_json(spec, {"kind": run.kind, "config": run.config})
        command = [sys.executable, "-m", "cgrpo.reproduce.runner", str(spec)]
        tasks.append((run.run_id, command, out / "logs" / f"{run.run_id}.log"))

    def ended(run_id: str, returncode: int, seconds: float) -> None:
        run = by_id[run_id]
        if returncode == 0 and run.finished:
            outcome.finished.append(run_id)
            notify("done", run, f"{seconds:.0f} s")
        else:
            reason = f"exit code {returncode}; see {out / 'logs' / f'{run_id}.log'}"
            outcome.failed[run_id] = reason
            notify("fail", run, reason)

    _process_pool(tasks, jobs, env, lambda run_id, pid: notify("start", by_id[run_id], f"pid {pid}"), ended)


def evaluate_heldout(
    plan: Plan, jobs: int = 2, on_event: Callable[[str, str, str], None] | None = None
) -> dict[str, str]:
    """Run the plan's pending held-out evaluations (:mod:`cgrpo.reproduce.heldout`), ``jobs`` at a time in
    one-thread subprocesses; returns ``{name: reason}`` of those that failed (the others are kept).

    ``on_event(event, name, detail)`` is told ``start``, ``done`` and ``fail``."""
    from cgrpo.reproduce.heldout import pending

    notify = on_event or (lambda *_: None)
    logs = plan.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tasks = [(name, command, logs / f"heldout-{name}.log") for name, command in pending(plan)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    failed: dict[str, str] = {}

    def ended(name: str, returncode: int, seconds: float) -> None:
        if returncode == 0:
            notify("done", name, f"held-out evaluation, {seconds:.0f} s")
        else:
            failed[name] = f"exit code {returncode}; see {logs / f'heldout-{name}.log'}"
            notify("fail", name, failed[name])

    _process_pool(tasks, jobs, env, lambda name, pid: notify("start", name, "held-out evaluation"), ended)
    return failed


def _process_pool(
    tasks: Sequence[tuple[str, list[str], Path]],
    jobs: int,
    env: dict[str, str],
    on_start: Callable[[str, int], None],
    on_end: Callable[[str, int, float], None],
) -> None:
    """Run ``(name, command, log file)`` tasks, ``jobs`` at a time, each appending its output to its log;
    ``on_start(name, pid)``, ``on_end(name, returncode, seconds)``."""
    queue = list(tasks)
    active: dict[subprocess.Popen, tuple[str, float, Any]] = {}
    try:
        while queue or active:
            while queue and len(active) < max(1, jobs):
                name, command, log_path = queue.pop(0)
                log = open(log_path, "a")  # noqa: SIM115 - closed when it ends
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                active[process] = (name, time.perf_counter(), log)
                on_start(name, process.pid)
            time.sleep(0.5)
            for process in [p for p in active if p.poll() is not None]:
                name, started, log = active.pop(process)
                log.close()
                on_end(name, process.returncode, time.perf_counter() - started)
    finally:  # interrupted (Ctrl-C): stop our workers; checkpoints and eval folders let the next call resume
        for process in active:
            process.terminate()
        for process, (_, _, log) in active.items():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cgrpo.reproduce.runner SPEC.json``: one run, in this process."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m cgrpo.reproduce.runner SPEC.json", file=sys.stderr)
        return 2
    threads = int(os.environ.get("CGRPO_TORCH_THREADS", "0"))
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    log_to_stderr()  # the run's notices and metrics lines go to its log file
    spec = json.loads(Path(args[0]).read_text())
    run_spec(spec["kind"], spec["config"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
