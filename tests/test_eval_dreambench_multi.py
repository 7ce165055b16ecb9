"""`cgrpo eval dreambench --multi` end to end on CPU: tiny random policy and metric models, the real protocol
file, a 2-pair x 2-prompt subset; and the protocol reader's validation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cgrpo.data.dreambench import multi_subject_examples
from cgrpo.data.formats import DatasetError
from cgrpo.eval import metrics as metric_module
from cgrpo.eval import runner
from cgrpo.eval.cli import eval_app
from cgrpo.eval.runner import load_image, square_resize
from cgrpo.rewards import build
from cgrpo.train.subjects import reference_list


def _root() -> Path:
    """The project's DreamBench copy: shared/data/dreambench beside the checkout (or a worktree's parent)."""
    for base in Path(__file__).resolve().parents:
        if (base / "shared" / "data" / "dreambench" / "multi_subject.json").is_file():
            return base / "shared" / "data" / "dreambench"
    return Path("/nonexistent")


ROOT = _root()
pytestmark = pytest.mark.skipif(not (ROOT / "multi_subject.json").is_file(), reason="no DreamBench copy")
PAIRS = "backpack_dog+bear_plushie,cat+dog"


def _args(eval_models, seg_models, out, *extra):
    return [
        "dreambench",
        "--multi",
        "--out",
        str(out),
        "--policy",
        "mini",
        "-P",
        f"path={eval_models['policy']}",
        "--dreambench-root",
        str(ROOT),
        "--pairs",
        PAIRS,
        "--prompts-per-subject",
        "2",
        "--images-per-prompt",
        "2",
        "--metrics",
        "dino,clip_t,dino_seg",
        "-M",
        f"dino.path={eval_models['dino']['path']}",
        "-M",
        f"clip.path={eval_models['clip']['path']}",
        *[arg for key, value in seg_models.items() for arg in ("-M", f"dino_seg.{key}={value}")],
        "--steps",
        "2",
        "--batch-size",
        "3",
        "--device",
        "cpu",
        *extra,
    ]


def test_the_protocol_file_is_uno_30_pairs_of_25_prompts():
    items = multi_subject_examples(ROOT)
    assert len(items) == 750 and len({item.pair for item in items}) == 30
    first = items[0]
    assert first.subjects == ("backpack_dog", "bear_plushie")
    assert first.subject_classes == ("backpack", "stuffed animal")
    assert first.prompt == "a backpack and a stuffed animal in the jungle" and first.prompt_type == "context"
    assert all(path.is_file() for item in items for path in item.references)
    kinds = {(item.category, item.prompt_type) for item in items}
    assert (
        ("live", "accessory") in kinds and ("object", "property") in kinds and ("mixed", "context") in kinds
    )
    chosen = multi_subject_examples(ROOT, pairs=["cat+dog"], prompts_per_pair=3)
    assert [item.id for item in chosen] == ["cat+dog/00", "cat+dog/01", "cat+dog/02"]


def test_bad_protocol_entries_are_named(tmp_path):
    protocol = tmp_path / "multi.json"
    protocol.write_text(
        json.dumps(
            [
                {"prompt": "a dog and a cat", "references": ["dog/02.jpg", "cat/04.jpg"]},
                {"prompt": "a dog alone", "references": ["dog/02.jpg"]},
                {"prompt": "a unicorn and a dog", "references": ["unicorn/00.jpg", "dog/02.jpg"]},
                {"prompt": "a dog and a cat", "references": ["dog/99.jpg", "cat/04.jpg"]},
                {"prompt": "", "references": ["dog/02.jpg", "cat/04.jpg"]},
                {"prompt": "x", "references": ["dog/02.jpg", "cat/04.jpg"], "subject": "dog"},
            ]
        )
    )
    with pytest.raises(DatasetError) as error:
        multi_subject_examples(ROOT, protocol)
    text = str(error.value)
    assert "entry 0" not in text
    assert "entry 1 ('a dog alone'): 'references' must be a list of 2-4" in text
    assert "entry 2 ('a unicorn and a dog'): unicorn/00.jpg not in a DreamBench subject folder" in text
    assert "entry 3" in text and "dog/99.jpg not found" in text
    assert "entry 4: 'prompt' must be a non-empty string" in text
    assert "entry 5: unknown key(s) subject" in text
    protocol.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        multi_subject_examples(ROOT, protocol)
    with pytest.raises(DatasetError, match="unknown subject pair"):
        multi_subject_examples(ROOT, pairs=["dog+unicorn"])


def test_multi_dreambench_end_to_end_and_resume(eval_models, seg_models, tmp_path, monkeypatch):
    conditioned, built = [], []
    real_generate, real_build = runner.generate_images, metric_module.build_metric

    def counting_generate(policy, prompts, references, seeds, sigmas):
        conditioned.append([tuple(r.shape) for r in reference_list(references)])
        return real_generate(policy, prompts, references, seeds, sigmas)

    def counting_build(name, options=None, device=None):
        built.append(name)
        return real_build(name, options, device)

    monkeypatch.setattr(runner, "generate_images", counting_generate)
    monkeypatch.setattr(metric_module, "build_metric", counting_build)
    out = tmp_path / "eval"
    cli = CliRunner()
    result = cli.invoke(eval_app, _args(eval_models, seg_models, out))
    assert result.exit_code == 0, result.output
    assert sum(shapes[0][0] for shapes in conditioned) == 8  # 2 pairs x 2 prompts x 2 images
    assert all(len(shapes) == 2 for shapes in conditioned)  # both references of every case
    assert sorted(built) == ["clip_t", "dino", "dino_seg"]
    assert len(sorted(out.glob("images/*/*/*.png"))) == 8

    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and {r["subject"] for r in rows} == set(PAIRS.split(","))
    for column in (
        "dino",
        "dino_s1",
        "dino_s2",
        "dino_min",
        "clip_t",
        "dino_seg_missing",
        "dino_seg_confused",
    ):
        assert column in rows[0]
    assert "clip_t_s1" not in rows[0]  # prompt metrics are scored once per image

    # Each image was scored against each of its two references, and the metric is their mean (UNO).
    dino = build("dino", **eval_models["dino"])
    for row in rows[:3]:
        image = load_image(out / row["image"])[None]
        first, second = (Path(p) for p in row["reference"].split(";"))
        assert first.parent.name + "+" + second.parent.name == row["subject"]
        for column, path in (("dino_s1", first), ("dino_s2", second)):
            reference = square_resize(load_image(path), image.shape[-1])[None]
            assert float(row[column]) == pytest.approx(
                dino(image, reference, [row["prompt"]]).item(), abs=1e-5
            )
        s1, s2 = float(row["dino_s1"]), float(row["dino_s2"])
        assert float(row["dino"]) == pytest.approx((s1 + s2) / 2, abs=1e-5)
        assert float(row["dino_min"]) == pytest.approx(min(s1, s2), abs=1e-5)
    assert all(0 <= int(r["dino_seg_missing"]) <= 2 and 0 <= int(r["dino_seg_confused"]) <= 2 for r in rows)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "dreambench_multi" and summary["n_pairs"] == 2 and summary["num_subjects"] == 2
    assert set(summary["per_subject"]) == {"1", "2"} and set(summary["per_subject"]["1"]) == {
        "dino",
        "dino_seg",
    }
    s1 = [float(r["dino_s1"]) for r in rows]
    assert summary["per_subject"]["1"]["dino"]["mean"] == pytest.approx(sum(s1) / len(s1), rel=1e-5)
    weakest = [float(r["dino_min"]) for r in rows]
    assert summary["weakest"]["dino"]["mean"] == pytest.approx(sum(weakest) / len(weakest), rel=1e-5)
    failures = summary["failures"]
    assert list(failures) == ["dino_seg"] and failures["dino_seg"]["n_images"] == 8
    assert failures["dino_seg"]["missing"] == sum(int(r["dino_seg_missing"]) for r in rows)
    assert failures["dino_seg"]["confused"] == sum(int(r["dino_seg_confused"]) for r in rows)
    assert set(summary["per_category"]) == {"object", "live"}
    table = (out / "table.md").read_text()
    assert "| subject 1 |" in table and "| weakest |" in table and "missing subjects" in table
    assert (out / "samples.png").is_file()

    # Resume: nothing generated, nothing scored again.
    conditioned.clear(), built.clear()
    result = cli.invoke(eval_app, _args(eval_models, seg_models, out))
    assert result.exit_code == 0, result.output
    assert conditioned == [] and built == []
    with (out / "scores.csv").open() as handle:
        assert [r["dino_s2"] for r in csv.DictReader(handle)] == [r["dino_s2"] for r in rows]


def test_missing_and_confused_images_are_framed_in_the_grid(tmp_path):
    image = torch.full((3, 16, 16), 0.5)
    framed = runner._framed(image, runner.MISSING_COLOUR)
    assert framed[:, 0, 5].tolist() == [1.0, 0.0, 0.0] and framed[:, 8, 8].tolist() == [0.5, 0.5, 0.5]


def test_multi_only_options_need_multi(eval_models, seg_models, tmp_path):
    args = _args(eval_models, seg_models, tmp_path / "e")
    args.remove("--multi")
    result = CliRunner().invoke(eval_app, args)
    assert result.exit_code == 2 and "--multi" in result.output
    result = CliRunner().invoke(
        eval_app, [*_args(eval_models, seg_models, tmp_path / "e"), "--subjects", "dog"]
    )
    assert result.exit_code == 2 and "--pairs" in result.output
