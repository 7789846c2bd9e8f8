"""``TitansLM``: embedding, a stack of Titans blocks, final norm, LM head, loss. Its hyperparameters,
``TitansConfig``, are defined in :mod:`titans_pretrain.config.model` and re-exported here.

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

# defined with the run config (the layer below) and re-exported: `titans_pretrain.models.titans`
# keeps naming them for the code and saved checkpoints that import them from here
from titans_pretrain.config.model import (ACTIVATIONS, LEGACY_DEFAULTS, MAC_OUTPUT_GATES, TitansConfig,
                                          VARIANTS)
from titans_pretrain.models.blocks import BlockState, build_block
from titans_pretrain.models.generation import generate
from titans_pretrain.models.attention import Attention
from titans_pretrain.models.memory import CausalDepthwiseConv, MemoryLayer
from titans_pretrain.models.norms import RMSNorm

__all__ = ["ACTIVATIONS", "LEGACY_DEFAULTS", "MAC_OUTPUT_GATES", "TitansConfig", "TitansLM", "TitansOutput",
           "TitansState", "VARIANTS"]


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
        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, state=state,
                        generator=generator, return_state=return_state, attention_mask=attention_mask)
