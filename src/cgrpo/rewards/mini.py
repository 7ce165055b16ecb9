"""The mini world's two competing rewards, computed from pixels (and the prompt / reference) alone.

``mini_id`` — the DINO-Seg analogue. The subject is segmented from its background (background colour =
median of the border pixels; subject = pixels far from it, minus specks), cropped to its bounding box and
resampled to a canonical ``C x C`` square, so that placement, size and background do not matter. The
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
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from cgrpo.data import miniworld as mw
from cgrpo.rewards.base import BatchReward, ImageBatch, RewardBatch, check_batch, register, to_tensor

FOREGROUND_THRESHOLD = 0.2  # RGB distance from the background; world colours are >= 0.4 apart
KEEP_FRACTION = 0.25  # components smaller than this share of the largest are specks, not subject
CANONICAL_SIZE = 16

ID_WEIGHTS = {"shape": 0.2, "color": 0.3, "layout": 0.35, "texture": 0.15}
PROMPT_WEIGHTS = {"asked": 0.65, "base": 0.35}
# A faithful recolour keeps the pattern and the mark: about 30% of a subject's pixels take the asked colour.
FAITHFUL_COLOR_SHARE = 0.3

HISTOGRAM_BINS = 3  # per channel, at 0, 0.5, 1: 27 colour bins


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
    near = soft_gaussian(channel_norm(images - body[:, :, None, None]), 0.15)
    share = (near * seg.mask).sum((1, 2)) / seg.mask.sum((1, 2)).clamp(min=1)
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
    """``mini_id``: similarity of the segmented, canonicalised subject to the reference's, in [0, 1]."""

    name = "mini_id"
    default_weights = ID_WEIGHTS

    def _score(self, batch: torch.Tensor, refs: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores = identity_scores(batch, refs, self.canonical_size, self.threshold)
        return combine(scores, self.weights)


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
