"""The model's hyperparameters, ``TitansConfig``: the ``model`` section of a run config.

A plain dataclass that needs nothing but the standard library, so the run config (the layer below
the models) holds it, and the models, checkpoints and exports read the one definition.
``titans_pretrain.models`` re-exports it. The comment beside each field is its meaning in
``titans-pretrain config``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ACTIVATIONS", "LEGACY_DEFAULTS", "MAC_OUTPUT_GATES", "TitansConfig", "VARIANTS"]

VARIANTS = ("mac", "mag", "mal", "lmm")
ACTIVATIONS = ("gelu", "silu")
MAC_OUTPUT_GATES = ("sigmoid", "product")
# Keys added after models were first saved, with the value that reproduces those models: a saved
# config (a checkpoint's config.yaml, an exported config.json) that lacks one reads as this, not as
# today's default. MAC's output was the plain product; the memory ran the bare rule (no clip).
LEGACY_DEFAULTS = {"mac_output_gate": "product", "surprise_clip": 0.0}


@dataclass
class TitansConfig:
    """Model hyperparameters. Gate conventions (paper silent, our choice):

    ``theta = theta_max * sigmoid(x w + theta_bias)``, ``eta = eta_max * sigmoid(...)`` (``eta_max =
    0.9``: at most ~10 tokens of momentum), ``alpha = sigmoid(...)``. ``eta_bias = 1`` and
    ``alpha_bias = -6`` (forgetting ~0.0025 per token) start with little forgetting, as the paper
    advises; ``theta_bias = -1`` starts theta at ~0.27 theta_max.

    **Stability** (docs/training.md, "Memory stability", has the measurements). A chunk of aligned
    keys moves the memory by up to ``theta * chunk_size / (1 - eta)`` times the inner curvature, and
    past ~2 the inner descent overshoots and the memory diverges chunk by chunk. So every token's
    surprise is clipped to norm ``surprise_clip`` (a per-token scale of theta, exact in the dual form
    and the kernels): the memory moves by at most ``theta_max * surprise_clip`` per token, and where
    surprises are large the inner step shrinks with them, which keeps the chunk-to-chunk map
    contracting. ``0`` is the bare rule (the default of checkpoints written before the key existed,
    see ``LEGACY_DEFAULTS``).

    ``memory_state_interval``: the memory core keeps the chunk-start state of every k-th chunk for
    backward and recomputes the chunks in between (the same numbers for any k; docs/parallelism.md,
    "Memory arithmetic", has the bytes and bench/RESULTS.md the time).

    ``mac_output_gate``: MAC's output ``y (x) M(y)`` as ``y * sigmoid(norm(M(u)))`` (``"sigmoid"``,
    the non-linear gate of the paper's §4.2, as MAG) or ``u * M(u)`` (``"product"``, the plain
    product, which learns much more slowly; see ``MACBlock``).
    """

    variant: str = "mac"  # mac, mag, mal or lmm (docs/method.md §4)
    vocab_size: int = 8192  # tokenizer vocabulary size
    d_model: int = 256  # model width
    n_layers: int = 4  # blocks
    n_heads: int = 4  # attention and memory heads
    head_dim: int | None = None  # per-head width; None = d_model / n_heads
    mlp_hidden: int | None = None  # SwiGLU hidden width; None = about 8/3 d_model
    memory_depth: int = 2  # layers of the memory MLP (1 = a linear memory)
    memory_expansion: int = 4  # memory MLP hidden width = memory_expansion x head_dim
    memory_activation: str = "gelu"  # the memory MLP's activation
    chunk_size: int = 64  # tokens per chunk of the memory's chunked update (surprises at the chunk start)
    theta_max: float = 0.003  # cap of the inner learning rate theta
    surprise_clip: float = 0.3  # per-token surprise norm bound; 0 = the bare rule
    memory_state_interval: int = 4  # keep every k-th chunk-start state for backward, recompute the rest
    theta_bias: float = -1.0  # initial bias of theta's gate
    eta_bias: float = 1.0  # initial bias of the momentum gate eta
    eta_max: float = 0.9  # cap of the momentum eta
    alpha_bias: float = -6.0  # initial bias of the forgetting gate alpha (very negative: little forgetting)
    per_chunk_gates: bool = False  # one theta/eta/alpha per chunk instead of per token
    conv_kernel: int = 4  # causal depthwise convolution width on q, k, v
    window: int = 512  # sliding-window attention width (MAG, MAL)
    segment_len: int = 256  # MAC segment length (attention never crosses segments)
    n_persistent: int = 4  # learned persistent-memory tokens per layer
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # share input and output embeddings
    init_std: float = 0.02  # standard deviation of the weight initialisation
    use_memory: bool = True  # False = the same blocks without the memory (an ablation; not for lmm)
    mac_output_gate: str = "sigmoid"  # MAC's output: sigmoid (gated, normed) or product (y * M(y))

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"TitansConfig.{name}={getattr(self, name)!r}: {why}")

        if self.variant not in VARIANTS:
            raise bad("variant", f"must be one of {VARIANTS}")
        if self.mac_output_gate not in MAC_OUTPUT_GATES:
            raise bad("mac_output_gate", f"must be one of {MAC_OUTPUT_GATES}")
        if self.memory_activation not in ACTIVATIONS:
            raise bad("memory_activation", f"must be one of {ACTIVATIONS}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "memory_depth", "memory_expansion",
                     "chunk_size", "conv_kernel", "window", "segment_len", "memory_state_interval"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "must be a positive integer")
        if not isinstance(self.n_persistent, int) or self.n_persistent < 0:
            raise bad("n_persistent", "must be an integer >= 0")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise bad("n_heads", f"must divide d_model={self.d_model} (or set head_dim explicitly)")
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            raise bad("head_dim", "must be an even integer >= 2 (RoPE rotates pairs)")
        if self.resolved_head_dim % 2:
            raise bad("n_heads", f"gives head_dim={self.resolved_head_dim}, which must be even for RoPE")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise bad("mlp_hidden", "must be a positive integer or None")
        if not self.theta_max > 0:
            raise bad("theta_max", "must be > 0")
        if not 0 < self.eta_max <= 1:
            raise bad("eta_max", "must be in (0, 1]")
        if not (isinstance(self.surprise_clip, (int, float)) and 0 <= self.surprise_clip < math.inf):
            raise bad("surprise_clip", "must be a finite number >= 0 (0 = the bare rule, no clip)")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be > 0")
        if self.variant == "lmm" and not self.use_memory:
            raise bad("use_memory", "cannot be False for variant 'lmm': the memory is its only token mixer")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_mlp_hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def unit(self) -> int:
        """Tokens per streaming unit: a block call starting on a multiple of this is exact."""
        return self.segment_len if self.variant == "mac" else self.chunk_size
