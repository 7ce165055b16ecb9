"""``cgrpo data ...``: validate a dataset, import DreamBench / SynCD, filter pairs by reward.

Output is plain text (``typer.echo``) so that ``FILE:LINE: message`` lines are never re-wrapped or read
as markup, and stay greppable. Exit status 1 means the dataset (or the command's input) has a problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)

ImageSizeOption = Annotated[
    int | None,
    typer.Option("--image-size", help="Required square size in pixels: smaller images are errors."),
]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


@app.command()
def validate(
    path: Annotated[Path, typer.Argument(help="A JSONL file or a folder of subjects.")],
    image_size: ImageSizeOption = None,
    split: Annotated[str | None, typer.Option(help="Only this split (see docs/datasets.md).")] = None,
    warnings: Annotated[bool, typer.Option("--warnings/--no-warnings", help="Print warnings too.")] = True,
) -> None:
    """Check every record and image of a dataset; list every problem as FILE:LINE: message."""
    from cgrpo.data.formats import DatasetError
    from cgrpo.data.validate import check_dataset

    try:
        report = check_dataset(path, image_size, split=split)
    except DatasetError as error:
        _fail(str(error))
    if warnings:
        for problem in report.warnings:
            typer.echo(f"warning: {problem}")
    for problem in report.errors:
        typer.echo(f"error: {problem}", err=True)
    summary = (
        f"{report.source}: {report.records} records, {report.images} images, "
        f"{len(report.errors)} errors, {len(report.warnings)} warnings"
    )
    if report.errors:
        typer.echo(f"INVALID {summary}", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"OK {summary}")


@app.command("import-dreambench")
def import_dreambench_command(
    root: Annotated[Path, typer.Argument(help="DreamBench folder with prompts_and_classes.txt.")],
    out: Annotated[Path, typer.Argument(help="JSONL file to write.")],
    subject: Annotated[list[str] | None, typer.Option(help="Only these subjects (repeatable).")] = None,
    prompts_per_subject: Annotated[
        int | None, typer.Option(help="Keep this many prompts per subject, evenly spaced (default: all 25).")
    ] = None,
    unique_token: Annotated[
        str, typer.Option(help="DreamBooth's token before the class, e.g. 'sks' (default: none).")
    ] = "",
) -> None:
    """Convert DreamBench into a JSONL dataset (one record per subject and prompt)."""
    from cgrpo.data.dreambench import dreambench_examples
    from cgrpo.data.formats import DatasetError, write_jsonl

    try:
        items = dreambench_examples(root, subject or None, prompts_per_subject, unique_token)
    except (DatasetError, ValueError) as error:
        _fail(str(error))
    write_jsonl([item.to_record() for item in items], out)
    live = len({item.subject for item in items if item.category == "live"})
    subjects = len({item.subject for item in items})
    typer.echo(
        f"wrote {out}: {len(items)} records, {subjects} subjects ({live} live, {subjects - live} objects)"
    )


@app.command("import-syncd")
def import_syncd_command(
    root: Annotated[Path, typer.Argument(help="SynCD folder (ROOT[/SHARD]/*metadata*.json + images).")],
    out: Annotated[Path, typer.Argument(help="JSONL file to write.")],
    pairs: Annotated[
        str, typer.Option(help="'all' ordered pairs of an item's images, or 'first' only.")
    ] = "all",
    default_class: Annotated[
        str, typer.Option(help="Class when SynCD names none (rigid objects).")
    ] = "object",
    skip_missing: Annotated[bool, typer.Option(help="Skip missing images instead of failing.")] = False,
) -> None:
    """Convert SynCD into (reference, target, caption) pairs."""
    from cgrpo.data.formats import DatasetError, write_jsonl
    from cgrpo.data.syncd import read_syncd

    if pairs not in ("all", "first"):
        _fail(f"--pairs must be 'all' or 'first', got {pairs!r}")
    try:
        records = read_syncd(root, pairs, default_class, skip_missing)  # type: ignore[arg-type]
    except DatasetError as error:
        _fail(str(error))
    write_jsonl(records, out)
    typer.echo(f"wrote {out}: {len(records)} pairs of {len({r.subject for r in records})} subjects")


def parse_options(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["dino.model_path=/m", "hpsv3.device=cuda"]`` -> ``{"dino": {"model_path": "/m"}, ...}``.

    Values are read as YAML scalars (``8`` is an int, ``true`` a bool), anything else stays a string.
    """
    import yaml

    options: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        reward, dot, name = key.rpartition(".")
        if not sep or not dot or not reward or not name:
            raise ValueError(f"--option {item!r}: expected REWARD.KEY=VALUE, e.g. dino.device=cuda")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        options.setdefault(reward, {})[name] = value
    return options


@app.command("filter")
def filter_command(
    dataset: Annotated[Path, typer.Argument(help="JSONL file (or folder) of pairs with targets.")],
    out: Annotated[Path, typer.Argument(help="JSONL file of the kept records.")],
    reward: Annotated[
        list[str], typer.Option(help="Reward to rank by (repeatable); meta.KEY reads a number from meta.")
    ],
    option: Annotated[
        list[str] | None, typer.Option(help="REWARD.KEY=VALUE build option (repeatable).")
    ] = None,
    keep_fraction: Annotated[float, typer.Option(help="Fraction of records to keep (rounded up).")] = 0.5,
    keep_count: Annotated[
        int | None, typer.Option(help="Keep exactly this many (overrides the fraction).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per reward call.")] = 16,
    score_target: Annotated[
        bool,
        typer.Option("--score-target/--score-reference", help="Score each target (default) or reference."),
    ] = True,
    image_size: Annotated[
        int | None, typer.Option(help="Pass tensors of this size to the rewards (default: PIL images).")
    ] = None,
    scores: Annotated[Path | None, typer.Option(help="Where scores.csv goes (default: beside OUT).")] = None,
    split: Annotated[str | None, typer.Option(help="Only this split of the dataset.")] = None,
) -> None:
    """Score every pair with the rewards, average their z-scores, keep the best fraction."""
    from rich.console import Console
    from rich.progress import Progress

    from cgrpo.data.formats import DatasetError
    from cgrpo.rewards.filter import filter_dataset

    try:
        options = parse_options(option)
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("scoring", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            result = filter_dataset(
                dataset,
                reward,
                options,
                keep_fraction,
                out,
                batch_size,
                score_target,
                keep_count=keep_count,
                image_size=image_size,
                scores_csv=scores,
                split=split,
                progress=progress,
            )
    except (DatasetError, ValueError, KeyError) as error:
        _fail(str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error))
    typer.echo(
        f"kept {result.kept} of {result.total} records -> {result.out_jsonl} (scores: {result.scores_csv})"
    )
    for name, count in result.non_finite.items():
        typer.echo(f"warning: reward '{name}' gave {count} non-finite score(s); those records were dropped")
