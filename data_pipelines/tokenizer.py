"""Tokenizers: a byte-level BPE trained on the corpus (the default), or a pretrained one.

A trained BPE has its end-of-document token (`<|endoftext|>` unless `data.eos_token` names
another) at id 0; the 256 byte symbols follow, so any text encodes.

A pretrained tokenizer (`data.tokenizer`) is a `tokenizer.json` file, a directory that
transformers loads (`save_pretrained` output, with or without `tokenizer.json`), or a
transformers tokenizer name on the Hub. Its special tokens come from its
`tokenizer_config.json`; `data.eos_token` overrides the end-of-document one. lmtrain encodes
text without the tokenizer's template (no `<s>` added per call): documents are their tokens
followed by the end-of-document token, as GPT-NeoX and lm-evaluation-harness encode them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipelines.hub import quiet, unreachable

EOT = "<|endoftext|>"
VOCAB_MULTIPLE = 64  # a pretrained tokenizer's size is padded up to this (tensor-core friendly)
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
# Files of a tokenizer directory that transformers loads (fast, sentencepiece, GPT-2 BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


class TokenizerError(ValueError):
    """A tokenizer that cannot be used; str() is one line naming `data.tokenizer` or `data.eos_token`."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, eos_token: str = EOT,
                    show_progress: bool = True) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def eos_token_of(data_cfg) -> str:
    """The end-of-document token of a data config (configs saved before `data.eos_token`: EOT)."""
    return getattr(data_cfg, "eos_token", None) or EOT


def eot_id(tok: Tokenizer, eos_token: str = EOT) -> int:
    i = tok.token_to_id(eos_token)
    if i is None:
        raise ValueError(f"tokenizer has no end-of-document token {eos_token!r}")
    return i


def encode(tok: Tokenizer, text: str) -> list[int]:
    """The ids of `text` alone: no template tokens (a pretrained tokenizer's `<s>`)."""
    return tok.encode(text, add_special_tokens=False).ids


def id_count(tok: Tokenizer) -> int:
    """Rows an embedding needs: one past the largest id (added tokens included)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def padded(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


@dataclass
class Pretrained:
    """A pretrained tokenizer resolved from `data.tokenizer`."""

    spec: str
    tokenizer: Tokenizer
    text: str  # tokenizer.json as text: what the data dir stores
    special: dict = field(default_factory=dict)  # bos/eos/pad/unk token strings it declares
    sha256: str = ""

    def eos(self, override: Optional[str]) -> str:
        """The end-of-document token: `override`, else the tokenizer's eos, else EOT if it has one."""
        name = override or self.special.get("eos_token") or (EOT if self.tokenizer.token_to_id(EOT) is not None
                                                             else None)
        if name is None:
            raise TokenizerError(f"data.eos_token: {self.spec} declares no end-of-sequence token; name one of its "
                                 f"special tokens ({', '.join(self.special_names()) or 'it has none'})")
        if self.tokenizer.token_to_id(name) is None:
            raise TokenizerError(f"data.eos_token: {name!r} is not a token of {self.spec}; its special tokens: "
                                 f"{', '.join(self.special_names()) or 'none'}")
        return name

    def special_names(self) -> list[str]:
        return [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]


def _token_name(value) -> Optional[str]:
    """A tokenizer_config.json entry: a string, or {"content": ...} (older transformers)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def declared_special(folder: Path) -> dict:
    """bos/eos/pad/unk tokens declared by tokenizer_config.json (or special_tokens_map.json) in `folder`."""
    out: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later one wins
        path = folder / name
        if path.is_file():
            try:
                d = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise TokenizerError(f"data.tokenizer: cannot read {path} ({e})") from None
            out.update({k: _token_name(d.get(k)) for k in SPECIAL_KEYS if _token_name(d.get(k))})
    return out


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".json") or spec.startswith(("/", "./", "../", "~")) or Path(spec).exists()


_RESOLVED: dict = {}


def resolve_pretrained(spec: str) -> Pretrained:
    """Load `data.tokenizer`; a TokenizerError naming the key when it cannot be used. Loaded once
    per process (config load, then data preparation), again when the file changes."""
    path = Path(spec).expanduser()
    key = (spec, path.stat().st_mtime_ns if path.exists() else None)
    if key not in _RESOLVED:
        _RESOLVED[key] = _resolve(spec, path)
    return _RESOLVED[key]


def _resolve(spec: str, path: Path) -> Pretrained:
    if _looks_like_path(spec):
        if path.is_dir():
            if not any((path / f).is_file() for f in TOKENIZER_FILES):
                raise TokenizerError(f"data.tokenizer: {spec} holds no tokenizer (none of "
                                     f"{', '.join(TOKENIZER_FILES)})")
            return _from_transformers(spec, str(path))
        if not path.is_file():
            raise TokenizerError(f"data.tokenizer: {spec} does not exist; give a tokenizer.json file, a tokenizer "
                                 "directory or a transformers tokenizer name")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception subclasses
            raise TokenizerError(f"data.tokenizer: {spec} is not a tokenizers tokenizer.json "
                                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        return _pretrained(spec, tok, declared_special(path.parent))
    return _from_transformers(spec, spec)


def _from_transformers(spec: str, where: str) -> Pretrained:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        folder = Path(where)
        if (folder / "tokenizer.json").is_file():  # readable without transformers
            return replace(resolve_pretrained(str(folder / "tokenizer.json")), spec=spec)
        raise TokenizerError(f"data.tokenizer: loading {spec} needs transformers (pip install 'lmtrain[hf]'), "
                             "or give its tokenizer.json") from None
    try:
        with quiet():  # its retries are warnings; a failure is one line below
            try:  # a directory, or a name in the Hugging Face cache
                hf = AutoTokenizer.from_pretrained(where, local_files_only=True)
            except OSError:
                if Path(where).is_dir():
                    raise
                why = unreachable()
                if why is not None:
                    raise TokenizerError(
                        f"data.tokenizer: {spec!r} is not in the Hugging Face cache and the Hub cannot be used "
                        f"({why}); give a local tokenizer.json or directory, or fetch it where the network is "
                        "(its cache then serves it)") from None
                hf = AutoTokenizer.from_pretrained(where)
    except TokenizerError:
        raise
    except Exception as e:  # OSError (not found, offline), ValueError (no fast tokenizer), ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"data.tokenizer: transformers cannot load {spec!r} ({first})") from None
    if not getattr(hf, "is_fast", False):
        raise TokenizerError(f"data.tokenizer: {spec} has no fast (tokenizers) version; convert it with "
                             "transformers and give its tokenizer.json")
    special = {k: _token_name(getattr(hf, k, None)) for k in SPECIAL_KEYS}
    return _pretrained(spec, Tokenizer.from_str(hf.backend_tokenizer.to_str()), {k: v for k, v in special.items() if v})


def _pretrained(spec: str, tok: Tokenizer, special: dict) -> Pretrained:
    text = tok.to_str()  # one serialization, whichever way the tokenizer was found: one sha256
    return Pretrained(spec, tok, text, special, hashlib.sha256(text.encode()).hexdigest())
