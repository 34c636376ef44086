"""A named registry filled by decorators, in the style of timm's ``@register_model``: one class for the
backbone, method and objective registries, so each says only what its entries are."""
from __future__ import annotations

from typing import Callable, Dict, Generic, List, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """``what`` and ``plural`` name an entry in messages ("backbone"/"backbones", "method kind"/"kinds")."""

    def __init__(self, what: str, plural: str):
        self.what, self.plural = what, plural
        self._entries: Dict[str, T] = {}

    def add(self, name: str, entry: T, same: Callable[[T, T], bool] = lambda a, b: a is b) -> None:
        """Register ``entry``; registering the same entry again (a module imported twice) is harmless."""
        if name in self._entries and not same(self._entries[name], entry):
            raise ConfigError(f"{self.what} '{name}' is already registered; pick another name")
        self._entries[name] = entry

    def decorator(self, name: str) -> Callable[[T], T]:
        def register(factory: T) -> T:
            self.add(name, factory)
            return factory

        return register

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(f"unknown {self.what} '{name}'; registered {self.plural}: {', '.join(self.names()) or 'none'}")
        return self._entries[name]

    def get(self, name: str, default=None):
        return self._entries.get(name, default)
