"""A small named registry: one per config axis (attention kind, position scheme, ...).

Each entry maps a `kind` string to the class that implements it. Classes that carry
options of their own expose them as a `Config` dataclass attribute; the config loader
uses it to type the matching config node (see lmtrain/config.py).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, ClassVar, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


@dataclass
class KindConfig:
    """The config node of a polymorphic axis: its `kind` picks the registry entry, and the
    entry's own `Config` subclass adds that kind's options."""

    kind: str = ""


class Variant:
    """What every registered variant declares, asked by the config loader before building."""

    # The typed options of this kind (a KindConfig subclass), or None for axes keyed by a plain string.
    Config: ClassVar[Optional[type]] = None

    @classmethod
    def check(cls, model) -> list[str]:
        """Reasons this variant cannot run with the model config (empty when it can)."""
        return []


class Registry(Generic[T]):
    def __init__(self, axis: str):
        self.axis = axis  # the config key this registry serves, e.g. "model.attention.kind"
        self._entries: dict[str, T] = {}

    def register(self, kind: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if kind in self._entries:
                raise ValueError(f"{self.axis}: kind {kind!r} registered twice")
            self._entries[kind] = obj
            return obj

        return deco

    def get(self, kind: str) -> T:
        try:
            return self._entries[kind]
        except KeyError:
            raise KeyError(self.unknown_message(kind)) from None

    def unknown_message(self, kind: str) -> str:
        msg = f"{self.axis}: unknown kind {kind!r}; choose one of {', '.join(sorted(self))}"
        close = difflib.get_close_matches(kind, list(self), n=1)
        return msg + (f" (did you mean {close[0]!r}?)" if close else "")

    def __contains__(self, kind: object) -> bool:
        return kind in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self):
        return self._entries.items()
