"""The mini world: procedural subjects and prompts on which identity and prompt following really compete.

A *subject* is a flat sprite: a shape family (the class, "a triangle"), a body colour, a pattern in a
second colour and a small square *mark* in a third colour at a fixed place on the body. Its reference
image shows it alone, centred, at the default size, on a light-grey background.

Prompts come from a small grammar that mirrors DreamBench's prompt kinds::

    a [small|large] [<colour>] [striped] <shape> [upside down] [in the <corner>] [<context>]

- ``context``   a background ("on a blue floor", "at night") — identity-neutral;
- ``placement`` a corner or a size ("in the top left", "a small heart") — identity-neutral;
- ``property``  a recolour, "striped" or "upside down" — these *change the subject's look*, so a
  faithful ground truth necessarily differs from the reference (the paper's fidelity–editability
  conflict); the mark and the untouched parts of the identity are kept;
- ``combo``     two of the above (property + context, placement/size + context);
- ``plain``     "a <shape>".

``MiniWorld.render(subject, prompt)`` draws the ground truth of every (subject, prompt): pixel-exact,
deterministic, vectorised numpy (about 50 µs per 32x32 image).

Upside-down prompts are only produced for shapes whose orientation is visible (``ORIENTABLE``): the
vertically symmetric ones (circle, square, diamond, cross, ring) would only show it through their
mark, which is too subtle to be a fair prompt. ``render`` still draws it if asked.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from cgrpo.data.base import Example

KINDS = ("plain", "context", "placement", "property", "combo")

# Which mini world a result comes from; configs name it (``data.options.version``) and every run records it,
# so that numbers of different worlds are never compared. A new base or new rewards get a new version
# (docs/mini-world.md):
# 1: the first wave's base (2,500 SFT steps on the full prompt mix, not converged);
# 2: a base pre-trained to convergence on rare edits and imperfect pairs (configs/mini/sft_v2.yaml), and
#    mini_prompt's colour term saturated at a faithful recolour's share;
# 3: version 2's pairs and rewards, a base pre-trained on text-to-image pairs first
#    (configs/mini/sft_v3_stage{1,2,3}.yaml), and GRPO with the CPS log-probability (train.log_prob).
WORLD_VERSION = 3

DEFAULT_BACKGROUND = (0.75, 0.75, 0.73)  # light neutral grey of every reference image
DEFAULT_SIZE = 0.5  # subject extent as a fraction of the image side
DEFAULT_CENTRE = (0.5, 0.5)  # (x, y) as fractions of the image side

# Body colours; every one is also a recolour word of the grammar.
BODY_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.98, 0.85, 0.10),
    "green": (0.10, 0.60, 0.15),
    "blue": (0.10, 0.25, 0.85),
    "purple": (0.50, 0.15, 0.65),
    "pink": (1.00, 0.40, 0.70),
    "brown": (0.45, 0.25, 0.08),
    "teal": (0.00, 0.50, 0.50),
}
# Pattern and mark colours (never words of the grammar: the prompt cannot name them).
ACCENT_COLORS: dict[str, tuple[float, float, float]] = {
    "white": (1.00, 1.00, 1.00),
    "black": (0.05, 0.05, 0.05),
    "yellow": (0.98, 0.85, 0.10),
    "cyan": (0.20, 0.90, 0.95),
    "navy": (0.05, 0.05, 0.40),
}
COLORS: dict[str, tuple[float, float, float]] = {**ACCENT_COLORS, **BODY_COLORS}

# Context phrases and the uniform background colour each one means.
CONTEXTS: dict[str, tuple[float, float, float]] = {
    "on a blue floor": (0.45, 0.62, 0.90),
    "on a green background": (0.55, 0.80, 0.45),
    "on the beach": (0.93, 0.84, 0.60),
    "at night": (0.05, 0.06, 0.20),
    "on a red carpet": (0.60, 0.08, 0.15),
}
# Corners: subject centre (x, y) as fractions of the image side (keeps a default-size subject inside).
PLACEMENTS: dict[str, tuple[float, float]] = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
}
SIZES: dict[str, float] = {"small": 0.3, "large": 0.8}

# Any two colours of one image (body, pattern, mark, background) are at least this far apart in RGB, so
# the subject separates cleanly from its background and its pattern and mark stay visible.
MIN_CONTRAST = 0.4


# Shapes live in local coordinates u (right) and v (down), both in [-1, 1]; every shape touches all four
# sides of that box, so the bounding box of a drawn subject is its size. "Up" is v = -1.
def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 1.0


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(u) + np.abs(v) <= 1.0


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    inside = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    return inside & ((np.abs(u) <= 0.36) | (np.abs(v) <= 0.36))


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.42**2)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # apex up, base down
    return (v >= -1.0) & (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # (x^2 + y^2 - 1)^3 <= x^2 y^3 spans x in [-1.139, 1.139], y in [-1, 1.236]; lobes up, point down
    x = 1.139 * u
    y = 0.118 - 1.118 * v
    return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0


def _arrow(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    head = (v >= -1.0) & (v <= 0.05) & (np.abs(u) <= v + 1.0)
    shaft = (v >= 0.0) & (v <= 1.0) & (np.abs(u) <= 0.38)
    return head | shaft


def _house(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    roof = (v >= -1.0) & (v <= -0.1) & (np.abs(u) <= (v + 1.0) / 0.9)
    walls = (v >= -0.1) & (v <= 1.0) & (np.abs(u) <= 0.75)
    return roof | walls


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "diamond": _diamond,
    "cross": _cross,
    "ring": _ring,
    "triangle": _triangle,
    "heart": _heart,
    "arrow": _arrow,
    "house": _house,
}
ORIENTABLE = frozenset({"triangle", "heart", "arrow", "house"})  # upside down is visible from the outline

_PERIOD = 2.0 / 3.0  # pattern period in local units: three periods across the body


def _stripes(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # horizontal bands: six bands of 1/3 across the body, odd ones in the pattern colour
    return np.floor((v + 1.0) / (_PERIOD / 2.0)).astype(np.int64) % 2 == 1


def _dots(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    du = np.mod(u + 1.0, _PERIOD) - _PERIOD / 2.0
    dv = np.mod(v + 1.0, _PERIOD) - _PERIOD / 2.0
    return du * du + dv * dv <= 0.2**2


def _two_tone(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return v < 0.0  # the upper half


def _checker(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.floor((u + 1.0) * 2.0) + np.floor((v + 1.0) * 2.0)).astype(np.int64) % 2 == 1


def _solid(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)


PATTERNS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "solid": _solid,
    "stripes": _stripes,
    "dots": _dots,
    "two-tone": _two_tone,
    "checker": _checker,
}

# Candidate mark centres (u, v); each shape keeps those whose square lies fully on its body.
MARK_HALF = 0.18
MARK_POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.0, 0.0),
    "top": (0.0, -0.55),
    "bottom": (0.0, 0.6),
    "left": (-0.6, 0.0),
    "right": (0.6, 0.0),
    "upper-left": (-0.45, -0.45),
    "upper-right": (0.45, -0.45),
    "lower-left": (-0.45, 0.5),
    "lower-right": (0.45, 0.5),
}


@functools.cache
def valid_marks(shape: str) -> tuple[str, ...]:
    """Mark positions whose square lies fully on ``shape``'s body (checked on a fine grid)."""
    offsets = np.linspace(-MARK_HALF, MARK_HALF, 13)
    du, dv = np.meshgrid(offsets, offsets)
    return tuple(
        name for name, (mu, mv) in MARK_POSITIONS.items() if bool(SHAPES[shape](mu + du, mv + dv).all())
    )


def _distance(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    return float(np.linalg.norm(np.subtract(a, b)))


@dataclass(frozen=True)
class Subject:
    """One identity of the mini world; colours are names in ``COLORS``, ``mark`` a ``MARK_POSITIONS`` key."""

    id: str
    shape: str
    body_color: str
    pattern: str
    pattern_color: str
    mark: str
    mark_color: str

    @property
    def class_name(self) -> str:
        """The class phrase used in prompts, with its article: ``"a triangle"``, ``"an arrow"``."""
        return f"{_article(self.shape)} {self.shape}"

    @property
    def colors(self) -> tuple[str, str, str]:
        return (self.body_color, self.pattern_color, self.mark_color)


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt; every field but ``shape`` is None where the prompt does not ask for it.

    ``background``: a ``CONTEXTS`` phrase; ``position``: a ``PLACEMENTS`` key; ``size``: a ``SIZES`` key;
    ``color``: a ``BODY_COLORS`` name; ``pattern``: ``"stripes"``; ``upside_down``: True.
    """

    shape: str
    background: str | None = None
    position: str | None = None
    size: str | None = None
    color: str | None = None
    pattern: str | None = None
    upside_down: bool | None = None

    @property
    def kind(self) -> str:
        """``plain`` (nothing asked), the single kind asked for, or ``combo`` (two or more attributes)."""
        asked = [
            ("context", self.background),
            ("placement", self.position),
            ("placement", self.size),
            ("property", self.color),
            ("property", self.pattern),
            ("property", self.upside_down),
        ]
        kinds = [kind for kind, value in asked if value is not None]
        if not kinds:
            return "plain"
        return kinds[0] if len(kinds) == 1 else "combo"

    @property
    def background_rgb(self) -> tuple[float, float, float]:
        return CONTEXTS[self.background] if self.background is not None else DEFAULT_BACKGROUND

    @property
    def centre(self) -> tuple[float, float]:
        return PLACEMENTS[self.position] if self.position is not None else DEFAULT_CENTRE

    @property
    def extent(self) -> float:
        return SIZES[self.size] if self.size is not None else DEFAULT_SIZE


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def format_prompt(spec: PromptSpec) -> str:
    """The grammar's text for ``spec`` (inverse of ``parse_prompt``)."""
    words = [w for w in (spec.size, spec.color, "striped" if spec.pattern else None, spec.shape) if w]
    parts = [_article(words[0]), *words]
    if spec.upside_down:
        parts += ["upside", "down"]
    if spec.position is not None:
        parts += ["in", "the", *spec.position.split()]
    if spec.background is not None:
        parts.append(spec.background)
    return " ".join(parts)


def describe(subject: Subject, spec: PromptSpec) -> PromptSpec:
    """``spec`` with the look the grammar can name filled in from ``subject``: its body colour unless a
    recolour is asked, "striped" if its pattern is stripes (the text-to-image caption of its image)."""
    striped = spec.pattern or ("stripes" if subject.pattern == "stripes" else None)
    return replace(spec, color=spec.color or subject.body_color, pattern=striped)


def parse_prompt(prompt: str) -> PromptSpec:
    """Parse a prompt of the grammar; raises ValueError naming the first word outside it."""
    words = prompt.strip().split()
    if not words or words[0] not in ("a", "an"):
        raise ValueError(f"mini-world prompt {prompt!r} must start with 'a' or 'an'")
    fields: dict[str, object] = {}
    i = 1
    if i < len(words) and words[i] in SIZES:
        fields["size"] = words[i]
        i += 1
    if i < len(words) and words[i] in BODY_COLORS:
        fields["color"] = words[i]
        i += 1
    if i < len(words) and words[i] == "striped":
        fields["pattern"] = "stripes"
        i += 1
    if i >= len(words) or words[i] not in SHAPES:
        found = words[i] if i < len(words) else "the end of the prompt"
        raise ValueError(
            f"mini-world prompt {prompt!r}: expected a shape ({', '.join(SHAPES)}) but found {found!r}"
        )
    fields["shape"] = words[i]
    rest = words[i + 1 :]
    if rest[:2] == ["upside", "down"]:
        fields["upside_down"] = True
        rest = rest[2:]
    if rest[:2] == ["in", "the"] and " ".join(rest[2:4]) in PLACEMENTS:
        fields["position"] = " ".join(rest[2:4])
        rest = rest[4:]
    for phrase in CONTEXTS:
        if rest[: len(phrase.split())] == phrase.split():
            fields["background"] = phrase
            rest = rest[len(phrase.split()) :]
            break
    if rest:
        raise ValueError(f"mini-world prompt {prompt!r}: unexpected text {' '.join(rest)!r}")
    return PromptSpec(**fields)  # type: ignore[arg-type]


def vocabulary() -> list[str]:
    """Every word the grammar can produce, sorted (for the text tokenizer)."""
    words = {"a", "an", "striped", "upside", "down", "in", "the", *SIZES, *BODY_COLORS, *SHAPES}
    for phrase in [*PLACEMENTS, *CONTEXTS]:
        words.update(phrase.split())
    return sorted(words)


# --------------------------------------------------------------------------------------------- prompts
def _context_ok(background: str, colors: Sequence[str]) -> bool:
    return all(_distance(CONTEXTS[background], COLORS[c]) >= MIN_CONTRAST for c in colors)


def _recolours(subject: Subject) -> list[str]:
    """Body colours a property prompt may ask for: new, and distinct from the pattern and mark."""
    return [
        c
        for c in BODY_COLORS
        if c != subject.body_color
        and _distance(BODY_COLORS[c], DEFAULT_BACKGROUND) >= MIN_CONTRAST
        and all(_distance(BODY_COLORS[c], COLORS[o]) >= MIN_CONTRAST for o in subject.colors[1:])
    ]


def _property_groups(subject: Subject) -> list[list[PromptSpec]]:
    groups = [[PromptSpec(subject.shape, color=c) for c in _recolours(subject)]]
    if subject.pattern != "stripes":
        groups.append([PromptSpec(subject.shape, pattern="stripes")])
    if subject.shape in ORIENTABLE:
        groups.append([PromptSpec(subject.shape, upside_down=True)])
    return groups


def _placement_groups(subject: Subject) -> list[list[PromptSpec]]:
    return [
        [PromptSpec(subject.shape, position=p) for p in PLACEMENTS],
        [PromptSpec(subject.shape, size=s) for s in SIZES],
    ]


def _with_contexts(subject: Subject, spec: PromptSpec) -> list[PromptSpec]:
    colors = [spec.color or subject.body_color, subject.pattern_color, subject.mark_color]
    return [PromptSpec(**{**spec.__dict__, "background": b}) for b in CONTEXTS if _context_ok(b, colors)]


@functools.cache
def prompt_groups(subject: Subject, kind: str) -> tuple[tuple[str, ...], ...]:
    """The prompts of ``kind`` that make sense for ``subject``, grouped by what they ask (fixed order).

    Groups: recolours / striped / upside down for ``property``; corners / sizes for ``placement``; each of
    those crossed with the contexts for ``combo``. Sampling picks a group first, so that the nine
    recolours do not drown "striped" and "upside down".
    """
    base = PromptSpec(subject.shape)
    if kind == "plain":
        groups = [[base]]
    elif kind == "context":
        groups = [_with_contexts(subject, base)]
    elif kind == "placement":
        groups = _placement_groups(subject)
    elif kind == "property":
        groups = _property_groups(subject)
    elif kind == "combo":
        groups = [
            [c for s in group for c in _with_contexts(subject, s)]
            for group in _property_groups(subject) + _placement_groups(subject)
        ]
    else:
        raise ValueError(f"unknown mini-world prompt kind {kind!r}; expected one of {', '.join(KINDS)}")
    return tuple(tuple(format_prompt(s) for s in group) for group in groups if group)


def prompts_for(subject: Subject, kind: str) -> tuple[str, ...]:
    """All prompts of ``kind`` that make sense for ``subject`` (fixed order)."""
    return tuple(p for group in prompt_groups(subject, kind) for p in group)


def _check_kinds(kinds: Sequence[str] | None) -> tuple[str, ...]:
    if kinds is None:
        return KINDS
    if isinstance(kinds, str):
        kinds = [kinds]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(
            f"unknown mini-world prompt kinds {unknown or kinds}; expected some of {', '.join(KINDS)}"
        )
    return tuple(kinds)


def _randint(rng: np.random.Generator | torch.Generator, high: int) -> int:
    if isinstance(rng, torch.Generator):
        return int(torch.randint(high, (1,), generator=rng).item())
    return int(rng.integers(high))


def asks_property(prompt: str) -> bool:
    """Whether ``prompt`` asks to change the subject's look (a recolour, "striped" or "upside down")."""
    spec = parse_prompt(prompt)
    return spec.color is not None or spec.pattern is not None or bool(spec.upside_down)


def _draw_prompt(
    subject: Subject, rng: np.random.Generator | torch.Generator, kinds: tuple[str, ...]
) -> tuple[str, str]:
    choices = [k for k in kinds if prompt_groups(subject, k)]
    kind = choices[_randint(rng, len(choices))]
    groups = prompt_groups(subject, kind)
    prompts = groups[_randint(rng, len(groups))]
    return prompts[_randint(rng, len(prompts))], kind


def _uniform(rng: np.random.Generator | torch.Generator) -> float:
    if isinstance(rng, torch.Generator):
        return float(torch.rand((), generator=rng))
    return float(rng.random())


def sample_prompt(
    subject: Subject,
    rng: np.random.Generator | torch.Generator,
    kinds: Sequence[str] | None = None,
    property_rate: float = 1.0,
) -> tuple[str, str]:
    """(prompt, kind): a kind uniformly from ``kinds`` (default all), then a group, then a prompt.

    ``property_rate`` < 1 keeps a drawn property-change prompt only with that probability (else draws
    again), so that edits of the subject's look are rare, as they are in real pre-training data.
    """
    if not 0.0 < property_rate <= 1.0:
        raise ValueError(f"mini-world property_rate must be in (0, 1], got {property_rate}")
    kinds = _check_kinds(kinds)
    while True:
        prompt, kind = _draw_prompt(subject, rng, kinds)
        if property_rate == 1.0 or not asks_property(prompt) or _uniform(rng) < property_rate:
            return prompt, kind


# ------------------------------------------------------------------------------------------- rendering
@functools.cache
def _pixel_offsets(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) ``[H, W]`` float64 pixel centres relative to the image centre, as fractions of the side.

    Computed from half-integers so that they are exactly antisymmetric: flipping an image rows-wise is then
    pixel-exact the same as drawing it upside down.
    """
    c = (np.arange(image_size, dtype=np.float64) + 0.5 - image_size / 2.0) / image_size
    y, x = np.meshgrid(c, c, indexing="ij")
    return x, y


def _subject_index(
    subject: Subject, spec: PromptSpec, image_size: int, centre: tuple[float, float], extent: float
) -> np.ndarray:
    """``[H, W]`` int64: 0 background, 1 body, 2 pattern, 3 mark of ``subject`` at ``centre``, ``extent``."""
    x, y = _pixel_offsets(image_size)
    cx, cy = centre
    half = extent / 2.0
    u = (x - (cx - 0.5)) / half
    v = (y - (cy - 0.5)) / half
    if spec.upside_down:
        v = -v  # flips body, pattern and mark together
    body = SHAPES[subject.shape](u, v)
    pattern = PATTERNS[spec.pattern or subject.pattern](u, v)
    mu, mv = MARK_POSITIONS[subject.mark]
    mark = (np.abs(u - mu) <= MARK_HALF) & (np.abs(v - mv) <= MARK_HALF)
    return body.astype(np.int64) * (1 + (pattern & ~mark) + 2 * mark)


def _palette(subject: Subject, spec: PromptSpec, background: tuple[float, float, float]) -> np.ndarray:
    """``[4, 3]`` float32 colours of the indices of :func:`_subject_index`."""
    colours = [background, COLORS[spec.color or subject.body_color]]
    colours += [COLORS[subject.pattern_color], COLORS[subject.mark_color]]
    return np.array(colours, dtype=np.float32)


def draw(subject: Subject, spec: PromptSpec, image_size: int) -> np.ndarray:
    """``[H, W, 3]`` float32 in [0, 1]: ``subject`` drawn as ``spec`` asks (the ground truth)."""
    index = _subject_index(subject, spec, image_size, spec.centre, spec.extent)
    # a palette lookup keeps it one vectorised gather
    return _palette(subject, spec, spec.background_rgb)[index]


def _detail_options(subject: Subject, detail: str) -> list[Subject]:
    """Every valid ``subject`` with ``detail`` ("mark", "mark_color" or "pattern_color") redrawn."""
    body, background = COLORS[subject.body_color], DEFAULT_BACKGROUND
    if detail == "mark":
        return [replace(subject, mark=m) for m in valid_marks(subject.shape) if m != subject.mark]
    if detail == "pattern_color" and subject.pattern == "solid":
        return []  # a solid subject's pattern colour is not drawn
    other = subject.pattern_color if detail == "mark_color" else subject.mark_color
    current = getattr(subject, detail)
    return [
        replace(subject, **{detail: c})
        for c in ACCENT_COLORS
        if c != current
        and all(_distance(COLORS[c], x) >= MIN_CONTRAST for x in (body, COLORS[other], background))
    ]


DRIFT_DETAILS = ("mark", "mark_color", "pattern_color")


def drift_subject(subject: Subject, rng: np.random.Generator, details: int = 2) -> Subject:
    """``subject`` with ``details`` identity details redrawn (its mark moved, its mark or pattern recoloured).

    Pre-training pairs of real subject-driven models are imperfect (UNO's pairs are synthesised by a
    generator that sometimes loses details); a base pre-trained on drifted targets drifts the same way,
    which the identity reward can then correct at no cost in prompt following."""
    for detail in rng.permutation(DRIFT_DETAILS):
        if details == 0:
            break
        options = _detail_options(subject, str(detail))
        if options:
            subject = options[int(rng.integers(len(options)))]
            details -= 1
    return subject


def to_chw(image: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` numpy -> ``[3, H, W]`` float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


# ---------------------------------------------------------------------------------------------- scenes
# Scenes put two or three subjects in one image. Their grammar has its own version, recorded beside
# WORLD_VERSION (``data.options.scene_version``), so that multi-subject results are never mixed with
# single-subject ones or with those of another scene grammar; single-subject data does not depend on it.
SCENE_VERSION = 1
MAX_SCENE_SUBJECTS = 3
# relation -> subject centres (x, y), in the order the prompt names the subjects
SCENE_LAYOUTS: dict[str, tuple[tuple[float, float], ...]] = {
    "and": ((0.25, 0.5), (0.75, 0.5)),  # side by side; the order of the words is not asked
    "left of": ((0.25, 0.5), (0.75, 0.5)),
    "right of": ((0.75, 0.5), (0.25, 0.5)),
    "above": ((0.5, 0.25), (0.5, 0.75)),
    "below": ((0.5, 0.75), (0.5, 0.25)),
}
ROW_LAYOUT = ((0.18, 0.5), (0.5, 0.5), (0.82, 0.5))  # three subjects, left to right
SCENE_EXTENTS = {2: 0.4, 3: 0.28}  # subject side as a fraction of the image side: they never touch
RELATIONS_2 = ("and", "left of", "right of", "above", "below")
RELATIONS_3 = ("and", "in a row")


@dataclass(frozen=True)
class ScenePrompt:
    """A parsed scene prompt: one clause per subject (its shape and asked look only), how they are placed,
    and the shared background (a ``CONTEXTS`` phrase or None).

    Two subjects: ``"<clause> <relation> <clause> [<context>]"``, relation one of ``RELATIONS_2``
    ("a red heart left of a striped circle", "a heart and a circle on a blue floor"). Three:
    ``"<clause>, <clause> and <clause> [in a row] [<context>]"``. A clause is a single-subject prompt
    without size, corner or context: ``a [<colour>] [striped] <shape> [upside down]``. "and" places the
    subjects side by side in the order named (the ground truth) without asking for that order; the other
    relations ask for it.
    """

    clauses: tuple[PromptSpec, ...]
    relation: str = "and"
    background: str | None = None

    def __post_init__(self) -> None:
        k = len(self.clauses)
        allowed = RELATIONS_2 if k == 2 else RELATIONS_3 if k == 3 else ()
        if self.relation not in allowed:
            raise ValueError(
                f"a scene of {k} subjects takes a relation among {allowed or '(none: 2 or 3 subjects)'}, "
                f"got {self.relation!r}"
            )
        for clause in self.clauses:
            if clause.position is not None or clause.size is not None or clause.background is not None:
                raise ValueError(
                    f"scene clause {format_prompt(clause)!r} may not ask for a corner, size or context"
                )

    @property
    def num_subjects(self) -> int:
        return len(self.clauses)

    @property
    def placed(self) -> bool:
        """Whether the prompt asks where each subject goes (every relation but "and")."""
        return self.relation != "and"

    @property
    def centres(self) -> tuple[tuple[float, float], ...]:
        return ROW_LAYOUT if self.num_subjects == 3 else SCENE_LAYOUTS[self.relation]

    @property
    def extent(self) -> float:
        return SCENE_EXTENTS[self.num_subjects]

    @property
    def background_rgb(self) -> tuple[float, float, float]:
        return CONTEXTS[self.background] if self.background is not None else DEFAULT_BACKGROUND

    @property
    def kind(self) -> str:
        """``plain``, the single kind asked (``placement``, ``context``, ``property``) or ``combo``."""
        kinds = ["placement"] * self.placed + ["context"] * (self.background is not None)
        for clause in self.clauses:
            kinds += ["property"] * sum(
                value is not None for value in (clause.color, clause.pattern, clause.upside_down)
            )
        if not kinds:
            return "plain"
        return kinds[0] if len(kinds) == 1 else "combo"


def format_scene(scene: ScenePrompt) -> str:
    """The grammar's text of ``scene`` (inverse of :func:`parse_scene`)."""
    clauses = [format_prompt(clause) for clause in scene.clauses]
    if scene.num_subjects == 2:
        text = f"{clauses[0]} {scene.relation} {clauses[1]}"
    else:
        text = f"{clauses[0]}, {clauses[1]} and {clauses[2]}"
        if scene.relation == "in a row":
            text += " in a row"
    return text if scene.background is None else f"{text} {scene.background}"


def is_scene_prompt(prompt: str) -> bool:
    """Whether ``prompt`` names several subjects (single-subject prompts have no relation word or comma)."""
    words = prompt.replace(",", " , ").split()
    return any(w in (",", "and", "above", "below", "of") for w in words)


def parse_scene(prompt: str) -> ScenePrompt:
    """Parse a scene prompt (:class:`ScenePrompt`); raises ValueError naming what is outside the grammar."""
    text = " ".join(prompt.replace(",", " , ").split())
    background = None
    for phrase in CONTEXTS:
        if text.endswith(" " + phrase):
            background, text = phrase, text[: -len(phrase) - 1]
            break
    relation = "and"
    if text.endswith(" in a row"):
        relation, text = "in a row", text[: -len(" in a row")]
    if " , " in text:
        first, _, rest = text.partition(" , ")
        parts = [first, *rest.split(" and ")]
        if len(parts) != 3:
            raise ValueError(f"mini-world scene {prompt!r}: three subjects read 'a X, a Y and a Z'")
    else:
        parts = []
        for word in RELATIONS_2:
            if f" {word} " in text:
                parts = text.split(f" {word} ")
                relation = word if relation == "and" else relation  # "in a row" needs three subjects
                break
        if len(parts) != 2 or relation == "in a row":
            raise ValueError(
                f"mini-world scene {prompt!r}: expected two subjects joined by one of "
                f"{', '.join(RELATIONS_2)} or three as 'a X, a Y and a Z [in a row]'"
            )
    clauses = tuple(parse_prompt(part) for part in parts)
    return ScenePrompt(clauses, relation, background)


def scene_vocabulary() -> list[str]:
    """Every word of single-subject and scene prompts, sorted (``vocabulary()`` stays the single-subject
    world's, which the committed mini base's tokenizer was built from)."""
    return sorted({*vocabulary(), "and", "left", "right", "of", "above", "below", "row"})


def draw_scene(subjects: Sequence[Subject], scene: ScenePrompt, image_size: int) -> np.ndarray:
    """``[H, W, 3]`` float32 in [0, 1]: each subject drawn as its clause asks, at its place in ``scene``."""
    image = np.empty((image_size, image_size, 3), dtype=np.float32)
    image[:] = np.asarray(scene.background_rgb, dtype=np.float32)
    for subject, clause, centre in zip(subjects, scene.clauses, scene.centres, strict=True):
        index = _subject_index(subject, clause, image_size, centre, scene.extent)
        colours = _palette(subject, clause, scene.background_rgb)[index]
        image = np.where((index > 0)[..., None], colours, image)
    return image


def _scene_property(subjects: Sequence[Subject], rng: np.random.Generator, clauses: list[PromptSpec]) -> bool:
    """Ask one subject (drawn at random) for a property change, in place; False if none can change."""
    order = rng.permutation(len(subjects))
    for j in order:
        groups = _property_groups(subjects[j])
        if groups:
            group = groups[int(rng.integers(len(groups)))]
            clauses[j] = group[int(rng.integers(len(group)))]
            return True
    return False


def _scene_contexts(subjects: Sequence[Subject], clauses: Sequence[PromptSpec]) -> list[str]:
    return [
        b
        for b in CONTEXTS
        if all(
            _context_ok(b, [c.color or s.body_color, s.pattern_color, s.mark_color])
            for s, c in zip(subjects, clauses, strict=True)
        )
    ]


def sample_scene(
    subjects: Sequence[Subject],
    rng: np.random.Generator,
    kinds: Sequence[str] | None = None,
    property_rate: float = 1.0,
) -> tuple[ScenePrompt, str]:
    """(scene, kind) for 2 or 3 ``subjects`` of distinct shapes: a kind uniformly from ``kinds``, then
    what it asks (combo: two of property / placement / context); ``property_rate`` as in
    :func:`sample_prompt`."""
    if not 0.0 < property_rate <= 1.0:
        raise ValueError(f"mini-world property_rate must be in (0, 1], got {property_rate}")
    kinds = _check_kinds(kinds)
    relations = RELATIONS_2 if len(subjects) == 2 else RELATIONS_3
    while True:
        kind = kinds[int(rng.integers(len(kinds)))]
        asked = {"plain": (), "context": ("context",), "placement": ("placement",)}.get(kind)
        if kind == "property":
            asked = ("property",)
        elif kind == "combo":
            pairs = (("property", "context"), ("property", "placement"), ("placement", "context"))
            asked = pairs[int(rng.integers(len(pairs)))]
        clauses = [PromptSpec(s.shape) for s in subjects]
        if "property" in asked and not _scene_property(subjects, rng, clauses):
            continue
        relation = "and"
        if "placement" in asked:
            relation = relations[1 + int(rng.integers(len(relations) - 1))]
        background = None
        if "context" in asked:
            options = _scene_contexts(subjects, clauses)
            if not options:
                continue
            background = options[int(rng.integers(len(options)))]
        if "property" in asked and property_rate < 1.0 and _uniform(rng) >= property_rate:
            continue
        return ScenePrompt(tuple(clauses), relation, background), kind


def _partners(
    first: Subject, by_shape: dict[str, list[Subject]], count: int, rng: np.random.Generator
) -> list[Subject]:
    """``count`` subjects of shapes distinct from ``first``'s and from each other (a scene names shapes)."""
    chosen = [first]
    for _ in range(count):
        shapes = [shape for shape in by_shape if shape not in {s.shape for s in chosen}]
        if not shapes:
            raise ValueError(
                f"a mini-world scene of {count + 1} subjects needs {count + 1} distinct shapes in the split"
            )
        pool = by_shape[shapes[int(rng.integers(len(shapes)))]]
        chosen.append(pool[int(rng.integers(len(pool)))])
    return chosen[1:]


def _by_shape(subjects: Sequence[Subject]) -> dict[str, list[Subject]]:
    groups: dict[str, list[Subject]] = {}
    for subject in subjects:
        groups.setdefault(subject.shape, []).append(subject)
    return groups


# ----------------------------------------------------------------------------------------------- world
@functools.cache
def _identities() -> tuple[tuple[str, str, str, str, str, str], ...]:
    """Every valid (shape, body, pattern, pattern colour, mark, mark colour), in a fixed order.

    Solid subjects get a single pattern colour (the first valid one) so that no two identities look alike.
    """
    out = []
    for shape, body, pattern in itertools.product(SHAPES, BODY_COLORS, PATTERNS):
        if _distance(COLORS[body], DEFAULT_BACKGROUND) < MIN_CONTRAST:
            continue
        pattern_colors = [
            c
            for c in ACCENT_COLORS
            if c != body
            and _distance(COLORS[c], COLORS[body]) >= MIN_CONTRAST
            and _distance(COLORS[c], DEFAULT_BACKGROUND) >= MIN_CONTRAST
        ]
        if pattern == "solid":
            pattern_colors = pattern_colors[:1]
        for pattern_color, mark, mark_color in itertools.product(
            pattern_colors, valid_marks(shape), ACCENT_COLORS
        ):
            colors = [COLORS[body], COLORS[pattern_color], DEFAULT_BACKGROUND]
            if all(_distance(COLORS[mark_color], c) >= MIN_CONTRAST for c in colors):
                out.append((shape, body, pattern, pattern_color, mark, mark_color))
    return tuple(out)


class MiniWorld:
    """Deterministic set of train and held-out subjects (disjoint identity combinations) and their images."""

    def __init__(
        self,
        image_size: int = 32,
        num_train_subjects: int = 600,
        num_test_subjects: int = 64,
        seed: int = 0,
        version: int = WORLD_VERSION,
        subjects: int = 1,
        scene_version: int = SCENE_VERSION,
    ) -> None:
        """``subjects``: subjects per image of :meth:`dataset` and :meth:`eval_set` (1, the default: the
        single-subject world; 2 or 3: scenes, see :meth:`scene_dataset`); ``scene_version`` must be this
        release's ``SCENE_VERSION`` (it is only read when ``subjects`` > 1)."""
        if version != WORLD_VERSION:
            raise ValueError(
                f"mini world version {version} is not this release's ({WORLD_VERSION}); results of different "
                f"world versions are not comparable: set data.options.version to {WORLD_VERSION}"
            )
        if image_size < 16:
            raise ValueError(f"mini-world image_size must be at least 16, got {image_size}")
        if not 1 <= subjects <= MAX_SCENE_SUBJECTS:
            raise ValueError(f"mini-world subjects must be 1, 2 or 3 per image, got {subjects}")
        if subjects > 1 and scene_version != SCENE_VERSION:
            raise ValueError(
                f"mini-world scene_version {scene_version} is not this release's ({SCENE_VERSION}); results "
                "of different scene grammars are not comparable: set data.options.scene_version to "
                f"{SCENE_VERSION}"
            )
        self.subjects_per_image = subjects
        self.scene_version = scene_version
        identities = _identities()
        wanted = num_train_subjects + num_test_subjects
        if num_train_subjects < 0 or num_test_subjects < 0 or wanted > len(identities):
            raise ValueError(
                f"mini world has {len(identities)} distinct subjects; asked for {num_train_subjects} train"
                f" + {num_test_subjects} test"
            )
        order = np.random.default_rng(seed).permutation(len(identities))[:wanted]
        subjects = [
            Subject(f"train-{i:04d}", *identities[j]) for i, j in enumerate(order[:num_train_subjects])
        ]
        subjects += [
            Subject(f"test-{i:04d}", *identities[j]) for i, j in enumerate(order[num_train_subjects:])
        ]
        self.image_size = image_size
        self.seed = seed
        self.version = version
        self.train_subjects: list[Subject] = subjects[:num_train_subjects]
        self.test_subjects: list[Subject] = subjects[num_train_subjects:]
        self._by_id = {s.id: s for s in subjects}
        self._references: dict[Subject, torch.Tensor] = {}

    def subject(self, subject_id: str) -> Subject:
        try:
            return self._by_id[subject_id]
        except KeyError:
            raise KeyError(f"no mini-world subject {subject_id!r}") from None

    def subjects(self, split: str) -> list[Subject]:
        if split not in ("train", "test"):
            raise ValueError(f"mini-world split must be 'train' or 'test', got {split!r}")
        return self.train_subjects if split == "train" else self.test_subjects

    def reference(self, subject: Subject) -> torch.Tensor:
        """``[3, H, W]`` float32 in [0, 1]: the subject alone, centred, default size, grey background."""
        if subject not in self._references:
            self._references[subject] = to_chw(draw(subject, PromptSpec(subject.shape), self.image_size))
        return self._references[subject].clone()

    def blank(self) -> torch.Tensor:
        """``[3, H, W]``: the reference of a text-to-image pair, the background without a subject."""
        return (
            torch.tensor(DEFAULT_BACKGROUND, dtype=torch.float32)[:, None, None]
            .expand(3, self.image_size, self.image_size)
            .clone()
        )

    def render(self, subject: Subject, prompt: str | PromptSpec) -> torch.Tensor:
        """``[3, H, W]`` float32 in [0, 1]: the ground-truth image of ``subject`` for ``prompt``."""
        spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
        if spec.shape != subject.shape:
            raise ValueError(f"prompt asks for a {spec.shape} but subject {subject.id} is a {subject.shape}")
        return to_chw(draw(subject, spec, self.image_size))

    def render_scene(self, subjects: Sequence[Subject], prompt: str | ScenePrompt) -> torch.Tensor:
        """``[3, H, W]`` float32 in [0, 1]: a scene's ground truth, ``subjects`` in the prompt's order."""
        scene = parse_scene(prompt) if isinstance(prompt, str) else prompt
        if len(subjects) != scene.num_subjects:
            raise ValueError(f"scene names {scene.num_subjects} subjects but {len(subjects)} were given")
        for subject, clause in zip(subjects, scene.clauses, strict=True):
            if clause.shape != subject.shape:
                raise ValueError(
                    f"scene asks for a {clause.shape} where subject {subject.id} is a {subject.shape}"
                )
        return to_chw(draw_scene(subjects, scene, self.image_size))

    def sample_prompt(
        self, subject: Subject, rng: np.random.Generator | torch.Generator, kinds: Sequence[str] | None = None
    ) -> tuple[str, str]:
        """(prompt, kind) for ``subject``; see the module-level ``sample_prompt``."""
        return sample_prompt(subject, rng, kinds)

    def dataset(
        self,
        split: str = "train",
        prompts_per_subject: int = 8,
        kinds: Sequence[str] | None = None,
        seed: int = 0,
        property_rate: float = 1.0,
        detail_drift: float = 0.0,
        copy_paste: float = 0.0,
        text_to_image: float = 0.0,
        copy_paste_property: float | None = None,
    ) -> MiniWorldDataset:
        """``prompts_per_subject`` sampled prompts per subject of ``split`` (deterministic for ``seed``).

        The last three make the pairs as imperfect as real pre-training pairs (synthesised by generators);
        references and held-out ground truths are always exact:
        - ``property_rate``: see :func:`sample_prompt` (edits of the subject's look are rare);
        - ``detail_drift``: the share of targets drawn with two identity details redrawn
          (:func:`drift_subject`);
        - ``copy_paste``: the share of targets that ignore the prompt and show the subject as in its
          reference (centred, default size and look, grey background), the copy-paste pairs of synthetic data;
        - ``copy_paste_property``: that share among the prompts that edit the subject's look (a recolour,
          "striped", "upside down"); None: ``copy_paste``. At 0 the rare edits are never contradicted by a
          copy, while prompts of a new scene or placement still are;
        - ``text_to_image``: the share of examples without a subject reference (a blank, background-only
          image) whose prompt describes the subject's look (:func:`describe`), as text-to-image pre-training
          pairs do: the base then knows what each colour word means before it learns to keep a reference.

        A world of several ``subjects`` per image gives :meth:`scene_dataset` with the same arguments.
        """
        if self.subjects_per_image > 1:
            if text_to_image:
                raise ValueError("mini-world text_to_image pairs are single-subject only (subjects=1)")
            if copy_paste_property is not None:
                raise ValueError("mini-world copy_paste_property is single-subject only (subjects=1)")
            return self.scene_dataset(
                split, prompts_per_subject, kinds, seed, property_rate, detail_drift, copy_paste
            )
        kinds = _check_kinds(kinds)
        edit_copy_paste = copy_paste if copy_paste_property is None else copy_paste_property
        shares = (
            ("detail_drift", detail_drift),
            ("copy_paste", copy_paste),
            ("text_to_image", text_to_image),
            ("copy_paste_property", edit_copy_paste),
        )
        for name, share in shares:
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"mini-world {name} must be in [0, 1], got {share}")
        code = 0 if split == "train" else 1
        entries = []
        for i, subject in enumerate(self.subjects(split)):
            rng = np.random.default_rng([seed, code, i])
            for _ in range(prompts_per_subject):
                prompt, kind = sample_prompt(subject, rng, kinds, property_rate)
                # drawn only when asked for, so that datasets without these pairs keep their random stream
                if text_to_image > 0 and _uniform(rng) < text_to_image:
                    described = describe(subject, parse_prompt(prompt))
                    entries.append((subject, format_prompt(described), kind, subject, described, False))
                    continue
                drawn, shown = subject, prompt
                if detail_drift > 0 and _uniform(rng) < detail_drift:
                    drawn = drift_subject(subject, rng)
                if copy_paste > 0 or edit_copy_paste > 0:
                    share = edit_copy_paste if asks_property(prompt) else copy_paste
                    if _uniform(rng) < share:
                        shown = subject.class_name  # the plain prompt: the reference's composition
                entries.append((subject, prompt, kind, drawn, shown, True))
        return MiniWorldDataset(self, entries)

    def eval_set(
        self, num_subjects: int = 16, prompts_per_kind: int = 1, seed: int = 1234
    ) -> MiniWorldDataset:
        """A fixed held-out set: ``num_subjects`` test subjects x every kind x ``prompts_per_kind`` prompts.

        The prompts of a (subject, kind) go round its groups (e.g. recolour, striped, upside down).
        A world of several ``subjects`` per image gives :meth:`scene_eval_set` with the same arguments.
        """
        if self.subjects_per_image > 1:
            return self.scene_eval_set(num_subjects, prompts_per_kind, seed)
        rng = np.random.default_rng(seed)
        count = min(num_subjects, len(self.test_subjects))
        picked = sorted(rng.choice(len(self.test_subjects), size=count, replace=False).tolist())
        entries = []
        for index in picked:
            subject = self.test_subjects[index]
            for kind in KINDS:
                groups = prompt_groups(subject, kind)
                order = rng.permutation(len(groups))
                for j in range(prompts_per_kind):
                    group = groups[order[j % len(groups)]]
                    prompt = group[int(rng.integers(len(group)))]
                    entries.append((subject, prompt, kind, subject, prompt, True))
        return MiniWorldDataset(self, entries)

    def scene_dataset(
        self,
        split: str = "train",
        prompts_per_subject: int = 8,
        kinds: Sequence[str] | None = None,
        seed: int = 0,
        property_rate: float = 1.0,
        detail_drift: float = 0.0,
        copy_paste: float = 0.0,
        subjects: int | None = None,
    ) -> MiniSceneDataset:
        """Multi-subject scenes: each subject of ``split`` leads ``prompts_per_subject`` scenes, its partners
        (``subjects`` - 1 of them, default: the world's ``subjects``, at least 2) drawn from the same split
        with distinct shapes; deterministic for ``seed``.

        The imperfect-pair options act as in :meth:`dataset`: ``property_rate`` keeps a drawn edit of one
        subject's look with that probability; ``detail_drift`` redraws two details of each subject of a
        target independently with that probability; ``copy_paste`` is the share of targets that paste each
        subject's reference at its place, ignoring the edits and the context.
        """
        count = self._scene_count(subjects)
        kinds = _check_kinds(kinds)
        for name, share in (("detail_drift", detail_drift), ("copy_paste", copy_paste)):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"mini-world {name} must be in [0, 1], got {share}")
        code = 0 if split == "train" else 1
        pool = self.subjects(split)
        by_shape = _by_shape(pool)
        entries = []
        for i, first in enumerate(pool):
            rng = np.random.default_rng([seed, code, i, count])
            for _ in range(prompts_per_subject):
                members = (first, *_partners(first, by_shape, count - 1, rng))
                scene, kind = sample_scene(members, rng, kinds, property_rate)
                drawn = tuple(
                    drift_subject(s, rng) if detail_drift > 0 and _uniform(rng) < detail_drift else s
                    for s in members
                )
                shown = scene
                if copy_paste > 0 and _uniform(rng) < copy_paste:
                    shown = ScenePrompt(tuple(PromptSpec(c.shape) for c in scene.clauses), scene.relation)
                entries.append((members, format_scene(scene), kind, drawn, shown))
        return MiniSceneDataset(self, entries)

    def scene_eval_set(
        self,
        num_subjects: int = 16,
        prompts_per_kind: int = 1,
        seed: int = 1234,
        subjects: int | None = None,
    ) -> MiniSceneDataset:
        """A fixed held-out set of scenes: ``num_subjects`` test subjects, each with fixed partners (other
        test subjects of distinct shapes), x every kind x ``prompts_per_kind`` prompts; exact targets."""
        count = self._scene_count(subjects)
        rng = np.random.default_rng([seed, count])
        number = min(num_subjects, len(self.test_subjects))
        picked = sorted(rng.choice(len(self.test_subjects), size=number, replace=False).tolist())
        by_shape = _by_shape(self.test_subjects)
        entries = []
        for index in picked:
            first = self.test_subjects[index]
            members = (first, *_partners(first, by_shape, count - 1, rng))
            for kind in KINDS:
                for _ in range(prompts_per_kind):
                    scene, _ = sample_scene(members, rng, (kind,))
                    entries.append((members, format_scene(scene), kind, members, scene))
        return MiniSceneDataset(self, entries)

    def _scene_count(self, subjects: int | None) -> int:
        count = subjects if subjects is not None else max(2, self.subjects_per_image)
        if not 2 <= count <= MAX_SCENE_SUBJECTS:
            raise ValueError(f"a mini-world scene has 2 or 3 subjects, got {count}")
        return count


class _RenderedDataset:
    """A ``SubjectDataset`` over a list of entries whose images are rendered on access (:meth:`example`)."""

    kind_of_index = "dataset"  # how an out-of-range index is named

    def __init__(self, world: MiniWorld, entries: Sequence[tuple]) -> None:
        self.world = world
        self.entries = list(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Example:
        if not -len(self) <= index < len(self):
            raise IndexError(
                f"mini-world {self.kind_of_index} index {index} out of range for {len(self)} examples"
            )
        return self.example(index % len(self), self.entries[index])

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    def example(self, index: int, entry: tuple) -> Example:
        raise NotImplementedError


class MiniWorldDataset(_RenderedDataset):
    """A ``SubjectDataset`` over (subject, prompt, kind, target subject, target prompt, with reference)
    entries: the subject and the prompt its target is drawn of are the same two unless the pair is imperfect,
    and the reference is the subject's unless it is a text-to-image pair (see :meth:`MiniWorld.dataset`);
    images are rendered on access."""

    def example(
        self, index: int, entry: tuple[Subject, str, str, Subject, str | PromptSpec, bool]
    ) -> Example:
        subject, prompt, kind, drawn, shown, with_reference = entry
        return Example(
            id=f"{subject.id}/{index}",
            subject_id=subject.id,
            subject_class=subject.shape,
            prompt=prompt,
            reference=self.world.reference(subject) if with_reference else self.world.blank(),
            target=self.world.render(drawn, shown),
            kind=kind,
        )

    @property
    def subjects(self) -> list[Subject]:
        return [subject for subject, *_ in self.entries]


class MiniSceneDataset(_RenderedDataset):
    """A ``SubjectDataset`` of multi-subject scenes over (subjects, prompt, kind, the subjects drawn in the
    target, the scene the target shows) entries; images are rendered on access (see
    :meth:`MiniWorld.scene_dataset`). An example's ``subject_id`` joins its subjects' ids with ``+``."""

    kind_of_index = "scene"

    def example(
        self, index: int, entry: tuple[tuple[Subject, ...], str, str, tuple[Subject, ...], ScenePrompt]
    ) -> Example:
        members, prompt, kind, drawn, shown = entry
        first, *rest = members
        group = "+".join(s.id for s in members)
        return Example(
            id=f"{group}/{index}",
            subject_id=group,
            subject_class=first.shape,
            prompt=prompt,
            reference=self.world.reference(first),
            target=self.world.render_scene(drawn, shown),
            kind=kind,
            extra_references=tuple(self.world.reference(s) for s in rest),
            extra_classes=tuple(s.shape for s in rest),
        )

    @property
    def subjects(self) -> list[tuple[Subject, ...]]:
        return [members for members, *_ in self.entries]
