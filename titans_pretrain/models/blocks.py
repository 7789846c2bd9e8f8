"""The four Titans blocks (docs/method.md §4): MAC, MAG, MAL and LMM.

Every block is pre-norm with residual connections and ends with a SwiGLU MLP. A block is called as
``block(x)`` for training (returns ``x``) or ``block(x, state, return_state=True)`` for streaming
(returns ``(x, BlockState)``). A call is exact when ``x`` starts on the block's unit boundary
(``chunk_size`` tokens for LMM/MAG/MAL, ``segment_len`` for MAC): the model guarantees that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans_pretrain.models.attention import Attention, KVCache
from titans_pretrain.models.memory import MemoryLayer, MemoryLayerState
from titans_pretrain.models.norms import RMSNorm

if TYPE_CHECKING:  # pragma: no cover
    from titans_pretrain.config.model import TitansConfig

__all__ = ["BlockState", "LMMBlock", "MACBlock", "MAGBlock", "MALBlock", "SwiGLU", "build_block", "mac_output"]


@dataclass
class BlockState:
    """Streaming state of one block: its memory layer's state and its sliding-window cache
    (either is None where the block has no such part or nothing has been processed yet)."""

    memory: MemoryLayerState | None = None
    kv: KVCache | None = None


class SwiGLU(nn.Module):
    """``W_down (silu(x W_gate) * x W_up)``."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Block(nn.Module):
    """Shared parts: the MLP sub-block and the train/stream calling convention."""

    def __init__(self, config: "TitansConfig"):
        super().__init__()
        self.config = config
        self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.resolved_mlp_hidden)

    def _attention(self) -> Attention:
        c = self.config
        return Attention(c.d_model, c.n_heads, c.resolved_head_dim, n_persistent=c.n_persistent,
                         rope_theta=c.rope_theta)

    def forward(self, x: Tensor, state: BlockState | None = None, return_state: bool = False):
        x, new_state = self.mix(x, state or BlockState())
        x = x + self.mlp(self.mlp_norm(x))
        return (x, new_state) if return_state else x

    def mix(self, x: Tensor, state: BlockState) -> tuple[Tensor, BlockState]:  # pragma: no cover
        raise NotImplementedError


class LMMBlock(_Block):
    """The memory as the only token mixer."""

    def __init__(self, config: "TitansConfig"):
        super().__init__(config)
        self.memory_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.memory = MemoryLayer(config)

    def mix(self, x, state):
        m, mem_state = self.memory(self.memory_norm(x), state.memory)
        return x + m, BlockState(memory=mem_state)


class MALBlock(_Block):
    """Memory as a layer: memory sub-block, then sliding-window attention sub-block, then MLP."""

    def __init__(self, config: "TitansConfig"):
        super().__init__(config)
        if config.use_memory:
            self.memory_norm = RMSNorm(config.d_model, eps=config.norm_eps)
            self.memory = MemoryLayer(config)
        self.attn_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = self._attention()

    def mix(self, x, state):
        mem_state = None
        if self.config.use_memory:
            m, mem_state = self.memory(self.memory_norm(x), state.memory)
            x = x + m
        y, kv = self.attn.sliding(self.attn_norm(x), self.config.window, state.kv)
        return x + y, BlockState(memory=mem_state, kv=kv)


class MAGBlock(_Block):
    """Memory as a gate: sliding-window attention and the memory on the same normed input,
    combined as ``norm(y) * sigmoid(norm(M(x)))`` (learnable norm scales)."""

    def __init__(self, config: "TitansConfig"):
        super().__init__(config)
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = self._attention()
        if config.use_memory:
            self.memory = MemoryLayer(config)
            self.attn_out_norm = RMSNorm(config.d_model, eps=config.norm_eps)
            self.memory_out_norm = RMSNorm(config.d_model, eps=config.norm_eps)

    def mix(self, x, state):
        h = self.norm(x)
        y, kv = self.attn.sliding(h, self.config.window, state.kv)
        if not self.config.use_memory:  # attention-only ablation
            return x + y, BlockState(kv=kv)
        m, mem_state = self.memory(h, state.memory)
        out = self.attn_out_norm(y) * torch.sigmoid(self.memory_out_norm(m))
        return x + out, BlockState(memory=mem_state, kv=kv)


class MACBlock(_Block):
    """Memory as context (§4.1). Per segment ``s`` of ``segment_len`` tokens, in order:

    1. ``h = M_{end of s-1}(q(x))``: read the memory without updating it (:meth:`MemoryLayer.read_context`);
    2. ``y = Attn([persistent | h | x_s])`` with the MAC mask (never across segments);
    3. the memory layer runs on ``u = norm(y)``: keys, values and gates from the attention output
       WRITE the memory, and each token reads it after its own update at ``q(u_i)``: ``r = memory(u)``;
    4. ``o = y * sigmoid(norm(r))``: the paper's ``y (x) M(y)``, with ``(x)`` the non-linear gate of
       §4.2 (as in MAG), added to the residual stream.

    Two project conventions (the paper is silent). ``u`` is a learnable per-token RMSNorm of ``y``:
    the raw attention output is ~1e-3 in scale at init, which makes the written values vanish. The
    gate of step 4 (``mac_output_gate="sigmoid"``) lets the attention output through at half scale
    from the start; the plain product ``o = u * r`` (``"product"``) starves the attention of
    gradient. On the pass-key task of docs/eval.md with the whole sample in one segment, a 2-layer
    MAC with the product had not learned to copy after 700 steps, with the gate it started by step
    1,000, and the same block without memory learned it within 300. The memory's chunk grid
    restarts at every segment (each segment is one ``memory_chunked`` call). ``use_memory=False``
    gives segment-local attention alone (the ablation).
    """

    def __init__(self, config: "TitansConfig"):
        super().__init__(config)
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = self._attention()
        if config.use_memory:
            self.memory_in_norm = RMSNorm(config.d_model, eps=config.norm_eps)
            self.memory = MemoryLayer(config)
            if config.mac_output_gate == "sigmoid":
                self.memory_out_norm = RMSNorm(config.d_model, eps=config.norm_eps)

    def mix(self, x, state):
        C = self.config.segment_len
        h = self.norm(x)
        mem_state = state.memory
        if self.config.use_memory and mem_state is None:
            mem_state = self.memory.initial_state(x.shape[0])
        outs = []
        for start in range(0, x.shape[1], C):
            seg = h[:, start:start + C]
            if not self.config.use_memory:
                outs.append(self.attn.segment(seg, None, C))
                continue
            context, mem_state = self.memory.read_context(seg, mem_state)
            y = self.attn.segment(seg, context, C)
            u = self.memory_in_norm(y)
            r, mem_state = self.memory(u, mem_state)
            outs.append(mac_output(self.config.mac_output_gate, y, u, r, getattr(self, "memory_out_norm", None)))
        out = torch.cat(outs, dim=1) if outs else torch.zeros_like(x)
        return x + out, BlockState(memory=mem_state)


def mac_output(gate: str, y, u, r, out_norm: nn.Module | None):
    """A MAC segment's output from its attention output ``y``, ``u = memory_in_norm(y)`` and the
    memory read ``r``, by ``TitansConfig.mac_output_gate`` (shared with the Megatron mixer)."""
    return y * torch.sigmoid(out_norm(r)) if gate == "sigmoid" else u * r


_BLOCKS = {"mac": MACBlock, "mag": MAGBlock, "mal": MALBlock, "lmm": LMMBlock}


def build_block(config: "TitansConfig") -> _Block:
    return _BLOCKS[config.variant](config)
