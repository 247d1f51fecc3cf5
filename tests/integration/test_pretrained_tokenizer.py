"""A run on a pretrained tokenizer whose end of sequence is `</s>` (a Llama-style tokenizer
directory: `<unk> <s> </s>`, a template adding `<s>`): it prepares, trains, resumes, exports
(Hugging Face and lmtrain formats) and reloads with that tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import CONFIGS, TINY_MODEL, llama_style_tokenizer, run_cli

DATA = ["data.source=stdlib", "data.max_documents=60", "data.val_fraction=0.05", "data.num_workers=0"]


def test_a_run_on_a_pretrained_tokenizer_trains_resumes_exports_and_reloads(tmp_path):
    transformers = pytest.importorskip("transformers")
    from data_pipelines.shards import open_tokens, read_meta
    from lmtrain.train.checkpoint import load_trained

    tok_dir = llama_style_tokenizer(tmp_path / "tok")  # 300 ids; </s> is id 2, <s> id 1
    args = ["train", str(CONFIGS / "debug.yaml"), *DATA, f"data.dir={tmp_path / 'data'}", f"data.tokenizer={tok_dir}",
            "data.vocab_size=null", *TINY_MODEL, "model.bias=false", "checkpoint.every_n_steps=2",
            "trainer.val_every_n_steps=2", f"run.root={tmp_path}", "run.name=r", "trainer.progress_bar=false"]
    proc = run_cli(*args, "trainer.max_steps=2", check=True)
    assert "using the pretrained tokenizer" in proc.stdout and "'</s>'" in proc.stdout

    # The vocabulary is the tokenizer's, padded to 64; documents end with </s>; no <s> inside.
    run = tmp_path / "r"
    saved = (run / "config.yaml").read_text()
    assert "vocab_size: 320" in saved and "eos_token: </s>" in saved
    meta = read_meta(tmp_path / "data")
    assert meta["eot_id"] == 2 and meta["eos_token"] == "</s>"
    train = np.asarray(open_tokens(tmp_path / "data", "train"))
    idx = np.load(tmp_path / "data" / "train.idx.npy")
    assert (train[idx[1:] - 1] == 2).all() and not (train == 1).any()

    # Resume: the same command, longer.
    proc = run_cli(*args, "trainer.max_steps=4", check=True)
    assert "resuming from" in proc.stdout and load_trained(run).step == 4

    # Hugging Face export: MPT with the tokenizer's special tokens; transformers reloads both.
    hf_dir = tmp_path / "hf"
    assert "as MptForCausalLM" in run_cli("export", str(run), "--format", "hf", "--out", str(hf_dir),
                                          check=True).stdout
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token, tok.bos_token_id) == ("</s>", 2, "<s>", 1)
    assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ours = load_trained(run).model.eval()
    ids = tok("def main(argv):\n    return 0\n", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits_BLV, rtol=1e-5, atol=1e-5)

    # lmtrain export: generate reads its tokenizer and gives the run's text.
    exp = tmp_path / "exp"
    run_cli("export", str(run), "--out", str(exp), check=True)
    assert json.loads((exp / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
    g = [run_cli("generate", str(src), "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0",
                 check=True).stdout for src in (run, exp)]
    assert g[0] == g[1] and g[0].startswith("def ")
