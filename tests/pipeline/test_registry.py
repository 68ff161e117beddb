"""pipeline.registry.Registry: the one lookup backbones and captioners share, and the error it gives."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pipeline.captioning import CAPTIONERS
from pipeline.constants import BACKBONE_NAMES
from pipeline.models import BACKBONES
from pipeline.registry import Registry


@dataclass(frozen=True)
class Spec:
    name: str
    size: int = 0


def test_get_names_and_order():
    registry = Registry("widget", [Spec("b", 1), Spec("a", 2)])
    assert registry.get("a") == Spec("a", 2)
    assert list(registry) == ["b", "a"] and registry.names() == ["a", "b"] and len(registry) == 2
    assert "a" in registry and "c" not in registry
    assert registry.register(Spec("c")) == Spec("c") and registry.names() == ["a", "b", "c"]


def test_unknown_and_duplicate_names_are_refused():
    registry = Registry("widget", [Spec("a")])
    with pytest.raises(ValueError, match=r"unknown widget 'x'; valid widgets: a$"):
        registry.get("x")
    with pytest.raises(ValueError, match="unknown widget"):
        registry.get(["unhashable"])
    with pytest.raises(ValueError, match="registered already"):
        registry.register(Spec("a", 1))


def test_backbones_and_captioners_are_registries():
    assert isinstance(BACKBONES, Registry) and isinstance(CAPTIONERS, Registry)
    assert tuple(BACKBONES) == BACKBONE_NAMES
    with pytest.raises(ValueError, match=r"unknown captioner 'pez'; valid captioners: blip, blip2"):
        CAPTIONERS.get("pez")
