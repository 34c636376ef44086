"""Decorator registry of backbones, in the style of timm's ``@register_model``.

A registered factory builds a :class:`~backbones.protocol.BlockStack`. Sizes are named
variants of a family ("DiT-S/2", "DiT-tiny"); the registry key is the family name and the
size is looked up in the family's size table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping

from tread_bench.core.errors import ConfigError
from tread_bench.core.registry import Registry

from .protocol import BlockStack


@dataclass
class BackboneEntry:
    name: str
    factory: Callable[..., BlockStack]
    sizes: Mapping[str, dict] = field(default_factory=dict)


_REGISTRY: Registry[BackboneEntry] = Registry("backbone", "backbones")


def register_backbone(name: str, sizes: Mapping[str, dict] | None = None):
    """Register a backbone factory under ``name``.

    ``sizes`` maps a size name to constructor keyword arguments, e.g. ``{"S/2": dict(depth=12, ...)}``.
    The factory must accept those keywords plus the data keywords ``input_size``, ``in_channels``
    and ``num_classes``.
    """

    def decorator(factory):
        _REGISTRY.add(name, BackboneEntry(name, factory, dict(sizes or {})), same=lambda a, b: a.factory is b.factory)
        return factory

    return decorator


def list_backbones() -> Dict[str, list]:
    """{backbone name: [size names]} of everything registered."""
    return {name: list(_REGISTRY[name].sizes) for name in _REGISTRY.names()}


def backbone_sizes(name: str) -> Mapping[str, dict]:
    return _entry(name).sizes


def backbone_module(name: str) -> str:
    """The module that registered backbone ``name`` (its factory's)."""
    return _entry(name).factory.__module__


def _entry(name: str) -> BackboneEntry:
    return _REGISTRY[name]


def build_backbone(name: str, size: str | None = None, **overrides) -> BlockStack:
    """Build backbone ``name`` at ``size`` (a key of its size table), with keyword overrides."""
    entry = _entry(name)
    kwargs = {}
    if size is not None:
        if size not in entry.sizes:
            raise ConfigError(
                f"unknown size '{size}' for backbone '{name}'; available sizes: {', '.join(entry.sizes)}"
            )
        kwargs.update(entry.sizes[size])
    kwargs.update(overrides)
    try:
        model = entry.factory(**kwargs)
    except TypeError as err:
        raise ConfigError(f"backbone '{name}' rejected its arguments ({err}); check backbone overrides") from err
    if not isinstance(model, BlockStack):
        raise ConfigError(f"backbone '{name}' must build a backbones.BlockStack, got {type(model).__name__}")
    return model
