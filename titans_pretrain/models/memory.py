"""The neural long-term memory as a layer (docs/method.md §1, paper §3.1 and §4.4).

Input path, per stream (q, k, v): linear projection -> causal depthwise conv -> SiLU, then q and k
are l2-normalised per head. Gates come from the layer input, per token and per head:
``theta = theta_max * sigmoid(x w + b)``, ``eta = eta_max * sigmoid(...)``, ``alpha = sigmoid(...)``.
The memory itself (:mod:`memory_ops`) starts from the learned per-head ``M_0``. Output path:
per-head RMSNorm of the read, times ``sigmoid(x W_g)``, then the output projection.

Everything that mixes channels within the layer stays inside a head (the conv is depthwise, the
norms are per head), so tensor parallelism over heads needs no communication here.

The layer is stateless: its recurrent state is a :class:`MemoryLayerState` value (the memory state
plus the conv tails, the last ``kernel - 1`` pre-conv inputs of each stream), taken and returned
by :meth:`MemoryLayer.forward`. Passing the state returned by one call into the next continues the
sequence exactly, provided each call starts on the chunk grid (the chunk grid starts at ``t = 0``
of every call, and per-chunk gates are read at chunk starts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans_pretrain.models.memory_ops import MemoryState, init_state, memory_chunked, memory_read
from titans_pretrain.models.norms import RMSNorm

if TYPE_CHECKING:  # pragma: no cover
    from titans_pretrain.config.model import TitansConfig

__all__ = ["CausalDepthwiseConv", "MemoryLayer", "MemoryLayerState", "MemoryMonitor"]


@dataclass
class MemoryLayerState:
    """Recurrent state of one memory layer: the memory (weights, momentum) and the conv tails
    (``stream name -> (B, kernel - 1, channels)``; a missing stream means zeros: sequence start)."""

    memory: MemoryState
    conv_tails: dict[str, Tensor] = field(default_factory=dict)


class MemoryMonitor:
    """What one memory layer did while attached (``layer.monitor = MemoryMonitor()``): the largest
    per-head memory-weight norm at the end of each call, the mean ``theta``, and (``locate=True``) the
    first token whose layer input or memory read is non-finite.

    The numbers stay device tensors (no host sync per call); the trainer reduces them at its logging
    interval. Positions count the tokens of every call since the monitor was attached, so MAC's
    segment calls continue one another: attach it for one forward when locating. A non-finite input
    spoils the dual form's reads of its whole chunk (a zero coefficient times NaN is NaN), so the
    input is also located by the start of its chunk, to tell a bad input from a diverging memory.
    """

    def __init__(self, locate: bool = False):
        self.locate = locate
        self.weight_norm_max: Tensor | None = None
        self.theta_sum: Tensor | None = None
        self.theta_count = 0
        self.position = 0
        self.first_bad_input: int | None = None
        self.first_bad_input_chunk: int | None = None
        self.first_bad_read: int | None = None

    @torch.no_grad()
    def observe(self, x: Tensor, theta: Tensor, read: Tensor, memory: MemoryState, chunk_size: int) -> None:
        norm = torch.stack([w.detach().float().norm(dim=(-2, -1)).amax() for w in memory.weights]).amax()
        self.weight_norm_max = norm if self.weight_norm_max is None else torch.maximum(self.weight_norm_max, norm)
        theta_sum = theta.detach().float().sum()
        self.theta_sum = theta_sum if self.theta_sum is None else self.theta_sum + theta_sum
        self.theta_count += theta.numel()
        if self.locate:
            if self.first_bad_input is None:
                t = self._first_bad((~torch.isfinite(x).all(-1)).any(0))                    # x (B, T, d)
                if t is not None:
                    self.first_bad_input = self.position + t
                    self.first_bad_input_chunk = self.position + t // chunk_size * chunk_size
            if self.first_bad_read is None:
                t = self._first_bad((~torch.isfinite(read).all(-1)).flatten(0, 1).any(0))  # (B, H, T, D)
                self.first_bad_read = None if t is None else self.position + t
        self.position += x.shape[1]

    @staticmethod
    def _first_bad(bad: Tensor) -> int | None:
        """``bad`` is ``(T,)``: the index of its first True."""
        hits = bad.nonzero()
        return None if hits.numel() == 0 else int(hits[0, 0])


class CausalDepthwiseConv(nn.Module):
    """Depthwise 1-D conv over time that only looks back: output ``t`` sees inputs ``t-K+1 .. t``.

    The ``K - 1`` inputs before the call come from ``tail`` (zeros at the sequence start), never
    from the future (no "same" padding)."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        if kernel < 1:
            raise ValueError(f"conv_kernel must be >= 1, got {kernel}")
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in ``+-1/sqrt(kernel)``, the fan-in scale of a depthwise conv."""
        nn.init.uniform_(self.weight, -1.0 / math.sqrt(self.kernel), 1.0 / math.sqrt(self.kernel))

    def forward(self, x: Tensor, tail: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x`` ``(B, T, C)`` -> ``(y, new_tail)``; ``new_tail`` = last ``K - 1`` inputs seen."""
        B, T, C = x.shape
        if tail is None:
            tail = x.new_zeros(B, self.kernel - 1, C)
        full = torch.cat((tail.to(x.dtype), x), dim=1)  # (B, K-1+T, C)
        y = F.conv1d(full.transpose(1, 2), self.weight.to(x.dtype), groups=C).transpose(1, 2)
        return y, full[:, full.shape[1] - (self.kernel - 1):]


class MemoryLayer(nn.Module):
    """Projections, conv, gates, learned ``M_0``, the memory update/read, per-head norm, output gate."""

    monitor: MemoryMonitor | None = None  # attached by the trainer for metrics and diagnosis

    def __init__(self, config: "TitansConfig"):
        super().__init__()
        c = config
        self.n_heads, self.head_dim = c.n_heads, c.resolved_head_dim
        self.chunk_size, self.activation, self.surprise_clip = c.chunk_size, c.memory_activation, c.surprise_clip
        self.state_interval = c.memory_state_interval
        self.theta_max, self.eta_max, self.per_chunk_gates = c.theta_max, c.eta_max, c.per_chunk_gates
        H, D, d = self.n_heads, self.head_dim, c.d_model
        inner = H * D
        self.q_proj = nn.Linear(d, inner, bias=False)
        self.k_proj = nn.Linear(d, inner, bias=False)
        self.v_proj = nn.Linear(d, inner, bias=False)
        self.q_conv = CausalDepthwiseConv(inner, c.conv_kernel)
        self.k_conv = CausalDepthwiseConv(inner, c.conv_kernel)
        self.v_conv = CausalDepthwiseConv(inner, c.conv_kernel)
        self.theta_proj = nn.Linear(d, H)
        self.eta_proj = nn.Linear(d, H)
        self.alpha_proj = nn.Linear(d, H)
        self.gate_biases = {"theta_proj": c.theta_bias, "eta_proj": c.eta_bias, "alpha_proj": c.alpha_bias}
        # Memory MLP D -> E -> ... -> E -> D (depth 1: D -> D), no biases: M_0 per head.
        E = c.memory_expansion * D
        self.memory_dims = dims = [D] + [E] * (c.memory_depth - 1) + [D]
        self.initial_weights = nn.ParameterList(
            nn.Parameter(torch.empty(H, dims[i], dims[i + 1])) for i in range(c.memory_depth))
        self.out_norm = RMSNorm((H, 1, D), eps=c.norm_eps)
        self.gate_proj = nn.Linear(d, inner, bias=False)
        self.out_proj = nn.Linear(inner, d, bias=False)
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        """Gate biases from the config (little forgetting at the start); ``M_0`` with fan-in scale
        (from the layer's dims, not the tensor's shape: under ZeRO-3's partitioned construction the
        tensor is already a partition here)."""
        for name, bias in self.gate_biases.items():
            nn.init.constant_(getattr(self, name).bias, bias)
        for w, fan_in in zip(self.initial_weights, self.memory_dims):
            nn.init.normal_(w, std=1.0 / math.sqrt(fan_in))

    # ------------------------------------------------------------------------------- pieces
    def initial_state(self, batch_size: int) -> MemoryLayerState:
        """The state at the sequence start: ``M_0`` for every sequence, zero momentum and conv tails."""
        return MemoryLayerState(init_state(list(self.initial_weights), batch_size), {})

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, D)

    def _stream(self, name: str, proj: nn.Linear, conv: CausalDepthwiseConv, x: Tensor,
                tails: dict[str, Tensor], new_tails: dict[str, Tensor], normalize: bool) -> Tensor:
        """projection -> causal conv (continuing ``tails[name]``) -> SiLU -> heads (-> l2 norm)."""
        y, new_tails[name] = conv(proj(x), tails.get(name))
        y = self._heads(F.silu(y))
        return F.normalize(y, dim=-1, eps=1e-6) if normalize else y

    def qkv(self, x: Tensor, conv_tails: dict[str, Tensor] | None = None
            ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """The write path's ``q, k, v`` ``(B, H, T, D)`` (q, k unit-norm per head) and the new tails."""
        conv_tails = conv_tails or {}
        tails = dict(conv_tails)
        q = self._stream("q", self.q_proj, self.q_conv, x, conv_tails, tails, normalize=True)
        k = self._stream("k", self.k_proj, self.k_conv, x, conv_tails, tails, normalize=True)
        v = self._stream("v", self.v_proj, self.v_conv, x, conv_tails, tails, normalize=False)
        return q, k, v, tails

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``theta, eta, alpha`` as ``(B, H, T)`` in fp32 (fp64 for fp64 input; theta already scaled by ``theta_max``).

        With ``per_chunk_gates`` every token uses the gates of the FIRST token of its chunk (chunk
        grid from ``t = 0`` of the call): the first token is the only one every token of the chunk
        may see, so this stays causal."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        theta = self.theta_max * torch.sigmoid(self.theta_proj(x).to(dtype))
        eta = self.eta_max * torch.sigmoid(self.eta_proj(x).to(dtype))
        alpha = torch.sigmoid(self.alpha_proj(x).to(dtype))
        gates = [g.transpose(1, 2) for g in (theta, eta, alpha)]
        if self.per_chunk_gates:
            T = x.shape[1]
            first = torch.arange(T, device=x.device) // self.chunk_size * self.chunk_size
            gates = [g[..., first] for g in gates]
        return gates[0], gates[1], gates[2]

    def _output(self, y: Tensor, x: Tensor) -> Tensor:
        """Per-head RMSNorm of the memory read, times ``sigmoid(x W_g)``, then the output projection."""
        y = self.out_norm(y).transpose(1, 2).flatten(2)  # (B, T, H*D)
        return self.out_proj(y * torch.sigmoid(self.gate_proj(x)))

    # ------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor, state: MemoryLayerState | None = None) -> tuple[Tensor, MemoryLayerState]:
        """Write ``x`` ``(B, T, d)`` into the memory and read it back at every token (token ``t``
        reads the memory after its own update). Returns ``(out (B, T, d), state after x)``."""
        if state is None:
            state = self.initial_state(x.shape[0])
        q, k, v, tails = self.qkv(x, state.conv_tails)
        theta, eta, alpha = self.gates(x)
        y, memory = memory_chunked(q, k, v, theta, eta, alpha, state.memory,
                                   chunk_size=self.chunk_size, activation=self.activation,
                                   surprise_clip=self.surprise_clip, state_interval=self.state_interval)
        if self.monitor is not None:
            self.monitor.observe(x, theta, y, memory, self.chunk_size)
        return self._output(y, x), MemoryLayerState(memory, tails)

    def read_context(self, x: Tensor, state: MemoryLayerState | None = None) -> tuple[Tensor, MemoryLayerState]:
        """MAC's pre-segment read: ``M(q(x))`` with the memory as it stands in ``state`` (no update),
        through the same output norm, gate and projection as :meth:`forward`.

        The query path of ``x`` shares the q projection and conv weights with the write path but is
        its own conv stream (``"read_q"``), since it runs over the layer input, not the attention
        output. Returns ``(h (B, T, d), state with the read stream's conv tail advanced)``."""
        if state is None:
            state = self.initial_state(x.shape[0])
        tails = dict(state.conv_tails)
        q = self._stream("read_q", self.q_proj, self.q_conv, x, state.conv_tails, tails, normalize=True)
        h = memory_read(q, state.memory.weights, activation=self.activation)
        return self._output(h, x), MemoryLayerState(state.memory, tails)
