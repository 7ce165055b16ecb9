"""`cgrpo humaneval make-pairs`: pairing two evaluation outputs by (subject, prompt, seed)."""

import csv
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from cgrpo.humaneval.cli import app
from cgrpo.humaneval.pairs import PairsError, make_pairs, read_eval_run, read_pairs, write_pairs
from cgrpo.testing.humaneval import grid_keys, write_eval_run

runner = CliRunner()


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    keys = grid_keys(2, 3, seeds=(0, 1))  # 12 images per run
    run_a = write_eval_run(tmp_path / "eval_cgrpo", "customized-grpo", keys)
    # run B lacks one key and has one extra key: only the 11 shared keys are paired.
    run_b = write_eval_run(
        tmp_path / "eval_uno", "uno", keys[1:] + [("subject9", "a photo", 0)], tint=(90, 90, 90)
    )
    return run_a, run_b


def test_cli_pairs_images_by_subject_prompt_seed(runs, tmp_path):
    run_a, run_b = runs
    out = tmp_path / "pairs.jsonl"
    result = runner.invoke(app, ["make-pairs", str(run_a), str(run_b), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 11 pairs (customized-grpo vs uno)" in result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 11
    rows_a, rows_b = read_eval_run(run_a).rows, read_eval_run(run_b).rows
    for line in lines:
        key = (line["subject"], line["prompt"], line["seed"])
        assert line["image_a"] == str(rows_a[key].image) and line["image_b"] == str(rows_b[key].image)
        assert line["reference"] == str(rows_a[key].reference)
        assert (line["method_a"], line["method_b"]) == ("customized-grpo", "uno")
        # numeric columns become scores; the free-text column does not
        assert set(line["scores_a"]) == {"dino_seg", "hpsv3"}
        assert line["scores_b"]["hpsv3"] == pytest.approx(rows_b[key].scores["hpsv3"])
    assert len({line["pair_id"] for line in lines}) == 11
    # ids are stable: building the pairs again gives the same ids
    again = make_pairs(read_eval_run(run_a), read_eval_run(run_b))
    assert [p.pair_id for p in again] == [line["pair_id"] for line in lines]
    assert read_pairs(out) == again


def test_max_pairs_keeps_a_seeded_subset(runs):
    run_a, run_b = read_eval_run(runs[0]), read_eval_run(runs[1])
    first = make_pairs(run_a, run_b, max_pairs=4, seed=1)
    assert len(first) == 4
    assert first == make_pairs(run_a, run_b, max_pairs=4, seed=1)
    assert {p.pair_id for p in first} != {p.pair_id for p in make_pairs(run_a, run_b, max_pairs=4, seed=2)}


def test_method_name_defaults_to_the_directory_name(tmp_path):
    keys = grid_keys(1, 2)
    run = write_eval_run(tmp_path / "my_run", None, keys)
    assert read_eval_run(run).method == "my_run"


def test_dir_without_scores_csv_fails_clearly(runs, tmp_path):
    empty = tmp_path / "not_an_eval"
    empty.mkdir()
    result = runner.invoke(app, ["make-pairs", str(runs[0]), str(empty), "--out", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 2
    assert "has no scores.csv" in result.output and "not_an_eval" in result.output
    assert not (tmp_path / "p.jsonl").exists()


def test_no_matching_pairs_fails_clearly(tmp_path):
    run_a = write_eval_run(tmp_path / "a", "A", grid_keys(1, 2, seeds=(0,)))
    run_b = write_eval_run(tmp_path / "b", "B", grid_keys(1, 2, seeds=(5,)))
    result = runner.invoke(app, ["make-pairs", str(run_a), str(run_b), "--out", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 2
    assert "no (subject, prompt, seed) appears in both" in result.output


def test_bad_runs_are_rejected_with_the_file_named(tmp_path):
    keys = grid_keys(1, 2)
    same_a = write_eval_run(tmp_path / "x", "same", keys)
    same_b = write_eval_run(tmp_path / "y", "same", keys)
    with pytest.raises(PairsError, match="both runs are named 'same'"):
        make_pairs(read_eval_run(same_a), read_eval_run(same_b))
    (same_b / "images" / "0.png").unlink()
    with pytest.raises(PairsError, match=r"scores.csv line 2: image file .*0.png does not exist"):
        read_eval_run(same_b)
    (same_a / "scores.csv").write_text("subject,prompt,image\nx,y,z.png\n")
    with pytest.raises(PairsError, match="lacks the column"):
        read_eval_run(same_a)


def test_read_pairs_validates_each_line(runs, tmp_path):
    pairs = make_pairs(read_eval_run(runs[0]), read_eval_run(runs[1]))
    path = write_pairs(tmp_path / "pairs.jsonl", pairs[:2])
    text = path.read_text()
    path.write_text(text + text.splitlines()[0] + "\n")
    with pytest.raises(PairsError, match="line 3: duplicate pair_id"):
        read_pairs(path)
    record = json.loads(text.splitlines()[0]) | {"pair_id": "../../etc/passwd"}
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(PairsError, match="line 1: pair_id"):
        read_pairs(path)


PNG_OUTSIDE = "outside.png"


def plant(run: Path, kind: str, tmp_path: Path, row: int = 0) -> tuple[str, str, str]:
    """Make data row ``row`` of ``run``'s scores.csv point at something that is not an image of the run.

    Returns (column changed, value written to scores.csv, text the error must name).
    """
    outside = tmp_path / PNG_OUTSIDE
    if not outside.exists():
        Image.new("RGB", (8, 8), (255, 0, 0)).save(outside)
    real_png = (run / "images" / "0.png").read_bytes()
    files = {
        "html": ("images/0.html", b"<script>alert(document.cookie)</script>"),
        "svg": ("images/0.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'),
        "js": ("images/0.js", b"fetch('/admin/results.json')"),
        "html named png": ("images/fake.png", b"<html><script>alert(1)</script></html>"),
        "truncated png": ("images/cut.png", real_png[:60]),
    }
    column, value = "image", None
    if kind == "passwd":
        value = "/etc/passwd"
    elif kind == "symlink out":
        (run / "images" / "link.png").symlink_to(outside)
        value = "images/link.png"
    elif kind == "reference outside":
        column, value = "reference", str(outside)
    else:
        name, content = files[kind]
        (run / name).write_bytes(content)
        value = name
    with open(run / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[row][column] = value
    with open(run / "scores.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return column, value, Path(value).name


BAD_IMAGES = [
    "passwd",
    "symlink out",
    "html",
    "svg",
    "js",
    "html named png",
    "truncated png",
    "reference outside",
]


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_make_pairs_accepts_only_raster_images_inside_the_runs(runs, tmp_path, kind):
    run_a, run_b = runs
    _, _, named = plant(run_b, kind, tmp_path)
    out = tmp_path / "pairs.jsonl"
    result = runner.invoke(app, ["make-pairs", str(run_a), str(run_b), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert named in result.output and "scores.csv line 2" in result.output, result.output
    assert not out.exists()


def test_references_may_come_from_a_folder_named_on_the_command_line(runs, tmp_path):
    run_a, run_b = runs
    plant(run_a, "reference outside", tmp_path, row=1)  # row 0 of run A has no counterpart in run B
    out = tmp_path / "pairs.jsonl"
    args = ["make-pairs", str(run_a), str(run_b), "--out", str(out), "--references", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(tmp_path / PNG_OUTSIDE) in out.read_text()
