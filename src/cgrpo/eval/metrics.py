"""Evaluation metrics: the paper's DINO, CLIP-I, CLIP-T and HPS-v3 (Table 1), or any registered reward.

A metric is a registered reward (:mod:`cgrpo.rewards`) used for measurement: ``dino`` (DINO ViT-S/16
cosine similarity of CLS features, generated vs reference), ``clip_i`` (CLIP ViT-B/32 image-image cosine),
``clip_t`` (CLIP ViT-B/32 image-text cosine, *not* x100), ``hpsv3`` (HPSv3 preference score). Any other
registered reward name (``dino_seg``, ``mini_id``, ...) works too. Model paths are reward options:
``--metric-option dino.path=/models/dino-vits16``; the prefix ``clip.`` sets an option of both CLIP metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cgrpo.config import ConfigError, parse_override

PAPER_METRICS = ("dino", "clip_i", "clip_t", "hpsv3")
MINI_METRICS = ("mini_id", "mini_prompt")


@dataclass(frozen=True)
class MetricInfo:
    """How a metric is shown: ``label`` in tables, ``criterion`` it measures (``identity`` or ``prompt``)."""

    name: str
    label: str
    criterion: str


_KNOWN = {
    "dino": MetricInfo("dino", "DINO", "identity"),
    "clip_i": MetricInfo("clip_i", "CLIP-I", "identity"),
    "clip_t": MetricInfo("clip_t", "CLIP-T", "prompt"),
    "hpsv3": MetricInfo("hpsv3", "HPS-v3", "prompt"),
    "dino_seg": MetricInfo("dino_seg", "DINO-Seg", "identity"),
    "mini_id": MetricInfo("mini_id", "ID (mini)", "identity"),
    "mini_prompt": MetricInfo("mini_prompt", "Prompt (mini)", "prompt"),
    "vlm_judge": MetricInfo("vlm_judge", "VLM judge", "overall"),
}
# Module of each metric reward (imported on demand).
_MODULES = {"dino": "dino", "clip_i": "clip", "clip_t": "clip", "hpsv3": "hpsv3"}
# Option prefixes that address several metrics at once.
_GROUPS = {"clip": ("clip_i", "clip_t")}


def info(name: str) -> MetricInfo:
    """Display information of a metric; unknown metrics are shown by name with an unknown criterion."""
    if name in _KNOWN:
        return _KNOWN[name]
    lowered = name.lower()
    criterion = "identity" if ("id" in lowered.split("_") or "dino" in lowered) else "overall"
    if "prompt" in lowered or "text" in lowered:
        criterion = "prompt"
    return MetricInfo(name, name, criterion)


def parse_metric_list(text: str | Sequence[str]) -> list[str]:
    """``"dino,clip_i"`` or ``["dino", "clip_i"]`` -> unique names in order; an empty list is an error."""
    parts = text.split(",") if isinstance(text, str) else [p for item in text for p in item.split(",")]
    names = list(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if not names:
        raise ConfigError("--metrics is empty: name at least one metric, e.g. dino,clip_i,clip_t,hpsv3")
    return names


def parse_options(items: Sequence[str] | None, what: str = "option") -> dict[str, Any]:
    """``["k=v", "a.b=1"]`` -> ``{"k": "v", "a": {"b": 1}}``, values parsed as YAML like config overrides."""
    options: dict[str, Any] = {}
    for text in items or []:
        try:
            path, value = parse_override(text)
        except ConfigError as error:
            raise ConfigError(f"{what} {error}") from None
        node = options
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{what} {text!r}: {part} is given both as a value and as a mapping")
        node[path[-1]] = value
    return options


def parse_metric_options(items: Sequence[str] | None, metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["dino.path=/m/dino", "clip.path=/m/clip"]`` -> per-metric reward options for ``metrics``.

    The first dotted part names the metric (or ``clip`` for both CLIP metrics); naming a metric that is not
    evaluated is an error, so that a typo does not silently fall back to a default model.
    """
    per_metric: dict[str, dict[str, Any]] = {name: {} for name in metrics}
    for text in items or []:
        key = text.split("=", 1)[0]
        if "." not in key:
            raise ConfigError(
                f"--metric-option {text!r}: expected <metric>.<option>=<value>, e.g. dino.path=..."
            )
        prefix, rest = key.split(".", 1)
        targets = [m for m in _GROUPS.get(prefix, (prefix,)) if m in per_metric]
        if not targets:
            raise ConfigError(
                f"--metric-option {text!r}: {prefix!r} is not one of the evaluated metrics "
                f"({', '.join(metrics)})"
            )
        value_text = rest + "=" + text.split("=", 1)[1] if "=" in text else rest
        parsed = parse_options([value_text], "--metric-option")
        for target in targets:
            per_metric[target].update(parsed)
    return per_metric


def check_metrics(names: Sequence[str]) -> None:
    """Fail before any image is generated if a metric is not a registered reward."""
    import importlib

    from cgrpo import rewards

    for name in names:
        if name in _MODULES:
            importlib.import_module(f"cgrpo.rewards.{_MODULES[name]}")
    unknown = [n for n in names if n not in rewards.names()]
    if unknown:
        raise ConfigError(
            f"unknown metric(s) {', '.join(unknown)}: expected registered rewards "
            f"({', '.join(rewards.names())})"
        )


def _accepts(factory: Any, keyword: str) -> bool:
    import inspect

    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    # Only an explicit parameter: a ``**options`` factory may forward to a class that has none.
    return any(p.name == keyword for p in parameters)


def build_metric(name: str, options: dict[str, Any] | None = None, device: str | None = None):
    """The reward behind a metric: ``(images, references, prompts, subjects) -> [N]``, from the registry.

    ``device`` is passed to rewards that take one unless ``options`` name a device already."""
    import importlib

    from cgrpo import rewards

    if name in _MODULES and name not in rewards.names():
        # The metric rewards live in their own modules; import the one we need if the registry has not yet.
        importlib.import_module(f"cgrpo.rewards.{_MODULES[name]}")
    options = dict(options or {})
    # Metrics run on the evaluation's device unless an option says otherwise.
    known = name in rewards.names()
    if (
        device is not None
        and "device" not in options
        and known
        and _accepts(rewards.REWARDS.get(name), "device")
    ):
        options["device"] = device
    try:
        return rewards.build(name, **options)
    except KeyError as error:
        raise ConfigError(str(error).strip("'\"")) from None
