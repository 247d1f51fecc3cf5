"""DeepSpeed ZeRO 1, 2 and 3 on the CPU with 2 processes (DeepSpeed's cpu accelerator, gloo):
each stage trains, saves sharded checkpoints, resumes with an identical continuation, and
exports consolidated weights that give the live model's validation loss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmtrain.train.callbacks.metrics_file import read_metrics
from tests.helpers import CONFIGS, TINY_DATA, run_cli

DEBUG = str(CONFIGS / "debug.yaml")
MODEL = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.d_ff=256", "model.dropout=0.1"]
STEPS = ["trainer.max_steps=6", "checkpoint.every_n_steps=3", "trainer.val_every_n_steps=3",
         "trainer.log_every_n_steps=1", "data.batch_size=4", "trainer.devices=2", "trainer.strategy=deepspeed"]
# Stage 3 also recomputes activations in backward and runs the periodic length evaluation
# (a collective under ZeRO-3: every rank joins the parameter gathers); stage 2 offloads the
# optimizer (DeepSpeedCPUAdam).
STAGES = {
    1: ["deepspeed.zero_stage=1"],
    2: ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"],
    3: ["deepspeed.zero_stage=3", "trainer.activation_checkpointing=true", "eval.lengths=[32,128]",
        "eval.max_tokens=512"],
}


@pytest.fixture(scope="module")
def base_args(tmp_path_factory) -> list[str]:
    work = tmp_path_factory.mktemp("deepspeed")
    data = [*TINY_DATA, f"data.dir={work / 'data'}"]
    run_cli("prepare-data", DEBUG, *data, check=True)
    return [DEBUG, *data, *MODEL, *STEPS, f"run.root={work / 'runs'}"]


def val_loss_of(model_dir: Path, data_dir: str) -> float:
    """The validation loss of a saved model on the windows the run's final validation scored."""
    from lmtrain.train.checkpoint import load_trained
    from lmtrain.train.data import WindowDataset, val_windows
    from lmtrain.train.module import lm_loss

    t = load_trained(model_dir)
    cfg = t.cfg
    val = WindowDataset(data_dir, "val", cfg.data.seq_len)
    windows = val_windows(len(val), cfg.data.val_batches * cfg.data.batch_size * cfg.trainer.devices)
    with torch.no_grad():
        batch = torch.stack([val[w] for w in windows])
        return float(lm_loss(t.model(batch[:, :-1]).logits_BLV, batch[:, 1:]))


# Every stage runs under `make test-slow` (about 90 s each on 2 cores), to keep `make test` within
# its 20-minute budget; the default suite still trains, saves and resumes under ZeRO-3 in
# test_usr1_under_zero3_saves_shards_and_resumes_exactly and under ZeRO-2 with reversible layers.
@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_zero_stage_trains_resumes_exactly_and_exports(stage, base_args, tmp_path):
    from lmtrain.train.checkpoint import checkpoint_step, is_deepspeed_checkpoint

    args = [*base_args, *STAGES[stage]]
    root = Path(next(a for a in args if a.startswith("run.root=")).split("=", 1)[1])
    data_dir = next(a for a in args if a.startswith("data.dir=")).split("=", 1)[1]
    name = f"zero{stage}"
    proc = run_cli("train", *args, f"run.name={name}", check=True)
    run = root / name

    # The JSON DeepSpeed ran with is in the run dir, with Lightning's additions.
    ds = json.loads((run / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 1.0
    assert ("offload_optimizer" in ds["zero_optimization"]) == (stage == 2)

    # Sharded checkpoint directories, one optimizer shard per rank; losses fell.
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step000003.ckpt", "step000006.ckpt"], ckpts
    for c in ckpts:
        assert is_deepspeed_checkpoint(run / "checkpoints" / c)
    assert len(list((run / "checkpoints" / "last.ckpt" / "checkpoint").glob("*optim_states.pt"))) == 2
    assert checkpoint_step(run / "checkpoints" / "step000003.ckpt") == 3
    want = read_metrics(run / "metrics.jsonl")
    assert sorted(want) == list(range(1, 7)), proc.stdout[-2000:]
    assert want[6] < want[1]
    if stage == 3:
        assert proc.stdout.count("eval-length step 3") == 1, proc.stdout[-3000:]  # reported once
        assert sorted(read_metrics(run / "metrics.jsonl", "eval_length/sliding/ppl_L128")) == [3, 6]

    # Resume from step 3 in a new run dir: steps 4-6 repeat exactly (loss, lr, validation).
    resumed = root / f"{name}-resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step000003.ckpt", resumed / "checkpoints" / "step000003.ckpt")
    proc = run_cli("train", *args, f"run.name={name}-resumed", check=True)
    assert "resuming from" in proc.stdout
    got = read_metrics(resumed / "metrics.jsonl")
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)]
    for key in ("lr", "val/loss"):
        a, b = read_metrics(run / "metrics.jsonl", key), read_metrics(resumed / "metrics.jsonl", key)
        assert [b[s] for s in sorted(b) if s > 3] == [a[s] for s in sorted(a) if s > 3], key

    # Export: consolidated fp32 weights, the same validation loss as the live model had.
    out = tmp_path / "export"
    run_cli("export", str(run / "checkpoints" / "last.ckpt"), "--out", str(out), check=True)
    live = json.loads((run / "summary.json").read_text())["val_loss"]
    assert val_loss_of(out, data_dir) == pytest.approx(live, rel=1e-5, abs=1e-6)
    # The checkpoint directory itself loads the same way (generate, eval-length).
    assert val_loss_of(run / "checkpoints" / "last.ckpt", data_dir) == pytest.approx(live, rel=1e-5, abs=1e-6)
    if stage == 3:  # the Hugging Face export from the shards: transformers computes the live model
        hf_export_matches(run / "checkpoints" / "last.ckpt", tmp_path / "hf")


def hf_export_matches(shards: Path, out: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from lmtrain.train.checkpoint import load_trained

    run_cli("export", str(shards), "--format", "hf", "--out", str(out), check=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ours = load_trained(shards).model.eval()
    ids = torch.randint(0, ours.vocab_size, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits_BLV, rtol=1e-5, atol=1e-5)


def test_resume_refuses_a_different_world_size_or_strategy(base_args):
    root = Path(next(a for a in base_args if a.startswith("run.root=")).split("=", 1)[1])
    run = root / "zero1"
    if not (run / "checkpoints" / "last.ckpt").exists():
        pytest.skip("needs the ZeRO-1 run of the test above")
    args = [*base_args, "deepspeed.zero_stage=1", "run.name=zero1", "trainer.max_steps=8"]
    proc = run_cli("train", *args, "trainer.devices=1")
    assert proc.returncode == 2 and "written by 2 ranks" in proc.stderr, proc.stderr[-2000:]
    ddp = [a for a in args if not a.startswith(("trainer.strategy", "deepspeed."))]
    proc = run_cli("train", *ddp, "trainer.strategy=ddp")
    assert proc.returncode == 2 and "DeepSpeed checkpoint directory" in proc.stderr, proc.stderr[-2000:]


def test_usr1_under_zero3_saves_shards_and_resumes_exactly(base_args):
    """SLURM's warning signal under ZeRO-3: rank 0 gets USR1 (the other rank learns of it in
    the agreement), every rank writes its shard of last.ckpt, the run exits 0, and the same
    command continues with the losses of the uninterrupted run."""
    from lmtrain.train.checkpoint import checkpoint_step
    from tests.helpers import train_and_signal

    root = Path(next(a for a in base_args if a.startswith("run.root=")).split("=", 1)[1])
    if not (root / "zero3" / "metrics.jsonl").exists():
        pytest.skip("needs the ZeRO-3 run of the test above")
    args = [*base_args, *STAGES[3], "run.name=zero3-usr1"]
    run = root / "zero3-usr1"
    metrics = run / "metrics.jsonl"
    returncode, out = train_and_signal(args, metrics, after_step=1)
    assert returncode == 0, out[-3000:]
    assert "preemption: signal received" in out, out[-3000:]
    stopped = checkpoint_step(run / "checkpoints" / "last.ckpt")
    assert 1 <= stopped < 6, "the signal came too late to test a mid-run stop"
    assert len(list((run / "checkpoints" / "last.ckpt" / "checkpoint").glob("*optim_states.pt"))) == 2

    run_cli("train", *args, check=True)
    want, got = read_metrics(root / "zero3" / "metrics.jsonl"), read_metrics(metrics)
    assert [got[s] for s in range(1, 7)] == [want[s] for s in range(1, 7)]


def test_reversible_wiring_under_zero2_matches_plain_autograd(base_args, tmp_path):
    """Reversible layers hand each parameter's gradient to autograd, so ZeRO-2's gradient hooks
    (reduce-scatter into the shards) see them: the losses equal the two-stream model's under
    plain autograd (float32, 6 steps, dropout on)."""
    losses = {}
    for wiring in ("two_stream", "reversible"):
        args = [*base_args, "deepspeed.zero_stage=2", f"model.residual={wiring}", f"run.root={tmp_path}",
                f"run.name={wiring}"]
        run_cli("train", *args, check=True)
        losses[wiring] = read_metrics(tmp_path / wiring / "metrics.jsonl")
    assert sorted(losses["reversible"]) == list(range(1, 7))
    for step, plain in losses["two_stream"].items():
        assert losses["reversible"][step] == pytest.approx(plain, rel=1e-5), step


@pytest.mark.slow
def test_early_exit_under_zero3_trains_and_exports(base_args, tmp_path):
    """Early exit's per-exit losses (the LM head applied to every exit in checkpointed chunks)
    and halting units under ZeRO-3, whose sharded parameters are gathered inside each module's
    forward: training runs, the losses fall, and the export computes the live model."""
    args = [*base_args, "deepspeed.zero_stage=3", "model.depth.kind=early_exit", "model.depth.halting=true",
            "model.depth.weighting=increasing", f"run.root={tmp_path}", "run.name=ee"]
    data_dir = next(a for a in args if a.startswith("data.dir=")).split("=", 1)[1]
    run_cli("train", *args, check=True)
    run = tmp_path / "ee"
    losses = read_metrics(run / "metrics.jsonl")
    exits = read_metrics(run / "metrics.jsonl", "train/exits")
    assert sorted(losses) == sorted(exits) == list(range(1, 7)) and losses[6] < losses[1]
    assert sorted(read_metrics(run / "metrics.jsonl", "train/halting")) == list(range(1, 7))
    out = tmp_path / "export"
    run_cli("export", str(run / "checkpoints" / "last.ckpt"), "--out", str(out), check=True)
    live = json.loads((run / "summary.json").read_text())["val_loss"]
    assert val_loss_of(out, data_dir) == pytest.approx(live, rel=1e-5, abs=1e-6)
