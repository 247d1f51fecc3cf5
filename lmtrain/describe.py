"""`lmtrain config --describe [PRESET]`: every config key with its type, default, choices and
one line of help, the options of every kind of every model axis included.

The help is the comment written beside or above each field of the config dataclasses
(lmtrain/config.py and each variant's `Config`), so a key is documented where it is
declared; `tests/unit/test_describe.py` fails for a key without one.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import typing
from typing import Any, Optional

from lmtrain.config import (
    ACCELERATORS,
    POLYMORPHIC,
    PRECISIONS,
    STRATEGIES,
    Config,
    flatten,
    to_dict,
)


def _choices() -> dict[str, tuple[str, ...]]:
    from lmtrain.model.ffn import ACTIVATIONS
    from lmtrain.model.layer import NORMS
    from lmtrain.train.loggers import LOGGERS, WANDB_MODES

    return {"trainer.precision": PRECISIONS, "trainer.accelerator": ACCELERATORS, "trainer.strategy": STRATEGIES,
            "model.norm": NORMS, "trainer.loggers": LOGGERS, "wandb.mode": WANDB_MODES,
            "eval.mode": ("nonoverlap", "sliding"), "deepspeed.zero_stage": ("1", "2", "3"),
            "model.ffn.activation": tuple(ACTIVATIONS)}


@functools.lru_cache(maxsize=None)
def field_help(cls: type) -> dict[str, str]:
    """field -> its comment (inline, else the comment lines right above it), for `cls` and its
    dataclass bases (a subclass's comment wins)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        lines = src.splitlines()
        comments = {}
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
        body = ast.parse(src).body[0]
        for node in getattr(body, "body", []):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            inline = comments.get(node.end_lineno)
            above, n = [], node.lineno - 1
            while n >= 1 and n in comments and lines[n - 1].lstrip().startswith("#"):
                above.insert(0, comments[n][1])
                n -= 1
            text = " ".join(above + ([inline[1]] if inline and not lines[node.end_lineno - 1].lstrip()
                                     .startswith("#") else []))
            if text:
                out[node.target.id] = " ".join(text.split())
    return out


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        names = [type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | null" if type(None) in args else "")
    if origin in (list, typing.List):
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin in (dict, typing.Dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


@dataclasses.dataclass
class Row:
    key: str
    type: str
    default: Any
    choices: tuple[str, ...]
    help: str
    kind: Optional[str] = None  # for a kind's own option: the kind it belongs to


def _rows(cls: type, prefix: str, values: dict, choices: dict) -> list[Row]:
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    rows: list[Row] = []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if key in POLYMORPHIC:
            rows += _axis_rows(key, values, choices)
        elif dataclasses.is_dataclass(tp):
            rows += _rows(tp, key + ".", values, choices)
        else:
            rows.append(Row(key, type_name(tp), values.get(key), choices.get(key, ()), helps.get(f.name, "")))
    return rows


def _axis_rows(node: str, values: dict, choices: dict) -> list[Row]:
    registry = POLYMORPHIC[node]
    kinds = list(registry)
    rows = [Row(f"{node}.kind", "str", values.get(f"{node}.kind"), tuple(kinds),
                f"the {node.split('.')[-1]} variant; its own options follow, marked with their kind")]
    chosen = values.get(f"{node}.kind")
    for kind in kinds:
        cls = registry.get(kind).Config
        hints = typing.get_type_hints(cls)
        helps = field_help(cls)
        defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else
                             f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                    for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):
            if f.name == "kind":
                continue
            key = f"{node}.{f.name}"
            value = values.get(key) if kind == chosen else defaults[f.name]
            rows.append(Row(key, type_name(hints[f.name]), value, choices.get(key, ()), helps.get(f.name, ""),
                            kind=kind))
    return rows


def describe_rows(cfg: Optional[Config] = None) -> list[Row]:
    """Every key: values from `cfg` (a loaded preset) where given, else the schema's defaults."""
    cfg = cfg or _schema_defaults()
    return _rows(Config, "", flatten(to_dict(cfg)), _choices())


def _schema_defaults() -> Config:
    from lmtrain.config import load_config

    return load_config(None, [])


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if not isinstance(value, str) or value else '""'


def format_describe(rows: list[Row], preset: Optional[str] = None) -> str:
    out = [f"# every key of {preset or 'the schema'}: type, value{' in this preset' if preset else ' (default)'}, "
           "choices, help", "# a kind's own options are marked [kind=K]; they apply when that kind is chosen", ""]
    width = max(len(r.key) for r in rows) + 2
    for r in rows:
        where = f"[kind={r.kind}] " if r.kind else ""
        choices = f" one of {', '.join(r.choices)};" if r.choices else ""
        out.append(f"{r.key:<{width}}{r.type:<16} = {_show(r.default):<14}{choices} {where}{r.help}".rstrip())
    return "\n".join(out)
