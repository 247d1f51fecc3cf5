"""Data sources a user points `data.source` at: datasets' save_to_disk directories, compressed
files, lone arrow files, directories holding other kinds of files, a single text file, and
Hub names where the Hub cannot be reached."""

from __future__ import annotations

import gzip
import json
import sysconfig
import time
from pathlib import Path

import pytest

from data_pipelines.sources import PIECE_CHARS, SourceError, pieces, resolve_source
from lmtrain.config import ConfigError, load_config
from tests.helpers import DEBUG


def texts(src) -> list[str]:
    return [d.text for d in src.documents()]


def novel(n_chars: int) -> str:
    """Prose-like text with paragraphs: the standard library's sources, repeated to n_chars."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    body = "".join((stdlib / f).read_text(encoding="utf-8") for f in ("os.py", "argparse.py", "typing.py"))
    return (body * (n_chars // len(body) + 1))[:n_chars]


def test_pieces_end_at_paragraph_breaks_and_join_to_the_text():
    text = novel(200_000)
    parts = pieces(text, 2048)
    assert "".join(parts) == text and len(parts) > 20
    for p in parts[:-1]:
        assert len(p) >= 2048 and (p.endswith("\n\n") or p.endswith("\n")), repr(p[-20:])
    assert sum(p.endswith("\n\n") for p in parts) > len(parts) // 2  # mostly at blank lines
    blob = "x" * 50_000  # no line ends at all: fixed pieces of 4 x size
    assert [len(p) for p in pieces(blob, 1000)][:3] == [4000, 4000, 4000]


def test_a_single_novel_sized_file_is_a_corpus(tmp_path):
    """nanoGPT's Shakespeare case: one 1.1 MB file prepares into train and validation pieces."""
    from data_pipelines.prepare import prepare
    from data_pipelines.shards import read_meta

    text = novel(1_100_000)
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    src = resolve_source(str(tmp_path / "input.txt"))
    docs = list(src.documents())
    assert "".join(d.text for d in docs) == text and len(docs) >= 1_100_000 // (4 * PIECE_CHARS)
    assert docs[3].id == "input.txt#3" and "one text file" in src.describe()
    short = tmp_path / "short.txt"
    short.write_text("A short poem.\n\nIt has two stanzas,\nand a third line.\n" * 40)
    assert len(list(resolve_source(str(short)).documents())) >= 2  # short files split too
    cfg = load_config(DEBUG, [f"data.source={tmp_path / 'input.txt'}", f"data.dir={tmp_path / 'd'}",
                              "data.vocab_size=300", "data.num_workers=0", "data.max_documents=null"])
    prepare(cfg.data, log=lambda s: None)
    splits = read_meta(tmp_path / "d")["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(docs) and splits["val"]["documents"] >= 1


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    from data_pipelines.prepare import prepare
    from data_pipelines.shards import read_meta

    rows = [f"document {i}: " + "word " * (i % 7 + 3) for i in range(40)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": rows, "n": list(range(40))}),
                          "test": datasets.Dataset.from_dict({"text": ["held out"], "n": [0]})}).save_to_disk(
        str(tmp_path / "dd"))
    datasets.Dataset.from_dict({"body": rows[:5]}).save_to_disk(str(tmp_path / "ds"))
    assert texts(resolve_source(str(tmp_path / "dd"))) == rows
    assert texts(resolve_source(str(tmp_path / "dd"), hf_split="test")) == ["held out"]
    assert texts(resolve_source(str(tmp_path / "ds"), text_field="body")) == rows[:5]
    with pytest.raises(SourceError, match=r"data.hf_split: .* has no split 'validation' \(its splits: train, test\)"):
        texts(resolve_source(str(tmp_path / "dd"), hf_split="validation"))
    with pytest.raises(SourceError, match=r"data.text_field: .* has no column 'text' \(columns: body\)"):
        texts(resolve_source(str(tmp_path / "ds")))
    with pytest.raises(SourceError, match=r"column 'n' of .* holds int64, not strings"):
        texts(resolve_source(str(tmp_path / "dd"), text_field="n"))
    # Through prepare-data: the rows, not dataset_info.json and Arrow bytes.
    cfg = load_config(DEBUG, [f"data.source={tmp_path / 'dd'}", f"data.dir={tmp_path / 'd'}", "data.vocab_size=300",
                              "data.num_workers=0"])
    prepare(cfg.data, log=lambda s: None)
    meta = read_meta(tmp_path / "d")
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 40
    assert "save_to_disk" in meta["source_description"]


def test_compressed_and_arrow_files(tmp_path):
    import datasets
    import zstandard

    rows = [{"text": f"row {i}"} for i in range(6)]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps(r) + "\n" for r in rows).encode()))
    with gzip.open(tmp_path / "c.txt.gz", "wt") as f:
        f.write("plain text, gzipped\n")
    want = [r["text"] for r in rows]
    assert texts(resolve_source(str(tmp_path / "a.jsonl.gz"))) == want
    assert texts(resolve_source(str(tmp_path / "b.jsonl.zst"))) == want
    assert texts(resolve_source(str(tmp_path / "c.txt.gz"))) == ["plain text, gzipped\n"]
    datasets.Dataset.from_dict({"text": want}).save_to_disk(str(tmp_path / "saved"))
    arrow = sorted((tmp_path / "saved").glob("*.arrow"))
    assert texts(resolve_source(str(arrow[0]))) == want  # a lone .arrow file
    with gzip.open(tmp_path / "bad.jsonl.gz", "wt") as f:
        f.write('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(SourceError, match=r"bad.jsonl.gz: line 2: data.text_field 'text' is a int"):
        texts(resolve_source(str(tmp_path / "bad.jsonl.gz")))
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(b"x" * 1000)[:20])
    with pytest.raises(SourceError, match=r"cut.txt.gz: not a readable gzip file"):
        texts(resolve_source(str(tmp_path / "cut.txt.gz")))


def test_a_directory_takes_known_kinds_and_refuses_binary_text(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha")
    (d / "sub" / "b.md").write_text("beta")
    (d / "sub" / "c.py.gz").write_bytes(gzip.compress(b"gamma"))
    (d / "model.bin").write_bytes(bytes(range(256)))  # another kind of file: left out, and said so
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main")
    src = resolve_source(str(d))
    assert [x.id for x in src.documents()] == ["a.txt", "sub/b.md", "sub/c.py.gz"]
    assert "1 files of other kinds left out (.bin" in src.describe()
    assert [x.id for x in resolve_source(str(d), glob_pattern="sub/*").documents()] == ["sub/b.md", "sub/c.py.gz"]
    with pytest.raises(SourceError, match=r"model.bin: a binary file \(a NUL byte on line 1\)"):
        texts(resolve_source(str(d), glob_pattern="*.bin"))  # taken on purpose: still refused
    (d / "notes.txt").write_bytes(b"text\0and bytes")
    with pytest.raises(SourceError, match=r"notes.txt: a binary file"):
        texts(resolve_source(str(d)))
    with pytest.raises(SourceError, match=r"data.glob: '\*\*/\*.csv' matches no files"):
        resolve_source(str(d), glob_pattern="**/*.csv")
    (d / "rows.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(SourceError, match=r"mixes json and text files; use one kind per source \(data.glob chooses\)"):
        resolve_source(str(d))


def test_a_hub_name_fails_in_seconds_where_the_hub_cannot_be_reached(monkeypatch):
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    for streaming in (False, True):
        t0 = time.monotonic()
        with pytest.raises(SourceError, match=r"^data.source: 'no-such-org/no-such-set' is not a local path, and as a "
                                              r"Hugging Face dataset it is not in the cache .*HF_HUB_OFFLINE=1"):
            texts(resolve_source("no-such-org/no-such-set", hf_streaming=streaming))
        assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("overrides, message", [
    (["data.glob='*.txt'"], "data.glob: chooses files of a directory data.source, and stdlib is not a directory"),
    (["data.hf_name=wikitext-2-raw-v1"],
     "data.hf_name: applies to a Hugging Face dataset name, and data.source=stdlib"),
    (["data.hf_streaming=true"], "data.hf_streaming: applies to a Hugging Face dataset name"),
])
def test_source_options_that_do_not_apply_fail_at_load(overrides, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        load_config(DEBUG, overrides)
