"""Results of a study: what the admin page shows and what ``cgrpo humaneval export`` writes.

JSON (``--out results.json``), format ``cgrpo-humaneval-results/1``::

    {"format": "cgrpo-humaneval-results/1", "generated_at": "2025-01-01T00:00:00.000+00:00",
     "bootstrap": {"n": 2000, "seed": 0, "level": 0.95, "unit": "pair"},
     "criteria": ["identity", "prompt", "overall"],
     "comparisons": [{"method_a": "customized-grpo", "method_b": "uno", "n_pairs": 200,
        "criteria": {"identity": {
            "shares": {"n_votes": 1600, "n_pairs": 200, "counts": {"a": 864, "tie": 400, "b": 336},
                       "win": 0.54, "tie": 0.25, "loss": 0.21,          # win = method A judged better
                       "win_ci": [0.50, 0.58], "tie_ci": [...], "loss_ci": [...]},
            "agreement": {"n_items": 200, "n_ratings": 1600, "percent_agreement": 0.61,
                          "fleiss_kappa": 0.38, "krippendorff_alpha": 0.38}}, ...}}],
     "annotators": [{"name": "ann1", "invited_at": "...", "pairs_done": 200, "votes": 600,
                     "first_vote_at": "...", "last_vote_at": "..."}],
     "pairs": [{"pair_id": "9c0f3e1a2b4d6e8f", "subject": "dog", "prompt": "...", "seed": 0,
                "method_a": "...", "method_b": "...", "scores_a": {"dino_seg": 0.81, "hpsv3": 8.1},
                "scores_b": {...},
                "preference": {"identity": 0.5, ...},   # (#A - #B) / #votes in [-1, 1]; null if no vote
                "votes": [{"annotator": "ann1", "criterion": "identity", "choice": "a",
                           "a_on_left": true, "elapsed_ms": 5400, "created_at": "..."}]}]}

For a reward-human correlation, correlate ``preference[criterion]`` of each pair with the reward
difference ``scores_a[r] - scores_b[r]`` (e.g. identity with ``dino_seg``, prompt with ``hpsv3``).

CSV (``--out results.csv``): one row per vote with the columns ``pair_id, subject, prompt, seed,
method_a, method_b, annotator, criterion, choice, winner, a_on_left, elapsed_ms, created_at`` and then
``score_a.<name>`` and ``score_b.<name>`` for every reward score of the pairs (``choice`` is a/tie/b;
``winner`` is the method's name or ``tie``). The summary statistics are only in the JSON. A text cell that
starts with ``=``, ``+``, ``-``, ``@``, tab or carriage return gets a leading ``'`` so that a spreadsheet
shows it as text instead of running it as a formula (numbers are written as they are); lines end in CRLF
(RFC 4180), so that a line break inside a quoted prompt stays inside its cell.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path

from cgrpo.humaneval.stats import summarise
from cgrpo.humaneval.store import CRITERIA, Store
from cgrpo.io import atomic_write_text

FORMAT = "cgrpo-humaneval-results/1"
CSV_COLUMNS = (
    "pair_id",
    "subject",
    "prompt",
    "seed",
    "method_a",
    "method_b",
    "annotator",
    "criterion",
    "choice",
    "winner",
    "a_on_left",
    "elapsed_ms",
    "created_at",
)


def build_results(store: Store, *, n_boot: int = 2000, seed: int = 0) -> dict[str, object]:
    pairs = store.pairs()
    votes = store.votes()
    votes_by_pair: dict[str, list[dict[str, object]]] = {pair.pair_id: [] for pair in pairs}
    for vote in votes:
        votes_by_pair[vote.pair_id].append(
            {
                "annotator": vote.annotator,
                "criterion": vote.criterion,
                "choice": vote.choice,
                "a_on_left": vote.a_on_left,
                "elapsed_ms": vote.elapsed_ms,
                "created_at": vote.created_at,
            }
        )
    comparisons: dict[tuple[str, str], list[str]] = {}
    for pair in pairs:
        comparisons.setdefault((pair.method_a, pair.method_b), []).append(pair.pair_id)
    comparison_results = []
    for (method_a, method_b), pair_ids in comparisons.items():
        triples = [(pid, v["criterion"], v["choice"]) for pid in pair_ids for v in votes_by_pair[pid]]
        comparison_results.append(
            {
                "method_a": method_a,
                "method_b": method_b,
                "n_pairs": len(pair_ids),
                "criteria": summarise(triples, CRITERIA, n_boot=n_boot, seed=seed),
            }
        )
    pair_results = []
    for pair in pairs:
        pair_votes = votes_by_pair[pair.pair_id]
        preference: dict[str, float | None] = {}
        for criterion in CRITERIA:
            choices = [v["choice"] for v in pair_votes if v["criterion"] == criterion]
            wins, losses = choices.count("a"), choices.count("b")
            preference[criterion] = (wins - losses) / len(choices) if choices else None
        pair_results.append(
            {
                "pair_id": pair.pair_id,
                "subject": pair.subject,
                "prompt": pair.prompt,
                "seed": pair.seed,
                "method_a": pair.method_a,
                "method_b": pair.method_b,
                "scores_a": pair.scores_a,
                "scores_b": pair.scores_b,
                "preference": preference,
                "votes": pair_votes,
            }
        )
    return {
        "format": FORMAT,
        "generated_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "bootstrap": {"n": n_boot, "seed": seed, "level": 0.95, "unit": "pair"},
        "criteria": list(CRITERIA),
        "comparisons": comparison_results,
        "annotators": store.annotators(),
        "pairs": pair_results,
    }


# OWASP's list of the characters that make a spreadsheet read a cell as a formula.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: object) -> object:
    """Prefix ``'`` to a text cell a spreadsheet would run as a formula (method, prompt, annotator...)."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def results_to_csv(results: dict[str, object]) -> str:
    pairs = results["pairs"]
    score_names = sorted({name for p in pairs for name in [*p["scores_a"], *p["scores_b"]]})
    buffer = io.StringIO()
    # CRLF: the csv module quotes a field only if it holds a character of the line terminator; with "\n"
    # alone a bare "\r" in a prompt would be written unquoted and split the row in a spreadsheet.
    writer = csv.writer(buffer, lineterminator="\r\n")
    header = [*CSV_COLUMNS, *(f"score_a.{n}" for n in score_names), *(f"score_b.{n}" for n in score_names)]
    writer.writerow([spreadsheet_safe(name) for name in header])
    for pair in pairs:
        winners = {"a": pair["method_a"], "b": pair["method_b"], "tie": "tie"}
        for vote in pair["votes"]:
            row = [
                pair["pair_id"],
                pair["subject"],
                pair["prompt"],
                pair["seed"],
                pair["method_a"],
                pair["method_b"],
                vote["annotator"],
                vote["criterion"],
                vote["choice"],
                winners[vote["choice"]],
                "" if vote["a_on_left"] is None else int(vote["a_on_left"]),
                "" if vote["elapsed_ms"] is None else vote["elapsed_ms"],
                vote["created_at"],
                *(pair["scores_a"].get(n, "") for n in score_names),
                *(pair["scores_b"].get(n, "") for n in score_names),
            ]
            writer.writerow([spreadsheet_safe(cell) for cell in row])
    return buffer.getvalue()


def write_results(results: dict[str, object], out: str | Path) -> Path:
    """Write JSON or CSV (chosen by the suffix) atomically."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix == ".json":
        return atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    if suffix == ".csv":
        return atomic_write_text(out, results_to_csv(results))
    raise ValueError(f"output file {out} must end in .json or .csv.")
