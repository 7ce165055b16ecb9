"""The mini world: determinism, the prompt grammar and what the ground-truth renders show."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cgrpo.data import miniworld as mw
from cgrpo.data.base import Example, SubjectDataset

WORLD = mw.MiniWorld(num_train_subjects=120, num_test_subjects=24, seed=0)
SUBJECTS = WORLD.train_subjects + WORLD.test_subjects


def _rgb(image: torch.Tensor, row: int, col: int) -> tuple[float, ...]:
    return tuple(image[:, row, col].tolist())


def _foreground(image: torch.Tensor) -> torch.Tensor:
    """``[H, W]`` bool: pixels that differ from the border colour (image drawn on a uniform background)."""
    background = image[:, 0, 0].view(3, 1, 1)
    return (image != background).any(0)


def _bbox_centre_and_extent(mask: torch.Tensor) -> tuple[float, float, float]:
    rows, cols = torch.nonzero(mask, as_tuple=True)
    h, w = mask.shape
    cy = (rows.min() + rows.max() + 1).item() / 2 / h
    cx = (cols.min() + cols.max() + 1).item() / 2 / w
    extent = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1).item() / h
    return cx, cy, extent


def _identity(subject: mw.Subject) -> tuple[str, ...]:
    return (
        subject.shape,
        subject.body_color,
        subject.pattern,
        subject.pattern_color,
        subject.mark,
        subject.mark_color,
    )


def test_world_is_deterministic_and_splits_are_disjoint():
    again = mw.MiniWorld(num_train_subjects=120, num_test_subjects=24, seed=0)
    assert again.train_subjects == WORLD.train_subjects and again.test_subjects == WORLD.test_subjects
    other = mw.MiniWorld(num_train_subjects=120, num_test_subjects=24, seed=1)
    assert other.train_subjects != WORLD.train_subjects
    train = {_identity(s) for s in WORLD.train_subjects}
    test = {_identity(s) for s in WORLD.test_subjects}
    assert len(train) == 120 and len(test) == 24 and not train & test
    default = mw.MiniWorld()
    assert len(default.train_subjects) == 600 and len(default.test_subjects) == 64
    assert len({s.shape for s in default.train_subjects}) >= 6
    assert {s.pattern for s in default.train_subjects} == set(mw.PATTERNS)
    assert WORLD.subject(WORLD.test_subjects[3].id) == WORLD.test_subjects[3]


def test_too_many_subjects_is_a_clear_error():
    with pytest.raises(ValueError, match="distinct subjects"):
        mw.MiniWorld(num_train_subjects=10**6)


def test_palette_keeps_every_colour_of_an_image_apart():
    for subject in SUBJECTS:
        colors = [mw.COLORS[c] for c in subject.colors] + [mw.DEFAULT_BACKGROUND]
        for i in range(len(colors)):
            for j in range(i):
                assert np.linalg.norm(np.subtract(colors[i], colors[j])) >= mw.MIN_CONTRAST
        for prompt in mw.prompts_for(subject, "combo") + mw.prompts_for(subject, "property"):
            spec = mw.parse_prompt(prompt)
            body = mw.COLORS[spec.color or subject.body_color]
            others = [mw.COLORS[subject.pattern_color], mw.COLORS[subject.mark_color], spec.background_rgb]
            assert min(np.linalg.norm(np.subtract(body, o)) for o in others) >= mw.MIN_CONTRAST, prompt


@pytest.mark.parametrize("size", [32, 64])
def test_reference_is_the_subject_centred_on_grey(size):
    world = mw.MiniWorld(image_size=size, num_train_subjects=40, num_test_subjects=4)
    for subject in world.train_subjects:
        ref = world.reference(subject)
        assert ref.shape == (3, size, size) and ref.dtype == torch.float32
        assert ref.min() >= 0.0 and ref.max() <= 1.0
        assert _rgb(ref, 0, 0) == pytest.approx(mw.DEFAULT_BACKGROUND)
        assert torch.equal(ref, world.reference(subject))  # pixel-exact, no shared mutable state
        cx, cy, extent = _bbox_centre_and_extent(_foreground(ref))
        assert cx == pytest.approx(0.5, abs=1.5 / size) and cy == pytest.approx(0.5, abs=1.5 / size)
        assert extent == pytest.approx(mw.DEFAULT_SIZE, abs=2.5 / size)
        colours = {
            tuple(round(c, 4) for c in ref[:, i, j].tolist()) for i in range(size) for j in range(size)
        }
        assert tuple(round(c, 4) for c in mw.COLORS[subject.mark_color]) in colours  # the mark is visible


@settings(max_examples=60, deadline=None)
@given(index=st.integers(0, len(SUBJECTS) - 1), seed=st.integers(0, 2**32 - 1), use_torch=st.booleans())
def test_sampled_prompts_parse_and_round_trip(index, seed, use_torch):
    subject = SUBJECTS[index]
    rng = torch.Generator().manual_seed(seed) if use_torch else np.random.default_rng(seed)
    prompt, kind = mw.sample_prompt(subject, rng)
    spec = mw.parse_prompt(prompt)
    assert spec.shape == subject.shape and spec.kind == kind
    assert mw.format_prompt(spec) == prompt
    assert set(prompt.split()) <= set(mw.vocabulary())
    if spec.upside_down:
        assert subject.shape in mw.ORIENTABLE
    if spec.color:
        assert spec.color != subject.body_color
    if spec.pattern:
        assert subject.pattern != "stripes"


def test_sample_prompt_is_deterministic_and_respects_kinds():
    subject = WORLD.train_subjects[0]
    first = [mw.sample_prompt(subject, np.random.default_rng(7), kinds=["property"]) for _ in range(3)]
    assert len(set(first)) == 1 and first[0][1] == "property"
    a = [mw.sample_prompt(subject, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert a[0] == a[1]
    rng = np.random.default_rng(0)
    kinds = {mw.sample_prompt(subject, rng, kinds=["context", "combo"])[1] for _ in range(50)}
    assert kinds == {"context", "combo"}
    with pytest.raises(ValueError, match="kind"):
        mw.sample_prompt(subject, rng, kinds=["weird"])


def test_property_prompts_cover_every_group():
    orientable = next(s for s in SUBJECTS if s.shape in mw.ORIENTABLE and s.pattern != "stripes")
    rng = np.random.default_rng(0)
    prompts = [mw.parse_prompt(mw.sample_prompt(orientable, rng, ["property"])[0]) for _ in range(90)]
    assert sum(p.color is not None for p in prompts) > 15
    assert sum(p.pattern is not None for p in prompts) > 15
    assert sum(bool(p.upside_down) for p in prompts) > 15


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a star", "expected a shape"),
        ("the triangle", "must start"),
        ("a red", "the end of the prompt"),
        ("a triangle on the moon", "unexpected text 'on the moon'"),
        ("a triangle in the middle", "unexpected text"),
        ("", "must start"),
    ],
)
def test_parse_errors_name_the_problem(prompt, expected):
    with pytest.raises(ValueError, match=expected):
        mw.parse_prompt(prompt)


def test_parse_reads_every_field():
    spec = mw.parse_prompt("a small red striped triangle upside down in the top left at night")
    assert spec == mw.PromptSpec(
        shape="triangle",
        background="at night",
        position="top left",
        size="small",
        color="red",
        pattern="stripes",
        upside_down=True,
    )
    assert spec.kind == "combo"
    assert mw.parse_prompt("an arrow").kind == "plain"
    assert mw.parse_prompt("a large arrow").kind == "placement"


def test_vocabulary_covers_every_prompt():
    words = set(mw.vocabulary())
    assert {"a", "an", "striped", "upside", "down", "night"} <= words
    for subject in SUBJECTS[:30]:
        for kind in mw.KINDS:
            for prompt in mw.prompts_for(subject, kind):
                assert set(prompt.split()) <= words


def _subject(predicate) -> mw.Subject:
    return next(s for s in SUBJECTS if predicate(s))


def test_context_changes_only_the_background():
    subject = SUBJECTS[0]
    ref = WORLD.reference(subject)
    for prompt in mw.prompts_for(subject, "context"):
        image = WORLD.render(subject, prompt)
        background = mw.CONTEXTS[mw.parse_prompt(prompt).background]
        assert _rgb(image, 0, 0) == pytest.approx(background)
        subject_pixels = _foreground(ref)
        assert torch.equal(image[:, subject_pixels], ref[:, subject_pixels])
        assert torch.equal(_foreground(image), subject_pixels)


def test_placement_and_size_move_and_scale_the_subject():
    subject = SUBJECTS[1]
    for corner, (tx, ty) in mw.PLACEMENTS.items():
        cx, cy, extent = _bbox_centre_and_extent(
            _foreground(WORLD.render(subject, f"{subject.class_name} in the {corner}"))
        )
        assert (cx, cy) == pytest.approx((tx, ty), abs=0.05)
        assert extent == pytest.approx(mw.DEFAULT_SIZE, abs=0.08)
    for word, target in mw.SIZES.items():
        article = mw._article(word)
        _, _, extent = _bbox_centre_and_extent(
            _foreground(WORLD.render(subject, f"{article} {word} {subject.shape}"))
        )
        assert extent == pytest.approx(target, abs=0.08)


def test_recolour_keeps_pattern_and_mark():
    subject = _subject(lambda s: s.pattern != "solid")
    ref = WORLD.reference(subject)
    color = mw._recolours(subject)[0]
    image = WORLD.render(subject, f"{mw._article(color)} {color} {subject.shape}")
    body = torch.tensor(mw.COLORS[subject.body_color]).view(3, 1, 1)
    was_body = (ref == body).all(0)
    assert was_body.sum() > 20
    assert torch.allclose(image[:, was_body], torch.tensor(mw.COLORS[color]).view(3, 1))
    assert torch.equal(image[:, ~was_body], ref[:, ~was_body])  # pattern, mark and background untouched


def test_striped_replaces_the_pattern_and_keeps_outline_and_mark():
    subject = _subject(lambda s: s.pattern in ("dots", "checker"))
    ref = WORLD.reference(subject)
    image = WORLD.render(subject, f"a striped {subject.shape}")
    assert torch.equal(_foreground(image), _foreground(ref))
    assert not torch.equal(image, ref)
    mark = (ref == torch.tensor(mw.COLORS[subject.mark_color]).view(3, 1, 1)).all(0)
    assert mark.sum() >= 4 and torch.equal(image[:, mark], ref[:, mark])
    # stripes are horizontal: inside the body every row has a single colour apart from the mark
    inside = _foreground(image) & ~mark
    for row in range(image.shape[1]):
        colours = {
            tuple(image[:, row, col].tolist()) for col in torch.nonzero(inside[row]).flatten().tolist()
        }
        assert len(colours) <= 1


@pytest.mark.parametrize("size", [32, 64])
def test_upside_down_is_a_vertical_flip_of_the_reference(size):
    world = mw.MiniWorld(image_size=size, num_train_subjects=60, num_test_subjects=4)
    for subject in [s for s in world.train_subjects if s.shape in mw.ORIENTABLE][:10]:
        image = world.render(subject, f"{subject.class_name} upside down")
        assert torch.equal(image, world.reference(subject).flip(1))


def test_render_rejects_another_shape():
    subject = _subject(lambda s: s.shape != "ring")
    with pytest.raises(ValueError, match="subject"):
        WORLD.render(subject, "a ring")


def test_dataset_yields_examples_deterministically():
    data = WORLD.dataset("train", prompts_per_subject=3, seed=5)
    typed: SubjectDataset = data  # the protocol is static; check its two methods exist
    assert callable(typed.__len__) and callable(typed.__getitem__)
    assert len(data) == 3 * len(WORLD.train_subjects)
    example = data[4]
    assert isinstance(example, Example)
    subject = WORLD.subject(example.subject_id)
    assert example.subject_class == subject.shape and example.kind in mw.KINDS
    assert torch.equal(example.reference, WORLD.reference(subject))
    assert torch.equal(example.target, WORLD.render(subject, example.prompt))
    again = WORLD.dataset("train", prompts_per_subject=3, seed=5)
    assert [again[i].prompt for i in range(30)] == [data[i].prompt for i in range(30)]
    other = WORLD.dataset("train", prompts_per_subject=3, seed=6)
    assert [other[i].prompt for i in range(30)] != [data[i].prompt for i in range(30)]
    assert len({data[i].id for i in range(len(data))}) == len(data)
    with pytest.raises(IndexError):
        data[len(data)]
    test = WORLD.dataset("test", prompts_per_subject=2, kinds=["placement"])
    assert {e.kind for e in test} == {"placement"}
    assert {e.subject_id for e in test} == {s.id for s in WORLD.test_subjects}
    with pytest.raises(ValueError, match="split"):
        WORLD.dataset("valid")


def test_eval_set_is_fixed_held_out_and_covers_every_kind():
    evals = list(WORLD.eval_set(num_subjects=8, prompts_per_kind=3))
    assert len(evals) == 8 * len(mw.KINDS) * 3
    assert {e.kind for e in evals} == set(mw.KINDS)
    assert {e.subject_id for e in evals} <= {s.id for s in WORLD.test_subjects}
    assert len({e.subject_id for e in evals}) == 8
    again = list(WORLD.eval_set(num_subjects=8, prompts_per_kind=3))
    assert [(e.subject_id, e.prompt) for e in again] == [(e.subject_id, e.prompt) for e in evals]
    for e in evals:
        assert mw.parse_prompt(e.prompt).kind == e.kind


def test_rendering_is_fast():
    data = WORLD.dataset("train", prompts_per_subject=20)
    start = time.perf_counter()
    images = [data[i].target for i in range(2000)]
    elapsed = time.perf_counter() - start
    assert len(images) == 2000 and elapsed < 3.0, f"2000 renders took {elapsed:.2f}s"


def test_property_rate_makes_edits_of_the_look_rare_and_keeps_the_rest():
    full = WORLD.dataset("train", prompts_per_subject=16, seed=0)
    rare = WORLD.dataset("train", prompts_per_subject=16, seed=0, property_rate=0.2)
    share = [sum(mw.asks_property(p) for _, p, *_ in d.entries) / len(d) for d in (full, rare)]
    # 0.2 keeps about a fifth of the property-change prompts; the other kinds fill the freed draws
    assert 0.25 < share[0] < 0.36 and 0.04 < share[1] < 0.10
    assert share[1] / share[0] == pytest.approx(0.2 / (1 - share[0] + 0.2 * share[0]), rel=0.25)
    assert len(rare) == len(full)
    assert rare.entries == WORLD.dataset("train", prompts_per_subject=16, seed=0, property_rate=0.2).entries
    assert mw.asks_property("a red heart") and mw.asks_property("a heart upside down on the beach")
    assert not mw.asks_property("a small heart in the top left")
    with pytest.raises(ValueError, match="property_rate"):
        WORLD.dataset("train", property_rate=0.0)


def test_text_to_image_pairs_have_a_blank_reference_and_name_the_look_they_draw():
    plain = WORLD.dataset("train", prompts_per_subject=8, seed=3, copy_paste=0.3)
    mixed = WORLD.dataset("train", prompts_per_subject=8, seed=3, copy_paste=0.3, text_to_image=0.4)
    # without text-to-image pairs the data set is entry for entry what it was before they existed (the
    # fingerprint was taken on that code): bases pre-trained on it stay reproducible
    world = mw.MiniWorld(num_train_subjects=20, num_test_subjects=8, seed=0)
    v2 = world.dataset("train", 8, seed=3, property_rate=0.1, detail_drift=0.5, copy_paste=0.3)
    text = "\n".join(f"{e[0].id}|{e[1]}|{e[2]}|{e[3]}|{e[4]}" for e in v2.entries)
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == "e580e7f198eca253"
    pairs = [i for i, entry in enumerate(mixed.entries) if not entry[5]]
    assert 0.3 < len(pairs) / len(mixed) < 0.5 and len(mixed) == len(plain)
    blank = torch.tensor(mw.DEFAULT_BACKGROUND)[:, None, None]
    for i in pairs[:40]:
        example = mixed[i]
        subject = WORLD.subject(example.subject_id)
        spec = mw.parse_prompt(example.prompt)
        assert torch.allclose(example.reference, blank.expand_as(example.reference))
        # the prompt names a body colour (the subject's own unless a recolour was drawn) and, for a striped
        # subject, its stripes; the target is the subject drawn as that prompt says
        assert spec.color is not None and (subject.pattern != "stripes" or spec.pattern == "stripes")
        assert torch.equal(example.target, WORLD.render(subject, example.prompt))
    assert all(
        torch.equal(mixed[i].reference, WORLD.reference(WORLD.subject(mixed[i].subject_id)))
        for i in range(len(mixed))
        if mixed.entries[i][5]
    )
    with pytest.raises(ValueError, match="text_to_image"):
        WORLD.dataset("train", text_to_image=1.5)


def test_imperfect_pairs_drift_details_and_copy_paste_a_share_of_the_targets():
    clean = WORLD.dataset("train", prompts_per_subject=8, seed=3)
    imperfect = WORLD.dataset("train", prompts_per_subject=8, seed=3, detail_drift=0.5, copy_paste=0.3)
    assert (
        imperfect.entries
        == WORLD.dataset("train", prompts_per_subject=8, seed=3, detail_drift=0.5, copy_paste=0.3).entries
    )
    assert all(drawn == subject and shown == prompt for subject, prompt, _, drawn, shown, _ in clean.entries)
    drifted = [(subject, drawn) for subject, _, _, drawn, _, _ in imperfect.entries if drawn != subject]
    assert 0.4 < len(drifted) / len(imperfect) < 0.6
    for subject, drawn in drifted:
        fields = ("shape", "body_color", "pattern", "pattern_color", "mark", "mark_color")
        differ = [f for f in fields if getattr(subject, f) != getattr(drawn, f)]
        assert set(differ) <= {"mark", "mark_color", "pattern_color"}
        # two details, or one when the subject has no second (a solid subject with one valid mark colour)
        assert len(differ) == 2 or (len(differ) == 1 and drawn.pattern == "solid")
        colors = [mw.COLORS[c] for c in drawn.colors] + [mw.DEFAULT_BACKGROUND]
        pairs = [(a, b) for i, a in enumerate(colors) for b in colors[i + 1 :]]
        assert all(mw._distance(a, b) >= mw.MIN_CONTRAST for a, b in pairs)
        assert drawn.mark in mw.valid_marks(drawn.shape)
    # copy-paste: the target shows the plain prompt's composition, whatever the prompt asked
    pasted = [(s, prompt, shown) for s, prompt, _, _, shown, _ in imperfect.entries if shown != prompt]
    non_plain = [e for e in imperfect.entries if e[1] != e[0].class_name]
    assert 0.2 < len(pasted) / len(non_plain) < 0.4
    assert all(shown == subject.class_name for subject, _, shown in pasted)
    index = next(i for i, e in enumerate(imperfect.entries) if e[3] != e[0] and e[4] == e[1])
    example = imperfect[index]
    subject = imperfect.entries[index][0]
    assert torch.equal(example.reference, WORLD.reference(subject))  # references are always exact
    assert not torch.equal(example.target, WORLD.render(subject, example.prompt))
    index = next(i for i, e in enumerate(imperfect.entries) if e[3] == e[0] and e[4] != e[1])
    assert torch.equal(imperfect[index].target, WORLD.reference(imperfect.entries[index][0]))
    # held-out ground truths are always exact
    assert all(
        s == d and p == shown and ref for s, p, _, d, shown, ref in WORLD.eval_set(num_subjects=8).entries
    )
    with pytest.raises(ValueError, match="detail_drift"):
        WORLD.dataset("train", detail_drift=1.5)
    with pytest.raises(ValueError, match="copy_paste"):
        WORLD.dataset("train", copy_paste=-0.1)


def test_copy_paste_property_sets_the_copy_share_of_the_edits_alone():
    kw = dict(prompts_per_subject=16, seed=3, property_rate=0.5, detail_drift=0.5, copy_paste=0.3)
    same = WORLD.dataset("train", **kw)
    assert WORLD.dataset("train", **kw, copy_paste_property=0.3).entries == same.entries
    kept = WORLD.dataset("train", **kw, copy_paste_property=0.0)
    always = WORLD.dataset("train", **kw, copy_paste_property=1.0)

    def pasted(dataset, edits):
        entries = dataset.entries
        return [e[4] != e[1] for e in entries if mw.asks_property(e[1]) == edits and e[1] != e[0].class_name]

    # one random stream: only the pairs of prompts that edit the look change, and every other pair is the same
    for other in (kept, always):
        pairs = zip(same.entries, other.entries, strict=True)
        assert all(a == b for a, b in pairs if not mw.asks_property(a[1]))
        assert pasted(other, edits=False) == pasted(same, edits=False)
    assert 0.2 < sum(pasted(same, edits=True)) / len(pasted(same, edits=True)) < 0.4
    assert not any(pasted(kept, edits=True)) and all(pasted(always, edits=True))
    assert 0.2 < sum(pasted(kept, edits=False)) / len(pasted(kept, edits=False)) < 0.4
    # without other copy-paste pairs the edits alone can be pasted over
    alone = WORLD.dataset("train", prompts_per_subject=16, seed=3, copy_paste_property=1.0)
    assert all(pasted(alone, edits=True)) and not any(pasted(alone, edits=False))
    with pytest.raises(ValueError, match="copy_paste_property"):
        WORLD.dataset("train", copy_paste=0.3, copy_paste_property=1.5)
    scenes = mw.MiniWorld(num_train_subjects=8, num_test_subjects=4, subjects=2)
    with pytest.raises(ValueError, match="copy_paste_property"):
        scenes.dataset("train", copy_paste=0.3, copy_paste_property=0.0)


def test_world_version_is_checked():
    assert WORLD.version == mw.WORLD_VERSION
    with pytest.raises(ValueError, match="data.options.version"):
        mw.MiniWorld(num_train_subjects=4, num_test_subjects=2, version=mw.WORLD_VERSION - 1)
