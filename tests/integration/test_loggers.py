"""trainer.loggers: TensorBoard, CSV and W&B (offline) from one CLI run, all on the optimizer
step axis that metrics.jsonl uses; the resolved config in TensorBoard's HParams tab and text."""

from __future__ import annotations

import csv
import json

import pytest

from tests.helpers import CONFIGS, TINY_MODEL, run_cli


def test_tensorboard_csv_and_wandb_share_the_step_axis_of_metrics_jsonl(tiny_data, tmp_path):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_cli("train", str(CONFIGS / "debug.yaml"), *tiny_data, *TINY_MODEL, f"run.root={tmp_path}", "run.name=r",
            "trainer.max_steps=6", "trainer.log_every_n_steps=2", "trainer.val_every_n_steps=3",
            "checkpoint.every_n_steps=3", "trainer.progress_bar=false", "trainer.loggers=[tensorboard,csv,wandb]",
            "wandb.mode=offline", "wandb.tags=[ci]", env_extra={"WANDB_SILENT": "true"}, check=True)
    run = tmp_path / "r"

    jsonl: dict[str, dict[int, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for k in ("train/loss", "val/loss", "lr"):
            if k in rec:
                jsonl.setdefault(k, {})[rec["step"]] = rec[k]
    assert sorted(jsonl["train/loss"]) == [2, 4, 6] and sorted(jsonl["val/loss"]) == [3, 6]

    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    for key in ("train/loss", "val/loss", "lr"):
        tb = {e.step: e.value for e in ea.Scalars(key)}
        table = {int(float(r["step"])): float(r[key]) for r in rows if r.get(key)}
        assert sorted(tb) == sorted(table) == sorted(jsonl[key]), key
        for step, value in jsonl[key].items():
            assert tb[step] == pytest.approx(value, rel=1e-6) and table[step] == pytest.approx(value, rel=1e-6), key

    # The config: HParams (every key) and a text panel in TensorBoard; hparams.yaml in the CSV dir.
    assert set(ea.PluginTagToContent("hparams")) >= {"_hparams_/experiment", "_hparams_/session_start_info"}
    assert "config/text_summary" in ea.Tags()["tensors"]
    assert "config" in (run / "csv" / "hparams.yaml").read_text()
    # W&B offline: a run directory with its data file; a resume continues the same run id.
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert runs[0].name.endswith((run / "wandb_run_id").read_text().strip())
