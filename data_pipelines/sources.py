"""Corpus sources: each turns `data.source` into documents and a fingerprint.

  stdlib                    the running Python's standard-library sources; a document is a file
  PATH | DIR | GLOB         local text files (a directory means every file below it)
  *.jsonl / *.json / *.parquet (glob ok)   rows with a text field, read through `datasets`
  anything else             a Hugging Face dataset name, used as-is (needs the network or its cache)

Documents come in a deterministic order, each with a stable id (a relative path or a row
number), which the train/validation split hashes. The fingerprint changes whenever the
documents may have changed, and is what makes re-running prepare-data a no-op.

Nothing undecodable is accepted silently. Text files are decoded with `data.encoding`
(UTF-8 by default) strictly: a byte sequence that is not valid in it, or a NUL byte (a
binary file), is refused with one line naming the file and the line. jsonl rows must be
JSON objects whose text field is a string (or null: an empty document), and a parquet
column must hold strings; anything else is refused with the file and the row.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

TABULAR = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class SourceError(ValueError):
    """data.source cannot be read; the message names the source and the fix."""


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


@dataclass
class Document:
    id: str
    text: str


class Source:
    spec: str

    def fingerprint(self) -> str:
        raise NotImplementedError

    def documents(self, limit: Optional[int] = None) -> Iterator[Document]:
        raise NotImplementedError

    def describe(self) -> str:
        return self.spec


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def read_text(path: Path, encoding: str = "utf-8", lenient: bool = False) -> str:
    """A text file's contents, decoded strictly; a binary file or an undecodable byte is a
    SourceError naming the file and the line. `lenient` (the built-in stdlib corpus only,
    whose test suite holds files in other encodings on purpose) replaces what does not decode."""
    data = path.read_bytes()
    if lenient:
        return data.decode(encoding, errors="replace")
    nul = data.find(b"\0")
    if nul >= 0 and "16" not in encoding and "32" not in encoding:
        raise SourceError(f"{path}: a binary file (a NUL byte on line {_line_of(data, nul)}), not text; remove it "
                          "from data.source")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: line {_line_of(data, e.start)}: not valid {encoding} ({e.reason} at byte "
                          f"{e.start}); set data.encoding (e.g. latin-1) to the files' encoding, or remove the "
                          "file") from None


class FileSource(Source):
    """Text files; one file is one document, in sorted path order."""

    def __init__(self, spec: str, files: list[Path], root: Path, stable_stat: bool = False, encoding: str = "utf-8",
                 lenient: bool = False):
        self.spec, self.files, self.root, self.encoding, self.lenient = spec, files, root, encoding, lenient
        self.stable_stat = stable_stat  # stdlib: mtimes differ between installs of the same Python

    def _stat(self, p: Path):
        st = p.stat()
        return [str(p.relative_to(self.root)), st.st_size] + ([] if self.stable_stat else [st.st_mtime_ns])

    def fingerprint(self) -> str:
        return _hash({"spec": self.spec, "files": [self._stat(p) for p in self.files],
                      **({} if self.encoding == "utf-8" else {"encoding": self.encoding})})

    def documents(self, limit=None):
        for p in self.files[:limit]:
            yield Document(id=str(p.relative_to(self.root)), text=read_text(p, self.encoding, self.lenient))


def stdlib_source() -> FileSource:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    files.sort(key=lambda p: str(p.relative_to(root)))
    spec = f"stdlib (Python {sys.version_info.major}.{sys.version_info.minor}, {root})"
    return FileSource(spec, files, root, stable_stat=True, lenient=True)


class TabularSource(Source):
    """jsonl/json/parquet rows through `datasets`; the id is the global row number."""

    def __init__(self, spec: str, files: list[Path], builder: str, text_field: str):
        self.spec, self.files, self.builder, self.text_field = spec, files, builder, text_field

    def fingerprint(self) -> str:
        stats = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files]
        return _hash({"spec": self.spec, "files": stats, "field": self.text_field})

    def dataset(self):
        import datasets

        for p in self.files:
            (check_parquet if self.builder == "parquet" else check_json)(p, self.text_field)
        try:
            ds = datasets.load_dataset(self.builder, data_files=[str(p) for p in self.files], split="train")
        except Exception as e:  # files that pass the checks but do not fit together (other columns per file)
            raise SourceError(f"data.source: {self.spec}: cannot be read as one table "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        if self.text_field not in ds.column_names:
            raise SourceError(
                f"data.text_field: {self.spec} has no column {self.text_field!r} "
                f"(columns: {', '.join(ds.column_names)})"
            )
        return ds

    def documents(self, limit=None):
        ds = self.dataset()
        n = len(ds) if limit is None else min(limit, len(ds))
        for i, row in enumerate(ds.select_columns([self.text_field]).select(range(n))):
            yield Document(id=str(i), text=row[self.text_field] or "")


def _check_row(row, where: str, field: str) -> None:
    if not isinstance(row, dict):
        raise SourceError(f"{where}: a JSON {type(row).__name__}, not an object with a {field!r} field")
    if field not in row:
        raise SourceError(f"{where}: no {field!r} field (data.text_field; this row has {', '.join(map(str, row))})")
    value = row[field]
    if value is not None and not isinstance(value, str):
        raise SourceError(f"{where}: data.text_field {field!r} is a {type(value).__name__}, not a string")


def check_json(path: Path, field: str) -> None:
    """Every row of a jsonl file (or the list of a .json file) is an object whose text field is
    a string; else a SourceError naming the file and the line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: line {_line_of(data, e.start)}: not valid UTF-8 ({e.reason}); JSON is "
                          "UTF-8") from None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}: line {e.lineno}: not JSON ({e.msg})") from None
        for i, row in enumerate(rows):
            _check_row(row, f"{path}: item {i}", field)
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}: line {n}: not JSON ({e.msg}); jsonl holds one JSON object per line") from None
        _check_row(row, f"{path}: line {n}", field)


def check_parquet(path: Path, field: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # not parquet, or damaged
        raise SourceError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:200]})") from None
    if field not in schema.names:
        raise SourceError(f"data.text_field: {path} has no column {field!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise SourceError(f"{path}: column {field!r} (data.text_field) holds {kind}, not strings")


class HubSource(TabularSource):
    """A Hugging Face dataset name, loaded with `datasets.load_dataset(name, split=...)`."""

    def __init__(self, spec: str, split: str, text_field: str):
        self.spec, self.split, self.text_field = spec, split, text_field
        self._ds = None

    def dataset(self):
        if self._ds is None:
            import datasets

            try:
                ds = datasets.load_dataset(self.spec, split=self.split)
            except Exception as e:  # offline, unknown name, bad split: all the user's to fix
                raise SourceError(
                    f"data.source: {self.spec!r} is not a local file, directory or glob, and loading it "
                    f"as a Hugging Face dataset failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                ) from None
            if self.text_field not in ds.column_names:
                raise SourceError(f"data.text_field: {self.spec} has no column {self.text_field!r}")
            self._ds = ds
        return self._ds

    def fingerprint(self) -> str:
        return _hash({"spec": self.spec, "split": self.split, "field": self.text_field,
                      "dataset": self.dataset()._fingerprint})


def resolve_source(spec: str, *, text_field: str = "text", hf_split: str = "train",
                   encoding: str = "utf-8") -> Source:
    if spec == "stdlib":
        return stdlib_source()
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s in SKIP_DIRS for s in p.parts))
        if not files:
            raise SourceError(f"data.source: directory {spec} holds no files")
        return FileSource(spec, files, path, encoding=encoding)
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if matches:
        kinds = {TABULAR.get(p.suffix.lower()) for p in matches}
        if len(kinds) > 1:
            raise SourceError(f"data.source: {spec} mixes text files with jsonl/parquet; use one kind per source")
        kind = kinds.pop()
        if kind is not None:
            return TabularSource(spec, matches, kind, text_field)
        root = Path(os.path.commonpath([str(p.parent) for p in matches]))
        return FileSource(spec, matches, root, encoding=encoding)
    if any(ch in spec for ch in "*?[") or spec.startswith((".", "/", "~")) or path.suffix:
        raise SourceError(f"data.source: no files match {spec}")
    return HubSource(spec, hf_split, text_field)
