"""Running positions and frozen keys and values: what depth kinds that stop positions early
share (ACT halting; per-token exits).

A position that stops keeps its state. Its inputs to every layer are frozen at their last
values, so at later steps it still offers the same keys and values to the positions that
keep running, and only the running positions need their queries, projections and
feed-forward computed. `step_running` runs one application of a block of layers that way;
`freeze_cache` extends a KV cache so that a stopped position's keys and values serve the
later steps it skipped.

Shapes: B batch, L length, M model dim, Q running positions per row (padded).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from lmtrain.model.layer import Context, KVCache, Layer, gather_rows


def running_rows(running_BL: Tensor, Q: int) -> tuple[Tensor, Tensor]:
    """The Q positions each row computes (Q: the most running positions of any row): running
    ones first, in position order, the rows padded with stopped positions (whose results are
    dropped). Returns (rows_BQ, valid_BQ)."""
    rows_BQ = torch.argsort((~running_BL).to(torch.int8), dim=1, stable=True)[:, :Q]
    return rows_BQ, running_BL.gather(1, rows_BQ)


def step_running(layers: Sequence[Layer], residual, x0_BLM: Tensor, states: Optional[list[Tensor]],
                 running_BL: Tensor, ctx: Context, *, skip_stopped: bool = True) -> tuple[list[Tensor], int]:
    """One application of `layers` (through the wiring `residual`) to the block input `x0_BLM`.

    `states` holds each layer's input and then the block's output as of the last step each
    position ran (None at the first step: every position runs). Running positions get new
    states; stopped ones keep theirs. With `skip_stopped` and a wiring that `supports_rows`,
    only the running positions of each row are computed (keys and values come from all).
    Returns the new states and the positions computed per row times B (padding included)."""
    B, L, _ = x0_BLM.shape
    rows_BQ = valid_BQ = None
    if states is not None and skip_stopped and residual.supports_rows:
        Q = int(running_BL.sum(1).max())
        if Q < L:
            rows_BQ, valid_BQ = running_rows(running_BL, Q)
    new = [x0_BLM]
    x_BLM = x0_BLM
    for j, layer in enumerate(layers):
        if rows_BQ is None:
            y_BLM = residual.run([layer], x_BLM, ctx)
            if states is not None:
                y_BLM = torch.where(running_BL[..., None], y_BLM, states[j + 1])
        else:
            prev_BLM = states[j + 1]
            y_BQM = torch.where(valid_BQ[..., None], residual.run_rows(layer, x_BLM, rows_BQ, ctx),
                                gather_rows(prev_BLM, rows_BQ))
            y_BLM = prev_BLM.scatter(1, rows_BQ[..., None].expand_as(y_BQM), y_BQM)
        new.append(y_BLM)
        x_BLM = y_BLM
    return new, B * (L if rows_BQ is None else rows_BQ.shape[1])


def freeze_cache(cache: Optional[KVCache], layers: Sequence[Layer], last_step: int, max_steps: int, n: int) -> None:
    """After a forward that stopped at `last_step`, the cache slots of the later steps (up to
    `max_steps`) get the last `n` positions' keys and values of the last step: a stopped
    position offers the same keys and values at every step it skipped."""
    if cache is None:
        return
    for later in range(last_step + 1, max_steps + 1):
        for layer in layers:
            cache.repeat_last((last_step, layer.index), (later, layer.index), n)
