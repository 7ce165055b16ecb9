"""Mini-world scenes: two and three subjects per image, their grammar and ground truth, and the rewards that
score each subject (mini_id's assignment of components to subjects, mini_prompt on scene prompts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cgrpo.config import ConfigError
from cgrpo.data import miniworld as mw
from cgrpo.data import registry
from cgrpo.rewards import mini
from cgrpo.rewards.base import score_subjects


@pytest.fixture(scope="module")
def world() -> mw.MiniWorld:
    return mw.MiniWorld(subjects=2)


def _pair(world: mw.MiniWorld, shapes: tuple[str, ...] = ("heart", "circle")) -> list[mw.Subject]:
    return [next(s for s in world.test_subjects if s.shape == shape) for shape in shapes]


def _centre(image: torch.Tensor, colour: tuple[float, float, float]) -> tuple[float, float]:
    """(x, y) of the pixels of ``colour`` as fractions of the side."""
    ys, xs = np.nonzero((image - torch.tensor(colour)[:, None, None]).abs().sum(0).numpy() < 1e-4)
    side = image.shape[-1]
    return (xs.mean() + 0.5) / side, (ys.mean() + 0.5) / side


def _foreground_extents(image: torch.Tensor) -> list[tuple[float, float, float]]:
    """(centre x, centre y, extent) of each connected foreground component, left to right, top to bottom."""
    seg = mini.segment(image[None])
    boxes = []
    for mask in mini.foreground_components(seg)[0]:
        ys, xs = np.nonzero(mask)
        side = image.shape[-1]
        extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / side
        boxes.append(((xs.mean() + 0.5) / side, (ys.mean() + 0.5) / side, extent))
    return sorted(boxes)


# ------------------------------------------------------------------------------------------------- grammar


@pytest.mark.parametrize(
    ("prompt", "relation", "kind"),
    [
        ("a heart and a circle", "and", "plain"),
        ("a red heart left of a striped circle", "left of", "combo"),
        ("a heart above a circle", "above", "placement"),
        ("a heart and an arrow upside down on a blue floor", "and", "combo"),
        ("a heart, a circle and a ring in a row", "in a row", "placement"),
        ("a heart, a green circle and a ring", "and", "property"),
        ("a heart, a circle and a ring at night", "and", "context"),
    ],
)
def test_scene_prompts_parse_and_round_trip(prompt, relation, kind):
    scene = mw.parse_scene(prompt)
    assert mw.is_scene_prompt(prompt) and scene.relation == relation and scene.kind == kind
    assert mw.format_scene(scene) == prompt
    assert set(prompt.replace(",", " ").split()) <= set(mw.scene_vocabulary())


@pytest.mark.parametrize(
    ("prompt", "phrase"),
    [
        ("a heart in the top left and a circle", "may not ask for a corner"),
        ("a heart left of a circle left of a ring", "expected two subjects"),
        ("a heart, a circle", "three subjects read"),
        ("a heart left of a circle in a row", "expected two subjects"),
        ("a heart and a star", "expected a shape"),
    ],
)
def test_scene_parse_errors_name_the_problem(prompt, phrase):
    with pytest.raises(ValueError, match=phrase):
        mw.parse_scene(prompt)


def test_single_prompts_are_not_scenes():
    subject = mw.MiniWorld().test_subjects[0]
    for kind in mw.KINDS:
        assert not any(mw.is_scene_prompt(p) for p in mw.prompts_for(subject, kind))


# ----------------------------------------------------------------------------------------------- rendering


def test_render_scene_places_each_subject(world):
    heart, circle = _pair(world)
    left, right = _foreground_extents(world.render_scene([heart, circle], "a heart left of a circle"))
    assert left[0] == pytest.approx(0.25, abs=0.04) and right[0] == pytest.approx(0.75, abs=0.04)
    assert left[2] == pytest.approx(0.4, abs=0.04) and right[2] == pytest.approx(0.4, abs=0.04)
    left_of = world.render_scene([heart, circle], "a heart left of a circle")
    swapped = world.render_scene([heart, circle], "a heart right of a circle")
    assert torch.allclose(swapped[:, :, 16:], left_of[:, :, :16])  # the heart moved half the image right
    assert torch.allclose(swapped[:, :, :16], left_of[:, :, 16:])
    above = world.render_scene([heart, circle], "a heart above a circle")
    assert [round(y, 1) for _, y, _ in _foreground_extents(above)] in ([0.2, 0.8], [0.3, 0.7], [0.2, 0.7])
    on_blue = world.render_scene([heart, circle], "a heart and a circle on a blue floor")
    assert tuple(on_blue[:, 0, 0].tolist()) == pytest.approx(mw.CONTEXTS["on a blue floor"])
    recoloured = world.render_scene([heart, circle], "a heart and a red circle")
    assert _centre(recoloured, mw.COLORS["red"])[0] > 0.5  # only the circle's body changed colour

    ring = next(s for s in world.test_subjects if s.shape == "ring")
    row = _foreground_extents(world.render_scene([heart, circle, ring], "a heart, a circle and a ring"))
    assert [round(x, 1) for x, _, _ in row] == pytest.approx([0.2, 0.5, 0.8], abs=0.11)
    assert all(extent == pytest.approx(0.28, abs=0.05) for *_, extent in row)
    with pytest.raises(ValueError, match="subject .* is a heart"):
        world.render_scene([heart, circle], "a circle and a heart")
    with pytest.raises(ValueError, match="names 2 subjects but 3"):
        world.render_scene([heart, circle, ring], "a heart and a circle")


# ----------------------------------------------------------------------------------------------- datasets


def test_scene_dataset_is_seeded_and_yields_multi_subject_examples(world):
    data = world.dataset("train", prompts_per_subject=2, seed=3)
    assert len(data) == 2 * len(world.train_subjects)
    again = world.scene_dataset("train", prompts_per_subject=2, seed=3)
    other = world.dataset("train", prompts_per_subject=2, seed=4)
    assert [data[i].prompt for i in range(40)] == [again[i].prompt for i in range(40)]
    assert [data[i].prompt for i in range(40)] != [other[i].prompt for i in range(40)]
    for index in range(0, 40, 3):
        example = data[index]
        members = [world.subject(i) for i in example.subject_id.split("+")]
        assert example.num_subjects == 2 and len({s.shape for s in members}) == 2
        assert example.subject_classes == tuple(s.shape for s in members)
        assert all(
            torch.equal(r, world.reference(s)) for r, s in zip(example.references, members, strict=True)
        )
        assert torch.equal(example.target, world.render_scene(members, example.prompt))
        assert mw.parse_scene(example.prompt).kind == example.kind
    kinds = {data[i].kind for i in range(len(data))}
    assert kinds == set(mw.KINDS)
    three = mw.MiniWorld(subjects=3).dataset("train", prompts_per_subject=1, kinds=["placement"])
    assert three[0].num_subjects == 3 and three[0].prompt.endswith("in a row")


def test_scene_imperfect_pairs(world):
    rare = world.dataset("train", prompts_per_subject=4, property_rate=0.1)
    edits = np.mean([mw.parse_scene(p).kind in ("property", "combo") for _, p, *_ in rare.entries])
    assert edits < 0.3
    pasted = world.dataset("train", prompts_per_subject=2, kinds=["combo"], copy_paste=1.0)
    for members, prompt, _, drawn, shown in pasted.entries[:20]:
        scene = mw.parse_scene(prompt)
        assert drawn == members and shown.relation == scene.relation and shown.background is None
        assert all(c == mw.PromptSpec(s.shape) for c, s in zip(shown.clauses, members, strict=True))
    drifted = world.dataset("train", prompts_per_subject=2, detail_drift=1.0)
    assert all(
        d != m for members, *_, drawn, _ in drifted.entries[:20] for d, m in zip(drawn, members, strict=True)
    )


def test_scene_eval_set_is_fixed_and_covers_every_kind(world):
    first = list(world.eval_set(num_subjects=4))
    second = list(world.scene_eval_set(num_subjects=4, subjects=2))
    assert [e.prompt for e in first] == [e.prompt for e in second] and len(first) == 4 * len(mw.KINDS)
    assert [e.kind for e in first[:5]] == list(mw.KINDS)
    assert all(e.subject_id.startswith("test-") for e in first)


def test_registry_and_config_switch():
    single = registry.DATASETS.build("mini", split="test", prompts_per_subject=1)
    assert single[0].num_subjects == 1
    scenes = registry.DATASETS.build("mini", split="test", prompts_per_subject=1, subjects=2)
    assert scenes[0].num_subjects == 2
    registry.check("mini", {"subjects": 2, "scene_version": mw.SCENE_VERSION, "train": {"copy_paste": 0.1}})
    with pytest.raises(ConfigError, match="data.options.subject"):
        registry.check("mini", {"subject": 2})
    with pytest.raises(ValueError, match="scene_version 7"):
        mw.MiniWorld(subjects=2, scene_version=7)
    with pytest.raises(ValueError, match="1, 2 or 3"):
        mw.MiniWorld(subjects=4)


# ------------------------------------------------------------------------------------------------- rewards


def _batch(world: mw.MiniWorld, examples):
    images = torch.stack([e.target for e in examples])
    refs = [torch.stack([e.references[k] for e in examples]) for k in range(examples[0].num_subjects)]
    classes = [[e.subject_classes[k] for e in examples] for k in range(examples[0].num_subjects)]
    return images, refs, [e.prompt for e in examples], classes


@pytest.mark.parametrize("count", [2, 3])
def test_ground_truth_scenes_score_high_for_every_subject(count):
    world = mw.MiniWorld(subjects=count)
    examples = [e for e in world.eval_set(num_subjects=12) if e.kind in ("plain", "placement", "context")]
    images, refs, prompts, classes = _batch(world, examples)
    reward = mini.MiniIdentityReward()
    scores = score_subjects(reward, images, refs, prompts, classes)
    assert scores.shape == (len(examples), count)
    assert float(scores.min()) > 0.7  # drawn smaller than in the reference, so not exactly 1
    assert all(d["missing"] == 0 and d["confused"] == 0 for d in reward.last_assignment())
    # the assignment follows who is who: listing the references in another order permutes the scores
    crossed = score_subjects(reward, images, refs[::-1], prompts, classes[::-1])
    assert torch.equal(crossed, scores.flip(1))
    # while the whole image against one subject's reference (today's single-subject score) is far lower
    assert float(reward(images, refs[0], prompts).mean()) < float(scores[:, 0].mean()) - 0.2
    prompt = mini.MiniPromptReward()(images, refs[0], prompts)
    assert float(prompt.min()) > 0.85


def test_swapping_places_lowers_the_prompt_reward_not_identity(world):
    heart, circle = _pair(world)
    image = world.render_scene([heart, circle], "a heart left of a circle")[None]
    refs = [world.reference(heart)[None], world.reference(circle)[None]]
    reward = mini.MiniIdentityReward()
    asked = score_subjects(reward, image, refs, ["a heart left of a circle"])
    swapped = score_subjects(reward, image, refs, ["a circle left of a heart"])
    assert torch.equal(asked, swapped) and float(asked.min()) > 0.8
    prompt = mini.MiniPromptReward()
    right, wrong = prompt(
        image.repeat(2, 1, 1, 1),
        refs[0].repeat(2, 1, 1, 1),
        ["a heart left of a circle", "a heart right of a circle"],
    )
    assert float(right) > 0.9 and float(right - wrong) > 0.3
    parts = mini.scene_prompt_scores(image[0], mw.parse_scene("a circle left of a heart"))
    assert all(c["class"] > 0.8 and c["position"] < 0.1 for c in parts["clauses"])


def test_missing_subject_scores_zero(world):
    heart, circle = _pair(world)
    scene = mw.parse_scene("a heart left of a circle")
    alone = mw.ScenePrompt(scene.clauses[:1] + (scene.clauses[0],), "left of")
    image = world.render_scene([heart, heart], alone)
    image[:, :, 16:] = image[:, :1, :1]  # wipe the right half: only the heart is left
    refs = [world.reference(heart)[None], world.reference(circle)[None]]
    reward = mini.MiniIdentityReward()
    scores = score_subjects(reward, image[None], refs, ["a heart left of a circle"])
    assert float(scores[0, 0]) > 0.8 and float(scores[0, 1]) == 0.0
    assert reward.last_assignment()[0]["missing"] == 1 and reward.last_assignment()[0]["confused"] == 0
    assert float(mini.MiniPromptReward()(image[None], refs[0], ["a heart left of a circle"])) < 0.6


def test_subject_drawn_twice_is_confusion(world):
    heart, circle = _pair(world)
    twice = world.render_scene([heart, heart], mw.ScenePrompt((mw.PromptSpec("heart"),) * 2, "left of"))
    refs = [world.reference(heart)[None], world.reference(circle)[None]]
    reward = mini.MiniIdentityReward()
    scores = score_subjects(reward, twice[None], refs, ["a heart left of a circle"])
    assert float(scores[0, 0]) > 0.8 and float(scores[0, 1]) < 0.6
    diagnostics = reward.last_assignment()[0]
    assert diagnostics["confused"] == 1 and diagnostics["missing"] == 0 and diagnostics["components"] == 2
    both = world.render_scene([heart, circle], "a heart left of a circle")
    score_subjects(reward, both[None], refs, ["a heart left of a circle"])
    assert reward.last_assignment()[0]["confused"] == 0


def test_subject_assignment_uses_each_component_once():
    similarity = np.array([[0.9, 0.8], [0.85, 0.2]])  # greedy would give component 0 to subject 0
    scores, assigned, missing, confused = mini.subject_assignment(similarity)
    assert assigned.tolist() == [1, 0] and scores.tolist() == [0.85, 0.8] and missing == 0
    assert confused == 0  # both subjects are matched well
    scores, assigned, missing, _ = mini.subject_assignment(np.array([[0.3, 0.9]]))
    assert assigned.tolist() == [-1, 0] and scores.tolist() == [0.0, 0.9] and missing == 1
    assert mini.subject_assignment(np.array([[0.9, 0.1], [0.95, 0.2]]))[3] == 1


def test_one_subject_is_exactly_todays_reward():
    single = list(mw.MiniWorld().eval_set(num_subjects=6))
    images = torch.stack([e.target for e in single])
    images[::3] = (images[::3] + 0.2 * torch.randn_like(images[::3])).clamp(
        0, 1
    )  # noisy, fragmented ones too
    refs = torch.stack([e.reference for e in single])
    prompts = [e.prompt for e in single]
    reward = mini.MiniIdentityReward()
    today = reward(images, refs, prompts)
    assert torch.equal(
        score_subjects(reward, images, [refs], prompts, [[e.subject_class for e in single]])[:, 0], today
    )
    assert torch.equal(reward.score_subjects(images, refs[:, None].unbind(1), prompts)[:, 0], today)


def test_dispatcher_calls_a_plain_reward_once_per_subject(world):
    calls = []

    def mean_gap(images, references, prompts, subjects=None):
        calls.append(list(subjects))
        return (images - references).abs().mean(dim=(1, 2, 3))

    examples = list(world.eval_set(num_subjects=2))[:3]
    images, refs, prompts, classes = _batch(world, examples)
    scores = score_subjects(mean_gap, images, refs, prompts, classes)
    assert scores.shape == (3, 2) and calls == classes
    assert torch.allclose(scores[:, 1], (images - refs[1]).abs().mean(dim=(1, 2, 3)))
    stacked = score_subjects(mean_gap, images, torch.stack(refs, dim=1), prompts, classes)
    assert torch.equal(stacked, scores)
    with pytest.raises(ValueError, match="sequence of K batches"):
        score_subjects(mean_gap, images, refs[0], prompts)
    with pytest.raises(ValueError, match="2 subjects' references but 1 lists"):
        score_subjects(mean_gap, images, refs, prompts, classes[:1])


def test_prompt_reward_on_mixed_batches_keeps_single_prompts_exact(world):
    single = list(mw.MiniWorld().eval_set(num_subjects=3))
    scenes = list(world.eval_set(num_subjects=2))
    reward = mini.MiniPromptReward()
    images = torch.stack([e.target for e in single])
    refs = torch.stack([e.reference for e in single])
    today = reward(images, refs, [e.prompt for e in single])
    mixed = single[:4] + scenes + single[4:]
    scores = reward(
        torch.stack([e.target for e in mixed]),
        torch.stack([e.reference for e in mixed]),
        [e.prompt for e in mixed],
    )
    assert torch.equal(torch.cat([scores[:4], scores[4 + len(scenes) :]]), today)
    assert bool(torch.isfinite(scores).all()) and float(scores[4 : 4 + len(scenes)].mean()) > 0.85
    blank = reward(torch.full((1, 3, 32, 32), 0.7), refs[:1], [scenes[0].prompt])
    assert float(blank) == 0.0
    assert torch.isnan(reward(images[:1], refs[:1], ["a heart and a star"])).all()  # outside the grammar
