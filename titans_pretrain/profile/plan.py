"""Memory plan per rank, from the config alone: `titans-pretrain plan CONFIG --nproc N --device-memory GB`.

Nothing is materialised: parameters are counted on a model built on the meta device, and every
other figure is arithmetic on the config (docs/parallelism.md, "Memory plan", has the formulas).
Bytes are per rank; `T` below is the rank's slice of the sequence (`seq_len / cp`).

* **States.** fp32 parameters, gradients and two AdamW moments, each `4 N` bytes, divided by the
  ranks that shard them: FSDP2 over `dp_shard` after `tp` and `pp` have split the model (the rank
  holding the most: embedding or LM head on its stage). Under gradient accumulation FSDP2 keeps
  the gradients *unsharded* until the last micro-batch (`set_requires_gradient_sync(False)`):
  `4 N / (tp pp)`. DDP replicates everything; DeepSpeed shards by `zero_stage`.
* **Gathered parameters** (FSDP2): the root (embedding, LM head, final norm) stays unsharded for the
  whole step, and two blocks are unsharded at a time (the one computed and the one prefetched), fp32.
* **Activations kept for backward**: every tensor autograd saves, itemised from the model code
  (:func:`block_saved_bytes`), in the compute dtype (`a` = 2 bytes under bf16, 4 in fp32) or fp32
  (residual stream, norm statistics, the memory core). Under bf16 every linear saves its own bf16
  copy of an fp32 input, and the bf16 copy of its weight. With activation checkpointing only each
  block's input (`4 B T d`) stays, plus one block's tensors while it is recomputed.
* **Loss**: the fp32 (upcast) logits: at the start of backward the saved log-softmax, its gradient
  and the logits' gradient coexist, `3 * 4 B T V` bytes (divided by `tp`: vocabulary parallel).
* **Backward workspace**: the transient of one block's backward, dominated by the memory core
  (the gradients of all its inputs at once, plus one segment of `k` recomputed chunks).

The peak is the larger of the end of the forward (states without the gradients unless
accumulating, all activations, then the loss or one block's backward) and the end of the backward
(states with the gradients). On CUDA the plan leaves `CUDA_RESERVED_BYTES` and a `HEADROOM` share
of the device for what the allocator does not count or cannot reuse.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from titans_pretrain.config import ConfigError, RunConfig, resolve_layout

GiB = 2**30
MiB = 2**20
# Share of the device memory assumed lost to allocator fragmentation and cached blocks.
HEADROOM = 0.10
# Per GPU: CUDA context, NCCL buffers, cuBLAS / Triton workspaces (outside torch's allocator counts).
CUDA_RESERVED_BYTES = int(1.5 * GiB)
FP32 = 4


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a TitansLM, counted on the meta device."""

    total: int
    block: int  # one block (all blocks are alike)
    block_matmul: int  # of which nn.Linear weights (their bf16 copies are saved under autocast)
    embed: int
    head: int  # LM head (0 when tied to the embedding)
    other: int  # final norm


def count_params(model_cfg) -> ParamCounts:
    """Count on the meta device: no memory is allocated, whatever the model's size."""
    import torch
    from torch import nn

    from titans_pretrain.models import TitansLM

    with torch.device("meta"):
        model = TitansLM(model_cfg, init=False)
    block = model.blocks[0]
    head = 0 if model_cfg.tie_embeddings else model.lm_head.weight.numel()
    return ParamCounts(
        total=model.num_params(), block=sum(p.numel() for p in block.parameters()),
        block_matmul=sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear)),
        embed=model.embed.weight.numel(), head=head, other=sum(p.numel() for p in model.norm.parameters()))


# ------------------------------------------------------------------------------------ activations
def _memory_layer_saved(m, B: int, T: int, a: int, *, read: bool = False) -> dict[str, float]:
    """What one MemoryLayer call saves for backward over `B x T` tokens (its input, the norm output
    feeding the projections, is counted by the caller). `read`: MAC's pre-segment read instead."""
    H, D = m.n_heads, m.resolved_head_dim
    inner, tok = H * D, B * T
    conv = (T + m.conv_kernel - 1) / T  # the conv input carries its K-1 tail
    dims = [D] + [m.memory_expansion * D] * (m.memory_depth - 1) + [D]
    out_path = tok * inner * (2 * FP32 + 3 * a) + tok * H * FP32  # norm in/out fp32, gate, product, proj input
    if read:  # q stream, then M(q): the fp32 q, each hidden layer's pre-activation and activation
        hidden = sum(dims[1:-1])
        return {"projections": tok * inner * a * (2 + conv) + tok * H * 2 * FP32 + out_path,
                "memory_read": tok * H * FP32 * (D + 2 * hidden)}
    b = min(m.chunk_size, T)
    n_chunks = math.ceil(T / b)
    T_pad = n_chunks * b
    sum_layers = sum(i * o for i, o in zip(dims[:-1], dims[1:]))
    kept = math.ceil(n_chunks / m.memory_state_interval)
    return {
        # q, k: conv input, SiLU input and output; v: conv input and SiLU input; norms of q and k
        "projections": tok * inner * a * (3 * conv + 5) + tok * H * 4 * FP32 + out_path,
        # gate vectors (sigmoids, log-cumsum inputs, chunk-end coefficients), fp32
        "gates": tok * H * 14 * FP32,
        # the core's fp32 copies of q, k, v, and the b x b coefficient matrices Bratio, decay, N, G
        "memory_inputs": B * H * T_pad * FP32 * (3 * D + 4 * b),
        # weights and momentum at the start of every k-th chunk, fp32 (the state is always fp32)
        "chunk_states": B * H * kept * 2 * sum_layers * FP32,
    }


def _norm(tok: int, d: int, a: int, consumers: int, *, residual: bool = True, copies: bool = False) -> float:
    """An RMSNorm feeding `consumers` linears: its input (the residual, unless counted elsewhere),
    statistics and normalised value in fp32, and its output: shared in fp32, but under bf16
    autocast (or `copies`: a non-contiguous slice of it) every linear saves its own copy."""
    out = FP32 if a == FP32 and not copies else consumers * a
    return tok * ((FP32 * d if residual else 0) + FP32 + FP32 * d + out * d)


def _mlp(m, tok: int, a: int) -> float:
    """Residual before the MLP, its norm, and SwiGLU's gate, SiLU, up and product."""
    return _norm(tok, m.d_model, a, 2) + tok * 4 * a * m.resolved_mlp_hidden


def _attention_saved(m, B: int, T: int, a: int, mac: bool) -> float:
    """SDPA with a fused kernel: rotated q, the keys and values with the persistent tokens (and
    MAC's memory reads), its output and log-sum-exp, the o_proj input, the mask (as floats) and
    the RoPE tables."""
    H, D, n_p = m.n_heads, m.resolved_head_dim, m.n_persistent
    inner, tok = H * D, B * T
    if mac:
        C = min(m.segment_len, T)
        n_seg = math.ceil(T / C)
        keys = (2 * C + n_p) / C
        mask = n_seg * C * (2 * C + n_p) * a
        tables = n_seg * 6 * C * D // 2 * a
    elif T >= 2 * m.window:  # banded blocks of `window` queries, 2 * window - 1 keys each
        w = m.window
        n_blk = math.ceil(T / w)
        keys = n_blk * (2 * w - 1 + n_p) / T
        mask = B * n_blk * w * (2 * w - 1 + n_p) * a
        tables = 4 * T * D // 2 * a
    else:
        keys = (T + n_p) / T
        mask = T * (T + n_p) * a
        tables = 4 * T * D // 2 * a
    return tok * inner * a * (3 + 2 * keys) + tok * H * FP32 + mask + tables


def block_saved_bytes(m, B: int, T: int, a: int) -> dict[str, float]:
    """Bytes one Titans block keeps for backward over `B` sequences of `T` tokens (fp32 residual
    stream; `a` = bytes of the compute dtype), itemised. The block's input is `input`."""
    tok, d = B * T, m.d_model
    parts: dict[str, float] = {"input": tok * d * FP32}

    def add(key: str, value: float) -> None:
        parts[key] = parts.get(key, 0) + value

    def memory(read: bool = False) -> None:
        for k, v in _memory_layer_saved(m, B, T, a, read=read).items():
            add(k, v)

    v = m.variant
    mem_consumers = 7  # q, k, v, theta, eta, alpha and the output gate projections
    if v == "lmm":
        add("norms", _norm(tok, d, a, mem_consumers, residual=False))
        memory()
    elif v == "mal":
        if m.use_memory:
            add("norms", _norm(tok, d, a, mem_consumers, residual=False))
            memory()
        add("norms", _norm(tok, d, a, 3, residual=m.use_memory))
        add("attention", _attention_saved(m, B, T, a, mac=False))
    elif v == "mag":
        add("norms", _norm(tok, d, a, 3 + (mem_consumers if m.use_memory else 0), residual=False))
        add("attention", _attention_saved(m, B, T, a, mac=False))
        if m.use_memory:
            memory()
            add("norms", 2 * tok * (2 * FP32 * d + FP32 + a * d))  # out norms, sigmoid
    else:  # mac
        reads = 2 if m.use_memory else 0  # read_context's q projection and output gate
        sliced = B > 1 and T > m.segment_len  # a segment of (B, T, d) is not contiguous: copied per linear
        add("norms", _norm(tok, d, a, 3 + reads, residual=False, copies=sliced))
        add("attention", _attention_saved(m, B, T, a, mac=True))
        if m.use_memory:
            memory(read=True)
            add("attention", tok * d * a)  # the memory reads, input of the k and v projections
            # memory_in_norm of the attention output y (in the compute dtype, so is its output u,
            # shared by the memory layer's linears): y in fp32, statistics, normalised value, u;
            # and y itself under bf16 (the output gate's operand)
            add("norms", tok * (FP32 * d + FP32 + FP32 * d + a * d + (a * d if a != FP32 else 0)))
            memory()
            C = min(m.segment_len, T)
            dims = [m.resolved_head_dim] + [m.memory_expansion * m.resolved_head_dim] * (m.memory_depth - 1)
            dims.append(m.resolved_head_dim)
            add("chunk_states", B * m.n_heads * math.ceil(T / C) * FP32 *
                sum(i * o for i, o in zip(dims[:-1], dims[1:])))  # segment-end weights of the read
            if m.mac_output_gate == "sigmoid":
                add("norms", tok * (2 * FP32 * d + FP32 + a * d))
            else:  # u * r: the memory read r (u is counted)
                add("norms", tok * d * a)
    add("mlp", _mlp(m, tok, a))
    return parts


def backward_workspace_bytes(m, B: int, T: int, a: int) -> float:
    """The transient of one block's backward beyond what it saved, the larger of two moments:

    * the MLP's backward: a few gradients of `(B, T, hidden)` in flight;
    * the memory core's backward (the MLP's saved tensors are free by then): the gradients of all
      the core's inputs at once (`dq, dk, dv, dG` and the gate vectors, per call: MAC calls it per
      segment), the read's gradient, then one segment of `k` chunks recomputed with every chunk's
      start state (weights and momentum) and activations, and the gradients of `G`'s factors."""
    tok, d = B * T, m.d_model
    mlp = 4 * tok * m.resolved_mlp_hidden * max(a, FP32)
    if not (m.variant == "lmm" or m.use_memory):
        return mlp
    H, D = m.n_heads, m.resolved_head_dim
    E = m.memory_expansion * D
    dims = [D] + [E] * (m.memory_depth - 1) + [D]
    sum_layers = sum(i * o for i, o in zip(dims[:-1], dims[1:]))
    call = min(m.segment_len, T) if m.variant == "mac" else T  # tokens per memory_chunked call
    b = min(m.chunk_size, call)
    chunks = math.ceil(call / b)
    k = min(m.memory_state_interval, chunks)
    per_call = B * H * chunks * b * FP32 * (4 * D + 4 + 3 * b)  # dq, dk, dv, dy; gates; dG, dBratio, dN
    chunk_rows = 6 * (m.memory_depth - 1) * E + 2 * D + m.memory_depth * b  # a, z, d, e, h, x, P
    segment = B * H * k * FP32 * (b * chunk_rows + 2 * sum_layers)
    core = per_call + segment - _mlp(m, tok, a)
    return max(mlp, core)


# ------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Plan:
    """Bytes per rank of one training step (the rank that holds the most)."""

    world_size: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    grad_accum: int
    micro_batch_size: int
    seq_len: int
    device: str
    dtype: str
    activation_checkpointing: bool
    n_params: int
    params: int
    grads: int  # when they all exist (end of backward); unsharded while accumulating under FSDP2
    optimizer: int
    gathered: int
    block_activations: int  # one block's saved tensors
    memory_states: int  # of which the memory layer's: chunk states, coefficient matrices, core inputs
    activations: int  # without checkpointing: every block, and the final norm
    activations_ac: int  # with checkpointing: every block's input, and the final norm
    loss: int
    backward_workspace: int
    cp_buffers: int

    @property
    def states(self) -> int:
        return self.params + self.grads + self.optimizer

    def peak(self, activation_checkpointing: bool | None = None) -> int:
        ac = self.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
        grads_in_forward = self.grads if self.grad_accum > 1 else 0
        base = self.params + self.optimizer + self.gathered + self.cp_buffers
        if ac:
            forward_end = self.activations_ac + max(self.loss, self.block_activations + self.backward_workspace)
        else:
            forward_end = self.activations + max(self.loss, self.backward_workspace)
        return base + max(grads_in_forward + forward_end, self.grads)

    @property
    def peak_no_ac(self) -> int:
        return self.peak(False)

    @property
    def peak_ac(self) -> int:
        return self.peak(True)

    def to_dict(self) -> dict:
        return {**asdict(self), "states": self.states, "peak": self.peak(), "peak_no_ac": self.peak_no_ac,
                "peak_ac": self.peak_ac}


def _bf16(cfg: RunConfig, device: str) -> bool:
    mp = cfg.parallel.mixed_precision
    return mp == "bf16" or (mp == "auto" and device == "cuda")


def memory_plan(cfg: RunConfig, world_size: int, device: str = "cuda", counts: ParamCounts | None = None) -> Plan:
    """The per-rank memory of `cfg` on `world_size` ranks (`device`: cuda or cpu, for the dtype)."""
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be cuda or cpu, got {device!r}")
    layout = resolve_layout(cfg, world_size)
    p, m = cfg.parallel, cfg.model
    counts = counts or count_params(m)
    a = 2 if _bf16(cfg, device) else FP32
    tp, pp, cp = layout.tp, layout.pp, layout.cp
    B, T = layout.micro_batch_size, cfg.data.seq_len // cp

    # parameters of the rank holding the most: its share of the blocks, plus embedding or head
    stages = pp * p.pp_stages_per_rank
    per_stage = max(p.pp_layers) if p.pp_layers else math.ceil(m.n_layers / stages)
    blocks = min(per_stage * p.pp_stages_per_rank, m.n_layers)
    if pp == 1:
        local = counts.total
    else:
        local = blocks * counts.block + max(counts.embed, counts.head + counts.other)
    local //= tp
    shard = layout.dp_shard
    fsdp = p.engine == "native" and p.data_parallel == "fsdp"
    if p.engine == "deepspeed":
        z = p.zero_stage
        params = FP32 * local // (shard if z >= 3 else 1)
        grads = FP32 * local // (shard if z >= 2 else 1)
        optimizer = 2 * FP32 * local // (shard if z >= 1 else 1)
    elif fsdp:
        params, optimizer = FP32 * local // shard, 2 * FP32 * local // shard
        grads = FP32 * local if layout.grad_accum > 1 else FP32 * local // shard
    else:  # DDP
        params, grads, optimizer = FP32 * local, FP32 * local, 2 * FP32 * local
    if fsdp:
        root = (counts.embed + counts.head + counts.other) if pp == 1 else max(counts.embed, counts.head)
        gathered = FP32 * (root + 2 * counts.block) // tp
        if pp > 1:  # a stage keeps its blocks gathered across micro-batches
            gathered = FP32 * (root + blocks * counts.block) // tp
    else:
        gathered = 0

    parts = block_saved_bytes(m, B, T, a)
    if a != FP32:  # autocast's bf16 copies of the block's weights, saved by its matmuls
        parts["weight_casts"] = a * counts.block_matmul
    block = sum(parts.values()) / tp
    memory_states = sum(parts.get(k, 0) for k in ("memory_inputs", "chunk_states", "gates")) / tp
    tok = B * T
    final_norm = _norm(tok, m.d_model, a, 1) / tp + (a * counts.head / tp if a != FP32 else 0)
    layers = blocks if pp > 1 else m.n_layers
    in_flight = min(layout.grad_accum, pp) if pp > 1 else 1  # 1F1B: up to pp micro-batches per stage
    activations = in_flight * (layers * block + final_norm)
    activations_ac = in_flight * (layers * parts["input"] / tp + final_norm)
    loss = 3 * FP32 * tok * m.vocab_size / tp
    workspace = backward_workspace_bytes(m, B, T, a) / tp

    cp_buffers = 0
    if cp > 1:  # the entry state of every block is kept for its backward, plus one in flight
        H, D = m.n_heads // tp, m.resolved_head_dim
        dims = [D] + [m.memory_expansion * D] * (m.memory_depth - 1) + [D]
        relay = 0
        if m.variant == "lmm" or m.use_memory:
            relay += 2 * B * H * sum(i * o for i, o in zip(dims[:-1], dims[1:])) * FP32
            relay += B * (m.conv_kernel - 1) * H * D * (4 if m.variant == "mac" else 3) * a
        if m.variant in ("mag", "mal"):
            relay += 2 * B * (m.window - 1) * H * D * a
        cp_buffers = (layers + 1) * relay

    return Plan(
        world_size=world_size, dp_replicate=layout.dp_replicate, dp_shard=shard, cp=cp, tp=tp, pp=pp,
        grad_accum=layout.grad_accum, micro_batch_size=B, seq_len=cfg.data.seq_len, device=device,
        dtype="bf16" if a == 2 else "fp32", activation_checkpointing=p.activation_checkpointing,
        n_params=counts.total, params=int(params), grads=int(grads), optimizer=int(optimizer),
        gathered=int(gathered), block_activations=int(block), memory_states=int(memory_states),
        activations=int(activations), activations_ac=int(activations_ac), loss=int(loss),
        backward_workspace=int(workspace), cp_buffers=int(cp_buffers))


# ------------------------------------------------------------------------------------ what fits
def usable_bytes(device_memory_gib: float, device: str = "cuda", headroom: float = HEADROOM) -> int:
    """What the plan may fill of a device of `device_memory_gib` GiB: less the runtime's reserve
    (CUDA only) and a `headroom` share for fragmentation."""
    reserved = CUDA_RESERVED_BYTES if device == "cuda" else 0
    return int(device_memory_gib * GiB * (1.0 - headroom)) - reserved


def _with(cfg: RunConfig, micro_batch_size: int, seq_len: int, grad_accum: int, dp: int) -> RunConfig:
    """`cfg` at another micro-batch and length, with the same number of micro-batches per step."""
    from titans_pretrain.config import validate

    out = replace(cfg, train=replace(cfg.train, micro_batch_size=micro_batch_size,
                                     global_batch_tokens=micro_batch_size * seq_len * grad_accum * dp),
                  data=replace(cfg.data, seq_len=seq_len))
    validate(out)
    return out


def largest_fit(cfg: RunConfig, world_size: int, budget: int, device: str = "cuda",
                counts: ParamCounts | None = None, limit: int = 2**24) -> tuple[int, int]:
    """`(micro_batch_size, seq_len)`: the largest power-of-two micro-batch at the config's length,
    and the longest length (the smallest valid length doubled: a multiple of the block unit, of
    cp and of tp) at the config's micro-batch, whose peak fits in `budget` bytes (0: none fits)."""
    counts = counts or count_params(cfg.model)
    layout = resolve_layout(cfg, world_size)
    accum, dp = layout.grad_accum, layout.dp_size

    def fits(micro: int, seq: int) -> bool:
        try:
            return memory_plan(_with(cfg, micro, seq, accum, dp), world_size, device, counts).peak() <= budget
        except ConfigError:
            return False

    best_batch, micro = 0, 1
    while micro <= limit // cfg.data.seq_len and fits(micro, cfg.data.seq_len):
        best_batch, micro = micro, micro * 2
    unit = getattr(cfg.model, "unit", 1) * layout.cp
    step = unit * layout.tp // math.gcd(unit, layout.tp)
    best_len, seq = 0, step
    while seq <= limit and fits(cfg.train.micro_batch_size, seq):
        best_len, seq = seq, seq * 2
    return best_batch, best_len


# ------------------------------------------------------------------------------------------ report
def _size(n: float) -> str:
    return f"{n / GiB:8.2f} GiB" if n >= GiB else f"{n / MiB:8.1f} MiB"


def format_plan(plan: Plan, budget: int | None = None) -> str:
    ac = plan.activation_checkpointing
    grads_note = "unsharded while accumulating" if plan.grad_accum > 1 and plan.params != plan.grads else "sharded"
    rows = [
        ("parameters (fp32)", plan.params),
        (f"gradients (fp32, {grads_note})", plan.grads),
        ("optimizer state (AdamW, 2 moments)", plan.optimizer),
        ("gathered parameters (FSDP2: root + 2 blocks)", plan.gathered),
        ("activations without checkpointing", plan.activations),
        ("activations with checkpointing", plan.activations_ac),
        ("  one block's saved tensors", plan.block_activations),
        ("  of which the memory layer's saved states", plan.memory_states),
        ("logits and loss (fp32)", plan.loss),
        ("backward workspace (one block)", plan.backward_workspace),
        ("context-parallel buffers", plan.cp_buffers),
        ("peak without checkpointing" + ("" if ac else "  <- this config"), plan.peak_no_ac),
        ("peak with checkpointing" + ("  <- this config" if ac else ""), plan.peak_ac),
    ]
    lines = [f"plan: {plan.world_size} rank(s) = dp_replicate {plan.dp_replicate} x dp_shard {plan.dp_shard} x "
             f"cp {plan.cp} x tp {plan.tp} x pp {plan.pp}; {plan.device} {plan.dtype}; {plan.n_params / 1e6:,.1f}M "
             f"parameters; micro-batch {plan.micro_batch_size} x {plan.seq_len} tokens, {plan.grad_accum} "
             f"micro-batch(es) per step",
             f"{'per rank':<50}{'bytes':>12}"]
    lines += [f"{name:<50}{_size(value):>12}" for name, value in rows]
    if budget is not None:
        verdict = "fits" if plan.peak() <= budget else "DOES NOT FIT"
        lines.append(f"{'usable device memory':<50}{_size(budget):>12}   -> {verdict}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI
def _options(p, defaults: bool = True) -> None:
    import argparse

    def d(value):
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--nproc", type=int, default=d(1), help="ranks (world size) of the run (default 1)")
    p.add_argument("--device-memory", type=float, default=d(None), metavar="GiB",
                   help="memory of one device in GiB (80 for an 80 GB GPU): say what fits")
    p.add_argument("--device", choices=("cuda", "cpu"), default=d("cuda"),
                   help="sets the compute dtype under parallel.mixed_precision=auto (default cuda)")
    p.add_argument("--headroom", type=float, default=d(HEADROOM),
                   help=f"share of the device kept free for fragmentation (default {HEADROOM})")


def add_arguments(parser) -> None:
    import argparse

    parser.add_argument("config", help="YAML run config (see configs/)")
    # REMAINDER: options may also follow the overrides (sorted out in `run`)
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="dotted overrides, e.g. data.seq_len=8192")
    _options(parser)


def run(args) -> int:
    import argparse
    import sys

    from titans_pretrain.config import load_config

    try:
        if any(item.startswith("-") for item in args.overrides):
            late = argparse.ArgumentParser(prog="titans-pretrain plan CONFIG")
            late.add_argument("overrides", nargs="*")
            _options(late, defaults=False)
            vars(args).update(vars(late.parse_intermixed_args(args.overrides)))
        if args.nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
        if not 0 <= args.headroom < 1:
            raise ConfigError(f"--headroom must be in [0, 1), got {args.headroom}")
        cfg = load_config(args.config, args.overrides)
        counts = count_params(cfg.model)
        plan = memory_plan(cfg, args.nproc, args.device, counts)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    budget = None
    if args.device_memory is not None:
        if args.device_memory <= 0:
            print(f"config error: --device-memory must be > 0 GiB, got {args.device_memory}", file=sys.stderr)
            return 2
        budget = usable_bytes(args.device_memory, args.device, args.headroom)
    print(format_plan(plan, budget))
    if budget is not None:
        batch, length = largest_fit(cfg, args.nproc, budget, args.device, counts)
        reserve = f"{CUDA_RESERVED_BYTES / GiB:.1f} GiB runtime reserve, " if args.device == "cuda" else ""
        print(f"device memory {args.device_memory:g} GiB: usable {budget / GiB:.2f} GiB ({reserve}"
              f"{args.headroom:.0%} headroom)")
        print(f"largest micro-batch at seq_len {cfg.data.seq_len}: {batch or 'none fits'}")
        print(f"largest seq_len at micro-batch {cfg.train.micro_batch_size}: {length or 'none fits'}")
    return 0
