"""prepare-data: documents -> split -> BPE tokenizer -> packed memory-mapped token files.

Run as `lmtrain prepare-data CONFIG [key=value ...]` or `python -m data_pipelines.prepare ...`.
Re-running on unchanged inputs does nothing; a data.dir prepared for other inputs is an
error unless --force is given (it is never silently mixed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from data_pipelines import probes
from data_pipelines.shards import (
    FORMAT_VERSION,
    SPLITS,
    DataDirError,
    atomic_write_text,
    read_meta,
    token_dtype,
    verify_data_dir,
    write_meta,
)
from data_pipelines.sources import FileSource, SourceError, resolve_source
from data_pipelines.tokenizer import (
    EOT,
    TokenizerError,
    eos_token_of,
    eot_id,
    file_sha256,
    id_count,
    load_tokenizer,
    resolve_pretrained,
    train_tokenizer,
)

SPLIT_SALT = "lmtrain-split-v1"


def is_val(doc_id: str, val_fraction: float) -> bool:
    """Deterministic split by document: a hash of its id, independent of order and seed."""
    return _unit_hash(doc_id) < val_fraction


def _unit_hash(doc_id: str) -> float:
    h = hashlib.sha1(f"{SPLIT_SALT}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_ids(ids: list[str], val_fraction: float) -> list[bool]:
    """Per document, True for validation. Each split gets at least one document."""
    flags = [is_val(i, val_fraction) for i in ids]
    if len(ids) >= 2 and not any(flags):
        flags[min(range(len(ids)), key=lambda j: _unit_hash(ids[j]))] = True
    if len(ids) >= 2 and all(flags):
        flags[max(range(len(ids)), key=lambda j: _unit_hash(ids[j]))] = False
    return flags


_TOKENIZERS: dict = {}


def _file_documents(source, limit, fingerprint):
    for doc in source.documents(limit):
        yield {"id": doc.id, "text": doc.text}


# BPE training is quadratic in the length of a pre-token (a run of letters, digits or
# punctuation): a 2 MB run takes about 20 minutes. Runs longer than this are cut into pieces
# for training the tokenizer only (encoding is linear and sees the text as it is). No word of
# any language, and no real identifier, is this long.
MAX_RUN = 256
_LONG_RUN = re.compile(r"\S{%d,}" % (MAX_RUN + 1))


def tokenizer_text(text: str) -> str:
    """The text the tokenizer trainer sees: long runs of non-space characters cut into pieces."""
    return _LONG_RUN.sub(lambda m: " ".join(m.group()[i : i + MAX_RUN] for i in range(0, len(m.group()), MAX_RUN)),
                         text)


def _encode_batch(batch, tokenizer_path: str, eos_token: str):
    tok = _TOKENIZERS.get(tokenizer_path)
    if tok is None:
        tok = _TOKENIZERS[tokenizer_path] = load_tokenizer(tokenizer_path)
    eot = eot_id(tok, eos_token)
    # No template tokens (a pretrained tokenizer's <s> per call): a document is its text, then EOT.
    ids = [e.ids + [eot] for e in tok.encode_batch(batch["text"], add_special_tokens=False)]
    return {"ids": ids}


def _pretrained(data_cfg):
    try:
        return resolve_pretrained(data_cfg.tokenizer)
    except TokenizerError as e:
        raise DataDirError(str(e)) from None


def _inputs(data_cfg, source) -> dict:
    inputs = {
        "source": data_cfg.source,
        "fingerprint": source.fingerprint(),
        "vocab_size": data_cfg.vocab_size,
        "val_fraction": data_cfg.val_fraction,
        "max_documents": data_cfg.max_documents,
        "text_field": data_cfg.text_field,
    }
    # Only where they differ from a new BPE's, so data dirs prepared before these keys stay valid.
    if data_cfg.tokenizer is not None:
        inputs["tokenizer_sha256"] = _pretrained(data_cfg).sha256
    if eos_token_of(data_cfg) != EOT:
        inputs["eos_token"] = eos_token_of(data_cfg)
    return inputs


def _changed(data_cfg, inputs: dict, force: bool = False) -> tuple[dict | None, list[str]]:
    """The data dir's meta (None if not prepared) and the input keys that differ from it. A
    damaged meta.json is an error, unless `force` rebuilds the dir."""
    meta_path = Path(data_cfg.dir) / "meta.json"
    if not meta_path.is_file():
        return None, []
    try:
        old = read_meta(data_cfg.dir)
    except DataDirError:
        if force:
            return {}, ["meta.json"]
        raise
    changed = [k for k in inputs if old.get("inputs", {}).get(k) != inputs[k]]
    if old.get("format_version") != FORMAT_VERSION:
        changed.append("format_version")
    return old, changed


def source_of(data_cfg):
    return resolve_source(data_cfg.source, text_field=data_cfg.text_field, hf_split=data_cfg.hf_split,
                          glob_pattern=data_cfg.glob, hf_name=data_cfg.hf_name, hf_revision=data_cfg.hf_revision,
                          hf_streaming=data_cfg.hf_streaming,
                          encoding=data_cfg.encoding)


def inputs_of(data_cfg) -> dict:
    """What data.dir is prepared from (meta.json's `inputs`): a change means prepare again."""
    if data_cfg.source == probes.COPY:
        return probes.copy_inputs(data_cfg)
    return _inputs(data_cfg, source_of(data_cfg))


def is_prepared(data_cfg) -> bool:
    """True when data.dir is complete and was prepared from exactly these inputs."""
    try:
        old, changed = _changed(data_cfg, inputs_of(data_cfg))
    except DataDirError:  # damaged: not prepared (rank 0 reports it)
        return False
    return old is not None and not changed


def _source_error(e: BaseException):
    """The SourceError or DataDirError behind an exception (datasets wraps what its generator
    raises), else None."""
    while e is not None:
        if isinstance(e, (SourceError, DataDirError)):
            return e
        e = e.__cause__ or e.__context__
    return None


def _read(source, data_cfg, inputs: dict, cache_dir: Path, log):
    """The documents as a datasets.Dataset, and its train/validation split."""
    import datasets

    log(f"data: reading {source.describe()}")
    if isinstance(source, FileSource) or getattr(source, "streaming", False):
        # Streamed to Arrow on disk, so a corpus larger than memory is fine. The fingerprint
        # in gen_kwargs keys datasets' cache, so changed files are never served stale.
        # No progress bar of its own: a file refused on the way ends in one line, not a bar and a line.
        shown = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            ds = datasets.Dataset.from_generator(
                _file_documents, cache_dir=str(cache_dir),
                gen_kwargs={"source": source, "limit": data_cfg.max_documents, "fingerprint": inputs["fingerprint"]})
        finally:
            if shown:
                datasets.enable_progress_bars()
    else:
        ds = source.dataset()
        if data_cfg.max_documents is not None:
            ds = ds.select(range(min(data_cfg.max_documents, len(ds))))
        ds = ds.select_columns([data_cfg.text_field])
        if data_cfg.text_field != "text":
            ds = ds.rename_column(data_cfg.text_field, "text")
        ds = ds.add_column("id", [str(i) for i in range(len(ds))])
    if len(ds) < 2:
        raise DataDirError(f"data.source: {data_cfg.source} has {len(ds)} document(s); at least 2 are needed "
                           "for a split")

    flags = split_ids(ds["id"], data_cfg.val_fraction)
    parts = {
        "train": ds.select([i for i, f in enumerate(flags) if not f]),
        "val": ds.select([i for i, f in enumerate(flags) if f]),
    }
    return ds, parts


def _write(out: Path, ds, parts: dict, data_cfg, inputs: dict, source, t0: float, log) -> Path:
    """Tokenizer, token files and meta.json (last) into `out`."""
    meta_path, cache_dir = out / "meta.json", out / ".hf_cache"
    meta_path.unlink(missing_ok=True)  # incomplete from here until the end
    log(f"data: {len(parts['train']):,} train and {len(parts['val']):,} validation documents")

    tok_path, eos = out / "tokenizer.json", eos_token_of(data_cfg)
    tok_info = {"vocab_size_requested": data_cfg.vocab_size, "fingerprint": inputs["fingerprint"],
                "max_documents": data_cfg.max_documents, "val_fraction": data_cfg.val_fraction}
    if eos != EOT:
        tok_info["eos_token"] = eos
    tok_info_path = out / "tokenizer.inputs.json"
    special = {"eos_token": eos}
    if data_cfg.tokenizer is not None:
        p = _pretrained(data_cfg)
        log(f"data: using the pretrained tokenizer {data_cfg.tokenizer} ({id_count(p.tokenizer):,} ids, "
            f"end of document {eos!r})")
        atomic_write_text(tok_path, p.text)
        atomic_write_text(tok_info_path, json.dumps({"tokenizer": data_cfg.tokenizer, "sha256": p.sha256}, indent=2))
        special = {**p.special, "eos_token": eos}
    elif tok_path.is_file() and tok_info_path.is_file() and json.loads(tok_info_path.read_text()) == tok_info:
        log(f"data: reusing {tok_path}")
    elif tok_path.is_file() and not tok_info_path.is_file():
        # A tokenizer the user placed there: use it if it fits the model's vocabulary.
        log(f"data: using the tokenizer found at {tok_path} ({id_count(load_tokenizer(tok_path))} tokens)")
    else:
        log(f"data: training a byte-level BPE tokenizer of {data_cfg.vocab_size} tokens")
        train_texts = parts["train"]
        tok = train_tokenizer(([tokenizer_text(t) for t in train_texts[i : i + 256]["text"]]
                               for i in range(0, len(train_texts), 256)), data_cfg.vocab_size, eos_token=eos)
        tok.save(str(tok_path) + ".tmp")
        os.replace(str(tok_path) + ".tmp", tok_path)
        atomic_write_text(tok_info_path, json.dumps(tok_info, indent=2))
    tok = load_tokenizer(tok_path)
    if tok.token_to_id(eos) is None:
        raise DataDirError(f"data.eos_token: {tok_path} has no end-of-document token {eos!r}")
    if id_count(tok) > data_cfg.vocab_size:
        raise DataDirError(f"data.vocab_size: {tok_path} has {id_count(tok):,} ids, more than {data_cfg.vocab_size:,}")
    # The special tokens, as transformers names them (the HF export writes them).
    atomic_write_text(out / "tokenizer_config.json", json.dumps(special, indent=2) + "\n")

    dtype = token_dtype(data_cfg.vocab_size)
    splits = {}
    for split in SPLITS:
        enc = parts[split].map(
            _encode_batch, batched=True, batch_size=64,
            num_proc=min(data_cfg.num_proc, max(1, len(parts[split]) // 64)) or None,
            remove_columns=parts[split].column_names, fn_kwargs={"tokenizer_path": str(tok_path), "eos_token": eos},
            desc=f"tokenizing {split}",
        )
        column = enc.data.column("ids")
        lengths = np.concatenate([c.value_lengths().to_numpy(zero_copy_only=False) for c in column.chunks]) \
            if column.num_chunks else np.zeros(0, np.int64)
        total = int(lengths.sum())
        bin_tmp = out / f"{split}.bin.tmp"
        arr = np.memmap(bin_tmp, dtype=dtype, mode="w+", shape=(max(total, 1),))
        pos = 0
        for chunk in column.chunks:
            flat = chunk.flatten().to_numpy(zero_copy_only=False)
            arr[pos : pos + len(flat)] = flat
            pos += len(flat)
        arr.flush()
        del arr
        os.replace(bin_tmp, out / f"{split}.bin")
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        np.save(out / f"{split}.idx.npy", offsets)
        splits[split] = {"tokens": total, "documents": len(lengths)}
        log(f"data: {split}: {len(lengths):,} documents, {total:,} tokens")

    shutil.rmtree(cache_dir, ignore_errors=True)
    if all(s["tokens"] == s["documents"] for s in splits.values()):  # nothing but end-of-document tokens
        raise DataDirError(f"data.source: the {len(ds)} documents of {data_cfg.source} hold no text (all empty)")
    meta = {
        "format_version": FORMAT_VERSION,
        "inputs": inputs,
        "source_description": source.describe(),
        "vocab_size": data_cfg.vocab_size,
        "tokenizer_vocab_size": tok.get_vocab_size(),
        "tokenizer_sha256": file_sha256(tok_path),
        "eot_id": eot_id(tok, eos),
        "eos_token": eos,
        "dtype": np.dtype(dtype).name,
        "splits": splits,
    }
    return write_meta(out, meta, t0, log)


def prepare(data_cfg, *, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Prepare `data_cfg.dir` from `data_cfg.source`; returns the directory."""

    out = Path(data_cfg.dir)
    synthetic = data_cfg.source == probes.COPY
    source = None if synthetic else source_of(data_cfg)
    inputs = inputs_of(data_cfg) if synthetic else _inputs(data_cfg, source)
    meta_path = out / "meta.json"
    old, changed = _changed(data_cfg, inputs, force)
    if old is not None and not changed:
        try:
            verify_data_dir(out, data_cfg.vocab_size)
            log(f"data: {out} is up to date ({old['splits']['train']['tokens']:,} train tokens); nothing to do")
            return out
        except DataDirError as e:
            if not force:
                raise
            log(f"data: {e}; rebuilding it (--force)")
            changed = ["damaged"]
    if old is not None:
        if changed == ["meta.json"]:
            log(f"data: {meta_path} is damaged; rebuilding {out} (--force)")
        elif changed == ["damaged"]:
            pass  # said above
        elif not force:
            k = changed[0]
            raise DataDirError(
                f"data.dir {out} was prepared with {k}={old.get('inputs', old).get(k)!r}, "
                f"not {inputs.get(k, FORMAT_VERSION)!r}; "
                "use another data.dir, or pass --force to rebuild it"
            )
    t0 = time.time()
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".lmtrain-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DataDirError(f"data.dir: cannot write {out} ({e.strerror}); choose a writable data.dir") from None
    if synthetic:
        try:
            return probes.write_copy(out, data_cfg, inputs, t0, log)
        except BaseException:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise
    cache_dir = out / ".hf_cache"  # datasets' Arrow files while preparing; removed at the end
    try:  # every document is read (and checked) before any file of data.dir is replaced
        ds, parts = _read(source, data_cfg, inputs, cache_dir, log)
    except BaseException as e:
        shutil.rmtree(out if created else cache_dir, ignore_errors=True)
        raise _source_error(e) or e from None
    try:
        return _write(out, ds, parts, data_cfg, inputs, source, t0, log)
    except BaseException:  # a refused corpus (no text), a full disk: what this call made goes
        shutil.rmtree(out if created else cache_dir, ignore_errors=True)
        raise


def main(argv=None) -> int:
    from lmtrain.cli import main as cli_main

    return cli_main(["prepare-data", *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
