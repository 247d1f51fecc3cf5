"""Corpus sources: each turns `data.source` into documents and a fingerprint.

  stdlib                    the running Python's standard-library sources; a document is a file
  DIR                       a `datasets.save_to_disk` directory (a Dataset, or a DatasetDict:
                            split `data.hf_split`); otherwise the files below it of the known
                            extensions (`data.glob` chooses others), each a document
  PATH | GLOB               local files: text (also .gz/.bz2/.xz/.zst), a document per file; a
                            single text file is cut into documents at paragraph breaks
  *.jsonl / *.json / *.parquet / *.arrow (glob ok; jsonl/json also compressed)
                            rows with a text field, read through `datasets`
  anything else             a Hugging Face dataset name (`data.hf_name` its config,
                            `data.hf_revision`, `data.hf_streaming`); needs the network or its
                            cache, and fails in seconds when neither serves it

Documents come in a deterministic order, each with a stable id (a relative path, a row
number, or a file's piece number), which the train/validation split hashes. The fingerprint
changes whenever the documents may have changed, and is what makes re-running prepare-data a
no-op.

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

TABULAR = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
# The text files a directory source takes without `data.glob`: prose, markup and source code.
TEXT_SUFFIXES = frozenset(
    ".txt .text .md .markdown .rst .tex .org .adoc .html .htm .xml .csv .tsv .log "
    ".py .pyi .c .h .cc .cpp .cxx .hpp .hh .cu .java .kt .scala .go .rs .js .jsx .ts .tsx .rb .php .pl .lua .sh "
    ".bash .zsh .r .jl .m .swift .cs .fs .hs .ml .ex .exs .erl .clj .lisp .el .vim .sql .yaml .yml .toml .ini "
    ".cfg .f90 .asm .s .proto .css .scss".split())
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# A single text file is cut into documents of at least this many characters (`piece_size`: fewer
# for short files), each ending at a paragraph break (a blank line), else at a line end, else
# after 4 x that many characters.
PIECE_CHARS = 8192


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


def split_suffix(path: Path) -> tuple[str, Optional[str]]:
    """(the suffix under any compression, the compression): a.jsonl.gz -> (".jsonl", "gzip")."""
    suffixes = [x.lower() for x in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSED:
        return (suffixes[-2] if len(suffixes) == 2 else ""), COMPRESSED[suffixes[-1]]
    return (suffixes[-1] if suffixes else ""), None


def kind_of(path: Path) -> Optional[str]:
    """json / parquet / arrow (rows), text, or None (an extension a directory source skips)."""
    suffix, compression = split_suffix(path)
    if suffix in TABULAR and not (compression and TABULAR[suffix] in ("parquet", "arrow")):
        return TABULAR[suffix]
    return "text" if suffix in TEXT_SUFFIXES or (compression and not suffix) else None


def read_bytes(path: Path) -> bytes:
    """A file's bytes, decompressed when its name ends in .gz, .bz2, .xz or .zst."""
    compression = split_suffix(path)[1]
    data = path.read_bytes()
    try:
        if compression == "gzip":
            import gzip
            return gzip.decompress(data)
        if compression == "bz2":
            import bz2
            return bz2.decompress(data)
        if compression == "xz":
            import lzma
            return lzma.decompress(data)
        if compression == "zstd":
            try:
                import zstandard
            except ImportError:
                raise SourceError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") \
                    from None
            return zstandard.ZstdDecompressor().stream_reader(data).read()
    except SourceError:
        raise
    except Exception as e:  # OSError, EOFError, lzma.LZMAError, zstd.ZstdError: damaged or truncated
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise SourceError(f"{path}: not a readable {compression} file ({detail}); replace or remove it") from None
    return data


def read_text(path: Path, encoding: str = "utf-8", lenient: bool = False) -> str:
    """A text file's contents, decoded strictly; a binary file or an undecodable byte is a
    SourceError naming the file and the line. `lenient` (the built-in stdlib corpus only,
    whose test suite holds files in other encodings on purpose) replaces what does not decode."""
    data = read_bytes(path)
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


def piece_size(n: int) -> int:
    """The piece size for a single file of `n` characters: PIECE_CHARS, smaller for short files
    (a 32nd of the text, at least 256 characters), so that even a short file splits."""
    return max(256, min(PIECE_CHARS, n // 32))


def pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of at least `size` characters (the last may be shorter), each
    ending at a paragraph break (a blank line) if one comes within 4 x `size`, else at a line
    end, else after 4 x `size` characters. Joined, the pieces are `text`."""
    out, start, n = [], 0, len(text)
    while n - start > size:
        limit = min(n, start + 4 * size)
        cut = text.find("\n\n", start + size, limit)
        if cut >= 0:
            cut += 2
            while cut < n and text[cut] == "\n":  # the whole run of blank lines ends this piece
                cut += 1
        else:
            cut = text.find("\n", start + size, limit)
            cut = cut + 1 if cut >= 0 else limit
        out.append(text[start:cut])
        start = cut
    if start < n:
        out.append(text[start:])
    return out


class FileSource(Source):
    """Text files; one file is one document, in sorted path order. A source of one text file
    (a novel, a dump) is cut into documents by `pieces`, with ids FILE#N."""

    def __init__(self, spec: str, files: list[Path], root: Path, stable_stat: bool = False, encoding: str = "utf-8",
                 lenient: bool = False, skipped: Optional[list[Path]] = None):
        self.spec, self.files, self.root, self.encoding, self.lenient = spec, files, root, encoding, lenient
        self.stable_stat = stable_stat  # stdlib: mtimes differ between installs of the same Python
        self.skipped = skipped or []  # files of a directory with other extensions

    def describe(self) -> str:
        what = self.spec + (" (one text file, cut into documents at paragraph breaks)" if self.single else "")
        if self.skipped:
            exts = sorted({split_suffix(p)[0] or p.name for p in self.skipped})
            what += (f"; {len(self.skipped)} files of other kinds left out ({', '.join(exts[:6])}"
                     f"{', ...' if len(exts) > 6 else ''}; data.glob takes others)")
        return what

    @property
    def single(self) -> bool:
        return len(self.files) == 1

    def _stat(self, p: Path):
        st = p.stat()
        return [str(p.relative_to(self.root)), st.st_size] + ([] if self.stable_stat else [st.st_mtime_ns])

    def fingerprint(self) -> str:
        return _hash({"spec": self.spec, "files": [self._stat(p) for p in self.files],
                      **({} if self.encoding == "utf-8" else {"encoding": self.encoding}),
                      **({"pieces": PIECE_CHARS} if self.single else {})})

    def documents(self, limit=None):
        if self.single:
            p = self.files[0]
            text = read_text(p, self.encoding, self.lenient)
            for k, piece in enumerate(pieces(text, piece_size(len(text)))[:limit]):
                yield Document(id=f"{p.name}#{k}", text=piece)
            return
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
            if self.builder != "arrow":  # arrow: the column is checked once loaded, below
                (check_parquet if self.builder == "parquet" else check_json)(p, self.text_field)
        try:
            ds = datasets.load_dataset(self.builder, data_files=[str(p) for p in self.files], split="train")
        except Exception as e:  # files that pass the checks but do not fit together (other columns per file)
            raise SourceError(f"data.source: {self.spec}: cannot be read as one table "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        return check_text_column(ds, self.spec, self.text_field)

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
    data = read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: line {_line_of(data, e.start)}: not valid UTF-8 ({e.reason}); JSON is "
                          "UTF-8") from None
    if split_suffix(path)[0] == ".json" and text.lstrip().startswith("["):
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


def check_text_column(ds, spec: str, field: str):
    """`ds` (a datasets table) has a string column `field`; else a SourceError naming it."""
    if field not in ds.column_names:
        raise SourceError(f"data.text_field: {spec} has no column {field!r} (columns: {', '.join(ds.column_names)})")
    dtype = getattr(ds.features.get(field), "dtype", None) if ds.features else None
    if dtype is not None and dtype not in ("string", "large_string", "null"):
        raise SourceError(f"data.text_field: column {field!r} of {spec} holds {dtype}, not strings")
    return ds


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `datasets` `save_to_disk` (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                      and (path / "dataset_info.json").is_file())


class DiskSource(TabularSource):
    """A `save_to_disk` directory, loaded with `datasets.load_from_disk`; of a DatasetDict,
    the split `data.hf_split`."""

    def __init__(self, spec: str, path: Path, split: str, text_field: str):
        self.spec, self.path, self.split, self.text_field = spec, path, split, text_field
        self._ds = None

    def dataset(self):
        if self._ds is None:
            import datasets

            try:
                ds = datasets.load_from_disk(str(self.path))
            except Exception as e:  # damaged or from an incompatible datasets release
                raise SourceError(f"data.source: {self.spec}: a datasets save_to_disk directory that cannot be "
                                  f"loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
            if isinstance(ds, datasets.DatasetDict):
                if self.split not in ds:
                    raise SourceError(f"data.hf_split: {self.spec} has no split {self.split!r} (its splits: "
                                      f"{', '.join(ds)})")
                ds = ds[self.split]
            self._ds = check_text_column(ds, self.spec, self.text_field)
        return self._ds

    def describe(self) -> str:
        split = f", split {self.split}" if (self.path / "dataset_dict.json").is_file() else ""
        return f"{self.spec} (datasets save_to_disk{split})"

    def fingerprint(self) -> str:
        return _hash({"spec": self.spec, "split": self.split, "field": self.text_field,
                      "dataset": self.dataset()._fingerprint})


class HubSource(TabularSource):
    """A Hugging Face dataset name, loaded with `datasets.load_dataset(name, config, split=...,
    revision=..., streaming=...)`. Where the Hub cannot be reached only the cache is asked,
    so a dataset that is not there fails in seconds."""

    def __init__(self, spec: str, split: str, text_field: str, name: Optional[str] = None,
                 revision: Optional[str] = None, streaming: bool = False):
        self.spec, self.split, self.text_field = spec, split, text_field
        self.name, self.revision, self.streaming = name, revision, streaming
        self._ds = None

    def describe(self) -> str:
        extra = [f"config {self.name}"] * bool(self.name) + [f"revision {self.revision}"] * bool(self.revision) + \
            ["streamed"] * self.streaming
        return f"{self.spec} (Hugging Face dataset, split {self.split}{''.join(', ' + e for e in extra)})"

    def _load(self):
        import datasets

        from data_pipelines.hub import cache_only, quiet, unreachable

        why = unreachable()
        try:
            with quiet(), cache_only(why is not None):
                return datasets.load_dataset(self.spec, self.name, split=self.split, revision=self.revision,
                                             streaming=self.streaming)
        except Exception as e:  # offline, unknown name, bad split: all the user's to fix
            detail = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
            if why is not None:
                raise SourceError(
                    f"data.source: {self.spec!r} is not a local path, and as a Hugging Face dataset it is not in "
                    f"the cache while the Hub cannot be used ({why}); give a local path or a datasets "
                    "save_to_disk directory, or load it once where the network is (the cache then serves it, "
                    "also with HF_HUB_OFFLINE=1)") from None
            raise SourceError(f"data.source: {self.spec!r} is not a local file, directory or glob, and loading it "
                              f"as a Hugging Face dataset failed ({detail})") from None

    def dataset(self):
        if self.streaming:
            raise TypeError("a streamed dataset has no table; read documents()")
        if self._ds is None:
            self._ds = check_text_column(self._load(), self.spec, self.text_field)
        return self._ds

    def documents(self, limit=None):
        if not self.streaming:
            yield from super().documents(limit)
            return
        for i, row in enumerate(self._load()):
            if limit is not None and i >= limit:
                return
            if self.text_field not in row:
                raise SourceError(f"data.text_field: {self.spec} has no column {self.text_field!r} "
                                  f"(columns: {', '.join(row)})")
            text = row[self.text_field]
            if text is not None and not isinstance(text, str):
                raise SourceError(f"data.text_field: row {i} of {self.spec}: {self.text_field!r} is a "
                                  f"{type(text).__name__}, not a string")
            yield Document(id=str(i), text=text or "")

    def fingerprint(self) -> str:
        key = {"spec": self.spec, "split": self.split, "field": self.text_field, "name": self.name,
               "revision": self.revision}
        if not self.streaming:
            return _hash({**key, "dataset": self.dataset()._fingerprint})
        # Streamed: the commit the revision names now, where the Hub says (else the revision as given).
        from data_pipelines.hub import unreachable

        if unreachable() is None:
            try:
                from huggingface_hub import HfApi

                key["sha"] = HfApi().dataset_info(self.spec, revision=self.revision, timeout=10).sha
            except Exception:  # a private or gated dataset, a Hub hiccup: the name and revision key it
                pass
        return _hash({**key, "streaming": True})


def _directory(spec: str, path: Path, pattern: Optional[str]) -> tuple[list[Path], list[Path]]:
    """(the files a directory source takes, the files it leaves out)."""
    found = sorted(p for p in (path.glob(pattern) if pattern else path.rglob("*"))
                   if p.is_file() and not any(s in SKIP_DIRS for s in p.relative_to(path).parts)
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if pattern:
        if not found:
            raise SourceError(f"data.glob: {pattern!r} matches no files in {spec}")
        return found, []
    if not found:
        raise SourceError(f"data.source: directory {spec} holds no files")
    taken = [p for p in found if kind_of(p) is not None]
    left = [p for p in found if kind_of(p) is None]
    if not taken:
        exts = sorted({split_suffix(p)[0] or p.name for p in left})[:6]
        raise SourceError(f"data.source: directory {spec} holds no text, jsonl, json, parquet or arrow files"
                          + (f" (only {', '.join(exts)}); set data.glob (e.g. '**/*.dat') to take others" if left
                             else ""))
    return taken, left


def resolve_source(spec: str, *, text_field: str = "text", hf_split: str = "train", encoding: str = "utf-8",
                   glob_pattern: Optional[str] = None, hf_name: Optional[str] = None,
                   hf_revision: Optional[str] = None, hf_streaming: bool = False) -> Source:
    if spec == "stdlib":
        return stdlib_source()
    path = Path(spec).expanduser()
    skipped: list[Path] = []
    if path.is_dir() and is_saved_dataset(path):
        return DiskSource(spec, path, hf_split, text_field)
    if path.is_dir():
        matches, skipped = _directory(spec, path, glob_pattern)
        root = path
    else:
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        root = Path(os.path.commonpath([str(p.parent) for p in matches])) if matches else path
    if matches:
        kinds = {kind_of(p) or "text" for p in matches}
        if len(kinds) > 1:
            raise SourceError(f"data.source: {spec} mixes {' and '.join(sorted(kinds))} files; use one kind per "
                              "source" + (" (data.glob chooses)" if path.is_dir() else ""))
        kind = kinds.pop()
        if kind != "text":
            return TabularSource(spec, matches, kind, text_field)
        return FileSource(spec, matches, root, encoding=encoding, skipped=skipped)
    if any(ch in spec for ch in "*?[") or spec.startswith((".", "/", "~")) or path.suffix:
        raise SourceError(f"data.source: no files match {spec}")
    return HubSource(spec, hf_split, text_field, hf_name, hf_revision, hf_streaming)
