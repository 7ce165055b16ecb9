"""``cgrpo report``: one Markdown + HTML report over training runs and evaluation directories.

Per training run: base vs trained held-out rewards (``summary.json``), reward curves and the conflict rate
(:mod:`cgrpo.plots`, from ``metrics.jsonl``), the quadrant analysis when advantages were logged, the first and
last held-out sample grids, the tables of evaluation directories found inside the run, and any analysis
figure already written into the run folder (``frequency.png``, ``tradeoff.png``, ``correlation.md``).
Per evaluation directory: its ``table.md`` and ``samples.png``. With several inputs: a comparison table and
the identity-vs-prompt trade-off plot with its Pareto front. Figures are copied next to the report, so the
report folder is self-contained. HTML comes from the ``markdown`` package (its ``tables`` extension).
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

from cgrpo.eval.analyses import conflict_analysis, read_jsonl, tradeoff_analysis
from cgrpo.eval.runner import format_interval
from cgrpo.io import atomic_write_text

ANALYSIS_FIGURES = ("frequency.png", "frequency_progression.png", "tradeoff.png", "correlation.png")


def kind_of(path: Path) -> str:
    """``"run"`` (a training run), ``"eval"`` (an evaluation directory); raises for anything else."""
    summary = _summary(path)
    if "metrics" in summary:
        return "eval"
    if (path / "metrics.jsonl").is_file() or "base" in summary:
        return "run"
    raise FileNotFoundError(
        f"{path} is neither a training run (metrics.jsonl, summary.json) nor an evaluation directory "
        "(summary.json from `cgrpo eval`)"
    )


def _summary(path: Path) -> dict[str, Any]:
    file = path / "summary.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and math.isfinite(value) else "–"


def _copy(source: Path, target_dir: Path, name: str | None = None) -> str:
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / (name or source.name)
    shutil.copyfile(source, target)
    return target.name


def eval_history(run: Path) -> list[dict[str, Any]]:
    """Held-out evaluations of a run: ``final/eval_history.json`` if written, else the base (``summary.json``)
    and every ``eval/*`` record of ``metrics.jsonl``."""
    file = run / "final" / "eval_history.json"
    if file.is_file():
        return json.loads(file.read_text())
    history = []
    base = _summary(run).get("base")
    if base:
        history.append({"step": 0, "metrics": base})
    metrics = run / "metrics.jsonl"
    for record in read_jsonl(metrics) if metrics.is_file() else []:
        values = {k[5:]: v for k, v in record.items() if k.startswith("eval/")}
        if values:
            history.append({"step": record["step"], "metrics": values})
    return history


def _run_method(run: Path) -> str:
    config = run / "config.yaml"
    if config.is_file():
        import yaml

        data = yaml.safe_load(config.read_text()) or {}
        if isinstance(data, dict) and data.get("method"):
            return str(data["method"])
    return run.name


def _loss_curve(records: list[dict[str, Any]], path: Path) -> Path | None:
    """A plain loss-per-step figure (``loss`` or ``train/loss``), or None when the run logged no loss."""
    from cgrpo.eval.analyses import plt, save_figure

    key = next((k for k in ("loss", "train/loss") if any(k in r for r in records)), None)
    if key is None:
        return None
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float) and "step" in r]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot([p[0] for p in points], [p[1] for p in points], color="C0")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_yscale("log" if points and min(p[1] for p in points) > 0 else "linear")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _base_trained_table(summary: dict[str, Any]) -> list[str]:
    base, trained = summary.get("base", {}), summary.get("trained", {})
    keys = [k for k in ("id", "prompt") if k in base or k in trained]
    keys += sorted(k for k in set(base) | set(trained) if k not in keys)
    lines = ["| held-out metric | base | trained | change |", "|---|---:|---:|---:|"]
    for key in keys:
        b, t = base.get(key), trained.get(key)
        change = f"{t - b:+.4f}" if isinstance(b, int | float) and isinstance(t, int | float) else "–"
        lines.append(f"| {key} | {_fmt(b)} | {_fmt(t)} | {change} |")
    return lines


def _strip_title(markdown: str) -> str:
    """A ``table.md`` without its ``# title`` line (the report gives its own heading)."""
    return re.sub(r"\A# .*\n+", "", markdown)


def _eval_dirs_inside(run: Path) -> list[Path]:
    found = []
    for summary in sorted(run.glob("*/summary.json")) + sorted(run.glob("*/*/summary.json")):
        if "metrics" in _summary(summary.parent) and summary.parent.resolve() != run.resolve():
            found.append(summary.parent)
    return found


def run_section(run: Path, root: Path, target: Path, name: str) -> list[str]:
    """Markdown lines of one training run; figures go to ``target`` (inside the report folder ``root``)."""
    from cgrpo import plots

    rel = target.relative_to(root).as_posix()

    summary = _summary(run)
    lines = [f"## Run `{name}`", "", f"Method `{_run_method(run)}`, folder `{run}`.", ""]
    if summary.get("base") or summary.get("trained"):
        lines += ["Held-out rewards, base vs trained (same subjects, prompts and seeds):", ""]
        lines += _base_trained_table(summary) + [""]
    records = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    if records:
        target.mkdir(parents=True, exist_ok=True)
        lines += [f"Trained for {records[-1].get('step', len(records))} iterations.", ""]
        if any("reward/id" in r for r in records):
            plots.reward_curves(records, eval_history(run), target / "reward_curves.png")
            lines += ["### Rewards over training", "", f"![reward curves]({rel}/reward_curves.png)", ""]
        elif _loss_curve(records, target / "loss.png"):  # SFT and other runs without rewards
            lines += ["### Loss over training", "", f"![loss]({rel}/loss.png)", ""]
        try:
            conflict = conflict_analysis(run, target)
        except ValueError:
            conflict = None
        if conflict:
            lines += ["### Reward conflict (Fig. 7)", ""]
            if "training" in conflict:
                tr = conflict["training"]
                lines.append(
                    f"Mean conflict rate {tr['mean']:.1%} (first 10% of iterations "
                    f"{tr['first_10pct_mean']:.1%}, "
                    f"last 10% {tr['last_10pct_mean']:.1%}); the paper measured 50.2% on UNO."
                )
            if "quadrants" in conflict:
                q = conflict["quadrants"]
                shares = ", ".join(f"{k.replace('_', ' ')} {v:.1%}" for k, v in q["shares"].items() if v)
                lines.append(f"Quadrants over {q['n_samples']} logged samples: {shares}.")
            lines += ["", f"![conflict]({rel}/conflict.png)", ""]
    samples = run / "samples"
    grids = (
        sorted(samples.glob("eval-step-*.png")) or sorted(samples.glob("*.png")) if samples.is_dir() else []
    )
    if grids:
        lines += ["### Sample grids (held-out subjects, first and last)", ""]
        shown = [grids[0], grids[-1]] if len(grids) > 1 else grids
        for grid_file, label in zip(shown, ("first", "last"), strict=False):
            step = re.sub(r"\D", "", grid_file.stem).lstrip("0") or "0"
            copied = _copy(grid_file, target)
            lines += [f"{label} (iteration {step}):", "", f"![{label} samples]({rel}/{copied})", ""]
    for eval_dir in _eval_dirs_inside(run):
        lines += eval_section(eval_dir, root, target / eval_dir.name, f"{name}/{eval_dir.name}", level=3)
    for figure in ANALYSIS_FIGURES:
        if (run / figure).is_file():
            copied = _copy(run / figure, target)
            lines += [
                f"### {figure.removesuffix('.png').replace('_', ' ')}",
                "",
                f"![{figure}]({rel}/{copied})",
                "",
            ]
    if (run / "correlation.md").is_file():
        lines += [_strip_title((run / "correlation.md").read_text()).replace("\n# ", "\n### "), ""]
    return lines


def eval_section(path: Path, root: Path, target: Path, name: str, level: int = 2) -> list[str]:
    """Markdown lines of one evaluation directory (its table and sample grid)."""
    hashes = "#" * level
    lines = [f"{hashes} Evaluation `{name}`", "", f"Folder `{path}`.", ""]
    table = path / "table.md"
    if table.is_file():
        lines += [_strip_title(table.read_text()).strip(), ""]
    if (path / "samples.png").is_file():
        copied = _copy(path / "samples.png", target)
        lines += ["Reference | generated images (first prompt of each subject):", ""]
        lines += [f"![samples]({target.relative_to(root).as_posix()}/{copied})", ""]
    return lines


def comparison_lines(paths: list[Path], names: list[str]) -> list[str]:
    """Side-by-side numbers: base/trained id and prompt per run, means [CI] per evaluation."""
    lines = ["## Comparison", ""]
    runs = [(p, n) for p, n in zip(paths, names, strict=True) if kind_of(p) == "run"]
    evals = [(p, n) for p, n in zip(paths, names, strict=True) if kind_of(p) == "eval"]
    if runs:
        lines += [
            "| run | method | base id | trained id | Δ id | base prompt | trained prompt | Δ prompt |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for path, name in runs:
            s = _summary(path)
            b, t = s.get("base", {}), s.get("trained", {})
            cells = []
            for key in ("id", "prompt"):
                bv, tv = b.get(key), t.get(key)
                delta = (
                    f"{tv - bv:+.4f}" if isinstance(bv, int | float) and isinstance(tv, int | float) else "–"
                )
                cells += [_fmt(bv), _fmt(tv), delta]
            lines.append(
                f"| {name} | {_run_method(path)} | {cells[0]} | {cells[1]} | {cells[2]} | "
                f"{cells[3]} | {cells[4]} | {cells[5]} |"
            )
        lines.append("")
    if evals:
        lines += comparison_eval_table([p for p, _ in evals], [n for _, n in evals]) + [""]
    return lines


def comparison_eval_table(paths: list[Path], names: list[str] | None = None) -> list[str]:
    """Table 1's layout over several evaluation directories: one row per method, overall means [95% CI]."""
    summaries = [_summary(p) for p in paths]
    metrics = list(dict.fromkeys(m for s in summaries for m in s.get("metrics", {})))
    labels = {m: l for s in summaries for m, l in s.get("labels", {}).items()}
    lines = [
        "| Method | Images | " + " | ".join(f"{labels.get(m, m)} ↑" for m in metrics) + " |",
        "|---|---:|" + "---:|" * len(metrics),
    ]
    for index, summary in enumerate(summaries):
        label = summary.get("method") or (names[index] if names else paths[index].name)
        cells = " | ".join(format_interval(summary["metrics"].get(m, {})) for m in metrics)
        lines.append(f"| {label} | {summary.get('n_images', '–')} | {cells} |")
    return lines


def to_html(markdown_text: str, title: str) -> str:
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"])
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
        "th,td{border:1px solid #ccc;padding:4px 8px}th{background:#f3f3f3}"
        "td:not(:first-child){text-align:right}img{max-width:100%}code{background:#f3f3f3;padding:0 3px}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n{body}\n</body></html>\n"
    )


def write_report(paths: list[str | Path], out: str | Path, title: str = "Customized-GRPO report") -> Path:
    """Write ``out/report.md`` and ``out/report.html`` over ``paths`` (runs and/or evaluation folders)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("name at least one run or evaluation directory")
    kinds = [kind_of(p) for p in paths]
    names: list[str] = []
    for path in paths:
        name = path.name or str(path)
        while name in names:
            name = f"{name}_{len(names)}"
        names.append(name)
    lines = [f"# {title}", ""]
    lines += [f"Inputs: {', '.join(f'`{n}` ({k})' for n, k in zip(names, kinds, strict=True))}.", ""]
    if len(paths) > 1:
        lines += comparison_lines(paths, names)
        # Runs (held-out id/prompt rewards) and evaluations (benchmark metrics) are on different scales.
        for kind, name, heading in (
            ("run", "tradeoff", "Identity vs prompt trade-off of the runs (held-out rewards)"),
            ("eval", "tradeoff_eval", "Identity vs prompt trade-off of the evaluations"),
        ):
            group = [p for p, k in zip(paths, kinds, strict=True) if k == kind]
            if len(group) > 1:
                lines += _tradeoff_lines(group, out, name, heading)
    for path, name, kind in zip(paths, names, kinds, strict=True):
        target = out / _safe(name)
        if kind == "run":
            lines += run_section(path, out, target, name)
        else:
            lines += eval_section(path, out, target, name)
    text = "\n".join(lines).rstrip() + "\n"
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.html", to_html(text, title))
    return out / "report.md"


def _tradeoff_lines(paths: list[Path], out: Path, name: str, heading: str) -> list[str]:
    try:
        tradeoff = tradeoff_analysis(paths, out, name=name)
    except (KeyError, ValueError, FileNotFoundError) as error:
        return [f"### {heading}", "", f"(No trade-off plot: {error}.)", ""]
    front = ", ".join(f"`{label}`" for label in tradeoff["front"])
    axes = f"{', '.join(tradeoff['x_metric'])} vs {', '.join(tradeoff['y_metric'])}"
    return [f"### {heading}", "", f"{axes}; Pareto front: {front}.", "", f"![trade-off]({name}.png)", ""]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "input"
