"""Corpus sources: each turns `data.source` into documents and a fingerprint.

  stdlib                    the running Python's standard-library sources; a document is a file
  PATH | DIR | GLOB         local text files (a directory means every file below it)
  *.jsonl / *.json / *.parquet (glob ok)   rows with a text field, read through `datasets`
  anything else             a Hugging Face dataset name, used as-is (needs the network or its cache)

Documents come in a deterministic order, each with a stable id (a relative path or a row
number), which the train/validation split hashes. The fingerprint changes whenever the
documents may have changed, and is what makes re-running prepare-data a no-op.
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


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


class FileSource(Source):
    """Text files; one file is one document, in sorted path order."""

    def __init__(self, spec: str, files: list[Path], root: Path, stable_stat: bool = False):
        self.spec, self.files, self.root = spec, files, root
        self.stable_stat = stable_stat  # stdlib: mtimes differ between installs of the same Python

    def _stat(self, p: Path):
        st = p.stat()
        return [str(p.relative_to(self.root)), st.st_size] + ([] if self.stable_stat else [st.st_mtime_ns])

    def fingerprint(self) -> str:
        return _hash({"spec": self.spec, "files": [self._stat(p) for p in self.files]})

    def documents(self, limit=None):
        for p in self.files[:limit]:
            yield Document(id=str(p.relative_to(self.root)), text=_read_text(p))


def stdlib_source() -> FileSource:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    files.sort(key=lambda p: str(p.relative_to(root)))
    spec = f"stdlib (Python {sys.version_info.major}.{sys.version_info.minor}, {root})"
    return FileSource(spec, files, root, stable_stat=True)


class TabularSource(Source):
    """jsonl/json/parquet rows through `datasets`; the id is the global row number."""

    def __init__(self, spec: str, files: list[Path], builder: str, text_field: str):
        self.spec, self.files, self.builder, self.text_field = spec, files, builder, text_field

    def fingerprint(self) -> str:
        stats = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files]
        return _hash({"spec": self.spec, "files": stats, "field": self.text_field})

    def dataset(self):
        import datasets

        ds = datasets.load_dataset(self.builder, data_files=[str(p) for p in self.files], split="train")
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


def resolve_source(spec: str, *, text_field: str = "text", hf_split: str = "train") -> Source:
    if spec == "stdlib":
        return stdlib_source()
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s in SKIP_DIRS for s in p.parts))
        if not files:
            raise SourceError(f"data.source: directory {spec} holds no files")
        return FileSource(spec, files, path)
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if matches:
        kinds = {TABULAR.get(p.suffix.lower()) for p in matches}
        if len(kinds) > 1:
            raise SourceError(f"data.source: {spec} mixes text files with jsonl/parquet; use one kind per source")
        kind = kinds.pop()
        if kind is not None:
            return TabularSource(spec, matches, kind, text_field)
        root = Path(os.path.commonpath([str(p.parent) for p in matches]))
        return FileSource(spec, matches, root)
    if any(ch in spec for ch in "*?[") or spec.startswith((".", "/", "~")) or path.suffix:
        raise SourceError(f"data.source: no files match {spec}")
    return HubSource(spec, hf_split, text_field)
