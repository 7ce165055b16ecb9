"""The mini world's rewards: ranges, batch handling and the identity-vs-prompt conflict on rendered images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cgrpo.data import miniworld as mw
from cgrpo.rewards import base as rewards
from cgrpo.rewards import mini

WORLD = mw.MiniWorld(num_train_subjects=20, num_test_subjects=40, seed=0)
EXAMPLES = list(WORLD.eval_set(num_subjects=16, prompts_per_kind=2))
PROMPTS = [e.prompt for e in EXAMPLES]
KINDS = [e.kind for e in EXAMPLES]
REFS = torch.stack([e.reference for e in EXAMPLES])
GTS = torch.stack([e.target for e in EXAMPLES])
ID = rewards.build("mini_id")
PROMPT = rewards.build("mini_prompt")


def _blob(example) -> torch.Tensor:
    """A generic solid disc of the asked (or the subject's) colour, where and as large as asked, on the
    asked background: follows the prompt, ignores the subject."""
    subject = WORLD.subject(example.subject_id)
    spec = mw.parse_prompt(example.prompt)
    colour = spec.color or subject.body_color
    disc = mw.Subject("blob", "circle", colour, "solid", "white", "center", colour)
    where = mw.PromptSpec("circle", background=spec.background, position=spec.position, size=spec.size)
    return mw.to_chw(mw.draw(disc, where, WORLD.image_size))


def _broken(images: torch.Tensor) -> torch.Tensor:
    """Cut every subject into pieces with background-coloured bars through the image centre."""
    out = images.clone()
    background = mini.estimate_background(images)[:, :, None, None]
    mid = images.shape[-1] // 2
    out[:, :, :, mid - 1 : mid + 2] = background
    out[:, :, mid - 1 : mid + 2, :] = background
    return out


def _noisy(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + sigma * noise).clamp(0, 1)


@pytest.fixture(scope="module")
def scores() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    variants = {
        "copy": REFS,
        "gt": GTS,
        "blob": torch.stack([_blob(e) for e in EXAMPLES]),
        "noise": _noisy(GTS, 0.1),
        "broken": _broken(GTS),
        "blank": torch.full_like(GTS, 0.75),
    }
    return {name: (ID(x, REFS, PROMPTS), PROMPT(x, REFS, PROMPTS)) for name, x in variants.items()}


def _mean(values: torch.Tensor, kind: str | None = None) -> float:
    selected = torch.tensor([kind is None or k == kind for k in KINDS])
    return values[selected].mean().item()


def test_registered_and_shaped():
    assert {"mini_id", "mini_prompt"} <= set(rewards.names())
    assert ID.name == "mini_id" and PROMPT.name == "mini_prompt"
    for reward in (ID, PROMPT):
        out = reward(GTS[:5], REFS[:5], PROMPTS[:5])
        assert out.shape == (5,) and out.dtype == torch.float32
        assert torch.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()
        assert reward(GTS[:0], REFS[:0], []).shape == (0,)
        with pytest.raises(ValueError, match="mismatch"):
            reward(GTS[:3], REFS[:2], PROMPTS[:3])


def test_every_kind_is_covered():
    assert set(KINDS) == set(mw.KINDS)


def test_copy_keeps_identity_but_fails_property_prompts(scores):
    copy_id, copy_prompt = scores["copy"]
    _, gt_prompt = scores["gt"]
    assert copy_id.min() >= 0.95
    for kind in ("property", "context", "combo"):
        assert _mean(copy_prompt, kind) < _mean(gt_prompt, kind) - 0.3, kind
    property_rows = torch.tensor([k == "property" for k in KINDS])
    assert (copy_prompt[property_rows] < gt_prompt[property_rows] - 0.1).all()


def test_identity_ignores_whole_pixel_moves_but_not_the_corners_sub_pixel_offset():
    # The subject is cropped to its box, so moving it by whole pixels costs nothing; the world's corners sit
    # 0.4 px off the pixel grid (centre 0.3 of 32 px), which rasterises the shape, pattern and mark anew:
    # a faithful corner placement pays about 0.08 identity for that alone (docs/mini-world.md).
    subjects = WORLD.subjects("test")[:16]
    refs = torch.stack([WORLD.reference(s) for s in subjects])
    moved = torch.roll(refs, shifts=(-6, -6), dims=(2, 3))  # the subject stays inside, on a flat background
    assert torch.allclose(ID(moved, refs, ["x"] * 16), torch.ones(16), atol=1e-5)
    corner = torch.stack([WORLD.render(s, mw.PromptSpec(s.shape, position="top left")) for s in subjects])
    cost = 1 - ID(corner, refs, ["x"] * 16)
    assert 0.04 < cost.mean().item() < 0.15


def test_ground_truth_tops_the_prompt_reward_and_pays_in_identity(scores):
    gt_id, gt_prompt = scores["gt"]
    copy_id, _ = scores["copy"]
    for kind in mw.KINDS:
        assert _mean(gt_prompt, kind) >= 0.85, kind
        others = [_mean(scores[v][1], kind) for v in ("blob", "noise", "broken", "blank")]
        assert _mean(gt_prompt, kind) >= max(others) - 0.02, kind
    # identity-neutral edits keep identity; property edits cost it (fidelity vs editability)
    assert _mean(gt_id, "context") >= 0.95 and _mean(gt_id, "plain") >= 0.95
    assert _mean(gt_id, "placement") >= 0.8
    property_rows = torch.tensor([k == "property" for k in KINDS])
    assert (gt_id[property_rows] < copy_id[property_rows] - 0.05).all()
    assert _mean(gt_id, "property") < _mean(copy_id, "property") - 0.2


def test_ignoring_the_subject_can_follow_the_prompt_but_loses_identity(scores):
    blob_id, blob_prompt = scores["blob"]
    gt_id, gt_prompt = scores["gt"]
    for kind in ("context", "placement"):
        assert _mean(blob_prompt, kind) >= _mean(gt_prompt, kind) - 0.1, kind
        assert _mean(blob_id, kind) <= 0.6 and _mean(blob_id, kind) <= _mean(gt_id, kind) - 0.3, kind
    blobs = torch.stack([_blob(e) for e in EXAMPLES])
    parts = mini.reward_breakdown(blobs, REFS, PROMPTS)
    for attribute in ("background", "position", "size", "color"):
        assert torch.nanmean(parts[attribute]) >= 0.9, attribute


def test_noise_broken_shapes_and_blank_images_score_lower(scores):
    gt_id, gt_prompt = scores["gt"]
    for variant in ("noise", "broken"):
        assert _mean(scores[variant][1]) < _mean(gt_prompt) - 0.1, variant
        assert _mean(scores[variant][0]) < _mean(gt_id) - 0.1, variant
    mild = PROMPT(_noisy(GTS, 0.05), REFS, PROMPTS)
    assert _mean(scores["noise"][1]) < _mean(mild) < _mean(gt_prompt)
    blank_id, blank_prompt = scores["blank"]
    assert blank_id.max() <= 0.05 and blank_prompt.max() <= 0.05
    static = torch.rand(GTS.shape, generator=torch.Generator().manual_seed(0))
    assert _mean(ID(static, REFS, PROMPTS)) < 0.45 and _mean(PROMPT(static, REFS, PROMPTS)) < 0.2
    parts = mini.reward_breakdown(_broken(GTS), REFS, PROMPTS)
    assert (parts["components"] < 1).float().mean() > 0.5  # the quality term sees the pieces


def _interpolation_scores(kind: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [i for i, k in enumerate(KINDS) if k == kind]
    refs, gts, prompts = REFS[rows], GTS[rows], [PROMPTS[i] for i in rows]
    ids, follows = [], []
    generator = torch.Generator().manual_seed(1)
    for t in np.linspace(0, 1, 6):
        for sigma in (0.0, 0.03, 0.06):
            mix = ((1 - t) * refs + t * gts + sigma * torch.randn(refs.shape, generator=generator)).clamp(
                0, 1
            )
            ids.append(ID(mix, refs, prompts))
            follows.append(PROMPT(mix, refs, prompts))
    return torch.cat(ids).numpy(), torch.cat(follows).numpy()


def test_rewards_are_negatively_correlated_on_property_prompts():
    ids, follows = _interpolation_scores("property")
    r = np.corrcoef(ids, follows)[0, 1]
    assert r < -0.3, f"correlation {r:.3f}"
    # no conflict where the edit does not touch the subject: noise lowers both, so they agree
    ids, follows = _interpolation_scores("placement")
    assert np.corrcoef(ids, follows)[0, 1] > 0


def test_attribute_scores_are_soft():
    index = next(i for i, e in enumerate(EXAMPLES) if "in the top left" in e.prompt)
    # slide the ground truth towards the centre pixel by pixel (the background is uniform)
    shifted = torch.stack([GTS[index].roll((k, k), dims=(1, 2)) for k in (0, 1, 2, 3, 5, 7)])
    parts = mini.reward_breakdown(
        shifted, REFS[index : index + 1].expand(6, -1, -1, -1), [PROMPTS[index]] * 6
    )
    position = parts["position"]
    assert (position[:-1] > position[1:]).all()  # every step away from the corner costs a little
    assert position[1] > 0.8 and 0.0 < position[-1] < 0.5
    assert torch.allclose(parts["mini_id"], parts["mini_id"][0])  # identity does not care where


def test_pil_and_tensor_inputs_agree():
    quantised = (GTS[:6] * 255).round() / 255
    pil_images = rewards.to_pil(quantised)
    pil_refs = rewards.to_pil((REFS[:6] * 255).round() / 255)
    for reward in (ID, PROMPT):
        from_tensor = reward(quantised, (REFS[:6] * 255).round() / 255, PROMPTS[:6])
        from_pil = reward(pil_images, pil_refs, PROMPTS[:6])
        assert torch.allclose(from_tensor, from_pil, atol=1e-6)
        assert torch.allclose(from_tensor, reward(GTS[:6], REFS[:6], PROMPTS[:6]), atol=0.02)


@settings(max_examples=10, deadline=None)
@given(index=st.integers(0, 39), seed=st.integers(0, 2**31 - 1), sigma=st.floats(0.0, 0.3))
def test_batch_invariance_and_valid_range_on_noisy_images(index, seed, sigma):
    images = _noisy(GTS[:40], sigma, seed)
    for reward in (ID, PROMPT):
        batch = reward(images, REFS[:40], PROMPTS[:40])
        alone = reward(images[index : index + 1], REFS[index : index + 1], PROMPTS[index : index + 1])
        assert torch.allclose(batch[index : index + 1], alone, atol=1e-6)
        assert torch.isfinite(batch).all() and (batch >= 0).all() and (batch <= 1).all()


def test_unparseable_prompts_and_nan_pixels_give_nan_not_an_error():
    prompts = ["a dog on the moon", PROMPTS[1]]
    out = PROMPT(GTS[:2], REFS[:2], prompts)
    assert math.isnan(out[0]) and math.isfinite(out[1])
    assert torch.isfinite(ID(GTS[:2], REFS[:2], prompts)).all()
    broken = GTS[:3].clone()
    broken[1, :, 4, 4] = float("nan")
    for reward in (ID, PROMPT):
        out = reward(broken, REFS[:3], PROMPTS[:3])
        assert math.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


def test_options_weights_and_image_size():
    shape_only = rewards.build("mini_id", weights={"shape": 1.0, "color": 0.0, "layout": 0.0, "texture": 0.0})
    parts = mini.reward_breakdown(GTS[:8], REFS[:8], PROMPTS[:8])
    assert torch.allclose(shape_only(GTS[:8], REFS[:8], PROMPTS[:8]), parts["id_shape"], atol=1e-6)
    assert torch.allclose(ID(GTS[:8], REFS[:8], PROMPTS[:8]), parts["mini_id"], atol=1e-6)
    assert torch.allclose(
        PROMPT(GTS[:8], REFS[:8], PROMPTS[:8]), parts["mini_prompt"], atol=1e-6, equal_nan=True
    )
    with pytest.raises(ValueError, match="unknown keys"):
        rewards.build("mini_id", weights={"dino": 1.0})
    only_asked = rewards.build("mini_prompt", weights={"asked": 1.0, "base": 0.0})
    copy_property = [i for i, k in enumerate(KINDS) if k == "property"]
    assert (
        only_asked(REFS[copy_property], REFS[copy_property], [PROMPTS[i] for i in copy_property]).max() < 0.2
    )
    big = mw.MiniWorld(image_size=64, num_train_subjects=4, num_test_subjects=8)
    data = list(big.eval_set(num_subjects=8))
    refs64 = torch.stack([e.reference for e in data])
    gts64 = torch.stack([e.target for e in data])
    prompts64 = [e.prompt for e in data]
    assert ID(refs64, refs64, prompts64).min() >= 0.95
    assert PROMPT(gts64, refs64, prompts64).mean() >= 0.85
    resized = rewards.build("mini_prompt", image_size=32)(gts64, refs64, prompts64)
    assert resized.shape == (len(data),) and resized.mean() >= 0.75


def _recolours(limit: int = 40) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(faithful recolours, the same with the pattern painted over in the asked colour, references, prompts)
    for patterned subjects; the mark is kept in both."""
    faithful, painted, refs, prompts = [], [], [], []
    for subject in WORLD.train_subjects + WORLD.test_subjects:
        groups = mw.prompt_groups(subject, "property")
        if subject.pattern == "solid" or not groups or not groups[0]:
            continue
        prompt = groups[0][0]
        spec = mw.parse_prompt(prompt)
        faithful.append(WORLD.render(subject, prompt))
        solid = mw.Subject(subject.id, subject.shape, subject.body_color, "solid", subject.pattern_color,
                           subject.mark, subject.mark_color)  # fmt: skip
        painted.append(mw.to_chw(mw.draw(solid, spec, WORLD.image_size)))
        refs.append(WORLD.reference(subject))
        prompts.append(prompt)
    n = min(limit, len(prompts))
    return torch.stack(faithful[:n]), torch.stack(painted[:n]), torch.stack(refs[:n]), prompts[:n]


def test_faithful_color_share_stops_rewarding_a_painted_over_pattern():
    faithful, painted, refs, prompts = _recolours()
    assert len(prompts) >= 20
    version_1 = rewards.build("mini_prompt", faithful_color_share=None)
    honest = rewards.build("mini_prompt")  # version 2's default: saturated at a faithful recolour's share
    # version 1's colour term rates the painted-over subject above the faithful recolour
    assert version_1(painted, refs, prompts).mean() > version_1(faithful, refs, prompts).mean() + 0.02
    # with the share saturated at a faithful recolour's, painting over gains nothing on average ...
    gain = honest(painted, refs, prompts) - honest(faithful, refs, prompts)
    assert gain.mean() < 0.005
    # ... while the faithful image still follows the prompt far better than a copy, and identity punishes
    # the painting
    assert honest(faithful, refs, prompts).mean() > honest(refs, refs, prompts).mean() + 0.4
    assert ID(painted, refs, prompts).mean() < ID(faithful, refs, prompts).mean() - 0.15
    with pytest.raises(ValueError, match="faithful_color_share"):
        rewards.build("mini_prompt", faithful_color_share=0.0)


def test_recolor_scores_tell_the_asked_colour_from_another_one():
    rows = []  # (image, reference, prompt, expected) for the test subjects that can be recoloured twice
    for subject in WORLD.test_subjects:
        options = mw._recolours(subject)
        if len(options) < 2:
            continue
        asked, wrong = options[:2]
        prompt = mw.format_prompt(mw.PromptSpec(subject.shape, color=asked))
        reference = WORLD.reference(subject)
        rows.append((WORLD.render(subject, prompt), reference, prompt, "asked"))
        rows.append(
            (WORLD.render(subject, mw.PromptSpec(subject.shape, color=wrong)), reference, prompt, "other")
        )
        rows.append((reference, reference, prompt, "copy"))
        rows.append((reference, reference, subject.class_name, "no colour asked"))
        if len(rows) >= 40:
            break
    images, references, prompts, expected = zip(*rows, strict=True)
    scores = mini.recolor_scores(torch.stack(images), torch.stack(references), list(prompts))
    for i, what in enumerate(expected):
        asked, other = float(scores["asked"][i]), float(scores["other"][i])
        if what == "asked":  # a faithful recolour: its body (well over 30% of the subject) has the colour
            assert asked == 1.0 and other < 0.5, (prompts[i], asked, other)
        elif what == "other":
            assert other == 1.0 and asked < 0.5, (prompts[i], asked, other)
        elif what == "copy":  # the reference's own colours are never counted as a recolour
            assert asked < 0.5 and other < 0.5, (prompts[i], asked, other)
        else:
            assert math.isnan(asked) and math.isnan(other)
    # "asked" is the prompt reward's own colour term
    colour = mini.prompt_scores(torch.stack(images), torch.stack(references), list(prompts))["color"]
    has = ~colour.isnan()
    assert torch.allclose(scores["asked"][has], colour[has], atol=1e-5)
