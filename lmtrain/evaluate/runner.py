"""`lmtrain eval-length`: load models, pick the evaluation text, score every length, report."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from data_pipelines.tokenizer import EOT
from lmtrain.evaluate.length import EvalError, LengthResult, evaluate_length, make_plans


@dataclass
class EvalText:
    tokens: np.ndarray  # 1-D integer stream (a memmap for prepared data)
    description: str
    tokenizer_sha256: str


def prepared_text(data_dir: str | Path) -> EvalText:
    """The validation split of a prepared data dir."""
    from data_pipelines.shards import open_tokens, read_meta

    meta = read_meta(data_dir)
    return EvalText(open_tokens(data_dir, "val"),
                    f"{data_dir} (validation split, {meta['splits']['val']['tokens']:,} tokens)",
                    meta["tokenizer_sha256"])


def source_text(spec: str, tokenizer_path: Path, need_tokens: Optional[int], eos_token: str = EOT) -> EvalText:
    """Any data source (text files, jsonl/parquet, a hub dataset), tokenized with the model's
    tokenizer; documents in source order, each ended by EOT, until `need_tokens` are there.
    A source that cannot be read is an EvalError naming --data."""
    from data_pipelines.sources import SourceError

    try:
        return _source_text(spec, tokenizer_path, need_tokens, eos_token)
    except SourceError as e:
        raise EvalError(f"--data: {str(e).removeprefix('data.source: ')}") from None


def _source_text(spec: str, tokenizer_path: Path, need_tokens: Optional[int], eos_token: str) -> EvalText:
    from data_pipelines.sources import resolve_source
    from data_pipelines.tokenizer import encode, eot_id, file_sha256, load_tokenizer

    source = resolve_source(spec)
    tok = load_tokenizer(tokenizer_path)
    eot = eot_id(tok, eos_token)
    ids: list[int] = []
    docs = 0
    for doc in source.documents():
        ids.extend(encode(tok, doc.text))
        ids.append(eot)
        docs += 1
        if need_tokens is not None and len(ids) >= need_tokens:
            break
    return EvalText(np.asarray(ids, dtype=np.int64), f"{source.describe()} ({docs:,} documents, {len(ids):,} tokens)",
                    file_sha256(tokenizer_path))


def text_for(trained, data: Optional[str], need_tokens: Optional[int]) -> EvalText:
    """The text to evaluate a model on: its own validation split, or `data`."""
    from data_pipelines.shards import DataDirError
    from data_pipelines.tokenizer import eos_token_of
    from lmtrain.train.checkpoint import tokenizer_path

    cfg = trained.cfg
    model_tok = tokenizer_path(trained)
    if not model_tok.is_file():
        raise DataDirError(f"the tokenizer of this model is missing: {model_tok} (its data.dir); "
                           "run from the directory it was trained in, or prepare data.dir again")
    if data is None:
        return prepared_text(cfg.data.dir)
    if (Path(data) / "meta.json").is_file():
        text = prepared_text(data)
        from data_pipelines.tokenizer import file_sha256

        if text.tokenizer_sha256 != file_sha256(model_tok):
            raise DataDirError(f"--data {data} was tokenized with another tokenizer than the model's ({model_tok})")
        return text
    return source_text(data, model_tok, need_tokens, eos_token_of(cfg.data))


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise EvalError(f"--lengths {text}: give comma-separated integers, e.g. 128,256,512") from None
    if not lengths or min(lengths) < 1:
        raise EvalError(f"--lengths {text}: give one or more positive lengths, e.g. 128,256,512")
    return sorted(set(lengths))


@dataclass
class RunEval:
    name: str
    source: str
    trained: object  # lmtrain.train.checkpoint.Trained, without its model
    results: list[LengthResult]

    def to_dict(self) -> dict:
        t = self.trained
        return {
            "name": self.name,
            "source": self.source,
            "checkpoint": str(t.checkpoint),
            "step": t.step,
            "position": position_label(t.cfg.model.position),
            "attention": t.cfg.model.attention.kind,
            "train_length": t.cfg.data.seq_len,
            "results": [r.to_dict() for r in self.results],
        }


def position_label(position) -> str:
    """The scheme, with the context-extension options it was changed by (RoPE's base, position
    interpolation), so that a run and its extension are told apart in one table."""
    from lmtrain.model.positions import RoPEConfig

    default = RoPEConfig()
    extra = [f"{name} {getattr(position, name):g}" for name in ("theta", "interpolate")
             if hasattr(position, name) and getattr(position, name) != getattr(default, name)]
    return f"{position.kind} ({', '.join(extra)})" if extra else position.kind


def _names(trained: Sequence, sources: Sequence[str]) -> list[str]:
    names = [t.run_dir.name for t in trained]
    if len(set(names)) < len(names):
        names = [str(s) for s in sources]
    return names


def evaluate_runs(sources: Sequence[str], *, lengths: Optional[Sequence[int]], mode: str, stride: Optional[int],
                  max_tokens: Optional[int], data: Optional[str], batch_tokens: int, buckets_per_octave: int,
                  device: str, log: Callable[[str], None] = print, progress_bar: bool = True,
                  overrides: Sequence[str] = ()) -> dict:
    """Evaluate every source on the same scored tokens; returns the report (see report.py).
    Everything the user gave is checked before the long work starts. `overrides`
    (`model.*=value`) change how every model computes (`--set`)."""
    from lmtrain.evaluate import override_label
    from lmtrain.train.checkpoint import load_trained, reload_with_model

    if batch_tokens < 1:
        raise EvalError("--batch-tokens: must be at least 1")
    # Configs first (cheap), so that every check is done before any model is built;
    # then one model at a time.
    trained = [load_trained(s, with_model=False, overrides=overrides) for s in sources]
    if lengths is None:
        base = trained[0].cfg.data.seq_len
        lengths = [base * f for f in (1, 2, 4, 8, 16, 32)]
    lengths = sorted(set(lengths))
    make_plans(max(lengths) + 1, lengths, mode, stride, None)  # checks mode and stride before any text is read
    if buckets_per_octave < 1:
        raise EvalError("--buckets-per-octave: must be at least 1")

    need = None if max_tokens is None else max(lengths) + max_tokens + 1
    texts = [text_for(t, data, need) for t in trained]
    shas = {x.tokenizer_sha256 for x in texts}
    if len(shas) > 1:
        raise EvalError("these runs use different tokenizers, so no common set of scored tokens exists; "
                        "evaluate them separately")
    text = texts[0]
    plans = make_plans(len(text.tokens), lengths, mode, stride, max_tokens)
    offset, n = plans[lengths[0]].offset, plans[lengths[0]].n_scored
    names = [n + override_label(overrides) for n in _names(trained, sources)]
    log(f"eval-length: {len(trained)} model(s), {mode}"
        f"{'' if mode == 'nonoverlap' else ' (stride ' + (str(stride) if stride else 'L/2') + ')'}, "
        f"lengths {','.join(map(str, lengths))}; {n:,} scored tokens (targets {offset:,}..{offset + n - 1:,}) "
        f"of {text.description}")

    total_windows = len(trained) * sum(p.n_windows() for p in plans.values())
    bar = _progress(total_windows, progress_bar)
    runs = []
    t0 = time.time()
    try:
        for name, source, t in zip(names, sources, trained):
            model = reload_with_model(t, device=device).model
            results = []
            for L in lengths:
                bar.set_description(f"{name} L={L}")
                r = evaluate_length(model, text.tokens, plans[L], batch_tokens=batch_tokens,
                                    buckets_per_octave=buckets_per_octave, device=device, progress=bar.update)
                results.append(r)
            del model
            runs.append(RunEval(name, str(source), t, results))
    finally:
        bar.close()
    return {
        "mode": mode,
        "overrides": list(overrides),
        "stride": stride if mode == "sliding" else None,
        "strides": {str(L): p.stride for L, p in plans.items()},
        "lengths": list(lengths),
        "data": text.description,
        "scored_offset": offset,
        "scored_tokens": n,
        "buckets_per_octave": buckets_per_octave,
        "device": device,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": round(time.time() - t0, 1),
        "runs": runs,
    }


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="win", disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)
