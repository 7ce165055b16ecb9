"""Datasets on disk: the JSONL/folder formats, validation messages, DreamBench and SynCD importers, filter."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cgrpo.data.dreambench import dreambench_examples, import_dreambench, parse_prompts_and_classes
from cgrpo.data.formats import DatasetError, load_dataset, read_records
from cgrpo.data.registry import DATASETS
from cgrpo.data.syncd import import_syncd, read_syncd
from cgrpo.data.validate import DatasetWarning, check_dataset, validate_dataset
from cgrpo.data_cli import app, parse_options
from cgrpo.rewards import REWARDS, register, to_tensor
from cgrpo.rewards.filter import filter_dataset, zscore

DREAMBENCH = Path(__file__).resolve().parents[1] / "shared" / "data" / "dreambench"
if not DREAMBENCH.is_dir():
    DREAMBENCH = Path("/work/shared/data/dreambench")
needs_dreambench = pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="no DreamBench copy on this machine")
LIVE = {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}


# ------------------------------------------------------------------------------------------------ helpers


def save(path: Path, size: tuple[int, int] = (16, 16), value: int = 128, mode: str = "RGB", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"RGB": (value, value, value), "L": value, "CMYK": (0, value, 0, 0)}.get(mode, 0)
    Image.new(mode, size, color).save(path, **kw)
    return path


def write_lines(path: Path, rows: list[dict | str]) -> Path:
    text = "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    path.write_text(text)
    return path


def row(record_id: str, **extra) -> dict:
    base = {"id": record_id, "reference": "good.png", "subject_class": "dog", "prompt": "a dog on the beach"}
    return {**base, **extra}


class Brightness:
    """A reward whose order is known: the mean pixel value of each image."""

    name = "test_brightness"

    def __call__(self, images, references, prompts, subjects=None) -> torch.Tensor:
        return to_tensor(images).mean(dim=(1, 2, 3))


class DarkIsNaN(Brightness):
    name = "test_dark_is_nan"

    def __call__(self, images, references, prompts, subjects=None) -> torch.Tensor:
        scores = super().__call__(images, references, prompts, subjects)
        return torch.where(scores < 0.2, torch.full_like(scores, float("nan")), scores)


@pytest.fixture(autouse=True, scope="module")
def _test_rewards():
    """Register the test rewards for this module only, so other tests see the real registry."""
    added = [name for name in ("test_brightness", "test_dark_is_nan") if name not in REWARDS]
    if "test_brightness" in added:
        register("test_brightness")(lambda **options: Brightness())
    if "test_dark_is_nan" in added:
        register("test_dark_is_nan")(lambda **options: DarkIsNaN())
    yield
    for name in added:  # the registry has no public removal; tests are its only reason to need one
        REWARDS._factories.pop(name, None)
        REWARDS._help.pop(name, None)


# ------------------------------------------------------------------------------------------------ formats


def test_jsonl_loads_examples_with_shapes_references_and_split(tmp_path, monkeypatch):
    data = tmp_path / "data"
    save(data / "imgs" / "a0.png", size=(20, 10), value=200)
    save(data / "imgs" / "a1.jpg", size=(12, 12), value=40)
    save(data / "imgs" / "t.png", size=(30, 30))
    jsonl = write_lines(
        data / "train.jsonl",
        [
            row(
                "one",
                reference=["imgs/a0.png", "imgs/a1.jpg"],
                target="imgs/t.png",
                kind="context",
                split="train",
            ),
            "",  # blank lines are allowed
            row(7, reference="imgs/a1.jpg", subject="s1", split="test", meta={"q": 1.5}),
        ],
    )
    monkeypatch.chdir(tmp_path)  # paths resolve against the JSONL's folder, not the working directory
    full = load_dataset(jsonl)
    assert len(full) == 2
    first = full[0]
    assert first.reference.shape == (3, 10, 20) and first.target.shape == (3, 30, 30)
    assert first.reference.dtype == torch.float32 and 0 <= float(first.reference.min()) <= 1
    assert abs(float(first.reference.mean()) - 200 / 255) < 1e-6
    assert first.subject_id == "imgs/a0.png" and first.kind == "context" and first.subject_class == "dog"
    assert full[1].id == "7" and full[1].subject_id == "s1" and full[1].target is None
    assert full.record(1).meta == {"q": 1.5}

    sized = load_dataset(jsonl, image_size=(8, 12))
    assert sized[0].reference.shape == (3, 8, 12) and sized[0].target.shape == (3, 8, 12)
    refs = sized.references(0)
    assert len(refs) == 2 and torch.equal(refs[0], sized[0].reference) and refs[1].shape == (3, 8, 12)
    assert [e.id for e in load_dataset(jsonl, 8, split="test")] == ["7"]
    assert [e.id for e in load_dataset(data, 8, split="train")] == [
        "one",
        "7",
    ]  # ROOT/train.jsonl, all splits
    with pytest.raises(DatasetError, match="no record has split 'val'"):
        load_dataset(jsonl, split="val")

    built = DATASETS.build("jsonl", path=str(jsonl), image_size=8)
    assert len(list(built)) == 2 and built[0].reference.shape == (3, 8, 8)


def test_folder_layout_loads_with_classes_and_prompts(tmp_path):
    root = tmp_path / "subjects"
    (root).mkdir()
    (root / "prompts.txt").write_text(
        "# prompts for every subject\na {class} on the beach\n\na red {class}\n"
    )
    save(root / "dog2" / "ref_b.png", value=10)
    save(root / "dog2" / "ref_a.jpg", value=250)
    save(root / "dog2" / "notes.png")  # not a ref*: ignored
    save(root / "toy_robot" / "ref.png")
    (root / "toy_robot" / "class.txt").write_text("robot toy\n")
    (root / "toy_robot" / "prompts.txt").write_text("a {class} in the snow\n")

    dataset = load_dataset(root, image_size=8)
    assert [e.id for e in dataset] == ["dog2/000", "dog2/001", "toy_robot/000"]
    assert [e.prompt for e in dataset] == ["a dog on the beach", "a red dog", "a robot toy in the snow"]
    assert dataset[0].subject_id == "dog2" and dataset[0].reference.shape == (3, 8, 8)
    assert len(dataset.references(0)) == 2 and float(dataset[0].reference.mean()) > 0.9  # ref_a first
    assert dataset.record(1).line == 4 and dataset.record(1).source.endswith("prompts.txt")

    save(root / "empty_subject" / "photo.png")
    with pytest.raises(DatasetError) as error:
        load_dataset(root)
    assert "empty_subject: no reference images" in str(error.value)


def test_load_dataset_reports_missing_images_by_line(tmp_path):
    save(tmp_path / "good.png")
    jsonl = write_lines(
        tmp_path / "d.jsonl", [row("a"), row("b", target="gone.png"), row("c", reference="x.png")]
    )
    with pytest.raises(DatasetError) as error:
        load_dataset(jsonl)
    text = str(error.value)
    assert f"{jsonl}:2: target {tmp_path / 'gone.png'} not found" in text
    assert f"{jsonl}:3: reference {tmp_path / 'x.png'} not found" in text


# ---------------------------------------------------------------------------------------------- validation


def _truncated(path: Path, fmt: str) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_image(kind: str, path: Path) -> None:
    if kind == "corrupt":
        path.write_bytes(b"definitely not an image")
    elif kind == "truncated_png":
        _truncated(path, "PNG")
    elif kind == "truncated_jpeg":
        _truncated(path, "JPEG")
    elif kind == "cmyk":
        save(path, mode="CMYK", format="JPEG")
    elif kind == "palette_transparent":
        image = Image.new("P", (16, 16), 0)
        image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
        image.save(path, format="PNG", transparency=0)
    elif kind == "rgba_transparent":
        Image.new("RGBA", (16, 16), (10, 20, 30, 0)).save(path, format="PNG")
    elif kind == "sixteen_bit":
        Image.new("I;16", (16, 16), 1000).save(path, format="PNG")
    elif kind == "small":
        save(path, size=(8, 6), format="PNG")


# (case, third line's record or raw text, bad image kind, expected phrase)
VALIDATION_CASES = [
    ("missing file", row("c", reference="nope.png"), None, "nope.png not found"),
    ("missing target", row("c", target="gone.png"), None, "gone.png not found"),
    ("not an image", row("c", reference="bad.png"), "corrupt", "is not an image file PIL can read"),
    ("truncated png", row("c", reference="bad.png"), "truncated_png", "is corrupt"),
    ("truncated jpeg", row("c", reference="bad.png"), "truncated_jpeg", "corrupt or truncated"),
    ("cmyk", row("c", target="bad.png"), "cmyk", "is CMYK"),
    (
        "palette transparency",
        row("c", reference="bad.png"),
        "palette_transparent",
        "palette image with a transparent",
    ),
    (
        "rgba transparency",
        row("c", reference="bad.png"),
        "rgba_transparent",
        "has transparent pixels (mode RGBA)",
    ),
    ("16-bit", row("c", reference="bad.png"), "sixteen_bit", "no faithful RGB conversion"),
    ("too small", row("c", reference="bad.png"), "small", "is 8x6 pixels (width x height), smaller than"),
    ("empty prompt", row("c", prompt="   "), None, "empty prompt"),
    (
        "missing key",
        {k: v for k, v in row("c").items() if k != "subject_class"},
        None,
        "missing key 'subject_class'",
    ),
    ("unknown key", row("c", captoin="x"), None, "unknown key 'captoin'"),
    ("unknown key hint", {**row("c"), "targt": "good.png"}, None, "(did you mean 'target'?)"),
    ("wrong type", row("c", reference=[]), None, "'reference' must be a path or a non-empty list"),
    ("bad json", '{"id": "c", "reference": "good.png",', None, "invalid JSON"),
    ("not an object", '["c", "good.png"]', None, "expected a JSON object"),
    ("duplicate id", row("a"), None, "duplicate id 'a' (first used on line 1)"),
]


@pytest.mark.parametrize(
    ("case", "third", "bad", "phrase"), VALIDATION_CASES, ids=[c[0] for c in VALIDATION_CASES]
)
def test_each_validation_failure_names_file_and_line(tmp_path, case, third, bad, phrase):
    save(tmp_path / "good.png")
    if bad is not None:
        _bad_image(bad, tmp_path / "bad.png")
    jsonl = write_lines(tmp_path / "data.jsonl", [row("a"), row("b"), third])
    with pytest.raises(DatasetError) as error:
        validate_dataset(jsonl, image_size=16 if bad == "small" else None)
    text = str(error.value)
    assert f"{jsonl}:3: " in text, text
    assert phrase in text, text
    assert ":1:" not in text and ":2:" not in text, text  # good lines are not blamed


def test_all_problems_in_one_message_grouped_by_image(tmp_path):
    save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"junk")
    jsonl = write_lines(
        tmp_path / "data.jsonl",
        [
            row("a"),
            row("b", reference="bad.png"),
            row("c", prompt=""),
            row("d", reference="bad.png"),
            "{oops",
        ],
    )
    with pytest.raises(DatasetError) as error:
        validate_dataset(jsonl)
    text = str(error.value)
    assert text.startswith(f"dataset {jsonl} is not valid (3 problem(s)):")
    assert f"{jsonl}:2,4: reference {tmp_path / 'bad.png'} is not an image" in text
    assert f"{jsonl}:3: empty prompt" in text and f"{jsonl}:5: invalid JSON" in text
    assert len(error.value.problems) == 3


def test_convertible_modes_warn_and_in_memory_records_validate(tmp_path):
    save(tmp_path / "gray.png", mode="L")
    Image.new("RGBA", (16, 16), (1, 2, 3, 255)).save(tmp_path / "opaque.png")
    save(tmp_path / "good.png")
    records = [
        row("g", reference="gray.png"),
        row("o", reference="opaque.png", target="opaque.png"),
        row("x", reference="good.png"),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate_dataset(records, image_size=16, root=tmp_path)
    messages = [str(w.message) for w in caught if issubclass(w.category, DatasetWarning)]
    assert any("<records>:1: reference" in m and "grayscale (mode L)" in m for m in messages)
    assert any("<records>:2: " in m and "fully opaque" in m for m in messages)
    assert any("is also its reference" in m for m in messages)

    with pytest.raises(DatasetError, match=r"<records>:2: duplicate id 'g'"):
        validate_dataset([row("g", reference="good.png"), row("g", reference="good.png")], root=tmp_path)
    report = check_dataset(records, root=tmp_path)
    assert report.ok and report.records == 3 and report.images == 3


def test_folder_layout_validation_names_prompt_lines(tmp_path):
    (tmp_path / "prompts.txt").write_text("a {class} in the snow\n")
    (tmp_path / "cat" / "ref.png").parent.mkdir()
    (tmp_path / "cat" / "ref.png").write_bytes(b"junk")
    with pytest.raises(DatasetError) as error:
        validate_dataset(tmp_path)
    assert f"{tmp_path / 'prompts.txt'}:1: reference {tmp_path / 'cat' / 'ref.png'} is not an image" in str(
        error.value
    )


# ---------------------------------------------------------------------------------------------- DreamBench


@needs_dreambench
def test_dreambench_shipped_copy_is_30_subjects_by_25_prompts():
    spec = parse_prompts_and_classes(DREAMBENCH / "prompts_and_classes.txt")
    assert len(spec.classes) == 30 and len(spec.object_prompts) == 25 and len(spec.live_prompts) == 25
    items = dreambench_examples(DREAMBENCH)
    assert len(items) == 750
    by_subject: dict[str, list] = {}
    for item in items:
        by_subject.setdefault(item.subject, []).append(item)
    assert len(by_subject) == 30 and all(
        len(v) == 25 and len({i.prompt for i in v}) == 25 for v in by_subject.values()
    )
    assert {s for s, v in by_subject.items() if v[0].category == "live"} == LIVE
    prompts = {item.id: item.prompt for item in items}
    assert prompts["dog/00"] == "a dog in the jungle" and prompts["dog/10"] == "a dog wearing a red hat"
    assert prompts["bear_plushie/10"] == "a stuffed animal with a wheat field in the background"
    assert prompts["backpack/24"] == "a cube shaped backpack"
    assert not any("{" in p or "  " in p for p in prompts.values())
    assert not any("wearing" in i.prompt for i in items if i.category == "object")
    kinds = {(i.category, i.prompt_type) for i in items}
    assert kinds == {("object", "context"), ("object", "property"), ("live", "context")} | {
        ("live", "accessory"),
        ("live", "property"),
    }
    assert all(len(i.references) >= 4 and i.reference.name == "00.jpg" for i in items)

    few = dreambench_examples(DREAMBENCH, subjects=["dog", "vase"], prompts_per_subject=5, unique_token="sks")
    assert [i.prompt_index for i in few[:5]] == [0, 5, 10, 15, 20]
    assert few[0].prompt == "a sks dog in the jungle" and few[5].subject == "vase"
    with pytest.raises(DatasetError, match="unknown DreamBench subject"):
        dreambench_examples(DREAMBENCH, subjects=["unicorn"])


@needs_dreambench
def test_dreambench_import_writes_a_valid_jsonl(tmp_path):
    out = import_dreambench(DREAMBENCH, tmp_path / "db" / "dreambench.jsonl", subjects=["cat", "can"])
    records = read_records(out)
    assert len(records) == 50 and records[0].references[0] == DREAMBENCH.absolute() / "cat" / "00.jpg"
    first = json.loads(out.read_text().splitlines()[0])
    assert not Path(first["reference"][0]).is_absolute()  # paths are relative to the JSONL's folder
    assert first["meta"]["category"] == "live" and first["kind"] == "context"
    validate_dataset(out, image_size=256)
    example = load_dataset(out, image_size=16)[0]
    assert example.reference.shape == (3, 16, 16) and example.prompt == "a cat in the jungle"

    registered = DATASETS.build("dreambench", path=DREAMBENCH, image_size=16, prompts_per_subject=1)
    assert len(registered) == 30 and registered[0].reference.shape == (3, 16, 16)


# --------------------------------------------------------------------------------------------------- SynCD


def _syncd_tree(root: Path) -> None:
    shard = root / "shard_a"
    names = ["0_0_0.jpg", "0_0_1.jpg", "0_0_2.jpg"]
    bear = ["teddy_bear_0_1_0_0.jpg", "teddy_bear_0_1_0_1.jpg"]
    for value, name in enumerate(names + bear):
        save(shard / name, value=40 * value)
        save(shard / "masks" / name, mode="L")
    items = [
        {
            "filenames": names,
            "prompts": ["a mug on a desk", "a mug  in a kitchen", "a mug on grass"],
            "category": "rigid",
            "objaverse_id": "abc123",
            "dino_scores": [[0, 0.9, 0.8], [0, 0, 0.7], [0, 0, 0]],
            "aesthetics_scores": {"0_0_0": 5.0, "0_0_1": 6.0, "0_0_2": 4.5},
        },
        {
            # the generator wrote OUTDIR/name: looked up by base name next to the JSON
            "filenames": [f"assets/outdir/{name}" for name in bear],
            "prompts": ["a teddy bear on a sofa", "a teddy bear in the park"],
            "category": "deformable",
        },
    ]
    (shard / "metadata_with_scores.json").write_text(json.dumps(items))
    (shard / "metadata.json").write_text(json.dumps(items))  # same items without scores: must be ignored
    other = root / "shard_b"
    save(other / "x_0.jpg")
    save(other / "x_1.jpg")
    (other / "metadata_0.json").write_text(
        json.dumps([{"filenames": ["x_0.jpg", "x_1.jpg"], "prompts": ["p0", "p1"]}])
    )


def test_syncd_importer_on_synthetic_tree(tmp_path):
    root = tmp_path / "syncd"
    _syncd_tree(root)
    out = import_syncd(root, tmp_path / "out" / "pairs.jsonl")
    records = {r.id: r for r in read_records(out)}
    assert len(records) == 6 + 2 + 2
    pair = records["shard_a/000000/2-1"]
    assert pair.reference.name == "0_0_2.jpg" and pair.target.name == "0_0_1.jpg"
    assert pair.prompt == "a mug in a kitchen" and pair.subject_class == "object" and pair.kind == "rigid"
    assert pair.meta["syncd_dino"] == pytest.approx(0.7) and pair.meta["syncd_aesthetics"] == 6.0
    assert records["shard_a/000000/0-2"].meta["syncd_dino"] == pytest.approx(0.8)
    bear = records["shard_a/000001/0-1"]
    assert bear.subject_class == "teddy bear" and bear.prompt == "a teddy bear in the park"
    assert "syncd_dino" not in bear.meta
    assert records["shard_b/000000/1-0"].subject_class == "object"
    validate_dataset(out)
    example = load_dataset(out, image_size=8)[0]
    assert example.target is not None and example.target.shape == (3, 8, 8)
    assert len(read_syncd(root, pairs="first")) == 2 + 1 + 1


def test_syncd_importer_fails_clearly_on_other_layouts(tmp_path):
    with pytest.raises(DatasetError, match=r"no SynCD metadata file .*expected SynCD's released layout"):
        read_syncd(tmp_path)
    save(tmp_path / "a.jpg")
    (tmp_path / "metadata.json").write_text(
        json.dumps(
            [
                {"filenames": ["a.jpg", "b.jpg"], "prompts": ["x", "y"]},
                {"filenames": ["a.jpg"], "prompts": []},
            ]
        )
    )
    with pytest.raises(DatasetError) as error:
        read_syncd(tmp_path)
    text = str(error.value)
    assert f"{tmp_path / 'metadata.json'}: item 0: image(s) not found" in text and "b.jpg" in text
    assert f"{tmp_path / 'metadata.json'}: item 1: 'filenames' must be a list of >= 2" in text
    (tmp_path / "metadata.json").write_text('{"filenames": []}')
    with pytest.raises(DatasetError, match="expected a JSON list of items"):
        read_syncd(tmp_path)


# -------------------------------------------------------------------------------------------------- filter


def _brightness_dataset(tmp_path: Path, values: list[int]) -> Path:
    rows = []
    for index, value in enumerate(values):
        save(tmp_path / "imgs" / f"t{index}.png", value=value)
        rows.append(
            row(f"r{index}", reference="imgs/ref.png", target=f"imgs/t{index}.png", meta={"q": -index})
        )
    save(tmp_path / "imgs" / "ref.png")
    return write_lines(tmp_path / "pairs.jsonl", rows)


def test_zscore():
    z = zscore(np.array([1.0, 2.0, 3.0, np.nan]))
    assert np.allclose(z[:3], [-1.2247449, 0.0, 1.2247449]) and np.isnan(z[3])
    assert np.array_equal(zscore(np.array([5.0, 5.0])), [0.0, 0.0])


def test_filter_keeps_the_top_fraction(tmp_path):
    values = [50, 10, 240, 130, 90, 200, 30, 170, 60, 110]
    jsonl = _brightness_dataset(tmp_path, values)
    out = tmp_path / "filtered" / "top.jsonl"
    result = filter_dataset(jsonl, ["test_brightness"], {}, 0.3, out, batch_size=4)
    assert result.kept == 3 and result.total == 10 and result.scores_csv == out.parent / "scores.csv"
    kept = [r.id for r in read_records(out)]
    assert kept == ["r2", "r5", "r7"]  # the three brightest, in the dataset's order
    with open(result.scores_csv) as handle:
        table = list(csv.DictReader(handle))
    assert [r["id"] for r in table] == [f"r{i}" for i in np.argsort(values)[::-1]]
    assert [r["kept"] for r in table] == ["1"] * 3 + ["0"] * 7
    assert float(table[0]["test_brightness"]) == pytest.approx(240 / 255, abs=1e-5)
    validate_dataset(out)  # paths were rewritten relative to the new folder

    # Two rewards: the score is the mean of their z-scores; meta.q = -index reverses the dataset order.
    both = filter_dataset(jsonl, ["test_brightness", "meta.q"], None, 0.5, tmp_path / "both.jsonl", 16, True)
    with open(both.scores_csv) as handle:
        table = list(csv.DictReader(handle))
    for line in table:
        mean = (float(line["test_brightness_z"]) + float(line["meta.q_z"])) / 2
        assert float(line["score"]) == pytest.approx(mean, abs=1e-5)
    scores = zscore(np.array(values, float) / 255) + zscore(-np.arange(10.0))
    expected = sorted(np.argsort(-scores, kind="stable")[:5])
    assert [r.id for r in read_records(tmp_path / "both.jsonl")] == [f"r{i}" for i in expected]

    by_count = filter_dataset(jsonl, ["meta.q"], None, 1.0, tmp_path / "n.jsonl", keep_count=2)
    assert [r.id for r in read_records(tmp_path / "n.jsonl")] == ["r0", "r1"] and by_count.kept == 2


def test_filter_drops_non_finite_and_needs_targets(tmp_path):
    jsonl = _brightness_dataset(tmp_path, [10, 200, 30, 150])
    result = filter_dataset(jsonl, ["test_dark_is_nan"], {}, 1.0, tmp_path / "f.jsonl", batch_size=3)
    assert result.kept == 2 and result.non_finite == {"test_dark_is_nan": 2}
    assert [r.id for r in read_records(tmp_path / "f.jsonl")] == ["r1", "r3"]

    no_target = write_lines(tmp_path / "refs.jsonl", [row("a", reference="imgs/ref.png")])
    with pytest.raises(DatasetError, match=rf"{no_target}:1: record 'a' has no target"):
        filter_dataset(no_target, ["test_brightness"], {}, 0.5, tmp_path / "x.jsonl")
    result = filter_dataset(no_target, ["test_brightness"], {}, 0.5, tmp_path / "x.jsonl", score_target=False)
    assert result.kept == 1
    with pytest.raises(ValueError, match="not among the rewards"):
        filter_dataset(jsonl, ["test_brightness"], {"dino": {}}, 0.5, tmp_path / "y.jsonl")
    with pytest.raises(DatasetError, match="lack it"):
        filter_dataset(jsonl, ["meta.missing"], {}, 0.5, tmp_path / "y.jsonl")


# ----------------------------------------------------------------------------------------------------- CLI


def test_cli_validate_import_and_filter(tmp_path):
    runner = CliRunner()
    save(tmp_path / "good.png")
    good = write_lines(tmp_path / "good.jsonl", [row("a"), row("b")])
    result = runner.invoke(app, ["validate", str(good), "--image-size", "16"])
    assert result.exit_code == 0 and "OK" in result.output and "2 records, 1 images" in result.output

    bad = write_lines(tmp_path / "bad.jsonl", [row("a"), row("b", prompt="")])
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1 and f"{bad}:2: empty prompt" in result.output and "INVALID" in result.output
    result = runner.invoke(app, ["validate", str(tmp_path / "nowhere.jsonl")])
    assert result.exit_code == 1 and "does not exist" in result.output

    root = tmp_path / "syncd"
    _syncd_tree(root)
    result = runner.invoke(
        app, ["import-syncd", str(root), str(tmp_path / "syncd.jsonl"), "--pairs", "first"]
    )
    assert result.exit_code == 0, result.output
    assert "4 pairs of 3 subjects" in result.output
    result = runner.invoke(app, ["import-syncd", str(tmp_path / "good.png"), str(tmp_path / "s.jsonl")])
    assert result.exit_code == 1 and "not a folder" in result.output

    out = tmp_path / "top.jsonl"
    args = [
        "filter",
        str(tmp_path / "syncd.jsonl"),
        str(out),
        "--reward",
        "test_brightness",
        "--keep-count",
        "2",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "kept 2 of 4 records" in result.output and len(read_records(out)) == 2
    result = runner.invoke(app, args + ["--option", "dino.device=cpu"])
    assert result.exit_code == 1 and "not among the rewards" in result.output

    if DREAMBENCH.is_dir():
        args = [
            "import-dreambench",
            str(DREAMBENCH),
            str(tmp_path / "db.jsonl"),
            "--prompts-per-subject",
            "2",
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "60 records, 30 subjects (9 live, 21 objects)" in result.output


def test_parse_options():
    parsed = parse_options(
        ["dino.model_path=/m/dino", "hpsv3.batch=8", "dino_seg.fp16=true", "dino.name=a=b"]
    )
    assert parsed == {
        "dino": {"model_path": "/m/dino", "name": "a=b"},
        "hpsv3": {"batch": 8},
        "dino_seg": {"fp16": True},
    }
    with pytest.raises(ValueError, match="REWARD.KEY=VALUE"):
        parse_options(["device=cpu"])
