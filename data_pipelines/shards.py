"""The on-disk format of a prepared data directory, and read access to it.

  tokenizer.json        byte-level BPE (tokenizers)
  {split}.bin           all tokens of the split, documents concatenated, each ended by EOT
                        (uint16 when the vocabulary fits, else uint32), memory-mapped
  {split}.idx.npy       int64 document start offsets, plus the total at the end
  meta.json             inputs (source fingerprint, vocabulary, split), outputs (counts,
                        dtype, tokenizer hash); written last, so its presence means complete
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
SPLITS = ("train", "val")


class DataDirError(ValueError):
    """A data.dir that is missing, incomplete, or prepared for other inputs."""


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataDirError(f"data.dir {data_dir} is not prepared (no meta.json); run `lmtrain prepare-data CONFIG`")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataDirError(f"data.dir {data_dir} has format {meta.get('format_version')}, expected "
                           f"{FORMAT_VERSION}; prepare it again with --force")
    return meta


def open_tokens(data_dir: str | Path, split: str) -> np.memmap:
    meta = read_meta(data_dir)
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r",
                     shape=(meta["splits"][split]["tokens"],))


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
