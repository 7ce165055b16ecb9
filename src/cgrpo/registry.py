"""Tiny name -> factory registries so that a YAML file can name components (rewards, policies, datasets)."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from cgrpo.config import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from a public name to a factory, with errors that list what is available."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._factories[name] = factory
            doc = (factory.__doc__ or "").strip().splitlines()
            self._help[name] = help or (doc[0] if doc else "")
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._factories:
            raise KeyError(self._unknown(name))
        return self._factories[name]

    def check(self, name: Any, options: Mapping[str, Any] | None, name_key: str, options_key: str) -> None:
        """Raise :class:`ConfigError` naming ``name_key`` (e.g. ``rewards.prompt.name``) if ``name`` is not
        registered, or ``options_key.<option>`` if its factory takes no such option. Builds nothing."""
        if name not in self._factories:
            raise ConfigError(f"{name_key}: {self._unknown(name)}")
        check_options(self._factories[name], options or {}, options_key, f"{self.kind} '{name}'")

    def _unknown(self, name: Any) -> str:
        known = sorted(self._factories)
        hint = _did_you_mean(str(name), known)
        return f"unknown {self.kind} {name!r}{hint}; registered: {', '.join(known) or 'none'}"

    def build(self, name: str, **options) -> T:
        return self.get(name)(**options)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def describe(self) -> dict[str, str]:
        return {name: self._help[name] for name in self.names()}

    def __contains__(self, name: str) -> bool:
        return name in self._factories


def check_options(
    factory: Callable[..., Any],
    options: Mapping[str, Any],
    key: str,
    what: str,
    exclude: Iterable[str] = (),
    also: Iterable[str] = (),
) -> None:
    """Raise :class:`ConfigError` if ``options`` has a key that ``factory``'s signature does not take (or
    lacks one it requires). A factory with ``**options`` takes any key; it checks them when it is built.

    ``key`` is the config path of the options (``data.options``), ``what`` names the component in the message;
    ``exclude``: parameters the caller passes itself, so they are not options; ``also``: options the caller
    takes besides the factory's (checked by the caller).
    """
    if not isinstance(options, Mapping):
        raise ConfigError(f"{key}: expected a mapping of options for {what}, got {options!r}")
    parameters = {
        name: p
        for name, p in inspect.signature(factory).parameters.items()
        if name not in set(exclude) and p.kind not in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY)
    }
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = sorted({*parameters, *also})
    for option in options:
        if option not in accepted:
            raise ConfigError(
                f"{key}.{option}: {what} takes no option {option!r}{_did_you_mean(str(option), accepted)}; "
                f"its options: {', '.join(accepted) or 'none'}"
            )
    for name, p in parameters.items():
        if p.default is p.empty and name not in options:
            raise ConfigError(f"{key}.{name}: {what} needs this option")


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
