"""The on-disk format of a prepared data directory, and read access to it.

  tokenizer.json        byte-level BPE (tokenizers)
  {split}.bin           all tokens of the split, documents concatenated, each ended by EOT
                        (uint16 when the vocabulary fits, else uint32), memory-mapped
  {split}.idx.npy       int64 document start offsets, plus the total at the end
  meta.json             inputs (source fingerprint, vocabulary, split), outputs (counts,
                        dtype, tokenizer hash, and a size and sampled digest of every file);
                        written last, so its presence means complete

`verify_data_dir` checks a data dir cheaply (about 3 MB read per file, whatever its size)
before training uses it: meta.json parses, every file is there with its size and digest, the
tokenizer is the one the tokens were made with, and the sampled tokens are ids of the
vocabulary. A window is checked again when it is read (`check_window`). Each failure is one
line naming the file, and `--force` (prepare-data) or `--force`-less rebuild advice.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
SPLITS = ("train", "val")


class DataDirError(ValueError):
    """A data.dir that is missing, incomplete, or prepared for other inputs."""


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


REBUILD = "rebuild it with `lmtrain prepare-data CONFIG --force` (or delete data.dir)"


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataDirError(f"data.dir {data_dir} is not prepared (no meta.json); run `lmtrain prepare-data CONFIG`")
    try:
        meta = json.loads(path.read_text())
        ok = isinstance(meta, dict) and all(isinstance(meta["splits"][s]["tokens"], int) for s in SPLITS) \
            and isinstance(meta["vocab_size"], int) and np.dtype(meta["dtype"]).kind == "u"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise DataDirError(f"{path}: damaged ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                           f"{REBUILD}") from None
    if not ok:
        raise DataDirError(f"{path}: damaged (fields missing or of the wrong type); {REBUILD}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataDirError(f"data.dir {data_dir} has format {meta.get('format_version')}, expected "
                           f"{FORMAT_VERSION}; prepare it again with --force")
    return meta


BLOCK = 1 << 16  # 64 KiB sampled per position
SAMPLES = 16


def sample_digest(path: Path) -> dict:
    """Size and a digest of the first and last MiB and of SAMPLES blocks spread over a file:
    cheap for any size, and it changes when a file is truncated, extended or overwritten
    (anywhere the samples fall, and at both ends)."""
    size = path.stat().st_size
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    offsets = {0, max(0, size - (1 << 20))} | {size * i // SAMPLES for i in range(SAMPLES)}
    with open(path, "rb") as f:
        for off in sorted(offsets):
            f.seek(off)
            h.update(f.read(1 << 20 if off in (0, max(0, size - (1 << 20))) else BLOCK))
    return {"size": size, "digest": h.hexdigest()}


DATA_FILES = ("tokenizer.json", *(f"{s}.bin" for s in SPLITS), *(f"{s}.idx.npy" for s in SPLITS))


def write_meta(out: Path, meta: dict, t0: float, log) -> Path:
    """meta.json, written last (atomically) with the digests of every data file (`sample_digest`,
    which `verify_data_dir` checks at every start) and the seconds since t0."""
    meta = {**meta, "checks": {name: sample_digest(out / name) for name in DATA_FILES},
            "seconds": round(time.time() - t0, 1)}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    log(f"data: wrote {out} in {meta['seconds']} s")
    return out


def verify_data_dir(data_dir: str | Path, vocab_size: int) -> dict:
    """The checks of the module docstring; returns meta."""
    d = Path(data_dir)
    meta = read_meta(d)
    for name in ("tokenizer.json", *(f"{s}.bin" for s in SPLITS), *(f"{s}.idx.npy" for s in SPLITS)):
        if not (d / name).is_file():
            raise DataDirError(f"{d / name}: missing; {REBUILD}")
    for name, want in meta.get("checks", {}).items():
        got = sample_digest(d / name)
        if got["size"] != want["size"]:
            raise DataDirError(f"{d / name}: {got['size']:,} bytes, {want['size']:,} when prepared (truncated or "
                               f"replaced); {REBUILD}")
        if got["digest"] != want["digest"]:
            raise DataDirError(f"{d / name}: its contents changed since it was prepared (overwritten); {REBUILD}")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        tokens = meta["splits"][split]["tokens"]
        size = (d / f"{split}.bin").stat().st_size
        if size != max(tokens, 1) * itemsize:
            raise DataDirError(f"{d / f'{split}.bin'}: {size:,} bytes, {max(tokens, 1) * itemsize:,} expected for "
                               f"{tokens:,} tokens (truncated or replaced); {REBUILD}")
        try:
            idx = np.load(d / f"{split}.idx.npy", mmap_mode="r")
            ok = idx.ndim == 1 and len(idx) >= 1 and int(idx[-1]) == tokens
        except (ValueError, OSError, EOFError) as e:
            raise DataDirError(f"{d / f'{split}.idx.npy'}: damaged ({str(e).splitlines()[0][:120]}); "
                               f"{REBUILD}") from None
        if not ok:
            raise DataDirError(f"{d / f'{split}.idx.npy'}: does not index {tokens:,} tokens; {REBUILD}")
        arr = open_tokens(d, split, meta)
        for i in range(SAMPLES + 1):
            start = (len(arr) - 1) * i // SAMPLES
            check_window(arr[start : start + BLOCK // itemsize], vocab_size, d / f"{split}.bin", start)
    tok_hash = hashlib.sha256((d / "tokenizer.json").read_bytes()).hexdigest()
    if tok_hash != meta.get("tokenizer_sha256"):
        raise DataDirError(f"{d / 'tokenizer.json'}: not the tokenizer the tokens were made with (its hash "
                           f"changed); {REBUILD}")
    return meta


def check_window(tokens: np.ndarray, vocab_size: int, path, start: int) -> None:
    """Every id is in the vocabulary (an overwritten shard holds ids beyond it)."""
    if len(tokens) and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise DataDirError(f"{path}: token {start + bad:,} is id {int(tokens[bad]):,}, beyond the vocabulary of "
                           f"{vocab_size:,} (overwritten or prepared for another vocabulary); {REBUILD}")


def open_tokens(data_dir: str | Path, split: str, meta: dict | None = None) -> np.memmap:
    meta = meta or read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    tokens = meta["splits"][split]["tokens"]
    if not tokens:
        return np.zeros(0, dtype=np.dtype(meta["dtype"]))
    try:
        return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(tokens,))
    except (ValueError, OSError) as e:  # shorter than meta.json says, or missing
        raise DataDirError(f"{path}: cannot be read as {tokens:,} tokens ({str(e).splitlines()[0][:120]}); "
                           f"{REBUILD}") from None


def open_doc_index(data_dir: str | Path, split: str) -> np.ndarray:
    return np.load(Path(data_dir) / f"{split}.idx.npy", mmap_mode="r")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_matches(meta: dict, *, vocab_size: int, data_dir) -> None:
    """Training refuses a data dir whose vocabulary does not match the model's."""
    if meta["vocab_size"] != vocab_size:
        raise DataDirError(
            f"data.vocab_size: {vocab_size} does not match data.dir {data_dir} "
            f"(prepared with {meta['vocab_size']}); use another data.dir or prepare it with --force"
        )
