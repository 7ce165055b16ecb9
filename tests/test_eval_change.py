"""`cgrpo eval change`: the per-image change between two evaluations of the same images."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from cgrpo.data.miniworld import PromptSpec, format_prompt
from cgrpo.eval.change import asked_labels, change_summary, check_pairs, paired_change
from cgrpo.eval.runner import write_scores


def test_paired_change_in_closed_form():
    # the NaN pair is left out; the differences 0.1, 0.2, 0.0 have mean 0.1 and sample std 0.1
    change = paired_change([0.1, 0.2, 0.3, math.nan], [0.2, 0.4, 0.3, 0.5])
    assert change["n"] == 3
    assert change["before"] == pytest.approx(0.2)
    assert change["after"] == pytest.approx(0.3)
    assert change["change"] == pytest.approx(0.1)
    assert change["ci95"] == pytest.approx(1.96 * 0.1 / math.sqrt(3))
    assert math.isnan(paired_change([0.5], [0.7])["ci95"])
    with pytest.raises(ValueError, match="length"):
        paired_change([0.1], [0.1, 0.2])


@given(
    st.lists(st.floats(0.0, 1.0), min_size=3, max_size=30),
    st.floats(-0.5, 0.5),
)
def test_a_constant_shift_is_measured_exactly(scores, shift):
    # every image moved by the same amount: the change is the shift and its interval is zero
    change = paired_change(scores, [s + shift for s in scores])
    assert change["change"] == pytest.approx(shift, abs=1e-9)
    assert change["ci95"] == pytest.approx(0.0, abs=1e-9)


def test_asked_labels_name_every_attribute_a_prompt_asks_for():
    spec = PromptSpec(
        "heart",
        background="on the beach",
        position="top left",
        size="small",
        color="teal",
        pattern="stripes",
        upside_down=True,
    )
    assert asked_labels(format_prompt(spec)) == [
        "background: on the beach",
        "position: top left",
        "size: small",
        "color: teal",
        "pattern: stripes",
        "upside down",
    ]
    assert asked_labels(format_prompt(PromptSpec("heart"))) == []
    assert asked_labels("a photo of sks dog on the moon") == []  # not a mini-world prompt


def _rows(prompts_and_scores, seed_offset=0):
    rows = []
    for index, (category, prompt, identity, follow) in enumerate(prompts_and_scores):
        rows.append(
            {
                "method": "m",
                "subject": f"s{index % 2}",
                "class": "heart",
                "category": category,
                "kind": category,
                "prompt": prompt,
                "seed": index + seed_offset,
                "image": f"images/{index}.png",
                "reference": "references/r.png",
                "mini_id": identity,
                "mini_prompt": follow,
            }
        )
    return rows


TEAL = format_prompt(PromptSpec("heart", color="teal"))
STRIPED = format_prompt(PromptSpec("heart", pattern="stripes"))
PLAIN = format_prompt(PromptSpec("heart"))


def test_change_summary_groups_by_category_and_asked_attribute():
    before = _rows(
        [("property", TEAL, 0.9, 0.3), ("property", STRIPED, 0.8, 0.4), ("plain", PLAIN, 0.9, 0.9)]
    )
    after = _rows([("property", TEAL, 0.7, 0.3), ("property", STRIPED, 0.8, 0.6), ("plain", PLAIN, 0.9, 0.9)])
    summary = change_summary(before, after, ["mini_id", "mini_prompt"])
    assert list(summary) == [
        "all",
        "category: plain",
        "category: property",
        "asked: color: teal",
        "asked: pattern: stripes",
    ]  # kinds equal the categories here, so they get no groups of their own
    assert summary["asked: pattern: stripes"]["mini_prompt"]["change"] == pytest.approx(0.2)
    assert summary["asked: color: teal"]["mini_id"]["change"] == pytest.approx(-0.2)
    assert summary["category: property"]["mini_prompt"]["change"] == pytest.approx(0.1)
    assert summary["all"]["mini_id"]["n"] == 3


def test_pairs_must_be_the_same_images():
    before = _rows([("plain", PLAIN, 0.9, 0.9)] * 2)
    check_pairs(before, before, ("a", "b"))
    with pytest.raises(ValueError, match="b has 1"):
        check_pairs(before, before[:1], ("a", "b"))
    with pytest.raises(ValueError, match="image 0 differs.*seed"):
        check_pairs(before, _rows([("plain", PLAIN, 0.9, 0.9)] * 2, seed_offset=5), ("a", "b"))


def test_cli_writes_the_change_of_two_evaluation_folders(tmp_path):
    from cgrpo.cli import app

    metrics = ["mini_id", "mini_prompt"]
    base, trained = tmp_path / "base", tmp_path / "trained"
    write_scores(
        base / "scores.csv", _rows([("property", STRIPED, 0.8, 0.4), ("plain", PLAIN, 0.9, 0.9)]), metrics
    )
    write_scores(
        trained / "scores.csv", _rows([("property", STRIPED, 0.7, 0.7), ("plain", PLAIN, 0.95, 0.9)]), metrics
    )
    result = CliRunner().invoke(
        app, ["eval", "change", str(base), str(trained), "--out", str(tmp_path / "c")]
    )
    assert result.exit_code == 0, result.output
    groups = json.loads((tmp_path / "c" / "change.json").read_text())["groups"]
    assert groups["asked: pattern: stripes"]["mini_prompt"]["change"] == pytest.approx(0.3)
    assert groups["all"]["mini_id"]["change"] == pytest.approx(-0.025)
    assert "| asked: pattern: stripes | 1 |" in (tmp_path / "c" / "change.md").read_text()

    # a folder of other images is refused with its name, nothing written
    other = tmp_path / "other"
    write_scores(other / "scores.csv", _rows([("plain", PLAIN, 0.9, 0.9)]), metrics)
    result = CliRunner().invoke(app, ["eval", "change", str(base), str(other), "--out", str(tmp_path / "d")])
    assert result.exit_code != 0
    assert "other has 1" in result.output
    assert not (tmp_path / "d").exists()
    result = CliRunner().invoke(app, ["eval", "change", str(base), str(tmp_path / "missing")])
    assert result.exit_code != 0 and "no scores.csv" in result.output
