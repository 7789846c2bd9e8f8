"""``TitansConfig`` and ``TitansLM``: embedding, a stack of Titans blocks, final norm, LM head, loss.

Streaming (``forward(..., state=..., return_state=True)``): every block is exact when its input
starts on a *unit* boundary (``chunk_size`` tokens for LMM/MAG/MAL, ``segment_len`` for MAC). The
model's :class:`TitansState` therefore keeps the per-block states as of the last unit boundary plus
the token ids received since (fewer than one unit). A new piece is ``pending + new``: its
unit-aligned prefix runs from the saved states and yields the next saved states; the remainder runs
from those for its logits only and becomes the new ``pending``. Recompute is bounded by one unit
per call, and the state's size does not grow with the sequence (memory weights, conv tails, a
``window - 1`` KV cache per attention layer, ``< unit`` pending ids).

Labels follow the pre-shifted convention: ``labels[b, t]`` is the target of position ``t`` (the
next token), ``-100`` is ignored. The data pipeline shifts, so sequence-parallel splits need no halo.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans_pretrain.models.blocks import BlockState, build_block
from titans_pretrain.models.attention import Attention
from titans_pretrain.models.memory import CausalDepthwiseConv, MemoryLayer
from titans_pretrain.models.norms import RMSNorm

__all__ = ["LEGACY_DEFAULTS", "TitansConfig", "TitansLM", "TitansOutput", "TitansState"]

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


@dataclass
class TitansState:
    """Streaming state: per-block states at the last unit boundary, the ids received since
    (``(B, n)``, ``n < unit``) and ``position``, the number of tokens before ``pending``."""

    blocks: list[BlockState]
    pending: Tensor
    position: int = 0


@dataclass
class TitansOutput:
    logits: Tensor
    loss: Tensor | None = None
    state: TitansState | None = None


def upcast(logits: Tensor) -> Tensor:
    """Logits for the loss: at least fp32 (bf16 logits lose the loss's precision), fp64 kept."""
    return logits if logits.dtype == torch.float64 else logits.float()


def lm_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """The language-model loss, the one definition every path uses (one process, pipeline stages,
    context-parallel slices): token cross-entropy over pre-shifted labels, -100 ignored, on logits
    of at least fp32."""
    return F.cross_entropy(upcast(logits).flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction=reduction)


class TitansLM(nn.Module):
    """A Titans language model (variant from ``config.variant``), single device."""

    def __init__(self, config: TitansConfig, init: bool = True):
        """``init=False`` leaves the parameters as the submodules' constructors left them;
        :meth:`reset_parameters` finishes the start (the meta-device start replays the two apart)."""
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(build_block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)initialise every parameter, so a model built on the meta device and materialised
        with ``to_empty`` is complete after this call: normal(0, init_std) for linear/embedding
        weights (residual-output projections scaled by ``1/sqrt(2 n_layers)``), norms at one,
        persistent tokens normal(0, 1) (they live in normed-input space), conv weights uniform,
        then the memory layers' own inits (gate biases from the config, ``M_0``)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                last = name.rsplit(".", 1)[-1]
                nn.init.normal_(module.weight, std=out_std if last in ("out_proj", "o_proj", "down_proj") else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, CausalDepthwiseConv):
                module.reset_parameters()
            elif isinstance(module, Attention) and module.persistent is not None:
                nn.init.normal_(module.persistent, std=1.0)
        for module in self.modules():
            if isinstance(module, MemoryLayer):
                module.reset_memory_parameters()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters; ``exclude_embeddings`` leaves out the input embedding table (and the
        LM head only when it is tied to it)."""
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            params.pop(id(self.embed.weight), None)
        return sum(p.numel() for p in params.values())

    # ---------------------------------------------------------------------------------- forward
    def _run(self, input_ids: Tensor, states: list[BlockState] | None, want_state: bool):
        x = self.embed(input_ids)
        new_states = []
        for i, block in enumerate(self.blocks):
            if want_state or states is not None:
                x, s = block(x, None if states is None else states[i], return_state=True)
                new_states.append(s)
            else:
                x = block(x)
        return self.lm_head(self.norm(x)), new_states

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, state: TitansState | None = None,
                return_state: bool = False) -> TitansOutput:
        """Logits ``(B, T, vocab)`` for ``input_ids`` ``(B, T)``; ``loss`` if ``labels`` (pre-shifted
        targets, ``-100`` ignored) are given; with ``state``/``return_state``, continue/return the
        streaming state (see the module docstring)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if state is None and not return_state:
            logits, _ = self._run(input_ids, None, False)
            new_state = None
        else:
            logits, new_state = self._stream(input_ids, state)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)} "
                                 "(pre-shifted targets, -100 to ignore)")
            loss = lm_loss(logits, labels)
        return TitansOutput(logits=logits, loss=loss, state=new_state if return_state else None)

    def _stream(self, input_ids: Tensor, state: TitansState | None) -> tuple[Tensor, TitansState]:
        B, T = input_ids.shape
        if state is None:
            state = TitansState([BlockState() for _ in self.blocks], input_ids.new_zeros(B, 0), 0)
        if state.pending.shape[0] != B:
            raise ValueError(f"streaming state holds batch size {state.pending.shape[0]}, input has {B}: "
                             "start a new state (state=None) for a different batch")
        ids = torch.cat((state.pending.to(input_ids.device), input_ids), dim=1)
        n_aligned = ids.shape[1] // self.config.unit * self.config.unit
        pieces, blocks = [], state.blocks
        if n_aligned:
            logits, blocks = self._run(ids[:, :n_aligned], blocks, True)
            pieces.append(logits)
        rest = ids[:, n_aligned:]
        if rest.shape[1]:
            logits, _ = self._run(rest, blocks, True)
            pieces.append(logits)
        logits = torch.cat(pieces, dim=1)[:, ids.shape[1] - T:]
        return logits, TitansState(blocks, rest, state.position + n_aligned)

    # ------------------------------------------------------------------------------- generation
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, state: TitansState | list | None = None, *,
                 generator: torch.Generator | None = None, return_state: bool = False,
                 attention_mask: Tensor | None = None):
        """Continue ``input_ids`` by ``max_new_tokens`` tokens; see :func:`generation.generate`
        (``attention_mask`` with zeros: a padded batch, every row continued as if alone)."""
        from titans_pretrain.models.generation import generate

        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, state=state,
                        generator=generator, return_state=return_state, attention_mask=attention_mask)
