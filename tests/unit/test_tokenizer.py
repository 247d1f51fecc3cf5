"""Pretrained tokenizers (`data.tokenizer`, `data.eos_token`): how each form is found, the
special tokens and vocabulary size taken from it, and the one-line errors of bad settings."""

from __future__ import annotations

import json

import pytest

from data_pipelines.tokenizer import EOT, encode, id_count, padded, resolve_pretrained
from lmtrain.config import ConfigError, load_config
from tests.helpers import DEBUG, llama_style_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return llama_style_tokenizer(tmp_path_factory.mktemp("tok") / "llama")


def test_a_file_and_its_directory_give_the_same_tokenizer(tok_dir):
    by_file = resolve_pretrained(str(tok_dir / "tokenizer.json"))
    by_dir = resolve_pretrained(str(tok_dir))  # through transformers' AutoTokenizer
    assert by_file.sha256 == by_dir.sha256
    assert by_file.special == by_dir.special == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert by_file.eos(None) == "</s>" and by_file.eos("<s>") == "<s>"
    # lmtrain encodes without the template: the tokenizer's own call puts <s> first.
    text = "import os\n"
    assert by_file.tokenizer.encode(text).ids == [1, *encode(by_file.tokenizer, text)]


def test_vocabulary_and_end_of_document_come_from_the_tokenizer(tok_dir):
    cfg = load_config(DEBUG, [f"data.tokenizer={tok_dir}", "data.vocab_size=null"])
    assert (cfg.data.vocab_size, cfg.data.eos_token) == (320, "</s>")
    assert id_count(resolve_pretrained(str(tok_dir)).tokenizer) == 300
    cfg = load_config(DEBUG, [f"data.tokenizer={tok_dir}", "data.vocab_size=384", "data.eos_token=<unk>"])
    assert (cfg.data.vocab_size, cfg.data.eos_token) == (384, "<unk>")
    # A new BPE: the schema's size, and <|endoftext|>.
    cfg = load_config(None, [])
    assert (cfg.data.vocab_size, cfg.data.eos_token, cfg.data.tokenizer) == (8192, EOT, None)
    assert padded(300) == 320 and padded(320) == 320 and padded(50257) == 50304


def test_a_tokenizer_without_a_declared_end_of_sequence(tmp_path, tok_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    with pytest.raises(ConfigError, match=r"^data.eos_token: .* declares no end-of-sequence token; name one of its "
                                          r"special tokens \(<unk>, <s>, </s>\)$"):
        load_config(DEBUG, [f"data.tokenizer={bare / 'tokenizer.json'}"])
    assert load_config(DEBUG, [f"data.tokenizer={bare / 'tokenizer.json'}", "data.eos_token=</s>"]).data.eos_token \
        == "</s>"


@pytest.mark.parametrize("overrides, message", [
    (["data.tokenizer=missing/tokenizer.json"], "data.tokenizer: missing/tokenizer.json does not exist"),
    (["data.tokenizer={tmp}/not.json"], "is not a tokenizers tokenizer.json"),
    (["data.tokenizer={tmp}"], "holds no tokenizer (none of tokenizer.json"),
    (["data.tokenizer={tok}", "data.eos_token=<|end_of_text|>"],
     "data.eos_token: '<|end_of_text|>' is not a token of"),
    (["data.tokenizer={tok}", "data.vocab_size=256"],
     "data.vocab_size: 256 is smaller than the 300 ids of {tok}; set data.vocab_size=null (its size padded to a "
     "multiple of 64: 320) or at least 300"),
    (["data.tokenizer={tok}", "data.source=copy", "data.seq_len=64"], "data.tokenizer: the copy task"),
    (["data.source=copy", "data.seq_len=64", "data.eos_token=</s>"], "data.eos_token: the copy task"),
    (["data.eos_token=''"], "data.eos_token: must not be empty"),
])
def test_bad_tokenizer_settings_fail_at_load_in_one_line(overrides, message, tmp_path, tok_dir):
    (tmp_path / "not.json").write_text(json.dumps({"not": "a tokenizer"}))
    fill = {"tmp": tmp_path, "tok": tok_dir}
    with pytest.raises(ConfigError) as e:
        load_config(DEBUG, [o.format(**fill) for o in overrides])
    assert message.format(**fill) in str(e.value) and "\n" not in str(e.value)


def test_a_new_bpe_may_end_documents_with_another_token(tmp_path):
    from data_pipelines.prepare import prepare
    from data_pipelines.shards import read_meta

    cfg = load_config(DEBUG, ["data.source=stdlib", "data.max_documents=12", "data.vocab_size=300",
                              "data.eos_token=</s>", f"data.dir={tmp_path / 'd'}", "data.num_workers=0"])
    prepare(cfg.data, log=lambda s: None)
    meta = read_meta(tmp_path / "d")
    assert meta["eos_token"] == "</s>" and meta["eot_id"] == 0 and meta["inputs"]["eos_token"] == "</s>"
    assert json.loads((tmp_path / "d" / "tokenizer_config.json").read_text()) == {"eos_token": "</s>"}


def test_a_hub_name_offline_fails_in_seconds_with_the_fixes(monkeypatch):
    import time

    from data_pipelines.hub import unreachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"^data.tokenizer: 'no-such-org/no-such-tokenizer' is not in the Hugging "
                                          r"Face cache .*HF_HUB_OFFLINE is set.*give a local tokenizer.json"):
        load_config(DEBUG, ["data.tokenizer=no-such-org/no-such-tokenizer", "data.vocab_size=null"])
    assert time.monotonic() - t0 < 10
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    assert unreachable().startswith("127.0.0.1 cannot be reached")
