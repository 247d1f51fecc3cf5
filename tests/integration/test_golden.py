"""Golden loss curve: a seeded tiny model on a generated corpus must train to the stored
losses. Changes meant to leave numerics alone (refactors, speed work) are checked by it.

The corpus is generated from a seeded `random.Random`, so it is the same on every machine
and Python version. The tolerance allows for float kernels that differ between CPUs and
torch releases; a real change (init, data order, schedule, loss) moves losses by far more.

After an intended change of numerics, regenerate: LMTRAIN_UPDATE_GOLDEN=1 pytest tests/integration/test_golden.py
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from lmtrain.config import load_config
from lmtrain.train.callbacks.metrics_file import read_metrics
from tests.helpers import CONFIGS

GOLDEN = Path(__file__).parent / "golden" / "debug_losses.json"
WORDS = ["def", "return", "self", "import", "class", "if", "else", "for", "in", "while", "x", "y", "value", "name",
         "(", ")", ":", "=", "+", "-", ".", ",", "[", "]", "0", "1", "None", "True", "print", "lambda"]


def write_corpus(root: Path, n_docs: int = 60) -> None:
    rng = random.Random(1234)
    root.mkdir(parents=True)
    for d in range(n_docs):
        lines = []
        for _ in range(rng.randrange(20, 60)):
            indent = "    " * rng.randrange(0, 3)
            lines.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 12))))
        (root / f"doc{d:03d}.py").write_text("\n".join(lines) + "\n")


def test_golden_loss_curve(tmp_path):
    from lmtrain.train.run import train

    write_corpus(tmp_path / "corpus")
    overrides = [f"data.source={tmp_path / 'corpus'}", f"data.dir={tmp_path / 'data'}", "data.vocab_size=300",
                 "data.max_documents=null", "data.val_fraction=0.1", "data.seq_len=32", "data.batch_size=4",
                 "model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.dropout=0.1",
                 "trainer.max_steps=12", "trainer.val_every_n_steps=6", "checkpoint.every_n_steps=100",
                 "trainer.progress_bar=false", f"run.root={tmp_path / 'runs'}", "run.name=golden"]
    cfg = load_config(CONFIGS / "debug.yaml", overrides)
    train(cfg, log=lambda s: None)
    losses = read_metrics(tmp_path / "runs" / "golden" / "metrics.jsonl")
    got = [losses[s] for s in sorted(losses)]
    if os.environ.get("LMTRAIN_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"overrides": overrides[2:-2], "losses": got}, indent=1) + "\n")
        pytest.skip("golden losses rewritten")
    want = json.loads(GOLDEN.read_text())["losses"]
    assert len(got) == len(want) == 12
    assert got == pytest.approx(want, rel=1e-3), list(zip(got, want))
