"""Multi-subject records: the ``subjects`` form of the JSONL format, its loading and its validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cgrpo.data.base import Example
from cgrpo.data.formats import DatasetError, load_dataset, read_records, write_jsonl
from cgrpo.data.validate import validate_dataset


def save(path: Path, size: tuple[int, int] = (16, 16), value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def write_lines(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def single(record_id: str, **extra) -> dict:
    base = {"id": record_id, "reference": "good.png", "subject_class": "dog", "prompt": "a dog on the beach"}
    return {**base, **extra}


def multi(record_id: str, subjects: object = None, **extra) -> dict:
    if subjects is None:
        subjects = [
            {"reference": "good.png", "subject_class": "dog"},
            {"reference": ["cat0.png", "cat1.png"], "subject_class": "cat", "subject": "kitty"},
        ]
    return {"id": record_id, "subjects": subjects, "prompt": "a dog left of a cat", **extra}


def test_example_without_extras_is_one_subject():
    reference = torch.zeros(3, 4, 4)
    example = Example("e", "s", "dog", "a dog", reference)
    assert example.num_subjects == 1 and example.subject_classes == ("dog",)
    assert len(example.references) == 1 and example.references[0] is reference
    pair = Example(
        "e", "s", "dog", "a dog", reference, extra_references=(torch.ones(3, 2, 6),), extra_classes=("cat",)
    )
    assert pair.num_subjects == 2 and pair.subject_classes == ("dog", "cat")
    assert pair.references[1].shape == (3, 2, 6)
    with pytest.raises(ValueError, match="one class per subject"):
        Example("e", "s", "dog", "a dog", reference, extra_references=(reference,))


def test_subjects_form_loads_every_subject(tmp_path):
    save(tmp_path / "good.png", size=(20, 10), value=200)
    save(tmp_path / "cat0.png", size=(12, 18), value=40)
    save(tmp_path / "cat1.png", value=90)
    jsonl = write_lines(tmp_path / "d.jsonl", [single("one"), multi("two", kind="placement")])
    dataset = load_dataset(jsonl)
    one, two = dataset[0], dataset[1]
    assert one.num_subjects == 1 and one.extra_references == () and one.subject_id == "good.png"
    assert two.num_subjects == 2 and two.subject_classes == ("dog", "cat")
    assert two.reference.shape == (3, 10, 20) and two.extra_references[0].shape == (3, 18, 12)
    assert abs(float(two.extra_references[0].mean()) - 40 / 255) < 1e-6  # the cat's first image
    assert two.subject_id == "good.png+kitty" and two.kind == "placement"
    record = dataset.record(1)
    assert [s.subject_class for s in record.subjects] == ["dog", "cat"]
    assert record.extra_subjects[0].references == (tmp_path / "cat0.png", tmp_path / "cat1.png")

    sized = load_dataset(jsonl, image_size=8)
    assert [r.shape for r in sized[1].references] == [(3, 8, 8), (3, 8, 8)]
    validate_dataset(jsonl)  # every image is fine


def test_subjects_form_round_trips_through_write_jsonl(tmp_path):
    for name in ("good.png", "cat0.png", "cat1.png"):
        save(tmp_path / name)
    jsonl = write_lines(tmp_path / "d.jsonl", [single("one", subject="s"), multi("two")])
    out = tmp_path / "out" / "copy.jsonl"
    write_jsonl(read_records(jsonl), out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert "subjects" not in lines[0] and lines[0]["reference"] == "../good.png"
    assert lines[1]["subjects"][1] == {
        "reference": ["../cat0.png", "../cat1.png"],
        "subject_class": "cat",
        "subject": "kitty",
    }
    assert "reference" not in lines[1] and "subject_class" not in lines[1]
    again = read_records(out)
    assert [s.subject for s in again[1].subjects] == ["good.png", "kitty"]  # ids as first written
    assert again[1].extra_subjects[0].references == (tmp_path / "cat0.png", tmp_path / "cat1.png")


ENTRY = {"reference": "good.png", "subject_class": "dog"}
# (case, third line's record, expected phrase)
MULTI_CASES = [
    ("both forms", multi("c", reference="good.png"), "'subjects' and top-level 'reference' are both given"),
    ("both forms class", multi("c", subject_class="dog"), "top-level 'subject_class' are both given"),
    ("empty list", multi("c", []), "'subjects' must be a non-empty list"),
    ("not a list", multi("c", "good.png"), "'subjects' must be a non-empty list"),
    ("five subjects", multi("c", [ENTRY] * 5), "'subjects' lists 5 subjects; a record may have at most 4"),
    (
        "no reference",
        multi("c", [ENTRY, {"subject_class": "cat"}]),
        "'subjects[1]' is missing key 'reference'",
    ),
    (
        "no class",
        multi("c", [ENTRY, {"reference": "good.png"}]),
        "'subjects[1]' is missing key 'subject_class'",
    ),
    ("not an object", multi("c", [ENTRY, "good.png"]), "'subjects[1]' must be a JSON object"),
    ("unknown key", multi("c", [ENTRY, {**ENTRY, "clas": "x"}]), "unknown key 'subjects[1].clas'"),
    ("bad reference", multi("c", [{**ENTRY, "reference": []}]), "'subjects[0].reference' must be a path"),
    (
        "bad class",
        multi("c", [ENTRY, {**ENTRY, "subject_class": " "}]),
        "'subjects[1].subject_class' must be",
    ),
    ("bad id", multi("c", [ENTRY, {**ENTRY, "subject": 3}]), "'subjects[1].subject' must be a string"),
    ("missing image", multi("c", [ENTRY, {**ENTRY, "reference": "gone.png"}]), "subjects[1].reference"),
    ("no prompt", {"id": "c", "subjects": [ENTRY]}, "missing key 'prompt'"),
]


@pytest.mark.parametrize(("case", "third", "phrase"), MULTI_CASES, ids=[c[0] for c in MULTI_CASES])
def test_each_subjects_error_names_file_line_and_key(tmp_path, case, third, phrase):
    save(tmp_path / "good.png")
    jsonl = write_lines(tmp_path / "data.jsonl", [single("a"), multi("b", [ENTRY, ENTRY]), third])
    for check in (validate_dataset, load_dataset):
        with pytest.raises(DatasetError) as error:
            check(jsonl)
        text = str(error.value)
        assert f"{jsonl}:3: " in text and phrase in text, text
        assert ":1:" not in text and ":2:" not in text, text  # good lines are not blamed


def test_validation_opens_every_subjects_images(tmp_path):
    save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"junk")
    save(tmp_path / "small.png", size=(8, 6))
    rows = [
        multi("a", [ENTRY, {"reference": ["good.png", "bad.png"], "subject_class": "cat"}]),
        multi("b", [ENTRY, ENTRY, {"reference": "small.png", "subject_class": "cat"}]),
    ]
    jsonl = write_lines(tmp_path / "data.jsonl", rows)
    with pytest.raises(DatasetError) as error:
        validate_dataset(jsonl, image_size=16)
    text = str(error.value)
    assert f"{jsonl}:1: subjects[1].reference {tmp_path / 'bad.png'} is not an image file" in text, text
    assert f"{jsonl}:2: subjects[2].reference {tmp_path / 'small.png'} is 8x6 pixels" in text, text
    # in-memory records are checked the same way
    with pytest.raises(DatasetError, match=r"<records>:1: 'subjects' lists 5 subjects"):
        validate_dataset([multi("x", [ENTRY] * 5)], root=tmp_path)


def test_a_policy_prepares_the_conditioning_references_of_all_subjects_together(tmp_path):
    """UNO sizes several references smaller than one (320 vs 512 long side), so a multi-subject record's
    references (each subject's first image) reach the policy's preparation in one call, and a single-subject
    record's first image alone."""
    save(tmp_path / "good.png", size=(20, 10), value=200)
    save(tmp_path / "cat0.png", size=(12, 18), value=40)
    save(tmp_path / "cat1.png", value=90)
    dataset = load_dataset(write_lines(tmp_path / "d.jsonl", [single("one"), multi("two")]), image_size=8)
    calls: list[list[tuple[int, int]]] = []

    def prepare(images):
        calls.append([image.size for image in images])
        return [torch.full((3, 4 * len(images), 4), float(k)) for k in range(len(images))]

    dataset.prepare_references_with(prepare)
    one, two = dataset[0], dataset[1]
    assert calls == [[(20, 10)], [(20, 10), (12, 18)]]
    assert one.reference.shape == (3, 4, 4)
    assert two.reference.shape == (3, 8, 4) and float(two.extra_references[0][0, 0, 0]) == 1.0
    assert dataset.reference_size_key(1) == ((20, 10), (12, 18))
    assert [r.shape for r in dataset.references(1)] == [(3, 4, 4)]  # the first subject's one image
