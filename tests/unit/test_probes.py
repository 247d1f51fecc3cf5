"""The long-range probes: the copy task as a data source, its scoring, the passkey prompt,
and pattern pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import make_model, property_config


def test_copy_documents_repeat_distinct_symbols_at_the_copy_distance():
    from data_pipelines.probes import FIRST_SYMBOL, copy_documents, copy_half

    L, symbols = 64, 100
    docs = copy_documents(50, L, symbols, seed=3)
    n = copy_half(L)
    assert docs.shape == (50, L)
    for d in docs:
        x = d[:n]
        assert len(set(x.tolist())) == n  # no symbol repeats within a document
        assert x.min() >= FIRST_SYMBOL and x.max() < FIRST_SYMBOL + symbols
        assert d[n] == 1 and d[-1] == 0
        np.testing.assert_array_equal(d[n + 1 : 2 * n + 1], x)  # the copy, L / 2 positions later
    np.testing.assert_array_equal(docs, copy_documents(50, L, symbols, seed=3))
    assert not np.array_equal(docs, copy_documents(50, L, symbols, seed=4))


def test_copy_targets_are_exactly_the_copied_half():
    from data_pipelines.probes import copy_documents, copy_targets

    L = 32
    d = torch.from_numpy(copy_documents(1, L, 40, seed=0))[0]
    y = d.roll(-1)
    sl = copy_targets(L)
    assert torch.equal(y[sl], d[: L // 2 - 1])


def test_copy_scores_count_only_the_copied_half():
    from data_pipelines.probes import copy_documents, copy_targets
    from lmtrain.evaluate.probes import copy_scores

    L, V = 32, 64
    x = torch.from_numpy(copy_documents(2, L, V - 2, seed=1))
    y = x.roll(-1, dims=1)
    perfect = torch.full((2, L, V), -20.0).scatter(-1, y[..., None], 20.0)
    loss, acc = copy_scores(perfect, y, L)
    assert float(acc) == 1.0 and float(loss) < 1e-6
    wrong_first_half = perfect.clone()
    wrong_first_half[:, : copy_targets(L).start] = 0.0  # outside the scored half: no effect
    assert float(copy_scores(wrong_first_half, y, L)[1]) == 1.0
    off = perfect.clone()
    off[:, copy_targets(L).start] = 0.0  # one scored position per row now uniform: a tie, argmax 0
    assert float(copy_scores(off, y, L)[1]) == pytest.approx(1 - 1 / (L // 2 - 1))


@pytest.mark.parametrize("overrides, fragment", [
    (["data.seq_len=63"], "even length"),
    (["data.seq_len=1024", "data.vocab_size=300"], "raise data.vocab_size to at least 513"),
    (["data.copy.symbols=400", "data.vocab_size=300"], "at most data.vocab_size - 2 = 298"),
    (["data.copy.train_documents=0"], "data.copy.train_documents"),
])
def test_copy_settings_that_cannot_work_fail_at_load(overrides, fragment):
    from lmtrain.config import ConfigError

    with pytest.raises(ConfigError, match=fragment):
        property_config("data.source=copy", *overrides)


def test_prepared_copy_data_is_word_level_and_reprepare_is_a_no_op(tmp_path):
    from data_pipelines.prepare import is_prepared, prepare
    from data_pipelines.shards import open_tokens, read_meta
    from data_pipelines.tokenizer import load_tokenizer

    cfg = property_config("data.source=copy", "data.seq_len=32", f"data.dir={tmp_path / 'copy'}",
                          "data.copy.train_documents=20", "data.copy.val_documents=4").data
    prepare(cfg, log=lambda s: None)
    meta = read_meta(cfg.dir)
    assert meta["splits"] == {"train": {"tokens": 640, "documents": 20}, "val": {"tokens": 128, "documents": 4}}
    tokens = np.asarray(open_tokens(cfg.dir, "train"))
    tok = load_tokenizer(tmp_path / "copy" / "tokenizer.json")
    text = tok.decode(tokens[:32].tolist(), skip_special_tokens=False)
    assert "<|copy|>" in text and text.split()[0] == text.split()[16]
    assert tok.encode(text).ids == tokens[:32].tolist()
    train = tokens.reshape(20, 32)
    val = np.asarray(open_tokens(cfg.dir, "val")).reshape(4, 32)
    assert not any((v == t).all() for v in val for t in train)  # validation documents are new
    assert is_prepared(cfg)
    logs = []
    prepare(cfg, log=logs.append)
    assert "nothing to do" in logs[-1]


def test_passkey_prompt_has_the_length_and_puts_the_key_at_its_depth():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lmtrain.evaluate.probes import PasskeyTemplate, passkey_prompt

    words = ["There", "is", "pass", "key", "The", "grass", "green.", "?", "12345", "99999", "a", "b", "c"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PasskeyTemplate(intro="There is ", filler="a b c ", line="pass key 12345 ", question="The pass key ? ")
    for depth in (0.0, 0.5, 1.0):
        prompt, answer = passkey_prompt(tok, t, 60, depth, "12345")
        assert len(prompt) + len(answer) == 60 and answer == tok.encode("12345").ids
        at = prompt.index(answer[0], 2)  # where the key line's key sits
        frac = (at - 4) / (60 - 2 - 3 - 4 - 1)
        assert abs(frac - depth) < 0.05
    from lmtrain.evaluate.length import EvalError

    with pytest.raises(EvalError, match="cannot hold the passkey prompt"):
        passkey_prompt(tok, t, 8, 0.5, "12345")


def test_passkey_answer_tokens_are_the_key_lines_tokens():
    """With a byte-level BPE the answer is the key as the key line writes it (space-prefixed),
    so the prompt's key and the scored answer are the same tokens."""
    from data_pipelines.tokenizer import train_tokenizer
    from lmtrain.evaluate.probes import PasskeyTemplate, passkey_prompt

    text = ["The pass key is 48213. Remember it. What is the pass key? The grass is green. 120 77"] * 50
    tok = train_tokenizer(text, 300, show_progress=False)
    t = PasskeyTemplate()
    for key in ("48213", "90517"):
        prompt, answer = passkey_prompt(tok, t, 200, 0.5, key)
        assert tok.decode(answer) == " " + key and tok.decode(prompt).endswith("The pass key is")
        line = tok.encode(t.line.format(key=key)).ids
        assert any(line[i:i + len(answer)] == answer for i in range(len(line))), "answer tokens absent from the line"
        assert tok.decode(prompt + answer).count(key) == 3


def test_pattern_pictures_show_each_layer_and_distinct_head_group(tmp_path):
    from lmtrain.evaluate.patterns import _distinct_heads, write_pattern_png

    model = make_model("model.attention.kind=sparse", "model.attention.block=4", "model.attention.window=8",
                       "model.attention.layer_patterns=[window|strided,window]", "model.attention.stride=4")
    masks = model.pattern_masks(32)
    assert len(masks) == 2 and masks[0].shape == (4, 32, 32) and masks[1].shape == (1, 32, 32)
    assert [label for label, _ in _distinct_heads(masks[0])] == ["heads 0,1", "heads 2,3"]
    i, j = torch.arange(32)[:, None], torch.arange(32)[None, :]
    assert torch.equal(masks[1][0], (j <= i) & (i - j < 8))
    assert write_pattern_png(model, 64, tmp_path / "p.png").stat().st_size > 1000
    assert write_pattern_png(make_model(), 64, tmp_path / "q.png") is None  # softmax: no pattern
