"""One registry pattern (timm style) for everything chosen by name: backbones, captioners.

A Registry holds specs keyed by their ``name``; ``get`` is the one lookup, and its error names the valid
choices, so a typo in a setting or a command-line flag tells the user what would have worked.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, Protocol, TypeVar


class Named(Protocol):
    name: str


S = TypeVar("S", bound=Named)


class Registry(Generic[S]):
    """Specs by name, in registration order; ``kind`` ("backbone", "captioner") words the errors."""

    def __init__(self, kind: str, specs: Iterable[S] = ()):
        self.kind = kind
        self._specs: dict[str, S] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: S) -> S:
        """Add ``spec``; a second spec under one name is refused, since lookups could not tell them apart."""
        if spec.name in self._specs:
            raise ValueError(f"{self.kind} {spec.name!r} is registered already")
        self._specs[spec.name] = spec
        return spec

    def get(self, name: str) -> S:
        """The spec registered as ``name``, or ValueError naming the valid choices."""
        try:
            return self._specs[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """The registered names, sorted (what error messages and command-line help list)."""
        return sorted(self._specs)

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._specs)})"
