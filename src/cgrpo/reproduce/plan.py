"""The paper's Tables 2-5 as data, and the plan of runs that reproduces them in a world (mini or uno).

A *run* (:class:`RunSpec`) is one training: GRPO with config overrides relative to the world's main
Customized-GRPO config, the SFT baseline or the RPO baseline. A *row* of a table names the run that fills it
and carries the paper's published numbers. Rows of different tables that are the same experiment name the
same run (the main run fills a row of every table), so a plan trains each (run, seed) once.

Every run of a world shares its policy, data, rewards, sampler and held-out evaluation with the main GRPO
config: SFT and RPO configs are synchronised from it (:func:`sync_from_grpo`), so the base numbers of all
runs are the same evaluation of the same policy. A budget :class:`Profile` sets iterations (and, for the
quick profile, a smaller batch and held-out set); SFT and RPO get the same budget as a GRPO run, counted in
trained flow-matching terms (samples x denoising steps through the network with gradients).

Published numbers are copied from the paper (arXiv 2510.18263): Tables 2-4 report DINO, CLIP-I, CLIP-T and
HPS-v3 on DreamBench; Table 5 reports DINO and HPS-v3 under the standard and the inverted TDW schedule.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from cgrpo.config import apply_overrides, from_dict, read_yaml, to_dict
from cgrpo.eval.mini import PRECISE_HELDOUT, HeldoutSet

Kind = Literal["grpo", "sft", "rpo"]
PAPER_METRICS = ("dino", "clip_i", "clip_t", "hps")
PAPER_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "hps": "HPS-v3"}
WORLDS = ("mini", "uno")


# --- the runs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One training, seed-independent; ``overrides``: dotted keys relative to the kind's base config."""

    slug: str
    kind: Kind
    overrides: tuple[str, ...] = ()
    note: str = ""


NAIVE = ("advantage.synergy=none", "advantage.schedule=static")
RUNS: dict[str, RunSpec] = {
    spec.slug: spec
    for spec in [
        RunSpec("customized_grpo", "grpo", (), "SARS (tanh, alpha 0.5) + TDW (0.7:0.3): the main run"),
        RunSpec("sft", "sft", (), "supervised flow matching on the RL data's targets"),
        RunSpec("rpo", "rpo", (), "offline DPO on harmonic-mean pairs + similarity loss"),
        RunSpec("naive_1to1", "grpo", (*NAIVE, "advantage.ratio=[1.0, 1.0]"), "Eq. 9, static 1:1"),
        RunSpec("naive_1to1.5", "grpo", (*NAIVE, "advantage.ratio=[1.0, 1.5]"), "Eq. 9, static 1:1.5"),
        RunSpec("wo_sars", "grpo", ("advantage.synergy=none",), "TDW only, linear sum (= alpha 0)"),
        RunSpec(
            "wo_tdw",
            "grpo",
            ("advantage.schedule=static", "advantage.ratio=[1.0, 1.0]"),
            "SARS with static 1:1 weights",
        ),
        RunSpec("synergy_min", "grpo", ("advantage.synergy=min",), "S = min(A_id, A_prompt)"),
        RunSpec("synergy_max", "grpo", ("advantage.synergy=max",), "S = max(A_id, A_prompt)"),
        RunSpec("synergy_harmonic", "grpo", ("advantage.synergy=harmonic",), "S = harmonic mean"),
        *[
            RunSpec(
                f"bounds_{hi}_{lo}",
                "grpo",
                (f"advantage.w_max={hi}", f"advantage.w_min={lo}"),
                f"TDW bounds w_max:w_min = {hi}:{lo}",
            )
            for hi, lo in (("1.0", "0.0"), ("0.9", "0.1"), ("0.8", "0.2"), ("0.6", "0.4"))
        ],
        *[
            RunSpec(f"alpha_{a}", "grpo", (f"advantage.alpha={a}",), f"SARS alpha = {a}, standard TDW")
            for a in ("0.2", "0.8", "1.0")
        ],
        RunSpec(
            "inverted_alpha_0.0",
            "grpo",
            ("advantage.schedule=inverted", "advantage.synergy=none"),
            "inverted TDW, linear sum (= alpha 0)",
        ),
        *[
            RunSpec(
                f"inverted_alpha_{a}",
                "grpo",
                ("advantage.schedule=inverted", f"advantage.alpha={a}"),
                f"inverted TDW, alpha = {a}",
            )
            for a in ("0.2", "0.5", "0.8", "1.0")
        ],
    ]
}
MAIN = "customized_grpo"


# --- the tables --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A table row: the paper's label, the run that fills it and the paper's numbers.

    ``use="base"``: the row is the base policy, i.e. the held-out evaluation before training of the main
    run. ``column``: Table 5's schedule column ("Standard TDW" / "Inverted TDW")."""

    name: str
    run: str
    paper: dict[str, float]
    column: str = ""
    use: Literal["trained", "base"] = "trained"


@dataclass(frozen=True)
class Table:
    number: int
    title: str
    rows: tuple[Row, ...]
    metrics: tuple[str, ...] = PAPER_METRICS  # the paper's columns
    columns: tuple[str, ...] = ()  # Table 5: the schedule columns, rows grouped by name


def _p(dino: float, clip_i: float | None, clip_t: float | None, hps: float) -> dict[str, float]:
    values = {"dino": dino, "clip_i": clip_i, "clip_t": clip_t, "hps": hps}
    return {k: v for k, v in values.items() if v is not None}


BASE_ROW = Row("UNO (Base)", MAIN, _p(0.760, 0.835, 0.304, 7.87), use="base")
TABLES: dict[int, Table] = {
    2: Table(
        2,
        "Ablation results (baselines and components)",
        (
            BASE_ROW,
            Row("SFT", "sft", _p(0.762, 0.846, 0.307, 7.43)),
            Row("RPO", "rpo", _p(0.852, 0.898, 0.237, 4.47)),
            Row("Naive GRPO (1:1)", "naive_1to1", _p(0.861, 0.912, 0.235, 4.12)),
            Row("Naive GRPO (1:1.5)", "naive_1to1.5", _p(0.801, 0.842, 0.298, 7.56)),
            Row("Customized-GRPO", MAIN, _p(0.812, 0.862, 0.301, 8.32)),
            Row("w/o Synergy Term", "wo_sars", _p(0.795, 0.838, 0.295, 7.95)),
            Row("w/o TDW", "wo_tdw", _p(0.811, 0.852, 0.278, 7.23)),
        ),
    ),
    3: Table(
        3,
        "Choice of the synergy term",
        (
            BASE_ROW,
            Row("Naive GRPO", "naive_1to1.5", _p(0.801, 0.842, 0.298, 7.56)),  # "linear (1:1.5)" in the text
            Row("Min(A_id, A_prompt)", "synergy_min", _p(0.785, 0.848, 0.298, 7.81)),
            Row("Max(A_id, A_prompt)", "synergy_max", _p(0.884, 0.899, 0.276, 6.26)),
            Row("Harmonic Mean", "synergy_harmonic", _p(0.778, 0.812, 0.291, 8.22)),
            Row("Tanh(A_id * A_prompt)", MAIN, _p(0.812, 0.862, 0.301, 8.32)),
        ),
    ),
    4: Table(
        4,
        "Choice of the dynamic weight bounds w_max : w_min",
        (
            Row("1.0 : 0", "bounds_1.0_0.0", _p(0.832, 0.874, 0.272, 6.39)),
            Row("0.9 : 0.1", "bounds_0.9_0.1", _p(0.821, 0.866, 0.285, 7.27)),
            Row("0.8 : 0.2", "bounds_0.8_0.2", _p(0.814, 0.864, 0.296, 7.68)),
            Row("0.7 : 0.3", MAIN, _p(0.812, 0.862, 0.301, 8.32)),
            Row("0.6 : 0.4", "bounds_0.6_0.4", _p(0.795, 0.848, 0.292, 7.88)),
        ),
    ),
    5: Table(
        5,
        "Synergy coefficient alpha under the standard and the inverted TDW schedule",
        tuple(
            row
            for alpha, standard, std_values, inverted_values in (
                ("0.0", "wo_sars", (0.795, 7.95), (0.605, 5.65)),
                ("0.2", "alpha_0.2", (0.801, 8.04), (0.609, 5.62)),
                ("0.5", MAIN, (0.812, 8.32), (0.613, 5.58)),
                ("0.8", "alpha_0.8", (0.835, 7.61), (0.616, 5.49)),
                ("1.0", "alpha_1.0", (0.858, 6.73), (0.620, 5.41)),
            )
            for row in (
                Row(
                    f"alpha = {alpha}", standard, _p(std_values[0], None, None, std_values[1]), "Standard TDW"
                ),
                Row(
                    f"alpha = {alpha}",
                    f"inverted_alpha_{alpha}",
                    _p(inverted_values[0], None, None, inverted_values[1]),
                    "Inverted TDW",
                ),
            )
        ),
        metrics=("dino", "hps"),
        columns=("Standard TDW", "Inverted TDW"),
    ),
}


def parse_tables(text: str | Sequence[int]) -> list[int]:
    """``"2,3"`` -> ``[2, 3]``; unknown numbers raise naming the valid ones."""
    numbers = [int(t) for t in text.replace(" ", "").split(",") if t] if isinstance(text, str) else list(text)
    unknown = [n for n in numbers if n not in TABLES]
    if unknown or not numbers:
        raise ValueError(f"--tables {text!r}: expected some of {', '.join(map(str, TABLES))}")
    return sorted(set(numbers))


# --- budget profiles ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """How long and how often: GRPO iterations (None = the config's), seeds, extra GRPO overrides.

    ``match_budget``: give SFT and RPO the GRPO run's budget (:func:`budget_overrides`); False keeps their
    configs' own budget (UNO: the paper's SFT/RPO settings). ``heldout``: evaluate every finished run (and the
    base, once) on this larger set and report those numbers; None reports the trainers' own evaluation."""

    name: str
    seeds: int
    iterations: int | None
    grpo: tuple[str, ...] = ()
    match_budget: bool = True
    heldout: HeldoutSet | None = None


PROFILES: dict[tuple[str, str], Profile] = {
    # 22 runs x 3 seeds of the demo's config cut to 24 iterations of 4 x 8 samples (32 per AdamW step).
    # Version 2's 64 iterations of 2 x 8 (twice the steps, chosen on one seed pair) let the seeds part on
    # version 3: std over seeds 0.03-0.07 for Customized-GRPO and naive 1:1, and one Customized-GRPO seed
    # collapsed; 32 x 4 x 8 and 24 x 4 x 8 kept it at 0.004-0.014 over 3 seeds (docs/mini-world.md), and 24
    # iterations fit the 3 hours. No mid-run evaluations: the report reads the ends. The trainers' 80-image
    # evaluation has a 95% interval of +-0.04 per mean, so the tables come from 1,280 images (1,108 distinct;
    # the demo table's set) per policy.
    ("mini", "full"): Profile(
        "full",
        3,
        24,
        ("eval.every=0", "checkpoint.every=8", "log.tensorboard=false"),
        heldout=PRECISE_HELDOUT,
    ),
    # 22 runs x 1 seed, 11 min 34 s measured on version 2: 18 iterations of 2 x 8 samples, 8 held-out
    # subjects, no mid-run evals.
    ("mini", "quick"): Profile(
        "quick",
        1,
        18,
        (
            "train.prompts_per_iteration=2",
            "data.options.eval.num_subjects=8",
            "eval.every=0",
            "checkpoint.every=8",
            "log.tensorboard=false",
        ),
    ),
    # The paper's 1,250 iterations (configs/uno/paper.yaml); SFT and RPO keep their configs' paper budgets.
    ("uno", "full"): Profile("full", 3, None, match_budget=False),
    ("uno", "quick"): Profile("quick", 1, 100, ("eval.every=50", "checkpoint.every=50")),
}


# --- base configs ------------------------------------------------------------------------------------


def configs_dir() -> Path:
    return Path(str(resources.files("cgrpo") / "configs"))


def default_base_configs(world: str) -> dict[str, Path]:
    """The world's main GRPO config and its SFT and RPO baseline configs."""
    root = configs_dir()
    if world == "mini":
        return {
            "grpo": root / "mini" / "customized_grpo.yaml",
            "sft": root / "mini" / "sft_baseline.yaml",
            "rpo": root / "mini" / "rpo.yaml",
        }
    if world == "uno":
        return {
            "grpo": root / "uno" / "paper.yaml",
            "sft": root / "uno" / "ablations" / "sft_baseline.yaml",
            "rpo": root / "uno" / "ablations" / "rpo.yaml",
        }
    raise ValueError(f"unknown world {world!r}; expected one of {', '.join(WORLDS)}")


def sync_from_grpo(kind: Kind, data: dict[str, Any], grpo: dict[str, Any]) -> dict[str, Any]:
    """Copy the parts an SFT or RPO config shares with the resolved GRPO config ``grpo`` into ``data``: the
    policy (and LoRA), the dataset, the rewards, the sampler and the held-out evaluation."""
    data = json.loads(json.dumps(data))  # a deep copy of plain YAML data
    if kind == "rpo":
        for key in ("policy", "data", "rewards", "sampling", "device"):
            data[key] = json.loads(json.dumps(grpo[key]))
        data["eval"] = {**grpo["eval"], "every": 0}
    elif kind == "sft":
        data.setdefault("data", {})["dataset"] = grpo["data"]
        model = data.setdefault("model", {})
        model.update(policy=grpo["policy"]["name"], options=grpo["policy"]["options"])
        model["lora"] = grpo["policy"]["lora"]
        data["heldout"] = {
            **data.get("heldout", {}),
            "enabled": True,
            "rewards": grpo["rewards"],
            "num_steps": grpo["eval"]["num_steps"],
            "shift": grpo["sampling"]["shift"],
            "seed": grpo["eval"]["seed"],
            "images_per_prompt": grpo["eval"]["images_per_prompt"],
            "micro_batch": grpo["sampling"]["micro_batch"],
        }
    return data


def budget_overrides(kind: Kind, grpo: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """SFT/RPO settings that give them the GRPO run's budget, in trained flow-matching terms.

    A GRPO run trains ``iterations x B x G x k`` (sample, denoising step) terms. SFT: that many terms in
    batches of ``optim.batch_size``. RPO: the same (reference, prompt) pairs (``iterations x B``), G
    candidates each, and as many terms in steps of ``3 x batch_size`` (chosen, rejected, similarity).
    """
    t = grpo["train"]
    iterations, b, g, k = t["iterations"], t["prompts_per_iteration"], t["group_size"], t["train_steps"]
    terms = iterations * b * g * k
    if kind == "sft":
        batch = data.get("optim", {}).get("batch_size", 32)
        steps = max(1, math.ceil(terms / batch))
        return [
            f"optim.steps={steps}",
            f"optim.warmup_steps={max(1, min(steps // 10, 30))}",
            "eval_every=0",
            f"save_every={max(1, steps // 4)}",
            "num_threads=0",  # threads are set by the runner
        ]
    if kind == "rpo":
        batch = data.get("train", {}).get("batch_size", 8)
        return [
            f"pairs.prompts={iterations * b}",
            f"pairs.candidates={g}",
            f"train.steps={max(1, math.ceil(terms / (3 * batch)))}",
            f"log.tensorboard={str(grpo['log']['tensorboard']).lower()}",
        ]
    return []


def config_class(kind: Kind) -> type:
    from cgrpo.train import recipe

    return recipe.config_class(kind)


def validate(kind: Kind, data: dict[str, Any]) -> dict[str, Any]:
    """Load ``data`` into the kind's typed config (errors name the key) and return it resolved."""
    return to_dict(from_dict(config_class(kind), data))


def config_hash(data: dict[str, Any]) -> str:
    """8 hex digits of the resolved config without its output directory: a run's identity on disk."""
    stripped = {k: v for k, v in data.items() if k != "output_dir"}
    return hashlib.sha256(json.dumps(stripped, sort_keys=True, default=str).encode()).hexdigest()[:8]


# --- the plan ----------------------------------------------------------------------------------------


@dataclass
class PlannedRun:
    """One (run, seed) with its resolved config; ``run_id`` = ``<slug>-s<seed>-<config hash>``."""

    spec: RunSpec
    seed: int
    config: dict[str, Any]
    tables: list[int] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return f"{self.spec.slug}-s{self.seed}-{config_hash(self.config)}"

    @property
    def kind(self) -> Kind:
        return self.spec.kind

    @property
    def output_dir(self) -> Path:
        return Path(self.config["output_dir"])

    @property
    def finished(self) -> bool:
        return (self.output_dir / "summary.json").is_file()


@dataclass
class Plan:
    world: str
    profile: Profile
    tables: list[int]
    seeds: list[int]
    out: Path
    runs: list[PlannedRun]
    base_configs: dict[str, Path]

    def run(self, slug: str, seed: int) -> PlannedRun | None:
        for run in self.runs:
            if run.spec.slug == slug and run.seed == seed:
                return run
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "world": self.world,
            "profile": self.profile.name,
            "tables": self.tables,
            "seeds": self.seeds,
            "base_configs": {k: str(v) for k, v in self.base_configs.items()},
            "runs": [
                {
                    "run_id": r.run_id,
                    "slug": r.spec.slug,
                    "kind": r.kind,
                    "seed": r.seed,
                    "tables": r.tables,
                    "overrides": list(r.spec.overrides),
                    "output_dir": str(r.output_dir),
                }
                for r in self.runs
            ],
        }


def resolve_grpo(
    spec: RunSpec, seed: int, base: Path, profile: Profile, iterations: int | None
) -> dict[str, Any]:
    """The resolved GRPO config of ``spec`` at ``seed`` (output_dir still unset)."""
    data = read_yaml(base)
    extra = [*spec.overrides, *profile.grpo, f"seed={seed}", f"method={spec.slug}"]
    steps = iterations if iterations is not None else profile.iterations
    if steps is not None:
        extra.append(f"train.iterations={steps}")
    return validate("grpo", apply_overrides(data, extra))


def build_plan(
    world: str = "mini",
    tables: Sequence[int] | str = (2, 3, 4, 5),
    seeds: int | None = None,
    quick: bool = False,
    out: str | Path = "reproduce",
    iterations: int | None = None,
    base_configs: dict[str, str | Path | None] | None = None,
) -> Plan:
    """All (run, seed) pairs the tables need, deduplicated, with resolved and validated configs.

    Runs are ordered seed-major (every table gets its first seed before any second seed) in table order.
    ``base_configs`` replaces the world's packaged ``grpo``/``sft``/``rpo`` configs (real checkpoint paths,
    tiny test models)."""
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; expected one of {', '.join(WORLDS)}")
    numbers = parse_tables(tables)
    profile = PROFILES[(world, "quick" if quick else "full")]
    num_seeds = profile.seeds if seeds is None else seeds
    if num_seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {num_seeds}")
    if iterations is not None and iterations < 1:
        raise ValueError(f"--iterations must be at least 1, got {iterations}")
    bases = default_base_configs(world)
    bases.update({k: Path(v) for k, v in (base_configs or {}).items() if v is not None})
    for kind, path in bases.items():
        if not path.is_file():
            raise FileNotFoundError(f"the {kind} base config {path} does not exist")
    out = Path(out)

    slugs: dict[str, list[int]] = {}
    for number in numbers:
        for row in TABLES[number].rows:
            tables_of = slugs.setdefault(row.run, [])
            if number not in tables_of:
                tables_of.append(number)
    runs = []
    for seed in range(num_seeds):
        main_grpo = resolve_grpo(RUNS[MAIN], seed, bases["grpo"], profile, iterations)
        for slug, used_by in slugs.items():
            spec = RUNS[slug]
            if spec.kind == "grpo":
                config = resolve_grpo(spec, seed, bases["grpo"], profile, iterations)
            else:
                data = sync_from_grpo(spec.kind, read_yaml(bases[spec.kind]), main_grpo)
                budget = budget_overrides(spec.kind, main_grpo, data) if profile.match_budget else []
                extra = [*spec.overrides, *budget, f"seed={seed}"]
                config = validate(spec.kind, apply_overrides(data, extra))
            config.pop("output_dir", None)
            run = PlannedRun(spec, seed, config, list(used_by))
            run.config = {**config, "output_dir": str(out / "runs" / run.run_id)}
            runs.append(run)
    return Plan(world, profile, numbers, list(range(num_seeds)), out, runs, bases)


# --- cost model (mini world, one thread on a quiet core) ---------------------------------------------

# Measured on these machines with the ~2.3M-parameter mini transformer, two one-thread runs side by side (as
# `--jobs 2` runs them), in version 3's full profile of 64 x 2 x 8 samples (10 steps, 9 SDE steps of which 5
# trained, base and final evaluations of 80 images): GRPO runs 202-246 s, median 218 s; SFT 131 s; RPO 241 s.
# (Version 2's calibration was 20% faster, 176 s: the machines' speed varies from day to day by about that.)
SAMPLE_STEP_S = 0.0075  # no-grad forward of one image for one denoising step
TRAIN_TERM_S = 0.0238  # forward + backward of one (image, step) term
STARTUP_S = 8.0  # interpreter, imports, policy load, data
# `cgrpo eval mini` of one policy, per image (10 ODE steps, both rewards, PNG files): 1,280 images took
# 61-223 s, median 131 s, two evaluations side by side (version 3's full profile).
HELDOUT_IMAGE_S = 0.096


def heldout_seconds(heldout: HeldoutSet) -> float:
    """Wall-clock estimate of one policy's evaluation (:mod:`cgrpo.reproduce.heldout`), one thread."""
    return STARTUP_S + heldout.images * HELDOUT_IMAGE_S


def _heldout_images(config: dict[str, Any], kind: Kind) -> int:
    data = config["data"]["dataset"] if kind == "sft" else config["data"]
    if data.get("name") != "mini":
        return 16
    options = data.get("options", {}).get("eval", {})
    images = config["heldout" if kind == "sft" else "eval"].get("images_per_prompt", 1)
    return options.get("num_subjects", 16) * 5 * options.get("prompts_per_kind", 1) * images


def estimate_seconds(run: PlannedRun) -> float | None:
    """Wall-clock estimate of a mini-world run on one thread; None for other worlds (GPU: measure it)."""
    c = run.config
    data = c["data"]["dataset"] if run.kind == "sft" else c["data"]
    if data.get("name") != "mini" or c.get("device", "cpu") != "cpu":
        return None
    images = _heldout_images(c, run.kind)
    if run.kind == "grpo":
        t, s = c["train"], c["sampling"]
        n = t["prompts_per_iteration"] * t["group_size"]
        every = c["eval"]["every"]
        evals = 2 + ((t["iterations"] - 1) // every if every else 0)
        eval_s = images * c["eval"]["num_steps"] * SAMPLE_STEP_S
        iteration = n * (s["num_steps"] * SAMPLE_STEP_S + t["train_steps"] * TRAIN_TERM_S)
        return STARTUP_S + evals * eval_s + t["iterations"] * iteration
    if run.kind == "sft":
        o, h = c["optim"], c["heldout"]
        return (
            STARTUP_S
            + 2 * images * h["num_steps"] * SAMPLE_STEP_S
            + o["steps"] * o["batch_size"] * TRAIN_TERM_S
        )
    p, t, s = c["pairs"], c["train"], c["sampling"]
    generate = p["prompts"] * p["candidates"] * s["num_steps"] * SAMPLE_STEP_S
    step = t["batch_size"] * (3 * TRAIN_TERM_S + 2 * SAMPLE_STEP_S)
    return STARTUP_S + 2 * images * c["eval"]["num_steps"] * SAMPLE_STEP_S + generate + t["steps"] * step


def makespan(durations: Sequence[float], jobs: int) -> float:
    """Wall-clock of running ``durations`` in order on ``jobs`` workers (each takes the next when free)."""
    workers = [0.0] * max(1, jobs)
    for duration in durations:
        i = workers.index(min(workers))
        workers[i] += duration
    return max(workers) if durations else 0.0


# --- ablation YAMLs ----------------------------------------------------------------------------------


def _nested(overrides: Sequence[str]) -> dict[str, Any]:
    return apply_overrides({}, list(overrides))


def ablation_yaml(world: str, spec: RunSpec) -> str:
    """The YAML of a GRPO run of the plan as a standalone config inheriting the world's main config."""
    import yaml

    parent = "../customized_grpo.yaml" if world == "mini" else "../paper.yaml"
    body = {"inherit": parent, "method": spec.slug, "output_dir": f"runs/{world}/{spec.slug}"}
    body.update(_nested(spec.overrides))
    header = (
        f"# {spec.note}.\n# Generated by cgrpo.reproduce.plan.write_ablation_configs from "
        f"RUNS['{spec.slug}'] (tests/test_reproduce.py keeps them in sync).\n"
    )
    return header + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


def write_ablation_configs(world: str, directory: str | Path | None = None) -> list[Path]:
    """Write one YAML per GRPO run of the plan except the main one (``configs/<world>/ablations/``)."""
    directory = Path(directory) if directory is not None else configs_dir() / world / "ablations"
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in RUNS.values():
        if spec.kind != "grpo" or spec.slug == MAIN:
            continue
        path = directory / f"{spec.slug}.yaml"
        path.write_text(ablation_yaml(world, spec))
        written.append(path)
    return written
