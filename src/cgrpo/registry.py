"""Tiny name -> factory registries so that a YAML file can name components (rewards, policies, datasets)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

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
            known = ", ".join(sorted(self._factories)) or "none"
            raise KeyError(f"unknown {self.kind} '{name}'; registered {self.kind}s: {known}")
        return self._factories[name]

    def build(self, name: str, **options) -> T:
        return self.get(name)(**options)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def describe(self) -> dict[str, str]:
        return {name: self._help[name] for name in self.names()}

    def __contains__(self, name: str) -> bool:
        return name in self._factories
