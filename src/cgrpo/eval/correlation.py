"""Reward-human correlation (the paper's Tables 6/7): how well each metric's per-image score follows people.

Human judgements come in one of two forms:

- **Ratings** (the paper's protocol, App. C.1): a CSV with columns ``image, reference, prompt, criterion,
  human_score`` (one row per annotator and criterion, e.g. a 0-5 rating). The human score of an image is
  the mean over its rows per criterion.
- **Pairwise votes** from the human-evaluation app: its ``results.json`` export (``pairs[]`` with
  ``subject, prompt, seed, method_a, method_b, scores_a, scores_b`` and nested ``votes[]`` whose ``choice``
  is a/b/tie), its per-vote CSV export (a ``choice`` column, ``score_a.<reward>`` columns), or
  ``{"votes": [{pair_id, ..., criterion, winner: a|b|tie}], "pairs": [{pair_id, image_a, image_b}]}``.
  The human score of an image is its **win rate** per criterion: wins plus half the ties over its votes,
  pooled over every pair it appears in. A Bradley-Terry strength per image would add nothing here: an
  image met only by its partner has strength ``log(w / (1 - w))``, a monotone function of the win rate
  (identical Spearman). Votes also give a **pairwise agreement**: the share of pairs with a strict
  majority in which the metric ranks the two images the same way (a metric tie counts one half).

Each human image is matched to a row of one of the ``scores.csv`` files (from ``cgrpo eval``): by path
(absolute, or relative to the human file's folder or to the scores file's folder), else by
``(method, subject, prompt, seed)``. Without scores files, the reward scores the app's export carries
(``scores_a``/``scores_b``) are used. Correlations are scipy's Pearson and Spearman with paired
percentile-bootstrap 95% intervals (seeded), for every (metric, criterion) pair with at least 3 images.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cgrpo.eval.analyses import plt, save_figure
from cgrpo.eval.metrics import info
from cgrpo.eval.runner import BASE_COLUMNS, parse_score, read_scores
from cgrpo.eval.stats import DEFAULT_RESAMPLES, correlation, win_rate
from cgrpo.io import atomic_write_json, atomic_write_text

CRITERIA = ("identity", "prompt", "overall")
_CRITERION_ALIASES = {
    "identity": "identity",
    "id": "identity",
    "id_preservation": "identity",
    "fidelity": "identity",
    "prompt": "prompt",
    "prompt_following": "prompt",
    "text": "prompt",
    "overall": "overall",
    "quality": "overall",
}


def normalise_criterion(name: str) -> str:
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    if key not in _CRITERION_ALIASES:
        raise ValueError(f"unknown criterion {name!r}: expected one of identity, prompt, overall")
    return _CRITERION_ALIASES[key]


@dataclass
class HumanImage:
    """One judged image: where to find it, and its human score per criterion."""

    paths: list[Path]
    meta: tuple[str, str, str, str] | None  # (method, subject, prompt, seed)
    given: list[str] = field(default_factory=list)  # the path texts as written in the human file
    scores: dict[str, float] = field(default_factory=dict)
    votes: dict[str, int] = field(default_factory=dict)


@dataclass
class HumanJudgements:
    images: dict[str, HumanImage]
    measure: str  # "win_rate" or "mean_rating"
    # (image id a, image id b, criterion, human majority: +1 a, -1 b) for pairs with a strict majority.
    decided_pairs: list[tuple[str, str, str, int]] = field(default_factory=list)
    # Reward scores the pairs carry, by (method, subject, prompt, seed) (the app's export has them).
    embedded_scores: dict[tuple[str, str, str, str], dict[str, float]] = field(default_factory=dict)


def _candidates(path_text: str, bases: Sequence[Path]) -> list[Path]:
    path = Path(path_text)
    if path.is_absolute():
        return [path.resolve()]
    return [(base / path).resolve() for base in bases]


def load_ratings(path: str | Path) -> HumanJudgements:
    """A ratings CSV (``image, criterion, human_score``, more columns allowed) -> mean score per image."""
    path = Path(path)
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"image", "criterion", "human_score"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        sums: dict[tuple[str, str], list[float]] = defaultdict(list)
        for row in reader:
            sums[(row["image"], normalise_criterion(row["criterion"]))].append(float(row["human_score"]))
    images: dict[str, HumanImage] = {}
    for (image, criterion), values in sums.items():
        entry = images.setdefault(image, HumanImage(_candidates(image, [path.parent]), None, [image]))
        entry.scores[criterion] = float(np.mean(values))
        entry.votes[criterion] = len(values)
    return HumanJudgements(images, "mean_rating")


def _flatten_votes(data: Any) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """(votes, pairs by id) of a human-evaluation JSON: the app's export (``pairs[].votes[]`` with
    ``choice``), or ``{"votes": [...], "pairs": [...]}`` with ``winner``, or a plain list of votes."""
    if isinstance(data, list):
        return data, {}
    pairs = {str(p["pair_id"]): p for p in data.get("pairs", [])}
    if "votes" in data:
        return data["votes"], pairs
    votes = []
    for pair_id, pair in pairs.items():
        meta = {k: v for k, v in pair.items() if k != "votes"}
        votes += [{**meta, **vote, "pair_id": pair_id} for vote in pair.get("votes", [])]
    return votes, pairs


def _votes_from_csv(path: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The app's per-vote CSV export (``pair_id, ..., criterion, choice, ..., score_a.<r>, score_b.<r>``)."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    pairs: dict[str, dict[str, Any]] = {}
    for row in rows:
        pair = pairs.setdefault(str(row["pair_id"]), {k: row[k] for k in row if not k.startswith("score_")})
        for side in ("a", "b"):
            scores = {
                k.split(".", 1)[1]: parse_score(v)
                for k, v in row.items()
                if k.startswith(f"score_{side}.") and v
            }
            pair.setdefault(f"scores_{side}", {}).update(scores)
    return rows, pairs


def _choice(vote: dict[str, Any], where: Path) -> str:
    # The app writes `choice` (a/b/tie) and `winner` as the method's name; other exports: `winner` a/b/tie.
    choice = str(vote.get("choice") or vote.get("winner", "")).lower()
    if choice not in ("a", "b", "tie"):
        raise ValueError(
            f"{where}: vote on pair {vote.get('pair_id')} has choice {choice!r}; expected a, b or tie"
        )
    return choice


def load_votes(path: str | Path) -> HumanJudgements:
    """Pairwise votes (the app's JSON or CSV export) -> win rate per image and criterion, the decided
    pairs, and the reward scores the pairs carry (``scores_a``/``scores_b``)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        votes, pairs = _flatten_votes(json.loads(path.read_text()))
    else:
        votes, pairs = _votes_from_csv(path)
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])  # (pair, criterion): a, b, tie
    sides: dict[str, dict[str, Any]] = {}
    for vote in votes:
        pair_id = str(vote["pair_id"])
        sides[pair_id] = {**pairs.get(pair_id, {}), **vote}
        choice = _choice(vote, path)
        counts[(pair_id, normalise_criterion(vote["criterion"]))][("a", "b", "tie").index(choice)] += 1

    embedded: dict[tuple[str, str, str, str], dict[str, float]] = {}

    def image_id(pair: dict[str, Any], side: str) -> tuple[str, HumanImage]:
        method = pair.get(f"method_{side}")
        fields_ = (method, pair.get("subject"), pair.get("prompt"), pair.get("seed"))
        meta = tuple(str(v) for v in fields_) if None not in fields_ else None
        if meta and pair.get(f"scores_{side}"):
            embedded[meta] = {k: parse_score(v) for k, v in pair[f"scores_{side}"].items()}
        image = pair.get(f"image_{side}")
        paths = _candidates(str(image), [path.parent]) if image else []
        key = "|".join(meta) if meta else (str(paths[0]) if paths else f"{pair['pair_id']}:{side}")
        return key, HumanImage(paths, meta, [str(image)] if image else [])

    tallies: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # wins, losses, ties
    images: dict[str, HumanImage] = {}
    decided = []
    for (pair_id, criterion), (a, b, tie) in counts.items():
        pair = sides[pair_id]
        key_a, image_a = image_id(pair, "a")
        key_b, image_b = image_id(pair, "b")
        images.setdefault(key_a, image_a)
        images.setdefault(key_b, image_b)
        for key, won, lost in ((key_a, a, b), (key_b, b, a)):
            tally = tallies[(key, criterion)]
            tally[0] += won
            tally[1] += lost
            tally[2] += tie
        if a != b:
            decided.append((key_a, key_b, criterion, 1 if a > b else -1))
    for (key, criterion), (won, lost, tie) in tallies.items():
        images[key].scores[criterion] = win_rate(won, lost, tie)
        images[key].votes[criterion] = int(won + lost + tie)
    return HumanJudgements(images, "win_rate", decided, embedded)


def load_human(path: str | Path) -> HumanJudgements:
    """Ratings CSV (``human_score`` column) or pairwise votes (the app's JSON or CSV export)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: pass the human-evaluation results.json or a ratings CSV"
        )
    if path.suffix.lower() == ".json":
        return load_votes(path)
    with path.open(newline="") as handle:
        columns = set(csv.DictReader(handle).fieldnames or [])
    return load_votes(path) if "choice" in columns else load_ratings(path)


def _embedded_index(
    embedded: dict[tuple[str, str, str, str], dict[str, float]],
) -> tuple[dict[Any, dict[str, Any]], list[str]]:
    """The reward scores carried by the pairs, keyed like :func:`_score_index` rows."""
    metrics = list(dict.fromkeys(m for scores in embedded.values() for m in scores))
    return {meta: dict(scores) for meta, scores in embedded.items()}, metrics


def _score_index(
    score_files: Sequence[str | Path],
) -> tuple[dict[Any, dict[str, Any]], list[str], list[Path]]:
    """Rows of every scores file keyed by resolved image path and by (method, subject, prompt, seed)."""
    index: dict[Any, dict[str, Any]] = {}
    metrics: list[str] = []
    bases = []
    for file in score_files:
        file = Path(file)
        rows = read_scores(file)
        if not rows:
            raise ValueError(f"{file}: no score rows (expected a scores.csv written by `cgrpo eval`)")
        bases.append(file.parent.resolve())
        for name in rows[0]:
            numeric = any(np.isfinite(parse_score(row.get(name))) for row in rows)
            if name not in BASE_COLUMNS and name not in metrics and numeric:
                metrics.append(name)
        for row in rows:
            image = Path(row["image"])
            index[(image if image.is_absolute() else file.parent / image).resolve()] = row
            index[(row.get("method", ""), row["subject"], row["prompt"], str(row["seed"]))] = row
    return index, metrics, bases


def _match(
    image: HumanImage, index: dict[Any, dict[str, Any]], bases: Sequence[Path]
) -> dict[str, Any] | None:
    """The scores row of a judged image: by path (as resolved against the human file's folder, then against
    each scores file's folder, since the app may copy ``scores.csv`` paths verbatim), else by metadata."""
    candidates: list[Any] = list(image.paths)
    candidates += [(b / t).resolve() for b in bases for t in image.given if not Path(t).is_absolute()]
    if image.meta:
        candidates.append(image.meta)
    for key in candidates:
        if key in index:
            return index[key]
    return None


def correlation_analysis(
    human: str | Path,
    scores: Sequence[str | Path] | None,
    out: str | Path,
    metrics: Sequence[str] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Correlate each metric of ``scores`` with the human judgements -> ``correlation.{json,md,png}``."""
    out = Path(out)
    human_path = Path(human)
    judgements = load_human(human_path)
    if scores:
        index, available, bases = _score_index(scores)
    elif judgements.embedded_scores:
        (index, available), bases = _embedded_index(judgements.embedded_scores), []
    else:
        raise ValueError(f"{human_path} carries no reward scores: pass --scores <eval folder>/scores.csv")
    metrics = list(metrics) if metrics else available
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise KeyError(
            f"metric(s) {', '.join(unknown)} are not in the scores; available: {', '.join(available)}"
        )

    matched: dict[str, dict[str, Any]] = {}
    unmatched = []
    for key, image in judgements.images.items():
        row = _match(image, index, bases)
        if row is None:
            unmatched.append(key)
        else:
            matched[key] = row
    if not matched:
        raise ValueError(
            f"no judged image of {human_path} matches a row of the scores files; check that the paths or "
            "(method, subject, prompt, seed) agree"
        )

    criteria = [c for c in CRITERIA if any(c in judgements.images[k].scores for k in matched)]
    results = []
    for metric in metrics:
        for criterion in criteria:
            keys = [k for k in matched if criterion in judgements.images[k].scores]
            x = [parse_score(matched[k].get(metric)) for k in keys]
            y = [judgements.images[k].scores[criterion] for k in keys]
            if sum(np.isfinite(x)) < 3:
                continue
            entry: dict[str, Any] = {
                "metric": metric,
                "label": info(metric).label,
                "metric_criterion": info(metric).criterion,
                "criterion": criterion,
                "n": int(sum(np.isfinite(x))),
                "pearson": correlation(x, y, "pearson", n_resamples=n_resamples, seed=seed).as_dict("value"),
                "spearman": correlation(x, y, "spearman", n_resamples=n_resamples, seed=seed).as_dict(
                    "value"
                ),
                "x": x,
                "y": y,
            }
            agreement = _pairwise_agreement(judgements, matched, metric, criterion)
            if agreement is not None:
                entry["pairwise_agreement"] = agreement
            results.append(entry)

    result = {
        "human": str(human_path),
        "scores": [str(s) for s in scores] if scores else "embedded in the human-evaluation export",
        "measure": judgements.measure,
        "n_images": len(judgements.images),
        "n_matched": len(matched),
        "unmatched": unmatched[:50],
        "ci": {
            "confidence": 0.95,
            "method": "paired percentile bootstrap",
            "resamples": n_resamples,
            "seed": seed,
        },
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    _plot_correlation(result, out / "correlation.png")
    atomic_write_text(out / "correlation.md", correlation_table(result))
    atomic_write_json(out / "correlation.json", result)
    return result


def _pairwise_agreement(
    judgements: HumanJudgements, matched: dict[str, dict[str, Any]], metric: str, criterion: str
) -> dict[str, float] | None:
    hits, n = 0.0, 0
    for key_a, key_b, crit, majority in judgements.decided_pairs:
        if crit != criterion or key_a not in matched or key_b not in matched:
            continue
        a, b = parse_score(matched[key_a].get(metric)), parse_score(matched[key_b].get(metric))
        if not (np.isfinite(a) and np.isfinite(b)):
            continue
        n += 1
        hits += 0.5 if a == b else float(np.sign(a - b) == majority)
    return {"value": hits / n, "n_pairs": n} if n else None


def _cell(entry: dict[str, Any] | None, name: str) -> str:
    if entry is None:
        return "-"
    stat = entry[name]
    if not np.isfinite(stat["value"]):
        return "n/a"
    if stat["ci_low"] is None or not np.isfinite(stat["ci_low"]):
        return f"{stat['value']:.2f}"
    return f"{stat['value']:.2f} [{stat['ci_low']:.2f}, {stat['ci_high']:.2f}]"


def correlation_table(result: dict[str, Any]) -> str:
    """Table 6's layout: one row per metric, Pearson and Spearman per criterion, 95% CIs in brackets."""
    criteria = [c for c in CRITERIA if any(e["criterion"] == c for e in result["results"])]
    names = {"identity": "ID preservation", "prompt": "Prompt following", "overall": "Overall"}
    header = (
        "| Reward model | " + " | ".join(f"{names[c]} Pears. | {names[c]} Spear." for c in criteria) + " |"
    )
    lines = [
        "# Reward-human correlation",
        "",
        f"Human measure: {result['measure'].replace('_', ' ')}; {result['n_matched']} of "
        f"{result['n_images']} judged images matched to scores. Coefficient [95% paired bootstrap interval].",
        "",
        header,
        "|---|" + "---:|---:|" * len(criteria),
    ]
    metrics = list(dict.fromkeys(e["metric"] for e in result["results"]))
    for metric in metrics:
        entries = {e["criterion"]: e for e in result["results"] if e["metric"] == metric}
        label = next(iter(entries.values()))["label"]
        cells = " | ".join(
            f"{_cell(entries.get(c), 'pearson')} | {_cell(entries.get(c), 'spearman')}" for c in criteria
        )
        lines.append(f"| {label} | {cells} |")
    agreements = [e for e in result["results"] if "pairwise_agreement" in e]
    if agreements:
        lines += ["", "Pairwise agreement with the human majority (pairs with a strict majority):", ""]
        lines += ["| Reward model | Criterion | Agreement | Pairs |", "|---|---|---:|---:|"]
        for e in agreements:
            a = e["pairwise_agreement"]
            lines.append(f"| {e['label']} | {e['criterion']} | {a['value']:.2f} | {a['n_pairs']} |")
    return "\n".join(lines) + "\n"


def _plot_correlation(result: dict[str, Any], path: Path) -> Path:
    entries = result["results"]
    metrics = list(dict.fromkeys(e["metric"] for e in entries)) or ["-"]
    criteria = list(dict.fromkeys(e["criterion"] for e in entries)) or ["-"]
    fig, axes = plt.subplots(
        len(metrics), len(criteria), figsize=(3.4 * len(criteria), 2.8 * len(metrics)), squeeze=False
    )
    for i, metric in enumerate(metrics):
        for j, criterion in enumerate(criteria):
            ax = axes[i][j]
            entry = next((e for e in entries if e["metric"] == metric and e["criterion"] == criterion), None)
            if entry is None:
                ax.axis("off")
                continue
            ax.scatter(entry["x"], entry["y"], s=10, alpha=0.6)
            ax.set_title(
                f"{entry['label']} vs {criterion}: r={entry['pearson']['value']:.2f}, "
                f"ρ={entry['spearman']['value']:.2f}",
                fontsize=8,
            )
            ax.set_xlabel(entry["label"], fontsize=8)
            ax.set_ylabel(result["measure"].replace("_", " "), fontsize=8)
            ax.grid(alpha=0.3)
    return save_figure(fig, path)
