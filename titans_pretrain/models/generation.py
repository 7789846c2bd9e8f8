"""Greedy and sampled generation on top of the streaming state, and padded batches.

The prompt is consumed once; each new token is then one streaming step, so the per-token cost is
bounded by one streaming unit and the memory held does not grow with the length generated.

**Padded batches** (:func:`forward_padded`, ``generate(..., attention_mask=...)``). The memory's
chunks and MAC's segments are not shift-invariant: a token's surprise is taken at the weights of its
chunk start, and a segment attends within itself. So a row's chunk and segment boundaries must fall
where they would if the row ran alone, which masking pad tokens cannot give. Here each row's real
tokens (``attention_mask == 1``) run on their own, through the row's own streaming state: a pad
changes no state at all, and every real position gets exactly the logits of its sequence run alone,
for left, right or any padding. The cost: a padded batch runs one row at a time.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from titans_pretrain.models.titans import TitansLM, TitansState

__all__ = ["forward_padded", "generate", "sample_next"]


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token ids ``(B,)`` from last-position logits ``(B, V)``: argmax when ``temperature == 0``,
    else a sample from ``softmax(logits / temperature)`` restricted to the ``top_k`` largest."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def forward_padded(model: "TitansLM", input_ids: Tensor, attention_mask: Tensor,
                   states: "list[TitansState | None] | None" = None, *, keep_from: int = 0,
                   piece_len: int | None = None) -> "tuple[Tensor, list[TitansState | None]]":
    """Logits of a padded batch, each row's real tokens run alone (see the module docstring).

    ``attention_mask`` ``(B, T)``: 1 = real token, 0 = pad. ``states``: one streaming state per row
    (``None`` = sequence start) continued by this call. Returns ``(logits, states)``: logits
    ``(B, T - keep_from, vocab)`` for columns ``keep_from ..``, zero at pad columns, and the rows'
    new states (a row with no real token keeps its state). ``piece_len`` feeds a row's tokens in
    pieces of that many (bounded memory for long prompts)."""
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                         f"{tuple(input_ids.shape)}")
    B, T = input_ids.shape
    states = [None] * B if states is None else list(states)
    if len(states) != B:
        raise ValueError(f"{len(states)} row states for a batch of {B} rows")
    real = attention_mask.to(torch.bool)
    logits = None
    for b in range(B):
        positions = real[b].nonzero().squeeze(1)
        ids, state = input_ids[b, positions][None], states[b]
        step = piece_len or max(1, ids.shape[1])
        for start in range(0, ids.shape[1], step):
            out = model(ids[:, start:start + step], state=state, return_state=True)
            state = out.state
            cols = positions[start:start + step]
            keep = cols >= keep_from
            if bool(keep.any()):
                if logits is None:
                    logits = out.logits.new_zeros(B, T - keep_from, out.logits.shape[-1])
                logits[b, cols[keep] - keep_from] = out.logits[0, keep]
        states[b] = state
    if logits is None:
        logits = model.lm_head.weight.new_zeros(B, T - keep_from, model.config.vocab_size)
    return logits, states


@torch.no_grad()
def generate(model: "TitansLM", input_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, state: "TitansState | list[TitansState | None] | None" = None,
             generator: torch.Generator | None = None, return_state: bool = False,
             attention_mask: Tensor | None = None):
    """Feed ``input_ids`` ``(B, T)`` (continuing ``state`` if given) and generate ``max_new_tokens``.

    Returns the new tokens ``(B, max_new_tokens)``, or ``(tokens, state)`` with ``return_state``
    (the state then covers the prompt and all generated tokens, ready for the next call).

    With an ``attention_mask`` that has zeros (or a per-row state list from such a call) the batch is
    padded: every row continues its own real tokens exactly as if run alone (:func:`forward_padded`,
    any padding side); the state is then a list of per-row states."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if input_ids.shape[1] == 0:
        raise ValueError("generate needs at least one prompt token (with a state, the next new token)")
    if isinstance(state, list) or (attention_mask is not None and not bool(attention_mask.all())):
        return _generate_padded(model, input_ids, attention_mask, max_new_tokens, temperature, top_k,
                                state, generator, return_state)
    out = model(input_ids, state=state, return_state=True)
    state, logits = out.state, out.logits
    new_tokens = []
    for i in range(max_new_tokens):
        token = sample_next(logits[:, -1], temperature, top_k, generator)
        new_tokens.append(token)
        if i + 1 < max_new_tokens:
            out = model(token[:, None], state=state, return_state=True)
            state, logits = out.state, out.logits
        else:  # the last token still enters the state, so the caller can continue exactly
            state = model(token[:, None], state=state, return_state=True).state if return_state else state
    tokens = torch.stack(new_tokens, dim=1) if new_tokens else input_ids.new_zeros(input_ids.shape[0], 0)
    return (tokens, state) if return_state else tokens


def _generate_padded(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, states, generator,
                     return_state):
    """:func:`generate` for a padded batch: per-row states, each row continued after its last real token."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if states is not None and not isinstance(states, list):
        raise ValueError("a padded batch continues a list of per-row states (returned by a padded generate), "
                         "not one batched TitansState")
    real = attention_mask.to(torch.bool)
    empty = (~real.any(dim=1)).nonzero().squeeze(1).tolist()
    if empty:
        raise ValueError(f"rows {empty} of attention_mask have no real token: each row needs at least one "
                         "(its next token is predicted from its last real one)")
    logits, states = forward_padded(model, input_ids, attention_mask, states)
    last = input_ids.shape[1] - 1 - real.flip(1).to(torch.int8).argmax(dim=1)  # each row's last real column
    logits = logits[torch.arange(input_ids.shape[0], device=logits.device), last.to(logits.device)]
    ones = torch.ones_like(input_ids[:, :1])
    new_tokens = []
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, generator)
        new_tokens.append(token)
        if i + 1 < max_new_tokens or return_state:
            step, states = forward_padded(model, token[:, None], ones, states)
            logits = step[:, -1]
    tokens = torch.stack(new_tokens, dim=1) if new_tokens else input_ids.new_zeros(input_ids.shape[0], 0)
    return (tokens, states) if return_state else tokens
