"""Data pipelines: sources, tokenizer, packed shards, split, sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.prepare import prepare, split_ids
from data_pipelines.shards import DataDirError, open_doc_index, open_tokens, read_meta
from data_pipelines.sources import SourceError, resolve_source, stdlib_source
from data_pipelines.tokenizer import EOT, load_tokenizer, train_tokenizer
from lmtrain.config import load_config
from lmtrain.train.data import GlobalSampler, WindowDataset, val_windows
from tests.helpers import CONFIGS


def _cfg(*overrides):
    return load_config(CONFIGS / "debug.yaml", list(overrides))


def _data_dir(overrides):
    return Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("data.dir=")))


# ---- sources ----------------------------------------------------------------------------------


def test_stdlib_source_is_deterministic():
    a, b = stdlib_source(), stdlib_source()
    ids = [d.id for d in a.documents(limit=50)]
    assert ids == [d.id for d in b.documents(limit=50)] == sorted(ids)
    assert a.fingerprint() == b.fingerprint()
    assert all(i.endswith(".py") and "site-packages" not in i for i in ids)


def test_text_glob_and_jsonl_sources(tmp_path):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"hello {i}\n")
    src = resolve_source(str(tmp_path / "*.txt"))
    assert [d.text for d in src.documents()] == ["hello 0\n", "hello 1\n", "hello 2\n"]
    fp = src.fingerprint()
    (tmp_path / "doc1.txt").write_text("changed\n")
    assert resolve_source(str(tmp_path / "*.txt")).fingerprint() != fp

    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"body": f"row {i}", "n": i}) for i in range(4)))
    src = resolve_source(str(rows), text_field="body")
    assert [d.text for d in src.documents()] == [f"row {i}" for i in range(4)]
    with pytest.raises(SourceError, match="data.text_field"):
        list(resolve_source(str(rows), text_field="text").documents())


def test_missing_local_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="no files match"):
        resolve_source(str(tmp_path / "*.txt"))


# ---- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_round_trip():
    texts = ["def f(x):\n    return x * 2\n", "naïve café — ünïcödé ✓ 漢字 🙂\ttabs  and  spaces\n"] * 20
    tok = train_tokenizer(texts, 300, show_progress=False)
    assert tok.token_to_id(EOT) == 0
    for t in texts[:2] + ["completely unseen: ∮ E⋅da = Q / ε0 \r\n"]:
        assert tok.decode(tok.encode(t).ids) == t


# ---- prepared shards --------------------------------------------------------------------------


def test_shards_hold_exactly_the_encoded_documents(tiny_data):
    data_dir = _data_dir(tiny_data)
    meta = read_meta(data_dir)
    tok = load_tokenizer(data_dir / "tokenizer.json")
    cfg = _cfg(*tiny_data)
    docs = list(stdlib_source().documents(cfg.data.max_documents))
    flags = split_ids([d.id for d in docs], cfg.data.val_fraction)
    for split, want_val in (("train", False), ("val", True)):
        expected = [tok.encode(d.text).ids + [meta["eot_id"]] for d, f in zip(docs, flags) if f == want_val]
        tokens = open_tokens(data_dir, split)
        index = open_doc_index(data_dir, split)
        assert meta["splits"][split]["tokens"] == len(tokens) == sum(map(len, expected))
        assert meta["splits"][split]["documents"] == len(expected) == len(index) - 1
        assert tokens.dtype == np.uint16
        np.testing.assert_array_equal(np.asarray(tokens), np.concatenate(expected))
        # The index marks where each document starts.
        for j in (0, len(expected) - 1):
            np.testing.assert_array_equal(tokens[index[j] : index[j + 1]], expected[j])
    assert meta["splits"]["val"]["documents"] >= 1


def test_token_dtype_fits_the_vocabulary():
    from data_pipelines.shards import token_dtype

    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32 and token_dtype(200_000) == np.uint32


def test_split_is_deterministic_and_by_document():
    ids = [f"pkg/mod{i}.py" for i in range(2000)]
    flags = split_ids(ids, 0.1)
    assert flags == split_ids(ids, 0.1)
    # Independent of order: a document keeps its side when others are added or reordered.
    reordered = dict(zip(ids[::-1], split_ids(ids[::-1], 0.1)))
    assert all(reordered[i] == f for i, f in zip(ids, flags))
    assert 0.07 < sum(flags) / len(flags) < 0.13
    assert split_ids(["a", "b"], 0.01).count(True) == 1  # each split gets a document


def test_prepare_twice_does_no_work(tiny_data):
    data_dir = _data_dir(tiny_data)
    before = {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()}
    messages = []
    prepare(_cfg(*tiny_data).data, log=messages.append)
    assert any("up to date" in m for m in messages)
    assert {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()} == before


def test_data_dir_for_other_inputs_is_refused(tiny_data):
    other_vocab = [o for o in tiny_data if not o.startswith("data.vocab_size")] + ["data.vocab_size=600"]
    with pytest.raises(DataDirError, match="data.dir .* vocab_size=512"):
        prepare(_cfg(*other_vocab).data, log=lambda s: None)
    from lmtrain.train.data import TokenDataModule

    with pytest.raises(DataDirError, match="data.vocab_size: 600 does not match"):
        TokenDataModule(_cfg(*other_vocab))


def test_prepare_on_text_files_and_force(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(12):
        (src / f"f{i:02d}.txt").write_text(f"document number {i}\n" * (20 + i))
    overrides = [f"data.source={src}", f"data.dir={tmp_path / 'd'}", "data.vocab_size=300", "data.val_fraction=0.2",
                 "data.max_documents=null"]
    prepare(_cfg(*overrides).data, log=lambda s: None)
    meta = read_meta(tmp_path / "d")
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 12
    (src / "f00.txt").write_text("new text\n")
    with pytest.raises(DataDirError, match="fingerprint"):
        prepare(_cfg(*overrides).data, log=lambda s: None)
    prepare(_cfg(*overrides).data, force=True, log=lambda s: None)
    assert read_meta(tmp_path / "d")["inputs"]["fingerprint"] != meta["inputs"]["fingerprint"]


# ---- windows and sampler ---------------------------------------------------------------------------


def test_windows_are_shifted_targets(tiny_data):
    data_dir = _data_dir(tiny_data)
    ds = WindowDataset(data_dir, "train", 64)
    tokens = open_tokens(data_dir, "train")
    w = ds.n_windows - 1
    np.testing.assert_array_equal(ds[w].numpy(), tokens[w * 64 : w * 64 + 65])
    assert ds.n_windows == (len(tokens) - 1) // 64


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_is_deterministic_and_covers_each_epoch():
    a = _take(GlobalSampler(50, seed=1, micro_batch=5), 100)
    assert a == _take(GlobalSampler(50, seed=1, micro_batch=5), 100)
    assert sorted(a[:50]) == list(range(50)) and sorted(a[50:]) == list(range(50))
    assert a[:50] != a[50:]  # a new permutation each epoch
    assert a != _take(GlobalSampler(50, seed=2, micro_batch=5), 100)


def test_sampler_resumes_from_the_sample_count():
    full = _take(GlobalSampler(37, seed=3, micro_batch=4), 120)
    resumed = _take(GlobalSampler(37, seed=3, micro_batch=4, start_sample=48), 72)
    assert resumed == full[48:]


@pytest.mark.parametrize("world", [2, 4])
def test_world_size_keeps_the_global_order(world):
    """Each global micro-batch holds the same windows, in order, for any world size."""
    single = _take(GlobalSampler(101, seed=5, micro_batch=8), 8 * 30)
    per_rank = [_take(GlobalSampler(101, seed=5, micro_batch=8 // world, rank=r, world_size=world), 8 // world * 30)
                for r in range(world)]
    b = 8 // world
    merged = [x for t in range(30) for r in range(world) for x in per_rank[r][t * b : (t + 1) * b]]
    assert merged == single
    # ... also when resuming after a change of world size.
    resumed = _take(GlobalSampler(101, seed=5, micro_batch=b, rank=0, world_size=world, start_sample=80), b)
    assert resumed == single[80 : 80 + b]


def test_val_windows_spread_over_the_split():
    w = val_windows(1000, 10)
    assert w[0] == 0 and w[-1] == 999 and len(set(w)) == 10
    assert val_windows(3, 10) == [0, 1, 2]


def test_is_prepared_follows_the_inputs(tiny_data):
    from data_pipelines.prepare import is_prepared

    assert is_prepared(_cfg(*tiny_data).data)
    assert not is_prepared(_cfg(*tiny_data, "data.val_fraction=0.5").data)
    assert not is_prepared(_cfg(*tiny_data[:-1], "data.dir=/nonexistent/dir").data)


def test_sampler_refuses_a_misaligned_resume_at_once():
    with pytest.raises(ValueError, match="not a multiple of the global micro-batch 8"):
        GlobalSampler(50, seed=0, micro_batch=4, world_size=2, start_sample=12)


def test_too_short_validation_split_is_a_data_error(tiny_data):
    from lmtrain.train.data import TokenDataModule

    with pytest.raises(DataDirError, match="data.seq_len"):
        TokenDataModule(_cfg(*tiny_data, "data.seq_len=100000"))


def test_the_end_of_run_prompt_comes_from_the_corpus(tiny_cfg, tmp_path):
    """`lmtrain generate ... --prompt` in the end-of-run hint opens like the run's own text (a
    corpus of novels is not offered `def `); whole words, at most 24 characters."""
    from lmtrain.train.run import format_summary, sample_prompt

    cfg = tiny_cfg()
    first_val = decoded_val_start(cfg)
    prompt = sample_prompt(cfg)
    assert prompt and len(prompt) <= 25 and first_val.lstrip().startswith(prompt.strip())
    novel = tmp_path / "novel.txt"
    novel.write_text("It was the best of times, it was the worst of times.\n\n" * 400)
    from data_pipelines.prepare import prepare
    from lmtrain.config import load_config
    from tests.helpers import DEBUG

    ncfg = load_config(DEBUG, [f"data.source={novel}", f"data.dir={tmp_path / 'd'}", "data.vocab_size=300",
                               "data.num_workers=0"])
    prepare(ncfg.data, log=lambda s: None)
    assert sample_prompt(ncfg) == "It was the best of times, "[:24].rsplit(" ", 1)[0] + " "
    text = format_summary({"step": 1, "val_loss": 1.0, "val_ppl": 2.7, "unigram_val_ppl": 9.0, "val_tokens_scored": 1,
                           "last_checkpoint": "runs/x/checkpoints/last.ckpt", "tensorboard": None,
                           "sample_prompt": "It was the best "})
    assert "--prompt 'It was the best '" in text and "TensorBoard" not in text


def decoded_val_start(cfg) -> str:
    from data_pipelines.shards import open_tokens

    tok = load_tokenizer(Path(cfg.data.dir) / "tokenizer.json")
    return tok.decode([int(i) for i in open_tokens(cfg.data.dir, "val")[:64]])


# -- length curriculum ----------------------------------------------------------------------------
def _phases(schedule: str, batch: int = 4, longest: int = 64, mode: str = "tokens"):
    from types import SimpleNamespace

    from lmtrain.config import length_phases

    return length_phases(SimpleNamespace(length_schedule=schedule, seq_len=longest, batch_size=batch,
                                         length_batch=mode))


def test_length_phases_keep_tokens_per_step():
    phases = _phases("16@0,32@3,64@7")
    assert [(p.start_step, p.seq_len, p.batch_size) for p in phases] == [(0, 16, 16), (3, 32, 8), (7, 64, 4)]
    assert {p.seq_len * p.batch_size for p in phases} == {256}
    assert [p.batch_size for p in _phases("16@0,64@7", mode="samples")] == [4, 4]


@pytest.mark.parametrize("world, acc", [(1, 1), (2, 1), (1, 2)])
def test_phased_batches_follow_the_schedule_and_resume_anywhere(world, acc):
    from lmtrain.train.data import PhasedBatches

    phases = _phases("16@0,32@3,64@7")
    windows = {16: 40, 32: 20, 64: 10}

    def stream(rank, start, n):
        it = iter(PhasedBatches(phases, windows, seed=1, accumulate=acc, rank=rank, world_size=world,
                                start_sample=start))
        return [next(it) for _ in range(n)]

    micro = 10 * acc  # micro-steps of 10 optimizer steps
    full = stream(0, 0, micro)
    lengths = [b[0][0] for b in full]
    assert lengths == [16] * 3 * acc + [32] * 4 * acc + [64] * 3 * acc
    assert [len(b) for b in full] == [16] * 3 * acc + [8] * 4 * acc + [4] * 3 * acc  # per rank
    assert all(len({key[0] for key in b}) == 1 and all(0 <= key[1] < windows[key[0]] for key in b) for b in full)
    # Resuming at any micro-step boundary, from the samples consumed, continues the same stream.
    consumed = 0
    for t in range(micro):
        assert stream(0, consumed, micro - t) == full[t:], t
        consumed += len(full[t]) * world
