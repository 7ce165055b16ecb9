"""The ``cgrpo`` command line. Heavy imports happen inside commands so that ``--help`` stays fast."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, ConsoleRenderable, Group
from rich.highlighter import ReprHighlighter
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text
from rich.theme import Theme

from cgrpo import __version__
from cgrpo.eval.mini import PRECISE_HELDOUT, HeldoutSet

app = typer.Typer(
    help="Customized-GRPO: RL post-training of subject-driven image generators (SARS + TDW).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()
err_console = Console(stderr=True)

Overrides = Annotated[
    list[str] | None, typer.Argument(help="Dotted config overrides, e.g. train.lr=1e-5 advantage.alpha=0.2")
]


def _version(value: bool) -> None:
    if value:
        console.print(f"cgrpo {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Customized-GRPO command line."""
    _show_library_notices()


class _AboveProgressBars:
    """stderr for rich, written through ``tqdm.write``: a notice never lands inside a progress bar's line."""

    def write(self, text: str) -> int:
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr, end="")
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class _MetricsHighlighter(ReprHighlighter):
    """rich's highlighting of numbers and paths, and the "step N" of a metrics line in bold."""

    highlights = [r"^(?P<step>step +)\d+  ", *ReprHighlighter.highlights]


class _Notices(RichHandler):
    """cgrpo's log records as the trainers printed them: the message alone, warnings in yellow."""

    def __init__(self) -> None:
        console = Console(file=_AboveProgressBars(), theme=Theme({"repr.step": "bold"}))
        super().__init__(console=console, highlighter=_MetricsHighlighter(), show_time=False, show_path=False)

    def render_message(self, record: logging.LogRecord, message: str) -> ConsoleRenderable:
        text = super().render_message(record, message)
        if isinstance(text, Text) and record.levelno >= logging.WARNING:
            text.stylize("yellow")
        return text

    def render(self, *, record, traceback, message_renderable) -> ConsoleRenderable:
        # No time/level/path columns: RichHandler's table would pad every line to the terminal's width.
        return message_renderable if traceback is None else Group(message_renderable, traceback)


def _show_library_notices() -> None:
    """The library's notices and metrics lines (``logging``, INFO and up) on stderr, once per process."""
    library = logging.getLogger("cgrpo")
    if not any(isinstance(handler, _Notices) for handler in library.handlers):
        library.addHandler(_Notices())
    library.setLevel(logging.INFO)


def _quiet_library_progress_bars() -> None:
    # "Loading weights" / "Writing model shards" bars from transformers and diffusers clutter run logs.
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _fail(message: str) -> None:
    from rich.markup import escape

    # soft_wrap: one line however narrow the terminal (scripts grep it); escape: paths may hold "[...]".
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=2)


ConfigPath = Annotated[Path, typer.Argument(help="YAML config, e.g. configs/mini/customized_grpo.yaml")]
OutputDir = Annotated[Path | None, typer.Option(help="Where logs, samples and checkpoints go.")]
Resume = Annotated[
    bool, typer.Option(help="Continue from the newest checkpoint in the output dir (fresh if there is none).")
]


def _run_recipe(
    kind: str, config: Path, overrides: list[str] | None, output_dir: Path | None, resume: bool, **options
) -> None:
    """Load ``kind``'s config and run its recipe (:mod:`cgrpo.train.recipe`); user errors exit 2."""
    import json

    from cgrpo.config import ConfigError
    from cgrpo.data.formats import DatasetError
    from cgrpo.train import recipe
    from cgrpo.train.components import TrainingError

    extra = list(overrides or [])
    if output_dir is not None:
        extra.append(f"output_dir={output_dir}")
    try:
        cfg = recipe.load_config(kind, config, extra)
    except ConfigError as error:
        _fail(str(error))
    _quiet_library_progress_bars()
    try:
        summary = recipe.get(kind).run(cfg, resume, **options)
    except (TrainingError, DatasetError, FileNotFoundError) as failure:  # reward down, disk full, bad data
        _fail(str(failure))
    console.print(f"final weights: {Path(cfg.output_dir) / 'final'}")
    if summary:
        console.print_json(json.dumps(summary))


@app.command()
def train(
    config: ConfigPath,
    overrides: Overrides = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many more iterations.")] = None,
    output_dir: OutputDir = None,
    resume: Resume = False,
) -> None:
    """Run Customized-GRPO (or a baseline/ablation config) with GRPO."""
    _run_recipe("grpo", config, overrides, output_dir, resume, max_steps=max_steps)


@app.command()
def sft(
    config: Annotated[Path, typer.Argument(help="YAML config, e.g. configs/mini/sft.yaml")],
    overrides: Overrides = None,
    output_dir: OutputDir = None,
    resume: Resume = False,
) -> None:
    """Supervised flow-matching fine-tuning (the SFT baseline and the mini world's base pretraining)."""
    _run_recipe("sft", config, overrides, output_dir, resume)


@app.command()
def rpo(
    config: Annotated[Path, typer.Argument(help="YAML config, e.g. configs/mini/rpo.yaml")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Dotted config overrides, e.g. train.beta=500 pairs.candidates=4"),
    ] = None,
    output_dir: OutputDir = None,
    resume: Resume = False,
) -> None:
    """RPO baseline (Table 2): offline preference pairs from the base policy, DPO + similarity loss."""
    _run_recipe("rpo", config, overrides, output_dir, resume)


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option(help="Where the run and its report go.")] = Path("runs/demo"),
    steps: Annotated[int | None, typer.Option(help="GRPO iterations (default: the config's).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the run.")] = 0,
    config: Annotated[Path | None, typer.Option(help="Another config than the packaged demo.")] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            help="Also train this config (a file, or a packaged mini config such as naive_1to1) at the same "
            "time in a second process, one core each, and show it beside the demo in the report."
        ),
    ] = None,
    eval_subjects: Annotated[
        int,
        typer.Option(
            help="Held-out subjects the base and the trained policy are measured on after training (0: only "
            "the run's own held-out images)."
        ),
    ] = PRECISE_HELDOUT.num_subjects,
    eval_prompts_per_kind: Annotated[
        int, typer.Option(help="Prompts per kind of that final evaluation.")
    ] = PRECISE_HELDOUT.prompts_per_kind,
    eval_images_per_prompt: Annotated[
        int, typer.Option(help="Images per (subject, prompt) of that final evaluation.")
    ] = PRECISE_HELDOUT.images_per_prompt,
) -> None:
    """Customized-GRPO on the mini world from the committed base, then runs/demo/report.md."""
    from cgrpo.config import ConfigError
    from cgrpo.demo import run_demo

    _quiet_library_progress_bars()
    if eval_subjects < 0 or eval_prompts_per_kind < 1 or eval_images_per_prompt < 1:
        _fail("--eval-subjects must be at least 0, --eval-prompts-per-kind and --eval-images-per-prompt 1")
    heldout = None
    if eval_subjects > 0:
        heldout = HeldoutSet(eval_subjects, eval_prompts_per_kind, eval_images_per_prompt)
    try:
        report = run_demo(output_dir, steps, seed, config, compare, heldout)
    except (ConfigError, FileNotFoundError) as error:
        _fail(str(error))
    console.print(f"report: {report}")


@app.command("rewards")
def list_rewards() -> None:
    """List the registered rewards."""
    from cgrpo import rewards

    _print_registry("reward", rewards.describe())


@app.command("policies")
def list_policies() -> None:
    """List the registered policies (backbones)."""
    from cgrpo import policy

    _print_registry("policy", policy.describe())


def _print_registry(kind: str, entries: dict[str, str]) -> None:
    table = Table(kind, "description")
    for name, help_text in entries.items():
        table.add_row(name, help_text)
    console.print(table)


def _add_subcommands() -> None:
    # Sub-apps live next to their code; each is optional so a partial install still gives a working CLI.
    import importlib

    for module, name, help_text in (
        (
            "cgrpo.humaneval.cli",
            "humaneval",
            "Pairwise human-evaluation study: pairs, server, invites, export.",
        ),
        ("cgrpo.data_cli", "data", "Datasets: validate, import DreamBench/SynCD, filter by reward."),
    ):
        try:
            sub = importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name and error.name.startswith("cgrpo"):
                continue
            raise
        app.add_typer(sub.app, name=name, help=help_text)


_add_subcommands()


def _add_real_backbone_commands() -> None:
    from cgrpo.export import export_command
    from cgrpo.sample import sample_command

    app.command("sample")(sample_command)
    app.command("export")(export_command)


def _add_bench() -> None:
    from cgrpo.bench import bench_command

    app.command("bench")(bench_command)


def _add_baselines() -> None:
    from cgrpo.reproduce.cli import reproduce_command

    app.command("reproduce")(reproduce_command)


_add_baselines()


_add_bench()


_add_real_backbone_commands()


def _add_evaluation() -> None:
    from cgrpo.eval.cli import analyze_app, eval_app, report

    app.add_typer(
        eval_app, name="eval", help="Evaluate a policy: DreamBench (paper metrics) or the mini world."
    )
    app.add_typer(
        analyze_app, name="analyze", help="The paper's analyses: conflict, frequency, trade-off, correlation."
    )
    app.command("report")(report)


_add_evaluation()


if __name__ == "__main__":
    app()
