"""Run configuration: typed dataclasses loaded from YAML with dotted `key=value` overrides.

One source of truth: the `model` section *is* `TitansConfig` (`config/model.py`; the models import
it and re-export it as `titans_pretrain.models.TitansConfig`); the other sections are defined here.
Every error names the offending key and says how to fix it, because a typo in a week-long job's
config must fail in the first second, not after the first checkpoint.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from titans_pretrain.config.model import TitansConfig


class ConfigError(ValueError):
    """A config key is unknown, has a bad value, or contradicts another key."""


# ----------------------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    """Where tokens come from. `path` holds a prepared dataset (`manifest.json`); when it is missing
    the trainer prepares it there first from `inputs` (None = the embedded default corpus)."""

    # prepared dataset folder (manifest.json; prepared there first when missing), or a URL read
    # through webdataset: file://, http(s)://, pipe:COMMAND, brace-listed shards (docs/data.md)
    path: str = "data/default"
    cache: Optional[str] = None  # folder keeping a URL dataset's shards after a checked read
    # a mixture instead of `path`: [{path: FOLDER_OR_URL, weight: W, name: N (optional)}, ...],
    # prepared datasets with one tokenizer, interleaved by weight per sample (docs/data.md)
    sources: Optional[list[Any]] = None
    inputs: Optional[list[str]] = None  # files/globs to prepare from; None = the embedded corpus
    tokenizer: Optional[str] = None  # an existing sentencepiece .model; None = train one
    vocab_size: int = 8192  # used when a tokenizer is trained
    seq_len: int = 512  # tokens per training sequence (the dataset is prepared for it)
    num_workers: int = 0  # DataLoader worker processes per rank
    prepare_workers: int = 1  # processes that tokenize when the dataset is prepared
    corpus_bytes: Optional[int] = None  # cap on the embedded default corpus; None = its default
    val_fraction: float = 0.02  # share of documents held out for validation when preparing
    # a missing, truncated or corrupt shard: "error" stops naming it; "skip" leaves it out (or masks
    # its samples when found while reading) and logs which, so a long run survives one bad file
    on_corrupt: Literal["error", "skip"] = "error"  # a shard failing its manifest check: stop or leave out


@dataclass
class ParallelConfig:
    """Parallel layout. Sizes multiply to the world size; `dp_shard=-1` takes what is left."""

    engine: Literal["native", "deepspeed"] = "native"  # native (FSDP2/DTensor/pipelining) or deepspeed (ZeRO)
    data_parallel: Literal["fsdp", "ddp"] = "fsdp"  # native engine only
    dp_replicate: int = 1  # > 1 with fsdp = HSDP (replicate across groups, shard within)
    dp_shard: int = -1  # FSDP shard group size; -1 = what the other sizes leave
    cp: int = 1  # context parallel: ranks per sequence, each a contiguous slice, memory state relayed
    cp_microbatches: int = 1  # cp: pieces of the batch per block hand-off (shortens the wavefront fill)
    tp: int = 1  # tensor parallel: ranks that split attention and memory by heads
    pp: int = 1  # pipeline parallel: stages
    # pipeline: schedule, virtual stages per rank (interleaved_1f1b needs >= 2), and the blocks per
    # stage (None = balanced by a per-layer cost estimate; else one count per stage, pp*stages_per_rank)
    pp_schedule: Literal["1f1b", "interleaved_1f1b", "gpipe"] = "1f1b"  # pipeline schedule
    pp_stages_per_rank: int = 1  # virtual stages per rank (interleaved_1f1b)
    pp_layers: Optional[list[int]] = None  # layers per stage; None = balanced by cost
    zero_stage: int = 2  # deepspeed engine only
    cpu_offload: bool = False  # deepspeed: ZeRO offload of optimizer (and params at stage 3)
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False  # recompute each block in backward (frees its activations)
    compile: bool = False  # torch.compile each block
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto = nccl on GPU, gloo on CPU
    # never build the whole model on a rank: native engine on the meta device, then each rank
    # initialises its shards; deepspeed ZeRO-3 partitioned at construction (other ZeRO stages keep a
    # full copy anyway). The weights of an eager start, bit for bit. false: build whole, then shard
    meta_init: bool = True  # build on the meta device, then initialise only this rank's shards


@dataclass
class TrainConfig:
    steps: int = 100  # total optimizer steps (the schedule's length)
    stop_at: int = 0  # save and exit 0 once this step is reached (a time-boxed slot); 0 = never
    seed: int = 0  # seeds the weights, the data order and every RNG
    deterministic: bool = False  # deterministic kernels (torch.use_deterministic_algorithms)
    global_batch_tokens: int = 8192  # tokens per optimizer step, over all ranks and micro-steps
    micro_batch_size: int = 4  # sequences per rank per forward/backward
    max_bad_steps: int = 5  # abort after this many non-finite steps in a row
    val_interval: int = 0  # steps between validation passes; 0 = only at the end
    val_batches: int = 4  # batches per validation pass
    sample_tokens: int = 64  # greedy sample generated at the end; 0 = none
    sample_prompt: str = "def "  # prompt of the greedy sample at the end


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1  # AdamW weight decay (not on the no_decay kinds)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"  # learning-rate schedule after warmup
    warmup_steps: int = 10  # linear warmup from lr / warmup_steps to lr
    decay_fraction: float = 0.2  # wsd: last fraction of steps that decays
    grad_clip: float = 1.0  # 0 = no clipping (the norm is still measured and logged)
    # parameter kinds without weight decay: norm, bias, embedding
    no_decay: list[str] = field(default_factory=lambda: ["norm", "bias", "embedding"])


@dataclass
class CheckpointConfig:
    interval: int = 100  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # newest verified checkpoints of this run kept by pruning
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple; 0 = none
    async_save: bool = False  # write shards in a background thread
    resume: str = "auto"  # "auto" (newest complete), "none", or a checkpoint folder
    verify: Literal["hash", "size"] = "hash"  # integrity check on resume
    save_at_end: bool = True  # save when training ends


@dataclass
class LoggingConfig:
    interval: int = 10  # steps between metric lines (console, metrics.jsonl, loggers)
    console: bool = True  # progress line on stdout
    tensorboard: bool = False  # also write TensorBoard events under run_dir/tensorboard
    wandb: Literal["online", "offline", "disabled"] = "disabled"  # Weights & Biases mode
    wandb_project: str = "titans-pretrain"  # Weights & Biases project
    run_name: Optional[str] = None  # name in the loggers; None = the run_dir's name


SECTION_CLASSES: dict[str, type] = {
    "model": TitansConfig,
    "data": DataConfig,
    "parallel": ParallelConfig,
    "train": TrainConfig,
    "optim": OptimConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}
SECTIONS = tuple(SECTION_CLASSES)


@dataclass
class RunConfig:
    model: TitansConfig
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_dir: str = "runs/default"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)



# ----------------------------------------------------------------------------------------- coercion
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert `value` to annotation `tp`; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):  # "a,b" on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build_dataclass(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}.{unknown[0]}; valid keys of '{prefix}': {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints.get(k, Any), f"{prefix}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, AssertionError) as exc:
        raise ConfigError(f"{prefix}: {exc}") from exc


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], parsed value). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.steps=10)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = _deep_merge({}, raw)
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] not in (*SECTIONS, "run_dir"):
            raise ConfigError(
                f"unknown key {'.'.join(parts)}: the first part must be one of {[*SECTIONS, 'run_dir']}"
            )
        node = raw
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {text!r}: {p} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return raw


def config_from_dict(raw: dict) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError("the config file must be a YAML mapping with sections " + ", ".join(SECTIONS))
    unknown = sorted(set(raw) - {*SECTIONS, "run_dir"})
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]}: top-level keys are {[*SECTIONS, 'run_dir']}")
    kwargs = {name: _build_dataclass(cls, raw.get(name) or {}, name) for name, cls in SECTION_CLASSES.items()}
    cfg = RunConfig(**kwargs, run_dir=_coerce(raw.get("run_dir", "runs/default"), str, "run_dir"))
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Load a YAML config file (or defaults when `path` is None) and apply dotted overrides."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist (see configs/ for examples)")
        raw = _read_yaml(p)
    return config_from_dict(apply_overrides(raw, list(overrides)))


def _read_yaml(path: Path) -> dict:
    """The file's mapping of sections; a parser error or another top level is a ConfigError."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}; fix the file (see configs/ "
                          "for examples)") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        kind = {list: "a list", str: "a string"}.get(type(raw), f"a {type(raw).__name__}")
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, train:, ...), "
                          f"got {kind}")
    return raw


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------------------- validation
def _positive(value: int | float, key: str, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{key}: must be {'>= 0' if zero_ok else '> 0'}, got {value}")


def validate(cfg: RunConfig) -> None:
    """Checks that need one config only (no world size). See `resolve_layout` for the rest."""
    t, o, p, c, d = cfg.train, cfg.optim, cfg.parallel, cfg.checkpoint, cfg.data
    if not cfg.run_dir.strip():
        raise ConfigError("run_dir is empty: it would train into the current directory; set "
                          "run_dir=runs/NAME (the folder for config.yaml, metrics.jsonl, checkpoints/)")
    _positive(t.steps, "train.steps")
    _positive(t.micro_batch_size, "train.micro_batch_size")
    _positive(t.stop_at, "train.stop_at", zero_ok=True)
    _positive(t.global_batch_tokens, "train.global_batch_tokens")
    _positive(t.max_bad_steps, "train.max_bad_steps")
    _positive(t.val_interval, "train.val_interval", zero_ok=True)
    _positive(t.val_batches, "train.val_batches", zero_ok=True)
    _positive(t.sample_tokens, "train.sample_tokens", zero_ok=True)
    _positive(o.lr, "optim.lr")
    _positive(o.warmup_steps, "optim.warmup_steps", zero_ok=True)
    _positive(o.grad_clip, "optim.grad_clip", zero_ok=True)
    _positive(o.weight_decay, "optim.weight_decay", zero_ok=True)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    if not 0.0 < o.decay_fraction <= 1.0:
        raise ConfigError(f"optim.decay_fraction: must be in (0, 1], got {o.decay_fraction}")
    if o.warmup_steps >= t.steps and o.schedule != "constant":
        raise ConfigError(
            f"optim.warmup_steps ({o.warmup_steps}) must be smaller than train.steps ({t.steps}); "
            "lower the warmup or raise the steps"
        )
    _positive(d.seq_len, "data.seq_len")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {d.val_fraction}")
    if t.global_batch_tokens % d.seq_len:
        raise ConfigError(
            f"train.global_batch_tokens ({t.global_batch_tokens}) must be a multiple of data.seq_len "
            f"({d.seq_len}); try {max(1, t.global_batch_tokens // d.seq_len) * d.seq_len}"
        )
    _positive(cfg.logging.interval, "logging.interval")
    _positive(c.interval, "checkpoint.interval", zero_ok=True)
    _positive(c.keep_last, "checkpoint.keep_last")
    _positive(c.keep_every, "checkpoint.keep_every", zero_ok=True)
    for key in ("dp_replicate", "cp", "tp", "pp"):
        _positive(getattr(p, key), f"parallel.{key}")
    if p.dp_shard != -1:
        _positive(p.dp_shard, "parallel.dp_shard")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage: must be 0, 1, 2 or 3, got {p.zero_stage}")
    _positive(p.cp_microbatches, "parallel.cp_microbatches")
    if p.cp > 1:
        _validate_context_parallel(cfg)
    _validate_tp_pp(cfg)
    if p.engine == "deepspeed":
        if p.dp_replicate != 1:
            raise ConfigError("parallel.dp_replicate > 1 is an FSDP (HSDP) option; with "
                              "parallel.engine=deepspeed set parallel.dp_replicate=1")
        if p.data_parallel == "ddp" and p.zero_stage > 0:
            pass  # data_parallel is ignored by the deepspeed engine
    if p.data_parallel == "ddp" and p.dp_replicate != 1 and p.engine == "native":
        raise ConfigError("parallel.dp_replicate > 1 needs parallel.data_parallel=fsdp (HSDP); "
                          "with ddp every rank is a replica: set parallel.dp_replicate=1")
    if c.resume not in ("auto", "none") and not c.resume:
        raise ConfigError("checkpoint.resume: use auto, none, or a checkpoint folder")
    m = cfg.model
    heads = getattr(m, "n_heads", None)
    d_model = getattr(m, "d_model", None)
    if heads and d_model and getattr(m, "head_dim", None) is None and d_model % heads:
        raise ConfigError(f"model.d_model ({d_model}) must be divisible by model.n_heads ({heads}) "
                          "or set model.head_dim")
    if heads and heads % p.tp:
        raise ConfigError(f"model.n_heads ({heads}) must be divisible by parallel.tp ({p.tp})")


def _validate_context_parallel(cfg: RunConfig) -> None:
    p, m = cfg.parallel, cfg.model
    if p.engine != "native":
        raise ConfigError(f"parallel.cp={p.cp} needs parallel.engine=native (the DeepSpeed engine has no "
                          "context parallelism); set parallel.engine=native or parallel.cp=1")
    if p.compile:
        raise ConfigError(f"parallel.cp={p.cp} with parallel.compile=true is not supported yet (the state "
                          "relay is not traced); set parallel.compile=false")
    if p.pp > 1 and p.cp_microbatches > 1:
        raise ConfigError(f"parallel.cp_microbatches={p.cp_microbatches} with parallel.pp={p.pp}: the pipeline's "
                          "micro-batches already fill the cp wavefront; set parallel.cp_microbatches=1")
    if cfg.train.micro_batch_size % p.cp_microbatches:
        raise ConfigError(f"parallel.cp_microbatches ({p.cp_microbatches}) must divide train.micro_batch_size "
                          f"({cfg.train.micro_batch_size})")
    unit = getattr(m, "unit", None)
    if unit is not None:
        check_cp_layout(cfg.data.seq_len, p.cp, unit, m.variant)


# ------------------------------------------------- layout arithmetic (the distributed code uses it too)
def check_cp_layout(seq_len: int, cp: int, unit: int, variant: str) -> None:
    """Each slice must start on the blocks' unit grid, or the relayed result would differ."""
    what = "MAC segment (model.segment_len)" if variant == "mac" else "memory chunk (model.chunk_size)"
    if seq_len % cp:
        raise ConfigError(f"data.seq_len={seq_len} is not divisible by parallel.cp={cp}: every rank of a "
                          "context-parallel group holds an equal slice; change seq_len or cp")
    if (seq_len // cp) % unit:
        raise ConfigError(
            f"parallel.cp={cp} gives slices of {seq_len // cp} tokens, which would split a {what} of "
            f"{unit} tokens across ranks: each slice must be a multiple of {unit}. Use a cp that "
            f"divides {seq_len // unit} (the number of {unit}-token units per sequence)")


def check_tp_model(config, tp: int, seq_len: int | None = None) -> None:
    """Raise ConfigError naming the key and the fix when the model cannot be split ``tp`` ways."""
    if tp == 1:
        return
    need = {"model.n_heads": config.n_heads, "model.vocab_size": config.vocab_size,
            "model.mlp_hidden (resolved)": config.resolved_mlp_hidden}
    if seq_len is not None:
        need["data.seq_len (sequence parallel)"] = seq_len
    for key, value in need.items():
        if value % tp:
            raise ConfigError(f"{key} = {value} is not divisible by parallel.tp = {tp}; pick a tp that "
                              f"divides it (or change {key.split(' ')[0]})")
    if config.tie_embeddings:
        raise ConfigError("model.tie_embeddings=true is not supported with parallel.tp > 1 (the embedding "
                          "and the LM head shard the shared table differently); set one of them off")


def _validate_tp_pp(cfg: RunConfig) -> None:
    """Tensor/pipeline parallel checks that need no world size (see `resolve_layout` for the rest)."""
    p, m = cfg.parallel, cfg.model
    for key in ("tp", "pp"):
        if getattr(p, key) > 1 and p.engine != "native":
            raise ConfigError(f"parallel.{key}={getattr(p, key)} needs parallel.engine=native (DeepSpeed "
                              f"runs data parallel only here); set parallel.engine=native or parallel.{key}=1")
        if getattr(p, key) > 1 and p.data_parallel == "ddp":
            raise ConfigError(f"parallel.{key}={getattr(p, key)} composes with FSDP2, not DDP; set "
                              "parallel.data_parallel=fsdp")
    if p.tp > 1 and hasattr(m, "resolved_mlp_hidden"):
        check_tp_model(m, p.tp, cfg.data.seq_len)
    _positive(p.pp_stages_per_rank, "parallel.pp_stages_per_rank")
    stages = p.pp * p.pp_stages_per_rank
    if p.pp_schedule == "interleaved_1f1b" and p.pp > 1 and p.pp_stages_per_rank < 2:
        raise ConfigError("parallel.pp_schedule=interleaved_1f1b needs parallel.pp_stages_per_rank >= 2 "
                          "(virtual stages per rank); set it to 2, or use parallel.pp_schedule=1f1b")
    if p.pp_schedule != "interleaved_1f1b" and p.pp_stages_per_rank != 1:
        raise ConfigError(f"parallel.pp_stages_per_rank={p.pp_stages_per_rank} needs "
                          "parallel.pp_schedule=interleaved_1f1b (1f1b and gpipe run one stage per rank)")
    n_layers = getattr(m, "n_layers", None)
    if p.pp > 1 and n_layers is not None and n_layers < stages:
        raise ConfigError(f"model.n_layers ({n_layers}) is smaller than the number of pipeline stages "
                          f"parallel.pp x pp_stages_per_rank = {stages}: every stage needs at least one "
                          "block; lower parallel.pp (or pp_stages_per_rank)")
    if p.pp_layers is not None:
        if len(p.pp_layers) != stages or any(n < 1 for n in p.pp_layers) or (
                n_layers is not None and sum(p.pp_layers) != n_layers):
            raise ConfigError(f"parallel.pp_layers={p.pp_layers}: give one count >= 1 per stage "
                              f"({stages} = pp x pp_stages_per_rank) summing to model.n_layers ({n_layers})")


@dataclass(frozen=True)
class Layout:
    """The resolved parallel layout and batch arithmetic for one world size."""

    world_size: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    dp_size: int
    micro_batch_size: int
    grad_accum: int
    global_batch_seqs: int


def resolve_layout(cfg: RunConfig, world_size: int) -> Layout:
    """Fill `dp_shard=-1`, check the sizes multiply to the world size and the batch divides."""
    p, t = cfg.parallel, cfg.train
    other = p.dp_replicate * p.cp * p.tp * p.pp
    if world_size % other:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.dp_replicate*cp*tp*pp = {other}; "
            "change the parallel sizes or the number of processes"
        )
    dp_shard = world_size // other if p.dp_shard == -1 else p.dp_shard
    if dp_shard * other != world_size:
        raise ConfigError(
            f"parallel sizes dp_replicate={p.dp_replicate} x dp_shard={dp_shard} x cp={p.cp} x "
            f"tp={p.tp} x pp={p.pp} = {dp_shard * other} != world size {world_size}; "
            "set parallel.dp_shard=-1 to fill the rest automatically"
        )
    dp = p.dp_replicate * dp_shard
    seqs = t.global_batch_tokens // cfg.data.seq_len
    per_step = t.micro_batch_size * dp
    if seqs % per_step:
        raise ConfigError(
            f"train.global_batch_tokens={t.global_batch_tokens} is {seqs} sequences of "
            f"{cfg.data.seq_len}, not divisible by train.micro_batch_size ({t.micro_batch_size}) x "
            f"data-parallel size ({dp}) = {per_step}; make the global batch a multiple of "
            f"{per_step * cfg.data.seq_len} tokens or change the micro batch"
        )
    accum = seqs // per_step
    if p.pp > 1 and accum < p.pp:
        raise ConfigError(
            f"pipeline parallel runs the {accum} micro-batch(es) of gradient accumulation through "
            f"{p.pp} stages; it needs at least parallel.pp = {p.pp} micro-batches to fill the pipeline: "
            f"raise train.global_batch_tokens or lower train.micro_batch_size")
    if p.pp_schedule == "interleaved_1f1b" and p.pp > 1 and accum % p.pp:
        raise ConfigError(f"parallel.pp_schedule=interleaved_1f1b needs the micro-batches per step ({accum}) "
                          f"to be a multiple of parallel.pp ({p.pp}); change train.global_batch_tokens or "
                          "train.micro_batch_size")
    return Layout(world_size, p.dp_replicate, dp_shard, p.cp, p.tp, p.pp, dp, t.micro_batch_size,
                  accum, seqs)
