"""Named registries for algorithms, models, federations and partitioners.

The CLI and TOML configs refer to things by name through these registries. A duplicate
name is an error; an unknown name lists the valid ones and suggests the closest.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised when a registry lookup fails; the message lists valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def closest(name: str, choices: list[str]) -> str:
    """Return ' Did you mean "x"?' for the closest choice, or '' if none is close."""
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f' Did you mean "{match[0]}"?' if match else ""


class Registry(Generic[T]):
    """A name -> object mapping with helpful errors.

    Example:
        >>> models = Registry("model")
        >>> @models.register("tiny")
        ... def tiny(): return 1
        >>> models.get("tiny")()
        1
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered; pick another name")
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none registered)"
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{closest(name, list(self._items))} Valid: {valid}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
