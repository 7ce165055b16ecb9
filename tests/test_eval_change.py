"""`cgrpo eval change`: the per-image change between two evaluations of the same images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from cgrpo.cli import app
from cgrpo.data.miniworld import MiniWorld, PromptSpec, format_prompt
from cgrpo.eval.change import asked_labels, change_summary, check_pairs, paired_change
from cgrpo.eval.runner import read_scores, write_scores


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


def _world_eval(out, draw: str, *extra: str):
    """``cgrpo eval mini --draw DRAW`` of 8 held-out subjects x 5 kinds x 2 prompts, one image each."""
    args = ["eval", "mini", "--draw", draw, "--out", str(out), "--num-subjects", "8"]
    return CliRunner().invoke(app, [*args, "--prompts-per-kind", "2", "--images-per-prompt", "1", *extra])


def test_the_worlds_own_images_give_its_conflict_per_kind(tmp_path):
    copy, truth = tmp_path / "copy", tmp_path / "truth"
    for out, draw in ((copy, "copy"), (truth, "ground-truth")):
        result = _world_eval(out, draw)
        assert result.exit_code == 0, result.output
        assert json.loads((out / "eval_config.json").read_text())["policy"] == f"world {draw}"
    examples = {(e.subject_id, e.prompt): e for e in MiniWorld().eval_set(num_subjects=8, prompts_per_kind=2)}
    for out, field in ((copy, "reference"), (truth, "target")):
        rows = read_scores(out / "scores.csv")
        assert len(rows) == 80  # a plain prompt can repeat, so fewer distinct cases
        for row in rows:  # each image is the world's own drawing of its case, as an 8-bit PNG
            image = np.asarray(Image.open(out / row["image"]).convert("RGB"), dtype=np.float32) / 255.0
            expected = getattr(examples[(row["subject"], row["prompt"])], field).permute(1, 2, 0).numpy()
            assert np.abs(image - expected).max() <= 0.5 / 255.0 + 1e-6

    result = CliRunner().invoke(app, ["eval", "change", str(copy), str(truth), "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    groups = json.loads((tmp_path / "c" / "change.json").read_text())["groups"]
    # a plain prompt's ground truth is the reference; a context prompt keeps the subject's pixels
    assert groups["category: plain"]["mini_id"]["change"] == pytest.approx(0.0, abs=1e-6)
    assert groups["category: plain"]["mini_prompt"]["change"] == pytest.approx(0.0, abs=1e-6)
    assert groups["category: context"]["mini_id"]["change"] == pytest.approx(0.0, abs=1e-3)
    assert groups["category: context"]["mini_prompt"]["change"] > 0.5
    # property prompts: the faithful image and the copy differ by >= 0.3 in each reward (issue 14, goal 2)
    assert groups["category: property"]["mini_id"]["change"] <= -0.3
    assert groups["category: property"]["mini_prompt"]["change"] >= 0.3


def test_world_drawings_refuse_policy_options_and_sampled_folders(tmp_path):
    result = _world_eval(tmp_path / "copy", "copy", "--lora", str(tmp_path))
    assert result.exit_code == 2 and "samples no policy" in result.output
    result = _world_eval(tmp_path / "sketch", "sketch")
    assert result.exit_code == 2 and "--draw must be" in result.output
    assert not (tmp_path / "sketch").exists()
    assert _world_eval(tmp_path / "copy", "copy").exit_code == 0
    # the ground truth into the folder of the copies: refused, no image replaced
    images = sorted((tmp_path / "copy" / "images").rglob("*.png"))
    before = [p.read_bytes() for p in images]
    result = _world_eval(tmp_path / "copy", "ground-truth")
    assert result.exit_code == 2 and "world copy" in result.output
    assert [p.read_bytes() for p in images] == before
