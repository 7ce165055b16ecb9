"""The mini world's two competing rewards, computed from pixels (and the prompt / reference) alone.

``mini_id`` — the DINO-Seg analogue. The subject is segmented from its background (background colour =
median of the border pixels; subject = pixels far from it, minus specks), cropped to its bounding box and
resampled to a canonical ``C x C`` square, so that the background and a move by whole pixels do not matter.
A size or a sub-pixel offset does, a little: the subject is rasterised anew (a faithful image in the world's
corners, 0.4 px off the pixel grid, scores about 0.91; small / large subjects 0.85 / 0.92; ``cgrpo eval mini
--draw ground-truth``). The
canonical subject is compared with the reference's on four features, each a similarity in [0, 1]:
outline (soft IoU of the masks), colour histogram (intersection), layout (colour-aware IoU: the pattern
and the mark in their places) and texture (gradient energy along rows and columns). A copy of the
reference scores exactly 1.

``mini_prompt`` — the HPSv3 analogue. Every attribute the prompt asks for gets a soft score in [0, 1]
(background colour, corner = bounding-box centre, size = bounding-box extent, body colour = share of
subject pixels near the named colour, "striped" = share of the subject's colour variance in row (not column)
stripes, "upside down" = the outline matches the flipped reference better than the reference), plus two
scores every prompt gets: the class (outline against the shape family's prototype) and quality (flat
colours without speckle, one connected subject). The reward is ``presence * (0.65 * mean(asked) +
0.35 * mean(class, quality))``, or ``presence * mean(class, quality)`` for a plain prompt.

Version 1's colour term kept rising when a recolour paints over the pattern too (0.98 vs the faithful
recolour's 0.94, docs/mini-world.md); since version 2, ``faithful_color_share`` (0.3) saturates it at a
faithful recolour's share (``None`` gives version 1's term).

The property prompts ("a red heart", "a striped heart", "a heart upside down") are where the two fight: the
faithful image changes exactly the features ``mini_id`` compares, and the copy fails what the prompt asks.

**Scenes** (several subjects per image, ``cgrpo.data.miniworld.ScenePrompt``). ``mini_id``'s
``score_subjects`` scores each subject: every connected foreground component is a candidate, scored
against every reference with the identity similarity above; components are assigned to subjects by
optimal assignment (``scipy.optimize.linear_sum_assignment``, one component per subject), and a subject
left without a component scores 0. ``mini_prompt`` matches components to the scene's clauses by their
outline (class) the same way and scores each clause's asked look and place on its component, plus the
scene's background, presence and quality. Single-subject prompts score exactly as before.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from cgrpo.data import miniworld as mw
from cgrpo.rewards.base import (
    BatchReward,
    ImageBatch,
    RewardBatch,
    check_batch,
    check_subject_batches,
    register,
    to_tensor,
)

FOREGROUND_THRESHOLD = 0.2  # RGB distance from the background; world colours are >= 0.4 apart
KEEP_FRACTION = 0.25  # components smaller than this share of the largest are specks, not subject
CANONICAL_SIZE = 16

ID_WEIGHTS = {"shape": 0.2, "color": 0.3, "layout": 0.35, "texture": 0.15}
PROMPT_WEIGHTS = {"asked": 0.65, "base": 0.35}
# A faithful recolour keeps the pattern and the mark: about 30% of a subject's pixels take the asked colour.
FAITHFUL_COLOR_SHARE = 0.3

HISTOGRAM_BINS = 3  # per channel, at 0, 0.5, 1: 27 colour bins

MAX_COMPONENTS = 8  # candidate subjects per image in scenes: the largest components (noise makes many)
# A component "matches" a reference at this identity similarity (see subject_assignment): a scene's
# subjects (distinct shapes) score 0.17-0.5 against each other's references, a faithfully drawn subject
# 0.84-0.95 against its own at a scene's size.
CONFUSION_THRESHOLD = 0.6


# ---------------------------------------------------------------------------------------- segmentation
@dataclass
class Segmentation:
    """Per-image segmentation of a batch of N images of size H x W.

    ``background`` ``[N, 3]``; ``foreground`` ``[N, H, W]`` bool (all pixels far from the background);
    ``mask`` ``[N, H, W]`` bool (the subject: foreground components of at least ``KEEP_FRACTION`` of the
    largest); ``components`` ``[N]`` foreground components (4-connected); ``largest_share`` ``[N]`` share
    of the foreground in the largest component; ``box`` ``[N, 4]`` (top, bottom, left, right) edges of
    the mask as fractions of the side (the whole image when the mask is empty); ``area`` ``[N]`` mask area
    as a fraction of the image.
    """

    background: torch.Tensor
    foreground: torch.Tensor
    mask: torch.Tensor
    components: torch.Tensor
    largest_share: torch.Tensor
    box: torch.Tensor
    area: torch.Tensor


def channel_norm(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, ...]`` -> ``[N, ...]`` Euclidean norm over the colour channels.

    Written out because ``Tensor.norm(dim=1)`` takes a slow strided path on CPU (10x slower here).
    """
    return (x[:, 0] ** 2 + x[:, 1] ** 2 + x[:, 2] ** 2).sqrt()


def estimate_background(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` -> ``[N, 3]``: per-channel median of the one-pixel border."""
    border = torch.cat(
        [images[:, :, 0, :], images[:, :, -1, :], images[:, :, 1:-1, 0], images[:, :, 1:-1, -1]], dim=2
    )
    return border.median(dim=2).values


_FOUR_CONNECTED_IN_PLANE = np.array(
    [[[0, 0, 0], [0, 0, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]], [[0, 0, 0], [0, 0, 0], [0, 0, 0]]]
)  # labels a whole batch in one call without linking images


def segment(images: torch.Tensor, threshold: float = FOREGROUND_THRESHOLD) -> Segmentation:
    """Segment the subject of each image of ``[N, 3, H, W]`` (see ``Segmentation``)."""
    n, _, h, w = images.shape
    background = estimate_background(images)
    distance = channel_norm(images - background[:, :, None, None])
    foreground = distance > threshold
    labels, count = ndimage.label(foreground.numpy(), structure=_FOUR_CONNECTED_IN_PLANE)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    owner = np.zeros(count + 1, dtype=np.int64)
    owner[labels.ravel()] = np.repeat(np.arange(n), h * w)
    largest = np.zeros(n, dtype=np.int64)
    np.maximum.at(largest, owner[1:], sizes[1:])
    kept = sizes >= KEEP_FRACTION * largest[owner]
    kept[0] = False
    mask = torch.from_numpy(kept[labels])
    components = torch.from_numpy(np.bincount(owner[1:], minlength=n))
    fg_area = foreground.sum(dim=(1, 2)).double()
    largest_share = torch.from_numpy(largest).double() / fg_area.clamp(min=1)
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    box = torch.stack([_first(rows) / h, _last(rows) / h, _first(cols) / w, _last(cols) / w], dim=1)
    empty = ~rows.any(dim=1)
    box[empty] = torch.tensor([0.0, 1.0, 0.0, 1.0])
    return Segmentation(
        background=background,
        foreground=foreground,
        mask=mask,
        components=components,
        largest_share=largest_share.float(),
        box=box.float(),
        area=mask.float().mean(dim=(1, 2)),
    )


def _first(present: torch.Tensor) -> torch.Tensor:
    """``[N, L]`` bool -> ``[N]`` float index of the first True (0 if none)."""
    return present.float().argmax(dim=1).float()


def _last(present: torch.Tensor) -> torch.Tensor:
    """``[N, L]`` bool -> ``[N]`` float index one past the last True."""
    return (present.shape[1] - present.flip(1).float().argmax(dim=1)).float()


def canonical(
    images: torch.Tensor, seg: Segmentation, size: int = CANONICAL_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """The segmented subject cropped to its box and resampled to ``size x size``.

    Returns (colours ``[N, 3, C, C]`` — zero outside the subject, mask ``[N, C, C]`` in [0, 1]). Sampled
    bilinearly on a 2x finer grid and averaged, which is enough anti-aliasing for a 2-3x downscale.
    """
    n = images.shape[0]
    fine = 2 * size
    steps = (torch.arange(fine, dtype=torch.float32) + 0.5) / fine  # [2C]
    top, bottom, left, right = seg.box.unbind(dim=1)
    ys = top[:, None] + steps[None] * (bottom - top)[:, None]  # [N, 2C] fractions
    xs = left[:, None] + steps[None] * (right - left)[:, None]
    grid = torch.stack(
        [(2 * xs - 1)[:, None, :].expand(n, fine, fine), (2 * ys - 1)[:, :, None].expand(n, fine, fine)],
        dim=3,
    )
    mask = seg.mask.float()[:, None]
    stacked = torch.cat([images * mask, mask], dim=1)
    sampled = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    pooled = F.avg_pool2d(sampled, 2)
    soft_mask = pooled[:, 3]
    colours = pooled[:, :3] / soft_mask[:, None].clamp(min=1e-6) * (soft_mask[:, None] > 1e-3)
    return colours.clamp(0, 1), soft_mask.clamp(0, 1)


# ------------------------------------------------------------------------------------------- features
def soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Soft IoU of masks ``[N, ...]`` -> ``[N]`` (0 when both are empty)."""
    dims = tuple(range(1, a.ndim))
    return torch.minimum(a, b).sum(dims) / torch.maximum(a, b).sum(dims).clamp(min=1e-6)


def color_histogram(colours: torch.Tensor, mask: torch.Tensor, bins: int = HISTOGRAM_BINS) -> torch.Tensor:
    """``[N, 3, C, C]``, ``[N, C, C]`` -> ``[N, bins^3]`` colour histogram of the subject (sums to 1).

    Trilinear soft binning: each pixel spreads over the 8 surrounding bin centres, so the histogram moves
    continuously with the colours (hard bins would make the reward jump at bin edges).
    """
    n = colours.shape[0]
    position = colours.flatten(2).clamp(0, 1) * (bins - 1)  # [N, 3, P]
    low = position.floor().clamp(max=bins - 2)
    frac = position - low
    low = low.long()
    weight = mask.flatten(1)
    histogram = torch.zeros(n, bins**3)
    for corner in range(8):
        step = [(corner >> c) & 1 for c in range(3)]
        index = sum((low[:, c] + step[c]) * bins ** (2 - c) for c in range(3))
        share = weight.clone()
        for c in range(3):
            share = share * (frac[:, c] if step[c] else 1 - frac[:, c])
        histogram.scatter_add_(1, index, share)
    return histogram / histogram.sum(1, keepdim=True).clamp(min=1e-6)


def layout_similarity(
    colours_a: torch.Tensor, mask_a: torch.Tensor, colours_b: torch.Tensor, mask_b: torch.Tensor
) -> torch.Tensor:
    """Colour-aware IoU ``[N]``: pixels in one subject only count as errors, pixels in both by colour."""
    colour_error = (channel_norm(colours_a - colours_b) / 0.75).clamp(max=1.0)
    error = torch.minimum(mask_a, mask_b) * colour_error + (mask_a - mask_b).abs()
    union = torch.maximum(mask_a, mask_b).sum((1, 2))
    return (1 - error.sum((1, 2)) / union.clamp(min=1e-6)) * (union > 1e-6)


def texture(colours: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N, 2]``: mean colour change between vertical and between horizontal neighbours in the subject."""
    dy = channel_norm(colours[:, :, 1:] - colours[:, :, :-1])
    wy = mask[:, 1:] * mask[:, :-1]
    dx = channel_norm(colours[:, :, :, 1:] - colours[:, :, :, :-1])
    wx = mask[:, :, 1:] * mask[:, :, :-1]
    gy = (dy * wy).sum((1, 2)) / wy.sum((1, 2)).clamp(min=1e-6)
    gx = (dx * wx).sum((1, 2)) / wx.sum((1, 2)).clamp(min=1e-6)
    return torch.stack([gy, gx], dim=1)


def texture_similarity(a: torch.Tensor, b: torch.Tensor, floor: float = 0.03) -> torch.Tensor:
    """``[N, 2]`` x2 -> ``[N]``: summed minima over summed maxima (``floor``: flat vs flat stays 1)."""
    return (torch.minimum(a, b).sum(1) + floor) / (torch.maximum(a, b).sum(1) + floor)


def identity_scores(
    images: torch.Tensor,
    references: torch.Tensor,
    canonical_size: int = CANONICAL_SIZE,
    threshold: float = FOREGROUND_THRESHOLD,
) -> dict[str, torch.Tensor]:
    """Per-feature identity similarities ``{shape, color, layout, texture}``, each ``[N]`` in [0, 1]."""
    seg_i, seg_r = segment(images, threshold), segment(references, threshold)
    col_i, mask_i = canonical(images, seg_i, canonical_size)
    col_r, mask_r = canonical(references, seg_r, canonical_size)
    present = (mask_i.sum((1, 2)) > 0) & (mask_r.sum((1, 2)) > 0)
    scores = {
        "shape": soft_iou(mask_i, mask_r),
        "color": torch.minimum(color_histogram(col_i, mask_i), color_histogram(col_r, mask_r)).sum(1),
        "layout": layout_similarity(col_i, mask_i, col_r, mask_r),
        "texture": texture_similarity(texture(col_i, mask_i), texture(col_r, mask_r)),
    }
    return {k: (v * present).clamp(0, 1) for k, v in scores.items()}


def combine(scores: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    total = sum(weights.values())
    return sum(scores[k] * (w / total) for k, w in weights.items())


# ------------------------------------------------------------------------------------------ components
_FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])


def foreground_components(seg: Segmentation, max_components: int = MAX_COMPONENTS) -> list[list[np.ndarray]]:
    """Per image of a segmented batch: its subject-sized foreground components (4-connected, at least
    ``KEEP_FRACTION`` of the largest, as in ``segment``'s mask) as ``[H, W]`` bool masks, largest first,
    at most ``max_components``."""
    out = []
    for foreground in seg.foreground.numpy():
        labels, count = ndimage.label(foreground, structure=_FOUR_CONNECTED)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        order = [int(i) for i in np.argsort(-sizes, kind="stable") if sizes[i] >= KEEP_FRACTION * sizes.max()]
        out.append([labels == i + 1 for i in order[:max_components]])
    return out


def isolate(
    images: torch.Tensor, background: torch.Tensor, owner: Sequence[int], masks: Sequence[np.ndarray]
) -> torch.Tensor:
    """``[M, 3, H, W]``: image ``owner[m]`` with everything but component ``masks[m]`` painted its
    background colour, so that ``segment`` finds exactly that component as the subject."""
    if not masks:
        return images[:0]
    owner_t = torch.as_tensor(list(owner), dtype=torch.long)
    keep = torch.from_numpy(np.stack(masks))[:, None]
    return torch.where(keep, images[owner_t], background[owner_t][:, :, None, None])


def subject_assignment(
    similarity: np.ndarray, threshold: float = CONFUSION_THRESHOLD
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Assign candidate components to subjects from ``similarity`` ``[C, K]`` (component x subject).

    Returns (scores ``[K]``: each subject's similarity to its assigned component, 0 when none is left for
    it; ``assigned`` ``[K]``: the component index or -1; ``missing``: subjects without a component;
    ``confused``: subjects drawn twice). A subject k is *drawn twice* when at least two components match
    it best (argmax over subjects) with similarity >= ``threshold`` while some other subject scores below
    ``threshold`` (it is missing or only weakly matched): one subject took another's place.
    """
    c, k = similarity.shape
    scores, assigned = np.zeros(k), np.full(k, -1)
    if c:
        rows, cols = linear_sum_assignment(similarity, maximize=True)
        scores[cols], assigned[cols] = similarity[rows, cols], rows
    confused = 0
    if c and k > 1:
        best = similarity.argmax(1)
        for j in range(k):
            copies = int(((best == j) & (similarity[:, j] >= threshold)).sum())
            if copies >= 2 and (np.delete(scores, j) < threshold).any():
                confused += 1
    return scores, assigned, int((assigned < 0).sum()), confused


# --------------------------------------------------------------------------------------- prompt scores
@functools.lru_cache(maxsize=4096)
def _parse(prompt: str) -> mw.PromptSpec | None:
    try:
        return mw.parse_prompt(prompt)
    except ValueError:
        return None


@functools.cache
def prototype(shape: str, size: int = CANONICAL_SIZE) -> torch.Tensor:
    """``[C, C]`` soft mask of a shape family filling the canonical square (2x supersampled)."""
    fine = 2 * size
    c = (np.arange(fine) + 0.5) / fine * 2 - 1
    v, u = np.meshgrid(c, c, indexing="ij")
    mask = torch.from_numpy(mw.SHAPES[shape](u, v).astype(np.float32))
    return F.avg_pool2d(mask[None, None], 2)[0, 0]


def soft_gaussian(distance: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.exp(-(distance**2) / (2 * sigma**2))


def _high_profile_energy(
    colours: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, dim: int
) -> torch.Tensor:
    """``[N]``: energy of the subject's row (``dim=3``) or column (``dim=2``) mean colours at 2+ cycles."""
    weight = mask.sum(dim - 1)  # [N, C] subject mass per row / column
    profile = (colours * mask[:, None]).sum(dim) / weight[:, None].clamp(min=1e-6)  # [N, 3, C]
    profile = (profile - mean[:, :, None]) * (weight[:, None] > 1e-3)
    spectrum = torch.fft.rfft(profile, dim=2)
    spectrum[:, :, :2] = 0  # a top/bottom (or left/right) split is not a stripe pattern
    high = torch.fft.irfft(spectrum, n=profile.shape[2], dim=2)
    return ((high**2).sum(1) * weight).sum(1) / weight.sum(1).clamp(min=1e-6)


def stripe_score(colours: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N]``: how much of the subject's colour variance lies in horizontal stripes, times a contrast term.

    Horizontal stripes put their variance in the row means and none in the column means; dots and
    checks put it in both (or neither), so the score is (row share - column share).
    """
    mass = mask.sum((1, 2)).clamp(min=1e-6)
    mean = (colours * mask[:, None]).sum((2, 3)) / mass[:, None]  # [N, 3]
    variance = (((colours - mean[:, :, None, None]) ** 2).sum(1) * mask).sum((1, 2)) / mass
    rows = _high_profile_energy(colours, mask, mean, dim=3)
    columns = _high_profile_energy(colours, mask, mean, dim=2)
    share = ((rows - columns) / variance.clamp(min=1e-6)).clamp(0, 1)
    contrast = 1 - torch.exp(-variance / 0.03)
    return share * contrast


def color_shares(images: torch.Tensor, mask: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    """``[N, K]``: the share of each image's subject pixels (``mask`` ``[N, H, W]``) near each of K colours,
    ``colors`` ``[N, K, 3]`` per image or ``[1, K, 3]`` for all (soft: Gaussian in colour distance)."""
    distance = channel_norm(images[:, :, None] - colors.permute(0, 2, 1)[..., None, None])  # [N, K, H, W]
    near = soft_gaussian(distance, 0.15) * mask[:, None]
    return near.sum((2, 3)) / mask.sum((1, 2)).clamp(min=1)[:, None]


def flatness(images: torch.Tensor, sigma: float = 0.05) -> torch.Tensor:
    """``[N]``: mean over pixels of how closely the pixel matches its most similar 4-neighbour.

    Flat-colour art scores 1 (every pixel has a same-coloured neighbour); pixel noise and speckle do not.
    """
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    h, w = images.shape[2:]
    shifts = [padded[:, :, 0:h, 1 : w + 1], padded[:, :, 2:, 1 : w + 1], padded[:, :, 1 : h + 1, 0:w]]
    shifts.append(padded[:, :, 1 : h + 1, 2:])
    nearest = torch.stack([channel_norm(images - s) for s in shifts]).min(dim=0).values
    return soft_gaussian(nearest, sigma).mean((1, 2))


def prompt_scores(
    images: torch.Tensor,
    references: torch.Tensor,
    prompts: Sequence[str],
    canonical_size: int = CANONICAL_SIZE,
    threshold: float = FOREGROUND_THRESHOLD,
    faithful_color_share: float | None = FAITHFUL_COLOR_SHARE,
) -> dict[str, torch.Tensor]:
    """Per-attribute prompt scores, each ``[N]`` in [0, 1]; NaN where the prompt does not ask for it.

    ``faithful_color_share``: a recolour scores 1 once this share of the subject's pixels has the asked
    colour (a faithful recolour keeps the pattern and mark: about 30% of the subject); None gives version 1's
    ``1 - exp(-share / 0.2)``, which still rises when the pattern is painted over too.

    Always present: ``presence``, ``class``, ``quality`` (and its parts ``flatness``, ``largest_share``,
    ``components``); asked-for only: ``background``, ``position``, ``size``, ``color``, ``pattern``,
    ``upside_down``. ``valid`` is 1 where the prompt parsed.
    """
    n = images.shape[0]
    specs = [_parse(p) for p in prompts]
    valid = torch.tensor([s is not None for s in specs])
    specs = [s if s is not None else mw.PromptSpec("circle") for s in specs]
    seg = segment(images, threshold)
    colours, mask = canonical(images, seg, canonical_size)
    nan = torch.full((n,), float("nan"))

    def asked(flags: list[bool], score: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.tensor(flags, dtype=torch.bool), score, nan)

    # presence: something of a plausible size stands out from the background
    presence = (1 - torch.exp(-seg.area / 0.02)) * torch.sigmoid((0.9 - seg.area) / 0.03)
    protos = torch.stack([prototype(s.shape, canonical_size) for s in specs])
    class_score = torch.maximum(soft_iou(mask, protos), soft_iou(mask, protos.flip(1)))
    fragments = torch.exp(-(seg.components.float() - 1).clamp(min=0) / 4) * (seg.components > 0)
    parts = {"flatness": flatness(images), "largest_share": seg.largest_share, "components": fragments}
    quality = (parts["flatness"] + parts["largest_share"] + parts["components"]) / 3

    target_bg = torch.tensor([s.background_rgb for s in specs], dtype=torch.float32)
    background = soft_gaussian((seg.background - target_bg).norm(dim=1), 0.12)
    top, bottom, left, right = seg.box.unbind(1)
    centre = torch.stack([(left + right) / 2, (top + bottom) / 2], dim=1)
    target_centre = torch.tensor([s.centre for s in specs], dtype=torch.float32)
    position = soft_gaussian((centre - target_centre).norm(dim=1), 0.1)
    extent = torch.maximum(bottom - top, right - left).clamp(min=1e-3)
    target_extent = torch.tensor([s.extent for s in specs], dtype=torch.float32)
    size = soft_gaussian(torch.log(extent / target_extent), 0.2)
    body = torch.tensor([mw.COLORS[s.color] if s.color else (0.0, 0.0, 0.0) for s in specs])
    share = color_shares(images, seg.mask, body[:, None])[:, 0]
    if faithful_color_share is None:
        color = 1 - torch.exp(-share / 0.2)
    else:
        color = (share / faithful_color_share).clamp(max=1.0)
    pattern = stripe_score(colours, mask)
    upside_down = _upside_down_score(mask, references, canonical_size, threshold)

    scores = {
        "background": asked([s.background is not None for s in specs], background),
        "position": asked([s.position is not None for s in specs], position),
        "size": asked([s.size is not None for s in specs], size),
        "color": asked([s.color is not None for s in specs], color),
        "pattern": asked([s.pattern is not None for s in specs], pattern),
        "upside_down": asked([bool(s.upside_down) for s in specs], upside_down),
    }
    return {
        **scores,
        "presence": presence,
        "class": class_score,
        "quality": quality,
        **parts,
        "valid": valid.float(),
    }


def _upside_down_score(
    mask: torch.Tensor, references: torch.Tensor, canonical_size: int, threshold: float
) -> torch.Tensor:
    """``[N]``: the outline matches the vertically flipped reference, and clearly better than unflipped."""
    _, ref_mask = canonical(references, segment(references, threshold), canonical_size)
    flipped = soft_iou(mask, ref_mask.flip(1))
    same = soft_iou(mask, ref_mask)
    return flipped * torch.sigmoid((flipped - same) / 0.15)


def prompt_total(
    scores: Mapping[str, torch.Tensor], weights: Mapping[str, float] = PROMPT_WEIGHTS
) -> torch.Tensor:
    """``[N]``: presence * (weighted mean of the asked attributes and of (class, quality)); NaN if invalid."""
    keys = ("background", "position", "size", "color", "pattern", "upside_down")
    stacked = torch.stack([scores[k] for k in keys], dim=1)  # [N, 6], NaN where not asked
    count = (~stacked.isnan()).sum(1)
    asked = stacked.nan_to_num(0.0).sum(1) / count.clamp(min=1)
    base = (scores["class"] + scores["quality"]) / 2
    w_asked = weights["asked"] / (weights["asked"] + weights["base"])
    mixed = torch.where(count > 0, w_asked * asked + (1 - w_asked) * base, base)
    total = scores["presence"] * mixed
    return torch.where(scores["valid"] > 0, total, torch.full_like(total, float("nan")))


# --------------------------------------------------------------------------------------- scene prompts
@functools.lru_cache(maxsize=4096)
def _parse_scene(prompt: str) -> mw.ScenePrompt | None:
    if not mw.is_scene_prompt(prompt):
        return None
    try:
        return mw.parse_scene(prompt)
    except ValueError:
        return None


def _asked_keys(scene: mw.ScenePrompt, j: int) -> list[str]:
    clause = scene.clauses[j]
    keys = ["position"] * scene.placed + ["color"] * (clause.color is not None)
    return keys + ["pattern"] * (clause.pattern is not None) + ["upside_down"] * bool(clause.upside_down)


def scene_prompt_scores(
    image: torch.Tensor,
    scene: mw.ScenePrompt,
    canonical_size: int = CANONICAL_SIZE,
    threshold: float = FOREGROUND_THRESHOLD,
    faithful_color_share: float | None = FAITHFUL_COLOR_SHARE,
) -> dict[str, object]:
    """Prompt scores of one image ``[3, S, S]`` for a scene: ``clauses`` (one dict per subject of its
    ``class`` and asked ``position``, ``color``, ``pattern``, ``upside_down``, 0 for a subject without a
    component), ``background`` (None when not asked), ``presence``, ``quality``, ``assigned``.

    Components are matched to clauses by outline (the class score, best of upright and flipped) with
    optimal assignment, so a subject drawn at the other's place keeps its class but loses its position.
    """
    batch = image[None]
    seg = segment(batch, threshold)
    masks = foreground_components(seg, MAX_COMPONENTS)[0]
    k = scene.num_subjects
    if not masks:  # a blank image: nothing is present
        clauses = [{"class": 0.0, **{key: 0.0 for key in _asked_keys(scene, j)}} for j in range(k)]
        background = None if scene.background is None else 0.0
        return {
            "clauses": clauses,
            "background": background,
            "presence": 0.0,
            "quality": 0.0,
            "assigned": (-1,) * k,
        }
    candidates = isolate(batch, seg.background, [0] * len(masks), masks)
    parts = segment(candidates, threshold)
    colours, mask = canonical(candidates, parts, canonical_size)
    protos = torch.stack([prototype(c.shape, canonical_size) for c in scene.clauses])  # [K, C, C]
    m, c2 = len(masks), canonical_size
    pairs = mask[:, None].expand(m, k, c2, c2).reshape(m * k, c2, c2)
    upright = soft_iou(pairs, protos[None].expand(m, k, c2, c2).reshape(m * k, c2, c2)).view(m, k)
    flipped = soft_iou(pairs, protos.flip(1)[None].expand(m, k, c2, c2).reshape(m * k, c2, c2)).view(m, k)
    class_matrix = torch.maximum(upright, flipped)  # [M, K]
    assigned = np.full(k, -1)
    if len(masks):
        rows, cols = linear_sum_assignment(class_matrix.numpy(), maximize=True)
        assigned[cols] = rows
    top, bottom, left, right = parts.box.unbind(1)
    centres = torch.stack([(left + right) / 2, (top + bottom) / 2], dim=1)
    stripes = stripe_score(colours, mask) if len(masks) else torch.zeros(0)
    clauses = []
    for j, clause in enumerate(scene.clauses):
        c = int(assigned[j])
        found = c >= 0
        scores: dict[str, float] = {"class": float(class_matrix[c, j]) if found else 0.0}
        if scene.placed:
            target = torch.tensor(scene.centres[j], dtype=torch.float32)
            scores["position"] = float(soft_gaussian((centres[c] - target).norm(), 0.1)) if found else 0.0
        if clause.color is not None:
            share = 0.0
            if found:
                body = torch.tensor(mw.COLORS[clause.color])[:, None, None]
                near = soft_gaussian(channel_norm((candidates[c] - body)[None])[0], 0.15)
                share = float((near * parts.mask[c]).sum() / parts.mask[c].sum().clamp(min=1))
            scores["color"] = (
                1 - float(np.exp(-share / 0.2))
                if faithful_color_share is None
                else min(share / faithful_color_share, 1.0)
            )
        if clause.pattern is not None:
            scores["pattern"] = float(stripes[c]) if found else 0.0
        if clause.upside_down:
            scores["upside_down"] = (
                float(flipped[c, j] * torch.sigmoid((flipped[c, j] - upright[c, j]) / 0.15)) if found else 0.0
            )
        clauses.append(scores)
    area = float(sum(m.sum() for m in masks)) / image.shape[-1] ** 2
    found_share = float((assigned >= 0).mean())
    presence = found_share * (1 - np.exp(-area / 0.02)) / (1 + np.exp(-(0.9 - area) / 0.03))
    sizes = sorted((int(m.sum()) for m in masks), reverse=True)
    labelled = int(seg.foreground[0].sum())
    largest_share = sum(sizes[:k]) / labelled if labelled else 0.0
    counts = int(seg.components[0])
    fragments = float(np.exp(-max(counts - k, 0) / 4)) if counts else 0.0
    quality = (float(flatness(batch)[0]) + largest_share + fragments) / 3
    background = None
    if scene.background is not None:
        target_bg = torch.tensor(scene.background_rgb, dtype=torch.float32)
        background = float(soft_gaussian((seg.background[0] - target_bg).norm(), 0.12))
    return {
        "clauses": clauses,
        "background": background,
        "presence": float(presence),
        "quality": quality,
        "assigned": tuple(assigned.tolist()),
    }


def scene_prompt_total(scores: Mapping[str, object], weights: Mapping[str, float] = PROMPT_WEIGHTS) -> float:
    """``prompt_total`` for a scene: presence * (weighted mean of every asked attribute, of all clauses and
    the background, and of (mean class, quality))."""
    clauses = scores["clauses"]
    asked = [v for clause in clauses for key, v in clause.items() if key != "class"]
    if scores["background"] is not None:
        asked.append(scores["background"])
    base = (float(np.mean([clause["class"] for clause in clauses])) + scores["quality"]) / 2
    w_asked = weights["asked"] / (weights["asked"] + weights["base"])
    mixed = w_asked * float(np.mean(asked)) + (1 - w_asked) * base if asked else base
    return scores["presence"] * mixed


# ------------------------------------------------------------------------------------------ the rewards
def _prepare(images: ImageBatch, image_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[N, 3, S, S]`` in [0, 1] with non-finite pixels zeroed, ``[N]`` bool: image was all finite)."""
    batch = to_tensor(images).cpu()
    finite = torch.isfinite(batch).flatten(1).all(1)
    batch = batch.nan_to_num(0.0, 0.0, 0.0)
    if image_size is not None and batch.shape[-1] != image_size and batch.shape[0] > 0:
        batch = F.interpolate(batch, size=(image_size, image_size), mode="bilinear", antialias=True)
    return batch.clamp(0, 1), finite


def _nan_where(scores: torch.Tensor, *finite: torch.Tensor) -> torch.Tensor:
    """Non-finite input images get a NaN score (the trainer masks them) instead of a made-up one."""
    ok = torch.stack(finite).all(0)
    return torch.where(ok, scores, torch.full_like(scores, float("nan")))


class _MiniReward(BatchReward):
    """What the two mini-world rewards share: options, resizing, and NaN for non-finite inputs.

    Subclasses set ``name`` and ``default_weights`` and define ``_score`` on the prepared batches.
    """

    name: str
    default_weights: Mapping[str, float]

    def __init__(
        self,
        image_size: int | None = None,
        weights: Mapping[str, float] | None = None,
        canonical_size: int = CANONICAL_SIZE,
        threshold: float = FOREGROUND_THRESHOLD,
    ) -> None:
        self.image_size = image_size
        self.weights = _check_weights(weights, self.default_weights, self.name)
        self.canonical_size = canonical_size
        self.threshold = threshold

    def _score(self, batch: torch.Tensor, refs: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[N, 3, S, S]`` images and references in [0, 1] -> ``[N]`` scores."""
        raise NotImplementedError

    def score_batch(self, batch: RewardBatch) -> torch.Tensor:
        images, finite = _prepare(batch.images, self.image_size)
        refs, refs_finite = _prepare(batch.references, self.image_size)
        return _nan_where(self._score(images, refs, batch.prompts).float(), finite, refs_finite)


class MiniIdentityReward(_MiniReward):
    """``mini_id``: similarity of the segmented, canonicalised subject to the reference's, in [0, 1].

    ``score_subjects`` scores several subjects per image (module docstring); ``last_assignment()`` then
    returns its per-sample diagnostics.
    """

    name = "mini_id"
    default_weights = ID_WEIGHTS

    def __init__(
        self,
        *args,
        confusion_threshold: float = CONFUSION_THRESHOLD,
        max_components: int = MAX_COMPONENTS,
        **kw,
    ) -> None:
        super().__init__(*args, **kw)
        if not 0.0 < confusion_threshold <= 1.0 or max_components < 1:
            raise ValueError(
                f"mini_id needs confusion_threshold in (0, 1] and max_components >= 1, got "
                f"{confusion_threshold} and {max_components}"
            )
        self.confusion_threshold = confusion_threshold
        self.max_components = max_components
        self._last: list[dict] = []

    def _score(self, batch: torch.Tensor, refs: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores = identity_scores(batch, refs, self.canonical_size, self.threshold)
        return combine(scores, self.weights)

    @torch.no_grad()
    def score_subjects(
        self,
        images: ImageBatch,
        references: Sequence[ImageBatch],
        prompts: Sequence[str],
        subject_classes: Sequence[Sequence[str] | None] | None = None,
    ) -> torch.Tensor:
        """``[N, K]`` identity of each subject (``references``: K batches, one per subject; classes unused:
        the reference alone says who the subject is). With K = 1 the whole segmented foreground is the
        subject, exactly as ``__call__``; with K > 1 each connected component is a candidate, assigned to
        at most one subject by optimal assignment; a subject without a component scores 0. NaN rows for
        non-finite images or references."""
        references = list(references)
        n, k = len(images), len(references)
        check_subject_batches(images, references, prompts, subject_classes)
        batch, finite = _prepare(images, self.image_size)
        prepared = [_prepare(refs, self.image_size) for refs in references]
        seg = segment(batch, self.threshold)
        components = foreground_components(seg, self.max_components)
        if k == 1:
            scores = self._score(batch, prepared[0][0], list(prompts))[:, None]
            found = [len(c) > 0 for c in components]
            self._last = [
                {"missing": int(not f), "confused": 0, "components": len(c), "assigned": (0 if f else -1,)}
                for f, c in zip(found, components, strict=True)
            ]
            return _nan_where(scores.float(), finite[:, None], prepared[0][1][:, None])
        owner = [i for i, masks in enumerate(components) for _ in masks]
        candidates = isolate(batch, seg.background, owner, [m for masks in components for m in masks])
        owner_t = torch.as_tensor(owner, dtype=torch.long)
        similarity = torch.stack(
            [
                combine(
                    identity_scores(candidates, refs[owner_t], self.canonical_size, self.threshold),
                    self.weights,
                )
                if owner
                else torch.zeros(0)
                for refs, _ in prepared
            ],
            dim=1,
        ).numpy()  # [M, K]
        scores = torch.zeros(n, k)
        self._last = []
        start = 0
        for i, masks in enumerate(components):
            block = similarity[start : start + len(masks)]
            start += len(masks)
            row, assigned, missing, confused = subject_assignment(block, self.confusion_threshold)
            scores[i] = torch.from_numpy(row).float()
            self._last.append(
                {
                    "missing": missing,
                    "confused": confused,
                    "components": len(masks),
                    "assigned": tuple(assigned.tolist()),
                }
            )
        ok = torch.stack([finite, *[f for _, f in prepared]]).all(0)
        return torch.where(ok[:, None], scores, torch.full_like(scores, float("nan")))

    def last_assignment(self) -> list[dict]:
        """Per sample of the last ``score_subjects`` call: ``missing`` (subjects left without a component),
        ``confused`` (subjects drawn twice, see :func:`subject_assignment`), ``components`` (candidates)
        and ``assigned`` (each subject's component index, -1 for none)."""
        return [dict(entry) for entry in self._last]


class MiniPromptReward(_MiniReward):
    """``mini_prompt``: how well the image satisfies every attribute of the prompt, times quality."""

    name = "mini_prompt"
    default_weights = PROMPT_WEIGHTS

    def __init__(self, *args, faithful_color_share: float | None = FAITHFUL_COLOR_SHARE, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if faithful_color_share is not None and not 0.0 < faithful_color_share <= 1.0:
            raise ValueError(
                f"mini_prompt faithful_color_share must be in (0, 1], got {faithful_color_share}"
            )
        self.faithful_color_share = faithful_color_share

    def _score(self, batch: torch.Tensor, refs: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scenes = [_parse_scene(p) for p in prompts]
        single = [i for i, scene in enumerate(scenes) if scene is None]
        if len(single) == len(prompts):
            return self._score_single(batch, refs, prompts)
        total = torch.full((len(prompts),), float("nan"))
        if single:  # every image is scored on its own, so a subset scores exactly as in a full batch
            index = torch.tensor(single)
            total[index] = self._score_single(batch[index], refs[index], [prompts[i] for i in single])
        for i, scene in enumerate(scenes):
            if scene is not None:
                parts = scene_prompt_scores(
                    batch[i], scene, self.canonical_size, self.threshold, self.faithful_color_share
                )
                total[i] = scene_prompt_total(parts, self.weights)
        return total

    def _score_single(self, batch: torch.Tensor, refs: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores = prompt_scores(
            batch, refs, prompts, self.canonical_size, self.threshold, self.faithful_color_share
        )
        return prompt_total(scores, self.weights)


def _check_weights(weights: Mapping[str, float] | None, defaults: Mapping[str, float], name: str) -> dict:
    if weights is None:
        return dict(defaults)
    unknown = sorted(set(weights) - set(defaults))
    if unknown:
        raise ValueError(f"{name} weights: unknown keys {unknown}; expected some of {sorted(defaults)}")
    merged = {**defaults, **{k: float(v) for k, v in weights.items()}}
    if any(v < 0 for v in merged.values()) or sum(merged.values()) <= 0:
        raise ValueError(f"{name} weights must be non-negative with a positive sum, got {merged}")
    return merged


@register(
    "mini_id", help="mini world identity: segmented-subject similarity to the reference (DINO-Seg analogue)"
)
def build_mini_id(**options) -> MiniIdentityReward:
    """Mini-world identity reward; options: image_size, weights {shape, color, layout, texture}, ..."""
    return MiniIdentityReward(**options)


@register("mini_prompt", help="mini world prompt following + quality from pixels (HPSv3 analogue)")
def build_mini_prompt(**options) -> MiniPromptReward:
    """Mini-world prompt reward; options: image_size, weights {asked, base}, ..."""
    return MiniPromptReward(**options)


@torch.no_grad()
def body_color_shares(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N, len(BODY_COLORS)]``: the share of each image's subject pixels (``mask`` ``[N, H, W]``) near each
    body colour, measured as the prompt reward's colour term measures the asked one."""
    body = torch.tensor(list(mw.BODY_COLORS.values()), dtype=torch.float32)  # [K, 3]
    return color_shares(images, mask, body[None])


def recolor_scores(
    images: ImageBatch,
    references: ImageBatch,
    prompts: Sequence[str],
    faithful_color_share: float = FAITHFUL_COLOR_SHARE,
    reference_share: float = 0.1,
) -> dict[str, torch.Tensor]:
    """On recolour prompts: does an image take the asked colour, or another one? ``[N]`` each, NaN where
    the prompt asks for no colour.

    ``asked``: the prompt reward's colour score; ``other``: the same score of the strongest body colour that
    is neither asked nor already in the reference (more than ``reference_share`` of its subject), i.e. a
    recolour to the wrong colour. A base whose ``other`` rate exceeds its ``asked`` rate edits the look but
    does not read which colour the prompt names."""
    check_batch(images, references, prompts)
    (batch, _), (refs, _) = _prepare(images, None), _prepare(references, None)
    specs = [_parse(p) for p in prompts]
    names = list(mw.BODY_COLORS)
    asked_index = torch.tensor([names.index(s.color) if s and s.color else -1 for s in specs])
    shares = body_color_shares(batch, segment(batch).mask)
    scores = (shares / faithful_color_share).clamp(max=1.0)
    rows = torch.arange(len(specs))
    excluded = body_color_shares(refs, segment(refs).mask) > reference_share  # the reference's own colours
    excluded[rows, asked_index.clamp(min=0)] = True
    asked = scores[rows, asked_index.clamp(min=0)]
    other = scores.masked_fill(excluded, 0.0).max(dim=1).values
    nan = torch.full_like(asked, float("nan"))
    has_color = asked_index >= 0
    return {"asked": torch.where(has_color, asked, nan), "other": torch.where(has_color, other, nan)}


def reward_breakdown(
    images: ImageBatch, references: ImageBatch, prompts: Sequence[str], image_size: int | None = None
) -> dict[str, torch.Tensor]:
    """Every per-attribute score of both rewards, ``[N]`` each (NaN = not asked), plus the two totals.

    Identity parts are prefixed ``id_``; ``mini_id`` and ``mini_prompt`` are the rewards themselves.
    """
    check_batch(images, references, prompts)
    (batch, _), (refs, _) = _prepare(images, image_size), _prepare(references, image_size)
    identity = identity_scores(batch, refs)
    prompt = prompt_scores(batch, refs, list(prompts))
    return {
        **{f"id_{k}": v for k, v in identity.items()},
        "mini_id": combine(identity, ID_WEIGHTS),
        **prompt,
        "mini_prompt": prompt_total(prompt),
    }
