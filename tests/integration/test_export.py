"""`lmtrain export`: consolidated fp32 safetensors, config and tokenizer; `generate` and
`eval-length` accept the export and give the same results as the run."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import CONFIGS, TINY_MODEL, run_cli


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("exportruns")
    run_cli("train", str(CONFIGS / "debug.yaml"), *tiny_data, *TINY_MODEL, "trainer.max_steps=4",
            "trainer.val_every_n_steps=4", "checkpoint.every_n_steps=4", f"run.root={root}", "run.name=r",
            "trainer.progress_bar=false", check=True)
    return root / "r"


def test_export_round_trip(run, tmp_path):
    out = tmp_path / "exp"
    run_cli("export", str(run), "--out", str(out), check=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "export.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / "export.json").read_text())["step"] == 4

    from safetensors.torch import load_file

    from lmtrain.train.checkpoint import load_trained

    tensors = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    a, b = load_trained(run), load_trained(out)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka

    g = [run_cli("generate", str(src), "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0",
                 check=True).stdout for src in (run, out)]
    assert g[0] == g[1]
    e = [run_cli("eval-length", str(src), "--lengths", "32,64", "--max-tokens", "256", "--no-tensorboard",
                 check=True).stdout for src in (run, out)]
    assert e[0].split("| r |")[1] == e[1].split("| exp |")[1]


def test_export_refuses_to_overwrite_a_foreign_directory(run, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = run_cli("export", str(run), "--out", str(tmp_path))
    assert proc.returncode == 2 and "not an lmtrain export" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_a_new_run_starts_from_an_export(run, tiny_data, tmp_path):
    """run.init_from: a fresh run takes the exported weights (the multi-node guide's answer to a
    changed GPU count); a different model or a resume ignores or refuses it."""
    out = tmp_path / "exp"
    run_cli("export", str(run), "--out", str(out), check=True)
    source_val = json.loads((run / "summary.json").read_text())["val_loss"]
    args = [str(CONFIGS / "debug.yaml"), *tiny_data, *TINY_MODEL, f"run.root={tmp_path}", f"run.init_from={out}",
            "trainer.val_every_n_steps=1", "trainer.progress_bar=false"]
    # One step at a negligible learning rate: the validation loss is the source model's.
    proc = run_cli("train", *args, "run.name=warm", "trainer.max_steps=1", "optim.lr=1e-12", "optim.min_lr=0",
                   "optim.warmup_steps=0", check=True)
    assert "weights initialised from" in proc.stdout
    warm_val = json.loads((tmp_path / "warm" / "summary.json").read_text())["val_loss"]
    assert warm_val == pytest.approx(source_val, rel=1e-4)
    bad = run_cli("train", *args, "run.name=other", "model.n_layers=1")
    assert bad.returncode == 2 and "run.init_from" in bad.stderr and "model.n_layers" in bad.stderr
    assert not (tmp_path / "other").exists()


def test_export_hf_loads_in_transformers_and_in_lmtrain(run, tmp_path):
    """`--format hf` from a run: the debug model has biases, so it leaves as remote code (and
    says why not native); files are group-readable; transformers computes the run's logits,
    and lmtrain's own tools accept the directory too."""
    import stat

    transformers = pytest.importorskip("transformers")
    from lmtrain.train.checkpoint import load_trained

    out = tmp_path / "hf"
    proc = run_cli("export", str(run), "--format", "hf", "--out", str(out), check=True)
    assert "as LmtrainForCausalLM" in proc.stdout and "mpt: " in proc.stdout and "model.bias=true" in proc.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "configuration_lmtrain.py", "export.json", "generation_config.json",
                     "lmtrain.yaml", "model.safetensors", "modeling_lmtrain.py", "tokenizer.json",
                     "tokenizer_config.json"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in out.iterdir())
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ours = load_trained(run).model
    ids = torch.randint(0, 512, (1, 256))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids).logits_BLV, rtol=1e-5, atol=1e-5)
    g = [run_cli("generate", str(src), "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0",
                 check=True).stdout for src in (run, out)]
    assert g[0] == g[1]


def test_eval_harness_scores_a_native_export_as_lm_eval_does(tiny_data, tmp_path):
    """`lmtrain eval-harness` on a run whose model maps onto MPT (the default preset's choice)
    writes its numbers, and `lm_eval --model hf` run directly on the export prints the same."""
    import subprocess
    import sys

    pytest.importorskip("lm_eval")
    from lmtrain.evaluate.harness import TASKS_DIR

    run_cli("train", str(CONFIGS / "debug.yaml"), *tiny_data, *TINY_MODEL, "model.bias=false", "trainer.max_steps=3",
            "trainer.val_every_n_steps=3", f"run.root={tmp_path}", "run.name=mpt", "trainer.progress_bar=false",
            check=True)
    run = tmp_path / "mpt"
    proc = run_cli("eval-harness", str(run), "--tasks", "lmtrain_python_mc", "--limit", "8", check=True)
    assert "as MptForCausalLM" in proc.stderr
    rep = json.loads((run / "eval" / "harness.json").read_text())
    ours = rep["metrics"]["lmtrain_python_mc"]
    assert set(ours) >= {"acc", "acc_norm"} and rep["step"] == 3 and (run / "eval" / "harness.md").is_file()
    direct = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={run / 'eval' / 'hf'},dtype=float32", "--tasks", "lmtrain_python_mc", "--include_path",
         str(TASKS_DIR), "--limit", "8", "--device", "cpu", "--output_path", str(tmp_path / "le")],
        capture_output=True, text=True, timeout=300, check=True)
    files = list((tmp_path / "le").rglob("results_*.json"))
    theirs = json.loads(files[0].read_text())["results"]["lmtrain_python_mc"]
    assert theirs["acc,none"] == pytest.approx(ours["acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    assert "lmtrain_python_mc" in direct.stdout
