"""Registries of variants, one per axis of the decoder (attention kind, positional scheme,
feed-forward, residual wiring, depth control).

Every axis is a typed config node with a `kind` (`model.attention.kind`,
`model.position.kind`, ...). The registry maps each kind to the class that implements it;
the class carries its options as a `Config` dataclass (a `KindConfig` subclass), which the
config loader uses to type the node, so options of other kinds are unknown keys.

A variant declares, as class data, everything the loader and the tests ask before building:
  * `Config` - its options;
  * `check(assembly)` - the reasons it cannot run with the other axes' choices, one line
    each (lmtrain/model/axes.py);
  * `own_parameters(assembly)` - how many parameters it holds itself (not in the layers
    the decoder builds around it), so that parameter counts need no model;
  * `init_options` - the options that set initial parameter values: option -> (the tensor
    it fills, relative to the variant's module, and the value it fills it with, from the
    config node). A registry-wide test sets each to a non-default value and checks that the
    value reaches the built model; a variant's own `init_parameters()` sets them;
  * `test_options` - options the registry-wide property tests build it with, so that they
    exercise its optional parts.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generic, Iterator, TypeVar

if TYPE_CHECKING:
    from lmtrain.model.axes import Assembly

T = TypeVar("T")


@dataclass
class KindConfig:
    """The config node of an axis: `kind` picks the registry entry, whose own `Config`
    subclass adds that kind's options."""

    kind: str = ""


class Variant:
    """What every registered variant declares."""

    Config: ClassVar[type] = KindConfig
    init_options: ClassVar[dict[str, tuple[str, Callable[[Any], float]]]] = {}
    test_options: ClassVar[dict[str, Any]] = {}

    @classmethod
    def check(cls, a: "Assembly") -> list[str]:
        """Reasons this variant cannot run with the assembly `a` (empty when it can)."""
        return []

    @classmethod
    def own_parameters(cls, a: "Assembly") -> int:
        """Parameters this variant holds itself, per instance (an attention kernel: per layer)."""
        return 0


class Registry(Generic[T]):
    def __init__(self, node: str):
        self.node = node  # the config node this registry types, e.g. "model.attention"
        self.axis = f"{node}.kind"  # the key that picks an entry
        self._entries: dict[str, T] = {}

    def register(self, kind: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if kind in self._entries:
                raise ValueError(f"{self.axis}: kind {kind!r} registered twice")
            self._entries[kind] = obj
            return obj

        return deco

    def unregister(self, kind: str) -> None:
        """Remove an entry (tests that register a temporary kind)."""
        self._entries.pop(kind)

    def get(self, kind: str) -> T:
        try:
            return self._entries[kind]
        except KeyError:
            raise KeyError(self.unknown_message(kind)) from None

    def config(self, kind: str, **options) -> KindConfig:
        """A config node of `kind` with its defaults (and `options`)."""
        return self.get(kind).Config(kind=kind, **options)  # type: ignore[attr-defined]

    def unknown_message(self, kind: str) -> str:
        msg = f"{self.axis}: unknown kind {kind!r}; choose one of {', '.join(sorted(self))}"
        close = difflib.get_close_matches(kind, list(self), n=1)
        return msg + (f" (did you mean {close[0]!r}?)" if close else "")

    def __contains__(self, kind: object) -> bool:
        return kind in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        return self._entries.items()
