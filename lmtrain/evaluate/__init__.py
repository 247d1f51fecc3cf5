"""Evaluation beyond the training loop: perplexity against context length (`eval-length`),
long-range probes (`eval-retrieval`), lm-evaluation-harness."""

from __future__ import annotations

import re
from typing import Sequence


def override_suffix(overrides: Sequence[str]) -> str:
    """A file-name suffix for a report made with `--set` overrides ("" without any):
    `model.attention.rounds=8` -> `_rounds-8`, so reports with other settings sit beside the
    plain one instead of replacing it. No dots: the writers add their own extensions."""
    parts = [f"{key.rsplit('.', 1)[-1]}-{value}" for key, value in (o.split("=", 1) for o in overrides)]
    return "".join("_" + re.sub(r"[^A-Za-z0-9-]+", "_", p) for p in parts)


def override_label(overrides: Sequence[str]) -> str:
    """How a run evaluated with overrides is named in tables: ` [rounds=8]`."""
    return f" [{', '.join(o.removeprefix('model.') for o in overrides)}]" if overrides else ""
