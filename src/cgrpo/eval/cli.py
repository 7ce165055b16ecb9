"""Typer commands: ``cgrpo eval ...`` (:data:`eval_app`), ``cgrpo analyze ...`` (:data:`analyze_app`) and
``cgrpo report`` (:func:`report`). Heavy imports happen inside the commands so that ``--help`` stays fast."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from cgrpo.eval.runner import EvalTask, GenerationSettings

eval_app = typer.Typer(
    help="Evaluate a policy: DreamBench (the paper's Table 1) or the mini world.", no_args_is_help=True
)
analyze_app = typer.Typer(
    help="Analyses: reward conflict, frequency of denoising, trade-off, reward-human correlation.",
    no_args_is_help=True,
)
console = Console()
err_console = Console(stderr=True)

PolicyOptions = Annotated[
    list[str] | None,
    typer.Option(
        "--policy-option", "-P", help="Policy factory option key=value (repeatable), e.g. path=/models/uno."
    ),
]
Lora = Annotated[Path | None, typer.Option(help="LoRA adapter folder, or a training run (uses its final/).")]
MetricOptions = Annotated[
    list[str] | None,
    typer.Option(
        "--metric-option",
        "-M",
        help="Metric option metric.key=value (repeatable), e.g. dino.path=/models/dino.",
    ),
]


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can fix (bad paths, names, values) into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from cgrpo.config import ConfigError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, FileNotFoundError, KeyError, ValueError) as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
            err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


def _device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _split(values: list[str] | None) -> list[str] | None:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``; None/empty stays None."""
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _settings(
    policy: str, policy_option: list[str] | None, lora: Path | None, steps: int, shift, seed, ref_size
):
    from cgrpo.eval.metrics import parse_options
    from cgrpo.eval.runner import GenerationSettings, resolve_lora

    return GenerationSettings(
        policy=policy,
        policy_options=parse_options(policy_option, "--policy-option"),
        lora=str(resolve_lora(lora)) if lora else None,
        steps=steps,
        shift=shift,
        seed=seed,
        reference_size=ref_size,
    )


def _metrics(metrics: str, metric_option: list[str] | None) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """``--metrics`` and ``--metric-option`` -> the metric names and each one's options."""
    from cgrpo.eval.metrics import parse_metric_list, parse_metric_options

    names = parse_metric_list(metrics)
    return names, parse_metric_options(metric_option, names)


def _benchmark(
    task: EvalTask,
    out: Path,
    settings: GenerationSettings,
    metrics: tuple[list[str], dict[str, dict[str, Any]]],
    title: str,
    device: str | None,
    **options: Any,
) -> dict[str, Any]:
    """Generate and score ``task`` with ``metrics`` (from :func:`_metrics`), then print the summary; returns
    it. The table's title is ``title`` and the method (``--method``, else the policy)."""
    from cgrpo.eval.runner import run_benchmark

    names, metric_options = metrics
    method = options.get("method") or settings.policy
    summary = run_benchmark(
        task,
        out,
        settings,
        names,
        metric_options,
        device=_device(device),
        title=f"{title}: {method}",
        **options,
    )
    _print_summary(summary, out)
    return summary


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    from cgrpo.eval.runner import format_interval

    table = Table("group", "images", *(summary["labels"].get(m, m) for m in summary["metrics"]))
    for name, group in sorted(summary["per_category"].items()):
        table.add_row(
            name, str(group["n_images"]), *(format_interval(group["metrics"][m]) for m in summary["metrics"])
        )
    table.add_row(
        "[bold]overall[/]",
        str(summary["n_images"]),
        *(format_interval(s) for s in summary["metrics"].values()),
    )
    console.print(table)
    console.print(f"wrote {out / 'scores.csv'}, {out / 'summary.json'}, {out / 'table.md'}")


@eval_app.command("dreambench")
@_user_errors
def eval_dreambench(
    out: Annotated[
        Path, typer.Option(help="Output folder (resumable: finished images and scores are reused).")
    ],
    policy: Annotated[str, typer.Option(help="Registered policy, e.g. uno or mini.")] = "uno",
    policy_option: PolicyOptions = None,
    lora: Lora = None,
    images_per_prompt: Annotated[
        int, typer.Option(help="Images per (subject, prompt); the paper uses 4.")
    ] = 4,
    subjects: Annotated[
        list[str] | None, typer.Option(help="Only these subjects (comma-separated or repeated).")
    ] = None,
    prompts_per_subject: Annotated[
        int | None, typer.Option(help="Only the first N prompts of each subject.")
    ] = None,
    metrics: Annotated[
        str, typer.Option(help="Comma-separated metrics (registered rewards).")
    ] = "dino,clip_i,clip_t,hpsv3",
    metric_option: MetricOptions = None,
    dreambench_root: Annotated[
        Path | None,
        typer.Option(help="DreamBench folder (default: $CGRPO_DREAMBENCH or shared/data/dreambench)."),
    ] = None,
    steps: Annotated[int, typer.Option(help="ODE sampling steps.")] = 25,
    shift: Annotated[
        float | None,
        typer.Option(help="Static sigma shift (default: the policy's own schedule, e.g. UNO's 1.583)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Base seed; each image's seed derives from it.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images generated per forward pass.")] = 4,
    score_batch_size: Annotated[int, typer.Option(help="Images scored per metric call.")] = 16,
    device: Annotated[str | None, typer.Option(help="Policy device (default: cuda if available).")] = None,
    method: Annotated[
        str | None, typer.Option(help="Row label in tables (default: policy[+LoRA name]).")
    ] = None,
    unique_token: Annotated[
        str, typer.Option(help="DreamBooth's unique token in prompts (default none).")
    ] = "",
    reference_index: Annotated[int, typer.Option(help="Which photo of a subject conditions the policy.")] = 0,
    identity_references: Annotated[
        str,
        typer.Option(
            help="'reference': identity metrics vs the conditioning photo; 'all': mean over photos."
        ),
    ] = "reference",
    reference_size: Annotated[
        int | None,
        typer.Option(
            help="Square references of this side (default: the policy's own preprocessing, e.g. UNO's "
            "aspect-kept long side 512)."
        ),
    ] = None,
    ci_seed: Annotated[int, typer.Option(help="Seed of the bootstrap intervals.")] = 0,
    multi: Annotated[
        bool,
        typer.Option(
            "--multi",
            help="The multi-subject track (UNO's 30 subject pairs x 25 prompts): conditioned on both "
            "references, identity scored against each.",
        ),
    ] = False,
    pairs: Annotated[
        list[str] | None,
        typer.Option(
            help="With --multi: only these subject pairs, e.g. cat+dog (comma-separated or repeated)."
        ),
    ] = None,
    multi_protocol: Annotated[
        Path | None,
        typer.Option(
            help="With --multi: the protocol JSON (default: multi_subject.json in the DreamBench folder)."
        ),
    ] = None,
) -> None:
    """DreamBench: 30 subjects x 25 prompts x N images, scored with DINO, CLIP-I, CLIP-T and HPS-v3; with
    --multi, its multi-subject track (30 pairs x 25 prompts, each image scored against both references)."""
    from cgrpo.eval.dreambench import dreambench_task

    chosen = _metrics(metrics, metric_option)
    settings = _settings(policy, policy_option, lora, steps, shift, seed, reference_size)
    if multi:
        _dreambench_multi(
            out,
            settings,
            chosen,
            device,
            dreambench_root=dreambench_root,
            protocol=multi_protocol,
            pairs=_split(pairs),
            prompts_per_pair=prompts_per_subject,
            subjects=subjects,
            identity_references=identity_references,
            images_per_prompt=images_per_prompt,
            batch_size=batch_size,
            score_batch_size=score_batch_size,
            method=method,
            ci_seed=ci_seed,
        )
        return
    if pairs or multi_protocol:
        raise ValueError("--pairs and --multi-protocol select the multi-subject track: add --multi")
    task = dreambench_task(
        dreambench_root, _split(subjects), prompts_per_subject, unique_token, reference_index
    )
    _benchmark(
        task,
        out,
        settings,
        chosen,
        "DreamBench",
        device,
        images_per_prompt=images_per_prompt,
        batch_size=batch_size,
        score_batch_size=score_batch_size,
        method=method,
        identity_references=identity_references,
        ci_seed=ci_seed,
    )


def _dreambench_multi(
    out: Path,
    settings: GenerationSettings,
    metrics: tuple[list[str], dict[str, dict[str, Any]]],
    device: str | None,
    dreambench_root: Path | None,
    protocol: Path | None,
    pairs: list[str] | None,
    prompts_per_pair: int | None,
    subjects: list[str] | None,
    identity_references: str,
    **options: Any,
) -> None:
    """``eval dreambench --multi``: generate and score the multi-subject track, then print the summary."""
    from cgrpo.eval.dreambench import dreambench_multi_task
    from cgrpo.eval.runner import format_interval

    if subjects:
        raise ValueError("--subjects selects single subjects; with --multi choose pairs with --pairs a+b")
    if identity_references != "reference":
        raise ValueError("--identity-references all is not defined for --multi: each subject has one photo")
    task = dreambench_multi_task(dreambench_root, protocol, pairs, prompts_per_pair)
    summary = _benchmark(task, out, settings, metrics, "DreamBench multi-subject", device, **options)
    labels, identity = summary["labels"], list(summary["weakest"])
    if identity:
        table = Table("subject", *(labels.get(m, m) for m in identity))
        for j, block in summary["per_subject"].items():
            table.add_row(j, *(format_interval(block[m]) for m in identity))
        table.add_row("[bold]weakest[/]", *(format_interval(summary["weakest"][m]) for m in identity))
        console.print(table)
    for metric, counts in summary["failures"].items():
        console.print(
            f"{labels.get(metric, metric)}: {counts['missing']} missing subjects, "
            f"{counts['images_with_confused']} images with a subject drawn twice, of {counts['n_images']}"
        )


@eval_app.command("mini")
@_user_errors
def eval_mini(
    out: Annotated[Path, typer.Option(help="Output folder (resumable).")],
    policy: Annotated[str, typer.Option(help="Registered policy.")] = "mini",
    policy_option: PolicyOptions = None,
    lora: Lora = None,
    images_per_prompt: Annotated[int, typer.Option(help="Images per (subject, prompt).")] = 4,
    num_subjects: Annotated[
        int, typer.Option(help="Held-out subjects (a training config's data.options.eval.num_subjects).")
    ] = 16,
    prompts_per_kind: Annotated[
        int,
        typer.Option(
            help="Prompts per kind and subject (a training config's data.options.eval.prompts_per_kind)."
        ),
    ] = 1,
    eval_seed: Annotated[
        int, typer.Option(help="Seed choosing the held-out set (a training config's data.options.eval.seed).")
    ] = 1234,
    image_size: Annotated[int, typer.Option(help="Mini-world image size.")] = 32,
    metrics: Annotated[str, typer.Option(help="Comma-separated metrics.")] = "mini_id,mini_prompt",
    metric_option: MetricOptions = None,
    steps: Annotated[int, typer.Option(help="ODE sampling steps.")] = 10,
    shift: Annotated[float | None, typer.Option(help="Static sigma shift.")] = None,
    seed: Annotated[int, typer.Option(help="Base seed of the images.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images generated per forward pass.")] = 32,
    device: Annotated[str | None, typer.Option(help="Policy device.")] = None,
    method: Annotated[str | None, typer.Option(help="Row label in tables.")] = None,
    ci_seed: Annotated[int, typer.Option(help="Seed of the bootstrap intervals.")] = 0,
    draw: Annotated[
        str,
        typer.Option(
            help="Whose images: 'policy' (sampled), or the world's own 'ground-truth' or 'copy' of the "
            "reference (the world's conflict: `cgrpo eval change COPY GROUND_TRUTH`)."
        ),
    ] = "policy",
) -> None:
    """The mini world's held-out subjects, scored with the mini rewards, per prompt kind."""
    from cgrpo.eval.mini import WORLD_DRAWINGS, mini_task, world_drawings
    from cgrpo.eval.runner import GenerationSettings, write_drawn_images

    if draw != "policy" and draw not in WORLD_DRAWINGS:
        raise ValueError(f"--draw must be policy or one of {', '.join(WORLD_DRAWINGS)}, got {draw!r}")
    if draw != "policy" and (lora is not None or policy_option):
        raise ValueError(f"--draw {draw} samples no policy: drop --lora and --policy-option")
    chosen = _metrics(metrics, metric_option)
    task = mini_task(out, image_size, num_subjects, prompts_per_kind, eval_seed)
    options: dict[str, Any] = {}
    if draw == "policy":
        settings = _settings(policy, policy_option, lora, steps, shift, seed, None)
    else:
        # steps 0: nothing is sampled; the seed still names the images, so that `cgrpo eval change` pairs
        # them with a policy's evaluation of the same --seed.
        settings = GenerationSettings(policy=f"world {draw}", steps=0, seed=seed)
        drawings = world_drawings(draw, image_size, num_subjects, prompts_per_kind, eval_seed)
        write_drawn_images(task, out, settings, images_per_prompt, lambda c: drawings[(c.subject, c.prompt)])
        options["policy_factory"] = _no_policy
    _benchmark(
        task,
        out,
        settings,
        chosen,
        "Mini world",
        device,
        images_per_prompt=images_per_prompt,
        batch_size=batch_size,
        score_batch_size=max(batch_size, 64),
        method=method,
        ci_seed=ci_seed,
        **options,
    )


def _no_policy() -> Any:
    raise RuntimeError("the world drew every image; no policy should be needed")


@eval_app.command("table")
@_user_errors
def eval_table(
    dirs: Annotated[list[Path], typer.Argument(help="Evaluation folders (each with summary.json).")],
    out: Annotated[Path | None, typer.Option(help="Also write the table to this Markdown file.")] = None,
) -> None:
    """One Table-1-style comparison over several evaluation folders (overall mean [95% CI])."""
    from cgrpo.eval.report import comparison_eval_table, kind_of
    from cgrpo.io import atomic_write_text

    for d in dirs:
        if kind_of(d) != "eval":
            raise ValueError(f"{d} is not an evaluation folder (no summary.json from `cgrpo eval`)")
    text = "\n".join(comparison_eval_table(list(dirs))) + "\n"
    console.print(text, markup=False, highlight=False)
    if out is not None:
        atomic_write_text(out, text)


@eval_app.command("change")
@_user_errors
def eval_change(
    before: Annotated[Path, typer.Argument(help="Evaluation folder before (e.g. the base's).")],
    after: Annotated[Path, typer.Argument(help="Evaluation folder after, of the same images and seeds.")],
    out: Annotated[
        Path | None, typer.Option(help="Also write change.json and change.md into this folder.")
    ] = None,
) -> None:
    """The per-image change between two evaluations of the same images (same task options and seed): mean
    change with its 95% interval, overall, per category and, for mini-world prompts, per asked attribute."""
    from cgrpo.eval.change import change_summary, check_pairs, markdown, read_evaluation, shared_metrics
    from cgrpo.io import atomic_write_json, atomic_write_text

    rows_before, rows_after = read_evaluation(before), read_evaluation(after)
    check_pairs(rows_before, rows_after, (str(before), str(after)))
    metrics = shared_metrics(rows_before, rows_after)
    if not metrics:
        raise ValueError(f"{before} and {after} share no score column")
    summary = change_summary(rows_before, rows_after, metrics)
    text = markdown(summary, str(before), str(after))
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    if out is not None:
        atomic_write_json(
            out / "change.json", {"before": str(before), "after": str(after), "groups": summary}
        )
        atomic_write_text(out / "change.md", text)


@analyze_app.command("conflict")
@_user_errors
def analyze_conflict(
    run_dir: Annotated[Path, typer.Argument(help="Training run folder (metrics.jsonl, advantages.jsonl).")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default: the run folder).")] = None,
) -> None:
    """Reward conflict (Fig. 7): opposite-sign advantages over training, quadrants and per denoising step."""
    from cgrpo.eval.analyses import conflict_analysis

    result = conflict_analysis(run_dir, out)
    target = out or run_dir
    if "training" in result:
        console.print(f"mean conflict rate over training: {result['training']['mean']:.1%} (paper: 50.2%)")
    if "quadrants" in result:
        console.print(f"quadrants: { {k: round(v, 3) for k, v in result['quadrants']['shares'].items()} }")
    console.print(f"wrote {target / 'conflict.png'}, {target / 'conflict.json'}")


@analyze_app.command("exploration")
@_user_errors
def analyze_exploration(
    config: Annotated[Path, typer.Argument(help="GRPO config whose policy, rewards and sampler are used.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted.key=value overrides.")] = None,
    lora: Lora = None,
    out: Annotated[Path | None, typer.Option(help="Write the statistics here (JSON).")] = None,
    num_subjects: Annotated[int, typer.Option(help="Held-out subjects (mini world).")] = 32,
    prompts_per_kind: Annotated[int, typer.Option(help="Prompts per kind and subject (mini world).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the rollout noise.")] = 0,
    hit_threshold: Annotated[float, typer.Option(help="Attribute score that counts as drawn.")] = 0.6,
) -> None:
    """What a policy's rollouts explore: per prompt kind, rollout vs ODE rewards, within-group spread,
    flat groups, the conflict rate, how often property prompts' rollouts draw the asked property, and
    whether the config's advantage (SARS, TDW) favours the rollouts that draw it."""
    import json

    import torch

    from cgrpo.config import load_config
    from cgrpo.eval.exploration import explore
    from cgrpo.eval.runner import resolve_lora
    from cgrpo.io import atomic_write_json
    from cgrpo.rewards.mini import recolor_scores, reward_breakdown
    from cgrpo.sde import steps_to_mask
    from cgrpo.train.components import (
        build_datasets,
        build_policy,
        build_rewards,
        normalized_advantages,
        shaped_advantages,
    )
    from cgrpo.train.config import GRPOConfig
    from cgrpo.train.sampling import schedule

    cfg = load_config(GRPOConfig, config, list(overrides or []))
    if cfg.data.name == "mini":
        cfg.data.options["eval"] = {"num_subjects": num_subjects, "prompts_per_kind": prompts_per_kind}
    policy = build_policy(cfg.policy)
    if lora is not None:
        policy.load_lora(resolve_lora(lora))
    _, heldout = build_datasets(cfg.data, cfg.seed)
    if not heldout:
        raise ValueError(f"{config}: the dataset has no held-out examples to explore")
    identity, prompt = build_rewards(cfg)
    s = cfg.sampling
    sigmas = schedule(policy, s.num_steps, s.shift)
    # the first sampling.sde_steps steps are stochastic (default all but the last), as in training
    sde_steps = steps_to_mask(
        torch.arange(s.num_steps - 1 if s.sde_steps is None else s.sde_steps), s.num_steps
    )
    trainable = torch.nonzero(sde_steps).flatten()

    def advantage(r_id: torch.Tensor, r_prompt: torch.Tensor) -> torch.Tensor:
        """The trainer's shaped advantage (Eq. 8, 11, 12) of each rollout on each trainable step."""
        a_ids, a_prompt = normalized_advantages(cfg, r_id[:, None], r_prompt)
        return shaped_advantages(cfg, a_ids, a_prompt, trainable)

    result = explore(
        policy,
        heldout,
        identity,
        prompt,
        sigmas,
        sde_steps,
        group_size=cfg.train.group_size,
        noise_level=s.noise_level,
        formulation=s.formulation,
        seed=seed,
        hit_threshold=hit_threshold,
        breakdown=reward_breakdown if cfg.rewards.prompt.name == "mini_prompt" else None,
        advantage=advantage,
        recolors=recolor_scores if cfg.rewards.prompt.name == "mini_prompt" else None,
    )
    table = Table(
        "kind",
        "groups",
        "rollout id/prompt",
        "ODE id/prompt",
        "group std id/prompt",
        "conflict",
        "property hits",
        "recolours: asked / other colour",
    )
    for name, block in [*result["kinds"].items(), ("[bold]all[/]", result["all"])]:
        hits = (
            f"{block['property_hit_rate']:.0%} ({block['property_groups_without_hit']:.0%} groups none)"
            if "property_hit_rate" in block
            else ""
        )
        table.add_row(
            name,
            str(block["groups"]),
            f"{block['rollout_id']:.3f} / {block['rollout_prompt']:.3f}",
            f"{block['ode_id']:.3f} / {block['ode_prompt']:.3f}",
            f"{block['group_std_id']:.3f} / {block['group_std_prompt']:.3f}",
            f"{block['conflict_rate']:.0%}",
            hits,
            f"{block['recolor_asked_rate']:.0%} / {block['recolor_other_rate']:.0%}"
            if "recolor_asked_rate" in block
            else "",
        )
    console.print(table)
    for name, block in result["kinds"].items():
        for prefix, what in (("property", "the asked property"), ("asked", "all that is asked")):
            if block.get(f"{prefix}_mixed_groups"):
                b = {key.removeprefix(f"{prefix}_"): value for key, value in block.items()}
                console.print(
                    f"{name} prompts, {b['mixed_groups']} groups with and without {what}: advantage "
                    f"{b['hit_advantage']:+.3f} with it, {b['miss_advantage']:+.3f} without "
                    f"(id {b['hit_id']:.3f} / {b['miss_id']:.3f}, "
                    f"prompt {b['hit_prompt']:.3f} / {b['miss_prompt']:.3f})"
                )
    needed = result["images_needed_for_0.01"]
    console.print(f"held-out images for a ±0.01 interval: identity {needed['id']}, prompt {needed['prompt']}")
    if out is not None:
        atomic_write_json(out, result)
        console.print(f"wrote {out}")
    else:
        console.print(json.dumps(result["all"], indent=1))


@analyze_app.command("frequency")
@_user_errors
def analyze_frequency(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    policy: Annotated[str, typer.Option(help="Registered policy.")] = "mini",
    policy_option: PolicyOptions = None,
    lora: Lora = None,
    source: Annotated[
        str, typer.Option(help="Where the (reference, prompt) pairs come from: mini or dreambench.")
    ] = "",
    num_pairs: Annotated[int, typer.Option(help="Number of (reference, prompt) pairs averaged.")] = 16,
    steps: Annotated[int, typer.Option(help="ODE steps of the trajectory.")] = 25,
    shift: Annotated[
        float | None, typer.Option(help="Static sigma shift (default: the policy's own schedule).")
    ] = None,
    cutoff: Annotated[
        float, typer.Option(help="Low/high boundary in cycles per pixel (Nyquist = 0.5).")
    ] = 0.125,
    seed: Annotated[int, typer.Option(help="Base seed of the initial noise.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Trajectories per forward pass.")] = 8,
    dreambench_root: Annotated[
        Path | None, typer.Option(help="DreamBench folder (source dreambench).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="Policy device.")] = None,
) -> None:
    """Frequency analysis of denoising (Fig. 4): band energies of x0_hat = x_t - sigma * v per ODE step."""
    from cgrpo.eval.analyses import frequency_analysis, frequency_pairs
    from cgrpo.eval.runner import build_eval_policy, policy_image_size
    from cgrpo.train.sampling import schedule

    settings = _settings(policy, policy_option, lora, steps, shift, seed, None)
    model = build_eval_policy(settings, _device(device))
    size = policy_image_size(model) or 512
    source = source or ("mini" if policy == "mini" else "dreambench")
    prompts, references, seeds = frequency_pairs(source, num_pairs, size, seed, dreambench_root, policy=model)
    # The policy's own schedule (UNO's shift for `uno`) unless --shift asks for a static one.
    sigmas = schedule(model, steps, shift)
    result = frequency_analysis(model, prompts, references, seeds, sigmas, out, cutoff, batch_size)
    low, high = result["low_converged"], result["high_converged"]
    half = len(low) // 2
    console.print(
        f"band content formed at step {half}/{len(low)}: low {low[half]:.2f}, high {high[half]:.2f}"
    )
    console.print(f"wrote {out / 'frequency.png'}, {out / 'frequency.json'}")


@analyze_app.command("tradeoff")
@_user_errors
def analyze_tradeoff(
    dirs: Annotated[list[Path], typer.Argument(help="Training runs and/or evaluation folders.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    x: Annotated[
        str | None, typer.Option(help="Identity metric (default: dino_seg, dino, clip_i or id).")
    ] = None,
    y: Annotated[str | None, typer.Option(help="Prompt metric (default: hpsv3, clip_t or prompt).")] = None,
) -> None:
    """Identity vs prompt metric of several runs/checkpoints with the Pareto front."""
    from cgrpo.eval.analyses import tradeoff_analysis

    result = tradeoff_analysis(dirs, out, x, y)
    table = Table("point", "x", "y", "front")
    for p in result["points"]:
        if p["final"]:
            table.add_row(p["label"], f"{p['x']:.4f}", f"{p['y']:.4f}", "*" if p["on_front"] else "")
    console.print(table)
    console.print(f"Pareto front: {', '.join(result['front'])}")
    console.print(f"wrote {out / 'tradeoff.png'}, {out / 'tradeoff.json'}")


@analyze_app.command("correlation")
@_user_errors
def analyze_correlation(
    human: Annotated[
        Path, typer.Option(help="Human-evaluation results.json (pairwise votes) or ratings CSV.")
    ],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    scores: Annotated[
        list[Path] | None,
        typer.Option(help="scores.csv of the judged images (repeatable; default: the scores in the export)."),
    ] = None,
    metrics: Annotated[
        str | None, typer.Option(help="Comma-separated metrics (default: every score column).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap intervals.")] = 0,
) -> None:
    """Reward-human correlation (Tables 6/7): Pearson and Spearman with bootstrap intervals."""
    from cgrpo.eval.correlation import correlation_analysis

    result = correlation_analysis(human, scores, out, _split([metrics]) if metrics else None, seed=seed)
    table = Table("metric", "criterion", "n", "Pearson", "Spearman")
    for e in result["results"]:
        table.add_row(
            e["label"],
            e["criterion"],
            str(e["n"]),
            f"{e['pearson']['value']:.3f}",
            f"{e['spearman']['value']:.3f}",
        )
    console.print(table)
    console.print(f"wrote {out / 'correlation.md'}, {out / 'correlation.png'}, {out / 'correlation.json'}")


@_user_errors
def report(
    dirs: Annotated[list[Path], typer.Argument(help="Training runs and/or evaluation folders.")],
    out: Annotated[Path, typer.Option(help="Report folder (report.md, report.html and figures).")],
    title: Annotated[str, typer.Option(help="Report title.")] = "Customized-GRPO report",
) -> None:
    """One Markdown + HTML report: curves, samples, evaluation tables, analyses; several runs side by side."""
    from cgrpo.eval.report import write_report

    path = write_report(dirs, out, title)
    console.print(f"wrote {path} and {path.with_suffix('.html')}")
