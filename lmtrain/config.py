"""Typed configuration: OmegaConf structured configs over dataclasses.

`load_config(path, overrides)` merges a YAML preset and `key=value` overrides onto the
schema and validates the result. Every problem is raised as a `ConfigError` whose
message is one line naming the key and the fix; the CLI prints it and exits 2.

The decoder's axes (`model.position`, `model.attention`, `model.ffn`, `model.residual`,
`model.depth`; lmtrain/model/axes.py) are polymorphic nodes typed in two phases: the raw
merge decides each node's `kind`, then the node is re-typed with that kind's own Config
dataclass, so options of other kinds are unknown keys, as they should be.

An axis node may be given as a bare kind: `model.position: rope` (or `model.position=rope`
on the command line) is `model.position: {kind: rope}`. Layers (a preset, the presets it
builds on, then all command-line overrides together as one layer) merge in order, and a
layer that names a kind other than the one so far starts that node afresh: the previous
kind's options do not apply to the new kind (they are still checked for typos).
Keys of earlier releases (`model.rope_theta`, `model.max_position`) are refused with the
new spelling; configs saved by earlier releases (checkpoints, run dirs) are translated.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from lmtrain.model.attention import AttentionConfig
from lmtrain.model.axes import AXES, Assembly
from lmtrain.model.depth import DepthConfig
from lmtrain.model.ffn import FFNConfig
from lmtrain.model.layer import NORMS
from lmtrain.model.positions import PositionConfig
from lmtrain.model.residual import ResidualConfig

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
# Lightning's short spellings, and what it takes them for.
PRECISION_ALIASES = {"bf16": "bf16-mixed", "16": "16-mixed", "32": "32-true", "64": "64-true"}
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
STRATEGIES = ("auto", "single", "ddp", "ddp_spawn", "deepspeed")
DEEPSPEED_PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true")


MAX_NAME = 100  # run and job names: a file name, with room for the files made from it
# The largest vocabulary lmtrain trains a tokenizer for: the BPE trainer's memory grows with it
# (2^31 tokens asked for 141 GB), and the largest vocabularies in use are near 2^18.
MAX_VOCAB = 2**22
DEFAULT_VOCAB = 8192  # a new BPE's size when data.vocab_size is null


class ConfigError(ValueError):
    """A configuration problem; str() is one line naming the key."""


@dataclass
class RunConfig:
    name: str = "default"  # the run dir's name: run.root/run.name
    root: str = "runs"  # the directory holding run dirs
    seed: int = 1234  # seeds init, data order and per-step dropout
    # A fresh start takes its weights from this export, checkpoint or run dir (same model and
    # tokenizer; optimizer state starts anew). Ignored when the run dir resumes.
    init_from: str = ""


@dataclass
class CopyConfig:
    """data.source=copy (data_pipelines/probes.py): documents of data.seq_len tokens, n = L/2 - 1
    distinct symbols, a separator, the same symbols again, end-of-document."""

    symbols: int = 0  # distinct symbols drawn from (0: data.vocab_size - 2, all there are)
    train_documents: int = 16384  # copy-task training documents
    val_documents: int = 256  # copy-task validation documents
    seed: int = 0  # seed of the copy-task generator


@dataclass
class DataConfig:
    # stdlib | copy (the synthetic copy task, data.copy) | path or glob of text files |
    # *.jsonl / *.parquet (glob ok) | HF dataset name
    source: str = "stdlib"
    dir: str = "data/stdlib"  # the prepared data directory (tokenizer, token files, meta.json)
    # A pretrained tokenizer instead of a new BPE: a tokenizer.json file, a transformers tokenizer
    # directory, or a transformers tokenizer name (null: train a byte-level BPE on the train split).
    tokenizer: Optional[str] = None
    # The end-of-document token ending every document (null: <|endoftext|> for a new BPE, the
    # tokenizer's own end-of-sequence token for a pretrained one), e.g. </s> or <|end_of_text|>.
    eos_token: Optional[str] = None
    # Embedding rows, and the size of a new BPE. null: 8192 for a new BPE; a pretrained
    # tokenizer's size padded up to a multiple of 64.
    vocab_size: Optional[int] = None
    # Training window length L, in tokens; or a length curriculum "512,2048@2000,8192@4000"
    # (512 for the first 2000 optimizer steps, then 2048 until step 4000, then 8192), which is
    # saved as data.seq_len = the longest length and data.length_schedule = the schedule.
    seq_len: int = 256
    batch_size: int = 16  # per device, per micro-step (at data.seq_len, under a length curriculum)
    length_schedule: str = ""  # "L@step,..." (set through data.seq_len); empty: data.seq_len throughout
    # Under a length curriculum: tokens (the micro-batch grows as the length shrinks, so each step
    # trains on as many tokens as at data.seq_len) or samples (data.batch_size at every length).
    length_batch: str = "tokens"
    val_fraction: float = 0.02  # share of documents in the validation split
    text_field: str = "text"  # jsonl/parquet/HF column holding the text
    # How text files are decoded; an undecodable byte is refused with the file and line. Set it
    # (latin-1, cp1252, utf-16, ...) to read files in another encoding on purpose.
    encoding: str = "utf-8"
    hf_split: str = "train"  # the split of a Hub dataset or of a save_to_disk DatasetDict
    # A Hub dataset's config name (load_dataset's second argument), its revision (a branch, tag
    # or commit), and whether to stream it (no full download; pair with data.max_documents).
    hf_name: Optional[str] = None
    hf_revision: Optional[str] = None  # a Hub dataset's revision: branch, tag or commit
    hf_streaming: bool = False  # stream a Hub dataset instead of downloading it
    # Which files of a directory data.source to take (e.g. '**/*.txt'; null: text, jsonl, json,
    # parquet and arrow files by extension, also compressed).
    glob: Optional[str] = None
    max_documents: Optional[int] = None  # use only the first N documents (in source order)
    num_proc: int = 2  # tokenization processes
    num_workers: int = 1  # DataLoader workers per rank
    val_batches: int = 8  # validation batches per evaluation
    # Packed windows hold several documents: attention stops at their boundaries (each ends with
    # the end-of-document token) and absolute positions restart per document.
    document_mask: bool = False
    copy: CopyConfig = field(default_factory=CopyConfig)


@dataclass
class ModelConfig:
    n_layers: int = 4  # decoder layers
    d_model: int = 256  # hidden size
    n_heads: int = 4  # attention heads (d_model / n_heads per head)
    d_ff: int = 1024  # feed-forward inner size
    # Feed-forward in chunks of this many positions (Reformer): its L x d_ff activations exist one
    # chunk at a time, and in training each chunk is recomputed in the backward. 0: all at once.
    ffn_chunk: int = 0
    dropout: float = 0.0  # residual, embedding and attention-probability dropout
    # The axes, each a node typed by its kind (lmtrain/model/axes.py).
    position: PositionConfig = field(default_factory=PositionConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    tie_embeddings: bool = True  # share the input embedding and the LM head
    norm: str = "layernorm"  # layernorm | rmsnorm
    bias: bool = True  # biases in linear layers
    init_std: float = 0.02  # std of the normal init of weight matrices


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr: float = 1e-4  # the cosine's floor
    weight_decay: float = 0.1  # AdamW decay, never on norms, biases or embeddings
    warmup_steps: int = 100  # linear warmup, in optimizer steps
    # The cosine reaches min_lr here (GPT-NeoX's lr_decay_iters); null: at trainer.max_steps.
    # Longer than max_steps: training stops on a schedule that has not decayed yet (a probe read
    # at equal steps, or the first part of a longer run).
    decay_steps: Optional[int] = None
    grad_clip: float = 1.0  # global gradient-norm clipping; 0 disables
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # optimizer steps to train
    val_every_n_steps: int = 200  # validation interval, in optimizer steps
    precision: str = "32-true"  # Lightning precision (bf16, 16, 32, 64 mean -mixed, -mixed, -true, -true)
    accelerator: str = "auto"  # where to train
    devices: Union[int, str] = 1  # per node: a count, -1 (every GPU) or auto (Lightning's: every GPU, else 1)
    num_nodes: int = 1  # nodes (SLURM: one srun task per device per node)
    strategy: str = "auto"  # data parallelism: ddp, or deepspeed (ZeRO, deepspeed.*)
    accumulate_grad_batches: int = 1  # micro-batches per optimizer step
    deterministic: bool = False  # deterministic kernels (torch.use_deterministic_algorithms)
    log_every_n_steps: int = 10  # logging interval, in optimizer steps
    peak_tflops: Optional[float] = None  # MFU denominator; None: datasheet on GPU, measured on CPU
    # Tokens per chunk of the fused LM head + cross-entropy (no full float32 logits): -1 auto
    # (chunks only when the logits of a micro-batch would pass 64 MB), 0 never, N tokens.
    loss_chunk_tokens: int = -1
    compile: bool = False  # torch.compile the model (inductor; on CPU it needs a C++ compiler)
    progress_bar: bool = True  # a progress bar on a terminal, progress lines otherwise
    # Optimizer steps with a non-finite loss or gradient norm are skipped; after this many in a
    # row training stops (exit 2), the last good checkpoint being the one a resume finds.
    max_bad_steps: int = 10
    # Recompute each layer's activations in the backward pass instead of keeping them
    # (torch.utils.checkpoint; any strategy, ZeRO-3 included): less memory, ~1/3 more compute.
    activation_checkpointing: bool = False
    # Split each sequence across this many processes (DeepSpeed Ulysses, lmtrain/train/sequence.py):
    # processes form groups of N, each group reads one micro-batch; data parallel across groups.
    sequence_parallel: int = 1
    # Where metrics go, all on one step axis (the optimizer step): tensorboard (RUN/tb), csv
    # (RUN/csv/metrics.csv), wandb (options under wandb.*). metrics.jsonl is always written.
    loggers: List[str] = field(default_factory=lambda: ["tensorboard"])


@dataclass
class WandbConfig:
    """Weights & Biases, with `trainer.loggers` holding wandb."""

    project: str = "lmtrain"  # the W&B project
    entity: Optional[str] = None  # a team or user; null: the API key's default
    name: Optional[str] = None  # the W&B run name; null: run.name
    tags: List[str] = field(default_factory=list)  # W&B run tags
    mode: str = "online"  # online | offline (files under RUN/wandb, `wandb sync` later) | disabled


@dataclass
class CheckpointConfig:
    every_n_steps: int = 500  # checkpoint interval, in optimizer steps
    keep_last: int = 2  # step checkpoints kept (last.ckpt besides)


@dataclass
class EvalConfig:
    # Periodic length-extrapolation evaluation during training (empty: off). Perplexity at
    # each length is logged to TensorBoard as eval_length/<mode>/ppl_L<length>.
    lengths: List[int] = field(default_factory=list)
    mode: str = "sliding"  # nonoverlap | sliding
    stride: int = 0  # sliding: tokens each window moves and scores; 0 = half of each length
    max_tokens: int = 4096  # scored tokens of the validation split
    every_n_steps: int = 0  # 0 = at every validation (trainer.val_every_n_steps)
    batch_tokens: int = 16384  # tokens per evaluation batch


@dataclass
class SlurmConfig:
    # `lmtrain submit`: nodes = trainer.num_nodes, tasks (and GPUs) per node = trainer.devices.
    job_name: str = ""  # default: run.name
    partition: str = ""  # the partition (comma-separated: any of them); empty: the default
    account: str = ""  # the account to charge; empty: yours by default
    qos: str = ""  # quality of service; empty: the default
    time: str = "24:00:00"  # [D-]HH:MM:SS
    cpus_per_task: int = 8  # CPUs per task (per GPU); checked against the partition
    mem: str = "0"  # per node, e.g. 480G; 0 = all of it
    signal_seconds: int = 300  # USR1 this long before the time limit: save, requeue, exit
    env_hook: str = ""  # a shell file sourced before training (module loads, venv activation)
    # More #SBATCH options, each as sbatch takes it: --constraint=a100, --exclusive,
    # --exclude=node[01-04], --gres=gpu:a100:8, --mail-type=END, --mail-user=me@example.org
    extra: List[str] = field(default_factory=list)


@dataclass
class DeepSpeedConfig:
    # Used with trainer.strategy=deepspeed. The DeepSpeed JSON is generated from these keys
    # (lmtrain/train/strategy.py) and saved as RUN/deepspeed.json.
    zero_stage: int = 2  # 1: optimizer state sharded; 2: and gradients; 3: and parameters
    offload_optimizer: bool = False  # optimizer state and its step on the CPU (any stage)
    offload_params: bool = False  # parameters on the CPU between uses (stage 3 only)
    # Raw DeepSpeed JSON keys, merged last (nested dicts merge key by key), e.g.
    # deepspeed.raw.zero_optimization.reduce_bucket_size=5e8. Keys that lmtrain sets from its
    # own config (batch size, accumulation, clipping, precision, optimizer, stage) are refused.
    raw: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name


# key -> registry whose entries carry the node's Config dataclass
POLYMORPHIC = {f"model.{axis}": registry for axis, registry in AXES.items()}
# Keys of earlier releases: key -> (the axis node that holds it now, the kind it belongs to, its new name).
LEGACY = {"model.rope_theta": ("model.position", "rope", "theta"),
          "model.max_position": ("model.position", "learned", "max_position")}


# Names other trainers (transformers, Lightning, nanoGPT, GPT-NeoX, LitGPT) use for our keys: an
# unknown key whose last part is one of these is answered with our key.
SYNONYMS = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_embed", "dim", "emb_dim"), "model.d_model"),
    **dict.fromkeys(("num_layers", "n_layer", "num_hidden_layers", "depth"), "model.n_layers"),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "heads"), "model.n_heads"),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "ffn_hidden_size", "d_inner", "mlp_dim"), "model.d_ff"),
    **dict.fromkeys(("learning_rate", "max_lr", "peak_lr"), "optim.lr"),
    **dict.fromkeys(("warmup", "warmup_iters", "lr_warmup_steps", "warmup_steps"), "optim.warmup_steps"),
    **dict.fromkeys(("lr_decay_iters", "decay_iters"), "optim.decay_steps"),
    **dict.fromkeys(("gradient_clipping", "clip_grad", "grad_clip", "gradient_clip_val", "max_grad_norm"),
                    "optim.grad_clip"),
    **dict.fromkeys(("val_check_interval", "eval_interval", "eval_iters_interval"), "trainer.val_every_n_steps"),
    **dict.fromkeys(("max_iters", "train_iters", "max_steps", "total_steps"), "trainer.max_steps"),
    **dict.fromkeys(("log_interval", "logging_steps"), "trainer.log_every_n_steps"),
    **dict.fromkeys(("gradient_accumulation_steps", "accumulate_grad_batches", "grad_accum"),
                    "trainer.accumulate_grad_batches"),
    **dict.fromkeys(("gpus", "num_gpus", "devices"), "trainer.devices"),
    **dict.fromkeys(("dtype", "bf16", "fp16", "precision", "mixed_precision"), "trainer.precision"),
    **dict.fromkeys(("batch_size", "micro_batch_size", "train_micro_batch_size_per_gpu", "per_device_train_batch_size"),
                    "data.batch_size"),
    **dict.fromkeys(("block_size", "seq_length", "max_seq_len", "context_length", "max_position_embeddings",
                     "seq_len"), "data.seq_len"),
    **dict.fromkeys(("padded_vocab_size", "n_vocab", "vocab_size"), "data.vocab_size"),
    **dict.fromkeys(("save_interval", "checkpoint_interval", "save_steps"), "checkpoint.every_n_steps"),
    **dict.fromkeys(("out_dir", "output_dir", "save_dir"), "run.root"),
    **dict.fromkeys(("tie_word_embeddings", "tied_embeddings"), "model.tie_embeddings"),
    "attention_dropout": "model.dropout", "hidden_dropout": "model.dropout", "seed": "run.seed",
    "weight_decay": "optim.weight_decay", "min_lr": "optim.min_lr", "zero_stage": "deepspeed.zero_stage",
}


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_flat_keys(node._get_node(k), full + "."))
    return keys


def _explain(e: OmegaConfBaseException, schema: DictConfig) -> str:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0]
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and "not in" in msg:
        candidates = _flat_keys(schema)
        parent = key.rpartition(".")[0]
        siblings = [c for c in candidates if c.rpartition(".")[0] == parent]
        synonym = SYNONYMS.get(key.rpartition(".")[2])
        if synonym is not None and synonym != key and not difflib.get_close_matches(key, siblings, n=1, cutoff=0.85):
            return f"{key}: unknown key (lmtrain calls it {synonym})"  # a typo of a sibling still gets its name
        close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6) or \
            difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "see `lmtrain config configs/default.yaml` for all keys"
        return f"{key}: unknown key ({hint})"
    if isinstance(e, ValidationError):
        expected = re.search(r"converted to (\w+)", msg)
        what = f"expected {expected.group(1).lower()}" if expected else msg
        return f"{key}: wrong type: {what}, got {msg.split()[1] if msg.startswith('Value') else '?'}"
    return f"{key}: {msg}"


def _schema_for(raw: DictConfig) -> DictConfig:
    schema = OmegaConf.structured(Config)
    for key, registry in POLYMORPHIC.items():
        node = OmegaConf.select(raw, key, default=None)
        kind = node.get("kind") if isinstance(node, DictConfig) else None
        if kind is None:
            kind = OmegaConf.select(schema, f"{key}.kind")
        if not isinstance(kind, str) or kind not in registry:
            raise ConfigError(registry.unknown_message(str(kind)))
        typed = OmegaConf.structured(registry.get(kind).Config(kind=kind))
        parent, leaf = key.rsplit(".", 1)
        OmegaConf.select(schema, parent)[leaf] = typed
    return schema


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """A preset and the presets it builds on: a top-level `base: other.yaml` (relative to the
    file) is loaded first and this file's keys override it."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: base: presets include each other in a cycle")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors and the like
        raise ConfigError(f"{path}: cannot parse YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: a preset must be a mapping of sections (run, data, model, ...)")
    base = node.pop("base", None)
    if base is None:
        return [node]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: give one preset file name, relative to this file")
    return [*_load_yaml(path.parent / base, (*seen, path.resolve())), node]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Preset YAML + dotlist overrides -> validated `Config`. Raises ConfigError."""
    layers = _load_yaml(Path(path)) if path is not None else []
    layer = _override_layer(overrides or [])
    if layer is not None:
        layers.append(layer)
    schema = OmegaConf.structured(Config)
    for layer in layers:
        _check_shape(layer, schema)
        _refuse_legacy(layer)
    try:
        raw = _merge_layers(layers)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, OmegaConf.structured(Config))) from None
    return _build(raw, load_tokenizer=True)


def _override_layer(overrides: Sequence[str]) -> Optional[DictConfig]:
    """`key=value` items -> one config layer (their order does not matter), or None."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: an override must look like key=value")
        key, value = item.split("=", 1)
        # `model.position=rope` is `model.position.kind=rope` (a node given a mapping stays as it is)
        dotted = f"{key}.kind={value}" if key in POLYMORPHIC and not value.lstrip().startswith("{") else item
        try:
            parsed.append(OmegaConf.from_dotlist([dotted]))
        except Exception as e:  # OmegaConf errors, and YAML scanner errors on values such as `...`
            raise ConfigError(f"{item}: cannot parse this override ({str(e).splitlines()[0]}); quote the value") \
                from None
    if not parsed:
        return None
    try:
        return OmegaConf.merge(*parsed)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, OmegaConf.structured(Config))) from None


def with_overrides(cfg: Config, overrides: Sequence[str], *, only: str = "model.") -> Config:
    """A saved config with `key=value` overrides applied, through the same checks as a preset.
    Every key must start with `only`: evaluation changes how a trained model computes (more
    LSH rounds, another window), never its data or training. Raises ConfigError."""
    for item in overrides:
        key = item.split("=", 1)[0]
        if not key.startswith(only):
            raise ConfigError(f"{item}: only {only}* keys can be changed on a trained model")
    layer = _override_layer(overrides)
    if layer is None:
        return cfg
    _check_shape(layer, OmegaConf.structured(Config))
    try:
        raw = _merge_layers([OmegaConf.create(to_dict(cfg)), layer])
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, OmegaConf.structured(Config))) from None
    return _build(raw)


def _check_shape(node: Any, schema: Any, prefix: str = "") -> None:
    """Sections are mappings: a list or a scalar where the schema has a mapping is refused with
    the key (OmegaConf would fail deeper, without one)."""
    if not isinstance(node, DictConfig):
        return
    for key in node.keys():
        full = f"{prefix}{key}"
        if not isinstance(schema, DictConfig) or key not in schema:
            continue  # unknown keys are reported by the typed merge
        sub, value = schema._get_node(key), node._get_node(key)
        if isinstance(sub, DictConfig) and not sub._is_missing() and sub._metadata.object_type is not dict:
            if full in POLYMORPHIC and isinstance(value._value(), str):
                continue  # a bare kind
            if not isinstance(value, DictConfig):
                got = "a list" if isinstance(value, ListConfig) else f"the value {value._value()!r}"
                raise ConfigError(f"{full}: expected a mapping of keys (e.g. {full}: {{...}}), got {got}")
            _check_shape(value, sub, full + ".")


def _refuse_legacy(layer: DictConfig) -> None:
    for key, (node, kind, name) in LEGACY.items():
        if OmegaConf.select(layer, key, default=None) is not None:
            raise ConfigError(f"{key}: this key moved; write {node}.{name} (it belongs to {node}.kind={kind}), "
                              f"e.g. {node}: {{kind: {kind}, {name}: ...}}")


def _axis_value(layer: DictConfig, key: str):
    parent, leaf = key.rsplit(".", 1)
    node = OmegaConf.select(layer, parent, default=None)
    if not isinstance(node, DictConfig) or leaf not in node:
        return None, None
    return node, node[leaf]


def _bare_kinds(raw: DictConfig) -> DictConfig:
    """`position: rope` -> `position: {kind: rope}`, for every axis node (in place)."""
    for key in POLYMORPHIC:
        parent, value = _axis_value(raw, key)
        if isinstance(value, str):
            parent[key.rsplit(".", 1)[1]] = {"kind": value}
    return raw


def _merge_layers(layers: list[DictConfig]) -> DictConfig:
    """Merge presets and overrides in order, with the layering rule of axis nodes (see the
    module docstring)."""
    defaults = OmegaConf.structured(Config)
    acc = OmegaConf.create()
    for layer in layers:
        layer = _bare_kinds(copy.deepcopy(layer))
        for key in POLYMORPHIC:
            new_kind = OmegaConf.select(layer, f"{key}.kind", default=None)
            old_kind = OmegaConf.select(acc, f"{key}.kind", default=None) or OmegaConf.select(defaults, f"{key}.kind")
            if new_kind is None or new_kind == old_kind:
                continue
            before = OmegaConf.select(acc, key, default=None)
            if isinstance(before, DictConfig):
                _check_options(key, old_kind, before)  # what is dropped is still checked: no typo goes unseen
            OmegaConf.update(acc, key, {}, merge=False)  # another kind: its own options only
        acc = OmegaConf.merge(acc, layer)
    return acc


def _check_options(key: str, kind: str, node: DictConfig) -> None:
    """Every option of an axis node that is being replaced must belong to its kind."""
    registry = POLYMORPHIC[key]
    if kind not in registry:
        return  # an unknown kind that is replaced: nothing of it is used
    known = [f.name for f in fields(registry.get(kind).Config)]
    for name in node:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
            hint = f"did you mean {key}.{close[0]}?" if close else f"{key}.kind={kind} has {', '.join(known)}"
            raise ConfigError(f"{key}.{name}: unknown key ({hint})")


def _build(raw: DictConfig, *, load_tokenizer: bool = False) -> Config:
    _bare_kinds(raw)  # saved configs of earlier releases (`position: alibi`)
    _length_curriculum(raw)
    schema = _schema_for(raw)
    try:
        merged = OmegaConf.merge(schema, raw)
        OmegaConf.resolve(merged)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, schema)) from None
    _resolve_tokenizer(cfg, load=load_tokenizer)
    cfg.trainer.precision = PRECISION_ALIASES.get(str(cfg.trainer.precision), cfg.trainer.precision)
    if isinstance(cfg.trainer.devices, str) and cfg.trainer.devices.strip().lstrip("-").isdigit():
        cfg.trainer.devices = int(cfg.trainer.devices)
    errors = validate(cfg)
    if errors:
        raise ConfigError(errors[0] + (f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""))
    return cfg


@dataclass(frozen=True)
class LengthPhase:
    start_step: int  # optimizer steps done before this length starts (it trains step start_step + 1 on)
    seq_len: int
    batch_size: int  # micro-batch per device (or per sequence-parallel group)


def parse_length_schedule(text: str) -> list[tuple[int, int]]:
    """ "512,2048@2000,8192@4000" -> [(0, 512), (2000, 2048), (4000, 8192)]: (steps done before the
    length starts, length).
    Raises ValueError with what is wrong."""
    out: list[tuple[int, int]] = []
    for i, item in enumerate(x.strip() for x in text.split(",")):
        length, _, step = item.partition("@")
        if not length.strip().isdigit() or (step and not step.strip().isdigit()):
            raise ValueError(f"{item!r} is not LENGTH or LENGTH@STEP")
        start = int(step) if step else 0
        if i == 0 and start != 0:
            raise ValueError(f"the first length applies from step 0 (write {length} or {length}@0)")
        if i and not step:
            raise ValueError(f"{item!r} needs the optimizer step it starts at: {length}@STEP")
        if out and start <= out[-1][0]:
            raise ValueError(f"steps must increase: {item!r} starts at or before step {out[-1][0]}")
        out.append((start, int(length)))
    return out


def length_phases(data) -> list[LengthPhase]:
    """The phases of training's length curriculum (one phase without one). Tokens per step are
    those of data.seq_len x data.batch_size unless data.length_batch=samples."""
    if not data.length_schedule:
        return [LengthPhase(0, data.seq_len, data.batch_size)]
    out = []
    for start, length in parse_length_schedule(data.length_schedule):
        batch = data.batch_size
        if data.length_batch == "tokens":
            batch = data.batch_size * data.seq_len // length
        out.append(LengthPhase(start, length, batch))
    return out


def _length_curriculum(raw: DictConfig) -> None:
    """data.seq_len given as a schedule: data.length_schedule holds it (normalised), data.seq_len
    the longest length (the model's tables are sized by it)."""
    data = raw.get("data")
    value = data.get("seq_len") if isinstance(data, DictConfig) else None
    if not isinstance(value, str) or not ("," in value or "@" in value):
        return
    try:
        schedule = parse_length_schedule(value)
    except ValueError as e:
        raise ConfigError(f"data.seq_len: {e}; e.g. data.seq_len=512,2048@2000,8192@4000") from None
    if data.get("length_schedule") and data.get("length_schedule") != value:
        raise ConfigError("data.seq_len: a length schedule is given twice (data.seq_len and data.length_schedule); "
                          "give it once, in data.seq_len")
    data.length_schedule = ",".join(f"{length}@{start}" for start, length in schedule)
    data.seq_len = max(length for _, length in schedule)


def _resolve_tokenizer(cfg: Config, *, load: bool) -> None:
    """`data.eos_token` and a null `data.vocab_size` from the tokenizer. A pretrained one is loaded
    here (`load`: a user's config), so a bad `data.tokenizer` fails at load time; a saved config
    (a run, a checkpoint) has both settled and its model's tokenizer is the data dir's copy."""
    from data_pipelines.tokenizer import EOT, TokenizerError, id_count, padded, resolve_pretrained

    d = cfg.data
    if d.eos_token is not None and not d.eos_token.strip():
        raise ConfigError("data.eos_token: must not be empty; name a token such as </s>, or null for the "
                          "tokenizer's own")
    if d.tokenizer is not None and not d.tokenizer.strip():
        raise ConfigError("data.tokenizer: must not be empty; give a tokenizer, or null to train a new BPE")
    if d.tokenizer is None:
        d.vocab_size = DEFAULT_VOCAB if d.vocab_size is None else d.vocab_size
        if d.source == "copy" and d.eos_token not in (None, EOT):
            raise ConfigError(f"data.eos_token: the copy task (data.source=copy) ends documents with {EOT}; set "
                              "data.eos_token=null")
        d.eos_token = d.eos_token or EOT
        return
    if d.source == "copy":
        raise ConfigError("data.tokenizer: the copy task (data.source=copy) makes its own tokenizer; set "
                          "data.tokenizer=null")
    if not load and d.vocab_size is not None and d.eos_token is not None:
        return
    try:
        p = resolve_pretrained(d.tokenizer)
        d.eos_token = p.eos(d.eos_token)
    except TokenizerError as e:
        raise ConfigError(str(e)) from None
    n = id_count(p.tokenizer)
    if d.vocab_size is None:
        d.vocab_size = padded(n)
    elif d.vocab_size < n:
        raise ConfigError(f"data.vocab_size: {d.vocab_size} is smaller than the {n:,} ids of {d.tokenizer}; set "
                          f"data.vocab_size=null (its size padded to a multiple of 64: {padded(n)}) or at least {n}")


def validate(cfg: Config) -> list[str]:
    """Bad values and unsupported combinations, each as a one-line message."""
    errs: list[str] = []
    d, m, o, t = cfg.data, cfg.model, cfg.optim, cfg.trainer

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errs.append(msg)

    need(bool(re.fullmatch(r"[A-Za-z0-9._-]+", cfg.run.name)), "run.name: use letters, digits, '.', '_' and '-' only")
    need(cfg.run.name not in (".", ".."), f"run.name: {cfg.run.name!r} names run.root or its parent, not a run dir; "
                                          "give the run a name")
    need(len(cfg.run.name) <= MAX_NAME, f"run.name: {len(cfg.run.name)} characters; at most {MAX_NAME}")
    need(0 <= cfg.run.seed < 2**63, "run.seed: must be between 0 and 2^63 - 1")
    need(d.tokenizer is not None or 257 <= d.vocab_size <= MAX_VOCAB,
         f"data.vocab_size: must be between 257 (256 bytes + end-of-document) and {MAX_VOCAB:,} (larger "
         "vocabularies need more memory to train than a machine has)")
    need(d.tokenizer is None or d.vocab_size <= MAX_VOCAB,
         f"data.vocab_size: {d.vocab_size:,} rows exceed {MAX_VOCAB:,} (more memory to train than a machine has)")
    need(d.seq_len >= 2, "data.seq_len: must be at least 2")
    errs += _check_length_schedule(cfg)
    need(d.batch_size >= 1, "data.batch_size: must be at least 1")
    need(0.0 < d.val_fraction < 1.0, "data.val_fraction: must be strictly between 0 and 1")
    need(d.max_documents is None or d.max_documents >= 2, "data.max_documents: must be at least 2 (or null)")
    need(d.num_proc >= 1, "data.num_proc: must be at least 1")
    need(d.num_workers >= 0, "data.num_workers: must be 0 or more")
    need(d.val_batches >= 1, "data.val_batches: must be at least 1")
    need(bool(d.source.strip()), "data.source: must not be empty")
    local = d.source in ("stdlib", "copy") or Path(d.source).expanduser().exists()
    hub_keys = [k for k in ("hf_name", "hf_revision") if getattr(d, k) is not None] + ["hf_streaming"] * d.hf_streaming
    need(not (local and hub_keys), f"data.{hub_keys[0] if hub_keys else ''}: applies to a Hugging Face dataset "
                                   f"name, and data.source={d.source} is local; remove it")
    need(d.glob is None or Path(d.source).expanduser().is_dir(),
         f"data.glob: chooses files of a directory data.source, and {d.source} is not a directory; put the pattern "
         "in data.source or remove data.glob")
    if d.source == "copy" and d.seq_len >= 2:
        from data_pipelines.probes import check_copy

        errs += check_copy(d)
    need(_known_encoding(d.encoding), f"data.encoding: {d.encoding!r} is not a text encoding Python knows "
                                      "(e.g. utf-8, latin-1, cp1252, utf-16)")

    need(m.n_layers >= 1, "model.n_layers: must be at least 1")
    need(m.n_heads >= 1, "model.n_heads: must be at least 1")
    need(m.d_model >= 1 and m.d_model % max(m.n_heads, 1) == 0,
         f"model.d_model: {m.d_model} is not divisible by model.n_heads={m.n_heads}")
    need(m.d_ff >= 1, "model.d_ff: must be at least 1")
    need(m.ffn_chunk >= 0, "model.ffn_chunk: must be 0 (no chunks) or a positive number of positions")
    need(0.0 <= m.dropout < 1.0, "model.dropout: must be in [0, 1)")
    need(m.norm in NORMS, f"model.norm: {m.norm!r} is not one of {', '.join(NORMS)}")
    need(m.init_std > 0, "model.init_std: must be positive")
    if not errs:  # the kind checks assume the basic shape is sane
        a = Assembly.of(m, d.seq_len)
        errs += a.check()
        if d.document_mask and not a.attention.caps.document_mask:
            able = ", ".join(k for k, c in AXES["attention"].items() if c.caps.document_mask)
            errs.append(f"data.document_mask=true: model.attention.kind={m.attention.kind} cannot stop attention at "
                        f"document boundaries; use one of {able}, or data.document_mask=false")

    need(o.lr > 0 and math.isfinite(o.lr), "optim.lr: must be positive")
    need(0 <= o.min_lr <= o.lr, "optim.min_lr: must be between 0 and optim.lr")
    need(o.weight_decay >= 0, "optim.weight_decay: must be 0 or more")
    need(o.warmup_steps >= 0, "optim.warmup_steps: must be 0 or more")
    need(o.decay_steps is None or o.decay_steps > o.warmup_steps,
         f"optim.decay_steps: {o.decay_steps} must exceed optim.warmup_steps={o.warmup_steps} (or be null: "
         "decay over trainer.max_steps)")
    need(o.grad_clip >= 0, "optim.grad_clip: must be 0 (off) or positive")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas: must be two numbers in [0, 1)")

    need(t.max_steps >= 1, "trainer.max_steps: must be at least 1")
    need(t.val_every_n_steps >= 1, "trainer.val_every_n_steps: must be at least 1")
    need(t.precision in PRECISIONS, f"trainer.precision: {t.precision!r} is not one of {', '.join(PRECISIONS)}")
    need(t.accelerator in ACCELERATORS,
         f"trainer.accelerator: {t.accelerator!r} is not one of {', '.join(ACCELERATORS)}")
    need(t.strategy in STRATEGIES,
         f"trainer.strategy: {t.strategy!r} is not one of {', '.join(STRATEGIES)}")
    need(t.devices == "auto" or (isinstance(t.devices, int) and (t.devices >= 1 or t.devices == -1)),
         f"trainer.devices: {t.devices!r} must be a positive count, -1 (every GPU) or auto")
    need(t.num_nodes >= 1, "trainer.num_nodes: must be at least 1")
    need(t.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches: must be at least 1")
    need(t.log_every_n_steps >= 1, "trainer.log_every_n_steps: must be at least 1")
    need(t.peak_tflops is None or t.peak_tflops > 0, "trainer.peak_tflops: must be positive (or null)")
    need(t.loss_chunk_tokens >= -1, "trainer.loss_chunk_tokens: -1 (auto), 0 (off) or a number of tokens")
    need(t.max_bad_steps >= 1, "trainer.max_bad_steps: must be at least 1 (non-finite steps tolerated in a row)")
    from lmtrain.train.loggers import LOGGERS, WANDB_MODES

    bad = [x for x in t.loggers if x not in LOGGERS]
    need(not bad, f"trainer.loggers: {bad[0] if bad else ''!r} is not one of {', '.join(LOGGERS)}")
    need(len(set(t.loggers)) == len(t.loggers), "trainer.loggers: a logger is named twice")
    need(cfg.wandb.mode in WANDB_MODES, f"wandb.mode: {cfg.wandb.mode!r} is not one of {', '.join(WANDB_MODES)}")
    if "wandb" in t.loggers and importlib.util.find_spec("wandb") is None:
        errs.append("trainer.loggers: wandb needs the wandb package (pip install 'lmtrain[wandb]'), or drop wandb")
    if t.accelerator == "cpu" and t.precision in ("16-mixed",):
        errs.append("trainer.precision=16-mixed needs a GPU; use 32-true or bf16-mixed on trainer.accelerator=cpu")

    e = cfg.eval
    need(all(L >= 1 for L in e.lengths), "eval.lengths: lengths must be positive, e.g. [128, 512, 2048]")
    need(e.mode in ("nonoverlap", "sliding"), f"eval.mode: {e.mode!r} is not one of nonoverlap, sliding")
    need(e.stride >= 0, "eval.stride: must be 0 (half of each length) or positive")
    need(not e.lengths or e.mode != "sliding" or e.stride <= min(e.lengths),
         f"eval.stride: {e.stride} exceeds the shortest of eval.lengths; a window scores at most its length")
    need(e.max_tokens >= 1, "eval.max_tokens: must be at least 1")
    need(e.every_n_steps >= 0, "eval.every_n_steps: must be 0 (at every validation) or positive")
    need(e.batch_tokens >= 1, "eval.batch_tokens: must be at least 1")
    errs += _check_deepspeed(cfg)
    if not errs:
        errs += _check_sequence_parallel(cfg)
    need(cfg.slurm.cpus_per_task >= 1, "slurm.cpus_per_task: must be at least 1")
    need(cfg.slurm.signal_seconds >= 0, "slurm.signal_seconds: must be 0 or more")
    need(cfg.checkpoint.every_n_steps >= 1, "checkpoint.every_n_steps: must be at least 1")
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last: must be at least 1")
    return errs


def _known_encoding(name: str) -> bool:
    import codecs

    try:
        return codecs.lookup(name)._is_text_encoding
    except LookupError:
        return False


# Raw DeepSpeed keys that lmtrain derives from its own config: raw key -> the key to set instead.
DEEPSPEED_OWNED = {
    "train_batch_size": "data.batch_size (per device) and trainer.accumulate_grad_batches",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "trainer.accumulate_grad_batches",
    "gradient_clipping": "optim.grad_clip",
    "fp16": "trainer.precision", "bf16": "trainer.precision", "amp": "trainer.precision",
    "optimizer": "optim.*", "scheduler": "optim.*",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "activation_checkpointing": "trainer.activation_checkpointing",
}


def _check_deepspeed(cfg: Config) -> list[str]:
    ds, t = cfg.deepspeed, cfg.trainer
    if t.strategy != "deepspeed":
        changed = [k for k, v in to_dict(ds).items() if v != getattr(DeepSpeedConfig(), k)]
        return [f"deepspeed.{changed[0]}: is set but trainer.strategy={t.strategy}; set trainer.strategy=deepspeed "
                "or drop the deepspeed keys"] if changed else []
    errs = []
    if ds.zero_stage not in (1, 2, 3):
        errs.append(f"deepspeed.zero_stage: {ds.zero_stage} is not 1, 2 or 3 "
                    "(for no sharding use trainer.strategy=ddp)")
    if ds.offload_params and ds.zero_stage != 3:
        errs.append("deepspeed.offload_params: needs deepspeed.zero_stage=3 (only stage 3 partitions parameters)")
    if ds.zero_stage == 3 and t.loss_chunk_tokens > 0:
        errs.append("trainer.loss_chunk_tokens: the fused head + loss reads the head weight outside the model's "
                    "forward, which ZeRO-3 partitions; use -1 (auto: off under ZeRO-3) or 0")
    if ds.zero_stage == 3 and getattr(residual_of(cfg), "needs_whole_parameters", False):
        errs.append(f"model.residual.kind={cfg.model.residual.kind}: its backward takes gradients for whole "
                    "parameters, which ZeRO-3 partitions outside their module's forward; "
                    "use deepspeed.zero_stage 1 or 2")
    if t.precision not in DEEPSPEED_PRECISIONS:
        errs.append(f"trainer.precision: {t.precision!r} is not supported by DeepSpeed; use one of "
                    f"{', '.join(DEEPSPEED_PRECISIONS)}")
    flat = flatten(ds.raw)
    for key in sorted(flat):
        owner = next((o for raw, o in DEEPSPEED_OWNED.items() if key == raw or key.startswith(raw + ".")), None)
        if owner:
            errs.append(f"deepspeed.raw.{key}: lmtrain sets this from {owner}; set that instead")
    return errs


def _check_length_schedule(cfg: Config) -> list[str]:
    d = cfg.data
    if d.length_batch not in ("tokens", "samples"):
        return [f"data.length_batch: {d.length_batch!r} is not tokens or samples"]
    if not d.length_schedule:
        return []
    try:
        schedule = parse_length_schedule(d.length_schedule)
    except ValueError as e:
        return [f"data.length_schedule: {e}"]
    lengths = [length for _, length in schedule]
    if max(lengths) != d.seq_len:
        return [f"data.seq_len={d.seq_len}: the longest length of the schedule {d.length_schedule} is {max(lengths)}; "
                "give the schedule in data.seq_len alone"]
    if min(lengths) < 2:
        return ["data.seq_len: every length of the schedule must be at least 2"]
    if d.length_batch == "tokens":
        odd = [L for L in lengths if d.seq_len % L]
        if odd:
            return [f"data.seq_len: {odd[0]} does not divide the longest length {d.seq_len}, so the micro-batch "
                    "cannot keep the tokens per step; use lengths that divide it, or data.length_batch=samples"]
    n = cfg.trainer.sequence_parallel
    odd = [L for L in lengths if L % max(n, 1)]
    if odd:
        return [f"data.seq_len: trainer.sequence_parallel={n} must divide every length of the schedule "
                f"({odd[0]} is not a multiple)"]
    return []


def _check_sequence_parallel(cfg: Config) -> list[str]:
    """trainer.sequence_parallel: what a split sequence needs (lmtrain/train/sequence.py)."""
    t, m, d = cfg.trainer, cfg.model, cfg.data
    n = t.sequence_parallel
    key = f"trainer.sequence_parallel={n}"
    if n < 1:
        return ["trainer.sequence_parallel: must be at least 1 (1: every process holds whole sequences)"]
    if n == 1:
        return []
    if t.strategy not in ("ddp", "deepspeed"):
        return [f"{key}: splits sequences across processes; set trainer.strategy=ddp or deepspeed"]
    if isinstance(t.devices, int) and t.devices > 0 and (t.devices * t.num_nodes) % n:
        return [f"{key} must divide the {t.devices * t.num_nodes} processes (trainer.devices x trainer.num_nodes)"]
    if d.seq_len % n:
        return [f"{key} must divide data.seq_len={d.seq_len} (equal shards of the sequence)"]
    if m.n_heads % n:
        return [f"{key} must divide model.n_heads={m.n_heads} (each process attends with n_heads / N heads)"]
    a = Assembly.of(m, d.seq_len)
    why = a.attention.head_shard_refusal(a)
    if why:
        able = ", ".join(k for k, c in AXES["attention"].items() if c.caps.head_shards)
        return [f"{key}: model.attention.kind={m.attention.kind} cannot attend over a split sequence ({why}); "
                f"use one of {able}, or trainer.sequence_parallel=1"]
    if not a.depth.splits_sequence:
        return [f"{key}: model.depth.kind={m.depth.kind} gives positions their own depth, which a split sequence "
                "does not support yet; use model.depth.kind=fixed or universal, or trainer.sequence_parallel=1"]
    if not a.residual.splits_sequence:
        return [f"{key}: model.residual.kind={m.residual.kind} reruns layers in its own backward, which a split "
                "sequence does not support yet; use model.residual.kind=prenorm, or trainer.sequence_parallel=1"]
    if d.source == "copy":
        return [f"{key}: the copy probe scores the copied half of whole sequences; train it with "
                "trainer.sequence_parallel=1"]
    return []


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dict -> {"a.b.c": value}."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def residual_of(cfg: Config) -> type:
    return AXES["residual"].get(cfg.model.residual.kind)


def from_dict(d: dict) -> Config:
    """Rebuild a saved config (checkpoint, run dir) through the same validation. Configs saved
    by earlier releases are translated (see `migrate`)."""
    return _build(migrate(OmegaConf.create(d)))


def migrate(raw: DictConfig) -> DictConfig:
    """A saved config of an earlier release in today's form: the flat keys of the position
    scheme move into its node (when they belong to the saved scheme; otherwise they had no
    effect and are dropped)."""
    model = raw.get("model")
    if not isinstance(model, DictConfig):
        return raw
    pos = model.get("position")
    kind = pos if isinstance(pos, str) else (pos.get("kind") if isinstance(pos, DictConfig) else None)
    for key, (_, owner, name) in LEGACY.items():
        leaf = key.rsplit(".", 1)[1]
        if leaf in model:
            value = model.pop(leaf)
            if kind == owner:
                model["position"] = {"kind": kind, **({} if isinstance(pos, str) else dict(pos)), name: value}
                pos = model["position"]
    return raw
