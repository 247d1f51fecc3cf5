"""The acceptance run: `configs/default.yaml` end to end (about 6 minutes on 2 CPU cores).

Marked slow: `make test-slow` runs it. It checks what `make train` promises: the run
finishes within 15 minutes and its validation perplexity is far below the unigram
baseline of the same tokens.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.helpers import CONFIGS, run_cli

pytestmark = pytest.mark.slow


def test_default_preset_trains_well_within_budget(tmp_path):
    t0 = time.time()
    proc = run_cli("train", str(CONFIGS / "default.yaml"), f"run.root={tmp_path}/runs",
                   f"data.dir={tmp_path}/data", timeout=15 * 60, check=True)
    elapsed = time.time() - t0
    summary = json.loads((tmp_path / "runs" / "default" / "summary.json").read_text())
    assert summary["step"] == 1000
    assert elapsed < 15 * 60
    # "Far below": at least 5x lower than the unigram model on the same tokens.
    assert summary["val_ppl"] * 5 < summary["unigram_val_ppl"], summary
    assert "unigram perplexity" in proc.stdout and "validation perplexity" in proc.stdout
